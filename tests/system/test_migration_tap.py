"""TAP backends through real migrations, with numbered frames at 20,000 per second.

Needs root and /dev/net/tun (CI has both); skips with the reason elsewhere.
Everything happens inside a network namespace the test creates, on a
persistent TAP there; the only traffic is raw 0x88B5 frames between a
FrameProbe and the guest that echoes them. With backend-transfer the TAP
queue never goes away, so every frame sent during a migration (successful,
failed or cancelled) must come back exactly once.
"""

from __future__ import annotations


import pytest
from helpers import FakeDestination, memfd_inodes, needs_tap, run_vm_test, tun_fds, wait_until

from migfd.net.netns import link_exists
from migfd.net.tun import is_tap_fd, tap_info
from migfd.peers.frames import FrameProbe, TrafficReport
from migfd.peers.migrate import migrate

pytestmark = [needs_tap, pytest.mark.timeout(120)]

RATE = 20_000
#: the probe stops by itself after this long at the latest; tests stop it sooner
PROBE_MAX_S = 40
SLOW_RAM = "memory-backend-memfd,id=ram0,size=32M,fill=on,backend-transfer=off"
SLOW_BANDWIDTH = 8 << 20


def tap_opt(ifname: str, transfer: bool = True, queues: int = 1) -> str:
    return (f"tap,id=net0,ifname={ifname},queues={queues},"
            f"backend-transfer={'on' if transfer else 'off'}")


def new_probe(tap) -> FrameProbe:
    return FrameProbe(tap.ifname, netns=tap.netns, rate_per_s=RATE, max_duration_s=PROBE_MAX_S)


async def frames_echoed(vm) -> int:
    info = await vm.execute("x-query-guest")
    return next(dev for dev in info["devices"] if dev["id"] == "net0")["frames-echoed"]


async def more_frames(probe: FrameProbe, count: int) -> None:
    """Wait until the probe has sent ``count`` more frames (the migration is behind them)."""
    target = probe.frames_sent + count
    await wait_until(lambda: probe.frames_sent >= target, what=f"{count} more frames sent")


def assert_exactly_once(report: TrafficReport) -> None:
    detail = (f"sent {report.frames_sent}, lost {len(report.lost)} (first {report.lost[:5]}), "
              f"duplicated {len(report.duplicated)}, probe drops {report.probe_drops}, "
              f"send errors {report.send_errors}")
    assert report.send_errors == 0, detail
    assert report.lost == (), detail
    assert report.duplicated == (), detail
    assert report.frames_received == report.frames_sent, detail


def test_handover_loses_and_duplicates_no_frame(netns_tap, vms):
    tap = (tap_opt(netns_tap.ifname),)

    async def body():
        src = await vms.start("src", netdevs=tap, netns=netns_tap.ns)
        dst = await vms.start("dst", netdevs=tap, incoming="defer", netns=netns_tap.ns)
        assert tun_fds(src.pid) == 1 and tun_fds(dst.pid) == 0
        probe = new_probe(netns_tap)
        try:
            probe.start()
            assert probe.wait_echoes(2000, 10), "the source guest does not echo"
            result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}", {"backend-transfer": True},
                                   timeout_s=60)
            assert result.ok, result.error
            assert result.source["x-fds-passed"] == result.destination["x-fds-passed"] == 1
            assert result.source["x-downtime-ns"] == result.destination["x-downtime-ns"]
            await wait_until(lambda: tun_fds(src.pid) == 0, what="source letting go of the TAP")
            assert tun_fds(dst.pid) == 1
            await more_frames(probe, 4000)
            # The source exits; the TAP lives on, held by the destination alone.
            await src.quit()
            assert src.proc.returncode is not None
            assert link_exists(netns_tap.ifname, netns_tap.netns)
            await more_frames(probe, 4000)
        finally:
            report = probe.stop(drain_timeout_s=5.0)
        assert_exactly_once(report)
        assert report.frames_sent > 8000
        # Each frame was echoed by exactly one of the two guests; the count travelled as state.
        assert await frames_echoed(dst) == report.frames_received

    run_vm_test(vms, body)


@pytest.mark.parametrize("netns_tap", [4], indirect=True)
def test_multi_queue_handover_passes_every_queue(netns_tap, vms):
    tap = (tap_opt(netns_tap.ifname, queues=4),)

    async def body():
        src = await vms.start("src", netdevs=tap, netns=netns_tap.ns)
        dst = await vms.start("dst", netdevs=tap, incoming="defer", netns=netns_tap.ns)
        assert tun_fds(src.pid) == 4
        probe = new_probe(netns_tap)
        try:
            probe.start()
            assert probe.wait_echoes(2000, 10)
            result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}", {"backend-transfer": True},
                                   timeout_s=60)
            assert result.ok, result.error
            assert result.source["x-fds-passed"] == result.destination["x-fds-passed"] == 4
            await wait_until(lambda: tun_fds(src.pid) == 0, what="source letting go of the queues")
            assert tun_fds(dst.pid) == 4
            echoed_before = await frames_echoed(dst)
            await more_frames(probe, 4000)
            assert await frames_echoed(dst) > echoed_before, "no frame flows on the destination"
        finally:
            report = probe.stop(drain_timeout_s=5.0)
        assert_exactly_once(report)

    run_vm_test(vms, body)


@pytest.mark.parametrize("how", ["kill-destination", "cancel"])
def test_failed_or_cancelled_handover_loses_no_frame(netns_tap, vms, how):
    """Slow precopy of copied RAM gives time to fail it; the TAP would have been handed over."""
    devices = dict(objects=(SLOW_RAM,), netdevs=(tap_opt(netns_tap.ifname),), netns=netns_tap.ns)

    async def body():
        src = await vms.start("src", dirty_rate_bytes_s=1 << 20, **devices)
        dst = await vms.start("dst", incoming="defer", **devices)
        for vm in (src, dst):
            await vm.execute("migrate-set-parameters", {"backend-transfer": True,
                                                        "max-bandwidth": SLOW_BANDWIDTH})
        probe = new_probe(netns_tap)
        try:
            probe.start()
            assert probe.wait_echoes(2000, 10)
            await dst.execute("migrate-incoming", {"uri": f"unix:{vms.path('mig.sock')}"})
            await src.execute("migrate", {"uri": f"unix:{vms.path('mig.sock')}"})
            await wait_until(lambda: _precopy_running(src, dst), what="precopy under way")
            if how == "cancel":
                await src.execute("migrate_cancel")
                info = await src.wait_migration(30)
                assert info["status"] == "cancelled"
                assert (await dst.wait_migration(30))["status"] == "failed"
                await wait_until(lambda: tun_fds(dst.pid) == 0 and not memfd_inodes(dst.pid),
                                 what="destination holding nothing")
            else:
                dst.kill()
                info = await src.wait_migration(30)
                assert info["status"] == "failed"
            assert (await src.execute("query-status"))["status"] == "running"
            assert tun_fds(src.pid) == 1
            echoed = await frames_echoed(src)
            await more_frames(probe, 4000)
            assert await frames_echoed(src) > echoed, "the source no longer echoes"
        finally:
            report = probe.stop(drain_timeout_s=5.0)
        assert_exactly_once(report)
        assert await frames_echoed(src) == report.frames_received
        ram = (await src.execute("x-query-guest", {"verify": True}))["ram-verify"]["ram0"]
        assert ram["ok"]

    run_vm_test(vms, body)


async def _precopy_running(src, dst) -> bool:
    info = await src.execute("query-migrate")
    return info.get("status") == "active" and bool(memfd_inodes(dst.pid))


def test_destination_refusing_state_after_the_tap_arrived_loses_no_frame(netns_tap, vms):
    """The TAP fd reaches the destination, which then fails to load: the source resumes."""
    tap = (tap_opt(netns_tap.ifname),)

    async def body():
        src = await vms.start("src", netdevs=tap, netns=netns_tap.ns,
                              chardevs=(f"socket,id=ch0,path={vms.path('a.sock')},server=on",))
        dst = await vms.start("dst", netdevs=tap, netns=netns_tap.ns, incoming="defer",
                              chardevs=(f"socket,id=ch0,path={vms.path('b.sock')},server=on",))
        probe = new_probe(netns_tap)
        try:
            probe.start()
            assert probe.wait_echoes(2000, 10)
            result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}", {"backend-transfer": True},
                                   timeout_s=30)
            d = await dst.wait_migration(30)
            assert result.source["status"] == "failed" and d["status"] == "failed"
            assert d["x-fds-passed"] == 1, "the TAP fd did not reach the destination"
            assert (await src.execute("query-status"))["status"] == "running"
            await wait_until(lambda: tun_fds(dst.pid) == 0, what="destination closing the TAP it received")
            assert tun_fds(src.pid) == 1
            await more_frames(probe, 4000)
        finally:
            report = probe.stop(drain_timeout_s=5.0)
        assert_exactly_once(report)
        assert await frames_echoed(src) == report.frames_received

    run_vm_test(vms, body)


@pytest.mark.parametrize("how", ["cancel", "destination-vanishes"])
def test_failure_after_the_tap_fd_left_loses_no_frame(netns_tap, vms, how):
    """The source is stopped with its TAP fd on the wire, waiting for the commit point;
    a cancel, or a destination that vanishes, resumes it and every frame comes back once."""
    tap = (tap_opt(netns_tap.ifname),)

    async def body():
        src = await vms.start("src", netdevs=tap, netns=netns_tap.ns)
        fake = FakeDestination(vms.path("mig.sock"), answer=None if how == "cancel" else "close")
        probe = new_probe(netns_tap)
        try:
            probe.start()
            assert probe.wait_echoes(2000, 10)
            await src.execute("migrate-set-parameters", {"backend-transfer": True})
            await src.execute("migrate", {"uri": f"unix:{vms.path('mig.sock')}"})
            await wait_until(fake.pinged.is_set, what="the source asking for the commit point")
            assert fake.error is None, fake.error
            # The TAP queue really left: the fake destination holds an fd of that TAP.
            assert len(fake.fds) == 1 and is_tap_fd(fake.fds[0])
            assert tap_info(fake.fds[0]).ifname == netns_tap.ifname
            if how == "cancel":
                assert (await src.execute("query-status"))["status"] == "finish-migrate"
                await more_frames(probe, 1000)  # frames wait in the TAP queue meanwhile
                await src.execute("migrate_cancel")
            info = await src.wait_migration(30)
            assert info["status"] == ("cancelled" if how == "cancel" else "failed")
            assert (await src.execute("query-status"))["status"] == "running"
            assert tun_fds(src.pid) == 1
            await more_frames(probe, 4000)
        finally:
            fake.close()
            report = probe.stop(drain_timeout_s=5.0)
        assert_exactly_once(report)
        assert await frames_echoed(src) == report.frames_received

    run_vm_test(vms, body)


def test_state_copy_reattaches_the_tap_and_frames_resume(netns_tap, vms, record_property):
    tap = (tap_opt(netns_tap.ifname, transfer=False),)

    async def body():
        src = await vms.start("src", netdevs=tap, netns=netns_tap.ns)
        dst = await vms.start("dst", netdevs=tap, incoming="defer", netns=netns_tap.ns)
        probe = new_probe(netns_tap)
        try:
            probe.start()
            assert probe.wait_echoes(2000, 10)
            result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}", {"backend-transfer": True},
                                   timeout_s=60)
            assert result.ok, result.error
            assert result.source["x-fds-passed"] == 0  # the device copies state: it cannot hand over
            sent_at_completion = probe.frames_sent
            await wait_until(lambda: tun_fds(src.pid) == 0, what="source detached")
            assert tun_fds(dst.pid) == 1  # attached again by name
            echoed_before = await frames_echoed(dst)
            await more_frames(probe, 4000)
            assert await frames_echoed(dst) > echoed_before
        finally:
            report = probe.stop(drain_timeout_s=5.0)
        after = sum(1 for seq in report.received if seq >= sent_at_completion)
        assert after > 0, "no echo after the state-copy migration"
        assert report.duplicated == ()
        record_property("frames_lost_state_copy", len(report.lost))
        print(f"state copy with TAP: {len(report.lost)} of {report.frames_sent} frames lost, "
              f"downtime {result.source['x-downtime-us']} us")

    run_vm_test(vms, body)
