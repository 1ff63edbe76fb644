"""Checks of the files a run folder is read back from, before anything is loaded from them: a damaged
file is named with what to do, never met as a library's traceback halfway through a load.

    safetensors_problem(path)    why a safetensors file cannot be read whole (its header against its size), or None
    json_problem(path, key)      why a JSON file is not a readable mapping (with `key`), or None
    read_mapping(path, fix)      a YAML or JSON file holding a mapping, or UserError
    read_run_config(RUN)         a run folder's config.yaml, whole, or UserError

The checks read file headers and small JSON files only, so they cost milliseconds; loading the tensors
stays with the loaders. The checkpoints and the warm-up model are checked with these by
`t2po.checkpoints.Checkpointer` (the layout's home).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

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
