"""One walk over a stream's events, every byte range named: what ``migfd inspect`` sums up and the protocol tour prints.

:func:`walk` feeds a :class:`~migfd.stream.reader.StreamReader`, notes where
each event starts and ends, and names its bytes. A device section is cut into
its header, its vmstate, its fd records and its footer; the header and footer
sizes are those the writer produces, not a second copy of the layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

from migfd.fds import close_fds
from migfd.stream.constants import (
    FD_SERVICE_BYTE,
    QEMU_VM_FILE_MAGIC,
    TARGET_PAGE_SIZE,
    SectionType,
    command_name,
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
)
from migfd.stream import multifd
from migfd.stream.reader import Lookup, StreamReader
from migfd.stream.vmstate import VMStateDescription
from migfd.stream.writer import (
    CAPABILITIES_SUBSECTION,
    FdRecord,
    MemorySink,
    section_footer,
    section_header,
)
from migfd.units import GiB, KiB, MiB


@dataclass(frozen=True, slots=True)
class AnnotatedRecord:
    """One byte range of a stream and what it holds."""

    offset: int
    size: int
    #: what the bytes are: "header", "section FULL (0x04)", "fd record", ...
    kind: str
    #: the section they belong to ("" outside sections)
    section: str
    #: what they mean
    text: str


@dataclass(frozen=True, slots=True)
class AnnotatedEvent:
    """A reader event, where it sits in the stream, and its byte ranges named (they tile it)."""

    event: Event
    offset: int
    size: int
    #: the START/PART/END header of the section the event is part of; None outside one
    header: SectionHeader | None
    records: tuple[AnnotatedRecord, ...]


def walk(reader: StreamReader, chunks: Iterable[bytes],
         fd_offsets: Sequence[int] = ()) -> Iterator[AnnotatedEvent]:
    """Feed ``chunks`` to ``reader``, then the end of the stream; every event it makes, annotated.

    No chunk is taken once the stream is complete. ``fd_offsets`` are the
    stream offsets of the fd records (known to whoever holds the fds, e.g. a
    :class:`~migfd.stream.writer.MemorySink`); with them a device section is
    cut at its fds. Fds that events carry belong to the caller, as with the reader.
    """
    source = iter(chunks)
    header: SectionHeader | None = None
    eof = False
    while True:
        start = reader.offset
        event = reader.next_event()
        if event is NEED_DATA:
            if eof or reader.done:
                return
            chunk = next(source, None)
            if chunk is None:
                reader.receive_eof()
                eof = True
            else:
                reader.receive_data(chunk)
            continue
        if isinstance(event, SectionHeader):
            header = event
        end = reader.offset
        yield AnnotatedEvent(event, start, end - start, header,  # type: ignore[arg-type]
                             tuple(_records(event, start, end, header, fd_offsets)))  # type: ignore[arg-type]
        if isinstance(event, SectionFooter):
            header = None


def fd_offsets(sink: MemorySink) -> list[int]:
    """Stream offsets of the fd records in a sink: each is one service byte with an fd beside it."""
    offsets, pos = [], 0
    for rec in sink.records:
        if isinstance(rec, FdRecord):
            offsets.append(pos)
            pos += 1
        else:
            pos += len(rec)
    return offsets


def annotate_sink(sink: MemorySink,
                  vmsds: Mapping[str, VMStateDescription] | Lookup | None = None) -> list[AnnotatedRecord]:
    """Every byte range of the stream held in ``sink``, read back by a StreamReader, in stream order.

    The sink's fds are duplicated for the reader (so the caller's stay open)
    and the duplicates the reader hands back are closed here.
    """
    dups = [os.dup(fd) for fd in sink.fds]
    reader = StreamReader(vmsds or {})
    records: list[AnnotatedRecord] = []
    try:
        reader.receive_data(b"", dups)
        dups = []  # the reader owns them now
        for item in walk(reader, [sink.getvalue()], fd_offsets(sink)):
            if isinstance(item.event, SectionFull):
                close_fds(item.event.fds)
            records.extend(item.records)
    finally:
        close_fds(dups)
        reader.close()
    return records


_VMSTATE_TEXT = ("fields in declaration order, no tags; a subsection starts with 0x05, "
                 "u8 length + 'parent/name', be32 version")


def _kind(what: str, section_type: SectionType) -> str:
    return f"{what} (0x{int(section_type):02x})"


def _size_text(n: int) -> str:
    """A whole size in the largest binary unit it fills exactly (RAM blocks are such sizes)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _records(ev: Event, start: int, end: int, header: SectionHeader | None,
             fd_at: Sequence[int]) -> Iterator[AnnotatedRecord]:
    size = end - start
    if isinstance(ev, Header):
        yield AnnotatedRecord(start, size, "header", "",
                              f'magic "QEVM" (0x{QEMU_VM_FILE_MAGIC:08x}), version {ev.version}')
    elif isinstance(ev, Configuration):
        caps = ", ".join(ev.capabilities) or "none"
        yield AnnotatedRecord(start, size, _kind("configuration", SectionType.CONFIGURATION), "",
                              f"machine type '{ev.machine}', subsection {CAPABILITIES_SUBSECTION}: {caps}")
    elif isinstance(ev, SectionHeader):
        what = (f", '{ev.name}' instance {ev.instance_id} version {ev.version_id}"
                if ev.type is SectionType.START else f" ('{ev.name}')")
        yield AnnotatedRecord(start, size, _kind(f"section {ev.type.name}", ev.type), ev.name,
                              f"section id {ev.section_id}{what}")
    elif isinstance(ev, RamMemSize):
        blocks = ", ".join(f"'{b.id}' {_size_text(b.length)}" for b in ev.blocks)
        yield AnnotatedRecord(start, size, "RAM block list", _section(header),
                              f"be64 total | MEM_SIZE, blocks: {blocks}, then be64 EOS")
    elif isinstance(ev, RamPage):
        what = ("ZERO page (fill byte follows)" if ev.data is None
                else f"PAGE ({_size_text(TARGET_PAGE_SIZE)} of data follow)")
        yield AnnotatedRecord(start, size, "RAM page record", _section(header),
                              f"be64 offset 0x{ev.offset:x} | flags: {what}, block '{ev.block_id}'")
    elif isinstance(ev, RamPageRun):
        what = "ZERO" if ev.data is None else "PAGE"
        yield AnnotatedRecord(start, size, "RAM page records", _section(header),
                              f"{len(ev)} {what} records of block '{ev.block_id}', each with CONTINUE")
    elif isinstance(ev, RamPacket):
        yield from _packet_header(ev, start, _section(header))
    elif isinstance(ev, RamPacketPages):
        yield AnnotatedRecord(start, size, "packet pages", _section(header),
                              f"{len(ev)} pages of block '{ev.block_id}', back to back, in the header's order")
    elif isinstance(ev, SectionFooter):
        kind = _kind("footer", SectionType.SECTION_FOOTER)
        yield AnnotatedRecord(start, size, kind if ev.type is SectionType.START else f"EOS + {kind}", ev.name,
                              f"closes section id {ev.section_id} ('{ev.name}')")
    elif isinstance(ev, CommandRecord):
        yield AnnotatedRecord(start, size, _kind("command", SectionType.COMMAND), "",
                              f"{command_name(ev.command)}, {len(ev.data)} data bytes")
    elif isinstance(ev, SectionFull):
        yield from _full_section(ev, start, end, fd_at)
    elif isinstance(ev, SectionOpaque):
        yield from _opaque_section(ev, start, end)
    elif isinstance(ev, EndOfState):
        yield AnnotatedRecord(start, size, _kind("EOF", SectionType.EOF), "", "all device state sent")
    elif isinstance(ev, VMDescription):
        names = ", ".join(d.get("name", "?") for d in ev.description.get("devices", []) if isinstance(d, dict))
        yield AnnotatedRecord(start, size, _kind("vmdesc", SectionType.VMDESCRIPTION), "",
                              f"be32 length + JSON description of: {names}")


def _packet_header(ev: RamPacket, start: int, section: str) -> Iterator[AnnotatedRecord]:
    """A packet header field by field (the layout of :mod:`migfd.stream.multifd`)."""
    fields = [
        (8, "packet record word", "be64 RAM_SAVE_FLAG_X_PACKET (0x400), migfd only: a packet follows"),
        (4, "packet magic", f'be32 0x{multifd.PACKET_MAGIC:08x} ("MFDP")'),
        (4, "packet version", f"be32 {multifd.PACKET_VERSION}"),
        (4, "packet flags", "be32 0"),
        (4, "packet block", f"be32 index of block '{ev.block_id}' in the RAM START's list"),
        (4, "packet normal pages", f"be32 {len(ev.normal)}: their bytes follow the header"),
        (4, "packet zero pages", f"be32 {len(ev.zero)}: listed, no bytes"),
        (8, "packet number", f"be64 {ev.packet_num}"),
    ]
    at = start
    for size, kind, text in fields:
        yield AnnotatedRecord(at, size, kind, section, text)
        at += size
    offsets = ", ".join(f"0x{int(o):x}" for o in [*ev.normal[:4], *ev.zero[:4]])
    yield AnnotatedRecord(at, start + ev.size - at, "packet offsets", section,
                          f"be64 x {len(ev)}, normal pages first, then zero pages: {offsets}"
                          + (", ..." if len(ev.normal) > 4 or len(ev.zero) > 4 else ""))


def _section(header: SectionHeader | None) -> str:
    return header.name if header is not None else ""


def _opaque_section(ev: SectionOpaque, start: int, end: int) -> Iterator[AnnotatedRecord]:
    """A section without description as header, payload (not decoded) and footer."""
    header_len = len(section_header(ev.type, ev.section_id, ev.name, ev.instance_id, ev.version_id))
    footer_at = end - len(section_footer(ev.section_id))
    what = (f"'{ev.name}' instance {ev.instance_id} version {ev.version_id}"
            if ev.type in (SectionType.START, SectionType.FULL) else f"('{ev.name}')")
    yield AnnotatedRecord(start, header_len, _kind(f"section {ev.type.name}", ev.type), ev.name,
                          f"section id {ev.section_id}, {what}")
    if footer_at > start + header_len:
        yield AnnotatedRecord(start + header_len, footer_at - start - header_len, "payload", ev.name,
                              "not decoded: no description of its fields; it ends at the first footer "
                              "with its id that a plausible record follows")
    yield AnnotatedRecord(footer_at, end - footer_at, _kind("footer", SectionType.SECTION_FOOTER), ev.name,
                          f"closes section id {ev.section_id}")


def _full_section(ev: SectionFull, start: int, end: int, fd_at: Sequence[int]) -> Iterator[AnnotatedRecord]:
    """A FULL section as header, vmstate cut at its fd records, and footer."""
    header_len = len(section_header(SectionType.FULL, ev.section_id, ev.name, ev.instance_id, ev.version_id))
    footer_at = end - len(section_footer(ev.section_id))
    yield AnnotatedRecord(start, header_len, _kind("section FULL", SectionType.FULL), ev.name,
                          f"section id {ev.section_id}, '{ev.name}' instance {ev.instance_id} "
                          f"version {ev.version_id} (vmsd '{ev.vmsd_name}')")
    pos = start + header_len
    for at in [o for o in fd_at if start < o < end]:
        if at > pos:
            yield AnnotatedRecord(pos, at - pos, "vmstate", ev.name, _VMSTATE_TEXT)
        yield AnnotatedRecord(at, 1, "fd record", ev.name,
                              f"service byte 0x{FD_SERVICE_BYTE:02x}, one fd beside it as SCM_RIGHTS "
                              f"in its own sendmsg; no fd number travels")
        pos = at + 1
    if footer_at > pos:
        yield AnnotatedRecord(pos, footer_at - pos, "vmstate", ev.name, _VMSTATE_TEXT)
    yield AnnotatedRecord(footer_at, end - footer_at, _kind("footer", SectionType.SECTION_FOOTER), ev.name,
                          f"closes section id {ev.section_id}")
