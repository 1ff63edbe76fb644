"""Parts from outside the package, one route for every layer: an algorithm, a loss, an engine or an
environment named by its import path (`algo.name=my_pkg.my_mod:my_advantages`,
`rollout.engine=my_pkg.my_mod:MyEngine`, ...) or declared by an installed package under an entry-point
group (`t2po.algos`, `t2po.losses`, `t2po.engines`, `t2po.envs`). The registries
(`t2po.algos.estimators`, `t2po.algos.losses`, `t2po.engines`, `t2po.envs`) look names up here when
they are not their own."""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import Any, Callable

from t2po.errors import UserError
from t2po.suggest import did_you_mean


class PluginError(UserError, ValueError):
    """A part named by import path or entry point that cannot be loaded; the message says how to fix it."""


def entry_point_targets(group: str) -> dict[str, str]:
    """name -> "module:attribute" of what installed packages declare under entry-point group `group`."""
    return {ep.name: ep.value for ep in importlib.metadata.entry_points(group=group)}


def load_object(path: str, what: str, accepts: Callable[[Any], bool], expected: str) -> Any:
    """The object "package.module:attribute" names. `what` ("Algorithm", "Engine", ...) and `expected`
    (e.g. "an Engine subclass") word the error when the module cannot be imported, lacks the attribute
    or the attribute is not something `accepts`."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is None or not module_name.startswith(e.name):  # the module itself imports something missing
            raise
        raise PluginError(f"{what} {path!r}: cannot import module {module_name!r} ({e}). Install its package or "
                          "put its folder on PYTHONPATH.") from None
    obj = getattr(module, attribute, None)
    if not accepts(obj):
        found = sorted(n for n, v in vars(module).items() if not n.startswith("_") and accepts(v))
        raise PluginError(f"{what} {path!r}: {module_name} has no {expected} {attribute!r}"
                          f"{did_you_mean(attribute, found)} (there: {', '.join(found) or 'none'}).")
    return obj


def resolve(name: str, registry: dict[str, Any], group: str, what: str, load: Callable[[str], Any]) -> Any:
    """`registry[name]`; else `name` as "module:attribute" or an entry point of `group`, loaded with
    `load(path)` and kept in `registry` under `name`. A name found nowhere fails naming the known ones."""
    if name in registry:
        return registry[name]
    plugins = entry_point_targets(group)
    if ":" in name:
        registry[name] = load(name)
    elif name in plugins:
        registry[name] = load(plugins[name])
    else:
        known = sorted(set(registry) | set(plugins))
        own = "Class" if what in ("Engine", "Environment") else "function"
        raise PluginError(f"unknown {what.lower()} {name!r}{did_you_mean(name, known)}; choose one of "
                          f"{', '.join(known)}, or one of your own as package.module:{own}")
    return registry[name]
