"""Environments behind one protocol (`t2po.envs.base.BatchEnv`) and a registry.

    from t2po.envs import make_env, list_envs
    env = make_env("sokoban", dim_room=(6, 6), num_boxes=1)

A new environment is one module with a `BatchEnv` subclass decorated with `@register_env("name")`,
plus its module path in `_BUILTIN` below (modules are imported lazily so that heavy dependencies of
one environment never slow down another).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import yaml

from t2po.envs.base import BatchEnv, EnvState
from t2po.envs.parsing import ParsedAction, parse_think_action
from t2po.suggest import closest

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


def get_env_class(name: str) -> type[BatchEnv]:
    if name not in _REGISTRY and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _REGISTRY:
        known = sorted(set(_REGISTRY) | set(_BUILTIN))
        near = closest(name, known)
        raise ValueError(f"Unknown environment {name!r}.{f' Did you mean {near!r}?' if near else ''} Known: {', '.join(known)}.")
    return _REGISTRY[name]


def make_env(name: str, **options: Any) -> BatchEnv:
    """Build a registered environment; `options` are its constructor's keyword arguments."""
    cls = get_env_class(name)
    return cls(**options)


def list_envs() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN))


def parse_env_options(items: list[str], flag: str = "--env-option") -> dict[str, Any]:
    """`key=value` pairs from the command line, values read as YAML (`dim_room=[6,6]`, `split=valid`)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} {item!r}: write key=value, e.g. {flag} dim_room=[6,6]")
        try:
            options[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            options[key] = raw
    return options


def env_option_errors(name: str, options: dict, where: str = "env.options.") -> list[str]:
    """One line per option that environment `name`'s constructor does not take (with the nearest
    valid one), or an unknown environment; [] when all are valid."""
    try:
        cls = get_env_class(name)
    except ValueError as e:
        return [f"env.name: {e}"]
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return []
    valid = [n for n in params if n != "self"]
    errors = []
    for key in options:
        if key not in valid:
            near = closest(key, valid)
            errors.append(f"{where}{key}: {name} has no option {key!r}{f' (did you mean {near!r}?)' if near else ''}; options: {', '.join(valid)}")
    return errors


__all__ = ["BatchEnv", "EnvState", "ParsedAction", "make_env", "register_env", "get_env_class", "list_envs", "parse_think_action",
           "parse_env_options", "env_option_errors"]
