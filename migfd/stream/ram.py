"""The RAM section (QEMU's "ram", version 4): block list and page records.

Each record is a be64 of (offset within the block | flags). When a record's
block differs from the previous record's, the block id follows (u8 length +
id); otherwise the CONTINUE flag says "same block". A ZERO page carries one
fill byte, a PAGE carries the page. EOS ends every START/PART/END payload.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from migfd.stream.constants import (
    RAM_SAVE_FLAG_COMPRESS_PAGE,
    RAM_SAVE_FLAG_CONTINUE,
    RAM_SAVE_FLAG_EOS,
    RAM_SAVE_FLAG_HOOK,
    RAM_SAVE_FLAG_MEM_SIZE,
    RAM_SAVE_FLAG_MULTIFD_FLUSH,
    RAM_SAVE_FLAG_PAGE,
    RAM_SAVE_FLAG_X_PACKET,
    RAM_SAVE_FLAG_XBZRLE,
    RAM_SAVE_FLAG_ZERO,
    TARGET_PAGE_BITS,
    TARGET_PAGE_SIZE,
)
from migfd.stream.gather import Interleaved
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

#: A PAGE|CONTINUE record: its word, then the page.
PAGE_RECORD_BYTES = 8 + TARGET_PAGE_SIZE

#: Records of a run of pages: PAGE|CONTINUE (8 + 4096 bytes) or ZERO|CONTINUE (8 + 1).
_RUN_FLAGS = {RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE: 8 + TARGET_PAGE_SIZE,
              RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE: 9}
#: Most records one run event carries (16 MiB of pages).
MAX_RUN = 4096


@dataclass(frozen=True)
class PageBatch:
    """Pages of one block to send together: byte offsets and a (k, PAGE) uint8 array.

    The same records as k single pages, built with numpy so that a state
    copy moves RAM at memory speed rather than one Python call per page.
    ``rows`` may be a view of guest RAM: the records point into it and are
    sent from it, never copied. ``nonzero`` may carry the caller's per-page
    "not all zero" mask.
    """

    block_id: str
    offsets: np.ndarray
    rows: np.ndarray
    nonzero: np.ndarray | None = None


def nonzero_pages(rows: np.ndarray) -> np.ndarray:
    """Which rows of a (k, PAGE) uint8 array hold a byte that is not zero.

    A page whose first 8 bytes are not all zero is decided by them (as
    QEMU's buffer_is_zero looks at a few words first); only the others are
    read whole. A state copy so reads the pages once, when it sends them.
    """
    words = rows.view(np.uint64) if rows.flags.c_contiguous else np.ascontiguousarray(rows).view(np.uint64)
    nonzero = words[:, 0] != 0
    unsure = np.flatnonzero(~nonzero)
    if len(unsure):
        nonzero[unsure] = words[unsure].any(axis=1)
    return nonzero


def _run_heads(offsets: np.ndarray, flags: int) -> np.ndarray:
    """The be64 words of CONTINUE records for ``offsets``, as one uint8 array of 8 bytes each."""
    return (offsets.astype(np.uint64) | np.uint64(flags)).astype(">u8").view(np.uint8)


def continued_pages(words: np.ndarray, first_offset: int) -> int:
    """How many of ``words`` ((k, 8) uint8, record words as received) are, in order, the
    PAGE|CONTINUE records of the pages at ``first_offset``, the next page, and so on."""
    flags = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE
    got = words.view(">u8")[:, 0]
    expected = np.arange(first_offset | flags, (first_offset | flags) + len(words) * TARGET_PAGE_SIZE,
                         TARGET_PAGE_SIZE, dtype=np.uint64)
    wrong = np.flatnonzero(got != expected)
    return int(wrong[0]) if len(wrong) else len(words)


def _zero_run(offsets: np.ndarray) -> memoryview:
    """ZERO|CONTINUE records, each followed by its fill byte 0: one buffer."""
    out = np.zeros((len(offsets), _RUN_FLAGS[RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE]), dtype=np.uint8)
    out[:, :8] = _run_heads(offsets, RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE).reshape(-1, 8)
    return memoryview(out).cast("B")


def _page_run(offsets: np.ndarray, rows: np.ndarray) -> Interleaved:
    """PAGE|CONTINUE records: each header, then its page in ``rows`` (nothing copied)."""
    heads = _run_heads(offsets, RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE).reshape(-1, 8)
    return Interleaved(heads, rows)


def encode_batch(batch: PageBatch, continue_first: bool) -> list:
    """The records of ``batch`` in page order, for one gathering write: 1-D byte
    buffers and :class:`~migfd.stream.gather.Interleaved` runs.

    A run of normal pages is one Interleaved: the 8-byte headers and the
    pages in ``batch.rows`` (not copied). A run of zero pages is one buffer. The
    first record names the block unless ``continue_first``; every other one
    says CONTINUE. Zero pages become ZERO records with fill byte 0.
    """
    k = len(batch.offsets)
    if k == 0:
        return []
    if np.any(batch.offsets % TARGET_PAGE_SIZE):
        raise ValueError("page offsets must be page aligned")
    nonzero = batch.nonzero if batch.nonzero is not None else nonzero_pages(batch.rows)
    chunks: list = []
    start = 0
    if not continue_first:
        chunks.append(encode_page(batch.block_id, int(batch.offsets[0]), batch.rows[0].tobytes()))
        start = 1
    # Runs of equal zero-ness, each encoded in one go.
    edges = np.flatnonzero(np.diff(nonzero[start:].astype(np.int8))) + 1 + start
    bounds = [start, *edges.tolist(), k]
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        if nonzero[a]:
            chunks.append(_page_run(batch.offsets[a:b], batch.rows[a:b]))
        else:
            chunks.append(_zero_run(batch.offsets[a:b]))
    return chunks


@dataclass(frozen=True)
class PageRun:
    """A run of CONTINUE records read in one go; ``data`` None for zero pages.

    ``data`` is a (k, PAGE) view of the bytes decoded (rows 8 bytes apart),
    not a copy: whoever stores the pages makes the one copy.
    """

    block_id: str
    offsets: np.ndarray
    data: np.ndarray | None


def decode_run(cur: Cursor, last_block: str | None, blocks: dict[str, int]) -> PageRun | None:
    """Read a run of at least two same-kind CONTINUE records, or None to read one by one.

    Anything unusual (another flag, a non-zero fill, an offset out of range)
    ends the run before it, so the single-record path reports it with its
    exact offset.
    """
    if last_block is None:
        return None
    data, pos = cur.data, cur.pos
    if len(data) - pos < 16:
        return None
    word = struct.unpack_from(">Q", data, pos)[0]
    flags = word & _FLAG_MASK
    size = _RUN_FLAGS.get(flags)
    if size is None:
        return None
    n = min((len(data) - pos) // size, MAX_RUN)
    if n < 2:
        return None
    records = np.frombuffer(data, dtype=np.uint8, count=n * size, offset=pos).reshape(n, size)
    try:
        words = records[:, :8].copy().view(">u8").ravel()
        offsets = words & np.uint64(~_FLAG_MASK & 0xFFFFFFFFFFFFFFFF)
        good = ((words & np.uint64(_FLAG_MASK)) == flags) & (offsets + TARGET_PAGE_SIZE <= blocks[last_block])
        if size == 9:
            good &= records[:, 8] == 0
        k = n if good.all() else int(np.argmin(good))
        if k < 2:
            return None
        pages = records[:k, 8:] if size != 9 else None
    finally:
        # Only the pages' view may outlive this call (the reader allows for it).
        del records
    cur.pos = pos + k * size
    return PageRun(last_block, offsets[:k].astype(np.uint64), pages)


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
    if flags & RAM_SAVE_FLAG_X_PACKET:
        raise cur.error("RAM record is a migfd packet, but the configuration did not list "
                        "the x-multifd-packets capability", at)
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
