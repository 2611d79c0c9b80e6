"""Real QEMU's own account of a migration: its trace lines turned into a two-sided timeline.

QEMU runs with the ``log`` trace backend and ``-msg timestamp=on`` (see
:func:`trace_arguments`), so each trace line on its stderr reads
``TID@SECONDS.MICROSECONDS:EVENT ARGS``; the time is gettimeofday, the clock of
QMP event timestamps, and both processes share it. :func:`parse_trace` reads
those lines and skips everything else (QEMU's own messages, with or without an
ISO time in front); :func:`qemu_timeline` builds from the two sides' events the
phases the benchmark writes into ``timelines.csv``, in ns from the source's stop.

Phases (``side``: ``phase``), where the QEMU has the events:

- source ``stop``, ``iterable-save``, ``device-save``, ``completion``: the
  intervals between the checkpoints ``src-downtime-start``, ``src-vm-stopped``,
  ``src-iterable-saved``, ``src-non-iterable-saved``, ``src-downtime-end``
  (``vmstate_downtime_checkpoint``: QEMU 10.0 has them, 7.2 does not). On 7.2 only
  ``iterable-save`` (from ``savevm_state_complete_precopy`` to the end of the
  last iterable section) and ``device-save`` (first to last device section);
- source ``save:IDSTR`` for every section QEMU saved (``savevm_section_start``
  to ``savevm_section_end``), RAM iterations before the stop included;
- destination ``load:IDSTR`` for every section read, from ``qemu_loadvm_state_section``
  to its ``vmstate_downtime_load`` (10.0, sections of the stop-and-copy), else
  to the next section (its load and any wait for the next bytes);
- destination ``loadvm`` (the first section read after the source's stop to
  ``dst-precopy-loadvm-completed``, on 7.2 to ``loadvm_state_cleanup``), then
  ``bh-wait``, ``announce``, ``vm-start`` between the ``dst-precopy-bh-*``
  checkpoints; the last one ends where the guest runs again;
- ``STOP`` (source) and ``RESUME`` (destination) as points, when the QMP events
  were seen.

The origin is ``src-downtime-start``, else the STOP event, else (7.2 without
events) ``savevm_state_complete_precopy``. :func:`completion_sections` counts the
device sections of the stop-and-copy and :func:`cpr_fds` the fds a cpr-transfer
source hands over (``cpr_save_fd``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Collection, Iterable

SOURCE = "source"
DESTINATION = "destination"

#: the trace events a benchmark QEMU enables (globs; a QEMU enables those it has)
TRACE_EVENTS = ("vmstate_downtime_checkpoint", "vmstate_downtime_load", "savevm_*", "loadvm_state_*",
                "qemu_loadvm_state_section*", "cpr_save_fd", "cpr_delete_fd")

_LINE = re.compile(r"(\d+)@(\d+)\.(\d{1,9}):([A-Za-z0-9_]+)(?: (.*))?$")
_SECTION_START = re.compile(r"(.+), section_id (\d+)$")
_STARTFULL = re.compile(r"(\d+)\((.*)\) (\d+) (\d+)$")
_CPR_FD = re.compile(r"(.*), id (-?\d+)")

#: the intervals between successive checkpoints, by the checkpoint that ends them
SOURCE_CHECKPOINTS = (
    ("src-downtime-start", None),
    ("src-vm-stopped", "stop"),
    ("src-iterable-saved", "iterable-save"),
    ("src-non-iterable-saved", "device-save"),
    ("src-downtime-end", "completion"),
)
DESTINATION_CHECKPOINTS = (
    ("dst-precopy-loadvm-completed", None),
    ("dst-precopy-bh-enter", "bh-wait"),
    ("dst-precopy-bh-announced", "announce"),
    ("dst-precopy-bh-vm-started", "vm-start"),
)
#: RAM's section is iterable in every QEMU, whether or not an iteration ran before the stop
ITERABLE_IDSTRS = frozenset({"ram"})
#: qemu_loadvm_state_section's section types (QEMU_VM_SECTION_*, QEMU_VM_EOF)
_EOF = 0


@dataclass(frozen=True)
class TraceEvent:
    """One trace line: thread id, time (µs since the epoch, gettimeofday), event name, arguments."""

    tid: int
    time_us: int
    name: str
    args: str


def trace_arguments(available: Collection[str]) -> list[str]:
    """QEMU's command-line options for :data:`TRACE_EVENTS`, of those the binary has.

    ``available`` is the list ``-trace help`` prints: a name QEMU lacks would
    earn a warning on its stderr (7.2 has no ``vmstate_downtime_*``).
    """
    out = []
    for pattern in TRACE_EVENTS:
        prefix = pattern.rstrip("*")
        if any(name == pattern or (pattern.endswith("*") and name.startswith(prefix)) for name in available):
            out += ["-trace", f"enable={pattern}"]
    return out + ["-msg", "timestamp=on"]


def parse_trace(text: str) -> list[TraceEvent]:
    """The trace lines of a QEMU's output, in order; other lines are skipped."""
    events = []
    for line in text.splitlines():
        m = _LINE.match(line.strip())
        if m is None:
            continue
        tid, seconds, fraction, name, args = m.groups()
        micros = int(fraction.ljust(6, "0")[:6])
        events.append(TraceEvent(int(tid), int(seconds) * 1_000_000 + micros, name, (args or "").strip()))
    return events


def is_trace_line(line: str) -> bool:
    return _LINE.match(line.strip()) is not None


def checkpoints(events: Iterable[TraceEvent]) -> dict[str, int]:
    """First time (µs) of each ``vmstate_downtime_checkpoint``."""
    seen: dict[str, int] = {}
    for e in events:
        if e.name == "vmstate_downtime_checkpoint":
            seen.setdefault(e.args, e.time_us)
    return seen


def _completion_start_us(source: list[TraceEvent]) -> int | None:
    """Where the source's stop-and-copy began: the checkpoint, else 7.2's complete_precopy."""
    marks = checkpoints(source)
    if "src-vm-stopped" in marks:
        return marks["src-vm-stopped"]
    return next((e.time_us for e in source if e.name == "savevm_state_complete_precopy"), None)


def origin_us(source: list[TraceEvent], stop_us: int | None = None) -> int | None:
    """The timeline's zero: ``src-downtime-start``, else the STOP event, else 7.2's complete_precopy."""
    marks = checkpoints(source)
    if "src-downtime-start" in marks:
        return marks["src-downtime-start"]
    if stop_us is not None:
        return stop_us
    return _completion_start_us(source)


@dataclass(frozen=True)
class SavedSection:
    idstr: str
    section_id: int
    start_us: int
    end_us: int


def saved_sections(source: list[TraceEvent]) -> list[SavedSection]:
    """Every section the source saved (start to end), in order; skipped sections are not saved."""
    out, open_ = [], {}
    for e in source:
        if e.name not in ("savevm_section_start", "savevm_section_end"):
            continue
        m = _SECTION_START.match(e.args.split(" -> ")[0])
        if m is None:
            continue
        idstr, section_id = m.group(1), int(m.group(2))
        if e.name == "savevm_section_start":
            open_[section_id] = (idstr, e.time_us)
        elif section_id in open_:
            name, start = open_.pop(section_id)
            out.append(SavedSection(name, section_id, start, e.time_us))
    return out


def completion_sections(source: list[TraceEvent]) -> tuple[list[SavedSection], list[SavedSection]]:
    """(iterable, device) sections saved since the stop-and-copy began.

    Iterable: RAM, and whatever was saved by an iteration before; every other
    section saved in the completion is a device's (non-iterable) state.
    """
    begin = _completion_start_us(source)
    if begin is None:
        return [], []
    sections = saved_sections(source)
    iterable = ITERABLE_IDSTRS | {s.idstr for s in sections if s.start_us < begin}
    done = [s for s in sections if s.start_us >= begin]
    return [s for s in done if s.idstr in iterable], [s for s in done if s.idstr not in iterable]


def cpr_fds(source: list[TraceEvent]) -> int:
    """How many fds the source's cpr state holds (``cpr_save_fd`` not undone by ``cpr_delete_fd``)."""
    saved: set[tuple[str, str]] = set()
    for e in source:
        m = _CPR_FD.match(e.args)
        if m is None:
            continue
        if e.name == "cpr_save_fd":
            saved.add(m.groups())
        elif e.name == "cpr_delete_fd":
            saved.discard(m.groups())
    return len(saved)


def _loaded_sections(destination: list[TraceEvent]) -> list[tuple[str, int, int]]:
    """(idstr, start, end) per section read by the destination; EOF ends the last one."""
    names: dict[int, str] = {}
    out: list[tuple[str, int, int]] = []
    current: tuple[str, int] | None = None
    start_us: int | None = None
    for e in destination:
        if e.name == "qemu_loadvm_state_section":
            if current is not None:
                out.append((current[0], current[1], e.time_us))
                current = None
            start_us = e.time_us
            if e.args.strip() == str(_EOF):
                start_us = None
        elif e.name == "qemu_loadvm_state_section_startfull" and start_us is not None:
            m = _STARTFULL.match(e.args)
            if m is not None:
                names[int(m.group(1))] = m.group(2)
                current = (m.group(2), start_us)
        elif e.name == "qemu_loadvm_state_section_partend" and start_us is not None:
            section_id = int(e.args.split()[0]) if e.args.split() else -1
            current = (names.get(section_id, f"section {section_id}"), start_us)
        elif e.name in ("vmstate_downtime_load", "loadvm_state_cleanup", "vmstate_downtime_checkpoint") \
                and current is not None:
            out.append((current[0], current[1], e.time_us))
            current = None
    return out


def qemu_timeline(source: list[TraceEvent], destination: list[TraceEvent], *,
                  stop_us: int | None = None, resume_us: int | None = None) -> list[dict[str, Any]]:
    """The phases of one QEMU migration, ns relative to the source's stop (see the module docstring).

    ``stop_us`` and ``resume_us`` are the STOP and RESUME events' times (µs),
    when known. Empty when nothing gives an origin.
    """
    zero = origin_us(source, stop_us)
    if zero is None:
        return []
    phases: list[dict[str, Any]] = []

    def add(side: str, phase: str, start_us: int, end_us: int) -> None:
        phases.append({"side": side, "phase": phase, "start_ns": (start_us - zero) * 1000,
                       "end_ns": (end_us - zero) * 1000})

    src_marks = checkpoints(source)
    _between(add, SOURCE, src_marks, SOURCE_CHECKPOINTS)
    if "src-vm-stopped" not in src_marks:
        # 7.2: no checkpoints; the completion's sections say where saving went
        begin = _completion_start_us(source)
        iterables, devices = completion_sections(source)
        if begin is not None and iterables:
            add(SOURCE, "iterable-save", begin, iterables[-1].end_us)
        if devices:
            add(SOURCE, "device-save", devices[0].start_us, devices[-1].end_us)
    for s in saved_sections(source):
        add(SOURCE, f"save:{s.idstr}", s.start_us, s.end_us)

    dst_marks = checkpoints(destination)
    loads = _loaded_sections(destination)
    loadvm_end = dst_marks.get("dst-precopy-loadvm-completed") or next(
        (e.time_us for e in destination if e.name == "loadvm_state_cleanup" and e.time_us >= zero), None)
    # the load of the stop-and-copy: its first section, or (no section events) the setup
    begins = [start for _, start, _ in loads if start >= zero] + [
        e.time_us for e in destination if e.name == "loadvm_state_setup" and e.time_us >= zero]
    if loadvm_end is not None and begins and min(begins) <= loadvm_end:
        add(DESTINATION, "loadvm", min(begins), loadvm_end)
    _between(add, DESTINATION, dst_marks, DESTINATION_CHECKPOINTS)
    for idstr, start, end in loads:
        add(DESTINATION, f"load:{idstr}", start, end)

    if stop_us is not None:
        add(SOURCE, "STOP", stop_us, stop_us)
    if resume_us is not None:
        add(DESTINATION, "RESUME", resume_us, resume_us)
    phases.sort(key=lambda p: (p["start_ns"], p["end_ns"]))
    return phases


def _between(add, side: str, marks: dict[str, int], order: tuple[tuple[str, str | None], ...]) -> None:
    """A phase from each checkpoint to the next one of ``order`` that both were seen."""
    previous: int | None = None
    for name, phase in order:
        at = marks.get(name)
        if at is not None and previous is not None and phase is not None:
            add(side, phase, previous, at)
        previous = at
