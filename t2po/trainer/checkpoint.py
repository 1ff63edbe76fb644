"""Checkpoints in safetensors, written atomically.

A checkpoint is a folder `checkpoints/iter_000012/` holding the trainable weights (LoRA adapter or the
full model), the critic's value head (PPO), the optimizer state, the torch RNG state and
`trainer_state.json` (iteration, scheduler step). It is written to `iter_000012.tmp/` and renamed
when complete, then `checkpoints/latest` (a one-line text file) is replaced atomically; a folder
without `trainer_state.json` or still named `.tmp` is never loaded. No pickle anywhere.
A run of several processes writes sharded checkpoints into the same folders instead
(`t2po.distributed.save_sharded`: `shard-*.safetensors`, any world size can load them).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON-able metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().cpu().contiguous().clone()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    ckpt_root: Path,
    iteration: int,
    model: Any,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict,
    value_head: torch.nn.Module | None = None,
    lora: bool = True,
    keep: int = 2,
) -> Path:
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"iter_{iteration:06d}"
    tmp = ckpt_root / f"iter_{iteration:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    if lora:
        model.save_pretrained(tmp / "adapter", safe_serialization=True)
    else:
        model.save_pretrained(tmp / "model", safe_serialization=True)
    if value_head is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, str(tmp / "value_head.safetensors"))
    tensors, meta = optimizer_to_tensors(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(meta))
    save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
    (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "iteration": iteration}, indent=1))  # written last: marks completeness
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    mark_latest(ckpt_root, final, keep)
    return final


def mark_latest(ckpt_root: Path, final: Path, keep: int) -> None:
    """Point `checkpoints/latest` at the complete checkpoint `final`; keep the newest `keep` of them."""
    atomic_write_text(ckpt_root / "latest", final.name + "\n")
    done = sorted(p for p in ckpt_root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint (ignores half-written `.tmp` folders)."""
    if not ckpt_root.exists():
        return None
    candidates = sorted(p for p in ckpt_root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer_state.json").exists())
    return candidates[-1] if candidates else None


def load_trainer_state(ckpt: Path) -> dict:
    return json.loads((ckpt / "trainer_state.json").read_text())


def load_checkpoint_into(ckpt: Path, model: Any, optimizer: torch.optim.Optimizer | None, value_head: torch.nn.Module | None, lora: bool) -> dict:
    """Load weights (LoRA adapter, or full weights into an already-built model), optimizer, RNG."""
    if lora:
        from peft import set_peft_model_state_dict

        weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"Checkpoint {ckpt} does not match the model's LoRA layout (unexpected keys: {unexpected[:3]}...)")
    else:
        weights = {}
        for f in sorted((ckpt / "model").glob("*.safetensors")):
            weights.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise RuntimeError(f"Checkpoint {ckpt} does not match the model (unexpected keys: {unexpected[:3]}...)")
    if value_head is not None and (ckpt / "value_head.safetensors").exists():
        value_head.load_state_dict(load_file(str(ckpt / "value_head.safetensors")))
    if optimizer is not None:
        optimizer_from_tensors(optimizer, load_file(str(ckpt / "optimizer.safetensors")), json.loads((ckpt / "optimizer.json").read_text()))
    torch.set_rng_state(load_file(str(ckpt / "rng.safetensors"))["torch_rng"])
    return load_trainer_state(ckpt)
