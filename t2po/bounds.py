"""Ranges of the command-line numbers: every flag that sizes memory, time or disk (episodes, batch
sizes, tokens, epochs, ports) is checked by argparse against its range before any work, so that
`--epochs 0` or `--port 70000` is a usage error (exit 2), not a traceback or a run that fills the disk.
The configuration keys carry their ranges next to their help (`t2po/config.py`, `t2po train --help-config`).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def bounded(low: float, high: float, kind: type = int) -> Callable[[str], float]:
    """An argparse `type=` that reads a `kind` (int or float) within [low, high]; the range shows in the
    error message (and `metavar` makes it show in --help)."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not (low <= value <= high) or (kind is float and math.isnan(value)):
            raise argparse.ArgumentTypeError(f"{text} is outside [{low}, {high}]")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in some messages
    return parse


PORT = bounded(0, 65535)  # 0 = a free port, printed when the server is up
EPISODES = bounded(1, 100_000)
BATCH_SIZE = bounded(1, 4096)
NEW_TOKENS = bounded(1, 32_768)
SEED = bounded(0, 2**31 - 1)
