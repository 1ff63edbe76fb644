"""The multi-turn rollout loop: environments x policy, with TTI inside decoding and TDS between
decoding and stepping (spec §2-§4). Training, validation, `t2po eval`, the warm-up's demonstrations
and `t2po rft collect` all play through it, whatever answers the turns (`t2po.policies`: a
token-level engine, an API model, an environment's expert).

For B tasks x N group members: reset, then per turn: build prompts for the active instances, answer
them in one batch, apply TDS (training only: regenerate only the flagged rows, in one batch, at most
`max_try` times, keep the last sample), parse, step, record. Every environment step becomes one
`StepSample`; a token-level policy's sample carries the exact token ids the engine produced. An
observation with an image (an environment in image mode) is rendered by the vision-language model's
processor (`t2po.vlm`); the step sample then also carries the prompt's pixel inputs, exactly those
the engine saw. `episode_trace` (t2po.tracking) writes an episode for people to read.

    from t2po.rollout import collect_rollouts, TDSConfig
    result = collect_rollouts(engine, env, task_seeds=[0, 1], group_size=4,
                              sampling=SamplingParams(max_new_tokens=64), intervention=InterventionConfig())
    result = collect_rollouts(APIPolicy(agent), env, task_seeds=[7], group_size=1, seed=7)
    result.stats["success_rate"], result.samples[0].response_ids
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from t2po.algos import (TDSConfig, TDSQuantileThreshold, random_resample_mask, tds_diagnostics, tds_resample_mask,
                        turn_score_deltas)
from t2po.engines.base import Engine, Generation, InterventionConfig, SamplingParams
from t2po.envs.base import BatchEnv, EnvState
from t2po.policies import NO_ANSWER, EnginePolicy, Policy, Turn

#: reward subtracted for a step whose response parses to no valid action (the config's default)
INVALID_ACTION_PENALTY = 0.1


@dataclass
class StepSample:
    """One environment step = one training sample."""

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
    pixel_inputs: dict | None = None  # the image as the model's processor gave it to the engine (t2po.vlm)
    prompt_text: str = ""  # the user message (env.render_prompt), before any chat template
    finish_reason: str = ""  # the engine's: "stop" or "length" (cut at rollout.max_new_tokens)
    usage: dict = field(default_factory=dict)  # a text policy's accounting (API: completion tokens, attempts, ...)
    # the responses TDS generated for this turn and then replaced (spec §3), oldest first: kept for the
    # traces only, never trained on ({"text", "token_ids", "turn_score", "forced"})
    discarded: list[dict] = field(default_factory=list)


@dataclass
class Episode:
    traj_id: int
    group_id: int
    seed: int
    samples: list[StepSample]
    won: bool
    total_reward: float
    truncated: bool
    metrics: dict[str, Any]
    observations: list[str]  # observation before each step, then the final one

    @property
    def length(self) -> int:
        return len(self.samples)


@dataclass
class RolloutResult:
    samples: list[StepSample]
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


def build_prompt(tokenizer: Any, text: str, image: Any = None, max_prompt_tokens: int | None = None) -> tuple[list[int], dict | None, bool]:
    """(ids, pixel inputs, truncated) of one user message: `build_prompt_ids` for text, or with an
    image the vision-language model's processor (`t2po.vlm.build_image_prompt`, never truncated)."""
    if image is None:
        ids, cut = build_prompt_ids(tokenizer, text, max_prompt_tokens)
        return ids, None, cut
    from t2po.vlm import build_image_prompt

    ids, pixels = build_image_prompt(tokenizer, text, image, max_prompt_tokens)
    return ids, pixels, False


def _discarded(g: Generation, prev: float) -> dict:
    return {"text": g.text, "token_ids": list(g.token_ids), "turn_score": g.turn_score, "forced": list(g.forced),
            "tds_delta": float(turn_score_deltas([prev], [g.turn_score])[0])}


def call_seed(seed: int, turn: int, attempt: int) -> int:
    """The sampler seed of one policy call: distinct and reproducible per (rollout seed, turn, TDS
    attempt). Servers that honour a request's seed then repeat their answers."""
    return (seed * 1_000_003 + turn * 1_009 + attempt * 7 + 1) % (2**63 - 1)


def collect_rollouts(
    policy: Policy | Engine,
    env: BatchEnv,
    task_seeds: list[int],
    group_size: int,
    sampling: SamplingParams | None = None,
    intervention: InterventionConfig | None = None,
    tds: TDSConfig | None = None,
    max_turns: int | None = None,
    invalid_action_penalty: float = INVALID_ACTION_PENALTY,
    max_prompt_tokens: int | None = None,
    seed: int = 0,
    progress: Any = None,
    tds_threshold: TDSQuantileThreshold | None = None,
) -> RolloutResult:
    """Play `len(task_seeds) * group_size` episodes to the end (or `max_turns`). `policy` is a
    `t2po.policies.Policy`, or an engine played with `sampling` and `intervention` (`EnginePolicy`).
    `progress` (a `t2po.progress.Progress` over the episodes) is advanced as episodes finish, once per turn.

    With a relative TDS threshold (`tds.quantile`), `tds_threshold` carries the window of recent
    deltas across calls (the trainer keeps one per run); without it each call starts an empty one."""
    if isinstance(policy, Engine):
        if sampling is None:
            raise ValueError("collect_rollouts(engine, ...) needs the sampling parameters (sampling=SamplingParams(...))")
        policy = EnginePolicy(policy, sampling, intervention)
    tokenizer = policy.tokenizer
    if tds is not None and tokenizer is None:
        raise ValueError("TDS (spec §3) needs turn scores, which only a token-level policy (an engine) gives")
    if tds is not None and tds.enabled and tds.quantile is not None and tds_threshold is None:
        tds_threshold = TDSQuantileThreshold(tds.quantile, tds.window)
    seeds = [s for s in task_seeds for _ in range(group_size)]
    group_ids = [g for g in range(len(task_seeds)) for _ in range(group_size)]
    n = len(seeds)
    states: list[EnvState] = env.reset(seeds)
    observations: list[list[str]] = [[st.observation] for st in states]
    histories: list[list[tuple[str, str]]] = [[] for _ in range(n)]
    samples_of: list[list[StepSample]] = [[] for _ in range(n)]
    prev_score = [math.nan] * n  # turn score of the accepted previous turn (spec §3)
    active = [not st.done for st in states]
    max_turns = max_turns or env.max_steps
    counters: dict[str, float] = defaultdict(float)

    for turn in range(max_turns):
        idx = [i for i in range(n) if active[i]]
        if not idx:
            break
        turns = []
        for i in idx:
            text = env.render_prompt(i, histories[i], states[i])
            if tokenizer is None:
                turns.append(Turn(i, states[i], text))
                continue
            ids, pixel_inputs, cut = build_prompt(tokenizer, text, states[i].image, max_prompt_tokens)
            turns.append(Turn(i, states[i], text, ids, pixel_inputs))
            counters["prompts_truncated"] += cut
            counters["prompt_tokens"] += len(ids)
        answers: list[Generation | None] = policy.act(turns, call_seed(seed, turn, 0))
        if any(g is None for g in answers):  # no answer: that episode ends here, unstepped
            for t, g in zip(turns, answers):
                active[t.index] = active[t.index] and g is not None
            turns = [t for t, g in zip(turns, answers) if g is not None]
            if not turns:
                break
        gens: list[Generation] = [g for g in answers if g is not None]
        idx = [t.index for t in turns]
        counters["generated_tokens"] += sum(g.num_tokens for g in gens)
        if tokenizer is not None:  # prompt tokens prefilled vs the turn's distinct prompts (an image prompt counts as distinct)
            counters["prefill_tokens"] += sum(g.prompt_tokens - g.cached_prompt_tokens for g in gens)
            distinct = {(tuple(t.prompt_ids), j if t.pixel_inputs is not None else -1) for j, t in enumerate(turns)}
            counters["unique_prompt_tokens"] += sum(len(ids) for ids, _ in distinct)
        resampled = [0] * len(idx)
        prev = [prev_score[i] for i in idx]
        first_deltas = turn_score_deltas(prev, [g.turn_score for g in gens])
        discarded: list[list[dict]] = [[] for _ in idx]
        in_band = np.zeros((len(idx), 2), dtype=bool)  # (first sample, kept sample) in the band
        if tds is not None and tds.enabled:
            counters["tds_eligible_turns"] += int(np.isfinite(first_deltas).sum())
            counters["tds_extra_tokens"] += 0  # present (0) in an iteration where nothing is flagged
            if tds_threshold is not None:
                tds_threshold.observe(first_deltas)
            eta = tds.eta if tds_threshold is None else tds_threshold.eta()
            in_band[:, 0] = tds_resample_mask(prev, [g.turn_score for g in gens], eta)
            control = np.random.default_rng(call_seed(seed, turn, 0)) if tds.control == "random" else None
            if control is not None:  # the random-resampling control: as many eligible turns, chosen at random
                flagged = np.flatnonzero(random_resample_mask(in_band[:, 0], np.isfinite(first_deltas), control))
            else:
                flagged = np.flatnonzero(in_band[:, 0])
            for attempt in range(1, tds.max_try + 1):
                if flagged.size == 0:
                    break
                regen = policy.act([turns[j] for j in flagged], call_seed(seed, turn, attempt))
                for j, g in zip(flagged, regen):
                    counters["tds_extra_tokens"] += gens[j].num_tokens  # the discarded sample's tokens
                    discarded[j].append(_discarded(gens[j], prev[j]))
                    counters["generated_tokens"] += g.num_tokens
                    counters["prefill_tokens"] += g.prompt_tokens - g.cached_prompt_tokens
                    gens[j] = g
                    resampled[j] += 1
                counters["tds_regenerations"] += flagged.size
                again = tds_resample_mask([prev[j] for j in flagged], [g.turn_score for g in regen], eta)
                if control is not None:  # the control redraws as many of them, at random
                    again = random_resample_mask(again, np.ones(flagged.size, dtype=bool), control)
                flagged = flagged[again]
            in_band[:, 1] = tds_resample_mask(prev, [g.turn_score for g in gens], eta)
        kept_deltas = turn_score_deltas(prev, [g.turn_score for g in gens])
        actions: list[str | None] = [None] * n
        parsed_of = {}
        for j, i in enumerate(idx):
            parsed = env.parse_action(gens[j].text, states[i])
            parsed_of[i] = parsed
            actions[i] = parsed.action
        new_states = env.step(actions)
        for j, i in enumerate(idx):
            g, parsed, new, t = gens[j], parsed_of[i], new_states[i], turns[j]
            assert new is not None, f"{env.name}.step returned None for active instance {i}"
            samples_of[i].append(
                StepSample(
                    prompt_ids=t.prompt_ids or [],
                    response_ids=list(g.token_ids),
                    forced_mask=list(g.forced),
                    rollout_logprobs=list(g.logprobs),
                    reward=float(new.reward) - (0.0 if parsed.valid else invalid_action_penalty),
                    env_reward=float(new.reward),
                    done=bool(new.done),
                    valid=parsed.valid,
                    anchor_obs=states[i].anchor_obs or states[i].observation,
                    group_id=group_ids[i],
                    traj_id=i,
                    step=turn,
                    turn_score=g.turn_score,
                    response_text=g.text,
                    action=parsed.action,
                    invalid_reason=f"{g.finish_reason} answer" if g.finish_reason in NO_ANSWER else parsed.reason,
                    resampled=resampled[j],
                    tds_delta=float(first_deltas[j]),
                    tds_kept_delta=float(kept_deltas[j]),
                    tds_in_band=(bool(in_band[j, 0]), bool(in_band[j, 1])),
                    tti_triggers=dict(g.tti_triggers),
                    think_length=g.think_length,
                    image=states[i].image,
                    pixel_inputs=t.pixel_inputs,
                    prompt_text=t.prompt,
                    finish_reason=g.finish_reason,
                    usage={"prompt_tokens": g.prompt_tokens, **g.usage} if tokenizer is None else {},
                    discarded=discarded[j],
                )
            )
            histories[i].append((states[i].observation, parsed.action))
            prev_score[i] = g.turn_score
            states[i] = new
            observations[i].append(new.observation)
            if new.done:
                active[i] = False
        if progress is not None:
            progress.update(sum(new_states[i].done for i in idx), note=f"turn {turn + 1}/{max_turns}")

    if progress is not None and sum(active):
        progress.update(sum(active), note="turn limit")  # the episodes that max_turns cut short
    episodes = []
    for i in range(n):
        s = samples_of[i]
        metrics = env.episode_metrics(i, states[i]) if s else {}
        episodes.append(
            Episode(
                traj_id=i,
                group_id=group_ids[i],
                seed=seeds[i],
                samples=s,
                won=bool(states[i].won),
                total_reward=float(sum(x.reward for x in s)),
                truncated=bool(s) and not s[-1].done,
                metrics=metrics,
                observations=observations[i],
            )
        )
    samples = [x for ep in episodes for x in ep.samples]
    return RolloutResult(samples=samples, episodes=episodes, stats=rollout_stats(episodes, counters))


# Statistics counted while playing (not derivable from the episodes): summed when batches are merged.
COUNTERS = ("generated_tokens", "tds_extra_tokens", "tds_regenerations", "tds_eligible_turns", "prompts_truncated", "prompt_tokens",
            "prefill_tokens", "unique_prompt_tokens")


def rollout_stats(episodes: list[Episode], counters: dict[str, float] | None = None) -> dict[str, float]:
    """Episode metrics, with the evidence of what T2PO's exploration control did (spec §2-§3):

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
    samples = [x for ep in episodes for x in ep.samples]
    deltas = np.array([x.tds_delta for x in samples if math.isfinite(x.tds_delta)])
    stats: dict[str, float] = {
        "episodes": float(len(episodes)),
        "success_rate": float(np.mean([ep.won for ep in episodes])) if episodes else 0.0,
        "episode_reward": float(np.mean([ep.total_reward for ep in episodes])) if episodes else 0.0,
        "episode_length": float(np.mean([ep.length for ep in episodes])) if episodes else 0.0,
        "invalid_action_rate": float(np.mean([not x.valid for x in samples])) if samples else 0.0,
        "steps": float(len(samples)),
        "response_tokens": float(sum(len(x.response_ids) for x in samples)),
        "response_length": float(np.mean([len(x.response_ids) for x in samples])) if samples else 0.0,
        "response_length_min": float(min(len(x.response_ids) for x in samples)) if samples else 0.0,
        "response_length_max": float(max(len(x.response_ids) for x in samples)) if samples else 0.0,
        # responses cut at the token limit (verl's response_length/clip_ratio)
        "clip_ratio": float(np.mean([x.finish_reason == "length" for x in samples])) if samples else 0.0,
        "tti_budget_triggers": float(sum(x.tti_triggers.get("budget", 0) for x in samples)),
        "tti_stagnation_triggers": float(sum(x.tti_triggers.get("stagnation", 0) for x in samples)),
        "tti_random_triggers": float(sum(x.tti_triggers.get("random", 0) for x in samples)),  # the control arm
        "think_length": float(np.mean([x.think_length for x in samples])) if samples else 0.0,
        "think_length_p90": float(np.percentile([x.think_length for x in samples], 90)) if samples else 0.0,
        "forced_tokens": float(sum(sum(x.forced_mask) for x in samples)),
        "tds_flag_rate": float(sum(x.resampled > 0 for x in samples)) / max(deltas.size, 1),
    }
    if deltas.size:
        for q in (10, 50, 90):
            stats[f"tds_delta_p{q}"] = float(np.percentile(deltas, q))
    if "tds_eligible_turns" in counters:  # TDS was on
        eligible = [x for x in samples if math.isfinite(x.tds_delta)]
        stats.update(tds_diagnostics([x.tds_in_band[0] for x in eligible], [x.tds_in_band[1] for x in eligible],
                                     [x.tds_kept_delta for x in eligible if x.resampled],
                                     [d["tds_delta"] for x in eligible for d in x.discarded]))
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
