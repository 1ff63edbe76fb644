"""Where the ALFWorld game files come from, and which games make up each split.

The official ALFWorld 2.1.x text games are folders `<split>/<task>/<trial>/game.tw-pddl` (each file holds
the PDDL domain, the grammar, the PDDL problem and a walkthrough). They are found, in this order:

1. the `data_dir` option: a folder holding `train/`, `valid_seen/`, `valid_unseen/` (or holding
   `json_2.1.1/` with those), e.g. the `$ALFWORLD_DATA` of a user who ran `alfworld-download`;
2. the `ALFWORLD_DATA` environment variable, when it holds `json_2.1.1/` (the `alfworld` package sets
   this variable to an empty `~/.cache/alfworld` on import, so an empty one is not an error);
3. the archive shipped with the project, `json_2.1.1.tar.xz` in `../shared/data/alfworld/` relative to
   the repository root (or in `$T2PO_ALFWORLD_DATA`), unpacked once into `$T2PO_CACHE/alfworld/`
   (default `~/.cache/t2po/alfworld/`).

The games of a split are collected the way the `alfworld` package's `AlfredTWEnv.collect_game_files`
does (movable/sliced trials and unsolvable games are skipped), except that the task type comes from the
`<task>` folder name instead of a `traj_data.json` (the shipped archive has none).

A seed names a game: game index = seed % number of games, in a fixed order that is the same on every
machine (by SHA-256 of the game's `<task>/<trial>` path). That order is pseudo-random, so any run of
consecutive seeds (the tasks of a training iteration, the first 128 validation games) is a mixed sample
of task types and rooms, not a run of near-identical games as the alphabetical order would give.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from t2po.errors import InvalidInput

#: folder name of the game files inside the archive and inside an `alfworld-download` data folder
GAMES_FOLDER = "json_2.1.1"
ARCHIVE_NAME = "json_2.1.1.tar.xz"

#: split option -> folder. "valid" is an alias of the in-distribution evaluation split.
SPLITS = {
    "train": "train",  # 3553 games
    "valid_seen": "valid_seen",  # 140 games, evaluation in distribution
    "valid": "valid_seen",
    "valid_unseen": "valid_unseen",  # 134 games, evaluation out of distribution
}

#: task type in the folder name -> the name reported in metrics. The short names are the keys verl-agent
#: matches in the game path for its per-type success rates, with the `_in_recep` suffix dropped.
TASK_TYPES = {
    "pick_and_place_simple": "pick_and_place",
    "pick_two_obj_and_place": "pick_two_obj_and_place",
    "look_at_obj_in_light": "look_at_obj_in_light",
    "pick_heat_then_place_in_recep": "pick_heat_then_place",
    "pick_cool_then_place_in_recep": "pick_cool_then_place",
    "pick_clean_then_place_in_recep": "pick_clean_then_place",
}

_WHERE_TO_GET = (
    "Get the ALFWorld game files in one of these ways: put the project's archive at "
    f"../shared/data/alfworld/{ARCHIVE_NAME} (relative to the repository root; set T2PO_ALFWORLD_DATA to the "
    "folder that holds it if it lives elsewhere), or run `alfworld-download` (needs internet) and pass "
    "data_dir=$ALFWORLD_DATA (or set the ALFWORLD_DATA environment variable)."
)


@dataclass(frozen=True)
class Game:
    path: str  # absolute path of game.tw-pddl
    task_type: str  # one of TASK_TYPES.values()


def archive_dir() -> Path:
    """The folder of the project's game archive: `$T2PO_ALFWORLD_DATA`, else `<repo root>/../shared/data/alfworld`."""
    override = os.environ.get("T2PO_ALFWORLD_DATA")
    if override:
        return Path(override)
    repo_root = Path(__file__).resolve().parents[3]
    return repo_root.parent / "shared" / "data" / "alfworld"


def cache_dir() -> Path:
    """Where unpacked data goes: `$T2PO_CACHE`, else `~/.cache/t2po`."""
    return Path(os.environ.get("T2PO_CACHE") or Path.home() / ".cache" / "t2po")


def _games_root_in(folder: Path) -> Path | None:
    """`folder` itself when it holds the split folders, `folder/json_2.1.1` when that does, else None."""
    for candidate in (folder, folder / GAMES_FOLDER):
        if any((candidate / split).is_dir() for split in set(SPLITS.values())):
            return candidate
    return None


def unpack_archive(archive: Path, destination: Path) -> Path:
    """Unpack `archive` (which holds `json_2.1.1/`) into `destination/json_2.1.1` and return that folder.

    Atomic: the archive is unpacked into a temporary folder next to the target and renamed into place, so
    an interrupted unpack never leaves a half-written folder that a later run would take as complete. A
    target that already exists is used as it is."""
    target = destination / GAMES_FOLDER
    if target.is_dir():
        return target
    destination.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=destination))
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, filter="data")
        unpacked = staging / GAMES_FOLDER
        if not unpacked.is_dir():
            raise InvalidInput(f"{archive} does not contain a {GAMES_FOLDER}/ folder; it is not the ALFWorld game "
                               "archive.")
        try:
            os.rename(unpacked, target)
        except OSError:
            if not target.is_dir():  # not just another process finishing the same unpack first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def find_games_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder that holds the split folders (see the module docstring for the search order)."""
    if data_dir is not None:
        root = _games_root_in(Path(data_dir).expanduser())
        if root is None:
            raise FileNotFoundError(
                f"data_dir={str(data_dir)!r} holds no ALFWorld games (expected train/, valid_seen/, valid_unseen/ "
                f"folders there or in {GAMES_FOLDER}/ below it). {_WHERE_TO_GET}"
            )
        return root
    alfworld_data = os.environ.get("ALFWORLD_DATA")
    if alfworld_data:
        root = _games_root_in(Path(alfworld_data).expanduser() / GAMES_FOLDER)
        if root is not None:
            return root
    archive = archive_dir() / ARCHIVE_NAME
    if not archive.is_file():
        raise FileNotFoundError(f"ALFWorld game archive not found at {archive}. {_WHERE_TO_GET}")
    return unpack_archive(archive, cache_dir() / "alfworld")


def _seed_order(game_dir: Path) -> str:
    return hashlib.sha256(f"{game_dir.parent.name}/{game_dir.name}".encode()).hexdigest()


def collect_games(root: Path, split: str) -> list[Game]:
    """The solvable games of `split` under `root`, in seed order (see the module docstring)."""
    if split not in SPLITS:
        raise InvalidInput(f"Unknown ALFWorld split {split!r}; choose one of {', '.join(SPLITS)}.")
    split_dir = root / SPLITS[split]
    if not split_dir.is_dir():
        raise FileNotFoundError(f"No {SPLITS[split]}/ folder in {root}. {_WHERE_TO_GET}")
    games = []
    for path in sorted(split_dir.glob("*/*/game.tw-pddl"), key=lambda p: _seed_order(p.parent)):
        task_folder = path.parent.parent.name
        # alfworld's text engine does not support these trials (AlfredTWEnv.collect_game_files skips them too)
        if "movable" in task_folder or "Sliced" in task_folder:
            continue
        task_type = TASK_TYPES.get(task_folder.split("-")[0])
        if task_type is None:
            continue
        with open(path) as f:
            if not json.load(f).get("solvable", False):
                continue
        games.append(Game(str(path.resolve()), task_type))
    if not games:
        raise FileNotFoundError(f"No solvable ALFWorld games in {split_dir}. {_WHERE_TO_GET}")
    return games
