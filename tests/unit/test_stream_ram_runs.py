"""The numpy RAM path: PageBatch writes the same bytes as single pages, and
RamPageRun events carry the same pages as single RamPage events."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migfd.errors import StreamError
from migfd.stream import (
    MemorySink, PageBatch, RamBlock, RamPage, RamPageRun, StreamReader, StreamWriter,
)

PAGE = 4096
BLOCK_PAGES = 64


def _ram(kinds: list[int]) -> np.ndarray:
    """One page per kind: 0 = zero page, n > 0 = page filled with byte n."""
    ram = np.zeros((len(kinds), PAGE), dtype=np.uint8)
    for i, kind in enumerate(kinds):
        ram[i] = kind
        if kind:
            ram[i, :8] = np.frombuffer(i.to_bytes(8, "big"), dtype=np.uint8)
    return ram


def _stream(parts) -> bytes:
    sink = MemorySink()
    w = StreamWriter(sink)
    w.write_header()
    w.write_configuration("pc")
    w.write_ram_start([RamBlock("ram0", BLOCK_PAGES * PAGE), RamBlock("ram1", BLOCK_PAGES * PAGE)])
    for i, pages in enumerate(parts):
        w.write_ram_part(pages, end=i == len(parts) - 1)
    w.write_eof()
    return sink.getvalue()


def _pages_read(blob: bytes, *, ram_runs: bool, chunk: int) -> dict[tuple[str, int], bytes]:
    reader = StreamReader(ram_runs=ram_runs)
    seen: dict[tuple[str, int], bytes] = {}
    for i in range(0, len(blob), chunk):
        reader.receive_data(blob[i:i + chunk])
        for ev in reader.events():
            if isinstance(ev, RamPage):
                seen[(ev.block_id, ev.offset)] = ev.data if ev.data is not None else bytes(PAGE)
            elif isinstance(ev, RamPageRun):
                assert ram_runs
                for j, off in enumerate(ev.offsets):
                    seen[(ev.block_id, int(off))] = ev.data[j].tobytes() if ev.data is not None else bytes(PAGE)
    reader.receive_eof()
    assert list(reader.events()) == []
    return seen


kinds_st = st.lists(st.sampled_from([0, 0, 1, 7, 255]), min_size=1, max_size=BLOCK_PAGES)


@settings(max_examples=60, deadline=None)
@given(kinds=kinds_st, second=kinds_st, chunk=st.integers(1, 20000), data=st.data())
def test_batches_write_the_same_bytes_and_runs_read_the_same_pages(kinds, second, chunk, data):
    ram0, ram1 = _ram(kinds), _ram(second)
    idx0 = np.array(sorted(data.draw(st.sets(st.integers(0, len(kinds) - 1), min_size=1))))
    idx1 = np.arange(len(second))
    batched = [[PageBatch("ram0", idx0.astype(np.uint64) * PAGE, ram0[idx0]),
                PageBatch("ram1", idx1.astype(np.uint64) * PAGE, ram1[idx1])],
               [PageBatch("ram1", idx1[:1].astype(np.uint64) * PAGE, ram1[idx1[:1]])]]
    single = [[("ram0", int(i) * PAGE, ram0[i].tobytes()) for i in idx0]
              + [("ram1", int(i) * PAGE, ram1[i].tobytes()) for i in idx1],
              [("ram1", 0, ram1[0].tobytes())]]
    blob = _stream(batched)
    assert blob == _stream(single)
    expected = _pages_read(blob, ram_runs=False, chunk=len(blob))
    assert _pages_read(blob, ram_runs=True, chunk=chunk) == expected
    assert set(expected) == {("ram0", int(i) * PAGE) for i in idx0} | {("ram1", int(i) * PAGE) for i in idx1}


def test_a_run_stops_before_a_bad_record_which_is_reported_at_its_offset():
    ram = _ram([1] * 8)
    blob = bytearray(_stream([[PageBatch("ram0", np.arange(8, dtype=np.uint64) * PAGE, ram)]]))
    # The 6th record's offset is pushed past the block: a run must end before it.
    first = blob.index(b"\x04ram0", blob.index(b"\x04ram1")) + 5 + PAGE  # after the named first record
    bad = first + 4 * (8 + PAGE)
    blob[bad:bad + 8] = ((BLOCK_PAGES * PAGE) | 0x28).to_bytes(8, "big")
    reader = StreamReader(ram_runs=True)
    reader.receive_data(bytes(blob))
    pages = 0
    with pytest.raises(StreamError) as err:
        for ev in reader.events():
            pages += len(ev) if isinstance(ev, RamPageRun) else isinstance(ev, RamPage)
    assert pages == 5
    assert err.value.offset == bad
    assert "beyond block" in str(err.value)


def _lend_and_read(blob: bytes, cuts: list[tuple[int, int]]) -> tuple[dict, list]:
    """Feed ``blob`` through get_buffer/buffer_updated: each (lend, fill) lends ``lend``
    bytes and fills ``min(fill, lend)`` of them. Returns the pages and every run seen."""
    reader = StreamReader(ram_runs=True)
    seen: dict[tuple[str, int], bytes] = {}
    runs = []
    at = 0
    steps = iter(cuts * (len(blob) + 1))
    while at < len(blob):
        lend, fill = next(steps)
        view = reader.get_buffer(lend)
        n = min(fill, len(view), len(blob) - at)
        view[:n] = blob[at:at + n]
        at += n
        del view
        reader.buffer_updated(n)
        for ev in reader.events():
            if isinstance(ev, RamPage):
                seen[(ev.block_id, ev.offset)] = ev.data if ev.data is not None else bytes(PAGE)
            elif isinstance(ev, RamPageRun):
                runs.append((ev, None if ev.data is None else ev.data.copy()))
                for j, off in enumerate(ev.offsets):
                    seen[(ev.block_id, int(off))] = ev.data[j].tobytes() if ev.data is not None else bytes(PAGE)
    reader.receive_eof()
    assert list(reader.events()) == []
    assert reader.done
    return seen, runs


@settings(max_examples=40, deadline=None)
@given(kinds=kinds_st, cuts=st.lists(st.tuples(st.integers(1, 20000), st.integers(0, 20000)), min_size=1,
                                     max_size=5).filter(lambda c: any(f for _, f in c)))
def test_reading_into_lent_buffers_reads_the_same_pages_and_held_runs_keep_theirs(kinds, cuts):
    """Bytes written into the reader's lent buffer parse as the same bytes given to
    receive_data; the pages of every run, held on while more arrives, never change."""
    ram = _ram(kinds)
    blob = _stream([[PageBatch("ram0", np.arange(len(kinds), dtype=np.uint64) * PAGE, ram)]])
    seen, runs = _lend_and_read(blob, cuts)
    assert seen == _pages_read(blob, ram_runs=False, chunk=len(blob))
    assert all(was is None or np.array_equal(ev.data, was) for ev, was in runs)


def test_nothing_else_while_the_buffer_is_lent():
    reader = StreamReader(ram_runs=True)
    with pytest.raises(RuntimeError):
        reader.buffer_updated(0)
    view = reader.get_buffer(16)
    assert len(view) == 16
    for call in (lambda: reader.get_buffer(1), lambda: reader.receive_data(b"x"), reader.next_event):
        with pytest.raises(RuntimeError):
            call()
    with pytest.raises(ValueError):
        reader.buffer_updated(17)
    view[:8] = b"QEVM\x00\x00\x00\x03"
    del view
    reader.buffer_updated(8)
    assert reader.next_event().version == 3


@pytest.mark.parametrize("at", [0, 7, 8, 2047, PAGE - 1])
def test_a_page_zero_but_for_one_byte_is_a_normal_page(at):
    """Whatever its first word, a page with one byte set goes as a PAGE record."""
    ram = np.zeros((5, PAGE), dtype=np.uint8)
    ram[1, 0] = 1
    ram[3, at] = 0x5A
    offsets = np.arange(5, dtype=np.uint64) * PAGE
    batched = [[PageBatch("ram0", offsets, ram)]]
    single = [[("ram0", int(i) * PAGE, ram[i].tobytes()) for i in range(5)]]
    assert _stream(batched) == _stream(single)
    pages = _pages_read(_stream(batched), ram_runs=True, chunk=3 * PAGE)
    assert pages[("ram0", 3 * PAGE)] == ram[3].tobytes()
