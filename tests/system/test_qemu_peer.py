"""``migfd bench --qemu``: which QEMUs qemu-peer uses, and one real run of QEMU 10.0 beside the system's.

The run needs QEMU 10.0 from ``tools/fetch-qemu.sh`` (``make test`` fetches it
as root on Debian 12) or in ``$MIGFD_QEMU``; without it that part skips. Nothing
here checks a timing: the rows' shape, what each mode moves, and that QEMU's
trace and its QMP events agree on one clock.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
from pathlib import Path

import pytest

from migfd.bench import runner
from migfd.bench.scenarios.qemu_peer import MACHINE, accels, qemu_argv
from migfd.cli import main as cli_main
from migfd.errors import MigrationError
from migfd.paths import repo_root
from migfd.peers.qemu import QEMU_ENV, QemuProcess, describe_qemu, qemu_binary, requested_qemus
from migfd.units import MiB

RAM = 16 * MiB


def fake_qemu(tmp_path: Path, name: str, banner: str) -> str:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\necho '{banner}'\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("case", ["missing", "not-qemu", "same-version"])
def test_a_bad_qemu_is_one_clear_error(tmp_path, capsys, monkeypatch, case):
    monkeypatch.delenv(QEMU_ENV, raising=False)
    if case == "missing":
        qemus, expected = [str(tmp_path / "absent")], "is not an executable file"
    elif case == "not-qemu":
        qemus, expected = [fake_qemu(tmp_path, "other", "hello 1.0")], "is not QEMU: --version says 'hello 1.0'"
    else:
        qemus = [fake_qemu(tmp_path, f"q{i}", "QEMU emulator version 9.9.9 (fake)") for i in (1, 2)]
        expected = "are both QEMU 9.9.9"
    out = tmp_path / "run"
    argv = ["bench", "--scenario", "qemu-peer", "--out", str(out)]
    for q in qemus:
        argv += ["--qemu", q]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("migfd bench: error: --qemu") and expected in err
    assert "\n" not in err and "Traceback" not in err
    assert not out.exists()


def test_migfd_qemu_is_read_and_empty_means_unset(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(QEMU_ENV, f"{tmp_path / 'absent'}")
    assert cli_main(["bench", "--scenario", "qemu-peer", "--out", str(tmp_path / "a")]) == 2
    assert "absent is not an executable file" in capsys.readouterr().err
    monkeypatch.setenv(QEMU_ENV, "")
    monkeypatch.setattr("migfd.peers.qemu.QEMU_BINARY", "qemu-system-migfd-absent")
    assert cli_main(["bench", "--scenario", "qemu-peer", "--out", str(tmp_path / "b")]) == 0
    meta = json.loads((tmp_path / "b" / "metadata.json").read_text())
    assert meta["qemus"] == [] and meta["options"]["qemu"] == []
    assert "no --qemu was given" in meta["scenarios"]["qemu-peer"]["reason"]


def _qemu_10() -> str | None:
    for path in requested_qemus(None, os.environ.get(QEMU_ENV)) + [str(repo_root() / ".qemu" / "qemu-10.0")]:
        try:
            if describe_qemu(path).at_least(10, 0):
                return path
        except MigrationError:
            continue
    return None


QEMU_10 = _qemu_10()
needs_qemu_10 = pytest.mark.skipif(QEMU_10 is None, reason="no QEMU 10.0: tools/fetch-qemu.sh unpacks it "
                                                           "(make test runs it as root on Debian 12)")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """qemu-peer at 16 MiB, one trial per QEMU, mode and variant."""
    out = tmp_path_factory.mktemp("qemu-peer") / "run"
    args = argparse.Namespace(quick=True, scenarios=["qemu-peer"], trials=1, out=str(out), qemu=[QEMU_10],
                              ram_sizes=[RAM])
    assert runner.main(args) == 0
    return out


def rows_of(out: Path, name: str = "results.csv") -> list[dict]:
    with open(out / name, newline="") as f:
        return list(csv.DictReader(f))


@needs_qemu_10
def test_every_qemu_version_mode_and_variant_is_a_row(run):
    rows = rows_of(run)
    ten = describe_qemu(QEMU_10).version
    system = qemu_binary()
    versions = {ten} | ({describe_qemu(system).version} if system else set())
    assert {r["peer_version"] for r in rows} == versions
    got = {(r["peer_version"], r["mode"], r["variant"], r["accel"]) for r in rows}
    modes = {"qemu-ram-copied", "qemu-ram-shared"}
    expected = {(v, m, var, accel) for v in versions for m in modes | ({"qemu-cpr-transfer"} if v == ten else set())
                for var in ("idle", "filled") for accel in accels()}
    assert got == expected and len(rows) == len(expected)
    bad = [(r["peer_version"], r["mode"], r["variant"], r["error"]) for r in rows if r["ok"] != "True"]
    assert bad == []
    meta = json.loads((run / "metadata.json").read_text())
    assert {q["version"] for q in meta["qemus"]} == versions
    assert os.path.realpath(QEMU_10) in {os.path.realpath(q["path"]) for q in meta["qemus"]}
    device_state = meta["scenarios"]["qemu-peer"]["device_state"]
    assert all(device_state[v]["sections"] > 0 and device_state[v]["bytes"] > 0 for v in versions)


@needs_qemu_10
def test_the_outside_observer_sees_at_least_qemus_own_pause(run):
    """The guest cannot count between QEMU's STOP and RESUME events: the observer's outage covers them.

    The events carry µs; the observer maps their wall-clock time onto its own
    clock and samples every 100 µs. A copied RAM's page written twice into the
    destination's file while nothing runs must not end the outage early.
    """
    for r in rows_of(run):
        outage, paused = int(r["outage_ns"]), int(r["stop_resume_ns"])
        assert outage >= paused - 200_000, (r["peer_version"], r["mode"], r["variant"], r["accel"], outage, paused)
        assert r["observer_realtime"] in ("True", "False") and r["precopy_stall_ns"] != ""


@needs_qemu_10
def test_what_each_mode_moves(run):
    for r in rows_of(run):
        sent, ram = int(r["bytes_sent"]), int(r["ram_bytes"])
        assert int(r["downtime_ns"]) > 0 and int(r["stop_resume_ns"]) > 0
        assert int(r["device_sections"]) > 0 and int(r["device_state_bytes"]) > 0
        if r["mode"] == "qemu-ram-copied":
            # filled: nearly every page travels whole; idle: zero pages travel as a few bytes each
            assert (sent > ram / 2) if r["variant"] == "filled" else (sent < ram / 4)
        else:
            assert sent < ram / 4  # RAM skipped (x-ignore-shared) or handed over (cpr-transfer)
        if r["mode"] == "qemu-cpr-transfer":
            assert r["peer_version"].startswith("10.")
            assert int(r["fds_passed"]) >= 1  # at least guest RAM's memfd
        else:
            assert int(r["fds_passed"]) == 0


@needs_qemu_10
def test_cpr_transfer_timeline_agrees_with_the_qmp_events(run):
    timelines = rows_of(run, "timelines.csv")
    for r in rows_of(run):
        if r["mode"] != "qemu-cpr-transfer":
            continue
        phases = {}
        for p in timelines:
            if p["trial_id"] == r["trial_id"] and not p["phase"].startswith(("save:", "load:")):
                phases[(p["side"], p["phase"])] = (int(p["start_ns"]), int(p["end_ns"]))
        assert all(start <= end for start, end in phases.values())
        assert phases[("source", "stop")][0] == 0  # the origin: src-downtime-start
        order = [phases[("source", "stop")], phases[("source", "iterable-save")],
                 phases[("source", "device-save")], phases[("source", "completion")]]
        assert all(a[1] == b[0] for a, b in zip(order, order[1:]))
        assert phases[("destination", "loadvm")][1] == phases[("destination", "bh-wait")][0]
        # QEMU emits STOP inside vm_stop and RESUME inside vm_start: one clock for trace and events
        stop_event, resume_event = phases[("source", "STOP")][0], phases[("destination", "RESUME")][0]
        assert phases[("source", "stop")][0] <= stop_event <= phases[("source", "stop")][1]
        assert phases[("destination", "announce")][1] <= resume_event <= phases[("destination", "vm-start")][1]
        assert resume_event - stop_event == int(r["stop_resume_ns"])
        assert (run / "traces" / f"{r['trial_id']}.json").is_file()


@needs_qemu_10
def test_nothing_left_behind(run):
    children = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                        children.append(pid)
            except (OSError, IndexError, ValueError):
                continue
    assert children == []
    assert not [p for p in os.listdir("/dev/shm") if p.startswith(f"migfd-bench-{os.getpid()}-")]


def _qemus() -> list[str]:
    return [q for q in (qemu_binary(), QEMU_10) if q]


@pytest.mark.skipif(not _qemus(), reason="no QEMU installed")
@pytest.mark.parametrize("kind", ["file", "memfd"])
@pytest.mark.parametrize("path", _qemus() or ["none"])
def test_which_shared_ram_x_ignore_shared_skips(tmp_path, path, kind):
    """Why qemu-ram-shared maps a file on /dev/shm: 7.2 and 10.0 skip it; 10.0 copies a shared memfd.

    (7.2 skips a shared memfd too, but its destination then maps a new, empty one.)
    """
    q = describe_qemu(path)
    shm = f"/dev/shm/migfd-bench-{os.getpid()}-xis-{kind}"
    backend = (f"memory-backend-file,id=ram0,size=16M,mem-path={shm},share=on" if kind == "file"
               else "memory-backend-memfd,id=ram0,size=16M,share=on")
    ram = ["-M", MACHINE, "-m", "16M", "-object", backend]

    async def migrate() -> dict:
        src = QemuProcess("src", tmp_path, qemu_argv(q, "src", str(tmp_path / "src.qmp"), ram, trace=False))
        dst = QemuProcess("dst", tmp_path, qemu_argv(q, "dst", str(tmp_path / "dst.qmp"), ram,
                                                     incoming=["defer"], trace=False))
        try:
            await asyncio.gather(src.start(), dst.start())
            for side in (src, dst):
                await side.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "x-ignore-shared", "state": True}]})
            await dst.execute("migrate-incoming", {"uri": f"unix:{tmp_path}/m.sock"})
            await src.execute("migrate", {"uri": f"unix:{tmp_path}/m.sock"})  # a paused guest: -S
            return await src.wait_migration(60)
        finally:
            for side in (src, dst):
                if side.qmp is not None:
                    await side.quit()
                side.kill()

    try:
        info = asyncio.run(migrate())
    finally:
        if os.path.exists(shm):
            os.unlink(shm)
    assert info["status"] == "completed"
    pages = info["ram"]["normal"] + info["ram"]["duplicate"]
    guest_pages = 16 * MiB // 4096
    skipped = kind == "file" or not q.at_least(10, 0)
    # skipped: only the ROM blocks' pages travel; copied: every page of guest RAM
    assert (pages < guest_pages // 4) if skipped else (pages >= guest_pages)
