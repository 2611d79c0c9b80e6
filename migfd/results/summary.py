"""Medians per measured point, the figures derived from rows (throughput, QEMU's downtime, floors,
cost per fd), and the formatting every table and figure shares."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from migfd.results.load import POINT_KEYS, select
from migfd.stats import Interval, median_ci
from migfd.units import GiB, KiB, MiB

#: How each mode is named in tables and figures, in the order they are shown.
MODE_LABELS = {
    "fd-passing": "fd-passing",
    "state-copy": "state copy",
    "qemu-ram-copied": "real QEMU, RAM copied",
    "qemu-ram-shared": "real QEMU, RAM shared (x-ignore-shared)",
    "qemu-cpr-transfer": "real QEMU, cpr-transfer (RAM fds passed)",
}


def mode_label(mode: str) -> str:
    return MODE_LABELS.get(mode, mode)


def summarize(df: pd.DataFrame, metric: str = "downtime_ns") -> pd.DataFrame:
    """Median with its 95% interval, p5, p95 and n of ``metric`` per point (:data:`POINT_KEYS`).

    Only trials with ok=True count in the figures; ``n_failed`` says how many
    of the point's trials failed, so a table or legend can show them.
    ``ci_low``/``ci_high`` bound the median (:func:`migfd.stats.median_ci`:
    NaN with one trial). Percentiles are linear interpolations between
    trials, so with a handful of trials p5 and p95 sit close to the extremes.
    """
    cols = [*POINT_KEYS, "n", "n_failed", "median", "ci_low", "ci_high", "p5", "p95"]
    if df.empty:
        return pd.DataFrame(columns=cols)
    work = df.copy()
    work["_v"] = pd.to_numeric(work[metric], errors="coerce").astype("float64")
    work["_good"] = work["ok"].fillna(False).astype(bool) & work["_v"].notna()
    work["_failed"] = ~work["ok"].fillna(False).astype(bool)
    rows = []
    for key, g in work.groupby(POINT_KEYS, dropna=False, sort=True):
        vals = g.loc[g["_good"], "_v"].to_numpy()
        rec = dict(zip(POINT_KEYS, key))
        rec["n"] = int(len(vals))
        rec["n_failed"] = int(g["_failed"].sum())
        ci = median_ci(vals)
        rec["median"], rec["ci_low"], rec["ci_high"] = ci.value, ci.low, ci.high
        if len(vals):
            rec["p5"], rec["p95"] = float(np.percentile(vals, 5)), float(np.percentile(vals, 95))
        else:
            rec["p5"] = rec["p95"] = float("nan")
        rows.append(rec)
    out = pd.DataFrame(rows, columns=cols)
    for col in ("ram_bytes", "n_fds"):
        out[col] = out[col].astype("Int64")
    out["live"] = out["live"].astype("boolean")
    return out.reset_index(drop=True)


def median_of(values: Iterable[Any]) -> float:
    """The median of the numbers among ``values`` (NaN if there are none)."""
    arr = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").dropna().astype(float)
    return float(np.median(arr)) if len(arr) else float("nan")


def fmt_bytes(n: float) -> str:
    """64 MiB, 1 GiB, 4 KiB: binary units as the benchmark's sizes are."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "?"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.3g} {unit}"
    return f"{n:.0f} B"


def fmt_ns(ns: float) -> str:
    """A duration in the unit that keeps three significant digits readable."""
    if ns is None or (isinstance(ns, float) and math.isnan(ns)):
        return "?"
    ns = float(f"{ns:.3g}")  # 999.9999 ns is 1 µs, not "1e+03 ns"
    for unit, size in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if abs(ns) >= size:
            return f"{ns / size:.3g} {unit}"
    return f"{ns:.3g} ns"


def fmt_rate(bytes_per_s: float) -> str:
    return "?" if math.isnan(bytes_per_s) else f"{bytes_per_s / GiB:.3g} GiB/s"


def _plain(x: float) -> str:
    """Three significant digits without an exponent below 10^6 (1234 rather than 1.23e+03)."""
    return f"{x:.0f}" if 1000 <= abs(x) < 1e6 else f"{x:.3g}"


def fmt_interval(interval: Interval, fmt=None) -> str:
    """"1.87 ms [1.55, 2.10]": the value in ``fmt``, the bounds in the value's unit.

    The bounds are written with the value's unit stripped (they share it); an
    interval that cannot be given (one trial) says so.
    """
    fmt = fmt or _plain
    if math.isnan(interval.value):
        return "?"
    if math.isinf(interval.value):
        return "∞ [no interval]"
    text = fmt(interval.value)
    if not interval.known:
        return f"{text} [no interval: n={interval.n}]"
    value, _, unit = text.partition(" ")
    scale = float(value) / interval.value if interval.value and unit else None
    if scale is not None and math.isfinite(scale):
        low, high = (_plain(b * scale) for b in (interval.low, interval.high))
    else:
        low, high = (fmt(b) for b in (interval.low, interval.high))
    return f"{text} [{low}, {high}]"


def is_live(live: Any) -> bool | None:
    """A live flag as groupby hands it out (bool, numpy bool, NA) as True/False/None."""
    if live is None or live is pd.NA or (isinstance(live, float) and math.isnan(live)):
        return None
    return bool(live)


def live_label(live: Any) -> str:
    return {True: "live", False: "non-live", None: ""}[is_live(live)]


def throughput(df: pd.DataFrame) -> pd.Series:
    """Bytes per second through the migration channel per trial, over a window that holds only the copy.

    A non-live migration stops the guest first and then moves everything, so
    ``downtime_ns`` (source stop to destination resume) holds the whole
    transfer and nothing else: not the setup, and not the source's release of
    its RAM, which comes after the resume and is in ``total_ns``. A live row
    has no such window in results.csv (its copy overlaps the running guest and
    its total time ends after the release): NaN.
    """
    window = df["downtime_ns"].astype("Float64")
    out = df["bytes_sent"].astype("Float64") / window * 1e9
    nonlive = df["live"].astype("boolean").fillna(True) == False  # noqa: E712 (nullable boolean)
    return out.where(nonlive & (window > 0)).astype("float64")


def qemu_downtime(rows: pd.DataFrame) -> pd.Series:
    """Real QEMU's downtime per qemu-peer row, measured as migfd's is: guest stopped → running.

    QEMU's own ``downtime`` (ms) ends on the source; ``stop_resume_ns`` (the
    source's STOP event to the destination's RESUME event) ends where migfd's
    does, so it is used wherever the row has it.
    """
    own = rows["downtime_ns"].astype("Float64")
    events = rows["stop_resume_ns"].astype("Float64") if "stop_resume_ns" in rows else own * pd.NA
    return events.fillna(own).astype("float64")


def qemu_has_events(rows: pd.DataFrame) -> bool:
    return "stop_resume_ns" in rows and bool(rows["stop_resume_ns"].notna().any())


def floor_median(df: pd.DataFrame, variant: str, column: str = "value") -> float:
    """Median of a floor measurement (limits rows of ``variant``) over the trials of the run."""
    return median_of(select(df, "limits", variant=variant)[column])


def slope_per_fd(points: pd.DataFrame, x: str = "n_fds", y: str = "median") -> float:
    """Least-squares slope of ``y`` against ``x``: the cost of one more fd, in ``y``'s unit.

    ``points`` are medians per fd count (from :func:`summarize`); NaN if fewer
    than two distinct counts.
    """
    pts = points[[x, y]].astype("float64").dropna()
    if pts[x].nunique() < 2:
        return float("nan")
    slope, _ = np.polyfit(pts[x].to_numpy(), pts[y].to_numpy(), 1)
    return float(slope)


def format_summary(points: pd.DataFrame, unit: str = "ms") -> pd.DataFrame:
    """A :func:`summarize` table for reading: sizes in binary units, the median with its 95% interval
    as text ("1.87 [1.55, 2.10]" in ``unit``: ms, µs or s), p5/p95 in ``unit``, trials and failed trials."""
    scale = {"ms": 1e6, "µs": 1e3, "s": 1e9}[unit]
    out = points.copy()
    out["ram_bytes"] = [("" if pd.isna(v) else fmt_bytes(float(v))) for v in out["ram_bytes"]]
    out["n_fds"] = [("" if pd.isna(v) else str(int(v))) for v in out["n_fds"]]
    out["live"] = [live_label(v) for v in out["live"]]
    out[f"median [95% CI] ({unit})"] = [
        fmt_interval(Interval(m / scale, lo / scale, hi / scale, int(n)))
        for m, lo, hi, n in zip(out.pop("median"), out.pop("ci_low"), out.pop("ci_high"), out["n"])]
    for col in ("p5", "p95"):
        out[f"{col} ({unit})"] = (out.pop(col) / scale).round(3)
    if "peer_version" in out and not (out["peer_version"].fillna("") != "").any():
        out = out.drop(columns="peer_version")
    return out.rename(columns={"ram_bytes": "RAM", "n_fds": "fds"})


def trials_table(df: pd.DataFrame, scenario: str, columns: Iterable[str]) -> pd.DataFrame:
    """Every trial of ``scenario`` with the given columns, ``*_ns`` shown in ms, plus ok and error."""
    rows = df[df["scenario"] == scenario]
    cols = ["mode", "variant", "trial", *columns, "ok", "error"]
    out = rows[[c for c in dict.fromkeys(cols) if c in rows.columns]].copy()
    for col in list(out.columns):
        if col.endswith("_ns"):
            out[col[:-3] + "_ms"] = (out.pop(col).astype("float64") / 1e6).round(3)
    order = [c for c in out.columns if c not in ("ok", "error")] + ["ok", "error"]
    return out[order].sort_values(["mode", "variant", "trial"]).reset_index(drop=True)
