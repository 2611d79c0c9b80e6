"""Runs of records laid out as two arrays, for a gathering write with no Python object per record.

A run of QEMU's page records is, in memory, k eight-byte record words and k
pages of guest RAM; on the wire they alternate (word 0, page 0, word 1, ...).
:class:`Interleaved` names such a run without building a buffer per record:
the writer hands it to its sink, and a channel turns it into an iovec array
(addresses and lengths, computed by numpy), of which the kernel takes
IOV_MAX a call. A sink that only takes plain bytes asks :meth:`Interleaved.tobytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interleaved:
    """The bytes ``first[0], second[0], first[1], second[1], ...``: two (k, ·) uint8 arrays.

    Each row must be contiguous; the rows may lie anywhere (a view of guest
    RAM, rows 4096 bytes apart). The arrays are the memory the iovec points
    into: whoever sends it keeps this object until the write returns.
    """

    first: np.ndarray
    second: np.ndarray

    def __post_init__(self) -> None:
        for a in (self.first, self.second):
            if a.dtype != np.uint8 or a.ndim != 2 or (a.shape[1] > 1 and a.strides[1] != 1):
                raise ValueError("an Interleaved run takes 2-D uint8 arrays with contiguous rows")
        if len(self.first) != len(self.second):
            raise ValueError(f"{len(self.first)} rows do not pair with {len(self.second)}")

    def __len__(self) -> int:
        return self.first.size + self.second.size

    def tobytes(self) -> bytes:
        return np.hstack([self.first, self.second]).tobytes()

    def iovec(self) -> np.ndarray:
        """(2k, 2) uint64: the address and length of each row, in wire order (struct iovec)."""
        k = len(self.first)
        iov = np.empty((2 * k, 2), dtype=np.uint64)
        rows = np.arange(k, dtype=np.uint64)
        for column, a in enumerate((self.first, self.second)):
            iov[column::2, 0] = np.uint64(a.ctypes.data) + rows * np.uint64(a.strides[0])
            iov[column::2, 1] = a.shape[1]
        return iov
