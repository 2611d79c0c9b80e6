"""Fuzzing seeded with real streams: QEMU 7.2's and 10.0's (tests/data/qemu) and one migfd writes.

Each file is read as ``migfd inspect`` reads it: device sections laid out by
the file's own vmdesc, and those it does not describe (all of them in the
``novmdesc`` files, saved with suppress-vmdesc=on) delimited by their
footers. Whatever is done to the files, the reader yields events or raises
StreamError, and stops; ram_runs on or off, it reads the same pages.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migfd.errors import StreamError
from migfd.stream import (
    NEED_DATA,
    EndOfState,
    RamPage,
    RamPageRun,
    SectionFull,
    SectionOpaque,
    StreamReader,
)
from migfd.stream.vmdesc import find_vmdesc, lookup_from_vmdesc

CORPUS = sorted((Path(__file__).parents[1] / "data" / "qemu").glob("*.bin"))
NO_VMDESC = [p for p in CORPUS if "novmdesc" in p.name]
WITH_VMDESC = [p for p in CORPUS if p not in NO_VMDESC]
#: device sections QEMU's pc machine sends (README.md of tests/data/qemu)
PC_DEVICE_SECTIONS = 30


def _read(blob: bytes, lookup, chunk: int, ram_runs: bool, unknown_sections: str = "delimit",
          small_from: int | None = None, small_chunk: int = 1) -> tuple[int, list]:
    """Pages read, and the device sections (FULL or opaque) as (type, id, name, offset, size) and EOF.

    Fed in chunks of ``chunk`` bytes; from ``small_from`` on (the device
    sections, say) in chunks of ``small_chunk``.
    """
    reader = StreamReader(lookup, ram_runs=ram_runs, unknown_sections=unknown_sections)  # type: ignore[arg-type]
    pages = 0
    sections = []
    steps = 0
    cuts = list(range(0, len(blob) if small_from is None else small_from, chunk))
    if small_from is not None:
        cuts += list(range(small_from, len(blob), small_chunk))

    def drain():
        nonlocal pages, steps
        while (ev := reader.next_event()) is not NEED_DATA:
            steps += 1
            assert steps <= len(blob) + 1, "the reader does not advance"
            pages += len(ev) if isinstance(ev, RamPageRun) else isinstance(ev, RamPage)
            if isinstance(ev, (SectionFull, SectionOpaque)):
                sections.append((type(ev).__name__, ev.section_id, ev.name, ev.offset, ev.size))
            if isinstance(ev, EndOfState):
                sections.append(("EOF", ev.offset))

    try:
        for start, end in zip(cuts, cuts[1:] + [len(blob)]):
            reader.receive_data(blob[start:end])
            drain()
        reader.receive_eof()
        drain()
        assert reader.done
    finally:
        reader.close()
    return pages, sections


def _lookup(path: Path):
    return lookup_from_vmdesc(find_vmdesc(str(path)))


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_real_qemu_streams_read_whole_both_ways(path):
    blob = path.read_bytes()
    single, sections = _read(blob, _lookup(path), 65536, ram_runs=False)
    assert single > 0
    assert _read(blob, _lookup(path), 65536, ram_runs=True) == (single, sections)
    kinds = {kind for kind, *_ in sections[:-1]}
    assert kinds == ({"SectionOpaque"} if path in NO_VMDESC else {"SectionFull"})
    if path in NO_VMDESC:
        assert len(sections) - 1 == PC_DEVICE_SECTIONS
        assert sections[-1] == ("EOF", len(blob) - 1)  # EOF is the last byte: no vmdesc


@pytest.mark.parametrize("path", NO_VMDESC, ids=[p.name for p in NO_VMDESC])
def test_real_streams_without_vmdesc_are_refused_by_the_strict_reader(path):
    with pytest.raises(StreamError, match=r"unknown section 'timer' \(instance 0\)"):
        _read(path.read_bytes(), _lookup(path), 65536, ram_runs=True, unknown_sections="error")


@pytest.mark.parametrize("path", WITH_VMDESC, ids=[p.name for p in WITH_VMDESC])
def test_footers_delimit_real_sections_where_the_vmdesc_does(path):
    """Ignoring the vmdesc, every device section is cut where reading it field by field ends it."""
    blob = path.read_bytes()
    _, by_vmdesc = _read(blob, _lookup(path), 65536, ram_runs=True, unknown_sections="error")
    _, by_footer = _read(blob, None, 65536, ram_runs=True)
    assert [s[1:] for s in by_footer] == [s[1:] for s in by_vmdesc]
    assert {s[0] for s in by_footer[:-1]} == {"SectionOpaque"}


@pytest.mark.parametrize("path", NO_VMDESC, ids=[p.name for p in NO_VMDESC])
def test_real_device_sections_fed_byte_by_byte(path):
    blob = path.read_bytes()
    _, whole = _read(blob, None, 1 << 20, ram_runs=True)
    first_device = whole[0][3]
    assert _read(blob, None, 1 << 20, ram_runs=True, small_from=first_device)[1] == whole


def _section_at(blob: bytes, which: int) -> tuple[int, int, int]:
    _, sections = _read(blob, None, 1 << 20, ram_runs=True)
    _, section_id, _, at, size = sections[which]
    return section_id, at, size


CORRUPTIONS = {
    # what is done to the file -> the message of the StreamError
    "footer id of the first device": (
        lambda b, id_, at, size: b[:at + size - 4] + struct.pack(">I", id_ + 100) + b[at + size:],
        "has no footer before the end"),
    "type byte of the first device": (lambda b, id_, at, size: b[:at] + b"\x09" + b[at + 1:],
                                      "unknown section type 0x09"),
    "cut in the first device": (lambda b, id_, at, size: b[:at + size // 2], "has no footer before the end"),
    "cut before EOF": (lambda b, *_: b[:-1], "no footer before the end"),
    "bytes after EOF": (lambda b, *_: b + b"\x00", "trailing bytes|no footer"),
    # the first record of the RAM PART (at 178 in both files, README.md), header 5 bytes
    "a RAM record": (lambda b, *_: b[:183] + b"\xff" * 8 + b[191:], "RAM|ram|record|flags|block"),
}


@pytest.mark.parametrize("path", NO_VMDESC, ids=[p.name for p in NO_VMDESC])
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_corrupted_streams_without_vmdesc_are_stream_errors(path, corruption):
    """What the stream's structure can tell is checked: footers, types, RAM records.
    (A changed byte inside an opaque payload cannot be told: nothing describes it.)
    """
    blob = path.read_bytes()
    change, message = CORRUPTIONS[corruption]
    bad = change(blob, *_section_at(blob, 0))
    with pytest.raises(StreamError, match=message):
        _read(bad, None, 65536, ram_runs=True)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, max(len(CORPUS) - 1, 0)), data=st.data())
def test_mutated_real_streams_give_events_or_stream_error(index, data):
    if not CORPUS:
        pytest.skip("no QEMU streams in tests/data/qemu")
    path = CORPUS[index]
    blob = bytearray(path.read_bytes())
    lookup = _lookup(path)
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
    unknown_sections = data.draw(st.sampled_from(["error", "delimit"]))
    try:
        _read(bytes(blob), lookup, chunk, ram_runs=data.draw(st.booleans()), unknown_sections=unknown_sections)
    except StreamError as exc:
        assert exc.offset is None or 0 <= exc.offset <= len(blob)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(index=st.integers(0, max(len(NO_VMDESC) - 1, 0)), data=st.data())
def test_mutated_device_sections_without_vmdesc_give_events_or_stream_error(index, data):
    """Mutations aimed at the device sections, where the footer search works."""
    if not NO_VMDESC:
        pytest.skip("no novmdesc streams in tests/data/qemu")
    blob = bytearray(NO_VMDESC[index].read_bytes())
    _, first_device, _ = _section_at(bytes(blob), 0)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(first_device, len(blob) - 1))
        kind = data.draw(st.sampled_from(["flip", "delete", "insert", "footer"]))
        if kind == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif kind == "delete":
            del blob[at:at + data.draw(st.integers(1, 8))]
        elif kind == "insert":
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        else:  # a fake footer of some section id, maybe one in use
            blob[at:at] = b"\x7e" + struct.pack(">I", data.draw(st.integers(0, 45)))
        if len(blob) <= first_device:
            break
    try:
        _read(bytes(blob), None, 1 << 20, ram_runs=True, small_from=first_device - 100,
              small_chunk=data.draw(st.integers(1, 4096)))
    except StreamError as exc:
        assert exc.offset is None or 0 <= exc.offset <= len(blob)
