"""The generation-engine interface shared by every engine (transformers, vLLM, OpenAI-compatible APIs).

An engine turns a batch of prompt token ids into one `Generation` per row. Training samples use the
returned `token_ids` as-is (never re-tokenized from text); `logprobs`, `uncertainty` (M_t, docs/method.md §1),
`forced` (tokens written by the thinking intervention, docs/method.md §2) and `turn_score` (docs/method.md §3) come from
the same decoding pass.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from t2po.algos.intervention import InterventionConfig, ThinkingIntervention
from t2po.errors import out_of_range

__all__ = ["Engine", "Generation", "InterventionConfig", "SamplingParams", "check_request", "make_intervention"]


@dataclass
class SamplingParams:
    """Sampling settings of one generate call, and the config's `rollout.sampling` /
    `rollout.val_sampling` (fields without help text, `stop` and `seed`, are per call, not config)."""

    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0 = greedy)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling top-p."})
    top_k: int = field(default=0, metadata={"help": "Top-k (0 = off)."})
    max_new_tokens: int | None = field(default=256,
            metadata={"help": "Response token budget per turn (in rollout.val_sampling: null = the training budget)."})
    stop: list[str] = field(default_factory=list)  # stop strings; the stop string is kept in the response
    seed: int | None = None  # seeds the sampler for this call (same seed + same inputs = same output)

    def check(self, prefix: str = "", budget_may_be_null: bool = False) -> list[str]:
        """One line per setting that cannot work (`prefix`: where the config holds it, e.g.
        "rollout.sampling."; `budget_may_be_null`: max_new_tokens null means another section's budget)."""
        errors = out_of_range(f"{prefix}temperature", self.temperature,
                              0) + out_of_range(f"{prefix}top_k", self.top_k, 0)
        if not 0 < self.top_p <= 1:
            errors.append(f"{prefix}top_p={self.top_p}: must be in (0, 1]")
        if not (budget_may_be_null and self.max_new_tokens is None):
            errors += [e + (" (or null = the training budget)" if budget_may_be_null else "")
                       for e in out_of_range(f"{prefix}max_new_tokens", self.max_new_tokens, 1)]
        return errors


@dataclass
class Generation:
    """One sampled response, exactly as the engine produced it."""

    token_ids: list[int]
    logprobs: list[float]  # log pi(token) under the sampling distribution's logits before temperature
    uncertainty: list[float]  # M_t per generated token
    forced: list[bool]  # True where the intervention forced the token
    text: str  # decoded response (for parsing only)
    finish_reason: str  # "stop" (EOS or stop string), "length", or "cancelled" (the caller's should_stop)
    turn_score: float = math.nan  # Mbar over the configured window (docs/method.md §3)
    tti_triggers: dict[str, int] = field(default_factory=dict)  # {"budget": n, "stagnation": n, "random": n}
    think_length: int = 0  # tokens inside think spans
    prompt_tokens: int = 0
    # a text policy's accounting (API: completion tokens, attempts, retries, latency)
    usage: dict = field(default_factory=dict)
    cached_prompt_tokens: int = 0  # prompt tokens served from a prefix cache (not prefilled again)
    # per token, the k likeliest (HFEngine top_logprobs=k)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def check_request(prompts: list[list[int]], sampling: SamplingParams) -> None:
    """Reject a generation request that no engine can serve, with what to fix."""
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty; every prompt needs at least one token id")
        if not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"prompt {row} must be a list of int token ids (render it with the chat template first)")
    if sampling.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {sampling.temperature}")
    if not 0.0 < sampling.top_p <= 1.0:
        raise ValueError(f"top_p must lie in (0, 1], got {sampling.top_p}")
    if sampling.top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {sampling.top_k}")
    if sampling.max_new_tokens is None or sampling.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {sampling.max_new_tokens}")
    if any(not s for s in sampling.stop):
        raise ValueError("stop strings must be non-empty")


def make_intervention(config: InterventionConfig, tokenizer, token_text: Sequence[str],
                      seed: int | None = None) -> ThinkingIntervention:
    """The `ThinkingIntervention` of one generate call: tags tokenized with `tokenizer`, matched on
    `token_text` (the decoded vocabulary, `vocabulary_text`). A disabled config forces nothing
    (no patience, no budget) but still records M_t and think spans. The random-truncation control
    (`config.control == "random"`) replaces the stagnation rule by random ends drawn from `seed`."""
    random_control = config.enabled and config.control == "random"
    return ThinkingIntervention.from_tokenizer(
        tokenizer,
        config.think_start,
        config.think_end,
        token_text=token_text,
        random_rate=config.random_rate if random_control else 0.0,
        seed=seed,
        patience=config.patience if config.enabled and not random_control else None,
        eps=config.eps,
        eps_floor=config.eps_floor,
        budget=config.budget if config.enabled else None,
        alpha=config.alpha,
        confidence=config.confidence,
    )


class Engine(abc.ABC):
    """A batched generator. `tokenizer` is a Hugging Face tokenizer with a chat template.

    Engines are built by name with `t2po.engines.make_engine`, and by the trainer with `build`; what
    the trainer must know about one is stated in its registry entry (`t2po.engines.ENGINES`) and, for
    an engine from outside the package, in the two class attributes below: whether it samples from the
    trainer's own policy module (`shares_policy_weights`) or loads its own copy from a model folder and
    gets the weights through `sync_weights` after every update, and whether it reads images."""

    tokenizer: object
    shares_policy_weights: bool = False
    reads_images: bool = False

    @classmethod
    def build(cls, policy, tokenizer, settings, *, model_dir=None, seed: int = 0,
              distributed: bool = False) -> "Engine":
        """The engine a training run uses, built from its own settings: `settings` is the config's
        `rollout` section (an engine with options reads its own sub-section, vLLM `rollout.vllm`).
        `policy` is the policy module; an engine that does not share it starts from `model_dir` (a
        Hugging Face folder of the policy) and is given the policy's weights by `sync_weights`.
        `seed`: this process's sampling seed; `distributed`: launched with several processes."""
        return cls(policy, tokenizer)

    @abc.abstractmethod
    def generate(
        self,
        prompts: list[list[int]],
        sampling: SamplingParams,
        intervention: InterventionConfig | None = None,
        pixel_inputs: list[dict | None] | None = None,
    ) -> list[Generation]:
        """One `Generation` per prompt row, in order. `pixel_inputs`: per prompt, the pixel inputs of
        its image as the vision-language model's processor made them (`t2po.vlm`), or None; an
        engine that cannot read images raises ValueError when one is given."""

    def sync_weights(self, model: object) -> None:
        """Make the engine sample from `model`'s current weights (no-op when it shares the module)."""

    def close(self) -> None:
        """Release resources."""


def shared_prefix_length(prompts: list[list[int]]) -> int:
    """Tokens at the start of every prompt that are the same in all of them (the chat template's system
    turn, a task's instructions), leaving each prompt at least one token of its own (its last token's
    hidden state predicts the first response token); 0 for a single prompt or a common part too short
    to be worth a separate forward pass. The engine prefills that part once per call and the trainer
    runs it once per micro-batch."""
    if len(prompts) < 2:
        return 0
    limit = min(len(p) for p in prompts) - 1
    first = prompts[0]
    n = 0
    while n < limit and all(p[n] == first[n] for p in prompts):
        n += 1
    return n if n >= _MIN_SHARED_PREFIX else 0


_MIN_SHARED_PREFIX = 16  # below this the extra forward pass costs more than the tokens it saves
