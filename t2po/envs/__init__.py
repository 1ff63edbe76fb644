"""Environments behind one protocol (`t2po.envs.base.BatchEnv`) and a registry.

    from t2po.envs import make_env, list_envs
    env = make_env("sokoban", dim_room=(6, 6), num_boxes=1)

A new environment is one module with a `BatchEnv` subclass decorated with `@register_env("name")`,
plus its module path in `_BUILTIN` below (modules are imported lazily so that heavy dependencies of
one environment never slow down another).
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable

from t2po.envs.base import BatchEnv, EnvState
from t2po.envs.parsing import ParsedAction, parse_think_action

_REGISTRY: dict[str, type[BatchEnv]] = {}

# name -> module that registers it (imported on first use)
_BUILTIN: dict[str, str] = {
    "sokoban": "t2po.envs.sokoban",
    "alfworld": "t2po.envs.alfworld",
    "search": "t2po.envs.search.env",
    "webshop": "t2po.envs.webshop.env",
    "ezpoints": "t2po.envs.cards",
    "points24": "t2po.envs.cards",
    "numberline": "t2po.envs.cards",
    "blackjack": "t2po.envs.cards",
}


def register_env(name: str) -> Callable[[type[BatchEnv]], type[BatchEnv]]:
    def deco(cls: type[BatchEnv]) -> type[BatchEnv]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def get_env_class(name: str) -> type[BatchEnv]:
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_BUILTIN))
        raise ValueError(f"Unknown environment {name!r}.{_suggest(name, known)} Known: {', '.join(known)}.")
    return _REGISTRY[name]


def make_env(name: str, **options: Any) -> BatchEnv:
    """Build a registered environment; `options` are its constructor's keyword arguments."""
    cls = get_env_class(name)
    return cls(**options)


def list_envs() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN))


__all__ = ["BatchEnv", "EnvState", "ParsedAction", "make_env", "register_env", "get_env_class", "list_envs", "parse_think_action"]
