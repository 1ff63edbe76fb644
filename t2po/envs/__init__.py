"""Environments behind one protocol (`t2po.envs.base.BatchEnv`) and a registry.

    from t2po.envs import make_env, list_envs
    env = make_env("sokoban", dim_room=(6, 6), num_boxes=1)

A new environment is one module with a `BatchEnv` subclass decorated with `@register_env("name")`,
plus its module path in `_BUILTIN` below (modules are imported lazily so that heavy dependencies of
one environment never slow down another).

An environment outside this package needs no edit here: name it by its import path,
`env.name=my_package.my_module:MyEnv` (the module must be importable: installed, or on PYTHONPATH),
or register it from an installed package under the entry-point group `t2po.envs`
(`[project.entry-points."t2po.envs"] myenv = "my_package.my_module:MyEnv"`, then `env.name=myenv`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
from typing import Any, Callable

import yaml

from t2po.envs.base import BatchEnv, EnvState
from t2po.envs.parsing import RESPONSE_FORMATS, ParsedAction, check_response_format, parse_think_action
from t2po.errors import InvalidInput
from t2po.suggest import closest, did_you_mean

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


ENTRY_POINT_GROUP = "t2po.envs"


def _entry_points() -> dict[str, str]:
    """name -> "module:Class" of the environments installed packages declare (group `t2po.envs`)."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def _import_env_class(path: str) -> type[BatchEnv]:
    """The `BatchEnv` subclass named by "package.module:ClassName"."""
    module_name, _, class_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise InvalidInput(f"Environment {path!r}: cannot import module {module_name!r} ({e}). Install its package or "
                           "put its folder "
                         "on PYTHONPATH.") from e
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, BatchEnv)):
        found = sorted(n for n, v in vars(module).items() if isinstance(v, type) and issubclass(v, BatchEnv)
                       and v is not BatchEnv)
        raise InvalidInput(f"Environment {path!r}: {module_name} has no BatchEnv subclass "
                           f"{class_name!r}{did_you_mean(class_name, found)} "
                         f"(BatchEnv subclasses there: {', '.join(found) or 'none'}).")
    return cls


def get_env_class(name: str) -> type[BatchEnv]:
    if name not in _REGISTRY:
        if name in _BUILTIN:
            importlib.import_module(_BUILTIN[name])
        elif ":" in name:  # package.module:ClassName, an environment outside t2po
            cls = _import_env_class(name)
            cls.name = cls.name or name
            _REGISTRY[name] = cls
        elif name in (plugins := _entry_points()):
            cls = _import_env_class(plugins[name])
            cls.name = cls.name or name
            _REGISTRY[name] = cls
    if name not in _REGISTRY:
        known = list_envs()
        near = closest(name, known)
        raise InvalidInput(f"Unknown environment {name!r}.{f' Did you mean {near!r}?' if near else ''} Known: "
                           f"{', '.join(known)}; "
                         "an environment of your own: env.name=package.module:ClassName.")
    return _REGISTRY[name]


#: options every environment takes besides its constructor's: `response_format` ("reference", the
#: environment's projection in the authors' code, "strict" or "lenient"; see `t2po.envs.parsing`)
COMMON_OPTIONS = ("response_format",)


def make_env(name: str, **options: Any) -> BatchEnv:
    """Build a registered environment; `options` are its constructor's keyword arguments plus the
    `COMMON_OPTIONS`."""
    cls = get_env_class(name)
    response_format = check_response_format(options.pop("response_format", RESPONSE_FORMATS[0]))
    env = cls(**options)
    env.response_format = response_format
    return env


def list_envs() -> list[str]:
    return sorted(set(_REGISTRY) | set(_BUILTIN) | set(_entry_points()))


def parse_env_options(items: list[str], flag: str = "--env-option") -> dict[str, Any]:
    """`key=value` pairs from the command line, values read as YAML (`dim_room=[6,6]`, `split=valid`)."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise InvalidInput(f"{flag} {item!r}: write key=value, e.g. {flag} dim_room=[6,6]")
        try:
            options[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            options[key] = raw
    return options


ENV_OPTION_OVERRIDE = "env.options."


def split_env_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """One spelling of environment options for every command: `t2po eval` and `t2po rft collect` take
    `env.options.KEY=VALUE` as `t2po train` does (and `--env-option KEY=VALUE` as before). Returns the
    other arguments and those overrides as `KEY=VALUE` items for `parse_env_options`."""
    rest, items = [], []
    for arg in argv:
        if arg.startswith(ENV_OPTION_OVERRIDE) and "=" in arg:
            items.append(arg[len(ENV_OPTION_OVERRIDE):])
        else:
            rest.append(arg)
    return rest, items


def env_option_errors(name: str, options: dict, where: str = "env.options.") -> list[str]:
    """One line per option that environment `name`'s constructor does not take (with the nearest
    valid one), or an unknown environment; [] when all are valid."""
    try:
        cls = get_env_class(name)
    except ValueError as e:
        return [f"env.name: {e}"]
    errors = []
    if "response_format" in options:
        try:
            check_response_format(options["response_format"])
        except ValueError as e:
            errors.append(f"{where}response_format: {e}")
    for key, (low, high) in getattr(cls, "option_ranges", {}).items():  # the constructor checks the low end itself
        value = options.get(key)
        numbers = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and not v <= high for v in numbers):
            errors.append(f"{where}{key}={value!r}: {name} takes {key} in [{low}, "
                          f"{high}]{' (each value)' if numbers is value else ''}; larger values size memory or time "
                          "beyond what a run can use")
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return errors
    valid = [n for n in params if n != "self"] + list(COMMON_OPTIONS)
    for key in options:
        if key not in valid:
            near = closest(key, valid)
            errors.append(f"{where}{key}: {name} has no option {key!r}{f' (did you mean {near!r}?)' if near else ''}; "
                          f"options: {', '.join(valid)}")
    return errors


__all__ = ["COMMON_OPTIONS", "BatchEnv", "EnvState", "ParsedAction", "make_env", "register_env", "get_env_class",
           "list_envs", "parse_think_action",
           "parse_env_options", "env_option_errors"]
