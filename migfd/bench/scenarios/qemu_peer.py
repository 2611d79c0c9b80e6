"""``qemu-peer``: two real ``qemu-system-x86_64`` migrating over a unix socket, beside migfd.

The same RAM sizes as ``ram-size``, driven by the same ``qemu.qmp`` client:

``qemu-ram-copied``
    guest RAM is ``memory-backend-file,share=off`` over a file in /dev/shm
    filled with random bytes, so the guest's RAM is private and holds no zero
    page: every page travels as a full page record, as migfd's filled RAM does
    under state copy.
``qemu-ram-shared``
    the same file with ``share=on`` on both sides and the ``x-ignore-shared``
    capability on both: no guest page travels (QEMU 7.2 skips shared RAM blocks).

The guest runs (``cont``; SeaBIOS under TCG, no boot device) for a moment
before the migration, as migfd's guest does. ``max-bandwidth`` is 64 GiB/s and
``downtime-limit`` QEMU's default 300 ms. QEMU 7.2 reports downtime, total-time
and setup-time in ms, and only once the source reached ``postmigrate``: the
first ``completed`` reply of query-migrate may still carry 0, so the source is
asked again after that. ``stop_resume_ns`` is the source's STOP event to the
destination's RESUME event (QMP event timestamps, microseconds, one host clock):
QEMU's ``downtime`` ends on the source, this one when the destination runs.

Every process is killed by its pid and every /dev/shm file removed, whatever happens.
"""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import tempfile
import time
from pathlib import Path

from migfd.bench.scenario import (
    DOWNTIME_LIMIT_MS, MAX_BANDWIDTH, BenchContext, Plan, Scenario, Trial, TrialSpec, interleave,
    memory_shortfall, trials_for_size,
)
from migfd.bench.scenarios.ram_size import RamSize
from migfd.peers.qemu import QEMU_BINARY, QemuProcess, qemu_binary, qemu_version
from migfd.units import GiB, MiB

SHM_DIR = "/dev/shm"
COPIED = "qemu-ram-copied"
SHARED = "qemu-ram-shared"
#: the guest runs this long before the migration (off the clock)
GUEST_RUN_S = 0.5
POLL_S = 0.002


def qemu_argv(binary: str, name: str, qmp_path: str, size: int, shm_path: str, shared: bool,
              incoming: bool) -> list[str]:
    mib = size // MiB
    argv = [binary, "-name", name, "-accel", "tcg", "-M", "pc,memory-backend=mem", "-m", f"{mib}M",
            "-object", f"memory-backend-file,id=mem,size={mib}M,mem-path={shm_path},"
                       f"share={'on' if shared else 'off'}",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-qmp", f"unix:{qmp_path},server=on,wait=off"]
    if incoming:
        # No -S: the destination takes the source's run state from the stream and runs.
        argv += ["-incoming", "defer"]
    else:
        argv += ["-S"]
    return argv


def fill_file(path: str, size: int) -> None:
    """A file of ``size`` random (never zero-page) bytes."""
    chunk = os.urandom(16 * MiB)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, len(chunk))
            f.write(chunk[:n])
            left -= n


class QemuTrial(Trial):
    def __init__(self, spec: TrialSpec, ctx: BenchContext, scenario: "QemuPeer"):
        super().__init__(spec, ctx)
        self.scenario = scenario
        self.workdir: Path | None = None
        self.src: QemuProcess | None = None
        self.dst: QemuProcess | None = None

    def timeouts(self) -> tuple[float, float, float]:
        gib = (self.spec.ram_bytes or 0) / GiB
        return 60 + 10 * gib, 60 + 30 * gib, 30.0

    async def prepare(self) -> None:
        size = self.spec.ram_bytes
        assert size is not None
        shm = await self.scenario.ram_file(size)
        shared = self.spec.mode == SHARED
        binary = self.scenario.binary
        assert binary is not None
        self.workdir = Path(tempfile.mkdtemp(prefix="qemu-peer-", dir=self.ctx.tmp))
        self.uri = f"unix:{self.workdir}/migration.sock"
        self.src = QemuProcess("src", self.workdir, qemu_argv(
            binary, "src", str(self.workdir / "src.qmp"), size, shm, shared, incoming=False))
        self.dst = QemuProcess("dst", self.workdir, qemu_argv(
            binary, "dst", str(self.workdir / "dst.qmp"), size, shm, shared, incoming=True))
        await asyncio.gather(self.src.start(), self.dst.start())
        for q in (self.src, self.dst):
            if shared:
                await q.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "x-ignore-shared", "state": True}]})
            await q.execute("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH,
                                                       "downtime-limit": DOWNTIME_LIMIT_MS})
        await self.dst.execute("migrate-incoming", {"uri": self.uri})
        await self.src.execute("cont")
        await asyncio.sleep(GUEST_RUN_S)

    async def measure(self) -> dict:
        assert self.src is not None and self.dst is not None
        await self.src.execute("migrate", {"uri": self.uri})
        while True:
            first = await self.src.execute("query-migrate")
            if first.get("status") in ("completed", "failed", "cancelled"):
                break
            await asyncio.sleep(POLL_S)
        if first["status"] != "completed":
            return {"source": first, "destination": await self.dst.execute("query-migrate")}
        # QEMU 7.2: the times are computed after 'completed'; 'postmigrate' follows them.
        while (await self.src.execute("query-status"))["status"] != "postmigrate":
            await asyncio.sleep(POLL_S)
        final = await self.src.execute("query-migrate")
        while True:
            dst = await self.dst.execute("query-migrate")
            if dst.get("status") in ("completed", "failed"):
                break
            await asyncio.sleep(POLL_S)
        deadline = time.monotonic() + 10
        runstate = None
        while time.monotonic() < deadline:
            runstate = (await self.dst.execute("query-status"))["status"]
            if runstate == "running":
                break
            await asyncio.sleep(POLL_S)
        return {"source": final, "destination": dst, "first": first, "dst_runstate": runstate}

    async def finish(self, measured: dict) -> list[dict]:
        assert self.src is not None and self.dst is not None
        src, dst = measured["source"], measured["destination"]
        row = self.spec.row()
        ram = src.get("ram") or {}
        ms = 1_000_000
        row.update({
            "downtime_ns": src["downtime"] * ms if "downtime" in src else None,
            "total_ns": src["total-time"] * ms if "total-time" in src else None,
            "setup_ns": src["setup-time"] * ms if "setup-time" in src else None,
            "bytes_sent": ram.get("transferred"), "fds_passed": 0,
        })
        stops, resumes = self.src.event_times("STOP"), self.dst.event_times("RESUME")
        if stops and resumes:
            row["stop_resume_ns"] = resumes[-1] - stops[-1]
        errors = []
        if src.get("status") != "completed":
            errors.append(f"source {src.get('status')}: {src.get('error-desc') or self.src.log_tail()}")
        elif dst.get("status") != "completed":
            errors.append(f"destination {dst.get('status')}: {dst.get('error-desc') or self.dst.log_tail()}")
        elif measured.get("dst_runstate") != "running":
            errors.append(f"destination is '{measured.get('dst_runstate')}', not running")
        elif "downtime" not in src:
            errors.append("QEMU reported no downtime")
        row["ok"] = not errors
        row["error"] = "; ".join(errors)
        return [row]

    async def cleanup(self) -> None:
        for q in (self.src, self.dst):
            if q is not None:
                await q.quit()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


class QemuPeer(Scenario):
    name = "qemu-peer"
    description = ("real QEMU 7.2 (TCG, SeaBIOS guest running) migrating over a unix socket at the "
                   "ram-size sizes: RAM copied (private, filled) and RAM shared (share=on + x-ignore-shared)")

    def __init__(self) -> None:
        self.binary: str | None = None
        self._file: tuple[int, str] | None = None
        self.prefix = f"migfd-bench-{os.getpid()}-"

    def unavailable(self, ctx: BenchContext) -> str | None:
        self.binary = qemu_binary()
        if self.binary is None:
            return f"{QEMU_BINARY} is not installed (Debian: apt-get install qemu-system-x86)"
        if not os.path.isdir(SHM_DIR):
            return f"needs {SHM_DIR} for the shared RAM file"
        return None

    @staticmethod
    def memory_needed(size: int) -> int:
        # the file (tmpfs) and the destination's private copy of it
        return 2 * size + 1 * GiB

    def plan(self, ctx: BenchContext) -> Plan:
        specs, skipped, points = [], [], []
        for size in RamSize.sizes(ctx):
            why = "QEMU's -m takes whole MiB" if size % MiB else memory_shortfall(
                ctx, size, self.memory_needed(size))
            if why is not None:
                skipped.append({"ram_bytes": size, "reason": why})
                continue
            n = trials_for_size(size, ctx)
            points.append({"ram_bytes": size, "trials": n})
            for item in interleave([{}], [{"mode": COPIED}, {"mode": SHARED}], n):
                specs.append(TrialSpec(self.name, item["mode"], item["trial"], backend="ram",
                                       ram_bytes=size, n_fds=0, live=True))
        return Plan(specs, {"points": points, "skipped_points": skipped, "qemu": qemu_version(self.binary),
                            "binary": self.binary, "guest": "SeaBIOS under TCG, running, no boot device",
                            "ram": "memory-backend-file over a /dev/shm file of random bytes; "
                                   "copied: share=off; shared: share=on + x-ignore-shared"})

    async def ram_file(self, size: int) -> str:
        """The filled file for ``size`` (one at a time: the previous size's is removed)."""
        if self._file is not None and self._file[0] == size:
            return self._file[1]
        self.remove_files()
        path = os.path.join(SHM_DIR, f"{self.prefix}{size >> 20}m.raw")
        self._file = (size, path)
        await asyncio.get_running_loop().run_in_executor(None, fill_file, path, size)
        return path

    def remove_files(self) -> None:
        self._file = None
        for path in glob.glob(os.path.join(SHM_DIR, f"{self.prefix}*")):
            try:
                os.unlink(path)
            except OSError:
                pass

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return QemuTrial(spec, ctx, self)

    async def teardown(self, ctx: BenchContext) -> None:
        self.remove_files()
