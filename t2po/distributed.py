"""Data-parallel training over several processes with torch.distributed and FSDP2.

Launch with `torchrun --nproc_per_node 8 -m t2po.cli train ...` (or `accelerate launch`, which sets
the same environment variables); a plain `python` launch is the single-process path, unchanged.
What each piece does and why:

- Rollouts: every rank plays its share of the iteration's tasks (`shard_tasks`: contiguous blocks
  of task seeds, so every GRPO/GiGPO group lives whole on one rank and group advantages need no
  communication). The policy is FSDP2-sharded, so generation runs inside `gathered(model)`: the
  full parameters are gathered once and no collective runs per decoding step, which lets ranks
  generate different numbers of tokens.
- Update: all ranks walk one global mini-batch plan (`plan_mini_batches`): the same permutation of
  the global sample list that a single process would draw, each rank keeping its own samples of
  each mini-batch, with the mini-batch's global token and sample counts for the loss weights.
  FSDP2 sums gradients over ranks (`shard_model` sets the divide factor to 1), so the sum of the
  ranks' token-weighted gradients is the single-process gradient. FSDP2 runs collectives in every
  forward and backward, so every rank must run as many micro-batches as the busiest one
  (`padded`); the extra ones are run with loss weight 0.
- Checkpoints: `save_sharded` writes each rank's shards as safetensors through DCP's Hugging Face
  storage writer (no pickle; the shard offsets live in the safetensors headers), plus JSON for
  what is not a tensor. `load_sharded` reads them onto any world size (2 ranks -> 1 works).
- Rollout engines outside the training process group (vLLM) take `full_state_dict(model)`.

tests/training/test_distributed.py runs two gloo processes on the CPU: both ranks see the same loss and the
updated weights equal a single-process update on the same data; tests/training/test_trainer_distributed.py
runs the trainer under torchrun and resumes it in one process.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from t2po.errors import InvalidInput

T = TypeVar("T")

@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str | None = None, timeout_minutes: int = 60, device: str = "auto") -> DistContext:
    """Join the process group that torchrun / accelerate launch describe in the environment
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without them (a plain `python`
    launch) nothing is initialised and the single-process context is returned.

    `device`: auto (a GPU when CUDA is available, else the CPU), cpu or cuda. On GPUs rank r takes
    GPU `LOCAL_RANK` and the backend is nccl; on the CPU it is gloo."""
    if device not in ("auto", "cpu", "cuda"):
        raise InvalidInput(f"device={device!r}: choose auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidInput(f"trainer.device=cuda, but torch {torch.__version__} sees no GPU: install a CUDA build of "
                           "torch on a GPU machine, or set trainer.device=auto or cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistContext(device=torch.device("cuda", torch.cuda.current_device()) if use_cuda
                           else torch.device("cpu"))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): start at "
                               "most that many processes per node (torchrun --nproc_per_node)")
        place = torch.device("cuda", local_rank)
        torch.cuda.set_device(place)
    else:
        place = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend or ("nccl" if use_cuda else "gloo"),
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistContext(rank, world_size, local_rank, place)


def shard_tasks(task_seeds: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's contiguous block of the iteration's task seeds (whole groups per rank; the
    first `len % world_size` ranks get one task more)."""
    if len(task_seeds) < world_size:
        raise InvalidInput(f"{len(task_seeds)} tasks cannot be shared by {world_size} ranks: set "
                           f"rollout.num_tasks >= {world_size}")
    base, extra = divmod(len(task_seeds), world_size)
    start = rank * base + min(rank, extra)
    return list(task_seeds[start : start + base + (rank < extra)])


def shard_model(model: torch.nn.Module, mixed_precision: bool = False) -> torch.nn.Module:
    """FSDP2 (`fully_shard`) on every decoder layer, then on the rest, gradients summed over
    ranks (divide factor 1: the loss weights already hold the global token mean). With
    `mixed_precision`, parameters are gathered in bf16 and gradients reduced in float32."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                              reduce_dtype=torch.float32) if mixed_precision else MixedPrecisionPolicy()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    layers = getattr(decoder, "layers", None)
    if layers is None or head is None:
        raise ValueError(f"{type(base).__name__} has no decoder `layers` or no LM head; shard_model supports "
                         "decoder-only causal LMs")
    for layer in layers:
        fully_shard(layer, mp_policy=mp)
    # Embeddings, final norm and LM head form one group (a tied head shares the embedding's weight)
    # whose hooks run on each of them: `forward_micro_batch` calls the decoder and then the head
    # rather than the model's own forward (to project only the response positions).
    outer = [base.get_input_embeddings(), getattr(decoder, "norm", None), head]
    fully_shard([m for m in outer if m is not None], mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no PREMUL_SUM)
    # FSDP2 takes the first module to run forward as its root; `forward_micro_batch` runs the
    # decoder and the head, never `model` itself, so a first forward there (before any generation,
    # e.g. with vLLM rollouts) would fail. Make `model` the root now (FSDP2 has no public call for it).
    model._get_fsdp_state()._lazy_init()
    return model


def _fsdp_modules(model: torch.nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def gathered(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Hold the full parameters of an FSDP2 model for the block (generation, scoring): one
    all-gather on entry, none inside, so ranks may run different numbers of forward passes; the
    shards are restored on exit. A model that is not sharded passes through untouched."""
    modules = _fsdp_modules(model)
    for m in modules:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(True)


@dataclass
class MiniBatchShare:
    """This rank's part of one global mini-batch."""

    indices: list[int]  # local sample indices
    global_tokens: int  # response tokens of the whole mini-batch, all ranks (token-mean weight)
    global_samples: int  # samples of the whole mini-batch, all ranks (seq-mean weight)


def plan_mini_batches(response_lengths: list[int], mini_batch_size: int,
                      rng: np.random.Generator) -> list[MiniBatchShare]:
    """The mini-batches of one PPO epoch, as a single process holding every rank's samples (rank 0's
    first, then rank 1's, ...) would draw them: `rng.permutation(total)` cut into chunks of
    `mini_batch_size`. Every rank must pass an identically seeded `rng`. One collective (the
    samples' response lengths); world size 1 needs none."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered_lengths: list[list[int]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered_lengths, list(response_lengths))
        offset = sum(len(g) for g in gathered_lengths[: dist.get_rank()])
        lengths = [n for g in gathered_lengths for n in g]
    else:
        offset, lengths = 0, list(response_lengths)
    local = range(offset, offset + len(response_lengths))
    perm = [int(i) for i in rng.permutation(len(lengths))]
    plan = []
    for start in range(0, len(perm), mini_batch_size):
        chunk = perm[start : start + mini_batch_size]
        plan.append(MiniBatchShare([g - offset for g in chunk if g in local],
                                   sum(lengths[g] for g in chunk), len(chunk)))
    return plan


def padded(micro_batches: list[T], filler: T) -> Iterator[tuple[T, bool]]:
    """This rank's micro-batches of one mini-batch, each with `True`, then `(filler, False)` until
    the count of the busiest rank: FSDP2 runs collectives in every forward and backward, so all
    ranks must run as many; a `False` pass must get loss weight 0. One collective per call."""
    count = len(micro_batches)
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = torch.tensor([count], dtype=torch.long, device=_collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        count = int(value.item())
    for k in range(count):
        yield (micro_batches[k], True) if k < len(micro_batches) else (filler, False)


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Every metric averaged over ranks, so that all ranks log the same numbers. Ranks may report
    different keys (a task category only one rank played): each is averaged over the ranks that
    have it."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return dict(metrics)
    everyone: list[dict[str, float]] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, {k: float(v) for k, v in metrics.items()})
    keys = sorted({k for m in everyone for k in m})
    return {k: float(np.mean([m[k] for m in everyone if k in m])) for k in keys}


def gather_objects(value: T) -> list[T]:
    """Every rank's `value` (picklable), in rank order, on every rank; `[value]` in one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    everyone: list[T] = [None] * dist.get_world_size()  # type: ignore[list-item]
    dist.all_gather_object(everyone, value)
    return everyone


def from_rank0(value: T) -> T:
    """Rank 0's `value` on every rank (e.g. a run folder named after the start time)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(value: float) -> float:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return float(tensor.item())


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` that also returns a plain float for sharded (DTensor)
    gradients, whose norm comes back as a DTensor."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights with their Hugging Face names, on every rank (a collective for
    a sharded model): what a rollout engine's `sync_weights` takes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


# -- sharded checkpoints -------------------------------------------------------------------------

_MODEL, _OPTIM = "model.", "optim."


def _flat_state(model: torch.nn.Module,
                optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Model and optimizer state as one flat {name: tensor} dict (sharded DTensors for an FSDP2
    model) plus the optimizer's non-tensor parts."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tied = _tied_names(model)  # a tied weight is stored once (safetensors refuses shared storage)
    tensors = {_MODEL + k: v for k, v in get_model_state_dict(model).items() if k not in tied}
    optim_state: dict = {"state": {}, "param_groups": []}
    scalars: dict[str, dict[str, Any]] = {}
    if optimizer is not None:
        optim_state = get_optimizer_state_dict(model, optimizer)
        for fqn, state in optim_state["state"].items():
            for name, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"{_OPTIM}{fqn}.{name}"] = value
                else:
                    scalars.setdefault(fqn, {})[name] = value
    return tensors, optim_state, scalars


def save_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 trainer_state: dict) -> Path:
    """Write a checkpoint folder: each rank's shards of the model and optimizer state as
    safetensors (`shard-*.safetensors`), `optimizer.json` (parameter groups and non-tensor state)
    and `trainer_state.json` (written last: marks the folder complete). Written to `<path>.tmp` and
    renamed by rank 0 when every rank is done. Every rank calls this; the folder must be on a file
    system all ranks share."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    tensors, optim_state, scalars = _flat_state(model, optimizer)
    dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(tmp), save_distributed=True),
             no_dist=not dist.is_initialized())
    if is_main:
        (tmp / "optimizer.json").write_text(json.dumps({"param_groups": optim_state["param_groups"],
                                                        "scalars": scalars}))
        world = dist.get_world_size() if dist.is_initialized() else 1
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "world_size": world}, indent=1))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    barrier()
    return path


def load_sharded(path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load a `save_sharded` folder into `model` (sharded or not) and `optimizer`, whatever the
    world size that wrote it; returns the trainer state. Every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    if not (path / "trainer_state.json").is_file():
        raise FileNotFoundError(f"{path} is not a complete sharded checkpoint (no trainer_state.json); pass a folder "
                                "written by save_sharded")
    tensors, optim_state, _ = _flat_state(model, optimizer)
    dcp.load(tensors, storage_reader=HuggingFaceStorageReader(str(path)), no_dist=not dist.is_initialized())
    weights = {k[len(_MODEL) :]: v for k, v in tensors.items() if k.startswith(_MODEL)}
    weights.update({alias: weights[name] for alias, name in _tied_names(model).items()})
    set_model_state_dict(model, weights)
    if optimizer is not None:
        saved = json.loads((path / "optimizer.json").read_text())
        state: dict[str, dict[str, Any]] = {fqn: dict(values) for fqn, values in saved["scalars"].items()}
        for fqn, values in optim_state["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value):
                    state.setdefault(fqn, {})[name] = tensors[f"{_OPTIM}{fqn}.{name}"]
        set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": saved["param_groups"]})
    return json.loads((path / "trainer_state.json").read_text())


def _tied_names(model: torch.nn.Module) -> dict[str, str]:
    """Parameter name -> the name it is tied to (the same Parameter registered twice, e.g. an LM head
    sharing the input embedding); the same on every rank."""
    first: dict[int, str] = {}
    tied = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied[name] = first[id(param)]
        else:
            first[id(param)] = name
    return tied


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if dist.is_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
