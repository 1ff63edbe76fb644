"""Advantage estimators: step returns, GRPO, GiGPO, RLOO (per environment step) and GAE (per token).

Method: docs/method.md §4. The group estimators work on 1-D per-sample arrays, one entry per
training sample (= one environment step). Ids may be ints or strings. The samples of one trajectory
appear in step order, but trajectories may be interleaved in the arrays: nothing here assumes that the
samples of a trajectory or of a group are contiguous. Group estimators return float64 numpy arrays;
`gae_advantages` works on [B, T] token tensors and returns torch tensors.
"""

from __future__ import annotations

import difflib
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
import torch

GIGPO_MODES = ("mean_norm", "mean_std_norm")


def _as_float_array(values: Any, name: str) -> np.ndarray:
    """A 1-D float64 copy of `values` (list, numpy array or torch tensor); rejects NaN/inf."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, one per sample: {err}") from err
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per sample), got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.isfinite(array))[:5].tolist()
        raise ValueError(f"{name} has NaN or infinite entries at indices {bad}; fix the rewards upstream")
    return array


def _as_ids(ids: Any, name: str) -> list[Hashable]:
    """A list of hashable python ids (ints, strings, ...) from a list, numpy array or torch tensor."""
    if isinstance(ids, torch.Tensor | np.ndarray):
        if ids.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one id per sample), got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    ids = list(ids)
    for i, value in enumerate(ids):
        if not isinstance(value, Hashable):
            raise ValueError(f"{name}[{i}] = {value!r} is not hashable; ids must be ints or strings")
    return ids


def _check_same_length(**arrays: Sequence) -> int:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"per-sample inputs must have one entry per sample, got lengths {lengths}")
    return next(iter(lengths.values()))


def _indices_by_key(keys: list[Hashable]) -> dict[Hashable, list[int]]:
    """Sample indices of each key, keys in first-appearance order, indices in sample order."""
    groups: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def _check_trajectories_in_one_group(group_ids: list[Hashable], traj_ids: list[Hashable]) -> None:
    traj_group: dict[Hashable, Hashable] = {}
    for group, traj in zip(group_ids, traj_ids, strict=True):
        if traj_group.setdefault(traj, group) != group:
            raise ValueError(
                f"trajectory {traj!r} appears in groups {traj_group[traj]!r} and {group!r}; "
                "each trajectory id must belong to exactly one group (use unique trajectory ids)"
            )


def discounted_returns(rewards: Any, traj_ids: Any, gamma: float) -> np.ndarray:
    """Discounted return of every step within its trajectory (docs/method.md §4, "Step returns").

        G_t = sum_{j >= t} gamma^(j - t) r_j,   i.e. G_t = r_t + gamma * G_{t+1}, G_{T+1} = 0

    The sum runs over the later samples of the same trajectory id, in array order.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    rewards = _as_float_array(rewards, "rewards")
    traj_ids = _as_ids(traj_ids, "traj_ids")
    _check_same_length(rewards=rewards, traj_ids=traj_ids)
    returns = np.zeros_like(rewards)
    for indices in _indices_by_key(traj_ids).values():
        running = 0.0
        for i in reversed(indices):
            running = rewards[i] + gamma * running
            returns[i] = running
    return returns


def episode_scores(env_rewards: Any, penalties: Any, traj_ids: Any) -> np.ndarray:
    """Episode score of every step sample, credited as the reference does (docs/method.md §4, "Rewards"):

        s_i = sum_{j in traj(i)} r_j - p_i

    `env_rewards[j]` is the environment's reward at step j, `penalties[i]` the invalid-action penalty
    of sample i's own step (0 for a valid action). In verl-agent the reward manager puts the
    episode's environment reward on every step sample's last response token and
    `apply_invalid_action_penalty` then subtracts the penalty from the invalid step's own token
    reward; a sample's score is its own token-level reward sum. So a penalty lowers the score of the
    step that earned it and of no other step of the trajectory.
    """
    env_rewards = _as_float_array(env_rewards, "env_rewards")
    penalties = _as_float_array(penalties, "penalties")
    traj_ids = _as_ids(traj_ids, "traj_ids")
    _check_same_length(env_rewards=env_rewards, penalties=penalties, traj_ids=traj_ids)
    totals: dict[Hashable, float] = {}
    for traj, reward in zip(traj_ids, env_rewards):
        totals[traj] = totals.get(traj, 0.0) + reward
    return np.array([totals[traj] for traj in traj_ids], dtype=np.float64) - penalties


def penalized_step_returns(env_rewards: Any, penalties: Any, traj_ids: Any, gamma: float) -> np.ndarray:
    """GiGPO's step returns with the penalty credited as the reference does (docs/method.md §4, "Step returns"):

        G_i = sum_{j >= i} gamma^(j - i) r_j - p_i

    verl-agent computes the discounted returns of the environment rewards
    (`compute_step_discounted_returns`) and `apply_invalid_action_penalty` then subtracts the
    penalty from the invalid step's own return only: an earlier step does not inherit a later
    step's penalty.
    """
    penalties = _as_float_array(penalties, "penalties")
    returns = discounted_returns(env_rewards, traj_ids, gamma)
    _check_same_length(env_rewards=returns, penalties=penalties)
    return returns - penalties


def _group_mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and unbiased (n - 1) std of one group; a group with one member gets mean 0, std 1 (docs/method.md §4)."""
    if len(values) == 1:
        return 0.0, 1.0
    return float(np.mean(values)), float(np.std(values, ddof=1))


def _group_members(scores: np.ndarray, group_ids: np.ndarray, traj_ids: np.ndarray,
                   across_steps: bool) -> dict[Hashable, list[float]]:
    """The scores that make up each task group's statistics: every step sample's (across_steps=True)
    or one per trajectory, its first sample's in array order (across_steps=False)."""
    members: dict[Hashable, list[float]] = {}
    seen_trajs: set[Hashable] = set()
    for i, (group, traj) in enumerate(zip(group_ids, traj_ids, strict=True)):
        if not across_steps:
            if traj in seen_trajs:
                continue
            seen_trajs.add(traj)
        members.setdefault(group, []).append(scores[i])
    return members


def grpo_advantages(
    scores: Any,
    group_ids: Any,
    traj_ids: Any,
    norm_by_std: bool = True,
    across_steps: bool = True,
    eps: float = 1e-6,
) -> np.ndarray:
    """GRPO advantage of every step sample from its episode score (docs/method.md §4, "Episode advantage").

        A_i = (s_i - mean_g) / (std_g + eps)      norm_by_std=True  (GiGPO "mean_std_norm")
        A_i =  s_i - mean_g                       norm_by_std=False (GiGPO "mean_norm")

    `scores[i]` is the episode score of sample i (`episode_scores`: its trajectory's total
    environment reward, less its own step's invalid-action penalty); g is the sample's task group. Members of the group
    statistics:
    - across_steps=True (the reference default, "compute across steps"): every step sample of every
      trajectory in the group contributes its score, so long trajectories weigh more;
    - across_steps=False: one score per trajectory, the one on its first sample in array order.
    std is unbiased (n - 1, as torch.std). A group with one member (one sample, or one trajectory when
    across_steps=False) has mean 0 and std 1, so its advantage is its score (/ (1 + eps)). A group whose
    members are all equal has std 0 and advantage 0.
    """
    scores = _as_float_array(scores, "scores")
    group_ids = _as_ids(group_ids, "group_ids")
    traj_ids = _as_ids(traj_ids, "traj_ids")
    _check_same_length(scores=scores, group_ids=group_ids, traj_ids=traj_ids)
    _check_trajectories_in_one_group(group_ids, traj_ids)

    members = _group_members(scores, group_ids, traj_ids, across_steps)
    stats = {group: _group_mean_std(values) for group, values in members.items()}

    advantages = np.empty_like(scores)
    for i, group in enumerate(group_ids):
        mean, std = stats[group]
        advantages[i] = (scores[i] - mean) / (std + eps) if norm_by_std else scores[i] - mean
    return advantages


def step_group_ids(anchor_obs: Any, group_ids: Any, similarity_threshold: float | None = None) -> np.ndarray:
    """Anchor-state step groups of GiGPO (docs/method.md §4, "Step advantage"): one int label per sample.

    Within one task group, samples whose anchor observations are identical share a label. With a
    `similarity_threshold` (Search: 0.9) anchors are clustered greedily instead, which makes the result
    deterministic: scanning the group's samples in array order, each anchor joins the first existing
    cluster (in creation order) whose representative, the cluster's first member, has
    `difflib.SequenceMatcher(None, anchor, representative).ratio() >= similarity_threshold`, else it
    starts a new cluster. (This is the rule of verl-agent's `build_step_group`. The ratio is not
    symmetric in general, hence the fixed argument order.) Samples of different task groups never
    share a label. Labels are 0, 1, ... in order of first appearance.

    Note: difflib's default `autojunk` heuristic treats every character that makes up more than 1% of
    a sequence longer than 200 characters as junk, so for long text anchors the ratio collapses (one
    changed character in a 3,000-character observation gives about 0.2) and the grouping is in effect
    exact matching. This is what the reference ran; the ratio is kept as specified.
    """
    group_ids = _as_ids(group_ids, "group_ids")
    anchors = _as_ids(anchor_obs, "anchor_obs")
    n = _check_same_length(anchor_obs=anchors, group_ids=group_ids)
    if similarity_threshold is not None:
        if not 0.0 < similarity_threshold <= 1.0:
            raise ValueError(f"similarity_threshold must be in (0, 1] or None, got {similarity_threshold}")
        for i, anchor in enumerate(anchors):
            if not isinstance(anchor, str):
                raise ValueError(
                    f"anchor_obs[{i}] is a {type(anchor).__name__}; similarity grouping needs text "
                    "observations (pass similarity_threshold=None to group identical anchors)"
                )

    labels = np.empty(n, dtype=np.int64)
    next_label = 0
    for indices in _indices_by_key(group_ids).values():
        if similarity_threshold is None:
            label_of_anchor: dict[Hashable, int] = {}
            for i in indices:
                if anchors[i] not in label_of_anchor:
                    label_of_anchor[anchors[i]] = next_label
                    next_label += 1
                labels[i] = label_of_anchor[anchors[i]]
            continue
        # One matcher per cluster with the representative as the second sequence: difflib caches
        # its index of the second sequence, so each comparison only re-scans the new anchor.
        clusters: list[tuple[str, difflib.SequenceMatcher, int]] = []
        for i in indices:
            anchor = anchors[i]
            for representative, matcher, label in clusters:
                if anchor == representative:  # ratio 1: skip the quadratic comparison
                    labels[i] = label
                    break
                matcher.set_seq1(anchor)
                # real_quick_ratio (from the lengths alone) bounds ratio from above: an O(1) rejection.
                if matcher.real_quick_ratio() >= similarity_threshold and matcher.ratio() >= similarity_threshold:
                    labels[i] = label
                    break
            else:
                clusters.append((anchor, difflib.SequenceMatcher(None, anchor, anchor), next_label))
                labels[i] = next_label
                next_label += 1
    return labels


def gigpo_advantages(
    scores: Any,
    step_returns: Any,
    group_ids: Any,
    traj_ids: Any,
    anchor_obs: Any,
    step_weight: float = 1.0,
    mode: str = "mean_std_norm",
    similarity_threshold: float | None = None,
    eps: float = 1e-6,
    return_parts: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GiGPO advantage of every step sample (docs/method.md §4): A = A_E + step_weight * A_S.

    Episode part A_E: `grpo_advantages(scores, group_ids, traj_ids, across_steps=True)`, i.e.
        mean_norm:      A_E = s - mean_g
        mean_std_norm:  A_E = (s - mean_g) / (std_g + eps)   (unbiased std; one-member group: mean 0, std 1)
    Step part A_S, over the step group k of the sample (see `step_group_ids`: identical anchor
    observations within the task group, or difflib ratio >= similarity_threshold):
        mean_norm:      A_S = G - mean_k
        mean_std_norm:  A_S = (G - mean_k) / (std_k + eps)   (unbiased std)
    where G is the sample's discounted step return (`discounted_returns`). A singleton step group
    gives A_S = 0 (its mean is its own return; as in verl-agent, its std is taken as 1). A step group
    of equal returns has std 0 and A_S = 0.

    With `return_parts=True` returns (A, A_E, A_S) so that the trainer can log both parts.
    """
    if mode not in GIGPO_MODES:
        raise ValueError(f"unknown GiGPO mode {mode!r}; valid modes: {', '.join(GIGPO_MODES)}")
    norm_by_std = mode == "mean_std_norm"
    step_returns = _as_float_array(step_returns, "step_returns")
    _check_same_length(scores=scores, step_returns=step_returns)

    episode = grpo_advantages(scores, group_ids, traj_ids, norm_by_std=norm_by_std, across_steps=True, eps=eps)

    labels = step_group_ids(anchor_obs, group_ids, similarity_threshold)
    step = np.zeros_like(step_returns)
    for indices in _indices_by_key(labels.tolist()).values():
        if len(indices) == 1:
            continue  # singleton step group: A_S = 0
        returns = step_returns[indices]
        centred = returns - returns.mean()
        step[indices] = centred / (returns.std(ddof=1) + eps) if norm_by_std else centred

    advantages = episode + step_weight * step
    if return_parts:
        return advantages, episode, step
    return advantages


def rloo_advantages(scores: Any, group_ids: Any, traj_ids: Any, across_steps: bool = False) -> np.ndarray:
    """RLOO: leave-one-out baseline within the task group (docs/method.md §4, baselines).

        A_i = s_i - mean_{j != i} s_j = n / (n - 1) * (s_i - mean_g)

    Members of the group (n of them): one score per trajectory (its first sample's) when
    across_steps=False, every step sample when across_steps=True. Every step sample gets the advantage
    of its own score against that group. A group with one member gets A = 0 (no baseline to compare to).
    """
    scores = _as_float_array(scores, "scores")
    group_ids = _as_ids(group_ids, "group_ids")
    traj_ids = _as_ids(traj_ids, "traj_ids")
    _check_same_length(scores=scores, group_ids=group_ids, traj_ids=traj_ids)
    _check_trajectories_in_one_group(group_ids, traj_ids)

    members = _group_members(scores, group_ids, traj_ids, across_steps)

    advantages = np.zeros_like(scores)
    for i, group in enumerate(group_ids):
        n = len(members[group])
        if n > 1:
            advantages[i] = n / (n - 1) * (scores[i] - np.mean(members[group]))
    return advantages


def _masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the valid tokens, var unbiased (as verl's masked_whiten)."""
    count = mask.sum()
    if count < 2:
        raise ValueError(f"whitening needs at least 2 valid tokens, the mask has {int(count)}; pass whiten=False")
    mean = (values * mask).sum() / count
    var = (((values - mean) ** 2) * mask).sum() / (count - 1)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
    whiten: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over token sequences, for the PPO baseline (docs/method.md §4, baselines).

    Inputs are [B, T] tensors: token-level rewards (usually the reward on the last valid token),
    critic values, and the mask of valid (response) tokens. Over the valid tokens t < t' (the next
    valid token of the row; none after the last one):

        delta_t = r_t + gamma * V_{t'} - V_t           (V_{t'} = 0 after the last valid token)
        A_t     = delta_t + gamma * lam * A_{t'}
        R_t     = A_t + V_t                            (the critic's regression target)

    Invalid tokens are skipped, as verl's `compute_gae_advantage_return`. With `whiten=True` the
    advantages are then whitened over all valid tokens of the batch (mean 0, unbiased variance 1;
    returns are not whitened). Advantages and returns are 0 on invalid tokens.
    """
    if rewards.ndim != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            "rewards, values and mask must be [B, T] tensors of one shape, got "
            f"{tuple(rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    with torch.no_grad():
        valid = mask.to(values.dtype)
        rewards = rewards.to(values.dtype)
        next_value = torch.zeros_like(values[:, 0])
        next_advantage = torch.zeros_like(values[:, 0])
        advantages = torch.zeros_like(values)
        for t in reversed(range(values.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantage = delta + gamma * lam * next_advantage
            # An invalid token passes the next valid token's value and advantage through unchanged.
            next_value = torch.where(valid[:, t] > 0, values[:, t], next_value)
            next_advantage = torch.where(valid[:, t] > 0, advantage, next_advantage)
            advantages[:, t] = advantage * valid[:, t]
        returns = (advantages + values) * valid
        if whiten:
            advantages = _masked_whiten(advantages, valid) * valid
    return advantages, returns


def turn_level_gae(rewards: Any, values: Any, traj_ids: Any, gamma: float, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Turn-level GAE for the PPO baseline (docs/method.md §4, baselines): each trajectory's environment steps
    are one row of `gae_advantages` (one (reward, value) pair per step, whitened over the batch).
    Per-sample inputs in step order within a trajectory; returns per-sample (advantages, returns)."""
    rewards = _as_float_array(rewards, "rewards")
    values = _as_float_array(values, "values")
    traj = _as_ids(traj_ids, "traj_ids")
    _check_same_length(rewards=rewards, values=values, traj_ids=traj)
    order = _indices_by_key(traj)
    T = max(len(v) for v in order.values())
    R = torch.zeros(len(order), T)
    V = torch.zeros(len(order), T)
    M = torch.zeros(len(order), T)
    for row, ks in enumerate(order.values()):
        for t, k in enumerate(ks):
            R[row, t], V[row, t], M[row, t] = rewards[k], float(values[k]), 1.0
    A, RET = gae_advantages(R, V, M, gamma, lam, whiten=True)
    adv = np.zeros(len(traj))
    returns = np.zeros(len(traj))
    for row, ks in enumerate(order.values()):
        for t, k in enumerate(ks):
            adv[k], returns[k] = float(A[row, t]), float(RET[row, t])
    return adv, returns
