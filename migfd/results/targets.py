"""The performance targets (issues 4 and 9): each a figure measured in one run against a threshold.

Every verdict compares the run with itself (a floor or another mode measured
in the same run, at the same size), and is taken on the 95% interval of the
figure (:mod:`migfd.stats`): ``pass`` only when the whole interval is on the
right side of the threshold, ``fail`` when all of it is on the wrong side,
``inconclusive`` when the trials cannot tell, ``not-measured`` (with the reason,
from the run's metadata) when the run has nothing to compare. A target judged
at several points (live and non-live, several sizes) passes only where every
point passes; the figure shown is the worst point's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pandas as pd

from migfd.peers.observe import DEFAULT_MIN_SILENCE_NS
from migfd.results.describe import scenario_info, why_absent
from migfd.results.load import select
from migfd.results.summary import (
    fmt_bytes,
    fmt_interval,
    fmt_ns,
    fmt_rate,
    live_label,
    median_of,
    mode_label,
    qemu_downtime,
    qemu_has_events,
    throughput,
)
from migfd.stats import (
    FAIL,
    INCONCLUSIVE,
    NOT_MEASURED,
    PASS,
    UNKNOWN,
    Interval,
    bootstrap_ci,
    clean,
    combine_verdicts,
    median_ci,
    median_ci_any,
    ratio_ci,
    threshold_verdict,
)
from migfd.units import GiB

COLUMNS = ["target", "measured", "ci_low", "ci_high", "threshold", "verdict", "detail", "why"]


def failures_note(df: pd.DataFrame, scenario: str, mode: str | None = None) -> str:
    """'' or ' (2 of 10 trials failed: <first error>)' for a scenario/mode."""
    rows = select(df, scenario, mode, ok=None)
    bad = rows[~rows["ok"].fillna(False).astype(bool)]
    if bad.empty:
        return ""
    first = next((e for e in bad["error"] if e), "no error text")
    return f" ({len(bad)} of {len(rows)} trials failed; first error: {first})"


@dataclass(frozen=True)
class Target:
    """One performance target: a measured figure against a threshold."""

    name: str
    #: "<=", ">=", "<" or "=="
    op: str
    threshold: float
    #: what the measured figure is, for the table
    unit: str

    def threshold_text(self) -> str:
        sym = {"<=": "≤", ">=": "≥", "<": "<", "==": "="}[self.op]
        return f"{sym} {self.threshold:g}"


TARGETS = {
    "flat-in-ram": Target("fd-passing downtime flat in RAM (largest / smallest RAM size)", "<=", 1.25, "ratio"),
    "copy-vs-fd-1gib": Target("non-live state copy / fd-passing downtime at 1 GiB", ">=", 100, "ratio"),
    "zero-frames-lost": Target("frames lost + duplicated with fd-passing under TAP traffic", "==", 0, "frames"),
    "handover-floor": Target("fd-passing downtime (RAM + TAP + chardev) / handover floor", "<=", 10, "ratio"),
    "below-cpr-transfer": Target("fd-passing outage (RAM + TAP + chardev) / real QEMU cpr-transfer's outage, "
                                 "same observer", "<", 1, "ratio"),
    "per-fd-cost": Target("marginal cost of one more fd / raw batched per-fd cost", "<=", 2, "ratio"),
    "unbatched-linear": Target("fd-passing downtime with unbatched fd records / batched, at the most fds",
                               "<=", 2, "ratio"),
    "copy-throughput": Target("non-live state-copy throughput / raw AF_UNIX throughput into fresh memory, "
                              "same size", ">=", 0.8, "ratio"),
    "total-flat-in-ram": Target("fd-passing total time flat in RAM (largest / smallest RAM size)", "<=", 1.25,
                                "ratio"),
    "fd-batching-default": Target("fd-passing migrations of the default configuration that batched their "
                                  "fd records", "==", 1, "share"),
    "vs-qemu": Target("fd-passing / real QEMU median outage at the same RAM size, same observer", "<", 1, "ratio"),
    "outage-vs-downtime": Target("fd-passing outage − reported downtime (median, ms)", "<=", 0.5, "ms"),
    "client-excess": Target("fd-passing chardev client's switchover silence − reported downtime (median, ms)",
                            "<=", 0.5, "ms"),
    "moonshot": Target("fd-passing outage / QEMU 10.0 cpr-transfer outage, same RAM size, same observer "
                       "(ram-size, live)", "<=", 0.5, "ratio"),
    "precopy-stall": Target("guest-progress stall during live precopy: state copy / QEMU 10.0's copied RAM, "
                            "same RAM size, same observer", "<=", 1, "ratio"),
}
#: the chardev client's excess may add this many line intervals to the target's 0.5 ms
CLIENT_EXCESS_INTERVALS = 2

#: The handover target's stretch goal (issue 9): shown in its detail, not a verdict of its own.
HANDOVER_STRETCH = 5.0
#: The QEMU whose cpr-transfer the target compares with, where the run has it (issue 9 measured 10.0).
CPR_PREFERRED_VERSION = "10.0"


@dataclass(frozen=True)
class Point:
    """One place a target is judged: its figure with interval, and what was compared."""

    interval: Interval
    text: str


def _judged(key: str, points: list[Point], detail: str, why_fail: str = "", target: Target | None = None) -> dict:
    """The target's row from its points: combined verdict, the worst point shown; ``why_fail``
    says in words what a failure means; ``target`` replaces the table's where a run sets the threshold."""
    t = target or TARGETS[key]
    verdicts = [threshold_verdict(p.interval, t.op, t.threshold) for p in points]
    verdict = combine_verdicts(verdicts)
    # the worst point: the one that fails, else the one nearest to failing
    sign = -1 if t.op in (">=", ">") else 1
    order = sorted(range(len(points)), key=lambda i: (verdicts[i] != FAIL, verdicts[i] != INCONCLUSIVE,
                                                      -sign * points[i].interval.value))
    worst = points[order[0]]
    shown = fmt_interval(worst.interval)
    why = ""
    if verdict == FAIL:
        why = f"{why_fail}: {shown} misses {t.threshold_text()}" if why_fail else f"{shown} misses {t.threshold_text()}"
    elif verdict == INCONCLUSIVE:
        why = (f"the 95% interval {shown} straddles {t.threshold_text()}: more trials would decide"
               if worst.interval.known else f"too few trials for an interval (n={worst.interval.n})")
    many = f"worst of {len(points)}: " if len(points) > 1 else ""
    return {"target": t.name, "measured": worst.interval.value, "ci_low": worst.interval.low,
            "ci_high": worst.interval.high, "threshold": t.threshold_text(), "verdict": verdict,
            "detail": f"{many}{worst.text}{detail}", "why": why}


def _not_measured(key: str, why: str, detail: str = "") -> dict:
    t = TARGETS[key]
    return {"target": t.name, "measured": math.nan, "ci_low": math.nan, "ci_high": math.nan,
            "threshold": t.threshold_text(), "verdict": NOT_MEASURED, "detail": detail, "why": why}


def _values(rows: pd.DataFrame, column: str = "downtime_ns") -> np.ndarray:
    return clean(rows[column].astype("float64"))


def _flat_points(df: pd.DataFrame, column: str) -> list[Point]:
    """``column`` of ram-size fd-passing at the largest RAM size / at the smallest, one point per live value."""
    fd = select(df, "ram-size", "fd-passing")
    points = []
    for live, g in fd.groupby("live", dropna=False):
        g = g[g[column].notna()]
        sizes = sorted(g["ram_bytes"].dropna().unique())
        if len(sizes) < 2:
            continue
        small, large = g[g["ram_bytes"] == sizes[0]], g[g["ram_bytes"] == sizes[-1]]
        ci = ratio_ci(_values(small, column), _values(large, column))
        points.append(Point(ci, f"{live_label(live) or 'live unknown'}: {fmt_ns(median_of(large[column]))} "
                                f"at {fmt_bytes(sizes[-1])} vs {fmt_ns(median_of(small[column]))} "
                                f"at {fmt_bytes(sizes[0])} = {fmt_interval(ci)}"))
    return points


def _flat_target(df, meta, key: str, column: str, why_fail: str, note: str = ""):
    points = _flat_points(df, column)
    if not points:
        fd = select(df, "ram-size", "fd-passing")
        why = (why_absent(df, meta, "ram-size", "fd-passing trials at two RAM sizes") if fd.empty
               else "fd-passing measured at one RAM size only")
        return _not_measured(key, why)
    return _judged(key, points, note + failures_note(df, "ram-size", "fd-passing"), why_fail)


def _target_flat(df, meta):
    return _flat_target(df, meta, "flat-in-ram", "downtime_ns", "fd-passing downtime grows with RAM")


def _target_total_flat(df, meta):
    # live and non-live are points of their own (a live migration's precopy is in its total), so the
    # target holds only where both are flat; the worse is shown
    fd = select(df, "ram-size", "fd-passing")
    release = fd[fd["release_ns"].notna()]
    beside = ""
    if not release.empty:
        sizes = sorted(release["ram_bytes"].dropna().unique())
        beside = "; the source's release after it, not counted: " + ", ".join(
            f"{fmt_ns(median_of(release[release['ram_bytes'] == s]['release_ns']))} at {fmt_bytes(s)}"
            for s in (sizes[0], sizes[-1]))
    return _flat_target(df, meta, "total-flat-in-ram", "total_ns", "fd-passing total time grows with RAM",
                        " (migrate → the destination runs; each live value judged on its own, the worse shown"
                        + beside + ")")


def _target_copy_vs_fd(df, meta):
    rows = select(df, "ram-size")
    rows = rows[rows["live"] == False]  # noqa: E712 (nullable boolean)
    fd = rows[rows["mode"] == "fd-passing"]
    sc = rows[rows["mode"] == "state-copy"]
    if fd.empty or sc.empty:
        return _not_measured("copy-vs-fd-1gib", why_absent(df, meta, "ram-size", "non-live trials of both modes"))
    at = lambda rows, size: rows[rows["ram_bytes"] == size]  # noqa: E731
    common = sorted(set(fd["ram_bytes"].dropna()) & set(sc["ram_bytes"].dropna()))
    if GiB in common:
        c, f = at(sc, GiB), at(fd, GiB)
        ci = ratio_ci(_values(f), _values(c))
        text = (f"state copy {fmt_ns(median_of(c['downtime_ns']))} vs fd-passing "
                f"{fmt_ns(median_of(f['downtime_ns']))}, non-live = {fmt_interval(ci)}")
        return _judged("copy-vs-fd-1gib", [Point(ci, text)], failures_note(df, "ram-size"),
                       "state copy of 1 GiB is not slow enough against fd-passing")
    if not common:
        return _not_measured("copy-vs-fd-1gib", "no RAM size measured non-live in both modes")
    largest = common[-1]
    ci = ratio_ci(_values(at(fd, largest)), _values(at(sc, largest)))
    skipped = [p for p in scenario_info(meta, "ram-size").get("skipped_points") or []
               if isinstance(p, dict) and p.get("ram_bytes") == GiB]
    why = (f"1 GiB was skipped: {skipped[0].get('reason', 'no reason given')}" if skipped else
           f"1 GiB not measured in this run (largest non-live size: {fmt_bytes(largest)}; "
           f"a quick run stops at 256 MiB)")
    return _not_measured("copy-vs-fd-1gib", why,
                         f"at {fmt_bytes(largest)}: state copy / fd-passing = {fmt_interval(ci)}")


def _target_frames(df, meta):
    # Every trial counts, failed ones too: frames lost in a trial that failed are still lost;
    # and fd-order's, in both orders of the fds.
    rows = pd.concat([select(df, s, "fd-passing", ok=None) for s in ("tap-traffic", "fd-order")])
    counted = rows[rows["frames_sent"].notna()]
    if counted.empty:
        return _not_measured("zero-frames-lost",
                             why_absent(df, meta, "tap-traffic", "fd-passing trials with frame counts"))
    lost = int(counted["frames_lost"].fillna(0).sum())
    dup = int(counted["frames_duplicated"].fillna(0).sum())
    sent = int(counted["frames_sent"].fillna(0).sum())
    failed = int((~counted["ok"].fillna(False).astype(bool)).sum())
    uncounted = len(rows) - len(counted)
    total = float(lost + dup)
    text = (f"{lost} lost, {dup} duplicated of {sent:,} frames sent in {len(counted)} fd-passing trials"
            + (f" ({failed} of them failed, their frames counted)" if failed else ""))
    detail = failures_note(df, "tap-traffic", "fd-passing")
    t = TARGETS["zero-frames-lost"]
    row = {"target": t.name, "measured": total, "ci_low": total, "ci_high": total,
           "threshold": t.threshold_text(), "detail": text + detail, "why": ""}
    if total > 0:
        row.update(verdict=FAIL, why=f"{lost} frames lost and {dup} duplicated while the TAP fds were handed over")
    elif uncounted:
        row.update(verdict=INCONCLUSIVE, why=f"{uncounted} failed trial(s) have no frame counts: "
                                             f"what they lost is unknown")
    else:
        row["verdict"] = PASS
    return row


def _target_throughput(df, meta):
    floors = select(df, "limits", variant="unix-throughput")
    if floors.empty:
        return _not_measured("copy-throughput", why_absent(df, meta, "limits", "unix-throughput floor"))
    rows = select(df, "ram-size", "state-copy")
    rows = rows[rows["live"] == False]  # noqa: E712 (nullable boolean)
    if rows.empty:
        return _not_measured("copy-throughput", why_absent(df, meta, "ram-size", "non-live state-copy trials"))
    rows = rows.assign(_tp=throughput(rows))
    floor_sizes = set(floors["ram_bytes"].dropna())
    common = sorted(set(rows["ram_bytes"].dropna()) & floor_sizes)
    if not common:
        return _not_measured(
            "copy-throughput",
            f"no size on both sides: the floor was measured at {', '.join(fmt_bytes(s) for s in sorted(floor_sizes))}, "
            f"non-live state copy at {', '.join(fmt_bytes(s) for s in sorted(set(rows['ram_bytes'].dropna())))}")
    points = []
    for size in common:
        tp = _values(rows[rows["ram_bytes"] == size], "_tp")
        floor = _values(floors[floors["ram_bytes"] == size], "value")
        ci = ratio_ci(floor, tp)
        points.append(Point(ci, f"{fmt_bytes(size)}: state copy {fmt_rate(float(np.median(tp)) if len(tp) else math.nan)}"
                                f" vs raw AF_UNIX {fmt_rate(float(np.median(floor)))} = {fmt_interval(ci)}"))
    return _judged("copy-throughput", points,
                   " (window: guest stopped → resumed, the whole copy and nothing else)"
                   + failures_note(df, "ram-size", "state-copy"), "state copy too slow")


def _handover_pair(df: pd.DataFrame, variant: str = "handover-floor") -> tuple[pd.DataFrame, str, pd.DataFrame]:
    """A handover floor's rows, the VM they stand for (its backend), and that VM's successful fd-passing migrations."""
    floor_rows = select(df, "limits", variant=variant)
    backends = set(floor_rows["backend"]) - {""}
    want = next(iter(backends)) if len(backends) == 1 else FULL_VM
    floor = floor_rows[floor_rows["backend"] == want] if want in backends else floor_rows
    return floor, want, _fd_passing_of(df, want)


def _target_handover(df, meta):
    floor, want, fd = _handover_pair(df)
    if floor.empty:
        return _not_measured("handover-floor", why_absent(df, meta, "limits", "handover-floor measurement"))
    if fd.empty:
        why = why_absent(df, meta, "tap-traffic", f"fd-passing trials of a VM with {want}")
        return _not_measured("handover-floor", why if "skipped" in why else
                             f"no successful fd-passing trial of a VM with {want}")
    ci = ratio_ci(_values(floor, "total_ns"), _values(fd))
    scen = ", ".join(sorted(set(fd["scenario"])))
    text = (f"{want} ({scen}): downtime {fmt_ns(median_of(fd['downtime_ns']))} vs floor "
            f"{fmt_ns(median_of(floor['total_ns']))} for the same fds and device-state bytes = {fmt_interval(ci)}")
    stretch = threshold_verdict(ci, "<=", HANDOVER_STRETCH)
    stretch_text = {PASS: "met", FAIL: "missed", INCONCLUSIVE: "undecided (the interval straddles it)"}
    outage = _with_outage(fd)
    beside = (f"; outage beside it: {fmt_ns(median_of(outage['outage_ns']))} = "
              f"{fmt_interval(ratio_ci(_values(floor, 'total_ns'), _values(outage, 'outage_ns')))} x the floor"
              if not outage.empty else "")
    return _judged("handover-floor", [Point(ci, text)],
                   f"; stretch goal ≤ {HANDOVER_STRETCH:g}: {stretch_text.get(stretch, stretch)}{beside}",
                   "fd-passing far above the raw handover")


#: The VM whose fd-passing downtime the handover and cpr-transfer targets take: RAM + TAP + chardev.
FULL_VM = "ram+tap+chardev"


def _fd_passing_of(df: pd.DataFrame, backend: str) -> pd.DataFrame:
    """Successful fd-passing migrations of a VM with ``backend`` in migfd's default configuration:
    not the floors, nor fd-order (whose trials change the order of the fds and the RAM size)."""
    ok = df["ok"].fillna(False).astype(bool)
    return df[(df["mode"] == "fd-passing") & ~df["scenario"].isin(("limits", "fd-order")) & ok
              & (df["backend"] == backend)]


def _cpr_rows(df: pd.DataFrame, ram_bytes: float) -> tuple[pd.DataFrame, str]:
    """Real QEMU cpr-transfer's successful rows to compare with, and which they are.

    One QEMU: 10.0 where the run has it (the cpr-transfer issue 9 measured),
    else the newest; RAM full of data (``filled``) where the run has it; at
    ``ram_bytes`` where QEMU ran that size, else at its smallest.
    """
    q = select(df, "qemu-peer", "qemu-cpr-transfer")
    if q.empty:
        return q, ""
    versions = sorted({str(v) for v in q["peer_version"].dropna() if str(v)},
                      key=lambda v: tuple(int(p) if p.isdigit() else -1 for p in v.split(".")))
    preferred = [v for v in versions if v == CPR_PREFERRED_VERSION or v.startswith(CPR_PREFERRED_VERSION + ".")]
    version = (preferred or versions or [""])[-1]
    if version:
        q = q[q["peer_version"] == version]
    if (q["variant"] == "filled").any():
        q = q[q["variant"] == "filled"]
    size = ram_bytes if (q["ram_bytes"] == ram_bytes).any() else q["ram_bytes"].min()
    q = q[q["ram_bytes"] == size]
    variant = next((v for v in q["variant"].dropna() if v), "")
    what = (f"QEMU {version or '?'} cpr-transfer at {fmt_bytes(size)}" + (f" ({variant} RAM)" if variant else ""))
    return q, what


def _prefer_accel(q: pd.DataFrame, accel: str = "kvm") -> pd.DataFrame:
    """QEMU's rows under ``accel`` where the run has them (migfd's guest runs on KVM by default)."""
    return q[q["accel"] == accel] if (q["accel"] == accel).any() else q


def _with_outage(rows: pd.DataFrame) -> pd.DataFrame:
    return rows[rows["outage_ns"].notna()]


def _target_cpr(df, meta):
    fd = _with_outage(_fd_passing_of(df, FULL_VM))
    if fd.empty:
        why = why_absent(df, meta, "tap-traffic", f"fd-passing trials of a VM with {FULL_VM}")
        return _not_measured("below-cpr-transfer", why if "skipped" in why else
                             f"no successful fd-passing trial of a VM with {FULL_VM} with an outage measured "
                             "(runs before the guest-progress observer have none)")
    q, what = _cpr_rows(df, fd["ram_bytes"].min())
    q = _with_outage(q)
    if q.empty:
        why = why_absent(df, meta, "qemu-peer", "successful cpr-transfer migrations")
        if not select(df, "qemu-peer", ok=None).empty and "skipped" not in why and "failed" not in why:
            why = ("no successful qemu-cpr-transfer rows with an outage: cpr-transfer needs QEMU 10.0 or later "
                   "(--qemu), the outage the guest-progress observer")
        return _not_measured("below-cpr-transfer", why)
    ci = ratio_ci(_values(q, "outage_ns"), _values(fd, "outage_ns"))
    text = (f"{FULL_VM} ({', '.join(sorted(set(fd['scenario'])))}): outage {fmt_ns(median_of(fd['outage_ns']))} "
            f"(downtime {fmt_ns(median_of(fd['downtime_ns']))}) vs {what}: outage "
            f"{fmt_ns(median_of(q['outage_ns']))} (STOP → RESUME {fmt_ns(median_of(qemu_downtime(q)))}) "
            f"= {fmt_interval(ci)}")
    return _judged("below-cpr-transfer", [Point(ci, text)], failures_note(df, "qemu-peer", "qemu-cpr-transfer"),
                   "fd-passing cuts the guest off as long as or longer than QEMU's own fd-passing")


def _diff_point(rows: pd.DataFrame, column: str, label: str) -> Point | None:
    """The median of ``column`` − ``downtime_ns`` per trial, in ms, with its interval."""
    rows = rows[rows[column].notna() & rows["downtime_ns"].notna()]
    if rows.empty:
        return None
    diff = (rows[column].astype("float64") - rows["downtime_ns"].astype("float64")) / 1e6
    ci = median_ci_any(diff.to_numpy())
    text = (f"{label}: {column.removesuffix('_ns').replace('_', ' ')} {fmt_ns(median_of(rows[column]))} − downtime "
            f"{fmt_ns(median_of(rows['downtime_ns']))}, per trial: median {fmt_interval(ci)} ms")
    return Point(ci, text)


def _target_outage_vs_downtime(df, meta):
    ok = df["ok"].fillna(False).astype(bool)
    fd = df[(df["mode"] == "fd-passing") & ok & df["scenario"].isin(OUTAGE_SCENARIOS)]
    points = []
    for (scenario, size, live), g in fd.groupby(["scenario", "ram_bytes", "live"], dropna=False):
        point = _diff_point(g, "outage_ns", f"{scenario} {fmt_bytes(size)} {live_label(live)}".strip())
        if point is not None:
            points.append(point)
    if not points:
        return _not_measured("outage-vs-downtime", "no fd-passing trial with an outage measured (runs before the "
                             "guest-progress observer have none)")
    return _judged("outage-vs-downtime", points, " (outage: the outside observer's longest silence over the reported pause)",
                   "the guest stays cut off after the reported resume")


def _target_client_excess(df, meta):
    rows = select(df, "chardev", "fd-passing")
    point = _diff_point(rows, "switchover_silence_ns", "chardev client")
    if point is None:
        return _not_measured("client-excess", why_absent(df, meta, "chardev", "fd-passing trials with the "
                                                         "client's switchover silence"))
    rate = scenario_info(meta, "chardev").get("line_rate_per_s")
    if not rate:
        return _not_measured("client-excess", "the run does not say the chardev client's line rate")
    interval_ms = 1e3 / float(rate)
    base = TARGETS["client-excess"]
    target = Target(base.name, base.op, base.threshold + CLIENT_EXCESS_INTERVALS * interval_ms, base.unit)
    return _judged("client-excess", [point],
                   f" (threshold 0.5 ms + {CLIENT_EXCESS_INTERVALS} line intervals of {interval_ms:g} ms)",
                   "the client stays cut off after the reported resume", target=target)


def _target_precopy_stall(df, meta):
    sc = select(df, "ram-size", "state-copy")
    sc = sc[(sc["live"] == True) & sc["precopy_stall_ns"].notna()]  # noqa: E712 (nullable boolean)
    q = select(df, "qemu-peer", "qemu-ram-copied")
    q = q[q["precopy_stall_ns"].notna()]
    versions = [v for v in q["peer_version"].dropna().unique() if str(v).startswith(CPR_PREFERRED_VERSION)]
    q = _prefer_accel(q[q["peer_version"].isin(versions)])
    if (q["variant"] == "filled").any():
        q = q[q["variant"] == "filled"]
    if sc.empty or q.empty:
        return _not_measured("precopy-stall", "needs live state-copy trials and QEMU 10.0 copied-RAM trials with "
                             "the guest-progress observer")
    points = []
    for size in sorted(set(sc["ram_bytes"].dropna()) & set(q["ram_bytes"].dropna())):
        m, r = sc[sc["ram_bytes"] == size], q[q["ram_bytes"] == size]
        # a stall of 0 (none seen) counts as the observer's threshold: the ratio stays finite
        floor = float(((meta or {}).get("observers") or {}).get("min_silence_ns") or DEFAULT_MIN_SILENCE_NS)
        ci = ratio_ci(np.maximum(_values(r, "precopy_stall_ns"), floor), np.maximum(_values(m, "precopy_stall_ns"), floor))
        points.append(Point(ci, f"{fmt_bytes(size)}: migfd {fmt_ns(median_of(m['precopy_stall_ns']))} (dirty rate "
                                f"{fmt_bytes(median_of(m['dirty_rate_bytes_s']))}/s) vs QEMU "
                                f"{fmt_ns(median_of(r['precopy_stall_ns']))} ({r['accel'].iloc[0]}, counting guest: "
                                f"dirties only its counter) = {fmt_interval(ci)}"))
    if not points:
        return _not_measured("precopy-stall", "no RAM size measured by both")
    return _judged("precopy-stall", points, "", "migfd's precopy starves its guest more than QEMU's")


def _target_moonshot(df, meta):
    """The guest of the ram-size scenario, RAM alone handed over, against QEMU 10.0's own fd-passing of
    RAM at each size both ran, KVM where present: one point per size."""
    fd = _with_outage(select(df, "ram-size", "fd-passing"))
    fd = fd[fd["live"] == True]  # noqa: E712 (nullable boolean): qemu-peer's guests run
    q = _with_outage(select(df, "qemu-peer", "qemu-cpr-transfer"))
    q = _prefer_accel(q[q["peer_version"].astype(str).str.startswith(CPR_PREFERRED_VERSION)])
    if (q["variant"] == "filled").any():
        q = q[q["variant"] == "filled"]
    points = []
    for size in sorted(set(fd["ram_bytes"].dropna()) & set(q["ram_bytes"].dropna())):
        f, r = fd[fd["ram_bytes"] == size], q[q["ram_bytes"] == size]
        ci = ratio_ci(_values(r, "outage_ns"), _values(f, "outage_ns"))
        points.append(Point(ci, f"{fmt_bytes(size)}: fd-passing outage {fmt_ns(median_of(f['outage_ns']))} vs QEMU "
                                f"{r['peer_version'].iloc[0]} cpr-transfer ({r['accel'].iloc[0]}) "
                                f"{fmt_ns(median_of(r['outage_ns']))} = {fmt_interval(ci)}"))
    if not points:
        return _not_measured("moonshot", "needs live ram-size fd-passing and QEMU 10.0 cpr-transfer rows with an "
                             "outage at a common RAM size")
    return _judged("moonshot", points, "", "fd-passing does not cut the guest off half as long as QEMU's own")


#: the scenarios whose VMs have guest RAM, so an outage the observer measures
OUTAGE_SCENARIOS = ("ram-size", "tap-traffic", "chardev")


def _unbatched_pairs(df: pd.DataFrame) -> Iterator[tuple[str, float, pd.DataFrame, pd.DataFrame]]:
    """Per fd-count backend: the most fds measured both ways, and the batched and unbatched rows there."""
    rows = select(df, "fd-count", "fd-passing")
    for backend, g in rows.groupby("backend", dropna=False):
        batched, unbatched = g[g["variant"] == "batched"], g[g["variant"] == "unbatched"]
        common = sorted(set(batched["n_fds"].dropna()) & set(unbatched["n_fds"].dropna()))
        if common:
            n = common[-1]
            yield backend, n, batched[batched["n_fds"] == n], unbatched[unbatched["n_fds"] == n]


def _target_unbatched(df, meta):
    rows = select(df, "fd-count", "fd-passing")
    points = []
    for backend, n, b, u in _unbatched_pairs(df):
        ci = ratio_ci(_values(b), _values(u))
        points.append(Point(ci, f"{backend}, {int(n)} fds: unbatched {fmt_ns(median_of(u['downtime_ns']))} "
                                f"({fmt_messages(u)}) vs batched {fmt_ns(median_of(b['downtime_ns']))} "
                                f"({fmt_messages(b)}) = {fmt_interval(ci)}"))
    if not points:
        return _not_measured("unbatched-linear", why_absent(df, meta, "fd-count", "fd-passing trials") if rows.empty
                             else "no fd count measured with both batched and unbatched fd records")
    return _judged("unbatched-linear", points, failures_note(df, "fd-count", "fd-passing"),
                   "one fd per sendmsg costs more than linearly")


def fmt_messages(rows: pd.DataFrame) -> str:
    """'256 fds in 16 messages' from the rows' medians of fds_passed and fd_messages."""
    return f"{median_of(rows['fds_passed']):.0f} fds in {median_of(rows['fd_messages']):.0f} messages"


#: Scenarios whose fd-passing migrations run migfd's default configuration (fd-count sets
#: ``x-batch-fds`` itself, on or off, for its two variants).
DEFAULT_CONFIG_SCENARIOS = ("tap-traffic", "chardev", "ram-size")


def _target_batching(df, meta):
    rows = df[df["scenario"].isin(DEFAULT_CONFIG_SCENARIOS) & (df["mode"] == "fd-passing")
              & df["ok"].fillna(False).astype(bool)]
    # one fd is one message either way: only a migration that passed several fds can show batching
    rows = rows[(rows["fds_passed"].fillna(0) > 1) & rows["fd_messages"].notna()]
    if rows.empty:
        return _not_measured("fd-batching-default", why_absent(df, meta, "tap-traffic",
                                                               "fd-passing trials that passed more than one fd"))
    batched = (rows["fd_messages"] < rows["fds_passed"]).astype(bool)
    share = float(batched.mean())
    t = TARGETS["fd-batching-default"]
    scen = ", ".join(sorted(set(rows["scenario"])))
    detail = (f"{int(batched.sum())} of {len(rows)} fd-passing migrations ({scen}) sent their fds in fewer "
              f"sendmsg calls than fds: {int(rows['fds_passed'].sum())} fds in {int(rows['fd_messages'].sum())} "
              f"messages (x-batch-fds; real QEMU's reader accepts batched fds: see the README)")
    row = {"target": t.name, "measured": share, "ci_low": share, "ci_high": share,
           "threshold": t.threshold_text(), "verdict": PASS if share == 1 else FAIL, "detail": detail, "why": ""}
    if share < 1:
        row["why"] = (f"{int((~batched).sum())} migrations sent one fd per sendmsg: batching is not on "
                      f"by default in this run")
    return row


def _slope(x: np.ndarray, medians: np.ndarray) -> np.ndarray:
    """Least-squares slope of ``medians`` (k points x any batch shape) against ``x`` (k,)."""
    xc = x - x.mean()
    shape = (len(x),) + (1,) * (medians.ndim - 1)
    return (xc.reshape(shape) * (medians - medians.mean(axis=0))).sum(axis=0) / (xc ** 2).sum()


def slope_ratio_ci(groups: list[tuple[float, np.ndarray]], floor: list[tuple[float, np.ndarray]]) -> Interval:
    """(slope of the medians of ``groups`` against x) / (the same of ``floor``), with a bootstrap interval.

    Each group is (x, trials); a floor of one group only is a per-x cost already
    (its medians are the slope). Every group is resampled independently.
    """
    xs = np.array([x for x, _ in groups], dtype=float)
    fx = np.array([x for x, _ in floor], dtype=float)
    k = len(groups)

    def statistic(*samples, axis=-1):
        med = np.stack([np.median(s, axis=axis) for s in samples])
        num = _slope(xs, med[:k])
        den = _slope(fx, med[k:]) if len(fx) > 1 else med[k]
        with np.errstate(divide="ignore", invalid="ignore"):
            return num / den

    return _bootstrapped(statistic, [v for _, v in groups] + [v for _, v in floor])


def _bootstrapped(statistic, samples: list[np.ndarray]) -> Interval:
    """``statistic`` (vectorized, as :func:`~migfd.stats.bootstrap_ci` takes it) of ``samples``, with its
    bootstrap interval; none from a sample of one trial."""
    value = float(statistic(*[np.asarray(s)[None, :] for s in samples])[0])
    n = min(len(s) for s in samples)
    if n < 2:
        return Interval(value, math.nan, math.nan, n)
    low, high = bootstrap_ci(samples, statistic)
    return Interval(value, low, high, n)


def by_n_fds(rows: pd.DataFrame, column: str) -> list[tuple[float, np.ndarray]]:
    """``column``'s clean values of ``rows`` per fd count: [(n_fds, values)], counts without values left out."""
    out = []
    for n, g in rows.groupby("n_fds"):
        vals = _values(g, column)
        if len(vals):
            out.append((float(n), vals))
    return out


def _per_fd_floor(df: pd.DataFrame) -> list[tuple[float, np.ndarray]]:
    """The batched fd round trips by fd count (one group: its per-fd ``value`` alone), for :func:`slope_ratio_ci`."""
    floor_rows = select(df, "limits", variant="fd-roundtrip")
    floor = by_n_fds(floor_rows, "total_ns")
    if len(floor) < 2:
        floor = [(0.0, _values(floor_rows, "value"))] if len(floor_rows) else []
    return floor


def _per_fd_migrations(df: pd.DataFrame) -> tuple[list[tuple[float, np.ndarray]], str]:
    """fd-count's fd-passing downtimes by fd count (the batched ones where the run has them), and which."""
    rows = select(df, "fd-count", "fd-passing")
    batched = rows[rows["variant"] == "batched"]
    use, label = (batched, "batched") if not batched.empty else (rows, "all fd-passing")
    return by_n_fds(use, "downtime_ns"), label


def _target_per_fd(df, meta):
    floor = _per_fd_floor(df)
    if not floor:
        return _not_measured("per-fd-cost", why_absent(df, meta, "limits", "fd-roundtrip floor"))
    groups, label = _per_fd_migrations(df)
    if len(groups) < 2:
        return _not_measured("per-fd-cost", why_absent(df, meta, "fd-count", "fd-passing trials at two fd counts")
                             if not groups else "fd-passing measured at one fd count only")
    ci = slope_ratio_ci(groups, floor)
    text = (f"{label}: slope of median downtime over {int(groups[0][0])}–{int(groups[-1][0])} fds against the "
            f"raw batched round trip's = {fmt_interval(ci)}")
    # shown, not judged: the default stays at QEMU's 16 fds a message, sent at the switchover
    for variant, what in (("batched-253", "x-fds-per-message"), ("early-fds", "x-early-fds: the fds before the stop")):
        other = by_n_fds(select(df, "fd-count", "fd-passing", variant=variant), "downtime_ns")
        if len(other) >= 2:
            text += f"; {variant} ({what}, migfd to migfd): {fmt_interval(slope_ratio_ci(other, floor))}"
    return _judged("per-fd-cost", [Point(ci, text)], failures_note(df, "fd-count", "fd-passing"),
                   "each extra fd costs too much")


def _target_qemu(df, meta):
    q = select(df, "qemu-peer")
    q = q[q["mode"].str.startswith("qemu")]
    if q.empty:
        return _not_measured("vs-qemu", why_absent(df, meta, "qemu-peer", "successful QEMU migrations"))
    # like with like: migfd's guest RAM is filled (no zero pages), so QEMU's with random bytes where
    # the run has it (variant "filled"), not RAM as QEMU gives it (mostly zero pages)
    if (q["variant"] == "filled").any():
        q = q[q["variant"] == "filled"]
    q = _with_outage(_prefer_accel(q))
    fd = _with_outage(select(df, "ram-size", "fd-passing"))
    if q.empty or fd.empty:
        return _not_measured("vs-qemu", "no outage measured on both sides (runs before the guest-progress "
                             "observer have none)")
    q = q.assign(_down=q["outage_ns"])
    points = []
    for (size, version), qs in q.groupby(["ram_bytes", "peer_version"], dropna=False):
        lives = set(qs["live"].dropna())
        f = fd[fd["ram_bytes"] == size]
        if lives and not f[f["live"].isin(lives)].empty:
            f = f[f["live"].isin(lives)]
        if f.empty:
            continue
        per_mode = qs.groupby("mode")["_down"].apply(median_of)
        best = per_mode.idxmin()
        ci = ratio_ci(_values(qs[qs["mode"] == best], "_down"), _values(f, "outage_ns"))
        qemu = f"QEMU {version}" if version else "real QEMU"
        points.append(Point(ci, f"{fmt_bytes(size)}: fd-passing outage {fmt_ns(median_of(f['outage_ns']))} vs "
                                f"{mode_label(best).replace('real QEMU', qemu)} ({qs['accel'].iloc[0]}) outage "
                                f"{fmt_ns(per_mode[best])} = {fmt_interval(ci)}"))
    if not points:
        return _not_measured("vs-qemu", "no RAM size measured both by qemu-peer and by fd-passing in ram-size")
    return _judged("vs-qemu", points, " (against QEMU's faster mode; both outages from the same observer)",
                   "real QEMU cut its guest off as briefly or more briefly")


_CHECKS = {"flat-in-ram": _target_flat, "copy-vs-fd-1gib": _target_copy_vs_fd,
           "zero-frames-lost": _target_frames, "handover-floor": _target_handover,
           "below-cpr-transfer": _target_cpr, "per-fd-cost": _target_per_fd, "unbatched-linear": _target_unbatched,
           "copy-throughput": _target_throughput, "total-flat-in-ram": _target_total_flat,
           "fd-batching-default": _target_batching, "vs-qemu": _target_qemu,
           "outage-vs-downtime": _target_outage_vs_downtime, "client-excess": _target_client_excess,
           "precopy-stall": _target_precopy_stall, "moonshot": _target_moonshot}


def targets(df: pd.DataFrame, metadata: dict | None = None, keys: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per target: measured figure with its 95% interval, threshold, verdict, what was compared, why.

    ``verdict`` is "pass", "fail", "inconclusive" or "not-measured"; ``why``
    explains all but a pass (a skipped scenario's reason comes from
    ``metadata["scenarios"]``). Times come from successful trials, and the
    failed ones are counted in ``detail``; frame counts come from every trial.
    ``keys`` picks some targets (keys of :data:`TARGETS`); default all, in order.
    """
    chosen = list(keys) if keys is not None else list(_CHECKS)
    unknown = [k for k in chosen if k not in _CHECKS]
    if unknown:
        raise ValueError(f"unknown target {unknown[0]!r}; choose from {', '.join(_CHECKS)}")
    return pd.DataFrame([_CHECKS[k](df, metadata) for k in chosen], columns=COLUMNS)


VERDICT_COLOURS = {PASS: "background-color: #d4edda", FAIL: "background-color: #f8d7da",
                   INCONCLUSIVE: "background-color: #e2e3e5", NOT_MEASURED: "background-color: #fff3cd"}


def format_targets(table: pd.DataFrame):
    """The targets table for reading: "measured [95% CI]" to 3 significant digits, verdicts coloured."""
    shown = table.copy()
    counts = {t.name for t in TARGETS.values() if t.unit == "frames"}
    shares = {t.name for t in TARGETS.values() if t.unit == "share"}
    shown.insert(1, "measured [95% CI]", [
        "—" if pd.isna(v) else f"{v:.0f} (count, all trials)" if name in counts else
        f"{v:.0%} (share of the migrations)" if name in shares else
        fmt_interval(Interval(v, lo, hi, 2 if not (pd.isna(lo) or pd.isna(hi)) else 1))
        for name, v, lo, hi in zip(shown["target"], shown.pop("measured"), shown.pop("ci_low"),
                                   shown.pop("ci_high"))])
    return (shown.style.hide(axis="index")
            .map(lambda v: VERDICT_COLOURS.get(v, ""), subset=["verdict"])
            .set_properties(**{"text-align": "left", "white-space": "normal"}))


# --------------------------------------------------------------------------
# The floors beside the targets (issue 18)
# --------------------------------------------------------------------------

#: A floor beside its row: wholly below the migrations it bounds (floor / migration < 1 on all of its
#: interval), or flagged, or absent from the run.
BELOW, NOT_BELOW = "below", "not below"
FLOOR_FLAG_COLOURS = {BELOW: VERDICT_COLOURS[PASS], NOT_BELOW: VERDICT_COLOURS[FAIL],
                      NOT_MEASURED: VERDICT_COLOURS[NOT_MEASURED]}

FLOOR_COLUMNS = ["row", "floor", "judges", "migrations", "unit", "floor_value", "floor_value_low", "floor_value_high",
                 "migration", "migration_low", "migration_high", "ratio", "ratio_low", "ratio_high", "flag", "why"]

#: The handover floors and what each is, beside the downtime they bound; the first judges the row.
HANDOVER_FLOORS = {"handover-floor": "idle",
                   "handover-floor-loaded": "under tap-traffic's probe frames",
                   "handover-oneway": "the state and fds one way, idle",
                   "commit-roundtrip": "the acknowledgement and the EOF, idle"}
#: The handover floors beside the outage: only whole switchovers bound what a guest's clients see.
OUTAGE_FLOORS = ("handover-floor", "handover-floor-loaded")


def _floor_line(row: str, floor: str, judges: bool, migrations: str, unit: str,
                f: Interval, m: Interval, ratio: Interval, missing: str = "") -> dict:
    """One line of the floors table; ``ratio`` is floor / migration, flagged unless wholly below 1."""
    verdict = threshold_verdict(ratio, "<", 1)
    if verdict == NOT_MEASURED:
        flag, why = NOT_MEASURED, missing or "the run has no such floor"
    elif verdict == PASS:
        flag, why = BELOW, ""
    else:
        flag = NOT_BELOW
        why = ("the floor is above the migrations it bounds" if verdict == FAIL else
               f"the interval {fmt_interval(ratio)} reaches 1" if ratio.known else
               f"too few trials for an interval (n={ratio.n})")
    return {"row": row, "floor": floor, "judges": judges, "migrations": migrations, "unit": unit,
            "floor_value": f.value, "floor_value_low": f.low, "floor_value_high": f.high,
            "migration": m.value, "migration_low": m.low, "migration_high": m.high,
            "ratio": ratio.value, "ratio_low": ratio.low, "ratio_high": ratio.high, "flag": flag, "why": why}


def _medians_line(row: str, floor: str, judges: bool, migrations: str, floor_values: np.ndarray,
                  migration_values: np.ndarray, missing: str = "") -> dict:
    """A floor and migrations that are both times (ns), one value a trial."""
    return _floor_line(row, floor, judges, migrations, "ns", median_ci(floor_values), median_ci(migration_values),
                       ratio_ci(migration_values, floor_values), missing)


def _handover_floor_lines(df: pd.DataFrame, meta: dict | None) -> list[dict]:
    _, want, fd = _handover_pair(df)
    if fd.empty:
        return []
    scen = ", ".join(sorted(set(fd["scenario"])))
    load_note = ((meta or {}).get("scenarios") or {}).get("limits", {}).get("handover_load", "")
    out = []
    for key, column, variants in (("handover-floor", "downtime_ns", list(HANDOVER_FLOORS)),
                                  ("below-cpr-transfer", "outage_ns", list(OUTAGE_FLOORS))):
        migrations = fd[fd[column].notna()]
        if migrations.empty:
            continue
        what = f"fd-passing {column.removesuffix('_ns')}, {want} ({scen})"
        for variant in variants:
            floor, _, _ = _handover_pair(df, variant)
            missing = (load_note if variant == "handover-floor-loaded" and load_note.startswith("not measured")
                       else why_absent(df, meta, "limits", f"{variant} measurement"))
            out.append(_medians_line(key, f"{variant} ({HANDOVER_FLOORS[variant]})",
                                     key == "handover-floor" and variant == "handover-floor", what,
                                     _values(floor, "total_ns"), _values(migrations, column), missing))
    return out


def slope_ci(groups: list[tuple[float, np.ndarray]]) -> Interval:
    """The least-squares slope of the medians of ``groups`` (x, trials) against x, with a bootstrap interval."""
    xs = np.array([x for x, _ in groups], dtype=float)

    def statistic(*samples, axis=-1):
        return _slope(xs, np.stack([np.median(s, axis=axis) for s in samples]))

    return _bootstrapped(statistic, [v for _, v in groups])


def _inverse(ci: Interval) -> Interval:
    """1 / a positive ratio; no bounds where its interval reaches 0 or below."""
    known = ci.known and ci.low > 0
    return Interval(1 / ci.value if ci.value else math.inf, 1 / ci.high if known else math.nan,
                    1 / ci.low if known else math.nan, ci.n)


def _per_fd_floor_lines(df: pd.DataFrame, meta: dict | None) -> list[dict]:
    groups, label = _per_fd_migrations(df)
    if len(groups) < 2:
        return []
    floor = _per_fd_floor(df)
    what = f"slope of fd-count's {label} fd-passing downtime over {int(groups[0][0])}–{int(groups[-1][0])} fds"
    if not floor:
        return [_floor_line("per-fd-cost", "fd-roundtrip (slope, batched)", True, what, "ns/fd", UNKNOWN,
                            slope_ci(groups), UNKNOWN, why_absent(df, meta, "limits", "fd-roundtrip floor"))]
    f = slope_ci(floor) if len(floor) > 1 else median_ci(floor[0][1])
    return [_floor_line("per-fd-cost", "fd-roundtrip (slope, batched)", True, what, "ns/fd", f, slope_ci(groups),
                        _inverse(slope_ratio_ci(groups, floor)))]


def _unbatched_floor_lines(df: pd.DataFrame, meta: dict | None) -> list[dict]:
    out = []
    for backend, n, batched, unbatched in _unbatched_pairs(df):
        for variant, migrations, how in (("fd-roundtrip-unbatched", unbatched, "unbatched"),
                                         ("fd-roundtrip", batched, "batched")):
            floor = select(df, "limits", variant=variant)
            out.append(_medians_line("unbatched-linear", f"{variant} ({int(n)} fds)", False,
                                     f"fd-passing downtime, {backend}, {int(n)} fds {how}",
                                     _values(floor[floor["n_fds"] == n], "total_ns"), _values(migrations),
                                     why_absent(df, meta, "limits", f"{variant} floor at {int(n)} fds")))
    return out


def _copy_floor_lines(df: pd.DataFrame, meta: dict | None) -> list[dict]:
    rows = select(df, "ram-size", "state-copy")
    rows = rows[rows["live"] == False]  # noqa: E712 (nullable boolean)
    floors = select(df, "limits", variant="unix-throughput")
    out = []
    for size in sorted(set(rows["ram_bytes"].dropna())):
        floor = floors[floors["ram_bytes"] == size]
        out.append(_medians_line("copy-throughput", f"unix-throughput ({fmt_bytes(size)}, as time)", True,
                                 f"non-live state-copy downtime, {fmt_bytes(size)}",
                                 _values(floor, "total_ns"), _values(rows[rows["ram_bytes"] == size]),
                                 why_absent(df, meta, "limits", f"unix-throughput floor at {fmt_bytes(size)}")))
    return out


def floors_beside(df: pd.DataFrame, metadata: dict | None = None) -> pd.DataFrame:
    """Each floor beside the rows of the targets table it bounds: its value, the migrations', and
    floor / migration with their 95% intervals (:data:`FLOOR_COLUMNS`).

    ``judges`` marks the floor a target is judged against; the others are shown
    beside it (the handover floor under load, its one-way part and its commit
    round trip). ``flag`` is ``below`` when the whole interval of floor /
    migration is below 1, ``not below`` otherwise (a floor that does not bound
    the migrations, or that this run cannot tell from them), ``not-measured``
    when the run has no such floor. A row whose migrations the run did not
    measure is left out (the targets table says why).
    """
    lines = (_handover_floor_lines(df, metadata) + _per_fd_floor_lines(df, metadata)
             + _unbatched_floor_lines(df, metadata) + _copy_floor_lines(df, metadata))
    return pd.DataFrame(lines, columns=FLOOR_COLUMNS)


def _fmt_value(unit: str):
    return (lambda v: f"{fmt_ns(v)}/fd") if unit == "ns/fd" else fmt_ns


def format_floors(table: pd.DataFrame):
    """The floors table for reading: values and ratios with their 95% intervals, flags coloured."""
    def interval(row, prefix: str, fmt=None) -> str:
        ci = Interval(row[prefix], row[f"{prefix}_low"], row[f"{prefix}_high"], 2)
        if pd.isna(row[prefix]):
            return "—"
        if pd.isna(ci.low) or pd.isna(ci.high):
            ci = Interval(ci.value, math.nan, math.nan, 1)
        return fmt_interval(ci, fmt)

    shown = pd.DataFrame({
        "row": table["row"],
        "floor": [f + (" — judges the row" if j else "") for f, j in zip(table["floor"], table["judges"])],
        "floor [95% CI]": [interval(r, "floor_value", _fmt_value(r["unit"])) for _, r in table.iterrows()],
        "migrations": table["migrations"],
        "migration [95% CI]": [interval(r, "migration", _fmt_value(r["unit"])) for _, r in table.iterrows()],
        "floor / migration [95% CI]": [interval(r, "ratio") for _, r in table.iterrows()],
        "flag": table["flag"],
        "why": table["why"],
    })
    return (shown.style.hide(axis="index")
            .map(lambda v: FLOOR_FLAG_COLOURS.get(v, ""), subset=["flag"])
            .set_properties(**{"text-align": "left", "white-space": "normal"}))
