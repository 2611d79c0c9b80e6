"""migfd.stats: intervals, threshold verdicts, change verdicts; and that a comparison built on them
calls a real slowdown ``regressed`` and plain noise nothing.

The numbers here are FIXTURES of the statistics, not measurements: small
hand-made samples whose medians and intervals can be checked by hand, and
seeded random samples where the point is the verdict, not the value. The
committed reference run is used as it is, and doctored (every time × 3) or
re-sampled, to check the verdicts on real trial counts (3-5 per point).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from migfd.paths import repo_root
from migfd.results.compare import compare
from migfd.results.load import POINT_KEYS, clean_results, load_results, newest_run
from migfd.stats import (
    FAIL,
    IMPROVED,
    INCONCLUSIVE,
    NOT_MEASURED,
    PASS,
    REGRESSED,
    UNCHANGED,
    Interval,
    adjust_p_values,
    change,
    change_p_value,
    combine_verdicts,
    median_ci,
    precise_enough,
    ratio_ci,
    relative_half_width,
    threshold_verdict,
)


REFERENCE = newest_run(repo_root() / "benchmarks" / "reference")
TIME_METRICS = ("downtime_ns", "total_ns", "stop_resume_ns", "max_gap_ns")


# -- intervals ------------------------------------------------------------------


def test_median_ci_edges():
    assert math.isnan(median_ci([]).value)
    one = median_ci([5.0, math.nan])
    assert one.value == 5 and one.n == 1 and not one.known
    same = median_ci([3, 3, 3])
    assert (same.value, same.low, same.high, same.n) == (3, 3, 3, 3)


def test_median_ci_brackets_the_median_and_is_reproducible():
    values = [10, 11, 12, 13, 30]
    ci = median_ci(values)
    assert ci.value == 12 and ci.n == 5
    assert 10 <= ci.low <= 12 <= ci.high <= 30
    assert median_ci(values) == ci  # seeded: the same trials, the same interval
    # more trials of the same spread: a narrower interval
    rng = np.random.default_rng(1)
    few, many = rng.normal(100, 10, 5), rng.normal(100, 10, 60)
    assert relative_half_width(median_ci(many)) < relative_half_width(median_ci(few))


def test_ratio_ci():
    ci = ratio_ci([10, 10, 10], [20, 20, 20])
    assert (ci.value, ci.low, ci.high) == (2, 2, 2)
    ci = ratio_ci([9, 10, 11], [18, 20, 22])
    assert ci.value == 2 and ci.low < 2 < ci.high and ci.low > 1
    assert ratio_ci([0, 0], [0, 0, 0]).value == 1  # a count that stayed 0 did not change
    grew = ratio_ci([0, 0, 0], [0, 5, 7])
    assert math.isinf(grew.value) and not grew.known
    assert math.isnan(ratio_ci([], [1]).value)
    assert not ratio_ci([1], [2]).known
    one_side = ratio_ci([10], [20, 30, 40])  # a single base trial: its noise is unknown
    assert one_side.value == 3 and not one_side.known


def test_relative_half_width_and_precise_enough():
    assert relative_half_width(Interval(100, 90, 110, 5)) == pytest.approx(0.1)
    assert math.isnan(relative_half_width(Interval(100, math.nan, math.nan, 1)))
    assert precise_enough([0, 0, 0], 0.1)  # a count that is always 0 is known exactly
    assert precise_enough([100, 101, 99, 100, 100, 101, 99], 0.1)
    assert not precise_enough([50, 100, 150, 80, 130], 0.1)
    assert not precise_enough([100], 0.1)


# -- verdicts on a threshold ------------------------------------------------------


@pytest.mark.parametrize("interval, op, threshold, expected", [
    (Interval(1.1, 1.0, 1.2, 5), "<=", 1.25, PASS),
    (Interval(1.2, 1.1, 1.3, 5), "<=", 1.25, INCONCLUSIVE),
    (Interval(1.4, 1.3, 1.5, 5), "<=", 1.25, FAIL),
    (Interval(1.25, 1.25, 1.25, 5), "<=", 1.25, PASS),
    (Interval(1.0, 1.0, 1.0, 5), "<", 1.0, FAIL),  # equal is not below
    (Interval(150, 120, 180, 5), ">=", 100, PASS),
    (Interval(90, 80, 120, 5), ">=", 100, INCONCLUSIVE),
    (Interval(1.1, math.nan, math.nan, 1), "<=", 1.25, INCONCLUSIVE),  # one trial: no interval
    (Interval(0, math.nan, math.nan, 1), "==", 0, PASS),  # a count: exact
    (Interval(3, math.nan, math.nan, 1), "==", 0, FAIL),
    (Interval(0, 0, 2, 5), "==", 0, INCONCLUSIVE),
    (Interval(math.nan, math.nan, math.nan, 0), "<=", 1, NOT_MEASURED),
])
def test_threshold_verdict(interval, op, threshold, expected):
    assert threshold_verdict(interval, op, threshold) == expected


def test_combine_verdicts():
    assert combine_verdicts([PASS, PASS]) == PASS
    assert combine_verdicts([PASS, INCONCLUSIVE]) == INCONCLUSIVE
    assert combine_verdicts([INCONCLUSIVE, FAIL, PASS]) == FAIL
    assert combine_verdicts([]) == NOT_MEASURED


# -- tests and change verdicts ----------------------------------------------------


def test_change_p_value():
    assert math.isnan(change_p_value([1], [1, 2]))
    assert change_p_value([2, 2], [2, 2]) == 1.0 and change_p_value([2, 2], [3, 3]) == 0.0
    rng = np.random.default_rng(2)
    base = rng.lognormal(0, 0.1, 10)
    assert change_p_value(base, base * 2) < 0.001
    assert change_p_value(base, rng.permutation(base)) == pytest.approx(1.0)
    # counts with zeros take the rank test: still decides a large shift
    assert change_p_value([0, 0, 0, 1, 0, 0], [40, 52, 47, 39, 50, 45]) < 0.01


def test_adjust_p_values_is_benjamini_hochberg():
    adjusted = adjust_p_values([0.01, 0.04, math.nan, 0.03, 0.5])
    # by hand: sorted 0.01, 0.03, 0.04, 0.5 (m=4) -> 0.04, 0.0533, 0.0533, 0.5
    assert adjusted[0] == pytest.approx(0.04)
    assert adjusted[1] == pytest.approx(0.04 * 4 / 3) and adjusted[3] == pytest.approx(0.04 * 4 / 3)
    assert math.isnan(adjusted[2]) and adjusted[4] == pytest.approx(0.5)
    assert len(adjust_p_values([])) == 0


@pytest.mark.parametrize("ratio, p, lower_is_better, expected", [
    (Interval(1.5, 1.3, 1.7, 20), 0.001, True, REGRESSED),
    (Interval(1.5, 1.3, 1.7, 20), 0.001, False, IMPROVED),
    (Interval(0.6, 0.5, 0.7, 20), 0.001, True, IMPROVED),
    (Interval(1.5, 1.3, 1.7, 20), 0.2, True, INCONCLUSIVE),  # not significant after adjustment
    (Interval(1.05, 1.02, 1.08, 20), 0.001, True, UNCHANGED),  # real, but within the tolerance
    (Interval(1.5, 0.9, 2.0, 20), 0.01, True, INCONCLUSIVE),  # interval holds 1
    (Interval(1.0, 0.7, 1.4, 5), 0.9, True, INCONCLUSIVE),
    (Interval(math.inf, math.nan, math.nan, 5), 0.001, True, REGRESSED),  # 0 lost frames -> some
    (Interval(math.inf, math.nan, math.nan, 5), 0.3, True, INCONCLUSIVE),
    (Interval(1.2, math.nan, math.nan, 1), math.nan, True, INCONCLUSIVE),
])
def test_change(ratio, p, lower_is_better, expected):
    assert change(ratio, p, lower_is_better=lower_is_better) == expected


# -- comparisons: a real slowdown is called, noise is not ---------------------------


def point_rows(values, mode="fd-passing", **kw) -> list[dict]:
    return [{"scenario": "ram-size", "mode": mode, "variant": "", "backend": "ram", "live": False,
             "ram_bytes": 64 << 20, "n_fds": 1, "peer_version": "", "trial": i, "downtime_ns": v,
             "ok": True, "error": "", "unit": "", **kw} for i, v in enumerate(values)]


def frame(rows) -> pd.DataFrame:
    return clean_results(pd.DataFrame(rows).astype(str).replace({"": pd.NA}))


def test_a_1_5x_slowdown_over_20_trials_is_regressed():
    rng = np.random.default_rng(3)
    # 2 ms with 20% multiplicative noise, twice independently; NEW is slower by half
    base = rng.lognormal(np.log(2e6), 0.2, 20).round()
    new = (rng.lognormal(np.log(2e6), 0.2, 20) * 1.5).round()
    changes = compare(frame(point_rows(base)), frame(point_rows(new)))
    row = changes.set_index("metric").loc["downtime_ns"]
    assert row["verdict"] == REGRESSED, row.to_dict()
    assert row["ci_low"] > 1 and row["n_base"] == 20 and row["n_new"] == 20
    # and the same two samples without the slowdown are not a change
    same = compare(frame(point_rows(base)), frame(point_rows((new / 1.5).round())))
    assert same.set_index("metric").loc["downtime_ns", "verdict"] in (UNCHANGED, INCONCLUSIVE)


@pytest.fixture(scope="module")
def reference() -> pd.DataFrame:
    if REFERENCE is None:
        pytest.skip("no committed reference run under benchmarks/reference/")
    df, _ = load_results(REFERENCE)
    return df


def slowed(df: pd.DataFrame, factor: float) -> pd.DataFrame:
    """The run as if everything took ``factor`` times as long: times × factor, floor rates ÷ factor."""
    out = df.copy()
    for col in TIME_METRICS:
        out[col] = (out[col].astype("float64") * factor).round().astype("Int64")
    rate = out["unit"].str.endswith("/s")
    out.loc[rate, "value"] = out.loc[rate, "value"] / factor
    out.loc[~rate, "value"] = out.loc[~rate, "value"] * factor
    return out


def test_a_3x_slowdown_of_the_reference_run_is_regressed(reference):
    changes = compare(reference, slowed(reference, 3.0))
    timed = changes[changes["metric"].isin([*TIME_METRICS, "throughput_bytes_s", "value"])]
    assert len(timed) > 50
    verdicts = timed["verdict"].value_counts().to_dict()
    # nothing got faster or stayed the same, and most points decide it
    assert IMPROVED not in verdicts and UNCHANGED not in verdicts, verdicts
    assert verdicts.get(REGRESSED, 0) >= 0.8 * len(timed), verdicts
    # the undecided ones are those whose own trials spread more than 3x
    undecided = timed[timed["verdict"] != REGRESSED]
    assert (undecided["ci_low"].fillna(0) <= 1.0 + 1e-9).all() | (undecided["n_base"] < 2).all()
    # counts did not change: they are never called a regression
    counts = changes[changes["metric"].isin(["frames_lost", "lines_lost"])]
    assert not counts["verdict"].isin([REGRESSED, IMPROVED]).any()


def resampled(df: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Each point's trials drawn again with replacement: the noise of a rerun, and nothing else."""
    rng = np.random.default_rng(seed)
    parts = []
    for _, g in df.groupby(POINT_KEYS, dropna=False):
        parts.append(g.iloc[rng.integers(0, len(g), len(g))])
    return pd.concat(parts, ignore_index=True)


@pytest.mark.parametrize("seed", range(5))
def test_resampling_noise_of_the_reference_run_is_never_a_change(reference, seed):
    changes = compare(reference, resampled(reference, seed))
    assert len(changes) > 50
    called = changes[changes["verdict"].isin([REGRESSED, IMPROVED])]
    assert called.empty, called[["scenario", "mode", "ram_bytes", "n_fds", "metric", "ratio", "verdict"]]


def test_independent_noise_at_many_points_is_never_a_change():
    """Two runs of the same code: every point drawn twice from one distribution. Per point a 95%
    interval misses 1 now and then; over 150 points only the false discovery control and the
    tolerance keep those chance hits from being called changes."""
    rng = np.random.default_rng(11)
    base, new = [], []
    for point in range(150):
        size = (point + 1) << 20
        base += point_rows(rng.lognormal(np.log(2e6), 0.25, 5).round(), ram_bytes=size)
        new += point_rows(rng.lognormal(np.log(2e6), 0.25, 5).round(), ram_bytes=size)
    changes = compare(frame(base), frame(new))
    down = changes[changes["metric"] == "downtime_ns"]
    assert len(down) == 150
    assert not down["verdict"].isin([REGRESSED, IMPROVED]).any(), down["verdict"].value_counts()
