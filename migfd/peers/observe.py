"""Guest progress seen from outside: an observer that does not share the migration's fate.

A guest that runs bumps a u32 counter at a fixed guest address (0x7000 for
migfd's guests and for the counting ``-bios`` guest run by real QEMU). The
observer maps the guest RAM from another process -- a migfd VM's memfd
through ``/proc/PID/fd/N``, QEMU's ``memory-backend-file`` on /dev/shm --
and reads the counter every ``period``; when it stops changing the guest is
not running, wherever it lives. With state copy the destination has RAM of
its own, found by its pid once it appears, so the observer watches both.

What it reports is a list of :class:`Silence`: from the last sample that saw
progress to the first that saw it again. Two rules keep the observer honest:

* **progress is sustained change.** A destination that receives the
  counter's page writes it once or twice (the last precopy pass, the final
  stage), while nothing runs; a running guest changes it in every sample
  interval. A change counts as progress only inside a run of
  :data:`SUSTAINED_INTERVALS` intervals in which the same counter changed
  every time.
* **the observer's own gaps are its own.** It sleeps between samples (it
  must not take a core from the VMs) at real-time priority where allowed,
  and records every interval in which it woke late (:class:`OwnGaps`); a
  silence that holds such a gap says how much of it may be the observer's.

The same two ideas serve the clients of the backends (the chardev client, the
TAP probe): :func:`echo_silence` is the silence an echo stream shows around
the switchover (by the rule of the guest's outage), apart from its longest
silence of the trial.

``migfd observe`` runs :func:`main` in its own process; the benchmark starts
it with :class:`ObserverProcess`.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import select
import signal
import struct
import subprocess
import sys
import time
from array import array
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from migfd import threads
from migfd.layout import GUEST_PROGRESS_ADDR
#: consecutive sample intervals a counter must change in for that to be the guest running
SUSTAINED_INTERVALS = 3
#: default time between two samples of the counter
DEFAULT_PERIOD_NS = 100_000
#: a silence shorter than this is not reported (sampling jitter)
DEFAULT_MIN_SILENCE_NS = 400_000
#: priority of the observer's sampling thread when SCHED_FIFO is allowed
OBSERVER_RT_PRIORITY = 10
#: how often the observer looks for a target that has not appeared yet
RESOLVE_INTERVAL_NS = 5_000_000
#: an observer woke late when an interval exceeded its period by this much
OWN_GAP_SLACK_NS = 300_000


def realtime(priority: int = OBSERVER_RT_PRIORITY) -> bool:
    """Put the calling thread under SCHED_FIFO; False where that is not allowed.

    An observer that sleeps between samples and runs at real-time priority
    wakes on time even when both cores are busy with the VMs.
    """
    return threads.realtime(priority)


#: the GIL switch interval of a process whose observer thread shares the interpreter
OBSERVER_SWITCH_INTERVAL_S = 0.0002


def prompt_gil() -> None:
    """Lower the interpreter's switch interval for an observer thread that shares it.

    A thread woken by the kernel waits for the GIL up to the switch interval
    (5 ms by default) while another thread of the process (a QMP client, the
    benchmark's event loop) computes: the observer would blame the guest.
    """
    sys.setswitchinterval(min(sys.getswitchinterval(), OBSERVER_SWITCH_INTERVAL_S))


@dataclass
class OwnGaps:
    """Intervals in which an observer itself did not run when it should have.

    ``note(prev_ns, now_ns)`` is called at each wake-up with the previous
    one; an interval longer than ``limit_ns`` is recorded.
    """

    limit_ns: int
    gaps: list[tuple[int, int]] = field(default_factory=list)

    def note(self, prev_ns: int, now_ns: int) -> None:
        if now_ns - prev_ns > self.limit_ns:
            self.gaps.append((prev_ns, now_ns))

    def within(self, start_ns: int, end_ns: int) -> int:
        """The longest own gap overlapping ``start_ns``..``end_ns`` (its overlapping part), 0 if none."""
        longest = 0
        for a, b in self.gaps:
            overlap = min(b, end_ns) - max(a, start_ns)
            longest = max(longest, overlap)
        return longest


@dataclass(frozen=True)
class Silence:
    """No progress from ``start_ns`` (the last progress seen) to ``end_ns`` (the first seen again)."""

    start_ns: int
    end_ns: int
    #: the longest interval inside it in which the observer itself did not run (0: none)
    own_gap_ns: int = 0

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @property
    def own(self) -> bool:
        """The observer itself stalled inside this silence: it may be the observer's, not the guest's."""
        return self.own_gap_ns > 0

    def overlaps(self, start_ns: int, end_ns: int) -> bool:
        return self.start_ns < end_ns and start_ns < self.end_ns


def progress_times(times_ns: np.ndarray, values: np.ndarray, sustained: int = SUSTAINED_INTERVALS,
                   own_limit_ns: int | None = None) -> np.ndarray:
    """Sample times at which some counter made sustained progress (see the module docstring).

    ``values`` is (samples, counters), -1 where a counter could not be read
    (its RAM had not appeared yet). Sample ``k`` shows progress on a counter
    when it changed since sample ``k-1`` inside a run of ``sustained``
    consecutive changes of that counter. An interval longer than
    ``own_limit_ns`` (the observer did not run) is no evidence of progress:
    what happened inside it is unknown, so a silence spans it, marked as the
    observer's own.
    """
    times_ns = np.asarray(times_ns, dtype=np.int64)
    values = np.asarray(values, dtype=np.int64)
    if values.ndim == 1:
        values = values[:, None]
    n = len(times_ns)
    if n < 2:
        return times_ns[:0]
    readable = values >= 0
    changed = np.zeros(values.shape, dtype=np.int64)
    changed[1:] = (values[1:] != values[:-1]) & readable[1:] & readable[:-1]
    if own_limit_ns is not None:
        changed[1:][np.diff(times_ns) > own_limit_ns] = 0
    # runs: a window of ``sustained`` samples that all changed marks every one of them
    csum = np.vstack([np.zeros((1, changed.shape[1]), dtype=np.int64), np.cumsum(changed, axis=0)])
    full = (csum[sustained:] - csum[:-sustained]) == sustained  # window starting at k
    progress = np.zeros(changed.shape, dtype=bool)
    for offset in range(sustained):
        progress[offset:offset + len(full)] |= full
    return times_ns[progress.any(axis=1)]


def silences_between(progress_ns: np.ndarray, min_silence_ns: int, own: OwnGaps | None = None) -> list[Silence]:
    """Every gap of at least ``min_silence_ns`` between consecutive progress times."""
    arr = np.asarray(progress_ns, dtype=np.int64)
    if len(arr) < 2:
        return []
    out = []
    for k in np.flatnonzero(np.diff(arr) >= min_silence_ns):
        a, b = int(arr[k]), int(arr[k + 1])
        out.append(Silence(a, b, own.within(a, b) if own is not None else 0))
    return out


def echo_silence(arrivals_ns: Sequence[int], stop_ns: int, resume_ns: int,
                 own: OwnGaps | None = None) -> Silence | None:
    """What a client of a backend saw around a switchover: its longest silence between two
    echoes that overlaps the reported pause (``stop_ns``..``resume_ns``), the rule of
    :func:`switchover_outage`; None without echoes on both sides of the pause.

    The stop is asked at ``stop_ns`` but the backends stop only after the vCPUs:
    an echo that arrives in between is one the client had, and the silence
    it saw starts there, not at the last echo before the request.
    """
    arr = np.sort(np.asarray(arrivals_ns, dtype=np.int64))
    if not len(arr) or arr[0] > stop_ns or arr[-1] < resume_ns:
        return None
    starts, ends = arr[:-1], arr[1:]
    over = (starts < resume_ns) & (ends > stop_ns)
    if not over.any():
        return None
    i = int(np.flatnonzero(over)[np.argmax((ends - starts)[over])])
    a, b = int(starts[i]), int(ends[i])
    return Silence(a, b, own.within(a, b) if own is not None else 0)


def switchover_outage(silences: Iterable[Silence], window: tuple[int, int]) -> Silence | None:
    """The silence of the switchover: the longest that overlaps ``window``.

    ``window`` is the pause the VMs report (migfd: the source's stop, taken
    when the stop is asked, to the resume; QEMU: its STOP to its RESUME
    event) where it is known, else the whole migration: the guest cannot run
    inside it, so its outage is the silence around it.
    """
    inside = [s for s in silences if s.overlaps(*window)]
    return max(inside, key=lambda s: s.duration_ns, default=None)


def longest_before(silences: Iterable[Silence], start_ns: int, end_ns: int) -> Silence | None:
    """The longest silence that lies inside ``start_ns``..``end_ns`` (precopy: migrate to the switchover)."""
    inside = [s for s in silences if s.start_ns >= start_ns and s.end_ns <= end_ns]
    return max(inside, key=lambda s: s.duration_ns, default=None)


# --------------------------------------------------------------------------
# Where the counter is
# --------------------------------------------------------------------------


@dataclass
class Target:
    """One counter to watch: a file (a RAM file, or ``/proc/PID/fd/N``) or the memfd
    named ``memfd`` that process ``pid`` will hold (a state-copy destination creates
    its RAM only when the migration starts)."""

    label: str
    offset: int = GUEST_PROGRESS_ADDR
    path: str | None = None
    pid: int | None = None
    memfd: str | None = None
    _map: mmap.mmap | None = None
    _in_page: int = 0
    _next_try_ns: int = 0

    @classmethod
    def parse(cls, text: str, offset: int) -> "Target":
        """``PATH`` or ``pid:PID[:MEMFD_NAME]`` (the name defaults to migfd's ``migfd-ram0``)."""
        if text.startswith("pid:"):
            parts = text.split(":")
            if not parts[1].isdigit():
                raise ValueError(f"'{text}': pid:PID[:MEMFD_NAME]")
            name = parts[2] if len(parts) > 2 else "migfd-ram0"
            return cls(label=text, offset=offset, pid=int(parts[1]), memfd=name)
        return cls(label=text, offset=offset, path=text)

    def _locate(self) -> str | None:
        if self.path is not None:
            return self.path
        base = f"/proc/{self.pid}/fd"
        try:
            names = os.listdir(base)
        except OSError:
            return None
        for name in names:
            try:
                if os.readlink(f"{base}/{name}").startswith(f"/memfd:{self.memfd} "):
                    return f"{base}/{name}"
            except OSError:
                continue
        return None

    def read(self, now_ns: int) -> int:
        """The counter now, or -1 while its RAM cannot be mapped."""
        if self._map is None:
            if now_ns < self._next_try_ns:
                return -1
            self._next_try_ns = now_ns + RESOLVE_INTERVAL_NS
            self._map = self._open()
            if self._map is None:
                return -1
        return struct.unpack_from("<I", self._map, self._in_page)[0]

    def _open(self) -> mmap.mmap | None:
        path = self._locate()
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size < self.offset + 4:
                return None
            # One page mapped read-only: the observer's view of the guest, no more.
            page = self.offset & ~(mmap.PAGESIZE - 1)
            m = mmap.mmap(fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
            self._in_page = self.offset - page
            return m
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


# --------------------------------------------------------------------------
# The sampling loop
# --------------------------------------------------------------------------


@dataclass
class Observation:
    """What one observer recorded: its samples, its own gaps, what it could rely on."""

    targets: list[str]
    period_ns: int
    realtime: bool
    times_ns: np.ndarray
    values: np.ndarray
    own: OwnGaps

    def silences(self, min_silence_ns: int = DEFAULT_MIN_SILENCE_NS) -> list[Silence]:
        progress = progress_times(self.times_ns, self.values, own_limit_ns=self.own.limit_ns)
        return silences_between(progress, min_silence_ns, self.own)

    def resolution(self) -> dict[str, int]:
        """The sampling intervals it really achieved (ns): median, 99th percentile, longest."""
        if len(self.times_ns) < 2:
            return {"median_ns": 0, "p99_ns": 0, "max_ns": 0}
        d = np.diff(self.times_ns)
        return {"median_ns": int(np.median(d)), "p99_ns": int(np.percentile(d, 99)), "max_ns": int(d.max())}

    def to_json(self, min_silence_ns: int = DEFAULT_MIN_SILENCE_NS) -> dict[str, Any]:
        return {
            "targets": self.targets, "period_ns": self.period_ns, "realtime": self.realtime,
            "samples": int(len(self.times_ns)),
            "first_ns": int(self.times_ns[0]) if len(self.times_ns) else None,
            "last_ns": int(self.times_ns[-1]) if len(self.times_ns) else None,
            "resolution": self.resolution(), "min_silence_ns": min_silence_ns,
            "own_gaps": [list(g) for g in self.own.gaps],
            "silences": [asdict(s) for s in self.silences(min_silence_ns)],
        }


def observe(targets: list[Target], period_ns: int = DEFAULT_PERIOD_NS, *, until=None,
            on_silence=None, min_silence_ns: int = DEFAULT_MIN_SILENCE_NS) -> Observation:
    """Sample every target each ``period_ns`` until ``until()`` is true (or SIGINT/SIGTERM).

    ``on_silence(Silence)`` is called as soon as a silence has ended (the live
    view of ``migfd observe``); the returned :class:`Observation` is analysed
    afterwards with the same rules.
    """
    rt = realtime()
    own = OwnGaps(period_ns + OWN_GAP_SLACK_NS)
    # Compact arrays, 8 bytes a number: an observer left running for an hour at
    # 10,000 samples a second keeps them all (lists of ints took ~2 GB in 15 minutes).
    times = array("q")
    values = array("q")
    last = [-1] * len(targets)
    run = [0] * len(targets)  # consecutive intervals each counter changed in
    last_progress: int | None = None
    next_ns = time.monotonic_ns()
    prev = next_ns
    try:
        while until is None or not until():
            now = time.monotonic_ns()
            row = [t.read(now) for t in targets]
            own.note(prev, now)
            prev = now
            times.append(now)
            values.extend(row)
            progress = False
            for i, v in enumerate(row):
                run[i] = run[i] + 1 if v >= 0 and last[i] >= 0 and v != last[i] else 0
                if run[i] >= SUSTAINED_INTERVALS:
                    progress = True
                last[i] = v
            if progress:
                # the run began SUSTAINED_INTERVALS - 1 samples ago: that is when the guest ran again
                began = times[-SUSTAINED_INTERVALS] if len(times) >= SUSTAINED_INTERVALS else now
                if (on_silence is not None and last_progress is not None
                        and began - last_progress >= min_silence_ns):
                    on_silence(Silence(last_progress, began, own.within(last_progress, began)))
                last_progress = now
            next_ns += period_ns
            delay = next_ns - time.monotonic_ns()
            if delay > 0:
                time.sleep(delay / 1e9)
            else:
                next_ns = time.monotonic_ns()  # late (noted as an own gap): do not burst
    except KeyboardInterrupt:
        pass
    finally:
        for t in targets:
            t.close()
    return Observation([t.label for t in targets], period_ns, rt,
                       np.frombuffer(times, dtype=np.int64),
                       np.frombuffer(values, dtype=np.int64).reshape(len(times), len(targets)), own)


# --------------------------------------------------------------------------
# ``migfd observe`` and the benchmark's handle on it
# --------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="+", metavar="RAM",
                   help="guest RAM holding the counter: a file (/dev/shm/..., /proc/PID/fd/N) "
                        "or pid:PID[:MEMFD_NAME] for a memfd that process holds or will hold")
    p.add_argument("--addr", type=lambda s: int(s, 0), default=GUEST_PROGRESS_ADDR,
                   help=f"guest address of the u32 progress counter (default {GUEST_PROGRESS_ADDR:#x})")
    p.add_argument("--period-us", type=float, default=DEFAULT_PERIOD_NS / 1000,
                   help="time between samples (default %(default)s)")
    p.add_argument("--min-silence-us", type=float, default=DEFAULT_MIN_SILENCE_NS / 1000,
                   help="report silences at least this long (default %(default)s)")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until SIGINT/SIGTERM)")
    p.add_argument("--json", metavar="FILE", help="write every sample's analysis as JSON ('-': stdout)")


def main(args: argparse.Namespace) -> int:
    """``migfd observe``: print each outage of the guest as it happens; JSON at the end when asked."""
    targets = []
    for text in args.targets:
        try:
            targets.append(Target.parse(text, args.addr))
        except ValueError as exc:
            print(f"migfd observe: error: {exc}", file=sys.stderr)
            return 2
    min_silence = int(args.min_silence_us * 1000)
    live = args.json != "-"

    def show(s: Silence) -> None:
        mark = f" (observer itself stalled {s.own_gap_ns / 1e6:.2f} ms inside)" if s.own else ""
        print(f"outage {s.duration_ns / 1e6:8.3f} ms  from {s.start_ns} to {s.end_ns} ns "
              f"(CLOCK_MONOTONIC){mark}", flush=True)

    end = None if args.duration is None else time.monotonic() + args.duration
    if live:
        print(f"observing {', '.join(args.targets)} at {args.addr:#x} every {args.period_us:g} us; "
              "Ctrl-C ends", flush=True)
    else:
        print(json.dumps({"observing": args.targets, "pid": os.getpid()}), flush=True)  # ObserverProcess waits for it
    obs = observe(targets, int(args.period_us * 1000), min_silence_ns=min_silence,
                  until=(lambda: time.monotonic() >= end) if end is not None else None,
                  on_silence=show if live else None)
    if live:
        res = obs.resolution()
        print(f"{len(obs.times_ns)} samples, interval median {res['median_ns'] / 1e3:.0f} us, "
              f"longest {res['max_ns'] / 1e3:.0f} us; real-time priority "
              f"{'granted' if obs.realtime else 'refused'}", flush=True)
    if args.json:
        text = json.dumps(obs.to_json(min_silence))
        if args.json == "-":
            print(text, flush=True)
        else:
            with open(args.json, "w") as f:
                f.write(text)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop_on_sigterm() -> None:
    """SIGTERM ends an observation as Ctrl-C does: the analysis is still written."""
    signal.signal(signal.SIGTERM, _interrupt)


def _main() -> int:
    stop_on_sigterm()
    parser = argparse.ArgumentParser(prog="migfd observe", description=main.__doc__)
    add_arguments(parser)
    return main(parser.parse_args())



class ObserverProcess:
    """``migfd observe`` in a process of its own, started by the benchmark before a migration.

    Stop it with :meth:`stop`, which returns its JSON analysis.
    """

    def __init__(self, targets: list[str], *, period_ns: int = DEFAULT_PERIOD_NS,
                 min_silence_ns: int = DEFAULT_MIN_SILENCE_NS, addr: int = GUEST_PROGRESS_ADDR):
        self.argv = [sys.executable, "-m", "migfd.peers.observe", *targets, "--addr", hex(addr),
                     "--period-us", str(period_ns / 1000), "--min-silence-us", str(min_silence_ns / 1000),
                     "--json", "-"]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        """Start it and wait until it samples (it says so on its first line)."""
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        line = self.proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
        if not line.startswith('{"observing"'):
            self.kill()
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"observer did not start: {line.strip() or err.strip()[-300:] or 'no answer'}")

    def stop(self, timeout_s: float = 10.0) -> dict[str, Any]:
        """End the observation and return its analysis; RuntimeError when it has none."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            out, err = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        if self.proc.returncode != 0 or not out.strip():
            raise RuntimeError(f"observer exited with {self.proc.returncode}: {err.strip()[-300:]}")
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def silences_of(report: dict[str, Any]) -> list[Silence]:
    """The silences of an observer's JSON report."""
    return [Silence(**s) for s in report.get("silences", [])]


if __name__ == "__main__":  # the benchmark starts it so: no CLI, no VM stack to import
    sys.exit(_main())
