"""``migfd bench`` writes a trial id per row, ``timelines.csv`` and ``traces/`` (docs/RESULTS.md).

A real run of the smallest ram-size point (fd-passing and state copy, live and
not): every migration's row has its timeline in both files, on the source's
stop, and the phases cover its downtime.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from migfd.bench.timelines import TIMELINE_COLUMNS
from migfd.timeline import Phase, covered_ns

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def run(timelines_run) -> Path:
    """The session's real run with timelines (tests/conftest.py), shared with test_notebooks.py."""
    return timelines_run


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_every_row_has_a_unique_trial_id(run):
    _, rows = read_csv(run / "results.csv")
    ids = [r["trial_id"] for r in rows]
    assert len(rows) == 4 and len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"ram-size-\d{4}", i) for i in ids)


def test_every_migration_has_its_timeline_covering_its_downtime(run):
    _, rows = read_csv(run / "results.csv")
    columns, phases = read_csv(run / "timelines.csv")
    assert tuple(columns) == TIMELINE_COLUMNS
    by_trial: dict[str, list[dict]] = {}
    for p in phases:
        by_trial.setdefault(p["trial_id"], []).append(p)
    assert set(by_trial) == {r["trial_id"] for r in rows}
    assert {r["mode"] for r in rows} == {"fd-passing", "state-copy"}
    for row in rows:
        assert row["ok"] == "True", row["error"]
        mine = by_trial[row["trial_id"]]
        # the two VMs, and the observer that watched the guest (ram-size: the guest has RAM)
        assert {p["side"] for p in mine} == {"source", "destination", "observer"}
        # the observer's outage begins by the time the stop is done (the stop is asked at 0, the
        # guest runs until it is kicked out), and the guest cannot have run before the resume
        outage = next(p for p in mine if p["side"] == "observer" and p["phase"] == "guest-outage")
        stopped = next(p for p in mine if p["side"] == "source" and p["phase"] == "stop")
        assert int(outage["start_ns"]) <= int(stopped["end_ns"]) < int(outage["end_ns"]), (outage, stopped)
        assert int(outage["end_ns"]) - int(outage["start_ns"]) == int(row["outage_ns"])
        assert int(row["outage_ns"]) >= int(row["downtime_ns"]) - 400_000, row  # the observer's resolution
        stop = next(p for p in mine if p["side"] == "source" and p["phase"] == "stop")
        assert int(stop["start_ns"]) == 0
        downtime = int(row["downtime_ns"])
        spans = [Phase(p["phase"], int(p["start_ns"]), int(p["end_ns"])) for p in mine]
        assert covered_ns(spans, 0, downtime) >= 0.9 * downtime, row["trial_id"]


def test_one_trace_per_trial_in_trace_event_format(run):
    _, rows = read_csv(run / "results.csv")
    _, phases = read_csv(run / "timelines.csv")
    assert sorted(p.stem for p in (run / "traces").glob("*.json")) == sorted(r["trial_id"] for r in rows)
    for row in rows:
        trace = json.loads((run / "traces" / f"{row['trial_id']}.json").read_text())
        events = trace["traceEvents"]
        complete = [e for e in events if e["ph"] == "X" and e["cat"] in ("source", "destination", "observer")]
        assert len(complete) == sum(p["trial_id"] == row["trial_id"] for p in phases)
        assert {e["pid"] for e in complete} == {1, 2, 3}
        assert all(isinstance(e["ts"], (int, float)) and e["dur"] >= 0 for e in complete)
        assert trace["otherData"]["trial_id"] == row["trial_id"]
        assert trace["otherData"]["downtime_ns"] == int(row["downtime_ns"])
