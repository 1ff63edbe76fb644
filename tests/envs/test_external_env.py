"""Environments from outside the package: `env.name=package.module:ClassName` and the `t2po.envs`
entry-point group, with a preset in the user's own folder (README "Adding an environment")."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from t2po.config import ConfigError, load_config
from t2po.envs import get_env_class, list_envs, make_env

from helpers import run_training

# A guessing game whose observations repeat ("Higher." after different guesses), so it sets
# `anchor_obs` itself: the observation text alone would group unrelated states for GiGPO.
GUESS_ENV = '''
from t2po.envs.base import BatchEnv, EnvState


class GuessEnv(BatchEnv):
    """Guess a number between 1 and `high`."""

    def __init__(self, split: str = "train", high: int = 8, max_steps: int = 3, history_length: int = 2):
        self.split, self.high, self.max_steps, self.history_length = split, high, max_steps, history_length
        self.targets, self.guesses = [], []

    def reset(self, seeds):
        offset = 0 if self.split == "train" else 1000
        self.targets = [1 + (s + offset) % self.high for s in seeds]
        self.guesses = [[] for _ in seeds]
        return [EnvState(observation="Guess.", anchor_obs="start") for _ in seeds]

    def step(self, actions):
        out = []
        for i, action in enumerate(actions):
            if action is None:
                out.append(None)
                continue
            guess = int(action) if (action or "").strip().isdigit() else -1
            self.guesses[i].append(guess)
            won = guess == self.targets[i]
            text = "Right." if won else ("Higher." if guess < self.targets[i] else "Lower.")
            out.append(EnvState(observation=text, reward=float(won), done=won, won=won,
                                anchor_obs=f"{text} after {self.guesses[i]}"))
        return out

    def render_prompt(self, index, history, state):
        shown = history[-self.history_length:] if self.history_length else []
        past = " ".join(f"[{obs} -> {act}]" for obs, act in shown)
        return (f"Guess a number from 1 to {self.high}. {past} {state.observation} "
                "Answer <think>...</think><action>N</action>.")
'''


@pytest.fixture
def user_folder(tmp_path, monkeypatch) -> Path:
    """A user's project folder outside the package: the environment module and a preset."""
    folder = tmp_path / "my_project"
    folder.mkdir()
    (folder / "my_guess_env.py").write_text(GUESS_ENV)
    monkeypatch.syspath_prepend(str(folder))  # as PYTHONPATH=my_project would
    # the environments these tests load stay out of the registry the other test files see
    import t2po.envs

    monkeypatch.setattr(t2po.envs, "_REGISTRY", dict(t2po.envs._REGISTRY))
    return folder


def test_train_one_iteration_on_an_environment_outside_the_package(user_folder, tiny_model_dir, tmp_path):
    preset = user_folder / "guess.yaml"  # a preset in the user's folder that extends a packaged one
    preset.write_text(textwrap.dedent(f"""\
        base: default
        env:
          name: my_guess_env:GuessEnv
          options: {{high: 4, max_steps: 2}}
        model: {{path: {tiny_model_dir}, lora_rank: 4, lora_layers: null}}
        rollout: {{num_tasks: 2, group_size: 2, sampling: {{max_new_tokens: 12}}, val_num_tasks: 1,
                  tti: {{turn_score_skip: 0}}}}
        warmup: {{episodes: 0}}
        trainer: {{iterations: 1, trackers: [console], report: false, val_before_train: false,
                  output_dir: {tmp_path / 'runs'}}}
        """))
    cfg = load_config(str(preset))
    assert cfg.env.name == "my_guess_env:GuessEnv" and cfg.env.options == {"high": 4, "max_steps": 2}
    trainer = run_training(cfg)
    assert trainer.train_env.split == "train" and trainer.val_env.split == "valid"
    assert "GuessEnv" in trainer.run_dir.name and ":" not in trainer.run_dir.name
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["iteration"] == 1 and metrics[0]["rollout/episodes"] == 4
    assert json.loads((trainer.run_dir / "summary.json").read_text())["after_rl"] is not None


def test_bad_module_paths_fail_before_any_work_naming_the_fix(user_folder, tmp_path):
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module'.*PYTHONPATH"):
        load_config("default", ["env.name=no_such_module:GuessEnv", "env.options={}"])
    with pytest.raises(ConfigError,
                       match="no BatchEnv subclass 'GuesEnv'.*did you mean 'GuessEnv'|Did you mean 'GuessEnv'"):
        load_config("default", ["env.name=my_guess_env:GuesEnv", "env.options={}"])
    with pytest.raises(ConfigError, match="has no option 'hihg'.*'high'"):
        load_config("default", ["env.name=my_guess_env:GuessEnv", "env.options={hihg: 3}"])
    assert not (tmp_path / "runs").exists()


def test_entry_point_group_registers_an_installed_environment(user_folder):
    # what `pip install` of a package declaring [project.entry-points."t2po.envs"] leaves on sys.path
    dist = user_folder / "my_guess_env-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-guess-env\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[t2po.envs]\nguess = my_guess_env:GuessEnv\n")
    assert "guess" in list_envs()
    assert get_env_class("guess").__name__ == "GuessEnv"
    env = make_env("guess", high=2)
    assert [s.anchor_obs for s in env.reset([0, 1])] == ["start", "start"]


REPO = Path(__file__).resolve().parents[2]


def test_the_readme_command_runs_as_written(user_folder, tiny_model_dir, tmp_path, monkeypatch):
    """README "Adding an environment": the command line, split as a shell splits it, trains (with a tiny
    model and budget added)."""
    import shlex

    from t2po import cli

    readme = (REPO / "README.md").read_text().splitlines()
    line = next(x for x in readme if "t2po train default env.name=my_guess_env:GuessEnv" in x)
    words = shlex.split(line, comments=True)
    assert words[0] == "PYTHONPATH=my_project" and words[1] == "t2po"  # my_project is on sys.path (user_folder)
    tiny = [f"model.path={tiny_model_dir}", "model.lora_rank=4", "trainer.iterations=1", "trainer.trackers=[console]",
            "trainer.report=false",
            "trainer.val_before_train=false", f"trainer.output_dir={tmp_path / 'runs'}", "rollout.num_tasks=2",
            "rollout.group_size=2",
            "rollout.sampling.max_new_tokens=12", "rollout.val_num_tasks=1", "env.options.max_steps=2"]
    assert cli.main(words[2:] + tiny) == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert "GuessEnv" in run.name and json.loads((run / "summary.json").read_text())["after_rl"] is not None
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["rollout/episodes"] == 4


def test_a_warmup_without_an_expert_is_refused_with_the_fix_before_any_model_loads(user_folder, tmp_path,
                                                                                   monkeypatch, capsys):
    import t2po.models
    from t2po import cli

    def no_loading(*a, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(t2po.models, "load_model", no_loading)
    status = cli.main(["train", "default", "env.name=my_guess_env:GuessEnv", "warmup.episodes=4",
                       f"trainer.output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert ("warmup.episodes=4: the warm-up imitates an expert, and my_guess_env:GuessEnv has none (GuessEnv does not "
            "define expert_response); set warmup.episodes=0") in err
    assert not (tmp_path / "runs").exists()
