"""The chardev client in a process of its own (what the benchmark runs), against a real echoing peer.

The peer is a UNIX socket server in this process that echoes lines, and can
stop echoing for a while and drop the connection: what the client reports
must be what the peer did.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from migfd.peers.chardev import ChardevClientProcess

pytestmark = pytest.mark.timeout(60)


class EchoPeer:
    """Echoes every line; ``hold`` stops reading for a while; ``drop`` closes the connection once."""

    def __init__(self, path: str, delay_s: float = 0.0):
        self.delay_s = delay_s  # each echo waits this long: lines are always in flight
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(2)
        self.hold = threading.Event()
        self.drop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                while True:
                    while self.hold.is_set():
                        time.sleep(0.001)
                    if self.drop.is_set():
                        self.drop.clear()
                        break
                    try:
                        data = conn.recv(65536)
                        if not data:
                            break
                        time.sleep(self.delay_s)
                        conn.sendall(data)
                    except OSError:
                        break

    def close(self) -> None:
        self.server.close()


@pytest.fixture
def connected(tmp_path):
    """An echoing peer and a client process connected to it; both ended afterwards, pass or fail."""
    peer = EchoPeer(str(tmp_path / "peer.sock"))
    client = ChardevClientProcess(str(tmp_path / "peer.sock"), rate_per_s=1000)
    try:
        client.start()
        yield peer, client
    finally:
        client.kill()
        peer.close()


def test_the_client_process_reports_what_its_peer_did(connected):
    peer, client = connected
    assert client.wait_echoes(20)
    peer.hold.set()
    time.sleep(0.1)  # the peer reads nothing: the client's lines queue, no echo comes
    peer.hold.clear()
    assert client.wait_echoes(client.echoed() + 20)
    peer.drop.set()  # the peer closes the connection: the client reconnects
    assert client.wait_echoes(client.echoed() + 50)
    report = client.stop(drain_s=2.0)
    assert client.error is None
    assert report.reconnects == 1
    assert report.lines_sent > 100 and report.lines_echoed >= report.lines_sent - len(report.lost)
    assert report.arrivals_ns == sorted(report.arrivals_ns) and len(report.arrivals_ns) > 10
    # the hold is the longest silence between two echoes, and the report says so
    gaps = [b - a for a, b in zip(report.arrivals_ns, report.arrivals_ns[1:])]
    assert max(gaps) >= 90_000_000 and report.max_gap_ns >= 90_000_000
    assert report.own_gaps is not None and report.own_gaps.limit_ns > 1_000_000


def test_lines_in_flight_at_the_stop_are_drained_not_lost(tmp_path):
    """A peer that echoes 20 ms late has lines in flight at every moment: the client
    must stop sending before it drains, or the last lines count as lost."""
    peer = EchoPeer(str(tmp_path / "late.sock"), delay_s=0.02)
    client = ChardevClientProcess(str(tmp_path / "late.sock"), rate_per_s=1000)
    try:
        client.start()
        assert client.wait_echoes(100)
        report = client.stop(drain_s=1.0)
    finally:
        client.kill()
        peer.close()
    assert client.error is None
    assert report.lines_sent > 100 and report.lost == [] and report.lines_echoed == report.lines_sent


def test_a_client_process_that_died_gives_a_clear_error_not_a_report(connected):
    _, client = connected
    assert client.wait_echoes(5)
    client.proc.kill()
    client.proc.wait()
    with pytest.raises(RuntimeError, match="gave no report"):
        client.stop()


def test_a_client_that_cannot_connect_says_so(tmp_path):
    client = ChardevClientProcess(str(tmp_path / "nobody.sock"), connect_timeout_s=0.2)
    with pytest.raises(RuntimeError, match="did not connect"):
        client.start()
    client.kill()
