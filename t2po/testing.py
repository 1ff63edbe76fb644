"""Testing aids that ship with t2po, so that tests and users exercise the real processes: crash points
for the trainer's crash-consistency tests (`kill_point`, tests/training/test_faults.py) and injected
server faults for `t2po serve --inject-faults` (`FaultPlan`, tests/commands/test_serve.py)."""

from __future__ import annotations

import os
import re
import signal
import threading
from dataclasses import dataclass

KILL_AT_ENV = "T2PO_KILL_AT"


def kill_point(phase: str, where: object) -> None:
    """Testing aid for crash consistency (tests/training/test_faults.py): with `T2PO_KILL_AT=phase:where`
    (e.g. `update:2`, `checkpoint:3`, `validation:after_warmup`) in the environment, the process
    SIGKILLs itself here, as `kill -9` would, with no cleanup of any kind."""
    if os.environ.get(KILL_AT_ENV) == f"{phase}:{where}":
        os.kill(os.getpid(), signal.SIGKILL)


FAULTS_HELP = """\
Testing aid: --inject-faults SPEC makes the first chat requests fail on purpose, in order. SPEC is a
comma-separated list of KIND or KIND*COUNT: an HTTP status (429, 500, 503, ...: an OpenAI-style error
body), sleep=SECONDS (wait, then answer normally: past a client's timeout), empty (an answer with
empty content), malformed (a 200 answer that is not a chat completion) or notjson (a 200 answer
whose body is not JSON).
Example: --inject-faults 429*2,sleep=5,500,malformed,notjson
"""


@dataclass(frozen=True)
class Fault:
    """One injected fault: `kind` is "status" (answer HTTP `value`), "sleep" (wait `value` seconds,
    then answer), "empty", "malformed" or "notjson"."""

    kind: str
    value: float = 0.0


class FaultPlan:
    """The faults of `--inject-faults SPEC` (see the module docstring), handed out one per chat
    request in arrival order; thread-safe."""

    _ITEM = re.compile(r"^(?P<kind>\d{3}|sleep=(?P<secs>\d+(?:\.\d+)?)|empty|malformed|notjson)(?:\*(?P<count>\d+))?$")

    def __init__(self, spec: str | None) -> None:
        self.faults: list[Fault] = []
        for item in (spec or "").split(","):
            item = item.strip()
            if not item:
                continue
            m = self._ITEM.match(item)
            if m is None:
                raise ValueError(
                    f"fault {item!r} in --inject-faults: use an HTTP status (429, 500, ...), sleep=SECONDS, "
                    "empty, malformed or notjson, optionally with *COUNT, comma-separated (e.g. "
                    "429*2,sleep=5,malformed)"
                )
            kind = m.group("kind")
            if kind.isdigit():
                if not 400 <= int(kind) <= 599:
                    raise ValueError(f"fault {item!r} in --inject-faults: an HTTP error status is 400-599")
                fault = Fault("status", float(kind))
            elif m.group("secs") is not None:
                fault = Fault("sleep", float(m.group("secs")))
            else:
                fault = Fault(kind)
            self.faults += [fault] * int(m.group("count") or 1)
        self._next = 0
        self._lock = threading.Lock()

    def take(self) -> Fault | None:
        with self._lock:
            if self._next >= len(self.faults):
                return None
            self._next += 1
            return self.faults[self._next - 1]
