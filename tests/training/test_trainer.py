"""Trainer tests: a tiny random model on small Sokoban rooms through the real entry points."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import run_training
from t2po.checkpoints import latest_checkpoint
from t2po.config import ConfigError, load_config
from t2po.rollout import StepSample
from t2po.trainer.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(model_dir: Path, out: Path, algo: str = "t2po", iterations: int = 2) -> list[str]:
    return [
        f"model.path={model_dir}",
        f"algo.name={algo}",
        f"trainer.iterations={iterations}",
        f"trainer.output_dir={out}",
        "trainer.run_name=run",
        "trainer.trackers=[console]",
        "trainer.val_before_train=false",
        "trainer.trace_episodes=1",
        "trainer.report=false",
        "warmup.episodes=0",
        "rollout.num_tasks=2",
        "rollout.group_size=2",
        "rollout.sampling.max_new_tokens=12",
        "rollout.val_num_tasks=1",
        "rollout.tti.turn_score_skip=0",
        "env.options.max_steps=2",
        "optim.lr=1e-2",
        "optim.mini_batch_size=4",
        "model.lora_rank=4",
        # the tiny random model's episodes often all score alike (zero advantages for grpo/rloo); the entropy bonus
        # keeps a gradient so that "parameters change" checks the update path (the main job sets it to 0)
        "algo.entropy_coef=0.001",
    ]


def run_trainer(overrides: list[str], run_dir: Path | None = None, resume: bool = False) -> Trainer:
    return run_training(load_config("default", overrides), run_dir=run_dir, resume=resume)


@pytest.mark.parametrize("algo", ["t2po", "gigpo", "grpo", "rloo", "ppo"])
def test_two_iterations_change_parameters_and_log_metrics(tiny_model_dir, tmp_path, algo):
    cfg = load_config("default", tiny_overrides(tiny_model_dir, tmp_path, algo))
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert before, "LoRA must leave trainable parameters"
    trainer.train()
    trainer.cleanup()
    after = {n: p.detach() for n, p in trainer.model.named_parameters() if p.requires_grad}
    changed = sum(not torch.equal(before[n], after[n]) for n in before)
    assert changed > 0, f"{algo}: no trainable parameter changed"
    lines = [json.loads(l) for l in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["iteration"] for l in lines] == [1, 2]
    for key in ("rollout/success_rate", "rollout/invalid_action_rate", "actor/grad_norm", "actor/pg_loss",
                "actor/entropy",
                "actor/clip_frac", "rollout/tds_flag_rate", "rollout/tti_stagnation_triggers",
                "time/rollout", "time/update",
                "actor/real_token_ratio"):
        assert key in lines[0], f"{algo}: metric {key} missing"
    assert 0 < lines[0]["actor/real_token_ratio"] <= 1
    if algo == "ppo":
        assert "actor/value_loss" in lines[0]
    summary = json.loads((trainer.run_dir / "summary.json").read_text())
    assert summary["after_rl"] is not None and summary["checkpoint"]
    assert (Path(summary["checkpoint"]) / "optimizer.safetensors").exists()
    assert list((trainer.run_dir / "traces").glob("iter_*.jsonl"))


@pytest.mark.parametrize("recompute", ["true", "null"])
def test_the_kl_reference_pass_runs_only_the_lora_layers(tiny_model_dir, tmp_path, recompute):
    """With LoRA on the last layer, the reference pass (the model with its adapters off) replays the states the
    old-log-prob pass recorded below it: the first decoder layer runs in one of the two passes, the last in both.
    Keeping the engine's float32 log-probs (`optim.recompute_logprobs=null`), the reference pass is the only one:
    every layer runs once."""
    cfg = load_config("default", tiny_overrides(tiny_model_dir, tmp_path) + ["algo.kl_coef=0.05", "model.lora_layers=1",
                                                                            "model.dtype=float32",
                                                                            f"optim.recompute_logprobs={recompute}"])
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    try:
        calls = {"first": 0, "last": 0}
        layers = trainer.model.get_base_model().get_decoder().layers
        hooks = [layers[0].register_forward_hook(lambda *a: calls.__setitem__("first", calls["first"] + 1)),
                 layers[-1].register_forward_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))]
        score, counted = trainer._score_samples, []

        def counting(samples):
            before = dict(calls)
            out = score(samples)
            counted.append({k: calls[k] - before[k] for k in calls})
            return out

        trainer._score_samples = counting
        trainer.iteration(0)
        for hook in hooks:
            hook.remove()
    finally:
        trainer.cleanup()
    assert len(counted) == 1
    first, last = counted[0]["first"], counted[0]["last"]
    assert first > 0 and last == (2 * first if recompute == "true" else first)


def _sample(traj: int, group: int, step: int, reward: float, anchor: str) -> StepSample:
    return StepSample(prompt_ids=[1], response_ids=[2], forced_mask=[False], rollout_logprobs=[0.0], reward=reward,
                      env_reward=reward,
                      done=False, valid=True, anchor_obs=anchor, group_id=group, traj_id=traj,
                      step=step, turn_score=0.5)


@pytest.mark.parametrize("algo", ["t2po", "grpo", "rloo"])
def test_advantages_on_a_constructed_batch_have_expected_shape_and_sign(algo, tmp_path):
    cfg = load_config("default", [f"algo.name={algo}"])
    trainer = Trainer(cfg, run_dir=tmp_path, quiet=True)
    # one group, two trajectories: trajectory 0 wins (reward 10 at its 2nd step), trajectory 1 gets nothing
    samples = [_sample(0, 0, 0, 0.0, "a"), _sample(0, 0, 1, 10.0, "b"), _sample(1, 0, 0, 0.0, "a"),
               _sample(1, 0, 1, -0.1, "c")]
    adv, returns, _ = trainer.compute_advantages(samples)
    assert adv.shape == (4,) and returns is None
    assert adv[0] > 0 and adv[1] > 0, "the winning trajectory's steps must be reinforced"
    assert adv[2] < 0 and adv[3] < 0, "the losing trajectory's steps must be discouraged"


@pytest.mark.parametrize("algo", ["t2po", "grpo"])
def test_trainer_credits_the_invalid_action_penalty_to_its_own_step(algo, tmp_path):
    """The issue's example through `Trainer.compute_advantages`, against the reference's rule (verl-agent
    `apply_invalid_action_penalty` + `core_gigpo.episode_norm_reward`, mean_std_norm): every trajectory
    fails, t0's first step is invalid (reward -0.1, env reward 0) -> [-2.0412, +0.4082 x 5]."""
    cfg = load_config("default", [f"algo.name={algo}", "algo.gigpo_mode=mean_std_norm", "algo.norm_by_std=true"])
    trainer = Trainer(cfg, run_dir=tmp_path, quiet=True)
    samples = [_sample(t, 0, k, 0.0, f"{t}-{k}") for t in range(2) for k in range(3)]
    samples[0] = dataclasses.replace(samples[0], reward=-0.1, penalty=0.1, valid=False)
    adv, _, _ = trainer.compute_advantages(samples)
    np.testing.assert_allclose(adv, [-2.0412, 0.4082, 0.4082, 0.4082, 0.4082, 0.4082], atol=1e-4)


def test_relative_exploration_options_log_diagnostics_and_checkpoint_the_tds_window(tiny_model_dir,
                                                                                    tmp_path, monkeypatch):
    overrides = tiny_overrides(tiny_model_dir, tmp_path, iterations=1) + ["rollout.tds.quantile=0.5",
                                                                          "rollout.tti.eps_floor=0.5",
                                                                          "rollout.tti.patience=2",
                                                                          "rollout.tti.budget=4"]
    import t2po.trainer.trainer as trainer_module

    denominators = []  # the per-sample token counts the update's token-mean weights are computed from
    plan, collect = trainer_module.plan_mini_batches, trainer_module.collect_rollouts
    monkeypatch.setattr(trainer_module, "plan_mini_batches", lambda lengths, *a: denominators.append(list(lengths))
                        or plan(lengths, *a))

    def first_token_forced(*args, **kwargs):  # the tiny model rarely thinks: mark each response's first token as forced
        result = collect(*args, **kwargs)
        for sample in result.samples:
            sample.forced_mask[:1] = [True] * min(1, len(sample.forced_mask))
        return result

    monkeypatch.setattr(trainer_module, "collect_rollouts", first_token_forced)
    trainer = run_trainer(overrides)
    (line,) = [json.loads(l) for l in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    # the token-mean denominator counts the tokens the loss mask keeps: forced ones are masked (algo.mask_forced_tokens)
    assert sum(denominators[0]) == line["rollout/response_tokens"] - line["rollout/steps"]
    for key in ("rollout/tds_flag_rate", "rollout/tds_delta_p50", "rollout/tds_eta", "rollout/think_length_p90",
                "rollout/tds_extra_token_fraction", "rollout/tti_budget_triggers", "rollout/forced_tokens"):
        assert key in line, key
    state = json.loads((trainer.run_dir / "checkpoints" / "iter_000001" / "trainer_state.json").read_text())
    assert len(state["tds_threshold"]["deltas"]) == line["rollout/tds_eligible_turns"] > 0
    with pytest.raises(ConfigError, match="rollout.tds.quantile"):
        load_config("default", ["rollout.tds.quantile=1.5"])


def _state_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    tensors.update({f"opt.{k}": v for k, v in load_file(str(ckpt / "optimizer.safetensors")).items()})
    return tensors


def test_resume_matches_straight_run(tiny_model_dir, tmp_path):
    straight = run_trainer(tiny_overrides(tiny_model_dir, tmp_path / "a", iterations=3))
    partial = run_trainer(tiny_overrides(tiny_model_dir, tmp_path / "b", iterations=2))
    from t2po.config import load_run_config

    cfg = load_run_config(partial.run_dir, ["trainer.iterations=3"])
    resumed = Trainer(cfg, run_dir=partial.run_dir, resume=True, quiet=True)
    resumed.setup()
    assert resumed.start_iteration == 2
    resumed.train()
    resumed.cleanup()
    a = _state_tensors(straight.run_dir / "checkpoints" / "iter_000003")
    b = _state_tensors(partial.run_dir / "checkpoints" / "iter_000003")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between straight and resumed runs"


def test_resume_after_a_lora_warmup_kept_as_an_adapter_matches_straight_run(tiny_model_dir, tmp_path):
    """The warm-up is stored as its adapter (`warmup_model/`), merged into the base on load; the
    checkpoints hold the warm-up's and the RL ranks side by side. Resuming must rebuild exactly the
    policy of the straight run."""
    warm = ["warmup.episodes=2", "warmup.epochs=1", "warmup.lr=5e-2"]
    straight = run_trainer(tiny_overrides(tiny_model_dir, tmp_path / "a", iterations=2) + warm)
    partial = run_trainer(tiny_overrides(tiny_model_dir, tmp_path / "b", iterations=1) + warm)
    assert (partial.run_dir / "warmup_model" / "adapter_config.json").is_file()
    from t2po.config import load_run_config

    resumed = Trainer(load_run_config(partial.run_dir, ["trainer.iterations=2"]), run_dir=partial.run_dir,
                      resume=True, quiet=True)
    resumed.setup()
    assert resumed.start_iteration == 1
    resumed.train()
    resumed.cleanup()
    a = _state_tensors(straight.run_dir / "checkpoints" / "iter_000002")
    b = _state_tensors(partial.run_dir / "checkpoints" / "iter_000002")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs between straight and resumed runs"


def test_killed_run_resumes_from_last_checkpoint(tiny_model_dir, tmp_path):
    args = [sys.executable, "-m", "t2po.cli", "train", "--quiet",
            *tiny_overrides(tiny_model_dir, tmp_path, iterations=30)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True)
    run_dir = tmp_path / "run"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and latest_checkpoint(run_dir / "checkpoints") is None:
            time.sleep(0.2)
        assert latest_checkpoint(run_dir / "checkpoints") is not None, "no checkpoint was written in time"
        time.sleep(0.5)  # kill somewhere inside a later iteration
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = json.loads((latest_checkpoint(run_dir / "checkpoints") / "trainer_state.json").read_text())["iteration"]
    out = subprocess.run([sys.executable, "-m", "t2po.cli", "train", "--quiet", "--resume", str(run_dir),
                          f"trainer.iterations={done + 1}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    iters = [json.loads(l)["iteration"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert iters == list(range(1, done + 2)), "metrics of the lost iteration must be replaced, not duplicated"
    assert (run_dir / "checkpoints" / f"iter_{done + 1:06d}").exists()


@pytest.mark.parametrize("val_tti, algo, expected", [("both", "t2po", [False, True]), ("off", "t2po", [False]),
                                                    ("on", "t2po", [True]), ("both", "gigpo", [False])])
def test_validation_decodes_every_algorithm_alike(tiny_model_dir, tmp_path, monkeypatch, val_tti, algo, expected):
    """trainer.val_tti (issue 27): off validates with TTI off whatever the algorithm; both adds a pass with the run's
    TTI (only a run that has TTI on) as tti_on/* keys of the same validation.jsonl record."""
    import t2po.trainer.trainer as trainer_module

    passes = []  # TTI enabled in each validation pass
    collect = trainer_module.collect_rollouts

    def recording(policy, env, seeds, settings, **kwargs):
        if settings.group_size == 1:  # validation (training plays groups of rollout.group_size = 2 here)
            passes.append(bool(policy.intervention.enabled))
        return collect(policy, env, seeds, settings, **kwargs)

    monkeypatch.setattr(trainer_module, "collect_rollouts", recording)
    trainer = run_trainer(tiny_overrides(tiny_model_dir, tmp_path, algo=algo, iterations=1)
                          + [f"trainer.val_tti={val_tti}"])
    assert passes == expected
    (record,) = [json.loads(l) for l in (trainer.run_dir / "validation.jsonl").read_text().splitlines()]
    assert record["val_tti_enabled"] == float(expected[0])
    assert ("tti_on/success_rate" in record) == (len(expected) == 2)
