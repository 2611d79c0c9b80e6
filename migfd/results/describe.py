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
