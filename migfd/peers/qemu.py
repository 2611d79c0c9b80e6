"""Real QEMU driven from outside like a migfd VM: which QEMU binaries there are, and one QEMU process.

A benchmark may use several QEMUs: the system's ``qemu-system-x86_64`` and
any given by ``migfd bench --qemu PATH`` or ``$MIGFD_QEMU`` (colon-separated),
such as the QEMU 10.0 that ``tools/fetch-qemu.sh`` unpacks. Each is known by
its version (:func:`describe_qemu`), which names its rows (``peer_version``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Iterable

from qemu.qmp import QMPClient

from migfd.errors import MigrationError
from migfd.peers.process import QMPProcess, event_time_ns
from migfd.peers.qemu_trace import is_trace_line

QEMU_BINARY = "qemu-system-x86_64"
#: extra QEMU binaries, colon-separated, as ``--qemu`` gives them
QEMU_ENV = "MIGFD_QEMU"
_VERSION = re.compile(r"QEMU emulator version (\d+(?:\.\d+)+)")


def qemu_binary() -> str | None:
    """Path of ``qemu-system-x86_64`` on PATH, or None."""
    return shutil.which(QEMU_BINARY)


@dataclass(frozen=True)
class QemuBinary:
    """One QEMU binary: where it is, its version ("10.0.2"), its banner and trace events."""

    path: str
    version: str
    #: the first line of ``--version``, with the distribution's build
    banner: str
    trace_events: frozenset[str] = frozenset()

    @property
    def release(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.version.split("."))

    def at_least(self, *release: int) -> bool:
        return self.release >= release

    def to_json(self) -> dict[str, str]:
        return {"path": self.path, "version": self.version, "banner": self.banner}


@functools.lru_cache(maxsize=None)
def describe_qemu(path: str) -> QemuBinary:
    """What ``path`` is: a QEMU and its version; MigrationError (one line) if it is none."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        raise MigrationError(f"{path} is not an executable file")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20)
        events = subprocess.run([path, "-trace", "help"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        raise MigrationError(f"{path} --version failed: {exc}") from exc
    banner = out.stdout.splitlines()[0].strip() if out.stdout.strip() else ""
    m = _VERSION.search(banner)
    if out.returncode != 0 or m is None:
        said = banner or out.stderr.strip().splitlines()[-1:] or "nothing"
        raise MigrationError(f"{path} is not QEMU: --version says {said!r}")
    names = frozenset(line.split()[0] for line in events.stdout.splitlines() if line.strip())
    return QemuBinary(os.path.abspath(path), m.group(1), banner, names)


def qemu_version(binary: str | None = None) -> str | None:
    """The version ("7.2.22") of ``binary`` (the one on PATH by default), or None."""
    binary = binary or qemu_binary()
    if binary is None:
        return None
    try:
        return describe_qemu(binary).version
    except MigrationError:
        return None


def requested_qemus(options: Iterable[str] | None, env: str | None) -> list[str]:
    """The extra QEMU paths asked for: ``--qemu`` options, then ``$MIGFD_QEMU`` (colon-separated).

    Empty entries mean nothing (``MIGFD_QEMU=`` is unset).
    """
    return [p for p in [*(options or ()), *(env or "").split(":")] if p]


def find_qemus(extra: Iterable[str]) -> list[QemuBinary]:
    """The system's QEMU (if installed) and each of ``extra``, once per version.

    The same file twice counts once; two different files with one version
    cannot both name rows, so that is an error, as is a path that is not a QEMU.
    """
    found: list[QemuBinary] = []
    system = qemu_binary()
    for path in ([system] if system else []) + list(extra):
        q = describe_qemu(path)
        same = next((f for f in found if f.version == q.version), None)
        if same is None:
            found.append(q)
        elif os.path.realpath(same.path) != os.path.realpath(q.path):
            raise MigrationError(f"{q.path} and {same.path} are both QEMU {q.version}: "
                                 "rows are named by version, give one of them")
    return found


class QemuProcess(QMPProcess):
    """A QEMU process run with ``argv``, whose ``-qmp unix:PATH,...`` is where it is driven.

    It records the STOP and RESUME events, whose timestamps (µs, one host
    clock) time a migration from the source's stop to the destination's run.
    Its stderr (the log) also holds its trace lines; errors quote the other lines.

    With ``early_negotiation`` (a ``-qmp ...,server=on,wait=on`` QEMU, whose
    start-up waits for the client) ``qmp_capabilities`` is sent as soon as the
    socket accepts, before the greeting is read: QEMU then goes on with an
    incoming migration at once, and a client negotiating only after the
    greeting would miss the RESUME event of a migration that finishes first.
    """

    label = "QEMU"
    start_error = RuntimeError
    start_timeout_s = 30.0
    tail_lines = 3
    recorded_events = ("STOP", "RESUME")

    def __init__(self, name: str, workdir: str | os.PathLike, argv: list[str], *,
                 early_negotiation: bool = False):
        qmp_path = argv[argv.index("-qmp") + 1].split(",")[0].removeprefix("unix:")
        super().__init__(name, workdir, argv, qmp_path)
        self.early_negotiation = early_negotiation
        #: events that came with the early negotiation, before the client took over
        self.early_events: list[dict[str, Any]] = []

    async def open_monitor(self, timeout_s: float) -> QMPClient:
        if not self.early_negotiation:
            return await super().open_monitor(timeout_s)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            deadline = time.monotonic() + timeout_s
            sock.settimeout(timeout_s)
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, sock.connect, self.qmp_path)
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            self.early_events = await loop.run_in_executor(None, _read_greeting_and_reply, sock, deadline)
            client = self.new_client()
            client.await_greeting = client.negotiate = False
            await asyncio.wait_for(client.connect(sock), max(0.1, deadline - time.monotonic()))
        except BaseException:
            sock.close()
            raise
        return client

    def event_times(self, name: str) -> list[int]:
        early = [event_time_ns(e) for e in self.early_events if e.get("event") == name]
        return early + super().event_times(name)

    def log_tail(self, lines: int | None = None) -> str:
        """The last ``lines`` lines of QEMU's own messages (its trace lines left out)."""
        lines = self.tail_lines if lines is None else lines
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        own = [line for line in text.strip().splitlines() if line.strip() and not is_trace_line(line)]
        return " | ".join(own[-lines:])

    def log_text(self) -> str:
        """All of the process's output so far ("" if none)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def _read_greeting_and_reply(sock: socket.socket, deadline: float) -> list[dict[str, Any]]:
    """Read QMP lines up to the reply of the early ``qmp_capabilities``; return the events among them.

    Reads exactly to the end of the reply (peeking first), so that whatever
    follows is left in the socket for the client that takes it over.
    """
    events: list[dict[str, Any]] = []
    pending = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        peek = sock.recv(65536, socket.MSG_PEEK)
        if not peek:
            raise MigrationError("QEMU closed its QMP socket during the negotiation")
        newline = peek.find(b"\n")
        pending += sock.recv(len(peek) if newline < 0 else newline + 1)
        if newline < 0:
            continue
        msg = json.loads(pending)
        pending = b""
        if "event" in msg:
            events.append(msg)
        elif "error" in msg:
            raise MigrationError(f"qmp_capabilities failed: {msg['error'].get('desc')}")
        elif "return" in msg:
            return events


#: the counting guest's code, at the reset vector: ``xor ax,ax; mov ds,ax; inc dword [0x7000]; jmp $-7``
#: (real mode: 0x66 makes ``inc`` 32-bit; ``jmp`` goes back to the ``inc``)
COUNTING_GUEST = bytes.fromhex("31c08ed8" "66ff060070" "ebf9")
#: a -bios image is 64 KiB; the CPU starts at its last 16 bytes (file offset 0xfff0)
BIOS_BYTES = 0x10000
RESET_VECTOR_OFFSET = 0xFFF0


def write_counting_bios(path: str) -> None:
    """A ``-bios`` image whose guest does nothing but count a u32 at guest address 0x7000.

    What an outside observer (:mod:`migfd.peers.observe`) watches to see when
    a real QEMU's guest runs; the rest of the image is ``hlt``.
    """
    image = bytearray(b"\xf4" * BIOS_BYTES)
    image[RESET_VECTOR_OFFSET:RESET_VECTOR_OFFSET + len(COUNTING_GUEST)] = COUNTING_GUEST
    with open(path, "wb") as f:
        f.write(image)
