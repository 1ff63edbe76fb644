"""Progress while a run works: periodic lines when stdout is a file (bars on a terminal), the console
log `train.log` in the run folder, third-party bars silenced, and MLflow runs ended FAILED / KILLED
when a run dies."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from t2po import cli
from t2po.progress import ConsoleLog, PhaseTimer, Progress, activity
from t2po.tracking import MLFLOW_EXPERIMENT, mlflow_store_uri
from t2po.trainer.trainer import Trainer, format_summary

REPO = Path(__file__).resolve().parents[2]


def smoke_args(model_dir: Path, out: Path, *extra: str) -> list[str]:
    """`t2po train smoke` on the tiny model (the smoke preset's phases: validation, warm-up, rollout,
    update, report)."""
    return ["train", "smoke", f"model.path={model_dir}", f"trainer.output_dir={out}", "trainer.run_name=run",
            "warmup.episodes=2", "env.options.max_steps=2", "rollout.sampling.max_new_tokens=12",
            "model.lora_rank=4", *extra]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def test_smoke_run_with_stdout_in_a_file_prints_progress_inside_each_phase_and_keeps_train_log(tiny_model_dir,
                                                                                               tmp_path):
    out_file = tmp_path / "stdout.txt"
    with open(out_file, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "t2po.cli", *smoke_args(tiny_model_dir, tmp_path)], stdout=f,
                              stderr=subprocess.STDOUT,
                              env=env(), timeout=600)
    text = out_file.read_text()
    assert proc.returncode == 0, text
    lines = text.splitlines()
    assert lines[0].startswith("run folder:")
    plan = next(l for l in lines if l.startswith("[plan]"))
    assert "1 RL iteration of 4 episodes (2 tasks x 2)" in plan and "warm-up: 2 expert episodes, 1 SFT epoch;" in plan
    # a line while each phase runs (its first update), before the line that ends the phase
    for phase, done in (("[val before] 0/2 episodes, turn 1/2", "[val before] success"),
                        ("[warm-up SFT] 1/", "[warm-up] SFT loss"),
                        ("[rollout iter 1] 0/4 episodes, turn 1/2", "[iter 1/1]"),
                        ("[update iter 1] 1/", "[iter 1/1]"),
                        ("[val final] 0/2 episodes", "[val final] success")):
        during = next((k for k, l in enumerate(lines) if l.startswith(phase)), None)
        assert during is not None, f"no progress line {phase!r} in:\n{text}"
        assert during < next(k for k, l in enumerate(lines) if l.startswith(done)), phase
    assert "\r" not in text, "a bar's redraws went into a file"
    for noise in ("Loading weights", "Writing model shards"):
        assert noise not in text
    log = (tmp_path / "run" / "train.log").read_text()
    assert log == text  # everything printed, stderr included


def test_progress_on_a_terminal_draws_a_bar_and_logs_lines(monkeypatch, tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    console = ConsoleLog(tmp_path)
    monkeypatch.setenv("T2PO_PROGRESS_SECONDS", "3600")
    with Progress(10, "[phase]", "step") as bar:
        for _ in range(10):
            bar.update(1, note="x")
    console.close()
    assert sys.stdout is terminal
    assert "\r[phase]:" in terminal.getvalue()  # tqdm's bar
    # the log has the first and the last count as lines, no bar redraws
    assert (tmp_path / "train.log").read_text().splitlines() == ["[phase] 1/10 steps, x (0s, ~0s left)",
                                                                 "[phase] 10/10 steps, x (0s)"]


def test_quiet_progress_prints_nothing(capsys):
    with Progress(3, "[phase]", "step", disable=True) as bar:
        bar.update(3)
    assert capsys.readouterr().out == ""


def _status(run_dir: Path) -> str:
    client = MlflowClient(tracking_uri=mlflow_store_uri(run_dir))
    runs = client.search_runs([client.get_experiment_by_name(MLFLOW_EXPERIMENT).experiment_id])
    return runs[0].info.status


def test_a_run_that_fails_ends_failed_in_mlflow_with_its_traceback_in_train_log(tiny_model_dir, tmp_path,
                                                                                monkeypatch, capsys):
    def broken(self, it):
        raise RuntimeError("out of memory in iteration 1")

    monkeypatch.setattr(Trainer, "iteration", broken)
    handler = signal.getsignal(signal.SIGTERM)  # the default, or one another library installed (ray.init does)
    assert cli.main(smoke_args(tiny_model_dir, tmp_path, "warmup.episodes=0", "trainer.val_before_train=false")) == 1
    assert _status(tmp_path / "run") == "FAILED"
    log = (tmp_path / "run" / "train.log").read_text()
    assert "Traceback" in log and "RuntimeError: out of memory in iteration 1" in log
    assert signal.getsignal(signal.SIGTERM) is handler  # restored


def test_sigterm_ends_the_mlflow_run_killed(tiny_model_dir, tmp_path, monkeypatch):
    def killed(self, it):  # a scheduler stopping the job while it trains
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(Trainer, "iteration", killed)
    assert cli.main(smoke_args(tiny_model_dir, tmp_path, "warmup.episodes=0", "trainer.val_before_train=false")) == 130
    assert _status(tmp_path / "run") == "KILLED"
    assert "stopped (SIGTERM); continue with: t2po train --resume" in (tmp_path / "run" / "train.log").read_text()


def test_ctrl_c_says_so(tiny_model_dir, tmp_path, monkeypatch):
    def interrupted(self, it):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "iteration", interrupted)
    assert cli.main(smoke_args(tiny_model_dir, tmp_path, "warmup.episodes=0", "trainer.val_before_train=false")) == 130
    assert "t2po train: stopped (Ctrl-C); continue with: t2po train --resume" in (tmp_path / "run"
                                                                                  / "train.log").read_text()


def test_phase_timer_takes_inner_phases_out_of_the_outer_one(monkeypatch):
    clock = iter([0.0, 1.0, 4.0, 10.0, 10.0, 12.5])  # perf_counter at each phase's start and end
    monkeypatch.setattr("t2po.progress.time.perf_counter", lambda: next(clock))
    timer = PhaseTimer()
    with timer("old_logprob"):  # 0 .. 10, with the reference pass 1 .. 4 inside it
        with timer("reference"):
            pass
    with timer("update"):  # 10 .. 12.5
        pass
    assert timer.pop() == {"time/old_logprob": 7.0, "time/reference": 3.0, "time/update": 2.5}
    assert timer.pop() == {} and timer.last == {"old_logprob": 7.0, "reference": 3.0, "update": 2.5}


def test_work_inside_a_step_shows_in_the_periodic_line_with_the_time_left_at_the_last_rate(monkeypatch, capsys):
    monkeypatch.setenv("T2PO_PROGRESS_SECONDS", "0")
    with Progress(4, "[rollout iter 2]", "episode", expected_seconds=3600):
        activity("generating token 7/512, 32/32 rows")  # what the engine's decode loop reports
    activity("no bar open: nothing")
    assert (capsys.readouterr().out
            == "[rollout iter 2] 0/4 episodes, generating token 7/512, 32/32 rows (0s, ~3600s left)\n")


def test_iteration_phases_add_up_to_its_wall_time_and_the_run_time_spans_resumes(tiny_model_dir, tmp_path, capsys):
    from test_trainer import tiny_overrides

    from t2po.config import load_config
    from t2po.trainer.trainer import PHASE_LABELS

    def run(iterations: int, resume: bool) -> dict:
        overrides = tiny_overrides(tiny_model_dir, tmp_path, iterations=iterations) + ["trainer.val_every=1",
                                                                                       "algo.kl_coef=0.05",
                                                                                      "model.dtype=float32",
                                                                                       "trainer.threads=1"]
        trainer = Trainer(load_config("default", overrides), run_dir=tmp_path / "run" if resume
                          else None, resume=resume)
        try:
            trainer.setup()
            return trainer.train()
        finally:
            trainer.cleanup()

    run(2, resume=False)
    out = capsys.readouterr().out
    assert ("[setup] device cpu, float32 (model.dtype=float32), 1 CPU thread (trainer.threads=1); model: "
            f"{tiny_model_dir}" in out)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for m in lines:
        phases = {k: v for k, v in m.items() if k.startswith("time/") and k != "time/iteration"}
        # none after the last
        expected = {f"time/{p}" for p, _ in PHASE_LABELS} - ({"time/validation"} if m["iteration"] == 2 else set())
        assert set(phases) == expected
        assert sum(phases.values()) == pytest.approx(m["time/iteration"], rel=0.05)
        line = next(x for x in out.splitlines() if x.startswith(f"[iter {m['iteration']}/2]"))
        for _, label in PHASE_LABELS:
            assert (f"s {label}" in line) == (f"time/{_}" in m), (label, line)
        assert f"= {m['time/iteration']:.0f}s; ~" in line
    run(3, resume=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == [1, 2, 3]
    validation = [json.loads(x) for x in (tmp_path / "run" / "validation.jsonl").read_text().splitlines()]
    final = next(v["seconds"] for v in validation if v["tag"] == "final")
    assert summary["seconds"] == pytest.approx(sum(m["time/iteration"] for m in lines) + final)  # both sessions
    assert "1 iteration," not in format_summary({**summary,
            "iterations": 3}) and "1 iteration," in format_summary({**summary, "iterations": 1})
