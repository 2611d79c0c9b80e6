"""Probe traffic through a TAP: numbered probe frames, sent and their echoes counted by :class:`FrameProbe`.

A :class:`FrameProbe` on the host side of a TAP sends numbered raw Ethernet
frames (ethertype 0x88B5, see :mod:`migfd.net.ethernet`) that the guest
workload echoes back, so the frames lost, duplicated or delayed by a
migration can be counted.  Only the probe knows what follows the Ethernet
header; the guest answers any 0x88B5 frame.
"""

from __future__ import annotations

import dataclasses
import socket
import struct
import threading
import time

from migfd.net.ethernet import ETH_HEADER, ETH_HEADER_LEN, ETH_P_MIGFD, GUEST_MAC
from migfd.net.netns import run_in_netns
from migfd.peers.observe import OWN_GAP_SLACK_NS, OwnGaps, prompt_gil, realtime

#: After the Ethernet header: sequence number, CLOCK_MONOTONIC send time in ns.
PROBE_HEADER = struct.Struct("!QQ")
MIN_PAYLOAD_LEN = PROBE_HEADER.size

SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
PACKET_OUTGOING = 4


@dataclasses.dataclass(frozen=True)
class Frame:
    """A parsed migfd probe frame."""

    dst: bytes
    src: bytes
    seq: int
    sent_ns: int


def build_frame(
    dst_mac: bytes, src_mac: bytes, seq: int, payload_len: int = 64,
    *, sent_ns: int | None = None,
) -> bytes:
    """Ethernet header (ethertype 0x88B5), be64 seq, be64 send time (ns), zero padding.

    ``payload_len`` counts the bytes after the 14-byte header (at least 16);
    ``sent_ns`` defaults to CLOCK_MONOTONIC now.
    """
    if len(dst_mac) != 6 or len(src_mac) != 6:
        raise ValueError("MAC addresses are 6 bytes")
    if payload_len < MIN_PAYLOAD_LEN:
        raise ValueError(f"payload_len must be at least {MIN_PAYLOAD_LEN}")
    if sent_ns is None:
        sent_ns = time.monotonic_ns()
    return (
        ETH_HEADER.pack(dst_mac, src_mac, ETH_P_MIGFD)
        + PROBE_HEADER.pack(seq, sent_ns)
        + bytes(payload_len - MIN_PAYLOAD_LEN)
    )


def parse_frame(frame: bytes | bytearray | memoryview) -> Frame | None:
    """The probe frame in ``frame``, or None if it is not one (other ethertype, too short)."""
    if len(frame) < ETH_HEADER_LEN + MIN_PAYLOAD_LEN:
        return None
    dst, src, ethertype = ETH_HEADER.unpack_from(frame)
    if ethertype != ETH_P_MIGFD:
        return None
    seq, sent_ns = PROBE_HEADER.unpack_from(frame, ETH_HEADER_LEN)
    return Frame(dst, src, seq, sent_ns)


# --------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrafficReport:
    """What a :class:`FrameProbe` saw between its start and :meth:`FrameProbe.stop`."""

    #: Frames the probe tried to send (failed sends included: they are lost too).
    frames_sent: int
    #: Echoes received, duplicates included.
    frames_received: int
    #: Sequence numbers echoed at least once.
    received: frozenset[int]
    #: Sent but never echoed within the drain timeout, ascending.
    lost: tuple[int, ...]
    #: Echoed more than once, ascending.
    duplicated: tuple[int, ...]
    #: Echoes that arrived after an echo of a higher sequence number.
    reordered: int
    #: Longest silence between consecutive echoes while sending (see FrameProbe.stop).
    max_gap_ns: int
    #: Largest send-to-echo time of any frame.
    max_rtt_ns: int
    #: From the first to the last send of the paced loop (0 if it never ran).
    send_duration_ns: int
    #: sendto() calls that failed (ENOBUFS, ENETDOWN...).
    send_errors: int
    #: Frames the kernel dropped because the probe's socket buffer was full; if
    #: not 0, part of ``lost`` is the probe's fault, not the path's.
    probe_drops: int
    #: CLOCK_MONOTONIC ns of every echo, in arrival order
    arrivals_ns: tuple[int, ...] = ()
    #: intervals in which the paced sender itself woke late (migfd.peers.observe.OwnGaps)
    own_gaps: OwnGaps | None = None
    #: whether the sender and receiver ran under SCHED_FIFO
    realtime: bool = False


def _open_packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_MIGFD))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            # Our own outgoing frames would otherwise loop back to us.
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError:
            pass  # kernel < 4.20: the MAC filter in the receiver does the job
        sock.bind((ifname, ETH_P_MIGFD))
    except BaseException:
        sock.close()
        raise
    return sock


class FrameProbe:
    """Numbered frames sent on ``ifname`` and their echoes counted.

    The probe's AF_PACKET socket is bound to (``ifname``, 0x88B5) in namespace
    ``netns``; the link must be up.  On a TAP, what the probe sends is read
    from the TAP fd by the guest, and what the guest writes to the fd is
    received here.  A frame counts as echoed when it comes back with the MACs
    swapped: ``dst`` = the interface's MAC, ``src`` = ``guest_mac``.

    The receiver runs from construction until :meth:`stop`; :meth:`start`
    adds the paced sender, :meth:`send` sends one frame by hand.  Both loops
    stop by themselves: the sender after ``max_frames`` frames or
    ``max_duration_s``, the receiver ``RECEIVER_GRACE_S`` after that.

    If the interface is deleted, the socket stops working for good (a TAP that
    is re-created is a new interface): use a persistent TAP when a scenario
    re-opens it.
    """

    RECEIVER_GRACE_S = 30.0

    def __init__(
        self,
        ifname: str,
        *,
        netns: str | None = None,
        guest_mac: bytes = GUEST_MAC,
        rate_per_s: float = 20_000.0,
        max_frames: int | None = None,
        max_duration_s: float = 10.0,
        payload_len: int = 64,
    ):
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        if max_duration_s <= 0:
            raise ValueError("max_duration_s must be positive")
        if len(guest_mac) != 6:
            raise ValueError("guest_mac is 6 bytes")
        if payload_len < MIN_PAYLOAD_LEN:
            raise ValueError(f"payload_len must be at least {MIN_PAYLOAD_LEN}")
        self.ifname = ifname
        self.netns = netns
        self.guest_mac = bytes(guest_mac)
        self.rate_per_s = float(rate_per_s)
        self.max_duration_s = float(max_duration_s)
        self.max_frames = (
            max_frames if max_frames is not None else int(self.rate_per_s * self.max_duration_s)
        )
        self.payload_len = payload_len

        self._sock = run_in_netns(netns, _open_packet_socket, ifname)
        # getsockname() of a bound packet socket carries the device's MAC.
        self.probe_mac: bytes = self._sock.getsockname()[4]
        self._header = ETH_HEADER.pack(self.guest_mac, self.probe_mac, ETH_P_MIGFD)
        self._padding = bytes(payload_len - MIN_PAYLOAD_LEN)

        self._lock = threading.Lock()
        self._sent: set[int] = set()
        self._echo_counts: dict[int, int] = {}
        self._matched = 0  # distinct sent seqs echoed at least once
        self._arrivals_ns: list[int] = []
        self._frames_received = 0
        self._reordered = 0
        self._highest_seq = -1
        self._max_rtt_ns = 0
        self._send_errors = 0
        self._frames_sent = 0
        self._next_seq = 0
        self._send_start_ns = 0
        self._send_end_ns = 0
        self._own_gaps = OwnGaps(int(1e9 / self.rate_per_s) + OWN_GAP_SLACK_NS)
        self._realtime: list[bool] = []

        self._stop_sending = threading.Event()
        self._stop_receiving = threading.Event()
        self._sender: threading.Thread | None = None
        self._stopped = False
        self._receiver = threading.Thread(
            target=self._receive_loop, name=f"probe-rx:{ifname}", daemon=True
        )
        self._receiver.start()

    # -- sending --------------------------------------------------------

    def _send_seq(self, seq: int) -> None:
        with self._lock:
            self._sent.add(seq)  # before sendto: the echo may beat us back
            self._frames_sent += 1
        frame = self._header + PROBE_HEADER.pack(seq, time.monotonic_ns()) + self._padding
        try:
            self._sock.send(frame)
        except OSError:
            self._send_errors += 1

    def send(self, seq: int) -> None:
        """Send one probe frame with sequence number ``seq`` now."""
        if self._stopped:
            raise RuntimeError("probe is stopped")
        self._send_seq(seq)

    def start(self, first_seq: int | None = None) -> None:
        """Start the paced sender (``rate_per_s``, sequence numbers counting up)."""
        if self._stopped:
            raise RuntimeError("probe is stopped")
        if self._sender is not None:
            raise RuntimeError("sender already started")
        if first_seq is not None:
            self._next_seq = first_seq
        prompt_gil()
        self._sender = threading.Thread(
            target=self._send_loop, name=f"probe-tx:{self.ifname}", daemon=True
        )
        self._sender.start()

    def _send_loop(self) -> None:
        # Pacing by count, not by interval: at each wake-up send every frame
        # whose time has come, then sleep until the next one is due.  Sleeping
        # overshoots by tens of microseconds, which the next wake-up makes up
        # for, so the average rate is exact without busy-waiting.
        interval_ns = 1e9 / self.rate_per_s
        self._realtime.append(realtime())
        start = time.monotonic_ns()
        deadline = start + int(self.max_duration_s * 1e9)
        self._send_start_ns = start
        sent = 0
        woke = start
        try:
            while sent < self.max_frames and not self._stop_sending.is_set():
                now = time.monotonic_ns()
                self._own_gaps.note(woke, now)
                woke = now
                if now >= deadline:
                    break
                due = min(self.max_frames, int((now - start) / interval_ns) + 1)
                while sent < due:
                    self._send_seq(self._next_seq)
                    self._next_seq += 1
                    sent += 1
                self._send_end_ns = time.monotonic_ns()
                next_due_ns = start + int(sent * interval_ns)
                delay_ns = next_due_ns - time.monotonic_ns()
                if delay_ns > 0:
                    self._stop_sending.wait(delay_ns / 1e9)
        finally:
            self._send_end_ns = max(self._send_end_ns, start)

    @property
    def frames_sent(self) -> int:
        return self._frames_sent

    def wait_sent(self, timeout_s: float | None = None) -> bool:
        """Wait until the paced sender has finished by itself; False on timeout."""
        if self._sender is None:
            raise RuntimeError("sender not started")
        self._sender.join(timeout_s)
        return not self._sender.is_alive()

    def wait_echoes(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` distinct sent frames have been echoed; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._matched < count:
            if time.monotonic() >= deadline or not self._receiver.is_alive():
                return self._matched >= count
            time.sleep(0.001)
        return True

    # -- receiving ------------------------------------------------------

    def _receive_loop(self) -> None:
        self._realtime.append(realtime())
        sock = self._sock
        sock.settimeout(0.05)
        buf = bytearray(2048)
        view = memoryview(buf)
        want_dst = self.probe_mac
        want_src = self.guest_mac
        hard_deadline = time.monotonic() + self.max_duration_s + self.RECEIVER_GRACE_S
        header_len = ETH_HEADER_LEN + PROBE_HEADER.size
        while not self._stop_receiving.is_set() and time.monotonic() < hard_deadline:
            try:
                n, addr = sock.recvfrom_into(buf)
            except TimeoutError:
                continue
            except OSError:
                break  # socket closed or interface gone
            now = time.monotonic_ns()
            if n < header_len or addr[2] == PACKET_OUTGOING:
                continue
            if view[0:6] != want_dst or view[6:12] != want_src:
                continue  # not an echo of ours (e.g. our own frame, seen on old kernels)
            seq, sent_ns = PROBE_HEADER.unpack_from(buf, ETH_HEADER_LEN)
            with self._lock:
                count = self._echo_counts.get(seq, 0) + 1
                self._echo_counts[seq] = count
                if count == 1 and seq in self._sent:
                    self._matched += 1
                self._arrivals_ns.append(now)
                self._frames_received += 1
                if seq < self._highest_seq:
                    self._reordered += 1
                else:
                    self._highest_seq = seq
                rtt = now - sent_ns
                if rtt > self._max_rtt_ns:
                    self._max_rtt_ns = rtt

    def _probe_drops(self) -> int:
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except OSError:
            return 0
        return struct.unpack("II", raw)[1]

    # -- result ---------------------------------------------------------

    def stop(self, drain_timeout_s: float = 1.0) -> TrafficReport:
        """Stop sending, wait up to ``drain_timeout_s`` for outstanding echoes, report.

        ``max_gap_ns`` is the longest interval between consecutive echo
        arrivals that began while the sender ran, counting the start of sending
        as an arrival and, if echoes stopped before sending did, the silence
        until the last send.  A migration's interruption shows up here.
        """
        if self._stopped:
            raise RuntimeError("probe already stopped")
        self._stopped = True
        try:
            self._stop_sending.set()
            if self._sender is not None:
                self._sender.join()
            self.wait_echoes(len(self._sent), drain_timeout_s)
            self._stop_receiving.set()
            self._receiver.join()
            probe_drops = self._probe_drops()
        finally:
            self._stop_receiving.set()
            self._receiver.join()
            self._sock.close()
        return self._report(probe_drops)

    def _report(self, probe_drops: int) -> TrafficReport:
        received = frozenset(self._echo_counts)
        lost = tuple(sorted(self._sent - received))
        duplicated = tuple(sorted(s for s, c in self._echo_counts.items() if c > 1))
        max_gap_ns = 0
        if self._sender is not None:
            start, end = self._send_start_ns, self._send_end_ns
            previous = start
            for t in self._arrivals_ns:
                if t < start:
                    continue  # echoes of hand-sent frames before the loop
                max_gap_ns = max(max_gap_ns, t - previous)
                previous = t
                if t >= end:
                    break
            if previous < end:
                max_gap_ns = max(max_gap_ns, end - previous)
        return TrafficReport(
            frames_sent=self._frames_sent,
            frames_received=self._frames_received,
            received=received,
            lost=lost,
            duplicated=duplicated,
            reordered=self._reordered,
            max_gap_ns=max_gap_ns,
            max_rtt_ns=self._max_rtt_ns,
            send_duration_ns=(self._send_end_ns - self._send_start_ns) if self._sender else 0,
            send_errors=self._send_errors,
            probe_drops=probe_drops,
            arrivals_ns=tuple(self._arrivals_ns),
            own_gaps=self._own_gaps,
            realtime=bool(self._realtime) and all(self._realtime),
        )

    def close(self) -> None:
        """Stop everything without a report (harmless after :meth:`stop`)."""
        self._stop_sending.set()
        self._stop_receiving.set()
        if self._sender is not None:
            self._sender.join()
        self._receiver.join()
        self._stopped = True
        self._sock.close()

    def __enter__(self) -> FrameProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
