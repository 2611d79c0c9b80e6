"""``chardev``: a VM with one socket chardev; a connected client sends numbered lines through the migration."""

from __future__ import annotations

import asyncio
from typing import Any

from migfd.bench.scenario import (
    DIRTY_RATE, TRAFFIC_DRAIN_S, TRAFFIC_LEAD_S, TRAFFIC_TAIL_S, TRAFFIC_VM_RAM, BenchContext, Plan,
    Scenario, Traffic, Trial, TrialSpec, VMConfig, VMTrial, ram_object, traffic_plan,
)
from migfd.peers.chardev import ChardevClientProcess
from migfd.peers.migrate import MigrationResult

#: lines per second: one every 250 µs, the resolution of the client's switchover silence
CHARDEV_LINE_RATE = 4_000


class ChardevTrial(VMTrial):
    """RAM and one socket chardev; a connected client sends numbered lines through the migration."""

    def __init__(self, spec: TrialSpec, ctx: BenchContext):
        super().__init__(spec, ctx)
        self.client: ChardevClientProcess | None = None

    def config(self) -> VMConfig:
        return VMConfig(objects=(ram_object(TRAFFIC_VM_RAM, self.spec.options["fill"]),),
                        chardevs=(f"socket,id=ch0,path={self.workdir}/ch0.sock,server=on,backend-transfer=on",),
                        dirty_rate_bytes_s=DIRTY_RATE, expected_fds=3)

    async def measure(self) -> Traffic:
        loop = asyncio.get_running_loop()
        # In a process of its own: its echo times must not wait for this process's GIL
        # while it takes the migration's events and replies.
        self.client = ChardevClientProcess(f"{self.workdir}/ch0.sock", rate_per_s=CHARDEV_LINE_RATE)
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
                "reconnects": report.reconnects, "max_gap_ns": report.max_gap_ns,
                **self.echo_fields(measured.result, report.arrivals_ns, report.own_gaps)}

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
        return traffic_plan(self.name, "ram+chardev", ctx, {"line_rate_per_s": CHARDEV_LINE_RATE})

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return ChardevTrial(spec, ctx)
