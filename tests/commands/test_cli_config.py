"""Seeing a configuration before running it: `t2po train PRESET ... --print-config` (the resolved
tree as YAML, nothing written), `--help-config` with the preset's values, full preset descriptions."""

from __future__ import annotations

import yaml

from t2po import cli
from t2po.config import _all_keys, list_presets, load_config


def test_print_config_prints_the_resolved_tree_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "smoke", "rollout.group_size=3", "env.options.dim_room=[6,6]", "--print-config"]) == 0
    printed = capsys.readouterr().out
    tree = yaml.safe_load(printed)
    expected = load_config("smoke", ["rollout.group_size=3", "env.options.dim_room=[6,6]"])
    assert tree == expected.to_dict()
    # override and preset (code default: 1e-5)
    assert tree["rollout"]["group_size"] == 3 and tree["optim"]["lr"] == 3e-4
    assert list(tmp_path.iterdir()) == [], "nothing may be written"
    # the printed tree is itself a preset that gives the same configuration
    (tmp_path / "printed.yaml").write_text(printed)
    assert load_config(str(tmp_path / "printed.yaml")) == expected


def test_print_config_of_a_bad_value_fails_naming_the_key(capsys):
    assert cli.main(["train", "smoke", "rollout.group_sise=3", "--print-config"]) == 2
    assert "rollout.group_size" in capsys.readouterr().err


def test_help_config_shows_the_presets_values_next_to_the_help(capsys):
    assert cli.main(["train", "default", "trainer.iterations=7", "--help-config"]) == 0
    text = capsys.readouterr().out
    assert "  optim.lr = 0.0003   (code default: 1e-05)\n      Learning rate" in text
    assert "  trainer.iterations = 7   (code default: 10)" in text
    assert "  algo.gamma = 0.95\n" in text  # unchanged keys show no default note
    keys = [line for line in text.splitlines() if line.startswith("  ") and not line.startswith("      ")]
    assert len(keys) == len(_all_keys())  # every key


def test_presets_prints_one_line_each_and_a_whole_description_by_name(capsys):
    assert cli.main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[: len(list_presets())]] == list_presets()
    assert lines[len(list_presets())] == "" and "`t2po presets NAME` describes one" in lines[-1]
    assert cli.main(["presets", "default"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    # the default preset's header comment, every sentence of it, not only its first line
    assert ("minutes on 2 idle cores" in text and "CPU economies" in text
            and "(docs/method.md §5 cold start; a 135M model does not produce it alone)" in text)
    assert cli.main(["presets", "defualt"]) == 2
    assert "unknown preset 'defualt'" in capsys.readouterr().err


def test_eval_and_rft_take_environment_options_as_train_does(tiny_model_dir, tmp_path, capsys):
    """`env.options.KEY=VALUE` (the spelling of `t2po train`) works for `t2po eval` and `t2po rft
    collect`, alongside the older `--env-option KEY=VALUE`; a typo names the nearest option."""
    import json

    from t2po.evaluate import main as eval_main
    from t2po.rft import main as rft_main

    out = tmp_path / "eval"
    assert eval_main(["sokoban", str(tiny_model_dir), "--episodes", "1", "--max-new-tokens", "8",
                      "env.options.dim_room=[5,5]",
                      "--env-option", "num_gen_steps=3", "env.options.max_steps=2", "--out", str(out), "--quiet"]) == 0
    setup = json.loads((out / "eval.json").read_text())["setup"]
    assert setup["env_options"] == {"dim_room": [5, 5], "num_gen_steps": 3, "max_steps": 2}
    assert eval_main(["sokoban", str(tiny_model_dir), "env.options.dim_rom=[5,5]", "--out", str(tmp_path / "bad")]) == 2
    assert "'dim_room'" in capsys.readouterr().err

    data = tmp_path / "demos.jsonl"
    assert rft_main(["collect", "sokoban", "--episodes", "2", "env.options.dim_room=[5,5]", "env.options.max_steps=4",
                     "--out", str(data)]) == 0
    from t2po.envs import make_env
    from t2po.sft import load_conversations, play_expert_episodes

    (conv,) = load_conversations(data)[:1]  # the episodes of the environment with those options
    assert conv.steps == play_expert_episodes(make_env("sokoban", dim_room=[5, 5], max_steps=4), [conv.seed])[0].steps
