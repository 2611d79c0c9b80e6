"""The source of a migration (``migrate``): setup, precopy of dirty RAM, the final stage, the commit point.

Before the commit point every failure or cancel rolls back: the source
re-attaches what it let go of and resumes the guest. After it the source
releases its backends and never resumes.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from typing import Callable, Iterable

import numpy as np

from migfd.channel import QEMUFile
from migfd.devices.base import Device
from migfd.devices.memfd import PAGE, MemoryBackendMemfd
from migfd.errors import ChannelError, MigrationError
from migfd.fds import close_fd
from migfd.migration.base import (
    MIGRATION_SECTION,
    MIGRATION_VMSD,
    RP_RESUMED,
    MigrationBase,
    MigrationHost,
    MigrationStatus,
    read_rp,
)
from migfd.params import MigrationParameters
from migfd.stream import PageBatch, RamBlock, ReturnPathMessage, StreamWriter
from migfd.stream.multifd import header_bytes
from migfd.stream.ram import nonzero_pages
from migfd.threads import idle_priority
from migfd.transport import Address, FileAddress, connect_outgoing

__all__ = ["BATCH_PAGES", "OutgoingMigration", "reattach_with_retry"]

log = logging.getLogger("migfd.migration")

#: pages per batch the source encodes at once (4 MiB): each batch costs a few
#: numpy calls and one iovec (two writev calls of IOV_MAX entries), so fewer
#: batches are less Python per MiB; 1024 against 256 made the non-live copy 0.81
#: [0.46, 0.96] as long at 256 MiB and 0.86 [0.79, 0.98] at 64 MiB (3 runs
#: alternating, 2026-12-07). It bounds the copy made of scattered dirty pages.
BATCH_PAGES = 1024
#: kernel send buffer of the migration socket: room for several batches, so
#: encoding on the source and parsing on the destination overlap
SEND_BUFFER_BYTES = 4 << 20


class OutgoingMigration(MigrationBase):
    """``migrate``: runs in its own thread; see the module docstring."""

    def __init__(self, vm: MigrationHost, address: Address, params: MigrationParameters,
                 on_status: Callable[[MigrationStatus], None]):
        super().__init__(vm, params, on_status)
        self.address = address
        self.file: QEMUFile | None = None
        self.cancel_requested = threading.Event()
        self.was_running = False
        self.stopped_here = False
        self.detached: list[Device] = []
        self.handover = {id(d): d.handover(params.backend_transfer) for d in vm.devices}
        self.stats.start_ns = time.monotonic_ns()
        self._commit_lock = threading.Lock()
        #: fds this migration owns (an ``fd:`` channel taken with getfd), closed when it ends
        self.owned_fds: list[int] = []
        #: x-early-fds: the backend generation of each device whose fds went during setup
        self.early: dict[int, int] = {}

    def start(self) -> None:
        self.set_status(MigrationStatus.SETUP)
        self.thread = threading.Thread(target=self._run, name="migration-outgoing", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        """migrate_cancel: honoured until the commit point, ignored after it."""
        # The lock makes "cancel" and "commit" exclusive: a cancel that lands
        # between the PONG and the commit wins, and the commit does not happen.
        with self._commit_lock:
            if self.stats.committed or self.finished.is_set():
                return
            self.cancel_requested.set()
        self.set_status(MigrationStatus.CANCELLING)
        if self.file is not None:
            self.file.shutdown()

    def _check_cancel(self) -> None:
        if self.cancel_requested.is_set():
            raise MigrationError("migration cancelled")

    def _run(self) -> None:
        try:
            self._setup()
            self._precopy()
            self._complete()
        except Exception as exc:  # every failure ends in _rollback, whatever it was
            self.switchover_priority(False)
            self._rollback(exc)
        finally:
            self.vm.release_events()
            if self.file is not None:
                self.file.close()
            for fd in self.owned_fds:
                close_fd(fd)
            self.owned_fds = []
            self.finished.set()

    # -- setup ------------------------------------------------------------

    def copied_ram(self) -> list[MemoryBackendMemfd]:
        return [d for d in self.ram_devices() if not self.handover[id(d)]]

    def _setup(self) -> None:
        self.file = connect_outgoing(self.address, self.params, timeout_s=self.timeout_s)
        self.file.settimeout(self.timeout_s)
        self.file.set_send_buffer(SEND_BUFFER_BYTES)
        self.file.timeline = self.timeline
        self.hook("setup")
        self._check_cancel()
        self.writer = StreamWriter(self.file)
        w = self.writer
        w.write_header()
        w.write_configuration(self.vm.machine, self.params.capabilities())
        self.return_path = not isinstance(self.address, FileAddress)
        if self.return_path:
            w.write_open_return_path()
        if self.params.x_early_fds and self.params.backend_transfer:
            self._send_early_fds()
        ram = self.copied_ram()
        for dev in ram:
            dev.start_dirty_log()  # KVM logs the guest's writes from here; every page dirty first
        w.write_ram_start([RamBlock(d.block_id, d.size) for d in ram])
        if self.return_path:
            # Wait until the destination has read this far: its connection, its
            # thread waking up and its RAM allocation (at the RAM START) are then
            # behind us, not inside the downtime of a migration that stops at once.
            cookie = self._setup_cookie()
            w.write_ping(cookie)
            self.file.flush()
            with self.timeline.phase("wait-setup-pong"):
                self._wait_pong(cookie)
        else:
            self.file.flush()
        self.stats.ram_total = sum(d.size for d in ram)
        self.stats.ram_remaining = self.stats.ram_total
        self.stats.setup_done_ns = time.monotonic_ns()
        self.timeline.add("setup", self.stats.start_ns, self.stats.setup_done_ns)
        if not self._will_precopy():
            # The stop follows at once: an "active" event sent now would wake the
            # QMP thread and its client just before it, while the guest's own
            # threads need the GIL and the CPU. It goes out, with its time, after.
            self.vm.hold_events()
        self.set_status(MigrationStatus.ACTIVE)

    def _send_early_fds(self) -> None:
        """x-early-fds: every handed-over device's section, its fds with it, while the guest runs.

        cpr-transfer's order: the destination validates and adopts the fds now
        (the setup PING that follows returns only after it has), so the
        switchover carries the state alone. The guest goes on using its
        backends meanwhile: both processes hold the same open files, and the
        destination touches none until it runs. A device whose backend changes
        after this (a chardev client that reconnects) sends its fds again at the
        switchover, which its backend generation tells.
        """
        f = self.file
        assert f is not None
        with self.timeline.phase("early-fds"):
            for dev in self.vm.devices:
                if not self.handover[id(dev)]:
                    continue
                # The fds read must stay the ones sent: the guest thread is kept
                # out of its turns (where it accepts and drops clients) until the
                # message that carries them has left.
                with dev.backend_held():
                    self.writer.write_section_full(dev.section_name, dev.instance_id, dev.vmsd,
                                                   dev.save_state(True))
                    f.flush()
                    self.early[id(dev)] = dev.backend_generation
        self.stats.early_fds = f.fds_sent
        self.hook("early-fds")

    # -- precopy ----------------------------------------------------------

    def _pages(self, devices: list[MemoryBackendMemfd], paced: bool) -> Iterable[PageBatch]:
        """Dirty pages in batches (numpy), paced by max-bandwidth on the bytes that travel.

        A zero page costs a 9-byte record, a normal one 8 + 4096 bytes, as in
        QEMU's rate limit; in packets (x-multifd-packets) the header and the
        normal pages.
        """
        start = time.monotonic()
        sent = 0
        limit = self.params.max_bandwidth
        for dev in devices:
            dirty = dev.sync_dirty_bitmap()
            for first in range(0, len(dirty), BATCH_PAGES):
                index = dirty[first:first + BATCH_PAGES]
                # A view of guest RAM where the pages are consecutive: the records
                # are sent from it. Correct in precopy too: a page the guest
                # changes meanwhile is dirty again and goes again, as in QEMU.
                rows = dev.page_rows(index)
                nonzero = nonzero_pages(rows)
                normal = int(nonzero.sum())
                self.stats.normal_pages += normal
                self.stats.duplicate_pages += len(index) - normal
                if self.writer.packets:
                    sent += header_bytes(len(index)) + normal * PAGE
                else:
                    sent += normal * (8 + PAGE) + (len(index) - normal) * 9
                yield PageBatch(dev.block_id, index.astype(np.uint64) * PAGE, rows, nonzero)
                if paced:
                    self._check_cancel()
                    ahead = sent / limit - (time.monotonic() - start) if limit else 0
                    if ahead > 0:
                        # A batch goes out at once and the pause comes after it; a
                        # migrate_cancel must not wait for the pause to end.
                        self.cancel_requested.wait(ahead)
                        self._check_cancel()

    def _will_precopy(self) -> bool:
        """Whether RAM goes while the guest runs (else the final stage follows the setup at once)."""
        return bool(self.copied_ram()) and self.params.x_max_iterations != 0 and self.vm.running

    def _precopy(self) -> None:
        if not self._will_precopy():
            return  # nothing to copy, or non-live: everything goes in the final stage
        ram = self.copied_ram()
        while True:
            self.stats.iterations += 1
            self.hook(f"precopy-{self.stats.iterations}")
            t0 = time.monotonic_ns()
            written = self.writer.write_ram_part(self._pages(ram, paced=True))
            self.file.flush()  # type: ignore[union-attr]
            t1 = time.monotonic_ns()
            self.timeline.add("precopy", t0, t1)
            elapsed = max((t1 - t0) / 1e9, 1e-6)
            self.stats.ram_transferred += written
            remaining = sum(d.dirty_pages() for d in ram) * PAGE
            self.stats.ram_remaining = remaining
            bandwidth = written / elapsed
            self.stats.expected_downtime_ms = int(remaining / bandwidth * 1000)
            self._check_cancel()
            if (remaining == 0 or self.stats.expected_downtime_ms <= self.params.downtime_limit
                    or self.stats.iterations >= self.params.x_max_iterations):
                return

    # -- the final stage and the commit point ---------------------------------

    def _complete(self) -> None:
        w = self.writer
        f = self.file
        tl = self.timeline
        assert f is not None
        self.was_running = self.vm.running
        self.vm.hold_events()  # until the destination runs (or the source resumes)
        self.switchover_priority(True)
        if self.was_running:
            self.stats.stop_ns = self.vm.vm_stop("finish-migrate")
            self.stopped_here = True
            # From the stop on, the phases follow each other with no hole: the
            # timeline accounts for every ns of this thread's part of the downtime.
            chain = tl.chain(self.stats.stop_ns)
            chain.lap("stop")
        else:
            self.stats.stop_ns = self.vm.stopped_at_ns
            tl.add("stop", self.stats.stop_ns)  # stopped before the migration: a point
            chain = tl.chain(time.monotonic_ns())
        self.set_status(MigrationStatus.DEVICE)
        self.hook("device")
        with chain.phase("switchover-start"):
            w.write_switchover_start()
        if self.stats.ram_total:
            with chain.phase("iterable-save"):
                written = w.write_ram_part(self._pages(self.copied_ram(), paced=False), end=True)
            self.stats.ram_transferred += written
            self.stats.ram_remaining = 0
        before = f.bytes_written
        with chain.phase("device-save"):
            sections = tl.chain(chain.last_ns)
            for dev in self.vm.devices:
                handover = self.handover[id(dev)]
                if not handover:
                    dev.detach()
                    self.detached.append(dev)
                elif self.early.get(id(dev)) == dev.backend_generation:
                    handover = False  # its fds are at the destination already, and still the same
                self.hook(f"device-{dev.id}")
                w.write_section_full(dev.section_name, dev.instance_id, dev.vmsd, dev.save_state(handover))
                sections.lap(f"save:{dev.section_name}")
            # Like QEMU's globalstate: a guest paused before the migration stays paused.
            w.write_section_full(MIGRATION_SECTION, 0, MIGRATION_VMSD,
                                 {"stop_ns": self.stats.stop_ns, "running": self.was_running})
            sections.lap(f"save:{MIGRATION_SECTION}")
        self.stats.device_state_bytes = f.bytes_written - before
        if self.return_path:
            cookie = self.stats.start_ns & 0xFFFFFFFF
            self.hook("before-ack")  # all state sent; the PING asks for the acknowledgement
            with chain.phase("ping"):
                w.write_ping(cookie)
                f.flush()
            # The device description is built while the destination loads and
            # validates: it then leaves with EOF, and the destination, which
            # reads it before it runs the guest (QEMU's order), waits for nothing.
            with chain.phase("vmdesc-build"):
                vmdesc = w.vmdesc_record()
            with chain.phase("wait-pong"):
                self._wait_pong(cookie)
        else:
            vmdesc = w.vmdesc_record()
        self._commit()
        self.hook("after-ack")
        with chain.phase("eof"):
            w.write_eof()
            w.write_vmdesc(vmdesc)
            f.flush()
        self.switchover_priority(False)  # all this side does inside the downtime is done
        self._account(f)
        if self.return_path:
            with chain.phase("wait-resumed"):
                self._wait_resumed()
        self.vm.release_events()
        # The migration is over (total-time ends here). Only now let go of the
        # backends: closing them (unmapping GiBs of RAM) takes a core for
        # milliseconds, which must not be the destination's downtime, and is
        # the source's cleanup as QEMU's is: not part of the migration's time.
        # If the destination never reports, _rollback releases them.
        self.stats.end_ns = time.monotonic_ns()
        # The release runs on a core the destination's guest may need: at the
        # lowest priority there is, it takes only what nobody else wants.
        idle_priority()
        with chain.phase("release"):
            release_start = time.monotonic_ns()
            for dev in self.vm.devices:
                dev.release()
            self.stats.release_ns = time.monotonic_ns() - release_start
        self.set_status(MigrationStatus.COMPLETED)

    def _setup_cookie(self) -> int:
        """The PING value that ends setup (the final one is :attr:`stats.start_ns` & 0xffffffff)."""
        return (self.stats.start_ns + 1) & 0xFFFFFFFF

    def _wait_pong(self, cookie: int) -> None:
        f = self.file
        assert f is not None
        while True:
            kind, payload = read_rp(f)
            if kind == ReturnPathMessage.PONG and payload == struct.pack(">I", cookie):
                return
            if kind == ReturnPathMessage.SHUT:
                raise MigrationError("the destination failed to load the migration stream")
            raise MigrationError(f"unexpected return-path message {kind} before the acknowledgement")

    def _commit(self) -> None:
        """From here on the destination owns the backends."""
        with self._commit_lock:
            self._check_cancel()
            self.stats.committed = True
        self.timeline.mark("commit")
        self.vm.set_runstate("postmigrate")

    def _wait_resumed(self) -> None:
        f = self.file
        assert f is not None
        try:
            # RESUMED, then SHUT(0) as QEMU's destination ends its return path;
            # reading both lets the destination close first.
            while True:
                kind, payload = read_rp(f)
                if kind == RP_RESUMED and len(payload) == 8:
                    self.stats.resume_ns = struct.unpack(">Q", payload)[0]
                elif kind == ReturnPathMessage.SHUT:
                    if payload != struct.pack(">I", 0) or not self.stats.resume_ns:
                        raise MigrationError("the destination failed after the commit point")
                    return
        except ChannelError as exc:
            raise MigrationError(f"no resume report from the destination: {exc}") from exc

    def _account(self, f: QEMUFile) -> None:
        self.stats.bytes_sent = f.bytes_sent
        self.stats.fds_passed = f.fds_sent
        self.stats.fd_messages = f.fd_messages

    def _rollback(self, exc: Exception) -> None:
        start = time.monotonic_ns()
        status = self._roll_back(exc)
        # recorded before the status changes: query-migrate then shows it
        self.timeline.add("rollback", start, time.monotonic_ns())
        self.set_status(status)

    def _roll_back(self, exc: Exception) -> MigrationStatus:
        """Undo what can be undone; returns the status the migration ends in."""
        message = str(exc) if isinstance(exc, MigrationError) else f"{type(exc).__name__}: {exc}"
        if self.file is not None:
            self._account(self.file)
        if self.stats.committed:
            # The destination owns the backends now; resuming here would run the guest twice.
            log.error("migration failed after the commit point: %s", message)
            # Nor may the source keep copies of them (an EOF that could not be
            # sent skips the release in _complete; releasing twice is harmless).
            for dev in self.vm.devices:
                dev.release()
            self.stats.error = message
            return MigrationStatus.FAILED
        log.warning("migration failed before the commit point, source resumes: %s", message)
        if self.file is not None:
            self.file.close()
        problems = []
        for dev in self.detached:
            try:
                reattach_with_retry(dev)
            except MigrationError as err:
                problems.append(str(err))
        if self.stopped_here:
            self.vm.vm_start()
        for dev in self.copied_ram():
            dev.stop_dirty_log()  # the guest runs unlogged again
            dev.mark_all_dirty()
        self.stats.error = "; ".join([message] + problems)
        return MigrationStatus.CANCELLED if self.cancel_requested.is_set() else MigrationStatus.FAILED


def reattach_with_retry(dev: Device, attempts: int = 50) -> None:
    """A destination that is still closing may hold a TAP for a moment (EBUSY)."""
    for attempt in range(attempts):
        try:
            dev.reattach()
            return
        except MigrationError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.1)

