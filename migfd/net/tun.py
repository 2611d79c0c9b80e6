"""TAP devices through /dev/net/tun: the ioctls of linux/if_tun.h and the fds they give.

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
  /dev/net/tun (see :func:`migfd.net.netns.run_in_netns`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
import struct

from migfd.fds import close_fd, close_fds
from migfd.net.netns import run_in_netns

TUN_DEVICE_PATH = "/dev/net/tun"
#: /dev/net/tun is the misc character device 10:200.
TUN_DEVICE_MAJOR = 10
TUN_DEVICE_MINOR = 200
TUN_RDEV = os.makedev(TUN_DEVICE_MAJOR, TUN_DEVICE_MINOR)

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
_IFREQ_EMPTY = bytes(_IFREQ.size)


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
        close_fd(fd)
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
            close_fds(fds)
            raise
        return fds

    return run_in_netns(netns, open_all)


def tap_ifreq(fd: int) -> tuple[bytes, int]:
    """TUNGETIFF raw: the interface name NUL-padded to 16 bytes, and the flags (OSError EBADFD if none).

    The form to compare many fds against one expected name: checking the
    queues of a TAP handed over runs once per fd, inside the downtime.
    """
    return decode_ifreq(tap_ifreq_raw(fd))


def tap_ifreq_raw(fd: int) -> bytes:
    """TUNGETIFF's answer as the kernel wrote it (OSError if ``fd`` refuses the ioctl).

    The queues of one TAP answer with the same bytes: comparing answers as
    bytes is the cheapest way to check many queues against one that passed.
    """
    return fcntl.ioctl(fd, TUNGETIFF, _IFREQ_EMPTY)


def decode_ifreq(raw: bytes) -> tuple[bytes, int]:
    """The interface name (NUL-padded to 16 bytes) and the flags of a TUNGETIFF answer."""
    return _IFREQ.unpack(raw)


def tap_info(fd: int) -> TapInfo:
    """Name and flags of the TAP that ``fd`` is attached to (OSError EBADFD if none)."""
    raw_name, flags = tap_ifreq(fd)
    return TapInfo(raw_name.split(b"\0", 1)[0].decode("ascii"), flags)


def is_tun_fd(fd: int) -> bool:
    """True if ``fd`` is an open file of /dev/net/tun (char device 10:200)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_rdev == TUN_RDEV and stat.S_ISCHR(st.st_mode)


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
