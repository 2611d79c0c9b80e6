"""When should the fds move? The two orders of the ``fd-order`` scenario side by side (notebook 05).

At the switchover (the default: the fds ride with the device state, which
QEMU's reader takes) or before the stop (``x-early-fds``, cpr-transfer's
order: the destination validates and adopts them while the guest runs). The
same VM under the same traffic, the orders alternating trial by trial; the
per-fd slopes come from fd-count's ``batched`` and ``early-fds`` variants.
Every figure is a median with its 95% interval; a ratio whose interval holds 1
decides nothing, and the conclusion says so.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from migfd.results.anatomy import anatomy_table
from migfd.results.load import select
from migfd.results.summary import fmt_bytes, fmt_interval, fmt_ns, slope_per_fd
from migfd.results.targets import by_n_fds, slope_ratio_ci
from migfd.stats import FAIL, PASS, Interval, clean, median_ci, ratio_ci, threshold_verdict

SCENARIO = "fd-order"
#: the two orders, as the scenario names its variants (migfd.bench.scenarios.fd_order)
AT_SWITCHOVER = "at-switchover"
EARLY = "early-fds"
ORDER_LABELS = {AT_SWITCHOVER: "fds at the switchover (default)", EARLY: "fds before the stop (x-early-fds)"}
#: what the table compares, by column of results.csv
METRICS = {"downtime_ns": "downtime (reported)", "outage_ns": "outage (observer)"}
#: fd-count's variants that correspond to the two orders
FD_COUNT_VARIANTS = {AT_SWITCHOVER: "batched", EARLY: EARLY}


def order_rows(df: pd.DataFrame) -> pd.DataFrame:
    """fd-order's successful rows (both orders)."""
    return select(df, SCENARIO, "fd-passing")


def _fmt_ns_interval(interval: Interval) -> str:
    return fmt_interval(interval, fmt_ns)


def _fd_count_groups(df: pd.DataFrame, variant: str) -> list[tuple[float, np.ndarray]]:
    """fd-count's downtimes of ``variant``, per fd count: [(n, trials)]."""
    return by_n_fds(select(df, "fd-count", "fd-passing", variant=variant), "downtime_ns")


def per_fd_slope(df: pd.DataFrame, variant: str) -> tuple[float, int]:
    """Least-squares slope of fd-count's median downtime against the fd count (ns per fd) for
    ``variant``, and the number of fd counts it rests on (NaN below two)."""
    groups = _fd_count_groups(df, variant)
    medians = pd.DataFrame({"n_fds": [n for n, _ in groups], "median": [np.median(v) for _, v in groups]})
    return slope_per_fd(medians), len(groups)


def sizes(rows: pd.DataFrame) -> list[float]:
    return sorted(rows["ram_bytes"].dropna().unique())


def order_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per RAM size and metric: each order's median [95% CI] and early / at-switchover
    [95% CI]; then frames lost or duplicated, and the per-fd slope (fd-count)."""
    rows = order_rows(df)
    out = []
    for size in sizes(rows):
        at_size = rows[rows["ram_bytes"] == size]
        by = {v: at_size[at_size["variant"] == v] for v in ORDER_LABELS}
        for column, label in METRICS.items():
            values = {v: clean(g[column].astype("float64")) for v, g in by.items()}
            ratio = ratio_ci(values[AT_SWITCHOVER], values[EARLY])
            out.append({"metric": f"{label}, {fmt_bytes(size)}",
                        **{ORDER_LABELS[v]: _fmt_ns_interval(median_ci(values[v])) for v in ORDER_LABELS},
                        "early / at switchover": fmt_interval(ratio)})
    every = select(df, SCENARIO, "fd-passing", ok=None)
    frames = {v: every[every["variant"] == v] for v in ORDER_LABELS}
    out.append({"metric": "frames lost + duplicated (all trials)",
                **{ORDER_LABELS[v]: f"{int(g['frames_lost'].fillna(0).sum() + g['frames_duplicated'].fillna(0).sum())}"
                                    f" of {int(g['frames_sent'].fillna(0).sum()):,} sent"
                   for v, g in frames.items()},
                "early / at switchover": ""})
    slopes = {v: per_fd_slope(df, FD_COUNT_VARIANTS[v]) for v in ORDER_LABELS}
    out.append({"metric": "downtime per extra fd (fd-count slope)",
                **{ORDER_LABELS[v]: (f"{fmt_ns(s)}/fd over {k} fd counts" if not math.isnan(s) else "not measured")
                   for v, (s, k) in slopes.items()},
                "early / at switchover": ""})
    return pd.DataFrame(out)


def order_phases(df: pd.DataFrame, timelines: pd.DataFrame, ram_bytes: float | None = None) -> pd.DataFrame:
    """Median ns of each phase group inside the downtime, per order (a column each), with the
    difference early − at switchover, largest differences first; at ``ram_bytes`` (default the
    largest RAM size, where adopting the memfd costs most)."""
    rows = order_rows(df)
    if len(rows):
        rows = rows[rows["ram_bytes"] == (ram_bytes if ram_bytes is not None else sizes(rows)[-1])]
    if rows.empty or timelines.empty:
        return pd.DataFrame(columns=["phase", *ORDER_LABELS.values(), "early − at switchover"])
    table = anatomy_table(rows, timelines, grouped=True,
                          series_by=lambda r: r["variant"].map(ORDER_LABELS).fillna(r["variant"]))
    wide = table.pivot(index="label", columns="series", values="median_ns").reindex(
        columns=list(ORDER_LABELS.values())).fillna(0.0)
    diff = wide[ORDER_LABELS[EARLY]] - wide[ORDER_LABELS[AT_SWITCHOVER]]
    wide = wide.assign(**{"early − at switchover": diff}).reindex(diff.abs().sort_values(ascending=False).index)
    return wide.reset_index(names="phase")


def order_conclusion(df: pd.DataFrame, timelines: pd.DataFrame) -> str:
    """Which order wins, where and why, in words computed from this run (Markdown)."""
    rows = order_rows(df)
    if any(rows[rows["variant"] == v].empty for v in ORDER_LABELS):
        return ("This run has no fd-order trials of both orders (the scenario needs root and a TAP; "
                "`migfd bench --scenario fd-order`).")
    parts = []
    for size in sizes(rows):
        at_size = rows[rows["ram_bytes"] == size]
        by = {v: at_size[at_size["variant"] == v] for v in ORDER_LABELS}
        for column, label in METRICS.items():
            base = clean(by[AT_SWITCHOVER][column].astype("float64"))
            new = clean(by[EARLY][column].astype("float64"))
            if not len(base) or not len(new):
                parts.append(f"The {label} at {fmt_bytes(size)} was not measured in both orders.")
                continue
            ratio = ratio_ci(base, new)
            verdict = {PASS: "sending the fds before the stop shortens it",
                       FAIL: "sending the fds before the stop does not shorten it (none of the interval is below 1)",
                       }.get(threshold_verdict(ratio, "<", 1), "inconclusive: the interval holds 1, or there is none")
            parts.append(f"**{label.capitalize()}, {fmt_bytes(size)} RAM**: {fmt_ns(float(np.median(base)))} at the "
                         f"switchover, {fmt_ns(float(np.median(new)))} before the stop; early / at switchover = "
                         f"{fmt_interval(ratio)} ({len(base)} and {len(new)} trials): {verdict}.")
    phases = order_phases(df, timelines)
    if len(phases):
        moved = phases[phases["early − at switchover"].abs() > 0].head(3)
        parts.append(f"Where the difference lies at {fmt_bytes(sizes(rows)[-1])} (median phase groups inside the "
                     f"downtime, early − at switchover): " + "; ".join(
                         f"{p['phase']} {'+' if d > 0 else '−'}{fmt_ns(abs(d))}"
                         for p, d in ((p, p["early − at switchover"]) for _, p in moved.iterrows())) + ".")
    slopes = {v: per_fd_slope(df, FD_COUNT_VARIANTS[v])[0] for v in ORDER_LABELS}
    if not any(math.isnan(s) for s in slopes.values()):
        early = _fd_count_groups(df, EARLY)
        at = _fd_count_groups(df, FD_COUNT_VARIANTS[AT_SWITCHOVER])
        # the early slope over the switchover's, each resampled (the per-fd target's method)
        ratio = slope_ratio_ci(early, at) if slopes[AT_SWITCHOVER] > 0 else Interval(math.nan, math.nan, math.nan, 0)
        verdict = {PASS: "early, the fds' send, receive and validation leave the downtime",
                   FAIL: "sending them early does not make an extra fd cheaper in the downtime"}.get(
                       threshold_verdict(ratio, "<", 1), "the slopes' ratio is inconclusive")
        parts.append(f"**Per extra fd** (fd-count): {fmt_ns(slopes[AT_SWITCHOVER])} of downtime at the switchover, "
                     f"{fmt_ns(slopes[EARLY])} when the fds go before the stop; early / at switchover = "
                     f"{fmt_interval(ratio)}: {verdict}.")
    parts.append("Why: before the stop the destination receives the fds, validates them (TUNGETIFF, the memfd's "
                 "seals, the sockets' kind) and adopts them (maps the RAM, points its KVM memory slots at it) while "
                 "the guest still runs; the switchover then carries only the devices' state. The cost is a "
                 "protocol only migfd reads (QEMU's destination expects the fds with the state), and a backend "
                 "that changes after the early send (a chardev client that reconnects) goes again at the switchover.")
    return "\n\n".join(parts)
