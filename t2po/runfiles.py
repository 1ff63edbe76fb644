"""Checks of the files a run folder is read back from (the layout: `t2po/checkpoints.py`), before
anything is loaded from them: a damaged file is named with what to do, never met as a library's
traceback halfway through a load.

    checkpoint_candidates(RUN/checkpoints, note)  the checkpoints whose files all read, newest first;
                                                  each one skipped is named in a note (train --resume,
                                                  eval, serve and export fall back alike)
    check_warmup(RUN)                             the warm-up model (RUN/warmup_model/) or UserError
    read_mapping(path, fix)                       a YAML or JSON file holding a mapping, or UserError

The checks read file headers and small JSON files only (a safetensors file: its header against its
size), so they cost milliseconds; loading the tensors stays with the loaders (`load_checkpoint`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

from t2po.checkpoints import CHECKPOINT_INFO, WARMUP_MODEL, CorruptCheckpoint, is_sharded
from t2po.errors import UserError


def safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be read whole (missing, cut short, not safetensors), or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "cannot be read (empty or cut short)"
            (length,) = struct.unpack("<Q", head)
            size = path.stat().st_size
            if length > size - 8 or length > 100_000_000:
                return "cannot be read (cut short, or not a safetensors file: its header is larger than the file)"
            header = json.loads(f.read(length))
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as e:
        return f"cannot be read (not a safetensors file: {type(e).__name__})"
    if not isinstance(header, dict):
        return "cannot be read (not a safetensors file: its header is no mapping)"
    ends = [v.get("data_offsets", [0, 0])[1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    if 8 + length + max(ends, default=0) > size:
        return f"cannot be read (cut short: {size} bytes, its header describes {8 + length + max(ends, default=0)})"
    return None


def json_problem(path: Path, key: str | None = None, kind: type = int) -> str | None:
    """Why a JSON file is not a readable mapping (with `key` of type `kind`), or None."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError) as e:
        return f"is not JSON ({type(e).__name__}: {e})"
    if not isinstance(data, dict):
        return "holds no JSON mapping"
    if key is not None and (not isinstance(data.get(key), kind) or isinstance(data.get(key), bool)):
        return f"holds no {key}"
    return None


def checkpoint_problem(ckpt: Path, resume: bool = False) -> str | None:
    """The first file of a checkpoint folder that cannot be read back (`file problem`), or None. The
    weights and the files that say how to apply them; with `resume`, the optimizer and RNG state too."""
    ckpt = Path(ckpt)
    checks: list[tuple[str, str | None]] = [
        ("trainer_state.json", json_problem(ckpt / "trainer_state.json", "iteration"))]
    # checkpoint.json describes the folder for other readers; t2po needs it after a LoRA warm-up, whose
    # adapter rank it records (`combine_adapters`); a checkpoint written without it (tests, older runs) loads
    lora_warmup = (ckpt.parent.parent / WARMUP_MODEL / "adapter_config.json").exists()
    if (ckpt / CHECKPOINT_INFO).exists() or lora_warmup:
        checks.append((CHECKPOINT_INFO, json_problem(ckpt / CHECKPOINT_INFO, "kind", str)))
    if is_sharded(ckpt):
        checks += [(p.name, safetensors_problem(p)) for p in sorted(ckpt.glob("shard-*.safetensors"))]
    else:
        if (ckpt / "adapter").is_dir():
            checks += [("adapter/adapter_config.json", json_problem(ckpt / "adapter" / "adapter_config.json", "r")),
                       ("adapter/adapter_model.safetensors",
                        safetensors_problem(ckpt / "adapter" / "adapter_model.safetensors"))]
        else:
            weights = sorted((ckpt / "model").glob("*.safetensors"))
            checks += ([(f"model/{p.name}", safetensors_problem(p)) for p in weights]
                       or [("model/", "holds no safetensors weights")])
        if resume:
            value_head = ("value_head.safetensors",) if (ckpt / "value_head.safetensors").exists() else ()
            names = ("optimizer.safetensors", "rng.safetensors", *value_head)
            checks += [(name, safetensors_problem(ckpt / name)) for name in names]
            checks.append(("optimizer.json", json_problem(ckpt / "optimizer.json")))
    return next((f"{name} {problem}" for name, problem in checks if problem), None)


def checkpoint_candidates(ckpt_root: Path, note: Callable[[str], None] | None = None,
                          resume: bool = False) -> Iterator[Path]:
    """The checkpoints of a run whose files read back (`checkpoint_problem`), newest first. A folder
    left half-written (`.tmp`) is passed over silently; any other with a damaged or missing file is
    named in a note."""
    ckpt_root = Path(ckpt_root)
    folders = sorted((p for p in ckpt_root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp")),
                     reverse=True)  # none when the folder does not exist
    for ckpt in folders:
        problem = checkpoint_problem(ckpt, resume)
        if problem is None:
            yield ckpt
        elif note is not None:
            note(f"skipped checkpoint {ckpt}: {problem}; trying the one before")


def check_checkpoint(ckpt: Path) -> None:
    """`CorruptCheckpoint` naming the first file of `ckpt` that a resume cannot read back."""
    problem = checkpoint_problem(ckpt, resume=True)
    if problem is not None:
        raise CorruptCheckpoint(problem)


def check_warmup(run_dir: Path) -> None:
    """The warm-up model of a run (`RUN/warmup_model/`: a LoRA adapter or a full model folder), or
    UserError naming the damaged file: the run's checkpoints apply to it, so nothing can stand in for it."""
    folder = Path(run_dir) / WARMUP_MODEL
    if (folder / "adapter_config.json").exists() or (folder / "adapter_model.safetensors").exists():
        checks = [("adapter_config.json", json_problem(folder / "adapter_config.json", "base_model_name_or_path", str)),
                  ("adapter_model.safetensors", safetensors_problem(folder / "adapter_model.safetensors"))]
    else:
        weights = sorted(folder.glob("*.safetensors"))
        checks = [("config.json", json_problem(folder / "config.json"))]
        checks += [(p.name, safetensors_problem(p)) for p in weights]
        checks += [] if weights else [("model.safetensors", "is missing")]
    for name, problem in checks:
        if problem:
            raise UserError(f"{folder / name} {problem}: the run's warm-up model is damaged and its checkpoints "
                            f"apply to it; "
                            f"restore the file from a copy, or start a new run")


def read_mapping(path: Path, fix: str) -> dict:
    """A YAML (or JSON) file holding a mapping; UserError naming the file and `fix` when it is damaged."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not valid YAML ({first}); {fix}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path} holds no mapping of config sections; {fix}")
    return data


RUN_CONFIG_FIX = "restore it from a copy (the MLflow run keeps one as the artifact config.yaml), or start a new run"


def read_run_config(run_dir: Path) -> dict:
    """A run folder's config.yaml as `t2po train` writes it (whole, atomically, ending in a newline),
    or UserError naming the file: a file cut short can still be valid YAML, and would silently fill
    the missing keys with the code defaults."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        if (Path(run_dir) / "checkpoints").is_dir():
            raise UserError(f"{path} is missing; {RUN_CONFIG_FIX}")
        raise FileNotFoundError(f"{run_dir} is not a t2po run folder (no config.yaml). "
                                "Pass the folder printed at the start of `t2po train`.")
    data = read_mapping(path, RUN_CONFIG_FIX)
    if data and not path.read_bytes().endswith(b"\n"):
        raise UserError(f"{path} is cut short (no final newline); {RUN_CONFIG_FIX}")
    return data
