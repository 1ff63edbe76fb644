"""HFEngine on the tiny model: recorded tokens/log-probs/M_t match a teacher-forced pass, seeding,
stop strings, early-finishing rows leaving the batch, and the thinking intervention's forced tokens."""

import math

import pytest
import torch

from t2po.algos.uncertainty import turn_score, uncertainty_signal
from t2po.engines.base import InterventionConfig, SamplingParams
from t2po.engines.base import shared_prefix_length
from t2po.engines.hf import HFEngine, sample_tokens


def chat(tokenizer, text, prefill=""):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)["input_ids"]
    return ids + tokenizer.encode(prefill, add_special_tokens=False)


@pytest.fixture(scope="module")
def engine(tiny_model):
    model, tokenizer = tiny_model
    return HFEngine(model, tokenizer)


@pytest.fixture(scope="module")
def prompts(tiny_model):
    _, tokenizer = tiny_model
    # different lengths, so that left padding matters
    return [chat(tokenizer, "Push the box up."), chat(tokenizer, "hi"), chat(tokenizer, "Grid:\n#####\n#_@$#\n#####")]


def teacher_forced(model, prompt, response):
    """Log-probs of `response` and M_t per response token from one unpadded forward pass."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(1, torch.tensor(response)[:, None]).squeeze(1), uncertainty_signal(logits)


def test_recorded_tokens_logprobs_and_m_match_teacher_forcing(engine, prompts, tiny_model):
    model, _ = tiny_model
    stop = engine.tokenizer.decode([65])  # a single-character stop string so that some rows end early
    gens = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=16, seed=3, stop=[stop]))
    assert len(gens) == 3
    for prompt, gen in zip(prompts, gens):
        logp, m = teacher_forced(model, prompt, gen.token_ids)
        assert torch.allclose(torch.tensor(gen.logprobs), logp, atol=1e-4)
        assert torch.allclose(torch.tensor(gen.uncertainty), m, atol=1e-4)
        assert gen.prompt_tokens == len(prompt)
        assert len(gen.forced) == len(gen.uncertainty) == gen.num_tokens and not any(gen.forced)
        assert gen.turn_score == pytest.approx(turn_score(gen.uncertainty, skip=32))


def test_same_seed_same_output_and_seed_matters(engine, prompts):
    sampling = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_new_tokens=12, seed=7)
    first, second = engine.generate(prompts, sampling), engine.generate(prompts, sampling)
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    assert [g.logprobs for g in first] == [g.logprobs for g in second]
    other = engine.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12, seed=8))
    assert [g.token_ids for g in first] != [g.token_ids for g in other]


def test_top_k_one_and_tiny_top_p_are_greedy(engine, prompts):
    greedy = engine.generate(prompts, SamplingParams(temperature=0, max_new_tokens=8))
    top_k = engine.generate(prompts, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=8, seed=1))
    top_p = engine.generate(prompts, SamplingParams(temperature=1.0, top_p=1e-6, max_new_tokens=8, seed=2))
    assert [g.token_ids for g in greedy] == [g.token_ids for g in top_k] == [g.token_ids for g in top_p]
    assert all(g.finish_reason == "length" and g.num_tokens == 8 for g in greedy)


def test_stop_string_ends_the_row_and_finished_rows_leave_the_batch(engine, prompts, tiny_model):
    model, tokenizer = tiny_model
    sampling = SamplingParams(temperature=1.0, max_new_tokens=20, seed=5)
    ids = engine.generate(prompts, sampling)[0].token_ids
    # stop string: a printable ASCII token that row 0 emits early on (so at least one row stops early)
    pieces = [tokenizer.decode([i]).strip() for i in ids]
    stop = next(p for p in pieces[1:] if p and p.isascii() and p.isprintable())
    sampling.stop = [stop]
    batch_sizes = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: batch_sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        gens = engine.generate(prompts, sampling)
    finally:
        hook.remove()
    for gen in gens:
        text = tokenizer.decode(gen.token_ids, skip_special_tokens=True)
        if gen.finish_reason == "stop":  # the stop string is completed by the row's last token, and kept
            assert stop in text and stop not in tokenizer.decode(gen.token_ids[:-1], skip_special_tokens=True)
            assert gen.text.endswith(stop) and gen.text.count(stop) == 1
        else:
            assert gen.finish_reason == "length" and gen.num_tokens == 20 and stop not in text
    lengths = [g.num_tokens for g in gens]
    assert min(lengths) < 20
    # the prompts were prefilled by the previous call (same weights): no prefill forward this time,
    # and finished rows leave the forward batch: one forward per further step, sized by live rows
    assert all(g.cached_prompt_tokens == g.prompt_tokens for g in gens)
    assert batch_sizes == [sum(n > step for n in lengths) for step in range(1, max(lengths))]


def test_eos_ends_a_row_and_is_kept(tiny_model, prompts):
    model, tokenizer = tiny_model
    engine = HFEngine(model, tokenizer)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=4)
    reference = engine.generate(prompts[:1], sampling)[0].token_ids
    engine.eos_token_ids = {reference[4]}
    gen = engine.generate(prompts[:1], sampling)[0]
    first = reference.index(reference[4])
    assert gen.token_ids == reference[: first + 1] and gen.finish_reason == "stop"


def test_budget_forces_end_tag_at_the_right_positions(engine, tiny_model):
    _, tokenizer = tiny_model
    end_ids = tokenizer.encode("</think>", add_special_tokens=False)
    assert len(end_ids) > 1  # the tiny tokenizer splits the tag, as SmolLM2's does
    thinking = chat(tokenizer, "Push the box up.", prefill="<think>")  # template pre-fills the start tag
    plain = chat(tokenizer, "Push the box down.")
    config = InterventionConfig(budget=4, patience=1000)
    gens = engine.generate([thinking, plain], SamplingParams(temperature=0, max_new_tokens=12), config)
    think, other = gens
    # greedy tiny model never writes a partial end tag within 4 tokens here, so the whole tag is forced
    assert think.forced == [False] * 4 + [True] * len(end_ids) + [False] * (12 - 4 - len(end_ids))
    assert think.token_ids[4 : 4 + len(end_ids)] == end_ids
    assert "</think>" in think.text
    assert think.tti_triggers == {"budget": 1, "stagnation": 0, "random": 0}
    assert think.think_length == 4 + len(end_ids)
    assert not any(other.forced) and other.think_length == 0 and other.tti_triggers == {"budget": 0,
                                                                                        "stagnation": 0, "random": 0}
    # the forced tokens' log-probs are the model's own (raw logits), not 0
    assert all(lp < -1e-3 for lp in (think.logprobs[i] for i in range(4, 4 + len(end_ids))))
    logp, _ = teacher_forced(tiny_model[0], thinking, think.token_ids)
    assert torch.allclose(torch.tensor(think.logprobs), logp, atol=1e-4)
    # disabled: nothing forced, but M_t, turn score and the think length are still recorded
    disabled = InterventionConfig(enabled=False, budget=4)
    free = engine.generate([thinking], SamplingParams(temperature=0, max_new_tokens=12), disabled)[0]
    assert not any(free.forced) and free.think_length == 12 and not math.isnan(free.turn_score)
    assert free.token_ids[:4] == think.token_ids[:4]


def test_stagnation_trigger_with_loose_eps(engine, tiny_model):
    _, tokenizer = tiny_model
    thinking = chat(tokenizer, "Push the box up.", prefill="<think>\n")
    # eps = 10 makes every comparison stagnant: K = 3 comparisons happen at steps 1..3 -> forced at step 3
    config = InterventionConfig(patience=3, eps=10.0)
    gen = engine.generate([thinking], SamplingParams(temperature=0, max_new_tokens=10), config)[0]
    assert gen.tti_triggers["stagnation"] >= 1 and gen.forced[3]
    assert not any(gen.forced[:3])


def test_random_truncation_control_replaces_the_stagnation_rule(engine, tiny_model):
    """rollout.tti.control=random: the loose eps that makes every step stagnant forces nothing; with rate 1 the
    end tag is forced at the first think token, counted as "random"."""
    _, tokenizer = tiny_model
    thinking = chat(tokenizer, "Push the box up.", prefill="<think>\n")
    sampling = SamplingParams(temperature=0, max_new_tokens=10, seed=3)
    never = engine.generate([thinking], sampling,
                            InterventionConfig(patience=3, eps=10.0, control="random", random_rate=1e-9))[0]
    assert not any(never.forced) and never.tti_triggers["stagnation"] == 0
    always = engine.generate([thinking], sampling,
                             InterventionConfig(patience=3, eps=10.0, control="random", random_rate=1.0))[0]
    assert always.forced[0] and always.tti_triggers["random"] == 1 and always.tti_triggers["stagnation"] == 0


def test_monitoring_off_samples_the_same_tokens(tiny_model, prompts, engine):
    model, tokenizer = tiny_model
    sampling = SamplingParams(temperature=1.0, max_new_tokens=10, seed=11)
    bare = HFEngine(model, tokenizer, monitor_uncertainty=False)
    monitored, unmonitored = engine.generate(prompts, sampling), bare.generate(prompts, sampling)
    assert [g.token_ids for g in monitored] == [g.token_ids for g in unmonitored]
    assert all(math.isnan(g.turn_score) and all(math.isnan(m) for m in g.uncertainty) for g in unmonitored)
    with pytest.raises(ValueError, match="monitor_uncertainty"):
        bare.generate(prompts, sampling, InterventionConfig(enabled=True))


def test_bad_requests_are_rejected(engine):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[1, 2], []], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        engine.generate([[1, 2]], SamplingParams(temperature=-1))
    with pytest.raises(ValueError, match="top_p"):
        engine.generate([[1, 2]], SamplingParams(top_p=0))
    assert engine.generate([], SamplingParams()) == []


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 12, 1.0), (1.3, 0, 0.8), (0.9, 20, 0.7)])
def test_sampler_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    """The inverse-CDF sampler against transformers' own warpers (`transformers.generation.logits_process`:
    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, applied in that order as `generate` does):
    tokens outside the kept set are never drawn, and every token's frequency over 40,000 seeded draws
    lies within 5 standard errors of its reference probability."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(0)) * 2.0
    reference = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        reference = TopKLogitsWarper(top_k)(None, reference)
    if top_p < 1.0:
        reference = TopPLogitsWarper(top_p)(None, reference)
    probs = torch.softmax(reference, dim=-1)[0].double()
    draws = 40_000
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    # the engine's path at temperature 1 without filters passes exp(log-probs), shared with M_t (issue 27)
    shared = torch.log_softmax(logits, dim=-1).exp().expand(draws, -1) if (temperature, top_k, top_p) == (1.0,
            0, 1.0) else None
    tokens = sample_tokens(logits.expand(draws, -1), sampling, torch.Generator().manual_seed(1), shared)
    freq = torch.bincount(tokens, minlength=40).double() / draws
    assert freq[probs == 0].sum() == 0
    bound = 5 * (probs * (1 - probs) / draws).sqrt() + 1e-9
    assert ((freq - probs).abs() <= bound).all(), (freq - probs).abs().max()
    # seedable: the same generator seed gives the same draws, another seed others
    again = sample_tokens(logits.expand(draws, -1), sampling, torch.Generator().manual_seed(1))
    other = sample_tokens(logits.expand(draws, -1), sampling, torch.Generator().manual_seed(2))
    assert torch.equal(tokens, again) and not torch.equal(tokens, other)


def test_one_prefill_per_distinct_prompt_and_cached_prefill_matches_a_full_one(tiny_model, prompts):
    """Group members with the same prompt share one prefill, the beginning all prompts share (the chat
    template's system turn) is prefilled once, a later call of the same prompts (a TDS regeneration)
    prefills nothing, and the logits decoded from re-assembled cached K/V equal those of an unpadded
    full forward pass (teacher forcing) within fp tolerance; a weight update drops the store."""
    model, tokenizer = tiny_model
    engine = HFEngine(model, tokenizer)
    a, b, c = prompts
    prefill_rows = []
    hook = model.register_forward_pre_hook(
        lambda module, args, kwargs: prefill_rows.append(kwargs["input_ids"].shape[0])
                                           if kwargs["input_ids"].shape[1] > 1 else None,
        with_kwargs=True,
    )
    try:
        batch = [a, b, a, c, a]
        shared = shared_prefix_length([a, b, c])
        assert shared >= 16 and a[:shared] == b[:shared] == c[:shared] and a[shared] != b[shared]  # the system turn
        gens = engine.generate(batch, SamplingParams(temperature=1.0, max_new_tokens=8, seed=4))
        assert prefill_rows == [1, 3]  # the shared beginning once, then a, b, c once each
        assert [g.cached_prompt_tokens for g in gens] == [0, shared, len(a), shared, len(a)]
        regen = engine.generate([c, a], SamplingParams(temperature=1.0, max_new_tokens=8, seed=5))
        assert prefill_rows == [1, 3] and [g.cached_prompt_tokens for g in regen] == [len(c), len(a)]
        with torch.no_grad():
            next(model.parameters()).mul_(1.0)  # an in-place update (the optimizer's kind), same values
        again = engine.generate([a], SamplingParams(temperature=1.0, max_new_tokens=4, seed=5))
        assert prefill_rows == [1, 3, 1] and again[0].cached_prompt_tokens == 0
    finally:
        hook.remove()
    for prompt, gen in [*zip(batch, gens), *zip([c, a], regen)]:
        logp, m = teacher_forced(model, prompt, gen.token_ids)
        assert torch.allclose(torch.tensor(gen.logprobs), logp, atol=1e-4)
        assert torch.allclose(torch.tensor(gen.uncertainty), m, atol=1e-4)


def test_shared_prefix_length():
    assert shared_prefix_length([list(range(40)), list(range(30)) + [99] * 5]) == 30
    assert shared_prefix_length([list(range(40)), list(range(40))]) == 39  # each prompt keeps a token of its own
    assert shared_prefix_length([list(range(40))]) == 0  # one prompt: nothing to share
    assert shared_prefix_length([list(range(40)), list(range(10)) + [99] * 30]) == 0  # too short to pay off
