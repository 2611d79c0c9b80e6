"""vmstate: declarative device state, as QEMU's VMStateDescription.

A :class:`VMStateDescription` lists fields in declaration order; saving writes
them with no tags (the layout *is* the description), loading reads them back
into a dict. Subsections follow the fields, each written only when its
``needed`` predicate says so. The same description also produces the vmdesc
JSON entry that QEMU appends after EOF and that analyze-migration.py reads.

Saving writes into a *sink* (``put_buffer(bytes)``, ``put_fd(fd)``); loading
reads from a :class:`Cursor`. Neither touches a socket.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from migfd.errors import StreamError
from migfd.stream.constants import FD_SERVICE_BYTE, SectionType

#: Bounds a loader applies to lengths read from the stream.
MAX_VBUFFER_BYTES = 16 << 20
MAX_LIST_ELEMENTS = 1 << 16

_BE16, _BE32, _BE64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")


class Sink(Protocol):
    """Where encoded bytes and fds go: a QEMUFile, or memory in tests."""

    def put_buffer(self, data: bytes) -> None: ...

    def put_fd(self, fd: int) -> None: ...


class NeedData(Exception):
    """Internal: the cursor ran past the bytes received so far."""


class Cursor:
    """Reads big-endian values from received bytes and takes queued fds.

    ``base`` is the stream offset of ``data[0]``, so every error names the
    offset in the whole stream. Fds are taken from ``fds`` by index and only
    committed by the caller once a whole event parsed, so running out of data
    half-way gives nothing away.
    """

    __slots__ = ("data", "pos", "base", "fds", "fds_taken", "limit")

    def __init__(self, data: bytes | bytearray | memoryview, base: int = 0,
                 fds: Sequence[int] = (), limit: int | None = None):
        # Use a given view as it is: the reader releases it after each attempt.
        self.data = data if isinstance(data, memoryview) else memoryview(data)
        self.pos = 0
        self.base = base
        self.fds = fds
        self.fds_taken = 0
        self.limit = limit

    @property
    def offset(self) -> int:
        return self.base + self.pos

    def error(self, message: str, at: int | None = None) -> StreamError:
        return StreamError(message, self.offset if at is None else at)

    def short(self, n: int) -> Exception:
        """Why ``n`` more bytes cannot be read now: over the limit, or not here yet."""
        if self.limit is not None and self.pos + n > self.limit:
            return self.error(f"record of {n} bytes is larger than the limit of {self.limit}")
        return NeedData()

    def take(self, n: int) -> bytes:
        pos = self.pos
        if pos + n > len(self.data):
            raise self.short(n)
        self.pos = pos + n
        return bytes(self.data[pos:pos + n])

    def skip(self, n: int) -> None:
        """Consume ``n`` bytes without copying them (they were looked at already)."""
        if self.pos + n > len(self.data):
            raise NeedData
        self.pos += n

    def starts_with(self, prefix: bytes) -> bool:
        """Whether the next bytes are ``prefix``, consuming nothing.

        False as soon as a received byte differs; NeedData only while every
        byte received so far matches and more are needed to be sure.
        """
        have = bytes(self.data[self.pos:self.pos + len(prefix)])
        if not prefix.startswith(have):
            return False
        if len(have) < len(prefix):
            raise NeedData
        return True

    def peek_u8(self) -> int:
        if self.pos >= len(self.data):
            raise NeedData
        return self.data[self.pos]

    # The integers are read in place (unpack_from), with take's checks.

    def u8(self) -> int:
        pos = self.pos
        if pos >= len(self.data):
            raise self.short(1)
        self.pos = pos + 1
        return self.data[pos]

    def _unpack(self, layout: struct.Struct) -> int:
        pos, size = self.pos, layout.size
        if pos + size > len(self.data):
            raise self.short(size)
        self.pos = pos + size
        return layout.unpack_from(self.data, pos)[0]

    def be16(self) -> int:
        return self._unpack(_BE16)

    def be32(self) -> int:
        return self._unpack(_BE32)

    def be64(self) -> int:
        return self._unpack(_BE64)

    def idstr(self, what: str) -> str:
        """u8 length + ASCII name, as QEMU writes section and block ids."""
        at = self.offset
        raw = self.take(self.u8())
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(f"{what} is not ASCII: {raw!r}", at) from None

    def fd(self) -> int:
        """One fd record: the service byte, then the oldest queued fd."""
        at = self.offset
        byte = self.u8()
        if byte != FD_SERVICE_BYTE:
            raise self.error(f"unexpected service byte 0x{byte:02x}", at)
        if self.fds_taken >= len(self.fds):
            raise self.error("no FD come with service byte", at)
        fd = self.fds[self.fds_taken]
        self.fds_taken += 1
        return fd


# --------------------------------------------------------------------------
# Fields


@dataclass(frozen=True)
class Field:
    """One field of a vmstate; ``version_id`` is the first version that has it."""

    name: str
    version_id: int = 0

    #: name of the type in the vmdesc JSON
    vmdesc_type = "unknown"

    def save(self, sink: Sink, value: Any) -> int:
        raise NotImplementedError

    def load(self, cur: Cursor) -> Any:
        raise NotImplementedError

    def vmdesc(self, value: Any, size: int) -> dict:
        return {"name": self.name, "type": self.vmdesc_type, "size": size}


@dataclass(frozen=True)
class Bool(Field):
    vmdesc_type = "bool"

    def save(self, sink: Sink, value: Any) -> int:
        sink.put_buffer(b"\x01" if value else b"\x00")
        return 1

    def load(self, cur: Cursor) -> bool:
        at = cur.offset
        byte = cur.u8()
        if byte > 1:
            raise cur.error(f"field '{self.name}': bool must be 0 or 1, not {byte}", at)
        return bool(byte)


@dataclass(frozen=True)
class Int(Field):
    """A signed or unsigned integer of 8, 16, 32 or 64 bits, big-endian."""

    bits: int = 32
    signed: bool = False

    _FORMATS = {8: "b", 16: "h", 32: "i", 64: "q"}

    def __post_init__(self) -> None:
        if self.bits not in self._FORMATS:
            raise ValueError(f"field '{self.name}': {self.bits} bits is not a vmstate integer width")

    @property
    def vmdesc_type(self) -> str:  # type: ignore[override]
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def _format(self) -> str:
        code = self._FORMATS[self.bits]
        return ">" + (code if self.signed else code.upper())

    def save(self, sink: Sink, value: Any) -> int:
        try:
            sink.put_buffer(struct.pack(self._format, value))
        except struct.error:
            raise ValueError(f"field '{self.name}': {value!r} does not fit {self.vmdesc_type}") from None
        return self.bits // 8

    def load(self, cur: Cursor) -> int:
        return struct.unpack(self._format, cur.take(self.bits // 8))[0]


def Int8(name: str, version_id: int = 0) -> Int: return Int(name, version_id, 8, True)
def Int16(name: str, version_id: int = 0) -> Int: return Int(name, version_id, 16, True)
def Int32(name: str, version_id: int = 0) -> Int: return Int(name, version_id, 32, True)
def Int64(name: str, version_id: int = 0) -> Int: return Int(name, version_id, 64, True)
def UInt8(name: str, version_id: int = 0) -> Int: return Int(name, version_id, 8, False)
def UInt16(name: str, version_id: int = 0) -> Int: return Int(name, version_id, 16, False)
def UInt32(name: str, version_id: int = 0) -> Int: return Int(name, version_id, 32, False)
def UInt64(name: str, version_id: int = 0) -> Int: return Int(name, version_id, 64, False)


@dataclass(frozen=True)
class Buffer(Field):
    """A buffer of fixed size, raw (VMSTATE_BUFFER)."""

    size: int = 0
    vmdesc_type = "buffer"

    def save(self, sink: Sink, value: Any) -> int:
        if len(value) != self.size:
            raise ValueError(f"field '{self.name}': buffer of {len(value)} bytes, expected {self.size}")
        sink.put_buffer(bytes(value))
        return self.size

    def load(self, cur: Cursor) -> bytes:
        return cur.take(self.size)


@dataclass(frozen=True)
class VBuffer(Field):
    """A be32 length, then that many bytes (VMSTATE_UINT32 + VMSTATE_VBUFFER_UINT32).

    ``max_size`` bounds what a loader accepts, so a corrupted length cannot
    make it allocate or wait for gigabytes.
    """

    max_size: int = MAX_VBUFFER_BYTES
    vmdesc_type = "buffer"

    def save(self, sink: Sink, value: Any) -> int:
        if len(value) > self.max_size:
            raise ValueError(f"field '{self.name}': {len(value)} bytes exceed its bound of {self.max_size}")
        sink.put_buffer(struct.pack(">I", len(value)) + bytes(value))
        return 4 + len(value)

    def load(self, cur: Cursor) -> bytes:
        at = cur.offset
        length = cur.be32()
        if length > self.max_size:
            raise cur.error(f"field '{self.name}': length {length} exceeds its bound of {self.max_size}", at)
        return cur.take(length)

    def vmdesc(self, value: Any, size: int) -> dict:
        # QEMU describes the length and the bytes as two fields; so do we, so
        # that analyze-migration.py walks the same bytes.
        return {"name": self.name + ".len", "type": "uint32", "size": 4}

    def vmdesc_fields(self, value: Any) -> list[dict]:
        return [self.vmdesc(value, 4), {"name": self.name, "type": "buffer", "size": len(value)}]


@dataclass(frozen=True)
class VArray(Field):
    """A be32 count, then that many elements of one field type (VMSTATE_VARRAY_UINT32).

    An array of :class:`Fd` puts its fd records back to back, so a channel may
    batch them into one sendmsg.
    """

    element: Field | None = None
    max_elements: int = MAX_LIST_ELEMENTS

    @property
    def vmdesc_type(self) -> str:  # type: ignore[override]
        assert self.element is not None
        return self.element.vmdesc_type

    def save(self, sink: Sink, value: Any) -> int:
        assert self.element is not None
        if len(value) > self.max_elements:
            raise ValueError(f"field '{self.name}': {len(value)} elements exceed {self.max_elements}")
        sink.put_buffer(struct.pack(">I", len(value)))
        return 4 + sum(self.element.save(sink, v) for v in value)

    def load(self, cur: Cursor) -> list:
        assert self.element is not None
        at = cur.offset
        count = cur.be32()
        if count > self.max_elements:
            raise cur.error(f"field '{self.name}': {count} elements exceed its bound of {self.max_elements}", at)
        return [self.element.load(cur) for _ in range(count)]

    def vmdesc_fields(self, value: Any) -> list[dict]:
        assert self.element is not None
        sizes = [self.element.save(_CountingSink(), v) for v in value]
        entry = {"name": self.name, "type": self.vmdesc_type, "size": sizes[0] if sizes else 0}
        if len(value) != 1:
            entry["array_len"] = len(value)
        return [{"name": self.name + ".len", "type": "uint32", "size": 4}, entry]


@dataclass(frozen=True)
class Fd(Field):
    """A file descriptor (VMSTATE_FD): one service byte, the fd beside it.

    The value is the fd number in the sending process; the loader yields the
    fd number it received, which the caller then owns.
    """

    vmdesc_type = "fd"

    def save(self, sink: Sink, value: Any) -> int:
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"field '{self.name}': {value!r} is not an open fd")
        sink.put_fd(value)
        return 1

    def load(self, cur: Cursor) -> int:
        return cur.fd()


@dataclass(frozen=True)
class Struct(Field):
    """A nested vmstate (VMSTATE_STRUCT); its value is a dict."""

    vmsd: "VMStateDescription | None" = None
    vmdesc_type = "struct"

    def save(self, sink: Sink, value: Any) -> int:
        assert self.vmsd is not None
        return save_vmstate(sink, self.vmsd, value)

    def load(self, cur: Cursor) -> dict:
        assert self.vmsd is not None
        return load_vmstate(cur, self.vmsd, self.vmsd.version_id)


@dataclass(frozen=True)
class List(Field):
    """A list of structs (VMSTATE_QTAILQ_V): 0x01 before each element, 0x00 after the last."""

    vmsd: "VMStateDescription | None" = None
    max_elements: int = MAX_LIST_ELEMENTS
    vmdesc_type = "qtailq"

    def save(self, sink: Sink, value: Any) -> int:
        assert self.vmsd is not None
        size = 0
        for element in value:
            sink.put_buffer(b"\x01")
            size += 1 + save_vmstate(sink, self.vmsd, element)
        sink.put_buffer(b"\x00")
        return size + 1

    def load(self, cur: Cursor) -> list:
        assert self.vmsd is not None
        out: list = []
        while True:
            at = cur.offset
            marker = cur.u8()
            if marker == 0:
                return out
            if marker != 1:
                raise cur.error(f"field '{self.name}': list marker must be 0 or 1, not {marker}", at)
            if len(out) >= self.max_elements:
                raise cur.error(f"field '{self.name}': more than {self.max_elements} list elements", at)
            out.append(load_vmstate(cur, self.vmsd, self.vmsd.version_id))


@dataclass(frozen=True)
class Raw(Field):
    """``size`` bytes of a field whose type we only know by name (from a vmdesc)."""

    size: int = 0
    type_name: str = "unknown"

    @property
    def vmdesc_type(self) -> str:  # type: ignore[override]
        return self.type_name

    def save(self, sink: Sink, value: Any) -> int:
        sink.put_buffer(bytes(value))
        return len(value)

    def load(self, cur: Cursor) -> bytes:
        return cur.take(self.size)


# --------------------------------------------------------------------------
# Descriptions


@dataclass(frozen=True)
class Subsection:
    """An optional part of a vmstate, written when ``needed(state)`` is true."""

    vmsd: "VMStateDescription"
    needed: Callable[[dict], bool] = lambda state: True


@dataclass(frozen=True)
class VMStateDescription:
    """What QEMU calls a vmsd: name, versions, fields, subsections.

    Subsection fields belong to the same state object as the parent's fields
    (in QEMU they describe the same C struct), so they load into the same dict.
    """

    name: str
    version_id: int
    minimum_version_id: int = 0
    fields: tuple[Field, ...] = ()
    subsections: tuple[Subsection, ...] = field(default=())
    #: its compiled encoder and decoders (:mod:`migfd.stream.compiled`), built on first use
    _compiled: dict = field(default_factory=dict, init=False, repr=False, compare=False)


def _fields_for(vmsd: VMStateDescription, version_id: int) -> list[Field]:
    return [f for f in vmsd.fields if f.version_id <= version_id]


def save_vmstate(sink: Sink, vmsd: VMStateDescription, state: dict) -> int:
    """Write ``state`` as ``vmsd`` at its current version; returns bytes written.

    Field by field: this is the definition the compiled encoder
    (:mod:`migfd.stream.compiled`) is held to.
    """
    size = 0
    for f in vmsd.fields:
        size += f.save(sink, state[f.name])
    for sub in vmsd.subsections:
        if not sub.needed(state):
            continue
        head = subsection_header(sub.vmsd)
        sink.put_buffer(head)
        size += len(head) + save_vmstate(sink, sub.vmsd, state)
    return size


def subsection_header(vmsd: VMStateDescription) -> bytes:
    """The bytes before a subsection's fields: 0x05, its name, its version."""
    name = vmsd.name.encode("ascii")
    return bytes([SectionType.SUBSECTION, len(name)]) + name + struct.pack(">I", vmsd.version_id)


def check_version(cur: Cursor, vmsd: VMStateDescription, version_id: int) -> None:
    """Refuse a version ``vmsd`` cannot load, as QEMU's vmstate_load_state."""
    if version_id > vmsd.version_id:
        raise cur.error(f"{vmsd.name}: version {version_id} is newer than the supported {vmsd.version_id}")
    if version_id < vmsd.minimum_version_id:
        raise cur.error(f"{vmsd.name}: version {version_id} is older than the minimum {vmsd.minimum_version_id}")


def load_vmstate(cur: Cursor, vmsd: VMStateDescription, version_id: int) -> dict:
    """Read one vmstate written at ``version_id``; QEMU's vmstate_load_state.

    Field by field: this is the definition the compiled decoder
    (:mod:`migfd.stream.compiled`) is held to.
    """
    check_version(cur, vmsd, version_id)
    state: dict = {}
    for f in _fields_for(vmsd, version_id):
        state[f.name] = f.load(cur)
    _load_subsections(cur, vmsd, state)
    return state


def subsection_name(cur: Cursor, vmsd: VMStateDescription) -> str | None:
    """The name of a subsection of ``vmsd`` that starts here (consumed), or None (nothing consumed).

    As QEMU's vmstate_subsection_load: peek; a subsection starts with 0x05 and
    a name that begins with the parent's name. Anything else belongs to
    whatever follows (the section footer, the next list element, ...).
    """
    if cur.peek_u8() != SectionType.SUBSECTION:
        return None
    save = cur.pos
    cur.u8()
    prefix = vmsd.name.encode() + b"/"
    # As QEMU: a name too short to be "parent/x", or one that does not start
    # with "parent/", is not ours (a buffer of a nested struct may start with
    # 0x05). Decide on the first byte that differs from the prefix: the bytes
    # after it may lie beyond this section, and deciding must not wait for them.
    length = cur.u8()
    if length < len(prefix) or not cur.starts_with(prefix):
        cur.pos = save
        return None
    return cur.take(length).decode("ascii", errors="replace")


def next_subsection(cur: Cursor, vmsd: VMStateDescription,
                    by_name: dict[str, VMStateDescription]) -> tuple[VMStateDescription, int] | None:
    """The subsection of ``vmsd`` that starts here and its version (header consumed), or None."""
    at = cur.offset
    name = subsection_name(cur, vmsd)
    if name is None:
        return None
    sub = by_name.get(name)
    if sub is None:
        raise cur.error(f"unknown subsection '{name}' of {vmsd.name}", at)
    return sub, cur.be32()


def _load_subsections(cur: Cursor, vmsd: VMStateDescription, state: dict) -> None:
    by_name = {sub.vmsd.name: sub.vmsd for sub in vmsd.subsections}
    while (found := next_subsection(cur, vmsd, by_name)) is not None:
        state.update(load_vmstate(cur, *found))


def vmdesc_entry(vmsd: VMStateDescription, state: dict) -> dict:
    """The vmdesc JSON of one vmstate as saved: fields with their byte sizes."""
    fields: list[dict] = []
    for f in vmsd.fields:
        value = state[f.name]
        if isinstance(f, (VBuffer, VArray)):
            fields.extend(f.vmdesc_fields(value))
            continue
        size = f.save(_CountingSink(), value)
        entry = f.vmdesc(value, size)
        if isinstance(f, Struct) and f.vmsd is not None:
            entry["struct"] = vmdesc_entry(f.vmsd, value)
        fields.append(entry)
    out: dict = {"vmsd_name": vmsd.name, "version": vmsd.version_id, "fields": fields}
    subs = [vmdesc_entry(s.vmsd, state) for s in vmsd.subsections if s.needed(state)]
    if subs:
        out["subsections"] = subs
    return out


class _CountingSink:
    """A sink that only counts, to size fields for the vmdesc."""

    def put_buffer(self, data: bytes) -> None:
        pass

    def put_fd(self, fd: int) -> None:
        pass


def vmsd_from_vmdesc(entry: dict, *, limit_bytes: int = MAX_VBUFFER_BYTES) -> VMStateDescription:
    """A description that reads each field as raw bytes of its vmdesc size.

    This is how ``migfd inspect`` reads device sections of streams it has no
    description for (QEMU's own devices): the vmdesc says how many bytes each
    field took when it was written.
    """
    if not isinstance(entry, dict):
        raise ValueError("vmdesc entry is not an object")
    fields: list[Field] = []
    for raw in entry.get("fields", []):
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
            raise ValueError("vmdesc field without a name")
        size = raw.get("size")
        if not isinstance(size, int) or not 0 <= size <= limit_bytes:
            raise ValueError(f"vmdesc field '{raw['name']}' has a bad size {size!r}")
        # Arrays are described once with array_len elements of `size` bytes.
        count = raw.get("array_len", 1)
        if not isinstance(count, int) or not 0 <= count <= MAX_LIST_ELEMENTS:
            raise ValueError(f"vmdesc field '{raw['name']}' has a bad array_len {count!r}")
        if raw.get("type") == "fd":
            fields.append(Fd(raw["name"]))
        else:
            fields.append(Raw(raw["name"], size=size * count, type_name=str(raw.get("type"))))
    name = entry.get("vmsd_name")
    version = entry.get("version", 0)
    if not isinstance(name, str) or not isinstance(version, int):
        raise ValueError("vmdesc entry without vmsd_name or version")
    subsections = tuple(Subsection(vmsd_from_vmdesc(s, limit_bytes=limit_bytes))
                        for s in entry.get("subsections", []) or [])
    return VMStateDescription(name, version_id=version, minimum_version_id=0,
                              fields=tuple(fields), subsections=subsections)
