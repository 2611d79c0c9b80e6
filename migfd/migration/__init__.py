"""Source and destination of one migration: precopy, switchover, the commit point.

Theory of operation
-------------------
Source (:class:`OutgoingMigration`, one thread): setup (connect, header,
configuration with capabilities, OPEN_RETURN_PATH, RAM START listing the
blocks whose pages travel, and a PING the destination answers once it has
read all that and allocated the RAM it receives: a migration with nothing to
precopy stops at once, and the destination's start must not be its
downtime), then precopy iterations of dirty pages while the guest runs,
until what remains fits downtime-limit at the measured bandwidth.
Then the guest stops, and the final stage sends SWITCHOVER_START, the last
dirty pages, every device section (a device handing its backend over puts
its fds in the stream, a device copying state lets go of its backend first),
and a PING.

The commit point is the PONG to the PING after the device sections. The
destination answers it only after it has loaded and validated every section,
without running anything. Before the
PONG the source owns every backend: any failure or cancel closes the channel,
re-attaches what it let go of and resumes the guest, and the destination
closes everything it received. After the PONG the destination owns them: the
source sends EOF (the destination's signal to run the guest) and releases its
copies, and never resumes. At no moment do both run the guest.

Downtime is CLOCK_MONOTONIC from the source's stop (sent in the stream) to the
destination's resume (sent back on the return path); both processes read the
same clock, so both sides report the same number.
"""

from migfd.migration.base import (
    MIGRATION_SECTION,
    MIGRATION_VMSD,
    MigrationHost,
    MigrationStats,
    MigrationStatus,
)
from migfd.migration.incoming import IncomingMigration
from migfd.migration.outgoing import OutgoingMigration

__all__ = ["MIGRATION_SECTION", "MIGRATION_VMSD", "IncomingMigration", "MigrationHost",
           "MigrationStats", "MigrationStatus", "OutgoingMigration"]
