"""A run's logs: the only module that writes them (the trainer calls it; `t2po report` and the
benchmarks read them):

    RUN/metrics.jsonl      one JSON line per RL iteration (its `iteration`, rollout/actor/time metrics), appended
    RUN/validation.jsonl   one JSON line per held-out validation (its `tag`: before, after_warmup, iter_K, final)
    RUN/run_state.json     what a resume needs beyond the checkpoints: whether the warm-up finished (and its
                           numbers), every validation by tag, the reference points; rewritten atomically

A kill can cut the last line of a JSONL log in mid-write: readers drop a line that is not a JSON
record, with a note. On resume, `forget_after(iteration)` removes what the iterations after the loaded
checkpoint wrote: they are redone, so each iteration and validation keeps one record.
No torch: `t2po report` imports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from t2po.checkpoints import atomic_write_text
from t2po.errors import InvalidInput

METRICS = "metrics.jsonl"
VALIDATION = "validation.jsonl"
RUN_STATE = "run_state.json"


def read_jsonl_log(path: Path, note: Callable[[str], None] | None = None,
                   key: tuple[str, type] | None = None) -> list[dict]:
    """The records of an append-only JSONL log (metrics.jsonl, validation.jsonl). A line that is not
    a JSON object, in practice the last one, torn by a kill in mid-write, is dropped with a note; so
    is a record without `key` = (name, type), e.g. ("iteration", int)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if note is not None:
                note(f"{path.name}: dropped line {number}, which is not a JSON record (torn by a kill?): {line[:60]!r}")
            continue
        if key is not None and (not isinstance(record.get(key[0]), key[1]) or isinstance(record.get(key[0]), bool)):
            if note is not None:
                note(f"{path.name}: dropped line {number}, which has no {key[0]} (damaged?): {line[:60]!r}")
            continue
        records.append(record)
    return records


class RunLog:
    """The logs of the run folder `run_dir`. `state` is the run state (`run_state.json`) in memory;
    `writer=False` (a rank other than the main one) keeps it in memory and writes nothing."""

    def __init__(self, run_dir: Path, note: Callable[[str], None] | None = None, writer: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.note = note
        self.writer = writer
        self.state: dict[str, Any] = {"warmup_done": False, "validation": {}}

    @property
    def state_path(self) -> Path:
        return self.run_dir / RUN_STATE

    # ------------------------------------------------------------------ run state
    def load_state(self) -> None:
        """Read `run_state.json` (on resume; a fresh state when there is none)."""
        if not self.state_path.exists():
            return
        try:
            state = json.loads(self.state_path.read_text())
        except ValueError as e:  # written atomically, so only a damaged disk gets here
            raise InvalidInput(f"{self.state_path} is damaged ({e}); restore it or start a new run") from None
        if not isinstance(state, dict) or not isinstance(state.get("validation"), dict):
            raise InvalidInput(f"{self.state_path} is damaged (no run state in it); restore it or start a new run")
        self.state = state

    def save_state(self) -> None:
        if self.writer:
            atomic_write_text(self.state_path, json.dumps(self.state, indent=1))

    # ------------------------------------------------------------------ records
    def append_metrics(self, record: dict[str, Any]) -> None:
        """One iteration's line (it carries its `iteration`)."""
        if self.writer:
            with open(self.run_dir / METRICS, "a") as f:
                f.write(json.dumps(record) + "\n")

    def add_validation(self, tag: str, stats: dict[str, Any]) -> None:
        """A validation's result: into the run state (saved) and, on the writer, a line of validation.jsonl."""
        self.state["validation"][tag] = stats
        self.save_state()
        if self.writer:
            with open(self.run_dir / VALIDATION, "a") as f:
                f.write(json.dumps({"tag": tag, **stats}) + "\n")

    def metrics(self) -> list[dict]:
        """metrics.jsonl's records (each with an integer `iteration`); [] off the writer."""
        return read_jsonl_log(self.run_dir / METRICS, self.note, ("iteration", int)) if self.writer else []

    # ------------------------------------------------------------------ resume
    def forget_after(self, iteration: int, final_kept: bool) -> None:
        """Forget what the iterations after `iteration`, lost in a kill, wrote: they are redone after
        the resume, and their validations replayed. Their metrics lines and validations (`iter_k` past
        `iteration`; `final` unless `final_kept`, i.e. while iterations remain) go; validation.jsonl is
        rewritten from the run state, so a validation killed between its two writes counts once."""
        val = self.state["validation"]
        for tag in list(val):
            if (tag.startswith("iter_") and int(tag.split("_")[1]) > iteration) or (tag == "final" and not final_kept):
                del val[tag]
        self.save_state()
        if not self.writer:
            return
        kept = [m for m in self.metrics() if m["iteration"] <= iteration]
        atomic_write_text(self.run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in kept))
        read_jsonl_log(self.run_dir / VALIDATION, self.note)  # notes a torn line
        atomic_write_text(self.run_dir / VALIDATION,
                          "".join(json.dumps({"tag": t, **v}) + "\n" for t, v in val.items()))
