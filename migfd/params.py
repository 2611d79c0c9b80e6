"""Migration parameters and capabilities, named and typed as QMP names them.

``backend-transfer`` is the fd-passing switch argued on qemu-devel in October
2025 (QEMU later queued the same feature as the ``local`` parameter): devices
that can hand their backend over send its fds instead of their state.

``x-fds-per-message`` above QEMU's 16 lets batched fd records share a sendmsg
up to the kernel's limit. Only a migfd destination reads such a message
(QEMU's reader would drop the fds past 16), so the source lists it as a
capability in the configuration section, which a QEMU destination refuses as
unknown and a migfd destination accepts only if it set the parameter above
16 too: the migration fails there, before the first fd is sent.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from migfd.errors import MigrationError
from migfd.fds import MAX_FDS_PER_MESSAGE, SCM_MAX_FD
from migfd.stream.constants import X_MULTIFD_PACKETS
from migfd.units import MiB

#: SCHED_FIFO priority of a migration thread inside the switchover with
#: x-switchover-realtime: below the observers' (migfd.peers.observe, 10), which
#: must see the guest whatever the migration does
SWITCHOVER_RT_PRIORITY = 5
#: QEMU's defaults: 300 ms downtime-limit, 128 MiB/s max-bandwidth.
DEFAULT_DOWNTIME_LIMIT_MS = 300
DEFAULT_MAX_BANDWIDTH = 128 * MiB


@dataclass(frozen=True)
class MigrationParameters:
    """What ``migrate-set-parameters`` sets; field names are the QMP names with _."""

    #: hand backends over as open fds (needs a UNIX domain socket)
    backend_transfer: bool = False
    #: the longest pause the guest may see, in ms, as QEMU's downtime-limit
    downtime_limit: int = DEFAULT_DOWNTIME_LIMIT_MS
    #: bytes per second the precopy may use
    max_bandwidth: int = DEFAULT_MAX_BANDWIDTH
    #: precopy iterations before the source stops the guest regardless
    x_max_iterations: int = 30
    #: fd records ride in the sendmsg of the bytes around them (at most 16 fds a
    #: message) instead of one sendmsg each; QEMU's reader takes both
    x_batch_fds: bool = True
    #: batched, fds a sendmsg carries at most: QEMU's reader takes 16, a migfd
    #: destination with this parameter above 16 up to SCM_MAX_FD (capability below)
    x_fds_per_message: int = MAX_FDS_PER_MESSAGE
    #: a state copy sends RAM as multifd-style packets (a header of page offsets,
    #: then the pages: migfd.stream.multifd), received straight into guest RAM;
    #: migfd only (QEMU cannot read them), so both sides must set it
    x_multifd_packets: bool = False
    #: bound on every blocking read or write of the migration channel, in ms
    x_channel_timeout_ms: int = 30_000
    #: the migration thread runs under SCHED_FIFO (at SWITCHOVER_RT_PRIORITY, below the
    #: outside observers') from the stop to the resume on each side, where allowed
    x_switchover_realtime: bool = False
    #: with backend-transfer, the fds travel (and the destination validates and
    #: adopts them) during setup, before the guest stops, as cpr-transfer orders
    #: it; the switchover then carries only the state beside them. migfd only:
    #: QEMU's destination does not know the early sections
    x_early_fds: bool = False

    def to_qmp(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def updated(self, qmp_args: dict[str, Any]) -> "MigrationParameters":
        """A copy with the QMP arguments applied; wrong names or types are errors."""
        types = {f.name: f.type for f in fields(self)}
        changes: dict[str, Any] = {}
        for key, value in qmp_args.items():
            name = key.replace("-", "_")
            if name not in types:
                raise MigrationError(f"Parameter '{key}' is unexpected")
            want = bool if types[name] in (bool, "bool") else int
            if want is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise MigrationError(f"Parameter '{key}' expects an integer")
            if want is bool and not isinstance(value, bool):
                raise MigrationError(f"Parameter '{key}' expects a boolean")
            if name in _RANGES and not _RANGES[name][0] <= value <= _RANGES[name][1]:
                raise MigrationError(f"Parameter '{key}' expects a value between {_RANGES[name][0]} "
                                     f"and {_RANGES[name][1]}")
            if want is int and value < 0:
                raise MigrationError(f"Parameter '{key}' expects a non-negative value")
            changes[name] = value
        return replace(self, **changes)

    @property
    def large_fd_batches(self) -> bool:
        """True when batched fd records may share a sendmsg beyond what QEMU's reader takes."""
        return self.x_fds_per_message > MAX_FDS_PER_MESSAGE

    def capabilities(self) -> tuple[str, ...]:
        """Capabilities the configuration section lists, so a peer can check them.

        Without backend-transfer no fd moves: nothing about fds to agree on. A
        source that sends one fd a message, or 16 at most, lists no
        x-fds-per-message: its stream stays readable by QEMU. x-multifd-packets
        is about the RAM a state copy sends, with or without backend-transfer.
        """
        caps = []
        if self.backend_transfer:
            caps.append("backend-transfer")
            if self.x_early_fds:
                caps.append("x-early-fds")
            if self.x_batch_fds and self.large_fd_batches:
                caps.append(FDS_PER_MESSAGE_CAPABILITY)
        if self.x_multifd_packets:
            caps.append(X_MULTIFD_PACKETS)
        return tuple(caps)


#: Integer parameters with a range beyond "not negative": (lowest, highest).
_RANGES = {"x_fds_per_message": (1, SCM_MAX_FD)}

#: Capabilities whose setting must agree on both sides.
VALIDATED_CAPABILITIES = ("backend-transfer", "x-early-fds", X_MULTIFD_PACKETS)
#: Listed by a source whose fd messages may carry more than QEMU's 16 fds; a
#: destination takes it only with its own x-fds-per-message above 16 (one way:
#: a destination that allows large batches reads small ones as well).
FDS_PER_MESSAGE_CAPABILITY = "x-fds-per-message"


def check_capabilities(local: MigrationParameters, received: tuple[str, ...]) -> None:
    """The destination's check of the source's configuration/capabilities list."""
    mine = set(local.capabilities())
    theirs = set(received)
    for cap in VALIDATED_CAPABILITIES:
        if (cap in mine) != (cap in theirs):
            raise MigrationError(
                f"Capability '{cap}' is {'on' if cap in theirs else 'off'} on the source "
                f"but {'on' if cap in mine else 'off'} on the destination")
    if FDS_PER_MESSAGE_CAPABILITY in theirs and not local.large_fd_batches:
        raise MigrationError(
            f"Capability '{FDS_PER_MESSAGE_CAPABILITY}' is on on the source (more than "
            f"{MAX_FDS_PER_MESSAGE} fds in one message) but off on the destination "
            f"(x-fds-per-message {local.x_fds_per_message})")
    unknown = sorted(theirs - {*VALIDATED_CAPABILITIES, FDS_PER_MESSAGE_CAPABILITY})
    if unknown:
        raise MigrationError(f"Capability '{unknown[0]}' of the source is unknown to the destination")
