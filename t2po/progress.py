"""What a long phase shows while it runs, and the console log of a run folder.

    with Progress(total=32, desc="[rollout iter 1]", unit="episode") as bar:
        ...
        bar.update(4, note="turn 2/3")

On a terminal a `Progress` is a tqdm bar. When stdout is a file or a pipe (a batch job, `> log`,
CI) it prints a plain line instead: at the first update, then at most every `T2PO_PROGRESS_SECONDS`
(default 30) seconds, and at the end, e.g. `[rollout iter 1] 12/32 episodes, turn 2/3 (14s, ~23s left)`.

Work inside one step of a phase (the tokens of a generation call, the micro-batches of a scoring
pass) is reported with `activity("token 120/512, 32 rows")`: the innermost open `Progress` shows it
and prints its periodic line, so a long generation call is never silent. With `expected_seconds`
(the same phase's measured time in the previous iteration) the time left is that rate's, not a
count-based guess: episodes finish late in a rollout, so counting them over-estimates by 10-100x.

`PhaseTimer` times the phases of an iteration as verl's `timing_s/<phase>` does (`time/<phase>` here).

`ConsoleLog(run_dir)` copies everything the process prints (stdout and stderr) into
`<run_dir>/train.log`, appending on resume, so that a run that died keeps its explanation; a bar's
carriage-return redraws stay on the terminal, the log gets the plain lines.
`silence_library_progress()` turns off transformers' and huggingface_hub's own bars ("Loading
weights", "Writing model shards"), which would otherwise interleave with ours.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm


def _interval() -> float:
    return float(os.environ.get("T2PO_PROGRESS_SECONDS", "30"))


def _is_terminal(stream: Any) -> bool:
    stream = getattr(stream, "terminal", stream)  # through a ConsoleLog
    return bool(getattr(stream, "isatty", lambda: False)())


_OPEN: list["Progress"] = []  # the open bars, innermost last (`activity`)


class Progress:
    """A progress bar on a terminal, periodic lines elsewhere (see the module docstring).
    `disable=True` (the trainer's --quiet) shows nothing. `expected_seconds`: how long the phase
    took last time, the basis of the time left shown."""

    def __init__(self, total: int, desc: str, unit: str, disable: bool = False, expected_seconds: float | None = None):
        self.total, self.desc, self.unit, self.disable = total, desc, unit, disable
        self.expected_seconds = expected_seconds
        self.n = 0
        self.note = ""
        self.detail = ""  # the work inside the current step (`activity`)
        _OPEN.append(self)
        self.start = self._last_line = self._last_draw = time.monotonic()
        self._lines = 0
        self._line_n = -1  # the count the last line showed
        out = sys.stdout
        self.bar = None
        if not disable and _is_terminal(out):
            # the bar redraws on the terminal only; the console log gets the plain lines
            self.bar = tqdm(total=total, desc=desc, unit=unit, file=getattr(out, "terminal", out), leave=False,
                            dynamic_ncols=True)
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
        self.detail = ""
        now = time.monotonic()
        if self._lines == 0 or now - self._last_line >= _interval():
            self._line(now)

    def activity(self, detail: str) -> None:
        """The work inside the current step; shown on the bar and in the next periodic line."""
        self.detail = detail
        if self.disable:
            return
        now = time.monotonic()
        if self.bar is not None and now - self._last_draw >= 0.5:
            self.bar.set_postfix_str(", ".join(x for x in (self.note, detail) if x), refresh=True)
            self._last_draw = now
        if now - self._last_line >= _interval():
            self._line(now)

    def _left(self, elapsed: float) -> str:
        """The time left: from the phase's previous duration when known, else from the count done."""
        if self.expected_seconds is not None and self.n < self.total and elapsed < self.expected_seconds:
            return f", ~{self.expected_seconds - elapsed:.0f}s left"
        return f", ~{elapsed / self.n * (self.total - self.n):.0f}s left" if 0 < self.n < self.total else ""

    def _line(self, now: float) -> None:
        if self.log is None:
            return
        elapsed = now - self.start
        note = "".join(f", {x}" for x in (self.note, self.detail) if x)
        self.log.write(f"{self.desc} {self.n}/{self.total} {self.unit}s{note} ({elapsed:.0f}s{self._left(elapsed)})\n")
        self.log.flush()
        self._last_line = now
        self._lines += 1
        self._line_n = self.n

    def close(self) -> None:
        if self in _OPEN:
            _OPEN.remove(self)
        if self.disable:
            return
        self.detail = ""
        if self.bar is not None:
            self.bar.close()
        if self.n != self._line_n:
            self._line(time.monotonic())  # the final count (also when the phase took less than the interval)
        self.disable = True

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def activity(detail: str) -> None:
    """Report work inside a step of the innermost open `Progress` (none open: nothing happens).
    Called by code that does not know who shows its progress: the engines' decode loops."""
    if _OPEN:
        _OPEN[-1].activity(detail)


class PhaseTimer:
    """Wall time per phase of a training iteration (verl's `timing_s/gen`, `timing_s/update_actor`):

        with timer("rollout"):
            ...
        metrics.update(timer.pop())   # {"time/rollout": 61.2, ...}

    A phase opened inside another (the reference pass inside the scoring pass, the tracking inside a
    validation) is taken out of the outer one's time, so the phases add up to the time they cover.
    `last` keeps each phase's most recent total, the rate the next iteration's progress lines use."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self._nested: list[float] = []  # per open phase: the time its inner phases took

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            took = time.perf_counter() - start
            self.seconds[phase] = self.seconds.get(phase, 0.0) + took - self._nested.pop()
            if self._nested:
                self._nested[-1] += took

    def pop(self) -> dict[str, float]:
        """The phases timed since the last `pop`, as `time/<phase>` metrics; starts over."""
        out = {f"time/{phase}": s for phase, s in self.seconds.items()}
        self.last.update(self.seconds)
        self.seconds = {}
        return out


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
