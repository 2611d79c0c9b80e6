"""Reading benchmark results, checking the targets, drawing the figures: what the notebooks call.

Every number shown comes from one run's ``results.csv`` (see docs/RESULTS.md);
nothing here measures, extrapolates or holds a number of its own except the
target thresholds of issue 4. The notebooks only call these functions, so all
the logic they show is tested in ``tests/test_analysis.py``.

Besides the results, two helpers serve the protocol tour (notebook 01):
:func:`annotate_stream` explains a stream byte by byte, :func:`demo_migration`
runs one real two-process migration over QMP.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

from migfd.errors import MigrationError

#: Environment variable naming a results directory (or its results.csv).
RESULTS_ENV = "MIGFD_RESULTS"
#: The checkout this package lives in: benchmarks/ and notebooks/ are there.
REPO_ROOT = Path(__file__).resolve().parents[2]

MiB = 1 << 20
GiB = 1 << 30

#: Integer columns of results.csv (nullable: an empty cell means "not applicable").
INT_COLUMNS = ("ram_bytes", "n_fds", "dirty_rate_bytes_s", "trial", "downtime_ns", "total_ns",
               "setup_ns", "bytes_sent", "device_state_bytes", "fds_passed", "fd_messages",
               "frames_sent", "frames_lost", "frames_duplicated", "max_gap_ns", "lines_sent",
               "lines_lost", "reconnects", "stop_resume_ns")
FLOAT_COLUMNS = ("value",)
TEXT_COLUMNS = ("scenario", "mode", "variant", "backend", "unit", "error")
BOOL_COLUMNS = ("live", "ok")
#: What identifies one measured point: the trials of a point are summarized together.
POINT_KEYS = ["scenario", "mode", "variant", "backend", "live", "ram_bytes", "n_fds"]

SCENARIOS = ("ram-size", "fd-count", "tap-traffic", "chardev", "limits", "qemu-peer")

# One colour per mode in every figure; floors are black.
MODE_STYLE = {
    "fd-passing": {"color": "#1f77b4", "label": "fd-passing"},
    "state-copy": {"color": "#d62728", "label": "state copy"},
    "qemu-ram-copied": {"color": "#7f7f7f", "label": "real QEMU, RAM copied"},
    "qemu-ram-shared": {"color": "#8c564b", "label": "real QEMU, RAM shared (x-ignore-shared)"},
}
FLOOR_COLOR = "black"


# ---------------------------------------------------------------------------
# Finding and loading a run
# ---------------------------------------------------------------------------


def _results_dir_of(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_file() and p.name == "results.csv":
        p = p.parent
    if not (p / "results.csv").is_file():
        raise MigrationError(f"{p} holds no results.csv")
    return p.resolve()


def _newest_run(base: Path) -> Path | None:
    """The newest subdirectory of ``base`` holding a results.csv.

    Run directories are named ``<UTC timestamp>-<host>``, so the name orders
    them in time; the modification time breaks ties.
    """
    if not base.is_dir():
        return None
    runs = [d for d in base.iterdir() if d.is_dir() and (d / "results.csv").is_file()]
    if not runs:
        return None
    return max(runs, key=lambda d: (d.name, d.stat().st_mtime)).resolve()


def find_results(env_or_param: str | os.PathLike | None = None, *, root: str | os.PathLike | None = None) -> Path:
    """The results directory a notebook should show.

    In order: ``env_or_param`` (a notebook's papermill parameter), the
    directory named by ``$MIGFD_RESULTS``, the newest run under
    ``benchmarks/results/``, the newest committed reference run under
    ``benchmarks/reference/``. ``root`` is the checkout (default: this one).
    """
    if env_or_param:
        return _results_dir_of(env_or_param)
    if os.environ.get(RESULTS_ENV):
        return _results_dir_of(os.environ[RESULTS_ENV])
    base = Path(root) if root is not None else REPO_ROOT
    for sub in ("benchmarks/results", "benchmarks/reference"):
        found = _newest_run(base / sub)
        if found is not None:
            return found
    raise MigrationError(f"no benchmark results: run `migfd bench` (or set {RESULTS_ENV}); "
                         f"nothing under {base / 'benchmarks/results'} nor {base / 'benchmarks/reference'}")


def _to_bool(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return pd.NA
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "t"):
        return True
    if text in ("false", "0", "no", "n", "f"):
        return False
    return pd.NA


def clean_results(df: pd.DataFrame) -> pd.DataFrame:
    """Typed columns: nullable integers, booleans, text with "" for "not applicable".

    Columns of docs/RESULTS.md that a run did not write are added empty, so
    every function here can rely on them; unknown columns are kept as they are.
    """
    df = df.copy()
    for col in INT_COLUMNS + FLOAT_COLUMNS + TEXT_COLUMNS + BOOL_COLUMNS:
        if col not in df.columns:
            df[col] = pd.NA
    for col in INT_COLUMNS:
        num = pd.to_numeric(df[col], errors="coerce")
        df[col] = num.round().astype("Int64")
    for col in FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in TEXT_COLUMNS:
        df[col] = df[col].astype("string").fillna("").str.strip().astype(object)
    for col in BOOL_COLUMNS:
        df[col] = df[col].map(_to_bool).astype("boolean")
    # a row without an ok flag did not say it succeeded
    df["ok"] = df["ok"].fillna(False)
    return df


def load_results(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """``results.csv`` as a typed DataFrame, and ``metadata.json`` (``{}`` if absent)."""
    run = _results_dir_of(path)
    df = pd.read_csv(run / "results.csv", dtype=str, keep_default_na=False, na_values=[""])
    meta: dict = {}
    meta_path = run / "metadata.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise MigrationError(f"{meta_path} is not JSON: {exc}") from None
    return clean_results(df), meta


def describe_run(metadata: dict, path: str | os.PathLike | None = None) -> str:
    """A few Markdown lines saying where and when a run was made, and what it skipped."""
    m = metadata or {}

    def get(*keys: str) -> str:
        for k in keys:
            v = m.get(k)
            if isinstance(v, dict):
                v = v.get("model") or v.get("name") or json.dumps(v)
            if v not in (None, ""):
                return str(v)
        return "?"

    lines = []
    if path is not None:
        p = Path(path)
        kind = "committed reference run" if "reference" in p.parts else "run"
        lines.append(f"**Results:** `{p}` ({kind})")
    cpu = m.get("cpu") if isinstance(m.get("cpu"), dict) else {}
    cpu_model = cpu.get("model") if cpu else None
    cpu_count = cpu.get("count") if cpu else None
    lines.append(f"**Host:** {get('host', 'hostname')}, kernel {get('kernel')}, "
                 f"CPU {cpu_model or get('cpu_model')} × {cpu_count or get('cpu_count')}, "
                 f"Python {get('python', 'python_version')}")
    dirty = " (with uncommitted changes)" if m.get("git_dirty") else ""
    lines.append(f"**Time (UTC):** {get('start', 'start_time')} → {get('end', 'end_time')}; "
                 f"git {get('git_revision', 'git', 'revision')}{dirty}")
    options = m.get("options")
    if isinstance(options, dict):
        shown = {k: v for k, v in options.items() if k != "argv"}
        lines.append(f"**Options:** `{json.dumps(shown, sort_keys=True)}`")
    if m.get("note"):
        lines.append(f"**Note:** {m['note']}")
    scen = m.get("scenarios")
    if isinstance(scen, dict) and scen:
        ran = [n for n, s in scen.items() if isinstance(s, dict) and s.get("ran")]
        skipped = [(n, s.get("reason", "")) for n, s in scen.items() if isinstance(s, dict) and not s.get("ran")]
        lines.append(f"**Scenarios run:** {', '.join(ran) or 'none'}")
        for name, reason in skipped:
            lines.append(f"**Skipped:** {name} — {reason or 'no reason given'}")
    warnings = m.get("warnings")
    if isinstance(warnings, dict):
        # the runner counts repeats: {text: times}
        warnings = [f"{k} (×{v})" if isinstance(v, int) and not isinstance(v, bool) and v > 1 else str(k)
                    for k, v in warnings.items()]
    for text in list(warnings or [])[:10]:
        lines.append(f"**Warning:** {text}")
    failed = m.get("failed_rows")
    if failed:
        lines.append(f"**Failed trials:** {failed} of {m.get('rows', '?')} rows have ok=False "
                     f"(kept in results.csv with their error; left out of medians)")
    return "  \n".join(lines)


def _scenario_info(metadata: dict | None, scenario: str) -> dict:
    info = ((metadata or {}).get("scenarios") or {}).get(scenario)
    return info if isinstance(info, dict) else {}


def skip_reason(metadata: dict | None, scenario: str) -> str | None:
    """Why ``scenario`` did not run, from metadata["scenarios"], or None if it ran (or we don't know)."""
    info = ((metadata or {}).get("scenarios") or {}).get(scenario)
    if isinstance(info, dict) and not info.get("ran", True):
        return info.get("reason") or "skipped, no reason given"
    return None


# ---------------------------------------------------------------------------
# Summaries
# ---------------------------------------------------------------------------


def summarize(df: pd.DataFrame, metric: str = "downtime_ns") -> pd.DataFrame:
    """Median, p5, p95 and n of ``metric`` per point (scenario, mode, variant, backend, live, size).

    Only trials with ok=True count; ``n_failed`` says how many of the point's
    trials failed. Percentiles are linear interpolations between trials, so
    with a handful of trials p5 and p95 sit close to the extremes.
    """
    cols = ["scenario", "mode", "variant", "backend", "live", "ram_bytes", "n_fds",
            "n", "n_failed", "median", "p5", "p95"]
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
        if len(vals):
            rec["median"], rec["p5"], rec["p95"] = (float(np.median(vals)), float(np.percentile(vals, 5)),
                                                    float(np.percentile(vals, 95)))
        else:
            rec["median"] = rec["p5"] = rec["p95"] = float("nan")
        rows.append(rec)
    out = pd.DataFrame(rows, columns=cols)
    for col in ("ram_bytes", "n_fds"):
        out[col] = out[col].astype("Int64")
    out["live"] = out["live"].astype("boolean")
    return out.reset_index(drop=True)


def _rows(df: pd.DataFrame, scenario: str | None = None, mode: str | None = None, *,
          variant: str | None = None, ok: bool | None = True) -> pd.DataFrame:
    sel = pd.Series(True, index=df.index)
    if scenario is not None:
        sel &= df["scenario"] == scenario
    if mode is not None:
        sel &= df["mode"] == mode
    if variant is not None:
        sel &= df["variant"] == variant
    if ok is not None:
        sel &= df["ok"].fillna(False).astype(bool) == ok
    return df[sel]


def _median(values: Iterable[Any]) -> float:
    arr = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").dropna().astype(float)
    return float(np.median(arr)) if len(arr) else float("nan")


def fmt_bytes(n: float) -> str:
    """64 MiB, 1 GiB, 4 KiB: binary units as the benchmark's sizes are."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "?"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
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


def _failures(df: pd.DataFrame, scenario: str, mode: str | None = None) -> str:
    """'' or ' (2 of 10 trials failed: <first error>)' for a scenario/mode."""
    rows = _rows(df, scenario, mode, ok=None)
    bad = rows[~rows["ok"].fillna(False).astype(bool)]
    if bad.empty:
        return ""
    first = next((e for e in bad["error"] if e), "no error text")
    return f" ({len(bad)} of {len(rows)} trials failed; first error: {first})"


def _absent(df: pd.DataFrame, metadata: dict | None, scenario: str, what: str) -> str:
    """Why there are no usable rows of ``scenario``: skipped, all failed, or never written."""
    reason = skip_reason(metadata, scenario)
    if reason:
        return f"scenario {scenario} was skipped: {reason}"
    chosen = ((metadata or {}).get("options") or {}).get("scenarios")
    if isinstance(chosen, list) and chosen and scenario not in chosen:
        return f"scenario {scenario} was not selected in this run (options: {', '.join(chosen)})"
    rows = _rows(df, scenario, ok=None)
    if not rows.empty and not rows["ok"].fillna(False).astype(bool).any():
        first = next((e for e in rows["error"] if e), "no error text")
        return f"all {len(rows)} trials of {scenario} failed; first error: {first}"
    if rows.empty:
        return f"no {scenario} rows in results.csv"
    return f"no {what} in the {scenario} rows"


# ---------------------------------------------------------------------------
# Derived figures, each from rows of one run
# ---------------------------------------------------------------------------


def throughput(df: pd.DataFrame) -> pd.Series:
    """Bytes per second through the migration channel per trial: bytes_sent / (total - setup)."""
    busy = df["total_ns"].astype("Float64") - df["setup_ns"].fillna(0).astype("Float64")
    out = df["bytes_sent"].astype("Float64") / busy * 1e9
    return out.where(busy > 0).astype("float64")


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
    return _median(_rows(df, "limits", variant=variant)[column])


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


# ---------------------------------------------------------------------------
# Targets (issue 4, item 3)
# ---------------------------------------------------------------------------


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
    pts = summarize(_rows(df, "ram-size", "fd-passing", ok=None))
    pts = pts[pts["n"] > 0]
    if pts["ram_bytes"].nunique() < 2:
        return _not_measured("flat-in-ram", _absent(df, meta, "ram-size", "fd-passing trials at two RAM sizes")
                             if pts.empty else "fd-passing measured at one RAM size only")
    worst = None
    for live, g in pts.groupby("live", dropna=False):
        g = g.groupby("ram_bytes")["median"].median().sort_index()
        if len(g) < 2:
            continue
        ratio = g.iloc[-1] / g.iloc[0]
        label = _live_label(live) or "live unknown"
        text = (f"{label}: {fmt_ns(g.iloc[-1])} at {fmt_bytes(g.index[-1])} vs "
                f"{fmt_ns(g.iloc[0])} at {fmt_bytes(g.index[0])}")
        if worst is None or ratio > worst[0]:
            worst = (ratio, text)
    if worst is None:
        return _not_measured("flat-in-ram", "no live or non-live series with two RAM sizes")
    detail = f"worst of live/non-live: {worst[1]}" + _failures(df, "ram-size", "fd-passing")
    return _verdict("flat-in-ram", worst[0], detail,
                    f"fd-passing downtime grows with RAM: {worst[1]}")


def _target_copy_vs_fd(df, meta):
    rows = _rows(df, "ram-size")
    rows = rows[rows["live"] == False]  # noqa: E712 (nullable boolean)
    fd = rows[rows["mode"] == "fd-passing"]
    sc = rows[rows["mode"] == "state-copy"]
    if fd.empty or sc.empty:
        return _not_measured("copy-vs-fd-1gib", _absent(df, meta, "ram-size", "non-live trials of both modes"))
    at = lambda rows, size: _median(rows.loc[rows["ram_bytes"] == size, "downtime_ns"])  # noqa: E731
    common = sorted(set(fd["ram_bytes"].dropna()) & set(sc["ram_bytes"].dropna()))
    if GiB in common:
        c, f = at(sc, GiB), at(fd, GiB)
        return _verdict("copy-vs-fd-1gib", c / f, f"state copy {fmt_ns(c)} vs fd-passing {fmt_ns(f)}, non-live"
                        + _failures(df, "ram-size"),
                        f"state copy of 1 GiB took only {c / f:.3g}× the fd-passing downtime")
    if not common:
        return _not_measured("copy-vs-fd-1gib", "no RAM size measured non-live in both modes")
    largest = common[-1]
    c, f = at(sc, largest), at(fd, largest)
    skipped = [p for p in _scenario_info(meta, "ram-size").get("skipped_points") or []
               if isinstance(p, dict) and p.get("ram_bytes") == GiB]
    why = (f"1 GiB was skipped: {skipped[0].get('reason', 'no reason given')}" if skipped else
           f"1 GiB not measured in this run (largest non-live size: {fmt_bytes(largest)}; "
           f"a quick run stops at 256 MiB)")
    return _not_measured("copy-vs-fd-1gib", why,
                         f"at {fmt_bytes(largest)}: state copy {fmt_ns(c)} / fd-passing {fmt_ns(f)} = {c / f:.3g}")


def _target_frames(df, meta):
    rows = _rows(df, "tap-traffic", "fd-passing")
    if rows.empty or rows["frames_sent"].isna().all():
        return _not_measured("zero-frames-lost", _absent(df, meta, "tap-traffic", "fd-passing trials with frame counts"))
    lost = int(rows["frames_lost"].fillna(0).sum())
    dup = int(rows["frames_duplicated"].fillna(0).sum())
    sent = int(rows["frames_sent"].fillna(0).sum())
    detail = (f"{lost} lost, {dup} duplicated of {sent:,} frames sent in {len(rows)} fd-passing trials"
              + _failures(df, "tap-traffic", "fd-passing"))
    return _verdict("zero-frames-lost", float(lost + dup), detail,
                    f"{lost} frames lost and {dup} duplicated while the TAP fds were handed over")


def _target_throughput(df, meta):
    floor = floor_median(df, "unix-throughput")
    if math.isnan(floor):
        return _not_measured("copy-throughput", _absent(df, meta, "limits", "unix-throughput floor"))
    rows = _rows(df, "ram-size", "state-copy")
    if rows.empty:
        return _not_measured("copy-throughput", _absent(df, meta, "ram-size", "state-copy trials"))
    nonlive = rows[rows["live"] == False]  # noqa: E712
    use, label = (nonlive, "non-live") if not nonlive.empty else (rows, "live")
    largest = use["ram_bytes"].max()
    at = use[use["ram_bytes"] == largest]
    tp = _median(throughput(at))
    detail = (f"{label} state copy of {fmt_bytes(largest)}: {fmt_rate(tp)} vs raw AF_UNIX {fmt_rate(floor)}"
              + _failures(df, "ram-size", "state-copy"))
    return _verdict("copy-throughput", tp / floor, detail,
                    f"state copy moved {fmt_rate(tp)}, the raw socket {fmt_rate(floor)}")


def _target_handover(df, meta):
    floor_rows = _rows(df, "limits", variant="handover-floor")
    if floor_rows.empty:
        return _not_measured("handover-floor", _absent(df, meta, "limits", "handover-floor measurement"))
    fd = df[(df["mode"] == "fd-passing") & (df["scenario"] != "limits") & df["ok"].fillna(False).astype(bool)]
    backends = set(floor_rows["backend"]) - {""}
    want = next(iter(backends)) if len(backends) == 1 else "ram+tap+chardev"
    fd = fd[fd["backend"] == want]
    if fd.empty:
        why = _absent(df, meta, "tap-traffic", f"fd-passing trials of a VM with {want}")
        return _not_measured("handover-floor", why if "skipped" in why else
                             f"no successful fd-passing trial of a VM with {want}")
    floor = _median(floor_rows[floor_rows["backend"] == want]["total_ns"]) if want in backends \
        else _median(floor_rows["total_ns"])
    down = _median(fd["downtime_ns"])
    scen = ", ".join(sorted(set(fd["scenario"])))
    detail = (f"{want} ({scen}): downtime {fmt_ns(down)} vs floor {fmt_ns(floor)} "
              f"for the same fds and device-state bytes")
    return _verdict("handover-floor", down / floor, detail,
                    f"downtime {fmt_ns(down)} is {down / floor:.3g}× the raw handover {fmt_ns(floor)}")


def _target_per_fd(df, meta):
    floor = summarize(_rows(df, "limits", variant="fd-roundtrip", ok=None), metric="total_ns")
    floor = floor[floor["n"] > 0]
    floor_slope = slope_per_fd(floor)
    if math.isnan(floor_slope):
        per_fd = floor_median(df, "fd-roundtrip")
        floor_slope = per_fd if not math.isnan(per_fd) else floor_slope
    if math.isnan(floor_slope):
        return _not_measured("per-fd-cost", _absent(df, meta, "limits", "fd-roundtrip floor"))
    rows = _rows(df, "fd-count", "fd-passing", ok=None)
    batched = rows[rows["variant"] == "batched"]
    use, label = (batched, "batched") if not batched.empty else (rows, "all fd-passing")
    pts = summarize(use)
    pts = pts[pts["n"] > 0]
    slope = slope_per_fd(pts)
    if math.isnan(slope):
        return _not_measured("per-fd-cost", _absent(df, meta, "fd-count", "fd-passing trials at two fd counts")
                             if pts.empty else "fd-passing measured at one fd count only")
    detail = (f"{label}: +{fmt_ns(slope)} per fd (slope of median downtime over "
              f"{pts['n_fds'].min()}–{pts['n_fds'].max()} fds) vs raw +{fmt_ns(floor_slope)} per fd"
              + _failures(df, "fd-count", "fd-passing"))
    return _verdict("per-fd-cost", slope / floor_slope, detail,
                    f"each extra fd costs {fmt_ns(slope)} in a migration, {fmt_ns(floor_slope)} raw")


def _target_qemu(df, meta):
    q = _rows(df, "qemu-peer")
    q = q[q["mode"].str.startswith("qemu")]
    if q.empty:
        return _not_measured("vs-qemu", _absent(df, meta, "qemu-peer", "successful QEMU migrations"))
    fd = _rows(df, "ram-size", "fd-passing")
    worst = None
    for size, qs in q.groupby("ram_bytes"):
        lives = set(qs["live"].dropna())
        f = fd[fd["ram_bytes"] == size]
        if lives and not f[f["live"].isin(lives)].empty:
            f = f[f["live"].isin(lives)]
        if f.empty:
            continue
        fmed = _median(f["downtime_ns"])
        per_mode = qs.assign(_down=qemu_downtime(qs)).groupby("mode")["_down"].apply(_median)
        best_mode = per_mode.idxmin()
        ratio = fmed / per_mode[best_mode]
        text = (f"{fmt_bytes(size)}: fd-passing {fmt_ns(fmed)} vs {MODE_STYLE.get(best_mode, {}).get('label', best_mode)} "
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


def format_summary(points: pd.DataFrame, unit: str = "ms") -> pd.DataFrame:
    """A :func:`summarize` table for reading: sizes in binary units, times in ``unit`` (ms or µs)."""
    scale = {"ms": 1e6, "µs": 1e3, "s": 1e9}[unit]
    out = points.copy()
    out["ram_bytes"] = [("" if pd.isna(v) else fmt_bytes(float(v))) for v in out["ram_bytes"]]
    out["n_fds"] = [("" if pd.isna(v) else str(int(v))) for v in out["n_fds"]]
    out["live"] = [_live_label(v) for v in out["live"]]
    for col in ("median", "p5", "p95"):
        out[f"{col} ({unit})"] = (out.pop(col) / scale).round(3)
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


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _figure(ncols: int = 1, width: float = 6.5, height: float = 4.6) -> tuple[Figure, list]:
    fig = Figure(figsize=(width * ncols, height), layout="constrained", dpi=100)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _no_data(ax, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, transform=ax.transAxes,
            fontsize=10, color="#444444")
    ax.set_xticks([])
    ax.set_yticks([])


def _resolution_note(values: pd.Series) -> str:
    """' [whole ms]' when every value is a multiple of 1 ms: QEMU's query-migrate reports ms."""
    v = values.astype("float64").dropna()
    if len(v) and (v % 1e6 == 0).all():
        return " [whole ms as QEMU reports]"
    return ""


def _series_label(base: str, pts: pd.DataFrame) -> str:
    n = pts["n"]
    n_text = f"n={n.min()}" if n.min() == n.max() else f"n={n.min()}–{n.max()}"
    label = f"{base} ({n_text}/point"
    failed = int(pts["n_failed"].sum())
    if failed:
        label += f", {failed} failed trial{'s' if failed > 1 else ''} not shown"
    return label + ")"


def _draw_series(ax, pts: pd.DataFrame, x: str, label: str, color: str, *, dashed: bool = False,
                 marker: str = "o", scale: float = 1e6, linestyle: str | None = None,
                 alpha: float = 1.0) -> None:
    """Medians joined by a line, the p5–p95 band shaded; points with no successful trial left out."""
    pts = pts[pts["n"] > 0].sort_values(x)
    if pts.empty:
        return
    xs = pts[x].astype(float).to_numpy()
    ax.plot(xs, pts["median"] / scale, linestyle=linestyle or ("--" if dashed else "-"), marker=marker,
            color=color, alpha=alpha, markerfacecolor="white" if dashed else color,
            label=_series_label(label, pts))
    ax.fill_between(xs, pts["p5"] / scale, pts["p95"] / scale, color=color, alpha=0.15, linewidth=0)


def _binary_ticks(ax, values: Iterable[float], fmt) -> None:
    vals = sorted({float(v) for v in values if not pd.isna(v)})
    if not vals:
        return
    ax.xaxis.set_major_locator(FixedLocator(vals))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


def _is_live(live: Any) -> bool | None:
    """A live flag as groupby hands it out (bool, numpy bool, NA) as True/False/None."""
    if live is None or live is pd.NA or (isinstance(live, float) and math.isnan(live)):
        return None
    return bool(live)


def _live_label(live: Any) -> str:
    return {True: "live", False: "non-live", None: ""}[_is_live(live)]


def _fig_legend(fig: Figure, ax, ncols: int = 2, *more_axes) -> None:
    """One legend for the whole figure, below the axes, so it never hides a point."""
    handles, labels = ax.get_legend_handles_labels()
    for other in more_axes:
        for h, l in zip(*other.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=ncols, fontsize=8, frameon=False)


def _floor_note(df: pd.DataFrame, metadata: dict | None, variant: str) -> str:
    return f"floor not drawn: {_absent(df, metadata, 'limits', variant + ' measurement')}"


def plot_downtime_vs_ram(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """Downtime and total time against guest RAM size, per mode, live and non-live; log–log.

    Medians with p5–p95 bands; real QEMU (qemu-peer) beside migfd when it ran.
    Floors, from the same run's limits: all RAM through AF_UNIX at the measured
    raw throughput (what a state copy cannot beat), and the raw handover of
    the same fds and device state (what fd-passing cannot beat).
    """
    fig, (ax_down, ax_total) = _figure(2, height=5.6)
    rows = df[df["scenario"].isin(["ram-size", "qemu-peer"])]
    if rows.empty or not rows["ok"].fillna(False).astype(bool).any():
        why = _absent(df, metadata, "ram-size", "successful trials")
        for ax in (ax_down, ax_total):
            _no_data(ax, why)
        fig.suptitle("Downtime vs guest RAM size: no data")
        return fig
    sizes = rows["ram_bytes"].dropna().unique()
    qemu = rows["scenario"] == "qemu-peer"
    rows = rows.assign(_downtime=rows["downtime_ns"].astype("float64"))
    rows.loc[qemu, "_downtime"] = qemu_downtime(rows[qemu])
    events = qemu_has_events(rows[qemu])
    for ax, metric, what in ((ax_down, "_downtime", "downtime"), (ax_total, "total_ns", "total time")):
        pts_all = summarize(rows, metric)
        for (scenario, mode, live), pts in pts_all.groupby(["scenario", "mode", "live"], dropna=False):
            style = MODE_STYLE.get(mode, {"color": "#17becf", "label": mode})
            live_text = _live_label(live)
            label = style["label"] + (f", {live_text}" if live_text else "")
            if scenario == "qemu-peer":
                if metric == "_downtime" and events:
                    label += " [STOP→RESUME events]"
                else:
                    label += _resolution_note(rows[rows["mode"] == mode][metric])
            _draw_series(ax, pts, "ram_bytes", label, style["color"], dashed=_is_live(live) is False,
                         marker="D" if scenario == "qemu-peer" else ("s" if _is_live(live) is False else "o"))
        # floor 1: all of RAM through the raw socket
        rate = floor_median(df, "unix-throughput")
        xs = np.array(sorted(float(s) for s in sizes))
        if not math.isnan(rate) and len(xs):
            ax.plot(xs, xs / rate * 1e3, color=FLOOR_COLOR, linestyle=":", linewidth=1.5,
                    label=f"floor: all RAM through AF_UNIX at {fmt_rate(rate)} (limits)")
        # floor 2: the raw handover of the fds and device state
        hand = _rows(df, "limits", variant="handover-floor")["total_ns"].astype("float64").dropna()
        if len(hand):
            ax.axhline(np.median(hand) / 1e6, color=FLOOR_COLOR, linestyle="-.", linewidth=1.2,
                       label=f"floor: raw handover of fds + device state, {fmt_ns(np.median(hand))} (limits)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        _binary_ticks(ax, sizes, fmt_bytes)
        ax.set_xlabel("guest RAM size")
        ax.set_ylabel(f"{what} (ms, log scale)")
        ax.grid(True, which="both", alpha=0.3)
        if math.isnan(rate) or not len(hand):
            ax.text(0.01, 0.01, _floor_note(df, metadata, "unix-throughput/handover-floor"),
                    transform=ax.transAxes, fontsize=7, color="#444444")
    ax_down.set_title("Downtime (guest stopped → running on the destination)")
    ax_total.set_title("Total time (migrate issued → completed)")
    _fig_legend(fig, ax_down)
    fig.suptitle("fd-passing vs state copy against guest RAM size — lines: medians, bands: p5–p95 of trials; "
                 "dashed/hollow: non-live (guest stopped first)", fontsize=10)
    return fig


def plot_downtime_vs_fds(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """Downtime against the number of handed-over fds, batched vs unbatched sendmsg; log–log.

    The floor is the raw round trip of passing the same number of fds between
    two processes, batched (limits: fd-roundtrip); each legend entry gives the
    fitted cost of one more fd.
    """
    fig, (ax,) = _figure(1, width=8, height=5)
    rows = _rows(df, "fd-count", ok=None)
    if rows.empty or not rows["ok"].fillna(False).astype(bool).any():
        _no_data(ax, _absent(df, metadata, "fd-count", "successful trials"))
        fig.suptitle("Downtime vs handed-over fds: no data")
        return fig
    styles = {"batched": ("o", False), "unbatched": ("s", True)}
    shades = {"batched": 1.0, "unbatched": 0.6}
    for (mode, variant), g in rows.groupby(["mode", "variant"], dropna=False):
        pts = summarize(g)
        marker, dashed = styles.get(variant, ("^", False))
        color = MODE_STYLE.get(mode, {"color": "#17becf"})["color"]
        slope = slope_per_fd(pts[pts["n"] > 0])
        label = MODE_STYLE.get(mode, {"label": mode})["label"] + (f", {variant}" if variant else "")
        if not math.isnan(slope):
            label += f": {fmt_ns(slope)}/fd"
        _draw_series(ax, pts, "n_fds", label, color, dashed=dashed, marker=marker,
                     alpha=shades.get(variant, 1.0))
    floor = summarize(_rows(df, "limits", variant="fd-roundtrip", ok=None), metric="total_ns")
    floor = floor[floor["n"] > 0]
    if not floor.empty:
        slope = slope_per_fd(floor)
        _draw_series(ax, floor, "n_fds", f"floor: raw fd round trip, batched: {fmt_ns(slope)}/fd (limits)",
                     FLOOR_COLOR, marker=".", linestyle=":")
    else:
        ax.text(0.01, 0.01, _floor_note(df, metadata, "fd-roundtrip"), transform=ax.transAxes,
                fontsize=7, color="#444444")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _binary_ticks(ax, pd.concat([rows["n_fds"], floor["n_fds"]]).dropna(), lambda v: f"{v:.0f}")
    ax.set_xlabel("fds of the VM's backends, handed over with fd-passing (count, log scale)")
    ax.set_ylabel("downtime (ms, log scale)")
    ax.grid(True, which="both", alpha=0.3)
    _fig_legend(fig, ax, ncols=1)
    ax.set_title("Downtime vs number of handed-over fds: batched vs one fd per sendmsg\n"
                 "lines: medians, bands: p5–p95; per-fd cost = least-squares slope of the medians", fontsize=10)
    return fig


def _strip(ax, groups: list[tuple[str, np.ndarray, str]], *, scale: float = 1.0, log: bool = False,
           jitter: float = 0.12) -> None:
    """One column of dots per group (every trial shown), with the median as a bar across it."""
    rng = np.random.default_rng(0)  # fixed jitter: the same figure every time
    for i, (label, values, color) in enumerate(groups):
        vals = np.asarray(values, dtype=float) / scale
        if log:
            vals = vals[vals > 0]
        xs = i + rng.uniform(-jitter, jitter, len(vals))
        ax.scatter(xs, vals, color=color, alpha=0.7, s=22, zorder=3)
        if len(vals):
            ax.hlines(np.median(vals), i - 0.3, i + 0.3, color=color, linewidth=2.5, zorder=4)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g[0] for g in groups], fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)


def _mode_groups(rows: pd.DataFrame, column: str) -> list[tuple[str, np.ndarray, str]]:
    out = []
    for mode in sorted(set(rows["mode"]), key=lambda m: list(MODE_STYLE).index(m) if m in MODE_STYLE else 99):
        r = rows[rows["mode"] == mode]
        good = r[r["ok"].fillna(False).astype(bool)]
        failed = len(r) - len(good)
        label = f"{MODE_STYLE.get(mode, {'label': mode})['label']}\n(n={len(good)}"
        label += f", {failed} failed not shown)" if failed else ")"
        out.append((label, good[column].astype("float64").dropna().to_numpy(),
                    MODE_STYLE.get(mode, {"color": "#17becf"})["color"]))
    return out


def _handover_floor_line(ax, df: pd.DataFrame, metadata: dict | None, scale: float) -> None:
    hand = _rows(df, "limits", variant="handover-floor")["total_ns"].astype("float64").dropna()
    if len(hand):
        ax.axhline(np.median(hand) / scale, color=FLOOR_COLOR, linestyle="-.", linewidth=1.2,
                   label=f"floor: raw handover of fds + device state, {fmt_ns(np.median(hand))} (limits)")
    else:
        ax.text(0.01, 0.01, _floor_note(df, metadata, "handover-floor"), transform=ax.transAxes,
                fontsize=7, color="#444444")


def _paired_counts(ax, first, second, first_word: str, second_word: str, key: tuple[str, str]) -> None:
    """Two per-trial counts per mode side by side: ``first`` filled, ``second`` hollow,
    each with its median bar and the totals written above the mode."""
    rng = np.random.default_rng(0)  # fixed jitter: the same data draws the same figure
    for i, ((_, av, color), (_, bv, _)) in enumerate(zip(first, second)):
        for off, vals, face in ((-0.15, av, color), (0.15, bv, "white")):
            xs = i + off + rng.uniform(-0.06, 0.06, len(vals))
            ax.scatter(xs, vals, color=color, facecolor=face, s=24, zorder=3)
            if len(vals):
                ax.hlines(np.median(vals), i + off - 0.1, i + off + 0.1, color=color, linewidth=2.5)
        ax.annotate(f"total: {int(np.sum(av))} {first_word}, {int(np.sum(bv))} {second_word}", (i, 1.0),
                    xycoords=("data", "axes fraction"), xytext=(0, -12), textcoords="offset points",
                    ha="center", fontsize=8, color=color)
    _marker_key(ax, *key)
    ax.set_xticks(range(len(first)))
    ax.set_xticklabels([g[0] for g in first], fontsize=8)
    ax.set_xlim(-0.6, len(first) - 0.4)
    top = max([1.0] + [float(np.max(v)) for _, v, _ in first + second if len(v)])
    ax.set_ylim(-0.05 * top, top * 1.3)


def _marker_key(ax, filled: str, hollow: str) -> None:
    """Legend entries for the two marker kinds, in grey: the colour is the mode's, on the axis."""
    ax.scatter([], [], color="#555555", s=24, label=filled)
    ax.scatter([], [], color="#555555", facecolor="white", s=24, label=hollow)


def plot_packet_loss(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """TAP traffic through a migration: frames lost/duplicated and the longest gap, per mode.

    Every trial is a dot, the bar is the median. Counts are on a linear axis
    from 0 (the target is 0); the gap is on a log axis beside the raw
    handover floor (limits).
    """
    fig, (ax_lost, ax_gap) = _figure(2, width=6, height=4.6)
    rows = _rows(df, "tap-traffic", ok=None)
    if rows.empty or not rows["ok"].fillna(False).astype(bool).any():
        why = _absent(df, metadata, "tap-traffic", "successful trials")
        for ax in (ax_lost, ax_gap):
            _no_data(ax, why)
        fig.suptitle("Frames under TAP traffic: no data")
        return fig
    good = rows[rows["ok"].fillna(False).astype(bool)]
    _paired_counts(ax_lost, _mode_groups(rows, "frames_lost"), _mode_groups(rows, "frames_duplicated"),
                   "lost", "duplicated", ("frames lost", "frames duplicated"))
    ax_lost.axhline(0, color=FLOOR_COLOR, linestyle="-.", linewidth=1.2, label="target: 0 lost, 0 duplicated")
    ax_lost.set_ylabel("frames per trial (count, linear)")
    sent = good["frames_sent"].astype("float64").dropna()
    ax_lost.set_title(f"Frames lost (filled) and duplicated (hollow)\n"
                      f"of ~{np.median(sent):,.0f} frames sent per trial (median)" if len(sent) else
                      "Frames lost (filled) and duplicated (hollow)", fontsize=10)
    ax_lost.grid(True, axis="y", alpha=0.3)

    gaps = _mode_groups(rows, "max_gap_ns")
    _strip(ax_gap, gaps, scale=1e6, log=True)
    _handover_floor_line(ax_gap, df, metadata, 1e6)
    ax_gap.set_yscale("log")
    ax_gap.set_ylabel("longest gap between echoes (ms, log scale)")
    ax_gap.set_title("Longest silence the frame sender saw", fontsize=10)
    ax_gap.grid(True, axis="y", which="both", alpha=0.3)
    _fig_legend(fig, ax_lost, 3, ax_gap)
    fig.suptitle("Numbered frames through the TAP during the migration (tap-traffic): "
                 "dots are trials, bars medians", fontsize=10)
    return fig


def plot_chardev(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """What a chardev client sees through the migration, per mode: its longest silence, lines lost, reconnects."""
    fig, (ax_gap, ax_lines) = _figure(2, width=6, height=4.6)
    rows = _rows(df, "chardev", ok=None)
    if rows.empty or not rows["ok"].fillna(False).astype(bool).any():
        why = _absent(df, metadata, "chardev", "successful trials")
        for ax in (ax_gap, ax_lines):
            _no_data(ax, why)
        fig.suptitle("Chardev client: no data")
        return fig
    _strip(ax_gap, _mode_groups(rows, "max_gap_ns"), scale=1e6, log=True)
    _handover_floor_line(ax_gap, df, metadata, 1e6)
    ax_gap.set_yscale("log")
    ax_gap.set_ylabel("longest silence between echoes (ms, log scale)")
    ax_gap.set_title("Interruption seen by the client", fontsize=10)
    ax_gap.grid(True, axis="y", which="both", alpha=0.3)

    _paired_counts(ax_lines, _mode_groups(rows, "lines_lost"), _mode_groups(rows, "reconnects"),
                   "lines lost", "reconnects", ("lines lost", "reconnects"))
    ax_lines.axhline(0, color=FLOOR_COLOR, linestyle="-.", linewidth=1.2, label="floor: nothing lost, no reconnect")
    ax_lines.set_ylabel("per trial (count, linear)")
    sent = rows.loc[rows["ok"].fillna(False).astype(bool), "lines_sent"].astype("float64").dropna()
    ax_lines.set_title("Lines lost (filled) and reconnects (hollow)" +
                       (f"\nof ~{np.median(sent):,.0f} lines sent per trial (median)" if len(sent) else ""),
                       fontsize=10)
    ax_lines.grid(True, axis="y", alpha=0.3)
    _fig_legend(fig, ax_gap, 3, ax_lines)
    fig.suptitle("A client on the socket chardev, sending numbered lines through the migration (chardev): "
                 "dots are trials, bars medians", fontsize=10)
    return fig


def plot_throughput(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """State-copy throughput through the migration channel against the raw AF_UNIX floor.

    Throughput per trial is bytes_sent / (total time - setup time). The floors
    come from limits in the same run: raw AF_UNIX throughput into fresh memory
    (median, p5–p95 band), memcpy, and the 0.8× line of the target.
    """
    fig, (ax,) = _figure(1, width=8, height=4.8)
    rows = _rows(df, "ram-size", "state-copy", ok=None)
    if rows.empty or not rows["ok"].fillna(False).astype(bool).any():
        _no_data(ax, _absent(df, metadata, "ram-size", "successful state-copy trials"))
        fig.suptitle("State-copy throughput: no data")
        return fig
    rows = rows.assign(throughput_bps=throughput(rows))
    pts = summarize(rows, "throughput_bps")
    sizes = rows["ram_bytes"].dropna().unique()
    for live, g in pts.groupby("live", dropna=False):
        g = g[g["n"] > 0].sort_values("ram_bytes")
        if g.empty:
            continue
        xs = g["ram_bytes"].astype(float).to_numpy()
        med = g["median"].to_numpy() / GiB
        yerr = np.vstack([med - g["p5"].to_numpy() / GiB, g["p95"].to_numpy() / GiB - med])
        label = _series_label(f"state copy, {_live_label(live) or 'live unknown'}", g)
        ax.errorbar(xs, med, yerr=yerr, marker="s" if _is_live(live) is False else "o", capsize=4,
                    linestyle="--" if _is_live(live) is False else "-", color=MODE_STYLE["state-copy"]["color"],
                    markerfacecolor="white" if _is_live(live) is False else MODE_STYLE["state-copy"]["color"], label=label)
    unix = _rows(df, "limits", variant="unix-throughput")["value"].astype("float64").dropna()
    if len(unix):
        med = np.median(unix) / GiB
        ax.axhline(med, color=FLOOR_COLOR, linestyle="-.", linewidth=1.4,
                   label=f"floor: raw AF_UNIX into fresh memory, {med:.3g} GiB/s (limits, n={len(unix)})")
        ax.axhspan(np.percentile(unix, 5) / GiB, np.percentile(unix, 95) / GiB, color=FLOOR_COLOR, alpha=0.08)
        ax.axhline(0.8 * med, color=FLOOR_COLOR, linestyle=":", linewidth=1,
                   label=f"target: 0.8 × raw AF_UNIX = {0.8 * med:.3g} GiB/s")
    else:
        ax.text(0.01, 0.01, _floor_note(df, metadata, "unix-throughput"), transform=ax.transAxes,
                fontsize=7, color="#444444")
    mem = _rows(df, "limits", variant="memcpy")["value"].astype("float64").dropna()
    mem_text = (f"\nfor scale: memcpy in one process {np.median(mem) / GiB:.3g} GiB/s (limits; not drawn, "
                f"no socket involved)" if len(mem) else "")
    ax.set_xscale("log", base=2)
    _binary_ticks(ax, sizes, fmt_bytes)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("guest RAM size")
    ax.set_ylabel("throughput (GiB/s, linear from 0)")
    ax.grid(True, alpha=0.3)
    _fig_legend(fig, ax, ncols=1)
    ax.set_title("State-copy bulk throughput vs the raw AF_UNIX floor (ram-size, limits)\n"
                 "bytes through the channel / (total − setup time); medians with p5–p95 bars"
                 + mem_text, fontsize=9)
    return fig


# ---------------------------------------------------------------------------
# The protocol tour (notebook 01)
# ---------------------------------------------------------------------------


def stream_records(sink) -> tuple[bytes, list[int]]:
    """A :class:`~migfd.stream.MemorySink`'s bytes as a peer receives them, and the stream
    offsets of its fd records (each one service byte 0x20 with an fd beside it)."""
    from migfd.stream import FdRecord

    offsets, pos = [], 0
    for rec in sink.records:
        if isinstance(rec, FdRecord):
            offsets.append(pos)
            pos += 1
        else:
            pos += len(rec)
    return sink.getvalue(), offsets


_VMSTATE_TEXT = ("fields in declaration order, no tags; a subsection starts with 0x05, "
                 "u8 length + 'parent/name', be32 version")


def annotate_stream(sink, vmsds: dict | None = None) -> pd.DataFrame:
    """What every byte range of a stream held in a MemorySink means, read back by StreamReader.

    Returns rows (offset, size, record, meaning), in stream order. The fds in
    the sink are duplicated for the reader (so the caller's stay open) and the
    duplicates the reader hands back are closed here.
    """
    from migfd.stream import (CommandRecord, Configuration, EndOfState, Header, RamMemSize, RamPage,
                              SectionFooter, SectionFull, SectionHeader, StreamReader, VMDescription)
    from migfd.stream.constants import Command

    data, fd_offsets = stream_records(sink)
    dups = [os.dup(fd) for fd in sink.fds]
    reader = StreamReader(vmsds or {})
    rows: list[dict] = []
    try:
        reader.receive_data(data, dups)
        dups = []  # the reader owns them now
        reader.receive_eof()
        while True:
            start = reader.offset
            ev = reader.next_event()
            if not hasattr(ev, "__dataclass_fields__"):
                break
            end = reader.offset
            if isinstance(ev, Header):
                rows.append((start, end - start, "header", f'magic "QEVM" (0x5145564d), version {ev.version}'))
            elif isinstance(ev, Configuration):
                caps = ", ".join(ev.capabilities) or "none"
                rows.append((start, end - start, "configuration (0x07)",
                             f"machine type '{ev.machine}', subsection configuration/capabilities: {caps}"))
            elif isinstance(ev, SectionHeader):
                kind = ev.type.name
                rows.append((start, end - start, f"section {kind} (0x{int(ev.type):02x})",
                             f"section id {ev.section_id}" + (f", '{ev.name}' instance {ev.instance_id} "
                                                              f"version {ev.version_id}" if kind == "START" else
                                                              f" ('{ev.name}')")))
            elif isinstance(ev, RamMemSize):
                blocks = ", ".join(f"'{b.id}' {fmt_bytes(b.length)}" for b in ev.blocks)
                rows.append((start, end - start, "RAM block list",
                             f"be64 total | MEM_SIZE, blocks: {blocks}, then be64 EOS"))
            elif isinstance(ev, RamPage):
                what = "ZERO page (fill byte follows)" if ev.data is None else "PAGE (4 KiB of data follow)"
                rows.append((start, end - start, "RAM page record",
                             f"be64 offset 0x{ev.offset:x} | flags: {what}, block '{ev.block_id}'"))
            elif isinstance(ev, SectionFooter):
                rows.append((start, end - start, "EOS + footer (0x7e)" if ev.type.name != "START" else "footer (0x7e)",
                             f"closes section id {ev.section_id} ('{ev.name}')"))
            elif isinstance(ev, CommandRecord):
                try:
                    name = Command(ev.command).name
                except ValueError:
                    name = str(ev.command)
                rows.append((start, end - start, "command (0x08)", f"{name}, {len(ev.data)} data bytes"))
            elif isinstance(ev, SectionFull):
                for fd in ev.fds:
                    os.close(fd)
                header_len = 1 + 4 + 1 + len(ev.name) + 4 + 4
                rows.append((start, header_len, "section FULL (0x04)",
                             f"section id {ev.section_id}, '{ev.name}' instance {ev.instance_id} "
                             f"version {ev.version_id} (vmsd '{ev.vmsd_name}')"))
                pos = start + header_len
                for fd_at in [o for o in fd_offsets if start < o < end]:
                    if fd_at > pos:
                        rows.append((pos, fd_at - pos, "vmstate", _VMSTATE_TEXT))
                    rows.append((fd_at, 1, "fd record", "service byte 0x20, one fd beside it as SCM_RIGHTS "
                                 "in its own sendmsg; no fd number travels"))
                    pos = fd_at + 1
                if end - 5 > pos:
                    rows.append((pos, end - 5 - pos, "vmstate", _VMSTATE_TEXT))
                rows.append((end - 5, 5, "footer (0x7e)", f"closes section id {ev.section_id}"))
            elif isinstance(ev, EndOfState):
                rows.append((start, end - start, "EOF (0x00)", "all device state sent"))
            elif isinstance(ev, VMDescription):
                names = ", ".join(d.get("name", "?") for d in ev.description.get("devices", []))
                rows.append((start, end - start, "vmdesc (0x06)", f"be32 length + JSON description of: {names}"))
    finally:
        for fd in dups:
            os.close(fd)
        reader.close()
    return pd.DataFrame(rows, columns=["offset", "size", "record", "meaning"])


def hexdump(data: bytes, layout: pd.DataFrame, max_bytes: int = 16) -> str:
    """Text: one line per record of ``layout`` (from :func:`annotate_stream`), offset, bytes, meaning.

    Records longer than ``max_bytes`` show their first bytes and how many more follow.
    """
    lines = [f"{'offset':>6}  {'bytes':<{3 * max_bytes + 8}}  record: meaning"]
    for off, size, record, meaning in layout.itertuples(index=False):
        chunk = data[off:off + min(size, max_bytes)]
        text = " ".join(f"{b:02x}" for b in chunk)
        if size > max_bytes:
            text += f" …+{size - max_bytes}"
        lines.append(f"{off:06x}  {text:<{3 * max_bytes + 8}}  {record}: {meaning}")
    return "\n".join(lines)


async def demo_migration(workdir: str | os.PathLike, *, backend_transfer: bool, ram: str = "64M",
                         dirty_rate_bytes_s: int = 8 << 20) -> dict:
    """One real migration between two ``migfd vm`` processes over QMP; what both sides reported.

    The VM has memfd RAM and a socket chardev with a client sending numbered
    lines through the migration. Returns a flat dict for display: status,
    downtime, total time, bytes through the channel, fds passed, what the
    chardev client saw, and whether the destination's RAM verified.
    """
    from migfd.harness import ChardevClient, VMProcess, migrate

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = "on" if backend_transfer else "off"
    chardev_path = workdir / "ch0.sock"
    devices = dict(objects=(f"memory-backend-memfd,id=ram0,size={ram},backend-transfer={t}",),
                   chardevs=(f"socket,id=ch0,path={chardev_path},server=on,backend-transfer={t}",),
                   dirty_rate_bytes_s=dirty_rate_bytes_s)
    src = VMProcess("src", workdir, **devices)
    dst = VMProcess("dst", workdir, incoming="defer", **devices)
    client = None
    try:
        await src.start()
        await dst.start()
        client = ChardevClient(str(chardev_path), rate_per_s=500)
        client.start()
        client.wait_echoes(10, timeout_s=5)
        result = await migrate(src, dst, f"unix:{workdir / 'mig.sock'}", {"backend-transfer": backend_transfer})
        import asyncio
        await asyncio.sleep(0.3)  # let the client notice (or not) the switchover
        seen = client.stop()
        client = None
        guest = await dst.execute("x-query-guest", {"verify": True}) if result.ok else {}
        verify = guest.get("ram-verify", {}).get("ram0", {})
        s = result.source
        return {
            "backend-transfer": backend_transfer,
            "status (source / destination)": f"{s.get('status')} / {result.destination.get('status')}",
            "error": result.error or "",
            "downtime": fmt_ns(s.get("x-downtime-ns", float("nan"))),
            "total time": fmt_ns(s.get("x-total-time-ns", float("nan"))),
            "bytes through the channel": s.get("x-bytes-sent"),
            "RAM pages sent (normal / zero)": f"{s.get('ram', {}).get('normal')} / {s.get('ram', {}).get('duplicate')}",
            "fds passed (in sendmsg calls)": f"{s.get('x-fds-passed')} ({s.get('x-fd-messages')})",
            "device-state bytes": s.get("x-device-state-bytes"),
            "run state (source / destination)": f"{(await src.execute('query-status'))['status']} / "
                                                f"{(await dst.execute('query-status'))['status']}",
            "destination RAM verified": f"{verify.get('ok')} ({verify.get('pages')} pages)" if verify else "n/a",
            "chardev client: lines sent / lost": f"{seen.lines_sent} / {len(seen.lost)}",
            "chardev client: reconnects": seen.reconnects,
            "chardev client: longest silence": fmt_ns(seen.max_gap_ns),
        }
    finally:
        if client is not None:
            client.stop(0)
        await src.quit()
        await dst.quit()


__all__ = [
    "RESULTS_ENV", "TARGETS", "annotate_stream", "clean_results", "demo_migration", "describe_run",
    "find_results", "floor_median", "fmt_bytes", "fmt_ns", "format_summary", "format_targets", "hexdump",
    "load_results", "plot_chardev", "trials_table",
    "plot_downtime_vs_fds", "plot_downtime_vs_ram", "plot_packet_loss", "plot_throughput", "skip_reason",
    "slope_per_fd", "stream_records", "summarize", "targets", "throughput",
]
