"""The run log (t2po/runlog.py): metrics.jsonl, validation.jsonl and run_state.json written, read back and cut
after an iteration on resume, as the trainer uses it (`Trainer._forget_work_after`)."""

from __future__ import annotations

import json

from t2po.runlog import RunLog


def _log(tmp_path, notes):
    log = RunLog(tmp_path, notes.append)
    for it in (1, 2, 3):
        log.append_metrics({"iteration": it, "loss": float(it)})
    for tag in ("before", "iter_1", "iter_2", "final"):
        log.add_validation(tag, {"success_rate": 0.5})
    return log


def test_forget_after_drops_the_lost_iterations_metrics_and_validations(tmp_path):
    notes = []
    log = _log(tmp_path, notes)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "lo')  # torn by a kill in mid-write
    log.forget_after(1, final_kept=False)
    assert [m["iteration"] for m in log.metrics()] == [1]
    assert [json.loads(line)["tag"]
            for line in (tmp_path / "validation.jsonl").read_text().splitlines()] == ["before", "iter_1"]
    assert list(json.loads((tmp_path / "run_state.json").read_text())["validation"]) == ["before", "iter_1"]
    assert any("metrics.jsonl: dropped line 4" in n for n in notes)


def test_forget_after_keeps_final_once_every_iteration_ran_and_state_reloads(tmp_path):
    log = _log(tmp_path, [])
    log.state["warmup_done"] = True
    log.forget_after(3, final_kept=True)
    assert [m["iteration"] for m in log.metrics()] == [1, 2, 3]
    again = RunLog(tmp_path)
    again.load_state()
    assert again.state["warmup_done"] and list(again.state["validation"]) == ["before", "iter_1", "iter_2", "final"]


def test_a_rank_that_is_not_the_writer_writes_nothing(tmp_path):
    log = RunLog(tmp_path, writer=False)
    log.append_metrics({"iteration": 1})
    log.add_validation("before", {"success_rate": 0.0})
    assert (list(tmp_path.iterdir()) == [] and log.state["validation"] == {"before": {"success_rate": 0.0}}
            and log.metrics() == [])
