"""Two real ``migfd vm`` processes migrating guest RAM (memfd) and a socket chardev.

No privileges needed. Every VM is driven with qemu.qmp exactly as QEMU would be.
What is checked is the user-visible truth of a migration: the RAM content on the
side that runs, who holds which kernel object afterwards (/proc/PID/fd), whether
the chardev peer had to reconnect or lost a line, what query-migrate and the
MIGRATION events say on both sides; and, for failures and cancels before the
commit point, that the source runs on with every backend and the destination
holds nothing it received.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import socket
import subprocess
import sys
import termios
import time

import pytest
import numpy as np
from helpers import (
    FakeDestination, connect_as_source, memfd_inodes, proc_fds, run_vm_test, sockets_of, wait_until,
)
from qemu.qmp import EventListener, ExecuteError

from migfd.layout import first_data_page
from migfd.peers.chardev import ChardevClient
from migfd.peers.migrate import migrate
from migfd.params import MigrationParameters
from migfd.stream import MemorySink, PageBatch, RamBlock, StreamWriter

pytestmark = pytest.mark.timeout(120)

UNIX_REQUIRED = ("Migration requires a UNIX domain socket as transport, "
                 "because backend-transfer is enabled")

RAM_MIB = 32


def data_pages(size_mib: int) -> int:
    """4 KiB pages of a memfd of ``size_mib`` MiB, less the firmware area and the generation table."""
    pages = size_mib * 256
    return pages - first_data_page(pages)


RAM_DATA_PAGES = data_pages(RAM_MIB)
SLOW_RAM_MIB = 32
#: max-bandwidth that makes one precopy pass of SLOW_RAM_MIB filled RAM take about 4 s
#: (pages go out in batches of BATCH_PAGES, each followed by the pause that keeps to the bandwidth)
SLOW_BANDWIDTH = 8 << 20


def ram_opt(transfer: bool, size_mib: int = RAM_MIB, dev_id: str = "ram0") -> str:
    return (f"memory-backend-memfd,id={dev_id},size={size_mib}M,fill=on,"
            f"backend-transfer={'on' if transfer else 'off'}")


def chardev_opt(path: str, transfer: bool = True) -> str:
    return f"socket,id=ch0,path={path},server=on,backend-transfer={'on' if transfer else 'off'}"


async def verify_ram(vm) -> dict:
    info = await vm.execute("x-query-guest", {"verify": True})
    return info["ram-verify"]


async def status(vm) -> str:
    return (await vm.execute("query-status"))["status"]


def listen_migration(vm) -> EventListener:
    listener = EventListener("MIGRATION")
    vm.qmp.register_listener(listener)
    return listener


def statuses(listener: EventListener) -> list[str]:
    return [event["data"]["status"] for event in listener.history]


# -- 1. a successful live migration, with and without backend-transfer --------------


@pytest.mark.parametrize("transfer", [True, False], ids=["backend-transfer", "state-copy"])
def test_live_migration_ram_and_chardev(vms, transfer):
    chardev = vms.path("ch0.sock")
    objects = (ram_opt(True),)  # the device *can* hand over; the parameter decides
    chardevs = (chardev_opt(chardev),)
    dirty = 4 << 20

    async def body():
        src = await vms.start("src", objects=objects, chardevs=chardevs, dirty_rate_bytes_s=dirty)
        dst = await vms.start("dst", objects=objects, chardevs=chardevs, dirty_rate_bytes_s=dirty,
                              incoming="defer")
        src_events, dst_events = listen_migration(src), listen_migration(dst)
        client = ChardevClient(chardev, rate_per_s=500)
        client.start()
        try:
            assert client.wait_echoes(20), "the source guest does not echo"
            # The guest dirties RAM while it runs: wait until it has really done so.
            before = await wait_until(lambda: _stamped(src, minimum=1), what="guest dirtying RAM")
            src_memfds = memfd_inodes(src.pid)
            src_sockets = sockets_of(src.pid)
            dst_sockets = sockets_of(dst.pid)
            assert len(src_memfds) == 1 and memfd_inodes(dst.pid) == set()

            started_ns = time.monotonic_ns()
            result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}",
                                   {"backend-transfer": transfer}, timeout_s=60)
            ended_ns = time.monotonic_ns()
            assert result.ok, result.error
            echoed_at_completion = len(client.echoed)
            assert client.wait_echoes(echoed_at_completion + 50), "no echo from the destination"

            # Who holds what, while the chardev client is still connected.
            await wait_until(lambda: not memfd_inodes(src.pid), what="source closing its memfd")
            dst_memfds = memfd_inodes(dst.pid)
            assert len(dst_memfds) == 1
            if transfer:
                # The very memfd and the very sockets of the source, and nothing else new.
                assert dst_memfds == src_memfds
                received = await wait_until(lambda: _new_sockets(dst.pid, dst_sockets, 2),
                                            what="destination holding exactly the two chardev sockets")
                assert received <= src_sockets, "the destination's chardev sockets are not the source's"
                assert not received & sockets_of(src.pid), "the source still holds the chardev sockets"
            else:
                assert dst_memfds != src_memfds  # a new memfd the pages were copied into
                assert not (sockets_of(dst.pid) - dst_sockets) & src_sockets
        finally:
            report = client.stop(drain_s=5.0)

        s, d = result.source, result.destination
        for info in (s, d):
            assert info["status"] == "completed"
        # One downtime across both processes: from the source's stop to the destination's
        # resume, each on its own side's timeline (one host clock, CLOCK_MONOTONIC, as this
        # process's), inside this migration; both sides report it, in ms and in ns.
        stop_ns = _phase(s, "stop")[0]
        resume_start, resume_end = _phase(d, "resume")
        assert started_ns < stop_ns < resume_start <= resume_end < ended_ns
        for info in (s, d):
            assert resume_start - stop_ns <= info["x-downtime-ns"] <= resume_end - stop_ns
            assert info["downtime"] == info["x-downtime-ns"] // 1_000_000
        assert await status(src) == "postmigrate"
        assert await status(dst) == "running"

        for listener in (src_events, dst_events):
            await wait_until(lambda: "completed" in statuses(listener), what="MIGRATION completed event")
        for wanted in ("setup", "active", "completed"):
            assert wanted in statuses(src_events)
            assert wanted in statuses(dst_events)
        seen = statuses(src_events)
        assert seen.index("setup") < seen.index("active") < seen.index("completed")

        # RAM content verifies on the destination, including what the guest wrote
        # before and during the migration (fill=on stamps every data page).
        ram = (await verify_ram(dst))["ram0"]
        assert ram["ok"] and ram["bad-pages"] == 0
        assert ram["pages-stamped"] == RAM_DATA_PAGES
        dst_guest = await dst.execute("x-query-guest")
        dst_ram_info = next(dev for dev in dst_guest["devices"] if dev["id"] == "ram0")
        assert dst_ram_info["pages-dirtied"] >= before

        if transfer:
            for info in (s, d):
                assert info["ram"]["transferred"] == 0
                assert info["ram"]["normal"] == 0 and info["ram"]["duplicate"] == 0
                assert info["ram"]["total"] == 0
                assert info["x-fds-passed"] == 3  # memfd + chardev listener + chardev client
            assert report.reconnects == 0, report
            assert report.lost == [], f"lines lost: {report.lost[:10]}"
            assert client.error is None
        else:
            assert s["ram"]["normal"] > 0 and s["ram"]["transferred"] > 0
            assert d["ram"]["normal"] == s["ram"]["normal"]
            assert s["ram"]["total"] == RAM_MIB << 20
            for info in (s, d):
                assert info["x-fds-passed"] == 0
            assert report.reconnects >= 1, "state copy must make the chardev client reconnect"

    run_vm_test(vms, body)


async def _stamped(vm, minimum: int) -> int:
    info = await vm.execute("x-query-guest")
    dirtied = next(dev for dev in info["devices"] if dev["id"] == "ram0")["pages-dirtied"]
    return dirtied if dirtied >= minimum else 0


def _phase(info: dict, name: str) -> tuple[int, int]:
    """(start, end) ns of the one phase ``name`` of a side's query-migrate timeline."""
    (phase,) = [p for p in info["x-timeline"] if p["phase"] == name]
    return phase["start-ns"], phase["end-ns"]


def _new_sockets(pid: int, before: set[str], count: int) -> set[str] | None:
    new = sockets_of(pid) - before
    return new if len(new) == count else None


# -- 2. the transport check, over QMP ----------------------------------------------------


def test_transport_check_refuses_tcp_and_file_at_once(vms, tcp_listener):
    chardev = vms.path("ch0.sock")
    objects = (ram_opt(True, 16),)
    chardevs = (chardev_opt(chardev),)
    port = tcp_listener.getsockname()[1]
    stream = vms.path("out.bin")

    async def body():
        src = await vms.start("src", objects=objects, chardevs=chardevs)
        dst = await vms.start("dst", objects=objects, chardevs=chardevs, incoming="defer")
        for vm in (src, dst):
            await vm.execute("migrate-set-parameters", {"backend-transfer": True})

        inet = [{"channel-type": "main", "addr": {"transport": "socket", "type": "inet",
                                                  "host": "127.0.0.1", "port": str(port)}}]
        for args in ({"uri": f"tcp:127.0.0.1:{port}"}, {"channels": inet}, {"uri": f"file:{stream}"}):
            with pytest.raises(ExecuteError) as info:
                await src.execute("migrate", args)
            assert str(info.value) == UNIX_REQUIRED
            assert info.value.error_class == "GenericError"
            assert await status(src) == "running"
            assert await src.execute("query-migrate") == {}, "a migration was started"
        with pytest.raises(BlockingIOError):
            tcp_listener.accept()  # nobody ever connected
        assert not os.path.exists(stream)

        free_port = _free_port()
        for uri in (f"tcp:127.0.0.1:{free_port}", f"file:{stream}"):
            with pytest.raises(ExecuteError) as info:
                await dst.execute("migrate-incoming", {"uri": uri})
            assert str(info.value) == UNIX_REQUIRED
            assert await status(dst) == "inmigrate"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", free_port), timeout=2).close()

        # The refusals changed nothing: the same pair now migrates over UNIX.
        result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}", timeout_s=60)
        assert result.ok, result.error
        assert result.source["x-fds-passed"] == 2  # the memfd, the chardev listener
        assert (await verify_ram(dst))["ram0"]["ok"]

    run_vm_test(vms, body)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fd_channel_of_a_unix_socket_is_accepted_others_refused(vms):
    chardev = vms.path("ch0.sock")

    async def body():
        src = await vms.start("src", objects=(ram_opt(True, 16),), chardevs=(chardev_opt(chardev),))
        await src.execute("migrate-set-parameters", {"backend-transfer": True})
        client = ChardevClient(chardev, rate_per_s=200)
        client.start()
        try:
            assert client.wait_echoes(5)
            # Not UNIX sockets: refused by name, and the fds the VM took are closed.
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            r, w = os.pipe()
            refused = []
            try:
                for name, fd in (("tcp", tcp.fileno()), ("pipe", w)):
                    refused.append(f"{_link_of(fd)}")
                    src.qmp.send_fd_scm(fd)
                    await src.execute("getfd", {"fdname": name})
                    with pytest.raises(ExecuteError) as info:
                        await src.execute("migrate", {"uri": f"fd:{name}"})
                    assert str(info.value) == UNIX_REQUIRED
            finally:
                tcp.close()
                os.close(r)
                os.close(w)
            assert await src.execute("query-migrate") == {}

            # An AF_UNIX socket is a UNIX domain socket: accepted, and used.
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            passed = _link_of(theirs.fileno())
            try:
                src.qmp.send_fd_scm(theirs.fileno())
                theirs.close()
                await src.execute("getfd", {"fdname": "mig"})
                await src.execute("migrate", {"uri": "fd:mig"})
                head, fds = _recv_with_fds(ours, 8)
                assert head == b"QEVM\x00\x00\x00\x03"
                for fd in fds:
                    os.close(fd)
            finally:
                ours.close()  # no destination: the migration fails before the commit point
            info = await src.wait_migration(30)
            assert info["status"] == "failed"
            assert await status(src) == "running"
            assert (await verify_ram(src))["ram0"]["ok"]
            assert client.wait_echoes(len(client.echoed) + 20)
            # The VM owned the fds it took with getfd and closed them.
            await wait_until(lambda: not set(refused + [passed]) & set(proc_fds(src.pid)),
                             what="VM closing the fds given to migrate")
        finally:
            report = client.stop(drain_s=5.0)
        assert report.reconnects == 0 and report.lost == []

    run_vm_test(vms, body)


def _link_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def _recv_with_fds(sock: socket.socket, size: int) -> tuple[bytes, list[int]]:
    """Read exactly ``size`` bytes, keeping every fd that comes along (to close it)."""
    data, fds = b"", []
    sock.settimeout(10)
    while len(data) < size:
        chunk, ancdata, _, _ = sock.recvmsg(size - len(data), socket.CMSG_SPACE(253 * 4))
        if not chunk:
            break
        data += chunk
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += list(memoryview(payload).cast("i"))
    return data, fds


# -- failures before the commit point ---------------------------------------------------


@pytest.mark.parametrize("src_params, dst_params, error", [
    ({"backend-transfer": True}, {"backend-transfer": False},
     "Capability 'backend-transfer' is on on the source but off on the destination"),
    ({"backend-transfer": True, "x-fds-per-message": 253}, {"backend-transfer": True},
     "Capability 'x-fds-per-message' is on on the source (more than 16 fds in one message) "
     "but off on the destination (x-fds-per-message 16)"),
], ids=["backend-transfer", "x-fds-per-message"])
def test_capability_mismatch_fails_and_source_keeps_its_backends(vms, src_params, dst_params, error):
    chardev = vms.path("ch0.sock")
    objects = (ram_opt(True, 16),)
    chardevs = (chardev_opt(chardev),)

    async def body():
        src = await vms.start("src", objects=objects, chardevs=chardevs, dirty_rate_bytes_s=1 << 20)
        dst = await vms.start("dst", objects=objects, chardevs=chardevs, incoming="defer")
        client = ChardevClient(chardev, rate_per_s=500)
        client.start()
        try:
            assert client.wait_echoes(10)
            src_memfds = memfd_inodes(src.pid)
            src_sockets = sockets_of(src.pid)
            dst_sockets = sockets_of(dst.pid)
            await src.execute("migrate-set-parameters", src_params)
            await dst.execute("migrate-set-parameters", dst_params)
            await dst.execute("migrate-incoming", {"uri": f"unix:{vms.path('mig.sock')}"})
            await src.execute("migrate", {"uri": f"unix:{vms.path('mig.sock')}"})
            s = await src.wait_migration(30)
            d = await dst.wait_migration(30)
            assert s["status"] == "failed"
            assert d["status"] == "failed"
            assert d["error-desc"] == error
            assert await status(src) == "running"
            assert await status(dst) == "inmigrate"
            # The source kept every backend: the same memfd, the same connected sockets.
            assert memfd_inodes(src.pid) == src_memfds
            assert src_sockets <= sockets_of(src.pid)
            ram = (await verify_ram(src))["ram0"]
            assert ram["ok"] and ram["pages-stamped"] == data_pages(16)
            assert client.wait_echoes(len(client.echoed) + 50), "the source no longer echoes"
            # The destination holds nothing it may have received.
            await wait_until(lambda: not memfd_inodes(dst.pid) and sockets_of(dst.pid) <= dst_sockets,
                             what="destination holding no received fd")
        finally:
            report = client.stop(drain_s=5.0)
        assert report.reconnects == 0 and report.lost == [], report

    run_vm_test(vms, body)


def test_destination_refusing_device_state_closes_every_fd_it_received(vms):
    """The fds travel, the destination fails while loading, before the PONG."""
    chardev = vms.path("ch0.sock")
    objects = (ram_opt(True, 16),)

    async def body():
        src = await vms.start("src", objects=objects, chardevs=(chardev_opt(chardev),))
        # Same devices, but the chardev listens elsewhere: its state does not load.
        dst = await vms.start("dst", objects=objects, chardevs=(chardev_opt(vms.path("other.sock")),),
                              incoming="defer")
        client = ChardevClient(chardev, rate_per_s=500)
        client.start()
        try:
            assert client.wait_echoes(10)
            src_memfds = memfd_inodes(src.pid)
            dst_sockets = sockets_of(dst.pid)
            result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}", {"backend-transfer": True},
                                   timeout_s=30)
            d = await dst.wait_migration(30)
            assert result.source["status"] == "failed"
            assert d["status"] == "failed"
            assert "listens on" in d["error-desc"]
            assert d["x-fds-passed"] == 3, "the fds did not reach the destination"
            assert await status(src) == "running"
            assert memfd_inodes(src.pid) == src_memfds
            assert (await verify_ram(src))["ram0"]["ok"]
            assert client.wait_echoes(len(client.echoed) + 50)
            await wait_until(lambda: not memfd_inodes(dst.pid) and sockets_of(dst.pid) <= dst_sockets,
                             what="destination closing the memfd and sockets it received")
            assert not any(link.startswith("/memfd:") for link in proc_fds(dst.pid))
        finally:
            report = client.stop(drain_s=5.0)
        assert report.reconnects == 0 and report.lost == [], report

    run_vm_test(vms, body)


async def _slow_pair(vms, chardev: str):
    """A source whose copied RAM takes seconds to precopy, plus a handed-over chardev."""
    objects = (ram_opt(False, SLOW_RAM_MIB), )
    chardevs = (chardev_opt(chardev),)
    src = await vms.start("src", objects=objects, chardevs=chardevs, dirty_rate_bytes_s=1 << 20)
    dst = await vms.start("dst", objects=objects, chardevs=chardevs, incoming="defer")
    for vm in (src, dst):
        await vm.execute("migrate-set-parameters", {"backend-transfer": True,
                                                    "max-bandwidth": SLOW_BANDWIDTH})
    return src, dst


async def _precopy_running(src, dst) -> bool:
    """The source is in precopy and the destination has the RAM block list (its memfd exists)."""
    info = await src.execute("query-migrate")
    return info.get("status") == "active" and bool(memfd_inodes(dst.pid))


@pytest.mark.parametrize("how", ["cancel", "kill-destination"])
def test_failure_or_cancel_during_precopy_leaves_the_source_whole(vms, how):
    chardev = vms.path("ch0.sock")

    async def body():
        src, dst = await _slow_pair(vms, chardev)
        client = ChardevClient(chardev, rate_per_s=500)
        client.start()
        try:
            assert client.wait_echoes(10)
            src_memfds = memfd_inodes(src.pid)
            src_sockets = sockets_of(src.pid)
            dst_sockets = sockets_of(dst.pid)
            await dst.execute("migrate-incoming", {"uri": f"unix:{vms.path('mig.sock')}"})
            await src.execute("migrate", {"uri": f"unix:{vms.path('mig.sock')}"})
            await wait_until(lambda: _precopy_running(src, dst), what="precopy under way")

            # One migration at a time, and what shapes its stream is fixed while it runs.
            with pytest.raises(ExecuteError) as info:
                await src.execute("migrate", {"uri": f"unix:{vms.path('other.sock')}"})
            assert "in progress" in str(info.value)
            with pytest.raises(ExecuteError) as info:
                await src.execute("migrate-set-parameters", {"backend-transfer": False})
            assert "in progress" in str(info.value)

            if how == "cancel":
                await src.execute("migrate_cancel")
                s = await src.wait_migration(30)
                assert s["status"] == "cancelled"
                d = await dst.wait_migration(30)
                assert d["status"] == "failed"
                # The destination closed the RAM it was filling and the channel.
                await wait_until(lambda: not memfd_inodes(dst.pid) and sockets_of(dst.pid) <= dst_sockets,
                                 what="destination dropping everything after the cancel")
            else:
                dst.kill()
                s = await src.wait_migration(30)
                assert s["status"] == "failed"
            assert 0 < s["x-bytes-sent"] < SLOW_RAM_MIB << 20, "precopy was not interrupted"
            assert await status(src) == "running"
            assert memfd_inodes(src.pid) == src_memfds
            assert src_sockets <= sockets_of(src.pid)
            ram = (await verify_ram(src))["ram0"]
            assert ram["ok"] and ram["bad-pages"] == 0
            assert client.wait_echoes(len(client.echoed) + 50), "the source no longer echoes"
        finally:
            report = client.stop(drain_s=5.0)
        assert report.reconnects == 0 and report.lost == [], report

    run_vm_test(vms, body)


def test_state_copy_of_scattered_pages_among_zero_ones_loads_every_page(vms):
    """RAM never filled, with pages stamped here and there by the guest: the copy is
    runs of normal pages broken by zero pages and jumps, which is where the
    destination's guessed reads (pages received straight into RAM, on the guess
    that they go on from the last one) guess wrong and must give the bytes back."""
    objects = (f"memory-backend-memfd,id=ram0,size={RAM_MIB}M,backend-transfer=off",)

    async def body():
        src = await vms.start("src", objects=objects, dirty_rate_bytes_s=4 << 20)
        dst = await vms.start("dst", objects=objects, incoming="defer")
        stamped = data_pages(RAM_MIB) // 8
        await wait_until(lambda: _stamped(src, stamped), timeout_s=60, what=f"{stamped} pages stamped")
        result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}", {"x-max-iterations": 0},
                               timeout_s=60)
        assert result.ok, result.error
        ram = (await verify_ram(dst))["ram0"]
        assert ram["ok"] and ram["bad-pages"] == 0
        assert 0 < ram["pages-stamped"] < data_pages(RAM_MIB)  # zero pages between them

    run_vm_test(vms, body)


@pytest.mark.parametrize("cut", ["after page 3", "inside page 4", "inside zero page 6"])
def test_a_wrong_guess_gives_its_bytes_back_to_the_reader_at_their_offset(vms, thread_accel, cut):
    """The destination loads the pages before the cut, then waits holding at most the
    start of a record: it guesses that the next pages come, in order. Two more do,
    then a zero page, a page, the section's end and a byte no stream may hold. Every
    byte after the guessed records, the held ones included, must reach the reader
    once, in order, at its stream offset: the error names that byte, where it is."""
    async def body():
        dst, f = await connect_as_source(vms, ("memory-backend-memfd,id=ram0,size=1M",), {})
        sink = MemorySink()
        w = StreamWriter(sink)
        w.write_header()
        w.write_configuration("migfd-pc", MigrationParameters().capabilities())
        w.write_ram_start([RamBlock("ram0", 1 << 20)])
        rows = np.full((8, 4096), 0x42, dtype=np.uint8)
        rows[6] = 0  # a zero page breaks the run
        w.write_ram_part([PageBatch("ram0", np.arange(8, dtype=np.uint64) * 4096, rows)])
        data = sink.getvalue() + b"\x7f"
        record = {"after page 3": (3, 8 + 4096), "inside page 4": (4, 100), "inside zero page 6": (6, 5)}[cut]
        word = record[0] * 4096 | (0x22 if record[0] == 6 else 0x28)  # ZERO or PAGE, CONTINUE
        at = data.index(word.to_bytes(8, "big")) + record[1]
        try:
            f.put_buffer(data[:at])
            f.flush()
            sock = f._sock
            await wait_until(lambda: fcntl.ioctl(sock, termios.TIOCOUTQ, b"\0\0\0\0") == b"\0\0\0\0",
                             what="the destination reading up to the cut")
            await asyncio.sleep(0.2)  # and parsing it: it waits for more, guessing
            f.put_buffer(data[at:])
            f.flush()
            info = await dst.wait_migration(30)
        finally:
            f.close()
        assert info["status"] == "failed"
        assert f"unknown section type 0x7f (at byte offset {len(data) - 1})" in info["error-desc"], info

    run_vm_test(vms, body)


def test_cancelled_source_can_migrate_again(vms):
    """After a cancel the source is whole enough for a second, successful migration."""
    chardev = vms.path("ch0.sock")

    async def body():
        src, dst = await _slow_pair(vms, chardev)
        await dst.execute("migrate-incoming", {"uri": f"unix:{vms.path('mig.sock')}"})
        await src.execute("migrate", {"uri": f"unix:{vms.path('mig.sock')}"})
        await wait_until(lambda: _precopy_running(src, dst), what="precopy under way")
        await src.execute("migrate_cancel")
        assert (await src.wait_migration(30))["status"] == "cancelled"
        dst2 = await vms.start("dst2", objects=(ram_opt(False, SLOW_RAM_MIB),),
                               chardevs=(chardev_opt(chardev),), incoming="defer")
        await src.execute("migrate-set-parameters", {"max-bandwidth": 512 << 20})
        result = await migrate(src, dst2, f"unix:{vms.path('mig2.sock')}",
                               {"backend-transfer": True, "max-bandwidth": 512 << 20}, timeout_s=60)
        assert result.ok, result.error
        ram = (await verify_ram(dst2))["ram0"]
        assert ram["ok"] and ram["pages-stamped"] == data_pages(SLOW_RAM_MIB)
        # Every page went again (the cancel marked all RAM dirty): none were skipped.
        assert result.source["ram"]["normal"] + result.source["ram"]["duplicate"] >= SLOW_RAM_MIB * 256

    run_vm_test(vms, body)


# -- 3c. file: migration: a stream inspect reads and a new destination loads -------------


def test_file_migration_is_inspected_and_loaded(vms):
    chardev = vms.path("ch0.sock")
    objects = (ram_opt(True, 16),)
    chardevs = (chardev_opt(chardev),)
    stream = vms.path("vm.bin")

    async def body():
        src = await vms.start("src", objects=objects, chardevs=chardevs, dirty_rate_bytes_s=1 << 20)
        await src.execute("migrate", {"uri": f"file:{stream}"})
        s = await src.wait_migration(60)
        assert s["status"] == "completed", s.get("error-desc")
        assert s["ram"]["normal"] > 0 and s["x-fds-passed"] == 0
        assert await status(src) == "postmigrate"

        out = subprocess.run([sys.executable, "-m", "migfd.cli", "inspect", "--json", stream],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["configuration"]["machine"] == "migfd-pc"
        kinds = [(sec["type"], sec["name"]) for sec in summary["sections"]]
        assert kinds[0] == ("START", "ram") and ("END", "ram") in kinds
        assert ("FULL", "ram0/memory-backend-memfd") in kinds
        assert ("FULL", "ch0/chardev-socket") in kinds
        assert summary["ram"]["blocks"] == [{"id": "ram0", "length": 16 << 20}]
        assert summary["ram"]["normal_pages"] == s["ram"]["normal"]
        names = {dev["name"] for dev in summary["vmdesc"]["devices"]}
        assert {"ram0/memory-backend-memfd", "ch0/chardev-socket"} <= names

        dst = await vms.start("dst", objects=objects, chardevs=chardevs, incoming="defer")
        await dst.execute("migrate-incoming", {"uri": f"file:{stream}"})
        d = await dst.wait_migration(60)
        assert d["status"] == "completed", d.get("error-desc")
        assert await status(dst) == "running"
        ram = (await verify_ram(dst))["ram0"]
        assert ram["ok"] and ram["pages-stamped"] == data_pages(16)
        assert d["ram"]["normal"] == s["ram"]["normal"]

    run_vm_test(vms, body)


# -- around the commit point, against a destination the test plays itself ---------------------


@pytest.mark.parametrize("how", ["cancel", "destination-vanishes"])
def test_failure_while_the_source_waits_for_the_commit_point(vms, how):
    """The guest is stopped and the fds are on the wire; a cancel, or a destination that
    vanishes without acknowledging, resumes the source whole."""
    chardev = vms.path("ch0.sock")

    async def body():
        src = await vms.start("src", objects=(ram_opt(True, 16),), chardevs=(chardev_opt(chardev),),
                              dirty_rate_bytes_s=1 << 20)
        client = ChardevClient(chardev, rate_per_s=500)
        client.start()
        fake = FakeDestination(vms.path("mig.sock"), answer=None if how == "cancel" else "close")
        try:
            assert client.wait_echoes(10)
            src_memfds = memfd_inodes(src.pid)
            src_sockets = sockets_of(src.pid)
            await src.execute("migrate-set-parameters", {"backend-transfer": True})
            await src.execute("migrate", {"uri": f"unix:{vms.path('mig.sock')}"})
            await wait_until(fake.pinged.is_set, what="the source asking for the commit point")
            assert fake.error is None, fake.error
            assert len(fake.fds) == 3
            assert src_memfds <= fake.inodes()  # the very memfd travelled
            if how == "cancel":
                # Stopped, waiting for the PONG, the backends' fds already on the wire.
                assert (await src.execute("query-migrate"))["status"] == "device"
                assert await status(src) == "finish-migrate"
                await src.execute("migrate_cancel")
            info = await src.wait_migration(30)
            assert info["status"] == ("cancelled" if how == "cancel" else "failed")
            assert await status(src) == "running"
            assert memfd_inodes(src.pid) == src_memfds
            assert src_sockets <= sockets_of(src.pid)
            ram = (await verify_ram(src))["ram0"]
            assert ram["ok"] and ram["pages-stamped"] == data_pages(16)
            assert client.wait_echoes(len(client.echoed) + 50), "the source no longer echoes"
        finally:
            fake.close()
            report = client.stop(drain_s=5.0)
        assert report.reconnects == 0 and report.lost == [], report

    run_vm_test(vms, body)


def test_after_the_commit_point_the_source_never_resumes(vms):
    """A destination that acknowledged and vanished: the source must not run the guest again."""
    chardev = vms.path("ch0.sock")

    async def body():
        src = await vms.start("src", objects=(ram_opt(True, 16),), chardevs=(chardev_opt(chardev),),
                              dirty_rate_bytes_s=1 << 20)
        fake = FakeDestination(vms.path("mig.sock"), answer="pong")
        try:
            await src.execute("migrate-set-parameters", {"backend-transfer": True})
            await src.execute("migrate", {"uri": f"unix:{vms.path('mig.sock')}"})
            info = await src.wait_migration(30)
            assert fake.pinged.is_set() and fake.error is None, fake.error
            assert info["status"] == "failed"
            assert info["error-desc"]  # EOF could not be sent, or no resume report came
            assert await status(src) == "postmigrate"
            # The backends are the destination's now: the source released them, and
            # neither cont nor migrate_cancel brings the guest back here.
            await wait_until(lambda: not memfd_inodes(src.pid), what="source releasing its memfd")
            await src.execute("migrate_cancel")
            with pytest.raises(ExecuteError):
                await src.execute("cont")
            assert await status(src) == "postmigrate"
            assert (await src.execute("query-migrate"))["status"] == "failed"
        finally:
            fake.close()

    run_vm_test(vms, body)


def _policy_of(pid: int, comm_prefix: str) -> tuple[int, int] | None:
    """(scheduling policy, real-time priority) of the thread of ``pid`` whose name starts with
    ``comm_prefix`` (fields 41 and 40 of /proc/PID/task/TID/stat), or None if it has none."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                if not f.read().startswith(comm_prefix):
                    continue
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        return int(fields[38]), int(fields[37])  # fields 41 and 40, counted from after the name
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root (CAP_SYS_NICE)")
def test_switchover_realtime_holds_each_migration_thread_under_sched_fifo_inside_the_switchover(vms):
    """x-switchover-realtime: held at the source's device phase and at the destination's
    acknowledgement, each side's migration thread runs under SCHED_FIFO at priority 5 (below the
    observers' 10); both say so in query-migrate."""
    objects = (ram_opt(True, 16),)

    async def body():
        src = await vms.start("src", objects=objects)
        dst = await vms.start("dst", objects=objects, incoming="defer")
        params = {"backend-transfer": True, "x-switchover-realtime": True}
        for vm in (src, dst):
            await vm.execute("migrate-set-parameters", params)
        await dst.execute("migrate-incoming", {"uri": f"unix:{vms.path('mig.sock')}"})
        await src.execute("x-migration-fault", {"phase": "device", "action": "pause"})
        await dst.execute("x-migration-fault", {"phase": "dest-loaded", "action": "pause"})
        await src.execute("migrate", {"uri": f"unix:{vms.path('mig.sock')}"})
        await wait_until(lambda: _fault_paused(src, "device"), what="source held at its device phase")
        assert _policy_of(src.pid, "migration-outg") == (os.SCHED_FIFO, 5)
        await src.execute("x-migration-continue")
        await wait_until(lambda: _fault_paused(dst, "dest-loaded"), what="destination held before its PONG")
        assert _policy_of(dst.pid, "migration-inco") == (os.SCHED_FIFO, 5)
        await dst.execute("x-migration-continue")
        source = await src.wait_migration(30)
        destination = await dst.wait_migration(30)
        assert source["status"] == destination["status"] == "completed"
        assert source["x-switchover-realtime"] is True and destination["x-switchover-realtime"] is True
        assert (await status(dst)) == "running"

    run_vm_test(vms, body)


async def _fault_paused(vm, phase: str) -> bool:
    return (await vm.execute("x-query-fault"))["paused-at"] == phase
