"""The TDS resampling rule (spec §3): resample iff 0 < |Mbar(k) - Mbar(k-1)| < eta."""

import numpy as np
import pytest
import torch

from t2po.algos.sampling import tds_resample_mask


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
