"""Intervals and verdicts that survive a noisy machine.

Every median migfd shows carries a 95% bootstrap confidence interval
(``scipy.stats.bootstrap``), and every verdict is taken on the interval, not
on the median: a target passes only when the whole interval is on the right
side of its threshold; a comparison calls a change only when a test across
all its points says so (false discovery rate controlled), the interval of the
ratio excludes 1, *and* the change is larger than a tolerance. Where the
trials cannot decide, the answer is "inconclusive".

It sits in the bottom layer, below the benchmark, because the runner decides
with the same intervals when a point has enough trials (``migfd.bench.runner``)
as the results show (``migfd.results``). The resampling is seeded, so the same
trials always give the same interval.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
N_RESAMPLES = 4000
SEED = 20261201

#: A comparison calls a change only beyond this relative size (asv's "factor").
CHANGE_TOLERANCE = 0.10

PASS, FAIL, INCONCLUSIVE, NOT_MEASURED = "pass", "fail", "inconclusive", "not-measured"
IMPROVED, REGRESSED, UNCHANGED = "improved", "regressed", "unchanged"

Values = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Interval:
    """A point estimate with its confidence interval; NaN bounds when it cannot be given.

    ``n`` is the smallest number of values behind it (per side, for a ratio).
    """

    value: float
    low: float
    high: float
    n: int

    @property
    def known(self) -> bool:
        return not (math.isnan(self.low) or math.isnan(self.high))

    def scaled(self, factor: float) -> "Interval":
        return Interval(self.value * factor, self.low * factor, self.high * factor, self.n)


UNKNOWN = Interval(math.nan, math.nan, math.nan, 0)


def clean(values: Values) -> np.ndarray:
    """``values`` as a flat float array without NaNs."""
    arr = np.asarray(values, dtype="float64").ravel()
    return arr[~np.isnan(arr)]


def _median(x, axis=-1):
    return np.median(x, axis=axis)


def _ratio_of_medians(base, new, axis=-1):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.median(new, axis=axis) / np.median(base, axis=axis)


def bootstrap_ci(samples: Sequence[np.ndarray], statistic: Callable[..., np.ndarray]) -> tuple[float, float]:
    """The percentile interval of ``statistic`` over independent resamples of each sample.

    ``statistic(*samples, axis=-1)`` must be vectorized (numpy along the last
    axis). BCa would be tighter, but with 3-5 trials its acceleration term is
    often undefined; the percentile interval is always defined and
    conservative enough at these sizes once paired with the tolerance of
    :func:`change`. A resample where the statistic is undefined (a median of
    0 in a denominator) makes the bound NaN rather than a guess.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(tuple(samples), statistic, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE,
                              method="percentile", vectorized=True, paired=False,
                              random_state=np.random.default_rng(SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def median_ci(values: Values) -> Interval:
    """Median of ``values`` (NaNs dropped) with its 95% bootstrap interval.

    One value gives no interval (NaN bounds); identical values give a zero-width one.
    With very few trials the percentile interval is about the range of the
    trials, which holds the true median less often than 95%: 75% of the time
    with 3 trials, 94% with 5. That is why the runner adds trials to a point
    (``migfd.bench.adaptive``) and why 4 GiB points, capped at 4, decide less.
    """
    arr = clean(values)
    if len(arr) == 0:
        return UNKNOWN
    med = float(np.median(arr))
    if len(arr) == 1:
        return Interval(med, math.nan, math.nan, 1)
    if np.all(arr == arr[0]):
        return Interval(med, med, med, len(arr))
    low, high = bootstrap_ci((arr,), _median)
    return Interval(med, low, high, len(arr))


def ratio_ci(base: Values, new: Values) -> Interval:
    """median(new) / median(base) with a 95% interval from resampling both sides independently.

    Counts can be 0: both sides all 0 is a ratio of exactly 1 (nothing
    changed); a base median of 0 under a positive new median is an infinite
    ratio with no interval. NaN when either side is empty; with one value on
    either side the ratio has no interval.
    """
    b, n = clean(base), clean(new)
    if len(b) == 0 or len(n) == 0:
        return UNKNOWN
    size = min(len(b), len(n))
    if not b.any() and not n.any():
        return Interval(1.0, 1.0, 1.0, size)
    mb, mn = float(np.median(b)), float(np.median(n))
    if mb == 0:
        return Interval(math.inf if mn > 0 else math.nan, math.nan, math.nan, size)
    ratio = mn / mb
    if len(b) < 2 or len(n) < 2:
        # one trial says nothing about its own noise: no interval (and scipy needs two)
        return Interval(ratio, math.nan, math.nan, size)
    if np.all(b == b[0]) and np.all(n == n[0]):
        return Interval(ratio, ratio, ratio, size)
    low, high = bootstrap_ci((b, n), _ratio_of_medians)
    return Interval(ratio, low, high, size)


def threshold_verdict(interval: Interval, op: str, threshold: float) -> str:
    """``pass`` when the whole interval meets ``op threshold``, ``fail`` when none of it does.

    ``op`` is one of ``<=``, ``<``, ``>=``, ``>``, ``==``. A point measured
    without an interval (a single trial) is judged by its value alone only
    for ``==`` (a count, such as frames lost, has no noise to speak of);
    otherwise it is inconclusive.
    """
    if math.isnan(interval.value):
        return NOT_MEASURED
    if op == "==":
        lo, hi = (interval.low, interval.high) if interval.known else (interval.value, interval.value)
        if lo == threshold and hi == threshold:
            return PASS
        return FAIL if (lo > threshold or hi < threshold) else INCONCLUSIVE
    if not interval.known:
        return INCONCLUSIVE
    holds = {"<=": lambda v: v <= threshold, "<": lambda v: v < threshold,
             ">=": lambda v: v >= threshold, ">": lambda v: v > threshold}[op]
    if holds(interval.low) and holds(interval.high):
        return PASS
    if not holds(interval.low) and not holds(interval.high):
        return FAIL
    return INCONCLUSIVE


def combine_verdicts(verdicts: Sequence[str]) -> str:
    """One verdict for a target judged at several points: any fail fails, all pass passes."""
    if not verdicts:
        return NOT_MEASURED
    if FAIL in verdicts:
        return FAIL
    if all(v == PASS for v in verdicts):
        return PASS
    return INCONCLUSIVE


def change_p_value(base: Values, new: Values) -> float:
    """Two-sided p-value that NEW and BASE differ.

    Times are positive with multiplicative noise, so the test is Welch's t on
    their logarithms (a shift there is a ratio); counts that can be 0 (frames
    lost) get the Mann-Whitney U test. NaN when a side has fewer than 2 values.
    """
    b, n = clean(base), clean(new)
    if len(b) < 2 or len(n) < 2:
        return math.nan
    if np.all(b == b[0]) and np.all(n == n[0]):
        return 1.0 if b[0] == n[0] else 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if np.all(b > 0) and np.all(n > 0):
            return float(stats.ttest_ind(np.log(n), np.log(b), equal_var=False).pvalue)
        return float(stats.mannwhitneyu(n, b, alternative="two-sided").pvalue)


def adjust_p_values(p_values: Sequence[float]) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values: a comparison tests many points at once.

    Without it, one point in twenty would "change" by chance in every comparison.
    NaNs stay NaN.
    """
    p = np.asarray(p_values, dtype="float64")
    out = np.full(p.shape, math.nan)
    known = ~np.isnan(p)
    if known.any():
        out[known] = stats.false_discovery_control(p[known], method="bh")
    return out


def change(ratio: Interval, p_adjusted: float, *, lower_is_better: bool = True,
           tolerance: float = CHANGE_TOLERANCE, alpha: float = 1 - CONFIDENCE) -> str:
    """Verdict on a ratio NEW/BASE: improved, regressed, unchanged or inconclusive.

    A change is called only when the test says so (``p_adjusted`` < ``alpha``),
    the ratio's interval excludes 1, *and* the ratio is beyond ``1 ± tolerance``
    (a real but tiny shift is not news). ``unchanged`` only when the whole
    interval lies within the tolerance band. An infinite ratio (a count that
    was 0 and no longer is) is a change when the test says so. Everything else
    is inconclusive.
    """
    significant = not math.isnan(p_adjusted) and p_adjusted < alpha
    worse = REGRESSED if lower_is_better else IMPROVED
    better = IMPROVED if lower_is_better else REGRESSED
    if math.isinf(ratio.value):
        return worse if significant else INCONCLUSIVE
    if math.isnan(ratio.value) or not ratio.known:
        return INCONCLUSIVE
    up, down = 1 + tolerance, 1 / (1 + tolerance)
    if significant and ratio.low > 1 and ratio.value >= up:
        return worse
    if significant and ratio.high < 1 and ratio.value <= down:
        return better
    if ratio.low >= down and ratio.high <= up:
        return UNCHANGED
    return INCONCLUSIVE


def relative_half_width(interval: Interval) -> float:
    """Half the interval's width over its value: how precisely a median is known (NaN if unknown)."""
    if not interval.known or math.isnan(interval.value) or interval.value == 0:
        return math.nan
    return (interval.high - interval.low) / 2 / abs(interval.value)


def precise_enough(values: Values, max_relative_half_width: float) -> bool:
    """Whether the median of ``values`` is known to within ± ``max_relative_half_width`` of itself.

    All-equal values (a count that is always 0) are as precise as can be.
    """
    interval = median_ci(values)
    if interval.known and interval.low == interval.high:
        return True
    width = relative_half_width(interval)
    return not math.isnan(width) and width <= max_relative_half_width
