"""``migfd inspect``: what a saved migration stream holds, as QEMU's analyze-migration.py shows it.

Device sections carry no lengths, so a reader must know their layout. For a
stream written by anyone (QEMU included), that layout is in the JSON device
description after EOF; it is read first, from the end of the file, and each
device section is then read field by field with the sizes it lists.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

from migfd.errors import MigrationError, StreamError
from migfd.stream import reader as r
from migfd.stream.constants import QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION, SectionType
from migfd.stream.vmstate import VMStateDescription, vmsd_from_vmdesc

CHUNK_BYTES = 1 << 20


def find_vmdesc(path: str) -> dict | None:
    """The device description at the end of a saved stream, or None if it has none."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        tail_len = min(size, r.MAX_VMDESC_BYTES + 5)
        f.seek(size - tail_len)
        tail = f.read(tail_len)
    # JSON text never holds a raw 0x06, so the last one is the marker if any is.
    at = tail.rfind(bytes([SectionType.VMDESCRIPTION]))
    if at < 0 or at + 5 > len(tail):
        return None
    (length,) = struct.unpack(">I", tail[at + 1:at + 5])
    if length != len(tail) - at - 5:
        return None
    try:
        desc = json.loads(tail[at + 5:])
    except (UnicodeDecodeError, ValueError):
        return None
    return desc if isinstance(desc, dict) else None


def lookup_from_vmdesc(desc: dict | None):
    """A StreamReader lookup that reads device sections by the vmdesc's field sizes."""
    table: dict[tuple[str, int], VMStateDescription] = {}
    for dev in (desc or {}).get("devices", []) if isinstance(desc, dict) else []:
        try:
            table[(str(dev["name"]), int(dev["instance_id"]))] = vmsd_from_vmdesc(dev)
        except (KeyError, TypeError, ValueError):
            continue  # a device we cannot describe fails when its section comes
    return lambda name, instance_id, version_id: table.get((name, instance_id))


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
        }


def inspect_stream(path: str) -> StreamSummary:
    """Read a whole saved stream; raises MigrationError (StreamError) if it is malformed."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as exc:
        raise MigrationError(f"cannot read {path}: {exc.strerror}") from exc
    summary = StreamSummary(path, size)
    reader = r.StreamReader(lookup_from_vmdesc(find_vmdesc(path)), ram_runs=True)
    open_header: r.SectionHeader | None = None
    try:
        with f:
            while not reader.done:
                chunk = f.read(CHUNK_BYTES)
                if chunk:
                    reader.receive_data(chunk)
                else:
                    reader.receive_eof()
                for event in reader.events():
                    open_header = _note(summary, event, open_header)
                if not chunk:
                    break
    finally:
        reader.close()
    if summary.configuration is None and not summary.sections:
        raise StreamError("stream holds no sections", reader.offset)
    return summary


def _note(s: StreamSummary, event: r.Event, open_header: r.SectionHeader | None):
    if isinstance(event, r.Configuration):
        s.configuration = {"machine": event.machine, "capabilities": list(event.capabilities),
                           "target_page_bits": event.target_page_bits,
                           "offset": event.offset, "size": event.size}
    elif isinstance(event, r.SectionHeader):
        return event
    elif isinstance(event, r.RamMemSize):
        s.ram_blocks = [{"id": b.id, "length": b.length} for b in event.blocks]
    elif isinstance(event, r.RamPageRun):
        if event.data is None:
            s.ram_zero_pages += len(event)
        else:
            s.ram_normal_pages += len(event)
    elif isinstance(event, r.RamPage):
        if event.data is None:
            s.ram_zero_pages += 1
        else:
            s.ram_normal_pages += 1
    elif isinstance(event, r.SectionFooter):
        assert open_header is not None
        s.sections.append(_section(event.type, open_header.section_id, open_header.name,
                                   open_header.instance_id, open_header.version_id,
                                   event.offset, event.size))
        return None
    elif isinstance(event, r.SectionFull):
        s.sections.append(_section(SectionType.FULL, event.section_id, event.name,
                                   event.instance_id, event.version_id, event.offset, event.size))
    elif isinstance(event, r.CommandRecord):
        s.commands.append({"command": event.command, "offset": event.offset,
                           "length": len(event.data)})
    elif isinstance(event, r.VMDescription):
        s.vmdesc = event.description
    return open_header


def _section(kind: SectionType, section_id: int, name: str, instance_id: int,
             version_id: int, offset: int, size: int) -> dict:
    return {"type": kind.name, "section_id": section_id, "name": name,
            "instance_id": instance_id, "version_id": version_id,
            "offset": offset, "size": size}


def format_summary(s: StreamSummary) -> str:
    """The human-readable form of ``migfd inspect``."""
    lines = [f"{s.path}: {s.size} bytes, QEMU migration stream version {QEMU_VM_FILE_VERSION}"]
    if s.configuration:
        caps = ", ".join(s.configuration["capabilities"]) or "none"
        lines.append(f"configuration: machine {s.configuration['machine']}, capabilities: {caps}")
    lines.append("")
    lines.append(f"{'type':<6} {'id':>4}  {'name':<28} {'inst':>4} {'ver':>4} {'offset':>12} {'size':>12}")
    for sec in s.sections:
        lines.append(f"{sec['type']:<6} {sec['section_id']:>4}  {sec['name']:<28} {sec['instance_id']:>4} "
                     f"{sec['version_id']:>4} {sec['offset']:>12} {sec['size']:>12}")
    for cmd in s.commands:
        lines.append(f"COMMAND {cmd['command']} at {cmd['offset']} ({cmd['length']} bytes)")
    if s.ram_blocks:
        lines.append("")
        lines.append("RAM blocks:")
        for b in s.ram_blocks:
            lines.append(f"  {b['id']:<30} {b['length']:>14} bytes")
        lines.append(f"  pages: {s.ram_normal_pages} normal, {s.ram_zero_pages} zero")
    lines.append("")
    if s.vmdesc is None:
        lines.append("device description: none")
    else:
        devices = s.vmdesc.get("devices", [])
        lines.append(f"device description: {len(devices)} devices")
        for dev in devices:
            if isinstance(dev, dict):
                nfields = len(dev.get("fields", []) or [])
                lines.append(f"  {dev.get('name')}/{dev.get('instance_id')} vmsd {dev.get('vmsd_name')} "
                             f"version {dev.get('version')}: {nfields} fields")
    return "\n".join(lines)
