"""The physical floor: what the kernel and this Python can do at best, measured in the same run.

Every figure here is a round trip or a transfer between two real processes
(this one and a child started with ``python -m migfd.bench.floors --child``),
connected by an AF_UNIX stream socketpair, the same transport a backend-transfer
migration uses. Nothing is a migration: these are the lower bounds the
migrations are compared with.

``fd-roundtrip``
    N fds (one service byte each) sent in batches of
    :data:`~migfd.channel.MAX_FDS_PER_MESSAGE` per sendmsg, received with
    MSG_CMSG_CLOEXEC; the child answers one byte when all have arrived.
    ``value`` is the cost of one more fd: (round trip with N fds - round trip
    of one plain byte) / N, in ns per fd.
``unix-throughput``
    M bytes sent with sendall; the child receives them with ``recv_into`` a
    freshly created shared mapping (page faults included, as a destination
    writing guest RAM into a fresh memfd), then answers one byte. ``value`` in
    bytes/s.
``memcpy``
    numpy copy between two buffers already faulted in, in this process. bytes/s.
``handover-floor``
    The device-state bytes and the fds of a real fd-passing migration, in one
    sendmsg, and the one-byte answer: the least a handover can cost.

Each measurement repeats ``reps`` times; a row carries the median.
"""

from __future__ import annotations

import argparse
import array
import mmap
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from migfd.channel import MAX_FDS_PER_MESSAGE, SCM_MAX_FD
from migfd.fds import close_fds
from migfd.units import MiB

#: command header: op (4 bytes), three unsigned 64-bit arguments
_CMD = struct.Struct("<4sQQQ")
_ACK = b"A"
_READY = b"R"
_FD_SIZE = array.array("i").itemsize
_ANCBUF = socket.CMSG_SPACE(SCM_MAX_FD * _FD_SIZE)
RECV_CHUNK = 1 * MiB


# --------------------------------------------------------------------------
# The child: answers the parent's measurements
# --------------------------------------------------------------------------


def _recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], min(len(view) - got, RECV_CHUNK))
        if n == 0:
            raise EOFError("parent went away")
        got += n


def _recv_fds(sock: socket.socket, nbytes: int, nfds: int) -> list[int]:
    """Receive ``nbytes`` bytes and ``nfds`` fds, whatever the message boundaries."""
    got = 0
    fds: list[int] = []
    while got < nbytes or len(fds) < nfds:
        data, anc, flags, _ = sock.recvmsg(max(1, min(nbytes - got, RECV_CHUNK)), _ANCBUF,
                                           socket.MSG_CMSG_CLOEXEC)
        if not data:
            raise EOFError("parent went away")
        got += len(data)
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.extend(array.array("i", payload[:len(payload) - len(payload) % _FD_SIZE]))
        if flags & socket.MSG_CTRUNC:
            raise RuntimeError("control message truncated")
    return fds


def child_main(fd: int) -> int:
    sock = socket.socket(fileno=fd)
    header = bytearray(_CMD.size)
    while True:
        try:
            _recv_exact_into(sock, memoryview(header))
        except EOFError:
            return 0
        op, a, b, reps = _CMD.unpack(header)
        if op == b"QUIT":
            return 0
        for _ in range(reps):
            if op in (b"FDRT", b"HAND"):  # a: fds, b: bytes (service bytes included)
                fds = _recv_fds(sock, b, a)
                sock.sendall(_ACK)
                close_fds(fds)
            elif op == b"BYTE":  # b: bytes into a fresh mapping
                buf = mmap.mmap(-1, b)
                view = memoryview(buf)
                _recv_exact_into(sock, view)
                sock.sendall(_ACK)
                view.release()
                buf.close()
            else:
                raise RuntimeError(f"unknown op {op!r}")
            sock.sendall(_READY)  # cleanup done: the next round trip starts clean


# --------------------------------------------------------------------------
# The parent
# --------------------------------------------------------------------------


class Peer:
    """A child process at the other end of an AF_UNIX stream socketpair."""

    def __init__(self) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock = parent
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "migfd.bench.floors", "--child", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL)
        finally:
            child.close()

    def command(self, op: bytes, a: int, b: int, reps: int) -> None:
        self.sock.sendall(_CMD.pack(op, a, b, reps))

    def wait_byte(self, want: bytes) -> None:
        got = self.sock.recv(1)
        if got != want:
            raise RuntimeError(f"floor child answered {got!r}, expected {want!r} "
                               f"(exit status {self.proc.poll()})")

    def close(self) -> None:
        try:
            self.command(b"QUIT", 0, 0, 0)
        except OSError:
            pass
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Peer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _batches(fds: list[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(fds), size):
        yield fds[start:start + size]


def _send_fds(sock: socket.socket, fds: list[int], batch: int, prefix: bytes = b"") -> None:
    first = True
    for group in _batches(fds, batch):
        payload = (prefix if first else b"") + b" " * len(group)
        first = False
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", group).tobytes())]
        sent = sock.sendmsg([payload], anc)
        if sent < len(payload):
            sock.sendall(payload[sent:])
    if first and prefix:
        sock.sendall(prefix)


def fd_roundtrip(peer: Peer, fds: list[int], reps: int, batch: int = MAX_FDS_PER_MESSAGE,
                 prefix: bytes = b"", op: bytes = b"FDRT") -> list[int]:
    """Round trips (ns) of sending ``prefix`` and ``fds`` (batched) and reading the answer."""
    nbytes = len(prefix) + len(fds)
    peer.command(op, len(fds), nbytes, reps)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        if fds:
            _send_fds(peer.sock, fds, batch, prefix)
        else:
            peer.sock.sendall(prefix or b" ")
        peer.wait_byte(_ACK)
        out.append(time.perf_counter_ns() - t0)
        peer.wait_byte(_READY)
    return out


def ping(peer: Peer, reps: int) -> list[int]:
    """Round trips (ns) of one byte: the part of every round trip that is not the fds."""
    peer.command(b"FDRT", 0, 1, reps)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        peer.sock.sendall(b" ")
        peer.wait_byte(_ACK)
        out.append(time.perf_counter_ns() - t0)
        peer.wait_byte(_READY)
    return out


def unix_throughput(peer: Peer, nbytes: int, reps: int) -> list[int]:
    """Elapsed ns of moving ``nbytes`` into fresh memory in the child, answer included."""
    data = np.frombuffer(os.urandom(1 << 20), dtype=np.uint8)
    src = np.resize(data, nbytes)  # non-zero bytes, faulted in before the clock
    view = memoryview(src)
    peer.command(b"BYTE", 0, nbytes, reps)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        peer.sock.sendall(view)
        peer.wait_byte(_ACK)
        out.append(time.perf_counter_ns() - t0)
        peer.wait_byte(_READY)
    return out


def memcpy(nbytes: int, reps: int) -> list[int]:
    """Elapsed ns of copying ``nbytes`` between two faulted-in buffers."""
    src = np.resize(np.frombuffer(os.urandom(1 << 20), dtype=np.uint8), nbytes)
    dst = np.ones(nbytes, dtype=np.uint8)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter_ns()
        np.copyto(dst, src)
        out.append(time.perf_counter_ns() - t0)
    return out


@dataclass
class HandoverProfile:
    """What one fd-passing migration of a whole VM hands over: where it came from, its size."""

    backend: str
    n_fds: int
    device_state_bytes: int
    source: str  # which rows (or probe) it was taken from


def open_fd_kinds(n: int) -> list[int]:
    """``n`` fds like a VM's backends: a memfd first, AF_UNIX sockets after."""
    fds: list[int] = []
    try:
        if n:
            fds.append(os.memfd_create("migfd-floor", os.MFD_CLOEXEC))
        while len(fds) < n:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            fds.append(a.detach())
            if len(fds) < n:
                fds.append(b.detach())
            else:
                b.close()
    except BaseException:
        close_fds(fds)
        raise
    return fds


def _median(values: list[int]) -> int:
    return int(statistics.median(values))


@dataclass
class FloorConfig:
    """How many fds, bytes and repetitions each floor measurement uses."""

    fd_counts: tuple[int, ...] = (1, 16, 64, 256)
    roundtrip_reps: int = 200
    throughput_bytes: int = 256 * MiB
    throughput_reps: int = 3
    memcpy_bytes: int = 256 * MiB
    memcpy_reps: int = 5


def floor_rows(trial: int, cfg: FloorConfig, profile: HandoverProfile | None) -> Iterator[dict]:
    """One trial of every floor; yields rows (``scenario``/``mode``/``trial`` filled by the caller)."""
    with Peer() as peer:
        # warm up both processes (imports, first page faults, socket buffers)
        ping(peer, 20)
        base = _median(ping(peer, cfg.roundtrip_reps))
        yield {"variant": "ping", "backend": "socket", "n_fds": 0, "ram_bytes": 1,
               "total_ns": base, "value": base, "unit": "ns"}
        null = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(max(cfg.fd_counts))]
        try:
            for n in cfg.fd_counts:
                rtt = _median(fd_roundtrip(peer, null[:n], cfg.roundtrip_reps))
                yield {"variant": "fd-roundtrip", "backend": "socket", "n_fds": n, "ram_bytes": n,
                       "total_ns": rtt, "fds_passed": n,
                       "fd_messages": -(-n // MAX_FDS_PER_MESSAGE),
                       "value": (rtt - base) / n, "unit": "ns/fd"}
        finally:
            close_fds(null)
        elapsed = _median(unix_throughput(peer, cfg.throughput_bytes, cfg.throughput_reps))
        yield {"variant": "unix-throughput", "backend": "socket", "ram_bytes": cfg.throughput_bytes,
               "total_ns": elapsed, "bytes_sent": cfg.throughput_bytes,
               "value": cfg.throughput_bytes / elapsed * 1e9, "unit": "bytes/s"}
        if profile is not None:
            fds = open_fd_kinds(profile.n_fds)
            try:
                state = os.urandom(profile.device_state_bytes)
                # One sendmsg with every byte and every fd (up to SCM_MAX_FD): the least possible.
                rtt = _median(fd_roundtrip(peer, fds, cfg.roundtrip_reps, batch=SCM_MAX_FD,
                                           prefix=state, op=b"HAND"))
            finally:
                close_fds(fds)
            yield {"variant": "handover-floor", "backend": profile.backend, "n_fds": profile.n_fds,
                   "device_state_bytes": profile.device_state_bytes,
                   "ram_bytes": profile.device_state_bytes + profile.n_fds,
                   "bytes_sent": profile.device_state_bytes + profile.n_fds,
                   "fds_passed": profile.n_fds, "fd_messages": 1 if profile.n_fds else 0,
                   "total_ns": rtt, "downtime_ns": rtt, "value": rtt, "unit": "ns"}
    elapsed = _median(memcpy(cfg.memcpy_bytes, cfg.memcpy_reps))
    yield {"variant": "memcpy", "backend": "ram", "ram_bytes": cfg.memcpy_bytes, "total_ns": elapsed,
           "value": cfg.memcpy_bytes / elapsed * 1e9, "unit": "bytes/s"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the floor measurements of migfd bench (child side)")
    p.add_argument("--child", type=int, required=True, help="fd of the socket to the parent")
    args = p.parse_args(argv)
    return child_main(args.child)


if __name__ == "__main__":
    sys.exit(main())
