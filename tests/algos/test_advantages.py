"""Advantage estimators against hand-computed values (docs/method.md §4)."""

import math

import numpy as np
import pytest
import torch

from t2po.algos.advantages import (
    discounted_returns,
    episode_scores,
    gae_advantages,
    gigpo_advantages,
    grpo_advantages,
    penalized_step_returns,
    rloo_advantages,
    step_group_ids,
)

# ---------------------------------------------------------------- discounted returns


def test_discounted_returns_interleaved_trajectories():
    # traj a: rewards 1, 2, 0 at indices 0, 2, 4; traj b: rewards 0, 3 at indices 1, 3; gamma 0.5
    # a: G = [1 + 0.5 * 2, 2 + 0.5 * 0, 0] = [2, 2, 0]; b: G = [0 + 0.5 * 3, 3] = [1.5, 3]
    returns = discounted_returns([1.0, 0.0, 2.0, 3.0, 0.0], ["a", "b", "a", "b", "a"], gamma=0.5)
    np.testing.assert_allclose(returns, [2.0, 1.5, 2.0, 3.0, 0.0])


def test_discounted_returns_int_ids_and_gamma_one():
    returns = discounted_returns(np.array([1.0, 1.0, 10.0, -0.1]), np.array([7, 7, 7, 8]), gamma=1.0)
    np.testing.assert_allclose(returns, [12.0, 11.0, 10.0, -0.1])


def test_discounted_returns_rejects_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns([1.0], [0], gamma=1.5)
    with pytest.raises(ValueError, match="one entry per sample"):
        discounted_returns([1.0, 2.0], [0], gamma=0.9)
    with pytest.raises(ValueError, match="NaN"):
        discounted_returns([1.0, float("nan")], [0, 0], gamma=0.9)


# ---------------------------------------------------------------- invalid-action penalty credit


def test_penalty_lowers_only_the_invalid_steps_own_score_and_return():
    """Reference: verl-agent `verl/trainer/ppo/ray_trainer.py` `apply_invalid_action_penalty` (subtracts
    the coefficient from the invalid step's own last-token reward and its own `step_rewards` entry) and
    `gigpo/core_gigpo.py` `compute_step_discounted_returns` (discounted env returns, computed before).
    Trajectory a: env rewards 0, 0, 10, step 1 invalid (penalty 0.1); gamma 0.5.
      scores:  10 - [0, 0.1, 0] = [10, 9.9, 10]
      returns: [0 + 0.5 * (0 + 0.5 * 10), 0 + 0.5 * 10, 10] - [0, 0.1, 0] = [2.5, 4.9, 10]"""
    env_rewards, penalties, trajs = [0.0, 0.0, 10.0], [0.0, 0.1, 0.0], ["a", "a", "a"]
    np.testing.assert_allclose(episode_scores(env_rewards, penalties, trajs), [10.0, 9.9, 10.0])
    np.testing.assert_allclose(penalized_step_returns(env_rewards, penalties, trajs, gamma=0.5), [2.5, 4.9, 10.0])


def test_issue_example_one_failing_group_with_one_invalid_step():
    """The issue's example against the reference's rule (verl-agent `apply_invalid_action_penalty`,
    `gigpo/core_gigpo.py` `compute_gigpo_outcome_advantage` / `episode_norm_reward`, mean_std_norm,
    compute across steps). One task group, two failing trajectories of 3 steps, trajectory t1's first
    step invalid, every anchor distinct (singleton step groups, A_S = 0).
      scores [-0.1, 0, 0 | 0, 0, 0]: mean -1/60, unbiased var ((1/12)^2 + 5 (1/60)^2) / 5 = 1/600
      A_E = (-1/12) sqrt(600) = -2.0412 for the invalid step, (1/60) sqrt(600) = +0.4082 for the others
    (crediting the trajectory total to every step gave [-0.91 x 3 | +0.91 x 3])."""
    env_rewards = [0.0] * 6
    penalties = [0.1, 0.0, 0.0, 0.0, 0.0, 0.0]
    trajs = ["t1", "t1", "t1", "t2", "t2", "t2"]
    groups = ["g"] * 6
    scores = episode_scores(env_rewards, penalties, trajs)
    returns = penalized_step_returns(env_rewards, penalties, trajs, gamma=0.95)
    adv = gigpo_advantages(scores, returns, groups, trajs, ["a0", "a1", "a2", "b0", "b1", "b2"], mode="mean_std_norm")
    np.testing.assert_allclose(adv, [-2.0412, 0.4082, 0.4082, 0.4082, 0.4082, 0.4082], atol=1e-4)
    np.testing.assert_allclose(grpo_advantages(scores, groups, trajs), adv, atol=1e-9)


def test_penalty_credit_with_a_shared_first_anchor():
    """As above (verl-agent `apply_invalid_action_penalty`, `core_gigpo.step_norm_reward`), but both
    trajectories start from one anchor: step group {t1 step 0, t2 step 0} with returns [-0.1, 0]
    (0.95 x 0 + 0 - 0.1 and 0), mean -0.05, unbiased std 0.1 / sqrt(2) -> A_S = -/+ 0.7071."""
    trajs = ["t1", "t1", "t1", "t2", "t2", "t2"]
    scores = episode_scores([0.0] * 6, [0.1, 0, 0, 0, 0, 0], trajs)
    returns = penalized_step_returns([0.0] * 6, [0.1, 0, 0, 0, 0, 0], trajs, gamma=0.95)
    np.testing.assert_allclose(returns, [-0.1, 0, 0, 0, 0, 0])
    adv = gigpo_advantages(scores, returns, ["g"] * 6, trajs, ["s", "a1", "a2", "s", "b1", "b2"], mode="mean_std_norm")
    np.testing.assert_allclose(adv, [-2.0412 - 0.7071, 0.4082, 0.4082, 0.4082 + 0.7071, 0.4082, 0.4082], atol=1e-4)


# ---------------------------------------------------------------- GRPO


def test_grpo_uses_unbiased_std():
    # members [1, 3]: mean 2, unbiased std sqrt(2) -> A = +-1/sqrt(2) (the population std 1 would give +-1)
    adv = grpo_advantages([1.0, 3.0], ["g", "g"], ["t1", "t2"])
    np.testing.assert_allclose(adv, [-0.70710678, 0.70710678], rtol=1e-5)


def test_grpo_across_steps_counts_every_step_sample():
    # t1 (score 1) has two step samples, t2 (score 0) one, interleaved: t1, t2, t1.
    scores, groups, trajs = [1.0, 0.0, 1.0], [5, 5, 5], ["t1", "t2", "t1"]
    # across steps: members [1, 0, 1], mean 2/3, var ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3, std 0.57735
    adv = grpo_advantages(scores, groups, trajs, across_steps=True)
    np.testing.assert_allclose(adv, [0.57735027, -1.15470054, 0.57735027], rtol=1e-5)
    # per trajectory: members [1, 0], mean 0.5, std sqrt(0.5)
    adv = grpo_advantages(scores, groups, trajs, across_steps=False)
    np.testing.assert_allclose(adv, [0.70710678, -0.70710678, 0.70710678], rtol=1e-5)
    # mean only
    adv = grpo_advantages(scores, groups, trajs, norm_by_std=False)
    np.testing.assert_allclose(adv, [1 / 3, -2 / 3, 1 / 3], rtol=1e-9)


def test_grpo_singleton_group_has_mean_zero_std_one():
    # group "solo" has one sample: A = (5 - 0) / (1 + eps); group 1 has two: A = +-1/sqrt(2)
    adv = grpo_advantages([5.0, 2.0, 4.0], ["solo", 1, 1], ["a", "b", "c"])
    np.testing.assert_allclose(adv, [5.0 / (1 + 1e-6), -0.70710678, 0.70710678], rtol=1e-6)
    np.testing.assert_allclose(grpo_advantages([5.0], ["solo"], ["a"], norm_by_std=False), [5.0])


def test_grpo_one_trajectory_group_depends_on_members():
    # one trajectory of two steps: across steps the members are [4, 4] (std 0, A = 0);
    # per trajectory the group has one member (mean 0, std 1, A = 4)
    np.testing.assert_allclose(grpo_advantages([4.0, 4.0], [0, 0], ["t", "t"], across_steps=True), [0.0, 0.0])
    np.testing.assert_allclose(
        grpo_advantages([4.0, 4.0], [0, 0], ["t", "t"], across_steps=False, eps=0.0), [4.0, 4.0]
    )


def test_grpo_int_and_string_ids_are_distinct_groups():
    # group 0 and group "0" are different: each is a singleton, so A = score
    adv = grpo_advantages([1.0, 3.0], [0, "0"], ["a", "b"], eps=0.0)
    np.testing.assert_allclose(adv, [1.0, 3.0])


def test_grpo_accepts_numpy_object_and_tensor_inputs():
    adv = grpo_advantages(torch.tensor([1.0, 3.0]), np.array(["g", "g"], dtype=object), np.array([10, 11]))
    assert adv.dtype == np.float64
    np.testing.assert_allclose(adv, [-0.70710678, 0.70710678], rtol=1e-5)


def test_grpo_rejects_trajectory_in_two_groups_and_length_mismatch():
    with pytest.raises(ValueError, match="exactly one group"):
        grpo_advantages([1.0, 2.0], ["g1", "g2"], ["t", "t"])
    with pytest.raises(ValueError, match="lengths"):
        grpo_advantages([1.0, 2.0], ["g1"], ["t", "u"])


# ---------------------------------------------------------------- GiGPO

# One task "task" with two interleaved trajectories (gamma 0.5):
#   A: anchors s0, s1; rewards 0, 10 -> returns 5, 10; score 10
#   B: anchors s0, s2, s1; rewards 0, 0, 0 -> returns 0, 0, 0; score 0
# plus task "other" with one trajectory C: anchor s0 (same text as task's s0), reward 3, score 3.
# Sample order: A0, B0, A1, B1, B2, C0.
GIGPO_CASE = dict(
    scores=[10.0, 0.0, 10.0, 0.0, 0.0, 3.0],
    step_returns=[5.0, 0.0, 10.0, 0.0, 0.0, 3.0],
    group_ids=["task", "task", "task", "task", "task", "other"],
    traj_ids=["A", "B", "A", "B", "B", "C"],
    anchor_obs=["s0", "s0", "s1", "s2", "s1", "s0"],
)


def test_gigpo_mean_norm_hand_computed():
    adv, episode, step = gigpo_advantages(**GIGPO_CASE, mode="mean_norm", return_parts=True)
    # episode: task members (all step samples) [10, 0, 10, 0, 0], mean 4; "other" is a singleton (mean 0)
    np.testing.assert_allclose(episode, [6.0, -4.0, 6.0, -4.0, -4.0, 3.0])
    # step groups in "task": s0 {5, 0} mean 2.5; s1 {10, 0} mean 5; s2 singleton -> 0.
    # C's s0 is in another task group: a singleton step group, not part of task's s0 group.
    np.testing.assert_allclose(step, [2.5, -2.5, 5.0, 0.0, -5.0, 0.0])
    np.testing.assert_allclose(adv, [8.5, -6.5, 11.0, -4.0, -9.0, 3.0])
    half = gigpo_advantages(**GIGPO_CASE, mode="mean_norm", step_weight=0.5)
    np.testing.assert_allclose(half, [7.25, -5.25, 8.5, -4.0, -6.5, 3.0])


def test_gigpo_mean_std_norm_hand_computed():
    adv, episode, step = gigpo_advantages(**GIGPO_CASE, mode="mean_std_norm", return_parts=True)
    # episode: task mean 4, unbiased var (36 + 16 + 36 + 16 + 16) / 4 = 30; other: (3 - 0) / (1 + eps)
    e_pos, e_neg = 6 / math.sqrt(30), -4 / math.sqrt(30)
    np.testing.assert_allclose(episode, [e_pos, e_neg, e_pos, e_neg, e_neg, 3.0], rtol=1e-5)
    # s0 {5, 0}: (+-2.5) / sqrt(12.5); s1 {10, 0}: (+-5) / sqrt(50); both +-1/sqrt(2); s2 and C singletons -> 0
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(step, [r, -r, r, 0.0, -r, 0.0], rtol=1e-5)
    np.testing.assert_allclose(adv, [1.80255190, -1.43740352, 1.80255190, -0.73029674, -1.43740352, 3.0], rtol=1e-5)


def test_gigpo_equal_returns_in_step_group_give_zero_step_advantage():
    _, _, step = gigpo_advantages(
        [1.0, 0.0], [2.0, 2.0], ["g", "g"], ["a", "b"], ["obs", "obs"], mode="mean_std_norm", return_parts=True
    )
    np.testing.assert_allclose(step, [0.0, 0.0])


# anchors of 20 characters that differ in one position: ratio = 2 * 19 / 40 = 0.95
BASE = "abcdefghijklmnopqrst"
ONE_OFF = "abcdefghijXlmnopqrst"  # ratio 0.95 to BASE
TWO_OFF = "abcdefghijXlmnoYqrst"  # ratio 0.95 to ONE_OFF, 0.90 to BASE


def test_similarity_grouping_threshold():
    args = ([0.0, 0.0], [1.0, 3.0], ["q", "q"], ["a", "b"], [BASE, ONE_OFF])
    _, _, step = gigpo_advantages(*args, mode="mean_norm", similarity_threshold=0.9, return_parts=True)
    np.testing.assert_allclose(step, [-1.0, 1.0])  # one step group {1, 3}, mean 2
    _, _, step = gigpo_advantages(*args, mode="mean_norm", similarity_threshold=0.99, return_parts=True)
    np.testing.assert_allclose(step, [0.0, 0.0])  # two singleton step groups
    _, _, step = gigpo_advantages(*args, mode="mean_norm", return_parts=True)
    np.testing.assert_allclose(step, [0.0, 0.0])  # exact matching: different anchors


def test_similarity_clusters_compare_with_first_member_only():
    # TWO_OFF is similar to ONE_OFF (0.95) but not to the cluster's representative BASE (0.90 < 0.92)
    labels = step_group_ids([BASE, ONE_OFF, TWO_OFF], ["q", "q", "q"], similarity_threshold=0.92)
    assert labels.tolist() == [0, 0, 1]
    labels = step_group_ids([BASE, ONE_OFF, TWO_OFF], ["q", "q", "q"], similarity_threshold=0.9)
    assert labels.tolist() == [0, 0, 0]
    # never across task groups, even for identical anchors
    labels = step_group_ids([BASE, BASE, BASE], ["q", "r", "q"], similarity_threshold=0.9)
    assert labels.tolist() == [0, 1, 0]


def test_gigpo_rejects_bad_options():
    with pytest.raises(ValueError, match="mean_norm, mean_std_norm"):
        gigpo_advantages(**GIGPO_CASE, mode="std")
    with pytest.raises(ValueError, match="similarity_threshold"):
        gigpo_advantages(**GIGPO_CASE, similarity_threshold=1.5)
    with pytest.raises(ValueError, match="text observations"):
        step_group_ids([1, 2], ["q", "q"], similarity_threshold=0.9)
    with pytest.raises(ValueError, match="lengths"):
        gigpo_advantages([1.0], [1.0, 2.0], ["g", "g"], ["a", "b"], ["x", "y"])


# ---------------------------------------------------------------- RLOO


def test_rloo_leave_one_out_per_trajectory():
    # scores 1, 2, 6: A = 1 - (2 + 6) / 2 = -3, 2 - (1 + 6) / 2 = -1.5, 6 - (1 + 2) / 2 = 4.5.
    # t1 has two step samples; both get t1's advantage. Group "z" is a singleton: 0.
    scores = [1.0, 2.0, 1.0, 6.0, 9.0]
    groups = [0, 0, 0, 0, "z"]
    trajs = ["t1", "t2", "t1", "t3", "t4"]
    np.testing.assert_allclose(rloo_advantages(scores, groups, trajs), [-3.0, -1.5, -3.0, 4.5, 0.0])


def test_rloo_across_steps():
    # members [1, 2, 1, 6], n = 4, mean 2.5: A = 4/3 * (s - 2.5)
    adv = rloo_advantages([1.0, 2.0, 1.0, 6.0], [0, 0, 0, 0], ["t1", "t2", "t1", "t3"], across_steps=True)
    np.testing.assert_allclose(adv, [-2.0, -2.0 / 3.0, -2.0, 14.0 / 3.0])


# ---------------------------------------------------------------- GAE


def test_gae_three_tokens():
    # gamma 0.9, lam 0.8, V = [0.5, 0.6, 0.7], reward 1 on the last token:
    # delta_2 = 1 - 0.7 = 0.3                   A_2 = 0.3
    # delta_1 = 0.9 * 0.7 - 0.6 = 0.03          A_1 = 0.03 + 0.72 * 0.3 = 0.246
    # delta_0 = 0.9 * 0.6 - 0.5 = 0.04          A_0 = 0.04 + 0.72 * 0.246 = 0.21712
    rewards = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8, whiten=False)
    torch.testing.assert_close(adv, torch.tensor([[0.21712, 0.246, 0.3]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0]], dtype=torch.float64))
    # whitened: mean 0.254373, unbiased std 0.0420702
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[-0.88551247, -0.1990343, 1.08454677]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.71712, 0.846, 1.0]], dtype=torch.float64))


def test_gae_skips_invalid_tokens():
    # invalid tokens (value 9, reward 5) are skipped: token 2's value bootstraps token 0.
    # A_2 = 1 - 0.7 = 0.3; A_0 = 0.9 * 0.7 - 0.5 + 0.72 * 0.3 = 0.346
    rewards = torch.tensor([[0.0, 5.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 9.0, 0.7, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 0, 1, 0]])
    adv, ret = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8, whiten=False)
    torch.testing.assert_close(adv, torch.tensor([[0.346, 0.0, 0.3, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(ret, torch.tensor([[0.846, 0.0, 1.0, 0.0]], dtype=torch.float64))


def test_gae_rejects_bad_shapes_and_single_token_whitening():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        gae_advantages(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3), 1.0, 1.0)
    with pytest.raises(ValueError, match="whiten=False"):
        gae_advantages(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([[1, 0, 0]]), 1.0, 1.0)
