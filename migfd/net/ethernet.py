"""The Ethernet header of migfd's frames and the guest's answer to one.

Every frame migfd sends through a TAP carries the local experimental ethertype
0x88B5 and no IP at all; the guest workload answers a frame by sending it back
with the MAC addresses swapped.  What the frames carry after the header is the
business of whoever sends them (see :mod:`migfd.peers.frames`).
"""

from __future__ import annotations

import struct

#: IEEE 802 "local experimental ethertype 1".
ETH_P_MIGFD = 0x88B5
#: destination MAC, source MAC, ethertype
ETH_HEADER = struct.Struct("!6s6sH")
ETH_HEADER_LEN = ETH_HEADER.size
#: Locally administered unicast MAC the guest workload answers from ("\x02migfd").
GUEST_MAC = b"\x02migfd"


def echo_frame(frame: bytes | bytearray | memoryview) -> bytes:
    """``frame`` with source and destination MAC swapped (the guest's answer)."""
    if len(frame) < ETH_HEADER_LEN:
        raise ValueError("shorter than an Ethernet header")
    data = bytes(frame)
    return data[6:12] + data[0:6] + data[12:]


def is_migfd_frame(frame: bytes | bytearray | memoryview) -> bool:
    """True if ``frame`` carries ethertype 0x88B5."""
    return len(frame) >= ETH_HEADER_LEN and frame[12] == 0x88 and frame[13] == 0xB5
