"""One VM process: devices with real backends, a guest workload, a QMP monitor.

``migfd vm`` is to this module what ``qemu-system-x86_64`` is to QEMU's
softmmu: it parses a QEMU-like command line, opens the backends (or, with
``--incoming``, waits to receive them), runs the guest workload, and answers
QMP, including the migration commands that drive :mod:`migfd.migration`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import resource
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Any

from migfd.accel import ACCELERATORS, Accelerator, GuestConfig, ThreadAccelerator, create
from migfd.devices import Device, MemoryBackendMemfd, RunControl, from_options
from migfd.devices.options import opt_size
from migfd.errors import MigrationError, QMPError
from migfd.faults import FaultInjector
from migfd.fds import close_fd
from migfd.migration import IncomingMigration, MigrationStatus, OutgoingMigration
from migfd.params import MigrationParameters
from migfd.qmp import QMPServer
from migfd.transport import check_transport, parse_address, parse_uri

log = logging.getLogger("migfd.vm")

DEFAULT_MACHINE = "migfd-pc"
GIL_SWITCH_INTERVAL_S = 0.0002
#: fds an incoming VM's table is sized for before the migration starts
FD_TABLE_RESERVE = 1024
#: QEMU's words when a migration is running and a change would alter it
MIGRATION_IN_PROGRESS = "There's a migration process in progress"
#: parameters that shape the stream: fixed once a stream has started
STREAM_SHAPING = ("backend_transfer", "x_batch_fds")
#: defaults of --accel and --guest-duty from the environment: a test suite or a benchmark
#: sets them once for every VM it starts
ENV_ACCEL = "MIGFD_ACCEL"
ENV_GUEST_DUTY = "MIGFD_GUEST_DUTY"
#: the migration capabilities migfd knows (QEMU's MigrationCapability names)
CAPABILITIES = ("events", "backend-transfer")


class VM:
    """The state a QMP monitor of one VM process sees and changes."""

    def __init__(self, name: str, devices: list[Device], *, machine: str = DEFAULT_MACHINE,
                 incoming: bool = False, accel: Accelerator | None = None):
        #: who runs the guest's CPU work (migfd.accel); its CPU state devices migrate with the rest
        self.accel = accel if accel is not None else ThreadAccelerator(GuestConfig())
        devices = devices + self.accel.attach([d for d in devices if isinstance(d, MemoryBackendMemfd)])
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
        self._lock = threading.RLock()
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
        with self._lock:
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
        with self._lock:
            resume_ns = time.monotonic_ns()
            if paused:
                self.runstate = "paused"
                return resume_ns
            if before_run is not None:
                before_run()
            self.ctl.resume()
            self.runstate = "running"
            self._event("RESUME")
            return resume_ns

    def shutdown(self) -> None:
        self.ctl.close()  # no vCPU runs from here on
        self.accel.close()
        if isinstance(self.migration, IncomingMigration):
            self.migration.close()
        for dev in self.devices:
            dev.close()

    # -- QMP commands ------------------------------------------------------------

    def register(self, server: QMPServer) -> None:
        self.server = server
        commands = {
            "query-status": self.qmp_query_status,
            "query-name": lambda args: {"name": self.name},
            "stop": self.qmp_stop,
            "cont": self.qmp_cont,
            "quit": self.qmp_quit,
            "migrate-set-parameters": self.qmp_migrate_set_parameters,
            "migrate-set-capabilities": self.qmp_migrate_set_capabilities,
            "query-migrate-capabilities": self.qmp_query_migrate_capabilities,
            "query-migrate-parameters": lambda args: self.params.to_qmp(),
            "migrate-incoming": self.qmp_migrate_incoming,
            "query-migrate": self.qmp_query_migrate,
            "migrate_cancel": self.qmp_migrate_cancel,
            "x-query-guest": self.qmp_query_guest,
            "x-migration-fault": self.qmp_migration_fault,
            "x-migration-continue": lambda args: self.faults.release(),
            "x-query-fault": lambda args: self.faults.query(),
        }
        for name, handler in commands.items():
            server.register(name, handler)
        server.register("migrate", self.qmp_migrate, with_session=True)

    def qmp_query_status(self, args: dict) -> dict:
        return {"running": self.running, "singlestep": False, "status": self.runstate}

    def qmp_stop(self, args: dict) -> None:
        if self.runstate == "inmigrate":
            raise QMPError("GenericError", "The VM is waiting for an incoming migration")
        if self.running:
            self.vm_stop("paused")

    def qmp_cont(self, args: dict) -> None:
        if self.runstate in ("inmigrate", "postmigrate", "finish-migrate"):
            raise QMPError("GenericError", f"cannot continue a VM in state '{self.runstate}'")
        if not self.running:
            self.vm_start()

    def qmp_quit(self, args: dict) -> None:
        assert self.server is not None
        self.server.request_close()

    def _migration_active(self) -> bool:
        m = self.migration
        return m is not None and not m.finished.is_set()

    def qmp_migrate_set_parameters(self, args: dict) -> None:
        """As QEMU: tunables change at any time, also during a migration.

        A parameter that shapes the stream (backend-transfer, x-batch-fds) is
        fixed once a stream has started: on the source from ``migrate`` on, on
        the destination from the moment a source connected. Until then a
        listening or deferred destination takes every change.
        """
        self._apply_params(self.params.updated(args))

    def _apply_params(self, new: MigrationParameters) -> None:
        m = self.migration
        if m is not None and not m.finished.is_set():
            changed = {name for name in STREAM_SHAPING if getattr(new, name) != getattr(self.params, name)}
            if isinstance(m, IncomingMigration) and not m.connected:
                m.set_params(new)  # raises the transport check's error for a wrong listener
            elif changed:
                raise QMPError(MIGRATION_IN_PROGRESS)
            else:
                m.params = new
        self.params = new

    def qmp_migrate_set_capabilities(self, args: dict) -> None:
        """QEMU's capability list; migfd knows ``events`` and ``backend-transfer``.

        ``backend-transfer`` is the same switch as the parameter (the first
        qemu-devel proposal made it a capability). As in QEMU, capabilities
        never change under an outgoing migration.
        """
        caps = args.get("capabilities")
        if not isinstance(caps, list):
            raise QMPError("Parameter 'capabilities' is missing")
        states: dict[str, bool] = {}
        for cap in caps:
            if not isinstance(cap, dict) or not isinstance(cap.get("state"), bool):
                raise QMPError("Parameter 'state' expects a boolean")
            name = cap.get("capability")
            if name not in CAPABILITIES:
                raise QMPError(f"Parameter 'capability' does not accept value '{name}'")
            states[name] = cap["state"]
        if isinstance(self.migration, OutgoingMigration) and not self.migration.finished.is_set():
            raise QMPError(MIGRATION_IN_PROGRESS)
        if "backend-transfer" in states:
            self._apply_params(replace(self.params, backend_transfer=states.pop("backend-transfer")))
        self.capabilities.update(states)

    def qmp_query_migrate_capabilities(self, args: dict) -> list[dict]:
        states = dict(self.capabilities, **{"backend-transfer": self.params.backend_transfer})
        return [{"capability": name, "state": states[name]} for name in CAPABILITIES]

    def qmp_migrate(self, args: dict, session) -> None:
        if self.runstate in ("inmigrate", "postmigrate"):
            raise QMPError("GenericError", f"cannot migrate a VM in state '{self.runstate}'")
        if self._migration_active():
            raise QMPError(MIGRATION_IN_PROGRESS)
        extra = set(args) - {"uri", "channels", "detach", "resume", "blk", "inc"}
        if extra:
            raise QMPError("GenericError", f"Parameter '{sorted(extra)[0]}' is unexpected")
        uri = args.get("uri")
        named_fd = None
        if isinstance(uri, str) and uri.startswith("fd:") and not uri[3:].isdigit():
            # A name given to getfd, as in QEMU. The fd leaves the session: this
            # migration owns it and closes it, whether it is refused or runs.
            named_fd = session.get_fd(uri[3:])
            uri = f"fd:{named_fd}"
        try:
            address = parse_address(uri, args.get("channels"))
            check_transport(address, self.params)  # before anything is opened or sent
            migration = OutgoingMigration(self, address, self.params, self._on_status)
        except BaseException:
            if named_fd is not None:
                close_fd(named_fd)
            raise
        if named_fd is not None:
            migration.owned_fds.append(named_fd)
        self.migration = migration
        migration.hook = self.faults.hook(migration)
        migration.start()

    def qmp_migrate_incoming(self, args: dict) -> None:
        if self.runstate != "inmigrate":
            raise QMPError("GenericError", "'-incoming' was not specified on the command line")
        if self.migration is not None:
            raise QMPError("GenericError", "The incoming migration has already been started")
        address = parse_address(args.get("uri"), args.get("channels"))
        check_transport(address, self.params)  # file: opens no listener that would check it
        self.start_incoming(address)

    def start_incoming(self, address) -> None:
        migration = IncomingMigration(self, address, self.params, self._on_status)
        _grow_fd_table(FD_TABLE_RESERVE)
        # Guest threads start now, parked: creating them at resume would be downtime.
        # Parked, they touch no backend; the ones that arrive are theirs at resume.
        self._start_guest_threads()
        self.migration = migration
        migration.hook = self.faults.hook(migration)
        migration.start()

    def qmp_query_migrate(self, args: dict) -> dict:
        out = {} if self.migration is None else self.migration.query()
        if self.server is not None and self.server.refused:
            out["x-refused-qmp-connections"] = self.server.refused
        return out

    def qmp_migrate_cancel(self, args: dict) -> None:
        if isinstance(self.migration, OutgoingMigration):
            self.migration.cancel()

    def qmp_query_guest(self, args: dict) -> dict:
        """migfd's own: what the guest workload did, and RAM verification on request."""
        out: dict[str, Any] = {"status": self.runstate, "pid": os.getpid(),
                               "devices": [d.info() for d in self.devices], "accel": self.accel.info()}
        if args.get("verify"):
            # A running guest changes pages while they are read: check a still image.
            with self._lock:
                if self.running:
                    self.ctl.pause()
                try:
                    out["ram-verify"] = {d.id: d.verify() for d in self.devices
                                         if isinstance(d, MemoryBackendMemfd) and d.map is not None}
                finally:
                    if self.running:
                        self.ctl.resume()
        return out

    def qmp_migration_fault(self, args: dict) -> None:
        """migfd's own: arm a fault at a phase, or with phase "now" do it at once."""
        phase, action = args.get("phase"), args.get("action")
        if not isinstance(phase, str) or not isinstance(action, str):
            raise QMPError("GenericError", "x-migration-fault takes 'phase' and 'action' strings")
        if phase != "now":
            self.faults.arm(phase, action)
            return
        if self.migration is None or self.migration.finished.is_set():
            raise QMPError("GenericError", "no migration is running")
        if action == "pause":
            raise QMPError("GenericError", "'pause' needs a phase")
        self.faults.fire(self.migration, action)

    def _on_status(self, status: MigrationStatus) -> None:
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


# -- the process ---------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", default="migfd-vm")
    p.add_argument("--qmp", required=True, help="unix:PATH of the QMP monitor")
    p.add_argument("--incoming", help="URI to receive a migration on, or 'defer'")
    p.add_argument("--machine", default=DEFAULT_MACHINE)
    p.add_argument("--object", action="append", default=[], metavar="memory-backend-memfd,...")
    p.add_argument("--netdev", action="append", default=[], metavar="tap,...")
    p.add_argument("--chardev", action="append", default=[], metavar="socket,...")
    p.add_argument("--dirty-rate", type=int, default=0, metavar="BYTES_PER_S",
                   help="how fast the guest dirties RAM")
    p.add_argument("--accel", choices=ACCELERATORS, default=os.environ.get(ENV_ACCEL) or None,
                   help="who runs the guest: kvm (the default; falls back to thread, with the "
                        f"reason in x-query-guest, where /dev/kvm does not work) or thread; "
                        f"default from ${ENV_ACCEL}")
    p.add_argument("--smp", type=int, default=1, metavar="N", help="vCPUs (kvm)")
    p.add_argument("--guest-duty", type=float, default=float(os.environ.get(ENV_GUEST_DUTY) or 1.0),
                   metavar="FRACTION",
                   help="the part of each period a vCPU runs; the rest it idles in the VMM (kvm; "
                        "default 1: it spins, holding a core, as QEMU's counting guest does; "
                        f"default from ${ENV_GUEST_DUTY})")
    p.add_argument("--guest-duty-period-us", type=int, default=1000, metavar="US",
                   help="the duty cycle's period (kvm)")
    p.add_argument("--guest-working-set", default="0", metavar="SIZE",
                   help="how much of the first RAM backend the guest stamps, from its first data "
                        "page (kvm; default 0: all of it below 4 GiB)")


def build_vm(args: argparse.Namespace) -> VM:
    config = GuestConfig(smp=args.smp, dirty_rate_bytes_s=args.dirty_rate,
                         working_set_bytes=opt_size(args.guest_working_set), duty=args.guest_duty,
                         duty_period_us=args.guest_duty_period_us)
    accel = create(args.accel, config)
    log.info("accelerator %s%s", accel.name,
             f" (asked for {accel.requested}: {accel.fallback_reason})" if accel.fallback_reason else "")
    # Under kvm the guest's code dirties RAM; the backends' own dirtying threads stay idle.
    dirty_rate = args.dirty_rate if accel.name == "thread" else 0
    devices: list[Device] = []
    try:
        for group in ("object", "netdev", "chardev"):
            for text in getattr(args, group):
                devices.append(from_options(group, text, dirty_rate_bytes_s=dirty_rate))
        return VM(args.name, devices, machine=args.machine, incoming=args.incoming is not None,
                  accel=accel)
    except BaseException:
        accel.close()
        raise


def run(args: argparse.Namespace) -> int:
    """``migfd vm``: serve QMP until ``quit`` or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s {args.name} %(name)s: %(message)s")
    qmp = parse_uri(args.qmp)
    if not hasattr(qmp, "path") or not args.qmp.startswith("unix:"):
        raise MigrationError("--qmp takes unix:PATH")
    # The migration thread, the QMP loop and the guest threads share the GIL;
    # a thread woken by the kernel (the PONG, the EOF) would otherwise wait up
    # to the default 5 ms switch interval for it, which is downtime.
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    vm = build_vm(args)
    try:
        if args.incoming is None:
            vm.boot()
        return asyncio.run(_serve(vm, qmp.path, args.incoming))  # type: ignore[union-attr]
    finally:
        vm.shutdown()


async def _serve(vm: VM, qmp_path: str, incoming: str | None) -> int:
    server = QMPServer(qmp_path)
    vm.register(server)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_close)
    if incoming not in (None, "defer"):
        vm.start_incoming(parse_uri(incoming))
    await server.wait_closed()
    return 0
