"""vmstate descriptions compiled once into fast encoders and decoders.

:func:`~migfd.stream.vmstate.save_vmstate` and
:func:`~migfd.stream.vmstate.load_vmstate` walk a description field by field:
they *define* the layout. Saving and loading device sections happens inside
the downtime, though, where a method call and a bytes object per field add
up. So each description is compiled, once per version and cached on it, into
steps:

- a run of consecutive integers and bools becomes one precompiled
  ``struct.Struct`` (one ``pack`` / ``unpack_from`` for the run);
- subsections keep their header bytes ready and are skipped with one test
  when the next byte is not 0x05 (the common case: the footer follows);
- every other field keeps its own ``save`` / ``load``.

Encoding produces the section's bytes in one buffer plus the positions of its
fd records, so the writer hands a section to its sink in one piece per fd.

The compiled path must never differ from the definition. Decoding takes a
fast path only when every byte of a step has arrived and is valid; otherwise
it runs the fields' own ``load`` from the same position, which gives the same
value, the same :class:`~migfd.errors.StreamError` (message and offset) or the
same wait for more data. Encoding falls back the same way to report a value
that does not fit.
"""

from __future__ import annotations

import struct
from itertools import islice
from operator import itemgetter
from typing import Any, Callable

from migfd.stream.constants import FD_SERVICE_BYTE, SectionType
from migfd.stream.vmstate import (
    MAX_LIST_ELEMENTS,
    Bool,
    Cursor,
    Fd,
    Field,
    Int,
    Sink,
    VArray,
    VBuffer,
    VMStateDescription,
    check_version,
    next_subsection,
    subsection_header,
)

_SUBSECTION = SectionType.SUBSECTION
_INT_CODES = {8: "b", 16: "h", 32: "i", 64: "q"}
_BE32 = struct.Struct(">I")
#: a longer run of service bytes than any array of fds may hold
_SERVICE_BYTES = bytes([FD_SERVICE_BYTE]) * MAX_LIST_ELEMENTS

#: (state, out, fd_marks) -> None: appends bytes to ``out`` and (position in out, fd) to ``fd_marks``
Encoder = Callable[[dict, bytearray, list], None]
#: (cursor, state) -> None: loads fields into ``state``
Decoder = Callable[[Cursor, dict], None]


class _Collect:
    """A sink that appends into the compiled encoder's buffer (for fields kept as they are)."""

    __slots__ = ("out", "fd_marks")

    def __init__(self, out: bytearray, fd_marks: list):
        self.out = out
        self.fd_marks = fd_marks

    def put_buffer(self, data: bytes) -> None:
        self.out += data

    def put_fd(self, fd: int) -> None:
        self.fd_marks.append((len(self.out), fd))


def _scalar_code(f: Field) -> str | None:
    """The struct code of a field that can join a run, or None."""
    if type(f) is Int:
        code = _INT_CODES[f.bits]
        return code if f.signed else code.upper()
    if type(f) is Bool:
        return "B"
    return None


def _runs(fields: list[Field]) -> list[list[Field]]:
    """Fields grouped: consecutive scalars together, every other field alone."""
    groups: list[list[Field]] = []
    for f in fields:
        if _scalar_code(f) is not None and groups and _scalar_code(groups[-1][0]) is not None:
            groups[-1].append(f)
        else:
            groups.append([f])
    return groups


# -- encoding ---------------------------------------------------------------


def _encode_run(fields: list[Field]) -> Encoder:
    names = tuple(f.name for f in fields)
    # '?' packs any value by its truth, exactly as Bool.save does.
    packer = struct.Struct(">" + "".join("?" if type(f) is Bool else _scalar_code(f) for f in fields))
    values = itemgetter(*names) if len(names) > 1 else (lambda state: (state[names[0]],))

    def encode(state: dict, out: bytearray, fd_marks: list) -> None:
        got = values(state)
        try:
            out += packer.pack(*got)
        except struct.error:
            # A value that does not fit: let the field say which, in its words.
            scratch = _Collect(bytearray(), [])
            for f, value in zip(fields, got):
                f.save(scratch, value)
            raise
    return encode


def _encode_field(f: Field) -> Encoder:
    name, save = f.name, f.save

    if type(f) is Fd:
        def encode_fd(state: dict, out: bytearray, fd_marks: list) -> None:
            value = state[name]
            if type(value) is not int or value < 0:
                return save(_Collect(out, fd_marks), value)  # the definition's error, or its way
            fd_marks.append((len(out), value))
        return encode_fd
    if type(f) is VBuffer:
        bound = f.max_size

        def encode_vbuffer(state: dict, out: bytearray, fd_marks: list) -> None:
            value = state[name]
            if type(value) is not bytes or len(value) > bound:
                return save(_Collect(out, fd_marks), value)
            out += _BE32.pack(len(value))
            out += value
        return encode_vbuffer
    if type(f) is VArray and type(f.element) is Fd:
        most = f.max_elements

        def encode_fds(state: dict, out: bytearray, fd_marks: list) -> None:
            value = state[name]
            if len(value) > most or not all(type(v) is int and v >= 0 for v in value):
                return save(_Collect(out, fd_marks), value)
            out += _BE32.pack(len(value))
            at = len(out)  # the service bytes follow each other: no bytes between the fds
            fd_marks.extend((at, v) for v in value)
        return encode_fds

    def encode(state: dict, out: bytearray, fd_marks: list) -> None:
        save(_Collect(out, fd_marks), state[name])
    return encode


def _compile_encoder(vmsd: VMStateDescription) -> Encoder:
    steps = [_encode_run(g) if _scalar_code(g[0]) is not None else _encode_field(g[0])
             for g in _runs(list(vmsd.fields))]
    subsections = []
    for sub in vmsd.subsections:
        subsections.append((sub.needed, subsection_header(sub.vmsd), encoder(sub.vmsd)))

    def encode(state: dict, out: bytearray, fd_marks: list) -> None:
        for step in steps:
            step(state, out, fd_marks)
        for needed, head, sub_encode in subsections:
            if needed(state):
                out += head
                sub_encode(state, out, fd_marks)
    return encode


def encoder(vmsd: VMStateDescription) -> Encoder:
    """The compiled encoder of ``vmsd`` at its current version (built once)."""
    codec = vmsd._compiled.get(("save",))
    if codec is None:
        codec = vmsd._compiled[("save",)] = _compile_encoder(vmsd)
    return codec


def save_compiled(sink: Sink, vmsd: VMStateDescription, state: dict, prefix: bytes = b"",
                  suffix: bytes = b"") -> int:
    """Write ``prefix``, ``state`` as ``vmsd`` would, then ``suffix``; returns the vmstate's bytes.

    The bytes go to the sink in one piece per fd record (and one if there is none).
    """
    out = bytearray(prefix)
    fd_marks: list[tuple[int, int]] = []
    encoder(vmsd)(state, out, fd_marks)
    size = len(out) - len(prefix) + len(fd_marks)
    out += suffix
    if not fd_marks:
        sink.put_buffer(out)
        return size
    view = memoryview(bytes(out))
    start = 0
    for at, fd in fd_marks:
        if at > start:
            sink.put_buffer(view[start:at])
        sink.put_fd(fd)
        start = at
    if start < len(view):
        sink.put_buffer(view[start:])
    return size


# -- decoding ---------------------------------------------------------------


def _decode_run(fields: list[Field]) -> Decoder:
    names = tuple(f.name for f in fields)
    unpacker = struct.Struct(">" + "".join(_scalar_code(f) for f in fields))  # type: ignore[misc]
    size = unpacker.size
    bools = tuple(i for i, f in enumerate(fields) if type(f) is Bool)

    def slow(cur: Cursor, state: dict) -> None:
        for f in fields:
            state[f.name] = f.load(cur)

    def decode(cur: Cursor, state: dict) -> None:
        pos = cur.pos
        if pos + size > len(cur.data):
            return slow(cur, state)
        values: Any = unpacker.unpack_from(cur.data, pos)
        if bools:
            values = list(values)
            for i in bools:
                if values[i] > 1:
                    return slow(cur, state)  # raises, with the field's name and offset
                values[i] = values[i] == 1
        state.update(zip(names, values))
        cur.pos = pos + size
    return decode


def _decode_field(f: Field) -> Decoder:
    name, load = f.name, f.load

    if type(f) is Fd:
        def decode_fd(cur: Cursor, state: dict) -> None:
            data, pos, taken = cur.data, cur.pos, cur.fds_taken
            if pos < len(data) and data[pos] == FD_SERVICE_BYTE and taken < len(cur.fds):
                state[name] = cur.fds[taken]
                cur.fds_taken = taken + 1
                cur.pos = pos + 1
            else:
                state[name] = load(cur)
        return decode_fd
    if type(f) is VBuffer:
        bound = f.max_size

        def decode_vbuffer(cur: Cursor, state: dict) -> None:
            data, pos = cur.data, cur.pos
            if pos + 4 <= len(data):
                length = _BE32.unpack_from(data, pos)[0]
                end = pos + 4 + length
                if length <= bound and end <= len(data):
                    state[name] = bytes(data[pos + 4:end])
                    cur.pos = end
                    return
            state[name] = load(cur)
        return decode_vbuffer
    if type(f) is VArray and type(f.element) is Fd:
        return _decode_fds(f)

    def decode(cur: Cursor, state: dict) -> None:
        state[name] = load(cur)
    return decode


def _decode_fds(f: VArray) -> Decoder:
    """An array of fds: its service bytes checked at once, not one call per fd."""
    name, load, most = f.name, f.load, f.max_elements

    def decode(cur: Cursor, state: dict) -> None:
        data, pos, taken = cur.data, cur.pos, cur.fds_taken
        if pos + 4 <= len(data):
            count = _BE32.unpack_from(data, pos)[0]
            first = pos + 4
            have = min(count, len(data) - first)  # service bytes received
            if (count <= most and data[first:first + have] == _SERVICE_BYTES[:have]
                    and taken + have <= len(cur.fds)):
                if have == count:
                    state[name] = list(islice(cur.fds, taken, taken + count))
                    cur.fds_taken = taken + count
                    cur.pos = first + count
                    return
                # Every byte so far is a good fd record: wait for the rest, as
                # reading them one by one would (and decide it without that loop).
                cur.pos = first + have
                raise cur.short(1)
        state[name] = load(cur)
    return decode


def _subsection_heads(vmsd: VMStateDescription) -> dict[bytes, VMStateDescription]:
    """0x05, length and name of each subsection the prefix rule of subsection_name accepts.

    Later subsections of the same name win, as in the loader's table.
    """
    prefix = vmsd.name.encode() + b"/"
    heads = {}
    for sub in vmsd.subsections:
        try:
            raw = sub.vmsd.name.encode("ascii")
        except UnicodeEncodeError:
            continue  # only the field-by-field path reads such a name
        if len(prefix) <= len(raw) < 256 and raw.startswith(prefix):
            heads[bytes([_SUBSECTION, len(raw)]) + raw] = sub.vmsd
    return heads


def _compile_decoder(vmsd: VMStateDescription, version_id: int) -> Decoder:
    fields = [f for f in vmsd.fields if f.version_id <= version_id]
    steps = [_decode_run(g) if _scalar_code(g[0]) is not None else _decode_field(g[0])
             for g in _runs(fields)]
    by_name = {sub.vmsd.name: sub.vmsd for sub in vmsd.subsections}
    heads = tuple(_subsection_heads(vmsd).items())

    def decode(cur: Cursor, state: dict) -> None:
        for step in steps:
            step(cur, state)
        while True:
            data, pos = cur.data, cur.pos
            if pos < len(data) and data[pos] != _SUBSECTION:
                return  # the footer, most often: not worth a call
            for head, sub_vmsd in heads:  # a subsection we know, whole: no peeking byte by byte
                end = pos + len(head)
                if end + 4 <= len(data) and data[pos:end] == head:
                    cur.pos = end + 4
                    load_compiled_into(cur, sub_vmsd, _BE32.unpack_from(data, end)[0], state)
                    break
            else:
                found = next_subsection(cur, vmsd, by_name)
                if found is None:
                    return
                load_compiled_into(cur, *found, state)
    return decode


def load_compiled_into(cur: Cursor, vmsd: VMStateDescription, version_id: int, state: dict) -> None:
    """Read one vmstate written at ``version_id`` into ``state``, as load_vmstate does."""
    decode = vmsd._compiled.get(("load", version_id))
    if decode is None:
        check_version(cur, vmsd, version_id)  # a version that passed once always passes
        decode = vmsd._compiled[("load", version_id)] = _compile_decoder(vmsd, version_id)
    decode(cur, state)


def load_compiled(cur: Cursor, vmsd: VMStateDescription, version_id: int) -> dict:
    """Read one vmstate written at ``version_id``; the same result as load_vmstate."""
    state: dict = {}
    load_compiled_into(cur, vmsd, version_id, state)
    return state


def compile_vmsd(vmsd: VMStateDescription) -> None:
    """Build ``vmsd``'s encoder and its decoder at the current version (and its subsections') now.

    A migration calls it in its setup: built lazily, the first section a
    fresh process saves or loads would pay for it inside the downtime. The
    current version always passes the version check, so caching its decoder
    skips nothing.
    """
    encoder(vmsd)
    key = ("load", vmsd.version_id)
    if key not in vmsd._compiled:
        vmsd._compiled[key] = _compile_decoder(vmsd, vmsd.version_id)
    for sub in vmsd.subsections:
        compile_vmsd(sub.vmsd)
