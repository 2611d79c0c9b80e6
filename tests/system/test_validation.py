"""Every received fd is checked before use; a wrong one is refused by name and closed."""

from __future__ import annotations

import fcntl
import os
import socket

import pytest

from helpers import connect_as_source, needs_tap, proc_fds, run_vm_test, wait_until
from migfd.channel import SCM_MAX_FD, QEMUFile
from migfd.devices.chardev import ChardevSocket, adopt_socket_fd
from migfd.devices.memfd import MemoryBackendMemfd, validate_memfd
from migfd.devices.tap import validate_tap_fds
from migfd.fds import close_fds
from migfd.errors import MigrationError
from migfd.migration import MIGRATION_SECTION, MIGRATION_VMSD
from migfd.migration.base import read_rp
from migfd.net.netns import NetNamespace
from migfd.net import tun
from migfd.net.tun import open_tap, open_tap_queues
from migfd.params import MigrationParameters
from migfd.stream import ReturnPathMessage, StreamWriter


def _memfd(size: int) -> int:
    fd = os.memfd_create("test")
    os.ftruncate(fd, size)
    return fd


def test_memfd_of_the_wrong_size_or_kind_is_refused_by_device_name():
    good, small = _memfd(1 << 20), _memfd(4096)
    r, w = os.pipe()
    try:
        validate_memfd(good, 1 << 20, "ram0")
        with pytest.raises(MigrationError, match="memory backend 'ram0'.*4096 bytes, expected 1048576"):
            validate_memfd(small, 1 << 20, "ram0")
        with pytest.raises(MigrationError, match="memory backend 'ram0'.*not a memfd"):
            validate_memfd(r, 1 << 20, "ram0")
    finally:
        for fd in (good, small, r, w):
            os.close(fd)


def test_a_size_sealed_memfd_passes_and_a_tmpfs_file_does_not():
    # The fast path trusts size seals; a tmpfs file is shmem too but cannot carry them.
    sealed = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.ftruncate(sealed, 1 << 20)
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    shm = os.open(f"/dev/shm/migfd-test-{os.getpid()}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(f"/dev/shm/migfd-test-{os.getpid()}")
    os.ftruncate(shm, 1 << 20)
    try:
        validate_memfd(sealed, 1 << 20, "ram0")
        with pytest.raises(MigrationError, match="memory backend 'ram0'.*1048576 bytes, expected 4096"):
            validate_memfd(sealed, 4096, "ram0")
        with pytest.raises(MigrationError, match="memory backend 'ram0'.*not a memfd"):
            validate_memfd(shm, 1 << 20, "ram0")
    finally:
        os.close(sealed)
        os.close(shm)


def test_chardev_sockets_must_be_unix_stream_listening_or_connected():
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0migfd-test-validation")
    listener.listen(1)
    a, b = socket.socketpair()
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    r, w = os.pipe()
    try:
        # An accepted fd belongs to the socket returned (hence the dups).
        for fd, listening in ((listener.fileno(), True), (a.fileno(), False)):
            kept = adopt_socket_fd(os.dup(fd), listening=listening, device="ch0")
            assert not kept.getblocking()
            kept.close()
        refused = [(a, True, "received socket is not listening"),
                   (listener, False, "received socket is not connected"),
                   (dgram, False, "received fd is not a UNIX stream socket"),
                   (tcp, False, "received fd is not a UNIX stream socket")]
        for sock, listening, message in refused:
            with pytest.raises(MigrationError, match=f"chardev 'ch0': {message}"):
                adopt_socket_fd(sock.fileno(), listening=listening, device="ch0")
            os.fstat(sock.fileno())  # a refused fd stays open, for its owner to close
        with pytest.raises(MigrationError, match="chardev 'ch0': received fd is not a socket"):
            adopt_socket_fd(r, listening=False, device="ch0")
        os.fstat(r)
    finally:
        for s in (listener, a, b, dgram, tcp):
            s.close()
        os.close(r)
        os.close(w)


@needs_tap
def test_tap_fds_must_be_the_expected_interface():
    with NetNamespace() as ns:
        fd = open_tap("vtap0", netns=ns.name)
        other = open_tap("vtap1", netns=ns.name)
        r, w = os.pipe()
        try:
            validate_tap_fds([fd], "vtap0", False, "net0")
            with pytest.raises(MigrationError, match="netdev 'net0': received TAP is attached to vtap1, expected vtap0"):
                validate_tap_fds([other], "vtap0", False, "net0")
            with pytest.raises(MigrationError, match="netdev 'net0': received TAP queue has the wrong multi-queue"):
                validate_tap_fds([fd], "vtap0", True, "net0")
            with pytest.raises(MigrationError, match="netdev 'net0': received fd is not a TAP device"):
                validate_tap_fds([r], "vtap0", False, "net0")
            # every fd is checked, not only the first
            with pytest.raises(MigrationError, match="received TAP is attached to vtap1"):
                validate_tap_fds([fd, other], "vtap0", False, "net0")
            with pytest.raises(MigrationError, match="netdev 'net0': received TAP is attached to vtap1, expected vtap"):
                validate_tap_fds([other], "vtap", False, "net0")  # a prefix of the name is not the name
        finally:
            for x in (fd, other, r, w):
                os.close(x)


@needs_tap
def test_tap_queues_are_checked_by_one_ioctl_each_and_any_other_file_is_refused(monkeypatch):
    """The queues of one TAP answer TUNGETIFF alike: one answer is decoded, the rest
    compared as bytes; a file of any other kind among them refuses the ioctl itself."""
    with NetNamespace() as ns:
        queues = open_tap_queues("vtap0", 4, netns=ns.name)
        other = open_tap("vtap1", multi_queue=True, netns=ns.name)
        unattached = os.open("/dev/net/tun", os.O_RDWR)
        r, w = os.pipe()
        sock_a, sock_b = socket.socketpair()
        memfd = _memfd(4096)
        decoded = []
        real_decode = tun.decode_ifreq
        monkeypatch.setattr(tun, "decode_ifreq", lambda raw: decoded.append(raw) or real_decode(raw))
        try:
            validate_tap_fds(queues, "vtap0", True, "net0")
            assert len(decoded) == 1
            for stranger in (r, sock_a.fileno(), memfd, unattached):
                with pytest.raises(MigrationError, match="netdev 'net0': received fd is not a TAP device"):
                    validate_tap_fds([*queues[:2], stranger, queues[2]], "vtap0", True, "net0")
                os.fstat(stranger)  # refused, not closed: its owner closes it
            # an answer unlike the first one's is checked on its own
            with pytest.raises(MigrationError, match="received TAP is attached to vtap1, expected vtap0"):
                validate_tap_fds([*queues, other], "vtap0", True, "net0")
        finally:
            for x in (*queues, other, unattached, r, w, memfd):
                os.close(x)
            sock_a.close()
            sock_b.close()


async def _fake_source(vms):
    """A destination with 1 MiB of RAM taking backend-transfer, and the test's socket connected to it
    as the source: (the destination, the source's QEMUFile)."""
    return await connect_as_source(vms, ("memory-backend-memfd,id=ram0,size=1M,backend-transfer=on",),
                                   {"backend-transfer": True})


def _send_state(f: QEMUFile, ram_fd: int, cookie: int = 7) -> StreamWriter:
    """Setup, the RAM section handing over ``ram_fd``, the migration section and a PING, flushed."""
    writer = StreamWriter(f)
    writer.write_header()
    writer.write_configuration("migfd-pc", MigrationParameters(backend_transfer=True).capabilities())
    writer.write_open_return_path()
    writer.write_ram_start([])
    dev = MemoryBackendMemfd("ram0", 1 << 20, backend_transfer=True)
    writer.write_section_full(dev.section_name, 0, dev.vmsd, {"size": 1 << 20, "pages_dirtied": 0, "fd": ram_fd})
    writer.write_section_full(MIGRATION_SECTION, 0, MIGRATION_VMSD, {"stop_ns": 1, "running": True})
    writer.write_ping(cookie)
    f.flush()
    return writer


def test_destination_refuses_a_pipe_in_place_of_guest_ram_and_closes_it(vms, thread_accel):
    """A source (played by the test) hands over a pipe where the memfd belongs.

    The destination runs on the thread accelerator: the source played here sends
    no vCPU state, which a KVM destination would miss before it looked at RAM.
    """
    async def body():
        dst, f = await _fake_source(vms)
        before = proc_fds(dst.pid)
        r, w = os.pipe()
        try:
            _send_state(f, r)
            info = await dst.wait_migration(30)
            assert info["status"] == "failed"
            assert "memory backend 'ram0'" in info["error-desc"] and "not a memfd" in info["error-desc"]
            # The pipe the destination received is closed again: only our own ends remain.
            pipes = [link for link in proc_fds(dst.pid) if link.startswith("pipe:")]
            assert pipes == [link for link in before if link.startswith("pipe:")]
            assert (await dst.execute("query-status"))["status"] == "inmigrate"
        finally:
            f.close()
            os.close(r)
            os.close(w)

    run_vm_test(vms, body)


def test_large_fd_batches_to_a_destination_that_takes_16_fail_and_every_fd_is_closed(vms, thread_accel):
    """A source (played by the test) lists x-fds-per-message and sends 253 fds in the message that
    carries its configuration, so that they reach the destination with it; the destination, at
    QEMU's 16, refuses at the configuration and closes every one of them. The test's own fd table
    ends as it began.
    """
    async def body():
        dst, f = await _fake_source(vms)
        mine = len(os.listdir("/proc/self/fd")) - 1  # the source's socket closes below
        before = proc_fds(dst.pid)
        sent = [os.memfd_create("large-batch") for _ in range(SCM_MAX_FD)]
        try:
            f.fds_per_message = SCM_MAX_FD
            writer = StreamWriter(f)
            writer.write_header()
            writer.write_configuration("migfd-pc", ("backend-transfer", "x-fds-per-message"))
            for fd in sent:
                f.put_fd(fd)
            f.flush()
            assert (f.fd_messages, f.fds_sent) == (1, SCM_MAX_FD)
            info = await dst.wait_migration(30)
            assert info["status"] == "failed"
            assert info["error-desc"] == ("Capability 'x-fds-per-message' is on on the source (more than 16 "
                                          "fds in one message) but off on the destination (x-fds-per-message 16)")
            assert not [link for link in before if "large-batch" in link]
            await wait_until(lambda: not [link for link in proc_fds(dst.pid) if "large-batch" in link],
                             what="destination closing the fds it received")
            assert len(proc_fds(dst.pid)) <= len(before)
            assert (await dst.execute("query-status"))["status"] == "inmigrate"
        finally:
            f.close()
            close_fds(sent)
        # fd numbers of the QMP client may change meanwhile, not how many there are
        assert len(os.listdir("/proc/self/fd")) == mine

    run_vm_test(vms, body)


@pytest.mark.parametrize("after_eof", [
    bytes([0x06]) + (9).to_bytes(4, "big") + b"not json!",  # a device description that is no JSON
    bytes([0x02]),  # another section where the description belongs
], ids=["bad-json", "wrong-section"])
def test_a_bad_device_description_after_eof_does_not_fail_a_valid_state(vms, thread_accel, after_eof):
    """As QEMU's destination: the vmdesc is read before the guest runs, but a bad one is only a warning.

    The source (played by the test) hands over a real memfd, gets the PONG (its commit point)
    and sends EOF followed by a broken description: past the commit no one else would run the guest.
    """
    async def body():
        dst, f = await _fake_source(vms)
        ram = _memfd(1 << 20)
        try:
            writer = _send_state(f, ram)
            assert read_rp(f) == (ReturnPathMessage.PONG, (7).to_bytes(4, "big"))
            writer.write_eof()
            f.put_buffer(after_eof)
            f.flush()
            info = await dst.wait_migration(30)
            assert info["status"] == "completed", info
            assert (await dst.execute("query-status"))["status"] == "running"
        finally:
            f.close()
            os.close(ram)

    run_vm_test(vms, body)


def test_an_early_fds_destination_refuses_a_device_whose_fds_never_came(vms, thread_accel):
    """x-early-fds: a chardev section (the source is played by the test) that came neither early
    with its fds nor with them at the switchover. The destination must fail, not listen on the
    path by itself, which the source's chardev holds."""
    path = vms.path("ch0.sock")

    async def body():
        dst = await vms.start("dst", incoming="defer",
                              chardevs=(f"socket,id=ch0,path={path},server=on,backend-transfer=on",))
        params = MigrationParameters(backend_transfer=True, x_early_fds=True)
        await dst.execute("migrate-set-parameters", {"backend-transfer": True, "x-early-fds": True})
        mig = vms.path("mig.sock")
        await dst.execute("migrate-incoming", {"uri": f"unix:{mig}"})
        await wait_until(lambda: os.path.exists(mig), what="destination listening")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(mig)
        f = QEMUFile.from_socket(sock, "fake-source")
        try:
            w = StreamWriter(f)
            w.write_header()
            w.write_configuration("migfd-pc", params.capabilities())
            w.write_open_return_path()
            w.write_switchover_start()
            dev = ChardevSocket("ch0", path, backend_transfer=True)
            w.write_section_full(dev.section_name, 0, dev.vmsd, {
                "path": path.encode(), "connected": False, "lines_echoed": 0, "pending": b"",
                "listener_fd": None, "client_fd": None})
            w.write_section_full(MIGRATION_SECTION, 0, MIGRATION_VMSD, {"stop_ns": 1, "running": True})
            w.write_ping(7)
            f.flush()
            info = await dst.wait_migration(30)
            assert info["status"] == "failed"
            assert info["error-desc"] == ("section 'ch0/chardev-socket': no fds arrived, neither early "
                                          "nor at the switchover")
            assert not os.path.exists(path), "the destination listens on the source's chardev path"
        finally:
            f.close()

    run_vm_test(vms, body)
