"""migfd.stats: intervals, family-moderated spreads, rate tests, many tests at once, and verdicts.

The numbers here are FIXTURES of the statistics, not measurements: small
hand-made samples whose intervals and p-values can be checked by hand (or
against scipy's own t and binomial tests), and seeded random samples where
the point is the verdict, not the value. How often the intervals hold the
truth is tests/unit/test_coverage.py; the power of ``migfd compare`` on
doctored copies of the committed reference run is tests/unit/test_compare_power.py.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import special, stats

from migfd.results.compare import compare
from migfd.results.load import clean_results
from migfd.stats import (
    FAIL,
    FASTER,
    IMPROVED,
    INCONCLUSIVE,
    NOT_MEASURED,
    PASS,
    REGRESSED,
    SAME,
    SLOWER,
    UNCHANGED,
    Interval,
    LogSpread,
    RatioTest,
    _trigamma_inverse,
    adjust_p_values,
    change,
    change_p_value,
    combine_verdicts,
    dispersion,
    fit_spread_prior,
    hierarchical_adjust,
    log_ratio_test,
    log_spread,
    machine_verdict,
    median_ci,
    moderated,
    normalized,
    pooled_log_ratio,
    precise_enough,
    rate_ratio_test,
    ratio_ci,
    relative_half_width,
    simes,
    threshold_verdict,
)


# -- intervals ------------------------------------------------------------------


def test_median_ci_edges():
    assert math.isnan(median_ci([]).value)
    one = median_ci([5.0, math.nan])
    assert one.value == 5 and one.n == 1 and not one.known
    same = median_ci([3, 3, 3])
    assert (same.value, same.low, same.high, same.n) == (3, 3, 3, 3)


def test_median_ci_is_a_t_interval_on_the_logs():
    values = [10, 11, 12, 13, 30]
    ci = median_ci(values)
    logs = np.log(values)
    expected = np.exp(stats.t.interval(0.95, 4, loc=logs.mean(), scale=logs.std(ddof=1) / math.sqrt(5)))
    assert ci.value == 12 and ci.n == 5
    assert (ci.low, ci.high) == pytest.approx(tuple(expected))
    # the outlier widens it beyond the trials' range: 5 trials cannot pin a median to their range
    assert ci.low < 10 and ci.high < 30
    assert median_ci(values) == ci  # nothing random: the same trials, the same interval
    rng = np.random.default_rng(1)
    few, many = rng.lognormal(0, 0.1, 5), rng.lognormal(0, 0.1, 60)
    assert relative_half_width(median_ci(many)) < relative_half_width(median_ci(few))


def test_median_ci_holds_the_median_it_is_shown_with():
    # logs skewed so that the geometric mean's interval misses the sample median: widened to hold it
    values = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1000.0, 1000.0, 1000.0, 1000.0]
    ci = median_ci(values)
    assert ci.low <= ci.value <= ci.high


def test_median_ci_of_counts_is_the_order_statistic_interval():
    # 0 has no logarithm: the distribution-free interval; 5 trials can do no better than their range
    assert (median_ci([0, 0, 1, 2, 5]).low, median_ci([0, 0, 1, 2, 5]).high) == (0, 5)
    # 10 trials: [x(2), x(9)] covers 1 - 2 P(Bin(10, 1/2) <= 1) = 97.9%; [x(3), x(8)] only 89%
    ci = median_ci([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert (ci.low, ci.high) == (1, 8)


def test_a_prior_moderates_the_spread_of_a_point():
    rng = np.random.default_rng(5)
    x = rng.lognormal(0, 0.5, 4)  # a wide point in a narrow family
    alone = median_ci(x)
    family = LogSpread(0.01, 40.0)
    shrunk = median_ci(x, family)
    assert relative_half_width(shrunk) < relative_half_width(alone)
    spread = log_spread(x)
    m = moderated(spread, family)
    assert m.df == 43 and m.var == pytest.approx((40 * 0.01 + 3 * spread.var) / 43)
    # no degree of freedom of its own: nothing borrowed
    assert moderated(LogSpread(math.nan, 0.0), family).df == 0


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


def test_log_ratio_test_is_welch_on_the_logs_and_pooled_with_a_prior():
    rng = np.random.default_rng(2)
    base, new = rng.lognormal(0, 0.2, 5), rng.lognormal(0.3, 0.3, 4)
    test = log_ratio_test(base, new)
    welch = stats.ttest_ind(np.log(new), np.log(base), equal_var=False)
    assert test.p_value == pytest.approx(welch.pvalue)
    assert test.log_ratio == pytest.approx(np.log(new).mean() - np.log(base).mean())
    assert test.interval.low < test.interval.value < test.interval.high
    # with a prior: the pooled spread of both sides, moderated, on its own and the prior's df
    prior = LogSpread(0.04, 10.0)
    pooled = log_spread(base, new)
    assert pooled.df == 7
    m = moderated(pooled, prior)
    t = log_ratio_test(base, new, prior)
    assert t.df == 17 and t.log_se == pytest.approx(math.sqrt(m.var * (1 / 5 + 1 / 4)))
    assert t.p_value == pytest.approx(2 * stats.t.sf(abs(t.log_ratio) / t.log_se, 17))
    assert not log_ratio_test([1.0], [2.0], prior).interval.known
    assert math.isnan(log_ratio_test([0.0, 1.0], [1.0, 2.0]).p_value)  # a 0 has no logarithm


def test_trigamma_inverse():
    for y in (0.05, 0.4, 1.0, 3.0, 50.0):
        assert float(special.polygamma(1, _trigamma_inverse(y))) == pytest.approx(y, rel=1e-6)


def test_fit_spread_prior_recovers_the_prior_it_was_drawn_from():
    # point variances drawn from a scaled inverse chi-square (s0 = 0.04, d0 = 8), each seen through
    # 6 degrees of freedom of trials
    rng = np.random.default_rng(7)
    true_var = 0.04 * 8 / rng.chisquare(8, 2000)
    seen = [LogSpread(float(v * rng.chisquare(6) / 6), 6.0) for v in true_var]
    prior = fit_spread_prior(seen)
    assert prior.var == pytest.approx(0.04, rel=0.1) and 6 < prior.df < 11


def test_fit_spread_prior_pools_alike_points_and_needs_two():
    alike = [LogSpread(0.04, 3.0)] * 5
    prior = fit_spread_prior(alike)
    assert prior.df == 15  # no spread beyond sampling: plain pooling, worth no more than the trials
    assert fit_spread_prior([LogSpread(0.04, 3.0)]).df == 0
    assert fit_spread_prior([LogSpread(0.0, 3.0), LogSpread(0.04, 3.0)]).df == 0  # zeros carry no log


def test_relative_half_width_and_precise_enough():
    assert relative_half_width(Interval(100, 90, 110, 5)) == pytest.approx(0.1)
    assert math.isnan(relative_half_width(Interval(100, math.nan, math.nan, 1)))
    assert precise_enough([0, 0, 0], 0.1)  # a count that is always 0 is known exactly
    assert precise_enough([100, 101, 99, 100, 100, 101, 99], 0.1)
    assert not precise_enough([50, 100, 150, 80, 130], 0.1)
    assert not precise_enough([100], 0.1)


# -- counts -----------------------------------------------------------------------


def test_rate_ratio_test_from_zero_is_exact():
    base, new = [0] * 6, [5] * 6
    sent = [20000] * 6
    test = rate_ratio_test(base, sent, new, sent)
    # conditional on 30 events, each NEW's with p = 1/2: all 30 in NEW has p = 2 * 2^-30
    assert test.p_value == pytest.approx(2 * 0.5 ** 30)
    assert math.isinf(test.interval.value) and math.isinf(test.interval.high)
    # Clopper-Pearson's lower bound of NEW's share, 0.025^(1/30), as a rate ratio
    low_share = 0.025 ** (1 / 30)
    assert test.interval.low == pytest.approx(low_share / (1 - low_share))
    assert change(test.interval, test.p_value) == REGRESSED


def test_rate_ratio_test_uses_rates_per_unit_sent():
    # twice the losses over twice the frames sent: the same rate
    test = rate_ratio_test([10, 12, 11], [1000] * 3, [20, 24, 22], [2000] * 3)
    assert test.interval.value == pytest.approx(1.0)
    assert test.interval.low < 1 < test.interval.high and test.p_value > 0.5
    assert rate_ratio_test([0, 0], [100, 100], [0, 0], [100, 100]).interval.value == 1


def test_dispersion_of_overdispersed_trials():
    sent = [25843, 25904, 25585, 26003, 27324, 26128]
    state_copy = [356, 854, 273, 679, 655, 389]  # frames a state copy lost, trial by trial
    phi = dispersion((state_copy, sent))
    assert phi > 50  # far beyond Poisson: 530 lost on average, spread by ~230
    rng = np.random.default_rng(4)
    poisson = rng.poisson(500, 40)
    assert dispersion((poisson, [1.0] * 40)) < 2
    assert dispersion(([0, 0, 0], [1, 1, 1])) == 1
    # the same counts tested with and without it: overdispersion is evidence taken away
    shifted = [round(k * 1.3) for k in state_copy]
    assert rate_ratio_test(state_copy, sent, shifted, sent).p_value > 0.05


# -- many tests at once -------------------------------------------------------------


def test_adjust_p_values_is_benjamini_hochberg():
    adjusted = adjust_p_values([0.01, 0.04, math.nan, 0.03, 0.5])
    # by hand: sorted 0.01, 0.03, 0.04, 0.5 (m=4) -> 0.04, 0.0533, 0.0533, 0.5
    assert adjusted[0] == pytest.approx(0.04)
    assert adjusted[1] == pytest.approx(0.04 * 4 / 3) and adjusted[3] == pytest.approx(0.04 * 4 / 3)
    assert math.isnan(adjusted[2]) and adjusted[4] == pytest.approx(0.5)
    assert len(adjust_p_values([])) == 0


def test_simes():
    assert simes([0.01, 0.04, 0.5]) == pytest.approx(0.03)  # min(3*0.01/1, 3*0.04/2, 0.5)
    assert simes([0.2, 0.3]) == pytest.approx(0.3)
    assert math.isnan(simes([math.nan]))


def test_hierarchical_adjust_by_hand():
    families = ["A", "A", "B", "B", "C"]
    p = [0.001, 0.01, 0.5, 0.6, 0.04]
    # Simes per family: A 0.002, B 0.6, C 0.04; BH across the 3: 0.006, 0.6, 0.06 -> A alone selected
    # (R = 1 of M = 3). Inside A, BH: 0.002, 0.01, times M/R = 3: 0.006, 0.03
    adjusted = hierarchical_adjust(families, p)
    assert adjusted[:2] == pytest.approx([0.006, 0.03])
    assert (adjusted[2:] >= 0.05).all()
    assert math.isnan(hierarchical_adjust(["A", "B"], [math.nan, 0.5])[0])


def test_hierarchical_adjust_finds_a_changed_family_among_many_quiet_ones():
    rng = np.random.default_rng(9)
    families, p = [], []
    for f in range(40):  # 40 families of 5 points, nothing changed
        families += [f] * 5
        p += list(rng.uniform(0, 1, 5))
    families += ["changed"] * 10  # one family changed at every point
    p += [1e-4] * 10
    adjusted = hierarchical_adjust(families, p)
    assert (adjusted[-10:] < 0.05).all()
    assert (adjusted[:-10] >= 0.05).all()


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
    # values with zeros take the rank test: still decides a large shift
    assert change_p_value([0, 0, 0, 1, 0, 0], [40, 52, 47, 39, 50, 45]) < 0.01


@pytest.mark.parametrize("ratio, p, lower_is_better, expected", [
    (Interval(1.5, 1.3, 1.7, 20), 0.001, True, REGRESSED),
    (Interval(1.5, 1.3, 1.7, 20), 0.001, False, IMPROVED),
    (Interval(0.6, 0.5, 0.7, 20), 0.001, True, IMPROVED),
    (Interval(1.5, 1.3, 1.7, 20), 0.2, True, INCONCLUSIVE),  # not significant after adjustment
    (Interval(1.05, 1.02, 1.08, 20), 0.001, True, UNCHANGED),  # real, but within the tolerance
    (Interval(1.5, 0.9, 2.0, 20), 0.01, True, INCONCLUSIVE),  # interval holds 1
    (Interval(1.0, 0.7, 1.4, 5), 0.9, True, INCONCLUSIVE),
    (Interval(math.inf, math.nan, math.nan, 5), 0.001, True, REGRESSED),  # 0 lost frames -> some
    (Interval(math.inf, 3.0, math.inf, 5), 0.001, True, REGRESSED),
    (Interval(math.inf, 0.8, math.inf, 5), 0.001, True, INCONCLUSIVE),  # the rate's interval holds 1
    (Interval(math.inf, math.nan, math.nan, 5), 0.3, True, INCONCLUSIVE),
    (Interval(1.2, math.nan, math.nan, 1), math.nan, True, INCONCLUSIVE),
])
def test_change(ratio, p, lower_is_better, expected):
    assert change(ratio, p, lower_is_better=lower_is_better) == expected


@pytest.mark.parametrize("interval, expected", [
    (Interval(0.5, 0.45, 0.55, 4), FASTER),
    (Interval(2.0, 1.5, 2.5, 4), SLOWER),
    (Interval(1.0, 0.95, 1.05, 4), SAME),
    (Interval(0.7, 0.3, 1.4, 4), INCONCLUSIVE),  # floors that disagree: cannot tell
    (Interval(0.95, 0.92, 0.98, 4), SAME),
    (Interval(math.nan, math.nan, math.nan, 0), INCONCLUSIVE),
])
def test_machine_verdict(interval, expected):
    assert machine_verdict(interval) == expected


def t_test(ratio: float, se: float, df: float = 10) -> RatioTest:
    lo, hi = math.exp(math.log(ratio) - 2 * se), math.exp(math.log(ratio) + 2 * se)
    return RatioTest(Interval(ratio, lo, hi, 4), 0.01, se, df)


def test_normalized_divides_the_ratios_and_adds_the_uncertainties():
    n = normalized(t_test(2.0, 0.1, 10), t_test(2.0, 0.1, 10))
    assert n.interval.value == pytest.approx(1.0)
    assert n.log_se == pytest.approx(math.sqrt(0.02)) and n.df == pytest.approx(20)
    assert n.interval.low < 1 < n.interval.high and n.p_value == pytest.approx(1.0)
    three = normalized(t_test(3.0, 0.1), t_test(1.0, 0.0, math.inf))
    assert three.interval.value == pytest.approx(3.0) and three.log_se == pytest.approx(0.1)
    assert math.isnan(normalized(RatioTest(Interval(2, 1, 3, 4), 0.01), t_test(1.0, 0.1)).p_value)


def test_pooled_log_ratio_of_floors():
    # floors that agree: the geometric mean, as wide as their own noise allows
    agree = pooled_log_ratio([t_test(0.5, 0.05), t_test(0.5, 0.05), t_test(0.5, 0.05)])
    assert agree.interval.value == pytest.approx(0.5) and agree.log_se == pytest.approx(0.05 / math.sqrt(3))
    # floors that disagree (a 3x faster fd round trip, an unchanged memcpy): as wide as they disagree
    disagree = pooled_log_ratio([t_test(0.3, 0.05), t_test(1.0, 0.05), t_test(0.6, 0.05)])
    logs = np.log([0.3, 1.0, 0.6])
    assert disagree.interval.value == pytest.approx(math.exp(logs.mean()))
    assert disagree.log_se == pytest.approx(logs.std(ddof=1) / math.sqrt(3)) and disagree.df == 2
    assert machine_verdict(disagree.interval) == INCONCLUSIVE
    assert math.isnan(pooled_log_ratio([]).interval.value)


# -- comparisons on hand-made points: a real slowdown is called, noise is not ---------------


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
