"""multifd-style packets (x-multifd-packets): golden header bytes, the writer and the reader, bad packets.

The expected bytes are written out by hand from the layout in
:mod:`migfd.stream.multifd`'s docstring, never produced by the encoder.
"""

from __future__ import annotations

import numpy as np
import pytest

from migfd.errors import StreamError
from migfd.stream import (
    MemorySink,
    PageBatch,
    RamBlock,
    RamMemSize,
    RamPacket,
    RamPacketPages,
    SectionFooter,
    SectionHeader,
    StreamReader,
    StreamWriter,
)
from migfd.stream import multifd
from migfd.stream.annotate import annotate_sink

PAGE = 4096
#: where a packet starts: its record word and magic
MARK = bytes.fromhex("0000000000000400" "4d464450")

# Block 0, normal pages at 0x0 and 0x1000, a zero page at 0x3000, packet 5.
GOLDEN_HEADER = bytes.fromhex(
    "0000000000000400"  # be64 record word: RAM_SAVE_FLAG_X_PACKET
    "4d464450"  # be32 magic "MFDP"
    "00000001"  # be32 version 1
    "00000000"  # be32 flags
    "00000000"  # be32 block index 0
    "00000002"  # be32 normal pages
    "00000001"  # be32 zero pages
    "0000000000000005"  # be64 packet number
    "0000000000000000"  # offsets: normal 0x0,
    "0000000000001000"  # normal 0x1000,
    "0000000000003000"  # zero 0x3000
)


def test_header_golden_bytes():
    got = multifd.encode_header(0, np.array([0, 0x1000], dtype=np.uint64),
                                np.array([0x3000], dtype=np.uint64), 5)
    assert got == GOLDEN_HEADER
    assert multifd.header_bytes(3) == len(GOLDEN_HEADER) == 64


def _ram(pages: list[int]) -> np.ndarray:
    """Rows of pages: 0 is a zero page, any other value a page of that byte."""
    return np.array([[v] * PAGE for v in pages], dtype=np.uint8)


def _stream(batches: list[tuple[int, list[int]]], packets: bool = True,
            blocks=(RamBlock("pc.ram", 8 * PAGE),)) -> bytes:
    """A stream: header, configuration, RAM START, one PART with a batch each (first page, page values)."""
    sink = MemorySink()
    w = StreamWriter(sink)
    w.write_header()
    w.write_configuration("pc", ["x-multifd-packets"] if packets else [])
    w.write_ram_start(list(blocks))
    w.write_ram_part([PageBatch(blocks[0].id, (first + np.arange(len(v), dtype=np.uint64)) * PAGE, _ram(v))
                      for first, v in batches])
    w.write_eof()
    return sink.getvalue()


def test_a_part_with_a_packet_golden_bytes():
    data = _stream([(0, [0x42, 0x43, 0, 0x44])])
    part = data.index(b"\x02\x00\x00\x00\x00")  # PART of section 0
    expected = (bytes.fromhex("0200000000")  # PART, section id 0
                + bytes.fromhex("0000000000000400" "4d464450" "00000001" "00000000" "00000000"
                                "00000003" "00000001" "0000000000000000"
                                "0000000000000000" "0000000000001000" "0000000000003000"  # normal
                                "0000000000002000")  # zero
                + b"\x42" * PAGE + b"\x43" * PAGE + b"\x44" * PAGE
                + bytes.fromhex("0000000000000010")  # EOS
                + bytes.fromhex("7e00000000")  # footer of section 0
                + b"\x00")  # EOF
    assert data[part:] == expected


def test_a_packet_goes_as_its_header_and_one_view_per_run_of_normal_rows():
    rows = _ram([1, 2, 0, 3, 0, 0, 4, 5])
    chunks = multifd.encode_packet(PageBatch("b", np.arange(8, dtype=np.uint64) * PAGE, rows), 0, 0)
    assert [len(c) for c in chunks] == [multifd.header_bytes(8), 2 * PAGE, PAGE, 2 * PAGE]
    # the page views are rows of the caller's array, not copies
    assert np.shares_memory(np.frombuffer(chunks[1], dtype=np.uint8), rows)


def _events(data: bytes, chunk: int = 1 << 30) -> list:
    reader = StreamReader(ram_runs=True)
    out = []
    for i in range(0, len(data), chunk):
        reader.receive_data(data[i:i + chunk])
        out += list(reader.events())
    reader.receive_eof()
    out += list(reader.events())
    assert reader.done
    return out


@pytest.mark.parametrize("chunk", [1, 7, 4096, 1 << 30])
def test_the_reader_yields_the_header_then_the_pages(chunk):
    data = _stream([(0, [0x42, 0, 0x43]), (4, [0, 0])])
    events = [e for e in _events(data, chunk) if isinstance(e, (RamPacket, RamPacketPages))]
    first, pages, second = events
    assert (first.block_id, first.packet_num) == ("pc.ram", 0)
    assert first.normal.tolist() == [0, 2 * PAGE] and first.zero.tolist() == [PAGE]
    assert pages.offsets.tolist() == [0, 2 * PAGE]
    assert pages.data[:, 0].tolist() == [0x42, 0x43] and pages.data.shape == (2, PAGE)
    # a packet of zero pages only has no pages' bytes
    assert second.packet_num == 1 and second.normal.tolist() == [] and second.zero.tolist() == [4 * PAGE, 5 * PAGE]


def _reader_at_packet(data: bytes, upto: int) -> StreamReader:
    reader = StreamReader()
    reader.receive_data(data[:upto])
    return reader


def test_the_caller_takes_the_pages_itself_and_the_stream_goes_on_after_them():
    data = _stream([(0, [0x42, 0x43, 0x44])])
    at = data.index(MARK)
    header_end = at + multifd.header_bytes(3)
    reader = StreamReader()
    reader.receive_data(data[:header_end + 100])  # the header and 100 bytes of pages
    events = list(reader.events())
    assert isinstance(events[-1], RamPacket) and reader.packet_bytes_pending == 3 * PAGE
    assert reader.read_bound() == 0
    held = reader.take_packet_bytes()
    assert bytes(held) == b"\x42" * 100
    held.release()
    reader.packet_bytes_read(3 * PAGE - 100)  # read past the reader, straight into RAM
    assert reader.packet_bytes_pending == 0 and reader.offset == header_end + 3 * PAGE
    reader.receive_data(data[header_end + 3 * PAGE:])
    footer = list(reader.events())[-2]
    assert isinstance(footer, SectionFooter) and footer.offset + footer.size == len(data) - 1


def test_read_bound_stops_a_read_at_the_pages():
    data = _stream([(0, [0x42, 0x43, 0x44])])
    at = data.index(MARK)
    reader = StreamReader()
    reader.receive_data(data[:at])
    assert all(not isinstance(e, RamPacket) for e in reader.events())
    assert reader.read_bound() == multifd.FIXED_BYTES  # then the offsets
    reader.receive_data(data[at:at + multifd.FIXED_BYTES])
    assert reader.read_bound() == 3 * 8
    reader.receive_data(data[at + multifd.FIXED_BYTES:at + multifd.header_bytes(3)])
    assert reader.read_bound() == 0
    # Without the capability no read is bounded.
    plain = StreamReader()
    plain.receive_data(_stream([(0, [1])], packets=False))
    list(plain.events())
    assert plain.read_bound() is None


def _corrupt(field_at: int, value: bytes) -> tuple[bytes, int]:
    """A stream with one packet whose bytes at ``field_at`` are ``value``, and where the packet starts."""
    data = bytearray(_stream([(0, [0x42, 0, 0x43])]))
    at = data.index(MARK)
    data[at + field_at:at + field_at + len(value)] = value
    return bytes(data), at


@pytest.mark.parametrize("field_at, value, message", [
    (8, b"\x11\x22\x33\x44", "packet magic 0x11223344"),
    (12, b"\x00\x00\x00\x02", "packet version 2"),
    (16, b"\x00\x00\x00\x01", "packet flags 0x1"),
    (20, b"\x00\x00\x00\x01", "names RAM block 1, but the RAM START listed 1"),
    (24, bytes(8), "lists 0 pages"),
    (24, b"\x00\x01\x00\x00", "lists 65537 pages"),
    (32, b"\x00\x00\x00\x00\x00\x00\x00\x01", "packet number 1, expected 0"),
    (40, b"\x00\x00\x00\x00\x00\x00\x08\x00", "offset 0x800 is not a page"),
    (48, b"\x00\x00\x00\x00\x00\x00\x80\x00", "offset 0x8000 is not a page"),
])
def test_a_bad_header_is_one_stream_error_at_its_field(field_at, value, message):
    data, at = _corrupt(field_at, value)
    with pytest.raises(StreamError, match=message) as err:
        _events(data)
    assert at <= err.value.offset <= at + multifd.header_bytes(3)


def test_a_packet_cut_short_is_a_truncated_stream():
    data = _stream([(0, [0x42, 0x43])])
    at = data.index(MARK)
    with pytest.raises(StreamError, match="truncated in section 'ram'"):
        _events(data[:at + multifd.header_bytes(2) + PAGE + 10])


def test_without_the_capability_a_packet_is_refused():
    data = _stream([(0, [0x42])])
    plain = _stream([(0, [0x42])], packets=False)
    # the same stream, but its configuration does not list x-multifd-packets
    start_of_ram = b"\x01\x00\x00\x00\x00\x03ram"
    with pytest.raises(StreamError, match="did not list the x-multifd-packets capability"):
        _events(plain[:plain.index(start_of_ram)] + data[data.index(start_of_ram):])


def test_the_default_stream_carries_no_packet():
    data = _stream([(0, [0x42, 0, 0x43])], packets=False)
    assert MARK not in data
    events = _events(data)
    assert not any(isinstance(e, (RamPacket, RamPacketPages)) for e in events)
    assert isinstance(events[3], RamMemSize) and isinstance(events[5], SectionHeader)


def test_the_walk_names_every_byte_of_a_packet():
    sink = MemorySink()
    sink.put_buffer(_stream([(0, [0x42, 0, 0x43])]))
    records = annotate_sink(sink)
    assert [r.offset for r in records[1:]] == [r.offset + r.size for r in records[:-1]]  # they tile
    kinds = [r.kind for r in records]
    at = kinds.index("packet record word")
    assert kinds[at:at + 10] == ["packet record word", "packet magic", "packet version", "packet flags",
                                 "packet block", "packet normal pages", "packet zero pages", "packet number",
                                 "packet offsets", "packet pages"]
    assert records[at + 8].size == 3 * 8 and records[at + 9].size == 2 * PAGE
