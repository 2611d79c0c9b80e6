"""StreamReader: round trips from StreamWriter in every split, malformed streams,
fd ownership, and a fuzz harness holding the reader to one invariant (h11's):
it yields events or raises StreamError, nothing else, and it terminates.

Fds are real (dups of one /dev/null fd, pipes, memfds) and every test that
passes fds checks that /proc/self/fd is the same before and after.
"""

from __future__ import annotations

import errno
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies import (
    Device,
    FdRecord,
    GeneratedVMState,
    StreamSpec,
    close_all,
    cut_points,
    expected_events,
    fd_positions,
    feed_in_chunks,
    normalize,
    open_fd_names,
    vmsds_of,
    write_stream,
    written_streams,
)

from migfd.errors import StreamError
from migfd.stream import (
    NEED_DATA,
    Bool,
    Buffer,
    CommandRecord,
    Configuration,
    EndOfState,
    Fd,
    Header,
    Int64,
    List,
    MemorySink,
    RamBlock,
    SectionFooter,
    SectionFull,
    StreamReader,
    Struct,
    Subsection,
    UInt8,
    UInt16,
    UInt32,
    VArray,
    VBuffer,
    VMStateDescription,
)

HEADER = b"QEVM\x00\x00\x00\x03"
FOOTER_0 = b"\x7e\x00\x00\x00\x00"
EOF = b"\x00"


@pytest.fixture
def no_fd_leak():
    before = open_fd_names()
    yield
    assert open_fd_names() == before


@pytest.fixture
def devnull():
    fd = os.open(os.devnull, os.O_RDONLY)
    yield fd
    os.close(fd)


class RealFds:
    """One real fd per fd record of a written stream, and the way back to tokens."""

    def __init__(self, sink: MemorySink):
        self._base = os.open(os.devnull, os.O_RDONLY)
        tokens = [r.fd for r in sink.records if isinstance(r, FdRecord)]
        self.fds = [os.dup(self._base) for _ in tokens]
        self.to_token = dict(zip(self.fds, tokens))

    def close(self):
        close_all(self.fds)
        os.close(self._base)


def placement(event) -> tuple:
    """Where an event sits in the stream: its type, offset and size where it has them."""
    return (type(event).__name__, getattr(event, "offset", None), getattr(event, "size", None))


def one_shot(ws) -> tuple[list[int], list[tuple]]:
    """Stream offset right after each event, and each event's placement, from a
    parse of the whole stream at once. Also checks that offset + size of every
    event is where the next one starts.
    """
    fds = RealFds(ws.sink)
    reader = StreamReader(vmsds_of(ws.spec))
    try:
        reader.receive_data(ws.data, fds.fds)
        reader.receive_eof()
        ends, placements = [], []
        start = 0
        while (event := reader.next_event()) is not NEED_DATA:
            end = reader.offset
            size = getattr(event, "size", None)
            if size is not None and not isinstance(event, SectionFooter):
                assert (event.offset, event.offset + size) == (start, end), event
            elif isinstance(event, SectionFooter):
                assert event.offset + size == end
            elif isinstance(event, CommandRecord):
                assert (event.offset, event.offset + 5 + len(event.data)) == (start, end)
            elif isinstance(event, EndOfState):
                assert (event.offset, event.offset + 1) == (start, end)
            ends.append(end)
            placements.append(placement(event))
            start = end
        assert start == len(ws.data)
        return ends, placements
    finally:
        reader.close()
        fds.close()


def check_round_trip(ws, cuts):
    """Feed ``ws`` split at ``cuts``; the events must be what the spec says, at
    the same offsets as when the stream comes in one piece.
    """
    _, placements = one_shot(ws)
    before = open_fd_names()
    fds = RealFds(ws.sink)
    reader = StreamReader(vmsds_of(ws.spec))
    try:
        events = feed_in_chunks(reader, ws.data, ws.fd_at, fds.fds, cuts)
        assert reader.done
        assert reader.queued_fds == 0
        got = [normalize(e, vmsds_of(ws.spec), fds.to_token) for e, _ in events]
        assert got == expected_events(ws.spec)
        assert [placement(e) for e, _ in events] == placements
        claimed = [fd for e, _ in events if isinstance(e, SectionFull) for fd in e.fds]
        assert claimed == fds.fds  # every fd, once, in order
    finally:
        reader.close()
        fds.close()
    assert open_fd_names() == before
    return events


# ---------------------------------------------------------------------------
# Round trips


@settings(max_examples=60, deadline=None)
@given(written_streams())
def test_round_trip_in_one_chunk(ws):
    check_round_trip(ws, [0, len(ws.data)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_round_trip_in_random_chunks(data):
    ws = data.draw(written_streams())
    cuts = data.draw(cut_points(len(ws.data)))
    check_round_trip(ws, cuts)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(written_streams(max_devices=2, max_parts=1))
def test_round_trip_byte_by_byte_and_no_event_before_its_bytes(ws):
    """Fed one byte at a time, each event comes exactly when its last byte
    arrived (a Configuration one byte later: it looks at the next byte to see
    whether a subsection follows) -- never before, and no later.
    """
    ends, _ = one_shot(ws)
    events = check_round_trip(ws, list(range(len(ws.data) + 1)))
    assert len(events) == len(ends)
    for (event, fed), end in zip(events, ends):
        if isinstance(event, Configuration):
            assert fed == end + 1, event
        else:
            assert fed == end, event


@settings(max_examples=30, deadline=None)
@given(written_streams())
def test_fds_may_arrive_before_their_service_bytes(ws):
    """A reader queues fds in arrival order; early fds are claimed in order."""
    before = open_fd_names()
    fds = RealFds(ws.sink)
    reader = StreamReader(vmsds_of(ws.spec))
    try:
        reader.receive_data(b"", fds.fds)
        events = feed_in_chunks(reader, ws.data, [], [], [0, len(ws.data)])
        got = [normalize(e, vmsds_of(ws.spec), fds.to_token) for e, _ in events]
        assert got == expected_events(ws.spec)
    finally:
        reader.close()
        fds.close()
    assert open_fd_names() == before


def test_incomplete_fd_section_takes_no_fd(no_fd_leak):
    """A section that ran out of bytes gives back the fd it would have taken."""
    vmsd = VMStateDescription("dev", 1, fields=(Fd("tap"), UInt8("a")))
    section = (b"\x04\x00\x00\x00\x00\x03dev\x00\x00\x00\x00\x00\x00\x00\x01" b" " b"\x09"
               + FOOTER_0)
    r, w = os.pipe()
    reader = StreamReader({"dev": vmsd})
    try:
        reader.receive_data(HEADER + section[:-1], [r])
        assert reader.next_event() == Header(3, 0)
        assert reader.next_event() is NEED_DATA
        assert reader.queued_fds == 1
        reader.receive_data(section[-1:] + EOF)
        event = reader.next_event()
        assert isinstance(event, SectionFull)
        assert event.fds == (r,) and event.state == {"tap": r, "a": 9}
        assert reader.queued_fds == 0
    finally:
        reader.close()
        os.close(r)
        os.close(w)


# ---------------------------------------------------------------------------
# Malformed streams: StreamError with the offset of the bad byte

FULL_HEAD = b"\x04\x00\x00\x00\x00\x03dev\x00\x00\x00\x00\x00\x00\x00\x01"
SEC = 8  # offset of the first record after the header
FIELDS = SEC + len(FULL_HEAD)  # offset of the first field of a FULL section at SEC

ELEMENT = VMStateDescription("elem", 1, fields=(UInt8("v"),))
# RAM START of one block "a" of one page
RAM_START_A = (b"\x01\x00\x00\x00\x00\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
               b"\x00\x00\x00\x00\x00\x00\x10\x04" b"\x01a" b"\x00\x00\x00\x00\x00\x00\x10\x00"
               b"\x00\x00\x00\x00\x00\x00\x00\x10" + FOOTER_0)


def dev(*fields, subsections=()):
    return VMStateDescription("dev", 1, fields=tuple(fields), subsections=tuple(subsections))


def first_error(data: bytes, vmsds=None, fds=(), eof=True, **kwargs) -> StreamError:
    reader = StreamReader(vmsds, **kwargs)
    try:
        reader.receive_data(data, fds)
        if eof:
            reader.receive_eof()
        with pytest.raises(StreamError) as info:
            for _ in range(len(data) + 2):
                if reader.next_event() is NEED_DATA:
                    break
        # the error sticks
        with pytest.raises(StreamError) as again:
            reader.next_event()
        assert again.value is info.value
        return info.value
    finally:
        reader.close()


MALFORMED = [
    # (id, bytes, vmsds, offset, words of the message)
    ("bad-magic", b"QEVX\x00\x00\x00\x03" + EOF, None, 0, "magic 0x51455658"),
    ("bad-version", b"QEVM\x00\x00\x00\x02" + EOF, None, 4, "unsupported stream version 2"),
    ("unknown-section-type", HEADER + b"\x09", None, SEC, "unknown section type 0x09"),
    ("footer-id-mismatch", HEADER + FULL_HEAD + b"\x01" + b"\x7e\x00\x00\x00\x01" + EOF,
     {"dev": dev(UInt8("a"))}, FIELDS + 1, "footer has id 1, expected 0"),
    ("footer-missing", HEADER + FULL_HEAD + b"\x01" + b"\x00\x00\x00\x00\x00" + EOF,
     {"dev": dev(UInt8("a"))}, FIELDS + 1, "expected section footer"),
    ("part-never-started", HEADER + b"\x02\x00\x00\x00\x05" + FOOTER_0, None, SEC,
     "never started"),
    ("end-never-started", HEADER + b"\x03\x00\x00\x00\x00" + FOOTER_0, None, SEC,
     "never started"),
    ("bool-value-2", HEADER + FULL_HEAD + b"\x01\x02" + FOOTER_0 + EOF,
     {"dev": dev(Bool("a"), Bool("b"))}, FIELDS + 1, "bool must be 0 or 1, not 2"),
    ("list-marker-7", HEADER + FULL_HEAD + b"\x01\x05\x07" + FOOTER_0 + EOF,
     {"dev": dev(List("l", vmsd=ELEMENT))}, FIELDS + 2, "list marker must be 0 or 1, not 7"),
    ("varray-count-over-bound", HEADER + FULL_HEAD + b"\x01" + b"\x00\x00\x00\x05",
     {"dev": dev(UInt8("a"), VArray("q", element=UInt8("e"), max_elements=4))}, FIELDS + 1,
     "5 elements exceed its bound of 4"),
    ("unknown-subsection", HEADER + FULL_HEAD + b"\x01" + b"\x05\x07dev/zzz\x00\x00\x00\x01"
     + FOOTER_0 + EOF,
     {"dev": dev(UInt8("a"), subsections=[Subsection(VMStateDescription("dev/x", 1))])},
     FIELDS + 1, "unknown subsection 'dev/zzz'"),
    ("capabilities-count-too-big",
     HEADER + b"\x07\x00\x00\x00\x02pc" + b"\x05\x1aconfiguration/capabilities"
     + b"\x00\x00\x00\x01" + b"\x00\x01\x00\x00" + EOF, None, SEC + 7, "65536 capabilities"),
    ("unknown-configuration-subsection",
     HEADER + b"\x07\x00\x00\x00\x02pc" + b"\x05\x13configuration/other\x00\x00\x00\x01" + EOF,
     None, SEC + 7, "unknown subsection 'configuration/other'"),
    ("vmdesc-not-json", HEADER + EOF + b"\x06\x00\x00\x00\x03{x}", None, SEC + 1, "not JSON"),
    ("vmdesc-not-utf8", HEADER + EOF + b"\x06\x00\x00\x00\x02\xff\xfe", None, SEC + 1,
     "not JSON"),
    ("vmdesc-not-object", HEADER + EOF + b"\x06\x00\x00\x00\x02[]", None, SEC + 1,
     "not a JSON object"),
    ("vmdesc-deeply-nested", HEADER + EOF + b"\x06" + (200000 * 2).to_bytes(4, "big")
     + b"[" * 200000 + b"]" * 200000, None, SEC + 1, ""),
    ("trailing-bytes-after-vmdesc", HEADER + EOF + b"\x06\x00\x00\x00\x02{}" + b"\x00",
     None, SEC + 1 + 7, "trailing bytes"),
    ("garbage-after-eof", HEADER + EOF + b"\x04", None, SEC + 1, "found byte 0x04"),
    ("vmdesc-before-eof", HEADER + b"\x06\x00\x00\x00\x02{}", None, SEC, "before EOF"),
    ("unknown-section-name", HEADER + b"\x04\x00\x00\x00\x00\x03foo\x00\x00\x00\x00"
     b"\x00\x00\x00\x01" + FOOTER_0 + EOF, {"dev": dev()}, SEC, "unknown section 'foo'"),
    ("section-name-not-ascii", HEADER + b"\x04\x00\x00\x00\x00\x02\xc3\xa9\x00\x00\x00\x00"
     b"\x00\x00\x00\x01" + FOOTER_0 + EOF, None, SEC + 5, "not ASCII"),
    ("unknown-command-length", HEADER + b"\x08\x00\x0b\x00\x01\x00" + EOF, None, SEC,
     "expected 0"),
    ("iterable-section-not-ram", HEADER + b"\x01\x00\x00\x00\x00\x03dev\x00\x00\x00\x00"
     b"\x00\x00\x00\x01", None, SEC, "not supported"),
    ("ram-continue-first", HEADER + RAM_START_A + b"\x02\x00\x00\x00\x00" + b"\x00\x00\x00\x00\x00\x00\x00\x22\x00", None,
     SEC + len(RAM_START_A) + 5, "CONTINUE"),
    ("ram-unknown-block", HEADER + RAM_START_A + b"\x02\x00\x00\x00\x00" + b"\x00\x00\x00\x00\x00\x00\x00\x02\x01b\x00", None,
     SEC + len(RAM_START_A) + 5, "unknown block 'b'"),
    ("ram-page-beyond-block",
     HEADER + RAM_START_A + b"\x02\x00\x00\x00\x00" + b"\x00\x00\x00\x00\x00\x00\x10\x02\x01a\x00", None,
     SEC + len(RAM_START_A) + 5, "beyond block 'a'"),
    ("ram-block-longer-than-total",
     HEADER + b"\x01\x00\x00\x00\x00\x03ram\x00\x00\x00\x00\x00\x00\x00\x04"
     + b"\x00\x00\x00\x00\x00\x00\x10\x04\x01a\x00\x00\x00\x00\x00\x00\x20\x00", None,
     SEC + 17 + 8 + 2, "does not fit the total"),
]


@pytest.mark.parametrize("data, vmsds, offset, words", [c[1:] for c in MALFORMED],
                         ids=[c[0] for c in MALFORMED])
def test_malformed_stream(data, vmsds, offset, words):
    error = first_error(data, vmsds)
    assert error.offset == offset, str(error)
    assert words in str(error)
    assert str(error).endswith(f"(at byte offset {offset})")


FD_DEV = dev(UInt8("a"), Fd("tap"))


def test_fd_service_byte_without_fd(no_fd_leak):
    error = first_error(HEADER + FULL_HEAD + b"\x01" + b" " + FOOTER_0 + EOF, {"dev": FD_DEV})
    assert error.reason == "no FD come with service byte"
    assert error.offset == FIELDS + 1


def test_wrong_service_byte_where_an_fd_is(no_fd_leak):
    r, w = os.pipe()
    try:
        error = first_error(HEADER + FULL_HEAD + b"\x01" + b"\x21" + FOOTER_0 + EOF,
                            {"dev": FD_DEV}, fds=[os.dup(r)])
        assert "unexpected service byte 0x21" in error.reason
        assert error.offset == FIELDS + 1
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("max_size, length", [(16, 17), (16, 0xFFFFFFFF),
                                              (None, 0xFFFFFFFF), (None, (16 << 20) + 1)])
def test_vbuffer_length_over_bound_refused_at_once(max_size, length):
    """Only the length arrived: the reader refuses it now, without waiting for the bytes."""
    field = VBuffer("v") if max_size is None else VBuffer("v", max_size=max_size)
    reader = StreamReader({"dev": dev(UInt8("a"), field)})
    reader.receive_data(HEADER + FULL_HEAD + b"\x01" + length.to_bytes(4, "big"))
    assert reader.next_event() == Header(3, 0)
    with pytest.raises(StreamError, match=f"length {length} exceeds its bound") as info:
        reader.next_event()
    assert info.value.offset == FIELDS + 1


def test_record_longer_than_max_record_bytes_refused_at_once():
    """Within its own bound but beyond the reader's: refused without waiting."""
    reader = StreamReader({"dev": dev(VBuffer("v", max_size=1 << 24))}, max_record_bytes=4096)
    reader.receive_data(HEADER + FULL_HEAD + (1 << 20).to_bytes(4, "big") + b"xx")
    assert reader.next_event() == Header(3, 0)
    with pytest.raises(StreamError, match="larger than the limit of 4096"):
        reader.next_event()


def test_record_growing_past_max_record_bytes_is_an_error():
    """Bytes pile up with no record completing: an error, not an ever-growing buffer."""
    vmsd = dev(*(UInt32(f"f{i}") for i in range(100)))
    reader = StreamReader({"dev": vmsd}, max_record_bytes=64)
    reader.receive_data(HEADER)
    assert reader.next_event() == Header(3, 0)
    body = FULL_HEAD + bytes(400)
    with pytest.raises(StreamError):
        for i in range(len(body)):
            reader.receive_data(body[i:i + 1])
            assert reader.next_event() is NEED_DATA
    assert reader.offset == SEC


def test_more_queued_fds_than_the_limit(no_fd_leak, devnull):
    fds = [os.dup(devnull) for _ in range(4)]
    reader = StreamReader(max_queued_fds=3)
    reader.receive_data(HEADER)
    assert reader.next_event() == Header(3, 0)
    with pytest.raises(StreamError, match="4 fds queued .* limit of 3") as info:
        reader.receive_data(b"", fds)
    assert info.value.offset == SEC
    reader.close()  # the reader owned all four
    for fd in fds:
        with pytest.raises(OSError) as closed:
            os.fstat(fd)
        assert closed.value.errno == errno.EBADF


def test_queued_fds_up_to_the_limit_are_fine(no_fd_leak, devnull):
    reader = StreamReader(max_queued_fds=3)
    reader.receive_data(HEADER, [os.dup(devnull) for _ in range(3)])
    assert reader.next_event() == Header(3, 0)
    assert reader.queued_fds == 3
    reader.close()
    assert reader.queued_fds == 0


def test_close_closes_unclaimed_fds_only(no_fd_leak):
    vmsd = dev(Fd("tap"))
    section = FULL_HEAD + b" " + FOOTER_0
    claimed_r, claimed_w = os.pipe()
    spare = [os.memfd_create(f"spare{i}") for i in range(3)]
    reader = StreamReader({"dev": vmsd})
    reader.receive_data(HEADER + section, [claimed_r] + spare)
    events = list(reader.events())
    assert events[1].fds == (claimed_r,)
    assert reader.queued_fds == 3
    reader.close()
    for fd in spare:
        with pytest.raises(OSError) as closed:
            os.fstat(fd)
        assert closed.value.errno == errno.EBADF
    os.write(claimed_w, b"still open")  # the claimed fd is ours, not the reader's
    assert os.read(claimed_r, 64) == b"still open"
    reader.close()  # twice is harmless
    os.close(claimed_r)
    os.close(claimed_w)


@pytest.mark.parametrize("data, kwargs", [
    (b"QEVX\x00\x00\x00\x03", {}),  # fails at offset 0, nothing consumed
    (HEADER + b"\x09", {}),  # fails after the header was consumed
    (HEADER + RAM_START_A + b"\x02\x00\x00\x00\x00" + b"\x00\x00\x00\x00\x00\x00\x00\x08\x01a"
     + bytes(100), {"max_record_bytes": 1024}),  # a page beyond the record limit
], ids=["bad-magic", "unknown-section-type", "record-over-limit"])
def test_error_is_sticky_and_later_data_is_refused_as_stream_error(data, kwargs):
    """After a StreamError, more input must give StreamError again -- not another
    exception from inside the reader (h11: the connection stays in ERROR).
    """
    reader = StreamReader(**kwargs)
    reader.receive_data(data)
    with pytest.raises(StreamError) as first:
        list(reader.events())
    try:
        reader.receive_data(b"more bytes")
    except StreamError:
        pass
    with pytest.raises(StreamError) as again:
        reader.next_event()
    assert again.value is first.value


def test_data_after_receive_eof_is_refused():
    reader = StreamReader()
    reader.receive_data(HEADER)
    reader.receive_eof()
    with pytest.raises(StreamError, match="data after end of stream"):
        reader.receive_data(b"\x00")


# ---------------------------------------------------------------------------
# Truncation at every offset of a real stream


def _real_stream():
    """A stream written by StreamWriter with every kind of record and field."""
    inner = VMStateDescription("inner", 1, fields=(UInt16("x"),),
                               subsections=(Subsection(VMStateDescription("inner/y", 1,
                                                                          fields=(Bool("y"),))),))
    net = VMStateDescription("virtio-net", 2, fields=(
        UInt8("a"), Int64("b", version_id=2), Buffer("mac", size=6), VBuffer("cfg"),
        Struct("s", vmsd=inner), List("queues", vmsd=VMStateDescription("q", 1, fields=(UInt8("n"),))),
        Fd("tap"),
    ), subsections=(Subsection(VMStateDescription("virtio-net/ext", 1, fields=(UInt32("e"),))),))
    state = {"a": 1, "b": -2, "mac": b"\x02\x00\x00\x00\x00\x01", "cfg": b"config",
             "s": {"x": 7, "y": True}, "queues": [{"n": 0}, {"n": 1}], "tap": 1000, "e": 9}
    spec = StreamSpec(
        machine="pc-i440fx-7.2", capabilities=("backend-transfer",), target_page_bits=12,
        blocks=[RamBlock("pc.ram", 0x3000), RamBlock("vga", 0x1000)],
        parts=[[("pc.ram", 0, bytes(4096)), ("pc.ram", 0x1000, b"\x5a" * 4096)],
               [("vga", 0, bytes(4096))]],
        commands=[("ping", 7), ("open-return-path",)],
        devices=[Device("net0", 0, GeneratedVMState(net, state, state))],
        vmdesc=True,
    )
    sink = write_stream(spec)
    return spec, sink


def test_truncated_at_every_offset():
    spec, sink = _real_stream()
    data = sink.getvalue()
    (fd_at,) = fd_positions(sink)
    vmsds = vmsds_of(spec)
    spec.vmdesc = False
    eof_end = len(write_stream(spec).getvalue())  # complete without its vmdesc, too
    spec.vmdesc = True
    write_stream(spec)
    before = open_fd_names()
    base = os.open(os.devnull, os.O_RDONLY)
    try:
        for n in range(len(data)):
            yielded = []
            reader = StreamReader(vmsds)
            fds = [os.dup(base)] if fd_at < n else []
            try:
                reader.receive_data(data[:n], fds)
                yielded = list(reader.events())
                parsed_to = reader.offset
                assert parsed_to <= n
                reader.receive_eof()
                if n == eof_end:
                    assert reader.next_event() is NEED_DATA and reader.done
                    continue
                with pytest.raises(StreamError) as info:
                    reader.next_event()
                assert "truncated" in info.value.reason, (n, info.value)
                assert info.value.offset == parsed_to, n
                assert len(yielded) < len(expected_events(spec))
            finally:
                for event in yielded:
                    if isinstance(event, SectionFull):
                        close_all(event.fds)
                reader.close()
    finally:
        os.close(base)
    assert open_fd_names() == before


# ---------------------------------------------------------------------------
# Fuzz: corrupt a valid stream; the reader yields events or raises StreamError


corruptions = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.floats(0, 1, exclude_max=True), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("add-fd"), st.floats(0, 1)),
    st.tuples(st.just("drop-fd"), st.integers(0, 10)),
), min_size=1, max_size=4)


def corrupt(data: bytes, fd_at: list[int], ops) -> tuple[bytes, list[int]]:
    buf = bytearray(data)
    fd_at = list(fd_at)
    for op in ops:
        kind = op[0]
        if kind == "flip" and buf:
            i = int(op[1] * len(buf))
            buf[i] ^= op[2]
        elif kind == "insert":
            i = int(op[1] * len(buf))
            buf[i:i] = op[2]
            fd_at = [p + len(op[2]) if p >= i else p for p in fd_at]
        elif kind == "delete" and buf:
            i = int(op[1] * len(buf))
            n = min(op[2], len(buf) - i)
            del buf[i:i + n]
            fd_at = [p - n if p >= i + n else min(p, i) for p in fd_at]
        elif kind == "truncate":
            n = int(op[1] * len(buf))
            del buf[n:]
        elif kind == "add-fd":
            fd_at.append(int(op[1] * len(buf)))
        elif kind == "drop-fd" and fd_at:
            del fd_at[op[1] % len(fd_at)]
    fd_at = sorted(min(p, max(len(buf) - 1, 0)) for p in fd_at)
    return bytes(buf), fd_at


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_fuzz_only_events_or_stream_error(data):
    ws = data.draw(written_streams(max_devices=2, max_parts=1))
    stream, fd_at = corrupt(ws.data, ws.fd_at, data.draw(corruptions))
    cuts = data.draw(cut_points(len(stream), max_cuts=12))
    before = open_fd_names()
    base = os.open(os.devnull, os.O_RDONLY)
    fds = [os.dup(base) for _ in fd_at]
    os.close(base)
    reader = StreamReader(vmsds_of(ws.spec), max_queued_fds=8)
    claimed: list[int] = []
    calls = 0
    j = 0
    try:
        for start, end in zip(cuts, cuts[1:]):
            chunk_fds = []
            while j < len(fd_at) and fd_at[j] < end:
                chunk_fds.append(fds[j])
                j += 1
            reader.receive_data(stream[start:end], chunk_fds)
            while (event := reader.next_event()) is not NEED_DATA:
                calls += 1
                assert calls <= len(stream), "more events than bytes: the reader does not advance"
                if isinstance(event, SectionFull):
                    claimed.extend(event.fds)
        if j < len(fds):  # fds placed after the last byte (empty stream)
            reader.receive_data(b"", fds[j:])
        reader.receive_eof()
        while (event := reader.next_event()) is not NEED_DATA:
            calls += 1
            assert calls <= len(stream)
            if isinstance(event, SectionFull):
                claimed.extend(event.fds)
        assert reader.done
    except StreamError as exc:
        assert exc.offset is not None and 0 <= exc.offset <= len(stream)
    finally:
        close_all(claimed)
        close_all(fds[j:])  # never handed to the reader
        reader.close()
    assert open_fd_names() == before
