"""``fd-count``: 1 to 256 handed-over fds (TAP queues or chardev sockets), fd records batched or not.

``batched`` is the default configuration (16 fds a sendmsg, what QEMU's reader
takes); ``batched-253`` the kernel's limit, which only a migfd destination
reads (x-fds-per-message on both sides); ``unbatched`` one fd a sendmsg; the
early variant batched as the default, but before the stop (x-early-fds).
"""

from __future__ import annotations

from typing import Any

from migfd.bench.scenario import (
    FD_PASSING, STATE_COPY, BenchContext, Plan, TapScenario, Trial, TrialSpec, VMConfig, VMTrial,
    interleave, migration_params, tap_available,
)
from migfd.bench.scenarios.fd_order import EARLY
from migfd.fds import SCM_MAX_FD

#: fd-passing variant -> the fd parameters it sets on both VMs
VARIANT_PARAMS: dict[str, dict[str, Any]] = {
    "batched": {"x-batch-fds": True},
    f"batched-{SCM_MAX_FD}": {"x-batch-fds": True, "x-fds-per-message": SCM_MAX_FD},
    "unbatched": {"x-batch-fds": False},
    EARLY: {"x-batch-fds": True, "x-early-fds": True},
}


class FdCountTrial(VMTrial):
    def __init__(self, spec: TrialSpec, ctx: BenchContext, scenario: "FdCount"):
        super().__init__(spec, ctx)
        self.scenario = scenario
        self.ifname: str | None = None

    async def before_start(self) -> None:
        if self.spec.backend == "tap":
            self.ifname = self.scenario.new_tap(queues=self.spec.n_fds or 1)

    def config(self) -> VMConfig:
        n = self.spec.n_fds or 1
        if self.spec.backend == "tap":
            return VMConfig(netdevs=(f"tap,id=net0,ifname={self.ifname},queues={n},backend-transfer=on",),
                            netns=self.scenario.netns, expected_fds=n)
        chardevs = tuple(f"socket,id=ch{i},path={self.workdir}/ch{i}.sock,server=on,backend-transfer=on"
                         for i in range(n))
        return VMConfig(chardevs=chardevs, expected_fds=n)

    def params(self) -> dict[str, Any]:
        return migration_params(self.spec, self.ctx, **VARIANT_PARAMS.get(self.spec.variant, {}))

    async def after_cleanup(self) -> None:
        self.scenario.remove_tap(self.ifname)


class FdCount(TapScenario):
    name = "fd-count"
    description = ("1 to 256 handed-over fds (queues of a multi-queue TAP as root, listening "
                   "chardev sockets otherwise), fd records batched (up to 16 per sendmsg, and up "
                   f"to {SCM_MAX_FD} between two migfd VMs), unbatched, and batched before the stop "
                   "(x-early-fds); state copy of the same VM for comparison")

    COUNTS = [1, 4, 16, 64, 256]
    QUICK_COUNTS = [1, 16, 256]

    tap_prefix = "fdc"

    def __init__(self) -> None:
        super().__init__()
        self.backend = ""

    def uses_tap(self) -> bool:
        return self.backend == "tap"

    def plan(self, ctx: BenchContext) -> Plan:
        self.backend = "tap" if tap_available() is None else "socket"
        counts = self.QUICK_COUNTS if ctx.quick else self.COUNTS
        n = ctx.n_trials(4, 2)
        modes = [{"mode": FD_PASSING, "variant": "batched"}, {"mode": STATE_COPY, "variant": ""},
                 {"mode": FD_PASSING, "variant": "unbatched"}, {"mode": FD_PASSING, "variant": EARLY},
                 {"mode": FD_PASSING, "variant": f"batched-{SCM_MAX_FD}"}]
        specs = [TrialSpec(self.name, item["mode"], item["trial"], variant=item["variant"],
                           backend=self.backend, ram_bytes=0, n_fds=item["n"], dirty_rate_bytes_s=0,
                           live=True)
                 for item in interleave([{"n": c} for c in counts], modes, n)]
        why = tap_available()
        return Plan(specs, {"points": [{"n_fds": c, "trials": n} for c in counts],
                            "fd_kind": "multi-queue TAP queues" if self.backend == "tap"
                            else f"listening chardev sockets (TAP: {why})",
                            "outage": "not measured: these VMs have no guest RAM for the observer to watch"})

    def trial(self, spec: TrialSpec, ctx: BenchContext) -> Trial:
        return FdCountTrial(spec, ctx, self)
