"""TDS: the turn-level dynamic sampling rule (spec `shared/spec/t2po-method.md` §3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TDSConfig:
    """Turn-level dynamic sampling (spec §3) as the rollout loop takes it and the config holds it
    (`rollout.tds.*`); training only."""

    eta: float = field(default=0.3, metadata={"help": "TDS threshold eta: a turn is regenerated when 0 < |delta| < eta."})
    max_try: int = field(default=2, metadata={"help": "TDS regenerations per turn at most."})
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
