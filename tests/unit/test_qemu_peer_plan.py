"""The qemu-peer scenario without QEMU: which QEMUs are asked for, the command lines, the plan."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from migfd.bench.runner import COLUMNS, failed_row
from migfd.bench.scenario import BenchContext
from migfd.bench.scenarios.qemu_peer import (
    COPIED, CPR, FILLED, IDLE, SHARED, QemuPeer, cpr_channels, modes_of, qemu_argv, ram_argv,
)
from migfd.errors import MigrationError
from migfd.peers.qemu import QemuBinary, _read_greeting_and_reply, requested_qemus, write_counting_bios
from migfd.units import GiB, MiB

QEMU_72 = QemuBinary("/usr/bin/qemu-system-x86_64", "7.2.22", "QEMU emulator version 7.2.22",
                     frozenset({"savevm_state_setup", "loadvm_state_setup"}))
QEMU_10 = QemuBinary("/x/.qemu/qemu-10.0", "10.0.2", "QEMU emulator version 10.0.2",
                     frozenset({"savevm_state_setup", "loadvm_state_setup", "vmstate_downtime_checkpoint"}))


def test_requested_qemus_options_then_env():
    assert requested_qemus(None, None) == []
    assert requested_qemus([], "") == []  # MIGFD_QEMU= means unset
    assert requested_qemus(["/a"], "/b::/c:") == ["/a", "/b", "/c"]
    assert requested_qemus(["/a", "/b"], None) == ["/a", "/b"]


def test_versions_and_modes():
    assert QEMU_10.release == (10, 0, 2) and QEMU_10.at_least(10, 0) and not QEMU_72.at_least(10, 0)
    assert modes_of(QEMU_72) == [COPIED, SHARED]
    assert modes_of(QEMU_10) == [COPIED, SHARED, CPR]
    assert QEMU_10.to_json() == {"path": QEMU_10.path, "version": "10.0.2", "banner": QEMU_10.banner}


def _object(argv: list[str]) -> str:
    return argv[argv.index("-object") + 1]


def test_ram_kind_of_each_mode():
    # Every mode maps a shared file, so that one observer reads the guest's counter from outside.
    size, shm = 64 * MiB, "/dev/shm/x.raw"
    cpr = ram_argv(CPR, size, shm)
    assert cpr[:2] == ["-M", "pc,memory-backend=ram0,aux-ram-share=on"]
    for mode in (COPIED, SHARED, CPR):
        assert _object(ram_argv(mode, size, shm)) == f"memory-backend-file,id=ram0,size=64M,mem-path={shm},share=on"
    assert ram_argv(COPIED, size, shm)[:2] == ["-M", "pc,memory-backend=ram0"]


def test_the_counting_bios_counts_at_0x7000_from_the_reset_vector(tmp_path):
    path = tmp_path / "count.bios"
    write_counting_bios(str(path))
    image = path.read_bytes()
    assert len(image) == 0x10000
    # xor ax,ax; mov ds,ax; inc dword [0x7000]; jmp back to the inc
    assert image[0xFFF0:0xFFFB] == bytes.fromhex("31c08ed866ff060070ebf9")
    jmp_target = 0xFFF0 + 11 + (image[0xFFFA] - 256)
    assert jmp_target == 0xFFF0 + 4  # the inc
    assert image[:0xFFF0] == b"\xf4" * 0xFFF0


def test_command_lines():
    ram = ram_argv(COPIED, 64 * MiB, "/dev/shm/x")
    src = qemu_argv(QEMU_72, "src", "/t/src.qmp", ram, bios="/t/count.bios", accel="kvm")
    assert src[0] == QEMU_72.path and src[-1] == "-S"
    assert src[src.index("-accel") + 1] == "kvm" and src[src.index("-bios") + 1] == "/t/count.bios"
    assert "-qmp" in src and src[src.index("-qmp") + 1] == "unix:/t/src.qmp,server=on,wait=off"
    assert "-incoming" not in src
    assert "enable=vmstate_downtime_checkpoint" not in src  # 7.2 has no such event
    assert src[src.index("-msg") + 1] == "timestamp=on"
    channels = cpr_channels("/t/main.sock", "/t/cpr.sock")
    dst = qemu_argv(QEMU_10, "dst", "/t/dst.qmp", ram, incoming=[json.dumps(c) for c in channels], wait=True)
    assert "-S" not in dst and "enable=vmstate_downtime_checkpoint" in dst
    assert dst[dst.index("-accel") + 1] == "tcg" and "-bios" not in dst
    assert dst[dst.index("-qmp") + 1].endswith(",wait=on")
    incoming = [json.loads(dst[i + 1]) for i, a in enumerate(dst) if a == "-incoming"]
    assert [(c["channel-type"], c["addr"]["path"]) for c in incoming] == [("main", "/t/main.sock"),
                                                                          ("cpr", "/t/cpr.sock")]
    assert all(c["addr"]["transport"] == "socket" and c["addr"]["type"] == "unix" for c in incoming)
    assert "-trace" not in qemu_argv(QEMU_10, "d", "/t/d.qmp", ram, trace=False)


def _plan(qemus: list[QemuBinary], sizes: list[int], trials: int = 2, accels: tuple[str, ...] = ("tcg",)):
    scenario = QemuPeer()
    scenario.qemus = qemus
    scenario.accels = list(accels)
    ctx = BenchContext(quick=True, trials=trials, tmp=Path("/tmp"), mem_available=64 * GiB, ram_sizes=sizes)
    return scenario.plan(ctx)


def test_plan_per_accelerator():
    plan = _plan([QEMU_10], [64 * MiB, 256 * MiB], accels=("kvm", "tcg"))
    combos = {(s.mode, s.variant, s.accel, s.ram_bytes) for s in plan.specs}
    small = {(m, v, a, 64 * MiB) for m in modes_of(QEMU_10) for v in (IDLE, FILLED) for a in ("kvm", "tcg")}
    large = {(m, FILLED, "kvm", 256 * MiB) for m in modes_of(QEMU_10)}  # TCG beside KVM at the smallest only
    assert combos == small | large
    assert {s.row()["accel"] for s in plan.specs} == {"kvm", "tcg"}
    assert "accel" in COLUMNS


def test_plan_per_qemu_mode_and_variant():
    plan = _plan([QEMU_72, QEMU_10], [64 * MiB, 256 * MiB, 64 * MiB + 1])
    combos = {(s.peer_version, s.mode, s.variant, s.ram_bytes) for s in plan.specs}
    small = {(q.version, m, v, 64 * MiB) for q in (QEMU_72, QEMU_10) for m in modes_of(q) for v in (IDLE, FILLED)}
    large = {(q.version, m, FILLED, 256 * MiB) for q in (QEMU_72, QEMU_10) for m in modes_of(q)}
    assert combos == small | large  # idle at the smallest size only; no cpr-transfer on 7.2
    assert len(plan.specs) == 2 * len(combos)
    assert all(s.options["qemu"] == {"7.2.22": QEMU_72, "10.0.2": QEMU_10}[s.peer_version].path
               for s in plan.specs)
    assert plan.notes["skipped_points"] == [{"ram_bytes": 64 * MiB + 1, "reason": "QEMU's -m takes whole MiB"}]
    assert plan.notes["modes"] == {"7.2.22": [COPIED, SHARED], "10.0.2": [COPIED, SHARED, CPR]}
    # modes alternate trial by trial, the order reversed on odd trials
    first = [(s.peer_version, s.mode, s.variant) for s in plan.specs if s.trial == 0 and s.ram_bytes == 256 * MiB]
    second = [(s.peer_version, s.mode, s.variant) for s in plan.specs if s.trial == 1 and s.ram_bytes == 256 * MiB]
    assert second == first[::-1]


def test_every_row_names_its_qemu_even_a_failed_one():
    spec = next(s for s in _plan([QEMU_10], [64 * MiB]).specs if s.mode == CPR)
    assert spec.row()["peer_version"] == "10.0.2"
    row = failed_row(spec, "start", RuntimeError("QEMU dst exited with 1"))
    assert row["peer_version"] == "10.0.2" and row["ok"] is False
    assert {"peer_version", "device_sections"} <= set(COLUMNS)
    assert COLUMNS[-2:] == ("ok", "error")


def test_early_negotiation_reads_exactly_to_the_reply():
    """What follows the reply to the early qmp_capabilities (RESUME) stays for the client."""
    greeting = json.dumps({"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 2}},
                                   "capabilities": ["oob"]}}).encode() + b"\n"
    stray = json.dumps({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}).encode() + b"\n"
    resume = json.dumps({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 9}}).encode() + b"\n"
    ours, qemu = socket.socketpair()
    with ours, qemu:
        qemu.sendall(greeting[:20])  # a line in pieces: the reader waits for its end
        later = threading.Timer(0.05, qemu.sendall, [greeting[20:] + stray + b'{"return": {}}\n' + resume])
        later.start()
        events = _read_greeting_and_reply(ours, time.monotonic() + 10)
        later.join()
        assert events == [json.loads(stray)]
        ours.setblocking(False)
        assert ours.recv(4096) == resume
        qemu.sendall(b'{"error": {"class": "GenericError", "desc": "no"}}\n')
        ours.setblocking(True)
        with pytest.raises(MigrationError, match="qmp_capabilities failed: no"):
            _read_greeting_and_reply(ours, time.monotonic() + 10)
