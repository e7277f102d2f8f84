"""Paired comparison with None: interval, test and Holm's correction against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neureg.models.robustness.comparison import compare_with_baseline, holm, paired_difference


def test_interval_and_p_match_the_t_formulas():
    none = {0: 0.50, 1: 0.55, 2: 0.52, 3: 0.48}
    pixel = {0: 0.58, 1: 0.60, 2: 0.61, 3: 0.50, 9: 0.99}  # seed 9 has no pair: left out
    d = np.array([0.08, 0.05, 0.09, 0.02])
    mean, se = d.mean(), d.std(ddof=1) / 2.0
    t_crit = 3.182446305284263  # Student's t, 3 degrees of freedom, 97.5th percentile (tables)
    t_stat = mean / se
    # two-sided p for t with 3 dof: 1 - I_x(1.5, 0.5) with x = 3 / (3 + t^2), written out as the closed form
    theta = math.atan(t_stat / math.sqrt(3))
    p = 1 - 2 / math.pi * (theta + math.sin(theta) * math.cos(theta))
    result = paired_difference("Pixel", "noise", pixel, none)
    assert result.n_pairs == 4
    assert result.mean == pytest.approx(mean)
    assert (result.low, result.high) == pytest.approx((mean - t_crit * se, mean + t_crit * se))
    assert result.p == pytest.approx(p, rel=1e-9)


def test_holm_step_down():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2, float("nan"), 0.01]) == pytest.approx([0.2, float("nan"), 0.02], nan_ok=True)
    assert holm([0.6, 0.5]) == pytest.approx([1.0, 1.0])


def test_non_finite_or_unpaired_metrics_are_not_compared():
    none = {0: 0.1, 1: 0.2, 2: 0.3}
    assert math.isnan(paired_difference("X", "m", {0: float("inf"), 1: 0.2, 2: 0.1}, none).p)
    assert math.isnan(paired_difference("X", "m", {0: 0.4}, none).p)  # one pair: no interval


def test_compare_with_baseline_corrects_per_metric_and_flags_significance():
    rows = []
    rng = np.random.default_rng(1)
    for seed in range(5):
        base = 0.5 + 0.01 * rng.standard_normal()
        rows.append({"condition": "None", "seed": seed, "acc": base})
        rows.append({"condition": "Better", "seed": seed, "acc": base + 0.2 + 0.01 * rng.standard_normal()})
        rows.append({"condition": "Same", "seed": seed, "acc": base + 0.01 * rng.standard_normal()})
    found = {d.condition: d for d in compare_with_baseline(rows, ["acc"])}
    assert set(found) == {"Better", "Same"}
    assert found["Better"].significant and found["Better"].low > 0
    assert not found["Same"].significant
    assert found["Same"].p_holm == pytest.approx(
        min(1.0, 2 * min(found["Same"].p, found["Better"].p))
        if found["Same"].p < found["Better"].p
        else max(found["Same"].p, 2 * found["Better"].p)
    )
    assert compare_with_baseline([r for r in rows if r["condition"] != "None"], ["acc"]) == []
