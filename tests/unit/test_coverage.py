"""Do migfd's 95% intervals hold the true median 95% of the time, at the trial counts a run has?

A simulation, seeded: trials are drawn from lognormal distributions whose
log-spreads are those the committed reference run measured, point by point
(times of every scenario, 0.03 to 1.8; median about 0.2), at 3 to 8 trials,
and each interval is checked against the median it should hold. The
spreads are read from the reference run; the draws are FIXTURES of the
statistics, not measurements.

Checked: a point's median interval (:func:`migfd.stats.median_ci`, every
table and figure) and a comparison's ratio interval, moderated within its
family as ``migfd compare`` computes it, each at least 93% at every n. The
percentile bootstrap the project used before covers far less at 3 trials
(75% on these spreads, 89% at 4, 87% at 7 when it was measured against the
old median_ci); a test here keeps that on record. A heavy-tailed variant
(one trial in ten from a mode 5x slower) is printed, with no threshold:
run ``pytest -s`` to see it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

from migfd.paths import repo_root
from migfd.results.load import POINT_KEYS, load_results, newest_run
from migfd.stats import bootstrap_ci, fit_spread_prior, log_ratio_test, log_spread, median_ci

REFERENCE = newest_run(repo_root() / "benchmarks" / "reference")
TIME_METRICS = ("downtime_ns", "total_ns", "stop_resume_ns", "max_gap_ns", "value")
TRIALS = range(3, 9)
#: draws per point and trial count: ~150 points x 10 = ~1500 intervals per n, so a true coverage
#: of 95% reads 95% +- 1.1% (two standard errors) and 93% is a real failure, not bad luck
DRAWS = 10
FLOOR = 0.93


@pytest.fixture(scope="module")
def families() -> dict[tuple, list[float]]:
    """The reference run's log-spreads, per family (scenario, mode, metric): one per point."""
    if REFERENCE is None:
        pytest.skip("no committed reference run under benchmarks/reference/")
    df, _ = load_results(REFERENCE)
    ok = df[df["ok"].fillna(False).astype(bool)]
    out: dict[tuple, list[float]] = {}
    for key, g in ok.groupby(POINT_KEYS, dropna=False):
        point = dict(zip(POINT_KEYS, key))
        for metric in TIME_METRICS:
            v = pd.to_numeric(g[metric], errors="coerce").dropna().astype(float).to_numpy()
            if len(v) > 1 and (v > 0).all() and np.log(v).std(ddof=1) > 0:
                out.setdefault((point["scenario"], point["mode"], metric), []).append(float(np.log(v).std(ddof=1)))
    assert sum(map(len, out.values())) > 100, "the reference run should have 100+ timed points"
    return out


def spreads_of(families) -> list[float]:
    return [s for members in families.values() for s in members]


def coverage_of_median_ci(sigmas, n: int, rng, draw=None) -> float:
    """Share of median_ci intervals holding the true median (1: the draws are scaled around it)."""
    hits = total = 0
    for sigma in sigmas:
        for _ in range(DRAWS):
            x = draw(rng, sigma, n) if draw else np.exp(rng.normal(0.0, sigma, n))
            ci = median_ci(x)
            hits += ci.low <= 1.0 <= ci.high
            total += 1
    return hits / total


@pytest.mark.parametrize("n", TRIALS)
def test_median_intervals_cover_the_true_median(families, n):
    rng = np.random.default_rng(1000 + n)
    coverage = coverage_of_median_ci(spreads_of(families), n, rng)
    assert coverage >= FLOOR, f"{n} trials: the 95% interval held the median {coverage:.1%} of the time"


@pytest.mark.parametrize("n", TRIALS)
def test_compare_ratio_intervals_cover_the_true_ratio(families, n):
    """Two runs of the same code: every point of a family drawn twice with its own spread, the
    variances moderated within the family as compare does; the true ratio is 1."""
    rng = np.random.default_rng(2000 + n)
    hits = total = 0
    for sigmas in families.values():
        for _ in range(DRAWS):
            draws = [(np.exp(rng.normal(0, s, n)), np.exp(rng.normal(0, s, n))) for s in sigmas]
            prior = fit_spread_prior([log_spread(b, m) for b, m in draws])
            for b, m in draws:
                ci = log_ratio_test(b, m, prior).interval
                hits += ci.low <= 1.0 <= ci.high
                total += 1
    coverage = hits / total
    assert coverage >= FLOOR, f"{n} trials a side: the ratio's interval held 1 {coverage:.1%} of the time"


def test_the_percentile_bootstrap_does_not_cover_at_3_trials(families):
    """Why the project left it: with 3 trials its interval is about their range, which holds the
    median 1 - 2 * (1/2)^3 = 75% of the time. Fewer draws than above: each takes 4000 resamples."""
    rng = np.random.default_rng(3)
    sigmas = spreads_of(families)
    hits = total = 0
    for sigma in sigmas[::3]:
        for _ in range(4):
            low, high = bootstrap_ci((np.exp(rng.normal(0, sigma, 3)),), lambda x, axis=-1: np.median(x, axis=axis))
            hits += low <= 1.0 <= high
            total += 1
    assert hits / total < FLOOR, f"the percentile bootstrap covered {hits / total:.1%} at 3 trials"


def heavy_tailed(rng, sigma: float, n: int) -> np.ndarray:
    """Lognormal trials, one in ten (on average) from a mode 5x slower: a busy CPU, a page-cache miss."""
    slow = rng.random(n) < 0.1
    return np.exp(rng.normal(0.0, sigma, n)) * np.where(slow, 5.0, 1.0)


def heavy_tailed_median(sigma: float) -> float:
    """The true median of :func:`heavy_tailed`: where 0.9 F(m) + 0.1 F(m/5) = 1/2."""
    def cdf(m: float) -> float:
        return 0.9 * stats.norm.cdf(math.log(m) / sigma) + 0.1 * stats.norm.cdf(math.log(m / 5) / sigma)

    return optimize.brentq(lambda m: cdf(m) - 0.5, 0.5, 5.0)


def test_heavy_tailed_coverage_is_reported(families, capsys):
    """No threshold: how the median and ratio intervals fare when the noise is not lognormal."""
    sigmas = spreads_of(families)[::2]
    medians = {s: heavy_tailed_median(s) for s in sigmas}
    lines = []
    for n in TRIALS:
        rng = np.random.default_rng(4000 + n)
        hits = total = 0
        for sigma in sigmas:
            for _ in range(DRAWS):
                ci = median_ci(heavy_tailed(rng, sigma, n))
                hits += ci.low <= medians[sigma] <= ci.high
                total += 1
        lines.append(f"n={n}: {hits / total:.1%}")
    ratios = []
    for n in TRIALS:
        rng = np.random.default_rng(5000 + n)
        hits = total = 0
        for sigmas in families.values():
            for _ in range(DRAWS // 2):
                draws = [(heavy_tailed(rng, s, n), heavy_tailed(rng, s, n)) for s in sigmas]
                prior = fit_spread_prior([log_spread(b, m) for b, m in draws])
                for b, m in draws:
                    ci = log_ratio_test(b, m, prior).interval
                    hits += ci.low <= 1.0 <= ci.high
                    total += 1
        ratios.append(f"n={n}: {hits / total:.1%}")
    assert len(lines) == len(ratios) == len(TRIALS)
    with capsys.disabled():
        print("\nheavy-tailed trials (1 in 10 from a 5x slower mode), 95% intervals cover: the median "
              + ", ".join(lines) + "; compare's ratio (true 1) " + ", ".join(ratios))
