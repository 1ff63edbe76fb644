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
    assert tree["rollout"]["group_size"] == 3 and tree["optim"]["lr"] == 1e-3  # override and preset (code default: 1e-5)
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
    assert "  optim.lr = 0.001   (code default: 1e-05)\n      Learning rate" in text
    assert "  trainer.iterations = 7   (code default: 10)" in text
    assert "  algo.gamma = 0.95\n" in text  # unchanged keys show no default note
    keys = [line for line in text.splitlines() if line.startswith("  ") and not line.startswith("      ")]
    assert len(keys) == len(_all_keys())  # every key


def test_presets_prints_whole_descriptions(capsys):
    assert cli.main(["presets"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    # the default preset's header comment, every sentence of it, not only its first line
    assert "9 minutes on 2 idle cores" in text and "CPU economies" in text and "(spec §5 cold start; a 135M model does not produce it alone)" in text
    assert all(name in text for name in list_presets())
