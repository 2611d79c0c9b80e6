"""Intervals and verdicts that survive a noisy machine and a handful of trials.

Every median migfd shows carries a 95% confidence interval, and every verdict
is taken on an interval, not on a median: a target passes only when the whole
interval is on the right side of its threshold; a comparison calls a change
only when a test controlled across all its points says so, the interval of
the ratio excludes 1, *and* the change is larger than a tolerance. Where the
trials cannot decide, the answer is "inconclusive".

Theory of operation. Times (downtime, total time, a floor) are positive and
their noise is multiplicative: a busy CPU makes a switchover take 1.3x as
long, not 0.3 ms longer. So intervals are Student t intervals on the
logarithms of the trials; the mean of the logs estimates the log of the
median when the noise is lognormal, and the t quantile keeps the coverage at
95% even at 3 trials, where a percentile bootstrap is about the range of the
trials and holds the median only ~75% of the time (tests/unit/test_coverage.py
measures both). At 3-5 trials a point's own spread is itself a rough guess, so
a comparison borrows strength from its *family* (the points of one scenario,
mode and metric, whose spreads are alike): an empirical-Bayes moderated
variance (Smyth's limma, 2004) shrinks each point's variance towards the
family's and adds the family's degrees of freedom, so one outlier trial
neither sinks a real change nor makes noise look like one. Tests run
hierarchically: families first (Simes), Benjamini-Hochberg across families,
then the points of the families that changed (Benjamini-Bogomolov). Counts
(frames lost, lines lost, reconnects) are compared as rates per frame or line
sent, pooled over trials, by the exact conditional binomial test, with the
trial-to-trial overdispersion taken out first.

It sits in the bottom layer, below the benchmark, because the runner decides
with the same intervals when a point has enough trials (``migfd.bench.adaptive``)
as the results show (``migfd.results``). Nothing here is random except
:func:`bootstrap_ci`, which is seeded: the same trials give the same interval.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import numpy as np
from scipy import special, stats

CONFIDENCE = 0.95
ALPHA = 1 - CONFIDENCE
N_RESAMPLES = 4000
SEED = 20261201

#: A comparison calls a change only beyond this relative size (asv's "factor").
CHANGE_TOLERANCE = 0.10

PASS, FAIL, INCONCLUSIVE, NOT_MEASURED = "pass", "fail", "inconclusive", "not-measured"
IMPROVED, REGRESSED, UNCHANGED = "improved", "regressed", "unchanged"
#: what the floors of two runs say about the machines (:func:`machine_verdict`)
FASTER, SLOWER, SAME = "faster", "slower", "same"

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


@functools.lru_cache(maxsize=4096)
def t_quantile(df: float, confidence: float = CONFIDENCE) -> float:
    """The two-sided ``confidence`` quantile of Student's t with ``df`` degrees of freedom (normal at inf)."""
    if math.isinf(df):
        return float(stats.norm.ppf(0.5 + confidence / 2))
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def _t_p_value(t: float, df: float) -> float:
    # the t distribution's cdf itself (scipy.special.stdtr): stats.t.sf would check its arguments
    # at every one of a comparison's ~200 calls
    if math.isinf(df):
        return float(2 * special.ndtr(-abs(t)))
    return float(2 * special.stdtr(df, -abs(t)))


# -- the spread of log values, alone and moderated by its family --------------------------


@dataclass(frozen=True)
class LogSpread:
    """The variance of log values (a multiplicative spread: 0.1 is about ±10%) and its degrees of freedom."""

    var: float
    df: float

    @property
    def sd(self) -> float:
        return math.sqrt(self.var)


NO_SPREAD = LogSpread(math.nan, 0.0)


def log_spread(*samples: Values) -> LogSpread:
    """The pooled within-sample variance of the logs of positive ``samples`` (NaN with no degree of freedom).

    Two runs of one point share it: a change of code or machine shifts the
    logs of a point's trials, it does not (to first order) widen them.
    """
    ss, df = 0.0, 0
    for s in samples:
        logs = np.log(clean(s))
        if len(logs) > 1:
            ss += float(((logs - logs.mean()) ** 2).sum())
            df += len(logs) - 1
    return LogSpread(ss / df, float(df)) if df else NO_SPREAD


def _trigamma_inverse(y: float) -> float:
    """x with trigamma(x) = y (y > 0), by Newton's method on 1/x as limma does (trigamma is convex)."""
    if y > 1e7:
        return 1 / math.sqrt(y)
    if y < 1e-6:
        return 1 / y
    x = 0.5 + 1 / y
    for _ in range(50):
        tri = float(special.polygamma(1, x))
        step = tri * (1 - tri / y) / float(special.polygamma(2, x))
        x += step
        if -step / x < 1e-8:
            break
    return x


def fit_spread_prior(spreads: Sequence[LogSpread]) -> LogSpread:
    """The prior of a family's variances: a scaled inverse chi-square with ``var`` and ``df`` (limma's fitFDist).

    Each point's sample variance is, under lognormal noise, ``var_i`` times
    chi-square/``df_i``; the point variances ``var_i`` of the family are
    themselves spread around the prior. The moments of log sample variances
    give both: their mean the prior's scale, their variance beyond what
    chi-square sampling explains the prior's ``df`` (small when the points'
    spreads truly differ, so little is borrowed). The prior's weight is capped
    at the family's own degrees of freedom: it is never worth more than the
    trials it was estimated from, which is plain pooling. Points with a zero
    variance (all trials equal, as QEMU's ms figures can be) carry no log and
    are left out. Fewer than two points: no prior (``df`` 0).
    """
    usable = [s for s in spreads if s.df > 0 and s.var > 0 and math.isfinite(s.var)]
    if len(usable) < 2:
        return NO_SPREAD
    var = np.array([s.var for s in usable])
    df = np.array([s.df for s in usable])
    e = np.log(var) - special.digamma(df / 2) + np.log(df / 2)
    e_mean = float(e.mean())
    e_var = float(((e - e_mean) ** 2).sum() / (len(e) - 1) - special.polygamma(1, df / 2).mean())
    cap = float(df.sum())
    if e_var > 0:
        d0 = min(2 * _trigamma_inverse(e_var), cap)
    else:
        d0 = cap  # no more spread between points than sampling explains: pool them all
    s0 = math.exp(e_mean + float(special.digamma(d0 / 2)) - math.log(d0 / 2))
    return LogSpread(s0, d0)


def moderated(spread: LogSpread, prior: LogSpread | None) -> LogSpread:
    """``spread`` shrunk towards the family's ``prior``: (d0 s0² + d s²) / (d0 + d) on d0 + d degrees of freedom.

    A point without its own degree of freedom (one trial a side) borrows
    nothing: it has no interval, whatever its family says.
    """
    if spread.df <= 0 or prior is None or prior.df <= 0 or math.isnan(prior.var):
        return spread
    total = prior.df + spread.df
    return LogSpread((prior.df * prior.var + spread.df * spread.var) / total, total)


# -- intervals of one point, and of the ratio of two ------------------------------------


def _order_statistic_ci(arr: np.ndarray) -> tuple[float, float]:
    """The distribution-free interval of the median: the widest pair of order statistics whose
    binomial coverage reaches 95%, else the range (which covers 1 - 2^(1-n): 75% at 3, 94% at 5).

    Only for values that have no logarithm (counts that can be 0)."""
    x = np.sort(arr)
    n = len(x)
    # coverage of [x(j), x(n+1-j)] (1-based) is 1 - 2 P(Bin(n, 1/2) <= j - 1)
    j = 1
    while j + 1 <= n // 2 and 1 - 2 * stats.binom.cdf(j, n, 0.5) >= CONFIDENCE:
        j += 1
    return float(x[j - 1]), float(x[n - j])


def _log_t_bounds(center: float, se: float, df: float) -> tuple[float, float]:
    half = t_quantile(df) * se
    return math.exp(center - half), math.exp(center + half)


def median_ci(values: Values, prior: LogSpread | None = None) -> Interval:
    """Median of ``values`` (NaNs dropped) with its 95% interval.

    Positive values (times): a t interval on the logs, exp(mean ± t·sd/√n),
    which covers the true median of lognormal trials 95% of the time at any
    number of trials; ``prior`` (:func:`fit_spread_prior`) moderates the
    spread with the point's family. The interval is widened, where a skewed
    sample puts it outside, to hold the sample median it is shown with. Values
    that can be 0 (counts): the order-statistic interval. One value gives no
    interval (NaN bounds); identical values give a zero-width one.
    """
    arr = clean(values)
    if len(arr) < 2 or np.any(arr <= 0):
        return median_ci_any(arr)
    med = float(np.median(arr))
    if np.all(arr == arr[0]) and prior is None:
        return Interval(med, med, med, len(arr))
    spread = moderated(log_spread(arr), prior)
    low, high = _log_t_bounds(float(np.log(arr).mean()), math.sqrt(spread.var / len(arr)), spread.df)
    return Interval(med, min(low, med), max(high, med), len(arr))


@dataclass(frozen=True)
class RatioTest:
    """A ratio NEW/BASE with its 95% interval and the two-sided p-value that it is 1.

    Log-t tests (times, throughput) also keep ``log_se`` and ``df``, so a ratio
    can be divided by another (:func:`normalized`); a count's rate ratio keeps
    NaN there.
    """

    interval: Interval
    p_value: float
    log_se: float = math.nan
    df: float = math.nan

    @property
    def log_ratio(self) -> float:
        return math.log(self.interval.value) if self.interval.value > 0 else math.nan


NO_TEST = RatioTest(UNKNOWN, math.nan)


def _log_ratio_test(log_ratio: float, se: float, df: float, n: int) -> RatioTest:
    if se == 0:
        ratio = math.exp(log_ratio)
        return RatioTest(Interval(ratio, ratio, ratio, n), 1.0 if log_ratio == 0 else 0.0, 0.0, df)
    low, high = _log_t_bounds(log_ratio, se, df)
    return RatioTest(Interval(math.exp(log_ratio), low, high, n), _t_p_value(log_ratio / se, df), se, df)


def log_ratio_test(base: Values, new: Values, prior: LogSpread | None = None) -> RatioTest:
    """NEW/BASE of positive values as the ratio of geometric means (for multiplicative noise, an
    estimate of the ratio of medians), with a t interval and t test on the logs.

    With ``prior`` (the family's, :func:`fit_spread_prior`) the two sides' pooled
    spread is moderated by it; without, Welch's test (the sides' spreads may
    differ: a floor against a migration). No interval when a side has one value
    and there is no spread to borrow; NaN when a side is empty or a value is not
    positive.
    """
    b, n = clean(base), clean(new)
    size = min(len(b), len(n))
    if size == 0 or np.any(b <= 0) or np.any(n <= 0):
        return NO_TEST
    lb, ln = np.log(b), np.log(n)
    d = float(ln.mean() - lb.mean())
    if prior is not None:
        spread = moderated(log_spread(b, n), prior)
        if spread.df <= 0:
            return RatioTest(Interval(math.exp(d), math.nan, math.nan, size), math.nan)
        return _log_ratio_test(d, math.sqrt(spread.var * (1 / len(b) + 1 / len(n))), spread.df, size)
    if len(b) < 2 or len(n) < 2:
        return RatioTest(Interval(math.exp(d), math.nan, math.nan, size), math.nan)
    vb, vn = float(lb.var(ddof=1)) / len(b), float(ln.var(ddof=1)) / len(n)
    se2 = vb + vn
    if se2 == 0:
        return _log_ratio_test(d, 0.0, math.inf, size)
    df = se2 ** 2 / (vb ** 2 / (len(b) - 1) + vn ** 2 / (len(n) - 1))
    return _log_ratio_test(d, math.sqrt(se2), df, size)


def normalized(test: RatioTest, by: RatioTest) -> RatioTest:
    """``test``'s ratio divided by ``by``'s (a time's ratio by the machine's floor ratio), both
    uncertainties carried: the variances of the log ratios add, Welch-Satterthwaite degrees of freedom."""
    if math.isnan(test.log_se) or math.isnan(by.log_se) or not test.interval.known or not by.interval.known:
        return NO_TEST
    d = test.log_ratio - by.log_ratio
    se2 = test.log_se ** 2 + by.log_se ** 2
    if se2 == 0:
        return _log_ratio_test(d, 0.0, math.inf, test.interval.n)
    parts = [(s ** 2) ** 2 / f for s, f in ((test.log_se, test.df), (by.log_se, by.df)) if s > 0]
    df = se2 ** 2 / sum(parts)
    return _log_ratio_test(d, math.sqrt(se2), df, test.interval.n)


def pooled_log_ratio(tests: Sequence[RatioTest]) -> RatioTest:
    """One ratio for many (the floors of two runs: how much faster is the machine?), as the geometric mean.

    Floors of one machine need not move alike (an fd round trip may gain 3x
    where a memcpy gains nothing), so the interval is a t interval across the
    floors' log ratios on k - 1 degrees of freedom, the machine's effect being
    what they share; where they agree better than their own noise allows, their
    own standard errors set the width instead.
    """
    usable = [t for t in tests if not math.isnan(t.log_se) and t.interval.value > 0]
    if not usable:
        return NO_TEST
    if len(usable) == 1:
        return usable[0]
    d = np.array([t.log_ratio for t in usable])
    k = len(d)
    between = float(d.var(ddof=1)) / k
    within = float(sum(t.log_se ** 2 for t in usable)) / k ** 2
    n = min(t.interval.n for t in usable)
    if between >= within:
        return _log_ratio_test(float(d.mean()), math.sqrt(between), k - 1, n)
    df = min(sum(t.df for t in usable), 1e6)
    return _log_ratio_test(float(d.mean()), math.sqrt(within), df, n)


def ratio_ci(base: Values, new: Values) -> Interval:
    """median(new) / median(base) with a 95% interval.

    Positive values: the interval of :func:`log_ratio_test` (Welch's t on the
    logs), widened where needed to hold the ratio of medians it is shown with.
    Counts can be 0: both sides all 0 is a ratio of exactly 1 (nothing
    changed); a base median of 0 under a positive new median is an infinite
    ratio with no interval; other values with zeros get the percentile
    bootstrap. NaN when either side is empty; with one value on either side
    the ratio has no interval.
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
        # one trial says nothing about its own noise: no interval
        return Interval(ratio, math.nan, math.nan, size)
    if np.all(b == b[0]) and np.all(n == n[0]):
        return Interval(ratio, ratio, ratio, size)
    if np.all(b > 0) and np.all(n > 0):
        ci = log_ratio_test(b, n).interval
        return Interval(ratio, min(ci.low, ratio), max(ci.high, ratio), size)
    low, high = bootstrap_ci((b, n), _ratio_of_medians)
    return Interval(ratio, low, high, size)


def _ratio_of_medians(base, new, axis=-1):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.median(new, axis=axis) / np.median(base, axis=axis)


def bootstrap_ci(samples: Sequence[np.ndarray], statistic: Callable[..., np.ndarray]) -> tuple[float, float]:
    """The percentile interval of ``statistic`` over independent resamples of each sample.

    For statistics with no closed form (a slope of medians against a floor's,
    ``migfd.results.targets``). ``statistic(*samples, axis=-1)`` must be
    vectorized. With 3 trials a sample the percentile interval is about the
    range of the trials and covers less than it claims (tests/unit/test_coverage.py);
    medians and ratios use the t intervals above instead. A resample where the
    statistic is undefined (a median of 0 in a denominator) makes the bound NaN.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.bootstrap(tuple(samples), statistic, n_resamples=N_RESAMPLES, confidence_level=CONFIDENCE,
                              method="percentile", vectorized=True, paired=False,
                              random_state=np.random.default_rng(SEED))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


# -- counts: rates per frame or line sent -------------------------------------------------


def dispersion(*sides: tuple[Values, Values]) -> float:
    """How much more the trials' counts vary than Poisson counts would (at least 1).

    ``sides`` are (counts, exposures) per run. Pearson's chi-square of each
    trial's count against its run's pooled rate, over the degrees of freedom:
    state copy loses a few hundred frames in one trial and a thousand in the
    next, far beyond Poisson; fd-passing's zeros carry no evidence either way.
    """
    chi2, df = 0.0, 0
    for counts, exposures in sides:
        k, s = np.asarray(counts, dtype=float), np.asarray(exposures, dtype=float)
        if len(k) < 2 or s.sum() <= 0:
            continue
        df += len(k) - 1
        rate = k.sum() / s.sum()
        if rate > 0:
            expected = rate * s
            chi2 += float(((k - expected) ** 2 / expected).sum())
    return max(1.0, chi2 / df) if df else 1.0


def rate_ratio_test(base_counts: Values, base_exposure: Values, new_counts: Values,
                    new_exposure: Values) -> RatioTest:
    """(events per unit sent in NEW) / (the same in BASE), pooled over trials, by the exact conditional test.

    Given K events in all, NEW's share is binomial with p = its share of the
    exposure when the rates are equal; the Clopper-Pearson interval of that
    share is an exact interval of the rate ratio. Overdispersed trials
    (:func:`dispersion` φ > 1) count as 1/φ of their events and exposure: the
    rate is unchanged, the evidence is what the trials' scatter supports. A
    count that rises from 0 has an infinite ratio whose lower bound can still
    exceed 1; 0 in both runs is a ratio of 1 with no interval. ``n`` is the
    smaller number of trials.
    """
    kb, sb, kn, sn = (np.asarray(v, dtype=float) for v in (base_counts, base_exposure, new_counts, new_exposure))
    size = min(len(kb), len(kn))
    if size == 0 or sb.sum() <= 0 or sn.sum() <= 0:
        return NO_TEST
    phi = dispersion((kb, sb), (kn, sn))
    k_b, k_n = int(round(kb.sum() / phi)), int(round(kn.sum() / phi))
    s_b, s_n = sb.sum(), sn.sum()
    if k_b + k_n == 0:
        return RatioTest(Interval(1.0 if kb.sum() == kn.sum() == 0 else math.nan, math.nan, math.nan, size),
                         1.0)
    share = s_n / (s_b + s_n)
    result = stats.binomtest(k_n, k_b + k_n, share)
    ci = result.proportion_ci(confidence_level=CONFIDENCE, method="exact")
    odds = lambda p: p / (1 - p) * (s_b / s_n) if p < 1 else math.inf  # noqa: E731 (share -> rate ratio)
    rate_b, rate_n = kb.sum() / s_b, kn.sum() / s_n
    value = rate_n / rate_b if rate_b > 0 else math.inf
    return RatioTest(Interval(value, odds(ci.low), odds(ci.high), size), float(result.pvalue))


# -- many tests at once -------------------------------------------------------------------


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


def simes(p_values: Sequence[float]) -> float:
    """Simes' p-value that *some* hypothesis of a family is false: min over k of m·p(k)/k (NaNs dropped)."""
    p = np.sort(clean(p_values))
    if not len(p):
        return math.nan
    return float(min(1.0, (len(p) * p / np.arange(1, len(p) + 1)).min()))


def hierarchical_adjust(families: Sequence[Hashable], p_values: Sequence[float]) -> np.ndarray:
    """Adjusted p-values of a two-level test: families first, then the points of the families that changed.

    Each family's Simes p-value enters Benjamini-Hochberg across the families;
    inside each of the R families selected out of M, Benjamini-Hochberg runs
    again at the level α·R/M (Benjamini & Bogomolov 2014), which controls the
    false discoveries averaged over the selected families. A point's adjusted
    p-value is max(its family's adjusted p, its own within-family adjusted p ×
    M/R): below α exactly when both levels reject. So 20 real changes in 4
    families are not diluted by 150 unchanged points elsewhere, and noise
    spread thinly over many families selects none. NaNs stay NaN.
    """
    p = np.asarray(p_values, dtype="float64")
    out = np.full(p.shape, math.nan)
    keys = list(dict.fromkeys(families))
    members = {key: [i for i, f in enumerate(families) if f == key] for key in keys}
    family_p = np.array([simes(p[members[key]]) for key in keys])
    family_adj = adjust_p_values(family_p)
    known = ~np.isnan(family_adj)
    m = int(known.sum())
    selected = int((family_adj[known] < ALPHA).sum())
    scale = m / selected if selected else math.inf
    for key, adj in zip(keys, family_adj):
        idx = members[key]
        within = adjust_p_values(p[idx])
        with np.errstate(invalid="ignore"):
            out[idx] = np.where(np.isnan(within), np.nan, np.maximum(adj, np.minimum(1.0, within * scale)))
    return out


# -- verdicts -------------------------------------------------------------------------------


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
    """Two-sided p-value that NEW and BASE of one point differ, on its own (no family).

    Times are positive with multiplicative noise, so the test is Welch's t on
    their logarithms (a shift there is a ratio); values that can be 0 get the
    Mann-Whitney U test. NaN when a side has fewer than 2 values.
    """
    b, n = clean(base), clean(new)
    if len(b) < 2 or len(n) < 2:
        return math.nan
    if np.all(b == b[0]) and np.all(n == n[0]):
        return 1.0 if b[0] == n[0] else 0.0
    if np.all(b > 0) and np.all(n > 0):
        return log_ratio_test(b, n).p_value
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(stats.mannwhitneyu(n, b, alternative="two-sided").pvalue)


def change(ratio: Interval, p_adjusted: float, *, lower_is_better: bool = True,
           tolerance: float = CHANGE_TOLERANCE, alpha: float = ALPHA) -> str:
    """Verdict on a ratio NEW/BASE: improved, regressed, unchanged or inconclusive.

    A change is called only when the test says so (``p_adjusted`` < ``alpha``),
    the ratio's interval excludes 1, *and* the ratio is beyond ``1 ± tolerance``
    (a real but tiny shift is not news). ``unchanged`` only when the whole
    interval lies within the tolerance band. An infinite ratio (a count that
    was 0 and no longer is) is a change when the test says so and its interval,
    where it has one, lies above 1. Everything else is inconclusive.
    """
    significant = not math.isnan(p_adjusted) and p_adjusted < alpha
    worse = REGRESSED if lower_is_better else IMPROVED
    better = IMPROVED if lower_is_better else REGRESSED
    if math.isinf(ratio.value):
        return worse if significant and not (ratio.low <= 1) else INCONCLUSIVE
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


def machine_verdict(floor_ratio: Interval, tolerance: float = CHANGE_TOLERANCE) -> str:
    """What the floors' ratio NEW/BASE (times: below 1 is faster) says of NEW's machine against BASE's.

    ``faster``/``slower`` when the interval excludes 1 and the ratio is beyond
    ``1 ± tolerance``; ``same`` when the interval lies within the band; else
    ``inconclusive`` (also with no floor in common).
    """
    verdict = change(floor_ratio, 0.0 if floor_ratio.known else math.nan, tolerance=tolerance)
    return {IMPROVED: FASTER, REGRESSED: SLOWER, UNCHANGED: SAME}.get(verdict, INCONCLUSIVE)


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


def median_ci_any(values: Values) -> Interval:
    """Median with the distribution-free interval of order statistics, for values of any sign
    (a difference per trial, such as outage − downtime, has no logarithm)."""
    arr = clean(values)
    if len(arr) == 0:
        return UNKNOWN
    med = float(np.median(arr))
    if len(arr) == 1:
        return Interval(med, math.nan, math.nan, 1)
    low, high = _order_statistic_ci(arr)
    return Interval(med, low, high, len(arr))
