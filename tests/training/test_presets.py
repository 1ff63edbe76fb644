"""Every CPU preset trains (warm-up included where the environment has an expert) and every
environment evaluates, through the real entry points, with the tiny model and tiny budgets; the image
presets and image-mode evaluation of every game run with the tiny vision-language model."""

from __future__ import annotations

import json

import pytest

from t2po.config import ConfigError, list_presets, load_config
from t2po.trainer.trainer import Trainer

CPU_PRESETS = ["alfworld-cpu", "webshop-cpu", "search-cpu", "ezpoints-cpu", "points24-cpu", "numberline-cpu",
               "blackjack-cpu"]
GAMES = ["sokoban", "ezpoints", "points24", "numberline", "blackjack"]
IMAGE_PRESETS = [f"{game}-image" for game in GAMES]  # paper-like: model.path is required


def test_every_preset_loads():
    for name in list_presets():
        cfg = load_config(name, ["model.path=tiny-vlm"] if name in IMAGE_PRESETS else [])
        assert cfg.algo.name in ("t2po", "gigpo", "grpo", "rloo", "ppo")
    for name in IMAGE_PRESETS:
        with pytest.raises(ConfigError, match="need a vision-language model.*Set model.path"):
            load_config(name)


@pytest.mark.parametrize("preset", CPU_PRESETS)
def test_cpu_preset_trains_one_iteration(preset, tiny_model_dir, tmp_path):
    base = load_config(preset)
    overrides = [
        f"model.path={tiny_model_dir}", "trainer.iterations=1", f"trainer.output_dir={tmp_path}",
                 "trainer.run_name=run",
        "trainer.trackers=[console]", "trainer.report=false", "trainer.val_before_train=false",
        "rollout.num_tasks=1", "rollout.group_size=2", "rollout.sampling.max_new_tokens=8", "rollout.val_num_tasks=1",
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
    if preset == "search-cpu":  # a Search QA result names the corpus it retrieved from
        from t2po.report import load_run
        from t2po.trainer.trainer import format_summary

        corpus = summary["environment"]["corpus"]
        assert corpus["num_passages"] > 0 and corpus["name"] in format_summary(summary)
        assert load_run(trainer.run_dir).corpus.startswith(corpus["name"])


@pytest.mark.parametrize("env,options", [
    ("alfworld", ["--split", "valid_unseen", "--env-option", "max_steps=2"]),
    ("webshop", ["--env-option", "max_steps=2"]),
    ("search", ["--env-option", "max_steps=2"]),
    *[(game, ["--env-option", "observation_mode=text", "--env-option", "max_steps=2"]) for game in GAMES],
])
def test_eval_runs_on_each_environment(env, options, tiny_model_dir, tmp_path):
    from t2po.evaluate import main

    out = tmp_path / "eval"
    rc = main([env, str(tiny_model_dir), "--episodes", "1", "--max-new-tokens", "8", "--out", str(out), *options])
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert json.dumps(result)  # written and parseable
    assert (out / "results.md").exists() and list((out / "traces").glob("*.jsonl"))
    if env == "search":
        assert f"Corpus: `{result['setup']['corpus']['name']}`" in (out / "results.md").read_text()


@pytest.mark.parametrize("game", GAMES)
def test_image_preset_trains_through_the_command(game, tiny_vlm_dir, tmp_path):
    from t2po.cli import main
    from t2po.models import load_model

    rc = main(["train", "--quiet", f"{game}-image-cpu", f"model.path={tiny_vlm_dir}", "trainer.iterations=1",
               f"trainer.output_dir={tmp_path}",
               "trainer.run_name=run", "trainer.trackers=[console]", "trainer.report=false",
               "trainer.val_before_train=false",
               "rollout.num_tasks=1", "rollout.group_size=2", "rollout.sampling.max_new_tokens=8",
               "rollout.val_num_tasks=1",
               "env.options.max_steps=2", "model.lora_rank=4", "warmup.episodes=1", "warmup.epochs=1"])
    assert rc == 0
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["after_rl"] is not None
    line = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert line["rollout/episodes"] == 2 and line["train/samples"] > 0
    # the warm-up saw the pictures
    assert '"image": "data:image/png;base64,' in (run / "warmup_demos.jsonl").read_text()
    _, tokenizer = load_model(run / "warmup_model")  # saved with its processor
    assert tokenizer.processor is not None


@pytest.mark.parametrize("game", GAMES)
def test_eval_runs_in_image_mode_on_every_game(game, tiny_vlm_dir, tmp_path):
    from t2po.evaluate import main

    out = tmp_path / "eval"
    rc = main([game, str(tiny_vlm_dir), "--episodes", "1", "--max-new-tokens", "8", "--out", str(out), "--quiet",
               "--env-option", "observation_mode=image", "--env-option", "max_steps=2"])
    assert rc == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["setup"]["env_options"]["observation_mode"] == "image" and result["episodes_finished"] == 1
    turns = [json.loads(l) for l in next((out / "traces").glob("*.jsonl")).read_text().splitlines()[1:]]
    assert turns and all("<|image_pad|>" in t["prompt"] for t in turns)  # the model saw the image


def test_eval_of_an_image_run_and_a_text_model_in_image_mode(tiny_vlm_dir, tiny_model_dir, tmp_path, capsys):
    from t2po.cli import main
    from t2po.evaluate import main as evaluate

    assert main(["train", "--quiet", "numberline-image-cpu", f"model.path={tiny_vlm_dir}",
                 f"trainer.output_dir={tmp_path}", "trainer.run_name=run",
                 "trainer.trackers=[console]", "trainer.report=false", "trainer.val_before_train=false",
                 "warmup.episodes=0",
                 "rollout.num_tasks=1", "rollout.sampling.max_new_tokens=8", "rollout.val_num_tasks=1",
                 "env.options.max_steps=2"]) == 0
    # the run's LoRA checkpoint on its VLM base, with the run's own image options
    assert evaluate(["numberline", str(tmp_path / "run"), "--episodes", "1", "--max-new-tokens", "8", "--out",
                     str(tmp_path / "eval"), "--quiet"]) == 0
    assert json.loads((tmp_path / "eval"
                       / "eval.json").read_text())["setup"]["env_options"]["observation_mode"] == "image"
    rc = evaluate(["numberline", str(tiny_model_dir), "--episodes", "1", "--out", str(tmp_path / "text"),
                   "--env-option", "observation_mode=image"])
    assert rc == 2 and "observation_mode=text" in capsys.readouterr().err
