"""One migration between two ``migfd vm`` processes, driven over QMP as a management layer would."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from migfd.peers.process import VMProcess


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


async def migrate(src: VMProcess, dst: VMProcess, uri: str, params: dict[str, Any] | None = None,
                  *, timeout_s: float = 300.0) -> MigrationResult:
    """Set ``params`` on both sides, migrate-incoming, migrate, wait for both to finish."""
    params = params or {}
    for vm in (src, dst):
        if params:
            await vm.execute("migrate-set-parameters", params)
    await dst.execute("migrate-incoming", {"uri": uri})
    t0 = time.monotonic_ns()
    await src.execute("migrate", {"uri": uri})
    source = await src.wait_migration(timeout_s)
    if source.get("status") == "completed":
        destination = await dst.wait_migration(timeout_s)
    else:
        destination = await dst.execute("query-migrate")
    return MigrationResult(source, destination, time.monotonic_ns() - t0)
