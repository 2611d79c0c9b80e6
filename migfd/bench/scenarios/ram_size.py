"""``ram-size``: one memfd of guest RAM from 64 MiB to 4 GiB, live and non-live, handed over or copied."""

from __future__ import annotations

from migfd.bench.scenario import (
    DIRTY_RATE, MODES, STATE_COPY, BenchContext, Plan, Scenario, Trial, TrialSpec, VMConfig, VMTrial,
    interleave, memory_shortfall, ram_fill_supported, ram_object, trials_for_size,
)
from migfd.units import GiB, MiB


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

    @classmethod
    def sizes(cls, ctx: BenchContext) -> list[int]:
        """The RAM sizes of this run (also those of qemu-peer)."""
        return ctx.ram_sizes or (cls.QUICK_SIZES if ctx.quick else cls.SIZES)

    @staticmethod
    def memory_needed(size: int, mode: str) -> int:
        # State copy holds the source's RAM and the destination's copy; fd-passing
        # shares one memfd. The destination's verification reads a copy of RAM.
        copies = 3 if mode == STATE_COPY else 2
        return copies * size + 1 * GiB

    def plan(self, ctx: BenchContext) -> Plan:
        fill = ram_fill_supported()
        specs: list[TrialSpec] = []
        skipped = []
        points = []
        for size in self.sizes(ctx):
            # state copy needs the most memory of the modes
            why = memory_shortfall(ctx, size, self.memory_needed(size, STATE_COPY), " for state copy")
            if why is not None:
                skipped.append({"ram_bytes": size, "reason": why})
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
