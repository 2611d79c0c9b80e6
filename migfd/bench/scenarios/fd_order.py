"""``fd-order``: when should the fds move? The tap-traffic VM handed over in both orders.

The question the QEMU list argued about backend-transfer against
cpr-transfer: send the fds at the switchover, with the device state (the
default, and what QEMU's reader takes), or before the stop, in cpr-transfer's
order (``x-early-fds``: the destination validates and adopts them while the
guest still runs). Same VM, same traffic, same observer; the two orders
alternate trial by trial. fd-count measures the per-fd slope in both orders.
"""

from __future__ import annotations

from typing import Any

from migfd.bench.scenario import (
    DIRTY_RATE, FD_PASSING, TRAFFIC_VM_RAM, BenchContext, Plan, Trial, TrialSpec, interleave, migration_params,
    ram_fill_supported,
)
from migfd.bench.scenarios.tap_traffic import FRAME_RATE, TapTraffic, TapTrafficTrial
from migfd.peers.tapnet import TAP_TXQLEN

#: the variants: the fds with the device state at the switchover, or during setup (x-early-fds)
AT_SWITCHOVER = "at-switchover"
EARLY = "early-fds"
ORDERS = (AT_SWITCHOVER, EARLY)


class FdOrderTrial(TapTrafficTrial):
    def params(self) -> dict[str, Any]:
        return migration_params(self.spec, self.ctx, **{"x-early-fds": self.spec.variant == EARLY})


class FdOrder(TapTraffic):
    name = "fd-order"
    description = (f"the tap-traffic VM ({TRAFFIC_VM_RAM >> 20} MiB RAM, one TAP queue, one chardev; "
                   f"{FRAME_RATE} frames/s) handed over with its fds sent at the switchover and, "
                   f"alternating, before the stop (x-early-fds, cpr-transfer's order)")

    tap_prefix = "fo"

    def plan(self, ctx: BenchContext) -> Plan:
        n = ctx.n_trials(5, 2)
        fill = ram_fill_supported()
        specs = [TrialSpec(self.name, FD_PASSING, item["trial"], variant=item["variant"], backend="ram+tap+chardev",
                           ram_bytes=TRAFFIC_VM_RAM, n_fds=3, dirty_rate_bytes_s=DIRTY_RATE, live=True,
                           options={"fill": fill})
                 for item in interleave([{}], [{"variant": v} for v in ORDERS], n)]
        return Plan(specs, {"frame_rate_per_s": FRAME_RATE, "tap_txqlen": TAP_TXQLEN, "trials": n,
                            "orders": {AT_SWITCHOVER: "fds with the device state, at the switchover (default)",
                                       EARLY: "fds during setup, adopted before the stop (x-early-fds)"},
                            "ram_fill": fill})

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return FdOrderTrial(spec, ctx, self)
