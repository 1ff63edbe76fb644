"""The `t2po` command (t2po/cli.py): help, command suggestions, the listing commands, and how a bad
configuration ends `t2po train` (one message naming the fix, exit status 2, nothing written). Where
the exit status matters the command runs as users run it, in a subprocess (`python -m t2po.cli`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from t2po import cli
from t2po.config import _all_keys, list_presets
from t2po.envs import list_envs

REPO = Path(__file__).resolve().parents[2]


def t2po(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "t2po.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_help_lists_every_command():
    out = t2po("--help")
    assert out.returncode == 0 and out.stderr == ""
    listed = [line.split()[0] for line in out.stdout.splitlines() if line.startswith("  ")]
    assert listed == list(cli.COMMANDS)
    assert "t2po train" in out.stdout


def test_no_command_prints_the_help(capsys):
    assert cli.main([]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: t2po COMMAND") and all(f"  {name} " in text for name in cli.COMMANDS)


def test_unknown_command_suggests_the_nearest_and_exits_2():
    out = t2po("trian", "--quiet")
    assert out.returncode == 2 and out.stdout == ""
    assert "t2po: unknown command 'trian'. Did you mean 'train'?" in out.stderr
    assert "Traceback" not in out.stderr


def test_presets_and_envs_list_every_name(capsys):
    assert cli.main(["presets"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert set(list_presets()) <= set(names) and "default" in names
    assert cli.main(["envs"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert listed == list_envs() and "sokoban" in listed


def test_train_help_config_lists_every_key_with_its_help(capsys):
    assert cli.main(["train", "--help-config"]) == 0
    text = capsys.readouterr().out
    for key in _all_keys():
        assert f"  {key} = " in text, key
    assert "rollout.tds.eta = 0.3" in text and "TDS threshold eta" in text


def test_train_help_exits_0():
    out = t2po("train", "--help")
    assert out.returncode == 0 and "--help-config" in out.stdout and "--resume" in out.stdout


def test_cli_typo_exits_with_suggestion():
    out = subprocess.run([sys.executable, "-m", "t2po.cli", "train", "optim.lrr=1"], capture_output=True,
                         text=True, cwd=REPO)
    assert out.returncode == 2
    assert "optim.lr" in out.stderr


def test_a_config_error_is_one_message_exit_2_and_writes_nothing(tmp_path):
    out = t2po("train", "rollout.group_size=0", "rollout.tti.patiense=3",
               f"trainer.output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("t2po train: Unknown config key 'rollout.tti.patiense' (did you mean "
                                 "'rollout.tti.patience'?)")
    assert len(out.stderr.strip().splitlines()) == 1
    out = t2po("train", "rollout.group_size=0", "optim.lr=-1", f"trainer.output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "rollout.group_size=0: must be >= 1" in out.stderr and "optim.lr=-1.0: must be > 0" in out.stderr
    assert list(tmp_path.iterdir()) == [], "a bad value fails before any work: no run folder, no mlruns"


def test_resume_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "is not a t2po run folder (no config.yaml)" in capsys.readouterr().err


def test_a_value_error_from_the_algorithm_layer_keeps_its_traceback(monkeypatch, capsys):
    """Only expected errors (`t2po.errors.UserError`, a path the file system refuses) are one line and
    exit 2; a ValueError raised inside the algorithms is a bug and propagates with its traceback."""
    import numpy as np
    import pytest

    from t2po.algos import grpo_advantages
    from t2po.errors import InvalidInput

    def train_with_a_bug(argv):
        grpo_advantages(np.ones(3), [0, 0], [0, 1])  # mismatched lengths: the algorithm layer's own check
        return 0

    monkeypatch.setitem(cli.COMMANDS, "train", (train_with_a_bug, "train"))
    with pytest.raises(ValueError) as caught:
        cli.main(["train"])
    assert not isinstance(caught.value, InvalidInput)

    def train_with_bad_input(argv):
        raise InvalidInput("env.options.dim_room=[2, 2]: rooms are at least 4x4")

    monkeypatch.setitem(cli.COMMANDS, "train", (train_with_bad_input, "train"))
    assert cli.main(["train"]) == 2
    assert capsys.readouterr().err == "t2po train: env.options.dim_room=[2, 2]: rooms are at least 4x4\n"


def test_an_environment_without_split_is_a_config_error(tmp_path, monkeypatch):
    """Validation builds the environment with split='valid': a class without the keyword fails when the
    config is read, not in setup after the model loaded."""
    import pytest

    from t2po.config import ConfigError, load_config

    (tmp_path / "no_split_env.py").write_text(
        "from t2po.envs.base import BatchEnv\n\nclass NoSplit(BatchEnv):\n    def "
        "__init__(self, max_steps=2):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import t2po.envs

    try:
        with pytest.raises(ConfigError,
                           match="env.name=no_split_env:NoSplit: its constructor takes no `split` keyword"):
            load_config("default", ["env.name=no_split_env:NoSplit", "env.options={}"])
    finally:  # the class registered itself: not an environment of the later tests (test_fuzz_actions lists them all)
        t2po.envs._REGISTRY.pop("no_split_env:NoSplit", None)
