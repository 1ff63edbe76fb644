"""Fault injection: `kill -9` at every training phase, corrupted checkpoints and logs, a reused run
name, bad configuration values. Each asserts the outcome: which checkpoint a resume used, metrics
without duplicates, every validation present once, a clear one-line error, nothing left behind.

The kills are real SIGKILLs of a child process (no cleanup, no `finally`), placed deterministically
with `T2PO_KILL_AT=phase:where` (`t2po.testing.kill_point`). One tiny run is trained
through all of them and shared by the tests that corrupt it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import run_training
from t2po.cli import main as cli_main
from t2po.config import load_config
from t2po.tracking import MlflowTracker
from t2po.testing import KILL_AT_ENV

REPO = Path(__file__).resolve().parents[2]
ITERATIONS = 3


def overrides(model_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"model.path={model_dir}", f"trainer.output_dir={out}", "trainer.run_name=run",
            f"trainer.iterations={ITERATIONS}",
        "trainer.trackers=[console]", "trainer.val_before_train=true", "trainer.val_every=2",
            "trainer.keep_checkpoints=3",
        "trainer.trace_episodes=0", "trainer.report=false", "warmup.episodes=1", "warmup.epochs=1",
            "rollout.num_tasks=1",
        "rollout.group_size=2", "rollout.sampling.max_new_tokens=8", "rollout.val_num_tasks=1",
            "rollout.tti.turn_score_skip=0",
        "env.options.max_steps=2", "optim.mini_batch_size=4", "model.lora_rank=4", *extra,
    ]


CHILD = """
import json, sys
from t2po.config import load_config
from t2po.trainer.trainer import Trainer
job = json.loads(sys.argv[1])
trainer = Trainer(load_config("default", job["overrides"]), run_dir=job["run_dir"], resume=job["resume"])
try:
    trainer.setup()
    trainer.train()
finally:
    trainer.cleanup()
"""


def run_in_child(cfg_overrides: list[str], run_dir: Path, resume: bool, kill_at: str | None, log: Path) -> int:
    """Train in a child process (stdout/stderr to `log`); returns the signal that ended it (SIGKILL when
    the kill point fired) or its exit status (0: a clean finish). A fresh interpreter, not a fork of
    pytest: a fork inherits the locks other tests' threads (torch.distributed, OpenMP) held at that
    moment and can hang on them."""
    env = {k: v for k, v in os.environ.items() if k != KILL_AT_ENV}
    if kill_at is not None:
        env[KILL_AT_ENV] = kill_at
    job = json.dumps({"overrides": cfg_overrides, "run_dir": str(run_dir) if resume else None, "resume": resume})
    with open(log, "a") as out:
        code = subprocess.run([sys.executable, "-c", CHILD, job], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=600).returncode
    return -code if code < 0 else code


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# kill points in the order the run reaches them; each resume goes past the previous point
KILLS = ["validation:before", "validation:after_warmup", "rollout:1", "update:2", "validation:iter_2", "checkpoint:2",
         "checkpoint:3", "validation:final"]


@pytest.fixture(scope="module")
def killed_run(tiny_model_dir, tmp_path_factory):
    """The run after one kill at each point and a final clean resume; the child logs per stage."""
    out = tmp_path_factory.mktemp("faults")
    run_dir = out / "run"
    cfg = overrides(tiny_model_dir, out)
    stages = []
    for k, kill_at in enumerate(KILLS + [None]):
        log = out / f"stage{k}.log"
        status = run_in_child(cfg, run_dir, resume=k > 0, kill_at=kill_at, log=log)
        stages.append((kill_at, status, log.read_text()))
    return run_dir, stages


def test_kill_at_every_phase_then_resume(killed_run):
    run_dir, stages = killed_run
    for kill_at, status, log in stages:
        expected = signal.SIGKILL if kill_at is not None else 0
        assert status == expected, f"stage {kill_at}: status {status}\n{log[-3000:]}"
    logs = {kill_at: log for kill_at, _, log in stages}
    # each resume continued from the checkpoint the kill left complete
    assert "resumed from" not in logs["validation:after_warmup"]  # no checkpoint yet: starts over at 0
    # redid 2 after the validation kill
    assert f"resumed from {run_dir / 'checkpoints' / 'iter_000001'}" in logs["checkpoint:2"]
    # checkpoint 2 was half written
    assert f"resumed from {run_dir / 'checkpoints' / 'iter_000001'}" in logs["checkpoint:3"]
    assert f"resumed from {run_dir / 'checkpoints' / 'iter_000002'}" in logs["validation:final"]
    assert f"resumed from {run_dir / 'checkpoints' / 'iter_000003'}" in logs[None]
    assert [m["iteration"] for m in records(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert [v["tag"] for v in records(run_dir / "validation.jsonl")] == ["before", "after_warmup", "iter_2", "final"]
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("before_warmup", "after_warmup", "after_rl"):
        assert summary[key] is not None, key
    assert summary["checkpoint"] == str(run_dir / "checkpoints" / "iter_000003")
    assert not list((run_dir / "checkpoints").glob("*.tmp"))


def test_mlflow_forgets_the_iterations_a_resume_redoes(tmp_path):
    """What the trainer calls on resume (`TrackerGroup.forget_after`): the MLflow run of the folder keeps
    one value per metric and step, and its latest values are the redone ones."""
    first = MlflowTracker(tmp_path, {"a": 1})
    for step in (1, 2, 3):
        first.log_metrics({"rollout/success_rate": step / 10, "sft/loss": 5.0}, step)
    first.close()
    resumed = MlflowTracker(tmp_path, {"a": 1})  # the same MLflow run (found by the run folder)
    assert resumed.run_id == first.run_id
    first.client.log_artifact(first.run_id, str(_text_file(tmp_path / "note.txt")))
    first.log_traces([{"seed": 7, "traj_id": 0, "group_id": 0, "metrics": {}, "won": False, "total_reward": 0.0,
                       "truncated": False, "final_observation": "o", "steps": []}], "train", 1)
    resumed.forget_after(1)
    for step in (2, 3):
        resumed.log_metrics({"rollout/success_rate": step}, step)
    resumed.close()
    client = resumed.client
    assert client.get_run(first.run_id).info.lifecycle_stage == "deleted" and resumed.run_id != first.run_id
    runs = client.search_runs([resumed.experiment_id])
    assert [r.info.run_id for r in runs] == [resumed.run_id] and runs[0].data.params == {"a": "1"}
    assert runs[0].info.run_name == client.get_run(first.run_id).info.run_name
    assert MlflowTracker(tmp_path, {"a": 1}).run_id == resumed.run_id  # the next resume finds the new run
    rows = sorted((m.step, m.value) for m in client.get_metric_history(resumed.run_id, "rollout/success_rate"))
    assert rows == [(1, 0.1), (2, 2.0), (3, 3.0)] and runs[0].data.metrics["rollout/success_rate"] == 3.0
    # epochs, not iterations
    assert sorted(m.step for m in client.get_metric_history(resumed.run_id, "sft/loss")) == [1, 2, 3]
    assert [f.path for f in client.list_artifacts(resumed.run_id)] == ["note.txt"]
    traces = client.search_traces(locations=[resumed.experiment_id], run_id=resumed.run_id)
    assert [t.info.tags["t2po.task"] for t in traces] == ["7"]


def _text_file(path):
    path.write_text("kept across the resume\n")
    return path


def test_mlflow_run_with_nothing_to_forget_is_kept(tmp_path):
    first = MlflowTracker(tmp_path, {"a": 1})
    first.log_metrics({"rollout/success_rate": 0.5}, 1)
    resumed = MlflowTracker(tmp_path, {"a": 1})
    resumed.forget_after(1)
    assert resumed.run_id == first.run_id


def test_mlflow_forgets_a_warmup_that_is_redone(tmp_path):
    """A kill during the warm-up: the resume redoes it (`forget_after(0, warmup=True)`), so its sft/* values
    are logged once, not twice (issue 29)."""
    first = MlflowTracker(tmp_path, {"a": 1})
    for epoch in (1, 2):
        first.log_metrics({"sft/loss": 5.0 - epoch}, epoch)
    first.close()
    resumed = MlflowTracker(tmp_path, {"a": 1})
    resumed.forget_after(0, warmup=True)
    for epoch in (1, 2):
        resumed.log_metrics({"sft/loss": 4.0 - epoch}, epoch)
    resumed.close()
    rows = sorted((m.step, m.value) for m in resumed.client.get_metric_history(resumed.run_id, "sft/loss"))
    assert rows == [(1, 3.0), (2, 2.0)]


# damage done to the newest checkpoint: (file, new content from the old bytes, what the note says)
CORRUPTIONS = {
    "truncated adapter": ("adapter/adapter_model.safetensors", lambda b: b[: len(b) // 2],
                          "adapter/adapter_model.safetensors cannot be read"),
    "empty trainer_state.json": ("trainer_state.json", lambda b: b"", "trainer_state.json is not JSON"),
    "0-byte optimizer": ("optimizer.safetensors", lambda b: b"", "optimizer.safetensors cannot be read"),
    "random RNG bytes": ("rng.safetensors", lambda b: os.urandom(len(b)), "rng.safetensors cannot be read"),
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_corrupted_latest_checkpoint_falls_back_to_the_one_before(tiny_model_dir, killed_run, tmp_path, capsys, damage):
    source, _ = killed_run
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    name, change, why = CORRUPTIONS[damage]
    target = run_dir / "checkpoints" / "iter_000003" / name
    target.write_bytes(change(target.read_bytes()))
    # a torn last line in both logs, as a kill in mid-write leaves it
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 4, "rollout/succ')
    with open(run_dir / "validation.jsonl", "a") as f:
        f.write('{"tag": "iter_4", "succ')
    capsys.readouterr()
    cfg = load_config("default", overrides(tiny_model_dir, run_dir.parent))
    trainer = run_training(cfg, run_dir=run_dir, resume=True)
    err = capsys.readouterr().err
    assert f"skipped checkpoint {run_dir / 'checkpoints' / 'iter_000003'}: " in err and why in err
    assert "metrics.jsonl: dropped line 4" in err and "validation.jsonl: dropped line 5" in err
    assert trainer.start_iteration == 2
    assert [m["iteration"] for m in records(run_dir / "metrics.jsonl")] == [1, 2, 3]
    assert [v["tag"] for v in records(run_dir / "validation.jsonl")] == ["before", "after_warmup", "iter_2", "final"]
    assert json.loads((run_dir / "checkpoints" / "iter_000003" / "trainer_state.json").read_text())["iteration"] == 3


def test_a_reused_run_name_is_refused_and_the_old_run_untouched(tiny_model_dir, killed_run, capsys):
    run_dir, _ = killed_run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    cfg = overrides(tiny_model_dir, run_dir.parent)
    assert cli_main(["train", "--quiet", *cfg]) == 2
    err = capsys.readouterr().err
    assert err.startswith("t2po train: ") and err.count("\n") == 1 and "Traceback" not in err
    assert f"{run_dir} already holds a run: continue it with `t2po train --resume {run_dir}`" in err
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before


BAD_VALUES = {
    "trainer.save_every=0": "trainer.save_every=0: must be >= 1",
    "trainer.val_every=-1": "trainer.val_every=-1: must be >= 0",
    "algo.clip_low=5": "algo.clip_low=5.0: must be in [0, 1]",
    "model.lora_rank=0": "model.lora_rank=0: must be >= 1",
    "env.name=nosuch": "Unknown environment 'nosuch'",
    "model.path=/nonexistent": "cannot load a model from '/nonexistent'",
    "env.options.dim_room=foo": "dim_room must be two integers",
    "env.options.max_steps=0": "max_steps must be an integer >= 1",
    "env.options.num_boxes=30": "sokoban takes num_boxes in [1, 4]",
    "env.options.dim_room=[100000,100000]": "sokoban takes dim_room in [4, 16] (each value)",
    "trainer.device=cuda": "sees no GPU",
}
MISSING_DATA = {
    "alfworld": ("alfworld", "data_dir"),
    "webshop": ("webshop", "data_dir"),
    "search": ("search", "data_dir"),
}


def _train_fails_cleanly(args: list[str], out: Path, capsys, expected: str) -> None:
    assert cli_main(["train", "--quiet", *args]) == 2, expected
    err = capsys.readouterr().err
    assert err.count(expected) == 1, err  # said once
    # one message (progress bars of the model loading aside), no traceback
    assert "Traceback" not in err and len([line for line in err.splitlines()
                                           if line.startswith("t2po train: ")]) == 1, err
    assert not out.exists() or not any(out.iterdir()), f"left behind: {list(out.rglob('*'))}"


@pytest.mark.parametrize("bad", sorted(BAD_VALUES))
def test_bad_config_value_is_one_clear_line_and_leaves_nothing(tiny_model_dir, tmp_path, capsys, bad):
    if bad == "trainer.device=cuda":
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    out = tmp_path / "runs"
    args = [a for a in overrides(tiny_model_dir, out) if not a.startswith(bad.split("=")[0] + "=")] + [bad]
    if bad == "env.name=nosuch":
        args = [a for a in args if not a.startswith("env.options.")]
    _train_fails_cleanly(args, out, capsys, BAD_VALUES[bad])


@pytest.mark.parametrize("env", sorted(MISSING_DATA))
def test_missing_data_dir_is_one_clear_line_and_leaves_nothing(tiny_model_dir, tmp_path, capsys, env):
    out = tmp_path / "runs"
    args = [a for a in overrides(tiny_model_dir, out) if not a.startswith("env.options.")
            and not a.startswith("warmup.")]
    args += [f"env.name={env}", f"env.options.{MISSING_DATA[env][1]}={tmp_path / 'nodata'}", "warmup.episodes=0"]
    _train_fails_cleanly(args, out, capsys, str(tmp_path / "nodata"))


def test_unwritable_output_dir_is_one_clear_line(tiny_model_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    _train_fails_cleanly(overrides(tiny_model_dir, blocker / "runs"), blocker / "runs", capsys, str(blocker))
    assert blocker.read_text() == ""


def test_rft_collect_with_a_missing_policy_and_sft_on_bad_jsonl(tmp_path, capsys):
    out = tmp_path / "demos.jsonl"
    assert cli_main(["rft", "collect", "sokoban", "--policy", "/nonexistent", "--episodes", "1", "--out",
                     str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("t2po rft: ") and "/nonexistent" in err and "Traceback" not in err
    assert not out.exists()
    data = tmp_path / "bad.jsonl"
    data.write_text('{"steps": []}\n{"steps": [\n')
    assert cli_main(["sft", str(data), "--out", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err
    assert f"{data}, line 2: not a JSON object" in err and "Traceback" not in err
    assert not (tmp_path / "model").exists()


def test_the_real_command_exits_2_without_a_traceback(tmp_path):
    """The same through a real `t2po` process (exit status, stderr, nothing written)."""
    out = subprocess.run([sys.executable, "-m", "t2po.cli", "train", f"trainer.output_dir={tmp_path / 'runs'}",
                          "trainer.save_every=0"],
                         capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert out.returncode == 2 and "trainer.save_every=0: must be >= 1" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()
