"""The bulk paths of a state copy through real socketpairs: QEMUFile.put_buffers
gathers many buffers into few sendmsg calls and survives partial sends; the
destination reads straight into a buffer the StreamReader lends."""

from __future__ import annotations

import array
import ctypes
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
from test_channel import Background, channel_pair, no_fd_leak  # noqa: F401 (a fixture)

from migfd import channel
from migfd.channel import IOV_MAX, QEMUFile
from migfd.errors import ChannelBrokenError, ChannelError
from migfd.stream import PageBatch, RamBlock, RamPage, RamPageRun, StreamReader, StreamWriter
from migfd.stream.gather import Interleaved

PAGE = 4096


class RecordingSocket:
    """A real socket whose sendmsg calls (the fd messages) are recorded: (bytes offered, bytes sent)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.calls: list[tuple[int, int]] = []

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def sendmsg(self, buffers, *args):
        sent = self._sock.sendmsg(buffers, *args)
        self.calls.append((sum(map(len, buffers)), sent))
        return sent


@pytest.fixture
def writes(monkeypatch):
    """Every writev the channel makes, as (bytes offered, bytes sent); set ``.cap`` and
    each call offers the kernel at most that many bytes of its iovec, as a kernel that
    takes only part of a write would."""
    real = channel._libc_writev

    class Writes(list):
        cap: int | None = None

    calls = Writes()

    def writev(fd, address, count):
        iov = np.ctypeslib.as_array((ctypes.c_uint64 * (2 * count)).from_address(address)).reshape(count, 2)
        offered = int(iov[:, 1].sum())
        if calls.cap is not None and offered > calls.cap:
            iov = iov.copy()
            ends = np.cumsum(iov[:, 1])
            count = int(np.searchsorted(ends, calls.cap, side="left")) + 1
            iov[count - 1, 1] -= np.uint64(int(ends[count - 1]) - calls.cap)
            address = iov.ctypes.data
        sent = real(fd, address, count)
        calls.append((offered, sent))
        return sent

    monkeypatch.setattr(channel, "_libc_writev", writev)
    return calls


def read_all(sock: socket.socket, into: bytearray, pause_s: float = 0.0, chunk: int = 1 << 16) -> None:
    while True:
        data = sock.recv(chunk)
        if not data:
            return
        into += data
        if pause_s:
            time.sleep(pause_s)


def some_buffers(n: int, seed: int, page: int = PAGE) -> list:
    """Byte buffers of every kind the writer hands over: bytes, views, numpy rows, empty
    ones, and Interleaved runs of record words and pages that lie apart in RAM."""
    rng = np.random.default_rng(seed)
    ram = rng.integers(0, 256, size=(n, page), dtype=np.uint8)
    heads = memoryview(rng.integers(0, 256, size=8 * n, dtype=np.uint8))
    out: list = []
    for i in range(n):
        out.append(heads[8 * i:8 * i + 8])
        out.append(memoryview(ram[i]).cast("B") if i % 5 else ram[i].tobytes()[: (i * 37) % page])
        if i % 97 == 0:
            out.append(b"")
        if i % 41 == 0:
            k = 1 + i % 7
            words = np.frombuffer(heads.obj, dtype=np.uint8)[:8 * k].reshape(k, 8)
            out.append(Interleaved(words, ram[::3][:k]))  # every third page: rows apart
    return out


def as_bytes(buf) -> bytes:
    return buf.tobytes() if isinstance(buf, Interleaved) else bytes(buf)


@pytest.mark.parametrize("cap, page", [(1, 16), (7, 64), (4095, PAGE), (4104 * 3 + 7, PAGE), (1 << 30, PAGE)])
def test_put_buffers_goes_on_after_partial_sends(no_fd_leak, writes, cap, page):
    """Whatever part of a call the kernel takes, every byte arrives once, in order."""
    a, b = socket.socketpair()
    writes.cap = cap
    src = QEMUFile(name="src", sock=a)
    got = bytearray()
    reader = threading.Thread(target=read_all, args=(b, got), daemon=True)
    reader.start()
    buffers = some_buffers(IOV_MAX // 2 + 300, seed=cap, page=page)  # more buffers than one call takes
    try:
        src.put_buffer(b"head")  # buffered bytes leave first
        src.put_buffers(buffers)
        src.put_buffer(b"tail")
        src.flush()
    finally:
        src.close()
    reader.join()
    b.close()
    assert bytes(got) == b"head" + b"".join(as_bytes(x) for x in buffers) + b"tail"
    assert any(sent < offered for offered, sent in writes) == (cap < 1 << 30)
    assert src.bytes_sent == len(got)


def test_put_buffers_to_a_peer_that_reads_slowly(no_fd_leak, writes):
    """A small kernel buffer, a slow reader and signals: writev returns after part of
    the data (an interrupted send), and the channel sends the rest."""
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 << 10)
    src = QEMUFile(name="src", sock=a)
    got = bytearray()
    reader = threading.Thread(target=read_all, args=(b, got, 0.001, 8 << 10), daemon=True)
    reader.start()
    buffers = some_buffers(3 * IOV_MAX, seed=1)
    previous = signal.signal(signal.SIGALRM, lambda *_: None)
    signal.setitimer(signal.ITIMER_REAL, 0.002, 0.002)
    try:
        src.put_buffers(buffers)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        src.close()
    reader.join()
    b.close()
    assert bytes(got) == b"".join(as_bytes(x) for x in buffers)
    assert any(sent < offered for offered, sent in writes)  # the path under test was taken


def test_buffered_fds_leave_before_the_gathered_buffers(no_fd_leak, writes):
    """An fd waiting in the buffer keeps its own sendmsg, ahead of the gathered
    buffers; plain buffered bytes join them in one call."""
    a, b = socket.socketpair()
    sock = RecordingSocket(a)
    src = QEMUFile(name="src", sock=sock)  # type: ignore[arg-type]
    fd = os.memfd_create("ram")
    received: list[int] = []
    try:
        src.put_buffer(b"a")
        src.put_fd(fd)
        src.put_buffers([b"bc", memoryview(b"de")])
        src.put_buffer(b"f")
        src.put_buffers([b"gh"])
        assert sock.calls == [(2, 2)] and writes == [(4, 4), (3, 3)]
        b.setblocking(False)
        data, anc, _, _ = b.recvmsg(64, socket.CMSG_SPACE(4))
        received = [fd for _, _, payload in anc for fd in array.array("i", payload)]
        assert data == b"a " and len(received) == 1  # a message with fds ends a read
        assert b.recv(64) == b"bcdefgh"
    finally:
        src.close()
        b.close()
        os.close(fd)
        for got in received:
            os.close(got)


def test_read_into_hands_over_what_the_channel_holds_first(no_fd_leak):
    """Bytes a get_* read buffered come before anything new from the kernel."""
    src, dst = channel_pair()
    dst.settimeout(10)  # a channel that forgot what it holds would wait for it
    try:
        src.put_buffer(b"\x00\x00\x00\x07" + b"rest")
        src.flush()
        assert dst.get_be32() == 7
        src.put_buffer(b"-more")
        src.flush()
        out = bytearray()
        room = memoryview(bytearray(64))
        while len(out) < len(b"rest-more"):
            got = dst.read_into(room)
            assert got is not None
            nbytes, fds = got
            assert fds == []
            out += room[:nbytes]
        assert bytes(out) == b"rest-more"
        src.close()
        assert dst.read_into(room) == (0, [])
    finally:
        src.close()
        dst.close()


# -- the destination: reading into the reader's buffer ------------------------


def guest_ram(pages: int, seed: int) -> np.ndarray:
    """RAM with runs of zero pages and runs of stamped ones."""
    rng = np.random.default_rng(seed)
    ram = rng.integers(0, 256, size=(pages, PAGE), dtype=np.uint8)
    ram[rng.random(pages) < 0.3] = 0
    ram[:, :8] = np.arange(pages, dtype=">u8").view(np.uint8).reshape(pages, 8)
    ram[ram[:, 8:].any(axis=1) == 0] = 0  # a page zero but for its index is zero
    return ram


def send_ram(f: QEMUFile, ram: np.ndarray, batch: int) -> None:
    w = StreamWriter(f)
    w.write_header()
    w.write_ram_start([RamBlock("ram0", ram.nbytes)])
    index = np.arange(len(ram))
    batches = [PageBatch("ram0", index[i:i + batch].astype(np.uint64) * PAGE, ram[i:i + batch])
               for i in range(0, len(ram), batch)]
    w.write_ram_part(batches[:2])
    w.write_ram_part(batches[2:], end=True)
    w.write_eof()
    f.flush()
    f.close()


@pytest.mark.parametrize("pages, lend", [(20, 13), (700, 4103), (700, 3 * 4104 + 5), (700, 65537),
                                         (700, 1 << 20)])
def test_pages_round_trip_through_lent_buffers(no_fd_leak, pages, lend):
    """Pages sent by put_buffers from a RAM array, read with read_into into the
    reader's lent buffer at odd read sizes, come out as the same RAM; runs whose
    pages are held across reads keep their bytes."""
    ram = guest_ram(pages, seed=lend)
    src, dst = channel_pair()
    sender = Background(lambda: send_ram(src, ram, batch=min(96, pages // 3)))
    reader = StreamReader(ram_runs=True)
    copy = np.full_like(ram, 0xAA)
    held: list[tuple[RamPageRun, np.ndarray]] = []
    try:
        while not reader.done:
            buffer = reader.get_buffer(lend)
            got = dst.read_into(buffer)
            del buffer
            assert got is not None
            reader.buffer_updated(*got)
            if got == (0, []):
                reader.receive_eof()
            for ev in reader.events():
                if isinstance(ev, RamPageRun):
                    index = (ev.offsets // PAGE).astype(np.intp)
                    copy[index] = 0 if ev.data is None else ev.data
                    if ev.data is not None and len(held) < 50:
                        held.append((ev, ev.data.copy()))
                elif isinstance(ev, RamPage):
                    page = np.frombuffer(ev.data, dtype=np.uint8) if ev.data is not None else ev.fill
                    copy[ev.offset // PAGE] = page
        sender.result()
    finally:
        src.close()
        dst.close()
    assert np.array_equal(copy, ram)
    assert all(np.array_equal(ev.data, was) for ev, was in held)
    assert bool(held) == (lend > 2 * (8 + PAGE))  # runs need two records at once


@pytest.mark.parametrize("pieces", [1, 3, 300, 1500])
def test_read_into_buffers_fills_each_in_order_across_partial_reads(no_fd_leak, pieces):
    """Scattered destinations (one view per page of a packet), more than IOV_MAX of them,
    fed by a sender that sends in odd pieces: every byte lands where it belongs."""
    src, dst = channel_pair()
    with src, dst:
        data = np.random.default_rng(pieces).integers(0, 256, pieces * 1000, dtype=np.uint8).tobytes()
        held = b"held-by-the-channel"

        def send_in_pieces():
            src.put_buffer(held)
            src.flush()
            for i in range(0, len(data), 777):
                src.put_buffer(data[i:i + 777])
                src.flush()
            src.put_buffer(b"after")
            src.flush()
        sender = Background(send_in_pieces)
        assert dst.get_buffer(len(held) - 4) == held[:-4]  # the channel now holds a few bytes beyond
        target = bytearray(4 + pieces * 1000)
        views = [memoryview(target)[i:i + 1000] for i in range(4, len(target), 1000)][::-1]
        head = memoryview(target)[:4]
        dst.read_into_buffers([head, *views])
        sender.result()
        assert bytes(target[:4]) == held[-4:]
        got = b"".join(bytes(v) for v in views)
        assert got == data
        assert dst.get_buffer(5) == b"after"


def test_read_into_buffers_at_the_end_of_the_stream_is_a_broken_channel(no_fd_leak):
    src, dst = channel_pair()
    with dst:
        with src:
            src.put_buffer(b"x" * 100)
            src.flush()
        target = bytearray(200)
        with pytest.raises(ChannelBrokenError, match="end of stream, 100 more bytes expected"):
            dst.read_into_buffers([memoryview(target)])


def test_read_into_iovec_scatters_bytes_and_hands_over_the_fds_with_them(no_fd_leak):
    """One read without waiting into scattered memory: bytes in iovec order, the fds
    that came with them (several in one message), None when nothing is there, and
    (0, []) at the end of the stream."""
    src, dst = channel_pair()
    memfds = [os.memfd_create(f"m{i}") for i in range(3)]
    got_fds: list[int] = []
    try:
        target = np.zeros((4, 16), dtype=np.uint8)
        words = np.zeros((4, 3), dtype=np.uint8)
        iov = Interleaved(words, target[:, 2:14]).iovec()  # 3 bytes here, 12 there, in turn
        assert dst.read_into_iovec(iov) is None  # nothing sent yet
        payload = bytes(range(1, 36))
        src.put_buffer(payload[:20])
        for fd in memfds:
            src.put_fd(fd)
        src.flush()
        wait_readable(dst)
        nbytes, got_fds = dst.read_into_iovec(iov)
        assert nbytes == 23 and len(got_fds) == 3  # a message with fds ends the read
        assert [os.fstat(a).st_ino for a in got_fds] == [os.fstat(b).st_ino for b in memfds]
        sent = payload[:20] + b"   "  # the fds' service bytes
        assert words[0].tobytes() + target[0, 2:14].tobytes() + words[1].tobytes() + \
            target[1, 2:7].tobytes() == sent
        assert not target[:, :2].any() and not target[:, 14:].any() and not target[1:, 7:].any()
        src.close()
        wait_readable(dst)
        assert dst.read_into_iovec(iov) == (0, [])
    finally:
        src.close()
        dst.close()
        for fd in memfds + got_fds:
            os.close(fd)


def test_read_into_iovec_refuses_to_pass_bytes_the_channel_holds(no_fd_leak):
    src, dst = channel_pair()
    with src, dst:
        src.put_buffer(b"\x00\x00\x00\x07rest")
        src.flush()
        assert dst.get_be32() == 7  # "rest" is held now
        with pytest.raises(ChannelError, match="bytes read before"):
            dst.read_into_iovec(Interleaved(np.zeros((1, 8), np.uint8), np.zeros((1, 8), np.uint8)).iovec())


def wait_readable(f: QEMUFile) -> None:
    f.settimeout(10)
    f.wait_readable()
