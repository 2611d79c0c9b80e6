"""Child processes driven over QMP from outside: one base for ``migfd vm`` processes and real QEMU.

:class:`QMPProcess` starts a process with its output in a log file, waits for
its QMP socket and connects the PyPI ``qemu.qmp`` client to it, exactly as one
would drive QEMU; :class:`VMProcess` is a ``migfd vm`` built on it (real QEMU is
:class:`migfd.peers.qemu.QemuProcess`). Nothing here measures by itself: the
numbers come from the processes' query-migrate and from the traffic peers.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from qemu.qmp import EventListener, QMPClient

from migfd.errors import MigrationError
from migfd.net.netns import NetNamespace

#: query-migrate statuses after which a migration changes no more
TERMINAL = ("completed", "failed", "cancelled")


class QMPProcess:
    """A child process with a QMP monitor on a UNIX socket; ``await start()``, then ``execute``.

    Its stdout and stderr go to ``<workdir>/<name>.log``; :meth:`log_tail` quotes
    the end of it in errors. With ``netns``, the process starts inside that
    network namespace.
    """

    #: how errors name this kind of process
    label = "process"
    #: what :meth:`start` raises when the process exits or its monitor never appears
    start_error: type[Exception] = RuntimeError
    start_timeout_s = 20.0
    #: log lines :meth:`log_tail` quotes by default
    tail_lines = 5
    #: QMP events kept in ``events`` from the connection on (see :meth:`event_times`)
    recorded_events: tuple[str, ...] = ()

    def __init__(self, name: str, workdir: str | os.PathLike, argv: list[str], qmp_path: str,
                 *, netns: NetNamespace | None = None):
        self.name = name
        self.workdir = Path(workdir)
        self.argv = argv
        self.qmp_path = qmp_path
        self.log_path = self.workdir / f"{name}.log"
        self.netns = netns
        self.proc: subprocess.Popen | None = None
        self.qmp: QMPClient | None = None
        self.events = EventListener(self.recorded_events) if self.recorded_events else None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout_s: float | None = None) -> "QMPProcess":
        """Start the process and connect to its QMP socket once it appears.

        Raises ``start_error`` (with the end of the log) if the process exits
        first or no monitor answers within ``timeout_s``; then it is killed.
        """
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        if self.proc is None:
            self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise self.start_error(
                    f"{self.label} {self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if os.path.exists(self.qmp_path):
                try:
                    self.qmp = await self.open_monitor(max(0.1, deadline - time.monotonic()))
                    return self
                except Exception:
                    pass
            if time.monotonic() > deadline:
                self.kill()
                raise self.start_error(
                    f"{self.label} {self.name}: no QMP monitor within {timeout_s} s: {self.log_tail()}")
            await asyncio.sleep(0.02)

    def spawn(self) -> None:
        """Start the process alone; :meth:`start` (which spawns it if needed) waits for its monitor."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                         preexec_fn=self.netns.preexec() if self.netns else None)

    async def open_monitor(self, timeout_s: float) -> QMPClient:
        """A client connected to the monitor, recording ``recorded_events`` from the start."""
        client = self.new_client()
        try:
            await asyncio.wait_for(client.connect(self.qmp_path), timeout_s)
        except BaseException:
            await client.disconnect()
            raise
        return client

    def new_client(self) -> QMPClient:
        client = QMPClient(self.name)
        if self.events is not None:
            client.register_listener(self.events)
        return client

    def log_tail(self, lines: int | None = None) -> str:
        """The last ``lines`` lines of the process's output, joined by " | " ("" if none)."""
        lines = self.tail_lines if lines is None else lines
        try:
            return " | ".join(self.log_path.read_text(errors="replace").strip().splitlines()[-lines:])
        except OSError:
            return ""

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        assert self.qmp is not None, "start() first"
        return await self.qmp.execute(command, arguments)

    def event_times(self, name: str) -> list[int]:
        """Host-clock times (ns, from the QMP timestamps) of the recorded events ``name``."""
        if self.events is None:
            return []
        return [event_time_ns(e) for e in self.events.history if e["event"] == name]

    async def wait_migration(self, timeout_s: float = 120.0, poll_s: float = 0.005) -> dict:
        """Poll query-migrate until it reaches a terminal status."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = await self.execute("query-migrate")
            if info.get("status") in TERMINAL:
                return info
            if time.monotonic() > deadline:
                raise MigrationError(
                    f"{self.label} {self.name}: migration still '{info.get('status')}' after {timeout_s} s")
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


class VMProcess(QMPProcess):
    """A ``migfd vm`` child process, configured like QEMU with ``-object``/``-netdev``/``-chardev``."""

    label = "VM"
    start_error = MigrationError

    def __init__(self, name: str, workdir: str | os.PathLike, *, objects: tuple[str, ...] = (),
                 netdevs: tuple[str, ...] = (), chardevs: tuple[str, ...] = (),
                 incoming: str | None = None, dirty_rate_bytes_s: int = 0,
                 netns: NetNamespace | None = None):
        qmp_path = str(Path(workdir) / f"{name}.qmp")
        argv = [sys.executable, "-m", "migfd.cli", "vm", "--name", name,
                "--qmp", f"unix:{qmp_path}", "--dirty-rate", str(dirty_rate_bytes_s)]
        for group, values in (("--object", objects), ("--netdev", netdevs), ("--chardev", chardevs)):
            for value in values:
                argv += [group, value]
        if incoming is not None:
            argv += ["--incoming", incoming]
        super().__init__(name, workdir, argv, qmp_path, netns=netns)


def event_time_ns(event: Any) -> int:
    """A QMP event's timestamp in ns (µs resolution, the host's wall clock)."""
    ts = event["timestamp"]
    return ts["seconds"] * 1_000_000_000 + ts["microseconds"] * 1000


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
