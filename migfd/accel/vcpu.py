"""The KVM accelerator: vCPU threads in ``KVM_RUN`` over the memfd RAM, their ``cpu`` sections, KVM's dirty log.

Theory of operation. Each vCPU has a thread that enters ``KVM_RUN`` and
serves its exits. A stop (QEMU's pause_all_vcpus) asks every vCPU to leave:
it sets ``kvm_run.immediate_exit`` (a vCPU about to enter ``KVM_RUN`` returns
at once) and sends the thread :data:`SIG_KICK`, a handled signal, so a vCPU
inside ``KVM_RUN`` returns EINTR (a ctypes call is not retried by Python's
EINTR rule). The thread then saves its registers (the ``cpu`` section's
state), says it is parked and waits; the stop returns when every vCPU is
parked. A resume lets them enter ``KVM_RUN`` again, loading first any state
a destination received.

The guest idles when ``--guest-duty`` leaves it idle time: it writes to
:data:`~migfd.layout.IDLE_PORT` (it runs at CPL 3, where ``hlt`` is
privileged; see guest.S), which exits to this VMM, as ``hlt`` does without
an in-kernel irqchip; the VMM sleeps out the idle part (a stop cuts the
sleep short) and enters ``KVM_RUN`` again.

KVM binds a VM to the process that created it, so a destination never
receives one: it creates its own VM and vCPUs, maps the memfd it received
(or the one it copied pages into) as its memory slots at resume, and loads
the ``cpu`` sections into its vCPUs.
"""

from __future__ import annotations

import logging
import math
import signal
import struct
import threading
import time
from typing import Any

import numpy as np

from migfd.accel.base import Accelerator, GuestConfig, guest_ram
from migfd.accel.guest_code import GUEST_CODE
from migfd.accel.kvm import (
    EINTR,
    EXIT_NAMES,
    KVM_EXIT_HLT,
    KVM_EXIT_INTR,
    KVM_EXIT_IO,
    KVM_EXIT_IO_OUT,
    RFLAGS_BOOT,
    KvmError,
    KvmRegs,
    KvmSegment,
    KvmSregs,
    KvmVM,
    MemorySlot,
    Vcpu,
    long_mode_user_sregs,
    map_address,
)
from migfd.devices.base import Device, RunControl
from migfd.devices.memfd import PAGE, MemoryBackendMemfd
from migfd.errors import MigrationError
from migfd.layout import (
    GUEST_CODE_ADDR,
    GUEST_CODE_MAX_BYTES,
    IDLE_PORT,
    PD_ADDR,
    PD_COUNT,
    PDPT_ADDR,
    PML4_ADDR,
    MAILBOX_ADDR,
    MAILBOX_MAGIC,
    MAX_VCPUS,
    MB_BUSY_TSC,
    MB_CATCHUP_TSC,
    MB_MAGIC,
    MB_NCPUS,
    MB_TSC_PER_PAGE,
    MB_WS_FIRST,
    MB_WS_PAGES,
    STACK_BYTES,
    STACK_TOP,
    VCPU_PROGRESS_ADDR,
)
from migfd.stream import UInt32, UInt64, VMStateDescription
from migfd.threads import fine_timer_slack

log = logging.getLogger("migfd.accel")

#: the signal that kicks a vCPU out of KVM_RUN (QEMU's SIG_IPI)
SIG_KICK = signal.SIGUSR1
#: the guest addresses 32 bits: its working set ends below 4 GiB
GUEST_ADDRESSABLE_PAGES = (1 << 32) // PAGE
#: how far behind its pace a vCPU still catches up on stamps (after a hlt); beyond, it starts afresh
CATCHUP_S = 0.010

# -- the cpu section -----------------------------------------------------------------

#: the segment registers this guest has; each migrates as QEMU's vmstate_segment has
#: it (selector, base, limit, flags, with ``flags`` in the layout of a descriptor's
#: high word: type << 8, S, DPL, P, AVL, L, D/B, G), as four fields <seg>_<part>
#: rather than a nested struct: a run of plain integers is one unpack in the
#: compiled codec, inside the downtime
SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss")
SEGMENT_FIELDS = (("selector", UInt32), ("base", UInt64), ("limit", UInt32), ("flags", UInt32))
#: the general registers this guest uses, in kvm_regs' order
REGISTER_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp")
#: the control registers its mode is made of
CONTROL_NAMES = ("cr0", "cr3", "cr4", "efer")

#: QEMU's "cpu" section, cut to what this guest uses: general registers, RIP,
#: RFLAGS, the mode (CR0, CR3, CR4, EFER), the segments, and the TSC (which paces
#: the guest's stamps)
CPU_VMSD = VMStateDescription(
    "cpu", version_id=1, minimum_version_id=1,
    fields=tuple(UInt64(name) for name in REGISTER_NAMES + ("rip", "rflags") + CONTROL_NAMES + ("tsc",))
    + tuple(kind(f"{seg}_{part}") for seg in SEGMENT_NAMES for part, kind in SEGMENT_FIELDS))


def _segment_state(name: str, seg: KvmSegment) -> dict[str, int]:
    flags = ((seg.type & 0xF) << 8 | (seg.s & 1) << 12 | (seg.dpl & 3) << 13 | (seg.present & 1) << 15
             | (seg.avl & 1) << 20 | (seg.l & 1) << 21 | (seg.db & 1) << 22 | (seg.g & 1) << 23)
    return {f"{name}_selector": seg.selector, f"{name}_base": seg.base, f"{name}_limit": seg.limit,
            f"{name}_flags": flags}


def _load_segment(seg: KvmSegment, name: str, state: dict[str, int]) -> None:
    flags = state[f"{name}_flags"]
    seg.selector = state[f"{name}_selector"]
    seg.base = state[f"{name}_base"]
    seg.limit = state[f"{name}_limit"]
    seg.type = flags >> 8 & 0xF
    seg.s = flags >> 12 & 1
    seg.dpl = flags >> 13 & 3
    seg.present = flags >> 15 & 1
    seg.avl = flags >> 20 & 1
    seg.l = flags >> 21 & 1
    seg.db = flags >> 22 & 1
    seg.g = flags >> 23 & 1
    seg.unusable = 0 if seg.present else 1


def save_cpu(vcpu: Vcpu, mode: dict[str, Any] | None = None) -> dict[str, Any]:
    """A stopped vCPU's state as the ``cpu`` section holds it.

    ``mode``: the control and segment registers as this VMM last set them
    (:func:`mode_state`), taken instead of asking KVM. The guest runs at CPL 3,
    where it can change none of them, and each vCPU ioctl costs about 100 µs
    nested here, inside the downtime.
    """
    regs = vcpu.get_regs()
    state: dict[str, Any] = {name: getattr(regs, name) for name in REGISTER_NAMES + ("rip", "rflags")}
    state.update(mode if mode is not None else mode_state(vcpu.get_sregs()))
    state["tsc"] = vcpu.get_tsc()
    return state


def mode_state(sregs: KvmSregs) -> dict[str, Any]:
    """The control and segment registers of a ``cpu`` section."""
    state: dict[str, Any] = {name: getattr(sregs, name) for name in CONTROL_NAMES}
    for name in SEGMENT_NAMES:
        state.update(_segment_state(name, getattr(sregs, name)))
    return state


def load_cpu(vcpu: Vcpu, state: dict[str, Any], reset: KvmSregs) -> KvmSregs:
    """Put a ``cpu`` section's state into a vCPU that is not running; returns the mode set.

    Three ioctls, no reads, inside the downtime (each ~8 µs on a destination's
    vCPU, which has not run yet: measured 2026-12-07):
    the special registers start from ``reset`` (the fresh vCPU's, read when it
    was created), the general ones from zero (this guest uses none other than
    the section's).
    """
    sregs = KvmSregs.from_buffer_copy(reset)
    for name in SEGMENT_NAMES:
        _load_segment(getattr(sregs, name), name, state)
    for name in CONTROL_NAMES:
        setattr(sregs, name, state[name])
    vcpu.set_sregs(sregs)
    regs = KvmRegs()
    for name in REGISTER_NAMES + ("rip", "rflags"):
        setattr(regs, name, state[name])
    vcpu.set_regs(regs)
    # The TSC goes on from the source's value, as QEMU restores it: the guest's stamp
    # deadlines are in its terms. (Nested on PVM the guest reads the host's TSC, which
    # two processes on one host share anyway.)
    vcpu.set_tsc(state["tsc"])
    return sregs


def boot_cpu(vcpu: Vcpu) -> KvmSregs:
    """A fresh vCPU at the guest's entry: long mode at CPL 3, RSI = its index, its own stack;
    returns the mode set."""
    sregs = vcpu.get_sregs()
    long_mode_user_sregs(sregs, PML4_ADDR)
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip = GUEST_CODE_ADDR
    regs.rsp = STACK_TOP - vcpu.index * STACK_BYTES
    regs.rsi = vcpu.index
    regs.rflags = RFLAGS_BOOT
    vcpu.set_regs(regs)
    return sregs


def write_page_tables(ram) -> None:
    """Identity page tables for the first 4 GiB, 2 MiB pages, user-accessible (the guest runs at CPL 3)."""
    present_rw_user = 0x7
    large = 0x80
    struct.pack_into("<Q", ram, PML4_ADDR, PDPT_ADDR | present_rw_user)
    for gib in range(PD_COUNT):
        pd = PD_ADDR + gib * PAGE
        struct.pack_into("<Q", ram, PDPT_ADDR + 8 * gib, pd | present_rw_user)
        entries = np.arange(gib * 512, (gib + 1) * 512, dtype=np.uint64) << np.uint64(21)
        ram[pd:pd + PAGE] = (entries | np.uint64(present_rw_user | large)).astype("<u8").tobytes()


class CpuDevice(Device):
    """The ``cpu`` section of one vCPU (instance id = its index), as QEMU names it."""

    kind = "cpu"
    vmsd = CPU_VMSD

    def __init__(self, vcpu: "VcpuThread"):
        super().__init__(f"cpu{vcpu.index}")
        self.vcpu = vcpu
        self.instance_id = vcpu.index

    @property
    def section_name(self) -> str:
        return "cpu"

    def open_backend(self) -> None:
        pass

    def start_guest(self, ctl: RunControl) -> None:
        pass  # the accelerator runs the vCPU

    def save_state(self, handover: bool) -> dict[str, Any]:
        if self.vcpu.saved is None:
            raise MigrationError(f"vCPU {self.vcpu.index} has no state to save")
        return self.vcpu.saved

    def load_state(self, state: dict[str, Any], received_fds: tuple[int, ...]) -> None:
        self.vcpu.load(state)

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "instance-id": self.instance_id}


# -- the vCPU threads ------------------------------------------------------------------


class VcpuThread:
    """One vCPU and the thread that runs it; see the module docstring."""

    def __init__(self, accel: "KvmAccelerator", vcpu: Vcpu):
        self.accel = accel
        self.vcpu = vcpu
        self.index = vcpu.index
        self._cond = threading.Condition()
        self._want_run = False
        self._parked = False
        self._quit = False
        self._kick = threading.Event()  # cuts an idle sleep short
        #: set up the boot state before the next KVM_RUN (a fresh guest)
        self._boot = False
        #: the control and segment registers as this VMM set them last (see save_cpu)
        self._mode: dict[str, Any] | None = None
        #: the special registers of the fresh vCPU (what load_cpu starts from)
        self._reset_sregs = vcpu.get_sregs()
        #: the state saved at the last stop (what the cpu section sends)
        self.saved: dict[str, Any] | None = None
        self.exits: dict[str, int] = {}
        self.kicks = 0
        #: CLOCK_MONOTONIC ns this thread last entered the guest (KVM_RUN) after being parked
        self.entered_ns = 0
        #: set when this thread enters the guest after a resume (or finds it cannot)
        self.entered = threading.Event()
        #: the OS thread id (QEMU's query-cpus-fast "thread-id"), once the thread runs
        self.thread_id = 0
        self.error: str | None = None
        self.thread = threading.Thread(target=self._main, name=f"vcpu-{self.index}", daemon=True)

    def start(self) -> None:
        self.thread.start()
        with self._cond:
            self._cond.wait_for(lambda: self._parked or self._quit)

    # -- the controller's side --------------------------------------------------------

    def request_stop(self) -> None:
        with self._cond:
            self._want_run = False
            self.vcpu.set_immediate_exit(True)  # a KVM_RUN about to start returns at once
            parked = self._parked
        self._kick.set()
        if not parked and self.thread.is_alive():
            self.kicks += 1
            signal.pthread_kill(self.thread.ident, SIG_KICK)  # type: ignore[arg-type]

    def wait_parked(self, timeout_s: float) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._parked, timeout_s):
                raise MigrationError(f"vCPU {self.index} did not stop within {timeout_s:.1f} s")

    def resume(self) -> None:
        with self._cond:
            self.vcpu.set_immediate_exit(False)
            self._kick.clear()
            self.entered.clear()
            self._want_run = True
            self._cond.notify_all()

    def shutdown(self) -> None:
        with self._cond:
            self._quit = True
            self._want_run = False
            self._cond.notify_all()
        if self.thread.ident is None:
            return  # never started (the VM failed to build)
        self.request_stop()
        self.thread.join(10)

    # -- the vCPU's thread ------------------------------------------------------------

    def _main(self) -> None:
        self.thread_id = threading.get_native_id()
        fine_timer_slack()
        try:
            while True:
                with self._cond:
                    self._parked = True
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: self._want_run or self._quit)
                    if self._quit:
                        return
                    self._parked = False
                if self.error is not None:
                    self.entered.set()
                    continue  # a failed vCPU stays stopped, as QEMU's internal-error state
                try:
                    self._load()
                    # when this thread last got to run the guest: after a resume, what sits
                    # between the resume and the guest running is this thread's wake-up
                    self.entered_ns = time.monotonic_ns()
                    self.entered.set()
                    self._run()
                    self.saved = save_cpu(self.vcpu, self._mode)
                except Exception as exc:  # the vCPU stops for good; x-query-guest shows why
                    self.error = str(exc) if isinstance(exc, KvmError) else f"{type(exc).__name__}: {exc}"
                    log.error("vCPU %d: %s", self.index, self.error)
        finally:
            with self._cond:
                self._parked = True
                self._cond.notify_all()

    def load(self, state: dict[str, Any]) -> None:
        """A destination's cpu section into the parked vCPU, from the migration's thread.

        Loaded now, while the destination loads its devices, not by the vCPU's
        thread when it first runs: its ioctls (about 100 µs each, nested) would
        sit between the resume the migration reports and the guest running.
        """
        with self._cond:
            if not self._parked and self.thread.ident is not None:
                raise MigrationError(f"vCPU {self.index} runs: its state cannot be loaded")
            self._mode = mode_state(load_cpu(self.vcpu, state, self._reset_sregs))
            self._boot = False
            self.saved = state  # what it holds until it runs (a paused destination sends it on)

    def _load(self) -> None:
        if self._boot:
            self._mode = mode_state(boot_cpu(self.vcpu))
        self._boot = False

    def _run(self) -> None:
        """KVM_RUN until a stop; serves hlt exits (the duty cycle's idle part)."""
        idle_s = self.accel.idle_s
        while self._want_run:
            reason, err = self.vcpu.run()
            if reason < 0:
                if err == EINTR:
                    continue  # kicked: the loop looks at _want_run
                raise KvmError(f"KVM_RUN: errno {err}")
            name = EXIT_NAMES.get(reason, str(reason))
            self.exits[name] = self.exits.get(name, 0) + 1
            if reason == KVM_EXIT_IO and self.vcpu.io_exit() == (KVM_EXIT_IO_OUT, IDLE_PORT):
                if idle_s > 0:
                    self._kick.wait(idle_s)  # a stop sets it: the idle part ends at once
            elif reason not in (KVM_EXIT_HLT, KVM_EXIT_INTR):
                raise KvmError(f"vCPU {self.index} exited with '{name}' ({reason}) "
                               f"at eip {self.vcpu.get_regs().rip:#x}")

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "exits": dict(self.exits), "kicks": self.kicks,
                               "entered-ns": self.entered_ns, "thread-id": self.thread_id,
                               "kvm-stats": self.vcpu.stats()}
        if self.error:
            out["error"] = self.error
        return out


class KvmDirtyLogSource:
    """KVM's dirty log of one memory slot, as a RAM device's dirty bitmap sees it.

    :meth:`collect` ORs the pages KVM logged into the device's byte-a-page
    bitmap (which also holds what the VMM itself marked: all pages at the
    start of a migration).
    """

    def __init__(self, accel: "KvmAccelerator", slot: MemorySlot):
        self.accel = accel
        self.slot = slot
        self.npages = slot.size // PAGE
        self._bitmap = np.zeros(math.ceil(self.npages / 64), dtype=np.uint64)
        self.active = False
        #: fetches from KVM, and pages KVM reported dirty, since this VM started
        self.fetches = 0
        self.pages_logged = 0

    def start(self) -> None:
        self.accel.set_logging(self.slot, True)
        self.active = True

    def stop(self) -> None:
        if self.active:
            self.active = False
            self.accel.set_logging(self.slot, False)

    def collect(self, dirty: np.ndarray) -> None:
        if not self.active or not self.slot.userspace_addr:
            return
        self.accel.vm.fetch_dirty_log(self.slot, self._bitmap)
        self.fetches += 1
        if not self._bitmap.any():
            return
        bits = np.unpackbits(self._bitmap.view(np.uint8), bitorder="little", count=self.npages)
        self.pages_logged += int(np.count_nonzero(bits))
        np.bitwise_or(dirty, bits, out=dirty)

    def info(self) -> dict[str, Any]:
        return {"source": "kvm-clear" if self.accel.vm.manual_protect else "kvm",
                "active": self.active, "fetches": self.fetches, "pages-logged": self.pages_logged}


class KvmAccelerator(Accelerator):
    """``--accel kvm``; see the module docstring."""

    name = "kvm"

    def __init__(self, config: GuestConfig):
        super().__init__(config)
        if not 1 <= config.smp <= MAX_VCPUS:
            raise MigrationError(f"-smp {config.smp}: this guest runs 1 to {MAX_VCPUS} vCPUs")
        if not 0 < config.duty <= 1:
            raise MigrationError(f"--guest-duty {config.duty}: a fraction in (0, 1]")
        _install_kick_handler()
        self.vm = KvmVM()
        self.vcpus: list[VcpuThread] = []
        self.ram: list[MemoryBackendMemfd] = []
        self._slots: list[tuple[MemoryBackendMemfd, MemorySlot]] = []
        self._slot_lock = threading.Lock()
        self.tsc_khz = 0
        #: the idle part of each duty period, s (0: the guest never halts)
        self.idle_s = (1 - config.duty) * config.duty_period_us / 1e6 if config.duty < 1 else 0.0

    def attach(self, devices: list[Device]) -> list[Device]:
        ram = guest_ram(devices)
        self.ram = ram
        if not ram:
            return []  # a machine without memory (devices only): there is no guest code to run
        base = 0
        for number, dev in enumerate(ram):
            slot = MemorySlot(number, base, dev.size)
            base += dev.size
            self._slots.append((dev, slot))
            dev.dirty_log = KvmDirtyLogSource(self, slot)
            # The slot follows the RAM's mapping as soon as it changes: a destination
            # maps what it received while it loads devices, not after it resumed.
            dev.on_map.append(self._map_slots)
        for index in range(self.config.smp):
            self.vcpus.append(VcpuThread(self, self.vm.create_vcpu(index)))
        self.tsc_khz = self.vcpus[0].vcpu.tsc_khz()
        return [CpuDevice(v) for v in self.vcpus]

    def setup_firmware(self) -> None:
        """Guest code, mailbox and boot registers of a fresh guest (an incoming one has them in RAM)."""
        if not self.ram:
            return
        ram = self.ram[0]
        assert ram.map is not None
        if len(GUEST_CODE) > GUEST_CODE_MAX_BYTES:
            raise MigrationError("the guest code does not fit its place")
        ram.map[GUEST_CODE_ADDR:GUEST_CODE_ADDR + len(GUEST_CODE)] = GUEST_CODE
        write_page_tables(ram.map)
        first = ram.first_data_page
        last = min(ram.npages, GUEST_ADDRESSABLE_PAGES)
        ws_pages = last - first
        if self.config.working_set_bytes:
            ws_pages = min(ws_pages, max(1, self.config.working_set_bytes // PAGE))
        cfg = self.config
        tsc_hz = self.tsc_khz * 1000
        pages_per_s = cfg.dirty_rate_bytes_s / PAGE
        # Each vCPU stamps its share: n vCPUs at 1/n of the rate each.
        tsc_per_page = int(tsc_hz * cfg.smp / pages_per_s) if pages_per_s else 0
        busy_tsc = int(tsc_hz * cfg.duty * cfg.duty_period_us / 1e6) if cfg.duty < 1 else 0
        mb = MAILBOX_ADDR
        struct.pack_into("<IIIIQQI", ram.map, mb + MB_MAGIC, MAILBOX_MAGIC, cfg.smp, first, ws_pages,
                         max(tsc_per_page, 1) if pages_per_s else 0, busy_tsc,
                         min(int(tsc_hz * CATCHUP_S), 0xFFFFFFFF))
        assert (MB_NCPUS, MB_WS_FIRST, MB_WS_PAGES, MB_TSC_PER_PAGE, MB_BUSY_TSC, MB_CATCHUP_TSC) == (
            4, 8, 12, 16, 24, 32)
        for vcpu in self.vcpus:
            vcpu._boot = True
        self.working_set_pages = ws_pages

    def start(self, ctl: RunControl) -> None:
        if not self.vcpus:
            return
        for vcpu in self.vcpus:
            vcpu.start()
        ctl.add_runner(self)

    # -- RunControl's runner -----------------------------------------------------------

    def pause(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for vcpu in self.vcpus:
            vcpu.request_stop()
        for vcpu in self.vcpus:
            vcpu.wait_parked(max(deadline - time.monotonic(), 0.0))

    def resume(self) -> None:
        self._map_slots()
        for vcpu in self.vcpus:
            vcpu.resume()

    def wait_running(self, timeout_s: float) -> bool:
        """True once every vCPU entered the guest after the last resume (see RunControl.wait_running)."""
        deadline = time.monotonic() + timeout_s
        return all([vcpu.entered.wait(max(deadline - time.monotonic(), 0.0)) for vcpu in self.vcpus])

    def shutdown(self) -> None:
        for vcpu in self.vcpus:
            vcpu.shutdown()

    def close(self) -> None:
        self.shutdown()
        self.vm.close()

    # -- memory slots and the dirty log ----------------------------------------------------

    def _map_slots(self) -> None:
        """Each slot on its RAM's current mapping: a destination maps RAM it received just before."""
        with self._slot_lock:
            for dev, slot in self._slots:
                if dev.map is None:
                    continue
                addr = map_address(dev.map)
                if addr != slot.userspace_addr:
                    self.vm.set_slot(slot, addr, slot.logging)

    def set_logging(self, slot: MemorySlot, logging: bool) -> None:
        with self._slot_lock:
            if slot.userspace_addr:
                self.vm.set_slot(slot, slot.userspace_addr, logging)
            else:
                slot.logging = logging  # taken when the slot is mapped

    def info(self) -> dict[str, Any]:
        out = super().info()
        ram = self.ram[0] if self.ram else None
        vcpus = []
        for vcpu in self.vcpus:
            entry = vcpu.info()
            if ram is not None and ram.map is not None:
                (entry["progress"],) = struct.unpack_from("<I", ram.map, VCPU_PROGRESS_ADDR + 4 * vcpu.index)
            vcpus.append(entry)
        out.update({"smp": len(self.vcpus), "tsc-khz": self.tsc_khz, "duty": self.config.duty,
                    "duty-period-us": self.config.duty_period_us, "vcpus": vcpus,
                    "dirty-log": "kvm-clear" if self.vm.manual_protect else "kvm"})
        return out


def _kick(signum, frame) -> None:
    """Nothing to do: the signal's work is done when KVM_RUN returns EINTR."""


def _install_kick_handler() -> None:
    # A handled signal, not an ignored one: an ignored signal is never
    # delivered and would not interrupt KVM_RUN. Only the main thread may set it.
    if signal.getsignal(SIG_KICK) is not _kick:
        signal.signal(SIG_KICK, _kick)

