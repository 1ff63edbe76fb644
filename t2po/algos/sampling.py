"""TDS: the turn-level dynamic sampling rule (docs/method.md §3), with its threshold
either absolute (the paper's eta) or relative to the run's own turn-score deltas (`TDSQuantileThreshold`).

Why a relative threshold: |Mbar(k) - Mbar(k-1)| depends on the model's M scale. At eta = 0.3 a
135M-parameter model has 72-100 % of its eligible turns in the band (issue 18: p10/p50/p90 =
0.017/0.067/0.159 on Sokoban), so TDS redraws almost every turn instead of selecting the stuck ones.
Flagging the turns below a quantile of the recent deltas makes the flag rate a setting.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from t2po.errors import out_of_range


#: TDS or its control arm (`TDSConfig.control`)
TDS_CONTROLS = ("none", "random")


@dataclass
class TDSConfig:
    """Turn-level dynamic sampling (docs/method.md §3) as the rollout loop takes it and the config holds it
    (`rollout.tds.*`); training only."""

    eta: float = field(default=0.3,
            metadata={"help": "TDS threshold eta: a turn is regenerated when 0 < |delta| < eta (the paper's absolute "
                              "threshold; unused when quantile is set)."})
    max_try: int = field(default=2, metadata={"help": "TDS regenerations per turn at most (the reference's scripts: 2, "
                                                      "configs/t2po-paper.yaml; configs/default.yaml uses 1 to halve "
                                                      "the cost of redraws)."})
    quantile: float | None = field(default=None,
            metadata={"help": "Threshold relative to the run's own deltas instead of eta: regenerate the turns whose "
                              "|delta Mbar| is below this quantile of the last `window` first-sample deltas "
                              "(TDSQuantileThreshold), so the flag rate is about this fraction at any model scale. "
                              "null = the absolute eta (the paper's)."})
    window: int = field(default=1024,
            metadata={"help": "Recent first-sample deltas the quantile threshold is estimated from (kept across "
                              "iterations and checkpointed)."})
    control: str = field(default="none", metadata={"help": "Control arm for TDS (issue 27): none = TDS's rule; random "
                                                           "= redraw as many eligible turns as the rule flags, chosen "
                                                           "uniformly at random (and as many of the redrawn ones as "
                                                           "the rule flags again on each further try): TDS's cost and "
                                                           "rate without its uncertainty signal."})
    enabled: bool | None = field(default=True,
            metadata={"help": "Turn-level dynamic sampling on or off. In the config, null = on for t2po, off for the "
                              "baselines (the algorithm's default); always off with algo.dynamic_sampling."})

    def check(self, prefix: str = "") -> list[str]:
        """One line per setting that cannot work (`prefix`: where the config holds it, e.g. "rollout.tds.")."""
        errors = out_of_range(f"{prefix}eta", self.eta, 0) + out_of_range(f"{prefix}max_try", self.max_try, 0)
        if self.quantile is not None and not 0 < self.quantile < 1:
            errors.append(f"{prefix}quantile={self.quantile}: must be in (0, 1) (or null for the absolute {prefix}eta)")
        if self.control not in TDS_CONTROLS:
            errors.append(f"{prefix}control={self.control!r}: choose {' or '.join(TDS_CONTROLS)}")
        return errors + out_of_range(f"{prefix}window", self.window, 1)


@dataclass
class TurnResample:
    """What TDS did to one turn's rows: regenerations per row, whether the first and the kept sample lie in
    the band (`tds_diagnostics`), and the replaced responses (kept for the traces only, never trained on)."""

    resampled: list[int]
    in_band: list[tuple[bool, bool]]
    discarded: list[list[dict]]

    @classmethod
    def none(cls, rows: int) -> "TurnResample":
        return cls([0] * rows, [(False, False)] * rows, [[] for _ in range(rows)])


class TDSResampler:
    """Turn-level dynamic sampling (docs/method.md §3) as the rollout loop's resampling phase: a turn whose turn
    score moved less than the threshold since the episode's previous accepted turn is regenerated, only
    the flagged rows, in one batch, at most `max_try` times, keeping the last sample. It owns its
    threshold (the absolute `eta`, or a `TDSQuantileThreshold` whose window persists across the calls of
    one resampler: the trainer keeps one per run and checkpoints it) and its counters (`begin` starts
    a rollout call's). Validation and evaluation pass no resampler. With `control="random"` (issue 27) it
    redraws as many eligible rows as the rule flags, chosen at random (`random_resample_mask`)."""

    def __init__(self, config: TDSConfig, threshold: "TDSQuantileThreshold | None" = None) -> None:
        self.config = config
        if threshold is None and config.quantile is not None:
            threshold = TDSQuantileThreshold(config.quantile, config.window)
        self.threshold = threshold
        self.counters: dict[str, float] = {}

    def begin(self) -> None:
        """Start a rollout call's counters (eligible turns, regenerations, tokens of discarded samples)."""
        self.counters = defaultdict(float)

    def resample(self, prev_scores: list[float], gens: list, regenerate: Callable[[np.ndarray, int], list],
                 seed: int = 0) -> TurnResample:
        """Regenerate the flagged rows of one turn in place in `gens` (each with `turn_score`,
        `num_tokens`, `text`, `token_ids`, `forced`); `regenerate(rows, attempt)` answers those rows again.
        `seed` seeds the random control's choice of rows."""
        c, out = self.counters, TurnResample.none(len(gens))
        first_deltas = turn_score_deltas(prev_scores, [g.turn_score for g in gens])
        c["tds_eligible_turns"] += int(np.isfinite(first_deltas).sum())
        c["tds_extra_tokens"] += 0  # present (0) in an iteration where nothing is flagged
        if self.threshold is not None:
            self.threshold.observe(first_deltas)
        eta = self.config.eta if self.threshold is None else self.threshold.eta()
        first_in_band = tds_resample_mask(prev_scores, [g.turn_score for g in gens], eta)
        control = np.random.default_rng(seed) if self.config.control == "random" else None
        if control is not None:  # the random-resampling control: as many eligible turns, chosen at random
            flagged = np.flatnonzero(random_resample_mask(first_in_band, np.isfinite(first_deltas), control))
        else:
            flagged = np.flatnonzero(first_in_band)
        for attempt in range(1, self.config.max_try + 1):
            if flagged.size == 0:
                break
            regen = regenerate(flagged, attempt)
            for j, g in zip(flagged, regen):
                c["tds_extra_tokens"] += gens[j].num_tokens  # the discarded sample's tokens
                out.discarded[j].append({"text": gens[j].text, "token_ids": list(gens[j].token_ids),
                                         "turn_score": gens[j].turn_score, "forced": list(gens[j].forced),
                                         "tds_delta": float(turn_score_deltas([prev_scores[j]],
                                                                              [gens[j].turn_score])[0])})
                gens[j] = g
                out.resampled[j] += 1
            c["tds_regenerations"] += flagged.size
            again = tds_resample_mask([prev_scores[j] for j in flagged], [g.turn_score for g in regen], eta)
            if control is not None:  # the control redraws as many of them, at random
                again = random_resample_mask(again, np.ones(flagged.size, dtype=bool), control)
            flagged = flagged[again]
        kept_in_band = tds_resample_mask(prev_scores, [g.turn_score for g in gens], eta)
        out.in_band = [(bool(a), bool(b)) for a, b in zip(first_in_band, kept_in_band)]
        return out


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
    """Which turns TDS regenerates (docs/method.md §3): the turns whose score barely moved.

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
    """|Mbar(k) - Mbar(k-1)| per environment (docs/method.md §3); NaN where either score is missing (a first
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
