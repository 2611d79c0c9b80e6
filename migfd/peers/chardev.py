"""The peer of a socket chardev: numbered lines sent through a migration, every interruption noticed."""

from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass, field

from migfd.peers.observe import OWN_GAP_SLACK_NS, OwnGaps, prompt_gil, realtime

#: how long a chardev client waits on one send before it calls the peer gone
SEND_TIMEOUT_S = 10.0


@dataclass
class ChardevReport:
    """What a chardev client saw while lines went through a migration."""

    lines_sent: int
    lines_echoed: int
    reconnects: int
    max_gap_ns: int
    lost: list[int] = field(default_factory=list)
    #: CLOCK_MONOTONIC ns of every read that brought echoes
    arrivals_ns: list[int] = field(default_factory=list)
    #: intervals in which the client itself did not run (see migfd.peers.observe.OwnGaps)
    own_gaps: OwnGaps | None = None
    #: whether its thread ran under SCHED_FIFO
    realtime: bool = False


class ChardevClient:
    """Connects to a socket chardev and sends numbered lines at a fixed rate.

    It counts echoes, the longest silence between two echoes, and the
    reconnections it needed (a state-copy migration closes the connection; a
    handover does not). It keeps the time of every read that brought echoes,
    runs at real-time priority where allowed, and records its own gaps (a
    wake-up later than a line interval plus slack): a silence that holds one
    may be the client's own, not the guest's.
    """

    def __init__(self, path: str, rate_per_s: int = 1000, connect_timeout_s: float = 10.0):
        self.path = path
        self.rate_per_s = rate_per_s
        self.connect_timeout_s = connect_timeout_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0
        self.echoed: set[int] = set()
        self.reconnects = 0
        self.max_gap_ns = 0
        self.error: str | None = None
        self.arrivals_ns: list[int] = []
        self.own_gaps = OwnGaps(int(1e9 / rate_per_s) + OWN_GAP_SLACK_NS)
        self.realtime = False

    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.connect_timeout_s
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
                # Sends may wait while a stopped guest reads nothing (the kernel
                # queue fills): that is an interruption to measure, not a disconnect.
                sock.settimeout(SEND_TIMEOUT_S)
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline or self._stop.is_set():
                    raise
                time.sleep(0.005)

    def start(self) -> None:
        prompt_gil()
        self._sock = self._connect()
        self._thread = threading.Thread(target=self._run, name="chardev-client", daemon=True)
        self._thread.start()

    def wait_echoes(self, count: int, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while len(self.echoed) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return len(self.echoed) >= count

    def _run(self) -> None:
        sock = self._sock
        buf = b""
        interval = 1.0 / self.rate_per_s
        wait_s = min(interval, 0.001)
        self.realtime = realtime()
        next_send = time.monotonic()
        last_echo = time.monotonic_ns()
        woke = last_echo
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                now_ns = time.monotonic_ns()
                self.own_gaps.note(woke, now_ns)
                woke = now_ns
                if now >= next_send:
                    try:
                        sock.sendall(f"{self.sent}\n".encode())
                        self.sent += 1
                    except (BrokenPipeError, ConnectionResetError, OSError):
                        sock = self._reconnect(sock)
                        buf = b""
                        woke = time.monotonic_ns()  # waiting to reconnect is not a stall of ours
                        continue
                    next_send += interval
                readable, _, _ = select.select([sock], [], [], max(0.0, min(wait_s, next_send - time.monotonic())))
                if not readable:
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sock = self._reconnect(sock)
                    buf = b""
                    woke = time.monotonic_ns()  # waiting to reconnect is not a stall of ours
                    continue
                buf += data
                *lines, buf = buf.split(b"\n")
                now_ns = time.monotonic_ns()
                for line in lines:
                    self.echoed.add(int(line))
                if lines:
                    self.arrivals_ns.append(now_ns)
                self.max_gap_ns = max(self.max_gap_ns, now_ns - last_echo)
                last_echo = now_ns
        except Exception as exc:  # reported, not raised: the run goes on
            self.error = str(exc)
        finally:
            sock.close()

    def _reconnect(self, old: socket.socket) -> socket.socket:
        old.close()
        self.reconnects += 1
        return self._connect()

    def stop(self, drain_s: float = 0.5) -> ChardevReport:
        deadline = time.monotonic() + drain_s
        while len(self.echoed) < self.sent and time.monotonic() < deadline:
            time.sleep(0.005)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        lost = sorted(set(range(self.sent)) - self.echoed)
        return ChardevReport(self.sent, len(self.echoed), self.reconnects, self.max_gap_ns, lost,
                             list(self.arrivals_ns), self.own_gaps, self.realtime)
