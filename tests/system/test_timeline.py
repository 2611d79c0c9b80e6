"""Every migration explains its downtime: both sides' phases (query-migrate ``x-timeline``).

Real migrations between two ``migfd vm`` processes, with and without
backend-transfer. What is checked is a property of the instrumentation, not a
speed: the phases of both sides, on their shared CLOCK_MONOTONIC, cover at
least 90% of [stop, resume]; they come in the order the protocol imposes
(the source stops, the destination loads, the source commits, the
destination resumes); every device section is saved and loaded; and the
benchmark's files made of them (timelines.csv, traces/<trial_id>.json) parse
as what Perfetto and chrome://tracing read.
"""

from __future__ import annotations

import csv
import json

import pytest
from helpers import run_vm_test, wait_until
from qemu.qmp import EventListener

from migfd.bench.timelines import TIMELINE_COLUMNS, TimelineWriter
from migfd.peers.migrate import migrate
from migfd.timeline import Phase, both_sides, covered_ns

pytestmark = pytest.mark.timeout(120)

#: the share of [stop, resume] the phases must cover
COVERAGE = 0.9

SECTIONS = ("ram0/memory-backend-memfd", "ch0/chardev-socket")


def devices(vms) -> dict:
    return dict(objects=("memory-backend-memfd,id=ram0,size=16M,fill=on,backend-transfer=on",),
                chardevs=(f"socket,id=ch0,path={vms.path('ch0.sock')},server=on,backend-transfer=on",),
                dirty_rate_bytes_s=4 << 20)


def first(timeline: list[dict], side: str, phase: str) -> dict:
    found = [p for p in timeline if p["side"] == side and p["phase"] == phase]
    assert found, f"no {side} phase {phase!r} in {sorted({p['phase'] for p in timeline if p['side'] == side})}"
    return found[0]


def names(timeline: list[dict], side: str) -> list[str]:
    return [p["phase"] for p in timeline if p["side"] == side]


def check_timeline(result, transfer: bool) -> list[dict]:
    """The assertions shared by both modes; returns the trial's relative timeline."""
    src, dst = result.source, result.destination
    assert src["status"] == dst["status"] == "completed", result.error
    downtime = src["x-downtime-ns"]
    timeline = both_sides(src["x-timeline"], dst["x-timeline"])

    # The origin is the source's stop; the destination's resume ends the downtime, exactly.
    stop = first(timeline, "source", "stop")
    assert stop["start_ns"] == 0
    resume = first(timeline, "destination", "resume")
    assert resume["end_ns"] == downtime

    # The phases account for the downtime: together, and each side alone too (a
    # side's thread goes from phase to phase; a wait for the other side is a phase).
    for sides in (("source", "destination"), ("source",), ("destination",)):
        phases = [Phase(p["phase"], p["start_ns"], p["end_ns"]) for p in timeline if p["side"] in sides]
        coverage = covered_ns(phases, 0, downtime) / downtime
        assert coverage >= COVERAGE, f"{'+'.join(sides)} phases cover {coverage:.1%} of the downtime: {timeline}"

    # The order the protocol imposes, across the two processes.
    loads = [p for p in timeline if p["side"] == "destination" and p["phase"].startswith("load:")]
    post_loads = first(timeline, "destination", "load-devices")
    commit = first(timeline, "source", "commit")
    assert commit["start_ns"] == commit["end_ns"]
    assert stop["start_ns"] <= min(p["start_ns"] for p in loads)
    assert max(p["end_ns"] for p in loads) <= post_loads["start_ns"]
    assert post_loads["end_ns"] <= first(timeline, "destination", "pong")["start_ns"]
    # Across processes only what is causal: a time taken before a message is sent
    # precedes the time its receiver takes after reading it.
    assert first(timeline, "destination", "pong")["start_ns"] <= first(timeline, "source", "wait-pong")["end_ns"]
    assert first(timeline, "source", "wait-pong")["end_ns"] <= commit["start_ns"]
    assert commit["start_ns"] <= first(timeline, "destination", "eof")["start_ns"] <= resume["start_ns"]
    assert resume["end_ns"] <= first(timeline, "source", "wait-resumed")["end_ns"]
    assert first(timeline, "source", "release")["start_ns"] >= resume["end_ns"]
    assert first(timeline, "source", "setup")["end_ns"] <= stop["start_ns"]
    # The source stopped only after the destination had read its setup.
    assert first(timeline, "source", "wait-setup-pong")["end_ns"] <= stop["start_ns"]
    assert first(timeline, "destination", "setup")["start_ns"] <= stop["start_ns"]

    # Every device section is saved on one side and loaded and adopted on the other.
    for section in SECTIONS:
        assert f"save:{section}" in names(timeline, "source")
        assert f"load:{section}" in names(timeline, "destination")
        assert f"post-load:{section}" in names(timeline, "destination")

    # The fd messages are the ones query-migrate counts.
    assert names(timeline, "source").count("fds-sent") == src["x-fd-messages"]
    if transfer:
        assert src["x-fd-messages"] > 0
        assert "fds-received" in names(timeline, "destination")
        assert "iterable-save" not in names(timeline, "source")  # no RAM page travels
    else:
        assert src["x-fd-messages"] == 0
        assert "fds-received" not in names(timeline, "destination")
        assert "iterable-save" in names(timeline, "source")
        assert "load-ram" in names(timeline, "destination")
    return timeline


def event_us(event) -> int:
    return event["timestamp"]["seconds"] * 1_000_000 + event["timestamp"]["microseconds"]


def check_files(tmp_path, row: dict) -> None:
    """timelines.csv and the trace of ``row`` say what the timeline says, in their formats."""
    writer = TimelineWriter(tmp_path)
    assert writer.write(row) is None
    writer.close()
    with open(tmp_path / "timelines.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == TIMELINE_COLUMNS
        lines = list(reader)
    assert [(r["trial_id"], r["side"], r["phase"], int(r["start_ns"]), int(r["end_ns"])) for r in lines] == [
        (row["trial_id"], p["side"], p["phase"], p["start_ns"], p["end_ns"]) for p in row["timeline"]]

    trace = json.loads((tmp_path / "traces" / f"{row['trial_id']}.json").read_text())
    events = trace["traceEvents"]
    processes = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    assert processes == {1: "source", 2: "destination"}
    complete = [e for e in events if e["ph"] == "X" and e["cat"] in ("source", "destination")]
    assert len(complete) == len(row["timeline"])
    assert all(e["ts"] >= 0 and e["dur"] >= 0 for e in complete)
    assert {e["pid"] for e in complete if e["cat"] == "source"} == {1}
    assert {e["pid"] for e in complete if e["cat"] == "destination"} == {2}
    # One thread's events nest (what a trace viewer needs to draw them).
    for key in {(e["pid"], e["tid"]) for e in complete}:
        lane = sorted((e for e in complete if (e["pid"], e["tid"]) == key), key=lambda e: (e["ts"], -e["dur"]))
        open_ends: list[float] = []
        for e in lane:
            while open_ends and open_ends[-1] <= e["ts"] + 1e-6:  # µs as floats: ns rounding
                open_ends.pop()
            assert not open_ends or e["ts"] + e["dur"] <= open_ends[-1] + 1e-6, f"{e} crosses its parent"
            open_ends.append(e["ts"] + e["dur"])
    stop_us = trace["otherData"]["stop_ts_us"]
    stop = next(e for e in complete if e["name"] == "stop")
    assert stop["ts"] == pytest.approx(stop_us)
    downtime = next(e for e in events if e["name"] == "downtime")
    assert downtime["ts"] == pytest.approx(stop_us) and downtime["dur"] == pytest.approx(row["downtime_ns"] / 1000)


@pytest.mark.parametrize("transfer", [True, False], ids=["fd-passing", "state-copy"])
def test_phases_account_for_the_downtime(vms, tmp_path, transfer):
    async def body():
        src = await vms.start("src", **devices(vms))
        dst = await vms.start("dst", incoming="defer", **devices(vms))
        stops, resumes = EventListener("STOP"), EventListener("RESUME")
        src.qmp.register_listener(stops)
        dst.qmp.register_listener(resumes)
        result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}", {"backend-transfer": transfer},
                               timeout_s=60)
        timeline = check_timeline(result, transfer)
        # Events wait out the switchover but keep the time they happened at: the
        # source's STOP is older than the destination's RESUME (sent before it).
        await wait_until(lambda: stops.history and resumes.history, what="STOP and RESUME events")
        assert event_us(stops.history[0]) <= event_us(resumes.history[0])
        check_files(tmp_path, {"trial_id": "test-0000", "scenario": "test", "timeline": timeline,
                               "downtime_ns": result.source["x-downtime-ns"]})

    run_vm_test(vms, body)


def test_a_failed_migration_reports_its_timeline(vms):
    """No destination: the source fails in setup, rolls back, and says so in its timeline."""
    async def body():
        src = await vms.start("src", **devices(vms))
        await src.execute("migrate", {"uri": f"unix:{vms.path('nobody.sock')}"})
        info = await src.wait_migration(30)
        assert info["status"] == "failed"
        phases = [p["phase"] for p in info["x-timeline"]]
        assert phases[-1] == "rollback"
        assert "stop" not in phases and "commit" not in phases
        timeline = both_sides(info["x-timeline"], None)
        assert timeline[0]["start_ns"] == 0  # no stop: the origin is the first phase

    run_vm_test(vms, body)
