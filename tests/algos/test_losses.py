"""PPO policy loss, KL penalties and value loss against hand-computed values (docs/method.md §4)."""

import math

import pytest
import torch

from t2po.algos.losses import aggregate_loss, kl_penalty, ppo_policy_loss, value_loss

# Four tokens, the last one masked (its huge log-prob must not matter):
#   tok0: A = +1, ratio e^0.5 = 1.6487: pg1 = -1.6487, pg2 = -1.2 -> -1.2           (clipped)
#   tok1: A = -1, ratio e^2   = 7.3891: pg1 = 7.3891, pg2 = 1.2 -> 7.3891, pg3 = 3 -> 3  (dual clip)
#   tok2: A = -1, ratio 1:              pg1 = pg2 = 1 -> 1
LOGP = torch.tensor([[0.5, 2.0, 0.0, 100.0]])
OLD_LOGP = torch.zeros(1, 4)
ADV = torch.tensor([[1.0, -1.0, -1.0, 5.0]])
MASK = torch.tensor([[1, 1, 1, 0]])


def test_ppo_loss_both_clip_branches_and_metrics():
    logp = LOGP.clone().requires_grad_(True)
    loss, metrics = ppo_policy_loss(logp, OLD_LOGP, ADV, MASK)
    assert loss.item() == pytest.approx((-1.2 + 3.0 + 1.0) / 3)
    assert metrics["clip_frac"] == pytest.approx(1 / 3)  # tok0
    assert metrics["clip_frac_lower"] == pytest.approx(1 / 3)  # tok1
    assert metrics["approx_kl"] == pytest.approx(-(0.5 + 2.0 + 0.0) / 3)
    loss.backward()
    # clipped tokens carry no gradient; tok2: d(-A * exp(logp - old)) / dlogp = 1, / 3 tokens
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, 1 / 3, 0.0]]))


def test_dual_clip_applies_to_negative_advantages_only():
    huge = torch.tensor([[2.0]])  # ratio e^2
    loss, metrics = ppo_policy_loss(huge, torch.zeros(1, 1), torch.tensor([[-1.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(3.0)  # -A * dual_clip
    assert metrics["clip_frac_lower"] == 1.0
    loss, metrics = ppo_policy_loss(huge, torch.zeros(1, 1), torch.tensor([[1.0]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-1.2)  # ordinary clip at 1 + clip_high
    assert metrics["clip_frac"] == 1.0 and metrics["clip_frac_lower"] == 0.0
    # A > 0 with a small ratio is not clipped (pessimistic bound): -A * 0.5
    loss, metrics = ppo_policy_loss(
        torch.tensor([[math.log(0.5)]]), torch.zeros(1, 1), torch.tensor([[1.0]]), torch.ones(1, 1)
    )
    assert loss.item() == pytest.approx(-0.5)
    assert metrics["clip_frac"] == 0.0


def test_asymmetric_clip_range():
    # ratio e^0.5 = 1.6487, A = +1: clipped at 1 + clip_high = 1.28
    loss, _ = ppo_policy_loss(torch.tensor([[0.5]]), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1),
                              clip_low=0.2, clip_high=0.28)
    assert loss.item() == pytest.approx(-1.28)
    # ratio e^-1 = 0.3679, A = -1: clipped at 1 - clip_low = 0.9 -> loss max(0.3679, 0.9) = 0.9
    loss, _ = ppo_policy_loss(torch.tensor([[-1.0]]), torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1),
                              clip_low=0.1, clip_high=0.28)
    assert loss.item() == pytest.approx(0.9)


# Per-token losses [[1, 2, 3], [4, x, x]] (x masked), and an empty row: ratio 1, so loss = -A.
AGG_ADV = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -7.0, -7.0], [-9.0, -9.0, -9.0]])
AGG_MASK = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])


@pytest.mark.parametrize(
    ("agg", "expected"),
    [
        ("token-mean", 10.0 / 4),  # (1 + 2 + 3 + 4) / 4 tokens
        ("seq-mean-token-sum", (6.0 + 4.0) / 2),  # empty row left out
        ("seq-mean-token-mean", (2.0 + 4.0) / 2),
    ],
)
def test_aggregation_modes(agg, expected):
    logp = torch.zeros(3, 3)
    loss, _ = ppo_policy_loss(logp, logp, AGG_ADV, AGG_MASK, agg=agg)
    assert loss.item() == pytest.approx(expected)
    assert aggregate_loss(-AGG_ADV, AGG_MASK, agg).item() == pytest.approx(expected)


def test_sequence_advantages_broadcast_over_tokens():
    logp = torch.tensor([[0.1, -0.2], [0.3, 0.0]])
    old = torch.zeros(2, 2)
    mask = torch.ones(2, 2)
    per_seq, _ = ppo_policy_loss(logp, old, torch.tensor([1.0, -2.0]), mask)
    per_token, _ = ppo_policy_loss(logp, old, torch.tensor([[1.0, 1.0], [-2.0, -2.0]]), mask)
    assert per_seq.item() == pytest.approx(per_token.item())
    # hand value: A = +1 row: -(e^0.1 + e^-0.2) (both inside the clip range);
    # A = -2 row: 2 * max(e^0.3, 1.2) = 2 * 1.3498588 (pessimistic: the larger ratio), 2 * 1
    assert per_seq.item() == pytest.approx((-1.1051709 - 0.8187308 + 2.6997176 + 2.0) / 4)


def test_ppo_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="token-mean, seq-mean-token-sum, seq-mean-token-mean"):
        ppo_policy_loss(LOGP, OLD_LOGP, ADV, MASK, agg="sum")
    with pytest.raises(ValueError, match="old_logp"):
        ppo_policy_loss(LOGP, torch.zeros(1, 3), ADV, MASK)
    with pytest.raises(ValueError, match="advantages"):
        ppo_policy_loss(LOGP, OLD_LOGP, torch.zeros(3), MASK)
    with pytest.raises(ValueError, match="dual_clip"):
        ppo_policy_loss(LOGP, OLD_LOGP, ADV, MASK, dual_clip=0.5)


def test_kl_penalty_kinds():
    logp = torch.tensor([0.0, -1.0, -30.0, 0.0])
    ref = torch.tensor([-0.5, -1.0, 0.0, -50.0])
    torch.testing.assert_close(kl_penalty(logp, ref, "kl"), torch.tensor([0.5, 0.0, -30.0, 50.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "abs"), torch.tensor([0.5, 0.0, 30.0, 50.0]))
    torch.testing.assert_close(kl_penalty(logp, ref, "mse"), torch.tensor([0.125, 0.0, 450.0, 1250.0]))
    # k3 with x = ref - logp: e^-0.5 + 0.5 - 1 = 0.1065307; x = 0 -> 0; x = +30 and x = -50 hit the clamp at 10
    torch.testing.assert_close(kl_penalty(logp, ref, "low_var_kl"), torch.tensor([0.1065307, 0.0, 10.0, 10.0]))
    with pytest.raises(ValueError, match="kl, abs, mse, low_var_kl"):
        kl_penalty(logp, ref, "k3")


def test_value_loss_clipping():
    # tok0: V 1, V_old 0.5 -> V_clip 0.7; (1 - 3)^2 = 4 < (0.7 - 3)^2 = 5.29; tok1 unclipped: (2 - 1)^2 = 1
    values = torch.tensor([[1.0, 2.0, 0.0]])
    old = torch.tensor([[0.5, 2.0, 0.0]])
    returns = torch.tensor([[3.0, 1.0, 50.0]])
    mask = torch.tensor([[1, 1, 0]])
    loss, metrics = value_loss(values, old, returns, mask, clip=0.2)
    assert loss.item() == pytest.approx(0.5 * (5.29 + 1.0) / 2)
    assert metrics["vf_clip_frac"] == pytest.approx(0.5)


def test_token_mean_denominator_counts_only_the_tokens_the_loss_mask_keeps():
    """Two samples in one mini-batch: 4 tokens of which TTI forced 2, and 2 free tokens. With forced tokens
    masked the token-mean denominator is 2 + 2 = 4 (not 6), so a micro-batch holding both weighs 4 / 4 = 1 and
    a per-token loss of 1 on every kept token gives a loss of exactly 1 (it was 4 / 6 = 0.667)."""
    from t2po.algos.losses import loss_token_counts

    forced = [[False, True, True, False], [False, False]]
    kept = loss_token_counts([4, 2], forced, mask_forced=True)
    assert kept == [2, 2]
    assert loss_token_counts([4, 2], forced, mask_forced=False) == [4, 2]
    mask = torch.tensor([[1, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)  # the loss mask of the micro-batch
    loss = aggregate_loss(torch.ones(2, 4), mask, "token-mean")
    weight = mask.sum().item() / sum(kept)  # the trainer's micro-batch weight in the mini-batch
    assert loss.item() * weight == pytest.approx(1.0)
