"""TTI: the token-level thinking intervention (docs/method.md §2), for a batch of sequences decoded together.

Each row (sequence) has its own state; rows may start, think and finish at different steps.

- A row is *inside a think span* once its generated text ends with the start tag (`<think>`) and
  until it ends with the end tag (`</think>`). A prompt whose text, trailing whitespace aside, ends
  with the start tag (a template that pre-fills `<think>`) starts its row inside the span. A second
  start tag inside an open span does not restart the span (so it cannot extend the budget).
- Inside a span, M_t (docs/method.md §1) is compared with the previous step's: |M_t - M_{t-1}| <= eps for
  `patience` (K) consecutive comparisons is *stagnation*; the token sampled from these logits is then
  forced to be the first end-tag token (every other logit -inf) and the counter resets.
- Tolerance relative to the noise floor (`eps_floor`, issue 27): instead of the absolute eps, a step is
  stagnant when |M_t - M_{t-1}| <= eps_floor * floor_t, floor_t the median of |M_s - M_{s-1}| over the
  row's earlier think tokens (its noise floor: how much M moves from token to token when nothing in
  particular happens), and only once the row has shown K such changes. The absolute 1e-4 of the paper
  was set for a 4B model; a small model's M_t moves by far more from token to token (0.04 % of think
  tokens of SmolLM2-135M were within 1e-4 of the previous one), so the rule never fires there. The
  relative rule is scale-free (unchanged by any affine map of M) and means stagnation, not noise: with
  eps_floor 0.3 and K = 4 it fires on ~1 % of 20-token spans of white noise and of AR(1) noise (phi 0.5),
  and on every span where M stays within 0.3 x the floor for K tokens (tests/algos/test_stagnation.py).
  The median resists the flat stretch itself (a quantile of the recent changes would sink into it). The
  rule of issue 18 (<= 1 x the running std of M, 4 tokens) fired on 45 % of white-noise spans.
- Random truncation (`random_rate`, the control arm of issue 27): each think token, with probability
  `random_rate`, the end tag is forced the same way (cause "random"), whatever M_t does. Engines build it
  with the stagnation rule off (`make_intervention` with `control="random"`); draws come from `seed`.
- *Budget*: when the span already holds `budget` (B) tokens, the end tag is forced the same way.
- A multi-token end tag is forced token by token over the following steps; if the row had already
  written the beginning of the tag (e.g. `</` then `think`), only the missing tokens are forced.
  Then the model continues freely (it writes its action). Nothing else is ever injected and the
  end tag is never suppressed: the intervention cannot make a model think longer.
- M_t recorded for a forced step is computed from the unmodified logits.

Tokenization variants. Tags are matched on *decoded text* when `token_text` (the decoded string of
every vocabulary id) is given: with SmolLM2's tokenizer `<think>` is `< think >` alone, `Ġ< think >`
after a space, and `</think><action>` ends in a merged `><` token, so no fixed id sequence can detect
the tags, whereas the decoded text always contains them. `think_end_ids` (one tokenization) is what
gets forced. Without `token_text`, tags are matched on the exact id sequences given.

Engines use it from their own decoding loop: `start(prompts)`, then per step and row
`observe(row, m_t)` (returns the token to force, or None) and `advance(row, token_id)`
(`t2po.engines.hf`; the vLLM engine runs one single-row instance per request in its sampler).
"""

from __future__ import annotations

import bisect
import random
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field


from t2po.algos.uncertainty import CONFIDENCE_FORMS
from t2po.errors import out_of_range
from t2po.suggest import did_you_mean

TRIGGER_KINDS = ("budget", "stagnation", "random")
#: TTI or its control arm (`InterventionConfig.control`)
TTI_CONTROLS = ("none", "random")


def _setting(default, help: str):
    # the help text is read by `t2po train --help-config` (the config tree holds this class as rollout.tti)
    return field(default=default, metadata={"help": help})


@dataclass
class InterventionConfig:
    """Token-level thinking intervention (TTI, docs/method.md §2) and turn-score settings (docs/method.md §3), as the
    engines take them and as the config holds them (`rollout.tti.*`)."""

    enabled: bool | None = _setting(True,
            "Force the end of thinking (TTI). False: nothing is forced, but M_t and turn scores are still computed. In "
            "the config, null = on for t2po, off for the baselines (the algorithm's default).")
    think_start: str = _setting("<think>", "Tag that opens a think span.")
    think_end: str = _setting("</think>", "Tag that closes a think span; its tokens are what TTI forces.")
    patience: int | None = _setting(20,
            "Stagnation patience K: consecutive near-constant M_t steps before the end tag is "
            "forced (null = no stagnation rule).")
    eps: float = _setting(1e-4,
            "Stagnation threshold eps on |M_t - M_{t-1}| (the paper's; set for a 4B model, it never fires on a 135M "
            "one).")
    eps_floor: float | None = _setting(None, "Stagnation tolerance relative to the row's noise floor, instead of eps: "
                                             "a step is stagnant when |M_t - M_{t-1}| <= eps_floor x the median |M_s - "
                                             "M_{s-1}| of the row's earlier think tokens (once it has K of them); "
                                             "scale-free, fires on ~1 % of 20-token noise spans at 0.3 with K 4 "
                                             "(t2po.algos.intervention). null = the absolute eps (the paper's).")
    budget: int | None = _setting(None,
                                  "Think-token budget B (the reference's scripts: 450, t2po/configs/t2po-paper.yaml; "
                                        "t2po/configs/default.yaml: 28 of its 40-token responses); null = no budget.")
    alpha: float = _setting(0.6, "M_t mixing weight alpha (docs/method.md §1).")
    confidence: str = _setting("logprob", "conf_t in M_t: logprob (default) or prob.")
    control: str = _setting("none", "Control arm for TTI (issue 27): none = TTI's own rules; random = the stagnation "
                                    "rule is replaced by ending thinking at random think tokens, each with probability "
                                    "random_rate (the budget stays): TTI's rate of truncation without its uncertainty "
                                    "signal.")
    random_rate: float = _setting(0.0, "control=random: per-think-token probability of forcing the end tag. Set it to "
                                       "TTI's measured rate (stagnation triggers / think tokens of a T2PO run; "
                                       "benchmarks/ablation.py takes it from the same seed's t2po-calibrated run).")
    turn_score_skip: int = _setting(32,
            "The turn score skips this many leading response tokens (docs/method.md §3, reference: "
                                        "32 of 300-500 response tokens; t2po/configs/default.yaml and "
                                        "t2po/configs/t2po-paper.yaml use 4, the same "
                                        "share of their 40-token responses).")

    def check(self, prefix: str = "") -> list[str]:
        """One line per setting that cannot work (`prefix`: where the config holds it, e.g. "rollout.tti.")."""
        errors = out_of_range(f"{prefix}eps", self.eps, 0) + out_of_range(f"{prefix}alpha", self.alpha, 0, 1)
        errors += out_of_range(f"{prefix}turn_score_skip", self.turn_score_skip, 0)
        errors += [e for k in ("patience", "budget") if getattr(self, k) is not None
                   for e in out_of_range(f"{prefix}{k}", getattr(self, k), 1)]
        for key, value, choices in (("confidence", self.confidence, CONFIDENCE_FORMS),
                                    ("control", self.control, TTI_CONTROLS)):
            if value not in choices:
                errors.append(f"{prefix}{key}={value!r}: choose {' or '.join(choices)}{did_you_mean(value, choices)}")
        if self.control == "random" and not 0 < self.random_rate <= 1:
            errors.append(f"{prefix}random_rate={self.random_rate}: the random-truncation control needs a rate in "
                          "(0, 1] (TTI's stagnation triggers per think token of a T2PO run)")
        if self.eps_floor is not None and self.eps_floor <= 0:
            errors.append(f"{prefix}eps_floor={self.eps_floor}: must be > 0 (or null for the absolute {prefix}eps)")
        return errors


@dataclass
class ThinkRow:
    """The intervention's record of one row."""

    uncertainty: list[float] = field(default_factory=list)  # M_t of every generated token, unmodified logits
    forced: list[bool] = field(default_factory=list)  # per generated token: written by the intervention
    triggers: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TRIGGER_KINDS, 0))
    think_length: int = 0  # generated tokens emitted inside think spans (closing-tag tokens included)
    in_think: bool = False
    span_tokens: int = 0  # tokens in the current span (what the budget counts)
    previous_m: float | None = None  # M_{t-1} inside the current span
    stagnant_steps: int = 0  # consecutive comparisons with |M_t - M_{t-1}| <= eps
    # |M_t - M_{t-1}| of the row's think tokens so far, sorted (its noise floor is their median), for eps_floor
    think_changes: list[float] = field(default_factory=list)
    pending: list[int] = field(default_factory=list)  # end-tag tokens still to force, in order
    awaiting: int | None = None  # token the current step must emit (-1: free), None: no step observed
    tail: str | list[int] = ""  # last few decoded characters (or ids) for tag matching
    num_tokens: int = 0  # generated tokens advanced so far

    @property
    def forced_positions(self) -> list[int]:
        """Positions (in the response) of the tokens the intervention forced."""
        return [i for i, was_forced in enumerate(self.forced) if was_forced]


_FREE = -1  # `awaiting` value of a step whose token is sampled freely


class ThinkingIntervention:
    """Per-row TTI state machine (docs/method.md §2); see the module docstring for the rules.

    `patience=None` disables the stagnation rule and `budget=None` the budget rule; with both off
    the intervention only monitors (M_t traces, think lengths) and never forces anything. `eps_floor`
    (None: off) replaces the absolute `eps` by `eps_floor` times the row's noise floor (`stagnation_tolerance`).
    """

    def __init__(
        self,
        think_start_ids: Sequence[int],
        think_end_ids: Sequence[int],
        patience: int | None = 20,
        eps: float = 1e-4,
        budget: int | None = None,
        alpha: float = 0.6,
        confidence: str = "logprob",
        token_text: Sequence[str] | None = None,
        eps_floor: float | None = None,
        random_rate: float = 0.0,
        seed: int | None = None,
    ) -> None:
        self.think_start_ids = _check_ids(think_start_ids, "think_start_ids")
        self.think_end_ids = _check_ids(think_end_ids, "think_end_ids")
        if patience is not None and patience < 1:
            raise ValueError(f"patience (K) must be >= 1 or None (no stagnation rule), got {patience}")
        if budget is not None and budget < 0:
            raise ValueError(f"budget (B) must be >= 0 or None (no budget), got {budget}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if eps_floor is not None and not eps_floor > 0:
            raise ValueError(f"eps_floor must be > 0 or None (absolute eps), got {eps_floor}")
        if not 0.0 <= random_rate <= 1.0:
            raise ValueError(f"random_rate must lie in [0, 1], got {random_rate}")
        self.random_rate, self._random = random_rate, random.Random(seed)
        if confidence not in CONFIDENCE_FORMS:
            raise ValueError(f"confidence must be one of {CONFIDENCE_FORMS}, got {confidence!r}")
        self.patience, self.eps, self.budget, self.eps_floor = patience, eps, budget, eps_floor
        self.alpha, self.confidence = alpha, confidence
        self.token_text = token_text
        if token_text is not None:
            too_large = [i for i in (*self.think_start_ids, *self.think_end_ids) if i >= len(token_text)]
            if too_large:
                raise ValueError(f"tag token ids {too_large} are outside token_text (length {len(token_text)})")
        self._start_tag = self._text(self.think_start_ids)
        self._end_tag = self._text(self.think_end_ids)
        if not self._start_tag or not self._end_tag:
            raise ValueError("think_start_ids and think_end_ids must decode to non-empty text")
        if self._start_tag == self._end_tag:
            raise ValueError(f"the start and end tags must differ, both are {self._start_tag!r}")
        # _end_prefixes[k]: the text of the end tag's first k tokens (to complete a half-written tag).
        self._end_prefixes = [self._text(self.think_end_ids[:k]) for k in range(len(self.think_end_ids))]
        self._tail_keep = max(len(self._start_tag), len(self._end_tag)) - 1
        self.rows: list[ThinkRow] = []

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer,
        think_start: str = "<think>",
        think_end: str = "</think>",
        token_text: Sequence[str] | None = None,
        **options,
    ) -> ThinkingIntervention:
        """Tags given as text, tokenized with `tokenizer` (a Hugging Face tokenizer); matching on
        decoded text. Pass a precomputed `token_text` (see `vocabulary_text`) to skip decoding the
        vocabulary again."""
        return cls(
            tokenizer.encode(think_start, add_special_tokens=False),
            tokenizer.encode(think_end, add_special_tokens=False),
            token_text=token_text if token_text is not None else vocabulary_text(tokenizer),
            **options,
        )

    # -- per-row API (engines) -------------------------------------------------------------------

    def start(self, prompts: Sequence[Sequence[int]]) -> None:
        """Begin a batch with one row per prompt (token ids). Only the end of each prompt matters:
        a prompt ending with the start tag (trailing whitespace aside) opens its row's span."""
        self.rows = [self._new_row(prompt) for prompt in prompts]

    def observe(self, row: int, m_t: float) -> int | None:
        """Record M_t of `row`'s current logits and return the token this step must emit (the
        intervention forces it), or None when the model samples freely."""
        state = self.rows[row]
        if state.awaiting is not None:
            raise RuntimeError(f"row {row}: observe() called twice without advance() in between")
        state.uncertainty.append(m_t)
        forced = None
        if state.pending:
            forced = state.pending.pop(0)
        elif state.in_think:
            if state.previous_m is None:
                state.stagnant_steps = 0
            else:
                change = abs(m_t - state.previous_m)
                tolerance = self.eps if self.eps_floor is None else \
                    stagnation_tolerance(state.think_changes, self.eps_floor, self.patience)
                state.stagnant_steps = state.stagnant_steps + 1 if change <= tolerance else 0
                if self.eps_floor is not None:
                    bisect.insort(state.think_changes, change)
            state.previous_m = m_t
            cause = None
            if self.budget is not None and state.span_tokens >= self.budget:
                cause = "budget"
            elif self.patience is not None and state.stagnant_steps >= self.patience:
                cause = "stagnation"
            elif self.random_rate and self._random.random() < self.random_rate:
                cause = "random"  # the control arm: TTI's rate at random positions
            if cause is not None:
                state.triggers[cause] += 1
                state.stagnant_steps = 0
                forced, *state.pending = self._end_tag_completion(state.tail)
        state.forced.append(forced is not None)
        state.awaiting = _FREE if forced is None else forced
        return forced

    def advance(self, row: int, token_id: int) -> None:
        """Append the token `row` emitted at the step last observed and update its think-span state."""
        state = self.rows[row]
        if state.awaiting is None:
            raise RuntimeError(f"row {row}: advance() called without observe() for this step")
        if state.awaiting != _FREE and token_id != state.awaiting:
            raise RuntimeError(
                f"row {row}: the intervention forced token {state.awaiting} but {token_id} was emitted; "
                "something after the intervention (a logits processor or the sampler) overrode it"
            )
        state.awaiting = None
        state.num_tokens += 1
        if state.in_think:
            state.span_tokens += 1
            state.think_length += 1
        boundary = len(state.tail)
        window = state.tail + self._piece(token_id)
        start_end = _last_match_end(window, self._start_tag, boundary)
        end_end = _last_match_end(window, self._end_tag, boundary)
        if end_end > start_end and state.in_think:
            state.in_think = False
            state.span_tokens, state.stagnant_steps, state.previous_m = 0, 0, None
            state.pending = []
        elif start_end > end_end and not state.in_think:
            state.in_think = True
        state.tail = window[len(window) - self._tail_keep :] if self._tail_keep else window[:0]

    # -- internals ----------------------------------------------------------------------------

    def _piece(self, token_id: int) -> str | list[int]:
        if self.token_text is None:
            return [token_id]
        return self.token_text[token_id] if 0 <= token_id < len(self.token_text) else ""

    def _text(self, ids: Sequence[int]) -> str | list[int]:
        if self.token_text is None:
            return list(ids)
        return "".join(self.token_text[i] for i in ids)

    def _end_tag_completion(self, tail: str | list[int]) -> list[int]:
        """The end-tag tokens still missing after `tail` (all of them unless the row already wrote
        the tag's first tokens)."""
        for k in range(len(self.think_end_ids) - 1, 0, -1):
            if _ends_with(tail, self._end_prefixes[k]):
                return self.think_end_ids[k:]
        return list(self.think_end_ids)

    def _new_row(self, prompt: Sequence[int]) -> ThinkRow:
        state = ThinkRow(tail="" if self.token_text is not None else [])
        prompt = list(prompt)
        if self.token_text is None:
            state.in_think = _ends_with(prompt, self._start_tag)
            state.tail = prompt[len(prompt) - self._tail_keep :] if self._tail_keep else []
            return state
        # Decode backwards until the prompt's end (trailing whitespace aside) is long enough to hold the tag.
        text, count = "", 0
        while count < len(prompt) and len(text.rstrip()) < len(self._start_tag):
            count += 1
            text = self._piece(prompt[-count]) + text
        state.in_think = text.rstrip().endswith(self._start_tag)
        state.tail = text[len(text) - self._tail_keep :] if self._tail_keep else ""
        return state


def stagnation_tolerance(changes: Sequence[float], eps_floor: float, min_changes: int | None) -> float:
    """The relative stagnation tolerance (module docstring): `eps_floor` x the median of `changes` (the
    sorted |M_t - M_{t-1}| a row has shown), or -1 (nothing is stagnant) before `min_changes` of them."""
    n = len(changes)
    if n == 0 or n < (min_changes or 1):
        return -1.0
    median = changes[n // 2] if n % 2 else 0.5 * (changes[n // 2 - 1] + changes[n // 2])
    return eps_floor * median


def vocabulary_text(tokenizer) -> list[str]:
    """The decoded text of every id of `tokenizer` (special tokens included), for tag matching. Decoded once
    per tokenizer object (~0.5 s for a 49k vocabulary) and cached while it lives; again if tokens were added."""
    try:
        size, text = _VOCABULARY_TEXT.get(tokenizer, (None, None))
    except TypeError:  # a tokenizer that cannot be weakly referenced: decode every time
        return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    if size != len(tokenizer):
        text = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
        _VOCABULARY_TEXT[tokenizer] = (len(tokenizer), text)
    return text


_VOCABULARY_TEXT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _check_ids(ids: Sequence[int], name: str) -> list[int]:
    ids = list(ids)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{name} must be a non-empty list of token ids (ints >= 0), got {ids!r}")
    return ids


def _ends_with(sequence: str | list[int], suffix: str | list[int]) -> bool:
    return len(sequence) >= len(suffix) and sequence[len(sequence) - len(suffix) :] == suffix


def _last_match_end(window: str | list[int], tag: str | list[int], boundary: int) -> int:
    """End index of the last occurrence of `tag` in `window` that ends after `boundary` (i.e. that the
    newest token completed), or -1."""
    n = len(tag)
    for end in range(len(window), max(boundary, n - 1), -1):
        if window[end - n : end] == tag:
            return end
    return -1
