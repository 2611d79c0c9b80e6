"""The summary a report opens with (and notebook 00-summary shows): the answers first, from one run.

:func:`run_summary` computes everything from the run's rows, nothing typed in:
fd-passing against state copy at the smallest and the largest RAM size, and
against real QEMU (cpr-transfer, shared RAM, RAM copied; each QEMU version a
point), as medians with their 95% intervals and the ratio of medians with its
interval (:mod:`migfd.stats`); downtime everywhere, and the outage a guest's
observer saw beside it where the run has an ``outage_ns`` column with data; the
frames lost; the ratios to the physical floors and the targets' verdict counts
(:mod:`migfd.results.targets`); one figure; and, given a reference run, one line
on what changed against it, the machine first (``migfd compare``'s own JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from migfd.errors import MigrationError
from migfd.paths import reference_dir
from migfd.results.compare import BASE_ENV
from migfd.results.load import newest_run, select
from migfd.results.summary import fmt_bytes, fmt_interval, fmt_ns, mode_label, qemu_downtime, summarize
from migfd.results.targets import TARGETS, targets
from migfd.stats import FAIL, INCONCLUSIVE, NOT_MEASURED, PASS, Interval, UNKNOWN, median_ci, ratio_ci
from migfd.units import MiB

#: The column issue 15 adds: guest progress stopped -> progress again, seen by an outside observer.
OUTAGE = "outage_ns"
#: Real QEMU's modes in the order the summary shows them, with their short names there.
QEMU_MODES = ("qemu-cpr-transfer", "qemu-ram-shared", "qemu-ram-copied")
QEMU_SHORT = {"qemu-cpr-transfer": "cpr-transfer", "qemu-ram-shared": "RAM shared (x-ignore-shared)",
              "qemu-ram-copied": "RAM copied"}
#: The targets that are ratios to a physical floor measured in the same run, and how to say each.
FLOOR_TARGETS = {
    "handover-floor": "fd-passing's downtime is {r} the raw handover of the same fds and device-state bytes",
    "per-fd-cost": "one more handed-over fd costs {r} the raw per-fd round trip",
    "copy-throughput": "state copy moves RAM at {r} the raw AF_UNIX throughput into fresh memory",
}
#: The element id the report gives the summary (its table of contents links to it).
SUMMARY_ANCHOR = "summary"

COLORS = {"fd-passing": "#1f77b4", "state-copy": "#d62728", "qemu-cpr-transfer": "#9467bd",
          "qemu-ram-shared": "#8c564b", "qemu-ram-copied": "#7f7f7f"}


@dataclass(frozen=True)
class Answer:
    """One line of the headline table: fd-passing against another way, at one point.

    ``ratio`` is median(other) / median(fd-passing): above 1, fd-passing pauses the guest for less.
    ``outage_*`` are :data:`UNKNOWN` where the run has no outage for the point.
    """

    against: str
    where: str
    fd: Interval
    other: Interval
    ratio: Interval
    fd_outage: Interval = UNKNOWN
    other_outage: Interval = UNKNOWN
    outage_ratio: Interval = UNKNOWN


@dataclass
class Summary:
    """What :func:`run_summary` found; :meth:`markdown` and :meth:`figure` show it."""

    answers: list[Answer]
    frames: str
    floors: list[str]
    verdicts: dict[str, list[str]]
    reference: str | None
    title: str
    run_line: str
    has_outage: bool
    df: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)

    def verdict_line(self) -> str:
        counts = {v: len(self.verdicts.get(v, [])) for v in (PASS, FAIL, INCONCLUSIVE, NOT_MEASURED)}
        total = sum(counts.values())
        text = (f"**Targets:** {counts[PASS]} pass, {counts[FAIL]} fail, {counts[INCONCLUSIVE]} inconclusive"
                + (f", {counts[NOT_MEASURED]} not measured" if counts[NOT_MEASURED] else "")
                + f" of {total}, each verdict taken on the 95% interval (the table: 02-downtime)")
        if self.verdicts.get(FAIL):
            text += ". **Failing:** " + "; ".join(self.verdicts[FAIL])
        if self.verdicts.get(INCONCLUSIVE):
            text += ". Inconclusive: " + ", ".join(self.verdicts[INCONCLUSIVE])
        if self.verdicts.get(NOT_MEASURED):
            text += ". Not measured (02 says why): " + ", ".join(self.verdicts[NOT_MEASURED])
        return text + "."

    def table(self) -> str:
        """The headline table in Markdown: one row per answer, downtime (and outage) beside."""
        head = ["fd-passing against", "at", "fd-passing downtime", "its downtime", "its / fd-passing's"]
        if self.has_outage:
            head += ["fd-passing outage", "its outage", "its / fd-passing's outage"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for a in self.answers:
            cells = [a.against, a.where, _time(a.fd), _time(a.other), fmt_ratio(a.ratio)]
            if self.has_outage:
                cells += [_time(a.fd_outage), _time(a.other_outage), fmt_ratio(a.outage_ratio)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def markdown(self, heading: str = "## Summary:", note: str = "") -> str:
        """The summary as one Markdown block: the answers and verdicts first, then how to read them.

        ``heading`` starts its title line (the report makes it the page's title); ``note`` follows the title.
        """
        outage = (" Outage: the guest's progress stopped → progressing again, as an outside observer saw it."
                  if self.has_outage else
                  " This run measured no outage (runs before issue 15): downtime only, as the VMs report it; "
                  "the outage a guest's own observer sees may be longer.")
        parts = [
            f"<a id=\"{SUMMARY_ANCHOR}\"></a>\n\n{heading} {self.title}",
            f"{self.run_line}. {note}".strip(),
            self.verdict_line(),
            self.table(),
            f"Medians with their 95% intervals [low, high]; ratios are median(other) / median(fd-passing), "
            f"above 1 where fd-passing pauses the guest for less. Downtime: guest stopped → running on the "
            f"destination (real QEMU: its STOP → RESUME events where the run has them).{outage}",
            f"**Frames lost:** {self.frames}",
            "**Against the floors** measured in the same run: " + "; ".join(self.floors) + ".",
        ]
        if self.reference:
            parts.append(f"**Against the reference run:** {self.reference}")
        return "\n\n".join(parts)

    def figure(self) -> Figure:
        return plot_headline(self.df)


def _time(interval: Interval) -> str:
    return "—" if math.isnan(interval.value) else fmt_interval(interval, fmt_ns)


def fmt_ratio(interval: Interval) -> str:
    """'5.16× [4.37, 6.8]': a ratio of medians with its interval, '—' when there is none."""
    if math.isnan(interval.value):
        return "—"
    text = fmt_interval(interval)
    value, _, rest = text.partition(" ")
    return f"{value}×" + (f" {rest}" if rest else "")


def _numbers(rows: pd.DataFrame, column: str) -> np.ndarray:
    if column not in rows:
        return np.array([], dtype=float)
    values = pd.to_numeric(rows[column], errors="coerce").astype("float64").to_numpy()
    return values[~np.isnan(values)]


def has_outage(df: pd.DataFrame) -> bool:
    """Whether the run has outage figures: the column exists and some successful trial has a value."""
    return OUTAGE in df and len(_numbers(select(df), OUTAGE)) > 0


def _pair(fd_rows: pd.DataFrame, other_rows: pd.DataFrame, other_down: np.ndarray, against: str,
          where: str, outage: bool) -> Answer:
    fd_down = _numbers(fd_rows, "downtime_ns")
    extra = {}
    if outage:
        fo, oo = _numbers(fd_rows, OUTAGE), _numbers(other_rows, OUTAGE)
        if len(fo) and len(oo):
            extra = dict(fd_outage=median_ci(fo), other_outage=median_ci(oo), outage_ratio=ratio_ci(fo, oo))
        elif len(fo) or len(oo):
            extra = dict(fd_outage=median_ci(fo), other_outage=median_ci(oo))
    return Answer(against, where, median_ci(fd_down), median_ci(other_down), ratio_ci(fd_down, other_down),
                  **extra)


def _live_word(live: Any) -> str:
    return "live" if bool(live) else "non-live"


def state_copy_answers(df: pd.DataFrame, outage: bool) -> list[Answer]:
    """fd-passing against state copy in ram-size, at the smallest and the largest size both measured."""
    rows = select(df, "ram-size")
    fd, sc = rows[rows["mode"] == "fd-passing"], rows[rows["mode"] == "state-copy"]
    sizes = sorted(set(fd["ram_bytes"].dropna()) & set(sc["ram_bytes"].dropna()))
    answers = []
    for size in dict.fromkeys([sizes[0], sizes[-1]] if sizes else []):
        for live in (True, False):
            f = fd[(fd["ram_bytes"] == size) & (fd["live"] == live)]
            s = sc[(sc["ram_bytes"] == size) & (sc["live"] == live)]
            if f.empty or s.empty:
                continue
            answers.append(_pair(f, s, _numbers(s, "downtime_ns"), "state copy",
                                 f"{fmt_bytes(float(size))} {_live_word(live)}", outage))
    return answers


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in str(version).split("."))


def qemu_answers(df: pd.DataFrame, outage: bool) -> list[Answer]:
    """fd-passing (ram-size, live) against each real QEMU mode and version, at the largest RAM size both ran.

    QEMU's RAM full of data (variant ``filled``) where the run has it, as migfd's guest RAM is.
    """
    q = select(df, "qemu-peer")
    q = q[q["mode"].isin(QEMU_MODES)]
    if (q["variant"] == "filled").any():
        q = q[q["variant"] == "filled"]
    fd = select(df, "ram-size", "fd-passing")
    fd = fd[fd["live"] == True]  # noqa: E712 (nullable boolean): QEMU's migrations are live
    answers = []
    for mode in QEMU_MODES:
        for version in sorted(set(q.loc[q["mode"] == mode, "peer_version"]), key=_version_key, reverse=True):
            qs = q[(q["mode"] == mode) & (q["peer_version"] == version)]
            sizes = sorted(set(qs["ram_bytes"].dropna()) & set(fd["ram_bytes"].dropna()))
            if not sizes:
                continue
            size = sizes[-1]
            at = qs[qs["ram_bytes"] == size]
            label = f"QEMU {version or '?'} {QEMU_SHORT[mode]}"
            answers.append(_pair(fd[fd["ram_bytes"] == size], at, qemu_downtime(at).dropna().to_numpy(), label,
                                 f"{fmt_bytes(float(size))} live", outage))
    return answers


def frames_sentence(df: pd.DataFrame) -> str:
    """Frames lost and duplicated under TAP traffic, per mode, every trial counted (failed ones too)."""
    rows = select(df, "tap-traffic", ok=None)
    rows = rows[pd.to_numeric(rows["frames_sent"], errors="coerce").notna()]
    if rows.empty:
        return "not measured in this run (tap-traffic needs root and /dev/net/tun)."
    parts = []
    for mode in ("fd-passing", "state-copy"):
        m = rows[rows["mode"] == mode]
        if m.empty:
            continue
        lost = _numbers(m, "frames_lost").sum()
        dup = _numbers(m, "frames_duplicated").sum()
        per_trial = (pd.to_numeric(m["frames_lost"], errors="coerce").fillna(0)
                     + pd.to_numeric(m["frames_duplicated"], errors="coerce").fillna(0))
        parts.append(f"{mode_label(mode)} {lost:,.0f} lost and {dup:,.0f} duplicated of "
                     f"{_numbers(m, 'frames_sent').sum():,.0f} sent in {len(m)} trials (median per trial "
                     f"{fmt_interval(median_ci(per_trial.to_numpy(dtype=float)))})")
    return "; ".join(parts) + "."


def floor_sentences(table: pd.DataFrame) -> list[str]:
    """The targets that are ratios to a floor, as sentences with their intervals (or why not measured)."""
    out = []
    by_name = {row["target"]: row for _, row in table.iterrows()}
    for key, sentence in FLOOR_TARGETS.items():
        row = by_name.get(TARGETS[key].name)
        if row is None:
            continue
        if row["verdict"] == NOT_MEASURED:
            out.append(sentence.format(r="not measured") + f" ({row['why']})")
            continue
        ci = Interval(float(row["measured"]), float(row["ci_low"]), float(row["ci_high"]), 2)
        out.append(sentence.format(r=fmt_ratio(ci)) + f" (target {row['threshold']}: {row['verdict']})")
    return out


def verdicts_of(table: pd.DataFrame) -> dict[str, list[str]]:
    """Targets per verdict, in the table's order, by key; a failing one with its figure and threshold:
    '`handover-floor` 39 [28.4, 46] vs ≤ 10'."""
    keys = {t.name: key for key, t in TARGETS.items()}
    out: dict[str, list[str]] = {}
    for _, row in table.iterrows():
        name = f"`{keys.get(str(row['target']), str(row['target']))}`"
        if row["verdict"] == FAIL and not pd.isna(row["measured"]):
            ci = Interval(float(row["measured"]), float(row["ci_low"]), float(row["ci_high"]), 2)
            name = f"{name} {fmt_interval(ci)} vs {row['threshold']}"
        out.setdefault(str(row["verdict"]), []).append(name)
    return out


def reference_for(results: str | os.PathLike | None = None) -> Path | None:
    """The run the summary compares with: $MIGFD_BASE, else the newest committed reference run (the
    checkout's, or the one shipped in the package). It may be ``results`` itself: the summary then says so."""
    base = os.environ.get(BASE_ENV)
    return Path(base) if base else newest_run(reference_dir())


def compare_json(base: str | os.PathLike, new: str | os.PathLike) -> dict:
    """What ``migfd compare BASE NEW --json`` prints, as a dict (its documented interface)."""
    from migfd.results import compare

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        compare.main(argparse.Namespace(base=str(base), new=str(new), json=True, out=None))
    return json.loads(out.getvalue())


def _count_line(changes: list[dict], key: str) -> str:
    verdicts = [c.get(key) for c in changes if c.get(key) is not None]
    order = ("regressed", "improved", "unchanged", "inconclusive")
    return ", ".join(f"{sum(v == name for v in verdicts)} {name}" for name in order)


def reference_sentence(base: str | os.PathLike | None, new: str | os.PathLike, new_meta: dict) -> str | None:
    """One line on what changed against the reference run: the machine first, then the code.

    None without a reference; a plain sentence when the run *is* the reference.
    The machine's verdict is ``migfd compare``'s (its ``machine`` field); a
    compare without it says only whether the CPU differs.
    """
    if base is None:
        return None
    if Path(base).resolve() == Path(new).resolve():
        return f"this run is the committed reference run (`{Path(base).name}`): nothing to compare it with."
    try:
        doc = compare_json(base, new)
    except MigrationError as exc:
        return f"not compared: {exc}"
    changes = doc.get("changes") or []
    base_meta = doc.get("base") or {}
    machine = doc.get("machine")
    if isinstance(machine, dict) and machine.get("verdict"):
        ratio = Interval(*(float(machine.get(k)) if machine.get(k) is not None else math.nan
                           for k in ("floor_ratio", "ci_low", "ci_high")), 2)
        said = {"faster": "this run's machine is **faster**", "slower": "this run's machine is **slower**",
                "same": "the machines are **alike**"}.get(machine["verdict"],
                                                         f"the machines: **{machine['verdict']}** by the floors")
        first = f"{said} (floor times, this run / the reference: {fmt_ratio(ratio)})"
    else:
        ref_cpu = _reference_cpu(base)
        cpu = new_meta.get("cpu_model")
        same = "the same CPU model" if ref_cpu and ref_cpu == cpu else f"CPU {cpu or '?'} vs {ref_cpu or '?'}"
        first = f"the machine was not compared by floors ({same})"
    text = (f"`{Path(base).name}` (host {base_meta.get('host') or '?'}): {first}; "
            f"the code, {len(changes)} point × metric comparisons: {_count_line(changes, 'verdict')}")
    if any("verdict_normalized" in c for c in changes):
        text += f"; normalized by the machine: {_count_line(changes, 'verdict_normalized')}"
    return text + ". (04-compare has the details.)"


def _reference_cpu(base: str | os.PathLike) -> str | None:
    meta = Path(base) / "metadata.json"
    try:
        return json.loads(meta.read_text()).get("cpu_model") if meta.is_file() else None
    except (OSError, ValueError):
        return None


TITLE = "fd-passing against state copy and real QEMU"


def run_line(meta: dict, path: str | os.PathLike | None) -> str:
    """'Run `<name>` on <host> (<CPU> × n), started <UTC>': which run the summary answers from."""
    host = meta.get("host") or "?"
    start = str(meta.get("start") or "?").replace("T", " ")
    name = Path(path).name if path is not None else "?"
    cpu = meta.get("cpu_model")
    count = meta.get("cpu_count")
    machine = f" ({cpu}{f' × {count}' if count else ''})" if cpu else ""
    return f"Run `{name}` on {host}{machine}, started {start}"


def run_summary(df: pd.DataFrame, meta: dict | None = None, *, path: str | os.PathLike | None = None,
                reference: str | os.PathLike | None = None) -> Summary:
    """Everything the summary shows, computed from the run's rows (``reference``: a run to compare with)."""
    meta = meta or {}
    outage = has_outage(df)
    answers = state_copy_answers(df, outage) + qemu_answers(df, outage)
    table = targets(df, meta)
    ref = reference_sentence(reference, path, meta) if reference is not None and path is not None else None
    return Summary(answers=answers, frames=frames_sentence(df), floors=floor_sentences(table),
                   verdicts=verdicts_of(table), reference=ref, title=TITLE, run_line=run_line(meta, path),
                   has_outage=outage and any(not math.isnan(a.fd_outage.value) for a in answers), df=df)


def _series_order(mode: str, version: Any, live: Any) -> tuple:
    modes = ["fd-passing", "state-copy", *QEMU_MODES]
    rank = modes.index(mode) if mode in modes else len(modes)
    return (rank, tuple(-p for p in _version_key(version or "0")), not (live is not pd.NA and bool(live)))


def plot_headline(df: pd.DataFrame) -> Figure:
    """Downtime (and outage, where the run has it) against guest RAM size: fd-passing, state copy, real QEMU.

    Medians with their 95% intervals as error bars, log-log; live solid, non-live
    dashed; outage drawn with hollow markers and dotted lines.
    """
    fig = Figure(figsize=(12.5, 4.4), layout="constrained", dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    rows = select(df)
    rows = rows[(rows["scenario"] == "ram-size") | ((rows["scenario"] == "qemu-peer")
                                                    & rows["mode"].isin(QEMU_MODES))]
    if (rows["variant"] == "filled").any():
        rows = rows[(rows["scenario"] != "qemu-peer") | (rows["variant"] == "filled")]
    if rows.empty:
        ax.text(0.5, 0.5, "no ram-size or qemu-peer trials in this run", ha="center", transform=ax.transAxes)
        return fig
    qemu = rows["scenario"] == "qemu-peer"
    rows = rows.assign(_down=rows["downtime_ns"].astype("float64"))
    rows.loc[qemu, "_down"] = qemu_downtime(rows[qemu])
    metrics = [("_down", "downtime")]
    if has_outage(rows):
        rows = rows.assign(_out=pd.to_numeric(rows[OUTAGE], errors="coerce").astype("float64"))
        metrics.append(("_out", "outage"))
    sizes = sorted(rows["ram_bytes"].dropna().unique())
    for column, what in metrics:
        pts_all = summarize(rows, column)
        groups = sorted(pts_all.groupby(["mode", "peer_version", "live"], dropna=False),
                        key=lambda item: _series_order(*item[0]))
        for (mode, version, live), pts in groups:
            pts = pts.dropna(subset=["median"]).sort_values("ram_bytes")
            if pts.empty:
                continue
            x = pts["ram_bytes"].astype(float).to_numpy()
            y = pts["median"].to_numpy() / 1e6
            low = np.nan_to_num((pts["median"] - pts["ci_low"]).to_numpy() / 1e6)
            high = np.nan_to_num((pts["ci_high"] - pts["median"]).to_numpy() / 1e6)
            label = mode_label(mode).replace("real QEMU", f"QEMU {version}" if version else "real QEMU")
            label += f", {_live_word(live)}" if mode in ("fd-passing", "state-copy") else ""
            label += f": {what}"
            outage_line = column == "_out"
            style = ":" if outage_line else ("--" if live is not pd.NA and not bool(live) else "-")
            marker = {"qemu-cpr-transfer": "v", "qemu-ram-shared": "D", "qemu-ram-copied": "^"}.get(mode, "o")
            if str(version).startswith("7."):
                marker = {"D": "d", "^": "<"}.get(marker, marker)
            ax.errorbar(x, y, yerr=[low, high], label=label, color=COLORS.get(mode, "#17becf"), linestyle=style,
                        marker=marker, markersize=5, capsize=3, linewidth=1.4,
                        alpha=0.55 if str(version).startswith("7.") else 1.0,
                        markerfacecolor="none" if outage_line else None)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks([float(s) for s in sizes])
    ax.set_xticklabels([fmt_bytes(float(s)) for s in sizes])
    ax.minorticks_off()
    ax.set_xlabel("guest RAM size")
    ax.set_ylabel("ms (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    what = "downtime and outage" if len(metrics) > 1 else "downtime"
    ax.set_title(f"The guest's pause ({what}) against RAM size: medians, 95% intervals; dashed: non-live",
                 fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    if len(sizes) and min(sizes) < MiB:
        ax.set_xlim(left=min(sizes) / 2)
    return fig
