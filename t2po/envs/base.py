"""The environment protocol every t2po environment implements.

An environment is a *batch* of independent instances stepped together (gymnasium-like, but batched so
that one LLM generation per turn serves all of them):

    env = make_env("sokoban", dim_room=(6, 6), num_boxes=1)
    states = env.reset(seeds=[7, 7, 7, 9, 9, 9])          # 2 tasks x group size 3
    prompts = [env.render_prompt(i, history[i], states[i]) for i in active]
    states = env.step(actions)                             # one action string (or None) per instance

`reset(seeds)` makes `len(seeds)` instances; instances that share a seed get the same task (the N
members of a GRPO/GiGPO group). `step(actions)` takes one entry per instance: a string for an
instance that acts, `None` for an instance that is already done (it is left untouched and its entry
in the result is `None`).

Constructor keyword arguments are the environment's options (documented in its class docstring);
every environment accepts at least `split` ("train" or a validation split), `max_steps` and
`history_length`.

Adding an environment = one module with a `BatchEnv` subclass plus `@register_env("name")`
(see `t2po/envs/__init__.py`).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

from t2po.envs.parsing import ParsedAction, parse_think_action, reference_think_action


@dataclass
class EnvState:
    """What one instance shows after `reset` or `step`.

    `observation` is the current observation text *without* history; it is also the GiGPO anchor
    observation unless `anchor_obs` says otherwise (e.g. when the observation embeds a step counter).
    """

    observation: str
    reward: float = 0.0
    done: bool = False
    won: bool = False
    anchor_obs: str | None = None
    admissible_actions: list[str] | None = None
    image: Any = None  # PIL.Image.Image for image observations, else None
    # Task-level metrics reported when the episode ends, e.g. {"score": 0.75} or {"task_type": "pick_and_place"}.
    metrics: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.anchor_obs is None:
            self.anchor_obs = self.observation


class BatchEnv(abc.ABC):
    """A batch of environment instances. Subclasses implement `reset`, `step`, `task_description`,
    `render_prompt`; they may override `parse_action` (the default is the
    `<think>...</think><action>...</action>` format, checked as `response_format` says) and `close`."""

    #: registry name, set by `@register_env`
    name: str = ""
    #: maximum environment steps per episode (the rollout loop stops an episode there)
    max_steps: int = 50
    #: whether an action outside `admissible_actions` counts as invalid
    check_admissible: bool = False
    #: how many past (observation, action) pairs the prompt shows
    history_length: int = 2
    #: "reference" (the environment's projection in the authors' code), "strict" or "lenient"
    #: (`t2po.envs.parsing`); `make_env` sets it from the `response_format` option
    response_format: str = "reference"
    #: ranges [low, high] of the constructor options that size memory or time (a list option: each
    #: element), checked with the option names before any work (`env_option_errors`)
    option_ranges: dict[str, tuple[int, int]] = {"max_steps": (1, 1000), "history_length": (0, 1000)}

    @abc.abstractmethod
    def reset(self, seeds: list[int]) -> list[EnvState]:
        """Start `len(seeds)` episodes; equal seeds give equal tasks. Deterministic by seed."""

    @abc.abstractmethod
    def step(self, actions: list[str | None]) -> list[EnvState | None]:
        """Apply one action per instance (`None` = instance is done, skip it)."""

    @abc.abstractmethod
    def render_prompt(self, index: int, history: list[tuple[str, str]], state: EnvState) -> str:
        """The user message for instance `index`.

        `history` is the whole episode so far as (observation, action) pairs, oldest first; the
        prompt shows the task, the step count, the last `self.history_length` pairs, the current
        observation, the admissible actions where the environment has them, and the response-format
        instructions (`<think>...</think><action>...</action>` unless the environment differs)."""

    def parse_action(self, response: str, state: EnvState) -> ParsedAction:
        """Turn a model response into the action sent to the environment plus a validity flag.
        Never raises: malformed output is an invalid action."""
        admissible = state.admissible_actions if self.check_admissible else None
        if self.response_format == "reference":
            return reference_think_action(response, admissible)
        return parse_think_action(response, admissible, strict=self.response_format == "strict")

    def expert_response(self, index: int, state: EnvState) -> str | None:
        """A demonstration response for instance `index` in `state`, in the environment's response
        format (`<think>short reasoning</think><action>...</action>`), from an expert (solver,
        walkthrough, oracle). None where the environment has no expert. Used for warm-up SFT/RFT."""
        return None

    def random_success(self, seeds: list[int]) -> list[float] | None:
        """Per task, the exact probability that uniformly random admissible actions win within
        `max_steps`, where the environment can enumerate it (Sokoban); None = estimate it by play
        (`t2po.references.random_mover`)."""
        return None

    def describe(self) -> dict[str, Any]:
        """What a reported result depends on beyond the options (Search QA: the corpus and retriever),
        kept with training summaries and evaluation results. Empty by default."""
        return {}

    def episode_metrics(self, index: int, state: EnvState) -> dict[str, Any]:
        """Metrics of a finished episode (defaults to the final state's `metrics`)."""
        return dict(state.metrics)

    def close(self) -> None:
        """Release worker processes, servers or files. Safe to call twice."""

    def __enter__(self) -> "BatchEnv":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
