"""The performance targets of issue 4: each a figure measured in one run against a threshold.

Every verdict compares the run with itself (a floor or another mode measured
in the same run, at the same size), and is taken on the 95% interval of the
figure (:mod:`migfd.stats`): ``pass`` only when the whole interval is on the
right side of the threshold, ``fail`` when all of it is on the wrong side,
``inconclusive`` when the trials cannot tell, ``not-measured`` (with the reason,
from the run's metadata) when the run has nothing to compare. A target judged
at several points (live and non-live, several sizes) passes only where every
point passes; the figure shown is the worst point's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import pandas as pd

from migfd.results.describe import scenario_info, why_absent
from migfd.results.load import select
from migfd.results.summary import (
    fmt_bytes,
    fmt_interval,
    fmt_ns,
    fmt_rate,
    live_label,
    median_of,
    mode_label,
    qemu_downtime,
    qemu_has_events,
    throughput,
)
from migfd.stats import (
    FAIL,
    INCONCLUSIVE,
    NOT_MEASURED,
    PASS,
    Interval,
    bootstrap_ci,
    clean,
    combine_verdicts,
    ratio_ci,
    threshold_verdict,
)
from migfd.units import GiB

COLUMNS = ["target", "measured", "ci_low", "ci_high", "threshold", "verdict", "detail", "why"]


def failures_note(df: pd.DataFrame, scenario: str, mode: str | None = None) -> str:
    """'' or ' (2 of 10 trials failed: <first error>)' for a scenario/mode."""
    rows = select(df, scenario, mode, ok=None)
    bad = rows[~rows["ok"].fillna(False).astype(bool)]
    if bad.empty:
        return ""
    first = next((e for e in bad["error"] if e), "no error text")
    return f" ({len(bad)} of {len(rows)} trials failed; first error: {first})"


@dataclass(frozen=True)
class Target:
    """One performance target: a measured figure against a threshold."""

    name: str
    #: "<=", ">=", "<" or "=="
    op: str
    threshold: float
    #: what the measured figure is, for the table
    unit: str

    def threshold_text(self) -> str:
        sym = {"<=": "≤", ">=": "≥", "<": "<", "==": "="}[self.op]
        return f"{sym} {self.threshold:g}"


TARGETS = {
    "flat-in-ram": Target("fd-passing downtime flat in RAM (largest / smallest RAM size)", "<=", 1.25, "ratio"),
    "copy-vs-fd-1gib": Target("non-live state copy / fd-passing downtime at 1 GiB", ">=", 100, "ratio"),
    "zero-frames-lost": Target("frames lost + duplicated with fd-passing under TAP traffic", "==", 0, "frames"),
    "copy-throughput": Target("non-live state-copy throughput / raw AF_UNIX throughput into fresh memory, "
                              "same size", ">=", 0.8, "ratio"),
    "handover-floor": Target("fd-passing downtime (RAM + TAP + chardev) / handover floor", "<=", 10, "ratio"),
    "per-fd-cost": Target("marginal cost of one more fd / raw batched per-fd cost", "<=", 2, "ratio"),
    "vs-qemu": Target("fd-passing / real QEMU median downtime at the same RAM size", "<", 1, "ratio"),
}


@dataclass(frozen=True)
class Point:
    """One place a target is judged: its figure with interval, and what was compared."""

    interval: Interval
    text: str


def _judged(key: str, points: list[Point], detail: str, why_fail: str = "") -> dict:
    """The target's row from its points: combined verdict, the worst point shown; ``why_fail``
    says in words what a failure means."""
    t = TARGETS[key]
    verdicts = [threshold_verdict(p.interval, t.op, t.threshold) for p in points]
    verdict = combine_verdicts(verdicts)
    # the worst point: the one that fails, else the one nearest to failing
    sign = -1 if t.op in (">=", ">") else 1
    order = sorted(range(len(points)), key=lambda i: (verdicts[i] != FAIL, verdicts[i] != INCONCLUSIVE,
                                                      -sign * points[i].interval.value))
    worst = points[order[0]]
    shown = fmt_interval(worst.interval)
    why = ""
    if verdict == FAIL:
        why = f"{why_fail}: {shown} misses {t.threshold_text()}" if why_fail else f"{shown} misses {t.threshold_text()}"
    elif verdict == INCONCLUSIVE:
        why = (f"the 95% interval {shown} straddles {t.threshold_text()}: more trials would decide"
               if worst.interval.known else f"too few trials for an interval (n={worst.interval.n})")
    many = f"worst of {len(points)}: " if len(points) > 1 else ""
    return {"target": t.name, "measured": worst.interval.value, "ci_low": worst.interval.low,
            "ci_high": worst.interval.high, "threshold": t.threshold_text(), "verdict": verdict,
            "detail": f"{many}{worst.text}{detail}", "why": why}


def _not_measured(key: str, why: str, detail: str = "") -> dict:
    t = TARGETS[key]
    return {"target": t.name, "measured": math.nan, "ci_low": math.nan, "ci_high": math.nan,
            "threshold": t.threshold_text(), "verdict": NOT_MEASURED, "detail": detail, "why": why}


def _values(rows: pd.DataFrame, column: str = "downtime_ns") -> np.ndarray:
    return clean(rows[column].astype("float64"))


def _target_flat(df, meta):
    fd = select(df, "ram-size", "fd-passing")
    points = []
    for live, g in fd.groupby("live", dropna=False):
        sizes = sorted(g["ram_bytes"].dropna().unique())
        if len(sizes) < 2:
            continue
        small, large = g[g["ram_bytes"] == sizes[0]], g[g["ram_bytes"] == sizes[-1]]
        ci = ratio_ci(_values(small), _values(large))
        points.append(Point(ci, f"{live_label(live) or 'live unknown'}: {fmt_ns(median_of(large['downtime_ns']))} "
                                f"at {fmt_bytes(sizes[-1])} vs {fmt_ns(median_of(small['downtime_ns']))} "
                                f"at {fmt_bytes(sizes[0])} = {fmt_interval(ci)}"))
    if not points:
        why = (why_absent(df, meta, "ram-size", "fd-passing trials at two RAM sizes") if fd.empty
               else "fd-passing measured at one RAM size only")
        return _not_measured("flat-in-ram", why)
    return _judged("flat-in-ram", points, failures_note(df, "ram-size", "fd-passing"),
                   "fd-passing downtime grows with RAM")


def _target_copy_vs_fd(df, meta):
    rows = select(df, "ram-size")
    rows = rows[rows["live"] == False]  # noqa: E712 (nullable boolean)
    fd = rows[rows["mode"] == "fd-passing"]
    sc = rows[rows["mode"] == "state-copy"]
    if fd.empty or sc.empty:
        return _not_measured("copy-vs-fd-1gib", why_absent(df, meta, "ram-size", "non-live trials of both modes"))
    at = lambda rows, size: rows[rows["ram_bytes"] == size]  # noqa: E731
    common = sorted(set(fd["ram_bytes"].dropna()) & set(sc["ram_bytes"].dropna()))
    if GiB in common:
        c, f = at(sc, GiB), at(fd, GiB)
        ci = ratio_ci(_values(f), _values(c))
        text = (f"state copy {fmt_ns(median_of(c['downtime_ns']))} vs fd-passing "
                f"{fmt_ns(median_of(f['downtime_ns']))}, non-live = {fmt_interval(ci)}")
        return _judged("copy-vs-fd-1gib", [Point(ci, text)], failures_note(df, "ram-size"),
                       "state copy of 1 GiB is not slow enough against fd-passing")
    if not common:
        return _not_measured("copy-vs-fd-1gib", "no RAM size measured non-live in both modes")
    largest = common[-1]
    ci = ratio_ci(_values(at(fd, largest)), _values(at(sc, largest)))
    skipped = [p for p in scenario_info(meta, "ram-size").get("skipped_points") or []
               if isinstance(p, dict) and p.get("ram_bytes") == GiB]
    why = (f"1 GiB was skipped: {skipped[0].get('reason', 'no reason given')}" if skipped else
           f"1 GiB not measured in this run (largest non-live size: {fmt_bytes(largest)}; "
           f"a quick run stops at 256 MiB)")
    return _not_measured("copy-vs-fd-1gib", why,
                         f"at {fmt_bytes(largest)}: state copy / fd-passing = {fmt_interval(ci)}")


def _target_frames(df, meta):
    # Every trial counts, failed ones too: frames lost in a trial that failed are still lost.
    rows = select(df, "tap-traffic", "fd-passing", ok=None)
    counted = rows[rows["frames_sent"].notna()]
    if counted.empty:
        return _not_measured("zero-frames-lost",
                             why_absent(df, meta, "tap-traffic", "fd-passing trials with frame counts"))
    lost = int(counted["frames_lost"].fillna(0).sum())
    dup = int(counted["frames_duplicated"].fillna(0).sum())
    sent = int(counted["frames_sent"].fillna(0).sum())
    failed = int((~counted["ok"].fillna(False).astype(bool)).sum())
    uncounted = len(rows) - len(counted)
    total = float(lost + dup)
    text = (f"{lost} lost, {dup} duplicated of {sent:,} frames sent in {len(counted)} fd-passing trials"
            + (f" ({failed} of them failed, their frames counted)" if failed else ""))
    detail = failures_note(df, "tap-traffic", "fd-passing")
    t = TARGETS["zero-frames-lost"]
    row = {"target": t.name, "measured": total, "ci_low": total, "ci_high": total,
           "threshold": t.threshold_text(), "detail": text + detail, "why": ""}
    if total > 0:
        row.update(verdict=FAIL, why=f"{lost} frames lost and {dup} duplicated while the TAP fds were handed over")
    elif uncounted:
        row.update(verdict=INCONCLUSIVE, why=f"{uncounted} failed trial(s) have no frame counts: "
                                             f"what they lost is unknown")
    else:
        row["verdict"] = PASS
    return row


def _target_throughput(df, meta):
    floors = select(df, "limits", variant="unix-throughput")
    if floors.empty:
        return _not_measured("copy-throughput", why_absent(df, meta, "limits", "unix-throughput floor"))
    rows = select(df, "ram-size", "state-copy")
    rows = rows[rows["live"] == False]  # noqa: E712 (nullable boolean)
    if rows.empty:
        return _not_measured("copy-throughput", why_absent(df, meta, "ram-size", "non-live state-copy trials"))
    rows = rows.assign(_tp=throughput(rows))
    floor_sizes = set(floors["ram_bytes"].dropna())
    common = sorted(set(rows["ram_bytes"].dropna()) & floor_sizes)
    if not common:
        return _not_measured(
            "copy-throughput",
            f"no size on both sides: the floor was measured at {', '.join(fmt_bytes(s) for s in sorted(floor_sizes))}, "
            f"non-live state copy at {', '.join(fmt_bytes(s) for s in sorted(set(rows['ram_bytes'].dropna())))}")
    points = []
    for size in common:
        tp = _values(rows[rows["ram_bytes"] == size], "_tp")
        floor = _values(floors[floors["ram_bytes"] == size], "value")
        ci = ratio_ci(floor, tp)
        points.append(Point(ci, f"{fmt_bytes(size)}: state copy {fmt_rate(float(np.median(tp)) if len(tp) else math.nan)}"
                                f" vs raw AF_UNIX {fmt_rate(float(np.median(floor)))} = {fmt_interval(ci)}"))
    return _judged("copy-throughput", points,
                   " (window: guest stopped → resumed, the whole copy and nothing else)"
                   + failures_note(df, "ram-size", "state-copy"), "state copy too slow")


def _target_handover(df, meta):
    floor_rows = select(df, "limits", variant="handover-floor")
    if floor_rows.empty:
        return _not_measured("handover-floor", why_absent(df, meta, "limits", "handover-floor measurement"))
    fd = df[(df["mode"] == "fd-passing") & (df["scenario"] != "limits") & df["ok"].fillna(False).astype(bool)]
    backends = set(floor_rows["backend"]) - {""}
    want = next(iter(backends)) if len(backends) == 1 else "ram+tap+chardev"
    fd = fd[fd["backend"] == want]
    if fd.empty:
        why = why_absent(df, meta, "tap-traffic", f"fd-passing trials of a VM with {want}")
        return _not_measured("handover-floor", why if "skipped" in why else
                             f"no successful fd-passing trial of a VM with {want}")
    floor = floor_rows[floor_rows["backend"] == want] if want in backends else floor_rows
    ci = ratio_ci(_values(floor, "total_ns"), _values(fd))
    scen = ", ".join(sorted(set(fd["scenario"])))
    text = (f"{want} ({scen}): downtime {fmt_ns(median_of(fd['downtime_ns']))} vs floor "
            f"{fmt_ns(median_of(floor['total_ns']))} for the same fds and device-state bytes = {fmt_interval(ci)}")
    return _judged("handover-floor", [Point(ci, text)], "", "fd-passing far above the raw handover")


def _slope(x: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """Least-squares slope of ``medians`` (k points x any batch shape) against ``x`` (k,)."""
    xc = x - x.mean()
    shape = (len(x),) + (1,) * (medians.ndim - 1)
    return (xc.reshape(shape) * (medians - medians.mean(axis=0))).sum(axis=0) / (xc ** 2).sum()


def slope_ratio_ci(groups: list[tuple[float, np.ndarray]], floor: list[tuple[float, np.ndarray]]) -> Interval:
    """(slope of the medians of ``groups`` against x) / (the same of ``floor``), with a bootstrap interval.

    Each group is (x, trials); a floor of one group only is a per-x cost already
    (its medians are the slope). Every group is resampled independently.
    """
    xs = np.array([x for x, _ in groups], dtype=float)
    fx = np.array([x for x, _ in floor], dtype=float)
    k = len(groups)

    def statistic(*samples, axis=-1):
        med = np.stack([np.median(s, axis=axis) for s in samples])
        num = _slope(xs, med[:k])
        den = _slope(fx, med[k:]) if len(fx) > 1 else med[k]
        with np.errstate(divide="ignore", invalid="ignore"):
            return num / den

    samples = [v for _, v in groups] + [v for _, v in floor]
    value = float(statistic(*[np.asarray(s)[None, :] for s in samples])[0])
    n = min(len(s) for s in samples)
    if n < 2:
        return Interval(value, math.nan, math.nan, n)
    low, high = bootstrap_ci(samples, statistic)
    return Interval(value, low, high, n)


def _by_n_fds(rows: pd.DataFrame, column: str) -> list[tuple[float, np.ndarray]]:
    out = []
    for n, g in rows.groupby("n_fds"):
        vals = _values(g, column)
        if len(vals):
            out.append((float(n), vals))
    return out


def _target_per_fd(df, meta):
    floor_rows = select(df, "limits", variant="fd-roundtrip")
    floor = _by_n_fds(floor_rows, "total_ns")
    if len(floor) < 2:
        floor = [(0.0, _values(floor_rows, "value"))] if len(floor_rows) else []
    if not floor:
        return _not_measured("per-fd-cost", why_absent(df, meta, "limits", "fd-roundtrip floor"))
    rows = select(df, "fd-count", "fd-passing")
    batched = rows[rows["variant"] == "batched"]
    use, label = (batched, "batched") if not batched.empty else (rows, "all fd-passing")
    groups = _by_n_fds(use, "downtime_ns")
    if len(groups) < 2:
        return _not_measured("per-fd-cost", why_absent(df, meta, "fd-count", "fd-passing trials at two fd counts")
                             if not groups else "fd-passing measured at one fd count only")
    ci = slope_ratio_ci(groups, floor)
    text = (f"{label}: slope of median downtime over {int(groups[0][0])}–{int(groups[-1][0])} fds against the "
            f"raw batched round trip's = {fmt_interval(ci)}")
    return _judged("per-fd-cost", [Point(ci, text)], failures_note(df, "fd-count", "fd-passing"),
                   "each extra fd costs too much")


def _target_qemu(df, meta):
    q = select(df, "qemu-peer")
    q = q[q["mode"].str.startswith("qemu")]
    if q.empty:
        return _not_measured("vs-qemu", why_absent(df, meta, "qemu-peer", "successful QEMU migrations"))
    # like with like: migfd's guest RAM is filled (no zero pages), so QEMU's with random bytes where
    # the run has it (variant "filled"), not RAM as QEMU gives it (mostly zero pages)
    if (q["variant"] == "filled").any():
        q = q[q["variant"] == "filled"]
    fd = select(df, "ram-size", "fd-passing")
    q = q.assign(_down=qemu_downtime(q))
    points = []
    for (size, version), qs in q.groupby(["ram_bytes", "peer_version"], dropna=False):
        lives = set(qs["live"].dropna())
        f = fd[fd["ram_bytes"] == size]
        if lives and not f[f["live"].isin(lives)].empty:
            f = f[f["live"].isin(lives)]
        if f.empty:
            continue
        per_mode = qs.groupby("mode")["_down"].apply(median_of)
        best = per_mode.idxmin()
        ci = ratio_ci(_values(qs[qs["mode"] == best], "_down"), _values(f))
        qemu = f"QEMU {version}" if version else "real QEMU"
        points.append(Point(ci, f"{fmt_bytes(size)}: fd-passing {fmt_ns(median_of(f['downtime_ns']))} vs "
                                f"{mode_label(best).replace('real QEMU', qemu)} {fmt_ns(per_mode[best])} "
                                f"= {fmt_interval(ci)}"))
    if not points:
        return _not_measured("vs-qemu", "no RAM size measured both by qemu-peer and by fd-passing in ram-size")
    how = ("QEMU from its STOP/RESUME events" if qemu_has_events(q) else "QEMU's own downtime (ends on the source)")
    return _judged("vs-qemu", points, f" (against QEMU's faster mode; {how})", "real QEMU was as fast or faster")


_CHECKS = {"flat-in-ram": _target_flat, "copy-vs-fd-1gib": _target_copy_vs_fd,
           "zero-frames-lost": _target_frames, "copy-throughput": _target_throughput,
           "handover-floor": _target_handover, "per-fd-cost": _target_per_fd, "vs-qemu": _target_qemu}


def targets(df: pd.DataFrame, metadata: dict | None = None, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per target: measured figure with its 95% interval, threshold, verdict, what was compared, why.

    ``verdict`` is "pass", "fail", "inconclusive" or "not-measured"; ``why``
    explains all but a pass (a skipped scenario's reason comes from
    ``metadata["scenarios"]``). Times come from successful trials, and the
    failed ones are counted in ``detail``; frame counts come from every trial.
    ``keys`` picks some targets (keys of :data:`TARGETS`); default all, in order.
    """
    chosen = list(keys) if keys is not None else list(_CHECKS)
    unknown = [k for k in chosen if k not in _CHECKS]
    if unknown:
        raise ValueError(f"unknown target {unknown[0]!r}; choose from {', '.join(_CHECKS)}")
    return pd.DataFrame([_CHECKS[k](df, metadata) for k in chosen], columns=COLUMNS)


VERDICT_COLOURS = {PASS: "background-color: #d4edda", FAIL: "background-color: #f8d7da",
                   INCONCLUSIVE: "background-color: #e2e3e5", NOT_MEASURED: "background-color: #fff3cd"}


def format_targets(table: pd.DataFrame):
    """The targets table for reading: "measured [95% CI]" to 3 significant digits, verdicts coloured."""
    shown = table.copy()
    counts = {t.name for t in TARGETS.values() if t.unit == "frames"}
    shown.insert(1, "measured [95% CI]", [
        "—" if pd.isna(v) else f"{v:.0f} (count, all trials)" if name in counts else
        fmt_interval(Interval(v, lo, hi, 2 if not (pd.isna(lo) or pd.isna(hi)) else 1))
        for name, v, lo, hi in zip(shown["target"], shown.pop("measured"), shown.pop("ci_low"),
                                   shown.pop("ci_high"))])
    return (shown.style.hide(axis="index")
            .map(lambda v: VERDICT_COLOURS.get(v, ""), subset=["verdict"])
            .set_properties(**{"text-align": "left", "white-space": "normal"}))
