"""The exception types migfd raises to its users.

One base class, :class:`MigrationError`, so a command line or a QMP handler can
turn any expected failure into one clear message; everything else is a bug.
:class:`QMPError` stands apart: it is the error reply of one QMP command.
"""

from __future__ import annotations

from typing import overload


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
    """The migration channel cannot do what was asked, or broke underneath.

    Raised as such when the request itself cannot be met (a channel without
    fd passing asked for an fd, a file that cannot be opened, a service byte
    that is not 0x20); the two subclasses say why a working channel stopped.
    """


class ChannelClosedError(ChannelError):
    """This side closed the channel and then used it (trio's ClosedResourceError)."""


class ChannelBrokenError(ChannelError):
    """The channel broke from outside (trio's BrokenResourceError).

    The peer closed it in the middle of a record, reset it (ECONNRESET, EPIPE),
    went silent past the timeout, or the kernel refused the I/O. The OSError,
    where there is one, is the ``__cause__``.
    """


class TransportError(MigrationError):
    """The migration address or transport is unusable for this migration."""


class QMPError(Exception):
    """A QMP command failed: becomes ``{"error": {"class": ..., "desc": ...}}``.

    ``QMPError(desc)`` is a GenericError (the class QEMU uses for nearly
    everything); ``QMPError(error_class, desc)`` names another class, one of
    QEMU's: CommandNotFound, DeviceNotActive, DeviceNotFound, KVMMissingCap.

    It is not a :class:`MigrationError` on purpose: it is the reply of one
    monitor command (a refused ``cont``, an unknown fd name), not a failure of
    a migration, so code that rolls a migration back on ``MigrationError``
    never mistakes it for one. The QMP server turns both into error replies.
    """

    @overload
    def __init__(self, desc: str, /) -> None: ...

    @overload
    def __init__(self, error_class: str, desc: str, /) -> None: ...

    def __init__(self, *args: str) -> None:
        if len(args) == 1:
            error_class, desc = "GenericError", args[0]
        elif len(args) == 2:
            error_class, desc = args
        else:
            raise TypeError("QMPError(desc) or QMPError(error_class, desc)")
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc

    def __str__(self) -> str:
        return self.desc
