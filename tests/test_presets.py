"""Every CPU preset trains (warm-up included where the environment has an expert) and every
environment evaluates, through the real entry points, with the tiny model and tiny budgets."""

from __future__ import annotations

import json

import pytest

from t2po.config import list_presets, load_config
from t2po.trainer.trainer import Trainer

CPU_PRESETS = ["alfworld-cpu", "webshop-cpu", "search-cpu", "ezpoints-cpu", "points24-cpu", "numberline-cpu", "blackjack-cpu"]


def test_every_preset_loads():
    for name in list_presets():
        cfg = load_config(name)
        assert cfg.algo.name in ("t2po", "gigpo", "grpo", "rloo", "ppo")


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_cpu_preset_trains_one_iteration(preset, tiny_model_dir, tmp_path):
    base = load_config(preset)
    overrides = [
        f"model.path={tiny_model_dir}", "trainer.iterations=1", f"trainer.output_dir={tmp_path}", "trainer.run_name=run",
        "trainer.trackers=[console]", "trainer.report=false", "trainer.val_before_train=false",
        "rollout.num_tasks=1", "rollout.group_size=2", "rollout.max_new_tokens=8", "rollout.val_num_tasks=1",
        "env.options.max_steps=2", "model.lora_rank=4",
    ]
    if base.warmup.episodes > 0:
        overrides += ["warmup.episodes=1", "warmup.epochs=1"]
    cfg = load_config(preset, overrides)
    trainer = Trainer(cfg, quiet=True)
    try:
        trainer.setup()
        summary = trainer.train()
    finally:
        trainer.cleanup()
    assert summary["after_rl"] is not None and summary["checkpoint"]
    line = json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert line["rollout/episodes"] == 2 and line["train/samples"] > 0


@pytest.mark.parametrize("env,options", [
    ("alfworld", ["--split", "valid_unseen", "--env-option", "max_steps=2"]),
    ("webshop", ["--env-option", "max_steps=2"]),
    ("search", ["--env-option", "max_steps=2"]),
    ("points24", ["--env-option", "observation_mode=text", "--env-option", "max_steps=2"]),
])
def test_eval_runs_on_each_environment(env, options, tiny_model_dir, tmp_path):
    from t2po.evaluate import main

    out = tmp_path / "eval"
    rc = main([env, str(tiny_model_dir), "--episodes", "1", "--max-new-tokens", "8", "--out", str(out), *options])
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert json.dumps(result)  # written and parseable
    assert (out / "results.md").exists() and list((out / "traces").glob("*.jsonl"))
