"""Rollout-loop tests: a tiny random model playing Sokoban through the real engine and environment."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from t2po.algos import random_resample_mask, tds_resample_mask
from t2po.algos.sampling import TDSQuantileThreshold, TDSResampler
from t2po.engines.base import InterventionConfig, SamplingParams
from t2po.engines.hf import HFEngine
from t2po.envs import make_env
from t2po.policies import EnginePolicy
from t2po.rollout import (Episode, RolloutSettings, StepSample, StepTrace, TDSConfig, call_seed,
                          collect_rollouts, rollout_stats)


class RecordingEngine(HFEngine):
    """The real HF engine, recording every call (prompts and generations) for the assertions."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = []

    def generate(self, prompts, sampling, intervention=None):
        out = super().generate(prompts, sampling, intervention)
        self.calls.append(([list(p) for p in prompts], out))
        return out


@pytest.fixture()
def engine(tiny_model):
    model, tokenizer = tiny_model
    return RecordingEngine(model, tokenizer)


def _run(engine, tds=None, seed=0, max_steps=3):
    env = make_env("sokoban", dim_room=(5, 5), num_boxes=1, num_gen_steps=3, max_steps=max_steps)
    policy = EnginePolicy(engine, SamplingParams(max_new_tokens=10), InterventionConfig(turn_score_skip=0))
    return collect_rollouts(policy, env, [3, 4], RolloutSettings(group_size=2), seed=seed, resampler=TDSResampler(tds)
                            if tds else None)


def _steps(result):
    """Each step's training record and trace record as one namespace (the assertions read both)."""
    return [SimpleNamespace(**vars(s), **vars(t)) for s, t in zip(result.samples, result.traces, strict=True)]


def _split_calls(calls):
    """(full-batch calls, regeneration calls): a regeneration call re-sends a subset of the previous
    full call's prompts."""
    full, regen = [], []
    for prompts, gens in calls:
        if full and all(p in full[-1][0] for p in prompts):  # next-turn prompts differ: the history grew
            regen.append((prompts, gens))
        else:
            full.append((prompts, gens))
    return full, regen


def _separating_eta(tiny_model) -> tuple[float, set[int], object]:
    """An eta that TDS must act on: from a run without TDS, the second turns' |delta Mbar| (docs/method.md §3),
    and an eta between the 2nd and 3rd smallest, so that exactly two of the four second turns are
    flagged on the first try (the first two turns play the same with TDS on: turn 0 is never
    resampled). Returns (eta, the flagged trajectories, the run without TDS)."""
    off = _run(RecordingEngine(*tiny_model), None)
    score = {(s.traj_id, s.step): s.turn_score for s in off.samples}
    deltas = {t: abs(score[t, 1] - score[t, 0]) for t in range(4)}
    ordered = sorted(deltas.values())
    assert len(set(ordered)) == 4 and ordered[0] > 0, "distinct non-zero deltas, or the threshold cannot separate them"
    eta = (ordered[1] + ordered[2]) / 2
    return eta, {t for t, d in deltas.items() if d < eta}, off


def test_tds_regenerates_exactly_the_flagged_rows(engine, tiny_model):
    eta, flagged, off = _separating_eta(tiny_model)
    result = _run(engine, TDSConfig(eta=eta, max_try=2))
    _, regen = _split_calls(engine.calls)
    regenerated_rows = sum(len(p) for p, _ in regen)
    assert regenerated_rows > 0, "TDS regenerated nothing"
    assert regenerated_rows == sum(s.resampled for s in result.traces)
    assert result.stats.get("tds_regenerations", 0) == regenerated_rows
    assert all(s.resampled == 0 for s in _steps(result) if s.step == 0), "no previous turn: never resampled"
    assert {s.traj_id for s in _steps(result) if s.step == 1
            and s.resampled} == flagged, "second turns: exactly those with 0 < |delta| < eta"
    # against the run without TDS: same first turns, the flagged second turns replaced, the others kept
    plain = {(s.traj_id, s.step): s.response_ids for s in off.samples}
    assert off.stats.get("tds_regenerations", 0) == 0 and not any(s.resampled for s in off.traces)
    for s in result.samples:
        if s.step == 0 or (s.step == 1 and s.traj_id not in flagged):
            assert s.response_ids == plain[s.traj_id, s.step]
        elif s.step == 1:
            assert s.response_ids != plain[s.traj_id, s.step], "a flagged turn is answered by its regeneration"


def test_tds_flags_follow_the_rule(engine, tiny_model):
    """For each turn, the rows regenerated first are exactly those with 0 < |delta| < eta."""
    eta, _, _ = _separating_eta(tiny_model)
    result = _run(engine, TDSConfig(eta=eta, max_try=1))
    by_traj = {}
    for s in _steps(result):
        by_traj.setdefault(s.traj_id, []).append(s)
    # accepted turn scores in step order per trajectory, and the first-sample scores from the engine calls
    n_flagged = 0
    for samples in by_traj.values():
        n_flagged += sum(1 for cur in samples[1:] if cur.resampled)
    first_calls, _ = _split_calls(engine.calls)
    # recompute the expected flags from the first samples and the accepted previous scores
    expected = 0
    eligible = 0
    accepted_prev = {}
    for turn, (prompts, gens) in enumerate(first_calls):
        turn_samples = [s for s in result.samples if s.step == turn]
        assert len(turn_samples) == len(prompts)
        prev = [accepted_prev.get(s.traj_id, math.nan) for s in turn_samples]
        mask = tds_resample_mask(prev, [g.turn_score for g in gens], eta)
        expected += int(np.sum(mask))
        eligible += sum(not math.isnan(p) for p in prev)
        for s in turn_samples:
            accepted_prev[s.traj_id] = s.turn_score
    assert 0 < expected < eligible, "the rule must flag some eligible turns and keep others, or this test shows nothing"
    assert n_flagged == expected
    assert result.stats["tds_inband_before"] == pytest.approx(expected / eligible)


def test_random_resampling_control_redraws_as_many_turns_chosen_at_random(engine, tiny_model):
    """rollout.tds.control=random: at the second turn the rule flags 2 of the 4 eligible turns; the control
    redraws 2 turns too, the ones its seeded generator picks (not the rule's), and reports the rule's band."""
    eta, flagged, _ = _separating_eta(tiny_model)
    result = _run(engine, TDSConfig(eta=eta, max_try=1, control="random"))
    second = sorted((s for s in _steps(result) if s.step == 1), key=lambda s: s.traj_id)
    picked = {s.traj_id for s in second if s.resampled}
    rng = np.random.default_rng(call_seed(0, 1, 0))
    expected = set(np.flatnonzero(random_resample_mask(np.isin(np.arange(4), list(flagged)),
                                                       np.ones(4, dtype=bool), rng)))
    assert expected != flagged, "the control's draw equals the rule's choice here: this test would show nothing"
    assert picked == expected and len(picked) == len(flagged)
    assert {s.traj_id for s in second if s.tds_in_band[0]} == flagged


def test_recorded_ids_are_the_engines_ids_and_rollouts_are_deterministic(engine, tiny_model):
    result = _run(engine, None)
    produced = [list(g.token_ids) for _, gens in engine.calls for g in gens]
    recorded = [s.response_ids for s in sorted(result.samples, key=lambda s: (s.step, s.traj_id))]
    assert recorded == produced
    again = _run(RecordingEngine(*tiny_model), None)
    assert [s.response_ids for s in again.samples] == [s.response_ids for s in result.samples]
    other = _run(RecordingEngine(*tiny_model), None, seed=1)
    assert [s.response_ids for s in other.samples] != [s.response_ids for s in result.samples]


def test_invalid_outputs_are_penalised_not_fatal(engine):
    result = _run(engine, None)
    # a random tiny model almost never writes the strict format
    invalid = [s for s in _steps(result) if not s.valid]
    assert invalid, "expected invalid actions from a random model"
    for s in invalid:
        assert s.reward == pytest.approx(s.env_reward - 0.1)
        assert s.invalid_reason
    assert 0 < result.stats["invalid_action_rate"] <= 1
    assert len(result.episodes) == 4


class ScriptedAgent:
    """An `OpenAIChatAgent` stand-in: answers each prompt text from a script, recording the requests."""

    def __init__(self, script: dict[str, str]):
        self.script = script
        self.requests = []

    def respond(self, prompt, image=None, seed=None):
        from t2po.engines.openai_api import APIReply

        self.requests.append((prompt, seed))
        text = self.script[prompt]
        return APIReply(text, prompt_tokens=7, completion_tokens=3, finish_reason="stop" if text
                        else "empty", attempts=1)


def test_api_policy_plays_by_the_training_loops_rules(engine):
    """The same texts answered by an API model give the same episodes as the engine's: one loop
    (prompts, parsing, invalid-action penalty, episode end, turn limit) for every policy."""
    from t2po.policies import APIPolicy
    from t2po.rollout import call_seed

    env = make_env("sokoban", dim_room=(5, 5), num_boxes=1, num_gen_steps=3, max_steps=3)
    local = collect_rollouts(EnginePolicy(engine, SamplingParams(max_new_tokens=10), InterventionConfig()), env, [3, 4],
                             RolloutSettings(invalid_action_penalty=0.25), seed=5)
    script = {s.prompt_text: s.response_text for s in local.traces}
    assert len(script) == len(local.samples) and any(not s.valid for s in local.samples)
    agent = ScriptedAgent(script)
    api = collect_rollouts(APIPolicy(agent), env, [3, 4], RolloutSettings(invalid_action_penalty=0.25), seed=5)
    for a, b in zip(local.episodes, api.episodes, strict=True):
        assert a.observations == b.observations and a.won == b.won and a.total_reward == b.total_reward
        assert [(t.action, s.valid, s.reward) for s, t in zip(a.samples, a.traces)] == [
            (t.action, s.valid, s.reward) for s, t in zip(b.samples, b.traces)]
    assert all(s.prompt_text in engine.tokenizer.decode(s.prompt_ids)
               for s in _steps(local)), "the user message of the engine's chat prompt"
    assert agent.requests[0] == (local.traces[0].prompt_text, call_seed(5, 0, 0) % (2**31 - 1))
    assert all(s.usage["completion_tokens"] == 3 and s.prompt_ids == [] for s in _steps(api))


def test_stats_count_responses_cut_at_the_token_limit_and_the_length_range():
    """verl's response_length/clip_ratio: the fraction of responses that ended at max_new_tokens."""
    def sample(n_tokens: int) -> StepSample:
        return StepSample(prompt_ids=[1], response_ids=[2] * n_tokens, forced_mask=[False] * n_tokens,
                          rollout_logprobs=[0.0] * n_tokens,
                          reward=0.0, env_reward=0.0, done=False, valid=True, anchor_obs="o", group_id=0,
                          traj_id=0, step=0,
                          turn_score=0.0)

    samples = [sample(3), sample(8), sample(5), sample(8)]
    traces = [StepTrace("", "", finish_reason=finish) for finish in ("stop", "length", "stop", "length")]
    episode = Episode(traj_id=0, group_id=0, seed=0, samples=samples, traces=traces, won=False,
                      total_reward=0.0, truncated=True,
                      metrics={}, observations=[])
    stats = rollout_stats([episode])
    assert stats["clip_ratio"] == 0.5
    assert (stats["response_length_min"], stats["response_length"], stats["response_length_max"]) == (3.0, 6.0, 8.0)


def _step(step, delta, resampled=0, think=0, in_band=(False, False), kept=math.nan, discarded=()):
    """(training record, trace record) of one step."""
    return (StepSample(prompt_ids=[1], response_ids=[2] * 5, forced_mask=[False] * 5,
                       rollout_logprobs=[0.0] * 5, reward=0.0,
                       env_reward=0.0, done=False, valid=True, anchor_obs="", group_id=0, traj_id=0,
                       step=step, turn_score=0.5),
            StepTrace(response_text="", action="", resampled=resampled, tds_delta=delta, think_length=think,
                      tds_in_band=in_band,
                      tds_kept_delta=kept, discarded=[{"tds_delta": d} for d in discarded]))


def test_exploration_diagnostics_by_hand():
    """Flag rate over eligible turns (not all steps), the in-band share of eligible turns before and after
    resampling, |delta| of kept vs discarded samples, delta percentiles (numpy linear), think p90, extra-token
    fraction."""
    steps = [_step(0, math.nan, think=0),
             _step(1, 0.1, resampled=1, think=10, in_band=(True, False), kept=0.4, discarded=[0.1]),
             _step(1, 0.5, think=20, kept=0.5),
             _step(2, 0.2, resampled=2, think=30, in_band=(True, True), kept=0.25, discarded=[0.2, 0.15])]
    episode = Episode(traj_id=0, group_id=0, seed=0, samples=[s for s, _ in steps],
                      traces=[t for _, t in steps], won=False,
                      total_reward=0.0, truncated=True, metrics={}, observations=[])
    stats = rollout_stats([episode], {"generated_tokens": 200, "tds_extra_tokens": 50, "tds_eligible_turns": 3})
    assert stats["tds_flag_rate"] == pytest.approx(2 / 3)  # 2 of the 3 eligible turns (the first turn is not)
    assert stats["tds_inband_before"] == pytest.approx(2 / 3) and stats["tds_inband_after"] == pytest.approx(1 / 3)
    # kept of the 2 regenerated
    assert (stats["tds_kept_delta_mean"], stats["tds_kept_delta_p50"]) == pytest.approx((0.325, 0.325))
    # 0.1, 0.2, 0.15
    assert (stats["tds_discarded_delta_mean"], stats["tds_discarded_delta_p50"]) == pytest.approx((0.15, 0.15))
    assert "tds_regen_flag_rate" not in stats
    # sorted deltas [0.1, 0.2, 0.5]: p10 at position 0.2 -> 0.12, p50 0.2, p90 at 1.8 -> 0.2 + 0.8 * 0.3
    assert (stats["tds_delta_p10"], stats["tds_delta_p50"], stats["tds_delta_p90"]) == pytest.approx((0.12, 0.2, 0.44))
    assert stats["think_length"] == 15 and stats["think_length_p90"] == pytest.approx(27.0)
    assert stats["tds_extra_token_fraction"] == 0.25


def test_relative_tds_threshold_flags_the_quantile_of_the_first_eligible_turn(engine):
    """With a quantile threshold, a batch's own deltas enter the window first: of the 4 eligible
    second turns (distinct deltas) exactly 2 lie below the median and are regenerated."""
    threshold = TDSQuantileThreshold(0.5, window=64)
    result = collect_rollouts(EnginePolicy(engine, SamplingParams(max_new_tokens=10),
                                           InterventionConfig(turn_score_skip=0)),
                              make_env("sokoban", dim_room=(5, 5), num_boxes=1, num_gen_steps=3, max_steps=3), [3, 4],
                              RolloutSettings(group_size=2),
                              resampler=TDSResampler(TDSConfig(quantile=0.5, max_try=1), threshold))
    second = [s for s in _steps(result) if s.step == 1]
    assert len(second) == 4 and len({s.tds_delta for s in second}) == 4
    assert sum(s.resampled for s in second) == 2
    assert all(s.resampled == (s.tds_delta < np.median([x.tds_delta for x in second])) for s in second)
    eligible = [s for s in result.traces if math.isfinite(s.tds_delta)]
    assert len(threshold.deltas) == len(eligible) == result.stats["tds_eligible_turns"]
    assert result.stats["tds_flag_rate"] == pytest.approx(sum(s.resampled > 0 for s in eligible) / len(eligible))
