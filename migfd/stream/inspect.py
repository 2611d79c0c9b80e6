"""``migfd inspect``: what a saved migration stream holds, as QEMU's analyze-migration.py shows it.

The file is read once, by :func:`migfd.stream.annotate.walk`, with device
sections laid out by the stream's own device description
(:mod:`migfd.stream.vmdesc`). A section it does not describe -- all of them
when QEMU saved with ``suppress-vmdesc=on`` -- is delimited by its footer and
listed with offset and size, not decoded; RAM and commands need no description.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from migfd.errors import MigrationError, StreamError
from migfd.stream.annotate import AnnotatedEvent, walk
from migfd.stream.constants import QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION, SectionType, command_name
from migfd.stream.events import (
    CommandRecord,
    Configuration,
    RamMemSize,
    RamPage,
    RamPageRun,
    RamPacket,
    RamPacketPages,
    SectionFooter,
    SectionFull,
    SectionOpaque,
    VMDescription,
)
from migfd.stream.reader import StreamReader
from migfd.stream.vmdesc import find_vmdesc, lookup_from_vmdesc
from migfd.units import MiB

CHUNK_BYTES = 1 * MiB


@dataclass
class StreamSummary:
    """What ``migfd inspect`` reports; ``to_json`` is the --json form."""

    path: str
    size: int
    configuration: dict | None = None
    sections: list[dict] = field(default_factory=list)
    commands: list[dict] = field(default_factory=list)
    ram_blocks: list[dict] = field(default_factory=list)
    ram_zero_pages: int = 0
    ram_normal_pages: int = 0
    vmdesc: dict | None = None
    #: bytes of the vmdesc record (0x06, be32 length, JSON); None without one
    vmdesc_size: int | None = None

    @property
    def opaque_sections(self) -> int:
        """How many sections were delimited by their footers, not decoded."""
        return sum(1 for sec in self.sections if not sec["decoded"])

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "size": self.size,
            "magic": f"0x{QEMU_VM_FILE_MAGIC:08x}",
            "version": QEMU_VM_FILE_VERSION,
            "configuration": self.configuration,
            "sections": self.sections,
            "commands": self.commands,
            "ram": {"blocks": self.ram_blocks, "zero_pages": self.ram_zero_pages,
                    "normal_pages": self.ram_normal_pages},
            "vmdesc": self.vmdesc,
            "vmdesc_size": self.vmdesc_size,
        }


def inspect_stream(path: str) -> StreamSummary:
    """Read a whole saved stream; raises MigrationError (StreamError) if it is malformed."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as exc:
        raise MigrationError(f"cannot read {path}: {exc.strerror}") from exc
    summary = StreamSummary(path, size)
    # Inspection, not loading: a section the vmdesc does not describe is listed, not refused.
    reader = StreamReader(lookup_from_vmdesc(find_vmdesc(path)), ram_runs=True, unknown_sections="delimit")
    try:
        with f:
            for item in walk(reader, iter(lambda: f.read(CHUNK_BYTES), b"")):
                _note(summary, item)
    finally:
        reader.close()
    if summary.configuration is None and not summary.sections:
        raise StreamError("stream holds no sections", reader.offset)
    return summary


def _note(s: StreamSummary, item: AnnotatedEvent) -> None:
    event = item.event
    if isinstance(event, Configuration):
        s.configuration = {"machine": event.machine, "capabilities": list(event.capabilities),
                           "target_page_bits": event.target_page_bits,
                           "offset": event.offset, "size": event.size}
    elif isinstance(event, RamMemSize):
        s.ram_blocks = [{"id": b.id, "length": b.length} for b in event.blocks]
    elif isinstance(event, RamPacket):
        s.ram_zero_pages += len(event.zero)
    elif isinstance(event, RamPacketPages):
        s.ram_normal_pages += len(event)
    elif isinstance(event, RamPageRun):
        if event.data is None:
            s.ram_zero_pages += len(event)
        else:
            s.ram_normal_pages += len(event)
    elif isinstance(event, RamPage):
        if event.data is None:
            s.ram_zero_pages += 1
        else:
            s.ram_normal_pages += 1
    elif isinstance(event, SectionFooter):
        opened = item.header
        assert opened is not None
        s.sections.append(_section(event.type, opened.section_id, opened.name,
                                   opened.instance_id, opened.version_id, event.offset, event.size))
    elif isinstance(event, SectionFull):
        s.sections.append(_section(SectionType.FULL, event.section_id, event.name,
                                   event.instance_id, event.version_id, event.offset, event.size))
    elif isinstance(event, SectionOpaque):
        s.sections.append(_section(event.type, event.section_id, event.name, event.instance_id,
                                   event.version_id, event.offset, event.size, decoded=False))
    elif isinstance(event, CommandRecord):
        s.commands.append({"command": event.command, "name": command_name(event.command),
                           "offset": event.offset, "length": len(event.data)})
    elif isinstance(event, VMDescription):
        s.vmdesc = event.description
        s.vmdesc_size = event.size


def _section(kind: SectionType, section_id: int, name: str, instance_id: int,
             version_id: int, offset: int, size: int, decoded: bool = True) -> dict:
    return {"type": kind.name, "section_id": section_id, "name": name,
            "instance_id": instance_id, "version_id": version_id,
            "offset": offset, "size": size, "decoded": decoded}


def format_summary(s: StreamSummary) -> str:
    """The human-readable form of ``migfd inspect``."""
    lines = [f"{s.path}: {s.size} bytes, QEMU migration stream version {QEMU_VM_FILE_VERSION}"]
    if s.configuration:
        caps = ", ".join(s.configuration["capabilities"]) or "none"
        lines.append(f"configuration: machine {s.configuration['machine']}, capabilities: {caps}")
    else:
        lines.append("configuration: none")
    lines.append("")
    lines.append(f"{'type':<6} {'id':>4}  {'name':<28} {'inst':>4} {'ver':>4} {'offset':>12} {'size':>12}")
    for sec in s.sections:
        lines.append((f"{sec['type']:<6} {sec['section_id']:>4}  {sec['name']:<28} {sec['instance_id']:>4} "
                      f"{sec['version_id']:>4} {sec['offset']:>12} {sec['size']:>12}"
                      + ("" if sec["decoded"] else "  not decoded")).rstrip())
    for cmd in s.commands:
        lines.append(f"COMMAND {cmd['name']} ({cmd['command']}) at {cmd['offset']} ({cmd['length']} data bytes)")
    if s.ram_blocks:
        lines.append("")
        lines.append("RAM blocks:")
        for b in s.ram_blocks:
            lines.append(f"  {b['id']:<30} {b['length']:>14} bytes")
        lines.append(f"  pages: {s.ram_normal_pages} normal, {s.ram_zero_pages} zero")
    lines.append("")
    opaque = s.opaque_sections
    if s.vmdesc is None:
        lines.append(f"no device description: {_sections(opaque)} delimited by their footers, not decoded"
                     if opaque else "device description: none")
    else:
        devices = s.vmdesc.get("devices", [])
        lines.append(f"device description: {len(devices)} devices")
        for dev in devices:
            if isinstance(dev, dict):
                nfields = len(dev.get("fields", []) or [])
                lines.append(f"  {dev.get('name')}/{dev.get('instance_id')} vmsd {dev.get('vmsd_name')} "
                             f"version {dev.get('version')}: {nfields} fields")
        if opaque:
            lines.append(f"{_sections(opaque)} not in the device description: delimited by their footers, "
                         "not decoded")
    return "\n".join(lines)


def _sections(n: int) -> str:
    return f"{n} section" if n == 1 else f"{n} sections"
