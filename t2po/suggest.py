"""The "did you mean" hint of every error message that rejects a name (config keys, presets,
environments, engines, commands, environment options)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice nearest to a mistyped `word`, or None when none is near."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return close[0] if close else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the choice nearest to `word`, or ''."""
    near = closest(word, choices)
    return f" (did you mean {near!r}?)" if near else ""
