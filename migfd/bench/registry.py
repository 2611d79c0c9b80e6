"""The one ordered list of the benchmark's scenarios: their names (CLI, results.csv) and classes.

The order is the order of a run: ``limits`` comes last because its handover
floor uses the fds and device-state bytes that the scenarios before it measured.
"""

from __future__ import annotations

from migfd.bench.scenario import Scenario
from migfd.bench.scenarios.chardev import Chardev
from migfd.bench.scenarios.dirty_rate import DirtyRate
from migfd.bench.scenarios.fd_count import FdCount
from migfd.bench.scenarios.fd_order import FdOrder
from migfd.bench.scenarios.floors import Floors
from migfd.bench.scenarios.qemu_peer import QemuPeer
from migfd.bench.scenarios.ram_size import RamSize
from migfd.bench.scenarios.tap_traffic import TapTraffic

#: every scenario by its public name, in the order a run goes through them
SCENARIOS: dict[str, type[Scenario]] = {
    cls.name: cls for cls in (RamSize, DirtyRate, FdCount, TapTraffic, FdOrder, Chardev, QemuPeer, Floors)
}
#: the names alone, in run order
SCENARIO_NAMES: tuple[str, ...] = tuple(SCENARIOS)


def scenario_names() -> tuple[str, ...]:
    """Every scenario's public name, in run order."""
    return SCENARIO_NAMES


def all_scenarios() -> list[Scenario]:
    """A fresh instance of every scenario, in run order."""
    return [cls() for cls in SCENARIOS.values()]
