"""The parent's handle on the ALFWorld worker processes (`worker.py` is the program they run).

The parent sends every worker its share of a reset or step at once, so the workers play in parallel,
then reads the answers. Workers are separate programs (`python -c "...serve(...)"`), not
`multiprocessing` children, so they never re-import the parent's main script (a trainer's torch import
would cost every worker hundreds of MB). No worker is left behind: the pool stops them on `close()`, on
garbage collection and at interpreter exit, and a worker whose parent dies exits on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any


def _stop(processes: list[subprocess.Popen]) -> None:
    """Ask every worker to exit, then kill those still running after 5 s. Safe to call twice."""
    for process in processes:
        try:
            process.stdin.write(json.dumps({"cmd": "close"}) + "\n")
            process.stdin.close()
        except (OSError, ValueError):  # already gone or already closed
            pass
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()
    processes.clear()


class WorkerPool:
    """The parent's handle on the worker processes: start, send requests, stop."""

    def __init__(self, max_steps: int) -> None:
        self.max_steps = max_steps
        self._processes: list[subprocess.Popen] = []
        self._finalizer = weakref.finalize(self, _stop, self._processes)

    @property
    def pids(self) -> list[int]:
        return [process.pid for process in self._processes]

    def __len__(self) -> int:
        return len(self._processes)

    def grow(self, count: int) -> None:
        """Start workers until there are `count` of them."""
        if not self._finalizer.alive:
            raise RuntimeError("The ALFWorld environment is closed; make a new one.")
        package_root = str(Path(__file__).resolve().parents[3])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        env.setdefault("OMP_NUM_THREADS", "1")
        started = []
        for _ in range(count - len(self._processes)):
            entry = f"from t2po.envs.alfworld.worker import serve; serve({self.max_steps}, {os.getpid()})"
            command = [sys.executable, "-c", entry]
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                       bufsize=1, env=env)
            self._processes.append(process)
            started.append(process)
        for process in started:  # they import TextWorld in parallel
            self._receive(process)

    def request(self, requests: dict[int, dict[str, Any]]) -> dict[int, Any]:
        """Send `requests[w]` to worker `w` for every `w` at once, then collect the answers."""
        for worker, message in requests.items():
            process = self._processes[worker]
            try:
                process.stdin.write(json.dumps(message) + "\n")
                process.stdin.flush()
            except BrokenPipeError as error:
                raise RuntimeError(
                    f"ALFWorld worker process {process.pid} is gone (exit code {process.poll()}). "
                    "Close this environment and make a new one."
                ) from error
        answers, errors = {}, []
        for worker in requests:  # read every answer, even after an error, so no answer is left unread
            try:
                answers[worker] = self._receive(self._processes[worker])
            except RuntimeError as error:
                errors.append(error)
        if errors:
            raise errors[0]
        return answers

    def _receive(self, process: subprocess.Popen) -> Any:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(
                f"ALFWorld worker process {process.pid} exited (exit code {process.poll()}); its error, if any, "
                "is on stderr above. Close this environment and make a new one."
            )
        message = json.loads(line)
        if "error" in message:
            raise RuntimeError(f"ALFWorld worker process {process.pid} failed:\n{message['error']}")
        return message["ok"]

    def close(self) -> None:
        self._finalizer()
