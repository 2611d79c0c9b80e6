"""The compiled vmstate codec against its definition, the field-by-field save_vmstate/load_vmstate.

The writer and the reader use the compiled path (migfd.stream.compiled); the
field-by-field walk in migfd.stream.vmstate defines the layout. Here both run
on the same descriptions, states and bytes -- valid encodings, truncated ones,
ones with a byte changed, under a small record limit -- and must agree on
everything observable: bytes and fd records, the loaded state, how far the
cursor went and how many fds it took, the wait for more data, the error's
message and offset.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migfd.devices.chardev import ChardevSocket
from migfd.errors import StreamError
from migfd.migration.base import MIGRATION_VMSD, MigrationBase
from migfd.params import MigrationParameters
from migfd.stream import (
    Bool,
    Fd,
    FdRecord,
    MemorySink,
    SectionFull,
    StreamReader,
    StreamWriter,
    Subsection,
    UInt8,
    UInt32,
    UInt64,
    VArray,
    VBuffer,
    VMStateDescription,
)
import migfd.stream.writer as writer_module
from migfd.stream.compiled import load_compiled, save_compiled
from migfd.stream.vmstate import Cursor, NeedData, load_vmstate, save_vmstate

from strategies import vmstates

pytestmark = pytest.mark.unit


def _records(sink: MemorySink) -> list:
    return [r.fd if isinstance(r, FdRecord) else bytes(r) for r in sink.records]


def _outcome(load, data: bytes, fds: list[int], vmsd: VMStateDescription, version_id: int,
             limit: int | None):
    """Everything a caller can observe of one load attempt."""
    cur = Cursor(data, 1000, fds, limit=limit)
    try:
        state = load(cur, vmsd, version_id)
    except NeedData:
        return ("need data",)
    except StreamError as exc:
        return ("error", exc.reason, exc.offset)
    return ("loaded", state, cur.pos, cur.fds_taken)


def _encode_both(vmsd: VMStateDescription, state: dict):
    by_field, compiled = MemorySink(), MemorySink()
    size = save_vmstate(by_field, vmsd, state)
    assert save_compiled(compiled, vmsd, state) == size
    assert _records(compiled) == _records(by_field)
    return by_field


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vmstates(with_fds=True), st.data())
def test_compiled_codec_agrees_with_the_field_by_field_definition(generated, data):
    sink = _encode_both(generated.vmsd, generated.state)
    raw, fds = sink.getvalue(), sink.fds
    # What follows a vmstate in a stream: a footer, the start of the next
    # section, nothing yet; or many bytes, so that a length changed below fits.
    tail = data.draw(st.sampled_from([b"\x7e\x00\x00\x00\x01", b"\x04", b"", bytes(300)]))
    whole = raw + tail
    version = data.draw(st.integers(0, generated.vmsd.version_id + 1))
    limit = data.draw(st.none() | st.integers(0, len(raw) + 2))
    cases = [whole[:end] for end in range(len(raw) + 2)]  # every way to be cut short
    changed = data.draw(st.integers(0, 255))
    cases += [whole[:at] + bytes([changed]) + whole[at + 1:] for at in range(len(raw))]
    spare_fds = fds[:data.draw(st.integers(0, len(fds)))]
    for blob in cases:
        for queued in (fds, spare_fds):
            expected = _outcome(load_vmstate, blob, queued, generated.vmsd, version, limit)
            assert _outcome(load_compiled, blob, queued, generated.vmsd, version, limit) == expected
    if generated.vmsd.minimum_version_id <= generated.vmsd.version_id:
        loaded = _outcome(load_compiled, raw + b"\x7e\x00\x00\x00\x01", fds, generated.vmsd,
                          generated.vmsd.version_id, None)
        assert loaded == ("loaded", generated.expected, len(raw), len(fds))


_BACKEND = VMStateDescription("dev/backend", version_id=1, minimum_version_id=1,
                              fields=(VArray("queue_fds", element=Fd("fd")), Fd("listener_fd")))
_STATS = VMStateDescription("dev/stats", version_id=2, minimum_version_id=1,
                            fields=(UInt32("drops"),))
#: One of every kind of step the compiler makes: a run of scalars, a VBuffer,
#: an fd, an array of fds, a generic field between runs, and two subsections.
_DEVICE = VMStateDescription(
    "dev", version_id=1, minimum_version_id=1,
    fields=(UInt64("size"), Bool("running"), UInt8("mode"), VBuffer("name", max_size=16),
            Fd("fd"), UInt32("queues"), VArray("masks", element=UInt8("m"))),
    subsections=(Subsection(_BACKEND, needed=lambda s: s.get("fd") is not None),
                 Subsection(_STATS)))
_STATE = {"size": 1 << 40, "running": True, "mode": 7, "name": b"tap0", "fd": 11, "queues": 2,
          "masks": [1, 2], "queue_fds": [12, 13], "listener_fd": 14, "drops": 99}
#: written out by hand from the layout, as the golden tests do
_FIELDS = (b"\x00\x00\x01\x00\x00\x00\x00\x00" b"\x01" b"\x07" b"\x00\x00\x00\x04tap0" b" "
           b"\x00\x00\x00\x02" b"\x00\x00\x00\x02\x01\x02"
           b"\x05\x0bdev/backend\x00\x00\x00\x01" b"\x00\x00\x00\x02  " b" "
           b"\x05\x09dev/stats\x00\x00\x00\x02" b"\x00\x00\x00\x63")


def test_compiled_path_writes_and_reads_every_field_and_subsection():
    sink = MemorySink()
    writer = StreamWriter(sink)
    writer.write_section_full("dev", 0, _DEVICE, _STATE)
    head = b"\x04\x00\x00\x00\x00\x03dev\x00\x00\x00\x00\x00\x00\x00\x01"
    footer = b"\x7e\x00\x00\x00\x00"
    assert sink.getvalue() == head + _FIELDS + footer
    assert sink.fds == [11, 12, 13, 14]

    reader = StreamReader({"dev": _DEVICE})
    reader.receive_data(b"QEVM\x00\x00\x00\x03" + head + _FIELDS + footer + b"\x00", [21, 22, 23, 24])
    reader.next_event()
    event = reader.next_event()
    assert isinstance(event, SectionFull)
    assert event.state == {**_STATE, "fd": 21, "queue_fds": [22, 23], "listener_fd": 24}
    assert list(event.state) == list(_STATE)  # fields first, then each subsection's
    assert event.fds == (21, 22, 23, 24)
    assert event.size == len(head + _FIELDS + footer)


def test_array_of_fds_one_per_message_waits_then_reads_them_in_order():
    vmsd = VMStateDescription("net", 1, fields=(VArray("queue_fds", element=Fd("fd")),))
    sink = MemorySink()
    StreamWriter(sink).write_section_full("net", 0, vmsd, {"queue_fds": list(range(100, 356))})
    reader = StreamReader({"net": vmsd})
    reader.receive_data(b"QEVM\x00\x00\x00\x03")
    reader.next_event()
    events = []
    for record in sink.records:  # each fd record in its own message, as put_fd sends it
        if isinstance(record, FdRecord):
            reader.receive_data(b" ", [record.fd + 1000])
        else:
            reader.receive_data(record)
        events += reader.events()
    assert len(events) == 1
    assert events[0].state == {"queue_fds": list(range(1100, 1356))}
    assert reader.queued_fds == 0


def test_compiled_decoder_agrees_on_every_cut_and_limit_of_a_device_section():
    """Exhaustive over one section with every kind of step: each way the bytes may be cut
    short, under each record limit, with all fds or too few queued."""
    whole = _FIELDS + b"\x7e\x00\x00\x00\x00"
    for end in range(len(whole) + 1):
        for limit in (None, *range(len(whole) + 2)):
            for fds in ([11, 12, 13, 14], [11, 12]):
                expected = _outcome(load_vmstate, whole[:end], fds, _DEVICE, 1, limit)
                assert _outcome(load_compiled, whole[:end], fds, _DEVICE, 1, limit) == expected, (end, limit)


def test_the_vmdesc_entry_is_built_only_when_the_vmdesc_is_written(monkeypatch):
    """Nothing of the device description runs while sections are written (inside the downtime)."""
    built = []
    real = writer_module.vmdesc_entry
    monkeypatch.setattr(writer_module, "vmdesc_entry", lambda vmsd, state: built.append(vmsd.name) or real(vmsd, state))
    writer = StreamWriter(MemorySink())
    writer.write_section_full("dev", 0, _DEVICE, _STATE)
    writer.write_eof()
    assert built == []
    writer.write_vmdesc()
    assert built == ["dev"]


def test_a_migration_compiles_every_section_it_will_save_or_load_before_it_starts():
    # Compiled lazily, a fresh process's first section would compile inside the downtime.
    class Host:
        devices = [ChardevSocket("ch0", "/nonexistent/ch0.sock")]

    vmsds = [Host.devices[0].vmsd, MIGRATION_VMSD]
    vmsds += [sub.vmsd for v in list(vmsds) for sub in v.subsections]
    for vmsd in vmsds:
        vmsd._compiled.clear()
    MigrationBase(Host(), MigrationParameters(), lambda status: None)
    for vmsd in vmsds:
        assert ("save",) in vmsd._compiled and ("load", vmsd.version_id) in vmsd._compiled, vmsd.name
