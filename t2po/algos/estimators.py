"""The algorithms `algo.name` chooses from: each is an advantage estimator behind one signature,
plus what it needs from the rest of the trainer (a critic) and its default for TTI and TDS.

    @register_algorithm("my_algo")
    def my_advantages(batch: StepBatch, settings) -> Advantages:
        return Advantages(batch.episode_scores - batch.episode_scores.mean())

`settings` is the config's `algo` section (`gamma`, `lam`, `step_weight`, ...). A new algorithm is
one module with such a function, imported by `t2po/algos/__init__.py` (which registers it); the
config's choice list is `ALGORITHMS`' keys. From outside the package no edit is needed:
`algo.name=my_pkg.my_mod:my_advantages` (a function as above, or an `Algorithm` to say it needs a
critic or its TTI/TDS defaults), or an installed package's entry point in the group `t2po.algos`
(`get_algorithm`, `t2po.plugins`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from t2po.algos.advantages import (
    episode_scores,
    gigpo_advantages,
    grpo_advantages,
    penalized_step_returns,
    rloo_advantages,
    turn_level_gae,
)
from t2po.plugins import load_object, resolve


@dataclass
class StepBatch:
    """One iteration's training samples as an estimator reads them: one entry per environment
    step; the steps of a trajectory in order."""

    env_rewards: np.ndarray  # per-step reward of the environment
    traj_ids: list[Hashable]
    group_ids: list[Hashable]  # the task group (GRPO/GiGPO group) of each step
    anchor_obs: list[str]  # the observation each step acted on (GiGPO's step groups)
    values: np.ndarray | None = None  # critic values, for algorithms with a critic
    penalties: np.ndarray | None = None  # per step, the invalid-action penalty (None: none)

    @property
    def _penalties(self) -> np.ndarray:
        return np.zeros_like(self.env_rewards) if self.penalties is None else self.penalties

    @property
    def rewards(self) -> np.ndarray:
        """Per step: the environment reward less the invalid-action penalty."""
        return self.env_rewards - self._penalties

    @property
    def episode_scores(self) -> np.ndarray:
        """Per step: its trajectory's total environment reward less its own step's penalty, as the
        reference credits it (`t2po.algos.advantages.episode_scores`)."""
        return episode_scores(self.env_rewards, self._penalties, self.traj_ids)

    def step_returns(self, gamma: float) -> np.ndarray:
        """Per step: the discounted return of the environment rewards less its own step's penalty
        (`t2po.algos.advantages.penalized_step_returns`)."""
        return penalized_step_returns(self.env_rewards, self._penalties, self.traj_ids, gamma)


@dataclass
class Advantages:
    advantages: np.ndarray  # per step
    returns: np.ndarray | None = None  # per step, the critic's regression target (algorithms with a critic)
    info: dict[str, float] = field(default_factory=dict)  # extra metrics, logged as they are


@dataclass(frozen=True)
class Algorithm:
    advantages: Callable[[StepBatch, Any], Advantages]
    critic: bool = False  # the trainer adds a value head and passes its values in `StepBatch.values`
    tti: bool = False  # rollout.tti.enabled=null means this
    tds: bool = False  # rollout.tds.enabled=null means this


ALGORITHMS: dict[str, Algorithm] = {}


def register_algorithm(name: str, *, critic: bool = False, tti: bool = False, tds: bool = False):
    """Register an advantage estimator as algorithm `name` (`algo.name=name`)."""

    def deco(fn: Callable[[StepBatch, Any], Advantages]) -> Callable[[StepBatch, Any], Advantages]:
        ALGORITHMS[name] = Algorithm(fn, critic=critic, tti=tti, tds=tds)
        return fn

    return deco


ENTRY_POINT_GROUP = "t2po.algos"


def get_algorithm(name: str) -> Algorithm:
    """The algorithm `algo.name` names: a registered one, "package.module:attribute" (an advantage
    function or an `Algorithm`), or an entry point of the group `t2po.algos`."""
    return resolve(name, ALGORITHMS, ENTRY_POINT_GROUP, "Algorithm", _load_algorithm)


def _load_algorithm(path: str) -> Algorithm:
    obj = load_object(path, "Algorithm", lambda v: isinstance(v, Algorithm) or callable(v) and not isinstance(v, type),
                      "advantage function or Algorithm")
    if isinstance(obj, Algorithm):
        return obj
    # a function its module registered under a name of its own keeps that registration's settings
    return next((a for a in ALGORITHMS.values() if a.advantages is obj), None) or Algorithm(obj)


@register_algorithm("gigpo")
@register_algorithm("t2po", tti=True, tds=True)  # docs/method.md §4: GiGPO advantages on rollouts with TTI and TDS
def gigpo(batch: StepBatch, settings: Any) -> Advantages:
    """GiGPO (docs/method.md §4): episode-level plus step-level (anchor state) group advantages."""
    adv, ep_part, step_part = gigpo_advantages(batch.episode_scores, batch.step_returns(settings.gamma),
                                               batch.group_ids, batch.traj_ids, batch.anchor_obs,
                                               step_weight=settings.step_weight, mode=settings.gigpo_mode,
                                               similarity_threshold=settings.similarity_threshold, return_parts=True)
    return Advantages(adv, info={"adv/episode_abs": float(np.mean(np.abs(ep_part))),
                                 "adv/step_abs": float(np.mean(np.abs(step_part)))})


@register_algorithm("grpo")
def grpo(batch: StepBatch, settings: Any) -> Advantages:
    return Advantages(grpo_advantages(batch.episode_scores, batch.group_ids, batch.traj_ids,
                                      norm_by_std=settings.norm_by_std))


@register_algorithm("rloo")
def rloo(batch: StepBatch, settings: Any) -> Advantages:
    return Advantages(rloo_advantages(batch.episode_scores, batch.group_ids, batch.traj_ids))


@register_algorithm("ppo", critic=True)
def ppo(batch: StepBatch, settings: Any) -> Advantages:
    """Turn-level GAE with a critic (the PPO baseline)."""
    adv, returns = turn_level_gae(batch.rewards, batch.values, batch.traj_ids, settings.gamma, settings.lam)
    return Advantages(adv, returns)
