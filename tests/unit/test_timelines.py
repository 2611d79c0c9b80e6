"""Timelines without processes: recording, the relative clock, coverage, and the files the benchmark writes."""

from __future__ import annotations

import csv
import json

import pytest

from migfd.bench.timelines import TIMELINE_COLUMNS, TimelineWriter, lanes, phases_of, trace_events
from migfd.timeline import Phase, Timeline, both_sides, covered_ns, stop_origin


def test_timeline_records_phases_points_and_a_raising_block():
    tl = Timeline()
    tl.add("b", 20, 30)
    tl.add("a", 10)
    with pytest.raises(RuntimeError):
        with tl.phase("c"):
            raise RuntimeError("boom")
    phases = tl.phases()
    assert [p.name for p in phases][:2] == ["a", "b"]
    assert phases[0].duration_ns == 0
    assert phases[2].name == "c" and phases[2].end_ns >= phases[2].start_ns
    assert tl.first("b") == Phase("b", 20, 30)
    assert Timeline.from_qmp(tl.to_qmp()) == phases


def test_a_chain_leaves_no_hole_between_its_phases():
    tl = Timeline()
    chain = tl.chain(100)
    first_end = chain.lap("stop")
    with pytest.raises(ValueError):
        with chain.phase("save"):
            raise ValueError("recorded anyway")
    with chain.phase("ping"):
        pass
    stop, save, ping = tl.phases()
    assert (stop.name, stop.start_ns, stop.end_ns) == ("stop", 100, first_end)
    assert save.start_ns == stop.end_ns and ping.start_ns == save.end_ns
    assert covered_ns(tl.phases(), 100, ping.end_ns) == ping.end_ns - 100


def test_a_full_timeline_keeps_the_first_phases_and_counts_the_rest():
    tl = Timeline(max_phases=3)
    for i in range(5):
        tl.add("fds-sent", i, i + 1)
    assert len(tl) == 3 and tl.dropped == 2
    assert [p.start_ns for p in tl.phases()] == [0, 1, 2]


def test_covered_ns_counts_overlaps_once_and_clips_to_the_window():
    phases = [Phase("a", 0, 10), Phase("b", 5, 15), Phase("c", 20, 30), Phase("point", 25, 25),
              Phase("outside", 40, 50)]
    assert covered_ns(phases, 0, 30) == 25
    assert covered_ns(phases, 12, 22) == 5
    assert covered_ns([], 0, 10) == 0


def qmp(*spans):
    return [{"phase": name, "start-ns": s, "end-ns": e} for name, s, e in spans]


def test_both_sides_is_relative_to_the_source_stop():
    src = qmp(("setup", 100, 150), ("stop", 200, 210), ("commit", 300, 300))
    dst = qmp(("setup", 90, 160), ("resume", 310, 320))
    out = both_sides(src, dst)
    assert out[0] == {"side": "source", "phase": "setup", "start_ns": -100, "end_ns": -50}
    assert {"side": "destination", "phase": "resume", "start_ns": 110, "end_ns": 120} in out
    assert [p["side"] for p in out] == ["source"] * 3 + ["destination"] * 2


def test_without_a_stop_the_origin_is_the_first_phase():
    assert stop_origin(Timeline.from_qmp(qmp(("setup", 50, 60), ("rollback", 70, 80)))) == 50
    assert both_sides(None, qmp(("setup", 5, 9)))[0]["start_ns"] == 0
    assert both_sides(None, None) == []


def nests(phases, assigned):
    """Within each lane, any two phases are disjoint or one contains the other."""
    for i, p in enumerate(phases):
        for j, q in enumerate(phases):
            if i < j and assigned[i] == assigned[j]:
                disjoint = p["end_ns"] <= q["start_ns"] or q["end_ns"] <= p["start_ns"]
                inside = (p["start_ns"] <= q["start_ns"] and q["end_ns"] <= p["end_ns"]) or (
                    q["start_ns"] <= p["start_ns"] and p["end_ns"] <= q["end_ns"])
                if not (disjoint or inside):
                    return False
    return True


def ph(phase, start, end, side="destination"):
    return {"side": side, "phase": phase, "start_ns": start, "end_ns": end}


def test_lanes_put_crossing_phases_apart_and_nested_ones_together():
    phases = [ph("parse", 0, 100), ph("load-ram", 50, 200), ph("load:x", 10, 20), ph("recv", 110, 120),
              ph("point", 100, 100), ph("parse", 120, 300)]
    assigned = lanes(phases)
    assert nests(phases, assigned)
    assert assigned[0] == 1 and assigned[1] == 2  # load-ram crosses parse
    assert assigned[2] == 1  # inside parse
    assert max(assigned) == 2


def row_with(timeline, **extra):
    return {"trial_id": "ram-size-0007", "scenario": "ram-size", "mode": "fd-passing", "ok": True,
            "downtime_ns": 50, "timeline": timeline, **extra}


def test_trace_events_are_three_named_processes_of_complete_events():
    timeline = [ph("stop", 0, 10, "source"), ph("setup", -40, -20, "source"), ph("resume", 40, 50),
                ph("load-ram", 5, 30), ph("parse", 20, 45), ph("guest-outage", -2, 60, "observer")]
    trace = trace_events(row_with(timeline), phases_of(row_with(timeline)))
    events = trace["traceEvents"]
    meta = {(e["pid"], e["args"]["name"]) for e in events if e["name"] == "process_name"}
    assert meta == {(1, "source"), (2, "destination"), (3, "observer")}
    complete = [e for e in events if e["ph"] == "X" and e["cat"] != "guest"]
    assert len(complete) == len(timeline)
    by_name = {e["name"]: e for e in complete}
    assert by_name["setup"]["ts"] == 0.0  # the earliest phase is the origin
    assert by_name["stop"]["ts"] == pytest.approx(0.040) and by_name["stop"]["dur"] == pytest.approx(0.010)
    assert by_name["stop"]["pid"] == 1 and by_name["resume"]["pid"] == 2 and by_name["guest-outage"]["pid"] == 3
    assert by_name["load-ram"]["tid"] != by_name["parse"]["tid"]  # they cross: two lanes
    assert trace["otherData"]["stop_ts_us"] == pytest.approx(0.040)
    assert trace["otherData"]["trial_id"] == "ram-size-0007"
    downtime = next(e for e in events if e["name"] == "downtime")
    assert downtime["ts"] == pytest.approx(0.040) and downtime["dur"] == pytest.approx(0.050)
    json.dumps(trace)  # plain JSON


def test_writer_writes_tidy_csv_and_one_trace_per_trial(tmp_path):
    writer = TimelineWriter(tmp_path)
    assert writer.write(row_with([ph("stop", 0, 10, "source"), ph("resume", 40, 50)])) is None
    assert writer.write({"trial_id": "limits-0000", "scenario": "limits"}) is None  # no timeline: nothing
    failed = row_with([ph("rollback", 0, 5, "source")], trial_id="ram-size-0008", ok=False, error="x")
    assert writer.write(failed) is None
    writer.close()
    with open(tmp_path / "timelines.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == TIMELINE_COLUMNS
    assert rows[1:] == [["ram-size-0007", "source", "stop", "0", "10"],
                        ["ram-size-0007", "destination", "resume", "40", "50"],
                        ["ram-size-0008", "source", "rollback", "0", "5"]]
    assert sorted(p.name for p in (tmp_path / "traces").iterdir()) == ["ram-size-0007.json", "ram-size-0008.json"]
    trace = json.loads((tmp_path / "traces" / "ram-size-0008.json").read_text())
    assert trace["otherData"]["ok"] is False


def test_a_malformed_timeline_is_reported_not_raised(tmp_path):
    writer = TimelineWriter(tmp_path)
    for bad in ([ph("x", 10, 5)], [{"side": "elsewhere", "phase": "x", "start_ns": 0, "end_ns": 1}],
                [{"phase": "x"}]):
        problem = writer.write(row_with(bad))
        assert problem and "malformed" in problem
    writer.close()
    assert (tmp_path / "timelines.csv").read_text().strip() == ",".join(TIMELINE_COLUMNS)
    assert list((tmp_path / "traces").iterdir()) == []
