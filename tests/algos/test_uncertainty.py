"""M_t (docs/method.md §1) and the turn score (docs/method.md §3) against hand-computed values."""

import math

import pytest
import torch

from t2po.algos.uncertainty import entropy_from_logits, turn_score, uncertainty_signal


def test_uniform_logits_give_alpha_times_minus_log_v():
    vocab = 50
    m = uncertainty_signal(torch.zeros(3, vocab), alpha=0.6)
    # conf = log(1/V), H = log V -> normalised entropy 1 -> second term 0
    assert torch.allclose(m, torch.full((3,), 0.6 * -math.log(vocab)), atol=1e-6)


def test_one_hot_like_logits_give_one_minus_alpha():
    logits = torch.full((10,), -1e4)
    logits[3] = 0.0
    assert uncertainty_signal(logits, alpha=0.6).item() == pytest.approx(0.4, abs=1e-6)
    assert uncertainty_signal(logits, alpha=0.9).item() == pytest.approx(0.1, abs=1e-6)


def test_two_token_distribution_by_hand():
    # p = (0.75, 0.25, 0, ...): conf = log 0.75, H = -(0.75 log 0.75 + 0.25 log 0.25)
    logits = torch.tensor([math.log(0.75), math.log(0.25), -math.inf, -math.inf])
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    expected = 0.6 * math.log(0.75) + 0.4 * (1 - entropy / math.log(4))
    assert uncertainty_signal(logits).item() == pytest.approx(expected, abs=1e-6)
    assert entropy_from_logits(logits).item() == pytest.approx(entropy, abs=1e-6)
    expected_prob = 0.6 * 0.75 + 0.4 * (1 - entropy / math.log(4))
    assert uncertainty_signal(logits, confidence="prob").item() == pytest.approx(expected_prob, abs=1e-6)


def test_bf16_input_is_computed_in_float32():
    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    m = uncertainty_signal(logits)
    assert m.dtype == torch.float32 and m.shape == (4,)
    assert torch.equal(m, uncertainty_signal(logits.float()))
    assert entropy_from_logits(logits).dtype == torch.float32


def test_certainty_orders_sharp_above_flat():
    flat, sharp = torch.zeros(100), torch.zeros(100)
    sharp[0] = 8.0
    assert uncertainty_signal(sharp) > uncertainty_signal(flat)


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="confidence"):
        uncertainty_signal(torch.zeros(5), confidence="margin")
    with pytest.raises(ValueError, match="alpha"):
        uncertainty_signal(torch.zeros(5), alpha=1.5)


def test_turn_score_skips_the_first_tokens():
    values = [10.0] * 32 + [1.0, 2.0, 3.0]
    assert turn_score(values) == pytest.approx(2.0)
    assert turn_score(values, skip=0) == pytest.approx(sum(values) / len(values))
    assert turn_score(torch.tensor([0.0, 1.0, 5.0]), skip=1) == pytest.approx(3.0)


def test_turn_score_of_short_and_empty_responses():
    # <= skip tokens: the mean over all tokens; empty: NaN
    assert turn_score([1.0, 2.0, 6.0], skip=32) == pytest.approx(3.0)
    assert turn_score([4.0] * 32, skip=32) == pytest.approx(4.0)
    assert math.isnan(turn_score([], skip=32))
    with pytest.raises(ValueError):
        turn_score([1.0], skip=-1)


def test_m_t_from_the_samplers_probabilities_equals_the_separate_pass():
    """The engine shares exp(log-probs) with the sampler at temperature 1 (issue 27): same M_t."""
    from t2po.algos.uncertainty import uncertainty_from_logprobs

    logits = torch.randn(4, 300) * 3
    logp = torch.log_softmax(logits, dim=-1)
    for confidence in ("logprob", "prob"):
        torch.testing.assert_close(uncertainty_from_logprobs(logp, 0.6, confidence, probs=logp.exp()),
                                   uncertainty_from_logprobs(logp, 0.6, confidence), rtol=1e-5, atol=1e-6)


def test_the_vocabulary_is_decoded_once_per_tokenizer():
    from t2po.algos.intervention import vocabulary_text

    class Tokenizer:
        calls = 0

        def __len__(self):
            return 3

        def batch_decode(self, ids):
            Tokenizer.calls += 1
            return [f"t{i[0]}" for i in ids]

    tokenizer = Tokenizer()
    assert vocabulary_text(tokenizer) == ["t0", "t1", "t2"] and vocabulary_text(tokenizer) == ["t0", "t1", "t2"]
    assert Tokenizer.calls == 1
    vocabulary_text(Tokenizer())
    assert Tokenizer.calls == 2  # another tokenizer object is decoded on its own
