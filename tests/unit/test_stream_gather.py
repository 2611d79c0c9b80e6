"""Interleaved runs: the bytes they stand for, and the iovec a channel sends them from."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from migfd.stream.gather import Interleaved


def iovec_bytes(iov: np.ndarray) -> bytes:
    """What writev would send: every (address, length) entry, read from memory in order."""
    return b"".join(ctypes.string_at(int(addr), int(n)) for addr, n in iov)


def test_rows_alternate_in_wire_order():
    words = np.arange(1, 17, dtype=np.uint8).reshape(2, 8)
    pages = np.frombuffer(b"abcdef", dtype=np.uint8).reshape(2, 3)
    run = Interleaved(words, pages)
    expected = bytes(range(1, 9)) + b"abc" + bytes(range(9, 17)) + b"def"
    assert run.tobytes() == expected
    assert iovec_bytes(run.iovec()) == expected
    assert len(run) == len(expected)


def test_the_iovec_points_into_rows_that_lie_apart():
    """Pages every third row of RAM: the iovec follows the rows' stride, nothing copied."""
    ram = np.random.default_rng(7).integers(0, 256, size=(30, 64), dtype=np.uint8)
    pages = ram[::3]
    words = np.arange(80, dtype=np.uint8).reshape(10, 8)
    iov = Interleaved(words, pages).iovec()
    assert iov[1, 0] == ram.ctypes.data and iov[3, 0] == ram.ctypes.data + 3 * 64
    assert iovec_bytes(iov) == b"".join(words[i].tobytes() + pages[i].tobytes() for i in range(10))


@pytest.mark.parametrize("first, second, why", [
    (np.zeros((2, 8), np.uint8), np.zeros((3, 8), np.uint8), "do not pair"),
    (np.zeros((2, 8), np.uint16), np.zeros((2, 8), np.uint8), "uint8"),
    (np.zeros((2, 8), np.uint8), np.zeros((2, 16), np.uint8)[:, ::2], "contiguous rows"),
    (np.zeros(8, np.uint8), np.zeros((1, 8), np.uint8), "2-D"),
])
def test_what_cannot_be_a_run_is_refused(first, second, why):
    with pytest.raises(ValueError, match=why):
        Interleaved(first, second)
