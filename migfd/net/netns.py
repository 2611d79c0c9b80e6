"""Links and network namespaces: where the TAPs of a run live, so nothing touches the host's network.

Links are handled with pyroute2 from inside the namespace, so no ``ip`` binary
is needed.  Kernel facts this module relies on (observed on Linux 6.x):
``setns(2)`` changes only the calling thread; sockets and tun files keep the
namespace they were created in; ``/proc/sys/net`` shows the namespace of the
thread that looks at it.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import errno
import os
import secrets
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as _pyroute2_netns

T = TypeVar("T")

# --------------------------------------------------------------------------
# Links (pyroute2, run inside the namespace so no `ip` binary is needed)
# --------------------------------------------------------------------------


def _link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _link_set_state_here(ifname: str, state: str) -> None:
    with IPRoute() as ipr:
        index = _link_index(ipr, ifname)
        if index is None:
            raise OSError(errno.ENODEV, f"no such interface: {ifname}")
        ipr.link("set", index=index, state=state)


def link_up(ifname: str, netns: str | None = None) -> None:
    """Set link ``ifname`` administratively up (no address is assigned)."""
    run_in_netns(netns, _link_set_state_here, ifname, "up")


def link_down(ifname: str, netns: str | None = None) -> None:
    """Set link ``ifname`` administratively down."""
    run_in_netns(netns, _link_set_state_here, ifname, "down")


def _link_exists_here(ifname: str) -> bool:
    with IPRoute() as ipr:
        return _link_index(ipr, ifname) is not None


def link_exists(ifname: str, netns: str | None = None) -> bool:
    """True if a link called ``ifname`` exists in the namespace."""
    return run_in_netns(netns, _link_exists_here, ifname)


def _delete_link_here(ifname: str) -> bool:
    with IPRoute() as ipr:
        index = _link_index(ipr, ifname)
        if index is None:
            return False
        ipr.link("del", index=index)
        return True


def delete_link(ifname: str, netns: str | None = None) -> bool:
    """Delete link ``ifname``; returns False if it did not exist.

    Deleting a TAP detaches every fd still attached to it (their reads then fail).
    """
    return run_in_netns(netns, _delete_link_here, ifname)


def _link_names_here() -> list[str]:
    with IPRoute() as ipr:
        return [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]


def link_names(netns: str | None = None) -> list[str]:
    """Names of all links in the namespace."""
    return run_in_netns(netns, _link_names_here)


def link_mac(ifname: str, netns: str | None = None) -> bytes:
    """The hardware address of link ``ifname``."""

    def lookup() -> bytes:
        with IPRoute() as ipr:
            index = _link_index(ipr, ifname)
            if index is None:
                raise OSError(errno.ENODEV, f"no such interface: {ifname}")
            text = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
        return bytes.fromhex(text.replace(":", ""))

    return run_in_netns(netns, lookup)


def set_txqlen(ifname: str, length: int, netns: str | None = None) -> int:
    """Set the transmit queue length of link ``ifname``; returns what the kernel now reports.

    On a TAP this is the number of frames its kernel queue keeps while nobody
    reads the fd (see :mod:`migfd.net.tun`).
    """

    def apply() -> int:
        with IPRoute() as ipr:
            index = _link_index(ipr, ifname)
            if index is None:
                raise OSError(errno.ENODEV, f"no such interface: {ifname}")
            ipr.link("set", index=index, txqlen=length)
            return ipr.get_links(index)[0].get_attr("IFLA_TXQLEN")

    return run_in_netns(netns, apply)


# --------------------------------------------------------------------------
# Network namespaces
# --------------------------------------------------------------------------

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
NETNS_PREFIX = "migfd-"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def netns_path(name: str) -> str:
    """Path of the bind mount that keeps named namespace ``name`` alive."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid network namespace name {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


def setns_fd(fd: int) -> None:
    """Move the calling *thread* into the network namespace that ``fd`` refers to."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def setns_by_name(name: str) -> None:
    """Move the calling *thread* into named network namespace ``name``.

    Only the calling thread moves (setns(2) is per thread); sockets and tun
    files already open keep the namespace they were created in.  Safe to call
    in a forked child before exec (see :meth:`NetNamespace.preexec`).
    """
    fd = os.open(netns_path(name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns_fd(fd)
    finally:
        os.close(fd)


def run_in_netns(netns: str | None, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` in a short-lived thread inside network namespace ``netns``.

    Returns fn's result or re-raises its exception.  With ``netns`` None, fn
    runs in the calling thread.  Sockets and TAPs that fn creates belong to
    ``netns`` for their whole life, whichever thread uses them later.
    """
    if netns is None:
        return fn(*args)
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            setns_by_name(netns)
            outcome["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=target, name=f"netns:{netns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


# Namespaces this process created and has not removed yet; removed at exit as
# a last resort (a failed test normally removes its own through __exit__).
_live_namespaces: dict[str, int] = {}
_live_lock = threading.Lock()


@atexit.register
def _remove_leftover_namespaces() -> None:
    with _live_lock:
        leftovers = [name for name, pid in _live_namespaces.items() if pid == os.getpid()]
    for name in leftovers:
        try:
            _remove_netns(name)
        except OSError:
            pass


def _remove_netns(name: str) -> None:
    with _live_lock:
        _live_namespaces.pop(name, None)
    if os.path.exists(netns_path(name)):
        _pyroute2_netns.remove(name)


def _disable_ipv6_here() -> bool:
    # Without this, a link going up gets an IPv6 link-local address and sends
    # router solicitations and MLD reports: IP traffic the rules forbid.
    # /proc/sys/net shows the namespace of the looking thread; check that the
    # view really is this namespace's (its interface list) before writing, so
    # the host's settings can never be the ones changed.
    conf_dir = "/proc/sys/net/ipv6/conf"
    try:
        listed = set(os.listdir(conf_dir)) - {"all", "default"}
    except FileNotFoundError:
        return True  # no IPv6 in this kernel
    here = {name for _, name in socket.if_nameindex()}
    if listed != here:
        return False
    for which in ("default", "all"):
        with open(os.path.join(conf_dir, which, "disable_ipv6"), "w") as f:
            f.write("1")
    return True


class NetNamespace:
    """A uniquely named network namespace (``migfd-xxxxxxxx``), removed on close.

    Created at construction; :meth:`close` (or leaving the ``with`` block, also
    by an exception) deletes every link in it except ``lo`` and removes the
    name.  IPv6 is disabled inside it so links that go up stay silent.
    """

    def __init__(self, prefix: str = NETNS_PREFIX):
        self.name = prefix + secrets.token_hex(4)
        self.ipv6_disabled = False
        path = netns_path(self.name)
        if os.path.exists(path):
            raise FileExistsError(errno.EEXIST, "network namespace exists", path)
        with _live_lock:
            _live_namespaces[self.name] = os.getpid()
        self._closed = False
        try:
            _pyroute2_netns.create(self.name)
            if not os.path.exists(path):
                raise OSError(errno.ENOENT, "network namespace was not created", path)
            self.ipv6_disabled = self.run_in(_disable_ipv6_here)
        except BaseException:
            try:
                self.close()
            except Exception:
                pass  # the creation error is the one worth seeing
            raise

    @property
    def path(self) -> str:
        return netns_path(self.name)

    def run_in(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in a short-lived thread inside this namespace (see :func:`run_in_netns`)."""
        return run_in_netns(self.name, fn, *args)

    def preexec(self) -> Callable[[], None]:
        """A ``subprocess`` ``preexec_fn`` that starts the child inside this namespace."""
        name = self.name
        netns_path(name)  # validate now, not in the child

        def enter() -> None:
            setns_by_name(name)

        return enter

    def link_names(self) -> list[str]:
        return link_names(self.name)

    def delete_links(self) -> list[str]:
        """Delete every link but ``lo``; returns the names deleted."""

        def delete_all() -> list[str]:
            deleted = []
            with IPRoute() as ipr:
                for link in ipr.get_links():
                    ifname = link.get_attr("IFLA_IFNAME")
                    if ifname == "lo":
                        continue
                    try:
                        ipr.link("del", index=link["index"])
                    except Exception as exc:  # gone meanwhile
                        if getattr(exc, "code", None) != errno.ENODEV:
                            raise
                    deleted.append(ifname)
            return deleted

        return self.run_in(delete_all)

    def close(self) -> None:
        """Delete the links and remove the namespace; harmless to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            if os.path.exists(self.path):
                # A tun fd still open somewhere keeps the namespace alive after
                # its name is gone; deleting the links first makes the TAPs go
                # away now rather than when that fd closes.
                self.delete_links()
        finally:
            _remove_netns(self.name)

    def __enter__(self) -> NetNamespace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<NetNamespace {self.name} {state}>"
