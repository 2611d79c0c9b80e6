"""The peer of a socket chardev: numbered lines sent through a migration, every interruption noticed.

:class:`ChardevClient` runs in the caller's process; :class:`ChardevClientProcess`
runs one in a process of its own (``python -m migfd.peers.chardev``), so that
its timing does not share the GIL of a benchmark that parses QMP replies
while the switchover it measures goes on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import select
import socket
import subprocess
import sys
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
        #: stop() asks the thread to send no more lines (it goes on reading echoes),
        #: and the thread says it has sent its last one
        self._quiet = threading.Event()
        self._quiet_seen = threading.Event()
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
                if self._quiet.is_set():
                    self._quiet_seen.set()
                elif now >= next_send:
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
        # Sending stops first, then the echoes drain: a line sent after the drain
        # had seen every echo would otherwise count as lost.
        self._quiet.set()
        limit = time.monotonic() + drain_s + 5
        while (self._thread is not None and self._thread.is_alive() and not self._quiet_seen.wait(0.005)
               and time.monotonic() < limit):
            pass
        deadline = time.monotonic() + drain_s
        while len(self.echoed) < self.sent and time.monotonic() < deadline:
            time.sleep(0.005)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        lost = sorted(set(range(self.sent)) - self.echoed)
        return ChardevReport(self.sent, len(self.echoed), self.reconnects, self.max_gap_ns, lost,
                             list(self.arrivals_ns), self.own_gaps, self.realtime)


class ChardevClientProcess:
    """A :class:`ChardevClient` in a child process, driven over its stdin and stdout.

    The same calls as the client's: :meth:`start`, :meth:`wait_echoes`,
    :meth:`stop` (which returns the :class:`ChardevReport`) and
    :attr:`error`. Commands are lines: ``echoed`` (answered with the count
    of lines echoed so far) and ``stop DRAIN_S`` (answered with the report
    as JSON); the child also stops when its stdin closes.
    """

    def __init__(self, path: str, rate_per_s: int = 1000, connect_timeout_s: float = 10.0):
        self.argv = [sys.executable, "-m", "migfd.peers.chardev", path, "--rate", str(rate_per_s),
                     "--connect-timeout", str(connect_timeout_s)]
        self.connect_timeout_s = connect_timeout_s
        self.proc: subprocess.Popen | None = None
        self.error: str | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self._reply(self.connect_timeout_s + 30)
        if not line.startswith('{"connected"'):
            why = json.loads(line).get("error", line) if line.startswith("{") else line.strip()
            err = self.kill()
            raise RuntimeError(f"chardev client did not connect: {why or err or 'no answer'}")

    def _reply(self, timeout_s: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        return self.proc.stdout.readline() if ready else ""

    def _ask(self, command: str, timeout_s: float) -> str:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return ""
        return self._reply(timeout_s)

    def echoed(self) -> int:
        """Lines echoed so far."""
        reply = self._ask("echoed", 10.0).strip()
        return int(reply) if reply.isdigit() else 0

    def wait_echoes(self, count: int, timeout_s: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.echoed() >= count:
                return True
            time.sleep(0.005)
        return self.echoed() >= count

    def stop(self, drain_s: float = 0.5) -> ChardevReport:
        """End the client and return what it saw; RuntimeError when the child has no report."""
        line = self._ask(f"stop {drain_s}", drain_s + 15)
        err = self.kill()
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            raise RuntimeError(f"chardev client gave no report: {err or 'no answer'}") from None
        self.error = data.pop("error")
        gaps = data.pop("own_gaps")
        return ChardevReport(**data, own_gaps=OwnGaps(gaps["limit_ns"], [tuple(g) for g in gaps["gaps"]]))

    def kill(self) -> str:
        """End the child: its stdin closed (it stops), SIGKILL after 10 s; returns the tail of
        what it wrote to stderr. Safe to call again."""
        if self.proc is None:
            return ""
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        err = ""
        if self.proc.stderr is not None and not self.proc.stderr.closed:
            err = self.proc.stderr.read().strip()[-300:]
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        return err


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migfd.peers.chardev",
                                     description="a chardev client in a process of its own (see ChardevClientProcess)")
    parser.add_argument("path")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    args = parser.parse_args(argv)
    client = ChardevClient(args.path, rate_per_s=args.rate, connect_timeout_s=args.connect_timeout)
    try:
        client.start()
    except OSError as exc:
        print(json.dumps({"error": f"cannot connect to {args.path}: {exc}"}), flush=True)
        return 1
    print(json.dumps({"connected": args.path}), flush=True)
    drain_s = 0.0
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "echoed":
            print(len(client.echoed), flush=True)
        elif command == "stop":
            drain_s = float(arg or 0)
            break
    report = client.stop(drain_s)
    out = dataclasses.asdict(report)  # own_gaps too: {"limit_ns": ..., "gaps": [...]}
    out["error"] = client.error
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":  # the benchmark starts it so: no CLI, no VM stack to import
    sys.exit(_main())
