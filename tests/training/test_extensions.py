"""Every layer from outside the package (README "Adding ..."): an algorithm, a loss, an engine and an
environment in a user's own module (written into tmp_path, put on sys.path as PYTHONPATH would),
named by import path in the config, or declared as entry points the way an installed package does."""

from __future__ import annotations

import importlib
import json
import sys

import pytest

import t2po.algos.estimators
import t2po.algos.losses
import t2po.engines
import t2po.envs
from t2po.config import ConfigError, load_config

from helpers import run_training

USER_MODULE = '''
import numpy as np

from t2po.algos import Advantages
from t2po.engines.hf import HFEngine
from t2po.envs.base import BatchEnv, EnvState

calls = {"advantages": 0, "loss": 0, "generate": 0, "reset": 0}


def every_step_plus_one(batch, settings):
    """An advantage estimator: +1 for every step."""
    calls["advantages"] += 1
    return Advantages(np.ones(len(batch.rewards)), info={"adv/user": 1.0})


def reinforce(batch, settings):
    """A loss: plain REINFORCE over the trained tokens, no clipping."""
    calls["loss"] += 1
    adv = batch.advantages.unsqueeze(-1)
    loss = -(batch.logp * adv * batch.mask).sum() / batch.mask.sum().clamp(min=1)
    return loss, {"reinforce": loss.item()}


class CountingEngine(HFEngine):
    """The transformers engine, counting its generate calls."""

    shares_policy_weights = True

    def generate(self, *args, **kwargs):
        calls["generate"] += 1
        return super().generate(*args, **kwargs)


class SayYes(BatchEnv):
    def __init__(self, split="train", max_steps=2, history_length=2):
        self.split, self.max_steps, self.history_length = split, max_steps, history_length

    def reset(self, seeds):
        calls["reset"] += 1
        self.turns = [0] * len(seeds)
        return [EnvState(f"Question {s}: is the sky blue?") for s in seeds]

    def step(self, actions):
        out = []
        for i, action in enumerate(actions):
            if action is None:
                out.append(None)
                continue
            self.turns[i] += 1
            won = action.strip().lower() == "yes"
            done = won or self.turns[i] >= self.max_steps
            out.append(EnvState("Again: is the sky blue?", reward=float(won), won=won, done=done))
        return out

    def render_prompt(self, index, history, state):
        return f"{state.observation} Think inside <think> </think>, then answer inside <action> </action>."
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    folder = tmp_path / "my_project"
    folder.mkdir()
    (folder / "my_rl_parts.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    # what these tests load stays out of the registries the other test files see
    monkeypatch.setattr(t2po.algos.estimators, "ALGORITHMS", dict(t2po.algos.estimators.ALGORITHMS))
    monkeypatch.setattr(t2po.algos.losses, "LOSSES", dict(t2po.algos.losses.LOSSES))
    monkeypatch.setattr(t2po.engines, "ENGINES", dict(t2po.engines.ENGINES))
    monkeypatch.setattr(t2po.envs, "_REGISTRY", dict(t2po.envs._REGISTRY))
    yield folder
    sys.modules.pop("my_rl_parts", None)


def test_an_algorithm_loss_engine_and_environment_from_a_user_module_train(user_module, tiny_model_dir, tmp_path):
    cfg = load_config("default", [
        f"model.path={tiny_model_dir}", "model.lora_rank=4", "env.name=my_rl_parts:SayYes",
        "algo.name=my_rl_parts:every_step_plus_one",
        "algo.loss=my_rl_parts:reinforce", "rollout.engine=my_rl_parts:CountingEngine", "trainer.iterations=1",
        f"trainer.output_dir={tmp_path / 'runs'}", "trainer.trackers=[console]", "trainer.val_before_train=false",
        "trainer.report=false", "warmup.episodes=0", "rollout.num_tasks=2", "rollout.group_size=2",
        "rollout.sampling.max_new_tokens=8", "rollout.val_num_tasks=1",
        "rollout.tti.turn_score_skip=0", "optim.lr=1e-2", "optim.mini_batch_size=4"])
    parts = importlib.import_module("my_rl_parts")
    # a plain function registers no TTI/TDS default: off, as for the baselines
    assert cfg.resolved_rollout().tti.enabled is False and cfg.resolved_rollout().tds.enabled is False
    trainer = run_training(cfg)
    assert isinstance(trainer.engine, parts.CountingEngine)
    # training and validation played through them
    assert parts.calls["generate"] > 0 and parts.calls["reset"] >= 2, parts.calls
    metrics = json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert parts.calls["advantages"] == 1 and metrics["adv/user"] == 1.0 and metrics["adv/mean"] == 1.0
    assert parts.calls["loss"] >= 1, parts.calls
    assert "actor/reinforce" in metrics and "actor/clip_frac" not in metrics, sorted(metrics)


def test_entry_points_name_every_layer(user_module):
    # what `pip install` of a package declaring the four entry-point groups leaves on sys.path
    dist = user_module / "my_rl_parts-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-rl-parts\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[t2po.algos]\nplus_one = my_rl_parts:every_step_plus_one\n[t2po.losses]\nreinforce = my_rl_parts:reinforce\n"
        "[t2po.engines]\ncounting = my_rl_parts:CountingEngine\n[t2po.envs]\nsay_yes = my_rl_parts:SayYes\n")
    cfg = load_config("default", ["algo.name=plus_one", "algo.loss=reinforce", "rollout.engine=counting",
                                  "env.name=say_yes", "warmup.episodes=0"])  # SayYes has no expert to imitate
    parts = importlib.import_module("my_rl_parts")
    assert cfg.algorithm.advantages is parts.every_step_plus_one
    assert t2po.algos.losses.get_loss("reinforce") is parts.reinforce
    spec = t2po.engines.engine_spec("counting")
    assert spec.shares_policy_weights and spec.reads_images  # class attributes (reads_images inherited from HFEngine)
    assert t2po.engines.engine_class("counting") is parts.CountingEngine
    assert t2po.envs.get_env_class("say_yes") is parts.SayYes


@pytest.mark.parametrize("override, message", [
    ("algo.name=my_rl_parts:every_step",
     "algo.name: Algorithm 'my_rl_parts:every_step': my_rl_parts has no advantage function or "
     "Algorithm 'every_step' \\(did you mean 'every_step_plus_one'\\?\\)"),
    ("algo.loss=no_such_module:reinforce",
     "algo.loss: Loss 'no_such_module:reinforce': cannot import module 'no_such_module'.*PYTHONPATH"),
    ("rollout.engine=my_rl_parts:SayYes",
     "rollout.engine: Engine 'my_rl_parts:SayYes': my_rl_parts has no Engine subclass 'SayYes'"),
    ("algo.loss=ppo2", "algo.loss: unknown loss 'ppo2' \\(did you mean 'ppo'\\?\\)"),
])
def test_a_bad_module_path_is_a_config_error_naming_the_fix(user_module, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", [override])


def test_the_builtin_engines_state_what_their_registry_entries_say():
    from t2po.engines.hf import HFEngine

    spec = t2po.engines.ENGINES["hf"]
    assert (HFEngine.shares_policy_weights, HFEngine.reads_images) == (spec.shares_policy_weights, spec.reads_images)
