"""KVM from Python: the ioctls of linux/kvm.h through ctypes, a VM over memfd RAM, vCPUs, the dirty log.

Only what migfd's guest needs: a VM (``KVM_CREATE_VM``), memory slots that
are the memfd mappings (``KVM_SET_USER_MEMORY_REGION``, with
``KVM_MEM_LOG_DIRTY_PAGES`` while a migration copies RAM), vCPUs set up
directly in 64-bit long mode (``KVM_SET_SREGS``: CR0.PE|PG, CR4.PAE,
EFER.LME|LMA, flat segments; no firmware, no real mode),
``KVM_RUN`` with ``immediate_exit``, registers and the TSC MSR for the
``cpu`` sections, and ``KVM_GET_DIRTY_LOG`` with ``KVM_CLEAR_DIRTY_LOG``
when the kernel has manual dirty-log protection.

A ctypes call releases the GIL, so a vCPU thread inside ``KVM_RUN`` leaves
the interpreter to the migration and the backends. KVM ties a VM and its
vCPUs to the process (mm) that created them: their fds cannot move to a
destination, which therefore builds its own VM over the memfd it received.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np

from migfd.errors import MigrationError
from migfd.fds import close_fd

KVM_DEVICE_PATH = "/dev/kvm"
KVM_API_VERSION = 12

_KVMIO = 0xAE
_IOC_WRITE = 1
_IOC_READ = 2


def _io(nr: int) -> int:
    return (_KVMIO << 8) | nr


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (_KVMIO << 8) | nr


# -- the structures of linux/kvm.h (x86) ----------------------------------------------


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32),
                ("guest_phys_addr", ctypes.c_uint64), ("memory_size", ctypes.c_uint64),
                ("userspace_addr", ctypes.c_uint64)]


class KvmDirtyLog(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("padding1", ctypes.c_uint32),
                ("dirty_bitmap", ctypes.c_uint64)]


class KvmClearDirtyLog(ctypes.Structure):
    _fields_ = [("slot", ctypes.c_uint32), ("num_pages", ctypes.c_uint32),
                ("first_page", ctypes.c_uint64), ("dirty_bitmap", ctypes.c_uint64)]


_REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
              "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")


class KvmRegs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in _REG_NAMES]


class KvmSegment(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint32), ("selector", ctypes.c_uint16),
                ("type", ctypes.c_uint8), ("present", ctypes.c_uint8), ("dpl", ctypes.c_uint8),
                ("db", ctypes.c_uint8), ("s", ctypes.c_uint8), ("l", ctypes.c_uint8),
                ("g", ctypes.c_uint8), ("avl", ctypes.c_uint8), ("unusable", ctypes.c_uint8),
                ("padding", ctypes.c_uint8)]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", ctypes.c_uint64), ("limit", ctypes.c_uint16), ("padding", ctypes.c_uint16 * 3)]


#: the segment registers of kvm_sregs, in its order
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


class KvmSregs(ctypes.Structure):
    _fields_ = ([(name, KvmSegment) for name in SEGMENTS]
                + [("gdt", KvmDtable), ("idt", KvmDtable)]
                + [(name, ctypes.c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")]
                + [("interrupt_bitmap", ctypes.c_uint64 * 4)])


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint32), ("reserved", ctypes.c_uint32), ("data", ctypes.c_uint64)]


class KvmMsrs1(ctypes.Structure):
    """struct kvm_msrs with room for one entry (all this guest needs: the TSC)."""

    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32), ("entries", KvmMsrEntry * 1)]


class KvmEnableCap(ctypes.Structure):
    _fields_ = [("cap", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("args", ctypes.c_uint64 * 4),
                ("pad", ctypes.c_uint8 * 64)]


KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _ioc(_IOC_WRITE, 0x42, ctypes.sizeof(KvmDirtyLog))
KVM_SET_USER_MEMORY_REGION = _ioc(_IOC_WRITE, 0x46, ctypes.sizeof(KvmUserspaceMemoryRegion))
KVM_RUN = _io(0x80)
KVM_GET_STATS_FD = _io(0xCE)
KVM_GET_REGS = _ioc(_IOC_READ, 0x81, ctypes.sizeof(KvmRegs))
KVM_SET_REGS = _ioc(_IOC_WRITE, 0x82, ctypes.sizeof(KvmRegs))
KVM_GET_SREGS = _ioc(_IOC_READ, 0x83, ctypes.sizeof(KvmSregs))
KVM_SET_SREGS = _ioc(_IOC_WRITE, 0x84, ctypes.sizeof(KvmSregs))
KVM_GET_MSRS = _ioc(_IOC_READ | _IOC_WRITE, 0x88, 8)
KVM_SET_MSRS = _ioc(_IOC_WRITE, 0x89, 8)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_ENABLE_CAP = _ioc(_IOC_WRITE, 0xA3, ctypes.sizeof(KvmEnableCap))
KVM_CLEAR_DIRTY_LOG = _ioc(_IOC_READ | _IOC_WRITE, 0xC0, ctypes.sizeof(KvmClearDirtyLog))

KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1
KVM_MEM_LOG_DIRTY_PAGES = 1

#: kvm_run.exit_reason values this VMM meets
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_INTR = 10
EXIT_NAMES = {0: "unknown", 1: "exception", 2: "io", 5: "hlt", 6: "mmio", 8: "shutdown",
              9: "fail-entry", 10: "intr", 17: "internal-error"}
#: offsets in struct kvm_run: immediate_exit, exit_reason, and the io exit's
#: direction (u8: 1 = out), size (u8), port (u16)
RUN_IMMEDIATE_EXIT = 1
RUN_EXIT_REASON = 8
RUN_IO = 32
KVM_EXIT_IO_OUT = 1

MSR_IA32_TSC = 0x10
CR0_PE = 1
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
#: RFLAGS of a fresh vCPU: bit 1 is always set; IF clear (this guest takes no
#: interrupts); IOPL 3, so the guest at CPL 3 may ``out`` to the idle port
RFLAGS_BOOT = 0x2 | 3 << 12

assert ctypes.sizeof(KvmRegs) == 144 and ctypes.sizeof(KvmSregs) == 312
assert ctypes.sizeof(KvmEnableCap) == 104

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.restype = ctypes.c_int


class KvmError(MigrationError):
    """An ioctl of KVM failed, or a vCPU exited for a reason this VMM does not serve."""


def _ioctl(fd: int, request: int, arg=0) -> int:
    """One ioctl; raises KvmError with the errno. A ctypes call releases the GIL meanwhile."""
    result = _libc.ioctl(fd, ctypes.c_ulong(request), arg)
    if result < 0:
        err = ctypes.get_errno()
        raise KvmError(f"ioctl {request:#x}: {os.strerror(err)}") from OSError(err, os.strerror(err))
    return result


def _ioctl_errno(fd: int, request: int, arg=0) -> tuple[int, int]:
    """One ioctl; (result, errno) without raising (KVM_RUN, whose EINTR is the stop)."""
    result = _libc.ioctl(fd, ctypes.c_ulong(request), arg)
    return result, (ctypes.get_errno() if result < 0 else 0)


def map_address(m: mmap.mmap) -> int:
    """The address of an mmap in this process (the slot's userspace_addr).

    The ctypes view exists only for this call: while one lives, the mmap
    cannot be closed.
    """
    view = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def probe() -> str:
    """Why KVM cannot be used here ("" when it can): /dev/kvm opens and speaks API 12."""
    try:
        fd = os.open(KVM_DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"{KVM_DEVICE_PATH}: {exc.strerror}"
    try:
        version = _ioctl(fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            return f"{KVM_DEVICE_PATH}: API version {version}, not {KVM_API_VERSION}"
        if not _ioctl(fd, KVM_CHECK_EXTENSION, KVM_CAP_IMMEDIATE_EXIT):
            return f"{KVM_DEVICE_PATH}: no KVM_CAP_IMMEDIATE_EXIT (a stop could miss a vCPU)"
    except KvmError as exc:
        return f"{KVM_DEVICE_PATH}: {exc}"
    finally:
        os.close(fd)
    return ""


@dataclass
class MemorySlot:
    """One memory slot: a memfd mapping at a guest-physical address."""

    slot: int
    guest_phys_addr: int
    size: int
    userspace_addr: int = 0
    logging: bool = False


class KvmVM:
    """``KVM_CREATE_VM``: memory slots, the dirty log, vCPUs. Every fd closed once, by :meth:`close`."""

    def __init__(self) -> None:
        self.kvm_fd = os.open(KVM_DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
        self.fd = -1
        try:
            if _ioctl(self.kvm_fd, KVM_GET_API_VERSION) != KVM_API_VERSION:
                raise KvmError(f"{KVM_DEVICE_PATH} speaks another API than version {KVM_API_VERSION}")
            self.vcpu_mmap_size = _ioctl(self.kvm_fd, KVM_GET_VCPU_MMAP_SIZE)
            self.fd = _ioctl(self.kvm_fd, KVM_CREATE_VM, 0)
            os.set_inheritable(self.fd, False)
            #: KVM_GET_DIRTY_LOG leaves pages writable and KVM_CLEAR_DIRTY_LOG protects them
            #: again: the two steps QEMU takes where the kernel has them
            self.manual_protect = False
            if _ioctl(self.kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2):
                cap = KvmEnableCap(cap=KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
                cap.args[0] = KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
                _ioctl(self.fd, KVM_ENABLE_CAP, ctypes.byref(cap))
                self.manual_protect = True
        except BaseException:
            self.close()
            raise
        self.slots: dict[int, MemorySlot] = {}
        self.vcpus: list[Vcpu] = []

    def set_slot(self, slot: MemorySlot, userspace_addr: int, logging: bool) -> None:
        """Point ``slot`` at ``userspace_addr`` with or without dirty logging.

        KVM changes only the flags of a slot in place; a new address (a
        destination that adopted or created its memfd) means deleting the
        slot and creating it again.
        """
        if slot.userspace_addr and slot.userspace_addr != userspace_addr:
            self._region(slot, slot.userspace_addr, 0, 0)
            slot.userspace_addr = 0
        self._region(slot, userspace_addr, slot.size, KVM_MEM_LOG_DIRTY_PAGES if logging else 0)
        slot.userspace_addr = userspace_addr
        slot.logging = logging
        self.slots[slot.slot] = slot

    def _region(self, slot: MemorySlot, addr: int, size: int, flags: int) -> None:
        region = KvmUserspaceMemoryRegion(slot=slot.slot, flags=flags, guest_phys_addr=slot.guest_phys_addr,
                                          memory_size=size, userspace_addr=addr)
        _ioctl(self.fd, KVM_SET_USER_MEMORY_REGION, ctypes.byref(region))

    def fetch_dirty_log(self, slot: MemorySlot, bitmap: np.ndarray) -> None:
        """KVM's dirty bits of ``slot`` into ``bitmap`` (u64 words, a bit a page); the log is reset.

        With manual protection the pages found dirty are write-protected again
        here, before anyone copies them: a write after this point is in the
        next fetch.
        """
        log = KvmDirtyLog(slot=slot.slot, dirty_bitmap=bitmap.ctypes.data)
        _ioctl(self.fd, KVM_GET_DIRTY_LOG, ctypes.byref(log))
        if self.manual_protect and bitmap.any():
            clear = KvmClearDirtyLog(slot=slot.slot, num_pages=slot.size // mmap.PAGESIZE, first_page=0,
                                     dirty_bitmap=bitmap.ctypes.data)
            _ioctl(self.fd, KVM_CLEAR_DIRTY_LOG, ctypes.byref(clear))

    def create_vcpu(self, index: int) -> "Vcpu":
        vcpu = Vcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        for vcpu in getattr(self, "vcpus", []):
            vcpu.close()
        self.fd = close_fd(self.fd)
        self.kvm_fd = close_fd(self.kvm_fd)


class Vcpu:
    """``KVM_CREATE_VCPU`` and its ``kvm_run`` page."""

    def __init__(self, vm: KvmVM, index: int):
        self.index = index
        self.fd = _ioctl(vm.fd, KVM_CREATE_VCPU, index)
        self.stats_fd = -1
        try:
            os.set_inheritable(self.fd, False)
            self.run_page = mmap.mmap(self.fd, vm.vcpu_mmap_size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            self.fd = close_fd(self.fd)
            raise
        try:
            self.stats_fd = _ioctl(self.fd, KVM_GET_STATS_FD)
            os.set_inheritable(self.stats_fd, False)
        except KvmError:
            pass  # a kernel before 5.14: no counters to show

    # -- running ------------------------------------------------------------------

    def run(self) -> tuple[int, int]:
        """``KVM_RUN`` until an exit: (exit reason, errno); EINTR is a stop's kick."""
        result, err = _ioctl_errno(self.fd, KVM_RUN)
        if result < 0:
            return -1, err
        return int.from_bytes(self.run_page[RUN_EXIT_REASON:RUN_EXIT_REASON + 4], "little"), 0

    def io_exit(self) -> tuple[int, int]:
        """The KVM_EXIT_IO being served: (direction, port)."""
        direction, _size, port = struct.unpack_from("<BBH", self.run_page, RUN_IO)
        return direction, port

    def set_immediate_exit(self, value: bool) -> None:
        self.run_page[RUN_IMMEDIATE_EXIT] = 1 if value else 0

    def tsc_khz(self) -> int:
        return _ioctl(self.fd, KVM_GET_TSC_KHZ)

    # -- state ------------------------------------------------------------------------

    def get_regs(self) -> KvmRegs:
        regs = KvmRegs()
        _ioctl(self.fd, KVM_GET_REGS, ctypes.byref(regs))
        return regs

    def set_regs(self, regs: KvmRegs) -> None:
        _ioctl(self.fd, KVM_SET_REGS, ctypes.byref(regs))

    def get_sregs(self) -> KvmSregs:
        sregs = KvmSregs()
        _ioctl(self.fd, KVM_GET_SREGS, ctypes.byref(sregs))
        return sregs

    def set_sregs(self, sregs: KvmSregs) -> None:
        _ioctl(self.fd, KVM_SET_SREGS, ctypes.byref(sregs))

    def get_tsc(self) -> int:
        msrs = KvmMsrs1(nmsrs=1)
        msrs.entries[0].index = MSR_IA32_TSC
        if _ioctl(self.fd, KVM_GET_MSRS, ctypes.byref(msrs)) != 1:
            raise KvmError("KVM_GET_MSRS did not read the TSC")
        return int(msrs.entries[0].data)

    def set_tsc(self, value: int) -> None:
        msrs = KvmMsrs1(nmsrs=1)
        msrs.entries[0].index = MSR_IA32_TSC
        msrs.entries[0].data = value
        if _ioctl(self.fd, KVM_SET_MSRS, ctypes.byref(msrs)) != 1:
            raise KvmError("KVM_SET_MSRS did not set the TSC")

    def stats(self) -> dict[str, int]:
        """KVM's own counters of this vCPU (``KVM_GET_STATS_FD``, Linux 5.14): exits, page
        faults taken and fixed, signal and interrupt exits... by the names KVM gives them;
        {} where the kernel has no binary stats. Histograms are left out. Reading them
        does not disturb a vCPU in KVM_RUN (the fd was taken when the vCPU was made:
        a vCPU ioctl would wait for KVM_RUN to return)."""
        return read_binary_stats(self.stats_fd) if self.stats_fd >= 0 else {}

    def close(self) -> None:
        if self.run_page is not None:
            self.run_page.close()
            self.run_page = None  # type: ignore[assignment]
        self.stats_fd = close_fd(self.stats_fd)
        self.fd = close_fd(self.fd)


#: struct kvm_stats_header and the fixed part of struct kvm_stats_desc (linux/kvm.h)
_STATS_HEADER = struct.Struct("<IIIIII")
_STATS_DESC = struct.Struct("<IhHII")


def read_binary_stats(fd: int) -> dict[str, int]:
    """Every single-valued counter of a KVM binary stats fd, by name."""
    header = os.pread(fd, _STATS_HEADER.size, 0)
    _flags, name_size, num_desc, _id_offset, desc_offset, data_offset = _STATS_HEADER.unpack(header)
    desc_size = _STATS_DESC.size + name_size
    descs = os.pread(fd, desc_size * num_desc, desc_offset)
    data = os.pread(fd, 1 << 16, data_offset)
    out: dict[str, int] = {}
    for i in range(num_desc):
        _flags, _exponent, size, offset, _bucket = _STATS_DESC.unpack_from(descs, i * desc_size)
        if size != 1:
            continue  # a histogram: one u64 a bucket
        raw = descs[i * desc_size + _STATS_DESC.size:(i + 1) * desc_size]
        name = raw.split(b"\0", 1)[0].decode("ascii", "replace")
        out[name] = struct.unpack_from("<Q", data, offset)[0]
    return out


def long_mode_user_sregs(sregs: KvmSregs, pml4_addr: int) -> None:
    """64-bit long mode at CPL 3 with paging from ``pml4_addr``, set directly (no firmware).

    No GDT is loaded: KVM takes the hidden parts of the segment registers as
    given, and this guest never reloads a selector. CPL 3 because nested on
    PVM only 64-bit user code runs natively (see migfd/accel/guest.S).
    """
    for name in ("ds", "es", "fs", "gs", "ss"):
        _flat(getattr(sregs, name), selector=0x23, type_=0x3, dpl=3)  # data, read/write, accessed
    _flat(sregs.cs, selector=0x2B, type_=0xB, dpl=3, long_mode=True)  # code, execute/read, accessed
    sregs.cr3 = pml4_addr
    sregs.cr4 |= CR4_PAE
    sregs.efer |= EFER_LME | EFER_LMA
    # Caches on: a reset vCPU has CR0.CD and CR0.NW set (a firmware clears them first thing).
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_PG) & ~(CR0_CD | CR0_NW)


def _flat(seg: KvmSegment, selector: int, type_: int, dpl: int, long_mode: bool = False) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = type_
    seg.present = 1
    seg.dpl = dpl
    seg.db = 0 if long_mode else 1
    seg.s = 1
    seg.l = 1 if long_mode else 0
    seg.g = 1
    seg.unusable = 0


EINTR = errno.EINTR
