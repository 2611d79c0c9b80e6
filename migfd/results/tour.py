"""What the protocol tour (notebook 01) shows: a stream's records as a table and a hex dump, and the
demo migrations side by side.

The records come from the stream layer's one walk
(:func:`migfd.stream.annotate.annotate_sink`); the migrations from
:func:`migfd.peers.demo.demo_migration`. Here they are only laid out.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

import pandas as pd

from migfd.peers.demo import DemoMigration
from migfd.results.summary import fmt_ns
from migfd.stream.annotate import AnnotatedRecord, annotate_sink
from migfd.stream.reader import Lookup
from migfd.stream.vmstate import VMStateDescription
from migfd.stream.writer import MemorySink

LAYOUT_COLUMNS = [f.name for f in dataclasses.fields(AnnotatedRecord)]


def annotate_stream(sink: MemorySink,
                    vmsds: Mapping[str, VMStateDescription] | Lookup | None = None) -> pd.DataFrame:
    """What every byte range of the stream in ``sink`` means: rows (offset, size, kind, section, text).

    The ranges tile the stream in order; the caller's fds stay open.
    """
    records = annotate_sink(sink, vmsds)
    return pd.DataFrame([dataclasses.astuple(r) for r in records], columns=LAYOUT_COLUMNS)


def hexdump(data: bytes, layout: pd.DataFrame, max_bytes: int = 16) -> str:
    """Text: one line per record of ``layout`` (from :func:`annotate_stream`): offset, bytes, what they are.

    Records longer than ``max_bytes`` show their first bytes and how many more follow.
    """
    lines = [f"{'offset':>6}  {'bytes':<{3 * max_bytes + 8}}  record: meaning"]
    for off, size, kind, text in layout[["offset", "size", "kind", "text"]].itertuples(index=False):
        chunk = data[off:off + min(size, max_bytes)]
        shown = " ".join(f"{b:02x}" for b in chunk)
        if size > max_bytes:
            shown += f" …+{size - max_bytes}"
        lines.append(f"{off:06x}  {shown:<{3 * max_bytes + 8}}  {kind}: {text}")
    return "\n".join(lines)


def demo_table(runs: Iterable[DemoMigration]) -> pd.DataFrame:
    """The demo migrations side by side: one column per run, keyed by backend-transfer."""
    rows = []
    for run in runs:
        s, d = run.migration.source, run.migration.destination
        verify, seen = run.ram_verify, run.chardev
        rows.append({
            "backend-transfer": run.backend_transfer,
            "status (source / destination)": f"{s.get('status')} / {d.get('status')}",
            "error": run.migration.error or "",
            "downtime": fmt_ns(s.get("x-downtime-ns", float("nan"))),
            "total time": fmt_ns(s.get("x-total-time-ns", float("nan"))),
            "bytes through the channel": s.get("x-bytes-sent"),
            "RAM pages sent (normal / zero)": f"{s.get('ram', {}).get('normal')} / {s.get('ram', {}).get('duplicate')}",
            "fds passed (in sendmsg calls)": f"{s.get('x-fds-passed')} ({s.get('x-fd-messages')})",
            "device-state bytes": s.get("x-device-state-bytes"),
            "run state (source / destination)": " / ".join(run.run_state),
            "destination RAM verified": f"{verify.get('ok')} ({verify.get('pages')} pages)" if verify else "n/a",
            "chardev client: lines sent / lost": f"{seen.lines_sent} / {len(seen.lost)}",
            "chardev client: reconnects": seen.reconnects,
            "chardev client: longest silence": fmt_ns(seen.max_gap_ns),
        })
    return pd.DataFrame(rows).set_index("backend-transfer").T
