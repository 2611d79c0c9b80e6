"""``dirty-rate``: live migrations while the guest dirties RAM at real rates, from none to the most the dirty log sustains.

The guest writes its pages at the rate asked (``migfd vm --dirty-rate``): on
KVM the vCPU's own stores, found by precopy through KVM's dirty log, where each
page written again after a sync costs a write-protect fault, so the log itself
caps the rate (``max`` asks for far more than that and gets what the machine
gives). Each trial measures the rate it really got while the migration ran,
from the guest's own count of stamped pages, which migrates with its RAM:
read on the source before ``migrate`` and on the destination after it, over
the time the guest ran in between (``value``, in ``bytes/s``: pages x 4 KiB;
the dirty log is on only then, and only for state copy), and migrates live: fd-passing, which copies no RAM and does not
care, and state copy, whose precopy must catch up with the guest; state copy
at the highest rate runs once more with ``downtime-limit`` raised to
:data:`RAISED_DOWNTIME_LIMIT_MS` (variant ``limit-<ms>``), to show what a
larger allowed downtime buys.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from migfd.bench.scenario import (
    MODES, STATE_COPY, BenchContext, Plan, Scenario, Trial, TrialSpec, VMConfig, VMTrial,
    interleave, migration_params, ram_fill_supported, ram_object,
)
from migfd.layout import PAGE_BYTES
from migfd.peers.migrate import MigrationResult
from migfd.units import MiB

#: guest RAM of every trial (quick: the smaller)
RAM = 256 * MiB
QUICK_RAM = 64 * MiB
#: the rates asked for (bytes/s); "max" asks for this much, far beyond what the dirty log sustains here
RATES = {"0": 0, "32M": 32 * MiB, "128M": 128 * MiB, "max": 64 << 30}
#: downtime-limit of the extra state-copy trials at the highest rate
RAISED_DOWNTIME_LIMIT_MS = 3000
#: the guest runs this long before the migration (off the clock)
RATE_WINDOW_S = 0.3


class DirtyRateTrial(VMTrial):
    def config(self) -> VMConfig:
        return VMConfig(objects=(ram_object(self.spec.ram_bytes, self.spec.options["fill"]),),
                        dirty_rate_bytes_s=self.spec.options["asked"], expected_fds=1)

    def params(self) -> dict[str, Any]:
        extra = {}
        if "-limit-" in self.spec.variant:
            extra["downtime-limit"] = RAISED_DOWNTIME_LIMIT_MS
        return migration_params(self.spec, self.ctx, **extra)

    async def measure(self) -> tuple[MigrationResult, float | None]:
        assert self.src is not None and self.dst is not None
        await asyncio.sleep(RATE_WINDOW_S)
        first, t0 = await self._stamped(self.src), time.monotonic_ns()
        result = await self.migrate()
        # The count lives in guest RAM and migrates with it: the destination has it now
        # (the source let its RAM go), a few ms of running there included.
        last, t1 = await self._stamped(self.dst), time.monotonic_ns()
        achieved = None
        ran_ns = t1 - t0 - (result.source.get("x-downtime-ns") or 0)
        if first is not None and last is not None and last >= first and ran_ns > 0:
            achieved = (last - first) * PAGE_BYTES / (ran_ns / 1e9)
        return result, achieved

    async def _stamped(self, vm) -> int | None:
        devices = (await vm.execute("x-query-guest")).get("devices") or []
        counts = [d.get("pages-dirtied") for d in devices if "pages-dirtied" in d]
        return int(sum(counts)) if counts else None

    def result_of(self, measured) -> MigrationResult:
        return measured[0]

    def traffic_fields(self, measured) -> dict[str, Any]:
        _, achieved = measured
        return {"value": achieved, "unit": "bytes/s"} if achieved is not None else {}


class DirtyRate(Scenario):
    name = "dirty-rate"
    description = ("live migrations of 256 MiB while the guest dirties RAM at 0, 32 MiB/s, 128 MiB/s and the "
                   "most the dirty log sustains; state copy once more at that rate with downtime-limit "
                   f"{RAISED_DOWNTIME_LIMIT_MS} ms")

    def plan(self, ctx: BenchContext) -> Plan:
        size = QUICK_RAM if ctx.quick else RAM
        n = ctx.n_trials(3, 2)
        fill = ram_fill_supported()
        specs: list[TrialSpec] = []
        for label, asked in RATES.items():
            modes = [{"mode": m, "variant": f"rate-{label}"} for m in MODES]
            if label == "max":
                modes.append({"mode": STATE_COPY, "variant": f"rate-{label}-limit-{RAISED_DOWNTIME_LIMIT_MS}"})
            for item in interleave([{}], modes, n):
                specs.append(TrialSpec(self.name, item["mode"], item["trial"], variant=item["variant"],
                                       backend="ram", ram_bytes=size, n_fds=1,
                                       dirty_rate_bytes_s=asked, live=True,
                                       options={"fill": fill, "asked": asked}))
        return Plan(specs, {"ram_bytes": size, "trials": n, "rates_asked": RATES, "ram_fill": fill,
                            "raised_downtime_limit_ms": RAISED_DOWNTIME_LIMIT_MS,
                            "achieved": "value (bytes/s): the guest's stamped pages x 4 KiB, source "
                                        "before migrate to destination after it, over the time it ran"})

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return DirtyRateTrial(spec, ctx)

