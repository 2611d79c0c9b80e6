"""One migration between two ``migfd vm`` processes, driven over QMP as a management layer would."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from qemu.qmp import EventListener

from migfd.peers.process import TERMINAL, VMProcess


@dataclass
class MigrationResult:
    """What both sides reported for one migration."""

    source: dict
    destination: dict
    wall_ns: int

    @property
    def ok(self) -> bool:
        return self.source.get("status") == "completed" and self.destination.get("status") == "completed"

    @property
    def error(self) -> str | None:
        return self.source.get("error-desc") or self.destination.get("error-desc")


#: how often the source is asked while its MIGRATION events say nothing
SLOW_POLL_S = 0.05


async def migrate(src: VMProcess, dst: VMProcess, uri: str, params: dict[str, Any] | None = None,
                  *, timeout_s: float = 300.0) -> MigrationResult:
    """Set ``params`` on both sides, migrate-incoming, migrate, wait for both to finish."""
    params = params or {}
    for vm in (src, dst):
        if params:
            await vm.execute("migrate-set-parameters", params)
    await dst.execute("migrate-incoming", {"uri": uri})
    assert src.qmp is not None
    events = EventListener("MIGRATION")
    src.qmp.register_listener(events)
    try:
        t0 = time.monotonic_ns()
        await src.execute("migrate", {"uri": uri})
        source = await _finished(src, events, timeout_s)
    finally:
        src.qmp.remove_listener(events)
    if source.get("status") == "completed":
        destination = await dst.wait_migration(timeout_s)
    else:
        destination = await dst.execute("query-migrate")
    return MigrationResult(source, destination, time.monotonic_ns() - t0)


async def _finished(vm: VMProcess, events: EventListener, timeout_s: float) -> dict:
    """query-migrate once the migration ended: told by its MIGRATION event, else by a slow poll.

    A management layer polling fast would wake the VM's monitor thread
    during the switchover and compete with the migration for the CPU.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            event = await asyncio.wait_for(events.get(), SLOW_POLL_S)
            if event["data"].get("status") not in TERMINAL:
                continue
        except asyncio.TimeoutError:
            pass
        info = await vm.execute("query-migrate")
        if info.get("status") in TERMINAL:
            return info
    return await vm.wait_migration(0)
