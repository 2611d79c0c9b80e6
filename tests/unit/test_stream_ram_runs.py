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
