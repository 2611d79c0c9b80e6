"""``migfd compare BASE NEW``: did a change of code, host or kernel make migfd faster or slower?

For every point both runs measured (scenario, mode, variant, backend, RAM,
fds, live; the QEMU version where the rows name one) and every metric both
have values for, the ratio of medians NEW/BASE with its 95% interval and a
verdict (:func:`migfd.stats.change`): ``improved``, ``regressed``,
``unchanged`` or ``inconclusive``. Significance is controlled across all the
comparisons of one call (Benjamini-Hochberg). BASE and NEW are results
directories or HTML reports written by ``migfd report`` (which embed their
run). The verdicts compare runs, not machines: :func:`metadata_differences`
says what else differed.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from migfd.errors import MigrationError
from migfd.paths import repo_root
from migfd.results.describe import busy_note
from migfd.results.load import POINT_KEYS, RESULTS_ENV, find_results, load_run, newest_run
from migfd.results.summary import fmt_bytes, live_label, mode_label, throughput
from migfd.stats import (
    IMPROVED,
    INCONCLUSIVE,
    REGRESSED,
    UNCHANGED,
    adjust_p_values,
    change,
    change_p_value,
    clean,
    ratio_ci,
)

BASE_ENV, NEW_ENV = "MIGFD_BASE", "MIGFD_NEW"
#: the notebook that shows a comparison (the report includes it when there is a base)
COMPARE_NOTEBOOK = "04-compare.ipynb"

#: metric -> lower is better. ``throughput_bytes_s`` is derived (summary.throughput); ``value`` is a floor's.
METRICS = {"downtime_ns": True, "total_ns": True, "stop_resume_ns": True, "throughput_bytes_s": False,
           "frames_lost": True, "frames_duplicated": True, "lines_lost": True, "max_gap_ns": True,
           "value": True}
#: counts every trial gives, failed ones too (a lost frame is lost whether or not the trial failed)
COUNT_METRICS = ("frames_lost", "frames_duplicated", "lines_lost")
#: the fields of one change, in order (``migfd compare --json``)
CHANGE_FIELDS = ["scenario", "mode", "variant", "backend", "ram_bytes", "n_fds", "live", "metric",
                 "base_median", "new_median", "ratio", "ci_low", "ci_high", "verdict", "n_base", "n_new"]
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

    def describe(self) -> dict[str, Any]:
        m = self.meta
        return {"source": str(self.source), "kind": self.kind, "rows": int(len(self.df)),
                "failed_rows": int((~self.df["ok"].fillna(False).astype(bool)).sum()) if len(self.df) else 0,
                "git_revision": m.get("git_revision"), "host": m.get("host"), "kernel": m.get("kernel"),
                "start": m.get("start"), "busy": bool(busy_note(m))}


def read_run(path: str | os.PathLike) -> Run:
    """A side of the comparison from a results directory (or its results.csv) or an HTML report."""
    p = Path(path).expanduser()
    try:
        df, meta = load_run(p)
    except (OSError, ValueError) as exc:  # unreadable file, a CSV that is not one
        raise MigrationError(f"cannot read {p}: {exc}") from None
    return Run(df, meta, p.resolve())


def _with_derived(df: pd.DataFrame) -> pd.DataFrame:
    # throughput of a state copy only: fd-passing moves a few hundred bytes, not guest RAM
    tp = throughput(df).where(df["mode"] == "state-copy") if len(df) else []
    return df.assign(throughput_bytes_s=tp)


def _metric_values(g: pd.DataFrame, metric: str) -> np.ndarray:
    if metric in COUNT_METRICS:
        rows = g  # failed trials' counts are counts too
    else:
        rows = g[g["ok"].fillna(False).astype(bool)]
    return clean(pd.to_numeric(rows[metric], errors="coerce").astype("float64"))


def _metrics_of(scenario: str) -> list[str]:
    # a floor's figure is its value; its times are what the value was computed from
    return ["value"] if scenario == "limits" else [m for m in METRICS if m != "value"]


def _keys(base: pd.DataFrame, new: pd.DataFrame) -> list[str]:
    """The point keys: peer_version only when a row of either run names a QEMU version."""
    has_version = any((d["peer_version"].fillna("") != "").any() for d in (base, new) if "peer_version" in d)
    return [k for k in POINT_KEYS if k != "peer_version" or has_version]


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


def compare(base: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    """One row per (point, metric) both runs measured: :data:`CHANGE_FIELDS` (plus ``p_adjusted``).

    ``ratio`` is median(NEW)/median(BASE) with its 95% bootstrap interval
    (``ci_low``, ``ci_high``); ``verdict`` comes from :func:`migfd.stats.change`
    with the p-values adjusted across every row returned. Times and throughput
    use successful trials; loss counts use every trial that has them.
    """
    keys = _keys(base, new)
    columns = [*CHANGE_FIELDS[:6], "live", *(["peer_version"] if "peer_version" in keys else []),
               *CHANGE_FIELDS[7:], "p_adjusted"]
    if base.empty or new.empty:
        return pd.DataFrame(columns=columns)
    base, new = _with_derived(base), _with_derived(new)
    new_groups = {k: g for k, g in new.groupby(keys, dropna=False)}
    records, p_values = [], []
    for key, bg in base.groupby(keys, dropna=False, sort=True):
        ng = new_groups.get(key)
        if ng is None:
            continue
        point = dict(zip(keys, key))
        for metric in _metrics_of(point["scenario"]):
            b, n = _metric_values(bg, metric), _metric_values(ng, metric)
            if not len(b) or not len(n):
                continue
            ratio = ratio_ci(b, n)
            lower = METRICS[metric]
            if metric == "value":
                units = set(bg["unit"]) | set(ng["unit"])
                lower = not any(u.endswith("/s") for u in units)  # bytes/s: more is better
            records.append({**point, "metric": metric, "base_median": float(np.median(b)),
                            "new_median": float(np.median(n)), "ratio": ratio.value, "ci_low": ratio.low,
                            "ci_high": ratio.high, "n_base": len(b), "n_new": len(n), "_ratio": ratio,
                            "_lower": lower})
            p_values.append(change_p_value(b, n))
    adjusted = adjust_p_values(p_values) if p_values else []
    for rec, p in zip(records, adjusted):
        rec["p_adjusted"] = p
        rec["verdict"] = change(rec.pop("_ratio"), p, lower_is_better=rec.pop("_lower"))
    out = pd.DataFrame(records, columns=columns)
    for col in ("ram_bytes", "n_fds"):
        out[col] = out[col].astype("Int64")
    return out


def unmatched_points(base: pd.DataFrame, new: pd.DataFrame) -> tuple[int, int]:
    """How many points only BASE measured, and how many only NEW (a renamed variant, a new QEMU...)."""
    keys = _keys(base, new)
    b = set(base.groupby(keys, dropna=False).groups) if len(base) else set()
    n = set(new.groupby(keys, dropna=False).groups) if len(new) else set()
    return len(b - n), len(n - b)


def changes_json(changes: pd.DataFrame) -> list[dict[str, Any]]:
    """The changes as ``--json`` prints them: exactly :data:`CHANGE_FIELDS` (and ``peer_version`` when
    the runs name QEMU versions), null where a figure cannot be given."""
    fields = CHANGE_FIELDS + (["peer_version"] if "peer_version" in changes.columns else [])
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


def verdict_counts(changes: pd.DataFrame) -> dict[str, int]:
    counts = changes["verdict"].value_counts() if len(changes) else pd.Series(dtype=int)
    return {v: int(counts.get(v, 0)) for v in (REGRESSED, IMPROVED, UNCHANGED, INCONCLUSIVE)}


def point_label(row: Any) -> str:
    """'ram-size fd-passing 1 GiB non-live: downtime_ns', as the forest plot and the tables name a change."""
    parts = [row["scenario"], mode_label(row["mode"])]
    if row["variant"]:
        parts.append(row["variant"])
    if "peer_version" in row and row["peer_version"]:
        parts.append(f"QEMU {row['peer_version']}")
    if not pd.isna(row["ram_bytes"]) and row["scenario"] not in ("fd-count",):
        parts.append(fmt_bytes(float(row["ram_bytes"])))
    if not pd.isna(row["n_fds"]) and row["scenario"] in ("fd-count", "limits") and row["n_fds"]:
        parts.append(f"{int(row['n_fds'])} fds")
    live = live_label(row["live"])
    if live and row["scenario"] != "limits":
        parts.append(live)
    return " ".join(str(p) for p in parts) + f": {row['metric']}"


VERDICT_COLORS = {REGRESSED: "#d62728", IMPROVED: "#2ca02c", UNCHANGED: "#7f7f7f", INCONCLUSIVE: "#bbbbbb"}


def plot_forest(changes: pd.DataFrame, title: str = "NEW / BASE") -> Figure:
    """Every ratio NEW/BASE with its 95% interval, one line per point and metric, on a log axis;
    coloured by verdict, the ±tolerance band shaded around 1."""
    rows = changes.dropna(subset=["ratio"]).copy()
    rows = rows[np.isfinite(rows["ratio"].astype(float))]
    height = max(2.5, 0.22 * len(rows) + 1.5)
    fig = Figure(figsize=(9, height), layout="constrained", dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    if rows.empty:
        ax.text(0.5, 0.5, "no ratio to show: no point measured by both runs", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return fig
    rows["_order"] = rows["verdict"].map(VERDICT_ORDER)
    rows = rows.sort_values(["_order", "scenario", "metric"], kind="stable").iloc[::-1]
    ys = np.arange(len(rows))
    ratio = rows["ratio"].astype(float).to_numpy()
    low = rows["ci_low"].astype(float).fillna(rows["ratio"]).to_numpy()
    high = rows["ci_high"].astype(float).fillna(rows["ratio"]).to_numpy()
    colors = [VERDICT_COLORS.get(v, "#000000") for v in rows["verdict"]]
    ax.hlines(ys, low, high, colors=colors, linewidth=2)
    ax.scatter(ratio, ys, c=colors, zorder=3, s=18)
    ax.axvline(1.0, color="black", linewidth=1)
    ax.axvspan(1 / 1.1, 1.1, color="#999999", alpha=0.15, linewidth=0)
    ax.set_yticks(ys)
    ax.set_yticklabels([point_label(r) for _, r in rows.iterrows()], fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(f"ratio of medians {title} (log scale; dot: ratio, line: 95% interval; "
                  f"grey band: ±10% tolerance)")
    for verdict, color in VERDICT_COLORS.items():
        ax.scatter([], [], c=color, s=18, label=verdict)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(True, axis="x", which="both", alpha=0.3)
    return fig


def format_changes(changes: pd.DataFrame, only_changed: bool = False) -> pd.DataFrame:
    """The changes for reading: one line per point and metric, the ratio with its interval."""
    rows = changes if not only_changed else changes[changes["verdict"].isin([REGRESSED, IMPROVED])]
    out = pd.DataFrame({
        "point": [point_label(r) for _, r in rows.iterrows()],
        "base median": rows["base_median"].map(lambda v: f"{v:.4g}"),
        "new median": rows["new_median"].map(lambda v: f"{v:.4g}"),
        "NEW/BASE [95% CI]": [_ratio_text(r) for _, r in rows.iterrows()],
        "trials (base / new)": [f"{b} / {n}" for b, n in zip(rows["n_base"], rows["n_new"])],
        "verdict": rows["verdict"],
    })
    order = rows["verdict"].map(VERDICT_ORDER).to_numpy() if len(rows) else []
    return out.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)


def _ratio_text(row: Any) -> str:
    r, lo, hi = (float(row[c]) if not pd.isna(row[c]) else math.nan for c in ("ratio", "ci_low", "ci_high"))
    if math.isinf(r):
        return "∞ (was 0)"
    if math.isnan(r):
        return "?"
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


def write_html(out: Path, base: Run, new: Run, changes: pd.DataFrame) -> Path:
    """``out/index.html``: the forest plot, the metadata differences, the points that changed, every point."""
    out.mkdir(parents=True, exist_ok=True)
    counts = verdict_counts(changes)
    meta = metadata_differences(base.meta, new.meta)
    changed = format_changes(changes, only_changed=True)
    warn = "".join(f"<p class=warn><b>{side} run:</b> {html.escape(note)}</p>"
                   for side, run in (("BASE", base), ("NEW", new)) if (note := busy_note(run.meta)))
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>migfd compare</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:75em}} table{{border-collapse:collapse;font-size:90%}}
td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left}} .differs{{background:#fff3cd}}
.warn{{background:#f8d7da;padding:4px}}</style></head><body>
<h1>migfd compare</h1>
<p><b>BASE:</b> {html.escape(str(base.source))} ({base.kind})<br><b>NEW:</b> {html.escape(str(new.source))}
({new.kind})</p>
<p>{counts[REGRESSED]} regressed, {counts[IMPROVED]} improved, {counts[UNCHANGED]} unchanged,
{counts[INCONCLUSIVE]} inconclusive, of {len(changes)} comparisons (point × metric). A change is called only
when Welch's t on log times (Mann-Whitney for counts), adjusted across all comparisons (Benjamini-Hochberg),
is significant at 5%, the 95% interval of the ratio excludes 1, and the ratio is beyond ±10%; "unchanged"
means the whole interval lies within ±10%.</p>
{warn}
<h2>Ratios NEW/BASE</h2>
<img alt="forest plot of the ratios" src="{_figure_data_uri(plot_forest(changes))}">
<h2>What else differed</h2>
{meta.style.hide(axis="index").apply(lambda r: ["background:#fff3cd" if r["differs"] else ""] * len(r),
                                     axis=1).to_html()}
<h2>Points that changed</h2>
{changed.to_html(index=False) if len(changed) else "<p>none</p>"}
<h2>Every comparison</h2>
{format_changes(changes).to_html(index=False)}
</body></html>
"""
    index = out / "index.html"
    index.write_text(page, encoding="utf-8")
    return index


def _text_report(base: Run, new: Run, changes: pd.DataFrame) -> str:
    counts = verdict_counts(changes)
    only_base, only_new = unmatched_points(base.df, new.df)
    lines = [f"BASE {base.source} ({base.kind}, git {base.meta.get('git_revision', '?')})",
             f"NEW  {new.source} ({new.kind}, git {new.meta.get('git_revision', '?')})",
             f"{counts[REGRESSED]} regressed, {counts[IMPROVED]} improved, {counts[UNCHANGED]} unchanged, "
             f"{counts[INCONCLUSIVE]} inconclusive ({len(changes)} comparisons)"]
    if only_base or only_new:
        lines.append(f"not compared: {only_base} points only in BASE, {only_new} only in NEW")
    for side, run in (("BASE", base), ("NEW", new)):
        if note := busy_note(run.meta):
            lines.append(f"warning: {side}: {note}")
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
        only_base, only_new = unmatched_points(base.df, new.df)
        json.dump({"base": {**base.describe(), "points_not_in_the_other": only_base},
                   "new": {**new.describe(), "points_not_in_the_other": only_new},
                   "changes": changes_json(changes)}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_text_report(base, new, changes))
    return 0
