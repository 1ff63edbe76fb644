"""Adding an algorithm and an environment is one registration each (README "Adding an algorithm",
"Adding an environment"): a toy advantage estimator and a toy environment, registered the documented
way, train one iteration of the tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from t2po.algos import ALGORITHMS, Advantages, StepBatch, register_algorithm
from t2po.config import ConfigError, load_config
from t2po.envs import BatchEnv, EnvState, register_env
from t2po.envs import _REGISTRY as ENV_REGISTRY
from t2po.trainer.trainer import Trainer


class SayYes(BatchEnv):
    """Answer yes: reward 1 for <action>yes</action>, else the next try."""

    resets: list[list[int]] = []  # seeds of every reset, to see that training played this environment

    def __init__(self, split: str = "train", max_steps: int = 2, history_length: int = 2) -> None:
        self.split, self.max_steps, self.history_length = split, max_steps, history_length

    def reset(self, seeds: list[int]) -> list[EnvState]:
        SayYes.resets.append(list(seeds))
        self.turns = [0] * len(seeds)
        return [EnvState(f"Question {s}: is the sky blue?") for s in seeds]

    def step(self, actions: list[str | None]) -> list[EnvState | None]:
        out: list[EnvState | None] = []
        for i, action in enumerate(actions):
            if action is None:
                out.append(None)
                continue
            self.turns[i] += 1
            won = action.strip().lower() == "yes"
            out.append(EnvState(f"Try {self.turns[i]}: is the sky blue?", reward=float(won), won=won, done=won
                                or self.turns[i] >= self.max_steps))
        return out

    def render_prompt(self, index: int, history: list[tuple[str, str]], state: EnvState) -> str:
        return f"{state.observation} Think inside <think> </think>, then answer inside <action> </action>."


@pytest.fixture
def toy_registrations():
    calls: list[int] = []

    @register_algorithm("toy_ones")
    def toy_ones(batch: StepBatch, settings) -> Advantages:
        calls.append(len(batch.rewards))
        return Advantages(np.ones(len(batch.rewards)), info={"adv/toy_samples": float(len(batch.rewards))})

    register_env("say_yes")(SayYes)
    SayYes.resets.clear()
    yield calls
    ALGORITHMS.pop("toy_ones")
    ENV_REGISTRY.pop("say_yes")


def test_a_registered_estimator_and_environment_train(toy_registrations, tiny_model_dir, tmp_path):
    cfg = load_config("default",
            [f"model.path={tiny_model_dir}", "env.name=say_yes", "env.options.max_steps=2", "algo.name=toy_ones",
                                  "trainer.iterations=1", f"trainer.output_dir={tmp_path}", "trainer.run_name=toy",
                                  "trainer.trackers=[console]",
                                  "trainer.val_before_train=false", "trainer.report=false", "warmup.episodes=0",
                                  "rollout.num_tasks=2",
                                  "rollout.group_size=2", "rollout.sampling.max_new_tokens=8",
                                  "rollout.val_num_tasks=1",
                                  "rollout.tti.turn_score_skip=0", "optim.lr=1e-2", "optim.mini_batch_size=4",
                                  "model.lora_rank=4"])
    # the registration's defaults apply where the config says null: no TTI, no TDS for toy_ones
    assert (cfg.rollout.tti.enabled is None and cfg.resolved_rollout().tti.enabled is False
            and cfg.resolved_rollout().tds.enabled is False)
    trainer = Trainer(cfg, quiet=True)
    trainer.setup()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    trainer.cleanup()
    assert SayYes.resets[0] == [s for s in trainer.task_seeds(0)
                                for _ in range(2)], "training did not play the registered environment"
    metrics = json.loads((trainer.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert toy_registrations == [metrics["train/samples"]] and metrics["adv/toy_samples"] == metrics["train/samples"]
    assert metrics["adv/mean"] == 1.0
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(before[n], after[n].detach())
               for n in before), "the toy advantages did not update the policy"


def test_unregistered_names_are_config_errors():
    with pytest.raises(ConfigError, match="algo.name: unknown algorithm 'toy_ones'"):
        load_config("default", ["algo.name=toy_ones"])
    with pytest.raises(ConfigError, match="Unknown environment 'say_yes'"):
        load_config("default", ["env.name=say_yes"])
