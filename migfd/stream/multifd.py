"""migfd's multifd-style RAM packets (capability ``x-multifd-packets``): a header listing page offsets, then the pages.

Modelled on QEMU's multifd (migration/multifd.h, MultiFDPacket_t): a packet
names its RAM block, counts its normal and its zero pages, lists their offsets
(normal first, then zero) and is followed by the normal pages' bytes, back to
back; a zero page is listed and sends no bytes. So a source can send a packet
as one gathering write straight from guest RAM (the header, then views of the
pages), and a destination, once it has read the header, knows where every
following byte goes and can receive the pages straight into guest RAM.

On the wire (all big-endian), inside a RAM PART or END::

    be64 RAM_SAVE_FLAG_X_PACKET (0x400)   the record word, offset 0
    be32 magic 0x4d464450 ("MFDP")
    be32 version 1
    be32 flags (0: none are defined)
    be32 block index (in the RAM START's block list)
    be32 normal pages, be32 zero pages
    be64 packet number (0, 1, 2, ... in the stream)
    be64 offsets[normal + zero]
    normal x 4096 bytes of pages

Why a record inside the RAM section and not a section type of its own: the
RAM section already carries what a packet needs (the block list of its START,
the PART/END framing with EOS and footer, the iteration a precopy pass is),
and the reader's RAM state reads one record after another by its be64 word,
so a packet is one more kind of record there and may mix with QEMU's. The
word's flag 0x400 is one QEMU never sends (its migration/ram.c keeps every
flag at or below 0x200, for targets with 1 KiB pages), so a QEMU stream can
never be mistaken for a packet; a reader accepts it only when the
configuration section lists ``x-multifd-packets``. Unlike QEMU's multifd the
packets travel in the main channel (one socket, in order): no channel id, no
sync flag, and the block is an index rather than a 256-byte name.

Only the header is encoded and decoded here; who moves the pages (a
gathering write, a read into guest RAM) is the channel's and the
migration's business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from migfd.stream.constants import RAM_SAVE_FLAG_X_PACKET, TARGET_PAGE_SIZE, X_MULTIFD_PACKETS
from migfd.stream.ram import PageBatch, nonzero_pages
from migfd.stream.vmstate import Cursor

PACKET_MAGIC = 0x4D464450  # "MFDP"
PACKET_VERSION = 1
#: the capability both sides must list for packets to be sent and accepted
CAPABILITY = X_MULTIFD_PACKETS
#: most pages one packet lists (16 MiB of pages, as a reader's run of records)
MAX_PACKET_PAGES = 4096

#: record word, magic, version, flags, block index, normal, zero, packet number
_FIXED = struct.Struct(">QIIIIIIQ")
#: bytes of a packet header before its offsets
FIXED_BYTES = _FIXED.size
_PAGE_MASK = TARGET_PAGE_SIZE - 1


@dataclass(frozen=True)
class PacketHeader:
    """A decoded packet header: its block, the offsets of its normal and its zero pages."""

    block_index: int
    packet_num: int
    #: byte offsets in the block (numpy uint64) of the pages whose bytes follow, in that order
    normal: np.ndarray
    #: byte offsets of the zero pages (no bytes follow for them)
    zero: np.ndarray

    @property
    def page_bytes(self) -> int:
        """Bytes of pages that follow the header."""
        return len(self.normal) * TARGET_PAGE_SIZE


def header_bytes(n_pages: int) -> int:
    """Size of the header of a packet listing ``n_pages`` pages."""
    return FIXED_BYTES + 8 * n_pages


def encode_header(block_index: int, normal: np.ndarray, zero: np.ndarray, packet_num: int) -> bytes:
    """The header of a packet: the record word, the fixed fields, then the offsets (normal, then zero)."""
    n = len(normal) + len(zero)
    if not 0 < n <= MAX_PACKET_PAGES:
        raise ValueError(f"a packet lists 1 to {MAX_PACKET_PAGES} pages, not {n}")
    offsets = np.concatenate([np.asarray(normal, dtype=np.uint64), np.asarray(zero, dtype=np.uint64)])
    if np.any(offsets & np.uint64(_PAGE_MASK)):
        raise ValueError("page offsets must be page aligned")
    fixed = _FIXED.pack(RAM_SAVE_FLAG_X_PACKET, PACKET_MAGIC, PACKET_VERSION, 0, block_index,
                        len(normal), len(zero), packet_num)
    return fixed + offsets.astype(">u8").tobytes()


def encode_packet(batch: PageBatch, block_index: int, packet_num: int) -> list:
    """A batch as one packet: its header, then views of its normal pages in ``batch.rows``
    (a run of neighbouring rows is one view; nothing is copied), for one gathering write."""
    nonzero = batch.nonzero if batch.nonzero is not None else nonzero_pages(batch.rows)
    normal = np.flatnonzero(nonzero)
    out: list = [encode_header(block_index, batch.offsets[normal], batch.offsets[~nonzero], packet_num)]
    if not len(normal):
        return out
    # Runs of neighbouring normal rows: where the row index jumps, a run ends.
    breaks = np.flatnonzero(np.diff(normal) != 1) + 1
    starts = [0, *breaks.tolist()]
    ends = [*breaks.tolist(), len(normal)]
    for a, b in zip(starts, ends):
        rows = batch.rows[normal[a]:normal[b - 1] + 1]
        out.append(memoryview(np.ascontiguousarray(rows)).cast("B"))
    return out


def is_packet(word: int) -> bool:
    """Whether a RAM record word opens a packet."""
    return word == RAM_SAVE_FLAG_X_PACKET


def decode_header(cur: Cursor, block_lengths: list[int], expected_num: int) -> PacketHeader:
    """Read a packet header, record word included; the page bytes stay unread.

    Every field is checked against what the stream said before: the block
    index against the RAM START's list, each offset against its block, the
    packet number against the count of packets so far (a lost or repeated
    packet is an error, not a page at the wrong place).
    """
    at = cur.offset
    word, magic, version, flags, index, n_normal, n_zero, num = _unpack(cur)
    if not is_packet(word):
        raise cur.error(f"RAM record word {word:#x} does not open a packet", at)
    if magic != PACKET_MAGIC:
        raise cur.error(f"packet magic {magic:#010x}, expected {PACKET_MAGIC:#010x}", at + 8)
    if version != PACKET_VERSION:
        raise cur.error(f"packet version {version} is not supported (only {PACKET_VERSION})", at + 12)
    if flags:
        raise cur.error(f"packet flags {flags:#x} are unknown", at + 16)
    if index >= len(block_lengths):
        raise cur.error(f"packet names RAM block {index}, but the RAM START listed {len(block_lengths)}", at + 20)
    n = n_normal + n_zero
    if not 0 < n <= MAX_PACKET_PAGES:
        raise cur.error(f"packet lists {n} pages, expected 1 to {MAX_PACKET_PAGES}", at + 24)
    if num != expected_num:
        raise cur.error(f"packet number {num}, expected {expected_num}", at + 32)
    raw = cur.data[cur.pos:cur.pos + 8 * n]
    if len(raw) < 8 * n:
        raise cur.short(8 * n)
    offsets = np.frombuffer(raw, dtype=">u8").astype(np.uint64)
    del raw
    length = block_lengths[index]
    bad = (offsets & np.uint64(_PAGE_MASK)) != 0
    if length < TARGET_PAGE_SIZE:
        bad[:] = True
    else:
        bad |= offsets > np.uint64(length - TARGET_PAGE_SIZE)
    if np.any(bad):
        i = int(np.argmax(bad))
        raise cur.error(f"packet page offset {int(offsets[i]):#x} is not a page of RAM block {index} "
                        f"of {length} bytes", cur.offset + 8 * i)
    cur.pos += 8 * n
    return PacketHeader(index, num, offsets[:n_normal], offsets[n_normal:])


def _unpack(cur: Cursor) -> tuple[int, ...]:
    pos = cur.pos
    if pos + FIXED_BYTES > len(cur.data):
        raise cur.short(FIXED_BYTES)
    cur.pos = pos + FIXED_BYTES
    return _FIXED.unpack_from(cur.data, pos)


def peek_header_bytes(data, pos: int) -> int | None:
    """The size of the packet header that starts at ``data[pos]``, once its fixed part is
    there; None when the bytes there are not a packet (or the counts are out of bounds)."""
    if len(data) - pos < FIXED_BYTES:
        return None
    word, magic, _, _, _, n_normal, n_zero, _ = _FIXED.unpack_from(data, pos)
    if not is_packet(word) or magic != PACKET_MAGIC or not 0 < n_normal + n_zero <= MAX_PACKET_PAGES:
        return None
    return header_bytes(n_normal + n_zero)
