"""Tests of migfd.net and the probe of migfd.peers.frames against the real kernel: TAPs, namespaces,
AF_PACKET probe frames.

Everything runs inside namespaces the tests create; the only traffic is raw
0x88B5 frames between a FrameProbe and a "guest" thread echoing on the TAP fd.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import subprocess
import sys
import threading

import pytest
from helpers import needs_tap
from hypothesis import given
from hypothesis import strategies as st
from pyroute2 import netns as pyroute2_netns

from migfd.net import ethernet, netns, tun
from migfd.peers.frames import Frame, FrameProbe, build_frame, parse_frame

PROBE_MAC = bytes.fromhex("020000000001")


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def no_fd_leak():
    before = open_fds()
    yield
    assert open_fds() == before


@pytest.fixture
def ns(no_fd_leak):
    with netns.NetNamespace() as namespace:
        yield namespace
    assert namespace.name not in pyroute2_netns.listnetns()


@pytest.fixture
def tap(ns):
    """A single-queue TAP "tap0", up, in its own namespace; yields (ns, fd)."""
    fd = tun.open_tap("tap0", netns=ns.name)
    try:
        netns.link_up("tap0", ns.name)
        yield ns, fd
    finally:
        os.close(fd)


class Guest:
    """The guest side of a TAP: reads frames from the fd and writes back their echoes.

    ``drop(seq)`` and ``duplicate(seq)`` let a test misbehave on purpose.
    """

    def __init__(self, fd: int, *, drop=lambda seq: False, duplicate=lambda seq: False):
        self.fd = fd
        self.drop = drop
        self.duplicate = duplicate
        self.echoed: list[int] = []
        self.foreign: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(20):
                continue
            while True:
                try:
                    frame = os.read(self.fd, 2048)
                except BlockingIOError:
                    break
                parsed = parse_frame(frame)
                if parsed is None:
                    self.foreign.append(frame)
                    continue
                if self.drop(parsed.seq):
                    continue
                os.write(self.fd, ethernet.echo_frame(frame))
                if self.duplicate(parsed.seq):
                    os.write(self.fd, ethernet.echo_frame(frame))
                self.echoed.append(parsed.seq)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------
# Frames: golden bytes, no kernel needed
# --------------------------------------------------------------------------

GOLDEN_FRAME = bytes.fromhex(
    "020000000001"  # dst
    "026d69676664"  # src "\x02migfd"
    "88b5"  # ethertype
    "0102030405060708"  # be64 seq
    "1122334455667788"  # be64 sent_ns
    "00000000"  # padding to payload_len 20
)


def test_build_frame_golden_bytes():
    frame = build_frame(
        PROBE_MAC, ethernet.GUEST_MAC, 0x0102030405060708, payload_len=20, sent_ns=0x1122334455667788
    )
    assert frame == GOLDEN_FRAME


def test_build_frame_default_is_64_byte_payload_with_clock():
    frame = build_frame(PROBE_MAC, ethernet.GUEST_MAC, 7)
    assert len(frame) == 14 + 64
    assert frame[30:] == bytes(48)
    assert parse_frame(frame).sent_ns > 0


def test_parse_frame_golden_bytes():
    assert parse_frame(GOLDEN_FRAME) == Frame(
        dst=PROBE_MAC, src=ethernet.GUEST_MAC, seq=0x0102030405060708, sent_ns=0x1122334455667788
    )


def test_echo_frame_swaps_macs_only():
    echoed = ethernet.echo_frame(GOLDEN_FRAME)
    assert echoed == GOLDEN_FRAME[6:12] + GOLDEN_FRAME[0:6] + GOLDEN_FRAME[12:]
    parsed = parse_frame(echoed)
    assert (parsed.dst, parsed.src, parsed.seq) == (ethernet.GUEST_MAC, PROBE_MAC, 0x0102030405060708)


def test_parse_frame_ignores_ipv6_router_solicitation():
    # What a link going up sends when IPv6 is on: ethertype 0x86dd, to 33:33:00:00:00:02.
    router_solicitation = bytes.fromhex(
        "333300000002" "026d69676664" "86dd"
        "6000000000103aff" + "fe80" + "00" * 14 + "ff02" + "00" * 13 + "02"
        "85000000" "00000000" "0101026d69676664"
    )
    assert parse_frame(router_solicitation) is None
    assert not ethernet.is_migfd_frame(router_solicitation)


def test_parse_frame_rejects_truncated_probe_frame():
    assert parse_frame(GOLDEN_FRAME[:29]) is None
    assert parse_frame(GOLDEN_FRAME[:30]) is not None


def test_build_frame_rejects_bad_arguments():
    with pytest.raises(ValueError):
        build_frame(PROBE_MAC[:5], ethernet.GUEST_MAC, 1)
    with pytest.raises(ValueError):
        build_frame(PROBE_MAC, ethernet.GUEST_MAC, 1, payload_len=15)
    with pytest.raises(ValueError):
        ethernet.echo_frame(b"\x00" * 13)


macs = st.binary(min_size=6, max_size=6)


@given(macs, macs, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(16, 1500))
def test_frame_round_trip(dst, src, seq, sent_ns, payload_len):
    frame = build_frame(dst, src, seq, payload_len, sent_ns=sent_ns)
    assert len(frame) == 14 + payload_len
    assert parse_frame(frame) == Frame(dst, src, seq, sent_ns)
    assert ethernet.echo_frame(ethernet.echo_frame(frame)) == frame


def test_ifname_is_validated_before_any_syscall():
    with pytest.raises(ValueError):
        tun.open_tap("x" * 16)
    with pytest.raises(ValueError):
        tun.open_tap("a/b")


# --------------------------------------------------------------------------
# Namespaces
# --------------------------------------------------------------------------


@needs_tap
def test_namespace_is_removed_after_the_context(no_fd_leak):
    with netns.NetNamespace() as ns:
        assert ns.name.startswith("migfd-")
        assert ns.name in pyroute2_netns.listnetns()
        assert os.path.exists(os.path.join("/run/netns", ns.name))
    assert ns.name not in pyroute2_netns.listnetns()
    assert not os.path.exists(os.path.join("/run/netns", ns.name))
    ns.close()  # twice is harmless


@needs_tap
def test_namespace_is_removed_when_the_body_raises(no_fd_leak):
    with pytest.raises(RuntimeError, match="boom"):
        with netns.NetNamespace() as ns:
            fd = tun.open_tap("tapx", netns=ns.name)
            tun.set_persist(fd, True)
            os.close(fd)
            raise RuntimeError("boom")
    assert ns.name not in pyroute2_netns.listnetns()
    assert not os.path.exists(ns.path)


@needs_tap
def test_run_in_runs_in_the_namespace_and_only_that_thread(ns):
    def netns_inode():
        return os.stat("/proc/thread-self/ns/net").st_ino

    outside = netns_inode()
    inside = ns.run_in(netns_inode)
    assert inside == os.stat(ns.path).st_ino
    assert inside != outside
    assert netns_inode() == outside
    assert ns.run_in(lambda a, b: a + b, 2, 3) == 5


@needs_tap
def test_run_in_reraises_the_exception(ns):
    with pytest.raises(ZeroDivisionError):
        ns.run_in(lambda: 1 / 0)


@needs_tap
@pytest.mark.skipif(not os.path.exists("/proc/sys/net/ipv6"), reason="kernel without IPv6")
def test_ipv6_disabled_inside_only():
    path = "/proc/sys/net/ipv6/conf/default/disable_ipv6"

    def read():
        with open(path) as f:
            return f.read().strip()

    host_before = read()
    with netns.NetNamespace() as ns:
        assert ns.ipv6_disabled
        assert ns.run_in(read) == "1"
        assert read() == host_before
    assert read() == host_before


@needs_tap
def test_preexec_starts_a_child_inside(ns):
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.stat('/proc/self/ns/net').st_ino)"],
        preexec_fn=ns.preexec(), capture_output=True, text=True, timeout=20, check=True,
    )
    assert int(child.stdout) == os.stat(ns.path).st_ino


# --------------------------------------------------------------------------
# TAP devices
# --------------------------------------------------------------------------


@needs_tap
def test_tungetiff_reports_the_name_and_flags(tap):
    ns, fd = tap
    info = tun.tap_info(fd)
    assert info.ifname == "tap0"
    assert info.flags & (tun.IFF_TAP | tun.IFF_NO_PI) == tun.IFF_TAP | tun.IFF_NO_PI
    assert not info.multi_queue and not info.persistent and not info.vnet_hdr
    assert tun.is_tap_fd(fd)
    assert netns.link_exists("tap0", ns.name)
    assert not netns.link_exists("tap0")  # not in the host namespace


@needs_tap
def test_is_tap_fd_rejects_other_fds(ns):
    r, w = os.pipe()
    unattached = os.open(tun.TUN_DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert not tun.is_tap_fd(r)
        assert tun.is_tun_fd(unattached)
        assert not tun.is_tap_fd(unattached)
        with pytest.raises(OSError) as caught:
            tun.tap_info(unattached)
        assert caught.value.errno == errno.EBADFD
    finally:
        os.close(r)
        os.close(w)
        os.close(unattached)
    assert not tun.is_tap_fd(r)  # closed


@needs_tap
def test_vnet_hdr_and_offload(ns):
    fd = tun.open_tap("tapv", vnet_hdr=True, netns=ns.name)
    try:
        assert tun.tap_info(fd).vnet_hdr
        tun.set_vnet_hdr_size(fd, 12)
        assert tun.get_vnet_hdr_size(fd) == 12
        tun.set_offload(fd, tun.TUN_F_CSUM)
        with pytest.raises(OSError) as caught:
            tun.set_vnet_hdr_size(fd, 2)  # below sizeof(struct virtio_net_hdr)
        assert caught.value.errno == errno.EINVAL
    finally:
        os.close(fd)


@needs_tap
def test_second_single_queue_attach_is_ebusy(tap):
    ns, fd = tap
    with pytest.raises(OSError) as caught:
        tun.open_tap("tap0", netns=ns.name)
    assert caught.value.errno == errno.EBUSY
    assert tun.tap_info(fd).ifname == "tap0"  # the holder is unaffected


CHILD_ATTACH = """
import errno, os, sys
from migfd.net import tun
if os.stat('/proc/self/ns/net').st_ino != int(sys.argv[2]):
    sys.exit('not in the test namespace')
try:
    os.close(tun.open_tap(sys.argv[1]))
except OSError as e:
    print(errno.errorcode[e.errno])
else:
    print('attached')
"""


@needs_tap
def test_second_process_cannot_attach_single_queue_tap(tap):
    ns, fd = tap
    child = subprocess.run(
        [sys.executable, "-c", CHILD_ATTACH, "tap0", str(os.stat(ns.path).st_ino)],
        preexec_fn=ns.preexec(), capture_output=True, text=True, timeout=20,
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "EBUSY"


@needs_tap
def test_multi_queue_open_of_four_queues(ns):
    fds = tun.open_tap_queues("mq0", 4, netns=ns.name)
    try:
        assert len(set(fds)) == 4
        infos = [tun.tap_info(fd) for fd in fds]
        assert all(i.ifname == "mq0" and i.multi_queue for i in infos)
        with pytest.raises(OSError) as caught:
            tun.open_tap("mq0", netns=ns.name)  # single-queue attach to multi-queue TAP
        assert caught.value.errno == errno.EINVAL
    finally:
        for fd in fds:
            os.close(fd)
    assert not netns.link_exists("mq0", ns.name)  # non-persistent: gone with the last queue


@needs_tap
def test_open_tap_queues_closes_what_it_opened_on_failure(ns):
    holder = tun.open_tap("sq0", netns=ns.name)  # single-queue: multi-queue attach fails
    try:
        before = open_fds()
        with pytest.raises(OSError):
            tun.open_tap_queues("sq0", 3, netns=ns.name)
        assert open_fds() == before
    finally:
        os.close(holder)


@needs_tap
def test_non_persistent_tap_disappears_with_its_last_fd(ns):
    fd = tun.open_tap("tapn", netns=ns.name)
    assert netns.link_exists("tapn", ns.name)
    os.close(fd)
    assert not netns.link_exists("tapn", ns.name)


@needs_tap
def test_persistent_tap_survives_its_fd_and_cleanup_deletes_it(no_fd_leak):
    with netns.NetNamespace() as ns:
        fd = tun.open_tap("tapp", netns=ns.name)
        tun.set_persist(fd, True)
        assert tun.tap_info(fd).persistent
        os.close(fd)
        assert netns.link_exists("tapp", ns.name)
        # Keep the namespace itself alive past the context, to look inside after.
        nsfd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert ns.name not in pyroute2_netns.listnetns()
        seen: dict[str, list[str]] = {}

        def look():
            netns.setns_fd(nsfd)
            seen["links"] = netns.link_names()

        thread = threading.Thread(target=look)
        thread.start()
        thread.join()
        assert seen["links"] == ["lo"]
    finally:
        os.close(nsfd)


# --------------------------------------------------------------------------
# Probe traffic through a real TAP
# --------------------------------------------------------------------------


@needs_tap
def test_paced_probe_every_frame_comes_back_exactly_once(tap):
    ns, fd = tap
    guest = Guest(fd)
    try:
        probe = FrameProbe("tap0", netns=ns.name, max_frames=2000)
        try:
            assert probe.probe_mac == netns.link_mac("tap0", ns.name)
            probe.start()
            assert probe.wait_sent(timeout_s=10)
        finally:
            report = probe.stop(drain_timeout_s=5)
    finally:
        guest.stop()
    assert report.frames_sent == 2000
    assert report.received == frozenset(range(2000))
    assert report.lost == ()
    assert report.duplicated == ()
    assert report.frames_received == 2000
    assert report.send_errors == 0 and report.probe_drops == 0
    assert 0 < report.max_gap_ns <= report.send_duration_ns + report.max_rtt_ns
    assert sorted(guest.echoed) == list(range(2000))
    assert guest.foreign == []  # IPv6 off: the link going up sent nothing else


@needs_tap
def test_probe_counts_losses_and_duplicates(tap):
    ns, fd = tap
    dropped = {s for s in range(200) if s % 7 == 3}
    doubled = {s for s in range(200) if s % 11 == 0} - dropped
    guest = Guest(fd, drop=dropped.__contains__, duplicate=doubled.__contains__)
    try:
        probe = FrameProbe("tap0", netns=ns.name)
        for seq in range(200):
            probe.send(seq)
        report = probe.stop(drain_timeout_s=2)
    finally:
        guest.stop()
    assert report.frames_sent == 200
    assert report.lost == tuple(sorted(dropped))
    assert report.duplicated == tuple(sorted(doubled))
    assert report.received == frozenset(range(200)) - dropped
    assert report.frames_received == 200 - len(dropped) + len(doubled)
    assert report.max_gap_ns == 0  # no paced sending happened


@needs_tap
def test_probe_ignores_frames_that_are_not_its_echoes(tap):
    ns, fd = tap
    probe = FrameProbe("tap0", netns=ns.name)
    try:
        probe.send(1)
        probe.send(2)
        # The guest answers 1 from a stranger's MAC and 2 correctly.
        frames = [os.read(fd, 2048) for _ in range(2)]
        stranger = ethernet.echo_frame(frames[0])[:6] + bytes.fromhex("02badbadbad0") + frames[0][12:]
        os.write(fd, stranger)
        os.write(fd, ethernet.echo_frame(frames[1]))
        assert probe.wait_echoes(1, timeout_s=5)
    finally:
        report = probe.stop(drain_timeout_s=0.2)
    assert report.received == frozenset({2})
    assert report.lost == (1,)


@needs_tap
def test_tap_fd_passed_over_unix_socket_keeps_queued_frames(ns):
    fd_source = tun.open_tap("tap0", netns=ns.name)
    fd_dest = -1
    try:
        netns.link_up("tap0", ns.name)
        probe = FrameProbe("tap0", netns=ns.name)
        try:
            source_guest = Guest(fd_source)
            for seq in range(100):
                probe.send(seq)
            assert probe.wait_echoes(100, timeout_s=5)
            source_guest.stop()

            # Nobody reads the TAP now: these wait in the kernel's TAP queue.
            for seq in range(100, 300):
                probe.send(seq)

            left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            with left, right:
                socket.send_fds(left, [b" "], [fd_source])
                data, fds, _, _ = socket.recv_fds(right, 1, 1)
            assert data == b" " and len(fds) == 1
            fd_dest = fds[0]
            # The source lets go; the device lives on through the passed fd alone.
            os.close(fd_source)
            fd_source = -1
            assert netns.link_exists("tap0", ns.name)
            assert tun.is_tap_fd(fd_dest)
            assert tun.tap_info(fd_dest).ifname == "tap0"

            dest_guest = Guest(fd_dest)
            try:
                assert probe.wait_echoes(300, timeout_s=5)
            finally:
                dest_guest.stop()
        finally:
            report = probe.stop(drain_timeout_s=1)
    finally:
        for fd in (fd_source, fd_dest):
            if fd >= 0:
                os.close(fd)
    assert sorted(dest_guest.echoed) == list(range(100, 300))  # queued, then read by the new holder
    assert report.lost == ()
    assert report.duplicated == ()
    assert report.received == frozenset(range(300))
    assert not netns.link_exists("tap0", ns.name)  # gone with the last fd
