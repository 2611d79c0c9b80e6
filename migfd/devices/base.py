"""What every device of a migfd VM is: a backend, a guest workload, a vmstate.

A device owns its backend fds. Its guest workload runs in a thread that parks
whenever the VM stops (:class:`RunControl`); once parked it touches no
backend, which is what lets a stopped source hand the very same kernel
objects to the destination without losing or duplicating anything.

Migration calls, on the source: :meth:`Device.save_state` (with or without
handover), :meth:`Device.detach` / :meth:`Device.reattach` around a state
copy, :meth:`Device.release` after the commit point; on the destination:
:meth:`Device.load_state`, then the guest starts.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from migfd.errors import MigrationError
from migfd.fds import close_fd
from migfd.stream import VMStateDescription


class RunControl:
    """Runs and parks the guest threads of one VM; QEMU's vm_start/vm_stop.

    Guest threads call :meth:`checkpoint` at the top of each loop and poll
    :attr:`wake_fd` beside their own fds, so :meth:`pause` wakes them at once
    and returns only when every one of them is parked.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._running = False
        self._quit = False
        self._threads = 0
        self._parked = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def wake_fd(self) -> int:
        return self._wake_r

    @property
    def running(self) -> bool:
        return self._running

    def spawn(self, name: str, target, *args) -> threading.Thread:
        """Start a guest thread; it counts as parked until the VM runs."""
        with self._cond:
            self._threads += 1

        def body() -> None:
            try:
                target(*args)
            finally:
                with self._cond:
                    self._threads -= 1
                    self._cond.notify_all()

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread

    def checkpoint(self) -> bool:
        """Park while the VM is stopped; False when the thread must exit."""
        if self._running:
            return True
        with self._cond:
            self._parked += 1
            self._cond.notify_all()
            while not self._running and not self._quit:
                self._cond.wait()
            self._parked -= 1
            return not self._quit

    def pause(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._running = False
            self._poke()
            if not self._cond.wait_for(lambda: self._parked >= self._threads, timeout_s):
                raise MigrationError(f"guest threads did not stop within {timeout_s} s")

    def resume(self) -> None:
        with self._cond:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
            self._running = True
            self._cond.notify_all()

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Make every guest thread exit and wait for it."""
        with self._cond:
            self._quit = True
            self._running = False
            self._poke()
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._threads == 0, timeout_s)

    def _poke(self) -> None:
        if self._wake_w < 0:
            return  # closed: no thread is left to wake
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # already poked

    def close(self) -> None:
        self.shutdown()
        self._wake_r = close_fd(self._wake_r)
        self._wake_w = close_fd(self._wake_w)


class Device:
    """Base of the three backends; subclasses define ``vmsd`` and the hooks."""

    #: the QEMU option group it is given with (-object, -netdev, -chardev)
    kind = ""
    vmsd: VMStateDescription

    def __init__(self, id: str, backend_transfer: bool = False):
        self.id = id
        #: the device *can* hand its backend over (backend-transfer=on)
        self.backend_transfer = backend_transfer

    @property
    def section_name(self) -> str:
        """The section idstr, in QEMU's "<id>/<vmsd name>" form."""
        return f"{self.id}/{self.vmsd.name}"

    def handover(self, params_backend_transfer: bool) -> bool:
        """Whether this migration hands the backend over instead of copying state."""
        return self.backend_transfer and params_backend_transfer

    # -- lifetime -----------------------------------------------------------

    def open_backend(self) -> None:
        """Open or create the backend (a fresh VM, or a destination copying state)."""
        raise NotImplementedError

    def start_guest(self, ctl: RunControl) -> None:
        """Start this device's guest thread(s) under ``ctl``."""
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
