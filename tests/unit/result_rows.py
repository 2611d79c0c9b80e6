"""Rows and figure probes the results tests share (tests/unit/test_analysis.py, test_targets.py, test_anatomy.py).

The rows built here are FIXTURES OF THE ANALYSIS CODE, not measurements: round
numbers chosen so that each median, percentile and ratio can be checked by
hand, and so that each target verdict sits just on one side of its threshold.
"""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from migfd.results.load import FLOAT_COLUMNS, INT_COLUMNS, TEXT_COLUMNS, clean_results
from migfd.units import MiB

MS = 1_000_000  # ns
US = 1_000  # ns


def fixture_row(**kw) -> dict:
    """One results.csv row of a fixture table: every column of docs/RESULTS.md, "" unless given."""
    row = {c: "" for c in TEXT_COLUMNS + INT_COLUMNS + FLOAT_COLUMNS}
    row.update({"ok": True, "live": ""})
    row.update(kw)
    return row


def table(rows: list[dict]) -> pd.DataFrame:
    """A fixture table, typed exactly as load_results types a results.csv."""
    return clean_results(pd.DataFrame(rows).astype(str).replace({"": pd.NA}))


def ram_rows(mode: str, size: int, downtimes_ms, live=False, **kw) -> list[dict]:
    return [fixture_row(scenario="ram-size", mode=mode, backend="ram", ram_bytes=size, live=live,
                        trial=i, downtime_ns=int(d * MS), total_ns=int(d * MS), setup_ns=0, **kw)
            for i, d in enumerate(downtimes_ms)]


def floor_row(variant: str, **kw) -> dict:
    return fixture_row(**{"scenario": "limits", "mode": "floor", "variant": variant, "trial": 0, **kw})


def traffic_rows(lost, dup, mode="fd-passing"):
    return [fixture_row(scenario="tap-traffic", mode=mode, backend="ram+tap+chardev", ram_bytes=64 * MiB,
                        live=True, trial=i, downtime_ns=1 * MS, frames_sent=10000, frames_lost=l,
                        frames_duplicated=d, max_gap_ns=2 * MS)
            for i, (l, d) in enumerate(zip(lost, dup))]


def fd_count_rows(per_fd_us, variant="batched"):
    return [fixture_row(scenario="fd-count", mode="fd-passing", variant=variant, backend="socket", n_fds=n,
                        live=True, trial=t, downtime_ns=int(1 * MS + (n - 1) * per_fd_us * US))
            for n in (1, 11, 21) for t in (0, 1)]


def fd_floor_rows():
    return [floor_row("fd-roundtrip", backend="socket", n_fds=n, total_ns=10 * US + (n - 1) * US,
                      value=1 * US, unit="ns/fd") for n in (1, 11, 21) for _ in (0, 1)]


def qemu_rows(downtime_ms, mode="qemu-ram-copied", size=64 * MiB, outage_ms=None):
    """qemu-peer rows; the observer's outage is the downtime unless ``outage_ms`` says otherwise."""
    outage_ms = downtime_ms if outage_ms is None else outage_ms
    return [fixture_row(scenario="qemu-peer", mode=mode, backend="ram", ram_bytes=size, live=False,
                        trial=i, downtime_ns=int(d * MS), total_ns=int(d * MS), outage_ns=int(o * MS))
            for i, (d, o) in enumerate(zip(downtime_ms, outage_ms))]


def with_outage(rows: list[dict], outage_ms) -> list[dict]:
    """The rows with the observer's outage (ms), one value per row."""
    return [dict(r, outage_ns=int(o * MS)) for r, o in zip(rows, outage_ms)]


def texts(fig: Figure) -> str:
    """Every piece of text in a figure: titles, labels, ticks, legends (drawn first: ticks are made then)."""
    fig.savefig(io.BytesIO(), format="png")
    out = [t.get_text() for t in fig.findobj(lambda o: hasattr(o, "get_text"))]
    return "\n".join(out)


def medians_line(ax, label_start: str):
    """The line of medians of the series whose label starts with ``label_start`` (an errorbar container)."""
    container = next(c for c in ax.containers if str(c.get_label()).startswith(label_start))
    line = container.lines[0]
    line.set_label(container.get_label())
    return line


def error_bars(ax, label_start: str) -> np.ndarray:
    """(low, high) of each error bar of that series, in data units."""
    container = next(c for c in ax.containers if str(c.get_label()).startswith(label_start))
    segments = container.lines[2][0].get_segments()
    return np.array([[seg[0][1], seg[1][1]] for seg in segments])
