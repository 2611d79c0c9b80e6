"""``migfd compare BASE NEW``: did a change of code, host or kernel make migfd faster or slower?

First the machine: the physical floors both runs measured (``limits``: ping,
fd round trips, the handover floor, AF_UNIX throughput, memcpy) say whether
NEW ran on a faster or slower machine than BASE (:func:`machine`). Then every
point both runs measured (scenario, mode, variant, backend, RAM, fds, live;
the QEMU version where the rows name one) and every metric both have values
for: times (every ``*_ns`` column both runs wrote) and throughput as a ratio
NEW/BASE on the logs, counts (frames lost, lines lost, reconnects) as a ratio
of rates per frame or line sent; each with its 95% interval, a verdict
(:func:`migfd.stats.change`) and a second verdict on the ratio divided by the
machine's (``verdict_normalized``): the code's share of the change.

The statistics are in :mod:`migfd.stats`; docs/RESULTS.md states them. BASE
and NEW are results directories or HTML reports written by ``migfd report``
(which embed their run), of any format version: what one run did not measure
is listed, not compared.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from migfd.errors import MigrationError
from migfd.paths import repo_root
from migfd.results.describe import busy_note
from migfd.results.load import (
    POINT_KEYS,
    RESULTS_ENV,
    find_results,
    format_note,
    format_version,
    load_run,
    newest_run,
)
from migfd.results.summary import fmt_bytes, live_label, mode_label, throughput
from migfd.stats import (
    CHANGE_TOLERANCE,
    FASTER,
    IMPROVED,
    INCONCLUSIVE,
    NO_TEST,
    REGRESSED,
    SAME,
    SLOWER,
    UNCHANGED,
    Interval,
    LogSpread,
    RatioTest,
    change,
    change_p_value,
    clean,
    fit_spread_prior,
    hierarchical_adjust,
    log_ratio_test,
    log_spread,
    machine_verdict,
    normalized,
    pooled_log_ratio,
    rate_ratio_test,
    ratio_ci,
)

BASE_ENV, NEW_ENV = "MIGFD_BASE", "MIGFD_NEW"
#: the notebook that shows a comparison (the report includes it when there is a base)
COMPARE_NOTEBOOK = "04-compare.ipynb"

#: the scenario whose rows are the physical floors; their figure is ``value``
FLOORS = "limits"
#: derived: bytes per second of a state copy (summary.throughput); more is better
THROUGHPUT = "throughput_bytes_s"
#: count -> what it is a rate of: a column of units sent per trial, or None (per trial)
COUNT_EXPOSURE = {"frames_lost": "frames_sent", "frames_duplicated": "frames_sent",
                  "lines_lost": "lines_sent", "reconnects": None}
#: kinds of metric: how each is tested, and which floors normalize it
TIME, RATE, COUNT = "time", "throughput", "count"
#: columns that end in _ns but are not a time of the migration: none yet; a new time column of any
#: run (outage_ns, release_ns, ...) is compared as soon as both runs have it
NOT_TIMES: frozenset[str] = frozenset()
#: point keys that name what ran (the QEMU version, the accelerator): part of a point, and of the
#: output, only when a row of either run names one (load.py fills them in for older runs)
NAMING_KEYS = ("peer_version", "accel")

#: the fields of one change, in order (``migfd compare --json``); ``peer_version`` (and ``accel``)
#: follow when the runs name QEMU versions (accelerators)
CHANGE_FIELDS = ["scenario", "mode", "variant", "backend", "ram_bytes", "n_fds", "live", "metric", "kind",
                 "base_median", "new_median", "base_rate", "new_rate", "ratio", "ci_low", "ci_high",
                 "p_adjusted", "verdict", "ratio_normalized", "ci_low_normalized", "ci_high_normalized",
                 "verdict_normalized", "n_base", "n_new"]
VERDICT_ORDER = {REGRESSED: 0, IMPROVED: 1, INCONCLUSIVE: 2, UNCHANGED: 3}
#: metadata that can explain a difference between two runs, in the order shown
META_KEYS = ["host", "kernel", "cpu_model", "cpu_count", "cpu_governor", "memory_total_bytes", "python",
             "packages", "git_revision", "git_dirty", "loadavg_start", "loadavg_end", "busy",
             "socket_limits", "start", "options"]


@dataclass
class Run:
    """One side of a comparison: the rows, the metadata, where they came from."""

    df: pd.DataFrame
    meta: dict
    source: Path

    @property
    def kind(self) -> str:
        return "html" if self.source.suffix.lower() in (".html", ".htm") else "directory"

    @property
    def format_version(self) -> int:
        return format_version(self.df, self.meta)

    def describe(self) -> dict[str, Any]:
        m = self.meta
        return {"source": str(self.source), "kind": self.kind, "format_version": self.format_version,
                "rows": int(len(self.df)),
                "failed_rows": int((~self.df["ok"].fillna(False).astype(bool)).sum()) if len(self.df) else 0,
                "git_revision": m.get("git_revision"), "host": m.get("host"), "kernel": m.get("kernel"),
                "cpu_model": m.get("cpu_model"), "start": m.get("start"), "busy": bool(busy_note(m))}


def read_run(path: str | os.PathLike) -> Run:
    """A side of the comparison from a results directory (or its results.csv) or an HTML report."""
    p = Path(path).expanduser()
    try:
        df, meta = load_run(p)
    except (OSError, ValueError) as exc:  # unreadable file, a CSV that is not one
        raise MigrationError(f"cannot read {p}: {exc}") from None
    return Run(df, meta, p.resolve())


# -- what the two runs have ---------------------------------------------------------------


def _measured(df: pd.DataFrame, column: str) -> bool:
    return column in df.columns and pd.to_numeric(df[column], errors="coerce").notna().any()


def time_metrics(df: pd.DataFrame) -> list[str]:
    """The time columns a run measured: every ``*_ns`` column with a value, in the file's order."""
    return [c for c in df.columns if c.endswith("_ns") and c not in NOT_TIMES and _measured(df, c)]


def _keys(base: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """The point keys: peer_version (accel) only when a row of either run names a QEMU version (an
    accelerator)."""
    def named(key: str) -> bool:
        return any((d[key].fillna("") != "").any() for d in (base, new) if key in d)

    return [k for k in POINT_KEYS if k not in NAMING_KEYS or named(k)]


def _with_derived(df: pd.DataFrame) -> pd.DataFrame:
    # throughput of a state copy only: fd-passing moves a few hundred bytes, not guest RAM
    tp = throughput(df).where(df["mode"] == "state-copy") if len(df) else []
    return df.assign(**{THROUGHPUT: tp})


def _plain(value: Any) -> Any:
    """A cell as JSON has it: NaN/inf/NA as null, numpy scalars as Python numbers."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.bool_,)):
        return bool(value)
    return value


@dataclass
class Coverage:
    """What the two runs could not be compared on: metrics, point keys and floors one of them lacks."""

    metrics_only_base: list[str] = field(default_factory=list)
    metrics_only_new: list[str] = field(default_factory=list)
    floors_only_base: list[str] = field(default_factory=list)
    floors_only_new: list[str] = field(default_factory=list)
    points_only_base: int = 0
    points_only_new: int = 0

    def notes(self) -> list[str]:
        out = []
        for what, names in (("measured only by BASE", self.metrics_only_base),
                            ("measured only by NEW", self.metrics_only_new),
                            ("floors only in BASE", self.floors_only_base),
                            ("floors only in NEW", self.floors_only_new)):
            if names:
                out.append(f"not compared, {what}: {', '.join(names)}")
        if self.points_only_base or self.points_only_new:
            out.append(f"not compared: {self.points_only_base} points only in BASE, "
                       f"{self.points_only_new} only in NEW")
        return out

    def as_json(self) -> dict[str, Any]:
        return {"metrics_only_base": self.metrics_only_base, "metrics_only_new": self.metrics_only_new,
                "floors_only_base": self.floors_only_base, "floors_only_new": self.floors_only_new,
                "points_only_base": self.points_only_base,
                "points_only_new": self.points_only_new}


def _floor_name(key: dict) -> str:
    size = key.get("ram_bytes")
    n_fds = key.get("n_fds")
    name = str(key["variant"])
    if key["variant"] == "fd-roundtrip" and not pd.isna(n_fds):
        name += f" {int(n_fds)} fds"
    elif key["variant"] in ("unix-throughput", "memcpy") and not pd.isna(size):
        name += f" {fmt_bytes(float(size))}"
    return name


def coverage(base: pd.DataFrame, new: pd.DataFrame) -> Coverage:
    """The metrics, point keys and floors only one of the runs has (an older format, a skipped scenario)."""
    cov = Coverage()
    counts = [m for m in COUNT_EXPOSURE if _measured(base, m) or _measured(new, m)]
    for metric in [*dict.fromkeys(time_metrics(base) + time_metrics(new)), *counts]:
        in_b, in_n = _measured(base, metric), _measured(new, metric)
        if in_b and not in_n:
            cov.metrics_only_base.append(metric)
        elif in_n and not in_b:
            cov.metrics_only_new.append(metric)
    if base.empty or new.empty:
        return cov
    keys = _keys(base, new)
    b = {k: g for k, g in base.groupby(keys, dropna=False)}
    n = {k: g for k, g in new.groupby(keys, dropna=False)}
    cov.points_only_base, cov.points_only_new = len(set(b) - set(n)), len(set(n) - set(b))
    for side, mine, other in (("base", b, n), ("new", n, b)):
        names = sorted(_floor_name(dict(zip(keys, k))) for k in set(mine) - set(other) if k[0] == FLOORS)
        setattr(cov, f"floors_only_{side}", names)
    return cov


# -- the comparison -----------------------------------------------------------------------


class _Numbers:
    """A run's metric columns as float arrays and its points as row indices, read once: a comparison
    looks at some 200 (point, metric) pairs, and pandas per group would be most of its time."""

    def __init__(self, df: pd.DataFrame, keys: list[str], columns: list[str]):
        self.columns = {c: pd.to_numeric(df[c], errors="coerce").astype("float64").to_numpy()
                        for c in columns if c in df.columns}
        self.ok = df["ok"].fillna(False).astype(bool).to_numpy()
        self.units = df["unit"].astype(str).to_numpy() if "unit" in df.columns else np.full(len(df), "")
        self.points = df.groupby(keys, dropna=False, sort=True).indices if len(df) else {}

    def values(self, idx: np.ndarray, column: str) -> np.ndarray:
        """Successful trials' values of ``column`` (times and throughput)."""
        v = self.columns[column][idx][self.ok[idx]]
        return v[~np.isnan(v)]

    def counts(self, idx: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """Per trial that has it (failed ones too: a lost frame is lost whether or not the trial
        failed), the count and what it is a rate of; without the exposure column, per trial."""
        k = self.columns[metric][idx]
        exposure = COUNT_EXPOSURE[metric]
        s = self.columns.get(exposure) if exposure else None
        s = s[idx] if s is not None and not np.isnan(s[idx]).all() else np.ones(len(idx))
        keep = ~np.isnan(k) & ~np.isnan(s) & (s > 0)
        return k[keep], s[keep]


def _lower_is_better(metric: str, units: set[str]) -> bool:
    if metric == THROUGHPUT:
        return False
    if metric == "value":  # a floor: bytes/s more is better, ns less
        return not any(u.endswith("/s") for u in units)
    return True


def _metrics_of(scenario: str, times: list[str], counts: list[str]) -> list[tuple[str, str]]:
    # a floor's figure is its value; its times are what the value was computed from
    if scenario == FLOORS:
        return [("value", TIME)]
    return [(m, TIME) for m in times] + [(THROUGHPUT, RATE)] + [(m, COUNT) for m in counts]


@dataclass
class _Row:
    point: dict
    metric: str
    kind: str
    lower: bool
    b: np.ndarray
    n: np.ndarray
    test: RatioTest = NO_TEST
    spread: LogSpread | None = None
    rates: tuple[float, float] = (math.nan, math.nan)

    @property
    def family(self) -> tuple[str, str, str]:
        return self.point["scenario"], self.point["mode"], self.metric


def _collect(base: pd.DataFrame, new: pd.DataFrame, keys: list[str]) -> list[_Row]:
    times = [m for m in time_metrics(base) if m in set(time_metrics(new))]
    counts = [m for m in COUNT_EXPOSURE if _measured(base, m) and _measured(new, m)]
    columns = [*times, THROUGHPUT, "value", *COUNT_EXPOSURE, *(e for e in COUNT_EXPOSURE.values() if e)]
    nb, nn = _Numbers(base, keys, columns), _Numbers(new, keys, columns)
    rows = []
    for key in sorted(nb.points, key=lambda k: tuple(map(str, k))):
        if key not in nn.points:
            continue
        bi, ni = nb.points[key], nn.points[key]
        point = dict(zip(keys, key))
        units = set(nb.units[bi]) | set(nn.units[ni])
        for metric, kind in _metrics_of(point["scenario"], times, counts):
            lower = _lower_is_better(metric, units)
            if kind == COUNT:
                (kb, sb), (kn, sn) = nb.counts(bi, metric), nn.counts(ni, metric)
                if not len(kb) or not len(kn):
                    continue
                test = rate_ratio_test(kb, sb, kn, sn)
                if kb.sum() == 0 and kn.sum() == 0:
                    # nothing lost in either run: no test can reject, so none is counted among the many
                    # (Tarone), and the verdict is unchanged on its face
                    test = RatioTest(Interval(1.0, 1.0, 1.0, test.interval.n), math.nan)
                rows.append(_Row(point, metric, kind, lower, kb, kn, test,
                                 rates=(kb.sum() / sb.sum(), kn.sum() / sn.sum())))
                continue
            b, n = nb.values(bi, metric), nn.values(ni, metric)
            if not len(b) or not len(n):
                continue
            if metric == "value" and not lower:
                kind = RATE
            positive = bool(np.all(b > 0) and np.all(n > 0))
            rows.append(_Row(point, metric, kind, lower, b, n, spread=log_spread(b, n) if positive else None))
    return rows


def _test(rows: list[_Row]) -> None:
    """Each time or throughput row's log-t test, its variance moderated by its family's."""
    families: dict[tuple, list[_Row]] = {}
    for row in rows:
        if row.kind != COUNT:
            families.setdefault(row.family, []).append(row)
    for members in families.values():
        prior = fit_spread_prior([r.spread for r in members if r.spread is not None])
        for row in members:
            if row.spread is not None:
                row.test = log_ratio_test(row.b, row.n, prior)
            else:
                # a time of 0 (QEMU's ms figures below 1 ms) has no logarithm: rank test, ratio of medians
                row.test = RatioTest(ratio_ci(row.b, row.n), change_p_value(row.b, row.n))


@dataclass(frozen=True)
class Machine:
    """The floors' ratio NEW/BASE, as times (below 1: NEW's machine is faster), and of each kind."""

    overall: RatioTest
    time: RatioTest
    throughput: RatioTest
    floors: int

    @property
    def verdict(self) -> str:
        return machine_verdict(self.overall.interval)

    def as_json(self) -> dict[str, Any]:
        def part(test: RatioTest) -> dict[str, Any]:
            i = test.interval
            return {"floor_ratio": _plain(i.value), "ci_low": _plain(i.low), "ci_high": _plain(i.high)}

        return {**part(self.overall), "verdict": self.verdict, "floors": self.floors,
                "time_floors": part(self.time), "throughput_floors": part(self.throughput)}

    def sentence(self) -> str:
        i = self.overall.interval
        if not self.floors or math.isnan(i.value):
            return "machine: no floor measured by both runs; normalized verdicts cannot be given"
        what = {FASTER: "NEW's machine is faster", SLOWER: "NEW's machine is slower",
                SAME: "the machines are alike",
                INCONCLUSIVE: "the floors cannot tell the machines apart"}[self.verdict]
        interval = f"[{i.low:.3g}, {i.high:.3g}]" if i.known else "[no interval]"
        return (f"machine: {what} — floors NEW/BASE {i.value:.3g} {interval} as times, over {self.floors} "
                f"floors ({self.verdict})")


def _inverted(test: RatioTest) -> RatioTest:
    """A throughput ratio as a time ratio (1/r): 2x the bytes per second is half the time."""
    i = test.interval
    flip = lambda v: 1 / v if v and not math.isnan(v) else math.nan  # noqa: E731
    return RatioTest(Interval(flip(i.value), flip(i.high), flip(i.low), i.n), test.p_value, test.log_se, test.df)


#: Floors that say nothing more of the machine: parts of the handover floor's own switchovers (counted
#: already in it) and the handover floor under tap-traffic's probe (the load's, not the machine's).
NOT_THE_MACHINE = ("handover-oneway", "commit-roundtrip", "handover-floor-loaded")


def _machine(rows: list[_Row]) -> Machine:
    floors = [r for r in rows if r.point["scenario"] == FLOORS and r.metric == "value"
              and r.point.get("variant") not in NOT_THE_MACHINE and not math.isnan(r.test.log_se)]
    times = [r.test for r in floors if r.kind == TIME]
    rates = [r.test for r in floors if r.kind == RATE]
    return Machine(pooled_log_ratio(times + [_inverted(t) for t in rates]), pooled_log_ratio(times),
                   pooled_log_ratio(rates), len(floors))


def machine(base: pd.DataFrame, new: pd.DataFrame) -> Machine:
    """What the floors both runs measured say of NEW's machine against BASE's (:class:`Machine`)."""
    if base.empty or new.empty:
        return Machine(NO_TEST, NO_TEST, NO_TEST, 0)
    keys = _keys(base, new)
    rows = [r for r in _collect(_with_derived(base), _with_derived(new), keys) if r.point["scenario"] == FLOORS]
    _test(rows)
    return _machine(rows)


def _columns(keys: list[str]) -> list[str]:
    extra = [k for k in keys if k in NAMING_KEYS]
    return [*CHANGE_FIELDS[:7], *extra, *CHANGE_FIELDS[7:]]


def compare(base: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """One row per (point, metric) both runs measured: :data:`CHANGE_FIELDS`.

    ``kind`` is ``time``, ``throughput`` or ``count``. Times and throughput:
    ``ratio`` is the ratio of geometric means NEW/BASE of successful trials,
    with the 95% t interval on the logs, the variance moderated within its
    family (scenario, mode, metric); counts: the ratio of the rates per frame or
    line sent (per trial for reconnects), pooled over every trial that has
    them, with its exact interval (``base_rate``, ``new_rate``). ``p_adjusted``
    is hierarchical (families, then points) across every row returned, and
    ``verdict`` comes from :func:`migfd.stats.change`. ``ratio_normalized`` is
    the ratio over the machine's floor ratio of its kind (time floors for times,
    throughput floors for throughput; without floors in common: NaN), judged
    the same way in ``verdict_normalized``; a count, a rate per unit sent, keeps
    its ratio and verdict there.
    """
    keys = _keys(base, new)
    columns = _columns(keys)
    if base.empty or new.empty:
        return pd.DataFrame(columns=columns)
    base, new = _with_derived(base), _with_derived(new)
    rows = _collect(base, new, keys)
    _test(rows)
    ma = _machine(rows)
    families = [r.family for r in rows]
    adjusted = hierarchical_adjust(families, [r.test.p_value for r in rows])
    by_kind = {TIME: ma.time, RATE: ma.throughput}
    # a count is a rate per frame or line sent: no floor scales it, so its verdict stands as it is
    norm = [normalized(r.test, by_kind[r.kind]) if r.kind in by_kind else r.test for r in rows]
    adjusted_norm = hierarchical_adjust(families, [t.p_value for t in norm])
    records = []
    for row, p, nt, pn in zip(rows, adjusted, norm, adjusted_norm):
        i, ni = row.test.interval, nt.interval
        records.append({
            **row.point, "metric": row.metric, "kind": row.kind,
            "base_median": float(np.median(row.b)), "new_median": float(np.median(row.n)),
            "base_rate": row.rates[0], "new_rate": row.rates[1],
            "ratio": i.value, "ci_low": i.low, "ci_high": i.high, "p_adjusted": p,
            "verdict": change(i, p, lower_is_better=row.lower),
            "ratio_normalized": ni.value, "ci_low_normalized": ni.low, "ci_high_normalized": ni.high,
            "verdict_normalized": change(ni, pn, lower_is_better=row.lower) if nt is not NO_TEST else None,
            "n_base": len(row.b), "n_new": len(row.n)})
    out = pd.DataFrame(records, columns=columns)
    for col in ("ram_bytes", "n_fds"):
        out[col] = out[col].astype("Int64")
    return out


def unmatched_points(base: pd.DataFrame, new: pd.DataFrame) -> tuple[int, int]:
    """How many points only BASE measured, and how many only NEW (a renamed variant, a new QEMU...)."""
    cov = coverage(base, new)
    return cov.points_only_base, cov.points_only_new


def changes_json(changes: pd.DataFrame) -> list[dict[str, Any]]:
    """The changes as ``--json`` prints them: exactly :data:`CHANGE_FIELDS` (and ``peer_version``, ``accel``
    when the runs name them), null where a figure cannot be given."""
    fields = CHANGE_FIELDS + [k for k in NAMING_KEYS if k in changes.columns]
    return [{f: _plain(row[f]) for f in fields} for _, row in changes.iterrows()]


def _scalar(value: Any) -> str:
    if isinstance(value, list) and all(isinstance(v, float) for v in value):
        return ", ".join(f"{v:.2f}" for v in value)  # load averages
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else str(value)


def metadata_differences(base: dict, new: dict) -> pd.DataFrame:
    """What else differed between the runs (kernel, CPU, versions, git revision, load, ...), one row per key."""
    rows = []
    for key in META_KEYS:
        b, n = base.get(key), new.get(key)
        if key == "busy":
            b, n = busy_note(base) or "no", busy_note(new) or "no"
        if key == "packages" and isinstance(b, dict) and isinstance(n, dict):
            for name in sorted(set(b) | set(n)):
                rows.append({"what": f"packages.{name}", "base": _scalar(b.get(name)),
                             "new": _scalar(n.get(name)), "differs": b.get(name) != n.get(name)})
            continue
        if key == "options":
            b = {k: v for k, v in (b or {}).items() if k not in ("argv", "out")}
            n = {k: v for k, v in (n or {}).items() if k not in ("argv", "out")}
        rows.append({"what": key, "base": _scalar(b), "new": _scalar(n), "differs": b != n})
    return pd.DataFrame(rows, columns=["what", "base", "new", "differs"])


def verdict_counts(changes: pd.DataFrame, column: str = "verdict") -> dict[str, int]:
    counts = changes[column].value_counts() if len(changes) else pd.Series(dtype=int)
    return {v: int(counts.get(v, 0)) for v in (REGRESSED, IMPROVED, UNCHANGED, INCONCLUSIVE)}


def _counts_text(counts: dict[str, int], total: int) -> str:
    return (f"{counts[REGRESSED]} regressed, {counts[IMPROVED]} improved, {counts[UNCHANGED]} unchanged, "
            f"{counts[INCONCLUSIVE]} inconclusive of {total} comparisons (point × metric)")


def point_label(row: Any, metric: bool = True) -> str:
    """'ram-size fd-passing 1 GiB non-live: downtime_ns', as the forest plot and the tables name a change."""
    parts = [row["scenario"], mode_label(row["mode"])]
    if row["variant"]:
        parts.append(row["variant"])
    if "peer_version" in row and row["peer_version"]:
        parts.append(f"QEMU {row['peer_version']}")
    if "accel" in row and row["accel"]:
        parts.append(f"({row['accel']})")
    if not pd.isna(row["ram_bytes"]) and row["scenario"] not in ("fd-count",):
        parts.append(fmt_bytes(float(row["ram_bytes"])))
    if not pd.isna(row["n_fds"]) and row["scenario"] in ("fd-count", FLOORS) and row["n_fds"]:
        parts.append(f"{int(row['n_fds'])} fds")
    live = live_label(row["live"])
    if live and row["scenario"] != FLOORS:
        parts.append(live)
    return " ".join(str(p) for p in parts) + (f": {row['metric']}" if metric else "")


VERDICT_COLORS = {REGRESSED: "#d62728", IMPROVED: "#2ca02c", UNCHANGED: "#7f7f7f", INCONCLUSIVE: "#bbbbbb"}
#: the most points the forest plot's first panel lists one per line; the tables list all
MAX_CHANGED_LINES = 30


def _changed(changes: pd.DataFrame) -> pd.Series:
    called = [REGRESSED, IMPROVED]
    return changes["verdict"].isin(called) | changes["verdict_normalized"].isin(called)


def plot_forest(changes: pd.DataFrame, title: str = "NEW / BASE", floor_ratio: float | None = None) -> Figure:
    """What changed, then every comparison by scenario, on a log axis of NEW/BASE.

    Top: one line per point whose raw or normalized verdict is a change
    (regressed first), the raw ratio with its 95% interval as a coloured line,
    the normalized ratio (over the machine's floors) as a hollow marker.
    Below: one row per family (scenario, mode, metric), every point of it a
    dot coloured by verdict, families grouped by scenario; a few hundred
    comparisons fit on one screen. ``floor_ratio``: the machine's time floor
    ratio, drawn as a dashed line (what a faster machine alone would give).
    """
    rows = changes.dropna(subset=["ratio"]).copy()
    rows = rows[np.isfinite(rows["ratio"].astype(float)) & (rows["ratio"].astype(float) > 0)]
    changed = rows[_changed(rows)].copy()
    # the code's share first: changes over the machine's floors, then those the machine may explain
    changed["_norm"] = changed["verdict_normalized"].map(VERDICT_ORDER).fillna(len(VERDICT_ORDER))
    changed["_order"] = changed["verdict"].map(VERDICT_ORDER)
    changed = changed.sort_values(["_norm", "_order", "scenario", "mode", "metric"], kind="stable")
    hidden = max(0, len(changed) - MAX_CHANGED_LINES)
    changed = changed.iloc[:MAX_CHANGED_LINES].iloc[::-1]
    families = rows.groupby(["scenario", "mode", "metric"], sort=True)
    top_h = 0.22 * max(len(changed), 1) + 0.9
    bottom_h = 0.18 * max(families.ngroups, 1) + 1.0
    fig = Figure(figsize=(10, top_h + bottom_h), layout="constrained", dpi=100)
    if rows.empty:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no ratio to show: no point measured by both runs", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    top, bottom = fig.subplots(2, 1, height_ratios=[top_h, bottom_h])

    def frame(ax) -> None:
        ax.axvline(1.0, color="black", linewidth=1)
        ax.axvspan(1 / (1 + CHANGE_TOLERANCE), 1 + CHANGE_TOLERANCE, color="#999999", alpha=0.15, linewidth=0)
        if floor_ratio is not None and math.isfinite(floor_ratio) and floor_ratio > 0:
            ax.axvline(floor_ratio, color="#1f77b4", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.grid(True, axis="x", which="both", alpha=0.3)

    frame(top)
    if changed.empty:
        top.text(0.5, 0.5, "no point changed, raw or over the machine's floors", ha="center", va="center",
                 transform=top.transAxes)
        top.set_yticks([])
    else:
        ys = np.arange(len(changed))
        ratio = changed["ratio"].astype(float).to_numpy()
        low = changed["ci_low"].astype(float).fillna(changed["ratio"]).to_numpy()
        high = changed["ci_high"].astype(float).fillna(changed["ratio"]).to_numpy()
        colors = [VERDICT_COLORS.get(v, "#000000") for v in changed["verdict"]]
        top.hlines(ys, low, high, colors=colors, linewidth=2)
        top.scatter(ratio, ys, c=colors, zorder=3, s=18)
        normed = changed["ratio_normalized"].astype(float).to_numpy()
        ncolors = [VERDICT_COLORS.get(v, "#000000") for v in changed["verdict_normalized"]]
        top.scatter(normed, ys, facecolors="none", edgecolors=ncolors, zorder=3, s=36, marker="D")
        top.set_yticks(ys)
        top.set_yticklabels([point_label(r) for _, r in changed.iterrows()], fontsize=7)
    more = f" (and {hidden} more: see the table)" if hidden else ""
    top.set_title(f"What changed{more}, over the machine's floors first\ndot and line: ratio with its 95% "
                  f"interval; hollow diamond: over the floors; colour: verdict", fontsize=9)

    frame(bottom)
    labels, y = [], 0
    scenario_of_row = []
    for (scenario, mode, metric), g in families:
        colors = [VERDICT_COLORS.get(v, "#000000") for v in g["verdict"]]
        low = g["ci_low"].astype(float).fillna(g["ratio"]).to_numpy()
        high = g["ci_high"].astype(float).fillna(g["ratio"]).to_numpy()
        bottom.hlines(np.full(len(g), -y), low, high, colors=colors, linewidth=0.8, alpha=0.6)
        bottom.scatter(g["ratio"].astype(float), np.full(len(g), -y), c=colors, s=14, zorder=3)
        labels.append(f"{scenario} · {mode_label(mode)} · {metric} ({len(g)})")
        scenario_of_row.append(scenario)
        y += 1
    for i in range(1, len(scenario_of_row)):
        if scenario_of_row[i] != scenario_of_row[i - 1]:
            bottom.axhline(-(i - 0.5), color="#444444", linewidth=0.6)
    bottom.set_yticks(-np.arange(len(labels)))
    bottom.set_yticklabels(labels, fontsize=7)
    bottom.set_ylim(-len(labels) + 0.5, 0.5)
    bottom.set_title("Every comparison, one row per scenario · mode · metric (points in it)", fontsize=9)
    bottom.set_xlabel(f"ratio {title}, log scale\ngrey band: ±{CHANGE_TOLERANCE:.0%} tolerance"
                      + ("; dashed: the machine's floor ratio (times)" if floor_ratio else ""))
    for verdict, color in VERDICT_COLORS.items():
        bottom.scatter([], [], c=color, s=18, label=verdict)
    bottom.legend(loc="lower right", fontsize=7)
    return fig


def format_changes(changes: pd.DataFrame, only_changed: bool = False) -> pd.DataFrame:
    """The changes for reading: one line per point and metric, the ratio with its interval, raw and
    over the machine's floors."""
    rows = changes if not only_changed else changes[_changed(changes)]
    out = pd.DataFrame({
        "point": [point_label(r) for _, r in rows.iterrows()],
        "base median": rows["base_median"].map(lambda v: f"{v:.4g}"),
        "new median": rows["new_median"].map(lambda v: f"{v:.4g}"),
        "NEW/BASE [95% CI]": [_ratio_text(r) for _, r in rows.iterrows()],
        "trials (base / new)": [f"{b} / {n}" for b, n in zip(rows["n_base"], rows["n_new"])],
        "verdict": rows["verdict"],
        "over floors [95% CI]": [_ratio_text(r, "_normalized") for _, r in rows.iterrows()],
        "verdict over floors": rows["verdict_normalized"].fillna("–"),
    })
    order = rows["verdict"].map(VERDICT_ORDER).to_numpy() if len(rows) else []
    return out.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)


def _ratio_text(row: Any, suffix: str = "") -> str:
    r, lo, hi = (float(row[c + suffix]) if not pd.isna(row[c + suffix]) else math.nan
                 for c in ("ratio", "ci_low", "ci_high"))
    if math.isinf(r):
        return f"∞ (was 0) [{lo:.3g}, ∞]" if not math.isnan(lo) else "∞ (was 0)"
    if math.isnan(r):
        return "–" if suffix else "?"
    return f"{r:.3g} [{lo:.3g}, {hi:.3g}]" if not (math.isnan(lo) or math.isnan(hi)) else f"{r:.3g} [no interval]"


def default_pair(base: str | os.PathLike | None = None, new: str | os.PathLike | None = None,
                 *, root: str | os.PathLike | None = None) -> tuple[Path | None, Path]:
    """(BASE, NEW) for the compare notebook: the arguments, else $MIGFD_BASE / $MIGFD_NEW, else the
    newest committed reference run and the newest run (:func:`find_results`). BASE is None when there
    is nothing to compare with: no reference, or the newest run *is* the reference."""
    root_path = Path(root) if root is not None else repo_root()
    new_path = Path(new or os.environ.get(NEW_ENV) or find_results(os.environ.get(RESULTS_ENV) or None,
                                                                     root=root_path))
    base_arg = base or os.environ.get(BASE_ENV)
    base_path = Path(base_arg) if base_arg else newest_run(root_path / "benchmarks" / "reference")
    if base_path is not None and base_path.resolve() == new_path.resolve():
        return None, new_path
    return base_path, new_path


def _figure_data_uri(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


#: how a verdict is reached, as the page and the notebook say it (docs/RESULTS.md has the details)
METHOD = (
    "Times and throughput: the ratio of geometric means NEW/BASE with a 95% t interval on the logs, each "
    "point's variance moderated with its family's (scenario × mode × metric, empirical Bayes). Counts: "
    "the ratio of rates per frame or line sent, pooled over trials, exact conditional test and interval, "
    "overdispersion taken out. Tests are hierarchical: families first (Simes, Benjamini-Hochberg), then "
    "the points of the families that changed. A change is called when the adjusted test is significant at "
    "5%, the interval excludes 1 and the ratio is beyond ±10%; \"unchanged\" when the whole interval lies "
    "within ±10%. \"Over floors\": the same on the ratio divided by the machine's floor ratio of its kind "
    "(time floors for times, throughput floors for throughput), the code's share of the change.")


def notes(base: Run, new: Run) -> list[str]:
    """What the reader must know before the verdicts: formats, what was not compared, busy machines."""
    out = []
    for side, run in (("BASE", base), ("NEW", new)):
        if note := format_note(run.format_version):
            out.append(f"{side} is {note}")
    out += coverage(base.df, new.df).notes()
    for side, run in (("BASE", base), ("NEW", new)):
        if note := busy_note(run.meta):
            out.append(f"warning: {side}: {note}")
    return out


def write_html(out: Path, base: Run, new: Run, changes: pd.DataFrame) -> Path:
    """``out/index.html``: the machine first, then what changed (raw and over the floors), the forest
    plot, what else differed, every comparison."""
    out.mkdir(parents=True, exist_ok=True)
    ma = machine(base.df, new.df)
    meta = metadata_differences(base.meta, new.meta)
    changed = format_changes(changes, only_changed=True)
    remarks = "".join(f"<p class=warn>{html.escape(n)}</p>" for n in notes(base, new))
    raw, normed = verdict_counts(changes), verdict_counts(changes, "verdict_normalized")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>migfd compare</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:75em}} table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}} .differs{{background:#fff3cd}}
.warn{{background:#f8d7da;padding:4px}} .machine{{font-size:115%;background:#e7f1fb;padding:6px}}</style>
</head><body>
<h1>migfd compare</h1>
<p><b>BASE:</b> {html.escape(str(base.source))} ({base.kind}, format {base.format_version})<br>
<b>NEW:</b> {html.escape(str(new.source))} ({new.kind}, format {new.format_version})</p>
<h2>The machine</h2>
<p class=machine>{html.escape(ma.sentence())}</p>
<p>Over the machine's floors (the code's share): {_counts_text(normed, len(changes))}.<br>
As measured (code and machine together): {_counts_text(raw, len(changes))}.</p>
{remarks}
<p>{html.escape(METHOD)}</p>
<h2>Points that changed</h2>
{changed.to_html(index=False) if len(changed) else "<p>none</p>"}
<h2>Ratios NEW/BASE</h2>
<img alt="forest plot of the ratios" src="{_figure_data_uri(plot_forest(changes, floor_ratio=ma.time.interval.value))}">
<h2>What else differed</h2>
{meta.style.hide(axis="index").apply(lambda r: ["background:#fff3cd" if r["differs"] else ""] * len(r),
                                     axis=1).to_html()}
<h2>Every comparison</h2>
{format_changes(changes).to_html(index=False)}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _text_report(base: Run, new: Run, changes: pd.DataFrame) -> str:
    ma = machine(base.df, new.df)
    lines = [f"BASE {base.source} ({base.kind}, format {base.format_version}, "
             f"git {base.meta.get('git_revision', '?')})",
             f"NEW  {new.source} ({new.kind}, format {new.format_version}, git {new.meta.get('git_revision', '?')})",
             ma.sentence(),
             "over the floors: " + _counts_text(verdict_counts(changes, "verdict_normalized"), len(changes)),
             "as measured:     " + _counts_text(verdict_counts(changes), len(changes))]
    lines += notes(base, new)
    diffs = metadata_differences(base.meta, new.meta)
    diffs = diffs[diffs["differs"] & ~diffs["what"].isin(["start", "loadavg_start", "loadavg_end"])]
    for row in diffs.itertuples():
        lines.append(f"differs: {row.what}: {row.base or '-'} -> {row.new or '-'}")
    shown = format_changes(changes)
    if len(shown):
        lines.append(shown.to_string(index=False))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``migfd compare BASE NEW [--json] [--out DIR]``; bad input raises MigrationError (the CLI: exit 2)."""
    base, new = read_run(args.base), read_run(args.new)
    changes = compare(base.df, new.df)
    if changes.empty:
        raise MigrationError(f"no point measured by both runs ({base.source} and {new.source})")
    if getattr(args, "out", None):
        index = write_html(Path(args.out).expanduser(), base, new, changes)
        print(f"migfd compare: wrote {index}", file=sys.stderr)
    if args.json:
        cov = coverage(base.df, new.df)
        json.dump({"base": {**base.describe(), "points_not_in_the_other": cov.points_only_base},
                   "new": {**new.describe(), "points_not_in_the_other": cov.points_only_new},
                   "machine": machine(base.df, new.df).as_json(),
                   "not_compared": cov.as_json(), "notes": notes(base, new),
                   "changes": changes_json(changes)}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_text_report(base, new, changes))
    return 0
