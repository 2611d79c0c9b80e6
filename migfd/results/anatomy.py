"""Downtime anatomy: where the milliseconds between the source's stop and the destination's run go.

The benchmark writes every trial's phases to ``timelines.csv`` (trial_id,
side, phase, start_ns, end_ns; ns from the source's stop). Phases nest and the
two sides overlap (the destination loads while the source still writes), so a
trial's downtime is *partitioned* before it is summed: at every instant of
[stop, resume] the time goes to the phase that started last among those
running, on either side (the innermost, most specific one), unless it only
waits for the other side (``wait-*``); instants no phase covers are
"unaccounted". The stacked bars show, per mode, the median of each
phase's share over the trials; the Gantt chart shows one whole trial.

The window runs to the guest's first progress as an outside observer saw it
(the ``observer`` side's ``first-progress``, migfd and QEMU alike) when the
trial has one, not only to the resume the destination reports: what sits
between the two is part of the outage, and the bars show it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from migfd.results.summary import fmt_bytes, fmt_ns, live_label, mode_label, qemu_downtime

TIMELINE_COLUMNS = ["trial_id", "side", "phase", "start_ns", "end_ns"]
UNACCOUNTED = "unaccounted"
SIDES = ("source", "destination", "observer")
#: The scenarios whose trials the anatomy explains, the first one the run has timelines of:
#: RAM + TAP + chardev (the three backends handed over together), else RAM + chardev, else
#: RAM alone (ram-size at its smallest size, live as the other two).
ANATOMY_SCENARIOS = ("tap-traffic", "chardev", "ram-size")

#: What a QEMU developer calls each step of the switchover, by (side, phase name or
#: prefix); the stacked bars sum phases by these groups, the Gantt chart shows them all.
PHASE_GROUPS: tuple[tuple[str, str, str], ...] = (
    ("source", "stop", "stop the guest"),
    ("source", "switchover-start", "RAM: last pages"),
    ("source", "iterable-save", "RAM: last pages"),
    ("destination", "load-ram", "RAM: last pages"),
    ("source", "save:ram", "RAM: last pages"),  # QEMU's RAM section, by its idstr
    ("destination", "load:ram", "RAM: last pages"),
    ("source", "fds-sent", "fds: send / receive"),
    ("destination", "fds-received", "fds: send / receive"),
    ("source", "save:", "device state: save"),
    ("source", "device-save", "device state: save"),
    ("destination", "recv", "device state: receive + parse"),
    ("destination", "parse", "device state: receive + parse"),
    ("destination", "load:", "device state: receive + parse"),
    ("destination", "post-load:", "backends: validate + adopt"),
    ("destination", "load-devices", "backends: validate + adopt"),
    ("source", "ping", "acknowledge: PING / PONG"),
    ("destination", "pong", "acknowledge: PING / PONG"),
    ("source", "commit", "acknowledge: PING / PONG"),
    ("source", "eof", "EOF + vmdesc"),
    ("source", "vmdesc", "EOF + vmdesc"),
    ("destination", "eof", "EOF + vmdesc"),
    ("destination", "load-vmdesc", "EOF + vmdesc"),
    ("destination", "resume", "resume the guest"),
    # real QEMU's trace (migfd.peers.qemu_trace)
    ("destination", "loadvm", "device state: receive + parse"),
    ("source", "completion", "EOF + vmdesc"),
    ("destination", "bh-wait", "resume the guest"),
    ("destination", "announce", "resume the guest"),
    ("destination", "vm-start", "resume the guest"),
    # the outside observer (migfd.peers.observe): the guest's silence, where nothing else explains it
    ("observer", "guest-outage", "guest not running yet (observer)"),
)


def load_timelines(results: str | os.PathLike) -> pd.DataFrame:
    """``timelines.csv`` of a results directory; an empty table when the run has none."""
    path = Path(results)
    path = path if path.name == "timelines.csv" else (path if path.is_dir() else path.parent) / "timelines.csv"
    if not path.is_file():
        return pd.DataFrame(columns=TIMELINE_COLUMNS)
    out = pd.read_csv(path, dtype={"trial_id": str, "side": str, "phase": str})
    for col in ("start_ns", "end_ns"):
        out[col] = pd.to_numeric(out[col], errors="coerce").astype("int64")
    return out[TIMELINE_COLUMNS]


def downtime_of(rows: pd.DataFrame) -> pd.Series:
    """Each row's guest pause in ns, measured from the source's stop to the destination's run."""
    if rows.empty:
        return pd.Series(dtype="float64")
    qemu = rows["mode"].astype(str).str.startswith("qemu-")
    own = pd.to_numeric(rows["downtime_ns"], errors="coerce").astype("float64")
    if qemu.any():
        own = own.where(~qemu, qemu_downtime(rows[qemu]).reindex(rows.index))
    return own


def partition(phases: pd.DataFrame, end_ns: float, start_ns: float = 0.0) -> dict[str, float]:
    """ns of [start_ns, end_ns] per "side: phase", each instant to the innermost running phase.

    The innermost is the one that started last (ties: the one that ends
    first); a phase that only waits for the other side (``wait-*``), or runs
    beside the switchover (:data:`BACKGROUND_PHASES`), counts only where no
    phase doing work runs. What no phase covers is
    :data:`UNACCOUNTED`.
    """
    if not end_ns > start_ns:
        return {}
    spans = [(max(float(r.start_ns), start_ns), min(float(r.end_ns), end_ns), float(r.start_ns),
              float(r.end_ns), f"{r.side}: {r.phase}") for r in phases.itertuples()]
    spans = [s for s in spans if s[1] > s[0]]
    cuts = sorted({start_ns, end_ns, *(s[0] for s in spans), *(s[1] for s in spans)})
    out: dict[str, float] = {}
    for a, b in zip(cuts, cuts[1:]):
        running = [s for s in spans if s[0] <= a and s[1] >= b]
        if running:
            # A phase that only waits for the other side yields to any phase doing work.
            label = max(running, key=lambda s: (not _waits(s[4]), s[2], -s[3]))[4]
        else:
            label = UNACCOUNTED
        out[label] = out.get(label, 0.0) + (b - a)
    return out


def covered_fraction(phases: pd.DataFrame, end_ns: float, start_ns: float = 0.0) -> float:
    """Share of [start_ns, end_ns] that some phase covers (1.0: the timeline explains it all)."""
    parts = partition(phases, end_ns, start_ns)
    total = sum(parts.values())
    return float("nan") if total <= 0 else 1.0 - parts.get(UNACCOUNTED, 0.0) / total


def series_of(rows: pd.DataFrame) -> pd.Series:
    """What a bar stands for: migfd's mode, or real QEMU's version, mode and variant."""
    def one(row) -> str:
        mode = str(row["mode"])
        if not mode.startswith("qemu-"):
            return mode_label(mode)
        version = row.get("peer_version")
        variant = row.get("variant")
        accel = row.get("accel")
        what = mode_label(mode).removeprefix("real QEMU, ")
        text = (f"QEMU {version if isinstance(version, str) and version else '?'}"
                + (f" {accel.upper()}" if isinstance(accel, str) and accel else "") + f": {what}")
        return text + (f" ({variant})" if isinstance(variant, str) and variant else "")
    return rows.apply(one, axis=1) if len(rows) else pd.Series(dtype=str)


def window_end_ns(phases: pd.DataFrame, downtime_ns: float) -> float:
    """Where the guest runs again on the trial's own clock: its first progress as the observer saw
    it, and no earlier than the resume reported (QEMU: its RESUME event, if its trace has it).

    QEMU's timeline starts at ``src-downtime-start``, a little before its STOP
    event, so STOP→RESUME measured from 0 would end too early.
    """
    end = reported_end_ns(phases, downtime_ns)
    first = phases[(phases["side"] == "observer") & (phases["phase"] == "first-progress")]
    return max(end, float(first["start_ns"].iloc[0])) if len(first) else end


def reported_end_ns(phases: pd.DataFrame, downtime_ns: float) -> float:
    """Where the downtime the VMs report ends (QEMU: its RESUME event), whatever the observer saw."""
    resume = phases[(phases["side"] == "destination") & (phases["phase"] == "RESUME")]
    return float(resume["start_ns"].iloc[0]) if len(resume) else float(downtime_ns)


def trial_anatomy(df: pd.DataFrame, timelines: pd.DataFrame,
                  series_by: Callable[[pd.DataFrame], pd.Series] = series_of) -> pd.DataFrame:
    """One row per trial and phase share of its downtime: trial_id, series, label, ns, downtime_ns;
    ``series_by`` names each row's series (default :func:`series_of`)."""
    cols = ["trial_id", "series", "label", "ns", "downtime_ns"]
    if timelines.empty or "trial_id" not in df or df.empty:
        return pd.DataFrame(columns=cols)
    ok = df[df["ok"].fillna(False).astype(bool)]
    downtime = downtime_of(ok)
    series = series_by(ok)
    by_trial = {tid: g for tid, g in timelines.groupby("trial_id")}
    rows = []
    for idx, row in ok.iterrows():
        phases = by_trial.get(str(row["trial_id"]))
        if phases is None or not np.isfinite(downtime.get(idx, np.nan)):
            continue
        end = window_end_ns(phases, downtime[idx])
        for label, ns in partition(phases, end).items():
            rows.append((str(row["trial_id"]), series[idx], label, ns, float(downtime[idx])))
    return pd.DataFrame(rows, columns=cols)


def phase_group(label: str) -> str:
    """The group of a "side: phase" label (:data:`PHASE_GROUPS`); waits and unknown phases keep their label."""
    side, _, phase = label.partition(": ")
    if phase.startswith("wait-"):
        return "waiting for the other side"
    for group_side, name, group in PHASE_GROUPS:
        if side == group_side and (phase == name or (name.endswith(":") and phase.startswith(name))):
            return group
    return label


def anatomy_table(df: pd.DataFrame, timelines: pd.DataFrame, *, grouped: bool = False,
                  series_by: Callable[[pd.DataFrame], pd.Series] = series_of) -> pd.DataFrame:
    """Median ns per series and phase (phases absent from a trial count as 0 in it), with trial counts.

    ``grouped``: phases summed by :func:`phase_group` within each trial first.
    """
    parts = trial_anatomy(df, timelines, series_by)
    if grouped:
        parts = parts.assign(label=parts["label"].map(phase_group))
    if parts.empty:
        return pd.DataFrame(columns=["series", "label", "median_ns", "n"])
    wide = parts.pivot_table(index=["series", "trial_id"], columns="label", values="ns",
                             aggfunc="sum", fill_value=0.0)
    out = []
    for series, g in wide.groupby(level="series"):
        for label in wide.columns:
            out.append({"series": series, "label": label, "median_ns": float(np.median(g[label])),
                        "n": int(len(g))})
    table = pd.DataFrame(out)
    return table[table["median_ns"] > 0].reset_index(drop=True)


def anatomy_scenario(df: pd.DataFrame, timelines: pd.DataFrame | None) -> str:
    """The first of :data:`ANATOMY_SCENARIOS` with a successful trial that has a timeline (else the first)."""
    if timelines is not None and len(timelines) and "trial_id" in df:
        timed = df["trial_id"].astype(str).isin(set(timelines["trial_id"])) & df["ok"].fillna(False).astype(bool)
        for scenario in ANATOMY_SCENARIOS:
            if (timed & (df["scenario"] == scenario)).any():
                return scenario
    return ANATOMY_SCENARIOS[0]


def anatomy_rows(df: pd.DataFrame, timelines: pd.DataFrame | None = None) -> pd.DataFrame:
    """The rows the anatomy explains: one point of :func:`anatomy_scenario`, and real QEMU's beside them.

    The point is the scenario's smallest RAM size, live where it has live
    trials (as tap-traffic and chardev are); QEMU at that RAM size and with
    RAM full of data (variant ``filled``) where the run has it, so that no
    zero page flatters it.
    """
    rows = df[df["scenario"] == anatomy_scenario(df, timelines)]
    sizes = rows["ram_bytes"].dropna()
    if len(sizes):
        rows = rows[rows["ram_bytes"] == sizes.min()]
    live = rows["live"] == True if "live" in rows else pd.Series(False, index=rows.index)  # noqa: E712
    if live.any():
        rows = rows[live]
    qemu = df[df["scenario"] == "qemu-peer"]
    if len(qemu):
        if len(sizes) and (qemu["ram_bytes"] == sizes.min()).any():
            qemu = qemu[qemu["ram_bytes"] == sizes.min()]
        if "variant" in qemu and (qemu["variant"] == "filled").any():
            qemu = qemu[qemu["variant"] == "filled"]
    return pd.concat([rows, qemu])


def describe_point(rows: pd.DataFrame) -> str:
    """'tap-traffic: ram+tap+chardev, 64 MiB, live': which migrations the anatomy explains."""
    own = rows[rows["scenario"] != "qemu-peer"]
    if own.empty:
        return "no migfd trials"
    backend = next((b for b in own.get("backend", pd.Series(dtype=str)).dropna() if b), "?")
    live = {live_label(v) for v in own.get("live", [])} - {""}
    return (f"{own['scenario'].iloc[0]}: {backend}, {fmt_bytes(float(own['ram_bytes'].min()))}"
            + (f", {', '.join(sorted(live))}" if live else ""))


def plot_anatomy(df: pd.DataFrame, timelines: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """Stacked bars: median ns per phase of the downtime, one bar per mode; beside them, the shares."""
    rows = anatomy_rows(df, timelines)
    table = anatomy_table(rows, timelines, grouped=True)
    fig = Figure(figsize=(11, 2.6 + 0.7 * max(table["series"].nunique(), 1)), layout="constrained", dpi=100)
    ax_abs, ax_rel = fig.subplots(1, 2, sharey=True, width_ratios=[3, 2])
    if table.empty:
        ax_abs.text(0.5, 0.5, "no timelines in this run (timelines.csv)", ha="center", va="center",
                    transform=ax_abs.transAxes)
        ax_abs.set_axis_off()
        ax_rel.set_axis_off()
        return fig
    modes = sorted(table["series"].unique(), key=_series_key)
    labels = _group_order(table, rows, timelines)
    colors = _group_colors(labels)
    drawn: set[str] = set()
    for i, mode in enumerate(modes):
        sub = table[table["series"] == mode].set_index("label")
        total = float(sub["median_ns"].sum())
        left = 0.0
        for label in labels:
            if label not in sub.index:
                continue
            ns = float(sub.loc[label, "median_ns"])
            legend = label if label not in drawn else None
            drawn.add(label)
            ax_abs.barh(i, ns / 1e6, left=left / 1e6, color=colors[label], edgecolor="0.3",
                        linewidth=0.4, label=legend)
            ax_rel.barh(i, 100 * ns / total, left=100 * left / total, color=colors[label],
                        edgecolor="0.3", linewidth=0.4)
            left += ns
        ax_abs.text(left / 1e6, i, f"  {fmt_ns(left)} (n={int(sub['n'].iloc[0])})", va="center", fontsize=8)
    ax_abs.set_yticks(range(len(modes)), modes)
    ax_abs.invert_yaxis()
    ax_abs.set_xlabel("ms from the source's stop to the guest's first progress (sum of the median share of "
                      "each phase)")
    ax_rel.set_xlabel("% of the bar")
    ax_rel.set_xlim(0, 100)
    fig.suptitle(f"Where the outage goes ({describe_point(rows)}): stop → first guest progress, each instant "
                 "to the innermost running phase, summed by step; bars are sums of per-step medians", fontsize=10)
    fig.legend(loc="outside lower center", ncols=3, fontsize=7, frameon=False)
    return fig


def median_trial(df: pd.DataFrame, timelines: pd.DataFrame, series: str) -> str | None:
    """The trial of ``series`` (in the anatomy rows) whose downtime is the median one, among those with a timeline."""
    rows = anatomy_rows(df, timelines)
    rows = rows[rows["ok"].fillna(False).astype(bool) & rows["trial_id"].astype(str).isin(set(timelines["trial_id"]))]
    rows = rows[series_of(rows) == series] if len(rows) else rows
    if rows.empty:
        return None
    downtime = downtime_of(rows).dropna().sort_values()
    if downtime.empty:
        return None
    return str(rows.loc[downtime.index[(len(downtime) - 1) // 2], "trial_id"])


def gantt_trials(df: pd.DataFrame, timelines: pd.DataFrame) -> dict[str, str]:
    """The trial :func:`plot_gantt` shows of each series (its :func:`median_trial`), in the figure's order."""
    rows = anatomy_rows(df, timelines)
    found = {m: median_trial(df, timelines, m) for m in series_of(rows).unique()}
    return {m: found[m] for m in sorted(found, key=_series_key) if found[m] is not None}


def plot_gantt(df: pd.DataFrame, timelines: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """One trial per mode (its median-downtime trial): source and destination lanes of phases."""
    shown = gantt_trials(df, timelines)
    modes = list(shown)
    rows = anatomy_rows(df, timelines)
    fig = Figure(figsize=(10, 1.4 + 1.6 * max(len(modes), 1)), layout="constrained", dpi=100)
    if not modes:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no timelines in this run (timelines.csv)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    axes = fig.subplots(len(modes), 1, squeeze=False)[:, 0]
    groups = _group_order(anatomy_table(rows, timelines, grouped=True), rows, timelines)
    colors = _group_colors(groups)
    for ax, mode in zip(axes, modes):
        tid = shown[mode]
        phases = timelines[timelines["trial_id"] == tid]
        row = df[df["trial_id"].astype(str) == tid]
        reported = reported_end_ns(phases, float(downtime_of(row).iloc[0]))
        downtime = window_end_ns(phases, float(downtime_of(row).iloc[0]))
        # The window is the outage with a margin: setup, precopy and the
        # source's release run for far longer and would squeeze it to a sliver.
        lo, hi = -0.15 * downtime / 1e6, 1.3 * downtime / 1e6
        min_label_ms = 0.05 * (hi - lo)
        for lane, side in enumerate(SIDES):
            side_phases = phases[phases["side"] == side].sort_values(["start_ns", "end_ns"])
            for depth, p in _depths(side_phases):
                label = f"{side}: {p.phase}"
                width = max((p.end_ns - p.start_ns) / 1e6, 0.0)
                ax.broken_barh([(p.start_ns / 1e6, width)], (lane + depth * 0.12 - 0.35, 0.7 - depth * 0.24),
                               facecolors=colors.get(phase_group(label), "0.5"), edgecolors="0.3",
                               linewidth=0.3)
                start = max(p.start_ns / 1e6, lo)
                if depth == 0 and min(p.end_ns / 1e6, hi) - start >= min_label_ms:
                    ax.text(start, lane - 0.4, p.phase, fontsize=6, va="bottom", clip_on=True)
        ax.axvspan(0, reported / 1e6, color="0.9", zorder=0)
        if downtime > reported:
            ax.axvspan(reported / 1e6, downtime / 1e6, color="#f8d7da", zorder=0)
        ax.axvline(0, color="black", lw=0.8)
        ax.axvline(reported / 1e6, color="black", lw=0.8, ls="--")
        ax.set_xlim(lo, hi)
        ax.set_yticks(range(len(SIDES)), list(SIDES))
        ax.set_ylim(len(SIDES) - 0.4, -0.8)
        observed = (f"; the guest ran again at {fmt_ns(downtime)} as the observer saw it (red: after the "
                    "reported resume)" if downtime > reported else "")
        ax.set_title(f"{mode}: trial {tid}, downtime reported {fmt_ns(reported)} (grey){observed}", fontsize=9,
                     loc="left")
    axes[-1].set_xlabel("ms from the source's stop (phases before and after the window are cut; "
                        "colours as in the anatomy bars)")
    return fig


# -- helpers -------------------------------------------------------------------------


def _series_key(series: str) -> tuple[int, str]:
    order = [mode_label("fd-passing"), mode_label("state-copy")]
    return (order.index(series) if series in order else 2, series)


#: phases that run beside the switchover without being part of it: the source's release of its
#: backends comes after the migration ended, at SCHED_IDLE; it claims only the time nothing else explains
BACKGROUND_PHASES = ("source: release",)


def _waits(label: str) -> bool:
    return label.split(": ", 1)[-1].startswith("wait-") or label in BACKGROUND_PHASES


def _group_order(table: pd.DataFrame, rows: pd.DataFrame, timelines: pd.DataFrame) -> list[str]:
    """Groups in the order they start (median over the trials), waiting and unaccounted last."""
    ids = set(rows["trial_id"].astype(str)) if "trial_id" in rows else set()
    t = timelines[timelines["trial_id"].isin(ids)]
    starts = (t.assign(group=(t["side"] + ": " + t["phase"]).map(phase_group))
              .groupby("group")["start_ns"].median())
    last = ("waiting for the other side", UNACCOUNTED)
    present = list(dict.fromkeys(table["label"]))
    ordered = sorted((g for g in present if g not in last), key=lambda g: starts.get(g, float("inf")))
    return ordered + [g for g in last if g in present]


def _group_colors(labels: list[str]) -> dict[str, object]:
    cmap = matplotlib.colormaps["tab20"]
    out: dict[str, object] = {}
    for i, lbl in enumerate(lbl for lbl in labels if lbl not in ("waiting for the other side", UNACCOUNTED)):
        out[lbl] = cmap(i % 20)
    out["waiting for the other side"] = "0.8"
    out[UNACCOUNTED] = "white"
    return out


def _depths(phases: pd.DataFrame):
    """(nesting depth, phase) for phases sorted by start: depth = how many earlier phases still run."""
    open_ends: list[float] = []
    for p in phases.itertuples():
        open_ends = [e for e in open_ends if e > p.start_ns]
        yield min(len(open_ends), 2), p
        open_ends.append(p.end_ns)
