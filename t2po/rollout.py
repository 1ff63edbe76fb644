"""The multi-turn rollout loop: environments x policy, with TTI inside decoding and TDS between
decoding and stepping (docs/method.md §2-§4). Training, validation, `t2po eval`, the warm-up's demonstrations
and `t2po rft collect` all play through it, whatever answers the turns (`t2po.policies`: a
token-level engine, an API model, an environment's expert).

For B tasks x N group members: reset, then per turn the phases render -> act -> drop unanswered ->
resample -> step and record, then the episodes. The resampling phase is TDS (training only: an object
passed in, `t2po.algos.sampling.TDSResampler`, that regenerates only the flagged rows, in one batch, at
most `max_try` times, and keeps the last sample). Every environment step becomes one
`StepSample`, what training reads (a token-level policy's sample carries the exact token ids the engine
produced), and one `StepTrace` beside it, what people read (texts, action, TDS and TTI diagnostics,
timings). An observation with an image (an environment in image mode) is rendered by the
vision-language model's processor (`t2po.vlm`); the step sample then also carries the prompt's pixel
inputs, exactly those the engine saw. `episode_trace` (t2po.traces) writes an episode for people to read.

    from t2po.rollout import RolloutSettings, collect_rollouts
    policy = EnginePolicy(engine, SamplingParams(max_new_tokens=64), InterventionConfig())
    result = collect_rollouts(policy, env, [0, 1], RolloutSettings(group_size=4), resampler=TDSResampler(TDSConfig()))
    result = collect_rollouts(APIPolicy(agent), env, [7], RolloutSettings(), seed=7)
    result.stats["success_rate"], result.samples[0].response_ids, result.traces[0].response_text
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from t2po.algos import TDSConfig, tds_diagnostics, turn_score_deltas
from t2po.algos.sampling import TDSResampler, TurnResample
from t2po.engines.base import Generation
from t2po.envs.base import BatchEnv, EnvState
from t2po.policies import NO_ANSWER, Policy, Turn

#: reward subtracted for a step whose response parses to no valid action (the config's default)
INVALID_ACTION_PENALTY = 0.1


@dataclass
class StepSample:
    """One environment step as the trainer and the advantage estimators read it (one training sample).
    What people read of the step is its `StepTrace`, kept beside it (`Episode.traces`)."""

    prompt_ids: list[int]  # the chat-templated prompt (token-level policies; [] for text policies)
    response_ids: list[int]  # exactly as the engine sampled them ([] for text policies)
    forced_mask: list[bool]  # tokens forced by TTI
    rollout_logprobs: list[float]
    reward: float  # environment reward minus the invalid-action penalty
    env_reward: float
    done: bool
    valid: bool
    anchor_obs: str
    group_id: int
    traj_id: int
    step: int
    turn_score: float
    penalty: float = 0.0  # the invalid-action penalty subtracted in `reward` (0 for a valid action)
    pixel_inputs: dict | None = None  # the image as the model's processor gave it to the engine (t2po.vlm)

    @property
    def response_length(self) -> int:
        return len(self.response_ids)

    @property
    def forced_tokens(self) -> int:
        return sum(self.forced_mask)


@dataclass
class StepTrace:
    """What people (traces, `t2po eval`, the demonstrations of `t2po sft`) and the rollout statistics read
    of one environment step, beside its `StepSample`; never trained on."""

    response_text: str
    action: str
    invalid_reason: str = ""
    resampled: int = 0  # TDS regenerations of this turn
    tds_delta: float = math.nan  # |Mbar - previous accepted Mbar| of this turn's first sample (NaN: first turn)
    tds_kept_delta: float = math.nan  # the same for the sample kept (the last redraw of a regenerated turn)
    tds_in_band: tuple[bool, bool] = (False, False)  # (first sample, kept sample) in the TDS band (TDS on, eligible)
    tti_triggers: dict[str, int] = field(default_factory=dict)
    think_length: int = 0
    image: Any = None  # the observation's PIL image (image observations), else None
    prompt_text: str = ""  # the user message (env.render_prompt), before any chat template
    finish_reason: str = ""  # the engine's: "stop" or "length" (cut at rollout.max_new_tokens)
    usage: dict = field(default_factory=dict)  # a text policy's accounting (API: completion tokens, attempts, ...)
    # the responses TDS generated for this turn and then replaced (docs/method.md §3), oldest first: kept for the
    # traces only, never trained on ({"text", "token_ids", "turn_score", "forced", "tds_delta"})
    discarded: list[dict] = field(default_factory=list)
    # wall-clock (start, end) in ns of the turn's generation call, TDS redraws and environment step (traces)
    timing: dict[str, Any] = field(default_factory=dict)

    @property
    def discarded_deltas(self) -> list[float]:
        """|delta Mbar| of the samples TDS discarded for this turn."""
        return [d["tds_delta"] for d in self.discarded]


def step_stats(sample: StepSample, trace: StepTrace) -> "StepStats":
    """The few numbers `rollout_stats` reads of one step."""
    return StepStats(sample.valid, sample.response_length, sample.forced_tokens, trace.finish_reason,
                     dict(trace.tti_triggers),
                     trace.think_length, trace.tds_delta, trace.resampled, trace.tds_kept_delta, trace.tds_in_band,
                     trace.discarded_deltas)


@dataclass
class StepStats:
    """What `rollout_stats` reads of a step: a few numbers, so that ranks gather these, not the samples."""

    valid: bool
    response_length: int
    forced_tokens: int
    finish_reason: str
    tti_triggers: dict[str, int]
    think_length: int
    tds_delta: float
    resampled: int
    tds_kept_delta: float
    tds_in_band: tuple[bool, bool]
    discarded_deltas: list[float]


@dataclass
class EpisodeStats:
    """What `rollout_stats` reads of an episode (`Episode.stats()`)."""

    won: bool
    total_reward: float
    length: int
    metrics: dict[str, Any]
    samples: list[StepStats]


@dataclass
class Episode:
    traj_id: int
    group_id: int
    seed: int
    samples: list[StepSample]  # what the trainer reads of each step
    traces: list[StepTrace]  # what people read of each step, one per sample
    won: bool
    total_reward: float
    truncated: bool
    metrics: dict[str, Any]
    observations: list[str]  # observation before each step, then the final one

    @property
    def length(self) -> int:
        return len(self.samples)

    def stats(self) -> EpisodeStats:
        return EpisodeStats(self.won, self.total_reward, self.length, dict(self.metrics),
                            [step_stats(s, t) for s, t in zip(self.samples, self.traces)])


@dataclass
class RolloutResult:
    samples: list[StepSample]  # every episode's, in episode order
    traces: list[StepTrace]  # beside `samples`
    episodes: list[Episode]
    stats: dict[str, float]


def build_prompt_ids(tokenizer: Any, text: str, max_prompt_tokens: int | None = None) -> tuple[list[int], bool]:
    """Render one user message with the model's chat template; cut from the left past the limit.
    Returns (ids, truncated). The same function builds SFT and RL prompts, so both see identical tokens."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    ids = list(ids)
    if max_prompt_tokens is not None and len(ids) > max_prompt_tokens:
        return ids[-max_prompt_tokens:], True
    return ids, False


def build_prompt(tokenizer: Any, text: str, image: Any = None, max_prompt_tokens: int | None = None) -> tuple[list[int],
        dict | None, bool]:
    """(ids, pixel inputs, truncated) of one user message: `build_prompt_ids` for text, or with an
    image the vision-language model's processor (`t2po.vlm.build_image_prompt`, never truncated)."""
    if image is None:
        ids, cut = build_prompt_ids(tokenizer, text, max_prompt_tokens)
        return ids, None, cut
    from t2po.vlm import build_image_prompt

    ids, pixels = build_image_prompt(tokenizer, text, image, max_prompt_tokens)
    return ids, pixels, False


def call_seed(seed: int, turn: int, attempt: int) -> int:
    """The sampler seed of one policy call: distinct and reproducible per (rollout seed, turn, TDS
    attempt). Servers that honour a request's seed then repeat their answers."""
    return (seed * 1_000_003 + turn * 1_009 + attempt * 7 + 1) % (2**63 - 1)


@dataclass
class RolloutSettings:
    """How a batch of episodes is played (training and validation fill it from the config's `rollout`)."""

    group_size: int = 1  # episodes per task seed (the GRPO/GiGPO group)
    max_turns: int | None = None  # None: the environment's max_steps
    # subtracted from a step whose action is invalid (docs/method.md §4)
    invalid_action_penalty: float = INVALID_ACTION_PENALTY
    max_prompt_tokens: int | None = None  # prompts are cut from the left past this


def collect_rollouts(policy: Policy, env: BatchEnv, task_seeds: list[int], settings: RolloutSettings, *, seed: int = 0,
                     resampler: TDSResampler | None = None, progress: Any = None) -> RolloutResult:
    """Play `len(task_seeds) * settings.group_size` episodes to the end (or `settings.max_turns`).
    `policy` answers the turns (`t2po.policies`: `EnginePolicy(engine, sampling, intervention)`, an API
    model, an expert); `resampler` is TDS (`t2po.algos.sampling.TDSResampler`, training only);
    `progress` (a `t2po.progress.Progress` over the episodes) advances as episodes finish."""
    tokenizer = policy.tokenizer
    if resampler is not None and tokenizer is None:
        raise ValueError("TDS (docs/method.md §3) needs turn scores, which only a token-level policy (an engine) gives")
    play = _Play(env, [s for s in task_seeds for _ in range(settings.group_size)], settings.group_size)
    counters: dict[str, float] = defaultdict(float)
    if resampler is not None:
        resampler.begin()
    max_turns = settings.max_turns or env.max_steps
    for turn in range(max_turns):
        turns = play.render(tokenizer, settings.max_prompt_tokens, counters)
        if not turns:
            break
        started = time.time_ns()
        answers: list[Generation | None] = policy.act(turns, call_seed(seed, turn, 0))
        timing = {"generate": (started, time.time_ns())}
        turns, gens = play.drop_unanswered(turns, answers)
        if not turns:
            break
        _count_generation(counters, gens, turns if tokenizer is not None else None)
        prev = [play.prev_score[t.index] for t in turns]
        first_deltas = turn_score_deltas(prev, [g.turn_score for g in gens])

        redrawn: list[list[tuple[int, int]]] = [[] for _ in gens]  # per row, the calls that redrew its answer

        def regenerate(rows, attempt: int, turns=turns, turn=turn, redrawn=redrawn) -> list[Generation]:
            started = time.time_ns()
            regen = policy.act([turns[j] for j in rows], call_seed(seed, turn, attempt))
            for j in rows:  # one entry per entry of the row's discarded responses
                redrawn[j].append((started, time.time_ns()))
            _count_generation(counters, regen)
            return regen

        if resampler is not None:  # the random-resampling control draws its rows from call_seed(seed, turn, 0)
            tds = resampler.resample(prev, gens, regenerate, call_seed(seed, turn, 0))
        else:
            tds = TurnResample.none(len(gens))
        finished = play.step_and_record(turns, gens, prev, first_deltas, tds, turn, settings.invalid_action_penalty,
                                        tokenizer is None, timing, redrawn)
        if progress is not None:
            progress.update(finished, note=f"turn {turn + 1}/{max_turns}")
    if progress is not None and sum(play.active):
        progress.update(sum(play.active), note="turn limit")  # the episodes that max_turns cut short
    for key, value in (resampler.counters if resampler is not None else {}).items():
        counters[key] += value
    episodes = play.episodes()
    return RolloutResult(samples=[x for ep in episodes for x in ep.samples],
                         traces=[x for ep in episodes for x in ep.traces],
                         episodes=episodes, stats=rollout_stats(episodes, counters))


def _count_generation(counters: dict[str, float], gens: list[Generation], turns: list[Turn] | None = None) -> None:
    """Tokens generated and prefilled; with `turns` (a token-level policy's first answers) also the
    turn's distinct prompt tokens (an image prompt counts as distinct)."""
    counters["generated_tokens"] += sum(g.num_tokens for g in gens)
    if turns is not None:
        counters["prefill_tokens"] += sum(g.prompt_tokens - g.cached_prompt_tokens for g in gens)
        distinct = {(tuple(t.prompt_ids), j if t.pixel_inputs is not None else -1) for j, t in enumerate(turns)}
        counters["unique_prompt_tokens"] += sum(len(ids) for ids, _ in distinct)


class _Play:
    """The state of a batch of episodes between the loop's phases: environment states, histories,
    recorded steps, the previous accepted turn score (TDS) and which episodes are still running."""

    def __init__(self, env: BatchEnv, seeds: list[int], group_size: int) -> None:
        self.env, self.seeds, n = env, seeds, len(seeds)
        self.group_ids = [k // group_size for k in range(n)]
        self.states: list[EnvState] = env.reset(seeds)
        self.observations: list[list[str]] = [[st.observation] for st in self.states]
        self.histories: list[list[tuple[str, str]]] = [[] for _ in range(n)]
        self.samples: list[list[StepSample]] = [[] for _ in range(n)]
        self.traces: list[list[StepTrace]] = [[] for _ in range(n)]
        self.prev_score = [math.nan] * n  # turn score of the accepted previous turn (docs/method.md §3)
        self.active = [not st.done for st in self.states]

    def render(self, tokenizer: Any, max_prompt_tokens: int | None, counters: dict[str, float]) -> list[Turn]:
        """The running episodes' prompts: the environment's text, and for a token-level policy its ids
        (the chat template, or the VLM processor for an image) and pixel inputs."""
        turns = []
        for i in (i for i, running in enumerate(self.active) if running):
            text = self.env.render_prompt(i, self.histories[i], self.states[i])
            if tokenizer is None:
                turns.append(Turn(i, self.states[i], text))
                continue
            ids, pixel_inputs, cut = build_prompt(tokenizer, text, self.states[i].image, max_prompt_tokens)
            turns.append(Turn(i, self.states[i], text, ids, pixel_inputs))
            counters["prompts_truncated"] += cut
            counters["prompt_tokens"] += len(ids)
        return turns

    def drop_unanswered(self, turns: list[Turn], answers: list[Generation | None]) -> tuple[list[Turn],
                                                                                            list[Generation]]:
        """No answer (None) ends that episode here, unstepped."""
        for t, g in zip(turns, answers):
            self.active[t.index] = self.active[t.index] and g is not None
        return [t for t, g in zip(turns, answers) if g is not None], [g for g in answers if g is not None]

    def step_and_record(self, turns: list[Turn], gens: list[Generation], prev: list[float], first_deltas: np.ndarray,
                        tds: TurnResample, turn: int, penalty: float, text_policy: bool, timing: dict[str, Any],
                        redrawn: list[list[tuple[int, int]]]) -> int:
        """Parse each answer, step the environments, record one `StepSample` per step (with the wall-clock
        times of the turn's generation, TDS redraws and environment step); returns how many episodes ended."""
        env, states = self.env, self.states
        actions: list[str | None] = [None] * len(states)
        parsed_of = {t.index: env.parse_action(g.text, states[t.index]) for t, g in zip(turns, gens)}
        for i, parsed in parsed_of.items():
            actions[i] = parsed.action
        started = time.time_ns()
        new_states = env.step(actions)
        timing = {**timing, "env_step": (started, time.time_ns())}
        kept_deltas = turn_score_deltas(prev, [g.turn_score for g in gens])
        for j, (t, g) in enumerate(zip(turns, gens)):
            i, parsed, new = t.index, parsed_of[t.index], new_states[t.index]
            assert new is not None, f"{env.name}.step returned None for active instance {i}"
            self.samples[i].append(StepSample(
                prompt_ids=t.prompt_ids or [], response_ids=list(g.token_ids), forced_mask=list(g.forced),
                rollout_logprobs=list(g.logprobs), reward=float(new.reward) - (0.0 if parsed.valid else penalty),
                env_reward=float(new.reward), penalty=0.0 if parsed.valid else penalty, done=bool(new.done),
                valid=parsed.valid, anchor_obs=states[i].anchor_obs or states[i].observation,
                                              group_id=self.group_ids[i],
                traj_id=i, step=turn, turn_score=g.turn_score, pixel_inputs=t.pixel_inputs))
            self.traces[i].append(StepTrace(
                response_text=g.text, action=parsed.action,
                invalid_reason=f"{g.finish_reason} answer" if g.finish_reason in NO_ANSWER else parsed.reason,
                resampled=tds.resampled[j], tds_delta=float(first_deltas[j]), tds_kept_delta=float(kept_deltas[j]),
                tds_in_band=tds.in_band[j], tti_triggers=dict(g.tti_triggers), think_length=g.think_length,
                image=states[i].image, prompt_text=t.prompt, finish_reason=g.finish_reason,
                usage={"prompt_tokens": g.prompt_tokens, **g.usage} if text_policy else {}, discarded=tds.discarded[j],
                timing={**timing, "tds": redrawn[j]}))
            self.histories[i].append((states[i].observation, parsed.action))
            self.prev_score[i] = g.turn_score
            states[i] = new
            self.observations[i].append(new.observation)
            self.active[i] = self.active[i] and not new.done
        return sum(new_states[t.index].done for t in turns)

    def episodes(self) -> list[Episode]:
        out = []
        for i, s in enumerate(self.samples):
            out.append(Episode(traj_id=i, group_id=self.group_ids[i], seed=self.seeds[i], samples=s,
                               traces=self.traces[i],
                               won=bool(self.states[i].won),
                               total_reward=float(sum(x.reward for x in s)), truncated=bool(s) and not s[-1].done,
                               metrics=self.env.episode_metrics(i, self.states[i]) if s else {},
                               observations=self.observations[i]))
        return out


# Statistics counted while playing (not derivable from the episodes): summed when batches are merged.
COUNTERS = ("generated_tokens", "tds_extra_tokens", "tds_regenerations", "tds_eligible_turns", "prompts_truncated",
            "prompt_tokens",
            "prefill_tokens", "unique_prompt_tokens")


def rollout_stats(episodes: list[Episode] | list[EpisodeStats],
                  counters: dict[str, float] | None = None) -> dict[str, float]:
    """Episode metrics, with the evidence of what T2PO's exploration control did (docs/method.md §2-§3):

    - TTI: `tti_budget_triggers`, `tti_stagnation_triggers`, `forced_tokens`, `think_length` (mean
      tokens inside think spans per turn) and `think_length_p90`;
    - TDS: `tds_flag_rate` = turns regenerated / eligible turns (a second or later turn whose first
      sample has a turn score); `tds_delta_p10/p50/p90` = percentiles of |Mbar(k) - Mbar(k-1)| of
      the first samples (also without TDS: what a threshold would see); what TDS changed
      (`t2po.algos.tds_diagnostics`): the in-band share of eligible turns before and after resampling,
      |delta Mbar| of the kept vs the discarded samples of regenerated turns; `tds_extra_token_fraction`
      = tokens of discarded samples / all generated tokens. (A "regenerated samples flagged again" rate
      says nothing about selection: a fresh i.i.d. draw lands in the band with the band's own probability.)
    """
    counters = counters or {}
    episodes = [ep.stats() if isinstance(ep, Episode) else ep for ep in episodes]
    samples = [x for ep in episodes for x in ep.samples]
    deltas = np.array([x.tds_delta for x in samples if math.isfinite(x.tds_delta)])
    stats: dict[str, float] = {
        "episodes": float(len(episodes)),
        "success_rate": float(np.mean([ep.won for ep in episodes])) if episodes else 0.0,
        "episode_reward": float(np.mean([ep.total_reward for ep in episodes])) if episodes else 0.0,
        "episode_length": float(np.mean([ep.length for ep in episodes])) if episodes else 0.0,
        "invalid_action_rate": float(np.mean([not x.valid for x in samples])) if samples else 0.0,
        "steps": float(len(samples)),
        "response_tokens": float(sum(x.response_length for x in samples)),
        "response_length": float(np.mean([x.response_length for x in samples])) if samples else 0.0,
        "response_length_min": float(min(x.response_length for x in samples)) if samples else 0.0,
        "response_length_max": float(max(x.response_length for x in samples)) if samples else 0.0,
        # responses cut at the token limit (verl's response_length/clip_ratio)
        "clip_ratio": float(np.mean([x.finish_reason == "length" for x in samples])) if samples else 0.0,
        "tti_budget_triggers": float(sum(x.tti_triggers.get("budget", 0) for x in samples)),
        "tti_stagnation_triggers": float(sum(x.tti_triggers.get("stagnation", 0) for x in samples)),
        "tti_random_triggers": float(sum(x.tti_triggers.get("random", 0) for x in samples)),  # the control arm
        "think_length": float(np.mean([x.think_length for x in samples])) if samples else 0.0,
        "think_length_p90": float(np.percentile([x.think_length for x in samples], 90)) if samples else 0.0,
        "forced_tokens": float(sum(x.forced_tokens for x in samples)),
        "tds_flag_rate": float(sum(x.resampled > 0 for x in samples)) / max(deltas.size, 1),
    }
    if deltas.size:
        for q in (10, 50, 90):
            stats[f"tds_delta_p{q}"] = float(np.percentile(deltas, q))
    if "tds_eligible_turns" in counters:  # TDS was on
        eligible = [x for x in samples if math.isfinite(x.tds_delta)]
        stats.update(tds_diagnostics([x.tds_in_band[0] for x in eligible], [x.tds_in_band[1] for x in eligible],
                                     [x.tds_kept_delta for x in eligible if x.resampled],
                                     [d for x in eligible for d in x.discarded_deltas]))
    for key in COUNTERS:
        if key in counters:
            stats[key] = float(counters[key])
    if counters.get("generated_tokens") and "tds_extra_tokens" in counters:
        stats["tds_extra_token_fraction"] = counters["tds_extra_tokens"] / counters["generated_tokens"]
    # numeric task metrics (e.g. score), averaged over finished episodes
    numeric: dict[str, list[float]] = defaultdict(list)
    for ep in episodes:
        for k, v in ep.metrics.items():
            if isinstance(v, (int, float, bool)) and not isinstance(v, str):
                numeric[k].append(float(v))
    for k, vals in numeric.items():
        stats.setdefault(f"env/{k}", float(np.mean(vals)))
    # success per category (task type, data source, ...): string-valued task metrics
    by_category: dict[str, list[bool]] = defaultdict(list)
    for ep in episodes:
        for k, v in ep.metrics.items():
            if isinstance(v, str):
                by_category[f"success/{k}/{v}"].append(ep.won)
    for k, wins in sorted(by_category.items()):
        stats[k] = float(np.mean(wins))
    return stats
