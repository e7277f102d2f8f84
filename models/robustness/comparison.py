"""Is a condition more robust than None? Paired differences over seeds, with a confidence interval and a test.

Every condition is trained with the same seeds, and seed s of two conditions shares its initialisation and
data order, so the comparison is paired: d_s = metric(condition, s) - metric(None, s). Reported: the mean
difference, its 95% confidence interval from Student's t with n - 1 degrees of freedom, and the two-sided
paired t-test's p value. Several conditions are compared with None on each metric, so significance is
judged after Holm's step-down correction over those conditions (family-wise error 0.05 per metric); the
raw p value is kept beside it. A metric with a non-finite value (an attack that never succeeded, so the
median perturbation is beyond every attack) has no test: it is reported as not comparable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from ..conditions import BASELINE


@dataclass(frozen=True)
class Difference:
    """Condition minus None on one metric, over the seeds both have."""

    condition: str
    metric: str
    n_pairs: int
    mean: float  # mean paired difference (nan when not comparable)
    low: float  # 95% confidence interval
    high: float
    p: float  # two-sided paired t-test
    p_holm: float = float("nan")  # after Holm's correction over the conditions of this metric
    alpha: float = 0.05

    @property
    def significant(self) -> bool:
        """Whether the difference survives Holm's correction at ``alpha``."""
        return bool(np.isfinite(self.p_holm) and self.p_holm < self.alpha)


def paired_difference(condition: str, metric: str, values: dict, baseline: dict, level: float = 0.95) -> Difference:
    """``values`` and ``baseline``: seed -> metric value. Paired over the seeds both have."""
    seeds = sorted(set(values) & set(baseline))
    d = np.array([values[s] - baseline[s] for s in seeds], dtype=float)
    if d.size < 2 or not np.all(np.isfinite(d)):
        return Difference(condition, metric, int(d.size), float("nan"), float("nan"), float("nan"), float("nan"))
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0.0:  # identical differences on every seed: the interval is the point, the test is degenerate
        return Difference(condition, metric, int(d.size), mean, mean, mean, 0.0 if mean != 0 else 1.0)
    half = float(stats.t.ppf(0.5 + level / 2, d.size - 1)) * sd / np.sqrt(d.size)
    p = float(stats.ttest_rel([values[s] for s in seeds], [baseline[s] for s in seeds]).pvalue)
    return Difference(condition, metric, int(d.size), mean, mean - half, mean + half, p)


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p values (nan stays nan and is not counted)."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite])]
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def compare_with_baseline(rows: list[dict], metrics: list[str], baseline: str = BASELINE) -> list[Difference]:
    """Every condition against ``baseline`` on every metric; ``rows`` hold 'condition', 'seed' and the metrics."""
    by_condition: dict = {}
    for row in rows:
        by_condition.setdefault(row["condition"], []).append(row)
    if baseline not in by_condition:
        return []
    found = []
    for metric in metrics:
        base = {r["seed"]: r[metric] for r in by_condition[baseline] if metric in r}
        tests = [
            paired_difference(c, metric, {r["seed"]: r[metric] for r in group if metric in r}, base)
            for c, group in by_condition.items()
            if c != baseline
        ]
        adjusted = holm([t.p for t in tests])
        found += [Difference(**{**t.__dict__, "p_holm": float(a)}) for t, a in zip(tests, adjusted)]
    return found
