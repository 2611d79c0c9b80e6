"""x-early-fds: the backends' fds go during setup, while the guest runs (cpr-transfer's order).

Real ``migfd vm`` processes. The switchover then carries the devices' state
without their fds; a backend that changed after the early fds (a chardev
client that reconnected) sends its fds again at the switchover. What the
fault matrix checks for the phases around the early fds (nothing lost,
every fd closed once, the source resumes) is in test_reliability.py.
"""

from __future__ import annotations

import socket

import pytest
from helpers import memfd_inodes, needs_tap, run_vm_test, sockets_of, tun_fds, wait_until

from migfd.peers.chardev import ChardevClient
from migfd.peers.frames import FrameProbe
from migfd.peers.migrate import migrate

pytestmark = pytest.mark.timeout(120)

RAM = "memory-backend-memfd,id=ram0,size=16M,fill=on,backend-transfer=on"


def chardev(path: str) -> str:
    return f"socket,id=ch0,path={path},server=on,backend-transfer=on"


def phases(info: dict) -> dict[str, tuple[int, int]]:
    """Each phase of a side's x-timeline by name (the first of that name): (start, end)."""
    out: dict[str, tuple[int, int]] = {}
    for p in info["x-timeline"]:
        out.setdefault(p["phase"], (p["start-ns"], p["end-ns"]))
    return out


async def chardev_info(vm) -> dict:
    return next(d for d in (await vm.execute("x-query-guest"))["devices"] if d["id"] == "ch0")


@needs_tap
def test_early_fds_hand_everything_over_before_the_stop(vms, netns_tap):
    path = vms.path("ch0.sock")
    devices = dict(objects=(RAM,), chardevs=(chardev(path),),
                   netdevs=(f"tap,id=net0,ifname={netns_tap.ifname},backend-transfer=on",), netns=netns_tap.ns)

    async def body():
        src = await vms.start("src", **devices)
        dst = await vms.start("dst", incoming="defer", **devices)
        client = ChardevClient(path, rate_per_s=500)
        probe = FrameProbe(netns_tap.ifname, netns=netns_tap.netns, rate_per_s=5000, max_duration_s=30)
        client.start()
        probe.start()
        try:
            assert client.wait_echoes(20) and probe.wait_echoes(500, 10)
            src_memfds, src_sockets = memfd_inodes(src.pid), sockets_of(src.pid)
            result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}",
                                   {"backend-transfer": True, "x-early-fds": True}, timeout_s=60)
            assert result.ok, result.error
            assert client.wait_echoes(len(client.echoed) + 50), "no echo from the destination"
            await wait_until(lambda: tun_fds(src.pid) == 0, what="source letting go of the TAP")
        finally:
            report = client.stop(drain_s=2.0)
            traffic = probe.stop(drain_timeout_s=2.0)
        s, d = result.source, result.destination
        # memfd, TAP queue, chardev listener and client: all four went early, none at the switchover.
        assert s["x-fds-passed"] == d["x-fds-passed"] == 4
        assert s["x-early-fds-passed"] == d["x-early-fds-passed"] == 4
        src_phases, dst_phases = phases(s), phases(d)
        assert src_phases["early-fds"][1] < src_phases["stop"][0]
        for section in ("ram0/memory-backend-memfd", "net0/tap", "ch0/chardev-socket"):
            assert dst_phases[f"early-load:{section}"][1] < dst_phases["switchover-start"][0], section
        # The very objects the source had, and nothing lost on the way.
        assert memfd_inodes(dst.pid) == src_memfds
        assert sockets_of(dst.pid) & src_sockets
        assert report.reconnects == 0 and not report.lost, report
        assert traffic.frames_sent and not traffic.lost and not traffic.duplicated
        ram = (await dst.execute("x-query-guest", {"verify": True}))["ram-verify"]["ram0"]
        assert ram["ok"], ram

    run_vm_test(vms, body)


def test_a_client_that_reconnects_after_the_early_fds_is_handed_over_again(vms):
    """The chardev's backend changes between the early fds and the stop: the switchover sends
    the new client's socket, and the destination serves it (the old one it had is closed)."""
    path = vms.path("ch0.sock")
    devices = dict(objects=(RAM,), chardevs=(chardev(path),))

    def echo(sock: socket.socket, line: bytes) -> None:
        sock.sendall(line)
        got = b""
        while not got.endswith(b"\n"):
            chunk = sock.recv(64)
            assert chunk, "the chardev closed the connection"
            got += chunk
        assert got == line

    async def body():
        src = await vms.start("src", **devices)
        dst = await vms.start("dst", incoming="defer", **devices)
        first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        first.settimeout(10)
        first.connect(path)
        echo(first, b"first\n")
        params = {"backend-transfer": True, "x-early-fds": True}
        for vm in (src, dst):
            await vm.execute("migrate-set-parameters", params)
        await dst.execute("migrate-incoming", {"uri": f"unix:{vms.path('mig.sock')}"})
        await src.execute("x-migration-fault", {"phase": "early-fds", "action": "pause"})
        await src.execute("migrate", {"uri": f"unix:{vms.path('mig.sock')}"})
        await wait_until(lambda: _paused(src), what="source paused after the early fds")
        connections = (await chardev_info(src))["connections"]
        # The client the destination was given early goes; another connects to the source.
        first.close()
        second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        second.settimeout(10)
        try:
            second.connect(path)
            echo(second, b"second\n")
            assert (await chardev_info(src))["connections"] == connections + 1
            await src.execute("x-migration-continue")
            source = await src.wait_migration(60)
            assert source["status"] == "completed", source.get("error-desc")
            destination = await dst.wait_migration(30)
            # 3 early (memfd, listener, first client), the listener and the new client again.
            assert source["x-early-fds-passed"] == destination["x-early-fds-passed"] == 3
            assert source["x-fds-passed"] == destination["x-fds-passed"] == 5
            before = (await chardev_info(dst))["lines-echoed"]
            echo(second, b"third\n")
            # the destination counts a line once its echo has left
            await wait_until(lambda: _echoed(dst, before + 1), what="the destination echoing the new client")
        finally:
            second.close()

    run_vm_test(vms, body)


async def _echoed(vm, lines: int) -> bool:
    return (await chardev_info(vm))["lines-echoed"] == lines


async def _paused(vm) -> bool:
    return (await vm.execute("x-query-fault"))["paused-at"] == "early-fds"
