"""Locating and loading a local model: a run folder (its newest readable checkpoint), a checkpoint folder,
a Hugging Face model directory, or the embedded default. The one place `t2po eval`, `t2po serve`,
`t2po rft collect` and `t2po export` find (`locate_model` -> `ModelSource`) and load
(`load_local_model`) the weights they run; the checkpoint layout itself is `t2po.checkpoints`'.
(A `t2po.policies.Policy` is what answers a turn; an `EnginePolicy` over the loaded model is one.)
Module-level imports are light (no torch)."""

from __future__ import annotations

import dataclasses
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2po.checkpoints import (
    CHECKPOINTS, WARMUP_MODEL, Checkpointer, CorruptCheckpoint, checkpoint_info, checkpoint_problem,
                              is_complete, is_sharded,
)
from t2po.errors import InvalidInput, UserError
from t2po.model_cache import DEFAULT_MODEL, TINY_VLM


@dataclass
class ModelSource:
    """Where a local model's weights come from, found without loading them.

    `checkpoint` is set for a t2po checkpoint; its weights apply on top of `base`: the run's
    `warmup_model/` when a warm-up ran, else the run's `model.path` (None = the embedded default)."""

    path: Path | None  # a Hugging Face model directory; None = the embedded default (or see checkpoint)
    checkpoint: Path | None = None
    run_dir: Path | None = None
    base: str | None = None
    run_config: Any = None  # the run's config.yaml, typed (t2po.config.Config, from load_run_config)

    @property
    def kind(self) -> str:
        """"adapter" (LoRA, one process), "model" (full weights, one process) or "sharded" (several ranks)."""
        if is_sharded(self.checkpoint):
            return "sharded"
        return "adapter" if (self.checkpoint / "adapter").is_dir() else "model"

    @property
    def description(self) -> str:
        if self.checkpoint is not None:
            kind = {"adapter": "LoRA adapter merged into", "model": "full weights, tokenizer of",
                    "sharded": "sharded weights on"}[self.kind]
            return f"{self.checkpoint} ({kind} {self.base or DEFAULT_MODEL})"
        return str(self.path) if self.path is not None else f"{DEFAULT_MODEL} (embedded)"

    @property
    def short_name(self) -> str:
        if self.checkpoint is not None:
            return f"{self.run_dir.name}-{self.checkpoint.name}"
        return self.path.name if self.path is not None else DEFAULT_MODEL


def locate_model(path: str | os.PathLike | None) -> ModelSource:
    """Resolve a model argument (run folder, checkpoint folder, Hugging Face directory, None or
    "smollm2-135m-instruct") without loading weights; a path that is none of these fails here."""
    if path is None or str(path).lower() == DEFAULT_MODEL:
        return ModelSource(None)
    if str(path).lower() == TINY_VLM:  # built into the cache on first use
        from t2po.models import tiny_vlm_directory

        return ModelSource(tiny_vlm_directory())
    p = Path(path).expanduser().resolve()
    accepted = (f"pass a t2po run folder, a checkpoint folder (RUN/{CHECKPOINTS}/iter_NNNNNN), a Hugging Face model "
                f"directory (with config.json), or no model for the embedded {DEFAULT_MODEL}")
    if not p.is_dir():
        raise FileNotFoundError(f"model {str(path)!r} is not a directory: {accepted}")
    checkpoint = None
    if (p / "config.yaml").is_file() and not (p / "config.json").is_file():  # a run folder
        # the newest checkpoint whose files read back; a damaged newer one is named (as `train --resume` does)
        checkpoint = next(Checkpointer(p, lambda m: print(f"t2po: {m}", file=sys.stderr, flush=True)).readable(), None)
        if checkpoint is None:
            raise FileNotFoundError(f"run folder {p} has no complete checkpoint yet; evaluate {p / WARMUP_MODEL} (if "
                                    "the warm-up ran) or wait for the first checkpoint")
    elif (p / "adapter").is_dir() or (p / "model").is_dir() or is_sharded(p):
        checkpoint = p
        if not is_complete(p):
            raise FileNotFoundError(f"checkpoint {p} is incomplete (half-written, no trainer_state.json); pass its run "
                                    "folder to use the latest complete checkpoint")
        if (problem := checkpoint_problem(p)) is not None:
            raise CorruptCheckpoint(f"checkpoint {p} is damaged: {problem}; pass its run folder to use the newest "
                                    "checkpoint that reads back")
    if checkpoint is None:
        if (p / CHECKPOINTS).is_dir() and not (p / "config.yaml").exists():
            raise FileNotFoundError(f"{p / 'config.yaml'} is missing, so {p} cannot be read as a t2po run; restore "
                                    "config.yaml from a copy (the MLflow run keeps one as an artifact)")
        # a model, or an adapter on its base
        if not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{p} holds no model: {accepted}")
        return ModelSource(p)
    run_dir = checkpoint.parent.parent
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} is not inside a t2po run folder ({run_dir}/config.yaml is "
                                f"missing); keep checkpoints in RUN/{CHECKPOINTS}/")
    from t2po.config import load_run_config

    run_config = load_run_config(run_dir)
    checkpoints = Checkpointer(run_dir)
    warmup = checkpoints.warmup_model  # a model folder, or after a LoRA warm-up its adapter
    if warmup.is_dir():
        checkpoints.check_warmup()
    exists = (warmup / "config.json").is_file() or (warmup / "adapter_config.json").is_file()
    base = str(warmup) if exists else run_config.model.path
    info = checkpoint_info(checkpoint)
    # the checkpoint's adapter holds the warm-up's ranks too: it applies to the warm-up's base
    if info.get("warmup_adapter_rank"):
        base = info["base"]
    return ModelSource(None, checkpoint, run_dir, base, run_config)


def model_short_name(path: str | os.PathLike | None) -> str:
    """A name for a local model (run name + checkpoint, directory name, or the default's name)."""
    return locate_model(path).short_name


def check_device(name: str) -> str:
    """`name` if it is a device here (auto, cpu, cuda, cuda:N with that GPU present), else UserError."""
    import re

    if name in ("auto", "cpu"):
        return name
    if not re.fullmatch(r"cuda(:\d{1,3})?", name):
        raise UserError(f"--device {name!r}: choose auto, cpu, cuda or cuda:N")
    import torch

    index = int(name.partition(":")[2] or 0)
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: torch {torch.__version__} sees no such GPU ({torch.cuda.device_count()} "
                        "visible); use --device cpu or auto")
    return name


def resolve_device(name: str) -> str:
    """`auto` -> cuda when available, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_local_model(path: str | os.PathLike | None, dtype: Any = None, device: Any = "cpu") -> tuple[Any, Any, str]:
    """Load `(model, tokenizer, description)` from a run folder (latest complete checkpoint), a
    checkpoint folder, a Hugging Face model directory, or None / "smollm2-135m-instruct" (the embedded
    default). A LoRA checkpoint is merged into its base weights (peft); a full-weight checkpoint is
    loaded into its base architecture; a sharded one (several ranks) is read onto the model as the
    run trained it (with its LoRA adapter, then merged). The model is in eval mode on `device`
    ("auto": a GPU when there is one)."""
    from t2po.models import load_model

    device = resolve_device(device) if isinstance(device, str) else device
    source = locate_model(path)
    if source.checkpoint is None:
        model, tokenizer = load_model(source.path, dtype=dtype, device=device)
        return model, tokenizer, source.description
    model, tokenizer = load_model(source.base, dtype=dtype, device=device)
    kind = source.kind
    if kind == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.checkpoint / "adapter")).merge_and_unload()
    elif kind == "sharded":
        from t2po.distributed import load_sharded
        from t2po.models import add_lora

        model_cfg = source.run_config.model
        if model_cfg.lora:
            model = add_lora(model, model_cfg)
        # torch's note that no process group is running: one process reads it, by design
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load_sharded(source.checkpoint, model, None)
        if model_cfg.lora:
            model = model.merge_and_unload()
    else:
        from safetensors.torch import load_file

        weights: dict = {}
        for f in sorted((source.checkpoint / "model").glob("*.safetensors")):
            weights.update(load_file(str(f), device=str(next(model.parameters()).device)))
        if not weights:
            raise FileNotFoundError(f"checkpoint {source.checkpoint}/model holds no .safetensors weights")
        _, unexpected = model.load_state_dict(weights, strict=False)
        if unexpected:
            raise InvalidInput(f"checkpoint {source.checkpoint} does not match its base model "
                               f"{source.base or DEFAULT_MODEL} (unexpected weights {unexpected[:3]})")
    model.eval()
    return model, tokenizer, source.description


def intervention_for(path: str | os.PathLike | None, enabled: bool = True, budget: int | None = None) -> Any:
    """The thinking-intervention settings (docs/method.md §2) for evaluating or serving `path`: a run's own
    `rollout.tti` when `path` is a run or checkpoint, else `InterventionConfig()`; `enabled` says
    whether TTI forces (on for evaluation, as in validation), `budget` overrides B."""
    from t2po.engines.base import InterventionConfig

    run_config = locate_model(path).run_config
    tti = run_config.resolved_rollout().tti if run_config is not None else InterventionConfig()
    return dataclasses.replace(tti, enabled=enabled, budget=budget if budget is not None else tti.budget)
