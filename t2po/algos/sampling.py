"""TDS: the turn-level dynamic sampling rule (spec `shared/spec/t2po-method.md` §3), with its threshold
either absolute (the paper's eta) or relative to the run's own turn-score deltas (`TDSQuantileThreshold`).

Why a relative threshold: |Mbar(k) - Mbar(k-1)| depends on the model's M scale. At eta = 0.3 a
135M-parameter model has 72-100 % of its eligible turns in the band (issue 18: p10/p50/p90 =
0.017/0.067/0.159 on Sokoban), so TDS redraws almost every turn instead of selecting the stuck ones.
Flagging the turns below a quantile of the recent deltas makes the flag rate a setting.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


#: TDS or its control arm (`TDSConfig.control`)
TDS_CONTROLS = ("none", "random")


@dataclass
class TDSConfig:
    """Turn-level dynamic sampling (spec §3) as the rollout loop takes it and the config holds it
    (`rollout.tds.*`); training only."""

    eta: float = field(default=0.3, metadata={"help": "TDS threshold eta: a turn is regenerated when 0 < |delta| < eta (the paper's absolute threshold; unused when quantile is set)."})
    max_try: int = field(default=2, metadata={"help": "TDS regenerations per turn at most (the reference's scripts: 2, "
                                                      "configs/t2po-paper.yaml; configs/default.yaml uses 1 to halve "
                                                      "the cost of redraws)."})
    quantile: float | None = field(default=None, metadata={"help": "Threshold relative to the run's own deltas instead of eta: regenerate the turns whose |delta Mbar| is below this quantile of the last `window` first-sample deltas (TDSQuantileThreshold), so the flag rate is about this fraction at any model scale. null = the absolute eta (the paper's)."})
    window: int = field(default=1024, metadata={"help": "Recent first-sample deltas the quantile threshold is estimated from (kept across iterations and checkpointed)."})
    control: str = field(default="none", metadata={"help": "Control arm for TDS (issue 27): none = TDS's rule; random "
                                                           "= redraw as many eligible turns as the rule flags, chosen "
                                                           "uniformly at random (and as many of the redrawn ones as "
                                                           "the rule flags again on each further try): TDS's cost and "
                                                           "rate without its uncertainty signal."})
    enabled: bool | None = field(default=True, metadata={"help": "Turn-level dynamic sampling on or off. In the config, null = on for t2po, off for the baselines (the algorithm's default); always off with algo.dynamic_sampling."})


def _as_scores(scores: Any, name: str) -> np.ndarray:
    """1-D float64 array from a list / array / tensor; None (no score) becomes NaN."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().cpu().tolist()
    elif isinstance(scores, np.ndarray):
        if scores.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one turn score per environment), got shape {scores.shape}")
        scores = scores.tolist()
    try:
        return np.array([np.nan if s is None else float(s) for s in scores], dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must hold one number (or None) per environment: {err}") from err


def tds_resample_mask(prev_scores: Any, scores: Any, eta: float = 0.3) -> np.ndarray:
    """Which turns TDS regenerates (spec §3): the turns whose score barely moved.

        delta = |Mbar(k) - Mbar(k-1)|,   resample  <=>  0 < delta < eta

    `prev_scores[i]` is the turn score of environment i's accepted previous turn, `scores[i]` that of
    the turn just generated. A missing (None) or NaN previous score (the env's first turn) never
    resamples, nor does a NaN current score; delta exactly 0 or exactly eta does not resample either.
    Returns a bool array, one entry per environment.
    """
    if not eta >= 0.0:
        raise ValueError(f"eta must be a non-negative number, got {eta}")
    prev = _as_scores(prev_scores, "prev_scores")
    current = _as_scores(scores, "scores")
    if prev.shape != current.shape:
        raise ValueError(
            f"prev_scores ({prev.shape[0]}) and scores ({current.shape[0]}) need one entry per environment"
        )
    delta = np.abs(current - prev)
    with np.errstate(invalid="ignore"):
        # Comparisons with NaN are False, so a missing score never resamples.
        return (delta > 0.0) & (delta < eta)


def turn_score_deltas(prev_scores: Any, scores: Any) -> np.ndarray:
    """|Mbar(k) - Mbar(k-1)| per environment (spec §3); NaN where either score is missing (a first
    turn, an empty response)."""
    prev = _as_scores(prev_scores, "prev_scores")
    current = _as_scores(scores, "scores")
    if prev.shape != current.shape:
        raise ValueError(
            f"prev_scores ({prev.shape[0]}) and scores ({current.shape[0]}) need one entry per environment"
        )
    return np.abs(current - prev)


def random_resample_mask(rule_mask: np.ndarray, eligible: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The random-resampling control (issue 27): as many rows as `rule_mask` flags, drawn uniformly
    without replacement from the `eligible` rows, so the redraw rate is TDS's and only the choice of rows
    loses the uncertainty signal."""
    rule_mask, eligible = np.asarray(rule_mask, dtype=bool), np.asarray(eligible, dtype=bool)
    chosen = rng.choice(np.flatnonzero(eligible), size=min(int(rule_mask.sum()), int(eligible.sum())), replace=False)
    mask = np.zeros(rule_mask.shape, dtype=bool)
    mask[chosen] = True
    return mask


def tds_diagnostics(first_in_band: Any, kept_in_band: Any, kept_deltas: Any, discarded_deltas: Any) -> dict[str, float]:
    """What TDS changed in a batch (issue 27), over its eligible turns (a second or later turn with a score):

    - `tds_inband_before` / `tds_inband_after`: the share of eligible turns whose first sample / kept sample
      lies in the band 0 < |delta Mbar| < eta. Selection shows as after < before; an i.i.d. redraw of every
      flagged turn lands in the band again with the band's own probability.
    - `tds_kept_delta_mean` / `_p50`: |delta Mbar| of the kept samples of regenerated turns (`kept_deltas`),
      `tds_discarded_delta_mean` / `_p50`: that of the discarded samples. Empty groups are left out.
    """
    first, kept = np.asarray(first_in_band, dtype=bool), np.asarray(kept_in_band, dtype=bool)
    stats: dict[str, float] = {}
    if first.size:
        stats["tds_inband_before"] = float(first.mean())
        stats["tds_inband_after"] = float(kept.mean())
    for name, values in (("kept", kept_deltas), ("discarded", discarded_deltas)):
        values = np.asarray([v for v in values if np.isfinite(v)], dtype=np.float64)
        if values.size:
            stats[f"tds_{name}_delta_mean"] = float(values.mean())
            stats[f"tds_{name}_delta_p50"] = float(np.median(values))
    return stats


class TDSQuantileThreshold:
    """A TDS threshold relative to the run's own deltas: eta = the `quantile` of the last `window`
    first-sample deltas |Mbar(k) - Mbar(k-1)| of eligible turns (numpy's linear quantile).

    Use per turn: `observe(deltas of the batch's first samples)`, then `eta()`, then
    `tds_resample_mask(prev, scores, eta)` for the first samples and their regenerations. Because a
    batch's own deltas enter the window before its threshold is read, the fraction of a batch
    flagged is close to `quantile` from the first turn of a run on. Regenerated samples' deltas are
    not observed: the threshold describes the policy's first draws. The window is the state to keep
    across iterations (`state_dict` / `load_state_dict`, saved with checkpoints). Under torchrun each
    rank keeps its own window of its own turns (the rollout loop has no collective per turn), so the
    flag rate is about `quantile` on every rank, but the flags differ from one process's.
    """

    def __init__(self, quantile: float, window: int = 1024) -> None:
        if not 0.0 < quantile < 1.0:
            raise ValueError(f"the TDS quantile must lie in (0, 1), got {quantile}")
        if window < 1:
            raise ValueError(f"the TDS window must hold at least one delta, got {window}")
        self.quantile = quantile
        self.deltas: deque[float] = deque(maxlen=window)

    def observe(self, deltas: Iterable[float]) -> None:
        """Add the finite deltas (NaN = ineligible turn, skipped)."""
        self.deltas.extend(float(d) for d in deltas if np.isfinite(d))

    def eta(self) -> float:
        """The current threshold; 0 (flags nothing) before any delta has been observed."""
        if not self.deltas:
            return 0.0
        return float(np.quantile(np.fromiter(self.deltas, dtype=np.float64), self.quantile))

    def state_dict(self) -> dict[str, Any]:
        return {"quantile": self.quantile, "window": self.deltas.maxlen, "deltas": list(self.deltas)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.deltas.clear()
        self.observe(state["deltas"])
