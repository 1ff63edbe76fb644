"""Policy-gradient losses on token tensors: PPO clip with dual clip, KL penalty, clipped value loss.

Method: docs/method.md §4 ("Loss"). All inputs are [B, T] tensors over response tokens with
a mask of the tokens to train on (nonzero = valid); the formulas follow verl's `compute_policy_loss`,
`kl_penalty`, `compute_value_loss` and `agg_loss`.

The trainer's objective is a loss component (`algo.loss`, default `ppo`: `ppo_loss`) that takes one
micro-batch (`LossBatch`) and the config's `algo` section and returns (loss, metrics), as torchtune's
GRPO recipe calls its `loss_fn`. A new objective is a function registered with `@register_loss("name")`,
or from outside the package `algo.loss=my_pkg.my_mod:my_loss` / an entry point of the group
`t2po.losses` (`get_loss`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from t2po.plugins import load_object, resolve

LOSS_AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_KINDS = ("kl", "abs", "mse", "low_var_kl")

# Bounds of exp() arguments: far beyond any ratio PPO keeps, small enough that exp never overflows.
_LOG_RATIO_BOUND = 20.0


def _check_token_tensors(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    if mask.ndim != 2:
        raise ValueError(f"mask must be a [B, T] tensor, got shape {tuple(mask.shape)}")
    for name, tensor in tensors.items():
        if tensor.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected the mask's shape {tuple(mask.shape)}")


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # torch.where, not values * mask: invalid positions may hold NaN/inf (e.g. padding log-probs).
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def aggregate_loss(loss_mat: torch.Tensor, mask: torch.Tensor, agg: str = "token-mean") -> torch.Tensor:
    """Reduce a [B, T] per-token loss to a scalar over the valid tokens (as verl's `agg_loss`).

        token-mean:           sum_{b,t} m l / sum_{b,t} m              (docs/method.md §4 default)
        seq-mean-token-sum:   mean_b ( sum_t m l )
        seq-mean-token-mean:  mean_b ( sum_t m l / sum_t m )

    Rows without any valid token are left out of the sequence means; with no valid token at all the
    loss is 0.
    """
    if agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; valid choices: {', '.join(LOSS_AGG_MODES)}")
    _check_token_tensors(mask, loss_mat=loss_mat)
    mask = mask.bool()
    if agg == "token-mean":
        return _masked_mean(loss_mat, mask)
    token_counts = mask.sum(dim=-1)
    sequence_losses = torch.where(mask, loss_mat, 0.0).sum(dim=-1)
    if agg == "seq-mean-token-mean":
        sequence_losses = sequence_losses / token_counts.clamp(min=1)
    has_tokens = token_counts > 0
    return torch.where(has_tokens, sequence_losses, 0.0).sum() / has_tokens.sum().clamp(min=1)


def loss_token_counts(lengths: list[int], forced_masks: list[list[bool]], mask_forced: bool) -> list[int]:
    """Per sample, the response tokens the loss mask keeps: all of them, less the tokens TTI forced when
    they are masked (`algo.mask_forced_tokens`). Their sum over a mini-batch is the token-mean denominator
    (`aggregate_loss`'s sum_{b,t} m across micro-batches); counting the forced tokens there too made the
    loss ~4 % smaller in a run where TTI forced 4 % of the tokens (issue 27)."""
    return [n - (sum(map(bool, forced[:n])) if mask_forced else 0)
            for n, forced in zip(lengths, forced_masks, strict=True)]


def ppo_policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float = 3.0,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate with asymmetric clip range and dual clip (docs/method.md §4, "Loss").

        r    = exp(logp - old_logp)                     (log-ratio clamped to [-20, 20])
        pg1  = -A * r
        pg2  = -A * clip(r, 1 - clip_low, 1 + clip_high)
        pg   = max(pg1, pg2)
        pg   = min(pg, -A * dual_clip)   where A < 0    (dual clip bounds the loss of a huge ratio)

    aggregated over the valid tokens by `agg` (see `aggregate_loss`). `advantages` is [B, T] or [B]
    (one value per sequence, broadcast over its tokens). Metrics, over valid tokens:
    clip_frac (pg2 > pg1), clip_frac_lower (A < 0 and max(pg1, pg2) > -A * dual_clip) and
    approx_kl (mean of old_logp - logp, verl's ppo_kl).
    """
    if agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; valid choices: {', '.join(LOSS_AGG_MODES)}")
    if dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (the reference uses 3.0), got {dual_clip}")
    advantages = torch.as_tensor(advantages, dtype=logp.dtype, device=logp.device)
    if advantages.ndim == 1 and advantages.shape[0] == logp.shape[0]:
        advantages = advantages.unsqueeze(-1).expand_as(logp)
    _check_token_tensors(mask, logp=logp, old_logp=old_logp, advantages=advantages)
    valid = mask.bool()

    log_ratio = (logp - old_logp).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    pg1 = -advantages * ratio
    pg2 = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = torch.maximum(pg1, pg2)
    pg3 = -advantages * dual_clip
    negative = advantages < 0
    per_token = torch.where(negative, torch.minimum(clipped, pg3), clipped)
    loss = aggregate_loss(per_token, valid, agg)

    with torch.no_grad():
        metrics = {
            "clip_frac": _masked_mean((pg2 > pg1).to(logp.dtype), valid).item(),
            "clip_frac_lower": _masked_mean(((clipped > pg3) & negative).to(logp.dtype), valid).item(),
            "approx_kl": _masked_mean(-log_ratio, valid).item(),
        }
    return loss, metrics


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate between the policy and the reference policy (docs/method.md §4, "low-variance KL").

        kl:          logp - ref_logp                                  (k1)
        abs:         |logp - ref_logp|
        mse:         0.5 * (logp - ref_logp)^2                        (k2)
        low_var_kl:  x = ref_logp - logp; exp(x) - x - 1, clamped to [-10, 10]   (k3)

    For low_var_kl, x is first clamped to [-20, 20] so exp cannot overflow; this never changes the
    clamped result (k3 >= 10 already at |x| = 20).
    """
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL penalty {kind!r}; valid choices: {', '.join(KL_KINDS)}")
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} must have one shape")
    diff = logp - ref_logp
    if kind == "kl":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    log_ratio = (-diff).clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(-10.0, 10.0)


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    agg: str = "token-mean",
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss of the PPO critic (docs/method.md §4, PPO baseline; verl's `compute_value_loss`).

        V_clip = clip(V, V_old - clip, V_old + clip)
        loss   = 0.5 * agg( max((V - R)^2, (V_clip - R)^2) )

    Metric vf_clip_frac: fraction of valid tokens where the clipped error is the larger one.
    """
    if agg not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation {agg!r}; valid choices: {', '.join(LOSS_AGG_MODES)}")
    _check_token_tensors(mask, values=values, old_values=old_values, returns=returns)
    valid = mask.bool()
    clipped_values = torch.clamp(values, old_values - clip, old_values + clip)
    loss1 = (values - returns) ** 2
    loss2 = (clipped_values - returns) ** 2
    loss = 0.5 * aggregate_loss(torch.maximum(loss1, loss2), valid, agg)
    with torch.no_grad():
        metrics = {"vf_clip_frac": _masked_mean((loss2 > loss1).to(values.dtype), valid).item()}
    return loss, metrics


# ----------------------------------------------------------------------------------------------
# The objective as a component


@dataclass
class LossBatch:
    """One micro-batch as a loss reads it: [B, T] tensors over the response tokens, [B] per row."""

    logp: torch.Tensor  # log-probs of the response tokens under the policy being trained
    entropy: torch.Tensor  # the policy's entropy at each response position
    old_logp: torch.Tensor  # log-probs under the policy that sampled (or its recomputation)
    advantages: torch.Tensor  # [B], one per step sample
    mask: torch.Tensor  # the tokens to train on (padding and, by default, TTI-forced tokens left out)
    ref_logp: torch.Tensor | None = None  # the reference policy's log-probs (KL loss on)
    values: torch.Tensor | None = None  # [B] the critic's values now (algorithms with a critic)
    old_values: torch.Tensor | None = None  # [B] the critic's values when the batch was scored
    returns: torch.Tensor | None = None  # [B] the critic's regression target


LossFn = Callable[[LossBatch, Any], "tuple[torch.Tensor, dict[str, float]]"]
LOSSES: dict[str, LossFn] = {}
ENTRY_POINT_GROUP = "t2po.losses"


def register_loss(name: str) -> Callable[[LossFn], LossFn]:
    """Register `fn(batch: LossBatch, settings) -> (loss, metrics)` as `algo.loss=name`."""

    def deco(fn: LossFn) -> LossFn:
        LOSSES[name] = fn
        return fn

    return deco


def get_loss(name: str) -> LossFn:
    """The loss `algo.loss` names: a registered one, "package.module:function", or an entry point of
    the group `t2po.losses`."""
    return resolve(name, LOSSES, ENTRY_POINT_GROUP, "Loss",
                   lambda path: load_object(path, "Loss", lambda v: callable(v) and not isinstance(v, type),
                                            "loss function"))


@register_loss("ppo")
def ppo_loss(batch: LossBatch, settings: Any) -> tuple[torch.Tensor, dict[str, float]]:
    """The objective of docs/method.md §4: PPO clip with dual clip, minus `entropy_coef` x the mean token entropy,
    plus `kl_coef` x the mean token KL to the reference (when `ref_logp` is given), plus `value_coef` x
    the clipped value loss (when the critic's `values` are given). Entropy and KL are means over the
    micro-batch's trained tokens."""
    s = settings
    pg_loss, metrics = ppo_policy_loss(batch.logp, batch.old_logp, batch.advantages, batch.mask,
                                       s.clip_low, s.clip_high,
                                       s.dual_clip, s.loss_agg)
    loss = pg_loss
    denom = batch.mask.sum().clamp(min=1)
    entropy = (batch.entropy * batch.mask).sum() / denom
    if s.entropy_coef > 0:
        loss = loss - s.entropy_coef * entropy
    metrics = {"pg_loss": pg_loss.item(), "entropy": entropy.item(), **metrics}
    if batch.ref_logp is not None:
        kl = (kl_penalty(batch.logp, batch.ref_logp, s.kl_kind) * batch.mask).sum() / denom
        loss = loss + s.kl_coef * kl
        metrics["kl"] = kl.item()
    if batch.values is not None:
        ones = torch.ones(len(batch.values), 1, device=batch.values.device)
        vl, vm = value_loss(batch.values.unsqueeze(1), batch.old_values.unsqueeze(1), batch.returns.unsqueeze(1),
                            ones, s.value_clip)
        loss = loss + s.value_coef * vl
        metrics.update(value_loss=vl.item(), **vm)
    return loss, metrics
