"""Generation engines behind one interface (`t2po.engines.base.Engine`) and a registry.

    from t2po.engines import make_engine
    engine = make_engine("hf", model, tokenizer)              # samples from the policy module itself
    engine = make_engine("vllm", model_dir, tokenizer, ...)   # loads its own copy of the weights

A new engine is one module with an `Engine` subclass plus its line in `ENGINES` below (modules are
imported on first use, so an engine's optional dependency, e.g. vLLM, costs nothing until it is chosen).
An engine outside the package needs no edit here: `rollout.engine=my_pkg.my_mod:MyEngine`, or an
installed package's entry point in the group `t2po.engines`; its class attributes
`shares_policy_weights` and `reads_images` say what its registry entry would. The trainer builds
every engine through its `build` classmethod, which reads the engine's own settings section.
"""

from __future__ import annotations

import atexit
import importlib
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from t2po.engines.base import Engine
from t2po.plugins import load_object, resolve


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


ENTRY_POINT_GROUP = "t2po.engines"


def engine_spec(name: str) -> EngineSpec:
    """What engine `name` is: a registered one, "package.module:Class" (an `Engine` subclass, imported
    now), or an entry point of the group `t2po.engines`."""
    return resolve(name, ENGINES, ENTRY_POINT_GROUP, "Engine", _load_spec)


def _load_spec(path: str) -> EngineSpec:
    cls = load_object(path, "Engine", lambda v: isinstance(v, type) and issubclass(v, Engine), "Engine subclass")
    return EngineSpec(f"{cls.__module__}:{cls.__qualname__}", cls.shares_policy_weights, cls.reads_images)


def engine_class(name: str) -> type[Engine]:
    """The engine's class, imported now (an ImportError names the package to install)."""
    module, cls = engine_spec(name).target.split(":")
    return getattr(importlib.import_module(module), cls)


def make_engine(name: str, model: Any, tokenizer: Any, **options: Any) -> Engine:
    """Build engine `name`: `model` is the policy module for an engine that shares the policy's
    weights, else a Hugging Face model folder; `options` are the engine class's keyword arguments."""
    return engine_class(name)(model, tokenizer, **options)


def engine_for_policy(name: str, model: Any, tokenizer: Any) -> Engine:
    """Engine `name` playing the policy module `model` outside training (`t2po eval`, `serve`, `rft
    collect`, their `--engine`): built on the module itself, or, for an engine with its own copy of
    the weights, from the policy written to a temporary Hugging Face folder (removed at exit)."""
    if engine_spec(name).shares_policy_weights:
        return make_engine(name, model, tokenizer)
    from t2po.models import save_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="t2po-engine-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    model.save_pretrained(folder, safe_serialization=True)
    save_tokenizer(tokenizer, folder)
    return make_engine(name, folder, tokenizer)


__all__ = ["ENGINES", "Engine", "EngineSpec", "engine_class", "engine_for_policy", "engine_spec", "make_engine"]
