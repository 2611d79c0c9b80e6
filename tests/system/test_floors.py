"""The floors the targets are measured against: real child processes, real fds of the kinds migrations hand over.

No timing is asserted: what is checked is what each floor does (the message
pattern of a switchover, the fd kinds, the sizes and repetitions of the
throughput points), so that "the floor" means what docs/RESULTS.md says.
"""

from __future__ import annotations

import ctypes
import os
import socket
import stat
from pathlib import Path

import pytest
from helpers import proc_fds

from migfd.bench.floors import (
    THROUGHPUT_REPS, BackendFds, FloorConfig, FloorTap, HandoverProfile, Peer, allocated_mapping,
    floor_rows, handover, throughput_reps,
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
        assert len({os.fstat(fd).st_ino for fd in queues}) >= 1 and len(set(queues)) == 4
        # more fds than the TAP has queues: sockets, as without a TAP
        assert [kind_of(fd) for fd in backends.queues(5, tap)] == ["listening"] * 5


def test_the_handover_floor_is_state_and_fds_an_acknowledgement_and_the_eof():
    with Peer() as peer, BackendFds() as backends:
        fds = backends.whole_vm(3, None)
        child_fds_before = len(proc_fds(peer.proc.pid))
        times = handover(peer, os.urandom(350), fds, reps=20)
        assert len(times) == 20 and all(t > 0 for t in times)
        # the child read the EOF (its clock said when) and closed every fd it got
        assert len(proc_fds(peer.proc.pid)) == child_fds_before
        # the pairing is intact: a ping after twenty switchovers still answers
        assert handover(peer, b"x", [], reps=1)[0] > 0


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
    rows = list(floor_rows(0, cfg, profile))
    by = {}
    for row in rows:
        by.setdefault(row["variant"], []).append(row)
    assert [r["n_fds"] for r in by["fd-roundtrip"]] == [1, 4]
    assert {r["backend"] for r in by["fd-roundtrip"]} == {"socket"}  # no TAP given
    assert [r["ram_bytes"] for r in by["unix-throughput"]] == [1 * MiB, 2 * MiB]
    (hand,) = by["handover-floor"]
    assert hand["n_fds"] == 3 and hand["device_state_bytes"] == 300
    assert hand["total_ns"] == hand["downtime_ns"] == hand["value"] > 0
    assert all(r["value"] > 0 for r in by["unix-throughput"] + by["memcpy"] + by["ping"])


def ctx_with(rows: list[dict], quick: bool = True) -> BenchContext:
    return BenchContext(quick=quick, trials=1, tmp=Path("/tmp"), mem_available=64 * GiB, rows=rows)


def test_the_throughput_floor_goes_where_the_state_copies_went():
    rows = [{"scenario": "ram-size", "mode": "state-copy", "ram_bytes": s} for s in (256 * MiB, 64 * MiB)]
    rows.append({"scenario": "ram-size", "mode": "fd-passing", "ram_bytes": 1 * GiB})
    assert throughput_sizes(ctx_with(rows)) == (64 * MiB, 256 * MiB)
    # no ram-size in this run: ram-size's sizes for it
    assert throughput_sizes(ctx_with([])) == (64 * MiB, 256 * MiB)
    assert 4 * GiB in throughput_sizes(ctx_with([], quick=False))
