"""``fd-order``: when should the fds move? The tap-traffic VM handed over in both orders.

The question the QEMU list argued about backend-transfer against
cpr-transfer: send the fds at the switchover, with the device state (the
default, and what QEMU's reader takes), or before the stop, in cpr-transfer's
order (``x-early-fds``: the destination validates and adopts them while the
guest still runs). The tap-traffic VM (RAM, one TAP queue, one chardev) under
the same frames, at two RAM sizes (adopting the memfd, mapping it and pointing
the KVM slots at it, grows with RAM); the two orders alternate trial by trial.
fd-count measures the per-fd slope in both orders.
"""

from __future__ import annotations

from typing import Any

from migfd.bench.scenario import (
    DIRTY_RATE, FD_PASSING, BenchContext, Plan, Trial, TrialSpec, interleave, memory_shortfall, migration_params,
    ram_fill_supported,
)
from migfd.bench.scenarios.tap_traffic import FRAME_RATE, TapTraffic, TapTrafficTrial
from migfd.peers.tapnet import TAP_TXQLEN
from migfd.units import GiB, MiB

#: the variants: the fds with the device state at the switchover, or during setup (x-early-fds)
AT_SWITCHOVER = "at-switchover"
EARLY = "early-fds"
ORDERS = (AT_SWITCHOVER, EARLY)


class FdOrderTrial(TapTrafficTrial):
    def params(self) -> dict[str, Any]:
        return migration_params(self.spec, self.ctx, **{"x-early-fds": self.spec.variant == EARLY})


class FdOrder(TapTraffic):
    name = "fd-order"
    description = (f"the tap-traffic VM (RAM, one TAP queue, one chardev; {FRAME_RATE} frames/s) at two RAM "
                   f"sizes, handed over with its fds sent at the switchover and, alternating, before the stop "
                   f"(x-early-fds, cpr-transfer's order)")

    SIZES = (64 * MiB, 1 * GiB)
    QUICK_SIZES = (64 * MiB, 256 * MiB)

    tap_prefix = "fo"

    def plan(self, ctx: BenchContext) -> Plan:
        n = ctx.n_trials(5, 2)
        fill = ram_fill_supported()
        specs, points, skipped = [], [], []
        for size in self.QUICK_SIZES if ctx.quick else self.SIZES:
            # one memfd, shared; the destination's verification reads a copy of it
            why = memory_shortfall(ctx, size, 2 * size + 1 * GiB)
            if why is not None:
                skipped.append({"ram_bytes": size, "reason": why})
                continue
            points.append({"ram_bytes": size, "trials": n})
            specs += [TrialSpec(self.name, FD_PASSING, item["trial"], variant=item["variant"],
                                backend="ram+tap+chardev", ram_bytes=size, n_fds=3, dirty_rate_bytes_s=DIRTY_RATE,
                                live=True, options={"fill": fill})
                      for item in interleave([{}], [{"variant": v} for v in ORDERS], n)]
        return Plan(specs, {"frame_rate_per_s": FRAME_RATE, "tap_txqlen": TAP_TXQLEN, "points": points,
                            "skipped_points": skipped,
                            "orders": {AT_SWITCHOVER: "fds with the device state, at the switchover (default)",
                                       EARLY: "fds during setup, adopted before the stop (x-early-fds)"},
                            "ram_fill": fill})

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return FdOrderTrial(spec, ctx, self)
