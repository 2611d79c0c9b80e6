"""One live demo migration between two ``migfd vm`` processes, as the protocol tour shows it.

The VM has memfd RAM and a socket chardev with a client sending numbered
lines through the migration; :func:`demo_migration` returns what both sides
and the client saw, raw (:func:`migfd.results.tour.demo_table` lays it out).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from migfd.peers.chardev import ChardevClient, ChardevReport
from migfd.peers.migrate import MigrationResult, migrate
from migfd.peers.process import VMProcess

#: How long the chardev client keeps sending after the migration, to notice (or not) the switchover.
SETTLE_S = 0.3


@dataclass(frozen=True)
class DemoMigration:
    """What one demo migration showed."""

    backend_transfer: bool
    #: both sides' query-migrate at the end
    migration: MigrationResult
    #: query-status of the source and of the destination afterwards
    run_state: tuple[str, str]
    #: the destination's x-query-guest ram-verify of ram0; {} if the migration failed
    ram_verify: dict
    #: what the chardev client saw
    chardev: ChardevReport


async def demo_migration(workdir: str | os.PathLike, *, backend_transfer: bool, ram: str = "64M",
                         dirty_rate_bytes_s: int = 8 << 20) -> DemoMigration:
    """One real migration between two ``migfd vm`` processes over QMP, with or without backend-transfer."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    t = "on" if backend_transfer else "off"
    chardev_path = workdir / "ch0.sock"
    devices = dict(objects=(f"memory-backend-memfd,id=ram0,size={ram},backend-transfer={t}",),
                   chardevs=(f"socket,id=ch0,path={chardev_path},server=on,backend-transfer={t}",),
                   dirty_rate_bytes_s=dirty_rate_bytes_s)
    src = VMProcess("src", workdir, **devices)
    dst = VMProcess("dst", workdir, incoming="defer", **devices)
    client = None
    try:
        await src.start()
        await dst.start()
        client = ChardevClient(str(chardev_path), rate_per_s=500)
        client.start()
        client.wait_echoes(10, timeout_s=5)
        result = await migrate(src, dst, f"unix:{workdir / 'mig.sock'}", {"backend-transfer": backend_transfer})
        await asyncio.sleep(SETTLE_S)
        seen = client.stop()
        client = None
        guest = await dst.execute("x-query-guest", {"verify": True}) if result.ok else {}
        states = ((await src.execute("query-status"))["status"], (await dst.execute("query-status"))["status"])
        return DemoMigration(backend_transfer, result, states, guest.get("ram-verify", {}).get("ram0", {}), seen)
    finally:
        if client is not None:
            client.stop(0)
        await src.quit()
        await dst.quit()
