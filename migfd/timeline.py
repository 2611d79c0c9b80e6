"""The timeline of one migration on one side: named phases with CLOCK_MONOTONIC ns.

Both the source and the destination record into a :class:`Timeline`; a
completed migration reports it through ``query-migrate`` under
``x-timeline``, and the benchmark puts the two sides on one clock (they run
on one host, so CLOCK_MONOTONIC is shared) to explain the downtime phase by
phase. Recording costs two clock reads per phase and no allocation beyond a
small tuple, so it stays on in every migration.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

#: A phase that lasts no time (a point event such as "commit") has end_ns == start_ns.
Span = tuple[str, int, int]


@dataclass(frozen=True)
class Phase:
    """One recorded phase: ``name`` ran from ``start_ns`` to ``end_ns`` (CLOCK_MONOTONIC)."""

    name: str
    start_ns: int
    end_ns: int

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns


class Timeline:
    """Phases of one side of one migration, in the order they started."""

    def __init__(self) -> None:
        self._spans: list[Span] = []

    def add(self, name: str, start_ns: int, end_ns: int | None = None) -> None:
        """Record a phase that already happened (``end_ns`` None: a point event)."""
        self._spans.append((name, start_ns, start_ns if end_ns is None else end_ns))

    def mark(self, name: str) -> int:
        """Record a point event now; returns its time."""
        now = time.monotonic_ns()
        self._spans.append((name, now, now))
        return now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the block as phase ``name``; a phase that raises is recorded up to the raise."""
        start = time.monotonic_ns()
        try:
            yield
        finally:
            self._spans.append((name, start, time.monotonic_ns()))

    def phases(self) -> list[Phase]:
        return [Phase(*span) for span in sorted(self._spans, key=lambda s: (s[1], s[2]))]

    def first(self, name: str) -> Phase | None:
        return next((p for p in self.phases() if p.name == name), None)

    def to_qmp(self) -> list[dict[str, Any]]:
        """The phases as query-migrate returns them under ``x-timeline``."""
        return [{"phase": p.name, "start-ns": p.start_ns, "end-ns": p.end_ns} for p in self.phases()]

    @staticmethod
    def from_qmp(entries: list[dict[str, Any]] | None) -> list[Phase]:
        return [Phase(e["phase"], int(e["start-ns"]), int(e["end-ns"])) for e in entries or ()]


def covered_ns(phases: list[Phase], start_ns: int, end_ns: int) -> int:
    """How much of [start_ns, end_ns] the union of ``phases`` covers (overlaps counted once)."""
    spans = sorted((max(p.start_ns, start_ns), min(p.end_ns, end_ns)) for p in phases)
    total, cur_start, cur_end = 0, None, None
    for s, e in spans:
        if e <= s:
            continue
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = s, e
        else:
            cur_end = max(cur_end, e)
    if cur_end is not None:
        total += cur_end - cur_start
    return total
