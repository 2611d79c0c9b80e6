"""``migfd bench`` in its quickest form: real VM processes, real sockets, a tmp output dir.

Nothing here checks a timing: the targets are read from benchmark results, not
asserted by tests. What is checked is the contract with the notebooks
(docs/RESULTS.md): the columns, one row per trial, the metadata keys, failed
trials as rows, skipped scenarios with their reason.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
from pathlib import Path

import pytest

from migfd.bench import runner
from migfd.bench.scenario import tap_available
from migfd.paths import repo_root
from migfd.peers import qemu
from migfd.units import MiB

RESULTS_MD = repo_root() / "docs" / "RESULTS.md"

REQUIRED_COLUMNS = (
    "scenario", "mode", "backend", "ram_bytes", "n_fds", "dirty_rate_bytes_s", "live", "trial",
    "downtime_ns", "total_ns", "setup_ns", "bytes_sent", "fds_passed", "frames_sent", "frames_lost",
    "frames_duplicated", "max_gap_ns", "ok", "error",
)
METADATA_KEYS = ("git_revision", "host", "kernel", "cpu_model", "cpu_count", "python", "packages",
                 "start", "end", "options", "scenarios")


def bench(out: Path, scenarios: list[str], **extra) -> int:
    args = argparse.Namespace(quick=True, scenarios=scenarios, trials=1, out=str(out), **extra)
    return runner.main(args)


def read_rows(out: Path) -> tuple[list[str], list[dict]]:
    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """ram-size at one tiny RAM size plus one impossible one (not a multiple of a
    page: the VM refuses to start), then limits; one trial each."""
    out = tmp_path_factory.mktemp("bench") / "run"
    assert bench(out, ["ram-size", "limits"], ram_sizes=[16 * MiB + 1, 16 * MiB]) == 0
    return out


def test_csv_has_the_schema_columns(run):
    columns, _ = read_rows(run)
    assert set(REQUIRED_COLUMNS) <= set(columns)
    assert columns == list(runner.COLUMNS)


def test_every_column_is_documented():
    documented = set(re.findall(r"`([a-z_]+)`", RESULTS_MD.read_text()))
    assert set(runner.COLUMNS) <= documented


def test_one_row_per_trial(run):
    _, rows = read_rows(run)
    ram = [r for r in rows if r["scenario"] == "ram-size"]
    # 2 sizes x live/non-live x fd-passing/state-copy x 1 trial
    assert len(ram) == 8
    keys = {(r["ram_bytes"], r["live"], r["mode"], r["trial"]) for r in ram}
    assert len(keys) == 8
    assert {r["mode"] for r in ram} == {"fd-passing", "state-copy"}


def test_ok_rows_have_positive_times(run):
    _, rows = read_rows(run)
    ram_ok = [r for r in rows if r["scenario"] == "ram-size" and r["ok"] == "True"]
    assert len(ram_ok) == 4  # the 16 MiB trials
    for r in ram_ok:
        assert int(r["ram_bytes"]) == 16 * MiB
        assert int(r["downtime_ns"]) > 0
        assert int(r["total_ns"]) >= int(r["downtime_ns"])
        assert r["error"] == ""
    fd = [r for r in ram_ok if r["mode"] == "fd-passing"]
    assert all(int(r["fds_passed"]) == 1 for r in fd)
    copy = [r for r in ram_ok if r["mode"] == "state-copy"]
    assert all(int(r["fds_passed"]) == 0 and int(r["bytes_sent"]) > 16 * MiB for r in copy)


def test_a_failed_trial_is_a_row_and_the_run_goes_on(run):
    _, rows = read_rows(run)
    failed = [r for r in rows if r["ok"] == "False"]
    assert len(failed) == 4
    for r in failed:
        assert int(r["ram_bytes"]) == 16 * MiB + 1
        assert "multiple of 4096" in r["error"]
        assert "\n" not in r["error"]
    # what came after the failures ran: the good RAM size, then limits
    assert any(r["scenario"] == "limits" and r["ok"] == "True" for r in rows)


def test_limits_rows(run):
    _, rows = read_rows(run)
    limits = {r["variant"]: r for r in rows if r["scenario"] == "limits"}
    assert {"fd-roundtrip", "unix-throughput", "memcpy", "handover-floor"} <= set(limits)
    for r in limits.values():
        assert r["mode"] == "floor"
        assert r["ok"] == "True"
        assert int(r["total_ns"]) > 0
        assert float(r["value"]) > 0 and r["unit"]
    assert limits["unix-throughput"]["unit"] == "bytes/s"
    assert limits["fd-roundtrip"]["unit"] == "ns/fd"
    assert int(limits["handover-floor"]["n_fds"]) >= 2
    # beside the handover floor: its parts, and (with a TAP) itself under tap-traffic's probe frames
    handovers = ["handover-floor", "handover-oneway", "commit-roundtrip"]
    if tap_available() is None:
        handovers.append("handover-floor-loaded")
        assert int(limits["handover-floor-loaded"]["frames_sent"]) > 0
    for variant in handovers:
        assert limits[variant]["unit"] == "ns", variant
        for key in ("backend", "n_fds", "device_state_bytes", "fds_passed"):
            assert limits[variant][key] == limits["handover-floor"][key], (variant, key)
    unbatched = limits["fd-roundtrip-unbatched"]
    assert unbatched["unit"] == "ns/fd" and unbatched["fd_messages"] == unbatched["n_fds"]
    meta = json.loads((run / "metadata.json").read_text())
    assert ("not measured" in meta["scenarios"]["limits"]["handover_load"]) == (tap_available() is not None)


def test_metadata(run):
    meta = json.loads((run / "metadata.json").read_text())
    for key in METADATA_KEYS:
        assert key in meta, key
    assert meta["git_revision"]
    assert meta["end"] is not None and meta["start"] <= meta["end"]
    assert meta["options"]["quick"] is True
    assert meta["options"]["trials"] == 1
    assert "argv" in meta["options"]
    assert meta["options"]["scenarios"] == ["ram-size", "limits"]
    assert meta["packages"]["qemu.qmp"]
    for name in ("ram-size", "limits"):
        assert meta["scenarios"][name]["ran"] is True
    assert meta["rows"] == len(read_rows(run)[1])
    assert meta["failed_rows"] == 4
    # what could bias the run
    for key in ("loadavg_start", "loadavg_end", "busy_processes_start", "busy_processes_end",
                "cpu_governor", "socket_limits"):
        assert key in meta, key
    assert meta["socket_limits"]["net.core.rmem_max"] > 0 and "net.unix.max_dgram_qlen" in meta["socket_limits"]
    assert all({"pid", "comm", "cpu_percent"} <= set(p) for p in meta["busy_processes_start"])
    # trials per point, and why no more: --trials fixes the count
    points = meta["scenarios"]["ram-size"]["trials_per_point"]
    assert len(points) == 8 and all(p["trials"] == 1 and p["reason"] == "fixed" for p in points)


def test_skipped_scenario_is_recorded_with_its_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(qemu, "QEMU_BINARY", "qemu-system-migfd-absent")
    monkeypatch.delenv(qemu.QEMU_ENV, raising=False)  # no QEMU at all, not even one given
    out = tmp_path / "skip"
    assert bench(out, ["qemu-peer"]) == 0
    meta = json.loads((out / "metadata.json").read_text())
    info = meta["scenarios"]["qemu-peer"]
    assert info["ran"] is False
    assert "not installed" in info["reason"]
    _, rows = read_rows(out)
    assert rows == []


def test_unknown_scenario_is_refused(tmp_path, capsys):
    assert bench(tmp_path / "x", ["no-such-scenario"]) == 2
    assert "unknown scenario" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def qemu_run(tmp_path_factory) -> Path:
    """qemu-peer at one tiny RAM size, one trial: the scenario that makes /dev/shm files for RAM."""
    system = qemu.qemu_binary()
    if system is None:
        pytest.skip(f"{qemu.QEMU_BINARY} is not installed: qemu-peer cannot run here")
    # Installed, it must work: a QEMU that find_qemus cannot describe fails here, never skips.
    assert [q.path for q in qemu.find_qemus([])] == [os.path.abspath(system)]
    out = tmp_path_factory.mktemp("bench-qemu") / "run"
    assert bench(out, ["qemu-peer"], ram_sizes=[16 * MiB]) == 0
    return out


def test_qemu_peer_ran_and_left_no_ram_file(qemu_run):
    _, rows = read_rows(qemu_run)
    meta = json.loads((qemu_run / "metadata.json").read_text())
    assert meta["scenarios"]["qemu-peer"]["ran"] is True, meta["scenarios"]["qemu-peer"]
    assert any(r["scenario"] == "qemu-peer" and r["ok"] == "True" for r in rows)
    # its RAM files (named after this process) are gone, and so are its QEMUs
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"migfd-bench-{os.getpid()}-")]
    assert _children() == []


def _children() -> list[str]:
    """Processes whose parent is this one (every VM, QEMU and limits child of a run must be gone)."""
    children = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid():
            children.append(pid)
    return children


def test_no_process_left_behind(run):
    assert _children() == []
