"""Saying where and when a run was made, what it skipped, and why a scenario has no rows to show."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from migfd.results.load import select


def describe_run(metadata: dict, path: str | os.PathLike | None = None) -> str:
    """A few Markdown lines saying where and when a run was made, and what it skipped."""
    m = metadata or {}

    def get(*keys: str) -> str:
        for k in keys:
            v = m.get(k)
            if isinstance(v, dict):
                v = v.get("model") or v.get("name") or json.dumps(v)
            if v not in (None, ""):
                return str(v)
        return "?"

    lines = []
    if path is not None:
        p = Path(path)
        kind = "committed reference run" if "reference" in p.parts else "run"
        lines.append(f"**Results:** `{p}` ({kind})")
    cpu = m.get("cpu") if isinstance(m.get("cpu"), dict) else {}
    cpu_model = cpu.get("model") if cpu else None
    cpu_count = cpu.get("count") if cpu else None
    lines.append(f"**Host:** {get('host', 'hostname')}, kernel {get('kernel')}, "
                 f"CPU {cpu_model or get('cpu_model')} × {cpu_count or get('cpu_count')}, "
                 f"Python {get('python', 'python_version')}")
    dirty = " (with uncommitted changes)" if m.get("git_dirty") else ""
    lines.append(f"**Time (UTC):** {get('start', 'start_time')} → {get('end', 'end_time')}; "
                 f"git {get('git_revision', 'git', 'revision')}{dirty}")
    load = m.get("loadavg_start"), m.get("loadavg_end")
    if all(isinstance(v, list) and v for v in load):
        governor = m.get("cpu_governor")
        gov = ", ".join(f"{k} ×{v}" for k, v in governor.items()) if isinstance(governor, dict) else "not readable"
        lines.append(f"**Load average (1 min):** {load[0][0]:.2f} at the start, {load[1][0]:.2f} at the end "
                     f"(the benchmark's own load included); CPU frequency governor: {gov}")
    limits = m.get("socket_limits")
    if isinstance(limits, dict) and limits:
        lines.append("**Socket limits:** " + ", ".join(f"{k} {v}" for k, v in limits.items()))
    options = m.get("options")
    if isinstance(options, dict):
        shown = {k: v for k, v in options.items() if k != "argv"}
        lines.append(f"**Options:** `{json.dumps(shown, sort_keys=True)}`")
    if m.get("note"):
        lines.append(f"**Note:** {m['note']}")
    scen = m.get("scenarios")
    if isinstance(scen, dict) and scen:
        ran = [n for n, s in scen.items() if isinstance(s, dict) and s.get("ran")]
        skipped = [(n, s.get("reason", "")) for n, s in scen.items() if isinstance(s, dict) and not s.get("ran")]
        lines.append(f"**Scenarios run:** {', '.join(ran) or 'none'}")
        for name, reason in skipped:
            lines.append(f"**Skipped:** {name} — {reason or 'no reason given'}")
    busy = busy_note(m)
    if busy:
        lines.append(f"**⚠ Warning:** {busy}")
    warnings = m.get("warnings")
    if isinstance(warnings, dict):
        # the runner counts repeats: {text: times}
        warnings = [f"{k} (×{v})" if isinstance(v, int) and not isinstance(v, bool) and v > 1 else str(k)
                    for k, v in warnings.items()]
    for text in list(warnings or [])[:10]:
        lines.append(f"**Warning:** {text}")
    failed = m.get("failed_rows")
    if failed:
        lines.append(f"**Failed trials:** {failed} of {m.get('rows', '?')} rows have ok=False "
                     f"(kept in results.csv with their error; left out of medians)")
    return "  \n".join(lines)


#: "Busy": the 1-minute load average before the run above this share of the CPUs ...
BUSY_LOAD_PER_CPU = 0.75
#: ... or other processes using more than this much of one CPU (percent) when it started or ended.
BUSY_OTHER_CPU_PERCENT = 50.0


def busy_note(metadata: dict | None) -> str:
    """Why the machine counts as busy for this run, or '' if it was quiet (or the run did not record it).

    Busy means: the 1-minute load average at the start was above
    :data:`BUSY_LOAD_PER_CPU` per CPU, or processes other than the benchmark
    used more than :data:`BUSY_OTHER_CPU_PERCENT` % of one CPU in the sample
    taken at the start or at the end. The load at the end is not used: the
    benchmark's own load is in it.
    """
    m = metadata or {}
    reasons = []
    cpus = m.get("cpu_count") or 1
    load = m.get("loadavg_start")
    if isinstance(load, list) and load and load[0] > BUSY_LOAD_PER_CPU * cpus:
        reasons.append(f"load average {load[0]:.2f} at the start on {cpus} CPUs "
                       f"(more than {BUSY_LOAD_PER_CPU} per CPU)")
    for when in ("start", "end"):
        procs = m.get(f"busy_processes_{when}")
        if not isinstance(procs, list):
            continue
        total = sum(p.get("cpu_percent", 0) for p in procs if isinstance(p, dict))
        if total > BUSY_OTHER_CPU_PERCENT:
            top = ", ".join(f"{p.get('comm')} ({p.get('cpu_percent'):.0f}%)" for p in procs[:3])
            reasons.append(f"other processes used {total:.0f}% of a CPU at the {when} ({top})")
    if not reasons:
        return ""
    return "the machine was busy: " + "; ".join(reasons) + ". Its timings may be slower and noisier."


def scenario_info(metadata: dict | None, scenario: str) -> dict:
    """What the run's metadata says about ``scenario`` ({} if nothing)."""
    info = ((metadata or {}).get("scenarios") or {}).get(scenario)
    return info if isinstance(info, dict) else {}


def skip_reason(metadata: dict | None, scenario: str) -> str | None:
    """Why ``scenario`` did not run, from metadata["scenarios"], or None if it ran (or we don't know)."""
    info = scenario_info(metadata, scenario)
    if not info.get("ran", True):
        return info.get("reason") or "skipped, no reason given"
    return None


def why_absent(df: pd.DataFrame, metadata: dict | None, scenario: str, what: str) -> str:
    """Why there are no usable rows of ``scenario``: skipped, all failed, or never written."""
    reason = skip_reason(metadata, scenario)
    if reason:
        return f"scenario {scenario} was skipped: {reason}"
    chosen = ((metadata or {}).get("options") or {}).get("scenarios")
    if isinstance(chosen, list) and chosen and scenario not in chosen:
        return f"scenario {scenario} was not selected in this run (options: {', '.join(chosen)})"
    rows = select(df, scenario, ok=None)
    if not rows.empty and not rows["ok"].fillna(False).astype(bool).any():
        first = next((e for e in rows["error"] if e), "no error text")
        return f"all {len(rows)} trials of {scenario} failed; first error: {first}"
    if rows.empty:
        return f"no {scenario} rows in results.csv"
    return f"no {what} in the {scenario} rows"
