"""Closing file descriptors, the one way migfd does it.

A holder of an fd closes it through :func:`close_fd` and stores the -1 it
returns (trio's rule): the kernel reuses fd numbers at once, so a number kept
after its close would later name somebody else's file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


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
