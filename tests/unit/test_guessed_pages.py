"""A guessed read: page records received straight into RAM on the guess that they go
on from the last page, checked after the read; what the guess got wrong goes back to
the reader and leaves no byte in RAM."""

from __future__ import annotations

import numpy as np
import pytest

from migfd.migration.incoming import settle_guess
from migfd.stream import MemorySink, PageBatch, RamBlock, RamPageRun, StreamReader, StreamWriter
from migfd.stream.ram import PAGE_RECORD_BYTES

pytestmark = pytest.mark.unit

PAGE = 4096
PAGES = 24
LAST = 4  # the page loaded last before the guess: the guess starts at LAST + 1


def _stream(sent: list[int], zero: set[int]) -> tuple[bytes, int, np.ndarray]:
    """A RAM PART sending pages ``sent`` (``zero`` among them are zero pages); the
    bytes, where the records after page LAST begin, and the RAM they stand for."""
    ram = np.random.default_rng(len(sent)).integers(1, 256, size=(PAGES, PAGE), dtype=np.uint8)
    ram[sorted(zero)] = 0
    index = np.array(sent, dtype=np.uint64)
    sink = MemorySink()
    w = StreamWriter(sink)
    w.write_header()
    w.write_ram_start([RamBlock("ram0", PAGES * PAGE)])
    w.write_ram_part([PageBatch("ram0", index * PAGE, ram[index.astype(np.intp)])])
    data = sink.getvalue()
    word = (LAST * PAGE | 0x28).to_bytes(8, "big")  # PAGE|CONTINUE of page LAST
    return data, data.index(word) + PAGE_RECORD_BYTES, ram


def _guessed_read(data: bytes, at: int, nbytes: int, k: int) -> tuple[np.ndarray, np.ndarray, int, bytes]:
    """Receive ``nbytes`` of ``data`` from ``at`` as one guessed read would: into k
    words and RAM pages LAST + 1 ... in turn. Returns (RAM, words, good, rest)."""
    dest = np.zeros((PAGES, PAGE), dtype=np.uint8)
    words = np.zeros((k, 8), dtype=np.uint8)
    pages = dest[LAST + 1:LAST + 1 + k]
    chunk = np.frombuffer(data, dtype=np.uint8)[at:at + nbytes]
    for i in range(k):  # what the read does
        words[i, :len(chunk[:8])] = chunk[:8]
        pages[i, :len(chunk[8:8 + PAGE])] = chunk[8:8 + PAGE]
        chunk = chunk[8 + PAGE:]
    good, rest = settle_guess(words, pages, nbytes, (LAST + 1) * PAGE)
    return dest, words, good, rest


ORDERS = {
    # the pages sent after LAST, and which are zero: where the guess must stop
    "a run": (list(range(LAST + 1, 16)), set(), 11),
    "a zero page": (list(range(LAST + 1, 16)), {8}, 3),
    "a jump": ([5, 6, 7, 12, 13], set(), 3),
    "the section's end": ([5, 6], set(), 2),
}


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("cut", ["all", "in a word", "in a page", "a few bytes"])
def test_only_matching_whole_records_stay_and_the_rest_goes_back(order, cut):
    after, zero, matching = ORDERS[order]
    data, at, ram = _stream(list(range(LAST + 1)) + after, zero)
    nbytes = {"all": len(data) - at, "in a word": 2 * PAGE_RECORD_BYTES + 3,
              "in a page": 2 * PAGE_RECORD_BYTES + 8 + 100, "a few bytes": 5}[cut]
    nbytes = min(nbytes, len(data) - at)
    dest, _, good, rest = _guessed_read(data, at, nbytes, k=12)
    expected = min(matching, nbytes // PAGE_RECORD_BYTES)
    assert good == expected
    # The reader gets, byte for byte, the stream from the first record not kept.
    assert rest == data[at + good * PAGE_RECORD_BYTES:at + nbytes]
    kept = slice(LAST + 1, LAST + 1 + good)
    assert np.array_equal(dest[kept], ram[kept])
    # Every other page is as it was before the read: never received, zero.
    others = np.ones(PAGES, dtype=bool)
    others[kept] = False
    assert not dest[others].any()


def _reader_after_page_last(data: bytes, at: int, extra: int) -> StreamReader:
    """A reader fed the stream up to the records after page LAST, plus ``extra`` bytes of them."""
    reader = StreamReader(ram_runs=True)
    reader.receive_data(data[:at + extra])
    list(reader.events())
    return reader


@pytest.mark.parametrize("extra", [0, 5, PAGE_RECORD_BYTES - 1])
def test_the_reader_lets_records_be_taken_after_what_it_holds(extra):
    """Holding less than a record, the reader names the block and its bytes; records
    taken past it consume them, and it goes on parsing at the right stream offset."""
    data, at, _ = _stream(list(range(LAST + 1)) + list(range(LAST + 1, 12)), set())
    reader = _reader_after_page_last(data, at, extra)
    assert reader.records_expected() == "ram0"
    assert reader.held_bytes() == data[at:at + extra]
    with pytest.raises(ValueError, match="whole page records"):
        reader.records_taken(PAGE_RECORD_BYTES + 1)
    reader.records_taken(3 * PAGE_RECORD_BYTES)  # pages LAST+1 .. LAST+3, taken by the caller
    assert reader.offset == at + 3 * PAGE_RECORD_BYTES
    reader.receive_data(data[at + 3 * PAGE_RECORD_BYTES:])
    events = list(reader.events())
    run = events[0]
    assert isinstance(run, RamPageRun) and int(run.offsets[0]) == (LAST + 4) * PAGE


def test_no_records_can_be_taken_while_the_reader_holds_a_whole_one_or_after_the_section():
    data, at, _ = _stream(list(range(LAST + 1)) + [5, 6], set())
    # A whole record held but unparsed cannot happen for a page; feed the rest and
    # the section ends: nothing more to take.
    reader = _reader_after_page_last(data, at, len(data) - at)
    assert reader.records_expected() is None
    with pytest.raises(RuntimeError):
        reader.records_taken(PAGE_RECORD_BYTES)
