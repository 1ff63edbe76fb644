"""The one error class for expected failures: input the user can fix (a config value, a file, a server).

The command line prints a `UserError` as one line and exits 2 (`t2po/cli.py`); every other exception is
an internal bug and keeps its traceback. Raise it with a message that names the problem and the fix.
The classes below are `UserError`s that are also the built-in exception a caller would catch
(`except ValueError` still catches an `InvalidInput`); the modules' own expected errors subclass
`UserError` too (`ConfigError`, `PluginError`, `CorruptCheckpoint`, `APIError`, `RetrievalError`,
`tracking.MissingPackage`).
"""

from __future__ import annotations


class UserError(Exception):
    """An expected error: one line for the user, exit status 2, no traceback."""


class InvalidInput(UserError, ValueError):
    """A value the user gave (an option, a command-line argument, a data file's content) that cannot work."""


class MissingPackage(UserError, ImportError):
    """An optional package that the chosen feature needs is not installed; the message names the pip command."""


def out_of_range(name: str, value: float | None, low: float, high: float | None = None) -> list[str]:
    """`["name=value: must be >= low"]` (or `in [low, high]`) when `value` lies outside, else []; NaN is
    outside. The wording of a bound in every config section's `check()`."""
    if value is not None and value >= low and (high is None or value <= high):
        return []
    return [f"{name}={value}: must be {f'in [{low}, {high}]' if high is not None else f'>= {low}'}"]
