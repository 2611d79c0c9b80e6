"""QEMUFile against the real kernel: socketpairs, SCM_RIGHTS, TCP on 127.0.0.1, files.

Fds sent are memfds (or pipes) whose name or inode identifies them, so every
received fd is checked to be the very file that was sent. Every test that
moves fds checks /proc/self/fd before and after.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies import (
    close_all,
    expected_events,
    normalize,
    open_fd_names,
    stream_specs,
    vmsds_of,
    write_stream,
)

from migfd.channel import MAX_FDS_PER_MESSAGE, SCM_MAX_FD, QEMUFile
from migfd.errors import ChannelBrokenError, ChannelClosedError, ChannelError
from migfd.stream import Fd, SectionFull, StreamReader, StreamWriter, UInt8, VMStateDescription


@pytest.fixture
def no_fd_leak():
    before = open_fd_names()
    yield
    assert open_fd_names() == before


def channel_pair(**kwargs) -> tuple[QEMUFile, QEMUFile]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    return (QEMUFile.from_socket(a, "src", **kwargs.get("src", {})),
            QEMUFile.from_socket(b, "dst", **kwargs.get("dst", {})))


class Background(threading.Thread):
    """Runs the sending side, so a full socket buffer cannot deadlock the test."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn = fn
        self.error: BaseException | None = None
        self.start()

    def run(self):
        try:
            self.fn()
        except BaseException as exc:  # re-raised in the test by result()
            self.error = exc

    def result(self):
        self.join()
        if self.error is not None:
            raise self.error


def identity(fd: int) -> tuple[int, int]:
    st_ = os.fstat(fd)
    return (st_.st_dev, st_.st_ino)


def memfd_name(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def fd_targets() -> dict[str, str]:
    """Open fds and what they point to (the directory fd of the listing itself excluded)."""
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[name] = os.readlink(f"/proc/self/fd/{name}")
        except FileNotFoundError:
            pass
    return out


def pattern(n: int, seed: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(n))


# ---------------------------------------------------------------------------
# Order of bytes and fds


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(st.one_of(st.integers(0, 100_000), st.just("fd")), min_size=1, max_size=10),
    src_bufsize=st.integers(1, 300_000),
    dst_bufsize=st.integers(1, 300_000),
    batch_fds=st.booleans(),
)
def test_bytes_and_fds_come_back_in_order(items, src_bufsize, dst_bufsize, batch_fds):
    """put(A), put_fd, put(B) is read back as get(A), get_fd, get(B), whatever the sizes."""
    before = open_fd_names()
    src, dst = channel_pair(src={"bufsize": src_bufsize, "batch_fds": batch_fds},
                            dst={"bufsize": dst_bufsize})
    sent_fds = [os.memfd_create(f"item{i}") for i, item in enumerate(items) if item == "fd"]
    received: list[int] = []
    try:
        def send():
            fds = iter(sent_fds)
            for i, item in enumerate(items):
                if item == "fd":
                    src.put_fd(next(fds))
                else:
                    src.put_buffer(pattern(item, i))
            src.flush()

        sender = Background(send)
        fds = iter(sent_fds)
        for i, item in enumerate(items):
            if item == "fd":
                fd = dst.get_fd()
                received.append(fd)
                assert identity(fd) == identity(next(fds))
            else:
                assert dst.get_buffer(item) == pattern(item, i)
        sender.result()
        n_fds = len(sent_fds)
        assert src.fds_sent == n_fds and dst.fds_received == n_fds
        assert src.bytes_sent == dst.bytes_received == sum(
            1 if item == "fd" else item for item in items)
        if not batch_fds:
            assert src.fd_messages == n_fds
        else:
            assert src.fd_messages <= n_fds
    finally:
        src.close()
        dst.close()
        close_all(received)
        close_all(sent_fds)
    assert open_fd_names() == before


@pytest.mark.parametrize("batching, per_message", [
    ({"batch_fds": False}, 1),
    ({"batch_fds": True}, MAX_FDS_PER_MESSAGE),
    ({"batch_fds": True, "fds_per_message": SCM_MAX_FD}, SCM_MAX_FD),
    ({"batch_fds": False, "fds_per_message": SCM_MAX_FD}, 1),  # unbatched ignores the size
], ids=["unbatched", "batched", "batched-253", "unbatched-253"])
def test_a_thousand_fds_in_order(no_fd_leak, batching, per_message):
    """Whatever the batch, fds read back in the order sent; the receiver needs no setting for 253 a read."""
    count = 1000
    src, dst = channel_pair(src=batching)
    sent = [os.memfd_create(f"fd-{i:04d}") for i in range(count)]
    received: list[int] = []
    try:
        def send():
            for fd in sent:
                src.put_fd(fd)
            src.flush()

        sender = Background(send)
        for i in range(count):
            fd = dst.get_fd()
            received.append(fd)
            assert identity(fd) == identity(sent[i]), i
            assert memfd_name(fd) == f"/memfd:fd-{i:04d} (deleted)"
        sender.result()
        assert dst.fds_received == src.fds_sent == count
        assert src.fd_messages == -(-count // per_message)
    finally:
        src.close()
        dst.close()
        close_all(received)
        close_all(sent)


def test_batched_fds_share_messages_and_read_back_identically(no_fd_leak):
    src, dst = channel_pair(src={"batch_fds": True})
    sent = [os.memfd_create(f"b{i}") for i in range(40)]
    received = []
    try:
        src.put_buffer(b"head")
        for fd in sent[:35]:
            src.put_fd(fd)
        src.put_buffer(b"mid")  # joins the buffer: the fds ride with the bytes around them
        for fd in sent[35:]:
            src.put_fd(fd)
        src.flush()
        assert src.fds_sent == 40
        assert src.fd_messages == 3  # 16, 16, then 3 + 5 around "mid"
        assert src.bytes_sent == 4 + 40 + 3
        assert dst.get_buffer(4) == b"head"
        for fd in sent[:35]:
            received.append(dst.get_fd())
            assert identity(received[-1]) == identity(fd)
        assert dst.get_buffer(3) == b"mid"
        for fd in sent[35:]:
            received.append(dst.get_fd())
            assert identity(received[-1]) == identity(fd)
    finally:
        src.close()
        dst.close()
        close_all(received)
        close_all(sent)


@pytest.mark.parametrize("nonblocking", [True, False])
def test_received_fd_keeps_o_nonblock(no_fd_leak, nonblocking):
    src, dst = channel_pair()
    r, w = os.pipe()
    os.set_blocking(r, not nonblocking)
    try:
        src.put_fd(r)
        src.flush()
        fd = dst.get_fd()
        try:
            assert bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK) == nonblocking
            assert identity(fd) == identity(r)
            # and it stays shared with the sender's open file description
            os.write(w, b"z")
            assert os.read(fd, 1) == b"z"
        finally:
            os.close(fd)
    finally:
        src.close()
        dst.close()
        os.close(r)
        os.close(w)


def test_received_fds_are_close_on_exec(no_fd_leak):
    src, dst = channel_pair()
    sent = os.memfd_create("no-cloexec", 0)  # the sender's copy is inheritable
    assert not fcntl.fcntl(sent, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    try:
        src.put_fd(sent)
        src.flush()
        fd = dst.get_fd()
        try:
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        finally:
            os.close(fd)
    finally:
        src.close()
        dst.close()
        os.close(sent)


def test_unclaimed_fds_closed_on_close(no_fd_leak):
    src, dst = channel_pair()
    sent = [os.memfd_create(f"unclaimed{i}") for i in range(5)]
    try:
        for fd in sent:
            src.put_fd(fd)
        src.put_buffer(b"x")
        src.flush()
        before_read = fd_targets()
        assert dst.get_buffer(6) == b"     x"  # read the service bytes as data: fds stay queued
        held = {n: t for n, t in fd_targets().items() if n not in before_read}
        assert sorted(held.values()) == [f"/memfd:unclaimed{i} (deleted)" for i in range(5)]
        dst.close()
        assert set(held).isdisjoint(fd_targets())
        # only the sender's own five remain
        assert sum("unclaimed" in t for t in fd_targets().values()) == 5
    finally:
        src.close()
        dst.close()
        close_all(sent)


def test_read_chunk_hands_over_bytes_and_fds(no_fd_leak):
    src, dst = channel_pair()
    sent = os.memfd_create("chunk")
    try:
        src.put_buffer(b"ab")
        src.put_fd(sent)
        src.flush()
        data, fds = b"", []
        while len(data) < 3:
            more, more_fds = dst.read_chunk()
            data += more
            fds += more_fds
        assert data == b"ab "
        assert len(fds) == 1 and identity(fds[0]) == identity(sent)
        os.close(fds[0])
        src.close()
        assert dst.read_chunk() == (b"", [])
    finally:
        src.close()
        dst.close()
        os.close(sent)


# ---------------------------------------------------------------------------
# get_fd errors


def test_get_fd_unexpected_service_byte(no_fd_leak):
    src, dst = channel_pair()
    try:
        src.put_buffer(b"\x21")
        src.flush()
        with pytest.raises(ChannelError, match="^dst: unexpected service byte 0x21$"):
            dst.get_fd()
    finally:
        src.close()
        dst.close()


def test_get_fd_plain_service_byte_without_fd(no_fd_leak):
    src, dst = channel_pair()
    try:
        src.put_buffer(b"\x20")
        src.flush()
        with pytest.raises(ChannelError, match="^dst: no FD come with service byte$"):
            dst.get_fd()
    finally:
        src.close()
        dst.close()


def test_a_batch_of_scm_max_fd_fds_is_one_sendmsg(no_fd_leak):
    """fds_per_message=253: the bytes before the fds, their service bytes and all 253 fds in one message.

    The receiving end is a bare recvmsg: a read never takes the fds of two
    sendmsg calls (the kernel ends a read after a message with fds), so one
    read that returns every fd and every byte up to the last service byte
    proves one message.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    src = QEMUFile.from_socket(a, "src", fds_per_message=SCM_MAX_FD)
    sent = [os.memfd_create(f"big-{i:03d}") for i in range(SCM_MAX_FD)]
    received: list[int] = []
    try:
        src.put_buffer(b"head")
        for fd in sent:
            src.put_fd(fd)
        src.put_buffer(b"tail")
        src.flush()
        assert (src.fd_messages, src.fds_sent) == (1, SCM_MAX_FD)
        data, ancdata, flags, _ = b.recvmsg(4096, socket.CMSG_SPACE(SCM_MAX_FD * 4), socket.MSG_CMSG_CLOEXEC)
        for level, kind, payload in ancdata:
            assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
            received += array.array("i", payload)
        assert not flags & socket.MSG_CTRUNC
        assert data == b"head" + b"\x20" * SCM_MAX_FD  # the 253rd fd sent the buffer
        assert [memfd_name(fd) for fd in received] == [f"/memfd:big-{i:03d} (deleted)" for i in range(SCM_MAX_FD)]
        assert [identity(fd) for fd in received] == [identity(fd) for fd in sent]
        assert b.recv(4096) == b"tail"
    finally:
        src.close()
        b.close()
        close_all(received)
        close_all(sent)


@pytest.mark.parametrize("per_message", [0, SCM_MAX_FD + 1])
def test_a_batch_beyond_the_kernel_limit_is_refused(per_message):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with pytest.raises(ValueError, match=f"fds_per_message must be 1 to 253, not {per_message}"):
            QEMUFile.from_socket(a, "src", fds_per_message=per_message)
    finally:
        a.close()
        b.close()


def test_ctrunc_is_fatal_and_leaks_nothing(no_fd_leak):
    """A control message too small for the fds: the kernel drops some and sets
    MSG_CTRUNC. Our buffer has room for SCM_MAX_FD fds, so we provoke it for
    real: with SO_PASSCRED the kernel puts an SCM_CREDENTIALS message first,
    and 253 fds in one sendmsg no longer fit beside it.
    """
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    dst = QEMUFile.from_socket(b, "dst")
    sent = [os.memfd_create(f"c{i}") for i in range(SCM_MAX_FD)]
    try:
        a.sendmsg([b" " * SCM_MAX_FD],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", sent).tobytes())])
        close_all(sent)  # only the copies in flight remain
        sent = []
        with pytest.raises(ChannelError, match="control message truncated"):
            dst.get_fd()
    finally:
        a.close()
        dst.close()
        close_all(sent)


def test_kernel_refuses_more_than_scm_max_fd():
    """Why batches stay small: one sendmsg carries at most SCM_MAX_FD fds."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.memfd_create("many")
    try:
        with pytest.raises(OSError) as info:
            a.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                array.array("i", [fd] * (SCM_MAX_FD + 1)).tobytes())])
        assert info.value.errno == errno.EINVAL
    finally:
        a.close()
        b.close()
        os.close(fd)


# ---------------------------------------------------------------------------
# Channels without fd passing


@pytest.fixture
def tcp_pair():
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    server.close()
    src = QEMUFile.from_socket(client, "tcp-src")
    dst = QEMUFile.from_socket(conn, "tcp-dst")
    yield src, dst
    src.close()
    dst.close()


def test_tcp_channel_refuses_fds(tcp_pair, no_fd_leak):
    src, dst = tcp_pair
    assert not src.supports_fds
    r, w = os.pipe()
    try:
        with pytest.raises(ChannelError, match="^tcp-src does not support fd passing$"):
            src.put_fd(r)
    finally:
        os.close(r)
        os.close(w)
    src.put_buffer(b" ")
    src.flush()
    with pytest.raises(ChannelError, match="^tcp-dst does not support fd passing$"):
        dst.get_fd()
    assert dst.get_byte() == 0x20  # refused before reading anything
    assert src.bytes_sent == 1 and src.fds_sent == 0


def test_tcp_channel_carries_bytes(tcp_pair):
    src, dst = tcp_pair
    payload = pattern(300_000, 3)
    sender = Background(lambda: (src.put_buffer(payload), src.flush()))
    assert dst.get_buffer(len(payload)) == payload
    sender.result()


def test_file_channel_refuses_fds(tmp_path, no_fd_leak):
    path = str(tmp_path / "stream")
    out = QEMUFile.open_file(path, "wb")
    r, w = os.pipe()
    try:
        with pytest.raises(ChannelError, match=f"^{path} does not support fd passing$"):
            out.put_fd(r)
        out.put_buffer(b" ")
        out.flush()
    finally:
        out.close()
        os.close(r)
        os.close(w)
    back = QEMUFile.open_file(path, "rb")
    try:
        with pytest.raises(ChannelError, match="does not support fd passing"):
            back.get_fd()
    finally:
        back.close()


def test_file_channel_missing_file(tmp_path):
    with pytest.raises(ChannelError, match="cannot open"):
        QEMUFile.open_file(str(tmp_path / "nope" / "x"), "rb")


# ---------------------------------------------------------------------------
# A dead peer


def test_reading_from_a_dead_peer(no_fd_leak):
    src, dst = channel_pair()
    src.put_buffer(b"abc")
    src.flush()
    src.close()
    try:
        with pytest.raises(ChannelError, match="end of stream, 10 bytes expected"):
            dst.get_buffer(10)
        assert dst.get_buffer(3) == b"abc"  # what did arrive is not lost
        with pytest.raises(ChannelError, match="end of stream"):
            dst.get_fd()
    finally:
        dst.close()


def test_writing_to_a_dead_peer(no_fd_leak):
    src, dst = channel_pair()
    dst.close()
    r, w = os.pipe()
    try:
        src.put_buffer(b"abc")
        with pytest.raises(ChannelError) as info:
            src.flush()
        assert isinstance(info.value.__cause__, OSError)
        with pytest.raises(ChannelError):
            src.put_fd(r)
    finally:
        src.close()
        os.close(r)
        os.close(w)


def test_tcp_peer_reset_is_a_channel_error(tcp_pair):
    src, dst = tcp_pair
    dst.put_buffer(b"unread")
    dst.flush()
    src.close()  # unread data: the kernel answers with a reset
    with pytest.raises(ChannelError):
        dst.get_buffer(1)
    with pytest.raises(ChannelError):
        for _ in range(100):  # the first sends may still be accepted locally
            dst.put_buffer(b"x" * 65536)
            dst.flush()


def test_read_timeout_is_a_channel_error(no_fd_leak):
    src, dst = channel_pair()
    try:
        dst.settimeout(0.01)
        with pytest.raises(ChannelError, match="timed out waiting for data") as info:
            dst.get_buffer(1)
        assert isinstance(info.value.__cause__, TimeoutError)
    finally:
        src.close()
        dst.close()


def test_closed_channel_refuses_use(no_fd_leak):
    src, dst = channel_pair()
    src.close()
    src.close()  # twice is harmless
    with pytest.raises(ChannelError, match="src is closed"):
        src.put_buffer(b"x")
    with pytest.raises(ChannelError, match="src is closed"):
        src.get_buffer(1)
    dst.close()


# ---------------------------------------------------------------------------
# Which ChannelError: closed by this side, or broken by the peer


def test_use_after_close_is_a_closed_error(no_fd_leak):
    src, dst = channel_pair()
    r, w = os.pipe()
    src.close()
    uses = {
        "put_buffer": lambda: src.put_buffer(b"x"),
        "put_fd": lambda: src.put_fd(r),
        "flush": src.flush,
        "get_buffer": lambda: src.get_buffer(1),
        "get_fd": src.get_fd,
        "read_chunk": src.read_chunk,
    }
    try:
        for name, use in uses.items():
            with pytest.raises(ChannelClosedError, match="^src is closed$"):
                use()
    finally:
        dst.close()
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("read", [
    pytest.param(lambda f: f.get_buffer(10), id="get_buffer"),
    pytest.param(lambda f: f.get_be64(), id="get_be64"),
    pytest.param(lambda f: (f.get_buffer(3), f.get_fd()), id="get_fd"),
])
def test_peer_closed_mid_record_is_a_broken_error(no_fd_leak, read):
    src, dst = channel_pair()
    src.put_buffer(b"abc")
    src.flush()
    src.close()
    try:
        with pytest.raises(ChannelBrokenError, match="^dst: end of stream, [0-9]+ bytes expected$"):
            read(dst)
    finally:
        dst.close()


def test_peer_reset_is_a_broken_error_with_the_oserror(tcp_pair):
    src, dst = tcp_pair
    dst.put_buffer(b"unread")
    dst.flush()
    src.close()  # unread data: the kernel answers with a reset
    with pytest.raises(ChannelBrokenError) as info:
        dst.get_buffer(1)
    assert isinstance(info.value.__cause__, ConnectionResetError)


def test_writing_to_a_closed_peer_is_a_broken_error_with_the_oserror(no_fd_leak):
    src, dst = channel_pair()
    dst.close()
    try:
        src.put_buffer(b"abc")
        with pytest.raises(ChannelBrokenError, match="^src: write failed") as info:
            src.flush()
        assert isinstance(info.value.__cause__, BrokenPipeError)
    finally:
        src.close()


def test_timeout_is_a_broken_error(no_fd_leak):
    src, dst = channel_pair()
    try:
        dst.settimeout(0.01)
        with pytest.raises(ChannelBrokenError, match="timed out"):
            dst.get_buffer(1)
    finally:
        src.close()
        dst.close()


def test_a_request_the_channel_cannot_meet_is_neither(tcp_pair, no_fd_leak):
    src, _ = tcp_pair
    r, w = os.pipe()
    try:
        with pytest.raises(ChannelError) as info:
            src.put_fd(r)
        assert not isinstance(info.value, (ChannelClosedError, ChannelBrokenError))
    finally:
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------------------
# Whole streams through channels


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=stream_specs(with_fds=False), bufsize=st.integers(1, 70_000))
def test_file_channel_round_trip_of_a_whole_stream(spec, bufsize):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "migration.bin")
        out = QEMUFile.open_file(path, "wb", bufsize=bufsize)
        write_stream(spec, out)
        out.flush()
        assert out.bytes_sent == os.path.getsize(path)
        out.close()

        back = QEMUFile.open_file(path, "rb", bufsize=bufsize)
        reader = StreamReader(vmsds_of(spec))
        events = []
        try:
            while True:
                data, fds = back.read_chunk()
                assert fds == []
                if not data:
                    reader.receive_eof()
                    events += list(reader.events())
                    break
                reader.receive_data(data)
                events += list(reader.events())
        finally:
            back.close()
            reader.close()
        assert reader.done
        assert [normalize(e, vmsds_of(spec)) for e in events] == expected_events(spec)


def test_file_channel_refuses_a_device_with_an_fd(tmp_path):
    out = QEMUFile.open_file(str(tmp_path / "s"), "wb")
    try:
        writer = StreamWriter(out)
        writer.write_header()
        with pytest.raises(ChannelError, match="does not support fd passing"):
            writer.write_section_full("net0", 0, VMStateDescription(
                "net", 1, fields=(UInt8("a"), Fd("tap"))), {"a": 1, "tap": 0})
    finally:
        out.close()


def _make_token_fds(spec) -> list[int] | None:
    """Make each fd token of ``spec`` a real memfd with that very number and name."""
    tokens = write_stream(spec).fds  # a dry run into memory says which tokens travel
    for t in tokens:
        try:
            os.fstat(t)
            return None  # taken; cannot happen unless something leaks 1000 fds
        except OSError:
            pass
    made = []
    for t in tokens:
        fd = os.memfd_create(f"token{t}")
        os.dup2(fd, t, inheritable=False)
        os.close(fd)
        made.append(t)
    return made


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=stream_specs(with_fds=True), bufsize=st.integers(1, 70_000),
       batch_fds=st.booleans())
def test_socket_round_trip_of_a_whole_stream_with_fds(spec, bufsize, batch_fds):
    """StreamWriter → QEMUFile → socketpair → QEMUFile.read_chunk → StreamReader."""
    before = open_fd_names()
    token_fds = _make_token_fds(spec)
    assert token_fds is not None
    src, dst = channel_pair(src={"bufsize": bufsize, "batch_fds": batch_fds},
                            dst={"bufsize": bufsize})
    reader = StreamReader(vmsds_of(spec))
    claimed: list[int] = []
    try:
        def send():
            write_stream(spec, src)
            src.flush()
            src.close()

        sender = Background(send)
        events = []
        while True:
            data, fds = dst.read_chunk()
            if not data:
                assert fds == []
                reader.receive_eof()
                events += list(reader.events())
                break
            reader.receive_data(data, fds)
            events += list(reader.events())
        sender.result()
        assert reader.done
        claimed = [fd for e in events if isinstance(e, SectionFull) for fd in e.fds]
        to_token = {fd: int(memfd_name(fd).split(":token")[1].split()[0]) for fd in claimed}
        assert list(to_token.values()) == token_fds  # all of them, in order
        assert [normalize(e, vmsds_of(spec), to_token) for e in events] == expected_events(spec)
        assert src.fds_sent == len(token_fds)
    finally:
        close_all(claimed)
        reader.close()
        src.close()
        dst.close()
        close_all(token_fds)
    assert open_fd_names() == before
