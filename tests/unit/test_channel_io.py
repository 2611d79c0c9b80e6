"""QEMUFile's I/O under migration: fds riding with bytes, reads that never wait, bounded
writes, errors that stick. Real sockets and fds, no process."""

from __future__ import annotations

import array
import os
import socket

import pytest
from strategies import close_all
from test_channel import channel_pair, identity, no_fd_leak  # noqa: F401 (a fixture)

from migfd.channel import DEFAULT_BUFSIZE
from migfd.errors import ChannelBrokenError, ChannelError


@pytest.mark.parametrize("batch_fds", [True, False])
def test_batched_fds_leave_with_the_bytes_around_them(no_fd_leak, batch_fds):
    """Batched, one section's bytes and fds are one message; unbatched, QEMU's pattern:
    flush, then each fd with its service byte in a sendmsg of its own."""
    src, dst = channel_pair(src={"batch_fds": batch_fds})
    fds = [os.memfd_create("a"), os.memfd_create("b")]
    got: list[int] = []
    try:
        src.put_buffer(b"head")
        src.put_fd(fds[0])
        src.put_buffer(b"mid")
        src.put_fd(fds[1])
        src.put_buffer(b"tail")
        src.flush()
        messages = []
        raw = dst.socket
        raw.setblocking(False)
        while True:
            try:
                data, anc, _, _ = raw.recvmsg(1024, socket.CMSG_SPACE(16 * 4))
            except BlockingIOError:
                break
            received = [fd for level, kind, payload in anc for fd in array.array("i", payload)]
            got += received
            messages.append((data, len(received)))
        assert b"".join(data for data, _ in messages) == b"head mid tail"
        if batch_fds:
            assert messages == [(b"head mid tail", 2)]  # one read takes it all
            assert src.fd_messages == 1
        else:
            # The kernel ends a read after a message with fds: never both in one read.
            assert max(n for _, n in messages) == 1
            assert src.fd_messages == 2
        assert [identity(fd) for fd in got] == [identity(fd) for fd in fds]
    finally:
        src.close()
        dst.close()
        close_all(got)
        close_all(fds)


def test_read_chunk_without_blocking_takes_what_has_arrived_one_fd_message_at_a_time(no_fd_leak):
    src, dst = channel_pair(src={"batch_fds": False})
    fds = [os.memfd_create(f"d{i}") for i in range(3)]
    got: list[int] = []
    try:
        assert dst.read_chunk(block=False) is None  # nothing yet: no wait
        for fd in fds:
            src.put_fd(fd)
        src.put_buffer(b"tail")
        src.flush()
        data = b""
        while (chunk := dst.read_chunk(block=False)) is not None:
            data += bytes(chunk[0])
            assert len(chunk[1]) <= 1  # a read ends after a message with fds
            got += chunk[1]
        assert data == b"   tail"
        assert [identity(fd) for fd in got] == [identity(fd) for fd in fds]
        src.close()
        assert dst.read_chunk(block=False) == (b"", [])  # end of stream
    finally:
        src.close()
        dst.close()
        close_all(got)
        close_all(fds)


def test_a_write_the_peer_never_reads_times_out_in_the_kernel(no_fd_leak):
    src, dst = channel_pair()
    try:
        src.settimeout(0.05)
        assert src.socket.gettimeout() is None  # blocking: no poll before every call
        with pytest.raises(ChannelBrokenError, match="timed out writing"):
            for _ in range(1000):  # fills the socket buffers, then the kernel gives up
                src.put_buffer(bytes(DEFAULT_BUFSIZE))
    finally:
        src.close()
        dst.close()


def test_a_broken_channel_stays_broken(no_fd_leak):
    src, dst = channel_pair()
    r, w = os.pipe()
    try:
        dst.settimeout(0.01)
        with pytest.raises(ChannelBrokenError):
            dst.get_buffer(1)
        src.put_buffer(b"late")
        src.flush()
        with pytest.raises(ChannelBrokenError, match="timed out"):
            dst.get_buffer(1)  # the first error sticks, as QEMUFile's does
        src.close()
        src2, dst2 = channel_pair()
        dst2.close()
        src2.put_buffer(b"abc")
        with pytest.raises(ChannelError):
            src2.flush()
        with pytest.raises(ChannelBrokenError):
            src2.put_fd(r)  # batched: would only buffer, but the channel is broken
        src2.close()
    finally:
        dst.close()
        os.close(r)
        os.close(w)


def test_send_buffer_grows_where_allowed(no_fd_leak):
    src, dst = channel_pair()
    try:
        before = src.socket.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert src.set_send_buffer(4 << 20) >= before
    finally:
        src.close()
        dst.close()
