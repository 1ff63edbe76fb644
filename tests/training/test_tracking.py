"""Tracking tests: a tiny training run logs into its MLflow store (read back with MlflowClient),
resuming continues the same MLflow run, failing or missing trackers never stop training, and the
rollout traces show forced `</think>` tokens and resampled turns."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from helpers import run_training
from t2po.config import load_config
from t2po.rollout import Episode, StepSample, StepTrace
from t2po.tracking import (
    MLFLOW_EXPERIMENT,
    MlflowTracker,
    Tracker,
    TrackerGroup,
    make_trackers,
    mlflow_store_uri,
    mlflow_ui_command,
)
from t2po.traces import episode_trace, trace_sample
from t2po.config import load_run_config

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAVE_WANDB = importlib.util.find_spec("wandb") is not None


def tiny_run_overrides(model_dir: Path, out: Path, trackers: str) -> list[str]:
    """A seconds-long training run of the tiny model on 2-step Sokoban."""
    return [f"model.path={model_dir}", f"trainer.output_dir={out}", "trainer.run_name=run",
            f"trainer.trackers={trackers}",
            "trainer.iterations=2", "trainer.val_before_train=false", "trainer.trace_episodes=2", "warmup.episodes=0",
            "rollout.num_tasks=2", "rollout.group_size=2", "rollout.sampling.max_new_tokens=12",
            "rollout.val_num_tasks=1",
            "rollout.tti.turn_score_skip=0", "env.options.max_steps=2", "optim.mini_batch_size=4", "model.lora_rank=4"]


def the_run(run_dir: Path):
    client = MlflowClient(tracking_uri=mlflow_store_uri(run_dir))
    experiment = client.get_experiment_by_name(MLFLOW_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, f"one run folder must be one MLflow run, found {len(runs)}"
    return client, runs[0]


def test_tiny_training_logs_to_its_mlflow_store_and_resume_continues_the_run(tiny_model_dir, tmp_path, capfd):
    cfg = load_config("default", tiny_run_overrides(tiny_model_dir, tmp_path, "[console,mlflow,tensorboard,wandb]"))
    run_dir = run_training(cfg).run_dir
    err = capfd.readouterr().err
    # the optional trackers are not installed here: one clear line each, and training went on
    if not HAVE_TENSORBOARD:
        assert err.count("pip install tensorboard") == 1, err
    if not HAVE_WANDB:
        assert err.count("pip install wandb") == 1, err
    assert (run_dir / "summary.json").exists()

    assert (run_dir / "mlflow.db").exists() and (run_dir / "mlartifacts").is_dir()
    client, run = the_run(run_dir)
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert run.data.params["algo.name"] == "t2po" and run.data.params["rollout.group_size"] == "2"
    logged = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for key in ("rollout/success_rate", "actor/grad_norm", "actor/entropy", "rollout/tds_flag_rate", "time/rollout"):
        history = sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == pytest.approx([l[key] for l in logged]), key
    assert "val/success_rate" in run.data.metrics
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "traces"} <= artifacts
    traces = {f.path for f in client.list_artifacts(run.info.run_id, "traces")}
    assert traces == {"traces/iter_000001.jsonl", "traces/iter_000002.jsonl", "traces/val_final.jsonl"}

    # resuming with one more iteration continues the same MLflow run
    cfg = load_run_config(run_dir, ["trainer.iterations=3"])
    run_training(cfg, run_dir=run_dir, resume=True)
    err = capfd.readouterr().err
    assert "trainer.iterations changed on resume (2 -> 3)" in err
    client, run = the_run(run_dir)
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "rollout/success_rate")})
    assert steps == [1, 2, 3]
    assert mlflow_ui_command(run_dir) == f"mlflow ui --backend-store-uri sqlite:///{(run_dir / 'mlflow.db').resolve()}"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One MLflow store shared by the unit tests below (creating a store takes seconds)."""
    return tmp_path_factory.mktemp("store")


class ExplodingTracker(Tracker):
    """A tracker that fails on every call, like a backend whose disk is full."""

    name = "exploding"

    def log_metrics(self, metrics, step):
        raise OSError("No space left on device")

    def log_artifact(self, path, subdir=None):
        raise OSError("No space left on device")

    def close(self, status=None):
        raise OSError("No space left on device")


def test_failing_tracker_is_reported_once_and_the_others_go_on(store, tmp_path, capfd):
    mlflow_tracker = MlflowTracker(tmp_path / "a", {"algo": {"name": "t2po"}}, store_dir=store)
    group = TrackerGroup([ExplodingTracker(), mlflow_tracker])
    for step in (1, 2, 3):
        group.log_metrics({"rollout/success_rate": step / 4}, step=step)
    (tmp_path / "note.txt").write_text("x")
    group.log_artifact(tmp_path / "note.txt")
    group.close()
    err = capfd.readouterr().err
    assert err.count("exploding failed") == 1 and "No space left on device" in err
    client = mlflow_tracker.client
    history = sorted(client.get_metric_history(mlflow_tracker.run_id, "rollout/success_rate"), key=lambda m: m.step)
    assert [m.value for m in history] == [0.25, 0.5, 0.75]
    assert [f.path for f in client.list_artifacts(mlflow_tracker.run_id)] == ["note.txt"]
    assert client.get_run(mlflow_tracker.run_id).info.status == "FINISHED"


def test_mlflow_run_that_breaks_mid_training_is_dropped_after_one_report(store, tmp_path, capfd):
    tracker = MlflowTracker(tmp_path / "b", {}, store_dir=store)
    group = TrackerGroup([tracker])
    group.log_metrics({"x": 1.0}, step=1)
    tracker.client.delete_run(tracker.run_id)  # e.g. someone deletes the run in the UI while training
    group.log_metrics({"x": 2.0}, step=2)
    group.log_metrics({"x": 3.0}, step=3)
    group.close()
    err = capfd.readouterr().err
    assert err.count("mlflow failed in log_metrics") == 1, err
    assert group.trackers == []


def test_unwritable_store_is_reported_and_training_goes_on_without_it(tmp_path, capfd):
    (tmp_path / "mlflow.db").mkdir()  # a folder where the SQLite file should be: the store cannot open
    group = make_trackers(["console", "mlflow"], tmp_path, {"a": 1}, quiet=True)
    assert group.trackers == []
    assert "could not start mlflow" in capfd.readouterr().err
    group.log_metrics({"x": 1.0}, step=1)  # a group without trackers still takes calls
    group.close()


def test_unknown_tracker_name_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="choose from"):
        make_trackers(["mlfow"], tmp_path, {})


def test_close_marks_an_interrupted_run_failed(store, tmp_path):
    tracker = MlflowTracker(tmp_path / "c", {}, store_dir=store)
    try:
        raise RuntimeError("out of memory")
    except RuntimeError:
        tracker.close()  # as from the trainer's `finally` while the error propagates
    assert tracker.client.get_run(tracker.run_id).info.status == "FAILED"


def test_non_finite_and_non_numeric_metrics_are_skipped(store, tmp_path):
    tracker = MlflowTracker(tmp_path / "d", {}, store_dir=store)
    tracker.log_metrics({"ok": 1.5, "nan": math.nan, "inf": math.inf, "name": "sokoban"}, step=1)
    assert tracker.client.get_run(tracker.run_id).data.metrics == {"ok": 1.5}
    tracker.close()


def _step(tokenizer, step: int, response: str, forced_text: str, resampled: int) -> tuple[StepSample, StepTrace]:
    head = tokenizer.encode(response, add_special_tokens=False)
    tail = tokenizer.encode(forced_text, add_special_tokens=False)
    ids = head + tail
    sample = StepSample(prompt_ids=tokenizer.encode("obs", add_special_tokens=False), response_ids=ids,
                        forced_mask=[False] * len(head) + [True] * len(tail),
                        rollout_logprobs=[0.0] * len(ids), reward=-0.1,
                        env_reward=0.0, done=False, valid=False, anchor_obs="obs", group_id=0, traj_id=3, step=step,
                        turn_score=math.nan if step == 0 else 0.25, penalty=0.1)
    trace = StepTrace(response_text=tokenizer.decode(ids), action="", invalid_reason="no action", resampled=resampled,
                      tti_triggers={"stagnation": 1, "budget": 0}, think_length=len(head))
    return sample, trace


def test_episode_trace_shows_forced_think_end_and_resampled_turns(tiny_model):
    _, tokenizer = tiny_model
    steps = [_step(tokenizer, 0, "<think> left left left", "</think>", 0),
             _step(tokenizer, 1, "<think> up", "</think>", 2)]
    samples = [s for s, _ in steps]
    episode = Episode(traj_id=3, group_id=0, seed=11, samples=samples, traces=[t for _, t in steps], won=False,
                      total_reward=-0.2,
                      truncated=True,
                      metrics={"success": 0, "task_type": "push"}, observations=["o0", "o1", "o2"])
    trace = json.loads(json.dumps(episode_trace(episode, tokenizer)))  # JSON-ready
    assert trace["seed"] == 11 and trace["truncated"] and trace["final_observation"] == "o2"
    first, second = trace["steps"]
    n_head = len(tokenizer.encode("<think> left left left", add_special_tokens=False))
    assert first["forced"] == [{"position": n_head,
            "tokens": len(tokenizer.encode("</think>", add_special_tokens=False)), "text": "</think>"}]
    assert (first["response_ids"] == samples[0].response_ids and first["prompt"] == "obs"
            and first["prompt_ids"] == samples[0].prompt_ids)
    assert first["turn_score"] is None and second["turn_score"] == 0.25
    assert (first["tds_resampled"], second["tds_resampled"]) == (0, 2)
    assert second["observation"] == "o1" and second["reward"] == -0.1 and second["env_reward"] == 0.0


def test_sampled_episodes_are_mlflow_traces_of_the_run_with_turns_forced_tokens_and_tds_discards(tiny_model_dir,
                                                                                                 tmp_path):
    import mlflow

    # the absolute threshold, eta large: every turn after the first is regenerated once, so discarded responses exist
    cfg = load_config("default", tiny_run_overrides(tiny_model_dir, tmp_path, "[console,mlflow]") + [
        "trainer.iterations=1", "rollout.tds.quantile=null", "rollout.tds.eta=100", "rollout.tds.max_try=1"])
    run_dir = run_training(cfg).run_dir
    client, run = the_run(run_dir)
    mlflow.set_tracking_uri(mlflow_store_uri(run_dir))
    found = mlflow.search_traces(locations=[run.info.experiment_id], run_id=run.info.run_id, return_type="list")
    by_phase: dict[str, list] = {}
    for t in found:
        by_phase.setdefault(t.info.tags["t2po.phase"], []).append(t)
    assert len(by_phase["train"]) == 2 and len(by_phase["validation"]) == 1  # trace_episodes=2; one validation task
    jsonl = [json.loads(line) for line in (run_dir / "traces" / "iter_000001.jsonl").read_text().splitlines()]
    traces = sorted(by_phase["train"], key=lambda t: t.data.spans[0].attributes["t2po.traj_id"])
    discarded_spans = 0
    for trace, episode in zip(traces, sorted(jsonl, key=lambda e: e["traj_id"])):
        spans = trace.data.spans
        root = next(s for s in spans if s.parent_id is None)
        assert root.span_type == "AGENT" and root.outputs["won"] == episode["won"]
        turns = sorted((s for s in spans if s.parent_id == root.span_id), key=lambda s: s.name)
        assert len(turns) == len(episode["steps"])
        assert trace.info.tags["t2po.iteration"] == "1" and trace.info.tags["t2po.task"] == str(episode["seed"])
        for span, step in zip(turns, episode["steps"]):
            # text as code blocks (a grid keeps its lines), the engine's token ids as attributes, forced TTI tokens as
            # in the JSONL
            assert span.inputs["observation"] == f"```\n{step['observation']}\n```" and "\n" in step["observation"]
            assert span.outputs["response"] == f"```\n{step['response_marked']}\n```"
            assert (span.attributes["t2po.response_ids"] == step["response_ids"]
                    and span.attributes["t2po.prompt_ids"] == step["prompt_ids"])
            assert (span.attributes["t2po.forced"] == step["forced"]
                    and span.attributes["t2po.reward"] == round(step["reward"], 4))
            children = [s for s in spans if s.parent_id == span.span_id]
            discarded = [c for c in children if c.attributes.get("t2po.discarded")]
            assert len(discarded) == len(step["tds_discarded"]) == step["tds_resampled"]
            for child, dropped in zip(discarded, step["tds_discarded"]):
                assert child.outputs["response_ids"] == dropped["response_ids"]
                discarded_spans += 1
            # the phases of the turn at the times they ran, in order, inside the turn's span
            calls = {c.name: c for c in children if not c.attributes.get("t2po.discarded")}
            timing = step["timing"]
            assert (calls["generation"].start_time_ns == timing["generate"][0]
                    and calls["generation"].end_time_ns == timing["generate"][1])
            assert calls["environment step"].start_time_ns == timing["env_step"][0] >= timing["generate"][1]
            assert [calls[f"TDS redraw {k + 1}"].start_time_ns for k in range(step["tds_resampled"])] == [t[0]
                    for t in timing["tds"]]
            assert span.start_time_ns == timing["generate"][0] and span.end_time_ns == timing["env_step"][1]
    assert discarded_spans > 0, "TDS discarded nothing: the discarded spans were not tested"


def test_trace_sample_spreads_over_the_tasks_of_a_batch():
    episodes = list(range(8))  # 4 tasks x 2 rollouts, ordered task by task
    assert trace_sample(episodes, 4) == [0, 2, 4, 6]
    assert trace_sample(episodes, 1) == [0]
    assert trace_sample(episodes, 20) == episodes
    assert trace_sample(episodes, 0) == []


@pytest.mark.skipif(not HAVE_TENSORBOARD, reason="tensorboard is not installed")
def test_tensorboard_writes_event_files(tmp_path):
    group = make_trackers(["tensorboard"], tmp_path, {"a": 1}, quiet=True)
    assert [t.name for t in group.trackers] == ["tensorboard"]
    group.log_metrics({"rollout/success_rate": 0.5}, step=1)
    group.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
