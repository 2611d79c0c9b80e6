"""The benchmark's scenarios: what one trial starts, measures and checks.

A scenario plans a list of :class:`TrialSpec` (one per row it will write) and
makes a :class:`Trial` for each. A trial has four steps, and the runner keeps
the clock out of all but one:

``prepare``
    start a fresh source/destination pair (and whatever peers it needs).
    Process start-up, guest RAM fill and connections happen here, never under
    the clock.
``measure``
    the migration itself (with traffic around it where the scenario is about
    traffic); the numbers come from the VMs' query-migrate and from the peers.
``finish``
    checks (status on both sides, guest RAM verified by the destination's
    ``x-query-guest {"verify": true}``, fds handed over as designed) and the
    row; any failed check makes the row ``ok=False`` with its error.
``cleanup``
    always: kill what is left, remove TAPs, files and sockets.

The migfd VM scenarios drive real ``migfd vm`` processes through
:mod:`migfd.harness` with the PyPI ``qemu.qmp`` client. Every migration uses
``max-bandwidth`` 64 GiB/s (no scenario here is about bandwidth) and QEMU's
default ``downtime-limit`` of 300 ms; fd-passing sets ``backend-transfer``,
state copy clears it, with the devices configured identically.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migfd import net
from migfd.harness import ChardevClient, MigrationResult, VMProcess, migrate

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

FD_PASSING = "fd-passing"
STATE_COPY = "state-copy"
MODES = (FD_PASSING, STATE_COPY)

#: every benchmark migration: no bandwidth cap in practice, QEMU's default downtime-limit
MAX_BANDWIDTH = 64 * GiB
DOWNTIME_LIMIT_MS = 300
#: the guest's dirty rate during live runs
DIRTY_RATE = 32 * MiB
#: RAM of the VMs of the traffic scenarios (tap-traffic, chardev)
TRAFFIC_VM_RAM = 64 * MiB
FRAME_RATE = 20_000
CHARDEV_LINE_RATE = 1_000
#: traffic before the migration starts and after it completes
TRAFFIC_LEAD_S = 0.5
TRAFFIC_TAIL_S = 0.5
TRAFFIC_DRAIN_S = 1.0


# --------------------------------------------------------------------------
# What every scenario shares
# --------------------------------------------------------------------------


@dataclass
class BenchContext:
    """What the runner knows about this run and this machine."""

    quick: bool
    trials: int | None  # None: each scenario's default schedule
    tmp: Path  # short paths for sockets (AF_UNIX paths are limited to 108 bytes)
    mem_available: int
    extra_params: dict[str, Any] = field(default_factory=dict)
    ram_sizes: list[int] | None = None  # override of the RAM sizes (tests)
    rows: list[dict] = field(default_factory=list)  # every row written so far
    warnings: dict[str, int] = field(default_factory=dict)

    def warn(self, text: str) -> None:
        self.warnings[text] = self.warnings.get(text, 0) + 1

    def n_trials(self, default: int, quick: int) -> int:
        if self.trials is not None:
            return self.trials
        return quick if self.quick else default


@dataclass
class TrialSpec:
    """One planned row (or, for limits, one group of floor rows)."""

    scenario: str
    mode: str
    trial: int
    variant: str = ""
    backend: str = ""
    ram_bytes: int | None = None
    n_fds: int | None = None
    dirty_rate_bytes_s: int | None = None
    live: bool | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        return {"scenario": self.scenario, "mode": self.mode, "variant": self.variant,
                "backend": self.backend, "ram_bytes": self.ram_bytes, "n_fds": self.n_fds,
                "dirty_rate_bytes_s": self.dirty_rate_bytes_s, "live": self.live,
                "trial": self.trial}


@dataclass
class Plan:
    specs: list[TrialSpec]
    #: what the metadata should say about this scenario's plan (points, skipped points...)
    notes: dict[str, Any] = field(default_factory=dict)


class Trial:
    """One trial; see the module docstring for the four steps."""

    def __init__(self, spec: TrialSpec, ctx: BenchContext):
        self.spec = spec
        self.ctx = ctx

    #: bounds of each step, in seconds
    def timeouts(self) -> tuple[float, float, float]:
        return 60.0, 120.0, 60.0

    async def prepare(self) -> None:
        pass

    async def measure(self) -> Any:
        raise NotImplementedError

    async def finish(self, measured: Any) -> list[dict]:
        raise NotImplementedError

    async def cleanup(self) -> None:
        pass


class Scenario:
    name = ""
    description = ""

    def unavailable(self, ctx: BenchContext) -> str | None:
        """Why this machine cannot run the scenario, or None."""
        return None

    def plan(self, ctx: BenchContext) -> Plan:
        raise NotImplementedError

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        raise NotImplementedError

    def overlap(self, previous: TrialSpec, following: TrialSpec, ctx: BenchContext) -> bool:
        """May ``following`` be prepared while ``previous`` finishes (both off the clock)?"""
        return False

    async def setup(self, ctx: BenchContext) -> None:
        pass

    async def teardown(self, ctx: BenchContext) -> None:
        pass

    def metadata(self) -> dict[str, Any]:
        """Extra facts for metadata.json, known after the scenario ran."""
        return {}


def interleave(points: list[dict[str, Any]], modes: list[dict[str, Any]], trials: int) -> list[dict[str, Any]]:
    """Per point, trial by trial, every mode in turn; odd trials reverse the order of the modes.

    So fd-passing and state copy alternate trial by trial, and neither always
    goes first: slow drift of the machine hits both alike.
    """
    out = []
    for point in points:
        for trial in range(trials):
            order = modes if trial % 2 == 0 else list(reversed(modes))
            for mode in order:
                out.append({**point, **mode, "trial": trial})
    return out


def tap_available() -> str | None:
    """Why TAP scenarios cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (TAP devices, network namespaces) and /dev/net/tun"
    if not os.path.exists(net.TUN_DEVICE_PATH):
        return f"needs {net.TUN_DEVICE_PATH}"
    return None


def ram_fill_supported() -> bool:
    """Whether memory-backend-memfd takes fill=on (every page stamped at boot)."""
    from migfd.devices import MemoryBackendMemfd

    return "prefill" in inspect.signature(MemoryBackendMemfd.__init__).parameters


def trials_for_size(size: int, ctx: BenchContext) -> int:
    """Trials per point of the RAM-size sweeps (ram-size, qemu-peer).

    ``--trials`` wins; quick: 2. Default: 5, but 3 at 4 GiB and above: a 4 GiB
    trial spends ~30 s filling, copying and verifying RAM, and the default run
    has to stay well under 15 minutes on 2 cores (docs/RESULTS.md).
    """
    if ctx.trials is not None:
        return ctx.trials
    if ctx.quick:
        return 2
    if size >= 4 * GiB:
        return 3
    return 5


def ram_object(size: int, fill: bool) -> str:
    return f"memory-backend-memfd,id=ram0,size={size},backend-transfer=on" + (",fill=on" if fill else "")


def size_label(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


def migration_params(spec: TrialSpec, ctx: BenchContext, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {"backend-transfer": spec.mode == FD_PASSING,
                              "max-bandwidth": MAX_BANDWIDTH, "downtime-limit": DOWNTIME_LIMIT_MS}
    if spec.live is False:
        params["x-max-iterations"] = 0  # stop first, then move everything
    params.update(extra)
    params.update(ctx.extra_params)
    return params


# --------------------------------------------------------------------------
# A trial with a migfd source/destination pair
# --------------------------------------------------------------------------


@dataclass
class VMConfig:
    objects: tuple[str, ...] = ()
    netdevs: tuple[str, ...] = ()
    chardevs: tuple[str, ...] = ()
    dirty_rate_bytes_s: int = 0
    netns: net.NetNamespace | None = None
    #: fds a handover passes (checked against x-fds-passed)
    expected_fds: int = 0


class VMTrial(Trial):
    """A fresh ``migfd vm`` pair, one migration between them, RAM verified on the destination."""

    def __init__(self, spec: TrialSpec, ctx: BenchContext):
        super().__init__(spec, ctx)
        self.workdir: Path | None = None
        self.src: VMProcess | None = None
        self.dst: VMProcess | None = None

    def timeouts(self) -> tuple[float, float, float]:
        gib = (self.spec.ram_bytes or 0) / GiB
        return 60 + 15 * gib, 120 + 40 * gib, 60 + 20 * gib

    def config(self) -> VMConfig:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        return migration_params(self.spec, self.ctx)

    async def before_start(self) -> None:
        """Hook: set up what the VMs need before they start (a TAP...)."""

    async def prepare(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.spec.scenario}-", dir=self.ctx.tmp))
        await self.before_start()
        cfg = self.vm_config = self.config()
        common = dict(objects=cfg.objects, netdevs=cfg.netdevs, chardevs=cfg.chardevs,
                      dirty_rate_bytes_s=cfg.dirty_rate_bytes_s, netns=cfg.netns)
        self.src = VMProcess("src", self.workdir, **common)
        self.dst = VMProcess("dst", self.workdir, incoming="defer", **common)
        timeout = self.timeouts()[0] - 5
        await asyncio.gather(self.src.start(timeout), self.dst.start(timeout))

    async def migrate(self) -> MigrationResult:
        assert self.src is not None and self.dst is not None and self.workdir is not None
        return await migrate(self.src, self.dst, f"unix:{self.workdir}/migration.sock", self.params(),
                             timeout_s=self.timeouts()[1])

    async def measure(self) -> Any:
        return await self.migrate()

    def traffic_fields(self, measured: Any) -> dict[str, Any]:
        return {}

    def result_of(self, measured: Any) -> MigrationResult:
        return measured

    async def finish(self, measured: Any) -> list[dict]:
        assert self.src is not None and self.dst is not None
        result = self.result_of(measured)
        row = self.spec.row()
        src = result.source
        row.update({
            "downtime_ns": src.get("x-downtime-ns"), "total_ns": src.get("x-total-time-ns"),
            "setup_ns": src.get("x-setup-time-ns"), "bytes_sent": src.get("x-bytes-sent"),
            "device_state_bytes": src.get("x-device-state-bytes"),
            "fds_passed": src.get("x-fds-passed"), "fd_messages": src.get("x-fd-messages"),
        })
        row.update(self.traffic_fields(measured))
        errors = []
        if src.get("status") != "completed":
            dst = result.destination
            errors.append(f"source {src.get('status')}: {src.get('error-desc') or self.src.log_tail(2)}; "
                          f"destination {dst.get('status')}: "
                          f"{dst.get('error-desc') or self.dst.log_tail(2) or 'no error reported'}")
        else:
            dst_status = result.destination.get("status")
            if dst_status != "completed":
                # The source completed only after the destination resumed (its report
                # on the return path), so a destination that runs now is a finished
                # migration; what it reported after the commit point is kept as a warning.
                runstate = (await self.dst.execute("query-status")).get("status")
                if runstate != "running":
                    errors.append(f"destination {dst_status} ({runstate}): "
                                  f"{result.destination.get('error-desc') or self.dst.log_tail(2)}")
                else:
                    self.ctx.warn(f"destination reported '{dst_status}' after the commit point "
                                  f"while running: {result.destination.get('error-desc')}")
        if not errors:
            expected = self.vm_config.expected_fds
            if self.spec.mode == FD_PASSING and src.get("x-fds-passed") != expected:
                errors.append(f"{expected} fds should have been handed over, "
                              f"x-fds-passed is {src.get('x-fds-passed')}")
            if not row.get("downtime_ns"):
                errors.append("no downtime reported")
        # The source has nothing left to do: let it go while the destination verifies.
        quit_src = asyncio.create_task(self.src.quit())
        if not errors:
            errors.extend(await self.verify())
        await quit_src
        errors.extend(self.traffic_errors(measured))
        row["ok"] = not errors
        row["error"] = "; ".join(errors)
        return [row]

    def traffic_errors(self, measured: Any) -> list[str]:
        return []

    async def verify(self) -> list[str]:
        """Guest RAM checked page by page by the destination (a still image)."""
        assert self.dst is not None
        info = await asyncio.wait_for(self.dst.execute("x-query-guest", {"verify": True}),
                                      self.timeouts()[2])
        if info.get("status") != "running":
            return [f"destination guest is '{info.get('status')}', not running"]
        bad = {dev: res for dev, res in (info.get("ram-verify") or {}).items() if not res.get("ok")}
        if bad:
            return [f"RAM verification failed: {bad}"]
        return []

    async def cleanup(self) -> None:
        for vm in (self.src, self.dst):
            if vm is None:
                continue
            if vm.proc is not None and vm.proc.poll() is None:
                try:
                    await asyncio.wait_for(vm.quit(5), 10)
                except Exception:
                    pass
            vm.kill()
            if vm.qmp is not None:
                try:
                    await vm.qmp.disconnect()
                except Exception:
                    pass
        await self.after_cleanup()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    async def after_cleanup(self) -> None:
        """Hook: remove what before_start created."""


# --------------------------------------------------------------------------
# ram-size
# --------------------------------------------------------------------------


class RamSizeTrial(VMTrial):
    def config(self) -> VMConfig:
        return VMConfig(objects=(ram_object(self.spec.ram_bytes, self.spec.options["fill"]),),
                        dirty_rate_bytes_s=self.spec.dirty_rate_bytes_s or 0, expected_fds=1)


class RamSize(Scenario):
    name = "ram-size"
    description = ("guest RAM (memfd) from 64 MiB to 4 GiB, live (precopy, fixed dirty rate) "
                   "and non-live (x-max-iterations 0: stop, then move everything)")

    SIZES = [64 * MiB, 256 * MiB, 1 * GiB, 4 * GiB]
    QUICK_SIZES = [64 * MiB, 256 * MiB]

    @staticmethod
    def memory_needed(size: int, mode: str) -> int:
        # State copy holds the source's RAM and the destination's copy; fd-passing
        # shares one memfd. The destination's verification reads a copy of RAM.
        copies = 3 if mode == STATE_COPY else 2
        return copies * size + 1 * GiB

    def plan(self, ctx: BenchContext) -> Plan:
        sizes = ctx.ram_sizes or (self.QUICK_SIZES if ctx.quick else self.SIZES)
        fill = ram_fill_supported()
        specs: list[TrialSpec] = []
        skipped = []
        points = []
        for size in sizes:
            too_big = [m for m in MODES if self.memory_needed(size, m) > ctx.mem_available]
            if too_big:
                skipped.append({"ram_bytes": size, "reason":
                                f"{size_label(size)} needs {size_label(self.memory_needed(size, STATE_COPY))} "
                                f"of free memory for state copy; {ctx.mem_available >> 20} MiB available"})
                continue
            n = trials_for_size(size, ctx)
            points.append({"ram_bytes": size, "trials": n})
            for live in (True, False):
                for item in interleave([{}], [{"mode": m} for m in MODES], n):
                    specs.append(TrialSpec(
                        self.name, item["mode"], item["trial"], backend="ram", ram_bytes=size,
                        n_fds=1, dirty_rate_bytes_s=DIRTY_RATE, live=live, options={"fill": fill}))
        return Plan(specs, {"points": points, "skipped_points": skipped, "ram_fill": fill,
                            "dirty_rate_bytes_s": DIRTY_RATE})

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return RamSizeTrial(spec, ctx)

    def overlap(self, previous: TrialSpec, following: TrialSpec, ctx: BenchContext) -> bool:
        # Preparing the next pair (filling its RAM) while the last one verifies and
        # exits: both off the clock. Only when memory holds both at once.
        size = max(previous.ram_bytes or 0, following.ram_bytes or 0)
        return size >= 256 * MiB and 4 * size + 2 * GiB <= ctx.mem_available


# --------------------------------------------------------------------------
# fd-count
# --------------------------------------------------------------------------


class FdCountTrial(VMTrial):
    def __init__(self, spec: TrialSpec, ctx: BenchContext, scenario: "FdCount"):
        super().__init__(spec, ctx)
        self.scenario = scenario
        self.ifname: str | None = None

    async def before_start(self) -> None:
        if self.spec.backend == "tap":
            ns = self.scenario.netns
            assert ns is not None
            self.ifname = f"fdc{self.scenario.next_index()}"
            n = self.spec.n_fds or 1
            # Persistent, so a state copy finds it again by name.
            fd = net.open_tap(self.ifname, multi_queue=n > 1, netns=ns.name)
            try:
                net.set_persist(fd, True)
            finally:
                os.close(fd)

    def config(self) -> VMConfig:
        n = self.spec.n_fds or 1
        if self.spec.backend == "tap":
            return VMConfig(netdevs=(f"tap,id=net0,ifname={self.ifname},queues={n},backend-transfer=on",),
                            netns=self.scenario.netns, expected_fds=n)
        chardevs = tuple(f"socket,id=ch{i},path={self.workdir}/ch{i}.sock,server=on,backend-transfer=on"
                         for i in range(n))
        return VMConfig(chardevs=chardevs, expected_fds=n)

    def params(self) -> dict[str, Any]:
        return migration_params(self.spec, self.ctx, **{"x-batch-fds": self.spec.variant == "batched"})

    async def after_cleanup(self) -> None:
        _delete_tap(self.ifname, self.scenario.netns)


class FdCount(Scenario):
    name = "fd-count"
    description = ("1 to 256 handed-over fds (queues of a multi-queue TAP as root, listening "
                   "chardev sockets otherwise), fd records batched (up to 16 per sendmsg) and "
                   "unbatched; state copy of the same VM for comparison")

    COUNTS = [1, 4, 16, 64, 256]
    QUICK_COUNTS = [1, 16, 256]

    def __init__(self) -> None:
        self.netns: net.NetNamespace | None = None
        self._index = 0
        self.backend = ""

    def next_index(self) -> int:
        self._index += 1
        return self._index

    def plan(self, ctx: BenchContext) -> Plan:
        self.backend = "tap" if tap_available() is None else "socket"
        counts = self.QUICK_COUNTS if ctx.quick else self.COUNTS
        n = ctx.n_trials(5, 2)
        modes = [{"mode": FD_PASSING, "variant": "batched"}, {"mode": STATE_COPY, "variant": ""},
                 {"mode": FD_PASSING, "variant": "unbatched"}]
        specs = [TrialSpec(self.name, item["mode"], item["trial"], variant=item["variant"],
                           backend=self.backend, ram_bytes=0, n_fds=item["n"], dirty_rate_bytes_s=0,
                           live=True)
                 for item in interleave([{"n": c} for c in counts], modes, n)]
        why = tap_available()
        return Plan(specs, {"points": [{"n_fds": c, "trials": n} for c in counts],
                            "fd_kind": "multi-queue TAP queues" if self.backend == "tap"
                            else f"listening chardev sockets (TAP: {why})"})

    async def setup(self, ctx: BenchContext) -> None:
        if self.backend == "tap":
            self.netns = net.NetNamespace()

    async def teardown(self, ctx: BenchContext) -> None:
        if self.netns is not None:
            self.netns.close()
            self.netns = None

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return FdCountTrial(spec, ctx, self)


# --------------------------------------------------------------------------
# tap-traffic
# --------------------------------------------------------------------------


@dataclass
class Traffic:
    result: MigrationResult
    report: Any


class TapTrafficTrial(VMTrial):
    """RAM, one TAP queue and one chardev; numbered frames through the TAP during the migration."""

    def __init__(self, spec: TrialSpec, ctx: BenchContext, scenario: "TapTraffic"):
        super().__init__(spec, ctx)
        self.scenario = scenario
        self.ifname: str | None = None
        self.probe: net.FrameProbe | None = None

    async def before_start(self) -> None:
        ns = self.scenario.netns
        assert ns is not None
        self.ifname = f"tt{self.scenario.next_index()}"
        fd = net.open_tap(self.ifname, netns=ns.name)
        try:
            net.set_persist(fd, True)
        finally:
            os.close(fd)

    def config(self) -> VMConfig:
        return VMConfig(objects=(ram_object(TRAFFIC_VM_RAM, self.spec.options["fill"]),),
                        netdevs=(f"tap,id=net0,ifname={self.ifname},backend-transfer=on",),
                        chardevs=(f"socket,id=ch0,path={self.workdir}/ch0.sock,server=on,backend-transfer=on",),
                        dirty_rate_bytes_s=DIRTY_RATE, netns=self.scenario.netns, expected_fds=3)

    async def measure(self) -> Traffic:
        ns = self.scenario.netns
        assert ns is not None and self.ifname is not None
        loop = asyncio.get_running_loop()
        self.probe = net.FrameProbe(self.ifname, netns=ns.name, rate_per_s=FRAME_RATE,
                                    max_duration_s=60.0)
        self.probe.start()
        await asyncio.sleep(TRAFFIC_LEAD_S)
        result = await self.migrate()
        await asyncio.sleep(TRAFFIC_TAIL_S)
        probe, self.probe = self.probe, None
        report = await loop.run_in_executor(None, probe.stop, TRAFFIC_DRAIN_S)
        return Traffic(result, report)

    def result_of(self, measured: Traffic) -> MigrationResult:
        return measured.result

    def traffic_fields(self, measured: Traffic) -> dict[str, Any]:
        r = measured.report
        return {"frames_sent": r.frames_sent, "frames_lost": len(r.lost),
                "frames_duplicated": len(r.duplicated), "max_gap_ns": r.max_gap_ns}

    def traffic_errors(self, measured: Traffic) -> list[str]:
        r = measured.report
        errors = []
        if r.frames_sent == 0 or not r.received:
            errors.append("no probe frame came back: the path through the TAP never worked")
        if r.send_errors:
            errors.append(f"{r.send_errors} probe sends failed")
        if r.probe_drops:
            errors.append(f"the probe's own socket dropped {r.probe_drops} echoes")
        return errors

    async def after_cleanup(self) -> None:
        if self.probe is not None:
            self.probe.close()
            self.probe = None
        _delete_tap(self.ifname, self.scenario.netns)


class TapTraffic(Scenario):
    name = "tap-traffic"
    description = (f"a VM with {TRAFFIC_VM_RAM >> 20} MiB RAM, one TAP queue and one chardev; "
                   f"numbered raw frames (0x88B5) at {FRAME_RATE}/s through the TAP, from "
                   f"{TRAFFIC_LEAD_S} s before the migration to {TRAFFIC_TAIL_S} s after it")

    def __init__(self) -> None:
        self.netns: net.NetNamespace | None = None
        self._index = 0

    def next_index(self) -> int:
        self._index += 1
        return self._index

    def unavailable(self, ctx: BenchContext) -> str | None:
        return tap_available()

    def plan(self, ctx: BenchContext) -> Plan:
        n = ctx.n_trials(5, 2)
        fill = ram_fill_supported()
        specs = [TrialSpec(self.name, item["mode"], item["trial"], backend="ram+tap+chardev",
                           ram_bytes=TRAFFIC_VM_RAM, n_fds=3, dirty_rate_bytes_s=DIRTY_RATE, live=True,
                           options={"fill": fill})
                 for item in interleave([{}], [{"mode": m} for m in MODES], n)]
        return Plan(specs, {"frame_rate_per_s": FRAME_RATE, "lead_s": TRAFFIC_LEAD_S,
                            "tail_s": TRAFFIC_TAIL_S, "drain_s": TRAFFIC_DRAIN_S,
                            "trials": n, "ram_fill": fill})

    async def setup(self, ctx: BenchContext) -> None:
        self.netns = net.NetNamespace()

    async def teardown(self, ctx: BenchContext) -> None:
        if self.netns is not None:
            self.netns.close()
            self.netns = None

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return TapTrafficTrial(spec, ctx, self)


# --------------------------------------------------------------------------
# chardev
# --------------------------------------------------------------------------


class ChardevTrial(VMTrial):
    """RAM and one socket chardev; a connected client sends numbered lines through the migration."""

    def __init__(self, spec: TrialSpec, ctx: BenchContext):
        super().__init__(spec, ctx)
        self.client: ChardevClient | None = None

    def config(self) -> VMConfig:
        return VMConfig(objects=(ram_object(TRAFFIC_VM_RAM, self.spec.options["fill"]),),
                        chardevs=(f"socket,id=ch0,path={self.workdir}/ch0.sock,server=on,backend-transfer=on",),
                        dirty_rate_bytes_s=DIRTY_RATE, expected_fds=3)

    async def measure(self) -> Traffic:
        loop = asyncio.get_running_loop()
        self.client = ChardevClient(f"{self.workdir}/ch0.sock", rate_per_s=CHARDEV_LINE_RATE)
        await loop.run_in_executor(None, self.client.start)
        if not await loop.run_in_executor(None, self.client.wait_echoes, 1, 10.0):
            raise RuntimeError("the chardev never echoed the client's first line")
        await asyncio.sleep(TRAFFIC_LEAD_S)
        result = await self.migrate()
        await asyncio.sleep(TRAFFIC_TAIL_S)
        client, self.client = self.client, None
        report = await loop.run_in_executor(None, client.stop, TRAFFIC_DRAIN_S)
        return Traffic(result, (report, client.error))

    def result_of(self, measured: Traffic) -> MigrationResult:
        return measured.result

    def traffic_fields(self, measured: Traffic) -> dict[str, Any]:
        report, _ = measured.report
        return {"lines_sent": report.lines_sent, "lines_lost": len(report.lost),
                "reconnects": report.reconnects, "max_gap_ns": report.max_gap_ns}

    def traffic_errors(self, measured: Traffic) -> list[str]:
        _, error = measured.report
        return [f"chardev client: {error}"] if error else []

    async def after_cleanup(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await asyncio.get_running_loop().run_in_executor(None, client.stop, 0.0)


class Chardev(Scenario):
    name = "chardev"
    description = (f"a VM with {TRAFFIC_VM_RAM >> 20} MiB RAM and one socket chardev; a connected "
                   f"client sends {CHARDEV_LINE_RATE} numbered lines/s through the migration")

    def plan(self, ctx: BenchContext) -> Plan:
        n = ctx.n_trials(5, 2)
        fill = ram_fill_supported()
        specs = [TrialSpec(self.name, item["mode"], item["trial"], backend="ram+chardev",
                           ram_bytes=TRAFFIC_VM_RAM, n_fds=3, dirty_rate_bytes_s=DIRTY_RATE, live=True,
                           options={"fill": fill})
                 for item in interleave([{}], [{"mode": m} for m in MODES], n)]
        return Plan(specs, {"line_rate_per_s": CHARDEV_LINE_RATE, "lead_s": TRAFFIC_LEAD_S,
                            "tail_s": TRAFFIC_TAIL_S, "drain_s": TRAFFIC_DRAIN_S, "trials": n,
                            "ram_fill": fill})

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return ChardevTrial(spec, ctx)


# --------------------------------------------------------------------------
# limits
# --------------------------------------------------------------------------


class LimitsTrial(Trial):
    def __init__(self, spec: TrialSpec, ctx: BenchContext, scenario: "Limits"):
        super().__init__(spec, ctx)
        self.scenario = scenario

    async def measure(self) -> list[dict]:
        from migfd.bench.limits import floor_rows

        cfg, profile = self.scenario.config, self.scenario.profile
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: list(floor_rows(self.spec.trial, cfg, profile)))

    async def finish(self, measured: list[dict]) -> list[dict]:
        rows = []
        for values in measured:
            row = self.spec.row()
            row.update(values)
            row["ok"] = True
            row["error"] = ""
            rows.append(row)
        return rows


class Limits(Scenario):
    name = "limits"
    description = ("the physical floor, same run, same Python: fd round trips (batched), AF_UNIX "
                   "throughput into fresh memory, memcpy, and the handover floor (the device-state "
                   "bytes and fds of a real fd-passing migration in one sendmsg, one-byte answer)")

    def __init__(self) -> None:
        from migfd.bench.limits import LimitsConfig

        self.config = LimitsConfig()
        self.profile = None
        self.profile_note: dict[str, Any] = {}

    def plan(self, ctx: BenchContext) -> Plan:
        from migfd.bench.limits import LimitsConfig

        if ctx.quick:
            self.config = LimitsConfig(roundtrip_reps=100, throughput_bytes=64 * MiB,
                                       memcpy_bytes=64 * MiB)
        n = ctx.n_trials(5, 2)
        specs = [TrialSpec(self.name, "floor", t) for t in range(n)]
        return Plan(specs, {"trials": n, "config": self.config.__dict__.copy()})

    async def setup(self, ctx: BenchContext) -> None:
        self.profile, self.profile_note = await handover_profile(ctx)

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return LimitsTrial(spec, ctx, self)

    def metadata(self) -> dict[str, Any]:
        return {"handover_profile": self.profile_note}


async def handover_profile(ctx: BenchContext):
    """The fds and device-state bytes of a whole-VM handover, for the handover floor.

    Taken from this run's fd-passing rows of tap-traffic (RAM + TAP + chardev)
    or, failing that, chardev (RAM + chardev); if neither ran, one fd-passing
    migration of such a VM is made here to learn them.
    """
    from migfd.bench.limits import HandoverProfile

    for scenario, backend in (("tap-traffic", "ram+tap+chardev"), ("chardev", "ram+chardev")):
        rows = [r for r in ctx.rows if r["scenario"] == scenario and r["mode"] == FD_PASSING and r["ok"]]
        if rows:
            sizes = sorted(r["device_state_bytes"] for r in rows)
            fds = sorted(r["fds_passed"] for r in rows)
            profile = HandoverProfile(backend, fds[len(fds) // 2], sizes[len(sizes) // 2],
                                      f"median of this run's {len(rows)} fd-passing {scenario} rows")
            return profile, profile.__dict__.copy()
    tap = tap_available() is None
    spec = TrialSpec("limits", FD_PASSING, 0, backend="ram+tap+chardev" if tap else "ram+chardev",
                     ram_bytes=TRAFFIC_VM_RAM, live=True, options={"fill": ram_fill_supported()})
    if tap:
        scenario = TapTraffic()
        await scenario.setup(ctx)
        probe: VMTrial = TapTrafficTrial(spec, ctx, scenario)
    else:
        scenario = None
        probe = ChardevTrial(spec, ctx)
    try:
        await probe.prepare()
        result = await probe.migrate()
        if result.source.get("status") != "completed":
            raise RuntimeError(result.error or result.source.get("status"))
        profile = HandoverProfile(spec.backend, result.source["x-fds-passed"],
                                  result.source["x-device-state-bytes"],
                                  "one fd-passing migration made for the purpose (no traffic)")
        return profile, profile.__dict__.copy()
    except Exception as exc:
        ctx.warn(f"handover floor skipped: probe migration failed: {exc}")
        return None, {"error": f"probe migration failed: {exc}"}
    finally:
        await probe.cleanup()
        if scenario is not None:
            await scenario.teardown(ctx)


# --------------------------------------------------------------------------


def all_scenarios() -> list[Scenario]:
    """Every scenario, in the order a run goes through them (limits last: its
    handover floor uses the fds and device-state bytes measured before it)."""
    from migfd.bench.qemu_peer import QemuPeer

    return [RamSize(), FdCount(), TapTraffic(), Chardev(), QemuPeer(), Limits()]


SCENARIO_NAMES = ("ram-size", "fd-count", "tap-traffic", "chardev", "qemu-peer", "limits")

__all__ = ["BenchContext", "Plan", "Scenario", "Trial", "TrialSpec", "SCENARIO_NAMES", "all_scenarios"]


def _delete_tap(ifname: str | None, netns) -> None:
    """Remove a trial's TAP (and the frames queued in it); gone already is fine."""
    if ifname is not None and netns is not None:
        try:
            net.delete_link(ifname, netns.name)
        except OSError:
            pass
