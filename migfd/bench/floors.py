"""The physical floor: what the kernel and this Python can do at best, measured in the same run.

Every figure here is a round trip or a transfer between two real processes
(this one and a child started with ``python -m migfd.bench.floors --child``),
connected by an AF_UNIX stream socketpair, the same transport a backend-transfer
migration uses. Nothing is a migration: these are the lower bounds the
migrations are compared with.

The fds are of the kinds the migrations hand over, never /dev/null: what the
kernel does per fd depends on the file (an AF_UNIX socket in flight is
tracked for its garbage collector, for instance).

``fd-roundtrip``
    N fds (one service byte each) sent in batches of
    :data:`~migfd.channel.MAX_FDS_PER_MESSAGE` per sendmsg, received with
    MSG_CMSG_CLOEXEC; the child answers one byte when all have arrived. The
    fds are what fd-count hands over: queues of one multi-queue TAP (as root
    with /dev/net/tun), else listening AF_UNIX sockets. ``value`` is the cost
    of one more fd: (round trip with N fds - round trip of one plain byte) /
    N, in ns per fd.
``unix-throughput``
    M bytes sent with sendall; the child receives them with ``recv_into`` a
    fresh shared mapping whose pages it allocated before the clock started (as
    a destination copying state allocates guest RAM at the RAM START, before
    the source stops), then answers one byte. ``value`` in bytes/s. Measured
    at every RAM size the copies it is compared with moved (``ram_bytes``),
    smaller sizes repeated more.
``memcpy``
    numpy copy between two buffers already faulted in, in this process. bytes/s.
``handover-floor``
    The message pattern of a switchover with backend-transfer, and nothing
    else: the device-state bytes of a real fd-passing migration with its fds
    (a memfd, a TAP queue, connected sockets), batched as the channel batches
    them; the destination's one-byte acknowledgement; the source's one-byte
    EOF. It ends when the child has read the EOF, on the child's
    CLOCK_MONOTONIC (one host, one clock): what a downtime spans.
``handover-oneway``, ``commit-roundtrip``
    The two parts of the same switchovers, apart: from the first sendmsg to
    the child having received the last byte and fd (the one-way transfer of
    the state and fds), and from then to the child having read the EOF (its
    acknowledgement there, the EOF back: migfd's commit round trip), both on
    the child's clock. Per switchover they add up to the handover floor.
``handover-floor-loaded``
    The handover floor again while tap-traffic's probe sends its frames
    through the TAP whose queue is handed over (:class:`TapLoad`): the load
    a tap-traffic migration's switchover runs under. It needs a TAP; it does
    not judge a target, it is shown beside the idle one.
``fd-roundtrip-unbatched``
    ``fd-roundtrip`` at the most fds with one fd per sendmsg, as fd-count's
    unbatched migrations send them.

Each measurement repeats ``reps`` times; a row carries the median.
"""

from __future__ import annotations

import argparse
import array
import json
import mmap
import os
import socket
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import numpy as np

from migfd.channel import MAX_FDS_PER_MESSAGE, SCM_MAX_FD
from migfd.devices.memfd import MADV_POPULATE_WRITE
from migfd.fds import close_fds
from migfd.net.tun import open_tap_queues
from migfd.peers.frames import FrameProbe
from migfd.units import GiB, MiB

#: command header: op (4 bytes), three unsigned 64-bit arguments
_CMD = struct.Struct("<4sQQQ")
_ACK = b"A"
_READY = b"R"
_EOF = b"E"
#: the child's CLOCK_MONOTONIC when it had every byte and fd of a switchover, and when it read the EOF
_TIMES = struct.Struct(">QQ")
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


def allocated_mapping(nbytes: int) -> mmap.mmap:
    """A fresh shared mapping whose pages are allocated (MADV_POPULATE_WRITE), as a
    destination allocates guest RAM at the RAM START, before the source stops."""
    buf = mmap.mmap(-1, nbytes)
    try:
        buf.madvise(MADV_POPULATE_WRITE)
    except OSError:
        np.frombuffer(buf, dtype=np.uint8)[::mmap.PAGESIZE] = 0  # before 5.14: one fault a page
    return buf


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
        if op == b"BYTE":
            reps_left = reps
            buf = allocated_mapping(b)
            sock.sendall(_READY)  # the first clock starts now
        for _ in range(reps):
            if op == b"FDRT":  # a: fds, b: bytes (service bytes included)
                fds = _recv_fds(sock, b, a)
                sock.sendall(_ACK)
                close_fds(fds)
            elif op == b"HOVR":  # a switchover: state and fds, ACK, the EOF; then when each part ended
                fds = _recv_fds(sock, b, a)
                received = time.monotonic_ns()
                sock.sendall(_ACK)
                _recv_exact_into(sock, memoryview(bytearray(1)))
                at = time.monotonic_ns()
                sock.sendall(_TIMES.pack(received, at))
                close_fds(fds)
            elif op == b"BYTE":  # b: bytes into a fresh mapping, allocated before the clock
                view = memoryview(buf)
                _recv_exact_into(sock, view)
                sock.sendall(_ACK)
                view.release()
                buf.close()
                reps_left -= 1
                if reps_left:
                    buf = allocated_mapping(b)
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
                 prefix: bytes = b"") -> list[int]:
    """Round trips (ns) of sending ``prefix`` and ``fds`` (batched) and reading the answer."""
    nbytes = len(prefix) + len(fds)
    peer.command(b"FDRT", len(fds), nbytes, reps)
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


class Switchover(NamedTuple):
    """One switchover of the handover floor, in ns from the first sendmsg, on the child's clock."""

    #: until the child had received every byte and fd
    oneway_ns: int
    #: until the child had read the EOF
    total_ns: int

    @property
    def commit_ns(self) -> int:
        """The commit round trip: the child's acknowledgement there, the EOF back."""
        return self.total_ns - self.oneway_ns


def handover(peer: Peer, state: bytes, fds: list[int], reps: int) -> list[Switchover]:
    """Switchovers: ``state`` and ``fds`` (batched as the channel does), the
    acknowledgement, the EOF; each ends when the child has read the EOF."""
    peer.command(b"HOVR", len(fds), len(state) + len(fds), reps)
    out = []
    answer = bytearray(_TIMES.size)
    for _ in range(reps):
        t0 = time.monotonic_ns()
        if fds:
            _send_fds(peer.sock, fds, MAX_FDS_PER_MESSAGE, state)
        else:
            peer.sock.sendall(state)
        peer.wait_byte(_ACK)
        peer.sock.sendall(_EOF)
        _recv_exact_into(peer.sock, memoryview(answer))
        received, at = _TIMES.unpack(answer)
        out.append(Switchover(received - t0, at - t0))
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


def random_bytes(nbytes: int) -> np.ndarray:
    """``nbytes`` of non-zero data, faulted in (made before any clock starts)."""
    return np.resize(np.frombuffer(os.urandom(1 << 20), dtype=np.uint8), nbytes)


def unix_throughput(peer: Peer, nbytes: int, reps: int, data: np.ndarray | None = None) -> list[int]:
    """Elapsed ns of moving ``nbytes`` into fresh memory in the child, answer included.

    ``data`` (at least ``nbytes``) saves making the source buffer again.
    """
    src = random_bytes(nbytes) if data is None else data[:nbytes]
    view = memoryview(src)
    peer.command(b"BYTE", 0, nbytes, reps)
    peer.wait_byte(_READY)  # the child's memory is ready
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


@dataclass(frozen=True)
class FloorTap:
    """A TAP the floors may open queues of: ``ifname`` in namespace ``netns``, ``queues`` queues."""

    ifname: str
    netns: str
    queues: int


#: the longest a load probe sends: far beyond one trial's loaded switchovers, so it never stops early
PROBE_MAX_S = 600.0


class TapLoad:
    """tap-traffic's probe traffic on a floor's TAP, from a process of its own (a context manager).

    The probe (:class:`~migfd.peers.frames.FrameProbe`, as tap-traffic runs
    it) sends numbered frames at ``rate_per_s`` into the TAP (its link up, as
    a VM's TAP is); with no guest to echo them they queue in the TAP queue
    the switchovers hand over, as they do while a tap-traffic VM is stopped.
    The probe runs in a process of its own, as it runs beside the VMs in
    tap-traffic: in this one its threads would hold the GIL the floor's
    timing loop needs, a load no migration sees. :meth:`stop` returns what it
    sent.
    """

    def __init__(self, tap: FloorTap, rate_per_s: float) -> None:
        self.tap = tap
        self.report: dict | None = None
        self.stderr_tail = ""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migfd.bench.floors", "--probe", tap.ifname, "--netns", tap.netns,
             "--rate", str(rate_per_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ready = self.proc.stdout.readline()
        if ready != _READY + b"\n":
            self.stop()
            raise RuntimeError(f"the load probe did not start (exit status {self.proc.returncode}: "
                               f"{self.stderr_tail or 'no error text'})")

    def stop(self) -> dict:
        """Stop the probe (once); what it reported: ``frames_sent``, ``send_errors``."""
        if self.proc.returncode is None:
            try:
                out, err = self.proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, err = self.proc.communicate()
            self.stderr_tail = (err.decode(errors="replace").strip().splitlines() or [""])[-1]
            try:
                self.report = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                self.report = {}
        return self.report or {}

    def __enter__(self) -> "TapLoad":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def probe_main(ifname: str, netns: str, rate_per_s: float) -> int:
    """The load probe's process: send until stdin closes, then say what was sent."""
    probe = FrameProbe(ifname, netns=netns, rate_per_s=rate_per_s, max_duration_s=PROBE_MAX_S)
    probe.start()
    deadline = time.monotonic() + 10
    while probe.frames_sent == 0:  # the parent's clock starts under load, not before it
        if time.monotonic() > deadline:
            print("the probe sent no frame in 10 s", file=sys.stderr)
            return 1
        time.sleep(0.0001)
    sys.stdout.buffer.write(_READY + b"\n")
    sys.stdout.flush()
    sys.stdin.buffer.read()
    report = probe.stop(drain_timeout_s=0)
    print(json.dumps({"frames_sent": report.frames_sent, "send_errors": report.send_errors}), flush=True)
    return 0


class BackendFds:
    """Open fds of the kinds a VM hands over, and whatever keeps them what they are.

    :meth:`whole_vm`: a memfd, a TAP queue (when a TAP is given), then
    connected AF_UNIX sockets (their peers kept open here, so they stay
    connected). :meth:`queues`: what fd-count hands over, queues of a
    multi-queue TAP or else listening AF_UNIX sockets. Everything is closed
    by :meth:`close`.
    """

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._keep: list[int] = []

    def whole_vm(self, n: int, tap: FloorTap | None) -> list[int]:
        out: list[int] = []
        if n:
            out.append(self._own(os.memfd_create("migfd-floor", os.MFD_CLOEXEC)))
        if len(out) < n and tap is not None:
            out.append(self._own(open_tap_queues(tap.ifname, 1, netns=tap.netns)[0]))
        while len(out) < n:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            out.append(self._own(a.detach()))
            self._keep.append(b.detach())
        return out

    def queues(self, n: int, tap: FloorTap | None) -> list[int]:
        if tap is not None and tap.queues >= n:
            return [self._own(fd) for fd in open_tap_queues(tap.ifname, n, netns=tap.netns)]
        out = []
        for _ in range(n):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind("")  # an abstract address the kernel picks: nothing to clean up
            sock.listen(1)
            out.append(self._own(sock.detach()))
        return out

    def _own(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close(self) -> None:
        close_fds(self.fds + self._keep)
        self.fds, self._keep = [], []

    def __enter__(self) -> "BackendFds":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _median(values: list[int]) -> int:
    return int(statistics.median(values))


#: the bytes moved over all repetitions of one throughput point, at least
THROUGHPUT_BYTES_PER_POINT = 2 * GiB
THROUGHPUT_REPS = (2, 16)


def throughput_reps(nbytes: int, budget: int = THROUGHPUT_BYTES_PER_POINT) -> int:
    """Repetitions of a throughput point: a small copy is over quickly and moves
    most between runs, so it gets more (within :data:`THROUGHPUT_REPS`)."""
    low, high = THROUGHPUT_REPS
    return max(low, min(high, budget // max(nbytes, 1)))


@dataclass
class FloorConfig:
    """How many fds, bytes and repetitions each floor measurement uses."""

    fd_counts: tuple[int, ...] = (1, 16, 64, 256)
    #: round trips are tens of µs and move with the machine's load: many of them
    roundtrip_reps: int = 500
    #: the sizes of the copies the throughput floor is compared with
    throughput_sizes: tuple[int, ...] = (256 * MiB,)
    throughput_budget: int = THROUGHPUT_BYTES_PER_POINT
    memcpy_bytes: int = 256 * MiB
    memcpy_reps: int = 5
    #: where TAP queues come from (None: no TAP on this machine)
    tap: FloorTap | None = None
    #: the probe's frame rate of the loaded handover floor (0: not measured; it needs ``tap``)
    load_frame_rate_per_s: float = 0.0


def _handover_fields(profile: HandoverProfile) -> dict:
    """What every row of the handover floors says about what they hand over."""
    return {"backend": profile.backend, "n_fds": profile.n_fds, "device_state_bytes": profile.device_state_bytes,
            "ram_bytes": profile.device_state_bytes + profile.n_fds,
            "bytes_sent": profile.device_state_bytes + profile.n_fds + 1,
            "fds_passed": profile.n_fds, "fd_messages": -(-profile.n_fds // MAX_FDS_PER_MESSAGE), "unit": "ns"}


def _loaded_handover(peer: Peer, state: bytes, fds: list[int], cfg: FloorConfig) -> dict:
    """The loaded handover floor's figures, or its failure (``ok`` False, ``error``): the probe
    is beside the floors, a probe that cannot run must not cost the trial its other rows."""
    assert cfg.tap is not None
    try:
        with TapLoad(cfg.tap, cfg.load_frame_rate_per_s) as load:
            switchovers = handover(peer, state, fds, cfg.roundtrip_reps)
    except (OSError, RuntimeError) as exc:
        return {"ok": False, "error": f"loaded handover floor: {exc}"}
    elapsed = _median([s.total_ns for s in switchovers])
    return {"total_ns": elapsed, "downtime_ns": elapsed, "value": elapsed,
            "frames_sent": load.stop().get("frames_sent")}


def floor_rows(trial: int, cfg: FloorConfig, profile: HandoverProfile | None) -> Iterator[dict]:
    """One trial of every floor; yields rows (``scenario``/``mode``/``trial`` filled by the caller)."""
    queue_kind = "tap" if cfg.tap is not None and cfg.tap.queues >= max(cfg.fd_counts) else "socket"
    with Peer() as peer:
        # warm up both processes (imports, first page faults, socket buffers)
        ping(peer, 20)
        base = _median(ping(peer, cfg.roundtrip_reps))
        yield {"variant": "ping", "backend": "socket", "n_fds": 0, "ram_bytes": 1,
               "total_ns": base, "value": base, "unit": "ns"}
        with BackendFds() as backends:
            fds = backends.queues(max(cfg.fd_counts), cfg.tap if queue_kind == "tap" else None)
            for variant, n, batch in [("fd-roundtrip", n, MAX_FDS_PER_MESSAGE) for n in cfg.fd_counts] + [
                    ("fd-roundtrip-unbatched", max(cfg.fd_counts), 1)]:
                rtt = _median(fd_roundtrip(peer, fds[:n], cfg.roundtrip_reps, batch))
                yield {"variant": variant, "backend": queue_kind, "n_fds": n, "ram_bytes": n,
                       "total_ns": rtt, "fds_passed": n, "fd_messages": -(-n // batch),
                       "value": (rtt - base) / n, "unit": "ns/fd"}
        data = random_bytes(max(cfg.throughput_sizes))
        for size in cfg.throughput_sizes:
            elapsed = _median(unix_throughput(peer, size, throughput_reps(size, cfg.throughput_budget), data))
            yield {"variant": "unix-throughput", "backend": "socket", "ram_bytes": size,
                   "total_ns": elapsed, "bytes_sent": size, "value": size / elapsed * 1e9, "unit": "bytes/s"}
        del data
        if profile is not None:
            fields = _handover_fields(profile)
            with BackendFds() as backends:
                fds = backends.whole_vm(profile.n_fds, cfg.tap)
                state = os.urandom(profile.device_state_bytes)
                idle = handover(peer, state, fds, cfg.roundtrip_reps)
                loaded: dict | None = None
                if cfg.tap is not None and cfg.load_frame_rate_per_s > 0:
                    loaded = _loaded_handover(peer, state, fds, cfg)
            for variant, elapsed in (("handover-floor", _median([s.total_ns for s in idle])),
                                     ("handover-oneway", _median([s.oneway_ns for s in idle])),
                                     ("commit-roundtrip", _median([s.commit_ns for s in idle]))):
                yield {"variant": variant, **fields, "total_ns": elapsed, "downtime_ns": elapsed, "value": elapsed}
            if loaded is not None:
                yield {"variant": "handover-floor-loaded", **fields, **loaded}
    elapsed = _median(memcpy(cfg.memcpy_bytes, cfg.memcpy_reps))
    yield {"variant": "memcpy", "backend": "ram", "ram_bytes": cfg.memcpy_bytes, "total_ns": elapsed,
           "value": cfg.memcpy_bytes / elapsed * 1e9, "unit": "bytes/s"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the floor measurements of migfd bench (child side, load probe)")
    role = p.add_mutually_exclusive_group(required=True)
    role.add_argument("--child", type=int, help="fd of the socket to the parent")
    role.add_argument("--probe", metavar="IFNAME", help="send probe frames into this TAP until stdin closes")
    p.add_argument("--netns", help="the probe's network namespace")
    p.add_argument("--rate", type=float, default=20_000.0, help="the probe's frames a second")
    args = p.parse_args(argv)
    if args.probe is not None:
        return probe_main(args.probe, args.netns, args.rate)
    return child_main(args.child)


if __name__ == "__main__":
    sys.exit(main())
