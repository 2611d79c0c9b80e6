"""The exception types migfd raises to its users.

One base class, :class:`MigrationError`, so a command line or a QMP handler can
turn any expected failure into one clear message; everything else is a bug.
"""

from __future__ import annotations


class MigrationError(Exception):
    """An expected failure of a migration, with a message meant for the user."""


class StreamError(MigrationError):
    """The peer sent a malformed migration stream.

    ``offset`` is the byte offset in the stream where the problem was found
    (counted from the first byte of the stream header), so the message can be
    checked against a hex dump of a saved stream.
    """

    def __init__(self, message: str, offset: int | None = None):
        self.reason = message
        self.offset = offset
        if offset is not None:
            message = f"{message} (at byte offset {offset})"
        super().__init__(message)


class ChannelError(MigrationError):
    """The migration channel cannot do what was asked, or broke underneath."""


class TransportError(MigrationError):
    """The migration address or transport is unusable for this migration."""
