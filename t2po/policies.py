"""Who answers a turn of the rollout loop (`t2po.rollout.collect_rollouts`): the policy seam.

The loop owns everything else (prompts, history, parsing, the invalid-action penalty, episode end,
the turn limit, the trace), so a local model, an API model and an environment's expert play by the
same rules. A policy answers a batch of turns:

- `EnginePolicy`: a token-level engine (transformers, vLLM). It has a `tokenizer`, so the loop renders
  each prompt with the chat template and hands it the exact token ids (and an image's pixel inputs);
  its answers carry the sampled token ids, log-probs, TTI forcing and turn scores.
- `APIPolicy`: a model behind an OpenAI-compatible API (`t2po.engines.openai_api.OpenAIChatAgent`):
  prompt text (and image) in, text out, with the server's token usage, retries and latency.
- `ExpertPolicy`: the environment's expert (`BatchEnv.expert_response`), for demonstrations; no
  answer (None) ends that episode where it stands.
- `RandomPolicy`: a uniformly random admissible action each turn, the chance reference point of
  `t2po.references`.

Text policies (`tokenizer = None`) return `Generation`s without token ids.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from t2po.engines.base import Engine, Generation, InterventionConfig, SamplingParams
from t2po.envs.base import BatchEnv, EnvState
from t2po.errors import InvalidInput

#: finish reasons of a text policy whose answer was no text at all (an invalid action)
NO_ANSWER = ("empty", "malformed")


@dataclass
class Turn:
    """One active episode's turn, as the loop hands it to the policy."""

    index: int  # the environment instance
    state: EnvState
    prompt: str  # env.render_prompt(...): the user message
    prompt_ids: list[int] | None = None  # the chat-templated prompt (token policies only)
    pixel_inputs: dict | None = None  # an image observation as the model's processor renders it


class Policy(Protocol):
    tokenizer: Any  # None for a text policy (the loop then renders no token ids)

    def act(self, turns: list[Turn], seed: int) -> list[Generation | None]:
        """One answer per turn, in order; `seed` is this call's sampler seed (`t2po.rollout.call_seed`).
        None: no answer, the episode ends before this turn."""


def text_generation(text: str, finish_reason: str = "stop", prompt_tokens: int = 0, **usage: Any) -> Generation:
    """A text policy's answer: the text, no token ids."""
    return Generation([], [], [], [], text, finish_reason, prompt_tokens=prompt_tokens, usage=usage)


class EnginePolicy:
    """A generation engine with fixed sampling and thinking-intervention settings."""

    def __init__(self, engine: Engine, sampling: SamplingParams,
                 intervention: InterventionConfig | None = None) -> None:
        self.engine = engine
        self.sampling = sampling
        self.intervention = intervention
        self.tokenizer = engine.tokenizer

    def act(self, turns: list[Turn], seed: int) -> list[Generation]:
        pixels = [t.pixel_inputs for t in turns]
        # `pixel_inputs` goes to the engine only when a prompt has an image, so text-only engines never see it
        images = {"pixel_inputs": pixels} if any(p is not None for p in pixels) else {}
        return self.engine.generate([t.prompt_ids for t in turns], dataclasses.replace(self.sampling, seed=seed),
                                    self.intervention, **images)


class EpisodeAbandoned(Exception):
    """The caller is stopping (`APIPolicy.stopping`); this episode is not recorded."""


class APIPolicy:
    """An `OpenAIChatAgent`: one request per turn (the prompt as the single user message). An empty
    or malformed answer is the empty response, i.e. an invalid action. `stopping()` true before a
    request abandons the episode (`EpisodeAbandoned`)."""

    tokenizer = None
    SEED_RANGE = 2**31 - 1  # request seeds kept in 32 bits, which every OpenAI-compatible server takes

    def __init__(self, agent: Any, stopping: Callable[[], bool] = lambda: False) -> None:
        self.agent = agent
        self.stopping = stopping

    def act(self, turns: list[Turn], seed: int) -> list[Generation]:
        out = []
        for t in turns:
            if self.stopping():
                raise EpisodeAbandoned
            reply = self.agent.respond(t.prompt, image=t.state.image, seed=seed % self.SEED_RANGE)
            out.append(text_generation(reply.text, reply.finish_reason, reply.prompt_tokens,
                                       completion_tokens=reply.completion_tokens,
                                       attempts=reply.attempts, retry_reasons=list(reply.retry_reasons),
                                       latency_s=reply.latency_s))
        return out


class ExpertPolicy:
    """The environment's expert (solver, walkthrough, oracle) as a policy: its demonstrations."""

    tokenizer = None

    def __init__(self, env: BatchEnv) -> None:
        if type(env).expert_response is BatchEnv.expert_response:
            raise InvalidInput(f"Environment {env.name!r} has no expert; use `t2po rft collect` with a model instead.")
        self.env = env

    def act(self, turns: list[Turn], seed: int) -> list[Generation | None]:
        # no move can still win (e.g. an unsolvable deal): the demonstration ends there
        return [None if (r := self.env.expert_response(t.index, t.state)) is None
                else text_generation(r) for t in turns]


class RandomPolicy:
    """A uniformly random admissible action every turn, in the `<think>...</think><action>...</action>`
    format: what "chance" means in an environment with a fixed action set (`t2po.references`)."""

    tokenizer = None

    def act(self, turns: list[Turn], seed: int) -> list[Generation]:
        rng = random.Random(seed)
        out = []
        for t in turns:
            actions = t.state.admissible_actions
            if not actions:
                raise ValueError("RandomPolicy needs an environment that lists its admissible actions.")
            out.append(text_generation(f"<think>random</think><action>{rng.choice(actions)}</action>"))
        return out
