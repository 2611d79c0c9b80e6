"""Golden bytes of the migration stream, as QEMU's tests/unit/test-vmstate.c does.

Every expected byte string here is written out by hand from the layout in
DESIGN.md (never produced by the writer), and ends with the record that
follows it -- the section footer, the EOF marker -- so a reader that stops
early or reads too far is caught. Each case is checked in both directions:
the writer produces the literal, and the reader parses the literal into the
expected events and values.
"""

from __future__ import annotations

import json
import os

import pytest

from migfd.errors import StreamError
from migfd.stream import (
    NEED_DATA,
    Bool,
    Buffer,
    CommandRecord,
    Configuration,
    EndOfState,
    Fd,
    FdRecord,
    Header,
    Int8,
    Int16,
    Int32,
    Int64,
    List,
    MemorySink,
    RamBlock,
    RamMemSize,
    RamPage,
    SectionFooter,
    SectionFull,
    SectionHeader,
    SectionType,
    StreamReader,
    StreamWriter,
    Struct,
    Subsection,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    VArray,
    VBuffer,
    VMDescription,
    VMStateDescription,
)
from migfd.stream.constants import Command
from migfd.stream.vmstate import Cursor, load_vmstate, save_vmstate

HEADER = b"QEVM" b"\x00\x00\x00\x03"
EOF = b"\x00"


def read_all(data: bytes, vmsds=None, fds=()) -> list:
    """Every event of ``data`` fed at once, then the end of the stream."""
    reader = StreamReader(vmsds)
    reader.receive_data(data, fds)
    reader.receive_eof()
    events = list(reader.events())
    assert reader.done, "the reader did not reach the end of a complete stream"
    return events


def written(*calls) -> MemorySink:
    sink = MemorySink()
    writer = StreamWriter(sink)
    for name, *args in calls:
        getattr(writer, name)(*args)
    return sink


# ---------------------------------------------------------------------------
# The header


def test_header_bytes_written():
    assert written(("write_header",)).getvalue() == b"\x51\x45\x56\x4d\x00\x00\x00\x03"


def test_header_read():
    events = read_all(HEADER + EOF)
    assert events == [Header(3, 0), EndOfState(8)]


# ---------------------------------------------------------------------------
# vmstate fields: one FULL section "dev" (section id 0, instance 0, version 1)
# holding the field, its footer, then EOF.

FULL_DEV_V1 = (
    b"\x04"  # FULL
    b"\x00\x00\x00\x00"  # section id 0
    b"\x03" b"dev"  # name
    b"\x00\x00\x00\x00"  # instance id 0
    b"\x00\x00\x00\x01"  # version id 1
)
FOOTER_0 = b"\x7e" b"\x00\x00\x00\x00"


def dev(*fields, subsections=(), version_id=1, minimum_version_id=0):
    return VMStateDescription("dev", version_id, minimum_version_id, tuple(fields),
                              tuple(subsections))


INNER = VMStateDescription("inner", 1, fields=(UInt16("x"), Bool("y")))
ELEMENT = VMStateDescription("elem", 1, fields=(UInt8("v"),))
EXTRA = VMStateDescription("dev/extra", 1, fields=(UInt16("b"),))
INNER_WITH_SUB = VMStateDescription(
    "inner", 1, fields=(UInt8("x"),),
    subsections=(Subsection(VMStateDescription("inner/more", 2, fields=(UInt8("z"),))),))

# (id, description, state to save, bytes of the fields, state loaded back)
FIELD_CASES = [
    ("bool-true", dev(Bool("a")), {"a": True}, b"\x01", {"a": True}),
    ("bool-false", dev(Bool("a")), {"a": False}, b"\x00", {"a": False}),
    ("uint8", dev(UInt8("a")), {"a": 0xAB}, b"\xab", {"a": 0xAB}),
    ("int8-positive", dev(Int8("a")), {"a": 127}, b"\x7f", {"a": 127}),
    ("int8-minus-one", dev(Int8("a")), {"a": -1}, b"\xff", {"a": -1}),
    ("int8-min", dev(Int8("a")), {"a": -128}, b"\x80", {"a": -128}),
    ("uint16", dev(UInt16("a")), {"a": 0x1234}, b"\x12\x34", {"a": 0x1234}),
    ("int16-negative", dev(Int16("a")), {"a": -2}, b"\xff\xfe", {"a": -2}),
    ("uint32", dev(UInt32("a")), {"a": 0xDEADBEEF}, b"\xde\xad\xbe\xef", {"a": 0xDEADBEEF}),
    ("int32-min", dev(Int32("a")), {"a": -(1 << 31)}, b"\x80\x00\x00\x00", {"a": -(1 << 31)}),
    ("int32-negative", dev(Int32("a")), {"a": -256}, b"\xff\xff\xff\x00", {"a": -256}),
    ("uint64", dev(UInt64("a")), {"a": 0x0102030405060708},
     b"\x01\x02\x03\x04\x05\x06\x07\x08", {"a": 0x0102030405060708}),
    ("uint64-max", dev(UInt64("a")), {"a": (1 << 64) - 1}, b"\xff" * 8, {"a": (1 << 64) - 1}),
    ("int64-minus-one", dev(Int64("a")), {"a": -1}, b"\xff\xff\xff\xff\xff\xff\xff\xff", {"a": -1}),
    ("int64-negative", dev(Int64("a")), {"a": -0x0102030405060708},
     b"\xfe\xfd\xfc\xfb\xfa\xf9\xf8\xf8", {"a": -0x0102030405060708}),
    ("fields-in-declaration-order", dev(UInt8("z"), UInt16("a"), Bool("m")),
     {"m": True, "a": 0x0102, "z": 0x03}, b"\x03\x01\x02\x01", {"z": 3, "a": 0x0102, "m": True}),
    ("buffer", dev(Buffer("a", size=4)), {"a": b"abcd"}, b"abcd", {"a": b"abcd"}),
    ("buffer-empty", dev(Buffer("a", size=0), UInt8("b")), {"a": b"", "b": 9}, b"\x09",
     {"a": b"", "b": 9}),
    ("vbuffer", dev(VBuffer("a")), {"a": b"hello"}, b"\x00\x00\x00\x05hello", {"a": b"hello"}),
    ("vbuffer-empty", dev(VBuffer("a")), {"a": b""}, b"\x00\x00\x00\x00", {"a": b""}),
    ("varray", dev(VArray("q", element=Int16("e")), UInt8("after")),
     {"q": [1, -2], "after": 3},
     b"\x00\x00\x00\x02" b"\x00\x01" b"\xff\xfe" b"\x03", {"q": [1, -2], "after": 3}),
    ("varray-empty", dev(VArray("q", element=UInt32("e"))), {"q": []},
     b"\x00\x00\x00\x00", {"q": []}),
    ("struct", dev(UInt8("p"), Struct("s", vmsd=INNER), UInt8("q")),
     {"p": 1, "s": {"x": 0x0203, "y": True}, "q": 4},
     b"\x01" b"\x02\x03\x01" b"\x04",
     {"p": 1, "s": {"x": 0x0203, "y": True}, "q": 4}),
    ("list", dev(List("l", vmsd=ELEMENT)), {"l": [{"v": 7}, {"v": 8}]},
     b"\x01\x07" b"\x01\x08" b"\x00", {"l": [{"v": 7}, {"v": 8}]}),
    ("list-empty", dev(List("l", vmsd=ELEMENT), UInt8("after")), {"l": [], "after": 5},
     b"\x00" b"\x05", {"l": [], "after": 5}),
    ("subsection-needed",
     dev(UInt8("a"), subsections=[Subsection(EXTRA, needed=lambda s: s["b"] != 0)]),
     {"a": 0x11, "b": 0x2233},
     b"\x11" b"\x05" b"\x09dev/extra" b"\x00\x00\x00\x01" b"\x22\x33",
     {"a": 0x11, "b": 0x2233}),
    ("subsection-not-needed",
     dev(UInt8("a"), subsections=[Subsection(EXTRA, needed=lambda s: s["b"] != 0)]),
     {"a": 0x11, "b": 0},
     b"\x11",
     {"a": 0x11}),
    ("struct-with-subsection-then-parent-subsection",
     dev(Struct("s", vmsd=INNER_WITH_SUB), subsections=[Subsection(EXTRA)]),
     {"s": {"x": 1, "z": 2}, "b": 0x0304},
     b"\x01" b"\x05\x0ainner/more\x00\x00\x00\x02\x02"
     b"\x05\x09dev/extra\x00\x00\x00\x01\x03\x04",
     {"s": {"x": 1, "z": 2}, "b": 0x0304}),
]


@pytest.mark.parametrize("vmsd, state, field_bytes, loaded",
                         [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES])
def test_field_written(vmsd, state, field_bytes, loaded):
    sink = written(("write_section_full", "dev", 0, vmsd, state), ("write_eof",))
    assert sink.getvalue() == FULL_DEV_V1 + field_bytes + FOOTER_0 + EOF


@pytest.mark.parametrize("vmsd, state, field_bytes, loaded",
                         [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES])
def test_field_read(vmsd, state, field_bytes, loaded):
    section = FULL_DEV_V1 + field_bytes + FOOTER_0
    events = read_all(HEADER + section + EOF, {"dev": vmsd})
    assert events == [
        Header(3, 0),
        SectionFull(0, "dev", 0, 1, "dev", loaded, 8, len(section), ()),
        EndOfState(8 + len(section)),
    ]


@pytest.mark.parametrize("vmsd, state, field_bytes, loaded",
                         [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES])
def test_field_vmstate_level(vmsd, state, field_bytes, loaded):
    """save_vmstate/load_vmstate alone: the loader stops right before the footer."""
    sink = MemorySink()
    assert save_vmstate(sink, vmsd, state) == len(field_bytes)
    assert sink.getvalue() == field_bytes
    cur = Cursor(field_bytes + FOOTER_0, base=100)
    assert load_vmstate(cur, vmsd, 1) == loaded
    assert cur.pos == len(field_bytes)
    assert cur.offset == 100 + len(field_bytes)


def test_field_version_skipped_when_loading_older_version():
    """A field added in version 2 is not on the wire of a version 1 stream."""
    vmsd = dev(UInt8("a"), UInt16("b", version_id=2), UInt8("c"), version_id=2)
    # version 1: a and c only
    section_v1 = FULL_DEV_V1 + b"\x11" b"\x33" + FOOTER_0
    events = read_all(HEADER + section_v1 + EOF, {"dev": vmsd})
    assert events[1] == SectionFull(0, "dev", 0, 1, "dev", {"a": 0x11, "c": 0x33}, 8,
                                    len(section_v1), ())
    assert events[2] == EndOfState(8 + len(section_v1))

    # The writer writes the current version, 2, with every field.
    section_v2 = (b"\x04" b"\x00\x00\x00\x00" b"\x03dev" b"\x00\x00\x00\x00" b"\x00\x00\x00\x02"
                  b"\x11" b"\x22\x22" b"\x33" + FOOTER_0)
    sink = written(("write_section_full", "dev", 0, vmsd, {"a": 0x11, "b": 0x2222, "c": 0x33}),
                   ("write_eof",))
    assert sink.getvalue() == section_v2 + EOF
    events = read_all(HEADER + section_v2 + EOF, {"dev": vmsd})
    assert events[1].state == {"a": 0x11, "b": 0x2222, "c": 0x33}
    assert events[1].version_id == 2


def test_minimum_version_id_refused():
    vmsd = dev(UInt8("a"), version_id=3, minimum_version_id=2)
    reader = StreamReader({"dev": vmsd})
    reader.receive_data(HEADER + FULL_DEV_V1 + b"\x11" + FOOTER_0 + EOF)
    assert reader.next_event() == Header(3, 0)
    with pytest.raises(StreamError, match="older than the minimum 2") as info:
        reader.next_event()
    assert info.value.offset is not None
    assert 8 <= info.value.offset <= 8 + len(FULL_DEV_V1)


def test_newer_version_than_supported_refused():
    vmsd = dev(UInt8("a"), version_id=1)
    section_v2 = (b"\x04" b"\x00\x00\x00\x00" b"\x03dev" b"\x00\x00\x00\x00" b"\x00\x00\x00\x02"
                  b"\x11" + FOOTER_0)
    reader = StreamReader({"dev": vmsd})
    reader.receive_data(HEADER + section_v2 + EOF)
    reader.next_event()
    with pytest.raises(StreamError, match="version 2 is newer than the supported 1"):
        reader.next_event()


def test_integer_that_does_not_fit_is_refused_by_the_writer():
    sink = MemorySink()
    with pytest.raises(ValueError, match="does not fit uint8"):
        save_vmstate(sink, dev(UInt8("a")), {"a": 256})
    with pytest.raises(ValueError, match="does not fit int8"):
        save_vmstate(sink, dev(Int8("a")), {"a": 128})


# ---------------------------------------------------------------------------
# The fd record


def test_fd_record_written():
    vmsd = dev(UInt8("a"), Fd("tap"), UInt8("b"))
    sink = written(("write_section_full", "dev", 0, vmsd, {"a": 1, "tap": 57, "b": 2}),
                   ("write_eof",))
    assert sink.records == [FULL_DEV_V1 + b"\x01", FdRecord(57), b"\x02" + FOOTER_0 + EOF]
    assert sink.fds == [57]
    assert sink.getvalue() == FULL_DEV_V1 + b"\x01" b" " b"\x02" + FOOTER_0 + EOF


def test_fd_record_read():
    vmsd = dev(UInt8("a"), Fd("tap"), UInt8("b"))
    section = FULL_DEV_V1 + b"\x01" b"\x20" b"\x02" + FOOTER_0
    r, w = os.pipe()
    try:
        events = read_all(HEADER + section + EOF, {"dev": vmsd}, fds=[r])
        assert events[1] == SectionFull(0, "dev", 0, 1, "dev", {"a": 1, "tap": r, "b": 2}, 8,
                                        len(section), (r,))
        assert events[2] == EndOfState(8 + len(section))
        os.write(w, b"x")
        assert os.read(r, 1) == b"x"  # the reader handed over our own open fd
    finally:
        os.close(r)
        os.close(w)


def test_fd_array_records_written_back_to_back():
    vmsd = dev(VArray("taps", element=Fd("tap")), UInt8("b"))
    sink = written(("write_section_full", "dev", 0, vmsd, {"taps": [40, 41], "b": 2}),
                   ("write_eof",))
    assert sink.records == [FULL_DEV_V1 + b"\x00\x00\x00\x02", FdRecord(40), FdRecord(41),
                            b"\x02" + FOOTER_0 + EOF]
    assert sink.getvalue() == FULL_DEV_V1 + b"\x00\x00\x00\x02" b"  " b"\x02" + FOOTER_0 + EOF


def test_fd_array_read():
    vmsd = dev(VArray("taps", element=Fd("tap")), UInt8("b"))
    section = FULL_DEV_V1 + b"\x00\x00\x00\x02" b"\x20\x20" b"\x02" + FOOTER_0
    r1, w1 = os.pipe()
    r2, w2 = os.pipe()
    try:
        events = read_all(HEADER + section + EOF, {"dev": vmsd}, fds=[r1, r2])
        assert events[1] == SectionFull(0, "dev", 0, 1, "dev", {"taps": [r1, r2], "b": 2}, 8,
                                        len(section), (r1, r2))
    finally:
        for fd in (r1, w1, r2, w2):
            os.close(fd)


# ---------------------------------------------------------------------------
# The configuration section

CONFIG_PC = b"\x07" b"\x00\x00\x00\x02" b"pc"
CAPABILITIES_SUB = (
    b"\x05"
    b"\x1a" b"configuration/capabilities"
    b"\x00\x00\x00\x01"  # subsection version 1
    b"\x00\x00\x00\x02"  # two capabilities
    b"\x10" b"backend-transfer"
    b"\x0d" b"validate-uuid"
)
PAGE_BITS_SUB = (
    b"\x05"
    b"\x1e" b"configuration/target-page-bits"
    b"\x00\x00\x00\x01"
    b"\x00\x00\x00\x0c"
)

CONFIG_CASES = [
    ("plain", ("pc", ()), {}, CONFIG_PC, ("pc", (), None)),
    ("capabilities", ("pc", ("backend-transfer", "validate-uuid")), {},
     CONFIG_PC + CAPABILITIES_SUB, ("pc", ("backend-transfer", "validate-uuid"), None)),
    ("page-bits-and-capabilities", ("pc", ("backend-transfer", "validate-uuid")),
     {"target_page_bits": 12}, CONFIG_PC + PAGE_BITS_SUB + CAPABILITIES_SUB,
     ("pc", ("backend-transfer", "validate-uuid"), 12)),
    ("machine-name", ("pc-i440fx-7.2", ()), {},
     b"\x07" b"\x00\x00\x00\x0d" b"pc-i440fx-7.2", ("pc-i440fx-7.2", (), None)),
]


@pytest.mark.parametrize("args, kwargs, golden, parsed", [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_configuration_written(args, kwargs, golden, parsed):
    sink = MemorySink()
    writer = StreamWriter(sink)
    writer.write_configuration(*args, **kwargs)
    writer.write_eof()
    assert sink.getvalue() == golden + EOF


@pytest.mark.parametrize("args, kwargs, golden, parsed", [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_configuration_read(args, kwargs, golden, parsed):
    events = read_all(HEADER + golden + EOF)
    machine, capabilities, page_bits = parsed
    assert events == [Header(3, 0), Configuration(machine, capabilities, page_bits, 8, len(golden)),
                      EndOfState(8 + len(golden))]


# ---------------------------------------------------------------------------
# Commands

COMMAND_CASES = [
    ("switchover-start", ("write_switchover_start",), b"\x08" b"\x00\x0b" b"\x00\x00",
     Command.SWITCHOVER_START, b""),
    ("open-return-path", ("write_open_return_path",), b"\x08" b"\x00\x01" b"\x00\x00",
     Command.OPEN_RETURN_PATH, b""),
    ("ping", ("write_ping", 0x01020304), b"\x08" b"\x00\x02" b"\x00\x04" b"\x01\x02\x03\x04",
     Command.PING, b"\x01\x02\x03\x04"),
]


@pytest.mark.parametrize("call, golden, command, data", [c[1:] for c in COMMAND_CASES],
                         ids=[c[0] for c in COMMAND_CASES])
def test_command_written(call, golden, command, data):
    assert written(call, ("write_eof",)).getvalue() == golden + EOF


@pytest.mark.parametrize("call, golden, command, data", [c[1:] for c in COMMAND_CASES],
                         ids=[c[0] for c in COMMAND_CASES])
def test_command_read(call, golden, command, data):
    events = read_all(HEADER + golden + EOF)
    assert events == [Header(3, 0), CommandRecord(command, data, 8), EndOfState(8 + len(golden))]
    assert events[1].value == (0x01020304 if command == Command.PING else None)


def test_command_with_wrong_length_refused_both_ways():
    sink = MemorySink()
    with pytest.raises(ValueError):
        StreamWriter(sink).write_command(Command.PING, b"\x00\x00")
    reader = StreamReader()
    reader.receive_data(HEADER + b"\x08" b"\x00\x02" b"\x00\x02" b"\x00\x00" + EOF)
    reader.next_event()
    with pytest.raises(StreamError, match="length 2, expected 4") as info:
        reader.next_event()
    assert info.value.offset == 8


# ---------------------------------------------------------------------------
# EOF and the vmdesc


def test_eof_written_and_read():
    assert written(("write_eof",)).getvalue() == b"\x00"
    reader = StreamReader()
    reader.receive_data(HEADER + EOF)
    assert list(reader.events()) == [Header(3, 0), EndOfState(8)]
    assert not reader.done  # a vmdesc may still come
    reader.receive_eof()
    assert reader.next_event() is NEED_DATA
    assert reader.done


VMDESC_JSON = b'{"page_size": 4096, "devices": []}'


def test_vmdesc_read_literal():
    record = b"\x06" b"\x00\x00\x00\x22" + VMDESC_JSON
    assert len(VMDESC_JSON) == 0x22
    events = read_all(HEADER + EOF + record)
    assert events == [Header(3, 0), EndOfState(8),
                      VMDescription({"page_size": 4096, "devices": []}, 9, len(record))]


def test_vmdesc_empty_written():
    blob = written(("write_eof",), ("write_vmdesc",)).getvalue()
    assert blob[:2] == b"\x00\x06"
    assert int.from_bytes(blob[2:6], "big") == len(blob) - 6
    assert json.loads(blob[6:]) == {"page_size": 4096, "devices": []}


def test_vmdesc_content_written():
    """Names, types and sizes of every field type as written, and subsections."""
    vmsd = VMStateDescription("vmsd-dev", 3, fields=(
        Bool("on"), UInt8("u8"), Int16("i16"), UInt32("u32"), Int64("i64"),
        Buffer("mac", size=6), VBuffer("blob"), Struct("s", vmsd=INNER),
        List("l", vmsd=ELEMENT), Fd("tap"),
    ), subsections=(
        Subsection(VMStateDescription("vmsd-dev/extra", 1, fields=(UInt16("b"),))),
        Subsection(VMStateDescription("vmsd-dev/absent", 1, fields=(UInt8("c"),)),
                   needed=lambda s: False),
    ))
    state = {"on": True, "u8": 1, "i16": -1, "u32": 2, "i64": -3, "mac": b"\x02" * 6,
             "blob": b"hello", "s": {"x": 1, "y": False}, "l": [{"v": 1}, {"v": 2}],
             "tap": 5, "b": 7, "c": 8}
    sink = MemorySink()
    writer = StreamWriter(sink)
    writer.write_section_full("net0", 2, vmsd, state)
    writer.write_section_full("tiny", 0, dev(UInt8("a")), {"a": 1})
    start = len(sink.getvalue())
    writer.write_eof()
    writer.write_vmdesc()
    blob = sink.getvalue()[start:]
    assert blob[:2] == b"\x00\x06"
    assert int.from_bytes(blob[2:6], "big") == len(blob) - 6
    assert json.loads(blob[6:]) == {
        "page_size": 4096,
        "devices": [
            {"name": "net0", "instance_id": 2, "vmsd_name": "vmsd-dev", "version": 3,
             "fields": [
                 {"name": "on", "type": "bool", "size": 1},
                 {"name": "u8", "type": "uint8", "size": 1},
                 {"name": "i16", "type": "int16", "size": 2},
                 {"name": "u32", "type": "uint32", "size": 4},
                 {"name": "i64", "type": "int64", "size": 8},
                 {"name": "mac", "type": "buffer", "size": 6},
                 {"name": "blob.len", "type": "uint32", "size": 4},
                 {"name": "blob", "type": "buffer", "size": 5},
                 {"name": "s", "type": "struct", "size": 3,
                  "struct": {"vmsd_name": "inner", "version": 1, "fields": [
                      {"name": "x", "type": "uint16", "size": 2},
                      {"name": "y", "type": "bool", "size": 1}]}},
                 {"name": "l", "type": "qtailq", "size": 5},
                 {"name": "tap", "type": "fd", "size": 1},
             ],
             "subsections": [
                 {"vmsd_name": "vmsd-dev/extra", "version": 1,
                  "fields": [{"name": "b", "type": "uint16", "size": 2}]},
             ]},
            {"name": "tiny", "instance_id": 0, "vmsd_name": "dev", "version": 1,
             "fields": [{"name": "a", "type": "uint8", "size": 1}]},
        ],
    }
    # and the reader gives the same description back
    reader = StreamReader()
    reader.receive_data(HEADER + blob)
    reader.receive_eof()
    events = list(reader.events())
    assert events[1] == EndOfState(8)
    assert events[2] == VMDescription(json.loads(blob[6:]), 9, len(blob) - 1)
    assert reader.done


# ---------------------------------------------------------------------------
# RAM

PC_RAM = b"\x06" b"pc.ram"
VGA = b"\x08" b"vga.vram"
EOS = b"\x00\x00\x00\x00\x00\x00\x00\x10"
PAGE_AB = b"\xab" * 4096
PAGE_01 = b"\x01" * 4096
ZERO = bytes(4096)
BLOCKS = [RamBlock("pc.ram", 0x4000), RamBlock("vga.vram", 0x1000)]

RAM_START = (
    b"\x01"  # START
    b"\x00\x00\x00\x00"  # section id 0
    b"\x03" b"ram"
    b"\x00\x00\x00\x00"  # instance 0
    b"\x00\x00\x00\x04"  # version 4
    b"\x00\x00\x00\x00\x00\x00\x50\x04"  # 0x5000 total | MEM_SIZE
    + PC_RAM + b"\x00\x00\x00\x00\x00\x00\x40\x00"
    + VGA + b"\x00\x00\x00\x00\x00\x00\x10\x00"
    + EOS
    + FOOTER_0
)
RAM_PART = (
    b"\x02" b"\x00\x00\x00\x00"  # PART of section 0
    b"\x00\x00\x00\x00\x00\x00\x00\x02" + PC_RAM + b"\x00"  # ZERO at 0, fill byte 0
    + b"\x00\x00\x00\x00\x00\x00\x10\x28" + PAGE_AB  # PAGE|CONTINUE at 0x1000
    + b"\x00\x00\x00\x00\x00\x00\x30\x22" + b"\x00"  # ZERO|CONTINUE at 0x3000
    + b"\x00\x00\x00\x00\x00\x00\x00\x08" + VGA + PAGE_01  # PAGE, another block
    + EOS
    + FOOTER_0
)
RAM_END_EMPTY = b"\x03" b"\x00\x00\x00\x00" + EOS + FOOTER_0
RAM_END_PAGE = (
    b"\x03" b"\x00\x00\x00\x00"
    b"\x00\x00\x00\x00\x00\x00\x20\x08" + PC_RAM + PAGE_01  # block id again in a new part
    + EOS + FOOTER_0
)


def test_ram_start_written():
    assert written(("write_ram_start", BLOCKS), ("write_eof",)).getvalue() == RAM_START + EOF


def test_ram_parts_written():
    sink = MemorySink()
    writer = StreamWriter(sink)
    writer.write_ram_start(BLOCKS)
    start = len(sink.getvalue())
    assert writer.write_ram_part([("pc.ram", 0, ZERO), ("pc.ram", 0x1000, PAGE_AB),
                                  ("pc.ram", 0x3000, ZERO), ("vga.vram", 0, PAGE_01)]) \
        == len(RAM_PART)
    writer.write_ram_part([("pc.ram", 0x2000, PAGE_01)], end=True)
    writer.write_ram_part([], end=True)
    writer.write_eof()
    assert sink.getvalue()[start:] == RAM_PART + RAM_END_PAGE + RAM_END_EMPTY + EOF


def test_ram_part_before_start_refused_by_writer():
    with pytest.raises(ValueError, match="no START"):
        StreamWriter(MemorySink()).write_ram_part([])


def test_ram_read():
    data = HEADER + RAM_START + RAM_PART + RAM_END_PAGE + EOF
    events = read_all(data)
    part_at = 8 + len(RAM_START)
    end_at = part_at + len(RAM_PART)
    S = SectionType
    assert events == [
        Header(3, 0),
        SectionHeader(S.START, 0, "ram", 0, 4, 8),
        RamMemSize(tuple(BLOCKS)),
        SectionFooter(S.START, 0, "ram", 8, len(RAM_START)),
        SectionHeader(S.PART, 0, "ram", 0, 4, part_at),
        RamPage("pc.ram", 0, None, 0),
        RamPage("pc.ram", 0x1000, PAGE_AB, 0),
        RamPage("pc.ram", 0x3000, None, 0),
        RamPage("vga.vram", 0, PAGE_01, 0),
        SectionFooter(S.PART, 0, "ram", part_at, len(RAM_PART)),
        SectionHeader(S.END, 0, "ram", 0, 4, end_at),
        RamPage("pc.ram", 0x2000, PAGE_01, 0),
        SectionFooter(S.END, 0, "ram", end_at, len(RAM_END_PAGE)),
        EndOfState(end_at + len(RAM_END_PAGE)),
    ]


def test_ram_empty_end_read():
    data = HEADER + RAM_START + RAM_END_EMPTY + EOF
    events = read_all(data)
    end_at = 8 + len(RAM_START)
    assert events[-3:] == [
        SectionHeader(SectionType.END, 0, "ram", 0, 4, end_at),
        SectionFooter(SectionType.END, 0, "ram", end_at, len(RAM_END_EMPTY)),
        EndOfState(end_at + len(RAM_END_EMPTY)),
    ]


IGNORE_SHARED_CONFIG = (
    b"\x07\x00\x00\x00\x02pc"
    b"\x05\x1aconfiguration/capabilities\x00\x00\x00\x01\x00\x00\x00\x01\x0fx-ignore-shared"
)
IGNORE_SHARED_RAM_START = (
    b"\x01\x00\x00\x00\x00\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
    b"\x00\x00\x00\x00\x00\x00\x10\x04"  # 0x1000 | MEM_SIZE
    + PC_RAM + b"\x00\x00\x00\x00\x00\x00\x10\x00"  # length
    + b"\x00\x00\x00\x01\x00\x00\x00\x00"  # guest address, only with x-ignore-shared
    + EOS + FOOTER_0
)


def test_ram_start_with_ignore_shared_read():
    """QEMU's x-ignore-shared puts each block's guest address after its length."""
    at = 8 + len(IGNORE_SHARED_CONFIG)
    events = read_all(HEADER + IGNORE_SHARED_CONFIG + IGNORE_SHARED_RAM_START + EOF)
    assert events == [
        Header(3, 0),
        Configuration("pc", ("x-ignore-shared",), None, 8, len(IGNORE_SHARED_CONFIG)),
        SectionHeader(SectionType.START, 0, "ram", 0, 4, at),
        RamMemSize((RamBlock("pc.ram", 0x1000),)),
        SectionFooter(SectionType.START, 0, "ram", at, len(IGNORE_SHARED_RAM_START)),
        EndOfState(at + len(IGNORE_SHARED_RAM_START)),
    ]


def test_writer_refuses_to_announce_ignore_shared():
    """x-ignore-shared makes every RAM block carry a guest address that migfd does not
    have, so a writer announcing it would write a stream its own reader cannot parse.
    The writer refuses the capability, before a byte of the configuration is written.
    """
    sink = MemorySink()
    writer = StreamWriter(sink)
    writer.write_header()
    with pytest.raises(ValueError, match="x-ignore-shared"):
        writer.write_configuration("pc", ("x-ignore-shared",))
    assert sink.getvalue() == HEADER  # nothing half-written
    # the same writer still writes what its reader reads without the capability
    writer.write_configuration("pc", ())
    writer.write_ram_start([RamBlock("pc.ram", 0x1000)])
    writer.write_eof()
    events = read_all(sink.getvalue())
    assert events[3] == RamMemSize((RamBlock("pc.ram", 0x1000),))


# ---------------------------------------------------------------------------
# A whole small precopy stream, literal from end to end


def test_whole_stream_literal_both_ways():
    vmsd = VMStateDescription("virtio-net", 1, fields=(UInt16("mtu"), Fd("tap")))
    sink = MemorySink()
    w = StreamWriter(sink)
    w.write_header()
    w.write_configuration("pc", ("backend-transfer",))
    w.write_ram_start([RamBlock("pc.ram", 0x1000)])
    w.write_ram_part([("pc.ram", 0, ZERO)])
    w.write_switchover_start()
    w.write_ram_part([], end=True)
    w.write_section_full("net0", 0, vmsd, {"mtu": 1500, "tap": 33})
    w.write_eof()
    w.write_vmdesc()
    golden_head = (
        HEADER
        + b"\x07\x00\x00\x00\x02pc"
        + b"\x05\x1aconfiguration/capabilities\x00\x00\x00\x01\x00\x00\x00\x01\x10backend-transfer"
        + b"\x01\x00\x00\x00\x00\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
        + b"\x00\x00\x00\x00\x00\x00\x10\x04" + PC_RAM + b"\x00\x00\x00\x00\x00\x00\x10\x00"
        + EOS + FOOTER_0
        + b"\x02\x00\x00\x00\x00" + b"\x00\x00\x00\x00\x00\x00\x00\x02" + PC_RAM + b"\x00"
        + EOS + FOOTER_0
        + b"\x08\x00\x0b\x00\x00"
        + b"\x03\x00\x00\x00\x00" + EOS + FOOTER_0
        + b"\x04\x00\x00\x00\x01\x04net0\x00\x00\x00\x00\x00\x00\x00\x01" + b"\x05\xdc"
    )
    golden_tail = b"\x7e\x00\x00\x00\x01" + EOF
    assert len(sink.records) == 3
    assert sink.records[:2] == [golden_head, FdRecord(33)]
    tail = sink.records[2]
    assert tail.startswith(golden_tail + b"\x06")
    desc = json.loads(tail[len(golden_tail) + 5:])
    assert int.from_bytes(tail[len(golden_tail) + 1:len(golden_tail) + 5], "big") \
        == len(tail) - len(golden_tail) - 5
    assert desc == {"page_size": 4096, "devices": [
        {"name": "net0", "instance_id": 0, "vmsd_name": "virtio-net", "version": 1,
         "fields": [{"name": "mtu", "type": "uint16", "size": 2},
                    {"name": "tap", "type": "fd", "size": 1}]}]}

    r, wfd = os.pipe()
    try:
        events = read_all(golden_head + b" " + tail, {"net0": vmsd}, fds=[r])
        full_at = len(golden_head) - len(b"\x04\x00\x00\x00\x01\x04net0") - 8 - 2
        assert [type(e).__name__ for e in events] == [
            "Header", "Configuration", "SectionHeader", "RamMemSize", "SectionFooter",
            "SectionHeader", "RamPage", "SectionFooter", "CommandRecord", "SectionHeader",
            "SectionFooter", "SectionFull", "EndOfState", "VMDescription"]
        assert events[1] == Configuration("pc", ("backend-transfer",), None, 8,
                                          5 + 2 + 1 + 1 + 26 + 8 + 1 + 16)
        assert events[11] == SectionFull(1, "net0", 0, 1, "virtio-net", {"mtu": 1500, "tap": r},
                                         full_at, len(golden_head) - full_at + 1 + 5, (r,))
        assert events[13].description == desc
    finally:
        os.close(r)
        os.close(wfd)


# A nested struct whose next field starts with 0x05 (QEMU_VM_SUBSECTION): QEMU
# peeks a length and a name, finds they are not "inner/...", and reads on. The
# bytes that follow are a field, not a subsection, whatever they are.
LOOKS_LIKE_SUB = VMStateDescription("outer", 1, fields=(
    Struct("s", vmsd=VMStateDescription("outer.inner", 1)), Buffer("b", size=3)))
LOOKS_LIKE_SUB_BYTES = bytes([0x05, 0x01, 0x80])


@pytest.mark.parametrize("tail", [b"\x00", b"\x7e\x00\x00\x00\x01"])
def test_a_field_that_starts_like_a_subsection_is_a_field(tail):
    state = {"s": {}, "b": LOOKS_LIKE_SUB_BYTES}
    sink = MemorySink()
    save_vmstate(sink, LOOKS_LIKE_SUB, state)
    assert sink.getvalue() == LOOKS_LIKE_SUB_BYTES
    # followed by what can follow a section's fields in a stream: EOF, or a footer
    cur = Cursor(sink.getvalue() + tail)
    assert load_vmstate(cur, LOOKS_LIKE_SUB, 1) == state
    assert cur.pos == 3


def test_a_field_that_starts_like_a_subsection_is_decided_without_reading_past_it():
    """The decision 'not a subsection' comes from the first differing byte, not the whole name."""
    vmsd = VMStateDescription("outer", 1, fields=(Struct("s", vmsd=VMStateDescription("outer.inner", 1)),
                                                 Buffer("b", size=2)))
    field = bytes([0x05, 0x20])  # a length of 32 would reach far past the footer
    cur = Cursor(field + b"\x7e\x00\x00\x00\x01")
    assert load_vmstate(cur, vmsd, 1) == {"s": {}, "b": field}
    assert cur.pos == 2
