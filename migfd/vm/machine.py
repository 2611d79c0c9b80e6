"""One VM's machine: its devices, its accelerator, its run state (QEMU's vm_start/vm_stop) and its migration.

:class:`VM` is what a migration calls its host (:class:`migfd.migration.base.MigrationHost`)
and what the QMP monitor (:mod:`migfd.vm.monitor`) reads and changes.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
import time

from migfd.accel import Accelerator, GuestConfig, ThreadAccelerator
from migfd.devices import Device, RunControl
from migfd.errors import MigrationError
from migfd.faults import FaultInjector
from migfd.migration import IncomingMigration, MigrationStatus, OutgoingMigration
from migfd.params import MigrationParameters
from migfd.qmp import QMPServer

DEFAULT_MACHINE = "migfd-pc"
#: fds an incoming VM's table is sized for before the migration starts
FD_TABLE_RESERVE = 1024
#: how long a resume waits for the guest's threads to run before it goes on (they take a few hundred µs)
GUEST_RUNNING_TIMEOUT_S = 0.02

log = logging.getLogger("migfd.vm")


class VM:
    """The state a QMP monitor of one VM process sees and changes."""

    def __init__(self, name: str, devices: list[Device], *, machine: str = DEFAULT_MACHINE,
                 incoming: bool = False, accel: Accelerator | None = None):
        #: who runs the guest's CPU work (migfd.accel); its CPU state devices migrate with the rest
        self.accel = accel if accel is not None else ThreadAccelerator(GuestConfig())
        # The vCPUs' sections first, as QEMU registers its CPUs before the devices.
        devices = self.accel.attach(devices) + devices
        ids = [d.section_key for d in devices]
        if len(set(ids)) != len(ids):
            raise MigrationError("device ids must be unique")
        self.name = name
        self.machine = machine
        self.devices = devices
        self.ctl = RunControl()
        self.params = MigrationParameters()
        #: capabilities other than backend-transfer (which lives in params); migfd emits
        #: MIGRATION events whatever ``events`` says
        self.capabilities: dict[str, bool] = {"events": False}
        self.migration: OutgoingMigration | IncomingMigration | None = None
        self.runstate = "inmigrate" if incoming else "prelaunch"
        self._stopped_at_ns = time.monotonic_ns()
        self.run_lock = threading.RLock()
        self.server: QMPServer | None = None
        self.faults = FaultInjector()
        self._events_lock = threading.Lock()
        self._held_events: list[tuple[str, dict | None, int]] | None = None

    # -- run state (QEMU's vm_start / vm_stop) -----------------------------------

    @property
    def running(self) -> bool:
        return self.runstate == "running"

    @property
    def stopped_at_ns(self) -> int:
        return self._stopped_at_ns

    def _event(self, name: str, data: dict | None = None) -> None:
        if self.server is None:
            return
        with self._events_lock:
            if self._held_events is not None:
                self._held_events.append((name, data, time.time_ns()))
                return
        self.server.emit_threadsafe(name, data)

    def hold_events(self) -> None:
        """Keep QMP events (with their time) until :meth:`release_events`.

        A migration holds them through its switchover: sending one wakes the
        QMP thread, which then competes with the migration for the CPU and
        the GIL, inside the downtime.
        """
        with self._events_lock:
            if self._held_events is None:
                self._held_events = []

    def release_events(self) -> None:
        """Send the held events, in order, stamped with the time they happened."""
        with self._events_lock:
            held, self._held_events = self._held_events, None
            if self.server is not None:
                for name, data, time_ns in held or ():
                    self.server.emit_threadsafe(name, data, time_ns)

    def set_runstate(self, runstate: str) -> None:
        self.runstate = runstate

    def boot(self) -> None:
        """A fresh VM: open every backend, start the guest."""
        opened: list[Device] = []
        try:
            for dev in self.devices:
                dev.open_backend()
                opened.append(dev)
        except BaseException:
            for dev in opened:
                dev.close()
            raise
        self.accel.setup_firmware()
        self._start_guest_threads()
        self.vm_start()

    def _start_guest_threads(self) -> None:
        for dev in self.devices:
            dev.start_guest(self.ctl)
        self.accel.start(self.ctl)  # parked, as the guest threads: the VM's run state runs them

    def vm_stop(self, runstate: str = "paused") -> int:
        """Park every guest thread; returns CLOCK_MONOTONIC ns of the stop."""
        with self.run_lock:
            stop_ns = time.monotonic_ns()
            was_running = self.running
            self.ctl.pause()
            self.runstate = runstate
            if was_running:
                self._stopped_at_ns = stop_ns
                self._event("STOP")
            return stop_ns

    def vm_start(self, paused: bool = False, before_run=None) -> int:
        """Run the guest; returns CLOCK_MONOTONIC ns of the resume: the moment the guest is let run.

        ``paused``: an incoming guest that was paused on the source gets its
        backends and threads but stays paused, as QEMU keeps its run state.
        ``before_run()`` is called after that moment and before the guest
        runs (a fault hook: what it does is outage that no downtime shows).
        """
        with self.run_lock:
            resume_ns = time.monotonic_ns()
            if paused:
                self.runstate = "paused"
                return resume_ns
            if before_run is not None:
                before_run()
            self.ctl.resume()
            self.runstate = "running"
            self._event("RESUME")
        # The guest's threads need the GIL for a moment before they enter the guest
        # or serve a backend: let them have it before this thread's reports and
        # events, which would hold the guest back after the resume it reports.
        if not self.ctl.wait_running(GUEST_RUNNING_TIMEOUT_S):
            log.debug("the guest's threads took over %.0f ms to run after the resume",
                      GUEST_RUNNING_TIMEOUT_S * 1e3)
        return resume_ns

    def shutdown(self) -> None:
        self.ctl.close()  # no vCPU runs from here on
        self.accel.close()
        if isinstance(self.migration, IncomingMigration):
            self.migration.close()
        for dev in self.devices:
            dev.close()

    def start_incoming(self, address) -> None:
        migration = IncomingMigration(self, address, self.params, self.on_migration_status)
        _grow_fd_table(FD_TABLE_RESERVE)
        # Guest threads start now, parked: creating them at resume would be downtime.
        # Parked, they touch no backend; the ones that arrive are theirs at resume.
        self._start_guest_threads()
        self.migration = migration
        migration.hook = self.faults.hook(migration)
        migration.start()

    def on_migration_status(self, status: MigrationStatus) -> None:
        self._event("MIGRATION", {"status": status.value})


def _grow_fd_table(size: int) -> None:
    """Make the kernel size this process's fd table for ``size`` fds now.

    Received fds land at the lowest free numbers; when they outgrow the
    table the kernel reallocates it and, in a multi-threaded process, waits
    for an RCU grace period -- milliseconds that would fall inside the
    downtime. Growing it before the migration moves that cost out.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    top = min(size, soft) - 1
    probe = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if top > probe:
            os.dup2(probe, top)
            os.close(top)
    except OSError:
        pass  # only an optimisation
    finally:
        os.close(probe)
