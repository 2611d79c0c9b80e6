"""The destination of a migration (``migrate-incoming``): load every section, acknowledge, run at EOF.

It loads and validates every device section before it answers the source's
PING; nothing runs until EOF, and a failure before it closes every backend
loaded and every fd received.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from typing import Callable

import numpy as np

from migfd.channel import QEMUFile, advance_iovec
from migfd.devices.base import section_key
from migfd.devices.memfd import MemoryBackendMemfd
from migfd.errors import ChannelError, MigrationError, StreamError
from migfd.fds import close_fd
from migfd.migration.base import (
    MIGRATION_SECTION,
    MIGRATION_VMSD,
    RP_RESUMED,
    MigrationBase,
    MigrationHost,
    MigrationStatus,
    write_rp,
)
from migfd.params import MigrationParameters, check_capabilities
from migfd.stream import (
    Command,
    CommandRecord,
    Configuration,
    EndOfState,
    Event,
    RamMemSize,
    RamPage,
    RamPageRun,
    RamPacket,
    RamPacketPages,
    ReturnPathMessage,
    SectionFooter,
    SectionFull,
    SectionHeader,
    TARGET_PAGE_SIZE,
    StreamReader,
    VMDescription,
    VMStateDescription,
)
from migfd.stream.gather import Interleaved
from migfd.stream.ram import PAGE_RECORD_BYTES, continued_pages
from migfd.transport import Address, FileAddress, IncomingListener, open_incoming_file

__all__ = ["IncomingMigration", "next_read_bytes", "settle_guess"]

#: bytes fed to the reader from the channel before it parses them: every small
#: message that arrived, but not more than about one full read of pages, which
#: then is still in the CPU's cache (1 MiB of L2 here) when the reader copies it
#: into guest RAM
DRAIN_LIMIT_BYTES = 1 << 20
#: the most one read takes from the kernel (the reader lends that much room);
#: 1 MiB took less CPU per byte than 256 KiB (fewer reads and parses) in a direct
#: two-process copy of 256 MiB
READ_BYTES = 1 << 20
#: the room lent for a read while the messages are small (setup, the switchover):
#: lending room costs a zero fill and, for a MiB, fresh pages that fault in one
#: by one -- hundreds of µs inside the downtime for a message of a few hundred bytes.
#: A message that carries fds ends a read, so the switchover reads once per fd
#: batch (once per fd unbatched): 64 KiB of fill cost ~1 µs more a read than 4 KiB
READ_BYTES_MIN = 4 << 10
#: page records a guessed read takes at most (2 MiB of records: 1024 iovec entries,
#: IOV_MAX), and the fewest worth guessing
GUESS_PAGES = 512
GUESS_PAGES_MIN = 2
PAGE = TARGET_PAGE_SIZE

log = logging.getLogger("migfd.migration")


def next_read_bytes(room: int, nbytes: int) -> int:
    """The room for the next read after one of ``nbytes`` into ``room``: twice as much
    when the read filled it (pages are streaming), half when it used under a quarter."""
    if nbytes >= room:
        return min(room * 2, READ_BYTES)
    if nbytes < room // 4:
        return max(room // 2, READ_BYTES_MIN)
    return room


def settle_guess(words: np.ndarray, pages: np.ndarray, nbytes: int,
                 first_offset: int) -> tuple[int, bytes]:
    """After a guessed read of ``nbytes`` into record words and pages in turn (word 0,
    page 0, word 1, ...: rows of ``words``, (k, 8), and of ``pages``, (k, PAGE), a
    view of guest RAM): how many whole records are the PAGE|CONTINUE records of
    the pages from ``first_offset`` on, and the bytes received after them, which
    go back to the reader.

    A page those bytes landed in had never been received: it is zeroed again.
    """
    whole = nbytes // PAGE_RECORD_BYTES
    seen = whole + (nbytes % PAGE_RECORD_BYTES >= 8)  # records whose word arrived
    good = min(continued_pages(words[:seen], first_offset), whole)
    pieces = []
    left = nbytes - good * PAGE_RECORD_BYTES
    i = good
    while left > 0:
        n = min(8, left)
        pieces.append(words[i, :n].tobytes())
        left -= n
        if left <= 0:
            break
        n = min(PAGE, left)
        pieces.append(pages[i, :n].tobytes())
        pages[i, :n] = 0
        left -= n
        i += 1
    return good, b"".join(pieces)


def fill_views(views: list[memoryview], data: memoryview) -> list[memoryview]:
    """Copy ``data`` into ``views`` in order; the part of ``views`` it did not fill."""
    i = 0
    while len(data):
        n = min(len(views[i]), len(data))
        views[i][:n] = data[:n]
        data = data[n:]
        if n < len(views[i]):
            return [views[i][n:], *views[i + 1:]]
        i += 1
    return views[i:]


class IncomingMigration(MigrationBase):
    """``migrate-incoming`` / ``--incoming``: listen, load, resume at EOF."""

    def __init__(self, vm: MigrationHost, address: Address, params: MigrationParameters,
                 on_status: Callable[[MigrationStatus], None]):
        super().__init__(vm, params, on_status)
        self.address = address
        self.listener: IncomingListener | None = None
        #: orders a parameter change against the moment a source connects
        self._accept_lock = threading.Lock()
        self.file: QEMUFile | None = None
        if not isinstance(address, FileAddress):
            # Listening now (not in the thread) so a wrong transport fails the command.
            self.listener = IncomingListener(address, params, on_refused=self._count_refused)
        self.reader = StreamReader(self._lookup, ram_runs=True)
        self._states: dict[str, tuple[dict, tuple[int, ...]]] = {}
        self._loaded = False
        #: fds received in device sections and not yet adopted by a device
        self._received: set[int] = set()
        #: x-early-fds: the sections whose fds came (and were adopted) before the switchover
        self._early: set[str] = set()
        self._switchover = False
        self.return_path = False
        self._by_section = {d.section_key: d for d in vm.devices}  # "cpu" sections differ by instance
        self._by_block = {d.block_id: d for d in self.ram_devices()}
        #: when the RAM section being read began (None: not inside one)
        self._ram_section_start: int | None = None
        #: the room the next read gets: doubles while reads fill it (pages), halves when they do not
        self._read_bytes = READ_BYTES_MIN
        #: EOF has been read: the guest runs once the device description is read too (or the stream ends)
        self._eof = False
        #: the packet whose pages come next: the RAM they go to and their offsets
        self._packet: tuple[MemoryBackendMemfd, np.ndarray] | None = None
        #: the page after the last normal page loaded (its RAM, its index), where the
        #: next PAGE|CONTINUE record most likely goes; None after any other record
        self._next_page: tuple[MemoryBackendMemfd, int] | None = None

    def _count_refused(self) -> None:
        self.stats.refused_connections += 1

    @property
    def connected(self) -> bool:
        """True once a source connected (or the file opened): the stream has started."""
        return self.file is not None

    def set_params(self, params: MigrationParameters) -> None:
        """New parameters while no source has connected yet (QEMU takes them then too)."""
        with self._accept_lock:
            if self.connected:
                raise MigrationError("There's a migration process in progress")
            if self.listener is not None:
                self.listener.set_params(params)
            self.params = params

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
        dev = self._by_section.get(section_key(name, instance_id))
        return dev.vmsd if dev is not None else None

    def _run(self) -> None:
        try:
            self.stats.start_ns = time.monotonic_ns()
            if self.listener is not None:
                conn = self.listener.accept()
                with self._accept_lock:
                    self.file = conn
                self.listener.close()
                self.listener = None
            else:
                assert isinstance(self.address, FileAddress)
                self.file = open_incoming_file(self.address)
            self.file.settimeout(self.timeout_s)
            self.file.timeline = self.timeline
            self.stats.setup_done_ns = time.monotonic_ns()
            self.timeline.add("setup", self.stats.start_ns, self.stats.setup_done_ns)
            self.set_status(MigrationStatus.ACTIVE)
            try:
                self._load()
            except (StreamError, ChannelError) as exc:
                if not self._eof or self.stats.committed:
                    raise
                # As QEMU: the device description after EOF is read before the guest
                # runs, but a valid state is not failed for a description that is bad
                # or never comes (the source has committed: nobody else would run it).
                log.warning("no readable device description after EOF (%s): the guest runs", exc)
                self._resume()
            self.set_status(MigrationStatus.COMPLETED)
        except Exception as exc:
            self.switchover_priority(False)
            self._fail(exc)
        finally:
            self.vm.release_events()
            self.reader.close()
            if self.file is not None:
                self.file.close()
            self.finished.set()

    def _load(self) -> None:
        f = self.file
        tl = self.timeline
        reader = self.reader
        assert f is not None
        # Each phase starts where the last one ended (a chain: no hole).
        start = self.stats.setup_done_ns
        while not reader.done:
            if reader.packet_bytes_pending:
                self._receive_packet_pages(f)
                continue
            if self._next_page is not None and self._receive_guessed_pages(f):
                start = time.monotonic_ns()
                continue
            got = self._receive(f)
            if got is None:
                f.wait_readable()
                waited = time.monotonic_ns()
                if self._ram_section_start is None:
                    tl.add("wait-data", start, waited)
                start = waited
                continue
            # Everything that has arrived before parsing: a message that carried
            # fds ends a read, and a reader fed one message at a time restarts a
            # device section once per fd record.
            end_of_stream = False
            fed = 0
            while got is not None:
                nbytes, fds = got
                self.stats.fds_passed += len(fds)
                if not nbytes and not fds:
                    reader.receive_eof()
                    end_of_stream = True
                    break
                fed += nbytes
                if fed >= DRAIN_LIMIT_BYTES or reader.read_bound() == 0:
                    break
                got = self._receive(f)
            parse_start = time.monotonic_ns()
            # Inside a RAM section one phase covers the whole section ("load-ram"):
            # a phase per read would be thousands for GiBs of pages.
            outside_ram = self._ram_section_start is None
            parsed = self._handle_events(parse_start)
            if outside_ram or self._ram_section_start is None:
                tl.add("recv", start, parse_start)
                tl.add("parse", parse_start, parsed)
            start = parsed
            if end_of_stream:
                break
        if self._eof and not self.stats.committed:
            self._resume()  # a stream that ends at EOF, without a device description
        if not self.stats.committed:
            raise MigrationError("the stream ended before EOF")

    def _handle_events(self, start_ns: int) -> int:
        """Act on every event the reader can make of what it holds; returns when it is done."""
        event_start = start_ns
        for event in self.reader.events():
            parsed = time.monotonic_ns()
            self._handle(event, event_start, parsed)
            event_start = time.monotonic_ns()
        # The pages of a RamPageRun are a view of the reader's buffer: the loop's
        # variable dies here, so the next read goes into that buffer again.
        return time.monotonic_ns()

    def _receive_guessed_pages(self, f: QEMUFile) -> bool:
        """Read the next page records straight into guest RAM, guessing that they go on
        from the last page loaded, as a first copy of RAM sends them; False when no
        guess can be made (the reader holds more than the start of a record, the
        channel holds bytes, the pages after it were received already, it is not a
        state copy's RAM).

        Nothing is copied but the start of a record the reader holds: one read
        fills record words into a small array and each page into its place in
        guest RAM. The words are checked after the read; the whole records that
        match are loaded. From the first that does
        not (a zero page, a jump, another section) the bytes go back to the
        reader, parsed as usual, and the pages they landed in, which had never
        been received, are zeroed again.
        """
        dev, first = self._next_page  # type: ignore[misc]
        block = self.reader.records_expected()
        if block != dev.block_id or f.holds_input or dev.map is None:
            return False
        k = dev.unreceived_run(first, GUESS_PAGES)
        if k < GUESS_PAGES_MIN:
            return False
        words = np.empty((k, 8), dtype=np.uint8)
        pages = dev.pages_array()[first:first + k]  # a view of guest RAM
        try:
            iov = Interleaved(words, pages).iovec()
            # The start of a record the reader holds goes first, then one read.
            held = self.reader.held_bytes()
            if held:
                words[0, :min(len(held), 8)] = np.frombuffer(held[:8], dtype=np.uint8)
                if len(held) > 8:
                    pages[0, :len(held) - 8] = np.frombuffer(held[8:], dtype=np.uint8)
                iov = advance_iovec(iov, len(held))
            got = f.read_into_iovec(iov)
            nbytes, fds = got if got is not None else (0, [])
            good, rest = settle_guess(words, pages, len(held) + nbytes, first * PAGE)
        finally:
            del pages  # no view of guest RAM outlives this (a failed migration closes it)
        if got is None:
            f.wait_readable()
            return True
        if not nbytes and not fds:
            return False  # the end of the stream: the usual read sees it too
        self.reader.records_taken(good * PAGE_RECORD_BYTES)
        if not good:
            rest = rest[len(held):]  # the reader keeps what it held
        dev.mark_received(first, good)
        self.stats.normal_pages += good
        # After a wrong guess (or too few bytes to tell) the reader goes on alone
        # until it has loaded a page again.
        self._next_page = (dev, first + good) if good else None
        if rest or fds:
            self.stats.fds_passed += len(fds)
            self.reader.receive_data(rest, fds)
            self._handle_events(time.monotonic_ns())
        return True

    def _receive(self, f: QEMUFile) -> tuple[int, list[int]] | None:
        """What has arrived, read by the channel straight into the reader's buffer
        (nothing copied on the way); None when nothing has. ``(0, [])``: end of stream."""
        room = self._read_bytes
        # Inside a RAM section of packets a read stops where a packet's pages begin:
        # they go straight into guest RAM (_receive_packet_pages), not into the reader.
        bound = self.reader.read_bound()
        if bound:
            room = min(room, bound)
        buffer = self.reader.get_buffer(room)
        got = None
        try:
            got = f.read_into(buffer, block=False)
        finally:
            del buffer
            nbytes, fds = got if got is not None else (0, [])
            self.reader.buffer_updated(nbytes, fds)
        if got is not None and room == self._read_bytes:
            self._read_bytes = next_read_bytes(room, nbytes)
        return got

    def _receive_packet_pages(self, f: QEMUFile) -> None:
        """The pages of the packet just read, straight into guest RAM: what the reader
        holds already is copied there, the rest is received there (no buffer between)."""
        assert self._packet is not None
        dev, offsets = self._packet
        views = dev.page_views(offsets)
        rest: list[memoryview] = []
        try:
            with self.reader.take_packet_bytes() as held:
                rest = fill_views(views, held)
            pending = self.reader.packet_bytes_pending
            f.read_into_buffers(rest)
            self.reader.packet_bytes_read(pending)
        finally:
            # No view of guest RAM may outlive this (a failed migration closes the mapping).
            for view in (*views, *rest):
                view.release()
        self._packet = None

    def _handle(self, event: Event, start_ns: int, parsed_ns: int) -> None:
        """Act on one event; ``start_ns``..``parsed_ns`` is the time the reader took to parse it."""
        self._next_page = None
        if isinstance(event, Configuration):
            if event.machine != self.vm.machine:
                raise MigrationError(f"machine type '{event.machine}' of the source does not match "
                                     f"'{self.vm.machine}'")
            check_capabilities(self.params, event.capabilities)
        elif isinstance(event, RamMemSize):
            for block in event.blocks:
                dev = self._by_block.get(block.id)
                if dev is None or dev.size != block.length:
                    raise MigrationError(f"RAM block '{block.id}' of {block.length} bytes has no match here")
                with self.timeline.phase(f"ram-prepare:{block.id}"):
                    dev.prepare_incoming_copy()
                self.stats.ram_total += block.length
        elif isinstance(event, RamPageRun):
            dev = self._by_block[event.block_id]
            dev.write_pages(event.offsets, event.data)
            if event.data is None:
                self.stats.duplicate_pages += len(event)
            else:
                self.stats.normal_pages += len(event)
                self._next_page = (dev, int(event.offsets[-1]) // PAGE + 1)
        elif isinstance(event, RamPacket):
            dev = self._by_block[event.block_id]
            if len(event.zero):
                dev.write_pages(event.zero, None)
            self.stats.duplicate_pages += len(event.zero)
            self.stats.normal_pages += len(event.normal)
            if len(event.normal):
                self._packet = (dev, event.normal)
        elif isinstance(event, RamPacketPages):
            # All its pages had arrived with the header: copied from the reader's buffer.
            self._by_block[event.block_id].write_pages(event.offsets, event.data)
            self._packet = None
        elif isinstance(event, RamPage):
            dev = self._by_block[event.block_id]
            dev.write_page(event.offset, event.data, event.fill)
            if event.data is None:
                self.stats.duplicate_pages += 1
            else:
                self.stats.normal_pages += 1
                self._next_page = (dev, event.offset // PAGE + 1)
        elif isinstance(event, SectionFull) and not self._switchover and self.params.x_early_fds:
            self._load_early(event, start_ns, parsed_ns)
        elif isinstance(event, SectionFull):
            self.timeline.add(f"load:{event.name}", start_ns, parsed_ns)
            key = section_key(event.name, event.instance_id)
            if key in self._states:
                raise MigrationError(f"section '{key}' arrived twice")
            self._states[key] = (event.state, event.fds)
            self._received.update(event.fds)
        elif isinstance(event, SectionHeader):
            self._ram_section_start = start_ns
        elif isinstance(event, SectionFooter):
            if self._ram_section_start is not None:
                self.timeline.add("load-ram", self._ram_section_start, parsed_ns)
            self._ram_section_start = None
        elif isinstance(event, CommandRecord):
            if event.command == Command.OPEN_RETURN_PATH:
                self.return_path = True
            elif event.command == Command.SWITCHOVER_START:
                self._switchover = True
                self.switchover_priority(True)
                self.timeline.add("switchover-start", parsed_ns)
                self.vm.hold_events()  # until the guest runs and the source knows it
            elif event.command == Command.PING and not self._states:
                # No device state yet: the PING that ends the source's setup (after
                # the early fds, if any, were adopted: the source then knows they were).
                if self._early:
                    self.hook("dest-early-fds")
                self._reply(ReturnPathMessage.PONG, event.data)
            elif event.command == Command.PING:
                # The acknowledgement the commit point waits for: only after every
                # device loaded and validated its state.
                self._load_devices()
                self.hook("dest-loaded")
                with self.timeline.phase("pong"):
                    self._reply(ReturnPathMessage.PONG, event.data)
        elif isinstance(event, EndOfState):
            self.timeline.add("eof", parsed_ns)
            self._load_devices()
            self.hook("dest-eof")
            self._eof = True
        elif isinstance(event, VMDescription):
            # QEMU's order: everything the destination reads, the device
            # description included, is read before the guest runs.
            self.timeline.add("load-vmdesc", start_ns, parsed_ns)
            self._resume()

    def _load_early(self, event: SectionFull, start_ns: int, parsed_ns: int) -> None:
        """x-early-fds: a device's section before the switchover brings its fds; the device
        validates and adopts them now, while the source's guest still runs (nothing runs here)."""
        self.timeline.add(f"load:{event.name}", start_ns, parsed_ns)
        key = section_key(event.name, event.instance_id)
        self._received.update(event.fds)
        if key in self._early:
            raise MigrationError(f"early fds of section '{key}' arrived twice")
        if not event.fds:
            raise MigrationError(f"section '{key}' came before the switchover without fds")
        dev = self._by_section.get(key)
        if dev is None:
            raise MigrationError(f"section '{key}' came before the switchover, and only devices' fds may")
        with self.timeline.phase(f"early-load:{dev.section_name}"):
            dev.load_state(event.state, event.fds)  # validates first; on success the device owns them
        self._received.difference_update(event.fds)
        self._early.add(key)
        self.stats.early_fds += len(event.fds)

    def _reply(self, kind: int, payload: bytes = b"") -> None:
        if self.return_path and self.file is not None:
            write_rp(self.file, kind, payload)

    def _load_devices(self) -> None:
        """Adopt or re-create every backend, without running anything."""
        if self._loaded:
            return
        missing = [name for name in self._by_section if name not in self._states]
        if missing or MIGRATION_SECTION not in self._states:
            raise MigrationError(f"device state missing for {', '.join(missing) or MIGRATION_SECTION}")
        tl = self.timeline
        if self.params.x_early_fds:
            self._check_early()
        with tl.phase("load-devices"):
            for dev in self.vm.devices:
                start = time.monotonic_ns()
                state, fds = self._states[dev.section_key]
                if fds and dev.section_key in self._early:
                    dev.close()  # its backend changed on the source after the early fds: these replace them
                dev.load_state(state, fds)  # validates first; on success the device owns fds
                self._received.difference_update(fds)
                tl.add(f"post-load:{dev.section_name}", start, time.monotonic_ns())
        self.stats.stop_ns = self._states[MIGRATION_SECTION][0]["stop_ns"]
        self._loaded = True

    def _check_early(self) -> None:
        """With x-early-fds, every device this side takes over must have its fds, early or now:
        a section without them would make it open the backend by name, which the source holds."""
        for dev in self.vm.devices:
            key = dev.section_key
            if dev.handover(self.params.backend_transfer) and key not in self._early and not self._states[key][1]:
                raise MigrationError(f"section '{key}': no fds arrived, neither early nor at the switchover")

    def _resume(self) -> None:
        self.stats.committed = True
        start = time.monotonic_ns()
        # The downtime ends when the guest is let run: the hook sits between the
        # time reported and the guest running (a stall there is outage the
        # reported downtime does not show, which the outside observer must see).
        self.stats.resume_ns = self.vm.vm_start(paused=not self._states[MIGRATION_SECTION][0]["running"],
                                                before_run=lambda: self.hook("dest-resume"))
        # "resume" ends where the downtime does; letting the guest run ("vm-start", as
        # QEMU's checkpoint names it) is after it, and the observer sees what it costs.
        self.switchover_priority(False)  # before the reports: the guest's threads come first now
        self.timeline.add("resume", start, self.stats.resume_ns)
        self.timeline.add("vm-start", self.stats.resume_ns, time.monotonic_ns())
        with self.timeline.phase("resumed-report"):
            try:
                self._reply(RP_RESUMED, struct.pack(">Q", self.stats.resume_ns))
            except MigrationError as exc:
                # The guest runs here: a source that stopped listening (it gave up
                # waiting and, past the commit point, never resumes) does not make
                # this side's migration fail.
                log.warning("the source did not take the resume report: %s", exc)
        self.vm.release_events()
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
            self._received = set()
            try:
                self._reply(ReturnPathMessage.SHUT, struct.pack(">I", 1))
            except MigrationError:
                pass
        self.stats.error = message
        self.set_status(MigrationStatus.FAILED)

