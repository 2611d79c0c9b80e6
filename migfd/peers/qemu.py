"""Real QEMU driven from outside like a migfd VM: the ``qemu-system-x86_64`` binary and one QEMU process."""

from __future__ import annotations

import os
import shutil
import subprocess

from migfd.peers.process import QMPProcess

QEMU_BINARY = "qemu-system-x86_64"


def qemu_binary() -> str | None:
    """Path of ``qemu-system-x86_64`` on PATH, or None."""
    return shutil.which(QEMU_BINARY)


def qemu_version(binary: str | None = None) -> str | None:
    """First line of ``binary --version`` (the one on PATH by default), or None."""
    binary = binary or qemu_binary()
    if binary is None:
        return None
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.splitlines()[0].strip() if out.stdout else None


class QemuProcess(QMPProcess):
    """A QEMU process run with ``argv``, whose ``-qmp unix:PATH,...`` is where it is driven.

    It records the STOP and RESUME events, whose timestamps (µs, one host
    clock) time a migration from the source's stop to the destination's run.
    """

    label = "QEMU"
    start_error = RuntimeError
    start_timeout_s = 30.0
    tail_lines = 3
    recorded_events = ("STOP", "RESUME")

    def __init__(self, name: str, workdir: str | os.PathLike, argv: list[str]):
        qmp_path = argv[argv.index("-qmp") + 1].split(",")[0].removeprefix("unix:")
        super().__init__(name, workdir, argv, qmp_path)
