"""The figures of the notebooks and the report, drawn with matplotlib from one run's rows.

Each function takes the run's table (and metadata, to say why something is
missing) and returns a Figure: medians with the 95% confidence interval of
each median as error bars (the light band behind is the p5–p95 spread of
the trials), or every trial as a dot with its median and that median's
interval, with the floors measured in the same run drawn beside them.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

from migfd.results.describe import scenario_info, why_absent
from migfd.results.load import select
from migfd.results.summary import (
    MODE_LABELS,
    floor_median,
    fmt_bytes,
    fmt_ns,
    fmt_rate,
    is_live,
    live_label,
    mode_label,
    qemu_downtime,
    qemu_has_events,
    slope_per_fd,
    summarize,
    throughput,
)
from migfd.stats import median_ci
from migfd.units import GiB, MiB

#: One colour per mode in every figure (their names: summary.MODE_LABELS); floors are black.
MODE_COLORS = {
    "fd-passing": "#1f77b4",
    "state-copy": "#d62728",
    "qemu-ram-copied": "#7f7f7f",
    "qemu-ram-shared": "#8c564b",
    "qemu-cpr-transfer": "#9467bd",
}
OTHER_MODE_COLOR = "#17becf"
#: real QEMU's modes in a legend entry
QEMU_SHORT = {"qemu-ram-copied": "RAM copied", "qemu-ram-shared": "RAM shared", "qemu-cpr-transfer": "cpr-transfer"}
FLOOR_COLOR = "black"


def mode_color(mode: str) -> str:
    return MODE_COLORS.get(mode, OTHER_MODE_COLOR)


def _mode_order(mode: str) -> int:
    """Modes in the order of MODE_LABELS, unknown ones last."""
    return list(MODE_LABELS).index(mode) if mode in MODE_LABELS else 99


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


def _ci_yerr(pts: pd.DataFrame, scale: float) -> np.ndarray:
    """Error bars from each median to the bounds of its 95% interval (none where it has none)."""
    med = pts["median"].to_numpy(dtype=float) / scale
    low = pts["ci_low"].to_numpy(dtype=float) / scale
    high = pts["ci_high"].to_numpy(dtype=float) / scale
    return np.nan_to_num(np.vstack([med - low, high - med]), nan=0.0)


def _draw_series(ax, pts: pd.DataFrame, x: str, label: str, color: str, *, dashed: bool = False,
                 marker: str = "o", scale: float = 1e6, linestyle: str | None = None,
                 alpha: float = 1.0) -> None:
    """Medians joined by a line with their 95% intervals as error bars, the p5–p95 spread of the
    trials as a light band; points with no successful trial left out."""
    pts = pts[pts["n"] > 0].sort_values(x)
    if pts.empty:
        return
    xs = pts[x].astype(float).to_numpy()
    ax.errorbar(xs, pts["median"] / scale, yerr=_ci_yerr(pts, scale), capsize=3,
                linestyle=linestyle or ("--" if dashed else "-"), marker=marker,
                color=color, alpha=alpha, markerfacecolor="white" if dashed else color,
                label=_series_label(label, pts))
    ax.fill_between(xs, pts["p5"] / scale, pts["p95"] / scale, color=color, alpha=0.08, linewidth=0)


def _binary_ticks(ax, values: Iterable[float], fmt) -> None:
    vals = sorted({float(v) for v in values if not pd.isna(v)})
    if not vals:
        return
    ax.xaxis.set_major_locator(FixedLocator(vals))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt(v)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())


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
    return f"floor not drawn: {why_absent(df, metadata, 'limits', variant + ' measurement')}"


def plot_downtime_vs_ram(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """Downtime and total time against guest RAM size, per mode, live and non-live; log–log.

    Medians with p5–p95 bands; real QEMU (qemu-peer) beside migfd when it ran.
    Floors, from the same run's limits: all RAM through AF_UNIX at the measured
    raw throughput (what a state copy cannot beat), and the raw handover of
    the same fds and device state (what fd-passing cannot beat).
    """
    fig, (ax_down, ax_outage, ax_total) = _figure(3, width=5.2, height=5.8)
    rows = df[df["scenario"].isin(["ram-size", "qemu-peer"])]
    if rows.empty or not rows["ok"].fillna(False).astype(bool).any():
        why = why_absent(df, metadata, "ram-size", "successful trials")
        for ax in (ax_down, ax_outage, ax_total):
            _no_data(ax, why)
        fig.suptitle("Downtime vs guest RAM size: no data")
        return fig
    sizes = rows["ram_bytes"].dropna().unique()
    qemu = rows["scenario"] == "qemu-peer"
    rows = rows.assign(_downtime=rows["downtime_ns"].astype("float64"))
    rows.loc[qemu, "_downtime"] = qemu_downtime(rows[qemu])
    events = qemu_has_events(rows[qemu])
    panels = [(ax_down, "_downtime", "downtime"), (ax_outage, "outage_ns", "outage"), (ax_total, "total_ns", "total time")]
    if not rows["outage_ns"].notna().any():
        _no_data(ax_outage, "no outage in this run: it is older than the guest-progress observer")
        panels.pop(1)
    for ax, metric, what in panels:
        pts_all = summarize(rows, metric)
        # one series per point kind: a QEMU version, its accelerator and a variant (filled/idle RAM)
        # are series of their own
        for (scenario, mode, variant, version, accel, live), pts in pts_all.groupby(
                ["scenario", "mode", "variant", "peer_version", "accel", "live"], dropna=False):
            live_text = live_label(live)
            label = mode_label(mode)
            if scenario == "qemu-peer":
                # short: the legend holds a dozen QEMU series; the title says how QEMU is timed
                label = f"QEMU {version or '?'}{' ' + accel.upper() if accel else ''} {QEMU_SHORT.get(mode, mode)}"
            label += (f" ({variant})" if variant else "") + (f", {live_text}" if live_text and scenario != "qemu-peer" else "")
            if scenario == "qemu-peer":
                same = (rows["mode"] == mode) & (rows["variant"] == variant) & (rows["peer_version"] == version)
                if not (metric == "_downtime" and events):
                    label += _resolution_note(rows[same][metric])
                marker = "D" if str(version).startswith("7.") or not version else "v"
                if accel == "tcg":
                    marker = "x"
            else:
                marker = "s" if is_live(live) is False else "o"
            _draw_series(ax, pts, "ram_bytes", label, mode_color(mode), marker=marker,
                         dashed=is_live(live) is False or variant == "idle")
        # floor 1: all of RAM through the raw socket, at the rate measured at each size where
        # there is one; measured at one size only, that rate drawn across (and the label says so)
        rates = select(df, "limits", variant="unix-throughput").groupby("ram_bytes")["value"].median()
        rate = floor_median(df, "unix-throughput")
        if len(rates) > 1:
            xs = rates.index.to_numpy(dtype=float)
            ax.plot(xs, xs / rates.to_numpy(dtype=float) * 1e3, color=FLOOR_COLOR, linestyle=":", linewidth=1.5,
                    marker=".", label="floor: all RAM through AF_UNIX at the rate measured at that size (limits)")
        elif len(rates) == 1 and len(sizes):
            xs = np.array(sorted(float(s) for s in sizes))
            ax.plot(xs, xs / rate * 1e3, color=FLOOR_COLOR, linestyle=":", linewidth=1.5,
                    label=f"floor: all RAM through AF_UNIX at {fmt_rate(rate)} "
                          f"(limits, measured at {fmt_bytes(float(rates.index[0]))})")
        # floor 2: the raw handover of the fds and device state
        hand = select(df, "limits", variant="handover-floor")["total_ns"].astype("float64").dropna()
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
    ax_down.set_title("Downtime as the VMs report it" + ("\n(QEMU: its STOP → RESUME events)" if events else ""),
                      fontsize=10)
    ax_outage.set_title("Outage seen from outside\n(last guest progress → first again)", fontsize=10)
    ax_total.set_title("Total time (migrate issued → completed)", fontsize=10)
    _fig_legend(fig, ax_down, 3)
    fig.suptitle("fd-passing vs state copy against guest RAM size — lines: medians with 95% intervals (bars), "
                 "light bands: p5–p95 of trials; dashed/hollow: non-live (guest stopped first)", fontsize=10)
    return fig


def plot_downtime_vs_fds(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """Downtime against the number of handed-over fds: batched, unbatched, and batched before the
    stop (x-early-fds, whose switchover carries no fd); log–log.

    The floor is the raw round trip of passing the same number of fds between
    two processes, batched (limits: fd-roundtrip); each legend entry gives the
    fitted cost of one more fd.
    """
    fig, (ax,) = _figure(1, width=8, height=5)
    if not _fd_count_panel(ax, df, metadata):
        fig.suptitle("Downtime vs handed-over fds: no data")
        return fig
    _fig_legend(fig, ax, ncols=1)
    ax.set_title("Downtime vs number of handed-over fds: batched, one fd per sendmsg, sent before the stop\n"
                 "lines: medians with 95% intervals (bars), light bands: p5–p95; "
                 "per-fd cost = least-squares slope of the medians", fontsize=10)
    return fig


def _fd_count_panel(ax, df: pd.DataFrame, metadata: dict | None, mode: str | None = None) -> bool:
    """fd-count's downtime per fd count (of ``mode``, default every mode) beside the raw fd round trip,
    each labelled with its least-squares cost of one more fd; log–log. False (and a no-data note) when
    the run has no successful fd-count trial."""
    rows = select(df, "fd-count", mode, ok=None)
    if rows.empty or not rows["ok"].fillna(False).astype(bool).any():
        _no_data(ax, why_absent(df, metadata, "fd-count", "successful trials"))
        return False
    styles = {"batched": ("o", False), "unbatched": ("s", True), "early-fds": ("D", False),
              "batched-253": ("v", False)}
    shades = {"batched": 1.0, "unbatched": 0.6}
    for (m, variant), g in rows.groupby(["mode", "variant"], dropna=False):
        pts = summarize(g)
        marker, dashed = styles.get(variant, ("^", False))
        slope = slope_per_fd(pts[pts["n"] > 0])
        label = mode_label(m) + (f", {variant}" if variant else "")
        if not math.isnan(slope):
            label += f": {fmt_ns(slope)}/fd"
        _draw_series(ax, pts, "n_fds", label, mode_color(m), dashed=dashed, marker=marker,
                     alpha=shades.get(variant, 1.0))
    floor = summarize(select(df, "limits", variant="fd-roundtrip", ok=None), metric="total_ns")
    floor = floor[floor["n"] > 0]
    label = f"floor: raw fd round trip, batched: {fmt_ns(slope_per_fd(floor))}/fd (limits)" if len(floor) else ""
    _floor_series(ax, df, metadata, floor, "n_fds", "fd-roundtrip", label, marker=".", linestyle=":")
    _log_log(ax, pd.concat([rows["n_fds"], floor["n_fds"]]), lambda v: f"{v:.0f}",
             "fds of the VM's backends, handed over with fd-passing (count, log scale)", "downtime (ms, log scale)")
    return True


def _floor_series(ax, df: pd.DataFrame, metadata: dict | None, floor: pd.DataFrame, x: str, variant: str,
                  label: str, **style) -> None:
    """A floor's medians (limits rows of ``variant``, summarized), or a note why the run has none."""
    if not floor.empty:
        _draw_series(ax, floor, x, label, FLOOR_COLOR, **style)
    else:
        ax.text(0.01, 0.01, _floor_note(df, metadata, variant), transform=ax.transAxes,
                fontsize=7, color="#444444")


def _log_log(ax, xs: pd.Series, fmt, xlabel: str, ylabel: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _binary_ticks(ax, xs.dropna(), fmt)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)


def _per_byte(pts: pd.DataFrame) -> str:
    """': 1.2 ms/MiB = 0.81 GiB/s', the least-squares slope of time against bytes; '' below two sizes."""
    slope = slope_per_fd(pts[pts["n"] > 0], x="ram_bytes")
    return "" if not slope > 0 else f": {fmt_ns(slope * MiB)}/MiB = {fmt_rate(1e9 / slope)}"


def _copy_time_panel(ax, df: pd.DataFrame, metadata: dict | None) -> bool:
    """ram-size's state-copy time per RAM size beside the time the raw AF_UNIX floor takes for the same
    bytes, each labelled with its per-byte slope; log–log. Non-live copies (downtime: the copy alone);
    live ones (total time) only in a run without non-live ones."""
    rows = select(df, "ram-size", "state-copy", ok=None)
    nonlive = rows[rows["live"] == False]  # noqa: E712 (nullable boolean)
    good = lambda r: r["ok"].fillna(False).astype(bool).any()  # noqa: E731
    rows, metric, what = ((nonlive, "downtime_ns", "non-live, downtime") if good(nonlive) else
                          (rows, "total_ns", "live, total time"))
    if rows.empty or not good(rows):
        _no_data(ax, why_absent(df, metadata, "ram-size", "successful state-copy trials"))
        return False
    pts = summarize(rows, metric)
    _draw_series(ax, pts, "ram_bytes", f"state copy, {what}{_per_byte(pts)}", mode_color("state-copy"),
                 dashed=True, marker="s")
    floor_rows = select(df, "limits", variant="unix-throughput", ok=None)
    floor_rows = floor_rows.assign(floor_ns=floor_rows["ram_bytes"].astype("float64")
                                   / floor_rows["value"].astype("float64") * 1e9)
    floor = summarize(floor_rows, "floor_ns")
    floor = floor[floor["n"] > 0]
    _floor_series(ax, df, metadata, floor, "ram_bytes", "unix-throughput",
                  f"floor: the same bytes through raw AF_UNIX{_per_byte(floor)} (limits)", marker="D", linestyle="-.")
    _log_log(ax, pd.concat([rows["ram_bytes"], floor["ram_bytes"]]), fmt_bytes,
             "guest RAM size (floor: bytes moved; log scale)", "time (ms, log scale)")
    return True


def plot_slopes(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """The per-fd and per-byte slopes next to their floors (issue 9): fd-passing's downtime per fd
    (batched and unbatched) beside the raw fd round trip; state copy's time per byte beside raw AF_UNIX.

    Medians with their 95% intervals; each legend entry gives the least-squares
    slope of its medians. A panel whose rows the run lacks says why.
    """
    fig, (left, right) = _figure(2, width=6.5, height=5)
    has_fds = _fd_count_panel(left, df, metadata, "fd-passing")
    left.set_title("one more fd: fd-passing vs the raw round trip", fontsize=10)
    has_bytes = _copy_time_panel(right, df, metadata)
    right.set_title("one more byte: state copy vs raw AF_UNIX", fontsize=10)
    if has_fds or has_bytes:
        _fig_legend(fig, left, 1, right)
    fig.suptitle("Per-fd and per-byte slopes next to their floors (the same run): medians with 95% intervals, "
                 "slopes fitted by least squares", fontsize=10)
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
        _median_bar(ax, i, 0.3, vals, color)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([g[0] for g in groups], fontsize=8)
    ax.set_xlim(-0.6, len(groups) - 0.4)


def _median_bar(ax, x: float, half: float, vals: np.ndarray, color: str) -> None:
    """The median as a bar across a column of dots, its 95% interval as a capped line at its right end."""
    if not len(vals):
        return
    ci = median_ci(vals)
    ax.hlines(ci.value, x - half, x + half, color=color, linewidth=2.5, zorder=4)
    if ci.known:
        ax.errorbar([x + half], [ci.value], yerr=[[ci.value - ci.low], [ci.high - ci.value]], fmt="none",
                    ecolor=color, capsize=3, linewidth=1.5, zorder=4)


def _mode_groups(rows: pd.DataFrame, column: str, *, counts: bool = False) -> list[tuple[str, np.ndarray, str]]:
    """Per mode: a label with its trial counts, the values of ``column``, the mode's colour.

    Times come from successful trials only (the label says how many failed);
    ``counts`` (frames or lines lost) come from every trial that has them:
    what a failed trial lost is lost too, and is shown.
    """
    out = []
    for mode in sorted(set(rows["mode"]), key=_mode_order):
        r = rows[rows["mode"] == mode]
        ok = r["ok"].fillna(False).astype(bool)
        failed = int((~ok).sum())
        use = r if counts else r[ok]
        label = f"{mode_label(mode)}\n(n={int(ok.sum())}"
        if failed:
            label += f", {failed} failed: counted)" if counts else f", {failed} failed not shown)"
        else:
            label += ")"
        out.append((label, use[column].astype("float64").dropna().to_numpy(), mode_color(mode)))
    return out


def _handover_floor_line(ax, df: pd.DataFrame, metadata: dict | None, scale: float) -> None:
    hand = select(df, "limits", variant="handover-floor")["total_ns"].astype("float64").dropna()
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
            _median_bar(ax, i + off, 0.1, vals, color)
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


def _rows_or_no_data(fig: Figure, axes, df: pd.DataFrame, metadata: dict | None, scenario: str,
                     title: str) -> pd.DataFrame | None:
    """The scenario's rows (failed ones too), or None after saying on every axis why there are none."""
    rows = select(df, scenario, ok=None)
    if rows.empty or not rows["ok"].fillna(False).astype(bool).any():
        why = why_absent(df, metadata, scenario, "successful trials")
        for ax in axes:
            _no_data(ax, why)
        fig.suptitle(f"{title}: no data")
        return None
    return rows


def _gap_panel(ax, rows: pd.DataFrame, df: pd.DataFrame, metadata: dict | None, ylabel: str, title: str) -> None:
    """Every trial's longest silence (max_gap_ns) per mode, on a log axis beside the handover floor."""
    _strip(ax, _mode_groups(rows, "max_gap_ns"), scale=1e6, log=True)
    _handover_floor_line(ax, df, metadata, 1e6)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)


def plot_packet_loss(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """TAP traffic through a migration: frames lost/duplicated and the longest gap, per mode.

    Every trial is a dot, the bar is the median. Counts are on a linear axis
    from 0 (the target is 0); the gap is on a log axis beside the raw
    handover floor (limits).
    """
    fig, (ax_lost, ax_gap) = _figure(2, width=6, height=4.6)
    rows = _rows_or_no_data(fig, (ax_lost, ax_gap), df, metadata, "tap-traffic", "Frames under TAP traffic")
    if rows is None:
        return fig
    good = rows[rows["ok"].fillna(False).astype(bool)]
    _paired_counts(ax_lost, _mode_groups(rows, "frames_lost", counts=True),
                   _mode_groups(rows, "frames_duplicated", counts=True),
                   "lost", "duplicated", ("frames lost", "frames duplicated"))
    ax_lost.axhline(0, color=FLOOR_COLOR, linestyle="-.", linewidth=1.2, label="target: 0 lost, 0 duplicated")
    ax_lost.set_ylabel("frames per trial (count, linear)")
    sent = good["frames_sent"].astype("float64").dropna()
    ax_lost.set_title(f"Frames lost (filled) and duplicated (hollow)\n"
                      f"of ~{np.median(sent):,.0f} frames sent per trial (median)" if len(sent) else
                      "Frames lost (filled) and duplicated (hollow)", fontsize=10)
    ax_lost.grid(True, axis="y", alpha=0.3)

    _gap_panel(ax_gap, rows, df, metadata, "longest gap between echoes (ms, log scale)",
               "Longest silence the frame sender saw")
    _fig_legend(fig, ax_lost, 3, ax_gap)
    fig.suptitle("Numbered frames through the TAP during the migration (tap-traffic): "
                 "dots are trials, bars medians with their 95% intervals", fontsize=10)
    return fig


def plot_chardev(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """What a chardev client sees through the migration, per mode: its longest silence, lines lost, reconnects."""
    fig, (ax_gap, ax_lines) = _figure(2, width=6, height=4.6)
    rows = _rows_or_no_data(fig, (ax_gap, ax_lines), df, metadata, "chardev", "Chardev client")
    if rows is None:
        return fig
    _gap_panel(ax_gap, rows, df, metadata, "longest silence between echoes (ms, log scale)",
               "Interruption seen by the client")

    _paired_counts(ax_lines, _mode_groups(rows, "lines_lost", counts=True), _mode_groups(rows, "reconnects", counts=True),
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
                 "dots are trials, bars medians with their 95% intervals", fontsize=10)
    return fig


def plot_throughput(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """Non-live state-copy throughput through the migration channel against the raw AF_UNIX floor, size by size.

    Throughput per trial is bytes_sent / downtime: a non-live migration moves
    everything while the guest is stopped, so that window holds the whole copy
    and neither the setup nor the source's release of RAM after the resume
    (:func:`~migfd.results.summary.throughput`). The floors come from limits in
    the same run, at the sizes where they were measured: raw AF_UNIX throughput
    into fresh memory, and 0.8× of it (the target). Medians with 95% intervals.
    """
    fig, (ax,) = _figure(1, width=8, height=4.8)
    rows = select(df, "ram-size", "state-copy", ok=None)
    rows = rows[rows["live"] == False]  # noqa: E712 (nullable boolean)
    if rows.empty or not rows["ok"].fillna(False).astype(bool).any():
        _no_data(ax, why_absent(df, metadata, "ram-size", "successful non-live state-copy trials"))
        fig.suptitle("State-copy throughput: no data")
        return fig
    rows = rows.assign(throughput_bps=throughput(rows))
    pts = summarize(rows, "throughput_bps")
    sizes = list(rows["ram_bytes"].dropna().unique())
    _draw_series(ax, pts, "ram_bytes", "state copy, non-live", mode_color("state-copy"), dashed=True,
                 marker="s", scale=GiB)
    floor_rows = select(df, "limits", variant="unix-throughput", ok=None)
    floor = summarize(floor_rows, "value")
    floor = floor[floor["n"] > 0]
    if not floor.empty:
        sizes += list(floor["ram_bytes"].dropna())
        _draw_series(ax, floor, "ram_bytes", "floor: raw AF_UNIX into fresh memory (limits)", FLOOR_COLOR,
                     marker="D", scale=GiB, linestyle="-.")
        target = floor.assign(median=floor["median"] * 0.8, ci_low=np.nan, ci_high=np.nan,
                              p5=np.nan, p95=np.nan)
        ax.plot(target["ram_bytes"].astype(float), target["median"] / GiB, color=FLOOR_COLOR, linestyle=":",
                marker="_", linewidth=1, label="target: 0.8 × raw AF_UNIX at the same size")
        missing = sorted(set(rows["ram_bytes"].dropna()) - set(floor["ram_bytes"].dropna()))
        if missing:
            ax.text(0.01, 0.01, f"no floor measured at {', '.join(fmt_bytes(float(m)) for m in missing)}: "
                    f"no comparison there", transform=ax.transAxes, fontsize=7, color="#444444")
    else:
        ax.text(0.01, 0.01, _floor_note(df, metadata, "unix-throughput"), transform=ax.transAxes,
                fontsize=7, color="#444444")
    mem = select(df, "limits", variant="memcpy")["value"].astype("float64").dropna()
    mem_text = (f"\nfor scale: memcpy in one process {np.median(mem) / GiB:.3g} GiB/s (limits; not drawn, "
                f"no socket involved)" if len(mem) else "")
    ax.set_xscale("log", base=2)
    _binary_ticks(ax, sizes, fmt_bytes)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("guest RAM size (floor: bytes moved)")
    ax.set_ylabel("throughput (GiB/s, linear from 0)")
    ax.grid(True, alpha=0.3)
    _fig_legend(fig, ax, ncols=1)
    ax.set_title("Non-live state-copy throughput vs the raw AF_UNIX floor at the same size (ram-size, limits)\n"
                 "bytes through the channel / downtime (guest stopped → resumed: the copy alone); "
                 "medians with 95% intervals" + mem_text, fontsize=9)
    return fig


def plot_dirty_rate(df: pd.DataFrame, metadata: dict | None = None) -> Figure:
    """Downtime and outage against the dirty rate the guest really reached (dirty-rate), per mode.

    x is each point's median achieved rate (the guest's stamped pages before the
    migration); state copy with a raised downtime-limit is a series of its own.
    """
    fig, (ax_down, ax_outage) = _figure(2, height=4.8)
    rows = select(df, "dirty-rate")
    if rows.empty or not rows["value"].notna().any():
        why = why_absent(df, metadata, "dirty-rate", "trials with a measured dirty rate")
        for ax in (ax_down, ax_outage):
            _no_data(ax, why)
        fig.suptitle("Downtime vs dirty rate: no data")
        return fig
    rate = rows.groupby(["mode", "variant"])["value"].median().rename("_rate") / MiB
    limit = scenario_info(metadata, "dirty-rate").get("raised_downtime_limit_ms")
    for ax, metric, what in ((ax_down, "downtime_ns", "downtime (reported)"), (ax_outage, "outage_ns", "outage (observer)")):
        pts = summarize(rows, metric).join(rate, on=["mode", "variant"])
        raised = pts["variant"].str.contains("-limit-")
        for (mode, is_raised), g in pts.groupby([pts["mode"], raised]):
            label = mode_label(mode) + (f", downtime-limit {limit} ms" if is_raised else "")
            _draw_series(ax, g, "_rate", label, mode_color(mode), dashed=bool(is_raised), marker="o")
        ax.set_yscale("log")
        # 0 and tens of MiB/s beside GiB/s: logarithmic above 10 MiB/s, linear below
        ax.set_xscale("symlog", linthresh=10)
        ax.set_xlim(left=0)
        ax.set_xlabel("dirty rate the guest reached (MiB/s, median of the trials; log above 10)")
        ax.set_ylabel(f"{what} (ms, log scale)")
        ax.grid(True, which="both", alpha=0.3)
    ax_down.set_title("Downtime as the VMs report it", fontsize=10)
    ax_outage.set_title("Outage seen from outside", fontsize=10)
    _fig_legend(fig, ax_down, 3)
    size = rows["ram_bytes"].dropna()
    accel = ", ".join(sorted(set(rows["accel"]) - {""})) or "?"
    fig.suptitle(f"Live migration of {fmt_bytes(float(size.iloc[0])) if len(size) else '?'} while the guest "
                 f"dirties RAM ({accel}): fd-passing copies no page; state copy must catch up", fontsize=10)
    return fig
