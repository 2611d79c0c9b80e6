"""The timeline of one migration on one side: named phases with CLOCK_MONOTONIC ns.

Both the source and the destination record into a :class:`Timeline`; a
finished migration (completed, failed or cancelled) reports it through
``query-migrate`` under ``x-timeline``, and the benchmark puts the two sides
on one clock (they run on one host, so CLOCK_MONOTONIC is shared) to explain
the downtime phase by phase. Recording costs two clock reads per phase and
one small tuple, so it stays on in every migration; hot paths (one phase per
fd message) call :meth:`Timeline.add` with their own clock reads rather than
the :meth:`Timeline.phase` context manager.

The phase names, one vocabulary for both sides (``<idstr>`` is a section's
QEMU idstr, e.g. ``net0/tap``):

source
    ``setup`` (``migrate`` to the end of setup, around ``wait-setup-pong``:
    the destination has read the setup), ``precopy`` (one per iteration),
    ``stop`` (stop requested until no guest thread can touch a backend),
    ``switchover-start``, ``iterable-save`` (the RAM END with the last dirty
    pages), ``device-save`` around one ``save:<idstr>`` per device section,
    ``fds-sent`` (one sendmsg carrying fds), ``ping``, ``wait-pong``,
    ``vmdesc-build`` (the device description built while the destination
    loads), ``commit`` (a point), ``eof`` (EOF and the vmdesc written and
    flushed together), ``wait-resumed``, ``release`` (backends closed, after the resume and
    after total-time), ``rollback`` (a failed or cancelled migration).
    From ``stop`` on they form a :class:`Chain`.
destination
    ``setup`` (waiting for the source), ``ram-prepare:<block>`` (a state
    copy's fresh RAM, allocated), ``wait-data`` (blocked until the channel
    is readable) and ``recv`` (everything it holds drained), outside RAM
    sections; ``parse`` (the reader turning it into events, the handling of
    those inside), ``fds-received`` (one read that brought fds),
    ``load-ram`` (one RAM section, header to footer), ``switchover-start``
    (a point), ``load:<idstr>`` (a device section parsed, its fds claimed),
    ``load-devices`` around one ``post-load:<idstr>`` per device (received
    fds validated and adopted, or the backend re-created), ``pong``, ``eof``
    (a point), ``load-vmdesc`` (the device description read: the guest runs
    only after it, as in QEMU), ``resume`` (to the instant the downtime ends),
    ``vm-start`` (the guest let run, after it), ``resumed-report``.
both
    ``status:<status>`` (a MIGRATION event emitted; its cost is the
    monitor's thread waking up).
Phases that only wait for the other side start with ``wait-``.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

#: A phase that lasts no time (a point event such as "commit") has end_ns == start_ns.
Span = tuple[str, int, int]

#: Bound on the phases one timeline keeps: a migration that would record more
#: (thousands of fd messages) keeps the first ones and counts the rest.
MAX_PHASES = 20_000

#: The name of the phase whose start is a migration's stop (the origin of relative timelines).
STOP_PHASE = "stop"


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

    def __init__(self, max_phases: int = MAX_PHASES) -> None:
        self._spans: list[Span] = []
        self._max = max_phases
        #: phases not kept because the timeline was full
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._spans)

    def add(self, name: str, start_ns: int, end_ns: int | None = None) -> None:
        """Record a phase that already happened (``end_ns`` None: a point event)."""
        if len(self._spans) >= self._max:
            self.dropped += 1
            return
        self._spans.append((name, start_ns, start_ns if end_ns is None else end_ns))

    def mark(self, name: str) -> int:
        """Record a point event now; returns its time."""
        now = time.monotonic_ns()
        self.add(name, now)
        return now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the block as phase ``name``; a phase that raises is recorded up to the raise."""
        start = time.monotonic_ns()
        try:
            yield
        finally:
            self.add(name, start, time.monotonic_ns())

    def chain(self, start_ns: int) -> "Chain":
        """Consecutive phases of one thread from ``start_ns`` on, with no gap between them."""
        return Chain(self, start_ns)

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


class Chain:
    """Phases of one thread that follow each other: each starts where the last one ended.

    What the thread does between two phases (a status event, a fault hook,
    being preempted) then belongs to the next phase instead of to no phase,
    so the chain covers its thread's time without a hole.
    """

    def __init__(self, timeline: Timeline, start_ns: int):
        self.timeline = timeline
        self.last_ns = start_ns

    def lap(self, name: str) -> int:
        """Record ``name`` from the end of the previous phase to now; returns now."""
        now = time.monotonic_ns()
        self.timeline.add(name, self.last_ns, now)
        self.last_ns = now
        return now

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """The block is phase ``name`` (from the end of the previous one), also when it raises."""
        try:
            yield
        finally:
            self.lap(name)


def covered_ns(phases: Iterable[Phase], start_ns: int, end_ns: int) -> int:
    """How much of [start_ns, end_ns] the union of ``phases`` covers (overlaps counted once)."""
    spans = sorted((max(p.start_ns, start_ns), min(p.end_ns, end_ns)) for p in phases)
    total, cur_start, cur_end = 0, 0, None
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


def stop_origin(source: list[Phase]) -> int | None:
    """Where a trial's relative timeline starts: the source's stop, else its first phase."""
    stop = next((p for p in source if p.name == STOP_PHASE), None)
    if stop is not None:
        return stop.start_ns
    return min((p.start_ns for p in source), default=None)


def both_sides(source: list[dict[str, Any]] | None, destination: list[dict[str, Any]] | None,
               origin_ns: int | None = None) -> list[dict[str, Any]]:
    """The ``x-timeline`` of both sides as one list of {side, phase, start_ns, end_ns}.

    Times are ns relative to ``origin_ns`` (default :func:`stop_origin` of the
    source): negative before the stop. Empty when neither side reported one.
    """
    src, dst = Timeline.from_qmp(source), Timeline.from_qmp(destination)
    if origin_ns is None:
        origin_ns = stop_origin(src)
        if origin_ns is None:
            origin_ns = min((p.start_ns for p in dst), default=0)
    return [{"side": side, "phase": p.name, "start_ns": p.start_ns - origin_ns,
             "end_ns": p.end_ns - origin_ns}
            for side, phases in (("source", src), ("destination", dst)) for p in phases]
