"""What a long phase shows while it runs, and the console log of a run folder.

    with Progress(total=32, desc="[rollout iter 1]", unit="episode") as bar:
        ...
        bar.update(4, note="turn 2/3")

On a terminal a `Progress` is a tqdm bar. When stdout is a file or a pipe (a batch job, `> log`,
CI) it prints a plain line instead: at the first update, then at most every `T2PO_PROGRESS_SECONDS`
(default 30) seconds, and at the end, e.g. `[rollout iter 1] 12/32 episodes, turn 2/3 (14s, ~23s left)`.

`ConsoleLog(run_dir)` copies everything the process prints (stdout and stderr) into
`<run_dir>/train.log`, appending on resume, so that a run that died keeps its explanation; a bar's
carriage-return redraws stay on the terminal, the log gets the plain lines.
`silence_library_progress()` turns off transformers' and huggingface_hub's own bars ("Loading
weights", "Writing model shards"), which would otherwise interleave with ours.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm


def _interval() -> float:
    return float(os.environ.get("T2PO_PROGRESS_SECONDS", "30"))


def _is_terminal(stream: Any) -> bool:
    stream = getattr(stream, "terminal", stream)  # through a ConsoleLog
    return bool(getattr(stream, "isatty", lambda: False)())


class Progress:
    """A progress bar on a terminal, periodic lines elsewhere (see the module docstring).
    `disable=True` (the trainer's --quiet) shows nothing."""

    def __init__(self, total: int, desc: str, unit: str, disable: bool = False):
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.n = 0
        self.note = ""
        self.start = self._last_line = time.monotonic()
        self._lines = 0
        self._line_n = -1  # the count the last line showed
        out = sys.stdout
        self.bar = None
        if not disable and _is_terminal(out):
            # the bar redraws on the terminal only; the console log gets the plain lines
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=getattr(out, "terminal", out), leave=False, dynamic_ncols=True)
        self.log: IO | None = getattr(out, "log", None) if self.bar is not None else out

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.n += n
        if note is not None:
            self.note = note
        if self.disable:
            return
        if self.bar is not None:
            if note is not None:
                self.bar.set_postfix_str(note, refresh=False)
            self.bar.update(n)
        now = time.monotonic()
        if self._lines == 0 or now - self._last_line >= _interval():
            self._line(now)

    def _line(self, now: float) -> None:
        if self.log is None:
            return
        elapsed = now - self.start
        left = f", ~{elapsed / self.n * (self.total - self.n):.0f}s left" if 0 < self.n < self.total else ""
        note = f", {self.note}" if self.note else ""
        self.log.write(f"{self.desc} {self.n}/{self.total} {self.unit}s{note} ({elapsed:.0f}s{left})\n")
        self.log.flush()
        self._last_line = now
        self._lines += 1
        self._line_n = self.n

    def close(self) -> None:
        if self.disable:
            return
        if self.bar is not None:
            self.bar.close()
        if self.n != self._line_n:
            self._line(time.monotonic())  # the final count (also when the phase took less than the interval)
        self.disable = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Tee:
    """A text stream that writes to the terminal stream and to the console log."""

    def __init__(self, terminal: IO, log: IO):
        self.terminal, self.log = terminal, log

    def write(self, text: str) -> int:
        self.terminal.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return _is_terminal(self.terminal)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.terminal, name)


class ConsoleLog:
    """Copy stdout and stderr into `<run_dir>/train.log` (appended) until `close()`."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "train.log"
        self.file = open(self.path, "a", buffering=1)
        self.saved = (sys.stdout, sys.stderr)
        sys.stdout = _Tee(sys.stdout, self.file)  # type: ignore[assignment]
        sys.stderr = _Tee(sys.stderr, self.file)  # type: ignore[assignment]

    def close(self) -> None:
        if self.file.closed:
            return
        # another component may have wrapped the streams since: restore only what we replaced
        if isinstance(sys.stdout, _Tee) and sys.stdout.log is self.file:
            sys.stdout = self.saved[0]
        if isinstance(sys.stderr, _Tee) and sys.stderr.log is self.file:
            sys.stderr = self.saved[1]
        self.file.close()


def silence_library_progress() -> None:
    """No transformers / huggingface_hub progress bars (weights loading, shard writing, downloads)."""
    import transformers
    from huggingface_hub.utils import disable_progress_bars

    transformers.utils.logging.disable_progress_bar()
    disable_progress_bars()
