"""Reference points on the validation tasks: the success of a policy that acts at random and of the
environment's expert, on exactly the tasks a validation plays, so a trained policy's held-out success
reads against chance and against the best achievable.

- random mover: exact where the environment can enumerate every action sequence
  (`BatchEnv.random_success`, e.g. Sokoban: the probability that uniformly random moves solve the room
  within `max_steps`), else Monte Carlo (`samples` random episodes per task, `RandomPolicy`) with its
  standard error. None where the environment has no fixed action set (Search QA, WebShop's free search).
- expert: the environment's expert (`BatchEnv.expert_response`: Sokoban's solver, ALFWorld's
  walkthrough, ...) played once per task. None where there is none.

A policy's success on n tasks, one episode each, has the binomial standard error sqrt(p (1 - p) / n),
which `stderr` gives; the report and the summary print it beside each figure.
"""

from __future__ import annotations

import math
from typing import Any

from t2po.envs.base import BatchEnv


def stderr(p: float, n: int) -> float:
    """Binomial standard error of a success rate measured on n episodes."""
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n > 0 else float("nan")


def random_mover(env: BatchEnv, seeds: list[int], max_turns: int | None = None, samples: int = 8,
                 seed: int = 0) -> dict[str, Any] | None:
    """The random mover's success on `seeds`: exact per task where the environment enumerates it."""
    exact = env.random_success(seeds)
    if exact is not None:
        mean = sum(exact) / len(exact)
        return {"success": mean, "stderr": 0.0, "method": "exact", "per_task": exact}
    from t2po.policies import RandomPolicy
    from t2po.rollout import RolloutSettings, collect_rollouts

    try:
        result = collect_rollouts(RandomPolicy(), env, list(seeds),
                                  RolloutSettings(group_size=samples, max_turns=max_turns), seed=seed)
    except ValueError:  # no admissible-action list: chance is not defined by a uniform choice
        return None
    per_task = [0.0] * len(seeds)
    for ep in result.episodes:
        per_task[ep.group_id] += ep.won / samples
    wins = [ep.won for ep in result.episodes]
    mean = sum(wins) / len(wins)
    return {"success": mean, "stderr": stderr(mean, len(wins)), "method": f"monte carlo, {samples} episodes per task",
            "per_task": per_task}


def expert(env: BatchEnv, seeds: list[int], max_turns: int | None = None) -> dict[str, Any] | None:
    """The expert's success on `seeds` (one episode each); None without an expert."""
    if type(env).expert_response is BatchEnv.expert_response:
        return None
    from t2po.policies import ExpertPolicy
    from t2po.rollout import RolloutSettings, collect_rollouts

    result = collect_rollouts(ExpertPolicy(env), env, list(seeds), RolloutSettings(max_turns=max_turns))
    per_task = [0.0] * len(seeds)
    for ep in result.episodes:
        per_task[ep.group_id] = float(ep.won)
    mean = sum(per_task) / len(per_task)
    return {"success": mean, "stderr": 0.0, "method": "expert played once per task", "per_task": per_task}


def reference_points(env: BatchEnv, seeds: list[int], max_turns: int | None = None) -> dict[str, Any]:
    """Both reference points on `seeds` (entries are None where undefined)."""
    return {"random": random_mover(env, seeds, max_turns), "expert": expert(env, seeds, max_turns)}
