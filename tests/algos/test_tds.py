"""The TDS resampling rule (docs/method.md §3): resample iff 0 < |Mbar(k) - Mbar(k-1)| < eta."""

import numpy as np
import pytest
import torch

from t2po.algos.sampling import TDSQuantileThreshold, tds_resample_mask, turn_score_deltas


def test_tds_rule_edge_cases():
    nan = float("nan")
    prev = [None, nan, 0.5, 0.5, 0.25, 0.5, 0.5, 0.5]
    scores = [0.4, 0.4, 0.5, 0.6, 0.5, nan, 0.9, 0.3]
    # no prev, NaN prev, delta 0, delta 0.1, delta exactly eta, NaN current, delta 0.4 >= eta, delta 0.2
    mask = tds_resample_mask(prev, scores, eta=0.25)
    assert mask.dtype == np.bool_
    assert mask.tolist() == [False, False, False, True, False, False, False, True]


def test_tds_default_eta_and_tensor_input():
    # eta 0.3 by default: delta 0.25 resamples, delta 0.5 does not
    mask = tds_resample_mask(torch.tensor([0.0, 0.0]), np.array([0.25, -0.5]))
    assert mask.tolist() == [True, False]
    assert tds_resample_mask([0.0], [0.25], eta=0.0).tolist() == [False]


def test_tds_rejects_bad_input():
    with pytest.raises(ValueError, match="one entry per environment"):
        tds_resample_mask([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="eta"):
        tds_resample_mask([0.1], [0.2], eta=-0.1)
    with pytest.raises(ValueError, match="prev_scores"):
        tds_resample_mask(["high"], [0.2])


def test_turn_score_deltas_mark_ineligible_turns_nan():
    deltas = turn_score_deltas([None, 0.5, 0.5], [0.4, 0.45, float("nan")])
    assert np.isnan(deltas[0]) and deltas[1] == pytest.approx(0.05) and np.isnan(deltas[2])


def test_quantile_threshold_flags_the_chosen_fraction_of_deltas():
    # window [0.01, 0.02, ..., 0.10]; linear quantile 0.3 = 0.01 + 0.3 * 9 * 0.01 = 0.037
    threshold = TDSQuantileThreshold(quantile=0.3, window=10)
    assert threshold.eta() == 0.0  # nothing observed: flags nothing
    prev = np.zeros(10)
    scores = np.arange(1, 11) / 100
    threshold.observe(turn_score_deltas(prev, scores))
    assert threshold.eta() == pytest.approx(0.037)
    assert tds_resample_mask(prev, scores, threshold.eta()).tolist() == [True] * 3 + [False] * 7
    # at the paper's absolute eta every one of these small deltas is in the band
    assert tds_resample_mask(prev, scores, 0.3).all()


def test_quantile_threshold_follows_the_recent_window_and_round_trips():
    threshold = TDSQuantileThreshold(quantile=0.5, window=4)
    threshold.observe([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert threshold.eta() == pytest.approx(2.5)
    threshold.observe([10.0, 20.0])  # the two oldest leave the window: [3, 4, 10, 20]
    assert threshold.eta() == pytest.approx(7.0)
    restored = TDSQuantileThreshold(quantile=0.5, window=4)
    restored.load_state_dict(threshold.state_dict())
    assert restored.eta() == threshold.eta() and list(restored.deltas) == [3.0, 4.0, 10.0, 20.0]
    with pytest.raises(ValueError, match="quantile must lie in"):
        TDSQuantileThreshold(quantile=1.0)


def test_random_resampling_control_redraws_as_many_rows_uniformly():
    """random_resample_mask: as many rows as the rule flags, among the eligible ones, every eligible row
    equally likely whichever rows the rule chose."""
    from t2po.algos.sampling import random_resample_mask

    rule = np.array([True, True, False, False, False, False])
    eligible = np.array([True, True, True, True, True, False])
    rng = np.random.default_rng(0)
    picks = np.array([random_resample_mask(rule, eligible, rng) for _ in range(4000)])
    assert (picks.sum(axis=1) == 2).all() and not picks[:, 5].any()
    np.testing.assert_allclose(picks[:, :5].mean(axis=0), 2 / 5, atol=0.03)  # the rule's rows 0, 1 are not favoured
    assert random_resample_mask(np.zeros(3, bool), np.ones(3, bool), rng).sum() == 0
