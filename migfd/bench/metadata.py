"""What ``metadata.json`` records about a benchmark run: code, machine, load, packages, times.

The keys are described in docs/RESULTS.md; everything here is read from the
system (git, /proc, /sys, package metadata), nothing is measured but the CPU
use of other processes, sampled over half a second at the start and the end:
what could bias a run (load, frequency governor, busy neighbours, socket
buffer limits) is written down beside its numbers.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from migfd.paths import in_checkout, repo_root
from migfd.peers.observe import DEFAULT_MIN_SILENCE_NS, DEFAULT_PERIOD_NS, OWN_GAP_SLACK_NS, realtime
from migfd.peers.qemu import qemu_version

#: The format of results.csv and metadata.json this code writes (docs/RESULTS.md): both carry it
#: (a ``format_version`` column, a ``format_version`` key); runs without it are format 1.
FORMAT_VERSION = 2

PACKAGES = ("migfd", "qemu.qmp", "numpy", "pandas", "tqdm", "pyroute2")


def checkout_root() -> Path | None:
    """The source checkout migfd runs from, if it runs from one."""
    return repo_root() if in_checkout() else None


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def iso(t: dt.datetime) -> str:
    return t.isoformat(timespec="seconds").replace("+00:00", "Z")


def _git(*args: str) -> str | None:
    root = checkout_root()
    if root is None or shutil.which("git") is None:
        return None
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def meminfo(key: str) -> int:
    """A /proc/meminfo value in bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def source_digest() -> str:
    """sha256 over migfd's own source files: the code the VM processes of this run executed.

    Taken at the start and at the end of a run; if they differ, the code changed
    while the run went on (each trial's processes load it afresh).
    """
    package = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        h.update(str(path.relative_to(package)).encode() + b"\0")
        try:
            h.update(path.read_bytes())
        except OSError:
            pass
    return h.hexdigest()


def package_versions() -> dict[str, str | None]:
    """Versions of the Python packages a run depends on, and of the QEMU it found (None: absent)."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    out["qemu"] = qemu_version()
    return out


#: sysctls that bound what an AF_UNIX socket can hold in flight (fd-passing and state copy alike)
SOCKET_SYSCTLS = ("net.core.rmem_max", "net.core.wmem_max", "net.core.rmem_default", "net.core.wmem_default",
                  "net.core.optmem_max", "net.unix.max_dgram_qlen")


def socket_limits() -> dict[str, int | None]:
    """The kernel's socket buffer limits, from /proc/sys (None where unreadable)."""
    out: dict[str, int | None] = {}
    for name in SOCKET_SYSCTLS:
        try:
            out[name] = int(Path("/proc/sys", *name.split(".")).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            out[name] = None
    return out


def cpu_governors() -> dict[str, int] | None:
    """CPU frequency governors and how many CPUs use each ({"performance": 2}); None where unreadable
    (virtual machines often have no cpufreq)."""
    found: dict[str, int] = {}
    for path in sorted(Path("/sys/devices/system/cpu").glob("cpu[0-9]*/cpufreq/scaling_governor")):
        try:
            name = path.read_text().strip()
        except OSError:
            continue
        found[name] = found.get(name, 0) + 1
    return found or None


def _cpu_ticks() -> dict[int, tuple[str, int, int]]:
    """pid -> (comm, ppid, utime + stime in clock ticks) of every process readable now."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        try:
            out[int(entry)] = (comm, int(fields[1]), int(fields[11]) + int(fields[12]))
        except (IndexError, ValueError):
            continue
    return out


def busy_processes(sample_s: float = 0.5, top: int = 5) -> list[dict[str, Any]]:
    """The processes other than this one and its children that used the CPU over ``sample_s``,
    busiest first: [{"pid", "comm", "cpu_percent"}] (percent of one CPU, at least 1%)."""
    me = os.getpid()
    before = _cpu_ticks()
    time.sleep(sample_s)
    after = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    used = []
    for pid, (comm, ppid, ticks) in after.items():
        if pid == me or ppid == me or pid not in before:
            continue
        percent = (ticks - before[pid][2]) / hz / sample_s * 100
        if percent >= 1.0:
            used.append({"pid": pid, "comm": comm, "cpu_percent": round(percent, 1)})
    return sorted(used, key=lambda p: -p["cpu_percent"])[:top]


def observer_conditions() -> dict[str, Any]:
    """What the outside observers (migfd.peers.observe) can rely on here: real-time priority
    (tried in a thread of its own, then given back), /dev/kvm, their sampling period."""
    granted: list[bool] = []
    probe = threading.Thread(target=lambda: granted.append(realtime()), name="rt-probe")
    probe.start()
    probe.join()
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        kvm = True
    except OSError:
        kvm = False
    return {"realtime_allowed": bool(granted and granted[0]), "kvm": kvm,
            "period_ns": DEFAULT_PERIOD_NS, "min_silence_ns": DEFAULT_MIN_SILENCE_NS,
            "own_gap_slack_ns": OWN_GAP_SLACK_NS}


def base_metadata(args: argparse.Namespace, start: dt.datetime, out: Path, names: list[str]) -> dict:
    """metadata.json as written at the start of a run; the runner fills in the rest."""
    revision = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "format_version": FORMAT_VERSION,
        "git_revision": revision or "unknown",
        "git_dirty": (bool(status) if status is not None else None),
        "source_sha256": source_digest(),
        "host": socket.gethostname(),
        "kernel": f"{platform.system()} {platform.release()} {platform.version()}",
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_total_bytes": meminfo("MemTotal"),
        "memory_available_bytes": meminfo("MemAvailable"),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": package_versions(),
        "euid": os.geteuid(),
        "loadavg_start": list(os.getloadavg()),
        "busy_processes_start": busy_processes(),
        "cpu_governor": cpu_governors(),
        "socket_limits": socket_limits(),
        "observers": observer_conditions(),
        "start": iso(start),
        "end": None,
        "duration_s": None,
        "options": {
            "argv": list(sys.argv),
            "quick": bool(args.quick),
            "scenarios": names,
            "trials": args.trials,
            "out": str(out),
        },
        "scenarios": {},
        "warnings": {},
        "rows": 0,
        "failed_rows": 0,
    }


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON in one rename, so a reader never sees half a file."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)
