"""Fuzzing seeded with real streams: QEMU 7.2's (tests/data/qemu) and one migfd writes.

Whatever is done to them, the reader yields events or raises StreamError,
and stops; ram_runs on or off, it reads the same pages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migfd.stream.vmdesc import find_vmdesc, lookup_from_vmdesc
from migfd.errors import StreamError
from migfd.stream import NEED_DATA, RamPage, RamPageRun, StreamReader

CORPUS = sorted((Path(__file__).parents[1] / "data" / "qemu").glob("*.bin"))


def _read(blob: bytes, lookup, chunk: int, ram_runs: bool) -> int:
    reader = StreamReader(lookup, ram_runs=ram_runs)
    pages = 0
    steps = 0
    try:
        for i in range(0, len(blob), chunk):
            reader.receive_data(blob[i:i + chunk])
            while (ev := reader.next_event()) is not NEED_DATA:
                steps += 1
                assert steps <= len(blob), "the reader does not advance"
                pages += len(ev) if isinstance(ev, RamPageRun) else isinstance(ev, RamPage)
        reader.receive_eof()
        while (ev := reader.next_event()) is not NEED_DATA:
            pages += len(ev) if isinstance(ev, RamPageRun) else isinstance(ev, RamPage)
    finally:
        reader.close()
    return pages


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_real_qemu_streams_read_whole_both_ways(path):
    blob = path.read_bytes()
    lookup = lookup_from_vmdesc(find_vmdesc(str(path)))
    single = _read(blob, lookup, 65536, ram_runs=False)
    assert single > 0
    assert _read(blob, lookup, 65536, ram_runs=True) == single


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, max(len(CORPUS) - 1, 0)), data=st.data())
def test_mutated_real_streams_give_events_or_stream_error(index, data):
    if not CORPUS:
        pytest.skip("no QEMU streams in tests/data/qemu")
    path = CORPUS[index]
    blob = bytearray(path.read_bytes())
    lookup = lookup_from_vmdesc(find_vmdesc(str(path)))
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "delete", "insert"]))
        at = data.draw(st.integers(0, len(blob) - 1))
        if kind == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del blob[at:]
        elif kind == "delete":
            del blob[at:at + data.draw(st.integers(1, 64))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=16))
        if not blob:
            break
    chunk = data.draw(st.integers(1, 1 << 17))
    try:
        _read(bytes(blob), lookup, chunk, ram_runs=data.draw(st.booleans()))
    except StreamError as exc:
        assert exc.offset is None or 0 <= exc.offset <= len(blob)
