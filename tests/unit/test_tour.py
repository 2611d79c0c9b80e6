"""The protocol tour's tables (notebook 01): a stream's records as a table and a hex dump, and
demo migrations side by side.

The streams are written here by the codec; the demo migrations are FIXTURES
(round numbers in the shape ``demo_migration`` returns), not measurements.
"""

from __future__ import annotations

import os
import socket


from migfd.devices import ChardevSocket
from migfd.peers.chardev import ChardevReport
from migfd.peers.demo import DemoMigration
from migfd.peers.migrate import MigrationResult
from migfd.results.tour import annotate_stream, demo_table, hexdump
from migfd.stream import MemorySink, RamBlock, StreamWriter


MS = 1_000_000  # ns


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_annotate_stream_names_every_record_and_the_fd_records():
    sink = MemorySink()
    w = StreamWriter(sink)
    w.write_header()
    w.write_configuration("migfd-pc", ["backend-transfer"])
    w.write_ram_start([RamBlock("ram0", 2 * 4096)])
    w.write_ram_part([("ram0", 0, bytes(4096)), ("ram0", 4096, b"\x01" * 4096)])
    w.write_switchover_start()
    w.write_ram_part([], end=True)
    listener, client = socket.socketpair()
    before = open_fds()
    try:
        w.write_section_full("ch0", 0, ChardevSocket.vmsd, {
            "path": b"/p", "connected": True, "lines_echoed": 1, "pending": b"",
            "listener_fd": listener.fileno(), "client_fd": client.fileno()})
        w.write_eof()
        w.write_vmdesc()
        layout = annotate_stream(sink, {"ch0": ChardevSocket.vmsd})
        assert open_fds() == before  # the reader's duplicates are closed again
    finally:
        listener.close()
        client.close()
    data = sink.getvalue()
    # the ranges tile the stream exactly
    assert layout["offset"].iloc[0] == 0
    assert (layout["offset"] + layout["size"]).iloc[-1] == len(data)
    assert (layout["offset"].iloc[1:].to_numpy() == (layout["offset"] + layout["size"]).iloc[:-1].to_numpy()).all()
    records = layout["kind"].tolist()
    assert records[0] == "header" and records[1].startswith("configuration")
    assert records.count("fd record") == 2
    for off in layout.loc[layout["kind"] == "fd record", "offset"]:
        assert data[off] == 0x20
    assert records[-2:] == ["EOF (0x00)", "vmdesc (0x06)"]
    dump = hexdump(data, layout)
    assert dump.splitlines()[1].startswith("000000  51 45 56 4d 00 00 00 03")


def demo_run(backend_transfer: bool, **source) -> DemoMigration:
    """A demo migration as demo_migration returns it, with round numbers."""
    src = {"status": "completed", "x-downtime-ns": 1_500_000, "x-total-time-ns": 20 * MS,
           "x-bytes-sent": 900, "ram": {"normal": 0, "duplicate": 0}, "x-fds-passed": 3,
           "x-fd-messages": 3, "x-device-state-bytes": 400, **source}
    return DemoMigration(backend_transfer, MigrationResult(src, {"status": "completed"}, 30 * MS),
                         ("postmigrate", "running"), {"ok": True, "pages": 16384},
                         ChardevReport(lines_sent=1000, lines_echoed=1000, reconnects=0, max_gap_ns=2 * MS))


def test_demo_table_puts_the_runs_side_by_side():
    failed = demo_run(False, **{"status": "failed", "error-desc": "boom", "x-downtime-ns": None})
    failed = DemoMigration(False, failed.migration, ("paused", "inmigrate"), {}, failed.chardev)
    t = demo_table([demo_run(True), failed])
    assert list(t.columns) == [True, False]
    assert t.loc["status (source / destination)", True] == "completed / completed"
    assert t.loc["downtime", True] == "1.5 ms" and t.loc["total time", True] == "20 ms"
    assert t.loc["fds passed (in sendmsg calls)", True] == "3 (3)"
    assert t.loc["RAM pages sent (normal / zero)", True] == "0 / 0"
    assert t.loc["destination RAM verified", True] == "True (16384 pages)"
    assert t.loc["chardev client: lines sent / lost", True] == "1000 / 0"
    assert t.loc["chardev client: longest silence", True] == "2 ms"
    assert t.loc["error", False] == "boom" and t.loc["destination RAM verified", False] == "n/a"
    assert t.loc["run state (source / destination)", False] == "paused / inmigrate"
