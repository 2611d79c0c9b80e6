"""``limits``: the physical floors (:mod:`migfd.bench.floors`) measured as a scenario of the same run.

The scenario keeps its public name ``limits`` (results.csv, ``--scenario``).
It runs last: its handover floor replays the fds and device-state bytes that
this run's fd-passing migrations of a whole VM handed over, and its
throughput floor is measured at the sizes this run's state copies moved.
"""

from __future__ import annotations

import asyncio
from typing import Any

from migfd.bench.floors import FloorConfig, FloorTap, HandoverProfile, floor_rows, throughput_reps
from migfd.bench.scenario import (
    FD_PASSING, STATE_COPY, TRAFFIC_VM_RAM, BenchContext, Plan, TapScenario, Trial, TrialSpec, VMTrial,
    ram_fill_supported, tap_available,
)
from migfd.bench.scenarios.chardev import ChardevTrial
from migfd.bench.scenarios.ram_size import RamSize
from migfd.bench.scenarios.tap_traffic import FRAME_RATE, TapTraffic, TapTrafficTrial
from migfd.units import GiB, MiB


class FloorTrial(Trial):
    """One trial of every floor: several rows, each a median of repetitions."""

    def __init__(self, spec: TrialSpec, ctx: BenchContext, scenario: "Floors"):
        super().__init__(spec, ctx)
        self.scenario = scenario

    async def measure(self) -> list[dict]:
        cfg, profile = self.scenario.config, self.scenario.profile
        return await asyncio.get_running_loop().run_in_executor(
            None, lambda: list(floor_rows(self.spec.trial, cfg, profile)))

    async def finish(self, measured: list[dict]) -> list[dict]:
        # a floor that could not run says so in its own row (the loaded handover floor)
        return [{**self.spec.row(), "ok": True, "error": "", **values} for values in measured]


class Floors(TapScenario):
    name = "limits"
    description = ("the physical floor, same run, same Python, the same kinds of fds (TAP queues, "
                   "memfd, sockets): fd round trips (batched), AF_UNIX throughput into fresh memory at "
                   "each RAM size copied, memcpy, and the handover floor (the device-state bytes and "
                   "fds of a real fd-passing migration, the acknowledgement, the EOF)")

    tap_prefix = "flr"

    def __init__(self) -> None:
        super().__init__()
        self.config = FloorConfig()
        self.profile: HandoverProfile | None = None
        self.profile_note: dict[str, Any] = {}
        self.ifname: str | None = None

    def uses_tap(self) -> bool:
        return tap_available() is None

    def plan(self, ctx: BenchContext) -> Plan:
        sizes = throughput_sizes(ctx)
        if ctx.quick:
            self.config = FloorConfig(roundtrip_reps=200, throughput_sizes=sizes,
                                      throughput_budget=1 * GiB, memcpy_bytes=64 * MiB,
                                      load_frame_rate_per_s=FRAME_RATE)
        else:
            self.config = FloorConfig(throughput_sizes=sizes, load_frame_rate_per_s=FRAME_RATE)
        n = ctx.n_trials(4, 2)
        specs = [TrialSpec(self.name, "floor", t) for t in range(n)]
        config = {k: v for k, v in self.config.__dict__.items() if k != "tap"}
        return Plan(specs, {"trials": n, "config": config,
                            "outage": "not measured: the floors run no guest",
                            "throughput_reps": {str(s): throughput_reps(s, self.config.throughput_budget)
                                                for s in sizes}})

    async def setup(self, ctx: BenchContext) -> None:
        await super().setup(ctx)
        if self.netns is not None:
            # One multi-queue TAP: its queues are fd-count's fds, one of them a whole VM's TAP.
            # Up, as a VM's TAP is (and the loaded handover floor's probe sends into it).
            queues = max(self.config.fd_counts)
            self.ifname = self.new_tap(queues=queues, up=True)
            self.config.tap = FloorTap(self.ifname, self.netns.name, queues)
        self.profile, self.profile_note = await handover_profile(ctx)

    async def teardown(self, ctx: BenchContext) -> None:
        self.remove_tap(self.ifname)
        self.ifname = None
        await super().teardown(ctx)

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return FloorTrial(spec, ctx, self)

    def metadata(self) -> dict[str, Any]:
        return {"handover_profile": self.profile_note,
                "fd_kinds": {"fd-roundtrip": "TAP queues" if self.config.tap else "listening AF_UNIX sockets",
                             "handover-floor": "memfd, " + ("TAP queue, " if self.config.tap else "")
                                               + "connected AF_UNIX sockets"},
                "handover_load": (f"tap-traffic's probe, {self.config.load_frame_rate_per_s:g} frames/s into "
                                  "the TAP whose queue is handed over, from a process of its own"
                                  if self.config.tap else "not measured: needs a TAP (root, /dev/net/tun)")}


def throughput_sizes(ctx: BenchContext) -> tuple[int, ...]:
    """The sizes the throughput floor is measured at: those this run's state copies moved.

    Without ram-size rows in this run, ram-size's sizes for this run (as
    ``--quick`` and the machine's memory allow: the floor holds the data twice).
    """
    copied = sorted({r["ram_bytes"] for r in ctx.rows
                     if r["scenario"] == RamSize.name and r["mode"] == STATE_COPY and r.get("ram_bytes")})
    if copied:
        return tuple(copied)
    fits = [s for s in RamSize.sizes(ctx) if 2 * s + 1 * GiB <= ctx.mem_available]
    return tuple(fits or RamSize.sizes(ctx)[:1])


async def handover_profile(ctx: BenchContext) -> tuple[HandoverProfile | None, dict[str, Any]]:
    """The fds and device-state bytes of a whole-VM handover, for the handover floor.

    Taken from this run's fd-passing rows of tap-traffic (RAM + TAP + chardev)
    or, failing that, chardev (RAM + chardev); if neither ran, one fd-passing
    migration of such a VM is made here to learn them.
    """
    for scenario, backend in (("tap-traffic", "ram+tap+chardev"), ("chardev", "ram+chardev")):
        rows = [r for r in ctx.rows if r["scenario"] == scenario and r["mode"] == FD_PASSING and r["ok"]]
        if rows:
            sizes = sorted(r["device_state_bytes"] for r in rows)
            fds = sorted(r["fds_passed"] for r in rows)
            profile = HandoverProfile(backend, fds[len(fds) // 2], sizes[len(sizes) // 2],
                                      f"median of this run's {len(rows)} fd-passing {scenario} rows")
            return profile, profile.__dict__.copy()
    tap = tap_available() is None
    spec = TrialSpec(Floors.name, FD_PASSING, 0, backend="ram+tap+chardev" if tap else "ram+chardev",
                     ram_bytes=TRAFFIC_VM_RAM, live=True, options={"fill": ram_fill_supported()})
    tap_scenario: TapTraffic | None = None
    probe: VMTrial
    if tap:
        tap_scenario = TapTraffic()
        await tap_scenario.setup(ctx)
        probe = TapTrafficTrial(spec, ctx, tap_scenario)
    else:
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
        if tap_scenario is not None:
            await tap_scenario.teardown(ctx)
