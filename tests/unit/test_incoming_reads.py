"""How much room the destination lends each read: small during the switchover, a MiB for pages."""

from __future__ import annotations

import pytest

from migfd.migration.incoming import READ_BYTES, READ_BYTES_MIN, next_read_bytes

pytestmark = pytest.mark.unit


def test_reads_that_fill_their_room_grow_it_up_to_the_most():
    room = READ_BYTES_MIN
    sizes = []
    for _ in range(10):
        room = next_read_bytes(room, room)
        sizes.append(room)
    assert sizes[0] == 2 * READ_BYTES_MIN and sizes[-1] == READ_BYTES
    assert next_read_bytes(READ_BYTES, READ_BYTES) == READ_BYTES


def test_small_reads_shrink_it_back_to_the_least():
    # The switchover's messages are a few hundred bytes: a MiB of room per read
    # would be a MiB of zero fill and fresh pages inside the downtime.
    room = READ_BYTES
    for _ in range(10):  # bounded: a rule that never shrinks fails here, not by hanging
        room = next_read_bytes(room, 300)
    assert room == READ_BYTES_MIN
    assert next_read_bytes(READ_BYTES_MIN, 300) == READ_BYTES_MIN


def test_a_read_that_uses_a_fair_share_keeps_its_room():
    assert next_read_bytes(256 << 10, 100 << 10) == 256 << 10
