"""Helpers shared by several test files (pytest puts tests/ on sys.path: `from helpers import ...`)."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import httpx

from t2po.trainer.trainer import Trainer


def run_training(cfg, run_dir: Path | None = None, resume: bool = False) -> Trainer:
    """setup -> train -> cleanup, as `t2po train` does, quietly; returns the finished trainer."""
    trainer = Trainer(cfg, run_dir=run_dir, resume=resume, quiet=True)
    try:
        trainer.setup()
        trainer.train()
    finally:
        trainer.cleanup()
    return trainer


def wait_for_server(proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> str:
    """The /v1 base URL that `t2po serve --port 0` prints into `log`, once its /health answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"t2po serve exited early:\n{log.read_text()}"
        m = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", log.read_text())
        if m:
            try:
                if httpx.get(m.group(1).removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                    return m.group(1)
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    raise AssertionError(f"t2po serve did not come up in {timeout}s:\n{log.read_text()}")
