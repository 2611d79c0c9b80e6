"""A TAP netdev (QEMU's ``-netdev tap``) whose guest echoes every frame.

Handover passes the open queue fds: the kernel queue of the TAP stays where it
is and only the reader changes, so no frame is lost or read twice. State copy
closes the queues at switchover (a single-queue TAP cannot be attached twice:
EBUSY) and the destination attaches the TAP again by name and applies the
vnet header size and offloads again; frames that arrive while no queue is
attached are dropped by the kernel. That is why a TAP this device creates is
made persistent: a state copy must find it again by name.
"""

from __future__ import annotations

import errno
import os
import select
from typing import Any

from migfd.devices.base import Device, GuestThread, RunControl, register_device
from migfd.devices.qemu_opts import opt_bool
from migfd.errors import MigrationError
from migfd.fds import close_fd
from migfd.net import ethernet, netns, tun
from migfd.stream.vmstate import (
    Bool, Fd, Int32, Subsection, UInt32, UInt64, VArray, VBuffer, VMStateDescription,
)

MAX_FRAME = 65536 + 64
#: frames handled between two polls
FRAMES_PER_WAKE = 64

_BACKEND = VMStateDescription(
    "tap/backend", version_id=1, minimum_version_id=1,
    fields=(VArray("queue_fds", element=Fd("fd"), max_elements=tun.MAX_TAP_QUEUES),))

VMSD = VMStateDescription(
    "tap", version_id=1, minimum_version_id=1,
    fields=(VBuffer("ifname", max_size=16), UInt32("queues"), Bool("vnet_hdr"),
            Int32("vnet_hdr_size"), UInt32("offloads"), UInt64("frames_echoed")),
    subsections=(Subsection(_BACKEND, needed=lambda state: state.get("queue_fds") is not None),))


@register_device
class TapNetdev(Device):
    """``-netdev tap,id=ID,ifname=NAME[,queues=N][,vnet_hdr=on][,backend-transfer=on]``."""

    group = "netdev"
    kind = "tap"
    vmsd = VMSD

    @classmethod
    def from_opts(cls, id: str, opts: dict[str, str], backend_transfer: bool) -> "TapNetdev":
        if "ifname" not in opts:
            raise MigrationError(f"netdev tap '{id}' needs ifname=")
        queues = opts.pop("queues", "1")
        if not queues.isdigit():
            raise MigrationError(f"netdev tap '{id}': queues={queues} is not a number")
        return cls(id, opts.pop("ifname"), int(queues), opt_bool(opts, "vnet_hdr"), backend_transfer)

    def __init__(self, id: str, ifname: str, queues: int = 1, vnet_hdr: bool = False,
                 backend_transfer: bool = False):
        super().__init__(id, backend_transfer)
        if not 1 <= queues <= tun.MAX_TAP_QUEUES:
            raise MigrationError(f"netdev '{id}': queues must be 1 to {tun.MAX_TAP_QUEUES}")
        self.ifname = ifname
        self.queues = queues
        self.vnet_hdr = vnet_hdr
        self.vnet_hdr_size = 12 if vnet_hdr else 0
        self.offloads = tun.TUN_F_CSUM if vnet_hdr else 0
        self.fds: list[int] = []
        self.frames_echoed = 0
        self.write_errors = 0

    # -- backend ------------------------------------------------------------

    def open_backend(self) -> None:
        existed = netns.link_exists(self.ifname)
        self._attach()
        if not existed:
            tun.set_persist(self.fds[0], True)
        netns.link_up(self.ifname)

    def _attach(self) -> None:
        try:
            if self.queues == 1:
                fds = [tun.open_tap(self.ifname, vnet_hdr=self.vnet_hdr)]
            else:
                fds = tun.open_tap_queues(self.ifname, self.queues, vnet_hdr=self.vnet_hdr)
        except OSError as exc:
            hint = " (another process holds it)" if exc.errno == errno.EBUSY else ""
            raise MigrationError(f"netdev '{self.id}': cannot attach TAP {self.ifname}: "
                                 f"{exc.strerror}{hint}") from exc
        try:
            for fd in fds:
                if self.vnet_hdr:
                    tun.set_vnet_hdr_size(fd, self.vnet_hdr_size)
                tun.set_offload(fd, self.offloads)
        except OSError as exc:
            for fd in fds:
                close_fd(fd)
            raise MigrationError(f"netdev '{self.id}': cannot configure TAP {self.ifname}: {exc.strerror}") from exc
        self.fds = fds
        self.backend_generation += 1

    def owned_fds(self) -> list[int]:
        return list(self.fds)

    def close(self) -> None:
        for fd in self.fds:
            close_fd(fd)
        self.fds = []
        self.backend_generation += 1

    # -- guest workload ------------------------------------------------------

    def start_guest(self, ctl: RunControl) -> None:
        self.guests.append(ctl.spawn(f"guest-tap-{self.id}", self._echo_loop))

    def _echo_loop(self, guest: GuestThread) -> None:
        hdr = self.vnet_hdr_size if self.vnet_hdr else 0
        while not guest.quitting:
            poller = select.poll()
            poller.register(guest.wake_fd, select.POLLIN)
            for fd in self.fds:
                poller.register(fd, select.POLLIN)
            for fd, _ in guest.poll(poller, 1000):
                if fd == guest.wake_fd:
                    guest.drain()
                    continue
                # One turn per frame: a frame read is echoed within its turn, so
                # a stop never swallows one and never waits for more than one.
                for _ in range(FRAMES_PER_WAKE):
                    if not guest.enter():
                        return
                    try:
                        # not a queue that left while we waited; else one frame
                        if fd not in self.fds or not self._echo_one(fd, hdr):
                            break
                    finally:
                        guest.leave()

    def _echo_one(self, fd: int, hdr: int) -> bool:
        """Read one frame and echo it; False when the queue has none (or is gone)."""
        try:
            frame = os.read(fd, MAX_FRAME)
        except BlockingIOError:
            return False
        except OSError:
            return False  # queue detached under us (state copy); the next poll sees it
        try:
            os.write(fd, frame[:hdr] + ethernet.echo_frame(frame[hdr:]))
            self.frames_echoed += 1
        except OSError:
            self.write_errors += 1
        return True

    # -- migration ------------------------------------------------------------

    def save_state(self, handover: bool) -> dict[str, Any]:
        return {"ifname": self.ifname.encode(), "queues": self.queues, "vnet_hdr": self.vnet_hdr,
                "vnet_hdr_size": self.vnet_hdr_size, "offloads": self.offloads,
                "frames_echoed": self.frames_echoed,
                "queue_fds": list(self.fds) if handover else None}

    def detach(self) -> None:
        self.close()
        self.leave_polls()  # the queue detaches only when no poll holds it

    def reattach(self) -> None:
        if not self.fds:
            self._attach()

    def load_state(self, state: dict[str, Any], received_fds: tuple[int, ...]) -> None:
        ifname = state["ifname"].decode("ascii", "replace")
        if ifname != self.ifname or state["queues"] != self.queues:
            raise MigrationError(f"netdev '{self.id}': source has {ifname} with {state['queues']} queues, "
                                 f"destination {self.ifname} with {self.queues}")
        self.vnet_hdr = state["vnet_hdr"]
        self.vnet_hdr_size = state["vnet_hdr_size"]
        self.offloads = state["offloads"]
        self.frames_echoed = state["frames_echoed"]
        fds = state.get("queue_fds")
        if fds is None:
            if not self.fds:  # state copy: attach by name; else the queues came early (x-early-fds)
                self._attach()
            return
        if len(fds) != self.queues:
            raise MigrationError(f"netdev '{self.id}': {len(fds)} queue fds received, {self.queues} expected")
        validate_tap_fds(fds, self.ifname, self.queues > 1, self.id)
        self.fds = list(fds)
        self.backend_generation += 1

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "ifname": self.ifname, "queues": self.queues,
                "frames-echoed": self.frames_echoed, "write-errors": self.write_errors}


def validate_tap_fds(fds: list[int] | tuple[int, ...], ifname: str, multi_queue: bool, device: str) -> None:
    """Every handed-over TAP fd must be a tun/tap fd attached to the expected interface.

    This runs inside the downtime, once per queue, where one system call costs
    about a µs: so one TUNGETIFF per fd, and no fstat. The queues of one TAP
    answer the ioctl with the same bytes (name and flags), so only the first
    answer is decoded and checked; a later fd whose answer is the same bytes
    has the same verdict, and one that answers otherwise is checked on its own.
    Any file that is not a tun fd refuses the ioctl (ENOTTY or EINVAL; a tun fd
    never attached, EBADFD), which is all QEMU's tap code asks of an fd it is
    given (tap_probe_vnet_hdr issues TUNGETIFF straight away).
    """
    want_name = ifname.encode("ascii", "replace").ljust(16, b"\0")
    want_mq = tun.IFF_MULTI_QUEUE if multi_queue else 0
    ifreq = tun.tap_ifreq_raw
    good = None  # the raw answer of an fd that passed
    for fd in fds:
        try:
            answer = ifreq(fd)
        except OSError:
            raise MigrationError(f"netdev '{device}': received fd is not a TAP device") from None
        if answer == good:
            continue
        name, flags = tun.decode_ifreq(answer)
        if not flags & tun.IFF_TAP:
            raise MigrationError(f"netdev '{device}': received fd is not a TAP device")
        if name != want_name:
            got = name.split(b"\0", 1)[0].decode("ascii", "replace")
            raise MigrationError(f"netdev '{device}': received TAP is attached to {got}, expected {ifname}")
        if flags & tun.IFF_MULTI_QUEUE != want_mq:
            raise MigrationError(f"netdev '{device}': received TAP queue has the wrong multi-queue setting")
        good = answer
