"""What both directions of a migration share.

Status and stats as query-migrate shows them, migfd's own section, the base
class of source and destination, and the return-path messages.
"""

from __future__ import annotations

import enum
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from migfd.channel import QEMUFile
from migfd.devices.base import Device
from migfd.devices.memfd import PAGE, MemoryBackendMemfd
from migfd.params import MigrationParameters
from migfd.stream import Bool, UInt64, VMStateDescription, compile_vmsd
from migfd.timeline import Timeline

#: migfd's own section: when the source stopped the guest (CLOCK_MONOTONIC ns).
MIGRATION_SECTION = "migfd-migration"
MIGRATION_VMSD = VMStateDescription("migfd-migration", version_id=1, minimum_version_id=1,
                                    fields=(UInt64("stop_ns"), Bool("running")))
#: migfd's return-path message after the destination resumed: be64 CLOCK_MONOTONIC ns.
RP_RESUMED = 0x4D46


class MigrationStatus(str, enum.Enum):
    """QEMU's MigrationStatus values, as query-migrate and MIGRATION events spell them."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"  #: guest stopped, final state being sent
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


#: the statuses after which a migration changes no more
TERMINAL = (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED)


@dataclass
class MigrationStats:
    """Everything query-migrate reports, in ns internally."""

    status: MigrationStatus = MigrationStatus.NONE
    start_ns: int = 0
    setup_done_ns: int = 0
    end_ns: int = 0
    stop_ns: int = 0
    resume_ns: int = 0
    ram_total: int = 0
    ram_transferred: int = 0
    ram_remaining: int = 0
    duplicate_pages: int = 0
    normal_pages: int = 0
    iterations: int = 0
    expected_downtime_ms: int = 0
    fds_passed: int = 0
    #: of those, the fds that went before the stop (x-early-fds)
    early_fds: int = 0
    fd_messages: int = 0
    bytes_sent: int = 0
    device_state_bytes: int = 0
    committed: bool = False
    #: CPU time of the migration thread (CLOCK_THREAD_CPUTIME_ID), set when it ends
    cpu_ns: int = 0
    #: source: time its release of the backends took, after the migration ended (not in total-time)
    release_ns: int = 0
    #: connections to the incoming socket refused because of their peer's uid
    refused_connections: int = 0
    error: str | None = None

    @property
    def downtime_ns(self) -> int | None:
        if self.stop_ns and self.resume_ns:
            return self.resume_ns - self.stop_ns
        return None

    def to_qmp(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status.value}
        if self.status is MigrationStatus.NONE:
            return out
        now = self.end_ns or time.monotonic_ns()
        out["total-time"] = (now - self.start_ns) // 1_000_000
        if self.setup_done_ns:
            out["setup-time"] = (self.setup_done_ns - self.start_ns) // 1_000_000
        if self.status is MigrationStatus.ACTIVE:
            out["expected-downtime"] = self.expected_downtime_ms
        downtime = self.downtime_ns
        if downtime is not None:
            out["downtime"] = downtime // 1_000_000
            out["x-downtime-us"] = downtime // 1_000
            out["x-downtime-ns"] = downtime
        out["ram"] = {
            "transferred": self.ram_transferred, "remaining": self.ram_remaining,
            "total": self.ram_total, "duplicate": self.duplicate_pages,
            "normal": self.normal_pages, "normal-bytes": self.normal_pages * PAGE,
            "dirty-sync-count": self.iterations, "page-size": PAGE,
        }
        out["x-fds-passed"] = self.fds_passed
        if self.early_fds:
            out["x-early-fds-passed"] = self.early_fds
        out["x-fd-messages"] = self.fd_messages
        out["x-bytes-sent"] = self.bytes_sent
        out["x-device-state-bytes"] = self.device_state_bytes
        out["x-committed"] = self.committed
        if self.refused_connections:
            out["x-refused-connections"] = self.refused_connections
        out["x-total-time-ns"] = now - self.start_ns
        if self.setup_done_ns:
            out["x-setup-time-ns"] = self.setup_done_ns - self.start_ns
        if self.cpu_ns:
            out["x-cpu-time-ns"] = self.cpu_ns
        if self.release_ns:
            out["x-release-time-ns"] = self.release_ns
        if self.error:
            out["error-desc"] = self.error
        return out


class MigrationHost(Protocol):
    """What a migration needs of its VM (implemented by :class:`migfd.vm.VM`)."""

    machine: str
    devices: list[Device]

    def vm_stop(self, runstate: str) -> int: ...  # returns the stop time, ns

    def vm_start(self, paused: bool = False, before_run: Callable[[], None] | None = None) -> int: ...  # resume time, ns

    @property
    def running(self) -> bool: ...

    @property
    def stopped_at_ns(self) -> int: ...

    def set_runstate(self, runstate: str) -> None: ...

    def hold_events(self) -> None: ...  # QMP events wait (with their time) ...

    def release_events(self) -> None: ...  # ... until the switchover is over


class MigrationBase:
    """What both directions share: status changes with events, the stats."""

    def __init__(self, vm: MigrationHost, params: MigrationParameters,
                 on_status: Callable[[MigrationStatus], None]):
        self.vm = vm
        self.params = params
        self.stats = MigrationStats()
        #: this side's phases (see migfd.timeline), reported by query-migrate once finished
        self.timeline = Timeline()
        self._on_status = on_status
        self.thread: threading.Thread | None = None
        self.finished = threading.Event()
        #: called with each phase name (see migfd.faults); does nothing unless a fault is armed
        self.hook: Callable[[str], None] = lambda phase: None
        # Every section this migration saves or loads, compiled now: in a fresh
        # process the first use would otherwise compile inside the downtime.
        for vmsd in [d.vmsd for d in vm.devices] + [MIGRATION_VMSD]:
            compile_vmsd(vmsd)

    def set_status(self, status: MigrationStatus) -> None:
        if status in TERMINAL:
            # the timeline is complete before query-migrate can show the status
            if not self.stats.end_ns:  # a completed source ended before its release
                self.stats.end_ns = time.monotonic_ns()
            if threading.current_thread() is self.thread:
                self.stats.cpu_ns = time.thread_time_ns()
            self.stats.status = status
            self._on_status(status)
            return
        start = time.monotonic_ns()
        self.stats.status = status
        self._on_status(status)  # the MIGRATION event: its cost is part of the timeline
        self.timeline.add(f"status:{status.value}", start, time.monotonic_ns())

    def query(self) -> dict[str, Any]:
        """query-migrate: the stats, and the timeline once the migration has ended."""
        out = self.stats.to_qmp()
        if self.stats.status in TERMINAL:
            out["x-timeline"] = self.timeline.to_qmp()
            if self.timeline.dropped:
                out["x-timeline-dropped"] = self.timeline.dropped
        return out

    @property
    def timeout_s(self) -> float:
        return self.params.x_channel_timeout_ms / 1000

    def ram_devices(self) -> list[MemoryBackendMemfd]:
        return [d for d in self.vm.devices if isinstance(d, MemoryBackendMemfd)]


def write_rp(f: QEMUFile, kind: int, payload: bytes = b"") -> None:
    """Send one return-path message: be16 type, be16 length, the payload."""
    f.put_buffer(struct.pack(">HH", kind, len(payload)) + payload)
    f.flush()


def read_rp(f: QEMUFile) -> tuple[int, bytes]:
    """Receive one return-path message: (type, payload)."""
    kind = f.get_be16()
    length = f.get_be16()
    return kind, f.get_buffer(length)
