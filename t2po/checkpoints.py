"""Where a policy's weights live: run folders, checkpoints, and atomic writes. The only module that
knows the layout; `Checkpointer` is a run's checkpoints (the trainer saves and resumes through it;
`t2po.locate` finds a run's newest readable checkpoint through it for `t2po eval`, `serve`, `rft`, `export`):

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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from t2po.errors import InvalidInput, UserError
from t2po.runfiles import json_problem, safetensors_problem
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
    how = {"lora": "AutoPeftModelForCausalLM.from_pretrained('<this folder>/adapter'), or `t2po export <this folder> "
                   "--out DIR` for a merged model",
           "full": "the weights in model/ apply to the base's architecture and tokenizer; `t2po export <this folder> "
                   "--out DIR` writes a complete model folder",
           "sharded": "torch.distributed.checkpoint shards (t2po.distributed.load_sharded); `t2po export <this folder> "
                      "--out DIR` writes a model folder"}[kind]
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

    if first["lora_alpha"] / first["r"] != second["lora_alpha"] / second["r"] or any(layout(first, k)
            != layout(second, k) for k in same):
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


def save_checkpoint(ckpt_root: Path, iteration: int, model: Any, optimizer: Any, trainer_state: dict,
                    value_head: Any = None,
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
            save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()},
                      str(tmp / "value_head.safetensors"))
        tensors, meta = optimizer_to_tensors(optimizer)
        kill_point("checkpoint", iteration)  # half written
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
        save_file({"torch_rng": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        if base is not None:
            write_checkpoint_info(tmp, "lora" if lora else "full", base, iteration, prefix_rank)
        # written last: marks completeness
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "iteration": iteration}, indent=1))
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

    # every file's header is checked before this by the caller (`checkpoint_candidates`): a damaged one is
    # named before anything is read
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
            raise RuntimeError(f"Checkpoint {ckpt} does not match the model's LoRA layout (unexpected keys: "
                               f"{unexpected[:3]}...)")
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


# ----------------------------------------------------------------------------------------------
# Reading back: which checkpoints' files all read (`t2po.runfiles` checks their headers, in milliseconds)


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


# ----------------------------------------------------------------------------------------------
# The checkpoints of one run


class Checkpointer:
    """The checkpoints of the run folder `run_dir` (the layout above) and the base their weights apply
    to: the trainer saves and resumes through it, `t2po.locate` (eval, serve, rft, export) finds
    a run's newest readable checkpoint through it. `note` hears about each checkpoint passed over."""

    def __init__(self, run_dir: Path, note: Callable[[str], None] | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.note = note

    @property
    def warmup_model(self) -> Path:
        return self.run_dir / WARMUP_MODEL

    def complete(self) -> list[Path]:
        """The complete checkpoints (their state file written), newest first."""
        return complete_checkpoints(self.root)

    def latest(self) -> Path | None:
        """The newest complete checkpoint with a readable trainer state."""
        return latest_checkpoint(self.root)

    def readable(self, resume: bool = False) -> Iterator[Path]:
        """The checkpoints whose files read back, newest first (`checkpoint_candidates`); with `resume`
        also their optimizer and RNG state."""
        return checkpoint_candidates(self.root, self.note, resume)

    def check_warmup(self) -> None:
        """UserError naming the damaged file of the run's warm-up model (`check_warmup`)."""
        check_warmup(self.run_dir)

    def save_warmup(self, model: Any, tokenizer: Any, lora: bool, base_path: str | None) -> Path:
        """The warm-up model (`RUN/warmup_model/`): under LoRA its adapter, naming the model folder of
        `base_path` it applies to; else the whole model in its training dtype; the tokenizer (a VLM's
        whole processor) with it."""
        from t2po.models import model_directory, save_tokenizer

        with atomic_dir(self.warmup_model) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if lora:
                point_adapter_at(tmp, str(model_directory(base_path)))
            save_tokenizer(tokenizer, tmp)
        return self.warmup_model

    def save(self, iteration: int, model: Any, optimizer: Any, state: dict, *, base_path: str | None,
             value_head: Any = None,
             lora: bool = True, keep: int = 2, sharded: bool = False) -> Path:
        """`save_checkpoint` of the policy trained from `base_path` (a model folder, None for the embedded
        default, or a LoRA warm-up's adapter folder). The checkpoint names the folder its weights apply
        to; after a LoRA warm-up that is the warm-up's own base, the two adapters combined
        (`combine_adapters`)."""
        from t2po.models import adapter_base, is_adapter_directory, model_directory

        prefix = Path(base_path) if base_path and is_adapter_directory(base_path) else None
        base = adapter_base(prefix) if prefix else str(model_directory(base_path))
        return save_checkpoint(self.root, iteration, model, optimizer, state, value_head, lora, keep,
                               sharded=sharded, base=base,
                               prefix_adapter=prefix)

    def load_newest(self, model: Any, optimizer: Any, value_head: Any, lora: bool,
                    distributed: bool = False) -> tuple[Path, dict] | None:
        """Load the newest checkpoint that reads back whole into the built policy; a damaged newer one
        is named in a note and the one before is tried. (checkpoint, trainer state), or None (start
        from iteration 0) when there is none. `distributed`: several ranks, which load only sharded ones."""
        for ckpt in self.readable(resume=True):
            if distributed and not is_sharded(ckpt):
                raise InvalidInput(f"{ckpt} was written by one process; resume it with one process "
                                   f"(python -m t2po.cli train --resume {self.run_dir}), "
                                   "or start the multi-process run from its weights (model.path)")
            try:  # a sharded one loads on any world size
                return ckpt, load_checkpoint(ckpt, model, optimizer, value_head, lora)
            except CorruptCheckpoint as e:
                if self.note is not None:
                    self.note(f"skipped checkpoint {ckpt}: {e}; trying the one before")
        if self.note is not None and any(not p.name.endswith(".tmp") for p in self.root.glob("iter_*")):
            self.note(f"no checkpoint in {self.root} can be loaded: starting again from iteration 0")
        return None
