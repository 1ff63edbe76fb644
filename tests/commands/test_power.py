"""benchmarks/power.py: the power of the paired t-test over seeds against published and hand-computed values, and
against scipy where it is installed; the plan it prints for the ablation's design."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


power = _module("power")


def test_t_quantiles_equal_the_printed_table():
    """The two-sided 95 % t quantiles benchmarks/learning.py carries as a table (Student's t tables, 3 decimals)."""
    table = _module("learning").T95
    for df in (1, 2, 4, 10, 30):
        assert power.t_quantile(0.975, df) == pytest.approx(table[df - 1], abs=6e-4)


def test_power_at_no_difference_is_the_level():
    for n in (2, 5, 30):
        assert power.t_test_power(0.0, 1.0, n, alpha=0.05) == pytest.approx(0.05, abs=1e-6)


def test_seeds_needed_match_the_published_sample_sizes():
    """Paired two-sided t-test, alpha 0.05, power 0.80 (Cohen 1988, Table 2.4.1; G*Power gives the same): effect size
    d = 0.5 needs 34 pairs, 0.8 needs 15, 1.0 needs 10. Only the ratio effect / sd matters."""
    assert power.seeds_needed(0.5, 1.0) == 34
    assert power.seeds_needed(0.08, 0.1) == 15
    assert power.seeds_needed(0.10, 0.10) == 10
    # and it is the smallest: one seed fewer falls short
    assert power.t_test_power(0.10, 0.10, 9) < 0.8 <= power.t_test_power(0.10, 0.10, 10)


def test_power_approaches_the_normal_approximation_with_many_seeds():
    """Hand calculation: with n = 400 the t-test is the z-test, power = Phi(d sqrt(n) - 1.96) + Phi(-d sqrt(n) - 1.96);
    d = 0.1: Phi(0.04) + Phi(-3.96) = 0.51595 + 0.00004."""
    assert power.t_test_power(0.1, 1.0, 400) == pytest.approx(0.5160, abs=2e-3)


def test_noncentral_t_agrees_with_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 4, 9, 30, 200, 2000):
        for x, nc in ((2.0, 0.0), (2.2, 3.0), (-1.0, 0.5), (1.5, 10.0), (0.3, -2.0)):
            assert power.t_sf(x, df, nc) == pytest.approx(stats.nct.sf(x, df, nc), abs=1e-6), (df, x, nc)
    for n, d in ((3, 0.43 / 0.144), (8, 1.25), (13, 0.87)):  # against scipy's noncentral t, two-sided
        crit = stats.t.ppf(0.975, n - 1)
        nc = d * math.sqrt(n)
        expected = stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)
        assert power.t_test_power(d, 1.0, n) == pytest.approx(expected, abs=1e-6)


def test_difference_sd_adds_seed_spread_and_room_noise():
    # tau 0.06, v 0.32 over 128 rooms: sqrt(0.0036 + 0.0025) = 0.0781
    assert power.difference_sd(0.06, 0.32, 128) == pytest.approx(math.sqrt(0.0036 + 0.0025))


def test_plan_from_the_committed_results():
    """The estimates come from docs/results (learning.json: >= 5 seeds x 128 rooms with per-room outcomes): more rooms
    never need more seeds, and the design's power is the t-test's at the scenario's sd."""
    est = power.estimates()
    assert est["learning"]["seeds"] >= 5 and est["learning"]["rooms"] == 128 and 0 < est["learning"]["room_var"] <= 0.5
    plan = power.plan(est, design=(8, 128))
    for scenario in plan["scenarios"].values():
        needed = [row["seeds"] for row in scenario["by_rooms"].values()]
        assert needed == sorted(needed, reverse=True)
        sd = power.difference_sd(scenario["tau"], plan["room_var"], 128)
        assert scenario["design"]["power"] == pytest.approx(power.t_test_power(0.10, sd, 8))
    assert "seeds for 80% power to detect 0.10" in power.format_plan(plan)
