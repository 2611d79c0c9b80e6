"""``qemu-peer``: real QEMU migrating over unix sockets, beside migfd, one row set per QEMU version and accelerator.

The QEMUs are the system's ``qemu-system-x86_64`` and those of ``--qemu`` /
``$MIGFD_QEMU`` (:func:`migfd.peers.qemu.find_qemus`); each row names its QEMU
in ``peer_version`` and its accelerator in ``accel`` (``kvm`` where /dev/kvm
opens, and ``tcg``: both at the smallest size, above it ``kvm`` alone where
there is KVM, to keep the default run within its time). The guest is a ``pc`` machine with one vCPU
running the counting ``-bios`` image of :func:`migfd.peers.qemu.write_counting_bios`
(a u32 at guest address 0x7000 that counts while the guest runs), guest RAM
``ram0`` a ``memory-backend-file`` with ``share=on`` on /dev/shm in every mode,
so that one outside observer (``migfd observe``, :mod:`migfd.peers.observe`)
reads the counter, as it does for migfd's guests:

``qemu-ram-copied``
    plain precopy: every page travels, into a file of the destination's own.
``qemu-ram-shared``
    ``x-ignore-shared`` on both sides, both mapping the same file, the one
    RAM kind both 7.2 and 10.0 skip (10.0 does not skip a shared memfd).
``qemu-cpr-transfer`` (QEMU 10.0 and later)
    QEMU's own fd-passing: the RAM file's fd is handed over (``aux-ram-share=on``);
    the destination listens on a ``cpr`` and a ``main`` channel and its monitor
    appears only once the cpr state (the fds) arrived, so it runs with
    ``-qmp ...,wait=on`` and the client negotiates at once (see
    :class:`~migfd.peers.qemu.QemuProcess`) to see the RESUME event.

Variants: ``filled``, guest RAM holding random bytes (a /dev/shm file of random
bytes that the source maps), at every size: nothing is flattered by zero
pages; ``idle``, a new sparse file (zero pages but the counter's), at the
smallest size only: it shows how much zero pages flatter precopy.

The guest runs for a moment (``cont``) before the migration, off the clock.
``max-bandwidth`` is 64 GiB/s, ``downtime-limit`` QEMU's default 300 ms.
QEMU's ``downtime``, ``total-time``, ``setup-time`` are whole ms, read once the
source is in ``postmigrate`` (7.2 computes them after ``completed``);
``stop_resume_ns`` is the source's STOP event to the destination's RESUME
event (µs, one host clock), the guest's pause as QEMU reports it;
``outage_ns`` the observer's longest silence over STOP → RESUME (their wall-clock
times mapped onto CLOCK_MONOTONIC through a sync point taken by this process),
``precopy_stall_ns`` its longest silence before that while the migration ran.
Each row's ``timeline`` comes from QEMU's trace (:mod:`migfd.peers.qemu_trace`),
``device_sections`` from the device sections the source's trace shows saved,
``device_state_bytes`` from one stream each QEMU saves to a file when the
scenario starts (same machine; :meth:`QemuPeer.setup`). Every process is ended
by its pid and every /dev/shm file removed, whatever happens.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migfd.bench.scenario import (
    DOWNTIME_LIMIT_MS, MAX_BANDWIDTH, end_observation, observer_phases, BenchContext, Plan, Scenario, Trial, TrialSpec, interleave,
    memory_shortfall, trials_for_size,
)
from migfd.bench.scenarios.ram_size import RamSize
from migfd.errors import MigrationError
from migfd.peers.observe import ObserverProcess, Silence, longest_before, silences_of, switchover_outage
from migfd.peers.qemu import QEMU_BINARY, QemuBinary, QemuProcess, describe_qemu, find_qemus, write_counting_bios
from migfd.peers.qemu_trace import (
    completion_sections, cpr_fds, origin_us, parse_trace, qemu_timeline, trace_arguments,
)
from migfd.stream.inspect import inspect_stream
from migfd.units import GiB, MiB

SHM_DIR = "/dev/shm"
COPIED = "qemu-ram-copied"
SHARED = "qemu-ram-shared"
CPR = "qemu-cpr-transfer"
IDLE = "idle"
FILLED = "filled"
#: the first QEMU with cpr-transfer
CPR_RELEASE = (10, 0)
#: the guest runs this long before the migration (off the clock)
GUEST_RUN_S = 0.5
POLL_S = 0.002
#: the largest guest RAM the default run gives real QEMU (--trials lifts it)
MAX_RAM_DEFAULT = 1 * GiB
#: the machine of every QEMU here (and of the device-state stream)
MACHINE = "pc,memory-backend=ram0"
#: RAM of the guest whose stream measures device state
DEVICE_STATE_RAM = 64 * MiB


@dataclass
class QemuTrialSpec(TrialSpec):
    """A trial of one QEMU; its rows name that QEMU's version (``peer_version``) and accelerator."""

    peer_version: str = ""
    accel: str = "tcg"

    def row(self) -> dict[str, Any]:
        return {**super().row(), "peer_version": self.peer_version, "accel": self.accel}


def modes_of(q: QemuBinary) -> list[str]:
    return [COPIED, SHARED] + ([CPR] if q.at_least(*CPR_RELEASE) else [])


def accels() -> list[str]:
    """QEMU's accelerators here: KVM where /dev/kvm opens, TCG always."""
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC))
        return ["kvm", "tcg"]
    except OSError:
        return ["tcg"]


def ram_argv(mode: str, size: int, mem_path: str) -> list[str]:
    """``-M``/``-m``/``-object`` of guest RAM ``ram0``: the file ``mem_path``, shared (see the module docstring)."""
    mib = size // MiB
    machine = MACHINE + (",aux-ram-share=on" if mode == CPR else "")
    backend = f"memory-backend-file,id=ram0,size={mib}M,mem-path={mem_path},share=on"
    return ["-M", machine, "-m", f"{mib}M", "-object", backend]


def qemu_argv(q: QemuBinary, name: str, qmp_path: str, ram: list[str], *, bios: str | None = None,
              accel: str = "tcg", incoming: list[str] | None = None, wait: bool = False,
              trace: bool = True) -> list[str]:
    """A QEMU of this scenario: a source paused at start (``-S``), or a destination on ``incoming``."""
    argv = [q.path, "-name", name, "-accel", accel, *ram, *(["-bios", bios] if bios else []),
            "-nodefaults", "-no-user-config",
            "-display", "none", "-qmp", f"unix:{qmp_path},server=on,wait={'on' if wait else 'off'}"]
    if trace:
        argv += trace_arguments(q.trace_events)
    if incoming is None:
        return argv + ["-S"]  # RAM is filled before the guest runs
    # No -S: the destination takes the source's run state from the stream and runs.
    for address in incoming:
        argv += ["-incoming", address]
    return argv


def cpr_channels(main: str, cpr: str) -> list[dict[str, Any]]:
    """The ``main`` and ``cpr`` channels of a cpr-transfer, as ``migrate`` takes them."""
    return [{"channel-type": kind, "addr": {"transport": "socket", "type": "unix", "path": path}}
            for kind, path in (("main", main), ("cpr", cpr))]


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
    spec: QemuTrialSpec

    def __init__(self, spec: QemuTrialSpec, ctx: BenchContext, scenario: "QemuPeer"):
        super().__init__(spec, ctx)
        self.scenario = scenario
        self.qemu = describe_qemu(spec.options["qemu"])
        self.workdir: Path | None = None
        self.src: QemuProcess | None = None
        self.dst: QemuProcess | None = None
        #: RAM files of this trial alone (removed at cleanup); the random file is the scenario's
        self.own_files: list[str] = []
        #: the files the observer watches: the source's RAM, and the destination's when it has its own
        self.ram_files: list[str] = []
        self.observer: ObserverProcess | None = None
        self.observed: dict[str, Any] | None = None
        self.outage: Silence | None = None
        self.migrate_ns: tuple[int, int] | None = None
        #: CLOCK_REALTIME - CLOCK_MONOTONIC (ns) when the migration began: QMP events carry wall-clock time
        self.clock_offset_ns = 0

    def timeouts(self) -> tuple[float, float, float]:
        gib = (self.spec.ram_bytes or 0) / GiB
        return 60 + 10 * gib, 60 + 30 * gib, 30.0

    def _new_file(self, name: str, size: int) -> str:
        path = self.scenario.shm_path(f"{name}-{id(self)}")
        with open(path, "wb") as f:
            f.truncate(size)  # sparse: zero pages until the guest writes
        self.own_files.append(path)
        return path

    async def prepare(self) -> None:
        size, mode, variant = self.spec.ram_bytes, self.spec.mode, self.spec.variant
        assert size is not None
        src_ram = await self.scenario.ram_file(size) if variant == FILLED else self._new_file("idle", size)
        # State copy writes into RAM of the destination's own; the other modes map the source's.
        dst_ram = self._new_file("dst", size) if mode == COPIED else src_ram
        self.ram_files = [src_ram] + ([dst_ram] if dst_ram != src_ram else [])
        self.workdir = w = Path(tempfile.mkdtemp(prefix="qemu-peer-", dir=self.ctx.tmp))
        q, accel, bios = self.qemu, self.spec.accel, self.scenario.bios
        self.src = QemuProcess("src", w, qemu_argv(q, "src", str(w / "src.qmp"), ram_argv(mode, size, src_ram),
                                                   bios=bios, accel=accel))
        dst_argv = ram_argv(mode, size, dst_ram)
        if mode == CPR:
            self.channels = cpr_channels(str(w / "main.sock"), str(w / "cpr.sock"))
            incoming = [json.dumps(c, separators=(",", ":")) for c in self.channels]
            self.dst = QemuProcess("dst", w, qemu_argv(q, "dst", str(w / "dst.qmp"), dst_argv, bios=bios,
                                                       accel=accel, incoming=incoming, wait=True),
                                   early_negotiation=True)
            await self.src.start()
            # Its monitor comes only after the cpr state: start it now, connect during the migration.
            self.dst.spawn()
            await self._listening(w / "cpr.sock")
        else:
            self.uri = f"unix:{w}/migration.sock"
            self.dst = QemuProcess("dst", w, qemu_argv(q, "dst", str(w / "dst.qmp"), dst_argv, bios=bios,
                                                       accel=accel, incoming=["defer"]))
            await asyncio.gather(self.src.start(), self.dst.start())
        params: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS}
        if mode == CPR:
            await self.src.execute("migrate-set-parameters", {**params, "mode": "cpr-transfer"})
        else:
            for side in (self.src, self.dst):
                if mode == SHARED:
                    await side.execute("migrate-set-capabilities", {"capabilities": [
                        {"capability": "x-ignore-shared", "state": True}]})
                await side.execute("migrate-set-parameters", params)
            await self.dst.execute("migrate-incoming", {"uri": self.uri})
        await self.src.execute("cont")
        self.observer = ObserverProcess(self.ram_files)
        await asyncio.get_running_loop().run_in_executor(None, self.observer.start)
        await asyncio.sleep(GUEST_RUN_S)

    async def _listening(self, path: Path) -> None:
        """Wait until the destination listens on ``path`` (its cpr channel)."""
        assert self.dst is not None and self.dst.proc is not None
        deadline = time.monotonic() + self.dst.start_timeout_s
        while not path.exists():
            if self.dst.proc.poll() is not None:
                raise RuntimeError(f"QEMU dst exited with {self.dst.proc.returncode}: {self.dst.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"QEMU dst never listened on {path.name}: {self.dst.log_tail()}")
            await asyncio.sleep(POLL_S)

    async def measure(self) -> dict:
        assert self.src is not None and self.dst is not None
        self.clock_offset_ns = clock_offset_ns()
        start = time.monotonic_ns()
        measured = await self._migrate()
        self.migrate_ns = (start, time.monotonic_ns())
        observer, self.observer = self.observer, None
        self.observed = await end_observation(observer, self.ctx, f"QEMU {self.qemu.version}: guest-progress observer")
        return measured

    async def _migrate(self) -> dict:
        assert self.src is not None and self.dst is not None
        if self.spec.mode == CPR:
            await self.src.execute("migrate", {"channels": self.channels})
            await self.dst.start()  # its monitor, now that the cpr state arrived
        else:
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
        src_trace, dst_trace = parse_trace(self.src.log_text()), parse_trace(self.dst.log_text())
        devices = completion_sections(src_trace)[1]
        row.update({
            "downtime_ns": src["downtime"] * ms if "downtime" in src else None,
            "total_ns": src["total-time"] * ms if "total-time" in src else None,
            "setup_ns": src["setup-time"] * ms if "setup-time" in src else None,
            "bytes_sent": ram.get("transferred"),
            "fds_passed": cpr_fds(src_trace) if self.spec.mode == CPR else 0,
            "device_sections": len(devices) if devices else None,
            "device_state_bytes": self.scenario.device_state.get(self.qemu.version, {}).get("bytes"),
        })
        stops, resumes = self.src.event_times("STOP"), self.dst.event_times("RESUME")
        if stops and resumes:
            row["stop_resume_ns"] = resumes[-1] - stops[-1]
        pause = ((stops[-1] - self.clock_offset_ns, resumes[-1] - self.clock_offset_ns)
                 if stops and resumes else None)
        row.update(self.outage_fields(pause))
        stop_us = stops[-1] // 1000 if stops else None
        timeline = qemu_timeline(src_trace, dst_trace, stop_us=stop_us,
                                 resume_us=resumes[-1] // 1000 if resumes else None)
        zero_us = origin_us(src_trace, stop_us)
        if timeline and self.outage is not None and zero_us is not None:
            # the observer's CLOCK_MONOTONIC onto the trace's wall clock, through the sync point
            timeline += observer_phases(self.outage, zero_us * 1000 - self.clock_offset_ns)
        if timeline:
            row["timeline"] = timeline
        else:
            self.ctx.warn(f"QEMU {self.qemu.version}: no timeline in the trace of a {self.spec.mode} trial")
        errors = []
        if src.get("status") != "completed":
            errors.append(f"source {src.get('status')}: {src.get('error-desc') or self.src.log_tail()}")
        elif dst.get("status") != "completed":
            errors.append(f"destination {dst.get('status')}: {dst.get('error-desc') or self.dst.log_tail()}")
        elif measured.get("dst_runstate") != "running":
            errors.append(f"destination is '{measured.get('dst_runstate')}', not running")
        elif "downtime" not in src:
            errors.append("QEMU reported no downtime")
        if not errors and not resumes:
            self.ctx.warn(f"QEMU {self.qemu.version} {self.spec.mode}: no RESUME event seen on the destination")
        row["ok"] = not errors
        row["error"] = "; ".join(errors)
        return [row]

    def outage_fields(self, pause: tuple[int, int] | None) -> dict[str, Any]:
        """``outage_ns``: the observer's silence over QEMU's STOP → RESUME (on the observer's clock);
        ``precopy_stall_ns``: its longest silence before that, from ``migrate`` on."""
        if self.observed is None or self.migrate_ns is None:
            return {}
        silences = silences_of(self.observed)
        out: dict[str, Any] = {"observer_realtime": self.observed.get("realtime")}
        outage = switchover_outage(silences, pause or self.migrate_ns)
        if outage is None:
            return out
        stall = longest_before(silences, self.migrate_ns[0], outage.start_ns)
        out.update(outage_ns=outage.duration_ns, outage_own_ns=outage.own_gap_ns,
                   precopy_stall_ns=stall.duration_ns if stall is not None else 0)
        self.outage = outage
        return out

    async def cleanup(self) -> None:
        if self.observer is not None:
            self.observer.kill()
            self.observer = None
        for q in (self.src, self.dst):
            if q is None:
                continue
            if q.qmp is None:
                q.kill()  # never connected (a cpr destination still waiting): nothing to ask
            else:
                await q.quit()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        for path in self.own_files:
            _unlink(path)


class QemuPeer(Scenario):
    name = "qemu-peer"
    description = ("real QEMU (each version given; KVM and TCG, a counting guest running) migrating over unix sockets "
                   "at the ram-size sizes: RAM copied, RAM shared (x-ignore-shared), cpr-transfer (10.0+); "
                   "RAM filled with random bytes, and idle at the smallest size")

    def __init__(self) -> None:
        self.qemus: list[QemuBinary] = []
        self._file: tuple[int, str] | None = None
        self.prefix = f"migfd-bench-{os.getpid()}-"
        #: per QEMU version: device state of one stream saved to a file (see setup)
        self.device_state: dict[str, dict[str, Any]] = {}
        self.accels = accels()
        #: the guest's -bios image (written by setup)
        self.bios: str | None = None

    def unavailable(self, ctx: BenchContext) -> str | None:
        try:
            self.qemus = find_qemus(ctx.qemus)
        except MigrationError as exc:
            return str(exc)
        if not self.qemus:
            return (f"{QEMU_BINARY} is not installed (Debian: apt-get install qemu-system-x86) "
                    "and no --qemu was given")
        if not os.path.isdir(SHM_DIR):
            return f"needs {SHM_DIR} for the shared RAM file"
        return None

    @staticmethod
    def memory_needed(size: int) -> int:
        # the random file (tmpfs) and the destination's copy of RAM (or the memfd it fills)
        return 2 * size + 1 * GiB

    def plan(self, ctx: BenchContext) -> Plan:
        specs: list[TrialSpec] = []
        skipped, points = [], []
        for size in RamSize.sizes(ctx):
            if size > MAX_RAM_DEFAULT and ctx.trials is None:
                # Filling and copying 4 GiB through every QEMU mode takes minutes per
                # trial; the default run must stay under 15 minutes (--trials runs it).
                skipped.append({"ram_bytes": size, "reason": f"above {MAX_RAM_DEFAULT >> 30} GiB in the "
                                f"default run (time budget); --trials N includes it"})
                continue
            why = "QEMU's -m takes whole MiB" if size % MiB else memory_shortfall(
                ctx, size, self.memory_needed(size))
            if why is not None:
                skipped.append({"ram_bytes": size, "reason": why})
                continue
            variants = [FILLED] if points else [FILLED, IDLE]  # idle: the smallest size only
            # TCG beside KVM at the smallest size; above it KVM alone where there is KVM (time budget)
            accels = self.accels[:1] if points else self.accels
            combos = [{"qemu": q, "mode": mode, "variant": variant, "accel": accel}
                      for variant in variants for accel in accels for q in self.qemus for mode in modes_of(q)]
            n = trials_for_size(size, ctx)
            points.append({"ram_bytes": size, "trials": n, "variants": variants})
            for item in interleave([{}], combos, n):
                q = item["qemu"]
                specs.append(QemuTrialSpec(self.name, item["mode"], item["trial"], variant=item["variant"],
                                           backend="ram", ram_bytes=size, n_fds=0, live=True,
                                           options={"qemu": q.path}, peer_version=q.version,
                                           accel=item["accel"]))
        return Plan(specs, {
            "points": points, "skipped_points": skipped,
            "modes": {q.version: modes_of(q) for q in self.qemus},  # the QEMUs themselves: metadata "qemus"
            "accels": self.accels,
            "guest": "pc, 1 vCPU, a 64 KiB -bios counting a u32 at 0x7000 in real mode, running",
            "ram": {COPIED: "memory-backend-file on /dev/shm, share=on; the destination maps a new sparse file",
                    SHARED: "memory-backend-file on /dev/shm, share=on, the same file on both sides, "
                            "x-ignore-shared on both sides",
                    CPR: "memory-backend-file on /dev/shm, share=on, aux-ram-share=on; its fd handed over",
                    "filled": "the source's file holds random bytes", "idle": "the source's file is new and sparse"},
            "observer": "migfd observe on the RAM file(s), counter at 0x7000",
        })

    async def setup(self, ctx: BenchContext) -> None:
        self.bios = str(ctx.tmp / "qemu-peer-count.bios")
        write_counting_bios(self.bios)
        for q in self.qemus:
            self.device_state[q.version] = await self.measure_device_state(q, ctx)

    async def measure_device_state(self, q: QemuBinary, ctx: BenchContext) -> dict[str, Any]:
        """Device state of this machine on QEMU ``q``: one stream saved to a file, read by migfd's reader.

        The guest runs as in the trials, then ``migrate`` to ``exec:cat > FILE``
        (7.2 has no ``file:``); the FULL sections' bytes (headers and footers
        included, as migfd counts ``x-device-state-bytes``) and their number.
        """
        work = Path(tempfile.mkdtemp(prefix="qemu-devstate-", dir=ctx.tmp))
        path = work / "stream.bin"
        ram = self.shm_path("devstate.raw")
        with open(ram, "wb") as f:
            f.truncate(DEVICE_STATE_RAM)
        proc = QemuProcess("devstate", work, qemu_argv(
            q, "devstate", str(work / "devstate.qmp"), ram_argv(COPIED, DEVICE_STATE_RAM, ram),
            bios=self.bios, trace=False))
        try:
            await proc.start()
            await proc.execute("cont")
            await asyncio.sleep(GUEST_RUN_S)
            await proc.execute("migrate", {"uri": f"exec:cat > {path}"})
            info = await proc.wait_migration(timeout_s=60)
            if info.get("status") != "completed":
                return {"error": f"saving the stream: {info.get('status')}: {info.get('error-desc')}"}
            await proc.quit()
            summary = await asyncio.get_running_loop().run_in_executor(None, inspect_stream, str(path))
            full = [s for s in summary.sections if s["type"] == "FULL"]
            return {"bytes": sum(s["size"] for s in full), "sections": len(full),
                    "vmdesc_bytes": summary.vmdesc_size, "stream_bytes": summary.size,
                    "ram_bytes": DEVICE_STATE_RAM}
        except Exception as exc:  # a QEMU that cannot save is a note, not a failed scenario
            ctx.warn(f"QEMU {q.version}: device state not measured: {exc}")
            return {"error": str(exc)}
        finally:
            if proc.qmp is not None:
                await proc.quit()
            proc.kill()
            shutil.rmtree(work, ignore_errors=True)
            _unlink(ram)

    def shm_path(self, name: str) -> str:
        return os.path.join(SHM_DIR, f"{self.prefix}{name}")

    async def ram_file(self, size: int) -> str:
        """The file of random bytes for ``size`` (one at a time: the previous size's is removed)."""
        if self._file is not None and self._file[0] == size:
            return self._file[1]
        if self._file is not None:
            _unlink(self._file[1])
        path = self.shm_path(f"{size >> 20}m.raw")
        self._file = (size, path)
        await asyncio.get_running_loop().run_in_executor(None, fill_file, path, size)
        return path

    def remove_files(self) -> None:
        self._file = None
        for path in glob.glob(self.shm_path("*")):
            _unlink(path)

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        assert isinstance(spec, QemuTrialSpec)
        return QemuTrial(spec, ctx, self)

    async def teardown(self, ctx: BenchContext) -> None:
        self.remove_files()

    def metadata(self) -> dict[str, Any]:
        return {"device_state": self.device_state}


def clock_offset_ns(samples: int = 5) -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns: the tightest of a few readings (a sync point).

    QEMU stamps its QMP events with the wall clock; the observer and migfd use
    CLOCK_MONOTONIC. Both run on this host, so one offset taken at the
    migration maps one onto the other.
    """
    best: tuple[int, int] | None = None
    for _ in range(samples):
        a = time.monotonic_ns()
        wall = time.time_ns()
        b = time.monotonic_ns()
        if best is None or b - a < best[0]:
            best = (b - a, wall - (a + b) // 2)
    assert best is not None
    return best[1]


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
