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
    return subprocess.run([sys.executable, "-m", "t2po.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


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
    out = subprocess.run([sys.executable, "-m", "t2po.cli", "train", "optim.lrr=1"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "optim.lr" in out.stderr


def test_a_config_error_is_one_message_exit_2_and_writes_nothing(tmp_path):
    out = t2po("train", "rollout.group_size=0", "rollout.tti.patiense=3", f"trainer.output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("t2po train: Unknown config key 'rollout.tti.patiense' (did you mean 'rollout.tti.patience'?)")
    assert len(out.stderr.strip().splitlines()) == 1
    out = t2po("train", "rollout.group_size=0", "optim.lr=-1", f"trainer.output_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "rollout.group_size=0: must be >= 1" in out.stderr and "optim.lr=-1.0: must be > 0" in out.stderr
    assert list(tmp_path.iterdir()) == [], "a bad value fails before any work: no run folder, no mlruns"


def test_resume_of_a_folder_that_is_no_run(tmp_path, capsys):
    assert cli.main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "is not a t2po run folder (no config.yaml)" in capsys.readouterr().err
