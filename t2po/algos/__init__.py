"""The T2PO algorithms as pure numpy/torch functions (no environment, engine or trainer imports).

Every function cites the section of the method description (docs/method.md) it implements.
Per-sample arrays are 1-D with one entry per training sample (one environment step); ids may be ints
or strings; the samples of one trajectory appear in step order.
"""

from t2po.algos.advantages import (
    GIGPO_MODES,
    discounted_returns,
    episode_scores,
    gae_advantages,
    gigpo_advantages,
    grpo_advantages,
    penalized_step_returns,
    rloo_advantages,
    turn_level_gae,
)
from t2po.algos.estimators import ALGORITHMS, Advantages, Algorithm, StepBatch, register_algorithm
from t2po.algos.intervention import TTI_CONTROLS, InterventionConfig, ThinkingIntervention
from t2po.algos.losses import KL_KINDS, LOSS_AGG_MODES, kl_penalty, ppo_policy_loss
from t2po.algos.sampling import (TDS_CONTROLS, TDSConfig, TDSQuantileThreshold, random_resample_mask, tds_diagnostics,
                                tds_resample_mask, turn_score_deltas)
from t2po.algos.uncertainty import entropy_from_logits, turn_score, uncertainty_signal

__all__ = [
    "uncertainty_signal",
    "entropy_from_logits",
    "turn_score",
    "ThinkingIntervention",
    "InterventionConfig",
    "tds_resample_mask",
    "TDSConfig",
    "turn_score_deltas",
    "TDSQuantileThreshold",
    "random_resample_mask",
    "tds_diagnostics",
    "TDS_CONTROLS",
    "TTI_CONTROLS",
    "discounted_returns",
    "episode_scores",
    "penalized_step_returns",
    "grpo_advantages",
    "gigpo_advantages",
    "rloo_advantages",
    "gae_advantages",
    "turn_level_gae",
    "ALGORITHMS",
    "Algorithm",
    "Advantages",
    "StepBatch",
    "register_algorithm",
    "LOSS_AGG_MODES",
    "KL_KINDS",
    "GIGPO_MODES",
    "ppo_policy_loss",
    "kl_penalty",
]
