"""How many trials a point gets: the planned ones, then more until its median is known well enough.

A scenario plans its trials in groups: the modes measured at one point
(one RAM size and live flag, one fd count, ...) alternate trial by trial.
When a group's planned trials are done, :class:`Schedule` looks at each of
its points (mode, variant, QEMU version): if the 95% interval of a point's
median downtime (:func:`migfd.stats.median_ci`) is wider than ±10% of the
median, the whole group gets one more round (every mode once, the order
reversed on odd trials, as planned rounds are), and so on until every point
is precise, the group reaches its cap, or another round would not fit in the
group's share of the scenario's extra time: what is left of the budget,
split evenly among the groups not yet decided, a round costing what the
group's rounds so far cost on average. So no group starves the ones after it,
and a round of 4 GiB trials is only added when there is time for it. Each
point's outcome is recorded: the trials it took and why it stopped
(``precise``, ``cap``, ``budget``; ``fixed`` when trials were set with
``--trials`` or ``--quick``).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from typing import Any, Iterable

from migfd.bench.scenario import BenchContext, TrialSpec
from migfd.stats import median_ci, relative_half_width
from migfd.units import GiB

#: a point is precise when its median's 95% interval is within ± this share of the median
TARGET_HALF_WIDTH = 0.10
#: extra wall-clock seconds one scenario may spend beyond its planned trials (``make report``
#: must stay under 15 minutes on 2 cores)
EXTRA_BUDGET_S = 12.0


def trial_cap(spec: TrialSpec, planned: int) -> int:
    """The most trials a point of ``spec``'s group may get: cheap points more, big RAM fewer."""
    size = spec.ram_bytes or 0
    if size >= 4 * GiB:
        cap = 4  # ~15 s per trial of filling, copying and verifying RAM
    elif size >= 1 * GiB:
        cap = 8
    else:
        cap = 15
    return max(cap, planned)


def group_of(spec: TrialSpec) -> tuple:
    """The trials that alternate with each other: everything but the mode, variant and trial number."""
    return (spec.scenario, spec.backend, spec.ram_bytes, spec.n_fds, spec.live, spec.dirty_rate_bytes_s)


def _row_group(row: dict) -> tuple:
    return (row.get("scenario"), row.get("backend"), row.get("ram_bytes"), row.get("n_fds"), row.get("live"),
            row.get("dirty_rate_bytes_s"))


def _point(row: dict) -> tuple:
    return (row.get("mode"), row.get("variant") or "", row.get("peer_version") or "")


def _metric(row: dict) -> float | None:
    """A row's downtime as the figures use it: QEMU's STOP→RESUME where a row has it."""
    value = row.get("stop_resume_ns") or row.get("downtime_ns")
    return float(value) if value not in (None, "") and row.get("ok") else None


class Schedule:
    """The trials of one scenario in order, grown group by group; see the module docstring."""

    def __init__(self, specs: Iterable[TrialSpec], ctx: BenchContext, *, adaptive: bool):
        self.queue: deque[TrialSpec] = deque(specs)
        self.ctx = ctx
        self.adaptive = adaptive
        self.total = len(self.queue)
        self.last: TrialSpec | None = None
        self.first_round: dict[tuple, list[TrialSpec]] = {}
        self.planned: dict[tuple, int] = {}
        for spec in self.queue:
            g = group_of(spec)
            self.planned[g] = max(self.planned.get(g, 0), spec.trial + 1)
            if spec.trial == 0:
                self.first_round.setdefault(g, []).append(spec)
        self.trials = dict(self.planned)
        self.reasons: dict[tuple, str] = {}
        #: extra seconds spent by the whole scenario, and when the current extra round began
        self.extra_s = 0.0
        self._extra_since: float | None = None
        #: when each group's first trial was handed out (its rounds' average cost)
        self.started: dict[tuple, float] = {}

    def group_done(self) -> bool:
        """Whether the next spec starts another group (or none is left): the rows so far must be in
        before :meth:`next` can decide whether this group needs another round."""
        return self.last is not None and (not self.queue or group_of(self.queue[0]) != group_of(self.last))

    def next(self) -> TrialSpec | None:
        """The next trial to run, after adding a round to the group just finished if it needs one."""
        if self.group_done() and group_of(self.last) not in self.reasons:  # type: ignore[arg-type]
            assert self.last is not None
            self._decide(group_of(self.last))
        if not self.queue:
            return None
        self.last = self.queue.popleft()
        self.started.setdefault(group_of(self.last), time.monotonic())
        return self.last

    def _points(self, group: tuple) -> dict[tuple, list[float]]:
        points: dict[tuple, list[float]] = {}
        for row in self.ctx.rows:
            if _row_group(row) == group:
                value = _metric(row)
                values = points.setdefault(_point(row), [])
                if value is not None:
                    values.append(value)
        return points

    def _decide(self, group: tuple) -> None:
        if self._extra_since is not None:
            self.extra_s += time.monotonic() - self._extra_since
            self._extra_since = None
        if not self.adaptive:
            self.reasons[group] = "fixed"
            return
        # points whose every trial failed cannot get more precise; more trials of them would only fail
        measured = [v for v in self._points(group).values() if v]
        if all(relative_half_width(median_ci(v)) <= TARGET_HALF_WIDTH for v in measured):
            self.reasons[group] = "precise"
            return
        first = self.first_round.get(group) or []
        if not first or self.trials[group] >= trial_cap(first[0], self.planned[group]):
            self.reasons[group] = "cap"
            return
        undecided = len(self.planned) - len(self.reasons)  # this group included
        share = (EXTRA_BUDGET_S - self.extra_s) / max(undecided, 1)
        round_s = (time.monotonic() - self.started[group]) / self.trials[group]
        if round_s >= share:
            self.reasons[group] = "budget"
            return
        trial = self.trials[group]
        self.trials[group] = trial + 1
        order = first if trial % 2 == 0 else list(reversed(first))
        self.queue.extendleft(reversed([replace(spec, trial=trial) for spec in order]))
        self.total += len(order)
        self._extra_since = time.monotonic()

    def report(self) -> list[dict[str, Any]]:
        """Per point: how many trials it took (failed ones included), how precise it got, why it stopped."""
        out = []
        for group, reason in self.reasons.items():
            scenario, backend, ram_bytes, n_fds, live, _ = group
            counts: dict[tuple, int] = {}
            for row in self.ctx.rows:
                if _row_group(row) == group:
                    counts[_point(row)] = counts.get(_point(row), 0) + 1
            points = self._points(group)
            for point, n in counts.items():
                mode, variant, version = point
                width = relative_half_width(median_ci(points.get(point) or []))
                precise = width <= TARGET_HALF_WIDTH
                out.append({"mode": mode, "variant": variant, "peer_version": version, "backend": backend,
                            "ram_bytes": ram_bytes, "n_fds": n_fds, "live": live, "trials": n,
                            "half_width": None if width != width else round(width, 4),
                            "reason": "precise" if precise and reason != "fixed" else reason})
        return out
