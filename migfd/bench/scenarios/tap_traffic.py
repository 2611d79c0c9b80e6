"""``tap-traffic``: a VM with RAM, one TAP queue and one chardev; numbered frames through the TAP."""

from __future__ import annotations

import asyncio
from typing import Any

from migfd.bench.scenario import (
    DIRTY_RATE, TRAFFIC_DRAIN_S, TRAFFIC_LEAD_S, TRAFFIC_TAIL_S, TRAFFIC_VM_RAM, BenchContext, Plan,
    TapScenario, Traffic, Trial, TrialSpec, VMConfig, VMTrial, ram_object, tap_available, traffic_plan,
)
from migfd.peers.frames import FrameProbe
from migfd.peers.tapnet import TAP_TXQLEN
from migfd.peers.migrate import MigrationResult

FRAME_RATE = 20_000


class TapTrafficTrial(VMTrial):
    """RAM, one TAP queue and one chardev; numbered frames through the TAP during the migration."""

    def __init__(self, spec: TrialSpec, ctx: BenchContext, scenario: "TapTraffic"):
        super().__init__(spec, ctx)
        self.scenario = scenario
        self.ifname: str | None = None
        self.probe: FrameProbe | None = None

    async def before_start(self) -> None:
        self.ifname = self.scenario.new_tap()

    def config(self) -> VMConfig:
        return VMConfig(objects=(ram_object(self.spec.ram_bytes or TRAFFIC_VM_RAM, self.spec.options["fill"]),),
                        netdevs=(f"tap,id=net0,ifname={self.ifname},backend-transfer=on",),
                        chardevs=(f"socket,id=ch0,path={self.workdir}/ch0.sock,server=on,backend-transfer=on",),
                        dirty_rate_bytes_s=DIRTY_RATE, netns=self.scenario.netns, expected_fds=3)

    async def measure(self) -> Traffic:
        ns = self.scenario.netns
        assert ns is not None and self.ifname is not None
        loop = asyncio.get_running_loop()
        self.probe = FrameProbe(self.ifname, netns=ns.name, rate_per_s=FRAME_RATE, max_duration_s=60.0)
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
                "frames_duplicated": len(r.duplicated), "max_gap_ns": r.max_gap_ns,
                **self.echo_fields(measured.result, r.arrivals_ns, r.own_gaps)}

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
        self.scenario.remove_tap(self.ifname)


class TapTraffic(TapScenario):
    name = "tap-traffic"
    description = (f"a VM with {TRAFFIC_VM_RAM >> 20} MiB RAM, one TAP queue and one chardev; "
                   f"numbered raw frames (0x88B5) at {FRAME_RATE}/s through the TAP, from "
                   f"{TRAFFIC_LEAD_S} s before the migration to {TRAFFIC_TAIL_S} s after it")

    tap_prefix = "tt"

    def unavailable(self, ctx: BenchContext) -> str | None:
        return tap_available()

    def plan(self, ctx: BenchContext) -> Plan:
        return traffic_plan(self.name, "ram+tap+chardev", ctx, {"frame_rate_per_s": FRAME_RATE,
                                                                 "tap_txqlen": TAP_TXQLEN})

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return TapTrafficTrial(spec, ctx, self)
