"""The benchmark's framework: what a scenario plans and what one trial does, step by step.

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

:class:`VMTrial` drives real ``migfd vm`` processes through :mod:`migfd.peers`
with the PyPI ``qemu.qmp`` client. Every migration uses ``max-bandwidth``
64 GiB/s (no scenario here is about bandwidth) and QEMU's default
``downtime-limit`` of 300 ms; fd-passing sets ``backend-transfer``, state copy
clears it, with the devices configured identically. The scenarios themselves
live in :mod:`migfd.bench.scenarios`, one module each.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from migfd.devices import MemoryBackendMemfd
from migfd.net.netns import NetNamespace
from migfd.net.tun import TUN_DEVICE_PATH
from migfd.peers.migrate import MigrationResult, migrate
from migfd.peers.observe import ObserverProcess, Silence, echo_silence, longest_before, silences_of, switchover_outage
from migfd.peers.process import VMProcess
from migfd.peers.tapnet import TAP_TXQLEN, create_persistent_tap, delete_tap
from migfd.timeline import Timeline, both_sides, stop_origin
from migfd.units import GiB, KiB, MiB

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
#: traffic before the migration starts and after it completes
TRAFFIC_LEAD_S = 0.5
TRAFFIC_TAIL_S = 0.5
TRAFFIC_DRAIN_S = 1.0
#: the guest-progress observer starts this long before the migration (it maps the source's RAM)...
OBSERVER_LEAD_S = 0.15
#: ... and ends this long after it: the guest's first progress on the destination is inside
OBSERVER_TAIL_S = 0.05


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
    qemus: list[str] = field(default_factory=list)  # QEMU binaries beside the system's (--qemu, $MIGFD_QEMU)
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
    """One planned row (or, for the floors, one group of floor rows)."""

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


class TapScenario(Scenario):
    """A scenario whose trials each get a fresh persistent TAP in one network namespace of its own.

    The namespace lives from :meth:`setup` to :meth:`teardown` (only when
    :meth:`uses_tap`); each trial's TAP is made by :meth:`new_tap` before its
    VMs start and removed by :meth:`remove_tap` in its cleanup.
    """

    #: the TAPs are named <tap_prefix><n>, n counting up over the scenario
    tap_prefix = "tap"

    def __init__(self) -> None:
        self.netns: NetNamespace | None = None
        self._taps_made = 0

    def uses_tap(self) -> bool:
        return True

    async def setup(self, ctx: BenchContext) -> None:
        if self.uses_tap():
            self.netns = NetNamespace()

    async def teardown(self, ctx: BenchContext) -> None:
        if self.netns is not None:
            self.netns.close()
            self.netns = None

    def new_tap(self, queues: int = 1, up: bool = False) -> str:
        """A persistent TAP (so a state copy finds it again by name); returns its name.

        ``up`` sets its link up now (a VM's TAP device does it when the VM starts).
        """
        assert self.netns is not None, "setup() first"
        self._taps_made += 1
        ifname = f"{self.tap_prefix}{self._taps_made}"
        create_persistent_tap(self.netns, ifname, queues=queues, txqlen=TAP_TXQLEN, up=up)
        return ifname

    def remove_tap(self, ifname: str | None) -> None:
        """Remove a trial's TAP (and the frames queued in it); gone already is fine."""
        delete_tap(self.netns, ifname)


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
    if not os.path.exists(TUN_DEVICE_PATH):
        return f"needs {TUN_DEVICE_PATH}"
    return None


def ram_fill_supported() -> bool:
    """Whether memory-backend-memfd takes fill=on (every page stamped at boot)."""
    return "prefill" in inspect.signature(MemoryBackendMemfd.__init__).parameters


def trials_for_size(size: int, ctx: BenchContext) -> int:
    """Trials per point of the RAM-size sweeps (ram-size, qemu-peer).

    ``--trials`` wins; quick: 2. Default: 4, but 3 at 4 GiB and above: a 4 GiB
    trial spends ~15 s filling, copying and verifying RAM, and the default run
    has to stay under 15 minutes on 2 cores (docs/RESULTS.md); the adaptive
    schedule adds trials where they are cheap.
    """
    if ctx.trials is not None:
        return ctx.trials
    if ctx.quick:
        return 2
    if size >= 4 * GiB:
        return 3
    return 4


def traffic_plan(scenario: str, backend: str, ctx: BenchContext, rate: dict[str, Any]) -> Plan:
    """The plan of a traffic scenario (tap-traffic, chardev): one VM of :data:`TRAFFIC_VM_RAM`
    with three handed-over fds, fd-passing and state copy in turn; ``rate`` opens its notes."""
    n = ctx.n_trials(5, 2)
    fill = ram_fill_supported()
    specs = [TrialSpec(scenario, item["mode"], item["trial"], backend=backend, ram_bytes=TRAFFIC_VM_RAM,
                       n_fds=3, dirty_rate_bytes_s=DIRTY_RATE, live=True, options={"fill": fill})
             for item in interleave([{}], [{"mode": m} for m in MODES], n)]
    return Plan(specs, {**rate, "lead_s": TRAFFIC_LEAD_S, "tail_s": TRAFFIC_TAIL_S,
                        "drain_s": TRAFFIC_DRAIN_S, "trials": n, "ram_fill": fill})


def memory_shortfall(ctx: BenchContext, size: int, needed: int, purpose: str = "") -> str | None:
    """Why a point of ``size`` bytes of RAM, needing ``needed`` bytes of free memory, is skipped here."""
    if needed <= ctx.mem_available:
        return None
    return (f"{size_label(size)} needs {size_label(needed)} of free memory{purpose}; "
            f"{ctx.mem_available >> 20} MiB available")


def ram_object(size: int, fill: bool) -> str:
    """The ``-object`` of a VM's guest RAM: one memfd that fd-passing hands over."""
    return f"memory-backend-memfd,id=ram0,size={size},backend-transfer=on" + (",fill=on" if fill else "")


def size_label(n: int) -> str:
    """``n`` bytes as people write it: "64 MiB", "4 GiB" (bytes when no unit divides it)."""
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


def migration_params(spec: TrialSpec, ctx: BenchContext, **extra: Any) -> dict[str, Any]:
    """migrate-set-parameters of one trial: its mode, the run's fixed tunables, then ``extra``."""
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
    netns: NetNamespace | None = None
    #: fds a handover passes (checked against x-fds-passed)
    expected_fds: int = 0


class VMTrial(Trial):
    """A fresh ``migfd vm`` pair, one migration between them, RAM verified on the destination.

    A pair with guest RAM is watched by a guest-progress observer
    (``migfd observe``, a process of its own) from before the migration to
    after it: its silences give ``outage_ns`` (the one holding the source's
    stop) and ``precopy_stall_ns`` (the longest before it, while the
    migration was live).
    """

    def __init__(self, spec: TrialSpec, ctx: BenchContext):
        super().__init__(spec, ctx)
        self.workdir: Path | None = None
        self.src: VMProcess | None = None
        self.dst: VMProcess | None = None
        self.observer: ObserverProcess | None = None
        #: the observer's report, and the CLOCK_MONOTONIC ns the migration began and ended
        self.observed: dict[str, Any] | None = None
        #: the silence of the switchover among the observer's (see outage_fields)
        self.outage: Silence | None = None
        self.migrate_ns: tuple[int, int] | None = None
        #: the accelerator the VMs run their guest on (x-query-guest)
        self.accel = ""

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
        self.accel = await query_accel(self.src)
        if any(o.startswith("memory-backend-memfd") for o in cfg.objects):
            # The source's RAM now, the destination's when it appears (state copy
            # creates it when the migration starts; fd-passing adopts the same memfd).
            self.observer = ObserverProcess([f"pid:{self.src.pid}", f"pid:{self.dst.pid}"])
            await asyncio.get_running_loop().run_in_executor(None, self.observer.start)

    async def migrate(self) -> MigrationResult:
        assert self.src is not None and self.dst is not None and self.workdir is not None
        if self.observer is not None:
            await asyncio.sleep(OBSERVER_LEAD_S)
        start = time.monotonic_ns()
        result = await migrate(self.src, self.dst, f"unix:{self.workdir}/migration.sock", self.params(),
                               timeout_s=self.timeouts()[1])
        self.migrate_ns = (start, time.monotonic_ns())
        observer, self.observer = self.observer, None
        self.observed = await end_observation(observer, self.ctx, "guest-progress observer")
        return result

    def switchover(self, result: MigrationResult) -> tuple[int, int] | None:
        """CLOCK_MONOTONIC ns of the source's stop and of the resume the destination reported."""
        stop = stop_origin(Timeline.from_qmp(result.source.get("x-timeline")))
        downtime = result.source.get("x-downtime-ns")
        if stop is None or not downtime:
            return None
        return stop, stop + downtime

    def outage_fields(self, result: MigrationResult) -> dict[str, Any]:
        """``outage_ns`` and ``precopy_stall_ns`` from the observer; the observer's phases for the timeline."""
        out: dict[str, Any] = {"release_ns": result.source.get("x-release-time-ns")}
        if self.observed is None or self.migrate_ns is None:
            return out
        out["observer_realtime"] = self.observed.get("realtime")
        silences = silences_of(self.observed)
        outage = switchover_outage(silences, self.switchover(result) or self.migrate_ns)
        if outage is None:
            return out
        out.update(outage_ns=outage.duration_ns, outage_own_ns=outage.own_gap_ns)
        if self.spec.live:
            stall = longest_before(silences, self.migrate_ns[0], outage.start_ns)
            out["precopy_stall_ns"] = stall.duration_ns if stall is not None else 0
        self.outage = outage
        return out

    def observer_phases(self, origin_ns: int) -> list[dict[str, Any]]:
        """The guest's silence around the switchover as the observer saw it, on the timeline's clock."""
        return observer_phases(self.outage, origin_ns) if self.outage is not None else []

    def echo_fields(self, result: MigrationResult, arrivals_ns, own) -> dict[str, Any]:
        """A backend client's silence around the switchover (last echo at the stop to first at the resume)."""
        window = self.switchover(result)
        silence = echo_silence(arrivals_ns, *window, own) if window else None
        if silence is None:
            return {}
        return {"switchover_silence_ns": silence.duration_ns, "switchover_silence_own_ns": silence.own_gap_ns}

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
        row.update(self.outage_fields(result))
        row["accel"] = self.accel
        # Both sides' phases on the source's clock; a failed migration keeps what it recorded.
        timeline = both_sides(src.get("x-timeline"), result.destination.get("x-timeline"))
        if timeline:
            origin = stop_origin(Timeline.from_qmp(src.get("x-timeline")))
            row["timeline"] = timeline + (self.observer_phases(origin) if origin is not None else [])
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
        if self.observer is not None:
            self.observer.kill()
            self.observer = None
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


async def end_observation(observer: ObserverProcess | None, ctx: BenchContext, what: str) -> dict[str, Any] | None:
    """Let ``observer`` see the guest run for :data:`OBSERVER_TAIL_S` more, stop it, return its report
    (None, and a warning in the run's metadata, when it has none)."""
    if observer is None:
        return None
    await asyncio.sleep(OBSERVER_TAIL_S)
    try:
        return await asyncio.get_running_loop().run_in_executor(None, observer.stop)
    except RuntimeError as exc:
        ctx.warn(f"{what}: {exc}")
        return None


def observer_phases(outage: Silence, origin_ns: int) -> list[dict[str, Any]]:
    """The observer's lane of a trial's timeline: the guest's silence around the switchover
    (``guest-outage``) and the instant it ran again (``first-progress``), ``origin_ns`` the timeline's 0."""
    return [{"side": "observer", "phase": "guest-outage", "start_ns": outage.start_ns - origin_ns,
             "end_ns": outage.end_ns - origin_ns},
            {"side": "observer", "phase": "first-progress", "start_ns": outage.end_ns - origin_ns,
             "end_ns": outage.end_ns - origin_ns}]


async def query_accel(vm: VMProcess) -> str:
    """The accelerator a migfd VM runs its guest on; ``thread`` for a VM that does not say."""
    accel = (await vm.execute("x-query-guest")).get("accel")
    if isinstance(accel, dict):
        accel = accel.get("name")
    return accel if isinstance(accel, str) and accel else "thread"


@dataclass
class Traffic:
    """A migration and what the traffic peer saw around it (tap-traffic, chardev)."""

    result: MigrationResult
    report: Any
