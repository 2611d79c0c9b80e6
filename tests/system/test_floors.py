"""The floors the targets are measured against: real child processes, real fds of the kinds migrations hand over.

No timing is asserted: what is checked is what each floor does (the message
pattern of a switchover, the fd kinds, the sizes and repetitions of the
throughput points), so that "the floor" means what docs/RESULTS.md says.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import stat
import time
from pathlib import Path

import pytest
from helpers import proc_fds

from migfd.bench import floors
from migfd.bench.floors import (
    THROUGHPUT_REPS, BackendFds, FloorConfig, FloorTap, HandoverProfile, Peer, allocated_mapping,
    TapLoad, floor_rows, handover, ping, throughput_reps,
)
from migfd.bench.scenario import BenchContext
from migfd.bench.scenarios.floors import throughput_sizes
from migfd.net.tun import is_tap_fd, tap_info
from migfd.units import GiB, MiB

pytestmark = pytest.mark.timeout(120)


def kind_of(fd: int) -> str:
    link = os.readlink(f"/proc/self/fd/{fd}")
    if link.startswith("/memfd:"):
        return "memfd"
    if is_tap_fd(fd):
        return "tap"
    if stat.S_ISSOCK(os.fstat(fd).st_mode):
        sock = socket.socket(fileno=os.dup(fd))
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            if listening:
                return "listening"
            sock.getpeername()
            return "connected"
        finally:
            sock.close()
    return link


def distinct_open_files(fds: list[int]) -> bool:
    """Whether every fd is an open file of its own, not a dup of another one.

    File status flags live in the open file, not in the fd: O_NONBLOCK set
    through one fd shows through its dups, and through nothing else.
    """
    for fd in fds:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        others = [fcntl.fcntl(o, fcntl.F_GETFL) for o in fds if o != fd]
        fcntl.fcntl(fd, fcntl.F_SETFL, flags ^ os.O_NONBLOCK)
        try:
            if others != [fcntl.fcntl(o, fcntl.F_GETFL) for o in fds if o != fd]:
                return False
        finally:
            fcntl.fcntl(fd, fcntl.F_SETFL, flags)
    return True


def test_a_whole_vm_is_a_memfd_then_connected_sockets_and_everything_is_closed():
    before = set(os.listdir("/proc/self/fd"))
    with BackendFds() as backends:
        fds = backends.whole_vm(4, None)
        assert [kind_of(fd) for fd in fds] == ["memfd", "connected", "connected", "connected"]
        queues = backends.queues(3, None)
        assert [kind_of(fd) for fd in queues] == ["listening"] * 3
    assert set(os.listdir("/proc/self/fd")) == before


@pytest.mark.parametrize("netns_tap", [4], indirect=True)
def test_with_a_tap_a_vm_hands_over_a_tap_queue_and_fd_count_its_queues(netns_tap):
    tap = FloorTap(netns_tap.ifname, netns_tap.netns, 4)
    with BackendFds() as backends:
        fds = backends.whole_vm(3, tap)
        assert [kind_of(fd) for fd in fds] == ["memfd", "tap", "connected"]
        queues = backends.queues(4, tap)
        assert all(tap_info(fd).ifname == netns_tap.ifname and tap_info(fd).multi_queue for fd in queues)
        # four queues: four open files of /dev/net/tun, not one queue behind four fds
        assert len(queues) == 4 and distinct_open_files(queues)
        # more fds than the TAP has queues: sockets, as without a TAP
        assert [kind_of(fd) for fd in backends.queues(5, tap)] == ["listening"] * 5


def test_the_handover_floor_is_state_and_fds_an_acknowledgement_and_the_eof():
    with Peer() as peer, BackendFds() as backends:
        fds = backends.whole_vm(3, None)
        # The child answers only once it is up: its fds counted earlier could include the
        # files its imports have open for a moment.
        ping(peer, 1)
        child_fds_before = len(proc_fds(peer.proc.pid))
        start = time.monotonic_ns()
        switchovers = handover(peer, os.urandom(350), fds, reps=20)
        window = time.monotonic_ns() - start
        # Each time ends on the child's clock when it read the EOF: the same clock as
        # ours (CLOCK_MONOTONIC), after the switchover began, and all twenty inside the call.
        times = [s.total_ns for s in switchovers]
        assert len(times) == 20 and min(times) > 0 and sum(times) <= window
        # the child had everything before it acknowledged: both parts of each switchover happened
        assert all(s.oneway_ns > 0 and s.commit_ns > 0 for s in switchovers)
        # the child read the EOF and closed every fd it got
        assert len(proc_fds(peer.proc.pid)) == child_fds_before
        # the pairing is intact: a switchover after twenty still ends where it should
        start = time.monotonic_ns()
        (last,) = handover(peer, b"x", [], reps=1)
        assert 0 < last.total_ns <= time.monotonic_ns() - start


def rss_of_mapping(address: int) -> int:
    """Resident bytes of the mapping starting at ``address`` (from /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if line.split("-", 1)[0] == f"{address:x}":
            for entry in lines[i + 1:]:
                if entry.startswith("Rss:"):
                    return int(entry.split()[1]) * 1024
    raise AssertionError(f"no mapping at {address:#x}")


def test_allocated_mapping_has_its_pages_before_anything_is_written():
    size = 8 * MiB
    buf = allocated_mapping(size)
    try:
        address = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert rss_of_mapping(address) == size
    finally:
        buf.close()


def test_throughput_reps_favour_small_sizes_within_bounds():
    low, high = THROUGHPUT_REPS
    assert throughput_reps(64 * MiB) == high
    assert throughput_reps(4 * GiB) == low
    assert throughput_reps(1 * GiB, budget=4 * GiB) == 4
    assert throughput_reps(512 * MiB, budget=2 * GiB) == 4
    assert throughput_reps(1 * GiB, budget=1 * GiB) == low


def test_one_trial_of_every_floor_at_the_sizes_asked(tmp_path):
    cfg = FloorConfig(fd_counts=(1, 4), roundtrip_reps=10, throughput_sizes=(1 * MiB, 2 * MiB),
                      throughput_budget=4 * MiB, memcpy_bytes=1 * MiB, memcpy_reps=2)
    profile = HandoverProfile("ram+chardev", 3, 300, "test")
    start = time.monotonic_ns()
    rows = list(floor_rows(0, cfg, profile))
    window = time.monotonic_ns() - start
    by = {}
    for row in rows:
        by.setdefault(row["variant"], []).append(row)
    assert [r["n_fds"] for r in by["fd-roundtrip"]] == [1, 4]
    assert {r["backend"] for r in by["fd-roundtrip"]} == {"socket"}  # no TAP given
    assert [r["ram_bytes"] for r in by["unix-throughput"]] == [1 * MiB, 2 * MiB]
    (unbatched,) = by["fd-roundtrip-unbatched"]
    assert unbatched["n_fds"] == 4 and unbatched["fd_messages"] == 4 and by["fd-roundtrip"][-1]["fd_messages"] == 1
    for variant in ("handover-floor", "handover-oneway", "commit-roundtrip"):
        (hand,) = by[variant]
        assert hand["n_fds"] == 3 and hand["device_state_bytes"] == 300 and hand["unit"] == "ns"
        assert hand["total_ns"] == hand["downtime_ns"] == hand["value"]
    assert "handover-floor-loaded" not in by  # no TAP given: no probe traffic to load it with
    # Every value is its row's time in the row's unit ...
    (base,) = by["ping"]
    assert base["value"] == base["total_ns"]
    for r in by["fd-roundtrip"] + by["fd-roundtrip-unbatched"]:
        assert r["value"] == (r["total_ns"] - base["total_ns"]) / r["n_fds"]
    for r in by["unix-throughput"] + by["memcpy"]:
        assert r["value"] == r["ram_bytes"] / r["total_ns"] * 1e9
    # ... and each time is the median of repetitions made one after another inside this
    # call: at least half of them took the median or longer.
    # (the one-way transfer and the commit round trip are parts of the handover floor's switchovers)
    reps = {"ping": cfg.roundtrip_reps, "fd-roundtrip": cfg.roundtrip_reps, "fd-roundtrip-unbatched": cfg.roundtrip_reps,
            "handover-floor": cfg.roundtrip_reps, "handover-oneway": 0, "commit-roundtrip": 0,
            "memcpy": cfg.memcpy_reps}
    at_least = 0
    for r in rows:
        n = (throughput_reps(r["ram_bytes"], cfg.throughput_budget) if r["variant"] == "unix-throughput"
             else reps[r["variant"]])
        assert r["total_ns"] > 0, r
        at_least += r["total_ns"] * -(-n // 2)
    assert at_least <= window


def ctx_with(rows: list[dict], quick: bool = True) -> BenchContext:
    return BenchContext(quick=quick, trials=1, tmp=Path("/tmp"), mem_available=64 * GiB, rows=rows)


def test_the_throughput_floor_goes_where_the_state_copies_went():
    rows = [{"scenario": "ram-size", "mode": "state-copy", "ram_bytes": s} for s in (256 * MiB, 64 * MiB)]
    rows.append({"scenario": "ram-size", "mode": "fd-passing", "ram_bytes": 1 * GiB})
    assert throughput_sizes(ctx_with(rows)) == (64 * MiB, 256 * MiB)
    # no ram-size in this run: ram-size's sizes for it
    assert throughput_sizes(ctx_with([])) == (64 * MiB, 256 * MiB)
    assert 4 * GiB in throughput_sizes(ctx_with([], quick=False))


@pytest.mark.parametrize("netns_tap", [4], indirect=True)
def test_the_loaded_handover_floor_runs_under_the_probes_frames(netns_tap):
    tap = FloorTap(netns_tap.ifname, netns_tap.netns, 4)
    cfg = FloorConfig(fd_counts=(1, 4), roundtrip_reps=10, throughput_sizes=(1 * MiB,), throughput_budget=1 * MiB,
                      memcpy_bytes=1 * MiB, memcpy_reps=1, tap=tap, load_frame_rate_per_s=20_000)
    profile = HandoverProfile("ram+tap+chardev", 3, 300, "test")
    by = {r["variant"]: r for r in floor_rows(0, cfg, profile)}
    loaded, idle = by["handover-floor-loaded"], by["handover-floor"]
    for key in ("backend", "n_fds", "device_state_bytes", "fds_passed", "fd_messages", "unit"):
        assert loaded[key] == idle[key], key
    assert loaded["total_ns"] == loaded["downtime_ns"] == loaded["value"] > 0
    # the probe really sent while the switchovers ran, from a process that is gone now
    assert loaded["frames_sent"] > 0
    assert not [p for p in proc_children() if "--probe" in p]


def proc_children() -> list[str]:
    """The command lines of this process's children."""
    out = []
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid == os.getpid():
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode())
        except (OSError, ValueError, IndexError):
            continue
    return out


def test_the_load_probe_that_cannot_start_says_so():
    # no such namespace: the probe process fails before its first frame, and says why
    with pytest.raises(RuntimeError, match="load probe did not start .*nosuchns"):
        TapLoad(FloorTap("nosuchtap0", "nosuchns", 1), 1000)


@pytest.mark.parametrize("netns_tap", [4], indirect=True)
def test_a_loaded_floor_that_cannot_run_fails_its_row_alone(netns_tap, monkeypatch):
    # the TAP is there for the fds, but the probe cannot send on it (a namespace it cannot enter)
    monkeypatch.setattr(floors, "TapLoad", lambda tap, rate: TapLoad(FloorTap(tap.ifname, "nosuchns", 1), rate))
    cfg = FloorConfig(fd_counts=(1,), roundtrip_reps=2, throughput_sizes=(1 * MiB,), throughput_budget=1 * MiB,
                      memcpy_bytes=1 * MiB, memcpy_reps=1, tap=FloorTap(netns_tap.ifname, netns_tap.netns, 4),
                      load_frame_rate_per_s=1000)
    by = {r["variant"]: r for r in floor_rows(0, cfg, HandoverProfile("ram+tap+chardev", 3, 300, "test"))}
    loaded = by["handover-floor-loaded"]
    assert loaded["ok"] is False and "load probe did not start" in loaded["error"] and "total_ns" not in loaded
    assert by["handover-floor"]["total_ns"] > 0 and "memcpy" in by  # the trial's other floors are there
