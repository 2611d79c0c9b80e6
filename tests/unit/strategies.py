"""Hypothesis strategies shared by the test files: vmstate descriptions with
matching states, and whole migration streams written by StreamWriter.

A generated stream is described by a :class:`StreamSpec` (what was meant to be
sent); :func:`expected_events` says what a reader must make of it, computed
from the spec and not from the writer, and :func:`normalize` turns reader
events into the same shape. Fd fields carry *tokens* (small distinct ints):
the writer only records them in a MemorySink, and a test that feeds the
stream to a reader replaces every fd record by a real fd of its own
(:func:`fd_positions` says where the service bytes are).
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st

from migfd.stream import (
    Bool,
    Buffer,
    CommandRecord,
    Configuration,
    EndOfState,
    Fd,
    FdRecord,
    Header,
    Int,
    List,
    MemorySink,
    RamBlock,
    RamMemSize,
    RamPage,
    SectionFooter,
    SectionFull,
    SectionHeader,
    SectionType,
    StreamWriter,
    Struct,
    Subsection,
    VArray,
    VBuffer,
    VMDescription,
    VMStateDescription,
)
from migfd.stream.constants import Command, TARGET_PAGE_SIZE

PAGE = TARGET_PAGE_SIZE
ZERO_PAGE = bytes(PAGE)

# ---------------------------------------------------------------------------
# Helpers that tests use with real fds


def open_fd_names() -> set[str]:
    """The fd numbers this process has open, as /proc/self/fd lists them."""
    return set(os.listdir("/proc/self/fd"))


def fd_positions(sink: MemorySink) -> list[int]:
    """Byte offset of the service byte of every fd record, in order."""
    positions = []
    offset = 0
    for record in sink.records:
        if isinstance(record, FdRecord):
            positions.append(offset)
            offset += 1
        else:
            offset += len(record)
    return positions


def close_all(fds) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# ---------------------------------------------------------------------------
# vmstate descriptions with a matching state

_INT_KINDS = [(bits, signed) for bits in (8, 16, 32, 64) for signed in (False, True)]


def int_values(bits: int, signed: bool) -> st.SearchStrategy[int]:
    if signed:
        return st.integers(-(1 << (bits - 1)), (1 << (bits - 1)) - 1)
    return st.integers(0, (1 << bits) - 1)


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=12)


@dataclass
class GeneratedVMState:
    """A description, a state to save, and the state a loader must give back.

    ``expected`` differs from ``state`` where a subsection is not needed (its
    fields are not sent, so they are not loaded). Fd fields hold tokens.
    """

    vmsd: VMStateDescription
    state: dict
    expected: dict


class _Counter:
    def __init__(self, start: int = 0):
        self._it = itertools.count(start)

    def __call__(self) -> int:
        return next(self._it)


@st.composite
def _field_and_value(draw, depth: int, names_of: _Counter, vmsd_names: _Counter,
                     fd_tokens: _Counter | None, version_id: int, prefix: str):
    """One field: (Field, value to save, value loaded back)."""
    name = f"f{names_of()}"
    field_version = draw(st.integers(0, version_id))
    kinds = ["bool", "int", "buffer", "vbuffer", "varray"]
    if fd_tokens is not None:
        kinds.append("fd")
    if depth > 0:
        kinds += ["struct", "list"]
    kind = draw(st.sampled_from(kinds))
    if kind == "bool":
        value = draw(st.booleans())
        return Bool(name, field_version), value, value
    if kind == "int":
        bits, signed = draw(st.sampled_from(_INT_KINDS))
        value = draw(int_values(bits, signed))
        return Int(name, field_version, bits, signed), value, value
    if kind == "buffer":
        value = draw(st.binary(max_size=24))
        return Buffer(name, field_version, size=len(value)), value, value
    if kind == "vbuffer":
        bound = draw(st.integers(24, 64))
        value = draw(st.binary(max_size=24))
        return VBuffer(name, field_version, max_size=bound), value, value
    if kind == "fd":
        assert fd_tokens is not None
        token = fd_tokens()
        return Fd(name, field_version), token, token
    if kind == "varray":
        elements = ["bool", "int"] + (["fd"] if fd_tokens is not None else [])
        element_kind = draw(st.sampled_from(elements))
        if element_kind == "bool":
            element = Bool("e")
        elif element_kind == "int":
            element = Int("e", 0, *draw(st.sampled_from(_INT_KINDS)))
        else:
            element = Fd("e")
        values = draw(st.lists(_values_for(element, fd_tokens), max_size=4))
        return (VArray(name, field_version, element=element),
                [v for v, _ in values], [loaded for _, loaded in values])
    nested_name = f"{prefix}.s{vmsd_names()}"
    if kind == "struct":
        inner = draw(vmstates(depth=depth - 1, name=nested_name, fd_tokens=fd_tokens,
                              vmsd_names=vmsd_names))
        return Struct(name, field_version, vmsd=inner.vmsd), inner.state, inner.expected
    # A list of elements of one description: draw one description, then states for it.
    template = draw(vmstates(depth=depth - 1, name=nested_name, fd_tokens=fd_tokens,
                             vmsd_names=vmsd_names))
    elements = [template] + draw(st.lists(
        states_for(template.vmsd, fd_tokens=fd_tokens), max_size=2))
    if draw(st.booleans()):
        elements = []  # the empty list: only its end marker travels
    return (List(name, field_version, vmsd=template.vmsd),
            [e.state for e in elements], [e.expected for e in elements])


@st.composite
def vmstates(draw, *, depth: int = 2, name: str | None = None,
             fd_tokens: _Counter | None = None, vmsd_names: _Counter | None = None,
             with_fds: bool = False) -> GeneratedVMState:
    """A VMStateDescription with fields of every kind, nested structs, lists and
    subsections (needed or not), and a state that fits it.
    """
    if fd_tokens is None and with_fds:
        fd_tokens = _Counter(1000)
    if vmsd_names is None:
        vmsd_names = _Counter()
    if name is None:
        name = draw(st.from_regex(r"\A[a-z][a-z0-9_-]{0,10}\Z"))
    version_id = draw(st.integers(1, 5))
    names_of = _Counter()
    fields_, state, expected = [], {}, {}
    for _ in range(draw(st.integers(0, 4))):
        f, value, loaded = draw(_field_and_value(depth, names_of, vmsd_names, fd_tokens,
                                                 version_id, name))
        fields_.append(f)
        state[f.name] = value
        expected[f.name] = loaded
    subsections = []
    for i in range(draw(st.integers(0, 2)) if depth > 0 else 0):
        needed = draw(st.booleans())
        sub_fields = []
        sub_version = draw(st.integers(1, 3))
        sub_state, sub_expected = {}, {}
        for _ in range(draw(st.integers(1, 3))):
            f, value, loaded = draw(_field_and_value(depth - 1, names_of, vmsd_names,
                                                     fd_tokens, sub_version, name))
            sub_fields.append(f)
            sub_state[f.name] = value
            sub_expected[f.name] = loaded
        sub_vmsd = VMStateDescription(f"{name}/sub{i}", sub_version, fields=tuple(sub_fields))
        subsections.append(Subsection(sub_vmsd, needed=(lambda s, n=needed: n)))
        state.update(sub_state)
        if needed:
            expected.update(sub_expected)
    vmsd = VMStateDescription(name, version_id, minimum_version_id=draw(st.integers(0, version_id)),
                              fields=tuple(fields_), subsections=tuple(subsections))
    return GeneratedVMState(vmsd, state, expected)


def _values_for(f, fd_tokens):
    """A strategy of (value, loaded value) for one existing field."""
    if isinstance(f, Bool):
        return st.booleans().map(lambda v: (v, v))
    if isinstance(f, Int):
        return int_values(f.bits, f.signed).map(lambda v: (v, v))
    if isinstance(f, Buffer):
        return st.binary(min_size=f.size, max_size=f.size).map(lambda v: (v, v))
    if isinstance(f, VBuffer):
        return st.binary(max_size=min(24, f.max_size)).map(lambda v: (v, v))
    if isinstance(f, Fd):
        return st.builds(lambda: fd_tokens()).map(lambda v: (v, v))
    if isinstance(f, VArray):
        return st.lists(_values_for(f.element, fd_tokens), max_size=4).map(
            lambda vs: ([v for v, _ in vs], [loaded for _, loaded in vs]))
    if isinstance(f, Struct):
        return states_for(f.vmsd, fd_tokens=fd_tokens).map(lambda g: (g.state, g.expected))
    if isinstance(f, List):
        return st.lists(states_for(f.vmsd, fd_tokens=fd_tokens), max_size=2).map(
            lambda gs: ([g.state for g in gs], [g.expected for g in gs]))
    raise AssertionError(f"no values for {f!r}")


@st.composite
def states_for(draw, vmsd: VMStateDescription, *, fd_tokens: _Counter | None = None
               ) -> GeneratedVMState:
    """Another state for an existing description (list elements share one)."""
    state, expected = {}, {}
    for f in vmsd.fields:
        state[f.name], expected[f.name] = draw(_values_for(f, fd_tokens))
    for sub in vmsd.subsections:
        g = draw(states_for(sub.vmsd, fd_tokens=fd_tokens))
        state.update(g.state)
        if sub.needed(state):
            expected.update(g.expected)
    return GeneratedVMState(vmsd, state, expected)


def map_fds(vmsd: VMStateDescription, state: dict, mapping: dict[int, int]) -> dict:
    """``state`` with the value of every Fd field replaced by ``mapping[value]``."""
    out = dict(state)
    for f in vmsd.fields:
        if f.name not in out:
            continue
        value = out[f.name]
        if isinstance(f, Fd):
            out[f.name] = mapping.get(value, ("unmapped fd", value))
        elif isinstance(f, VArray) and isinstance(f.element, Fd):
            out[f.name] = [mapping.get(v, ("unmapped fd", v)) for v in value]
        elif isinstance(f, Struct):
            out[f.name] = map_fds(f.vmsd, value, mapping)
        elif isinstance(f, List):
            out[f.name] = [map_fds(f.vmsd, v, mapping) for v in value]
    for sub in vmsd.subsections:
        out = map_fds(sub.vmsd, out, mapping)
    return out


# ---------------------------------------------------------------------------
# Whole streams


@dataclass
class Device:
    name: str
    instance_id: int
    generated: GeneratedVMState


@dataclass
class StreamSpec:
    """What a stream is meant to carry, in the order a precopy sends it."""

    machine: str
    capabilities: tuple[str, ...]
    target_page_bits: int | None
    blocks: list[RamBlock]
    #: pages of every PART; the last entry is the END
    parts: list[list[tuple[str, int, bytes]]]
    #: commands sent before the switchover: ("ping", value) or ("open-return-path",)
    commands: list[tuple]
    devices: list[Device]
    vmdesc: bool = True
    #: the writer, once :func:`write_stream` ran (for its vmdesc)
    writer: StreamWriter | None = field(default=None, repr=False)


ascii_ids = st.from_regex(r"\A[a-z][a-z0-9.]{0,11}\Z")


@st.composite
def ram_blocks(draw) -> list[RamBlock]:
    ids = draw(st.lists(ascii_ids, min_size=1, max_size=3, unique=True))
    return [RamBlock(i, PAGE * draw(st.integers(1, 4))) for i in ids]


page_contents = st.one_of(st.just(ZERO_PAGE), st.integers(1, 255).map(lambda b: bytes([b]) * PAGE))


@st.composite
def ram_pages(draw, blocks: list[RamBlock], max_pages: int = 3):
    pages = []
    for _ in range(draw(st.integers(0, max_pages))):
        block = draw(st.sampled_from(blocks))
        offset = PAGE * draw(st.integers(0, block.length // PAGE - 1))
        pages.append((block.id, offset, draw(page_contents)))
    return pages


@st.composite
def stream_specs(draw, *, with_fds: bool = True, max_devices: int = 3,
                 max_parts: int = 2, vmdesc: bool | None = None) -> StreamSpec:
    """A whole precopy stream: header, configuration, RAM, commands, devices, EOF, vmdesc."""
    blocks = draw(ram_blocks())
    parts = draw(st.lists(ram_pages(blocks), min_size=1, max_size=max_parts + 1))
    commands = draw(st.lists(st.one_of(
        st.tuples(st.just("ping"), st.integers(0, (1 << 32) - 1)),
        st.just(("open-return-path",))), max_size=2))
    device_names = draw(st.lists(st.from_regex(r"\A[a-z][a-z0-9:_-]{0,14}\Z"),
                                 max_size=max_devices, unique=True))
    fd_tokens = _Counter(1000) if with_fds else None
    devices = []
    for name in device_names:
        if name == "ram":
            continue
        generated = draw(vmstates(depth=2, name=name, fd_tokens=fd_tokens))
        devices.append(Device(name, draw(st.integers(0, 3)), generated))
    return StreamSpec(
        machine=draw(st.sampled_from(["pc-i440fx-7.2", "pc-q35-8.2", "pc"])),
        capabilities=tuple(draw(st.lists(st.sampled_from(["backend-transfer", "events"]),
                                         unique=True, max_size=2))),
        target_page_bits=draw(st.one_of(st.none(), st.just(12))),
        blocks=blocks, parts=parts, commands=commands, devices=devices,
        vmdesc=draw(st.booleans()) if vmdesc is None else vmdesc,
    )


def write_stream(spec: StreamSpec, sink: MemorySink | None = None) -> MemorySink:
    """Write ``spec`` with StreamWriter, in QEMU's precopy order."""
    sink = sink if sink is not None else MemorySink()
    w = StreamWriter(sink)
    w.write_header()
    w.write_configuration(spec.machine, spec.capabilities, target_page_bits=spec.target_page_bits)
    w.write_ram_start(spec.blocks)
    for pages in spec.parts[:-1]:
        w.write_ram_part(pages)
    for command in spec.commands:
        if command[0] == "ping":
            w.write_ping(command[1])
        else:
            w.write_open_return_path()
    w.write_switchover_start()
    w.write_ram_part(spec.parts[-1], end=True)
    for d in spec.devices:
        w.write_section_full(d.name, d.instance_id, d.generated.vmsd, d.generated.state)
    w.write_eof()
    if spec.vmdesc:
        w.write_vmdesc()
    spec.writer = w
    return sink


def vmsds_of(spec: StreamSpec) -> dict[str, VMStateDescription]:
    return {d.name: d.generated.vmsd for d in spec.devices}


def expected_events(spec: StreamSpec) -> list[tuple]:
    """What a reader must report for ``spec``, in the shape :func:`normalize` gives."""
    out: list[tuple] = [("header", 3),
                        ("configuration", spec.machine, spec.capabilities, spec.target_page_bits)]
    ram_id = 0
    out.append(("section", SectionType.START, ram_id, "ram", 0, 4))
    out.append(("blocks", tuple(spec.blocks)))
    out.append(("footer", SectionType.START, ram_id, "ram"))

    def pages(kind, records):
        out.append(("section", kind, ram_id, "ram", 0, 4))
        for block_id, offset, data in records:
            if data == ZERO_PAGE:
                out.append(("page", block_id, offset, None, 0))
            else:
                out.append(("page", block_id, offset, data, 0))
        out.append(("footer", kind, ram_id, "ram"))

    for records in spec.parts[:-1]:
        pages(SectionType.PART, records)
    for command in spec.commands:
        if command[0] == "ping":
            out.append(("command", Command.PING, command[1].to_bytes(4, "big")))
        else:
            out.append(("command", Command.OPEN_RETURN_PATH, b""))
    out.append(("command", Command.SWITCHOVER_START, b""))
    pages(SectionType.END, spec.parts[-1])
    for i, d in enumerate(spec.devices):
        g = d.generated
        out.append(("full", i + 1, d.name, d.instance_id, g.vmsd.version_id, g.vmsd.name,
                    g.expected))
    out.append(("eof",))
    if spec.vmdesc:
        assert spec.writer is not None, "write_stream(spec) first"
        out.append(("vmdesc", spec.writer.vmdesc()))
    return out


def normalize(event: Any, vmsds: dict[str, VMStateDescription] | None = None,
              fd_tokens: dict[int, int] | None = None) -> tuple:
    """A reader event in the shape of :func:`expected_events`; received fds are
    turned back into the tokens they stand for with ``fd_tokens``.
    """
    if isinstance(event, Header):
        return ("header", event.version)
    if isinstance(event, Configuration):
        return ("configuration", event.machine, event.capabilities, event.target_page_bits)
    if isinstance(event, SectionHeader):
        return ("section", event.type, event.section_id, event.name, event.instance_id,
                event.version_id)
    if isinstance(event, RamMemSize):
        return ("blocks", event.blocks)
    if isinstance(event, RamPage):
        return ("page", event.block_id, event.offset, event.data, event.fill)
    if isinstance(event, SectionFooter):
        return ("footer", event.type, event.section_id, event.name)
    if isinstance(event, CommandRecord):
        return ("command", event.command, event.data)
    if isinstance(event, SectionFull):
        state = event.state
        if vmsds is not None:
            state = map_fds(vmsds[event.name], state, fd_tokens or {})
        return ("full", event.section_id, event.name, event.instance_id, event.version_id,
                event.vmsd_name, state)
    if isinstance(event, EndOfState):
        return ("eof",)
    if isinstance(event, VMDescription):
        return ("vmdesc", event.description)
    raise AssertionError(f"unknown event {event!r}")


@dataclass
class WrittenStream:
    """A spec, the bytes the writer produced, and where its fd records sit."""

    spec: StreamSpec
    sink: MemorySink
    data: bytes
    fd_at: list[int]


@st.composite
def written_streams(draw, **kwargs) -> WrittenStream:
    spec = draw(stream_specs(**kwargs))
    sink = write_stream(spec)
    return WrittenStream(spec, sink, sink.getvalue(), fd_positions(sink))


@st.composite
def cut_points(draw, length: int, max_cuts: int = 40) -> list[int]:
    """Sorted chunk boundaries inside ``length`` bytes (0 and length included)."""
    if length <= 1:
        return [0, length]
    cuts = draw(st.lists(st.integers(1, length - 1), max_size=max_cuts, unique=True))
    return [0] + sorted(cuts) + [length]


def feed_in_chunks(reader, data: bytes, fd_at: list[int], fds: list[int],
                   cuts: list[int], *, eof: bool = True) -> list[tuple[Any, int]]:
    """Feed ``data`` to ``reader`` chunk by chunk, each fd with the chunk that
    holds its service byte (as a UNIX socket delivers it), draining events
    after every chunk. Returns (event, bytes fed when it was yielded) pairs.
    """
    assert len(fd_at) == len(fds)
    events: list[tuple[Any, int]] = []
    j = 0
    for start, end in zip(cuts, cuts[1:]):
        chunk_fds = []
        while j < len(fd_at) and fd_at[j] < end:
            chunk_fds.append(fds[j])
            j += 1
        reader.receive_data(data[start:end], chunk_fds)
        events.extend((event, end) for event in reader.events())
    if eof:
        reader.receive_eof()
        events.extend((event, len(data)) for event in reader.events())
    return events
