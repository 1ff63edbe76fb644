"""The T2PO algorithms as pure numpy/torch functions (no environment, engine or trainer imports).

Every function cites the section of the method spec (`shared/spec/t2po-method.md`) it implements.
Per-sample arrays are 1-D with one entry per training sample (one environment step); ids may be ints
or strings; the samples of one trajectory appear in step order.
"""

from t2po.algos.advantages import (
    discounted_returns,
    gae_advantages,
    gigpo_advantages,
    grpo_advantages,
    rloo_advantages,
)
from t2po.algos.intervention import ThinkingIntervention
from t2po.algos.losses import kl_penalty, ppo_policy_loss
from t2po.algos.sampling import tds_resample_mask
from t2po.algos.uncertainty import entropy_from_logits, turn_score, uncertainty_signal

__all__ = [
    "uncertainty_signal",
    "entropy_from_logits",
    "turn_score",
    "ThinkingIntervention",
    "tds_resample_mask",
    "discounted_returns",
    "grpo_advantages",
    "gigpo_advantages",
    "rloo_advantages",
    "gae_advantages",
    "ppo_policy_loss",
    "kl_penalty",
]
