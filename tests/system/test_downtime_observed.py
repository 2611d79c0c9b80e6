"""The downtime the VMs report agrees with what an outside client sees.

Both VMs report the downtime from timestamps they exchange, so they agree by
construction; this test checks them against an observer outside both: a
client on the VM's socket chardev sending numbered lines at a fixed rate,
echoed by the guest, that records the longest silence between two echoes.

While the guest is stopped nothing is echoed, so the silence bounds the
downtime from above. And the silence is close to it: before the stop the last
line was sent at most one line interval earlier and echoed at once; after the
resume the lines queued in the handed-over socket are echoed at once. So

    downtime - interval/2  <=  longest silence  <=  downtime + 2 x interval

(half an interval below for the moments between the stop's timestamp and the
guest threads parking, one interval above for where the stop fell between two
lines, one more for the echo and the client's read). To make the comparison
mean something whatever the machine's speed, the source holds the migration
at the ``device`` phase (after the stop, inside the downtime) for
:data:`HOLD_S`: the downtime is then far longer than the line interval and
than any scheduling hiccup, and the bounds above are in line intervals only.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from helpers import run_vm_test, wait_until
from migfd.peers.chardev import ChardevClient
from migfd.peers.observe import ObserverProcess, silences_of, switchover_outage
from migfd.timeline import Timeline, stop_origin


LINE_RATE_PER_S = 100
INTERVAL_NS = 1_000_000_000 // LINE_RATE_PER_S
HOLD_S = 0.25


def test_client_silence_bounds_the_reported_downtime(vms):
    async def body():
        d = vms.workdir
        devices = dict(objects=("memory-backend-memfd,id=ram0,size=8M,backend-transfer=on",),
                       chardevs=(f"socket,id=ch0,path={d}/ch0.sock,server=on,backend-transfer=on",),
                       dirty_rate_bytes_s=1 << 20)
        src = await vms.start("src", **devices)
        dst = await vms.start("dst", incoming="defer", **devices)
        client = ChardevClient(f"{d}/ch0.sock", rate_per_s=LINE_RATE_PER_S)
        client.start()
        try:
            assert client.wait_echoes(5)
            params = {"backend-transfer": True, "max-bandwidth": 1 << 30}
            for vm in (src, dst):
                await vm.execute("migrate-set-parameters", params)
            await dst.execute("migrate-incoming", {"uri": f"unix:{d}/mig.sock"})
            await src.execute("x-migration-fault", {"phase": "device", "action": "pause"})
            await src.execute("migrate", {"uri": f"unix:{d}/mig.sock"})

            async def held() -> bool:
                return (await src.execute("x-query-fault"))["paused-at"] == "device"

            await wait_until(held, 20, what="source held at the device phase")
            await asyncio.sleep(HOLD_S)
            await src.execute("x-migration-continue")
            source = await src.wait_migration(60)
            await asyncio.sleep(0.3)  # echoes after the resume
        finally:
            report = client.stop(drain_s=1.0)
        assert source["status"] == "completed", source
        assert report.reconnects == 0 and not report.lost, report
        downtime = source["x-downtime-ns"]
        assert downtime >= HOLD_S * 1e9  # the hold was inside the downtime
        # the guest was silent at least as long as it says it was stopped ...
        assert report.max_gap_ns >= downtime - INTERVAL_NS // 2, (report.max_gap_ns, downtime)
        # ... and not much longer: within two line intervals
        assert report.max_gap_ns <= downtime + 2 * INTERVAL_NS, (report.max_gap_ns, downtime)

    run_vm_test(vms, body, timeout_s=120)


# -- the guest-progress observer ------------------------------------------------
#
# A process of its own maps the guest's RAM and watches its progress counter
# (migfd.peers.observe). A stall the destination injects after the resume it
# reports is outage that no downtime shows; one injected before it is inside the
# downtime. The observer's own stall is marked as its own.

STALL_NS = 50_000_000  # migfd.faults.STALL_S


@pytest.fixture
def spinning_guest(monkeypatch):
    """The guest runs all the time (the suite's default duty cycle halts it 90% of each ms,
    which an observer rightly sees as silence)."""
    monkeypatch.setenv("MIGFD_GUEST_DUTY", "1")


async def _observed_migration(vms, fault_phase: str) -> tuple[dict, dict]:
    d = vms.workdir
    devices = dict(objects=("memory-backend-memfd,id=ram0,size=16M,backend-transfer=on",))
    src = await vms.start("src", **devices)
    dst = await vms.start("dst", incoming="defer", **devices)
    observer = ObserverProcess([f"pid:{src.pid}", f"pid:{dst.pid}"])
    await asyncio.get_running_loop().run_in_executor(None, observer.start)
    try:
        await asyncio.sleep(0.2)
        for vm in (src, dst):
            await vm.execute("migrate-set-parameters", {"backend-transfer": True})
        await dst.execute("x-migration-fault", {"phase": fault_phase, "action": "stall"})
        await dst.execute("migrate-incoming", {"uri": f"unix:{d}/mig.sock"})
        await src.execute("migrate", {"uri": f"unix:{d}/mig.sock"})
        source = await src.wait_migration(60)
        await asyncio.sleep(0.2)  # the guest runs on the destination for a while
        assert (await dst.execute("x-query-fault"))["fired"] == [f"{fault_phase}:stall"]
    finally:
        report = await asyncio.get_running_loop().run_in_executor(None, observer.stop)
    assert source["status"] == "completed", source
    return source, report


def _outage(source: dict, report: dict):
    stop = stop_origin(Timeline.from_qmp(source["x-timeline"]))
    outage = switchover_outage(silences_of(report), (stop, stop + source["x-downtime-ns"]))
    assert outage is not None, report["silences"]
    return outage


def test_a_stall_after_the_reported_resume_is_outage_beyond_the_downtime(vms, spinning_guest):
    async def body():
        source, report = await _observed_migration(vms, "dest-resume")
        outage = _outage(source, report)
        assert outage.duration_ns - source["x-downtime-ns"] >= STALL_NS * 0.8, (outage, source["x-downtime-ns"])

    run_vm_test(vms, body, timeout_s=120)


def test_a_stall_before_the_resume_is_inside_the_downtime(vms, spinning_guest):
    async def body():
        source, report = await _observed_migration(vms, "dest-eof")
        outage = _outage(source, report)
        downtime = source["x-downtime-ns"]
        assert downtime >= STALL_NS
        assert outage.duration_ns >= downtime - 1_000_000  # the observer saw the whole pause...
        assert outage.duration_ns - downtime < STALL_NS * 0.8  # ... and the stall is not beyond it

    run_vm_test(vms, body, timeout_s=120)


def test_a_silence_of_the_observer_itself_is_marked_as_its_own(vms, spinning_guest):
    """SIGSTOP the observer: its silence is its own; SIGSTOP the VM: the guest's, not the observer's."""
    async def body():
        src = await vms.start("src", objects=("memory-backend-memfd,id=ram0,size=16M",))
        observer = ObserverProcess([f"pid:{src.pid}"])
        await asyncio.get_running_loop().run_in_executor(None, observer.start)
        try:
            await asyncio.sleep(0.2)
            marks = {}
            for who, pid in (("observer", observer.proc.pid), ("guest", src.pid)):
                start = time.monotonic_ns()
                os.kill(pid, signal.SIGSTOP)
                await asyncio.sleep(0.1)
                os.kill(pid, signal.SIGCONT)
                marks[who] = (start, time.monotonic_ns())
                await asyncio.sleep(0.2)
        finally:
            report = await asyncio.get_running_loop().run_in_executor(None, observer.stop)
        silences = silences_of(report)
        for who, (start, end) in marks.items():
            middle = (start + end) // 2
            held = [s for s in silences if s.start_ns <= middle <= s.end_ns]
            assert len(held) == 1, (who, marks, report["silences"])
            assert held[0].duration_ns >= 0.08e9, (who, held[0])
            # the observer's own stop is (nearly all) its own gap; the guest's holds at most a hiccup of it
            if who == "observer":
                assert held[0].own_gap_ns >= 0.08e9, held[0]
            else:
                assert held[0].own_gap_ns < 0.04e9, held[0]

    run_vm_test(vms, body, timeout_s=120)
