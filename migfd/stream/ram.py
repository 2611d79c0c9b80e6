"""The RAM section (QEMU's "ram", version 4): block list and page records.

Each record is a be64 of (offset within the block | flags). When a record's
block differs from the previous record's, the block id follows (u8 length +
id); otherwise the CONTINUE flag says "same block". A ZERO page carries one
fill byte, a PAGE carries the page. EOS ends every START/PART/END payload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from migfd.stream.constants import (
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    TARGET_PAGE_BITS,
    TARGET_PAGE_SIZE,
)
from migfd.stream.vmstate import Cursor

_FLAG_MASK = TARGET_PAGE_SIZE - 1
_KNOWN_FLAGS = (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_MEM_SIZE | RAM_SAVE_FLAG_PAGE
                | RAM_SAVE_FLAG_EOS | RAM_SAVE_FLAG_CONTINUE | RAM_SAVE_FLAG_MULTIFD_FLUSH)
_UNSUPPORTED = {
    RAM_SAVE_FLAG_XBZRLE: "XBZRLE",
    RAM_SAVE_FLAG_HOOK: "RDMA hook",
    RAM_SAVE_FLAG_COMPRESS_PAGE: "compressed page",
}
#: Bounds for what a block list may claim.
MAX_RAM_BLOCKS = 1024
MAX_RAM_BYTES = 1 << 48

ZERO_PAGE = bytes(TARGET_PAGE_SIZE)


@dataclass(frozen=True)
class RamBlock:
    """One RAMBlock as listed in the START payload: its id and used length."""

    id: str
    length: int


def encode_mem_size(blocks: list[RamBlock]) -> bytes:
    """START payload: total | MEM_SIZE, each block, then EOS."""
    total = sum(b.length for b in blocks)
    out = [struct.pack(">Q", total | RAM_SAVE_FLAG_MEM_SIZE)]
    for b in blocks:
        name = b.id.encode("ascii")
        out.append(bytes([len(name)]) + name + struct.pack(">Q", b.length))
    out.append(struct.pack(">Q", RAM_SAVE_FLAG_EOS))
    return b"".join(out)


def encode_page(block_id: str | None, offset: int, data: bytes | memoryview) -> bytes:
    """One page record. ``block_id`` None means CONTINUE (same block as before).

    A page of zeros travels as a ZERO record with its fill byte, as in QEMU.
    """
    if offset & _FLAG_MASK:
        raise ValueError(f"page offset {offset:#x} is not page aligned")
    flags = RAM_SAVE_FLAG_ZERO if data == ZERO_PAGE else RAM_SAVE_FLAG_PAGE
    if block_id is None:
        flags |= RAM_SAVE_FLAG_CONTINUE
        head = struct.pack(">Q", offset | flags)
    else:
        name = block_id.encode("ascii")
        head = struct.pack(">Q", offset | flags) + bytes([len(name)]) + name
    if flags & RAM_SAVE_FLAG_ZERO:
        return head + b"\x00"
    if len(data) != TARGET_PAGE_SIZE:
        raise ValueError(f"a page has {TARGET_PAGE_SIZE} bytes, not {len(data)}")
    return head + bytes(data)


EOS = struct.pack(">Q", RAM_SAVE_FLAG_EOS)


def decode_mem_size(cur: Cursor, *, ignore_shared: bool = False) -> list[RamBlock]:
    """Read a START payload up to and including its EOS.

    With QEMU's x-ignore-shared capability every block's length is followed
    by its guest address (be64), which we read and drop.
    """
    at = cur.offset
    word = cur.be64()
    if not word & RAM_SAVE_FLAG_MEM_SIZE:
        raise cur.error("RAM section START does not begin with MEM_SIZE", at)
    total = word & ~_FLAG_MASK
    if total > MAX_RAM_BYTES:
        raise cur.error(f"RAM size {total} is beyond any host", at)
    blocks: list[RamBlock] = []
    seen = 0
    while seen < total:
        if len(blocks) >= MAX_RAM_BLOCKS:
            raise cur.error(f"more than {MAX_RAM_BLOCKS} RAM blocks", cur.offset)
        block_id = cur.idstr("RAM block id")
        at_len = cur.offset
        length = cur.be64()
        if length == 0 or length > total - seen:
            raise cur.error(f"RAM block '{block_id}' length {length} does not fit the total {total}", at_len)
        if ignore_shared:
            cur.be64()
        blocks.append(RamBlock(block_id, length))
        seen += length
    at = cur.offset
    if cur.be64() != RAM_SAVE_FLAG_EOS:
        raise cur.error("RAM block list is not followed by EOS", at)
    return blocks


@dataclass(frozen=True)
class PageRecord:
    """One decoded page record; ``data`` is None for a ZERO page."""

    block_id: str
    offset: int
    data: bytes | None
    fill: int = 0


def decode_record(cur: Cursor, last_block: str | None,
                  blocks: dict[str, int]) -> PageRecord | None:
    """Read one page record; None at EOS. A MULTIFD_FLUSH carries nothing and is skipped."""
    while True:
        at = cur.offset
        word = cur.be64()
        if word != RAM_SAVE_FLAG_MULTIFD_FLUSH:
            break
    flags = word & _FLAG_MASK
    offset = word & ~_FLAG_MASK
    for flag, what in _UNSUPPORTED.items():
        if flags & flag:
            raise cur.error(f"RAM record uses {what}, which migfd does not support", at)
    if flags & ~_KNOWN_FLAGS:
        raise cur.error(f"RAM record has unknown flags {flags:#x}", at)
    if flags == RAM_SAVE_FLAG_EOS:
        if offset:
            raise cur.error("RAM EOS record carries an offset", at)
        return None
    kind = flags & (RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_PAGE)
    if kind not in (RAM_SAVE_FLAG_ZERO, RAM_SAVE_FLAG_PAGE) or flags & (RAM_SAVE_FLAG_MEM_SIZE | RAM_SAVE_FLAG_EOS):
        raise cur.error(f"RAM record flags {flags:#x} are not a page", at)
    if flags & RAM_SAVE_FLAG_CONTINUE:
        if last_block is None:
            raise cur.error("RAM record says CONTINUE but no block came before", at)
        block_id = last_block
    else:
        block_id = cur.idstr("RAM block id")
    length = blocks.get(block_id)
    if length is None:
        raise cur.error(f"RAM record names unknown block '{block_id}'", at)
    if offset + TARGET_PAGE_SIZE > length:
        raise cur.error(f"RAM page offset {offset:#x} is beyond block '{block_id}' of {length} bytes", at)
    if kind == RAM_SAVE_FLAG_ZERO:
        return PageRecord(block_id, offset, None, cur.u8())
    return PageRecord(block_id, offset, cur.take(TARGET_PAGE_SIZE))


assert TARGET_PAGE_SIZE == 1 << TARGET_PAGE_BITS
