"""What every device of a migfd VM is: a backend, a guest workload, a vmstate.

A device owns its backend fds. Its guest workload runs in a thread that
touches its backend only during a turn, and the VM holds every turn while it
is stopped (:class:`RunControl`): a stopped guest touches no backend, which
is what lets a stopped source hand the very same kernel objects to the
destination without losing or duplicating anything.

Migration calls, on the source: :meth:`Device.save_state` (with or without
handover), :meth:`Device.detach` / :meth:`Device.reattach` around a state
copy, :meth:`Device.release` after the commit point; on the destination:
:meth:`Device.load_state`, then the guest starts.
"""

from __future__ import annotations

import os
import select
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

from migfd.errors import MigrationError
from migfd.fds import close_fd
from migfd.stream import VMStateDescription


class GuestThread:
    """One guest thread's handle: it touches its backends only inside :meth:`turn`.

    While the VM is stopped the controller holds the thread's turn lock, so
    the thread blocks at its next turn, wherever it is: stopping it is one
    uncontended lock acquisition when it is idle (blocked in poll), and waits
    for the end of its current turn otherwise; a thread that may be preempted
    while it holds a turn delays a stop by as much, which is why turns are
    short (one frame, one page). A thread polls, outside any
    turn, on its backends and on :attr:`wake_fd`; the controller signals
    ``wake_fd`` when the thread must look again (resume: backends may have
    changed; quit).
    """

    def __init__(self, ctl: "RunControl", lock: threading.Lock):
        self._ctl = ctl
        self._lock = lock
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._polling = threading.Condition()
        self._in_poll = False
        #: set when a turn ends; a resume clears it (:meth:`RunControl.wait_running`)
        self.ran = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def wake_fd(self) -> int:
        return self._wake

    @property
    def stop_requested(self) -> bool:
        """The VM wants to stop: a long turn ends early (the stop waits for it)."""
        return not self._ctl.running

    @contextmanager
    def turn(self) -> Iterator[bool]:
        """Blocks while the VM is stopped; yields False when the thread must exit."""
        self._lock.acquire()
        try:
            yield not self._ctl.quitting
        finally:
            self._lock.release()
            self.ran.set()

    def enter(self) -> bool:
        """:meth:`turn` without the context manager, for one frame or page at a time:
        blocks while the VM is stopped; False (and no turn) when the thread must exit.
        A turn entered must be left with :meth:`leave`."""
        self._lock.acquire()
        if self._ctl.quitting:
            self._lock.release()
            return False
        return True

    def leave(self) -> None:
        self._lock.release()
        self.ran.set()

    def hold(self, timeout_s: float) -> bool:
        """Keep the thread out of its turns from outside (release with :meth:`unhold`):
        its backends stay as they are meanwhile. False if it held a turn for ``timeout_s``."""
        return self._lock.acquire(timeout=timeout_s)

    def unhold(self) -> None:
        self._lock.release()

    @property
    def quitting(self) -> bool:
        return self._ctl.quitting

    def poll(self, poller: select.poll, timeout_ms: float) -> list[tuple[int, int]]:
        """The thread's wait for work, outside its turn (see :meth:`leave_poll`)."""
        with self._polling:
            self._in_poll = True
        try:
            return poller.poll(timeout_ms)
        finally:
            with self._polling:
                self._in_poll = False
                self._polling.notify_all()

    def leave_poll(self, timeout_s: float = 10.0) -> None:
        """Wake the thread out of :meth:`poll` and wait until it has left it.

        A poll holds a reference to every file it watches: a backend closed
        while its thread polls it stays open (a TAP stays attached, a client
        sees no EOF) until the poll returns.
        """
        self.wake()
        with self._polling:
            if not self._polling.wait_for(lambda: not self._in_poll, timeout_s):
                raise MigrationError(f"a guest thread did not leave poll within {timeout_s} s")

    def drain(self) -> None:
        """Consume the wake-up (call when poll reported :attr:`wake_fd` readable)."""
        try:
            os.eventfd_read(self._wake)
        except (BlockingIOError, OSError):
            pass

    def wake(self) -> None:
        if self._wake >= 0:
            try:
                os.eventfd_write(self._wake, 1)
            except OSError:
                pass

    def close(self) -> None:
        self._wake = close_fd(self._wake)


class RunControl:
    """Runs and stops the guest threads of one VM; QEMU's vm_start/vm_stop.

    Each guest thread has a turn lock (:class:`GuestThread`) that the
    controller holds while the VM is stopped: :meth:`pause` returns once it
    holds every one, and from then on no guest thread touches a backend.
    """

    def __init__(self) -> None:
        self._state = threading.Lock()  # guards the fields below
        self._running = False
        self.quitting = False
        self._guests: list[GuestThread] = []
        self._locks: list[threading.Lock] = []
        self._threads: list[threading.Thread] = []
        #: what runs guest code outside the turns (vCPUs): stopped first, resumed last
        self._runners: list[Any] = []

    @property
    def running(self) -> bool:
        return self._running

    def spawn(self, name: str, target, *args) -> GuestThread:
        """Start a guest thread ``target(guest, *args)``; it waits for its first turn until the VM runs."""
        lock = threading.Lock()
        with self._state:
            if not self._running:
                lock.acquire()  # a stopped VM holds every turn
            guest = GuestThread(self, lock)
            self._guests.append(guest)
            self._locks.append(lock)
        thread = threading.Thread(target=target, args=(guest, *args), name=name, daemon=True)
        guest.thread = thread
        self._threads.append(thread)
        thread.start()
        return guest

    def add_runner(self, runner: Any) -> None:
        """Something that runs guest code by itself (an accelerator's vCPUs): ``pause(timeout_s)``,
        ``resume()``, ``shutdown()``. It starts stopped; :meth:`resume` runs it with the VM."""
        with self._state:
            self._runners.append(runner)

    def pause(self, timeout_s: float = 10.0) -> None:
        """Stop every vCPU, then every guest thread: returns when none can touch a backend any more."""
        with self._state:
            if not self._running:
                return
            self._running = False
            locks = list(self._locks)
            runners = list(self._runners)
        deadline = time.monotonic() + timeout_s
        # As QEMU's vm_stop: the vCPUs first, so no guest code runs while the devices stop.
        for done, runner in enumerate(runners):
            try:
                runner.pause(max(deadline - time.monotonic(), 0.0))
            except BaseException:
                for paused in runners[:done]:
                    paused.resume()
                with self._state:
                    self._running = True
                raise
        taken: list[threading.Lock] = []
        for lock in locks:
            if not lock.acquire(timeout=max(deadline - time.monotonic(), 0.0)):
                for held in taken:
                    held.release()
                for runner in runners:
                    runner.resume()
                with self._state:
                    self._running = True
                raise MigrationError(f"guest threads did not stop within {timeout_s} s")
            taken.append(lock)

    def resume(self) -> None:
        with self._state:
            if self._running:
                return
            self._running = True
            guests = list(self._guests)
            locks = list(self._locks)
            runners = [] if self.quitting else list(self._runners)
        # Threads blocked in poll look at their backends again (a destination's
        # backends arrived while they waited); woken first, they wait at their
        # turn, which the releases below give them.
        for guest in guests:
            guest.ran.clear()
            guest.wake()
        for lock in locks:
            lock.release()
        for runner in runners:  # the devices are ready: the vCPUs run last
            runner.resume()

    def wait_running(self, timeout_s: float) -> bool:
        """Wait until every guest thread has had a turn and every vCPU has entered the guest
        since the last :meth:`resume`; False if that took longer than ``timeout_s``.

        The thread that resumed a VM waits here (the wait releases the GIL)
        before it goes on with its own work: reports, QMP events, closing
        the migration. Otherwise that work holds the GIL while the guest's
        threads, just woken, wait for it -- milliseconds after the resume
        in which the guest's clients still see nothing.
        """
        deadline = time.monotonic() + timeout_s
        with self._state:
            guests = list(self._guests)
            runners = list(self._runners)
        ok = True
        for guest in guests:
            if guest.thread is not None and guest.thread.is_alive():
                ok = guest.ran.wait(max(deadline - time.monotonic(), 0.0)) and ok
        for runner in runners:
            wait = getattr(runner, "wait_running", None)
            if wait is not None:
                ok = wait(max(deadline - time.monotonic(), 0.0)) and ok
        return ok

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Make every vCPU and guest thread exit and wait for it; no vCPU runs guest code again."""
        with self._state:
            runners, self._runners = list(self._runners), []
        for runner in runners:
            runner.shutdown()
        self.quitting = True
        self.resume()  # a stopped thread must get its turn to see that it quits
        for guest in list(self._guests):
            guest.wake()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(deadline - time.monotonic(), 0.0))

    def close(self) -> None:
        self.shutdown()
        for guest in self._guests:
            guest.close()


#: every device kind a command line can name, by (option group, driver): filled by
#: :func:`register_device` as each device module is imported (migfd.devices imports them all)
DEVICE_KINDS: dict[tuple[str, str], type["Device"]] = {}


def register_device(cls: type["Device"]) -> type["Device"]:
    """Class decorator: ``-<cls.group> <cls.kind>,...`` builds a ``cls`` (see :meth:`Device.from_opts`)."""
    key = (cls.group, cls.kind)
    if key in DEVICE_KINDS and DEVICE_KINDS[key] is not cls:
        raise TypeError(f"-{cls.group} {cls.kind} is registered twice")
    DEVICE_KINDS[key] = cls
    return cls


def section_key(name: str, instance_id: int) -> str:
    """A section's idstr, with its instance id when that is not 0 ("cpu", "cpu:1", ...)."""
    return name if instance_id == 0 else f"{name}:{instance_id}"


class Device:
    """Base of every device (backends, vCPU state); subclasses define ``vmsd`` and the hooks."""

    #: the QEMU option group it is given with (object, netdev, chardev) and its driver there
    group = ""
    kind = ""
    vmsd: VMStateDescription

    def __init__(self, id: str, backend_transfer: bool = False):
        self.id = id
        #: the device *can* hand its backend over (backend-transfer=on)
        self.backend_transfer = backend_transfer
        #: this device's guest threads (see start_guest)
        self.guests: list[GuestThread] = []

    @classmethod
    def from_opts(cls, id: str, opts: dict[str, str], backend_transfer: bool) -> "Device":
        """Build one from its command line's options, taking out of ``opts`` each it knows
        (what is left is an unknown option); ``id`` and backend-transfer are taken already."""
        raise NotImplementedError

    def leave_polls(self) -> None:
        """Make the guest threads drop the backend files their polls still hold (after closing them)."""
        for guest in self.guests:
            guest.leave_poll()

    #: the section's instance id (QEMU numbers the "cpu" sections by vCPU index)
    instance_id = 0
    #: bumped whenever the backend's fds change (opened, adopted, a client accepted or
    #: dropped, closed): a migration that sent the fds early sees whether they still hold
    backend_generation = 0

    @contextmanager
    def backend_held(self, timeout_s: float = 1.0) -> Iterator[None]:
        """Keep this device's running guest threads out of their turns, so that its backend
        fds neither close nor change while a migration reads and sends them (a stopped VM's
        controller holds every turn already)."""
        held: list[GuestThread] = []
        try:
            for guest in self.guests:
                if guest.stop_requested:
                    continue
                if not guest.hold(timeout_s):
                    raise MigrationError(f"'{self.id}': a guest thread kept its turn for {timeout_s} s")
                held.append(guest)
            yield
        finally:
            for guest in held:
                guest.unhold()

    @property
    def section_name(self) -> str:
        """The section idstr, in QEMU's "<id>/<vmsd name>" form."""
        return f"{self.id}/{self.vmsd.name}"

    @property
    def section_key(self) -> str:
        """What tells this device's section apart from every other (see :func:`section_key`)."""
        return section_key(self.section_name, self.instance_id)

    def handover(self, params_backend_transfer: bool) -> bool:
        """Whether this migration hands the backend over instead of copying state."""
        return self.backend_transfer and params_backend_transfer

    # -- lifetime -----------------------------------------------------------

    def open_backend(self) -> None:
        """Open or create the backend (a fresh VM, or a destination copying state)."""
        raise NotImplementedError

    def start_guest(self, ctl: RunControl) -> None:
        """Start this device's guest thread(s) under ``ctl`` (each one is given its :class:`GuestThread`)."""
        raise NotImplementedError

    def save_state(self, handover: bool) -> dict[str, Any]:
        """The vmstate; with ``handover`` it holds the backend fds."""
        raise NotImplementedError

    def detach(self) -> None:
        """State copy, at switchover: let go of the backend so the destination can take it."""

    def reattach(self) -> None:
        """Undo :meth:`detach` after a failed or cancelled migration."""

    def load_state(self, state: dict[str, Any], received_fds: tuple[int, ...]) -> None:
        """Destination: adopt handed-over fds (validated) or re-create the backend."""
        raise NotImplementedError

    def owned_fds(self) -> list[int]:
        """Every fd this device holds now (for /proc/PID/fd checks and cleanup)."""
        return []

    def release(self) -> None:
        """Source, after the commit point: close the backend (the destination has it)."""
        self.close()

    def close(self) -> None:
        """Close everything this device owns; safe to call twice."""

    def info(self) -> dict[str, Any]:
        """Guest-visible counters and checks, for x-query-guest."""
        return {}

    def verify(self) -> dict[str, Any] | None:
        """What the guest left in this device checked (x-query-guest verify); None: nothing to check."""
        return None
