"""The events :class:`~migfd.stream.reader.StreamReader` turns a migration stream into.

One frozen dataclass per kind of record, and :data:`NEED_DATA`, the answer
when the bytes received so far end half-way through one. Kept apart from the
parser so that consumers (inspection, the tour, the migration's loader) can
name events without pulling in the parser's machinery.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from migfd.stream import ram
from migfd.stream.constants import Command

class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by :meth:`StreamReader.next_event` when more bytes are needed.
NEED_DATA = _NeedData()


# -- events ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """The stream header: magic and version, both checked."""

    version: int
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Configuration:
    """The configuration section: machine type and validated capabilities."""

    machine: str
    capabilities: tuple[str, ...]
    target_page_bits: int | None
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class SectionHeader:
    """START, PART or END of an iterable section (RAM); content events follow."""

    type: SectionType
    section_id: int
    name: str
    instance_id: int
    version_id: int
    offset: int


@dataclass(frozen=True, slots=True)
class SectionFooter:
    """The footer closing a START/PART/END; ``size`` covers the whole section."""

    type: SectionType
    section_id: int
    name: str
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class SectionFull:
    """A whole device section with its loaded vmstate (fds in it are now yours)."""

    section_id: int
    name: str
    instance_id: int
    version_id: int
    vmsd_name: str
    state: dict
    offset: int
    size: int
    fds: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class SectionOpaque:
    """A whole section the reader has no description for, delimited by its footer, not decoded.

    Only with ``unknown_sections="delimit"``: a FULL section without a vmsd,
    or a START/PART/END of an iterable section other than RAM version 4.
    ``size`` covers header, payload and footer.
    """

    type: SectionType
    section_id: int
    name: str
    instance_id: int
    version_id: int
    offset: int
    size: int


@dataclass(frozen=True, slots=True)
class RamMemSize:
    """The RAM block list of the RAM START."""

    blocks: tuple[ram.RamBlock, ...]


@dataclass(frozen=True, slots=True)
class RamPage:
    """One page record; ``data`` is None for a zero page (filled with ``fill``)."""

    block_id: str
    offset: int
    data: bytes | None
    fill: int = 0


@dataclass(frozen=True, slots=True)
class RamPageRun:
    """Consecutive CONTINUE page records of one block, read at once (``ram_runs=True``).

    ``offsets`` are byte offsets (numpy uint64); ``data`` is a (k, 4096) uint8
    array, or None for a run of zero pages.
    """

    block_id: str
    offsets: Any
    data: Any

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True, slots=True)
class RamPacket:
    """The header of a multifd-style packet (``x-multifd-packets``, :mod:`migfd.stream.multifd`).

    ``normal`` and ``zero`` are byte offsets (numpy uint64). The bytes of the
    normal pages follow in the stream, in that order: either the next event
    (a :class:`RamPacketPages`, once they have all arrived) or, for a caller
    that receives them straight where they belong,
    :meth:`StreamReader.take_packet_bytes` and :meth:`StreamReader.packet_bytes_read`.
    """

    block_id: str
    packet_num: int
    normal: Any
    zero: Any
    offset: int
    size: int

    def __len__(self) -> int:
        return len(self.normal) + len(self.zero)


@dataclass(frozen=True, slots=True)
class RamPacketPages:
    """The normal pages of the packet before, read by the reader: ``data`` is a (k, 4096) view."""

    block_id: str
    offsets: Any
    data: Any

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True, slots=True)
class CommandRecord:
    """A COMMAND record; ``value`` is the PING value where there is one."""

    command: int
    data: bytes
    offset: int

    @property
    def value(self) -> int | None:
        if self.command == Command.PING:
            return struct.unpack(">I", self.data)[0]
        return None


@dataclass(frozen=True, slots=True)
class EndOfState:
    """QEMU_VM_EOF: all device state has been sent."""

    offset: int


@dataclass(frozen=True, slots=True)
class VMDescription:
    """The JSON device description that follows EOF."""

    description: dict
    offset: int
    size: int


Event = (Header | Configuration | SectionHeader | SectionFooter | SectionFull | SectionOpaque
         | RamMemSize | RamPage | RamPageRun | RamPacket | RamPacketPages | CommandRecord | EndOfState | VMDescription)
