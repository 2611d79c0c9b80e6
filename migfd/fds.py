"""Closing file descriptors, the one way migfd does it; the limits of passing them.

A holder of an fd closes it through :func:`close_fd` and stores the -1 it
returns (trio's rule): the kernel reuses fd numbers at once, so a number kept
after its close would later name somebody else's file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

#: The kernel's limit of fds in one SCM_RIGHTS message (SCM_MAX_FD).
SCM_MAX_FD = 253
#: QEMU's reader receives at most this many fds with one read (SOCKET_MAX_FDS of
#: io/channel-socket.c): more in one message and it loses them.
MAX_FDS_PER_MESSAGE = 16


def close_fd(fd: int) -> int:
    """Close ``fd`` if it is open (>= 0); returns -1 to store in its place."""
    if fd >= 0:
        try:
            os.close(fd)
        except OSError:
            pass
    return -1


def close_fds(fds: Iterable[int]) -> None:
    """Close every fd of ``fds``; the caller drops its references to them."""
    for fd in fds:
        close_fd(fd)
