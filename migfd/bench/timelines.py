"""The timelines of a benchmark run: ``timelines.csv`` and one Trace Event Format file per trial.

A result row may carry a ``timeline``: a list of ``{side, phase, start_ns,
end_ns}`` (side ``source``, ``destination`` or ``observer``, ns relative to the
source's stop; migfd VMs report it in query-migrate's ``x-timeline``, real
QEMU's rows derive it from QEMU's trace, the guest-progress observer adds the
guest's silence around the switchover). :class:`TimelineWriter` writes it twice, beside
``results.csv`` (docs/RESULTS.md):

``timelines.csv``
    tidy, one line per phase: ``trial_id, side, phase, start_ns, end_ns``.
``traces/<trial_id>.json``
    the Trace Event Format (JSON object form) that Perfetto and
    chrome://tracing open: complete events (``ph`` "X", ``ts``/``dur`` in µs)
    on three processes, pid 1 the source, pid 2 the destination and pid 3
    the outside observer, named by
    ``process_name`` metadata events. A viewer needs the events of one thread
    to nest, and the phases of a side need not (the destination reads the
    next record while a RAM section is still open), so each side's phases go
    to as many threads ("lanes") as properly nested stacks need. The row's
    own fields go to ``otherData``; the downtime, when known, is an event of
    its own on the source.

Times in the trace start at the earliest phase of the trial (viewers dislike
negative timestamps); ``otherData.stop_ts_us`` says where the stop is.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Iterable

#: timelines.csv columns, in order
TIMELINE_COLUMNS = ("trial_id", "side", "phase", "start_ns", "end_ns")
SIDES = ("source", "destination", "observer")
#: pid of each side in the traces
PIDS = {"source": 1, "destination": 2, "observer": 3}
TRACES_DIR = "traces"
#: row fields copied into a trace's otherData
TRACE_ROW_FIELDS = ("trial_id", "scenario", "mode", "variant", "backend", "ram_bytes", "n_fds",
                    "live", "trial", "downtime_ns", "total_ns", "ok", "error")


def phases_of(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The row's timeline, validated: sides known, times integers, end not before start."""
    out = []
    for entry in row.get("timeline") or ():
        side = entry["side"]
        if side not in PIDS:
            raise ValueError(f"timeline side {side!r} is not one of {', '.join(SIDES)}")
        start, end = int(entry["start_ns"]), int(entry["end_ns"])
        if end < start:
            raise ValueError(f"phase {entry['phase']!r} ends before it starts")
        out.append({"side": side, "phase": str(entry["phase"]), "start_ns": start, "end_ns": end})
    return out


def lanes(phases: Iterable[dict[str, Any]]) -> list[int]:
    """A lane (1, 2, ...) per phase such that the phases of each lane nest properly.

    Greedy over phases by start (longer first): a phase goes to the first lane
    whose innermost open phase contains it, or whose phases all ended.
    """
    items = sorted(enumerate(phases), key=lambda ip: (ip[1]["start_ns"], -ip[1]["end_ns"]))
    stacks: list[list[int]] = []  # per lane: end_ns of the open phases, outermost first
    out = [0] * len(items)
    for index, p in items:
        start, end = p["start_ns"], p["end_ns"]
        for lane, stack in enumerate(stacks):
            while stack and stack[-1] <= start:
                stack.pop()
            if not stack or end <= stack[-1]:
                stack.append(end)
                out[index] = lane + 1
                break
        else:
            stacks.append([end])
            out[index] = len(stacks)
    return out


def trace_events(row: dict[str, Any], phases: list[dict[str, Any]]) -> dict[str, Any]:
    """The Trace Event Format object of one trial (see the module docstring)."""
    origin = min(p["start_ns"] for p in phases)
    events: list[dict[str, Any]] = []
    # the observer's lane only where the trial had one
    present = {"source", "destination"} | {p["side"] for p in phases}
    for side, pid in PIDS.items():
        if side not in present:
            continue
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": side}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
        mine = [p for p in phases if p["side"] == side]
        named: set[int] = set()
        for p, lane in zip(mine, lanes(mine)):
            if lane not in named:
                named.add(lane)
                events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": lane,
                               "args": {"name": "migration" if lane == 1 else f"overlapping {lane}"}})
            events.append({"ph": "X", "name": p["phase"], "cat": side, "pid": pid, "tid": lane,
                           "ts": (p["start_ns"] - origin) / 1000, "dur": (p["end_ns"] - p["start_ns"]) / 1000,
                           "args": {"start_ns": p["start_ns"], "end_ns": p["end_ns"]}})
    downtime = row.get("downtime_ns")
    if isinstance(downtime, (int, float)) and downtime > 0:
        events.append({"ph": "M", "name": "thread_name", "pid": PIDS["source"], "tid": 0,
                       "args": {"name": "guest paused"}})
        events.append({"ph": "X", "name": "downtime", "cat": "guest", "pid": PIDS["source"], "tid": 0,
                       "ts": -origin / 1000, "dur": downtime / 1000,
                       "args": {"start_ns": 0, "end_ns": downtime}})
    other = {k: row.get(k) for k in TRACE_ROW_FIELDS if row.get(k) is not None}
    other["stop_ts_us"] = -origin / 1000
    return {"traceEvents": events, "displayTimeUnit": "ns", "otherData": other}


class TimelineWriter:
    """Appends the timeline of each row to ``timelines.csv`` and writes its trace file.

    The CSV is flushed after every row, as results.csv is, so an interrupted
    run keeps the timelines of the trials it wrote.
    """

    def __init__(self, out: Path):
        self.out = Path(out)
        self.traces = self.out / TRACES_DIR
        self.traces.mkdir(parents=True, exist_ok=True)
        self.file = open(self.out / "timelines.csv", "w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(TIMELINE_COLUMNS)
        self.file.flush()
        #: rows whose timeline was written
        self.trials = 0

    def write(self, row: dict[str, Any]) -> str | None:
        """Write the timeline of ``row`` (which has its ``trial_id``); a row without one is skipped.

        Returns why a timeline was not written (a malformed one must not end
        the run), else None.
        """
        try:
            phases = phases_of(row)
        except (KeyError, TypeError, ValueError) as exc:
            return f"a {row.get('scenario')} trial's timeline is malformed ({type(exc).__name__}: {exc})"
        if not phases:
            return None
        trial_id = row["trial_id"]
        for p in phases:
            self.writer.writerow((trial_id, p["side"], p["phase"], p["start_ns"], p["end_ns"]))
        self.file.flush()
        path = self.traces / f"{trial_id}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(trace_events(row, phases), separators=(",", ":")))
        os.replace(tmp, path)
        self.trials += 1
        return None

    def close(self) -> None:
        self.file.close()
