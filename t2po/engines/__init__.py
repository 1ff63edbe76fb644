"""Generation engines behind one interface (`t2po.engines.base.Engine`) and a registry.

    from t2po.engines import make_engine
    engine = make_engine("hf", model, tokenizer)              # samples from the policy module itself
    engine = make_engine("vllm", model_dir, tokenizer, ...)   # loads its own copy of the weights

A new engine is one module with an `Engine` subclass plus its line in `ENGINES` below (modules are
imported on first use, so an engine's optional dependency, e.g. vLLM, costs nothing until it is chosen).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from t2po.engines.base import Engine
from t2po.suggest import did_you_mean


@dataclass(frozen=True)
class EngineSpec:
    """Where an engine lives and what the trainer must know about it."""

    target: str  # "module:Class"
    # True: the engine samples from the trainer's policy module (built from it); False: it loads its own
    # copy from a Hugging Face model folder and gets the policy's weights through `sync_weights`
    # (so its log-probs come from other kernels and the trainer recomputes them).
    shares_policy_weights: bool
    reads_images: bool  # takes `pixel_inputs` (vision-language models, t2po.vlm)


ENGINES: dict[str, EngineSpec] = {
    "hf": EngineSpec("t2po.engines.hf:HFEngine", shares_policy_weights=True, reads_images=True),
    "vllm": EngineSpec("t2po.engines.vllm_engine:VLLMEngine", shares_policy_weights=False, reads_images=False),
}


def engine_spec(name: str) -> EngineSpec:
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}{did_you_mean(name, ENGINES)}; engines: {', '.join(ENGINES)}")
    return ENGINES[name]


def engine_class(name: str) -> type[Engine]:
    """The engine's class, imported now (an ImportError names the package to install)."""
    module, cls = engine_spec(name).target.split(":")
    return getattr(importlib.import_module(module), cls)


def make_engine(name: str, model: Any, tokenizer: Any, **options: Any) -> Engine:
    """Build engine `name`: `model` is the policy module for an engine that shares the policy's
    weights, else a Hugging Face model folder; `options` are the engine class's keyword arguments."""
    return engine_class(name)(model, tokenizer, **options)


__all__ = ["ENGINES", "Engine", "EngineSpec", "engine_class", "engine_spec", "make_engine"]
