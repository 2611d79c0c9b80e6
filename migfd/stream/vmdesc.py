"""The device description (vmdesc) at the end of a saved stream, and a reader lookup built from it.

Device sections carry no lengths, so a reader must know their layout. For a
stream written by anyone (QEMU included), that layout is in the JSON device
description after EOF: read it first, from the end of the file, then read
each device section field by field with the sizes it lists.
"""

from __future__ import annotations

import json
import os
import struct

from migfd.stream.constants import SectionType
from migfd.stream.reader import MAX_VMDESC_BYTES, Lookup
from migfd.stream.vmstate import VMStateDescription, vmsd_from_vmdesc


def find_vmdesc(path: str | os.PathLike) -> dict | None:
    """The device description at the end of a saved stream, or None if it has none."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        tail_len = min(size, MAX_VMDESC_BYTES + 5)
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


def lookup_from_vmdesc(desc: dict | None) -> Lookup:
    """A StreamReader lookup that reads device sections by the vmdesc's field sizes."""
    table: dict[tuple[str, int], VMStateDescription] = {}
    for dev in (desc or {}).get("devices", []) if isinstance(desc, dict) else []:
        try:
            table[(str(dev["name"]), int(dev["instance_id"]))] = vmsd_from_vmdesc(dev)
        except (KeyError, TypeError, ValueError):
            continue  # a device we cannot describe fails when its section comes
    return lambda name, instance_id, version_id: table.get((name, instance_id))
