"""Where a policy's weights live: run folders, checkpoints, and atomic writes. The only module that
knows the layout (the trainer writes it; `t2po.policy_source` reads it for `t2po eval`, `serve`, `rft`, `export`):

    RUN/config.yaml                      the run's resolved config
    RUN/warmup_model/                    the warm-up (docs/method.md §5), when one ran: the base the checkpoints
                                         apply to (else the config's model.path); a LoRA warm-up is its
                                         adapter on model.path (`load_model` merges it), a full one the model
    RUN/checkpoints/iter_000012/         one complete checkpoint, written as iter_000012.tmp/ and renamed:
        adapter/ or model/               the LoRA adapter or the full weights (one process), or
        shard-*.safetensors              every rank's shards (several processes, `t2po.distributed.save_sharded`)
        value_head.safetensors           the critic (ppo, one process)
        optimizer.safetensors + .json    optimizer state (tensors + the rest)
        rng.safetensors                  the torch RNG state (one process)
        checkpoint.json                  what the folder is, for readers without t2po: kind (lora, full,
                                         sharded), base model folder, iteration, how to load it
        trainer_state.json               iteration, scheduler step; written last: marks the folder complete

The newest folder with `trainer_state.json` (never one named `.tmp`) is the run's latest checkpoint.
A LoRA adapter's `adapter_config.json` names the real model folder it applies to, so that
`AutoPeftModelForCausalLM.from_pretrained(".../adapter")` rebuilds the policy; after a LoRA warm-up the
adapter holds the warm-up's ranks and the RL ranks side by side on the warm-up's own base
(`combine_adapters`: PEFT cannot stack an adapter on an adapter folder). `t2po export` writes a merged
Hugging Face model folder.
Resuming reads a checkpoint's files whole before it applies any of them, and falls back to the next
older checkpoint when one cannot be read (a damaged disk, a file truncated behind the trainer's back):
`load_checkpoint` raises `CorruptCheckpoint` naming the file and the problem.
No pickle anywhere. Module-level imports are light (no torch): the API evaluation path imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

from t2po.errors import InvalidInput, UserError
from t2po.testing import kill_point


CHECKPOINTS = "checkpoints"
WARMUP_MODEL = "warmup_model"


class CorruptCheckpoint(UserError, ValueError):
    """A checkpoint folder whose files cannot be read back; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------
# Atomic writes


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old or the new file, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Fill a folder that appears complete or not at all: the block writes into `<path>.tmp/`, which
    then replaces `path` (a failed block leaves `path` as it was and no `.tmp` folder)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Checkpoint folders


def checkpoint_dir(ckpt_root: Path, iteration: int) -> Path:
    return Path(ckpt_root) / f"iter_{iteration:06d}"


def is_complete(ckpt: Path) -> bool:
    return ckpt.is_dir() and not ckpt.name.endswith(".tmp") and (ckpt / "trainer_state.json").is_file()


def is_sharded(ckpt: Path) -> bool:
    """Written by several ranks (`shard-*.safetensors`), loadable on any world size."""
    return any(Path(ckpt).glob("shard-*.safetensors"))


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    """The complete checkpoints, newest first (whether their files read back is `load_checkpoint`'s
    business)."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.exists():
        return []
    return sorted((p for p in ckpt_root.glob("iter_*") if is_complete(p)), reverse=True)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint with a readable trainer state (ignores half-written `.tmp` folders)."""
    for ckpt in complete_checkpoints(ckpt_root):
        try:
            load_trainer_state(ckpt)
        except (OSError, CorruptCheckpoint):
            continue
        return ckpt
    return None


def prune_checkpoints(ckpt_root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (all when keep <= 0)."""
    done = sorted(p for p in Path(ckpt_root).glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(ckpt: Path) -> dict:
    try:
        state = json.loads((Path(ckpt) / "trainer_state.json").read_text())
    except ValueError as e:
        raise CorruptCheckpoint(f"trainer_state.json is not JSON ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("iteration"), int):
        raise CorruptCheckpoint("trainer_state.json holds no iteration")
    return state


def optimizer_to_tensors(optimizer: Any) -> tuple[dict[str, Any], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and JSON-able metadata."""
    import torch

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


def optimizer_from_tensors(optimizer: Any, tensors: dict[str, Any], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


CHECKPOINT_INFO = "checkpoint.json"


def write_checkpoint_info(folder: Path, kind: str, base: str, iteration: int, prefix_rank: int = 0) -> None:
    """`checkpoint.json`: what a checkpoint folder holds, readable without t2po. `prefix_rank` > 0: the
    adapter's first `prefix_rank` LoRA ranks are the warm-up's (`combine_adapters`)."""
    how = {"lora": "AutoPeftModelForCausalLM.from_pretrained('<this folder>/adapter'), or `t2po export <this folder> --out DIR` for a merged model",
           "full": "the weights in model/ apply to the base's architecture and tokenizer; `t2po export <this folder> --out DIR` writes a complete model folder",
           "sharded": "torch.distributed.checkpoint shards (t2po.distributed.load_sharded); `t2po export <this folder> --out DIR` writes a model folder"}[kind]
    info = {"format": "t2po checkpoint", "kind": kind, "base": base, "iteration": iteration, "load": how,
            **({"warmup_adapter_rank": prefix_rank} if prefix_rank else {})}
    (Path(folder) / CHECKPOINT_INFO).write_text(json.dumps(info, indent=1) + "\n")


def checkpoint_info(ckpt: Path) -> dict:
    """`checkpoint.json` of a checkpoint folder ({} for folders written before it existed)."""
    path = Path(ckpt) / CHECKPOINT_INFO
    try:
        info = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"{CHECKPOINT_INFO} is not JSON ({e})") from None
    if not isinstance(info, dict):
        raise CorruptCheckpoint(f"{CHECKPOINT_INFO} holds no JSON mapping")
    return info


def point_adapter_at(adapter_dir: Path, base: str) -> None:
    """Make a saved PEFT adapter name the folder it was trained on. peft writes the base model's
    `name_or_path`, which after a merged warm-up is still the un-warmed model: loading the adapter
    with plain PEFT then silently applied it to the wrong weights."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base)
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def combine_adapters(prefix_dir: Path, adapter_dir: Path) -> int:
    """Rewrite the LoRA adapter in `adapter_dir` (trained on the base with the adapter in `prefix_dir`
    merged in) as one adapter on that base: ranks concatenated, A = [A1; A2], B = [B1, B2], with the
    common scaling alpha/r kept (alpha = scaling x (r1 + r2)), so that delta W = s B1 A1 + s B2 A2
    exactly. Returns r1, the rank of the prefix (`split_combined_adapter` takes it back out)."""
    import torch
    from safetensors.torch import load_file, save_file

    first = json.loads((Path(prefix_dir) / "adapter_config.json").read_text())
    second = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    same = ("target_modules", "layers_to_transform", "use_rslora", "rank_pattern", "alpha_pattern")

    def layout(config: dict, key: str):
        # peft keeps target_modules as a set and writes it in the set's order, which string hashing
        # makes differ between processes (a resumed run writes the same modules in another order)
        value = config.get(key)
        return sorted(value) if key == "target_modules" and isinstance(value, list) else value

    if first["lora_alpha"] / first["r"] != second["lora_alpha"] / second["r"] or any(layout(first, k) != layout(second, k) for k in same):
        raise InvalidInput(f"cannot combine the adapters in {prefix_dir} and {adapter_dir}: different LoRA layouts")
    w1 = load_file(str(Path(prefix_dir) / "adapter_model.safetensors"))
    w2 = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    if set(w1) != set(w2):
        raise InvalidInput(f"cannot combine the adapters in {prefix_dir} and {adapter_dir}: different LoRA modules")
    combined = {k: torch.cat([w1[k], w2[k]], dim=0 if ".lora_A." in k else 1).contiguous() for k in w2}
    save_file(combined, str(Path(adapter_dir) / "adapter_model.safetensors"), metadata={"format": "pt"})
    rank = first["r"] + second["r"]
    second.update(r=rank, lora_alpha=second["lora_alpha"] / second["r"] * rank)
    atomic_write_text(Path(adapter_dir) / "adapter_config.json", json.dumps(second, indent=2, sort_keys=True) + "\n")
    return int(first["r"])


def split_combined_adapter(weights: dict, prefix_rank: int) -> dict:
    """The RL adapter's own weights out of a `combine_adapters` result (exact slices)."""
    return {k: (v[prefix_rank:] if ".lora_A." in k else v[:, prefix_rank:]).contiguous() for k, v in weights.items()}


def save_checkpoint(ckpt_root: Path, iteration: int, model: Any, optimizer: Any, trainer_state: dict, value_head: Any = None,
                    lora: bool = True, keep: int = 2, sharded: bool = False, base: str | None = None,
                    prefix_adapter: Path | None = None) -> Path:
    """Write `checkpoints/iter_NNNNNN/` (see the module docstring) and prune to the newest `keep`.
    `sharded`: every rank calls this and writes its shards (`t2po.distributed.save_sharded`). `base`:
    the model folder the weights apply to (`t2po.models.model_directory` of the policy's base), named in
    checkpoint.json and the adapter; `prefix_adapter`: the LoRA warm-up adapter that base has merged in
    (then `base` is the warm-up's own base, see `combine_adapters`)."""
    from t2po.distributed import barrier, save_sharded

    final = checkpoint_dir(ckpt_root, iteration)
    if sharded:
        path = save_sharded(final, model, optimizer, {**trainer_state, "iteration": iteration})
        if not _distributed_rank():
            if base is not None:
                write_checkpoint_info(path, "sharded", base, iteration)
            prune_checkpoints(ckpt_root, keep)
        barrier()
        return path
    import torch
    from safetensors.torch import save_file

    Path(ckpt_root).mkdir(parents=True, exist_ok=True)
    with atomic_dir(final) as tmp:
        model.save_pretrained(tmp / ("adapter" if lora else "model"), safe_serialization=True)
        prefix_rank = combine_adapters(prefix_adapter, tmp / "adapter") if lora and prefix_adapter is not None else 0
        if lora and base is not None:
            point_adapter_at(tmp / "adapter", base)
        if value_head is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, str(tmp / "value_head.safetensors"))
        tensors, meta = optimizer_to_tensors(optimizer)
        kill_point("checkpoint", iteration)  # half written
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        if base is not None:
            write_checkpoint_info(tmp, "lora" if lora else "full", base, iteration, prefix_rank)
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "iteration": iteration}, indent=1))  # written last: marks completeness
    prune_checkpoints(ckpt_root, keep)
    return final


def _distributed_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def read_checkpoint(ckpt: Path, lora: bool, value_head: bool) -> dict[str, Any]:
    """Every file of a one-process checkpoint, read into memory; `CorruptCheckpoint` when one is
    missing or unreadable (so that nothing is applied from a checkpoint that cannot be used whole)."""
    import torch
    from safetensors.torch import load_file

    def tensors(path: Path) -> dict[str, Any]:
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error type for a bad header or size
            raise CorruptCheckpoint(f"{path.relative_to(ckpt)} cannot be read ({type(e).__name__}: {e})") from None

    saved: dict[str, Any] = {"state": load_trainer_state(ckpt)}
    if lora:
        saved["weights"] = tensors(ckpt / "adapter" / "adapter_model.safetensors")
    else:
        files = sorted((ckpt / "model").glob("*.safetensors"))
        if not files:
            raise CorruptCheckpoint("model/ holds no safetensors weights")
        saved["weights"] = {k: v for f in files for k, v in tensors(f).items()}
    if value_head and (ckpt / "value_head.safetensors").exists():
        saved["value_head"] = tensors(ckpt / "value_head.safetensors")
    saved["optimizer"] = tensors(ckpt / "optimizer.safetensors")
    try:
        saved["optimizer_meta"] = json.loads((ckpt / "optimizer.json").read_text())
    except (OSError, ValueError) as e:
        raise CorruptCheckpoint(f"optimizer.json cannot be read ({e})") from None
    rng = tensors(ckpt / "rng.safetensors").get("torch_rng")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise CorruptCheckpoint("rng.safetensors holds no torch RNG state")
    saved["rng"] = rng
    return saved


def load_checkpoint(ckpt: Path, model: Any, optimizer: Any, value_head: Any, lora: bool) -> dict:
    """Load weights, optimizer and RNG (one-process checkpoints) into an already-built model, or a
    sharded checkpoint onto any world size; returns the trainer state. `CorruptCheckpoint` when a
    file cannot be read (a one-process checkpoint: before anything is changed)."""
    if is_sharded(ckpt):
        from t2po.distributed import load_sharded

        try:
            return load_sharded(ckpt, model, optimizer)
        except Exception as e:  # noqa: BLE001 (the caller loads an older checkpoint over whatever was applied)
            raise CorruptCheckpoint(f"{type(e).__name__}: {e}") from None
    import torch

    # every file's header is checked before this by the caller (`t2po.runfiles.checkpoint_candidates`, which
    # imports this module): a damaged one is named before anything is read
    saved = read_checkpoint(ckpt, lora, value_head is not None)
    weights = saved["weights"]
    if lora:
        from peft import set_peft_model_state_dict

        prefix_rank = checkpoint_info(ckpt).get("warmup_adapter_rank", 0)
        if prefix_rank:  # the warm-up's ranks are merged into the base already
            weights = split_combined_adapter(weights, prefix_rank)
        result = set_peft_model_state_dict(model, weights)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise RuntimeError(f"Checkpoint {ckpt} does not match the model's LoRA layout (unexpected keys: {unexpected[:3]}...)")
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise RuntimeError(f"Checkpoint {ckpt} does not match the model (unexpected keys: {unexpected[:3]}...)")
    if value_head is not None and "value_head" in saved:
        value_head.load_state_dict(saved["value_head"])
    if optimizer is not None:
        optimizer_from_tensors(optimizer, saved["optimizer"], saved["optimizer_meta"])
    torch.set_rng_state(saved["rng"])
    return saved["state"]
