"""Writing a QEMU migration stream into a sink, record by record.

The writer knows the byte layout and the bookkeeping QEMU does while saving:
section ids, the footer after every section, the last RAM block sent (for
CONTINUE), and what the vmdesc needs of every device saved. It knows nothing of
sockets: the sink (a QEMUFile, or :class:`MemorySink` in tests) does the I/O.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from migfd.stream import multifd, ram
from migfd.stream.constants import (
    COMMAND_LENGTH,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    RAM_SECTION_NAME,
    RAM_SECTION_VERSION,
    TARGET_PAGE_SIZE,
    Command,
    SectionType,
)
from migfd.stream.compiled import save_compiled
from migfd.stream.gather import Interleaved
from migfd.stream.vmstate import Sink, VMStateDescription, vmdesc_entry

CAPABILITIES_SUBSECTION = "configuration/capabilities"
TARGET_PAGE_BITS_SUBSECTION = "configuration/target-page-bits"


@dataclass
class FdRecord:
    """An fd as it sits in a :class:`MemorySink`: sent beside one service byte."""

    fd: int


@dataclass
class MemorySink:
    """Collects what a writer produced: bytes and fd records, in order."""

    _records: list[bytearray | FdRecord] = field(default_factory=list)

    def put_buffer(self, data: bytes) -> None:
        if self._records and isinstance(self._records[-1], bytearray):
            self._records[-1] += memoryview(data).cast("B")  # amortised, no quadratic copying
        elif len(data):
            self._records.append(bytearray(memoryview(data).cast("B")))

    def put_fd(self, fd: int) -> None:
        self._records.append(FdRecord(fd))

    @property
    def records(self) -> list[bytes | FdRecord]:
        """Runs of bytes and fd records, in the order they were written."""
        return [bytes(r) if isinstance(r, bytearray) else r for r in self._records]

    def getvalue(self) -> bytes:
        """The byte stream as a peer sees it: each fd record is its service byte."""
        return b"".join(r if isinstance(r, bytearray) else b" " for r in self._records)

    @property
    def fds(self) -> list[int]:
        return [r.fd for r in self._records if isinstance(r, FdRecord)]


def _idstr(name: str) -> bytes:
    raw = name.encode("ascii")
    if not 0 < len(raw) < 256:
        raise ValueError(f"name {name!r} must be 1 to 255 ASCII bytes")
    return bytes([len(raw)]) + raw


# Plain ints and ready layouts: a header and a footer are built for every
# device section inside the downtime (an Enum member costs ~0.2 µs to look up).
_KIND_AND_ID = struct.Struct(">BI")
_INSTANCE_AND_VERSION = struct.Struct(">II")
_NAMED_KINDS = frozenset({int(SectionType.START), int(SectionType.FULL)})
_SECTION_FOOTER = int(SectionType.SECTION_FOOTER)
_FULL = int(SectionType.FULL)


def section_header(kind: int, section_id: int, name: str = "", instance_id: int = 0,
                   version_id: int = 0) -> bytes:
    """The bytes opening a section: START/FULL carry name, instance and version, PART/END the id only."""
    head = _KIND_AND_ID.pack(kind, section_id)
    if kind in _NAMED_KINDS:
        head += _idstr(name) + _INSTANCE_AND_VERSION.pack(instance_id, version_id)
    return head


def section_footer(section_id: int) -> bytes:
    """The bytes closing a section: 0x7e and its id."""
    return _KIND_AND_ID.pack(_SECTION_FOOTER, section_id)


class StreamWriter:
    """Writes one migration stream (QEMU's qemu_savevm_state_* in order).

    Typical order::

        w.write_header(); w.write_configuration("pc")
        w.write_ram_start(blocks); w.write_ram_part(pages) ...
        w.write_switchover_start(); w.write_ram_end(pages)
        w.write_section_full("net0", 0, vmsd, state) ...
        w.write_eof(); w.write_vmdesc()
    """

    def __init__(self, sink: Sink):
        self.sink = sink
        self._section_ids: dict[tuple[str, int], int] = {}
        self._devices: list[tuple[str, int, VMStateDescription, dict]] = []
        #: batches of pages go as multifd-style packets (the configuration listed x-multifd-packets)
        self.packets = False
        self._packets_sent = 0
        self._ram_block_index: dict[str, int] = {}

    # -- header and configuration ---------------------------------------

    def write_header(self) -> None:
        self.sink.put_buffer(struct.pack(">II", QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION))

    def write_configuration(self, machine: str, capabilities: tuple[str, ...] | list[str] = (),
                            *, target_page_bits: int | None = None) -> None:
        """The configuration section: machine type, then optional subsections.

        x86 QEMU sends no target-page-bits subsection (its page size is fixed);
        targets with a variable page size do, hence the option.
        """
        name = machine.encode("ascii")
        out = [bytes([SectionType.CONFIGURATION]), struct.pack(">I", len(name)), name]
        if target_page_bits is not None:
            out += [bytes([SectionType.SUBSECTION]), _idstr(TARGET_PAGE_BITS_SUBSECTION),
                    struct.pack(">II", 1, target_page_bits)]
        if "x-ignore-shared" in capabilities:
            # Its RAM block list carries guest addresses migfd does not have.
            raise ValueError("migfd does not write streams with x-ignore-shared")
        # The capability list is what the reader goes by: what it announces, the writer writes.
        self.packets = multifd.CAPABILITY in capabilities
        if capabilities:
            out += [bytes([SectionType.SUBSECTION]), _idstr(CAPABILITIES_SUBSECTION),
                    struct.pack(">II", 1, len(capabilities))]
            out += [_idstr(c) for c in capabilities]
        self.sink.put_buffer(b"".join(out))

    # -- sections ---------------------------------------------------------

    def section_id(self, name: str, instance_id: int = 0) -> int:
        """QEMU numbers sections in registration order; so do we, on first use."""
        return self._section_ids.setdefault((name, instance_id), len(self._section_ids))

    def _full_header(self, kind: SectionType, name: str, instance_id: int, version_id: int) -> int:
        sid = self.section_id(name, instance_id)
        self.sink.put_buffer(section_header(kind, sid, name, instance_id, version_id))
        return sid

    def _short_header(self, kind: SectionType, name: str, instance_id: int) -> int:
        sid = self._section_ids.get((name, instance_id))
        if sid is None:
            raise ValueError(f"section {name}/{instance_id} has no START")
        self.sink.put_buffer(section_header(kind, sid))
        return sid

    def _footer(self, sid: int) -> None:
        self.sink.put_buffer(section_footer(sid))

    def write_section_full(self, name: str, instance_id: int, vmsd: VMStateDescription,
                           state: dict) -> None:
        """A FULL device section, with the compiled encoder of ``vmsd``.

        Its vmdesc entry is built by :meth:`vmdesc` from ``state``, which must
        not change until then: nothing of the description is built while the
        guest is stopped.
        """
        sid = self.section_id(name, instance_id)
        save_compiled(self.sink, vmsd, state,
                      prefix=section_header(_FULL, sid, name, instance_id, vmsd.version_id),
                      suffix=section_footer(sid))
        self._devices.append((name, instance_id, vmsd, state))

    # -- RAM (an iterable section) ----------------------------------------

    def write_ram_start(self, blocks: list[ram.RamBlock]) -> None:
        sid = self._full_header(SectionType.START, RAM_SECTION_NAME, 0, RAM_SECTION_VERSION)
        self._ram_block_index = {b.id: i for i, b in enumerate(blocks)}
        self.sink.put_buffer(ram.encode_mem_size(blocks))
        self._footer(sid)

    def write_ram_part(self, pages, *, end: bool = False) -> int:
        """A PART (or END) with ``pages``: (block_id, offset, bytes) tuples or PageBatch.

        Returns the number of bytes written. Like QEMU, the block id is sent
        with the first page of each run and CONTINUE after it. With
        x-multifd-packets each PageBatch is one packet
        (:mod:`migfd.stream.multifd`), after which a record names its block again.
        """
        kind = SectionType.END if end else SectionType.PART
        sid = self._short_header(kind, RAM_SECTION_NAME, 0)
        written = 5
        last = None
        # A sink that gathers (QEMUFile.put_buffers) sends a batch's records
        # from where they are: headers and the pages in guest RAM, uncopied.
        put_buffers = getattr(self.sink, "put_buffers", None)
        for item in pages:
            if isinstance(item, ram.PageBatch) and self.packets:
                if not len(item.offsets):
                    continue
                chunks = multifd.encode_packet(item, self._ram_block_index[item.block_id], self._packets_sent)
                self._packets_sent += 1
                last = None
            elif isinstance(item, ram.PageBatch):
                chunks = ram.encode_batch(item, continue_first=item.block_id == last)
                if len(item.offsets):
                    last = item.block_id
            else:
                block_id, offset, data = item
                record = ram.encode_page(None if block_id == last else block_id, offset, data)
                self.sink.put_buffer(record)
                written += len(record)
                last = block_id
                continue
            if put_buffers is not None:
                put_buffers(chunks)
            else:
                for chunk in chunks:
                    self.sink.put_buffer(chunk.tobytes() if isinstance(chunk, Interleaved) else chunk)
            written += sum(map(len, chunks))
        self.sink.put_buffer(ram.EOS)
        self._footer(sid)
        return written + len(ram.EOS) + 5

    # -- commands and the end -----------------------------------------------

    def write_command(self, command: Command, data: bytes = b"") -> None:
        expected = COMMAND_LENGTH.get(command)
        if expected is not None and len(data) != expected:
            raise ValueError(f"{command.name} carries {expected} bytes, not {len(data)}")
        self.sink.put_buffer(bytes([SectionType.COMMAND]) + struct.pack(">HH", command, len(data)) + data)

    def write_open_return_path(self) -> None:
        self.write_command(Command.OPEN_RETURN_PATH)

    def write_ping(self, value: int) -> None:
        self.write_command(Command.PING, struct.pack(">I", value))

    def write_switchover_start(self) -> None:
        self.write_command(Command.SWITCHOVER_START)

    def write_eof(self) -> None:
        self.sink.put_buffer(bytes([SectionType.EOF]))

    def vmdesc(self) -> dict:
        """The device description of every FULL section written so far."""
        return {"page_size": TARGET_PAGE_SIZE,
                "devices": [{"name": name, "instance_id": instance_id, **vmdesc_entry(vmsd, state)}
                            for name, instance_id, vmsd, state in self._devices]}

    def vmdesc_record(self) -> bytes:
        """0x06, be32 length, the JSON description of every FULL section written so far.

        A source builds it before it needs it (while it waits for the
        destination's acknowledgement), so that EOF and the description leave
        together: the destination reads both before it runs the guest.
        """
        blob = json.dumps(self.vmdesc(), separators=(", ", ": ")).encode()
        return bytes([SectionType.VMDESCRIPTION]) + struct.pack(">I", len(blob)) + blob

    def write_vmdesc(self, record: bytes | None = None) -> None:
        """The device description after EOF: ``record`` as :meth:`vmdesc_record` built it, or built now."""
        self.sink.put_buffer(self.vmdesc_record() if record is None else record)
