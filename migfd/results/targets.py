"""The performance targets of issue 4: each a figure measured in one run against a threshold.

Every verdict compares the run with itself (a floor or another mode measured
in the same run); ``not-measured`` says why, from the run's metadata.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import pandas as pd

from migfd.results.describe import scenario_info, why_absent
from migfd.results.load import select
from migfd.results.summary import (
    floor_median,
    fmt_bytes,
    fmt_ns,
    fmt_rate,
    live_label,
    median_of,
    mode_label,
    qemu_downtime,
    qemu_has_events,
    slope_per_fd,
    summarize,
    throughput,
)
from migfd.units import GiB


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

    def holds(self, measured: float) -> bool:
        return {"<=": measured <= self.threshold, ">=": measured >= self.threshold,
                "<": measured < self.threshold, "==": measured == self.threshold}[self.op]

    def threshold_text(self) -> str:
        sym = {"<=": "≤", ">=": "≥", "<": "<", "==": "="}[self.op]
        return f"{sym} {self.threshold:g}"


TARGETS = {
    "flat-in-ram": Target("fd-passing downtime flat in RAM (largest / smallest RAM size)", "<=", 1.25, "ratio"),
    "copy-vs-fd-1gib": Target("non-live state copy / fd-passing downtime at 1 GiB", ">=", 100, "ratio"),
    "zero-frames-lost": Target("frames lost + duplicated with fd-passing under TAP traffic", "==", 0, "frames"),
    "copy-throughput": Target("state-copy bulk throughput / raw AF_UNIX throughput into fresh memory",
                              ">=", 0.8, "ratio"),
    "handover-floor": Target("fd-passing downtime (RAM + TAP + chardev) / handover floor", "<=", 10, "ratio"),
    "per-fd-cost": Target("marginal cost of one more fd / raw batched per-fd cost", "<=", 2, "ratio"),
    "vs-qemu": Target("fd-passing / real QEMU median downtime at the same RAM size", "<", 1, "ratio"),
}


def _verdict(key: str, measured: float, detail: str, why_fail: str = "") -> dict:
    t = TARGETS[key]
    ok = t.holds(measured)
    return {"target": t.name, "measured": measured, "threshold": t.threshold_text(),
            "verdict": "pass" if ok else "fail", "detail": detail,
            "why": "" if ok else why_fail or f"{measured:.3g} misses {t.threshold_text()}"}


def _not_measured(key: str, why: str, detail: str = "") -> dict:
    t = TARGETS[key]
    return {"target": t.name, "measured": float("nan"), "threshold": t.threshold_text(),
            "verdict": "not-measured", "detail": detail, "why": why}


def _target_flat(df, meta):
    pts = summarize(select(df, "ram-size", "fd-passing", ok=None))
    pts = pts[pts["n"] > 0]
    if pts["ram_bytes"].nunique() < 2:
        return _not_measured("flat-in-ram", why_absent(df, meta, "ram-size", "fd-passing trials at two RAM sizes")
                             if pts.empty else "fd-passing measured at one RAM size only")
    worst = None
    for live, g in pts.groupby("live", dropna=False):
        g = g.groupby("ram_bytes")["median"].median().sort_index()
        if len(g) < 2:
            continue
        ratio = g.iloc[-1] / g.iloc[0]
        label = live_label(live) or "live unknown"
        text = (f"{label}: {fmt_ns(g.iloc[-1])} at {fmt_bytes(g.index[-1])} vs "
                f"{fmt_ns(g.iloc[0])} at {fmt_bytes(g.index[0])}")
        if worst is None or ratio > worst[0]:
            worst = (ratio, text)
    if worst is None:
        return _not_measured("flat-in-ram", "no live or non-live series with two RAM sizes")
    detail = f"worst of live/non-live: {worst[1]}" + failures_note(df, "ram-size", "fd-passing")
    return _verdict("flat-in-ram", worst[0], detail,
                    f"fd-passing downtime grows with RAM: {worst[1]}")


def _target_copy_vs_fd(df, meta):
    rows = select(df, "ram-size")
    rows = rows[rows["live"] == False]  # noqa: E712 (nullable boolean)
    fd = rows[rows["mode"] == "fd-passing"]
    sc = rows[rows["mode"] == "state-copy"]
    if fd.empty or sc.empty:
        return _not_measured("copy-vs-fd-1gib", why_absent(df, meta, "ram-size", "non-live trials of both modes"))
    at = lambda rows, size: median_of(rows.loc[rows["ram_bytes"] == size, "downtime_ns"])  # noqa: E731
    common = sorted(set(fd["ram_bytes"].dropna()) & set(sc["ram_bytes"].dropna()))
    if GiB in common:
        c, f = at(sc, GiB), at(fd, GiB)
        return _verdict("copy-vs-fd-1gib", c / f, f"state copy {fmt_ns(c)} vs fd-passing {fmt_ns(f)}, non-live"
                        + failures_note(df, "ram-size"),
                        f"state copy of 1 GiB took only {c / f:.3g}× the fd-passing downtime")
    if not common:
        return _not_measured("copy-vs-fd-1gib", "no RAM size measured non-live in both modes")
    largest = common[-1]
    c, f = at(sc, largest), at(fd, largest)
    skipped = [p for p in scenario_info(meta, "ram-size").get("skipped_points") or []
               if isinstance(p, dict) and p.get("ram_bytes") == GiB]
    why = (f"1 GiB was skipped: {skipped[0].get('reason', 'no reason given')}" if skipped else
           f"1 GiB not measured in this run (largest non-live size: {fmt_bytes(largest)}; "
           f"a quick run stops at 256 MiB)")
    return _not_measured("copy-vs-fd-1gib", why,
                         f"at {fmt_bytes(largest)}: state copy {fmt_ns(c)} / fd-passing {fmt_ns(f)} = {c / f:.3g}")


def _target_frames(df, meta):
    rows = select(df, "tap-traffic", "fd-passing")
    if rows.empty or rows["frames_sent"].isna().all():
        return _not_measured("zero-frames-lost",
                             why_absent(df, meta, "tap-traffic", "fd-passing trials with frame counts"))
    lost = int(rows["frames_lost"].fillna(0).sum())
    dup = int(rows["frames_duplicated"].fillna(0).sum())
    sent = int(rows["frames_sent"].fillna(0).sum())
    detail = (f"{lost} lost, {dup} duplicated of {sent:,} frames sent in {len(rows)} fd-passing trials"
              + failures_note(df, "tap-traffic", "fd-passing"))
    return _verdict("zero-frames-lost", float(lost + dup), detail,
                    f"{lost} frames lost and {dup} duplicated while the TAP fds were handed over")


def _target_throughput(df, meta):
    floor = floor_median(df, "unix-throughput")
    if math.isnan(floor):
        return _not_measured("copy-throughput", why_absent(df, meta, "limits", "unix-throughput floor"))
    rows = select(df, "ram-size", "state-copy")
    if rows.empty:
        return _not_measured("copy-throughput", why_absent(df, meta, "ram-size", "state-copy trials"))
    nonlive = rows[rows["live"] == False]  # noqa: E712
    use, label = (nonlive, "non-live") if not nonlive.empty else (rows, "live")
    largest = use["ram_bytes"].max()
    at = use[use["ram_bytes"] == largest]
    tp = median_of(throughput(at))
    detail = (f"{label} state copy of {fmt_bytes(largest)}: {fmt_rate(tp)} vs raw AF_UNIX {fmt_rate(floor)}"
              + failures_note(df, "ram-size", "state-copy"))
    return _verdict("copy-throughput", tp / floor, detail,
                    f"state copy moved {fmt_rate(tp)}, the raw socket {fmt_rate(floor)}")


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
    floor = median_of(floor_rows[floor_rows["backend"] == want]["total_ns"]) if want in backends \
        else median_of(floor_rows["total_ns"])
    down = median_of(fd["downtime_ns"])
    scen = ", ".join(sorted(set(fd["scenario"])))
    detail = (f"{want} ({scen}): downtime {fmt_ns(down)} vs floor {fmt_ns(floor)} "
              f"for the same fds and device-state bytes")
    return _verdict("handover-floor", down / floor, detail,
                    f"downtime {fmt_ns(down)} is {down / floor:.3g}× the raw handover {fmt_ns(floor)}")


def _target_per_fd(df, meta):
    floor = summarize(select(df, "limits", variant="fd-roundtrip", ok=None), metric="total_ns")
    floor = floor[floor["n"] > 0]
    floor_slope = slope_per_fd(floor)
    if math.isnan(floor_slope):
        per_fd = floor_median(df, "fd-roundtrip")
        floor_slope = per_fd if not math.isnan(per_fd) else floor_slope
    if math.isnan(floor_slope):
        return _not_measured("per-fd-cost", why_absent(df, meta, "limits", "fd-roundtrip floor"))
    rows = select(df, "fd-count", "fd-passing", ok=None)
    batched = rows[rows["variant"] == "batched"]
    use, label = (batched, "batched") if not batched.empty else (rows, "all fd-passing")
    pts = summarize(use)
    pts = pts[pts["n"] > 0]
    slope = slope_per_fd(pts)
    if math.isnan(slope):
        return _not_measured("per-fd-cost", why_absent(df, meta, "fd-count", "fd-passing trials at two fd counts")
                             if pts.empty else "fd-passing measured at one fd count only")
    detail = (f"{label}: +{fmt_ns(slope)} per fd (slope of median downtime over "
              f"{pts['n_fds'].min()}–{pts['n_fds'].max()} fds) vs raw +{fmt_ns(floor_slope)} per fd"
              + failures_note(df, "fd-count", "fd-passing"))
    return _verdict("per-fd-cost", slope / floor_slope, detail,
                    f"each extra fd costs {fmt_ns(slope)} in a migration, {fmt_ns(floor_slope)} raw")


def _target_qemu(df, meta):
    q = select(df, "qemu-peer")
    q = q[q["mode"].str.startswith("qemu")]
    if q.empty:
        return _not_measured("vs-qemu", why_absent(df, meta, "qemu-peer", "successful QEMU migrations"))
    fd = select(df, "ram-size", "fd-passing")
    worst = None
    for size, qs in q.groupby("ram_bytes"):
        lives = set(qs["live"].dropna())
        f = fd[fd["ram_bytes"] == size]
        if lives and not f[f["live"].isin(lives)].empty:
            f = f[f["live"].isin(lives)]
        if f.empty:
            continue
        fmed = median_of(f["downtime_ns"])
        per_mode = qs.assign(_down=qemu_downtime(qs)).groupby("mode")["_down"].apply(median_of)
        best_mode = per_mode.idxmin()
        ratio = fmed / per_mode[best_mode]
        text = (f"{fmt_bytes(size)}: fd-passing {fmt_ns(fmed)} vs {mode_label(best_mode)} "
                f"{fmt_ns(per_mode[best_mode])}")
        if worst is None or ratio > worst[0]:
            worst = (ratio, text)
    if worst is None:
        return _not_measured("vs-qemu", "no RAM size measured both by qemu-peer and by fd-passing in ram-size")
    how = ("QEMU from its STOP/RESUME events" if qemu_has_events(q) else "QEMU's own downtime (ends on the source)")
    return _verdict("vs-qemu", worst[0], f"worst size, against QEMU's faster mode ({how}): " + worst[1],
                    f"real QEMU was faster: {worst[1]}")


_CHECKS = {"flat-in-ram": _target_flat, "copy-vs-fd-1gib": _target_copy_vs_fd,
           "zero-frames-lost": _target_frames, "copy-throughput": _target_throughput,
           "handover-floor": _target_handover, "per-fd-cost": _target_per_fd, "vs-qemu": _target_qemu}


def targets(df: pd.DataFrame, metadata: dict | None = None, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per target of issue 4: measured figure, threshold, verdict, what was compared, why.

    ``verdict`` is "pass", "fail" or "not-measured"; ``why`` explains a
    failure or a missing measurement (a skipped scenario's reason comes from
    ``metadata["scenarios"]``). Only trials with ok=True are counted.
    ``keys`` picks some targets (keys of :data:`TARGETS`); default all, in order.
    """
    chosen = list(keys) if keys is not None else list(_CHECKS)
    unknown = [k for k in chosen if k not in _CHECKS]
    if unknown:
        raise ValueError(f"unknown target {unknown[0]!r}; choose from {', '.join(_CHECKS)}")
    return pd.DataFrame([_CHECKS[k](df, metadata) for k in chosen],
                        columns=["target", "measured", "threshold", "verdict", "detail", "why"])


def format_targets(table: pd.DataFrame):
    """The targets table for reading: measured to 3 significant digits, verdicts coloured."""
    shown = table.copy()
    shown["measured"] = [("—" if pd.isna(v) else f"{v:.3g}") for v in shown["measured"]]
    colours = {"pass": "background-color: #d4edda", "fail": "background-color: #f8d7da",
               "not-measured": "background-color: #fff3cd"}
    return (shown.style.hide(axis="index")
            .map(lambda v: colours.get(v, ""), subset=["verdict"])
            .set_properties(**{"text-align": "left", "white-space": "normal"}))
