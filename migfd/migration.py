"""Source and destination of one migration: precopy, switchover, the commit point.

Theory of operation
-------------------
Source (:class:`OutgoingMigration`, one thread): setup (connect, header,
configuration with capabilities, OPEN_RETURN_PATH, RAM START listing the
blocks whose pages travel), then precopy iterations of dirty pages while the
guest runs, until what remains fits downtime-limit at the measured bandwidth.
Then the guest stops, and the final stage sends SWITCHOVER_START, the last
dirty pages, every device section (a device handing its backend over puts
its fds in the stream, a device copying state lets go of its backend first),
and a PING.

The commit point is the PONG. The destination answers the PING only after it
has loaded and validated every section, without running anything. Before the
PONG the source owns every backend: any failure or cancel closes the channel,
re-attaches what it let go of and resumes the guest, and the destination
closes everything it received. After the PONG the destination owns them: the
source sends EOF (the destination's signal to run the guest) and releases its
copies, and never resumes. At no moment do both run the guest.

Downtime is CLOCK_MONOTONIC from the source's stop (sent in the stream) to the
destination's resume (sent back on the return path); both processes read the
same clock, so both sides report the same number.
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np
from typing import Any, Callable, Iterable, Protocol

from migfd.channel import QEMUFile
from migfd.devices.base import Device, close_fd
from migfd.devices.memfd import PAGE, MemoryBackendMemfd
from migfd.errors import ChannelError, MigrationError
from migfd.params import MigrationParameters, check_capabilities
from migfd.stream import reader as ev
from migfd.stream.constants import Command, ReturnPathMessage
from migfd.stream.ram import PageBatch, RamBlock
from migfd.stream.reader import StreamReader
from migfd.stream.vmstate import Bool, UInt64, VMStateDescription
from migfd.stream.writer import StreamWriter
from migfd.transport import (
    Address, FileAddress, IncomingListener, connect_outgoing, open_incoming_file,
)

log = logging.getLogger("migfd.migration")

#: migfd's own section: when the source stopped the guest (CLOCK_MONOTONIC ns).
MIGRATION_SECTION = "migfd-migration"
MIGRATION_VMSD = VMStateDescription("migfd-migration", version_id=1, minimum_version_id=1,
                                    fields=(UInt64("stop_ns"), Bool("running")))
#: pages per batch the source encodes at once (16 MiB): bounds the copy it makes
BATCH_PAGES = 4096
#: migfd's return-path message after the destination resumed: be64 CLOCK_MONOTONIC ns.
RP_RESUMED = 0x4D46


class MigrationStatus(str, enum.Enum):
    """QEMU's MigrationStatus values, as query-migrate and MIGRATION events spell them."""

    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"  #: guest stopped, final state being sent
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


@dataclass
class MigrationStats:
    """Everything query-migrate reports, in ns internally."""

    status: MigrationStatus = MigrationStatus.NONE
    start_ns: int = 0
    setup_done_ns: int = 0
    end_ns: int = 0
    stop_ns: int = 0
    resume_ns: int = 0
    ram_total: int = 0
    ram_transferred: int = 0
    ram_remaining: int = 0
    duplicate_pages: int = 0
    normal_pages: int = 0
    iterations: int = 0
    expected_downtime_ms: int = 0
    fds_passed: int = 0
    fd_messages: int = 0
    bytes_sent: int = 0
    device_state_bytes: int = 0
    committed: bool = False
    error: str | None = None

    @property
    def downtime_ns(self) -> int | None:
        if self.stop_ns and self.resume_ns:
            return self.resume_ns - self.stop_ns
        return None

    def to_qmp(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status.value}
        if self.status is MigrationStatus.NONE:
            return out
        now = self.end_ns or time.monotonic_ns()
        out["total-time"] = (now - self.start_ns) // 1_000_000
        if self.setup_done_ns:
            out["setup-time"] = (self.setup_done_ns - self.start_ns) // 1_000_000
        if self.status is MigrationStatus.ACTIVE:
            out["expected-downtime"] = self.expected_downtime_ms
        downtime = self.downtime_ns
        if downtime is not None:
            out["downtime"] = downtime // 1_000_000
            out["x-downtime-us"] = downtime // 1_000
            out["x-downtime-ns"] = downtime
        out["ram"] = {
            "transferred": self.ram_transferred, "remaining": self.ram_remaining,
            "total": self.ram_total, "duplicate": self.duplicate_pages,
            "normal": self.normal_pages, "normal-bytes": self.normal_pages * PAGE,
            "dirty-sync-count": self.iterations, "page-size": PAGE,
        }
        out["x-fds-passed"] = self.fds_passed
        out["x-fd-messages"] = self.fd_messages
        out["x-bytes-sent"] = self.bytes_sent
        out["x-device-state-bytes"] = self.device_state_bytes
        out["x-committed"] = self.committed
        out["x-total-time-ns"] = now - self.start_ns
        if self.setup_done_ns:
            out["x-setup-time-ns"] = self.setup_done_ns - self.start_ns
        if self.error:
            out["error-desc"] = self.error
        return out


class MigrationHost(Protocol):
    """What a migration needs of its VM (implemented by :class:`migfd.vm.VM`)."""

    machine: str
    devices: list[Device]

    def vm_stop(self, runstate: str) -> int: ...  # returns the stop time, ns

    def vm_start(self) -> int: ...  # returns the resume time, ns

    @property
    def running(self) -> bool: ...

    @property
    def stopped_at_ns(self) -> int: ...

    def set_runstate(self, runstate: str) -> None: ...


class _Migration:
    """What both directions share: status changes with events, the stats."""

    def __init__(self, vm: MigrationHost, params: MigrationParameters,
                 on_status: Callable[[MigrationStatus], None]):
        self.vm = vm
        self.params = params
        self.stats = MigrationStats()
        self._on_status = on_status
        self.thread: threading.Thread | None = None
        self.finished = threading.Event()
        #: called with each phase name (see migfd.faults); does nothing unless a fault is armed
        self.hook: Callable[[str], None] = lambda phase: None

    def set_status(self, status: MigrationStatus) -> None:
        self.stats.status = status
        if status in (MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED):
            self.stats.end_ns = time.monotonic_ns()
        self._on_status(status)

    @property
    def timeout_s(self) -> float:
        return self.params.x_channel_timeout_ms / 1000

    def ram_devices(self) -> list[MemoryBackendMemfd]:
        return [d for d in self.vm.devices if isinstance(d, MemoryBackendMemfd)]


def _write_rp(f: QEMUFile, kind: int, payload: bytes = b"") -> None:
    f.put_buffer(struct.pack(">HH", kind, len(payload)) + payload)
    f.flush()


def _read_rp(f: QEMUFile) -> tuple[int, bytes]:
    kind = f.get_be16()
    length = f.get_be16()
    return kind, f.get_buffer(length)


# --------------------------------------------------------------------------
# Source


class OutgoingMigration(_Migration):
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
            self._rollback(exc)
        finally:
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
        self.hook("setup")
        self._check_cancel()
        self.writer = StreamWriter(self.file)
        w = self.writer
        w.write_header()
        w.write_configuration(self.vm.machine, self.params.capabilities())
        self.return_path = not isinstance(self.address, FileAddress)
        if self.return_path:
            w.write_open_return_path()
        ram = self.copied_ram()
        for dev in ram:
            dev.mark_all_dirty()
        w.write_ram_start([RamBlock(d.block_id, d.size) for d in ram])
        self.file.flush()
        self.stats.ram_total = sum(d.size for d in ram)
        self.stats.ram_remaining = self.stats.ram_total
        self.stats.setup_done_ns = time.monotonic_ns()
        self.set_status(MigrationStatus.ACTIVE)

    # -- precopy ----------------------------------------------------------

    def _pages(self, devices: list[MemoryBackendMemfd], paced: bool) -> Iterable[PageBatch]:
        """Dirty pages in batches (numpy), paced by max-bandwidth on the bytes that travel.

        A zero page costs a 9-byte record, a normal one 8 + 4096 bytes, as in
        QEMU's rate limit.
        """
        start = time.monotonic()
        sent = 0
        limit = self.params.max_bandwidth
        for dev in devices:
            dirty = dev.sync_dirty_bitmap()
            ram = dev.pages_array()
            for first in range(0, len(dirty), BATCH_PAGES):
                index = dirty[first:first + BATCH_PAGES]
                rows = ram[index]
                nonzero = rows.any(axis=1)
                normal = int(nonzero.sum())
                self.stats.normal_pages += normal
                self.stats.duplicate_pages += len(index) - normal
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

    def _precopy(self) -> None:
        ram = self.copied_ram()
        if not ram:
            return
        if self.params.x_max_iterations == 0 or not self.vm.running:
            return  # non-live: everything goes in the final stage
        while True:
            self.stats.iterations += 1
            self.hook(f"precopy-{self.stats.iterations}")
            t0 = time.monotonic()
            written = self.writer.write_ram_part(self._pages(ram, paced=True))
            self.file.flush()  # type: ignore[union-attr]
            elapsed = max(time.monotonic() - t0, 1e-6)
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
        assert f is not None
        self.was_running = self.vm.running
        if self.was_running:
            self.stats.stop_ns = self.vm.vm_stop("finish-migrate")
            self.stopped_here = True
        else:
            self.stats.stop_ns = self.vm.stopped_at_ns
        self.set_status(MigrationStatus.DEVICE)
        self.hook("device")
        w.write_switchover_start()
        if self.stats.ram_total:
            written = w.write_ram_part(self._pages(self.copied_ram(), paced=False), end=True)
            self.stats.ram_transferred += written
            self.stats.ram_remaining = 0
        before = f.bytes_written
        for dev in self.vm.devices:
            handover = self.handover[id(dev)]
            if not handover:
                dev.detach()
                self.detached.append(dev)
            self.hook(f"device-{dev.id}")
            w.write_section_full(dev.section_name, 0, dev.vmsd, dev.save_state(handover))
        # Like QEMU's globalstate: a guest paused before the migration stays paused.
        w.write_section_full(MIGRATION_SECTION, 0, MIGRATION_VMSD,
                             {"stop_ns": self.stats.stop_ns, "running": self.was_running})
        self.stats.device_state_bytes = f.bytes_written - before
        if self.return_path:
            cookie = self.stats.start_ns & 0xFFFFFFFF
            self.hook("before-ack")  # all state sent; the PING asks for the acknowledgement
            w.write_ping(cookie)
            f.flush()
            self._wait_pong(cookie)
        self._commit()
        self.hook("after-ack")
        w.write_eof()
        w.write_vmdesc()
        f.flush()
        self._account(f)
        if self.return_path:
            self._wait_resumed()
        # Only now let go of the backends: closing them (unmapping GiBs of RAM)
        # takes a core for milliseconds, which must not be the destination's
        # downtime. If the destination never reports, _rollback releases them.
        for dev in self.vm.devices:
            dev.release()
        self.set_status(MigrationStatus.COMPLETED)

    def _wait_pong(self, cookie: int) -> None:
        f = self.file
        assert f is not None
        while True:
            kind, payload = _read_rp(f)
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
        self.vm.set_runstate("postmigrate")

    def _wait_resumed(self) -> None:
        f = self.file
        assert f is not None
        try:
            # RESUMED, then SHUT(0) as QEMU's destination ends its return path;
            # reading both lets the destination close first.
            while True:
                kind, payload = _read_rp(f)
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
            self.set_status(MigrationStatus.FAILED)
            return
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
            dev.mark_all_dirty()
        self.stats.error = "; ".join([message] + problems)
        cancelled = self.cancel_requested.is_set()
        self.set_status(MigrationStatus.CANCELLED if cancelled else MigrationStatus.FAILED)


_ZERO_PAGE = bytes(PAGE)


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


# --------------------------------------------------------------------------
# Destination


class IncomingMigration(_Migration):
    """``migrate-incoming`` / ``--incoming``: listen, load, resume at EOF."""

    def __init__(self, vm: MigrationHost, address: Address, params: MigrationParameters,
                 on_status: Callable[[MigrationStatus], None]):
        super().__init__(vm, params, on_status)
        self.address = address
        self.listener: IncomingListener | None = None
        self.file: QEMUFile | None = None
        if not isinstance(address, FileAddress):
            # Listening now (not in the thread) so a wrong transport fails the command.
            self.listener = IncomingListener(address, params)
        self.reader = StreamReader(self._lookup, ram_runs=True)
        self._states: dict[str, tuple[dict, tuple[int, ...]]] = {}
        self._loaded = False
        #: fds received in device sections and not yet adopted by a device
        self._received: list[int] = []
        self.return_path = False
        self._by_section = {d.section_name: d for d in vm.devices}
        self._by_block = {d.block_id: d for d in self.ram_devices()}

    def start(self) -> None:
        self.set_status(MigrationStatus.SETUP)
        self.thread = threading.Thread(target=self._run, name="migration-incoming", daemon=True)
        self.thread.start()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.file is not None:
            self.file.shutdown()

    def _lookup(self, name: str, instance_id: int, version_id: int) -> VMStateDescription | None:
        if name == MIGRATION_SECTION:
            return MIGRATION_VMSD
        dev = self._by_section.get(name)
        return dev.vmsd if dev is not None else None

    def _run(self) -> None:
        try:
            self.stats.start_ns = time.monotonic_ns()
            if self.listener is not None:
                self.file = self.listener.accept()
                self.listener.close()
                self.listener = None
            else:
                assert isinstance(self.address, FileAddress)
                self.file = open_incoming_file(self.address)
            self.file.settimeout(self.timeout_s)
            self.stats.setup_done_ns = time.monotonic_ns()
            self.set_status(MigrationStatus.ACTIVE)
            self._load()
            self.set_status(MigrationStatus.COMPLETED)
        except Exception as exc:
            self._fail(exc)
        finally:
            self.reader.close()
            if self.file is not None:
                self.file.close()
            self.finished.set()

    def _load(self) -> None:
        f = self.file
        assert f is not None
        while not self.reader.done:
            data, fds = f.read_chunk()
            self.stats.fds_passed += len(fds)
            self.reader.receive_data(data, fds)
            if not data:
                self.reader.receive_eof()
            for event in self.reader.events():
                self._handle(event)
            if not data:
                break
        if not self.stats.committed:
            raise MigrationError("the stream ended before EOF")

    def _handle(self, event: ev.Event) -> None:
        if isinstance(event, ev.Configuration):
            if event.machine != self.vm.machine:
                raise MigrationError(f"machine type '{event.machine}' of the source does not match "
                                     f"'{self.vm.machine}'")
            check_capabilities(self.params, event.capabilities)
        elif isinstance(event, ev.RamMemSize):
            for block in event.blocks:
                dev = self._by_block.get(block.id)
                if dev is None or dev.size != block.length:
                    raise MigrationError(f"RAM block '{block.id}' of {block.length} bytes has no match here")
                dev.prepare_incoming_copy()
                self.stats.ram_total += block.length
        elif isinstance(event, ev.RamPageRun):
            self._by_block[event.block_id].write_pages(event.offsets, event.data)
            if event.data is None:
                self.stats.duplicate_pages += len(event)
            else:
                self.stats.normal_pages += len(event)
        elif isinstance(event, ev.RamPage):
            self._by_block[event.block_id].write_page(event.offset, event.data, event.fill)
            if event.data is None:
                self.stats.duplicate_pages += 1
            else:
                self.stats.normal_pages += 1
        elif isinstance(event, ev.SectionFull):
            if event.name in self._states:
                raise MigrationError(f"section '{event.name}' arrived twice")
            self._states[event.name] = (event.state, event.fds)
            self._received.extend(event.fds)
        elif isinstance(event, ev.CommandRecord):
            if event.command == Command.OPEN_RETURN_PATH:
                self.return_path = True
            elif event.command == Command.PING:
                self._load_devices()
                self.hook("dest-loaded")
                self._reply(ReturnPathMessage.PONG, event.data)
        elif isinstance(event, ev.EndOfState):
            self._load_devices()
            self.hook("dest-eof")
            self._resume()

    def _reply(self, kind: int, payload: bytes = b"") -> None:
        if self.return_path and self.file is not None:
            _write_rp(self.file, kind, payload)

    def _load_devices(self) -> None:
        """Adopt or re-create every backend, without running anything."""
        if self._loaded:
            return
        missing = [name for name in self._by_section if name not in self._states]
        if missing or MIGRATION_SECTION not in self._states:
            raise MigrationError(f"device state missing for {', '.join(missing) or MIGRATION_SECTION}")
        for dev in self.vm.devices:
            state, fds = self._states[dev.section_name]
            dev.load_state(state, fds)  # validates first; on success the device owns fds
            self._received = [fd for fd in self._received if fd not in fds]
        self.stats.stop_ns = self._states[MIGRATION_SECTION][0]["stop_ns"]
        self._loaded = True

    def _resume(self) -> None:
        self.stats.committed = True
        if self._states[MIGRATION_SECTION][0]["running"]:
            self.stats.resume_ns = self.vm.vm_start()
        else:
            self.stats.resume_ns = self.vm.vm_start(paused=True)
        self._reply(RP_RESUMED, struct.pack(">Q", self.stats.resume_ns))
        try:
            self._reply(ReturnPathMessage.SHUT, struct.pack(">I", 0))
        except MigrationError:
            # The source closes the channel as soon as it has RP_RESUMED; a
            # destination that runs the guest has not failed because of that.
            pass

    def _fail(self, exc: Exception) -> None:
        message = str(exc) if isinstance(exc, MigrationError) else f"{type(exc).__name__}: {exc}"
        log.warning("incoming migration failed: %s", message)
        if not self.stats.committed:
            # Nothing runs here: close every backend loaded and every fd received.
            for dev in self.vm.devices:
                dev.close()
            for fd in self._received:
                close_fd(fd)
            self._received = []
            try:
                self._reply(ReturnPathMessage.SHUT, struct.pack(">I", 1))
            except MigrationError:
                pass
        self.stats.error = message
        self.set_status(MigrationStatus.FAILED)


__all__ = ["IncomingMigration", "MigrationStats", "MigrationStatus", "OutgoingMigration"]
