"""The path rule: every folder or file a command writes stays where its name says, and never lands in
another run's files.

    run name (trainer.run_name)      one path component: no `/`, no `..`, not `.` (runs/NAME, nothing else)
    output folder (--out, output_dir) `..` only at the start (`../results/x` is fine, `a/../b` is refused:
                                     it names a folder inside `a` and writes beside it); the last part is a
                                     real name, not a symlink; never inside an existing t2po run folder
    existing folders                 a command writes into an empty or new folder only, or into its own
                                     earlier output of the same kind (an evaluation to resume, a report to redraw)

A path that breaks the rule is refused with one line (`UserError`, exit 2) before any work.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from t2po.errors import UserError


def check_run_name(name: str) -> str:
    """A run name that names one folder inside `trainer.output_dir`."""
    text = str(name)
    if text in ("", ".", "..") or "/" in text or "\\" in text or "\0" in text or len(text.encode()) > 255:
        raise UserError(f"trainer.run_name={name!r}: a run name is one folder name (letters, digits, '-', '_', '.'; "
                        f"no '/' or '..'), e.g. trainer.run_name=sokoban-seed1; "
                        f"set trainer.output_dir for another parent folder")
    return text


def spelling_error(text: str, flag: str, parent: bool = False) -> str | None:
    """Why the spelling of an output path breaks the path rule (`..` after a folder name, no last
    name), or None. `parent`: a folder that holds outputs (trainer.output_dir), which may be `.` or `..`."""
    if not text or "\0" in text:
        return f"{flag} {text!r}: give a folder or file name"
    path = PurePath(os.path.expanduser(text))
    parts = path.parts[1:] if path.anchor else path.parts
    names = [p for p in parts if p != "."]
    last_up = max((i for i, p in enumerate(names) if p == ".."), default=-1)
    if any(p != ".." for p in names[:max(last_up, 0)]):  # a `..` after a name
        return (f"{flag} {text!r} goes back up with '..' after a folder name, so it writes outside the folder "
                f"it names; "
                f"write the path without '..' after a name (a leading ../ is fine)")
    if not parent and (not names or names[-1] == ".."):
        return f"{flag} {text!r} names no new folder or file; give a name, e.g. {flag} results/my-output"
    return None


def output_path(path: str | os.PathLike, flag: str, parent: bool = False) -> Path:
    """`path` resolved (absolute, symlinks of its parent followed), after checking the path rule:
    `..` only at the start, a real last name, no symlink as the last part, not inside a run folder."""
    text = os.fspath(path)
    error = spelling_error(text, flag, parent)
    if error:
        raise UserError(error)
    unresolved = Path(os.path.abspath(os.path.expanduser(text)))
    if unresolved.is_symlink():
        raise UserError(f"{flag} {text!r} is a symbolic link; give the real path of a new folder or file")
    resolved = unresolved.parent.resolve() / unresolved.name
    run = enclosing_run(resolved)
    if run is not None:
        raise UserError(f"{flag} {text!r} lies inside the t2po run folder {run}, whose files only "
                        f"`t2po train --resume` writes; "
                        f"choose a folder outside it")
    return resolved


def enclosing_run(path: Path) -> Path | None:
    """The t2po run folder that `path` is or lies inside (a folder with config.yaml and a run's own
    files), or None."""
    for folder in (path, *path.parents):
        if folder.is_dir() and is_run_folder(folder):
            return folder
    return None


def is_run_folder(folder: Path) -> bool:
    own = ("run_state.json", "checkpoints", "train.log", "metrics.jsonl")
    return (folder / "config.yaml").is_file() and any((folder / name).exists() for name in own)


def new_folder(path: str | os.PathLike, flag: str, own_marker: str | None = None) -> Path:
    """An output folder (checked by `output_path`) that is new or empty, or, with `own_marker`, an
    earlier output of the same command (a folder holding that file), which the command may continue."""
    out = output_path(path, flag)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {os.fspath(path)!r} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (own_marker and (out / own_marker).is_file()):
        raise UserError(f"{flag} {os.fspath(path)!r} exists and is not empty; give a new folder "
                        f"(t2po never writes into a folder that holds other files)")
    return out


def new_file(path: str | os.PathLike, flag: str, suffixes: tuple[str, ...]) -> Path:
    """An output file (checked by `output_path`) with one of `suffixes`; an existing folder is refused."""
    out = output_path(path, flag)
    if out.suffix not in suffixes:
        raise UserError(f"{flag} {os.fspath(path)!r}: the file name must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise UserError(f"{flag} {os.fspath(path)!r} is a folder; give a file name ending in {' or '.join(suffixes)}")
    return out


def first_missing(path: str | os.PathLike) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what a command that did no work removes
    again), or None when `path` exists."""
    path = Path(os.path.abspath(path))
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path
