"""A persistent TAP inside a network namespace, set up for a VM and a frame probe and always removed.

The one way tests and benchmark scenarios prepare a TAP: created persistent
(so a state copy finds it again by name after the source closed it), with the
kernel queue length the caller needs, administratively up if asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from migfd.fds import close_fd
from migfd.net.netns import NetNamespace, delete_link, link_up, set_txqlen
from migfd.net.tun import open_tap, set_persist


#: Frames a TAP's kernel queue holds while no guest reads it (a stopped source). The
#: kernel's default, 1000 frames, is 50 ms at 20,000 frames/s: a loaded 2-core machine
#: can keep a guest stopped longer than that, and the overflow would be counted as frames
#: the handover lost. One second of frames decouples the exactly-once count from
#: scheduling delays. The benchmark's TAPs and the tests' use this one value, so a test
#: that sees no frame lost speaks for the benchmark's target too.
TAP_TXQLEN = 20_000


@dataclass(frozen=True)
class NetnsTap:
    """A persistent TAP ``ifname`` with ``queues`` queues, inside namespace ``ns``."""

    ns: NetNamespace
    ifname: str
    queues: int

    @property
    def netns(self) -> str:
        """The namespace's name, as :mod:`migfd.net` functions take it."""
        return self.ns.name


def create_persistent_tap(ns: NetNamespace, ifname: str, *, queues: int = 1,
                          txqlen: int | None = None, up: bool = False) -> NetnsTap:
    """Create persistent TAP ``ifname`` in ``ns`` (multi-queue if ``queues`` > 1); no fd stays open.

    ``txqlen`` sets how many frames its kernel queue keeps while no guest reads
    (1000 by default); ``up`` sets the link up (a VM's TAP device also does).
    On failure the TAP is removed again.
    """
    fd = open_tap(ifname, multi_queue=queues > 1, netns=ns.name)
    try:
        set_persist(fd, True)
    finally:
        close_fd(fd)
    try:
        if txqlen is not None:
            applied = set_txqlen(ifname, txqlen, ns.name)
            if applied != txqlen:
                raise OSError(f"{ifname}: txqlen is {applied}, not {txqlen}")
        if up:
            link_up(ifname, ns.name)
    except BaseException:
        delete_tap(ns, ifname)
        raise
    return NetnsTap(ns, ifname, queues)


def delete_tap(ns: NetNamespace | None, ifname: str | None) -> None:
    """Remove a TAP (and the frames queued in it); nothing to do if either is None or it is gone."""
    if ifname is not None and ns is not None:
        try:
            delete_link(ifname, ns.name)
        except OSError:
            pass


@contextmanager
def tap_in_netns(ns: NetNamespace, ifname: str, *, queues: int = 1, txqlen: int | None = None,
                 up: bool = True) -> Iterator[NetnsTap]:
    """A persistent TAP in the existing namespace ``ns`` for the ``with`` block; deleted at its end."""
    tap = create_persistent_tap(ns, ifname, queues=queues, txqlen=txqlen, up=up)
    try:
        yield tap
    finally:
        delete_tap(ns, ifname)


@contextmanager
def netns_with_tap(ifname: str, *, queues: int = 1, txqlen: int | None = None,
                   up: bool = True) -> Iterator[NetnsTap]:
    """A new :class:`NetNamespace` holding a persistent TAP; both removed at the end, also on failure."""
    with NetNamespace() as ns, tap_in_netns(ns, ifname, queues=queues, txqlen=txqlen, up=up) as tap:
        yield tap
