"""The closing paragraph of each notebook, written from its own data: what the numbers above say.

Each function returns Markdown made from the figures it is given (a run's
rows, its timelines, the tour's demo migrations), never typed-in numbers: a
notebook ends with ``display(Markdown(<conclusion>(...)))``. Medians carry their
95% intervals (:mod:`migfd.stats`); verdicts are the targets' own
(:mod:`migfd.results.targets`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import pandas as pd

from migfd.results.anatomy import anatomy_rows, anatomy_table, describe_point, downtime_of
from migfd.results.headline import fmt_ratio, frames_sentence, state_copy_answers, verdicts_of
from migfd.results.load import select
from migfd.results.summary import fmt_bytes, fmt_interval, fmt_ns, mode_label
from migfd.results.targets import targets
from migfd.stats import FAIL, INCONCLUSIVE, NOT_MEASURED, PASS, median_ci


def _ms(values: Iterable[float]) -> str:
    return fmt_interval(median_ci(np.asarray(list(values), dtype=float)), fmt_ns)


def tour_conclusion(runs: Iterable[Any]) -> str:
    """What the tour's two demo migrations showed, from what both sides reported (one migration each)."""
    by_mode = {bool(r.backend_transfer): r for r in runs}
    fd, copy = by_mode.get(True), by_mode.get(False)
    if fd is None or copy is None:
        return "The tour needs one migration with and one without backend-transfer to compare."

    def get(run, key: str) -> float:
        value = run.migration.source.get(key)
        return float(value) if value is not None else math.nan

    fd_bytes, copy_bytes = get(fd, "x-bytes-sent"), get(copy, "x-bytes-sent")
    more = copy_bytes / fd_bytes if fd_bytes > 0 else math.nan
    return (f"With backend-transfer, {get(fd, 'x-fds-passed'):.0f} fds travelled in "
            f"{get(fd, 'x-fd-messages'):.0f} sendmsg call(s) and {fd_bytes:,.0f} bytes went through the channel; "
            f"the guest paused for {fmt_ns(get(fd, 'x-downtime-ns'))} and the chardev client reconnected "
            f"{fd.chardev.reconnects} time(s). Without it, {copy_bytes:,.0f} bytes went through "
            f"({more:,.0f}× as many: every RAM page), the guest paused for {fmt_ns(get(copy, 'x-downtime-ns'))} "
            f"and the client reconnected {copy.chardev.reconnects} time(s). One migration each on this machine, "
            f"not a benchmark: 02-downtime has medians with their intervals.")


def _verdict_sentence(table: pd.DataFrame) -> str:
    verdicts = verdicts_of(table)
    counts = ", ".join(f"{len(verdicts.get(v, []))} {v}" for v in (PASS, FAIL, INCONCLUSIVE, NOT_MEASURED)
                       if verdicts.get(v))
    text = f"Of {len(table)} targets: {counts}."
    if verdicts.get(FAIL):
        text += " Failing: " + "; ".join(verdicts[FAIL]) + "."
    return text


def downtime_conclusion(df: pd.DataFrame, meta: dict | None = None) -> str:
    """02-downtime's closing paragraph: fd-passing against state copy as RAM grows, the fd cost, the verdicts."""
    answers = state_copy_answers(df, outage=False)
    lines = []
    for a in answers:
        lines.append(f"at {a.where}, fd-passing {fmt_interval(a.fd, fmt_ns)} against state copy "
                     f"{fmt_interval(a.other, fmt_ns)} ({fmt_ratio(a.ratio)} as long)")
    fd = select(df, "ram-size", "fd-passing")
    sizes = sorted(fd["ram_bytes"].dropna().unique())
    text = ""
    if lines:
        text += "Downtime, medians with 95% intervals: " + "; ".join(lines) + ". "
    else:
        text += "This run has no ram-size trials of both modes to compare. "
    if len(sizes) > 1:
        medians = fd.groupby(["ram_bytes", "live"])["downtime_ns"].median().astype(float)
        text += (f"From {fmt_bytes(float(sizes[0]))} to {fmt_bytes(float(sizes[-1]))} of RAM, fd-passing's median "
                 f"downtime stays within {fmt_ns(medians.min())}–{fmt_ns(medians.max())} (each size, live and "
                 f"non-live). ")
    batched = select(df, "fd-count", "fd-passing", variant="batched")
    if len(batched):
        counts = sorted(batched["n_fds"].dropna().unique())
        lo = batched[batched["n_fds"] == counts[0]]["downtime_ns"]
        hi = batched[batched["n_fds"] == counts[-1]]["downtime_ns"]
        text += (f"Batched, {int(counts[0])} fd(s) take {_ms(lo)} and {int(counts[-1])} take {_ms(hi)}. ")
    return text + _verdict_sentence(targets(df, meta))


def packet_loss_conclusion(df: pd.DataFrame, meta: dict | None = None) -> str:
    """03-packet-loss's closing paragraph: frames lost per mode, and what the chardev client saw."""
    text = f"Frames under TAP traffic: {frames_sentence(df)}"
    rows = select(df, "chardev", ok=None)
    parts = []
    for mode in ("fd-passing", "state-copy"):
        m = rows[rows["mode"] == mode]
        if m.empty:
            continue
        ok = m[m["ok"].fillna(False).astype(bool)]
        lost = pd.to_numeric(m["lines_lost"], errors="coerce").fillna(0).sum()
        reconnects = pd.to_numeric(m["reconnects"], errors="coerce").fillna(0)
        parts.append(f"{mode_label(mode)}: {lost:,.0f} lines lost in {len(m)} trials, reconnected in "
                     f"{int((reconnects > 0).sum())} of them, longest silence of a trial {_ms(ok['max_gap_ns'].dropna())} "
                     f"(median over trials, setup included) against a downtime of {_ms(ok['downtime_ns'].dropna())}")
    if parts:
        text += " The chardev client: " + "; ".join(parts) + "."
    else:
        text += " The chardev scenario has no trials in this run."
    return text


def anatomy_conclusion(df: pd.DataFrame, timelines: pd.DataFrame) -> str:
    """05-anatomy's closing paragraph: where the downtime of the explained point went, mode by mode."""
    rows = anatomy_rows(df, timelines)
    table = anatomy_table(rows, timelines, grouped=True)
    if table.empty:
        return "This run has no timelines: nothing to take apart."
    own = rows[rows["ok"].fillna(False).astype(bool)]
    parts = []
    for mode in ("fd-passing", "state-copy"):
        label = mode_label(mode)
        steps = table[table["series"] == label].sort_values("median_ns", ascending=False)
        if steps.empty:
            continue
        m = own[own["mode"] == mode]
        top = ", ".join(f"{r.label} {fmt_ns(r.median_ns)}" for r in steps.head(3).itertuples())
        parts.append(f"{label}'s downtime is {_ms(downtime_of(m).dropna())} over {int(steps['n'].iloc[0])} "
                     f"trials, its largest steps {top}")
    return (f"For {describe_point(rows)}: " + "; ".join(parts)
            + ". Each step is the median of its share over the trials.")
