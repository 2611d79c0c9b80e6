"""Migration parameters and capabilities, named and typed as QMP names them.

``backend-transfer`` is the fd-passing switch argued on qemu-devel in October
2025 (QEMU later queued the same feature as the ``local`` parameter): devices
that can hand their backend over send its fds instead of their state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from migfd.errors import MigrationError
from migfd.stream.constants import X_MULTIFD_PACKETS
from migfd.units import MiB

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
    #: a state copy sends RAM as multifd-style packets (a header of page offsets,
    #: then the pages: migfd.stream.multifd), received straight into guest RAM;
    #: migfd only (QEMU cannot read them), so both sides must set it
    x_multifd_packets: bool = False
    #: bound on every blocking read or write of the migration channel, in ms
    x_channel_timeout_ms: int = 30_000

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
            if want is int and value < 0:
                raise MigrationError(f"Parameter '{key}' expects a non-negative value")
            changes[name] = value
        return replace(self, **changes)

    def capabilities(self) -> tuple[str, ...]:
        """Capabilities the configuration section lists, so a peer can check them."""
        return (("backend-transfer",) if self.backend_transfer else ()) + (
            (X_MULTIFD_PACKETS,) if self.x_multifd_packets else ())


#: Capabilities whose setting must agree on both sides.
VALIDATED_CAPABILITIES = ("backend-transfer", X_MULTIFD_PACKETS)


def check_capabilities(local: MigrationParameters, received: tuple[str, ...]) -> None:
    """The destination's check of the source's configuration/capabilities list."""
    mine = set(local.capabilities())
    theirs = set(received)
    for cap in VALIDATED_CAPABILITIES:
        if (cap in mine) != (cap in theirs):
            raise MigrationError(
                f"Capability '{cap}' is {'on' if cap in theirs else 'off'} on the source "
                f"but {'on' if cap in mine else 'off'} on the destination")
    unknown = sorted(theirs - set(VALIDATED_CAPABILITIES))
    if unknown:
        raise MigrationError(f"Capability '{unknown[0]}' of the source is unknown to the destination")
