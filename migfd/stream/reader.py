"""An incremental reader of QEMU's migration stream: bytes and fds in, events out.

Bring your own I/O, as h11 does: call :meth:`StreamReader.receive_data` with
whatever arrived (and the fds that arrived with it), then :meth:`next_event`
until it returns :data:`NEED_DATA`; :meth:`receive_eof` when the peer is done.

Theory of operation. Every event is parsed from the start of the unconsumed
bytes by a fresh :class:`Cursor`; if the bytes run out half-way the attempt is
dropped (nothing consumed, no fd taken) and repeated when more arrive. Events
are small by construction -- one page record, one device section, one command
-- so a retry costs at most one record, and an event that would need more than
``max_record_bytes`` is an error rather than a reason to wait. A malformed
stream raises :class:`~migfd.errors.StreamError` with the byte offset; nothing
else escapes (the fuzz tests hold the reader to that).

Fds are queued in arrival order; an fd field takes the oldest one when its
service byte is parsed. Events hand fds over to the caller, who then owns
them; :meth:`close` closes any fd still queued.

With ``x-multifd-packets`` in the configuration's capabilities, a RAM
PART/END may hold packets (:mod:`migfd.stream.multifd`): a :class:`RamPacket`
event for the header, then the pages' bytes, which the reader yields as a
:class:`RamPacketPages` once they have all arrived, or which the caller
receives itself straight into guest RAM (:meth:`take_packet_bytes` for what
the reader holds already, :meth:`packet_bytes_read` for the rest);
:meth:`read_bound` says how much a read may take before it would run into them.

A section the reader has no description for is an error, as it is for QEMU's
loader; only for inspection, ``unknown_sections="delimit"`` makes it a
:class:`SectionOpaque` instead, cut at its footer (:mod:`migfd.stream.delimit`).
"""

from __future__ import annotations

import enum
import json
import struct
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterator, Literal, Mapping, Sequence

from migfd.errors import StreamError
from migfd.fds import close_fds
import numpy as np

from migfd.stream import multifd, ram
from migfd.stream.delimit import (
    LOOKAHEAD_BYTES,
    NoFooterWithin,
    SectionIds,
    Undecided,
    find_footer,
    follows_footer,
)
from migfd.stream.constants import (
    COMMAND_LENGTH,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    RAM_SECTION_NAME,
    RAM_SECTION_VERSION,
    RAM_SAVE_FLAG_X_PACKET,
    TARGET_PAGE_SIZE,
    Command,
    SectionType,
)
from migfd.stream.events import (
    NEED_DATA,
    CommandRecord,
    Configuration,
    EndOfState,
    Event,
    Header,
    RamMemSize,
    RamPage,
    RamPageRun,
    RamPacket,
    RamPacketPages,
    SectionFooter,
    SectionFull,
    SectionHeader,
    SectionOpaque,
    VMDescription,
    _NeedData,
)
from migfd.stream.compiled import load_compiled
from migfd.stream.vmstate import Cursor, NeedData, VMStateDescription
from migfd.stream.writer import CAPABILITIES_SUBSECTION, TARGET_PAGE_BITS_SUBSECTION

MAX_RECORD_BYTES = 32 << 20
#: the most get_buffer lends at once; zeros to extend the buffer with (pages of
#: a bytes object never written to share the kernel's zero page: cheap to read)
_ZEROS = memoryview(bytes(4 << 20))
MAX_VMDESC_BYTES = 16 << 20
MAX_QUEUED_FDS = 1024
MAX_CAPABILITIES = 64


_ID_AND_LENGTH = struct.Struct(">IB")  # section id, length of the name
_INSTANCE_AND_VERSION = struct.Struct(">II")
_FOOTER = struct.Struct(">BI")
_SECTION_FOOTER = int(SectionType.SECTION_FOOTER)


def _start_header(cur: Cursor) -> tuple[int, str, int, int]:
    """Section id, name, instance id and version id of a START/FULL, after its type byte."""
    data, pos = cur.data, cur.pos
    if pos + 5 <= len(data):  # all of it at once when it is all there
        section_id, length = _ID_AND_LENGTH.unpack_from(data, pos)
        end = pos + 5 + length
        if end + 8 <= len(data):
            raw = data[pos + 5:end].tobytes()
            if raw.isascii():
                cur.pos = end + 8
                return (section_id, raw.decode("ascii"), *_INSTANCE_AND_VERSION.unpack_from(data, end))
    return cur.be32(), cur.idstr("section name"), cur.be32(), cur.be32()


class _State(enum.Enum):
    HEADER = "header"  #: expecting magic and version
    TOP = "top"  #: expecting a top-level record
    RAM_START = "ram-start"  #: inside a RAM START: the block list
    RAM_RECORDS = "ram-records"  #: inside a RAM PART/END: page records until EOS
    RAM_PACKET_PAGES = "ram-packet-pages"  #: the page bytes of a packet
    FOOTER = "footer"  #: expecting the footer of the open section
    AFTER_EOF = "after-eof"  #: expecting the vmdesc, or the end
    DONE = "done"  #: nothing more may come


# Reading a member off an Enum class costs ~0.2 µs in Python 3.11, and the
# parser tests these on every device section: module constants instead.
_TOP = _State.TOP
_X_PACKET_WORD = struct.pack(">Q", RAM_SAVE_FLAG_X_PACKET)
_CONFIGURATION, _START, _FULL = SectionType.CONFIGURATION, SectionType.START, SectionType.FULL


Lookup = Callable[[str, int, int], VMStateDescription | None]
UnknownSections = Literal["error", "delimit"]


@dataclass
class _Open:
    """The iterable section being read."""

    type: SectionType
    section_id: int
    name: str
    offset: int


class StreamReader:
    """Parses one incoming migration stream into events.

    ``vmsds`` tells how to load device sections: a mapping from section name
    to description, or a function ``(name, instance_id, version_id)`` that
    returns one (or None for "unknown section"). With ``ram_runs``, runs of
    page records come as one :class:`RamPageRun` instead of one
    :class:`RamPage` each: the same records, read at memory speed.

    ``unknown_sections`` says what a section without a description is:
    ``"error"`` (a destination must refuse what it cannot load) or, for
    inspection, ``"delimit"``: a :class:`SectionOpaque`, found by its footer,
    of at most ``max_record_bytes`` less the bytes that checking the next
    record takes. Fds in it stay queued (nothing says where its fd fields are).
    """

    def __init__(self, vmsds: Mapping[str, VMStateDescription] | Lookup | None = None, *,
                 max_record_bytes: int = MAX_RECORD_BYTES,
                 max_queued_fds: int = MAX_QUEUED_FDS, ram_runs: bool = False,
                 unknown_sections: UnknownSections = "error"):
        if unknown_sections not in ("error", "delimit"):
            raise ValueError(f"unknown_sections must be 'error' or 'delimit', not {unknown_sections!r}")
        self.unknown_sections = unknown_sections
        self.ram_runs = ram_runs
        if vmsds is None:
            vmsds = {}
        if isinstance(vmsds, Mapping):
            table = vmsds
            self._lookup: Lookup = lambda name, instance_id, version_id: table.get(name)
        else:
            self._lookup = vmsds
        self.max_record_bytes = max_record_bytes
        self.max_queued_fds = max_queued_fds
        self._buf = bytearray()
        self._lent: memoryview | None = None  # the free tail get_buffer lent
        self._pos = 0  # first unconsumed byte of _buf
        self._base = 0  # stream offset of _buf[0]
        self._fds: deque[int] = deque()
        self._eof = False
        self._state = _State.HEADER
        # section id -> (name, instance_id, version_id), learnt from START
        self._sections: dict[int, tuple[str, int, int]] = {}
        self._ids = SectionIds()  # what a record after a footer may refer to (delimit mode)
        self._opaque_ids: set[int] = set()  # iterable sections without description
        # (stream offset of an opaque section, stream offset to resume its footer search)
        self._search: tuple[int, int] | None = None
        self._open: _Open | None = None
        self._ram_blocks: dict[str, int] = {}
        self._ram_last_block: str | None = None
        self._capabilities: tuple[str, ...] = ()
        self._packets = False  # the configuration listed x-multifd-packets
        self._packets_read = 0
        #: the packet whose pages come next: block id, offsets of its normal pages
        self._packet: tuple[str, np.ndarray] | None = None
        self._packet_pending = 0  # bytes of its pages not yet consumed
        self._packet_taken = False  # the caller took some of them itself
        self._failed: StreamError | None = None

    # -- input ----------------------------------------------------------

    @property
    def offset(self) -> int:
        """Stream offset of the next byte to parse."""
        return self._base + self._pos

    @property
    def queued_fds(self) -> int:
        return len(self._fds)

    @property
    def done(self) -> bool:
        return self._state is _State.DONE

    def receive_data(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Queue bytes and the fds that arrived with them; the reader owns the fds."""
        self._fds.extend(fds)
        if len(self._fds) > self.max_queued_fds:
            raise self._fail(StreamError(
                f"{len(self._fds)} fds queued without a service byte to claim them, "
                f"more than the limit of {self.max_queued_fds}", self.offset))
        if data:
            if self._eof:
                raise self._fail(StreamError("data after end of stream", self.offset))
            self._append(data)

    def _append(self, data) -> None:
        """Put ``data`` after the unparsed bytes, dropping the parsed ones once they are half the buffer."""
        if self._lent is not None:
            raise RuntimeError("the reader's buffer is lent: buffer_updated first")
        buf = self._buf
        try:
            if self._pos and self._pos * 2 >= len(buf):
                del buf[:self._pos]
                self._base += self._pos
                self._pos = 0
            buf += data
        except BufferError:
            # A consumer still holds a view of this buffer (the pages of a
            # RamPageRun), so it cannot change size: the unparsed bytes move to
            # a new one, and the view keeps the old one as it was.
            self._buf = buf[self._pos:]
            self._base += self._pos
            self._pos = 0
            self._buf += data

    def get_buffer(self, sizehint: int) -> memoryview:
        """A writable view of ``sizehint`` free bytes after the unparsed ones, to read into.

        As asyncio's BufferedProtocol.get_buffer: the caller's I/O writes into
        it directly (no copy into the reader), then :meth:`buffer_updated`
        says how much arrived and gives the view back. Nothing else may be
        called on the reader in between.
        """
        if self._lent is not None:
            raise RuntimeError("the reader's buffer is lent already")
        if self._eof:
            raise self._fail(StreamError("data after end of stream", self.offset))
        size = max(1, min(sizehint, len(_ZEROS)))
        start = len(self._buf) - self._pos
        self._append(_ZEROS[:size])
        start += self._pos
        base = memoryview(self._buf)
        self._lent = base[start:]
        base.release()
        return self._lent

    def buffer_updated(self, nbytes: int, fds: Sequence[int] = ()) -> None:
        """``nbytes`` arrived in the view :meth:`get_buffer` lent, with ``fds``; the view goes back."""
        lent = self._lent
        if lent is None:
            raise RuntimeError("no buffer is lent")
        if not 0 <= nbytes <= len(lent):
            raise ValueError(f"{nbytes} bytes do not fit the {len(lent)} lent")
        self._lent = None
        end = len(self._buf) - len(lent) + nbytes
        lent.release()
        del self._buf[end:]
        self.receive_data(b"", fds)

    # -- page records, received by the caller ------------------------------

    def records_expected(self) -> str | None:
        """The block whose PAGE|CONTINUE records may come next, when the reader holds at
        most the start of one (less than a whole record); None otherwise.

        A caller that guesses where those records' pages go (the pages after
        the last one, in a first copy of RAM) may read them past the reader,
        after the bytes :meth:`held_bytes` gives it; it checks their record
        words with :func:`migfd.stream.ram.continued_pages`, reports the whole
        records that matched with :meth:`records_taken` and gives the bytes
        read after them back with :meth:`receive_data`.
        """
        if (self._state is not _State.RAM_RECORDS or self._packets or self._lent is not None
                or len(self._buf) - self._pos >= ram.PAGE_RECORD_BYTES or self._fds
                or self._failed is not None):
            return None
        return self._ram_last_block

    def held_bytes(self) -> bytes:
        """The unparsed bytes the reader holds (not consumed)."""
        return bytes(self._buf[self._pos:])

    def records_taken(self, nbytes: int) -> None:
        """``nbytes`` of whole PAGE|CONTINUE records, from the first byte the reader holds on,
        were read, checked and stored by the caller: the held bytes are consumed too."""
        if self.records_expected() is None:
            raise RuntimeError("page records cannot be taken past the reader now")
        held = len(self._buf) - self._pos
        if nbytes % ram.PAGE_RECORD_BYTES or (nbytes < held and nbytes):
            raise ValueError(f"{nbytes} bytes are not whole page records after the {held} held")
        if not nbytes:
            return
        self._pos = len(self._buf)
        self._base += nbytes - held

    # -- a packet's pages, received by the caller --------------------------

    @property
    def packet_bytes_pending(self) -> int:
        """Bytes of the current packet's pages not yet consumed (0: no packet's pages are next)."""
        return self._packet_pending

    def read_bound(self) -> int | None:
        """The most bytes the next read may take without running into a packet's pages.

        0: parse first (a packet header is complete) or take the pages; None:
        no bound (no packet's pages can be next). Inside a RAM section with
        packets, a read for a header takes its fixed part, then its offsets.
        """
        if self._packet_pending:
            return 0
        if not self._packets or self._state is not _State.RAM_RECORDS:
            return None
        buffered = len(self._buf) - self._pos
        if buffered < multifd.FIXED_BYTES:
            return multifd.FIXED_BYTES - buffered
        size = multifd.peek_header_bytes(self._buf, self._pos)
        return None if size is None else max(size - buffered, 0)

    def take_packet_bytes(self) -> memoryview:
        """The current packet's page bytes the reader holds already (up to all of them), consumed.

        A view of the reader's buffer: copy it where it belongs and release it.
        The rest of the pages the caller reads itself, then reports with
        :meth:`packet_bytes_read`.
        """
        if self._lent is not None:
            raise RuntimeError("the reader's buffer is lent: buffer_updated first")
        n = min(self._packet_pending, len(self._buf) - self._pos)
        base = memoryview(self._buf)
        view = base[self._pos:self._pos + n]
        base.release()
        self._pos += n
        self._packet_taken = True
        self._packet_consumed(n)
        return view

    def packet_bytes_read(self, nbytes: int) -> None:
        """``nbytes`` of the current packet's pages were read by the caller, past the reader."""
        if self._pos != len(self._buf):
            raise RuntimeError("the reader still holds bytes of the packet: take_packet_bytes first")
        if not 0 <= nbytes <= self._packet_pending:
            raise ValueError(f"{nbytes} bytes read, but {self._packet_pending} of the packet are pending")
        try:
            self._buf.clear()
        except BufferError:  # a consumer holds a view of it (see _append)
            self._buf = bytearray()
        self._base += self._pos + nbytes
        self._pos = 0
        self._packet_taken = True
        self._packet_consumed(nbytes)

    def _packet_consumed(self, nbytes: int) -> None:
        self._packet_pending -= nbytes
        if not self._packet_pending:
            self._packet = None
            self._packet_taken = False
            self._state = _State.RAM_RECORDS

    def receive_eof(self) -> None:
        """The peer closed the stream; what remains must parse into events."""
        self._eof = True

    def close(self) -> None:
        """Close every fd that was received and never claimed by an event."""
        close_fds(self._fds)
        self._fds.clear()

    # -- output ---------------------------------------------------------

    def events(self) -> Iterator[Event]:
        """Every event the bytes received so far make up."""
        while True:
            event = self.next_event()
            if event is NEED_DATA:
                return
            yield event  # type: ignore[misc]

    def next_event(self) -> Event | _NeedData:
        if self._failed is not None:
            raise self._failed
        if self._lent is not None:
            raise RuntimeError("the reader's buffer is lent: buffer_updated first")
        if self._state is _State.DONE:
            if self._pos < len(self._buf):
                raise self._fail(StreamError("trailing bytes after the end of the stream", self.offset))
            return NEED_DATA
        base = memoryview(self._buf)
        view = base[self._pos:]
        cur = Cursor(view, self.offset, self._fds, limit=self.max_record_bytes)
        saved = (self._state, self._open, self._ram_last_block)
        try:
            event = self._parse(cur)
        except NeedData:
            self._state, self._open, self._ram_last_block = saved
            if self._eof:
                if self._state is _State.AFTER_EOF and self._pos == len(self._buf):
                    self._state = _State.DONE
                    return NEED_DATA
                raise self._fail(StreamError(f"stream truncated in {self._where()}", self.offset)) from None
            if len(self._buf) - self._pos > self.max_record_bytes:
                raise self._fail(StreamError(
                    f"no complete record within {self.max_record_bytes} bytes", self.offset)) from None
            return NEED_DATA
        except StreamError as exc:
            raise self._fail(exc) from None
        except (ValueError, RecursionError) as exc:  # e.g. vmdesc-derived descriptions
            raise self._fail(StreamError(str(exc), cur.offset)) from None
        finally:
            # No view of the buffer may outlive the attempt but the pages of a
            # RamPageRun (a traceback kept with a stored error would otherwise
            # pin it; _append copes with the pages).
            view.release()
            base.release()
        self._pos += cur.pos
        for _ in range(cur.fds_taken):
            self._fds.popleft()
        return event

    def _fail(self, exc: StreamError) -> StreamError:
        self._failed = exc
        return exc

    def _where(self) -> str:
        if self._state is _State.HEADER:
            return "the stream header"
        if self._open is not None:
            return f"section '{self._open.name}'"
        return "a record"

    # -- parsing ----------------------------------------------------------

    def _parse(self, cur: Cursor) -> Event:
        state = self._state
        if state is _TOP:  # most records
            return self._parse_top(cur)
        if state is _State.HEADER:
            return self._parse_header(cur)
        if state is _State.RAM_START:
            blocks = ram.decode_mem_size(cur, ignore_shared="x-ignore-shared" in self._capabilities)
            self._ram_blocks = {b.id: b.length for b in blocks}
            self._state = _State.FOOTER
            return RamMemSize(tuple(blocks))
        if state is _State.RAM_RECORDS:
            if self._packets and cur.starts_with(_X_PACKET_WORD):
                return self._parse_packet(cur)
            if self.ram_runs:
                run = ram.decode_run(cur, self._ram_last_block, self._ram_blocks)
                if run is not None:
                    return RamPageRun(run.block_id, run.offsets, run.data)
            record = ram.decode_record(cur, self._ram_last_block, self._ram_blocks)
            if record is None:  # EOS: the footer follows at once
                self._state = _State.FOOTER
                return self._parse_footer(cur)
            self._ram_last_block = record.block_id
            return RamPage(record.block_id, record.offset, record.data, record.fill)
        if state is _State.RAM_PACKET_PAGES:
            return self._parse_packet_pages(cur)
        if state is _State.FOOTER:
            return self._parse_footer(cur)
        if state is _State.AFTER_EOF:
            return self._parse_vmdesc(cur)
        return self._parse_top(cur)

    def _parse_packet(self, cur: Cursor) -> RamPacket:
        at = cur.offset
        header = multifd.decode_header(cur, list(self._ram_blocks.values()), self._packets_read)
        self._packets_read += 1
        block_id = list(self._ram_blocks)[header.block_index]
        self._ram_last_block = None  # a record after a packet names its block
        if header.page_bytes:
            self._packet = (block_id, header.normal)
            self._packet_pending = header.page_bytes
            self._state = _State.RAM_PACKET_PAGES
        return RamPacket(block_id, header.packet_num, header.normal, header.zero, at, cur.offset - at)

    def _parse_packet_pages(self, cur: Cursor) -> RamPacketPages:
        if self._packet_taken:
            raise RuntimeError("the packet's pages are partly taken: packet_bytes_read for the rest")
        assert self._packet is not None
        block_id, offsets = self._packet
        n = self._packet_pending
        if len(cur.data) - cur.pos < n:
            raise cur.short(n)
        pages = np.frombuffer(cur.data, dtype=np.uint8, count=n, offset=cur.pos).reshape(-1, TARGET_PAGE_SIZE)
        cur.pos += n
        # The state goes with the event; a retry (NeedData) never gets here.
        self._packet = None
        self._packet_pending = 0
        self._state = _State.RAM_RECORDS
        return RamPacketPages(block_id, offsets, pages)

    def _parse_header(self, cur: Cursor) -> Header:
        magic = cur.be32()
        if magic != QEMU_VM_FILE_MAGIC:
            raise cur.error(f"not a migration stream: magic 0x{magic:08x}, expected 0x{QEMU_VM_FILE_MAGIC:08x}", 0)
        version = cur.be32()
        if version != QEMU_VM_FILE_VERSION:
            raise cur.error(f"unsupported stream version {version}, expected {QEMU_VM_FILE_VERSION}", 4)
        self._state = _State.TOP
        return Header(version)

    def _parse_top(self, cur: Cursor) -> Event:
        at = cur.offset
        kind = cur.u8()
        if kind == _CONFIGURATION:
            return self._parse_configuration(cur, at)
        if kind == _FULL or kind == _START:
            section_id, name, instance_id, version_id = _start_header(cur)
            if kind == _FULL:
                vmsd = self._lookup(name, instance_id, version_id)
                if vmsd is None and self.unknown_sections == "delimit":
                    return self._parse_opaque(cur, at, SectionType.FULL, section_id, name,
                                              instance_id, version_id)
                return self._parse_full(cur, at, vmsd, section_id, name, instance_id, version_id)
            if (self.unknown_sections == "delimit"
                    and (name, version_id) != (RAM_SECTION_NAME, RAM_SECTION_VERSION)):
                if section_id in self._sections:
                    raise cur.error(f"section id {section_id} started twice", at)
                return self._parse_opaque(cur, at, SectionType.START, section_id, name,
                                          instance_id, version_id)
            if name != RAM_SECTION_NAME:
                raise cur.error(f"iterable section '{name}' is not supported (only '{RAM_SECTION_NAME}')", at)
            if version_id != RAM_SECTION_VERSION:
                raise cur.error(f"RAM section version {version_id} is not supported (only {RAM_SECTION_VERSION})", at)
            if section_id in self._sections:
                raise cur.error(f"section id {section_id} started twice", at)
            self._sections[section_id] = (name, instance_id, version_id)
            self._ids.note(SectionType.START, section_id)
            self._open = _Open(SectionType.START, section_id, name, at)
            self._state = _State.RAM_START
            return SectionHeader(SectionType.START, section_id, name, instance_id, version_id, at)
        if kind in (SectionType.PART, SectionType.END):
            section_id = cur.be32()
            known = self._sections.get(section_id)
            if known is None:
                raise cur.error(f"{SectionType(kind).name} for section id {section_id}, which never started", at)
            name, instance_id, version_id = known
            if section_id in self._opaque_ids:
                return self._parse_opaque(cur, at, SectionType(kind), section_id, name,
                                          instance_id, version_id)
            self._open = _Open(SectionType(kind), section_id, name, at)
            self._state = _State.RAM_RECORDS
            return SectionHeader(SectionType(kind), section_id, name, instance_id, version_id, at)
        if kind == SectionType.COMMAND:
            command = cur.be16()
            length = cur.be16()
            expected = COMMAND_LENGTH.get(command)  # type: ignore[call-overload]
            if expected is not None and length != expected:
                raise cur.error(f"command {Command(command).name} has length {length}, expected {expected}", at)
            return CommandRecord(command, cur.take(length), at)
        if kind == SectionType.EOF:
            self._state = _State.AFTER_EOF
            return EndOfState(at)
        if kind == SectionType.VMDESCRIPTION:
            raise cur.error("device description before EOF", at)
        raise cur.error(f"unknown section type 0x{kind:02x}", at)

    def _parse_configuration(self, cur: Cursor, at: int) -> Configuration:
        length = cur.be32()
        if length > 255:
            raise cur.error(f"machine type name of {length} bytes", at + 1)
        raw = cur.take(length)
        try:
            machine = raw.decode("ascii")
        except UnicodeDecodeError:
            raise cur.error(f"machine type is not ASCII: {raw!r}", at + 5) from None
        capabilities: tuple[str, ...] = ()
        page_bits = None
        while cur.peek_u8() == SectionType.SUBSECTION:
            sub_at = cur.offset
            cur.u8()
            name = cur.idstr("subsection name")
            version = cur.be32()
            if version != 1:
                raise cur.error(f"subsection '{name}' version {version} is not supported", sub_at)
            if name == TARGET_PAGE_BITS_SUBSECTION:
                page_bits = cur.be32()
            elif name == CAPABILITIES_SUBSECTION:
                count = cur.be32()
                if count > MAX_CAPABILITIES:
                    raise cur.error(f"{count} capabilities, more than {MAX_CAPABILITIES}", sub_at)
                capabilities = tuple(cur.idstr("capability name") for _ in range(count))
            else:
                raise cur.error(f"unknown subsection '{name}' of configuration", sub_at)
        self._capabilities = capabilities
        self._packets = multifd.CAPABILITY in capabilities
        return Configuration(machine, capabilities, page_bits, at, cur.offset - at)

    def _parse_full(self, cur: Cursor, at: int, vmsd: VMStateDescription | None, section_id: int,
                    name: str, instance_id: int, version_id: int) -> SectionFull:
        if vmsd is None:
            raise cur.error(f"unknown section '{name}' (instance {instance_id})", at)
        state = load_compiled(cur, vmsd, version_id)
        self._footer(cur, section_id)
        self._ids.note(_FULL, section_id)
        fds = tuple(islice(cur.fds, cur.fds_taken)) if cur.fds_taken else ()
        return SectionFull(section_id, name, instance_id, version_id, vmsd.name, state,
                           at, cur.offset - at, fds)

    def _footer(self, cur: Cursor, section_id: int) -> None:
        data, pos = cur.data, cur.pos
        if pos + 5 <= len(data) and _FOOTER.unpack_from(data, pos) == (_SECTION_FOOTER, section_id):
            cur.pos = pos + 5
            return
        at = cur.offset
        kind = cur.u8()
        if kind != SectionType.SECTION_FOOTER:
            raise cur.error(f"expected section footer for section id {section_id}, found byte 0x{kind:02x}", at)
        found = cur.be32()
        if found != section_id:
            raise cur.error(f"section footer has id {found}, expected {section_id}", at)

    def _parse_footer(self, cur: Cursor) -> SectionFooter:
        opened = self._open
        assert opened is not None
        self._footer(cur, opened.section_id)
        self._ids.note(opened.type, opened.section_id)
        self._open = None
        self._state = _State.TOP
        return SectionFooter(opened.type, opened.section_id, opened.name, opened.offset,
                             cur.offset - opened.offset)

    def _parse_opaque(self, cur: Cursor, at: int, kind: SectionType, section_id: int, name: str,
                      instance_id: int, version_id: int) -> SectionOpaque:
        """A section without description, up to the first footer a plausible record follows."""
        buf, first = self._buf, self._pos  # the section starts at the cursor's first byte
        resume = first + cur.pos
        if self._search is not None and self._search[0] == at:
            resume = max(resume, self._search[1] - self._base)
        eof = self._eof

        def follows(i: int) -> bool | None:
            return follows_footer(buf, i, section=(kind, section_id), ids=self._ids,
                                  end_of_stream=eof, max_vmdesc_bytes=MAX_VMDESC_BYTES)
        try:
            found = find_footer(buf, resume, first + self.max_record_bytes - LOOKAHEAD_BYTES,
                                section_id, follows)
        except Undecided as more:
            if eof:
                raise cur.error(f"section '{name}' (id {section_id}) has no footer before the end "
                                "of the stream", at) from None
            self._search = (at, self._base + more.resume)
            raise NeedData from None
        except NoFooterWithin:
            raise cur.error(f"no footer of section '{name}' (id {section_id}) within "
                            f"{self.max_record_bytes - LOOKAHEAD_BYTES} bytes", at) from None
        self._search = None
        cur.skip(found + 5 - first - cur.pos)
        self._ids.note(kind, section_id)
        if kind is SectionType.START:
            self._sections[section_id] = (name, instance_id, version_id)
            self._opaque_ids.add(section_id)
        return SectionOpaque(kind, section_id, name, instance_id, version_id, at, cur.offset - at)

    def _parse_vmdesc(self, cur: Cursor) -> VMDescription:
        at = cur.offset
        kind = cur.u8()
        if kind != SectionType.VMDESCRIPTION:
            raise cur.error(f"expected the device description after EOF, found byte 0x{kind:02x}", at)
        length = cur.be32()
        if length > MAX_VMDESC_BYTES:
            raise cur.error(f"device description of {length} bytes, more than {MAX_VMDESC_BYTES}", at)
        blob = cur.take(length)
        try:
            description = json.loads(blob)
        except (UnicodeDecodeError, ValueError) as exc:
            raise cur.error(f"device description is not JSON: {exc}", at) from None
        except RecursionError:
            raise cur.error("device description is nested too deeply", at) from None
        if not isinstance(description, dict):
            raise cur.error("device description is not a JSON object", at)
        self._state = _State.DONE
        return VMDescription(description, at, cur.offset - at)
