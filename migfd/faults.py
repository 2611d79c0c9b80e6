"""Fault injection at named phases of a migration, for the reliability matrix.

A VM process arms a fault over QMP (``x-migration-fault``); the migration
thread calls :meth:`FaultInjector.hook` at each phase (``setup``,
``precopy-N``, ``device``, ``device-<id>`` before each device section and so
before its fd records, ``before-ack``, ``after-ack``; on the destination
``dest-loaded`` before the PONG, ``dest-eof`` on EOF (inside the downtime) and
``dest-resume`` after the resume time is taken and before the guest runs). The
faults themselves are real: a channel shut down under the migration, a byte
that does not belong in the stream, a thread held while the test kills,
stops (SIGSTOP) or cancels the other side.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from migfd.errors import MigrationError

#: pause: hold the migration thread at the phase until x-migration-continue
#: close-channel: shut the channel down (as if the peer vanished)
#: corrupt: put one byte into the stream that no reader expects there
#: stall: hold the migration thread for STALL_S, then go on (where the guest
#: waits for the migration, e.g. at ``dest-resume``, the guest stalls with it)
#: fail: raise a MigrationError at the phase, as a bug there would (at the
#: destination's ``dest-eof`` it breaks the resume: the matrix must catch that)
ACTIONS = ("pause", "close-channel", "corrupt", "stall", "fail")
STALL_S = 0.05
PAUSE_LIMIT_S = 120.0


class FaultInjector:
    """The faults armed in one VM process, and the phase it is held at."""

    def __init__(self) -> None:
        self._armed: dict[str, str] = {}
        self._lock = threading.Lock()
        self._resume = threading.Event()
        self.paused_at: str | None = None
        self.fired: list[str] = []

    def arm(self, phase: str, action: str) -> None:
        if action not in ACTIONS:
            raise MigrationError(f"unknown fault action '{action}' (one of {', '.join(ACTIONS)})")
        with self._lock:
            self._armed[phase] = action

    def release(self) -> None:
        """x-migration-continue: let a paused migration go on."""
        self._resume.set()

    def query(self) -> dict[str, Any]:
        with self._lock:
            return {"paused-at": self.paused_at, "armed": dict(self._armed), "fired": list(self.fired)}

    def fire(self, migration, action: str) -> None:
        """Do ``action`` to ``migration`` now (from the hook, or at once from QMP)."""
        f = migration.file
        if action == "close-channel":
            if f is None:
                raise MigrationError("the migration has no channel yet")
            f.shutdown()
        elif action == "corrupt":
            if f is None:
                raise MigrationError("the migration has no channel yet")
            f.put_buffer(b"\xee")
            f.flush()
        elif action == "stall":
            time.sleep(STALL_S)
        elif action == "fail":
            raise MigrationError("a failure injected by x-migration-fault")
        elif action == "pause":
            self._resume.clear()
            self.paused_at = self._current
            if not self._resume.wait(PAUSE_LIMIT_S):
                raise MigrationError(f"paused at {self._current} for more than {PAUSE_LIMIT_S} s")

    def hook(self, migration):
        """The callable a migration calls with each phase name."""
        def at_phase(phase: str) -> None:
            with self._lock:
                action = self._armed.pop(phase, None)
            if action is None:
                return
            self._current = phase
            self.fired.append(f"{phase}:{action}")
            try:
                self.fire(migration, action)
            finally:
                self.paused_at = None
        return at_phase
