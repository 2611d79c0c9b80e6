"""``limits``: the physical floors (:mod:`migfd.bench.floors`) measured as a scenario of the same run.

The scenario keeps its public name ``limits`` (results.csv, ``--scenario``).
It runs last: its handover floor replays the fds and device-state bytes that
this run's fd-passing migrations of a whole VM handed over.
"""

from __future__ import annotations

import asyncio
from typing import Any

from migfd.bench.floors import FloorConfig, HandoverProfile, floor_rows
from migfd.bench.scenario import (
    FD_PASSING, TRAFFIC_VM_RAM, BenchContext, Plan, Scenario, Trial, TrialSpec, VMTrial,
    ram_fill_supported, tap_available,
)
from migfd.bench.scenarios.chardev import ChardevTrial
from migfd.bench.scenarios.tap_traffic import TapTraffic, TapTrafficTrial
from migfd.units import MiB


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
        rows = []
        for values in measured:
            row = self.spec.row()
            row.update(values)
            row["ok"] = True
            row["error"] = ""
            rows.append(row)
        return rows


class Floors(Scenario):
    name = "limits"
    description = ("the physical floor, same run, same Python: fd round trips (batched), AF_UNIX "
                   "throughput into fresh memory, memcpy, and the handover floor (the device-state "
                   "bytes and fds of a real fd-passing migration in one sendmsg, one-byte answer)")

    def __init__(self) -> None:
        self.config = FloorConfig()
        self.profile: HandoverProfile | None = None
        self.profile_note: dict[str, Any] = {}

    def plan(self, ctx: BenchContext) -> Plan:
        if ctx.quick:
            self.config = FloorConfig(roundtrip_reps=100, throughput_bytes=64 * MiB,
                                      memcpy_bytes=64 * MiB)
        n = ctx.n_trials(5, 2)
        specs = [TrialSpec(self.name, "floor", t) for t in range(n)]
        return Plan(specs, {"trials": n, "config": self.config.__dict__.copy()})

    async def setup(self, ctx: BenchContext) -> None:
        self.profile, self.profile_note = await handover_profile(ctx)

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return FloorTrial(spec, ctx, self)

    def metadata(self) -> dict[str, Any]:
        return {"handover_profile": self.profile_note}


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
