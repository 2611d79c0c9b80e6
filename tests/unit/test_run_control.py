"""RunControl and GuestThread with real threads and no process: when a stop returns, no guest touches a backend.

The checks are on states (inside a turn or not, in poll or not), never on
how long a stop took.
"""

from __future__ import annotations

import os
import select
import threading
import time

import pytest

from migfd.devices import RunControl
from migfd.errors import MigrationError


class Recorder:
    """A guest workload: each turn marks itself inside, works, marks itself out."""

    def __init__(self, work_s: float = 0.0):
        self.inside = 0
        self.turns = 0
        self.work_s = work_s
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def loop(self, guest) -> None:
        self.started.set()
        while True:
            if not guest.enter():
                return
            try:
                self.inside += 1
                self.release.wait()
                time.sleep(self.work_s)
                self.turns += 1
                self.inside -= 1
            finally:
                guest.leave()


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "state not reached"
        time.sleep(0.001)


@pytest.fixture
def ctl():
    control = RunControl()
    yield control
    control.close()


def test_a_thread_of_a_stopped_vm_waits_for_its_first_turn(ctl):
    rec = Recorder()
    ctl.spawn("g", rec.loop)
    rec.started.wait(5)
    time.sleep(0.05)
    assert rec.turns == 0  # started stopped: no turn yet
    ctl.resume()
    wait_for(lambda: rec.turns > 10)


def test_pause_returns_only_when_no_thread_is_inside_a_turn(ctl):
    recs = [Recorder(work_s=0.0005) for _ in range(3)]
    for i, rec in enumerate(recs):
        ctl.spawn(f"g{i}", rec.loop)
    ctl.resume()
    for _ in range(50):
        wait_for(lambda: all(r.turns for r in recs))
        ctl.pause()
        assert all(r.inside == 0 for r in recs)
        counts = [r.turns for r in recs]
        time.sleep(0.002)
        assert [r.turns for r in recs] == counts  # stopped means no turn at all
        ctl.resume()


def test_a_stop_waits_for_the_turn_in_progress_and_ends_early_when_told(ctl):
    rec = Recorder()
    rec.release.clear()
    guests = []
    ctl.spawn("g", lambda guest: (guests.append(guest), rec.loop(guest)))
    ctl.resume()
    wait_for(lambda: rec.inside == 1)
    paused = threading.Event()
    stopper = threading.Thread(target=lambda: (ctl.pause(), paused.set()))
    stopper.start()
    wait_for(lambda: guests[0].stop_requested)
    assert not paused.wait(0.05)  # the turn in progress holds the stop
    rec.release.set()
    assert paused.wait(5)
    stopper.join()
    assert rec.inside == 0


def test_a_stuck_turn_makes_pause_fail_and_the_vm_keeps_running(ctl):
    rec = Recorder()
    rec.release.clear()
    ctl.spawn("g", rec.loop)
    ctl.resume()
    wait_for(lambda: rec.inside == 1)
    with pytest.raises(MigrationError, match="did not stop"):
        ctl.pause(timeout_s=0.05)
    assert ctl.running
    rec.release.set()
    wait_for(lambda: rec.turns > 3)


def poller_loop(fd: int, seen: list, ready: threading.Event):
    def loop(guest) -> None:
        poller = select.poll()
        poller.register(guest.wake_fd, select.POLLIN)
        poller.register(fd, select.POLLIN)
        ready.set()
        while not guest.quitting:
            for got, _ in guest.poll(poller, 5000):
                if got == guest.wake_fd:
                    guest.drain()
                    seen.append("wake")
            if not guest.enter():  # as a device: what poll reported is handled in a turn
                return
            guest.leave()
    return loop


def test_leave_poll_returns_once_the_thread_holds_no_file_in_poll(ctl):
    r, w = os.pipe()
    seen: list = []
    ready = threading.Event()
    guest = ctl.spawn("g", poller_loop(r, seen, ready))
    ready.wait(5)
    wait_for(lambda: guest._in_poll)
    guest.leave_poll()
    # Out of poll, and (the VM being stopped) waiting for a turn: no poll holds the pipe.
    assert not guest._in_poll
    time.sleep(0.05)
    assert not guest._in_poll and seen == ["wake"]
    os.close(r)
    os.close(w)


def test_resume_wakes_threads_blocked_in_poll(ctl):
    r, w = os.pipe()
    seen: list = []
    ready = threading.Event()
    ctl.spawn("g", poller_loop(r, seen, ready))
    ready.wait(5)
    ctl.resume()
    wait_for(lambda: "wake" in seen)
    os.close(r)
    os.close(w)


def test_shutdown_ends_every_thread_stopped_or_polling():
    ctl = RunControl()
    rec = Recorder()
    r, w = os.pipe()
    ready = threading.Event()
    ctl.spawn("turns", rec.loop)
    ctl.spawn("poller", poller_loop(r, [], ready))
    ready.wait(5)
    ctl.close()  # the VM never ran
    assert all(not t.is_alive() for t in ctl._threads)
    os.close(r)
    os.close(w)


class Runner:
    """An accelerator's stand-in: it says it entered the guest only when the test lets it."""

    def __init__(self):
        self.entered = threading.Event()
        self.may_enter = threading.Event()

    def pause(self, timeout_s: float) -> None:
        self.entered.clear()

    def resume(self) -> None:
        threading.Thread(target=lambda: self.may_enter.wait(5) and self.entered.set(), daemon=True).start()

    def wait_running(self, timeout_s: float) -> bool:
        return self.entered.wait(timeout_s)

    def shutdown(self) -> None:
        self.may_enter.set()


def test_wait_running_returns_once_every_thread_had_a_turn_and_every_vcpu_entered(ctl):
    rec = Recorder()
    rec.release.clear()  # the thread's first turn after the resume does not end yet
    ctl.spawn("g", rec.loop)
    runner = Runner()
    ctl.add_runner(runner)
    rec.started.wait(5)
    ctl.resume()
    assert not ctl.wait_running(0.05)  # neither the turn nor the vCPU
    rec.release.set()
    wait_for(lambda: rec.turns > 0)
    assert not ctl.wait_running(0.05)  # the turn ended, the vCPU has not entered
    runner.may_enter.set()
    assert ctl.wait_running(5)
    # a new stop and resume ask again: a turn taken before the stop does not count
    ctl.pause()
    rec.release.clear()
    ctl.resume()
    assert not ctl.wait_running(0.05)
    rec.release.set()
    assert ctl.wait_running(5)


def test_wait_running_does_not_wait_for_a_thread_that_has_exited(ctl):
    ctl.spawn("done", lambda guest: None)
    wait_for(lambda: not ctl._threads[0].is_alive())
    ctl.resume()
    assert ctl.wait_running(5)
