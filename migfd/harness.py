"""Driving real ``migfd vm`` processes from tests, benchmarks and notebooks.

:class:`VMProcess` is one child process and its QMP client (the PyPI
``qemu.qmp`` library, exactly as one would drive QEMU); :func:`migrate` runs
one migration between two of them and returns what both sides reported;
:class:`ChardevClient` is the peer of a socket chardev that sends numbered
lines and notices every interruption. Nothing here measures by itself: the
numbers come from the VMs' query-migrate and from the traffic peers.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

from migfd.errors import MigrationError
from migfd.net import NetNamespace

TERMINAL = ("completed", "failed", "cancelled")
#: how long a chardev client waits on one send before it calls the peer gone
SEND_TIMEOUT_S = 10.0


class VMProcess:
    """A ``migfd vm`` child process; ``await start()``, then ``execute`` QMP commands."""

    def __init__(self, name: str, workdir: str | os.PathLike, *, objects: tuple[str, ...] = (),
                 netdevs: tuple[str, ...] = (), chardevs: tuple[str, ...] = (),
                 incoming: str | None = None, dirty_rate_bytes_s: int = 0,
                 netns: NetNamespace | None = None):
        self.name = name
        self.workdir = Path(workdir)
        self.qmp_path = str(self.workdir / f"{name}.qmp")
        self.log_path = self.workdir / f"{name}.log"
        self.argv = [sys.executable, "-m", "migfd.cli", "vm", "--name", name,
                     "--qmp", f"unix:{self.qmp_path}", "--dirty-rate", str(dirty_rate_bytes_s)]
        for group, values in (("--object", objects), ("--netdev", netdevs), ("--chardev", chardevs)):
            for value in values:
                self.argv += [group, value]
        if incoming is not None:
            self.argv += ["--incoming", incoming]
        self.netns = netns
        self.proc: subprocess.Popen | None = None
        self.qmp: QMPClient | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout_s: float = 20.0) -> "VMProcess":
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        try:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         preexec_fn=self.netns.preexec() if self.netns else None)
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise MigrationError(f"VM {self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if os.path.exists(self.qmp_path):
                client = QMPClient(self.name)
                try:
                    await asyncio.wait_for(client.connect(self.qmp_path), max(0.1, deadline - time.monotonic()))
                    self.qmp = client
                    return self
                except (OSError, asyncio.TimeoutError, Exception):
                    await client.disconnect()
            if time.monotonic() > deadline:
                self.kill()
                raise MigrationError(f"VM {self.name}: no QMP monitor within {timeout_s} s: {self.log_tail()}")
            await asyncio.sleep(0.02)

    def log_tail(self, lines: int = 5) -> str:
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert self.qmp is not None, "start() first"
        return await self.qmp.execute(command, arguments)

    async def wait_migration(self, timeout_s: float = 120.0, poll_s: float = 0.005) -> dict:
        """Poll query-migrate until it reaches a terminal status."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self.execute("query-migrate")
            if info.get("status") in TERMINAL:
                return info
            if time.monotonic() > deadline:
                raise MigrationError(f"VM {self.name}: migration still '{info.get('status')}' after {timeout_s} s")
            await asyncio.sleep(poll_s)

    async def quit(self, timeout_s: float = 10.0) -> None:
        """``quit`` over QMP, then wait for the process; kill it if it hangs."""
        await quit_over_qmp(self.qmp, self.proc, timeout_s)
        self.qmp = None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            if sig == signal.SIGKILL:
                self.proc.wait()

    def fds(self) -> list[str]:
        """What the process holds open now (readlink of /proc/PID/fd/*)."""
        return proc_fds(self.pid)


def proc_fds(pid: int) -> list[str]:
    """readlink of every /proc/PID/fd entry: what a process holds open now."""
    out = []
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out.append(os.readlink(f"{base}/{name}"))
        except OSError:
            pass
    return out


async def quit_over_qmp(qmp: QMPClient | None, proc: subprocess.Popen | None,
                        timeout_s: float = 10.0) -> None:
    """``quit`` a QEMU or migfd VM over QMP, wait for it, SIGKILL it if it hangs."""
    if qmp is not None:
        try:
            await asyncio.wait_for(qmp.execute("quit"), timeout_s)
        except Exception:
            pass
        try:
            await qmp.disconnect()
        except Exception:
            pass
    if proc is not None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@dataclass
class MigrationResult:
    """What both sides reported for one migration."""

    source: dict
    destination: dict
    wall_ns: int

    @property
    def ok(self) -> bool:
        return self.source.get("status") == "completed" and self.destination.get("status") == "completed"

    @property
    def error(self) -> str | None:
        return self.source.get("error-desc") or self.destination.get("error-desc")


async def migrate(src: VMProcess, dst: VMProcess, uri: str, params: dict[str, Any] | None = None,
                  *, timeout_s: float = 300.0) -> MigrationResult:
    """Set ``params`` on both sides, migrate-incoming, migrate, wait for both to finish."""
    params = params or {}
    for vm in (src, dst):
        if params:
            await vm.execute("migrate-set-parameters", params)
    await dst.execute("migrate-incoming", {"uri": uri})
    t0 = time.monotonic_ns()
    await src.execute("migrate", {"uri": uri})
    source = await src.wait_migration(timeout_s)
    if source.get("status") == "completed":
        destination = await dst.wait_migration(timeout_s)
    else:
        destination = await dst.execute("query-migrate")
    return MigrationResult(source, destination, time.monotonic_ns() - t0)


# -- chardev peer ---------------------------------------------------------------


@dataclass
class ChardevReport:
    """What a chardev client saw while lines went through a migration."""

    lines_sent: int
    lines_echoed: int
    reconnects: int
    max_gap_ns: int
    lost: list[int] = field(default_factory=list)


class ChardevClient:
    """Connects to a socket chardev and sends numbered lines at a fixed rate.

    It counts echoes, the longest silence between two echoes, and the
    reconnections it needed (a state-copy migration closes the connection; a
    handover does not).
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
        next_send = time.monotonic()
        last_echo = time.monotonic_ns()
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_send:
                    try:
                        sock.sendall(f"{self.sent}\n".encode())
                        self.sent += 1
                    except (BrokenPipeError, ConnectionResetError, OSError):
                        sock = self._reconnect(sock)
                        buf = b""
                        continue
                    next_send += interval
                readable, _, _ = select.select([sock], [], [], 0.001)
                if not readable:
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sock = self._reconnect(sock)
                    buf = b""
                    continue
                buf += data
                *lines, buf = buf.split(b"\n")
                now_ns = time.monotonic_ns()
                for line in lines:
                    self.echoed.add(int(line))
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
        return ChardevReport(self.sent, len(self.echoed), self.reconnects, self.max_gap_ns, lost)
