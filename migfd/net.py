"""Real network plumbing for migration runs: TAP devices, network namespaces, probe traffic.

A VM process owns TAP queues (fds of /dev/net/tun); a :class:`FrameProbe` on the
host side of that TAP sends numbered raw Ethernet frames (local experimental
ethertype 0x88B5, no IP at all) that the guest workload echoes back, so the frames
lost, duplicated or delayed by a migration can be counted.  Everything lives in a
:class:`NetNamespace` this module creates and removes, so nothing touches the
host's own network.

Kernel facts this module relies on (observed on Linux 6.x):

* A single-queue TAP accepts one attached file at a time: a second
  ``TUNSETIFF`` on it fails with EBUSY while the first fd is open, in any
  process.  Handing over the open fd (SCM_RIGHTS) is the only way to share it.
* A non-persistent TAP disappears when its last fd closes; a persistent one
  stays (with carrier off) until it is deleted.
* Frames sent to the interface while nobody reads the TAP fd wait in the TAP
  queue (as many as the link's ``tx_queue_len``, 1000 on Linux 6.x; more are
  dropped) and are read by whoever holds the fd next.
* The network namespace of a tun device is the one of the thread that *opened*
  /dev/net/tun; ``setns(2)`` changes only the calling thread; sockets keep the
  namespace they were created in; ``/proc/sys/net`` shows the namespace of the
  thread that looks at it.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as _pyroute2_netns

T = TypeVar("T")

# --------------------------------------------------------------------------
# TAP devices (linux/if_tun.h)
# --------------------------------------------------------------------------

TUN_DEVICE_PATH = "/dev/net/tun"
#: /dev/net/tun is the misc character device 10:200.
TUN_DEVICE_MAJOR = 10
TUN_DEVICE_MINOR = 200

TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
TUNSETPERSIST = 0x400454CB  # _IOW('T', 203, int)
TUNGETFEATURES = 0x800454CF  # _IOR('T', 207, unsigned int)
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)
TUNGETVNETHDRSZ = 0x800454D7  # _IOR('T', 215, int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
TUNSETQUEUE = 0x400454D9  # _IOW('T', 217, int)

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_NAPI = 0x0010
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_PERSIST = 0x0800
IFF_NO_PI = 0x1000
IFF_ONE_QUEUE = 0x2000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

#: Kernel limit on the queues of one multi-queue TAP (MAX_TAP_QUEUES).
MAX_TAP_QUEUES = 256
IFNAMSIZ = 16

# struct ifreq: 16 bytes of name, then a union whose first member we use as
# ifr_flags (short); the union is 24 bytes on 64-bit Linux.
_IFREQ = struct.Struct("16sH22x")


@dataclasses.dataclass(frozen=True)
class TapInfo:
    """What TUNGETIFF says about an attached TAP fd."""

    ifname: str
    #: IFF_* flags of the device (IFF_TAP, IFF_NO_PI, IFF_MULTI_QUEUE, IFF_PERSIST...).
    flags: int

    @property
    def multi_queue(self) -> bool:
        return bool(self.flags & IFF_MULTI_QUEUE)

    @property
    def persistent(self) -> bool:
        return bool(self.flags & IFF_PERSIST)

    @property
    def vnet_hdr(self) -> bool:
        return bool(self.flags & IFF_VNET_HDR)


def _check_ifname(ifname: str) -> bytes:
    raw = ifname.encode("ascii")
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or raw.isspace():
        raise ValueError(f"invalid interface name {ifname!r} (1 to {IFNAMSIZ - 1} characters)")
    return raw


def _open_tap_here(
    ifname: str, multi_queue: bool, vnet_hdr: bool, nonblocking: bool
) -> int:
    raw_name = _check_ifname(ifname)
    flags = IFF_TAP | IFF_NO_PI
    if multi_queue:
        flags |= IFF_MULTI_QUEUE
    if vnet_hdr:
        flags |= IFF_VNET_HDR
    open_flags = os.O_RDWR | os.O_CLOEXEC
    if nonblocking:
        open_flags |= os.O_NONBLOCK
    fd = os.open(TUN_DEVICE_PATH, open_flags)
    try:
        fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(raw_name, flags))
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_tap(
    ifname: str,
    *,
    multi_queue: bool = False,
    vnet_hdr: bool = False,
    nonblocking: bool = True,
    netns: str | None = None,
) -> int:
    """Open /dev/net/tun and attach it to TAP ``ifname``, creating the TAP if needed.

    Returns the fd; the caller owns it.  The TAP is created in network namespace
    ``netns`` (the caller's if None).  Attaching a single-queue TAP that another
    fd holds fails with OSError EBUSY; mixing single- and multi-queue attaches
    fails with EINVAL.
    """
    return run_in_netns(netns, _open_tap_here, ifname, multi_queue, vnet_hdr, nonblocking)


def open_tap_queues(
    ifname: str, n: int, *, vnet_hdr: bool = False, nonblocking: bool = True,
    netns: str | None = None,
) -> list[int]:
    """Open ``n`` queues of multi-queue TAP ``ifname``; returns their fds (caller owns them)."""
    if not 1 <= n <= MAX_TAP_QUEUES:
        raise ValueError(f"a TAP has 1 to {MAX_TAP_QUEUES} queues, not {n}")

    def open_all() -> list[int]:
        fds: list[int] = []
        try:
            for _ in range(n):
                fds.append(_open_tap_here(ifname, True, vnet_hdr, nonblocking))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    return run_in_netns(netns, open_all)


def tap_info(fd: int) -> TapInfo:
    """Name and flags of the TAP that ``fd`` is attached to (OSError EBADFD if none)."""
    out = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    raw_name, flags = _IFREQ.unpack(out)
    return TapInfo(raw_name.split(b"\0", 1)[0].decode("ascii"), flags)


def is_tun_fd(fd: int) -> bool:
    """True if ``fd`` is an open file of /dev/net/tun (char device 10:200)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (
        stat.S_ISCHR(st.st_mode)
        and os.major(st.st_rdev) == TUN_DEVICE_MAJOR
        and os.minor(st.st_rdev) == TUN_DEVICE_MINOR
    )


def is_tap_fd(fd: int) -> bool:
    """True if ``fd`` is a /dev/net/tun file attached to a TAP (not TUN) device.

    Meant for validating an fd received from a peer: fstat first, so that the
    TUNGETIFF ioctl is only ever issued on the tun device.
    """
    if not is_tun_fd(fd):
        return False
    try:
        info = tap_info(fd)
    except OSError:
        return False  # EBADFD: opened but never attached, or detached
    return bool(info.flags & IFF_TAP)


def set_persist(fd: int, on: bool) -> None:
    """Make the TAP outlive (or not) its last fd (TUNSETPERSIST)."""
    fcntl.ioctl(fd, TUNSETPERSIST, 1 if on else 0)


def set_vnet_hdr_size(fd: int, n: int) -> None:
    """Set the virtio-net header length read/written with each frame (TUNSETVNETHDRSZ)."""
    fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", n))


def get_vnet_hdr_size(fd: int) -> int:
    """The virtio-net header length of the TAP (TUNGETVNETHDRSZ)."""
    out = fcntl.ioctl(fd, TUNGETVNETHDRSZ, bytes(4))
    return struct.unpack("i", out)[0]


def set_offload(fd: int, flags: int) -> None:
    """Tell the TAP which offloads the reader handles (TUN_F_* bits, TUNSETOFFLOAD)."""
    fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def get_features(fd: int) -> int:
    """The IFF_* flags the kernel's tun driver supports (TUNGETFEATURES)."""
    out = fcntl.ioctl(fd, TUNGETFEATURES, bytes(4))
    return struct.unpack("I", out)[0]


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


# --------------------------------------------------------------------------
# Probe frames
# --------------------------------------------------------------------------

#: IEEE 802 "local experimental ethertype 1".
ETH_P_MIGFD = 0x88B5
ETH_HEADER = struct.Struct("!6s6sH")
#: After the Ethernet header: sequence number, CLOCK_MONOTONIC send time in ns.
PROBE_HEADER = struct.Struct("!QQ")
ETH_HEADER_LEN = ETH_HEADER.size
MIN_PAYLOAD_LEN = PROBE_HEADER.size
#: Locally administered unicast MAC the guest workload answers from ("\x02migfd").
GUEST_MAC = b"\x02migfd"

SOL_PACKET = 263
PACKET_STATISTICS = 6
PACKET_IGNORE_OUTGOING = 23
PACKET_OUTGOING = 4


@dataclasses.dataclass(frozen=True)
class Frame:
    """A parsed migfd probe frame."""

    dst: bytes
    src: bytes
    seq: int
    sent_ns: int


def build_frame(
    dst_mac: bytes, src_mac: bytes, seq: int, payload_len: int = 64,
    *, sent_ns: int | None = None,
) -> bytes:
    """Ethernet header (ethertype 0x88B5), be64 seq, be64 send time (ns), zero padding.

    ``payload_len`` counts the bytes after the 14-byte header (at least 16);
    ``sent_ns`` defaults to CLOCK_MONOTONIC now.
    """
    if len(dst_mac) != 6 or len(src_mac) != 6:
        raise ValueError("MAC addresses are 6 bytes")
    if payload_len < MIN_PAYLOAD_LEN:
        raise ValueError(f"payload_len must be at least {MIN_PAYLOAD_LEN}")
    if sent_ns is None:
        sent_ns = time.monotonic_ns()
    return (
        ETH_HEADER.pack(dst_mac, src_mac, ETH_P_MIGFD)
        + PROBE_HEADER.pack(seq, sent_ns)
        + bytes(payload_len - MIN_PAYLOAD_LEN)
    )


def parse_frame(frame: bytes | bytearray | memoryview) -> Frame | None:
    """The probe frame in ``frame``, or None if it is not one (other ethertype, too short)."""
    if len(frame) < ETH_HEADER_LEN + MIN_PAYLOAD_LEN:
        return None
    dst, src, ethertype = ETH_HEADER.unpack_from(frame)
    if ethertype != ETH_P_MIGFD:
        return None
    seq, sent_ns = PROBE_HEADER.unpack_from(frame, ETH_HEADER_LEN)
    return Frame(dst, src, seq, sent_ns)


def echo_frame(frame: bytes | bytearray | memoryview) -> bytes:
    """``frame`` with source and destination MAC swapped (the guest's answer)."""
    if len(frame) < ETH_HEADER_LEN:
        raise ValueError("shorter than an Ethernet header")
    data = bytes(frame)
    return data[6:12] + data[0:6] + data[12:]


def is_migfd_frame(frame: bytes | bytearray | memoryview) -> bool:
    """True if ``frame`` carries ethertype 0x88B5."""
    return len(frame) >= ETH_HEADER_LEN and frame[12] == 0x88 and frame[13] == 0xB5


# --------------------------------------------------------------------------
# Probe
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrafficReport:
    """What a :class:`FrameProbe` saw between its start and :meth:`FrameProbe.stop`."""

    #: Frames the probe tried to send (failed sends included: they are lost too).
    frames_sent: int
    #: Echoes received, duplicates included.
    frames_received: int
    #: Sequence numbers echoed at least once.
    received: frozenset[int]
    #: Sent but never echoed within the drain timeout, ascending.
    lost: tuple[int, ...]
    #: Echoed more than once, ascending.
    duplicated: tuple[int, ...]
    #: Echoes that arrived after an echo of a higher sequence number.
    reordered: int
    #: Longest silence between consecutive echoes while sending (see FrameProbe.stop).
    max_gap_ns: int
    #: Largest send-to-echo time of any frame.
    max_rtt_ns: int
    #: From the first to the last send of the paced loop (0 if it never ran).
    send_duration_ns: int
    #: sendto() calls that failed (ENOBUFS, ENETDOWN...).
    send_errors: int
    #: Frames the kernel dropped because the probe's socket buffer was full; if
    #: not 0, part of ``lost`` is the probe's fault, not the path's.
    probe_drops: int


def _open_packet_socket(ifname: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_MIGFD))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            # Our own outgoing frames would otherwise loop back to us.
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        except OSError:
            pass  # kernel < 4.20: the MAC filter in the receiver does the job
        sock.bind((ifname, ETH_P_MIGFD))
    except BaseException:
        sock.close()
        raise
    return sock


class FrameProbe:
    """Numbered frames sent on ``ifname`` and their echoes counted.

    The probe's AF_PACKET socket is bound to (``ifname``, 0x88B5) in namespace
    ``netns``; the link must be up.  On a TAP, what the probe sends is read
    from the TAP fd by the guest, and what the guest writes to the fd is
    received here.  A frame counts as echoed when it comes back with the MACs
    swapped: ``dst`` = the interface's MAC, ``src`` = ``guest_mac``.

    The receiver runs from construction until :meth:`stop`; :meth:`start`
    adds the paced sender, :meth:`send` sends one frame by hand.  Both loops
    stop by themselves: the sender after ``max_frames`` frames or
    ``max_duration_s``, the receiver ``RECEIVER_GRACE_S`` after that.

    If the interface is deleted, the socket stops working for good (a TAP that
    is re-created is a new interface): use a persistent TAP when a scenario
    re-opens it.
    """

    RECEIVER_GRACE_S = 30.0

    def __init__(
        self,
        ifname: str,
        *,
        netns: str | None = None,
        guest_mac: bytes = GUEST_MAC,
        rate_per_s: float = 20_000.0,
        max_frames: int | None = None,
        max_duration_s: float = 10.0,
        payload_len: int = 64,
    ):
        if rate_per_s <= 0:
            raise ValueError("rate_per_s must be positive")
        if max_duration_s <= 0:
            raise ValueError("max_duration_s must be positive")
        if len(guest_mac) != 6:
            raise ValueError("guest_mac is 6 bytes")
        if payload_len < MIN_PAYLOAD_LEN:
            raise ValueError(f"payload_len must be at least {MIN_PAYLOAD_LEN}")
        self.ifname = ifname
        self.netns = netns
        self.guest_mac = bytes(guest_mac)
        self.rate_per_s = float(rate_per_s)
        self.max_duration_s = float(max_duration_s)
        self.max_frames = (
            max_frames if max_frames is not None else int(self.rate_per_s * self.max_duration_s)
        )
        self.payload_len = payload_len

        self._sock = run_in_netns(netns, _open_packet_socket, ifname)
        # getsockname() of a bound packet socket carries the device's MAC.
        self.probe_mac: bytes = self._sock.getsockname()[4]
        self._header = ETH_HEADER.pack(self.guest_mac, self.probe_mac, ETH_P_MIGFD)
        self._padding = bytes(payload_len - MIN_PAYLOAD_LEN)

        self._lock = threading.Lock()
        self._sent: set[int] = set()
        self._echo_counts: dict[int, int] = {}
        self._matched = 0  # distinct sent seqs echoed at least once
        self._arrivals_ns: list[int] = []
        self._frames_received = 0
        self._reordered = 0
        self._highest_seq = -1
        self._max_rtt_ns = 0
        self._send_errors = 0
        self._frames_sent = 0
        self._next_seq = 0
        self._send_start_ns = 0
        self._send_end_ns = 0

        self._stop_sending = threading.Event()
        self._stop_receiving = threading.Event()
        self._sender: threading.Thread | None = None
        self._stopped = False
        self._receiver = threading.Thread(
            target=self._receive_loop, name=f"probe-rx:{ifname}", daemon=True
        )
        self._receiver.start()

    # -- sending --------------------------------------------------------

    def _send_seq(self, seq: int) -> None:
        with self._lock:
            self._sent.add(seq)  # before sendto: the echo may beat us back
            self._frames_sent += 1
        frame = self._header + PROBE_HEADER.pack(seq, time.monotonic_ns()) + self._padding
        try:
            self._sock.send(frame)
        except OSError:
            self._send_errors += 1

    def send(self, seq: int) -> None:
        """Send one probe frame with sequence number ``seq`` now."""
        if self._stopped:
            raise RuntimeError("probe is stopped")
        self._send_seq(seq)

    def start(self, first_seq: int | None = None) -> None:
        """Start the paced sender (``rate_per_s``, sequence numbers counting up)."""
        if self._stopped:
            raise RuntimeError("probe is stopped")
        if self._sender is not None:
            raise RuntimeError("sender already started")
        if first_seq is not None:
            self._next_seq = first_seq
        self._sender = threading.Thread(
            target=self._send_loop, name=f"probe-tx:{self.ifname}", daemon=True
        )
        self._sender.start()

    def _send_loop(self) -> None:
        # Pacing by count, not by interval: at each wake-up send every frame
        # whose time has come, then sleep until the next one is due.  Sleeping
        # overshoots by tens of microseconds, which the next wake-up makes up
        # for, so the average rate is exact without busy-waiting.
        interval_ns = 1e9 / self.rate_per_s
        start = time.monotonic_ns()
        deadline = start + int(self.max_duration_s * 1e9)
        self._send_start_ns = start
        sent = 0
        try:
            while sent < self.max_frames and not self._stop_sending.is_set():
                now = time.monotonic_ns()
                if now >= deadline:
                    break
                due = min(self.max_frames, int((now - start) / interval_ns) + 1)
                while sent < due:
                    self._send_seq(self._next_seq)
                    self._next_seq += 1
                    sent += 1
                self._send_end_ns = time.monotonic_ns()
                next_due_ns = start + int(sent * interval_ns)
                delay_ns = next_due_ns - time.monotonic_ns()
                if delay_ns > 0:
                    self._stop_sending.wait(delay_ns / 1e9)
        finally:
            self._send_end_ns = max(self._send_end_ns, start)

    @property
    def frames_sent(self) -> int:
        return self._frames_sent

    def wait_sent(self, timeout_s: float | None = None) -> bool:
        """Wait until the paced sender has finished by itself; False on timeout."""
        if self._sender is None:
            raise RuntimeError("sender not started")
        self._sender.join(timeout_s)
        return not self._sender.is_alive()

    def wait_echoes(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` distinct sent frames have been echoed; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._matched < count:
            if time.monotonic() >= deadline or not self._receiver.is_alive():
                return self._matched >= count
            time.sleep(0.001)
        return True

    # -- receiving ------------------------------------------------------

    def _receive_loop(self) -> None:
        sock = self._sock
        sock.settimeout(0.05)
        buf = bytearray(2048)
        view = memoryview(buf)
        want_dst = self.probe_mac
        want_src = self.guest_mac
        hard_deadline = time.monotonic() + self.max_duration_s + self.RECEIVER_GRACE_S
        header_len = ETH_HEADER_LEN + PROBE_HEADER.size
        while not self._stop_receiving.is_set() and time.monotonic() < hard_deadline:
            try:
                n, addr = sock.recvfrom_into(buf)
            except TimeoutError:
                continue
            except OSError:
                break  # socket closed or interface gone
            now = time.monotonic_ns()
            if n < header_len or addr[2] == PACKET_OUTGOING:
                continue
            if view[0:6] != want_dst or view[6:12] != want_src:
                continue  # not an echo of ours (e.g. our own frame, seen on old kernels)
            seq, sent_ns = PROBE_HEADER.unpack_from(buf, ETH_HEADER_LEN)
            with self._lock:
                count = self._echo_counts.get(seq, 0) + 1
                self._echo_counts[seq] = count
                if count == 1 and seq in self._sent:
                    self._matched += 1
                self._arrivals_ns.append(now)
                self._frames_received += 1
                if seq < self._highest_seq:
                    self._reordered += 1
                else:
                    self._highest_seq = seq
                rtt = now - sent_ns
                if rtt > self._max_rtt_ns:
                    self._max_rtt_ns = rtt

    def _probe_drops(self) -> int:
        try:
            raw = self._sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
        except OSError:
            return 0
        return struct.unpack("II", raw)[1]

    # -- result ---------------------------------------------------------

    def stop(self, drain_timeout_s: float = 1.0) -> TrafficReport:
        """Stop sending, wait up to ``drain_timeout_s`` for outstanding echoes, report.

        ``max_gap_ns`` is the longest interval between consecutive echo
        arrivals that began while the sender ran, counting the start of sending
        as an arrival and, if echoes stopped before sending did, the silence
        until the last send.  A migration's interruption shows up here.
        """
        if self._stopped:
            raise RuntimeError("probe already stopped")
        self._stopped = True
        try:
            self._stop_sending.set()
            if self._sender is not None:
                self._sender.join()
            self.wait_echoes(len(self._sent), drain_timeout_s)
            self._stop_receiving.set()
            self._receiver.join()
            probe_drops = self._probe_drops()
        finally:
            self._stop_receiving.set()
            self._receiver.join()
            self._sock.close()
        return self._report(probe_drops)

    def _report(self, probe_drops: int) -> TrafficReport:
        received = frozenset(self._echo_counts)
        lost = tuple(sorted(self._sent - received))
        duplicated = tuple(sorted(s for s, c in self._echo_counts.items() if c > 1))
        max_gap_ns = 0
        if self._sender is not None:
            start, end = self._send_start_ns, self._send_end_ns
            previous = start
            for t in self._arrivals_ns:
                if t < start:
                    continue  # echoes of hand-sent frames before the loop
                max_gap_ns = max(max_gap_ns, t - previous)
                previous = t
                if t >= end:
                    break
            if previous < end:
                max_gap_ns = max(max_gap_ns, end - previous)
        return TrafficReport(
            frames_sent=self._frames_sent,
            frames_received=self._frames_received,
            received=received,
            lost=lost,
            duplicated=duplicated,
            reordered=self._reordered,
            max_gap_ns=max_gap_ns,
            max_rtt_ns=self._max_rtt_ns,
            send_duration_ns=(self._send_end_ns - self._send_start_ns) if self._sender else 0,
            send_errors=self._send_errors,
            probe_drops=probe_drops,
        )

    def close(self) -> None:
        """Stop everything without a report (harmless after :meth:`stop`)."""
        self._stop_sending.set()
        self._stop_receiving.set()
        if self._sender is not None:
            self._sender.join()
        self._receiver.join()
        self._stopped = True
        self._sock.close()

    def __enter__(self) -> FrameProbe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
