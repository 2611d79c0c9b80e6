"""StreamReader(unknown_sections="delimit"): sections without a description, cut at their footers.

Golden bytes written out by hand (as in test_stream_golden.py): device
sections whose payload holds fake footers, RAM PART/END around them, a
COMMAND, EOF. Each stream is read whole, split at every byte and byte by
byte, and the strict reader (the default, used by a destination) still
refuses it. Property tests hold the mode to h11's invariant (events or
StreamError, and an end) and to its contract: a section whose payload does
not hold its own footer is delimited exactly.
"""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies import cut_points, feed_in_chunks, open_fd_names, written_streams

import migfd.stream.reader as reader_module
from migfd.errors import StreamError
from migfd.stream import (
    NEED_DATA,
    CommandRecord,
    EndOfState,
    Header,
    RamBlock,
    RamMemSize,
    RamPage,
    SectionFooter,
    SectionFull,
    SectionHeader,
    SectionOpaque,
    SectionType,
    StreamReader,
    VMDescription,
)
from migfd.stream.annotate import walk
from migfd.stream.constants import Command
from migfd.stream.delimit import LOOKAHEAD_BYTES

START, PART, END, FULL = SectionType.START, SectionType.PART, SectionType.END, SectionType.FULL

HEADER = b"QEVM" b"\x00\x00\x00\x03"
EOS = b"\x00\x00\x00\x00\x00\x00\x00\x10"
FOOTER_1 = b"\x7e" b"\x00\x00\x00\x01"
FOOTER_2 = b"\x7e" b"\x00\x00\x00\x02"
EOF = b"\x00"

# RAM START, section id 1: 'ram' instance 0 version 4; 4096 bytes | MEM_SIZE, block 'b0' of 4096, EOS.
RAM_START = (b"\x01" b"\x00\x00\x00\x01" b"\x03ram" b"\x00\x00\x00\x00" b"\x00\x00\x00\x04"
             b"\x00\x00\x00\x00\x00\x00\x10\x04" b"\x02b0" b"\x00\x00\x00\x00\x00\x00\x10\x00"
             + EOS + FOOTER_1)
# RAM PART, id 1: offset 0 | ZERO of block 'b0' (named: first record), fill byte 0, EOS.
RAM_PART = b"\x02" b"\x00\x00\x00\x01" b"\x00\x00\x00\x00\x00\x00\x00\x02" b"\x02b0" b"\x00" + EOS + FOOTER_1
RAM_END = b"\x03" b"\x00\x00\x00\x01" + EOS + FOOTER_1
SWITCHOVER_START = b"\x08" b"\x00\x0b" b"\x00\x00"
# FULL, section id 2: 'dev' instance 0 version 1.
DEV_HEAD = b"\x04" b"\x00\x00\x00\x02" b"\x03dev" b"\x00\x00\x00\x00" b"\x00\x00\x00\x01"
# Its payload holds its own footer three times, each followed by what no record can be.
DEV_PAYLOAD = (b"\x11\x22" + FOOTER_2 + b"\xff"  # no record type
               + FOOTER_2 + b"\x02\x00\x00\x00\x07"  # PART of a section that never started
               + FOOTER_2 + b"\x04\x00\x00\x00\x01\x03ram"  # FULL with the id RAM's START used
               + b"\x33")
# FULL, id 0 (QEMU sends `timer`, id 0, after RAM: ids need not increase).
TIMER = b"\x04" b"\x00\x00\x00\x00" b"\x05timer" b"\x00\x00\x00\x00" b"\x00\x00\x00\x02" + b"\x00" * 8 \
    + b"\x7e\x00\x00\x00\x00"
# FULL, id 4: 'i8254' instance 0 version 3, two bytes of payload.
PIT_HEAD = b"\x04" b"\x00\x00\x00\x04" b"\x05i8254" b"\x00\x00\x00\x00" b"\x00\x00\x00\x03"
PIT = PIT_HEAD + b"\x7e\x00" + b"\x7e\x00\x00\x00\x04"
# FULL, id 3: 'globalstate', its payload a be32 length and "running".
GLOBAL = (b"\x04" b"\x00\x00\x00\x03" b"\x0bglobalstate" b"\x00\x00\x00\x00" b"\x00\x00\x00\x01"
          b"\x00\x00\x00\x07running" b"\x7e\x00\x00\x00\x03")

GOLDEN_PARTS = [HEADER, RAM_START, DEV_HEAD + DEV_PAYLOAD + FOOTER_2, RAM_PART, TIMER, PIT, SWITCHOVER_START,
                RAM_END, GLOBAL, EOF]
GOLDEN = b"".join(GOLDEN_PARTS)


def _at(index: int) -> int:
    return sum(len(p) for p in GOLDEN_PARTS[:index])


def _golden_events() -> list:
    """What a delimiting reader must make of GOLDEN, offsets counted from the literal pieces."""
    dev, part, timer, pit, cmd, end, glob, eof = (_at(i) for i in range(2, 10))
    return [
        Header(3),
        SectionHeader(START, 1, "ram", 0, 4, 8),
        RamMemSize((RamBlock("b0", 4096),)),
        SectionFooter(START, 1, "ram", 8, len(RAM_START)),
        SectionOpaque(FULL, 2, "dev", 0, 1, dev, len(GOLDEN_PARTS[2])),
        SectionHeader(PART, 1, "ram", 0, 4, part),
        RamPage("b0", 0, None, 0),
        SectionFooter(PART, 1, "ram", part, len(RAM_PART)),
        SectionOpaque(FULL, 0, "timer", 0, 2, timer, len(TIMER)),
        SectionOpaque(FULL, 4, "i8254", 0, 3, pit, len(PIT)),
        CommandRecord(Command.SWITCHOVER_START, b"", cmd),
        SectionHeader(END, 1, "ram", 0, 4, end),
        SectionFooter(END, 1, "ram", end, len(RAM_END)),
        SectionOpaque(FULL, 3, "globalstate", 0, 1, glob, len(GLOBAL)),
        EndOfState(eof),
    ]


def delimiting(**kwargs) -> StreamReader:
    return StreamReader(None, unknown_sections="delimit", **kwargs)


def read_all(data: bytes, **kwargs) -> list:
    reader = delimiting(**kwargs)
    reader.receive_data(data)
    reader.receive_eof()
    events = list(reader.events())
    assert reader.done
    return events


def read_split(data: bytes, cuts: list[int]) -> list[tuple]:
    reader = delimiting()
    try:
        events = feed_in_chunks(reader, data, [], [], cuts)
        assert reader.done
        return events
    finally:
        reader.close()


# ---------------------------------------------------------------------------
# Golden bytes


def test_golden_stream_delimited():
    assert read_all(GOLDEN) == _golden_events()


def test_golden_stream_split_at_every_byte():
    want = _golden_events()
    for cut in range(len(GOLDEN) + 1):
        assert [e for e, _ in read_split(GOLDEN, [0, cut, len(GOLDEN)])] == want, cut


def test_golden_stream_byte_by_byte_no_event_before_the_next_record_says_so():
    """Fed one byte at a time, an opaque section comes once the record after
    its footer is plain (the 5 bytes of a PART or COMMAND, the whole header of
    a FULL, the end of the stream after EOF), every other event as soon as
    its last byte arrived.
    """
    events = read_split(GOLDEN, list(range(len(GOLDEN) + 1)))
    assert [e for e, _ in events] == _golden_events()
    fed = {e.offset: n for e, n in events if isinstance(e, SectionOpaque)}
    assert fed == {_at(2): _at(3) + 5, _at(4): _at(5) + len(PIT_HEAD), _at(5): _at(6) + 5,
                   _at(8): len(GOLDEN)}
    eof = next(n for e, n in events if isinstance(e, EndOfState))
    assert eof == len(GOLDEN)


def test_the_annotated_walk_names_every_byte_of_the_golden_stream():
    records = [r for item in walk(delimiting(), [GOLDEN]) for r in item.records]
    assert [r.offset for r in records] == [0] + [r.offset + r.size for r in records[:-1]]
    assert records[-1].offset + records[-1].size == len(GOLDEN)
    dev = [(r.offset, r.size, r.kind) for r in records if r.section == "dev"]
    assert dev == [(_at(2), len(DEV_HEAD), "section FULL (0x04)"),
                   (_at(2) + len(DEV_HEAD), len(DEV_PAYLOAD), "payload"),
                   (_at(3) - 5, 5, "footer (0x7e)")]
    (command,) = [r for r in records if r.kind == "command (0x08)"]
    assert command.text == "SWITCHOVER_START, 0 data bytes"


def test_the_strict_reader_still_refuses_what_it_cannot_load():
    reader = StreamReader(None)
    reader.receive_data(GOLDEN)
    reader.receive_eof()
    with pytest.raises(StreamError, match=r"unknown section 'dev' \(instance 0\)") as exc:
        list(reader.events())
    assert exc.value.offset == _at(2)


@pytest.mark.parametrize("after", [
    b"\xff",  # no record type
    b"\x07\x00\x00\x00\x02pc",  # CONFIGURATION comes only after the header
    b"\x05\x07dev/sub\x00\x00\x00\x01",  # a subsection is never top level
    b"\x7e\x00\x00\x00\x02",  # a second footer
    b"\x02\x00\x00\x00\x07",  # PART of a section that never started
    b"\x03\x00\x00\x00\x02",  # END of itself: a FULL section is not iterable
    b"\x04\x00\x00\x00\x01\x03ram\x00\x00\x00\x00\x00\x00\x00\x01",  # FULL with RAM's id
    b"\x04\x00\x00\x00\x02\x03dev\x00\x00\x00\x00\x00\x00\x00\x01",  # FULL with its own id
    b"\x01\x00\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01",  # START with an empty name
    b"\x04\x00\x00\x00\x09\x03a\x01b\x00\x00\x00\x00\x00\x00\x00\x01",  # name not printable
    b"\x08\x00\x00\x00\x00",  # command 0 (MIG_CMD_INVALID)
    b"\x08\x00\x0c\x00\x00",  # command 12: QEMU has none
    b"\x08\x00\x02\x00\x00",  # PING without its be32
    b"\x00\x07",  # EOF, then neither the end nor a vmdesc
    b"\x00\x06\x00\x00\x00\x02[]",  # a vmdesc that is no JSON object
    b"\x00\x06\xff\x00\x00\x00{",  # a vmdesc over the bound
], ids=["no-type", "configuration", "subsection", "footer", "part-never-started", "end-of-full",
        "full-id-used", "full-own-id", "empty-name", "name-not-printable", "command-0",
        "command-12", "ping-short", "eof-then-junk", "vmdesc-not-object", "vmdesc-too-long"])
def test_a_fake_footer_is_passed_over_unless_a_plausible_record_follows(after):
    payload = b"\x01" + FOOTER_2 + after + b"\x02"
    data = HEADER + RAM_START + DEV_HEAD + payload + FOOTER_2 + RAM_END + EOF
    events = read_all(data)
    (opaque,) = [e for e in events if isinstance(e, SectionOpaque)]
    assert opaque.size == len(DEV_HEAD + payload + FOOTER_2)
    assert isinstance(events[-1], EndOfState) and events[-1].offset == len(data) - 1


@pytest.mark.parametrize("after, follows", [
    (RAM_PART, SectionHeader),
    (RAM_END, SectionHeader),
    (SWITCHOVER_START + RAM_END, CommandRecord),
    (b"\x08\x00\x02\x00\x04\x00\x00\x00\x07" + RAM_END, CommandRecord),  # PING 7
    (TIMER + RAM_END, SectionOpaque),
    (EOF + b"\x06\x00\x00\x00\x02{}", EndOfState),
])
def test_each_record_that_may_follow_a_footer_is_taken(after, follows):
    data = HEADER + RAM_START + DEV_HEAD + b"\x01\x02" + FOOTER_2 + after
    if not after.startswith(EOF):
        data += EOF
    events = read_all(data)
    i = next(i for i, e in enumerate(events) if isinstance(e, SectionOpaque) and e.name == "dev")
    assert events[i].size == len(DEV_HEAD) + 2 + 5
    assert isinstance(events[i + 1], follows)
    if after.startswith(EOF):
        assert events[-1] == VMDescription({}, len(data) - 7, 7)


def test_the_residual_ambiguity_a_plausible_record_after_a_fake_footer():
    """A payload holding its footer and then bytes that read as a FULL header is cut there
    (documented in migfd.stream.delimit); the stream then fails at the fake section.
    """
    fake_full = b"\x04\x00\x00\x00\x09\x03abc\x00\x00\x00\x00\x00\x00\x00\x01"
    head = HEADER + RAM_START + DEV_HEAD + b"\x01" + FOOTER_2
    data = head + fake_full + b"\x02" + FOOTER_2 + RAM_END + EOF
    reader = delimiting()
    reader.receive_data(data)
    reader.receive_eof()
    events = []
    with pytest.raises(StreamError, match=r"section 'abc' \(id 9\) has no footer") as exc:
        for event in reader.events():
            events.append(event)
    cut = [e for e in events if isinstance(e, SectionOpaque)]
    assert [(e.name, e.offset + e.size) for e in cut] == [("dev", len(head))]
    assert exc.value.offset == len(head)


def test_an_iterable_section_without_description_is_delimited_part_by_part():
    # START of 'block' (id 5), its PART and END, RAM's END in between.
    block_start = b"\x01\x00\x00\x00\x05\x05block\x00\x00\x00\x00\x00\x00\x00\x01" + b"\xaa" * 3 \
        + b"\x7e\x00\x00\x00\x05"
    block_part = b"\x02\x00\x00\x00\x05" + b"\x7e\x00\x00\x00\x05\x01" + b"\x7e\x00\x00\x00\x05"
    block_end = b"\x03\x00\x00\x00\x05" + b"\xbb" + b"\x7e\x00\x00\x00\x05"
    data = HEADER + RAM_START + block_start + block_part + RAM_END + block_end + EOF
    events = read_all(data)
    opaque = [(e.type, e.section_id, e.name, e.instance_id, e.version_id, e.size)
              for e in events if isinstance(e, SectionOpaque)]
    assert opaque == [(START, 5, "block", 0, 1, len(block_start)), (PART, 5, "block", 0, 1, len(block_part)),
                      (END, 5, "block", 0, 1, len(block_end))]
    strict = StreamReader(None)
    strict.receive_data(data)
    with pytest.raises(StreamError, match="iterable section 'block' is not supported"):
        list(strict.events())


def test_after_an_iterable_ended_its_part_is_no_longer_plausible():
    block_end = b"\x03\x00\x00\x00\x05" + b"\x7e\x00\x00\x00\x05" + b"\x02\x00\x00\x00\x05" \
        + b"\x7e\x00\x00\x00\x05"
    block_start = b"\x01\x00\x00\x00\x05\x05block\x00\x00\x00\x00\x00\x00\x00\x01\x7e\x00\x00\x00\x05"
    events = read_all(HEADER + block_start + block_end + EOF)
    assert [e.size for e in events if isinstance(e, SectionOpaque)] == [len(block_start), len(block_end)]


BLOCK_START = b"\x01\x00\x00\x00\x05\x05block\x00\x00\x00\x00\x00\x00\x00\x01\x7e\x00\x00\x00\x05"
BLOCK_END = b"\x03\x00\x00\x00\x05\x7e\x00\x00\x00\x05"


@pytest.mark.parametrize("iterable, part", [
    (RAM_START + RAM_END, RAM_PART[:5]),
    (BLOCK_START + BLOCK_END, b"\x02\x00\x00\x00\x05"),
], ids=["ram", "block"])
def test_once_an_iterable_ended_no_later_section_ends_before_its_part(iterable, part):
    payload = b"\x01" + FOOTER_2 + part + b"\x02"
    data = HEADER + iterable + DEV_HEAD + payload + FOOTER_2 + EOF
    events = read_all(data)
    assert [e.size for e in events if isinstance(e, SectionOpaque) and e.name == "dev"] == [
        len(DEV_HEAD + payload + FOOTER_2)]


def test_ram_of_another_version_is_delimited_not_decoded():
    ram5 = RAM_START.replace(b"\x03ram\x00\x00\x00\x00\x00\x00\x00\x04", b"\x03ram\x00\x00\x00\x00\x00\x00\x00\x05")
    events = read_all(HEADER + ram5 + RAM_END + EOF)
    assert [(type(e).__name__, getattr(e, "type", None)) for e in events[1:3]] == [
        ("SectionOpaque", START), ("SectionOpaque", END)]


# ---------------------------------------------------------------------------
# Errors and bounds


@pytest.mark.parametrize("data, message, offset", [
    (HEADER + DEV_HEAD + b"\x01\x02\x03", r"section 'dev' \(id 2\) has no footer before the end", 8),
    (HEADER + DEV_HEAD + b"\x01" + FOOTER_2, r"has no footer before the end", 8),  # no EOF after it
    (HEADER + DEV_HEAD + b"\x01" + FOOTER_2 + b"\x00\x06\x00\x00", "has no footer", 8),
    (HEADER + DEV_HEAD + FOOTER_2 + EOF + b"\x06\x00\x00\x00\x02{}" + b"\x00", "trailing bytes",
     len(HEADER + DEV_HEAD + FOOTER_2) + 8),
    (HEADER + b"\x02\x00\x00\x00\x02" + FOOTER_2 + EOF, "PART for section id 2, which never started", 8),
    (HEADER + RAM_START + RAM_START, "section id 1 started twice", 8 + len(RAM_START)),
], ids=["no-footer", "footer-then-end", "footer-then-short-vmdesc", "after-eof", "part-unknown",
        "started-twice"])
def test_malformed_streams_are_stream_errors(data, message, offset):
    reader = delimiting()
    reader.receive_data(data)
    reader.receive_eof()
    with pytest.raises(StreamError, match=message) as exc:
        list(reader.events())
    assert exc.value.offset == offset


def test_a_section_larger_than_the_bound_is_refused_without_waiting_for_its_end():
    limit = 4096
    reader = delimiting(max_record_bytes=limit)
    reader.receive_data(HEADER + DEV_HEAD)
    assert isinstance(reader.next_event(), Header)
    fed = len(DEV_HEAD)
    with pytest.raises(StreamError, match=f"no footer of section 'dev' .* within {limit - LOOKAHEAD_BYTES} bytes"):
        while fed < 100 * limit:
            assert reader.next_event() is NEED_DATA
            reader.receive_data(FOOTER_2 + b"\xff" * 59)  # fake footers, never a plausible record after
            fed += 64
    assert fed <= limit  # it buffered no more than the bound


@pytest.mark.parametrize("after, calls_each", [(b"\xff", 1), (b"\x00\xff", 3)], ids=["no-type", "eof-then-junk"])
def test_the_footer_search_resumes_where_it_stopped(monkeypatch, after, calls_each):
    """Byte by byte, each candidate footer is judged only while the bytes after it
    arrive -- once per byte that might still change the verdict (none when the byte
    after it can start no record), and never again on later bytes: a rescan from
    the section's start would make the search quadratic.
    """
    calls = []
    real = reader_module.follows_footer
    monkeypatch.setattr(reader_module, "follows_footer", lambda buf, i, **kw: calls.append(i) or real(buf, i, **kw))
    candidates = 200
    payload = (FOOTER_2 + after) * candidates
    data = HEADER + DEV_HEAD + payload + FOOTER_2 + EOF
    events = read_split(data, list(range(len(data) + 1)))
    assert [e.size for e, _ in events if isinstance(e, SectionOpaque)] == [len(DEV_HEAD + payload) + 5]
    assert len(set(calls)) == candidates + 1
    # the last, real one: no byte after it, then EOF but not yet the end, then the end
    assert len(calls) == calls_each * candidates + 3


def test_fds_inside_an_opaque_section_stay_queued_and_close_closes_them():
    before = open_fd_names()
    fd = os.open(os.devnull, os.O_RDONLY)
    reader = delimiting()
    data = HEADER + DEV_HEAD + b" " + FOOTER_2 + EOF  # one fd record (service byte 0x20) inside
    reader.receive_data(data, [fd])
    reader.receive_eof()
    assert [type(e) for e in reader.events()] == [Header, SectionOpaque, EndOfState]
    assert reader.queued_fds == 1
    reader.close()
    assert open_fd_names() == before


def test_unknown_sections_takes_error_or_delimit_only():
    with pytest.raises(ValueError, match="'error' or 'delimit'"):
        StreamReader(None, unknown_sections="skip")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Properties


def _placements(events) -> list[tuple]:
    return [(e.section_id, e.name, e.offset, e.size) for e in events if isinstance(e, (SectionFull, SectionOpaque))]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_streams_of_the_writer_are_delimited_where_the_strict_reader_loads_them(data):
    """Without any vmsd, every device section is found at the offset and size the
    strict reader (with the vmsds) gives it -- unless its payload holds its own
    footer, the one case the stream cannot settle (then only the invariants hold).
    """
    ws = data.draw(written_streams(with_fds=False))
    strict = StreamReader({d.name: d.generated.vmsd for d in ws.spec.devices})
    strict.receive_data(ws.data)
    strict.receive_eof()
    want = _placements(strict.events())
    got = _placements(e for e, _ in read_split(ws.data, data.draw(cut_points(len(ws.data)))))
    ambiguous = any(ws.data[at + 1:at + size - 5].find(b"\x7e" + struct.pack(">I", sid)) >= 0
                    for sid, _, at, size in want)
    if not ambiguous:
        assert got == want


_pieces = st.one_of(
    st.binary(max_size=6),
    st.just(FOOTER_2),
    st.sampled_from([b"\xff", b"\x02\x00\x00\x00\x01", b"\x04\x00\x00\x00\x09\x02ab", b"\x08\x00\x0b\x00\x00",
                     b"\x00", b"\x03\x00\x00\x00\x01", b"\x00\x06", b"\x00\x06\x00\x00\x00\x02{"]),
)


@settings(max_examples=300, deadline=None)
@given(pieces=st.lists(_pieces, max_size=12), chunk=st.integers(1, 64))
def test_payloads_full_of_fake_footers_give_events_or_stream_error(pieces, chunk):
    """Whatever a payload holds: the reader ends, raises StreamError only, and each
    opaque section ends in its footer with the next event starting right after it.
    A payload without its footer in it is delimited exactly.
    """
    payload = b"".join(pieces)
    data = HEADER + RAM_START + DEV_HEAD + payload + FOOTER_2 + RAM_PART + RAM_END + EOF
    reader = delimiting()
    events = []
    try:
        events = [e for e, _ in feed_in_chunks(reader, data, [], [], list(range(0, len(data), chunk)) + [len(data)])]
    except StreamError as exc:
        assert exc.offset is None or 0 <= exc.offset <= len(data)
    finally:
        reader.close()
    for e in events:
        if isinstance(e, SectionOpaque):
            assert data[e.offset + e.size - 5:e.offset + e.size] == b"\x7e" + struct.pack(">I", e.section_id)
    if FOOTER_2 not in payload:
        assert events[4] == SectionOpaque(FULL, 2, "dev", 0, 1, len(HEADER + RAM_START),
                                          len(DEV_HEAD + payload) + 5)
        assert isinstance(events[-1], EndOfState)
