"""The QMP commands of one VM process, as QEMU's monitor names and answers them.

:class:`Monitor` holds no state of its own: it checks each command's
arguments and acts on the :class:`~migfd.vm.machine.VM` (run state,
migration parameters and capabilities, the migration, fault injection).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

from migfd.errors import QMPError
from migfd.fds import close_fd
from migfd.migration import IncomingMigration, OutgoingMigration
from migfd.params import MigrationParameters
from migfd.qmp import QMPServer
from migfd.transport import check_transport, parse_address
from migfd.vm.machine import VM

#: QEMU's words when a migration is running and a change would alter it
MIGRATION_IN_PROGRESS = "There's a migration process in progress"
#: parameters that shape the stream: fixed once a stream has started
STREAM_SHAPING = ("backend_transfer", "x_batch_fds", "x_early_fds", "x_fds_per_message")
#: the migration capabilities migfd knows (QEMU's MigrationCapability names)
CAPABILITIES = ("events", "backend-transfer")


class Monitor:
    """The QMP commands of :attr:`vm`; :meth:`register` puts them on a server."""

    def __init__(self, vm: VM):
        self.vm = vm


    def register(self, server: QMPServer) -> None:
        self.vm.server = server
        commands = {
            "query-status": self.qmp_query_status,
            "query-name": lambda args: {"name": self.vm.name},
            "stop": self.qmp_stop,
            "cont": self.qmp_cont,
            "quit": self.qmp_quit,
            "migrate-set-parameters": self.qmp_migrate_set_parameters,
            "migrate-set-capabilities": self.qmp_migrate_set_capabilities,
            "query-migrate-capabilities": self.qmp_query_migrate_capabilities,
            "query-migrate-parameters": lambda args: self.vm.params.to_qmp(),
            "migrate-incoming": self.qmp_migrate_incoming,
            "query-migrate": self.qmp_query_migrate,
            "migrate_cancel": self.qmp_migrate_cancel,
            "x-query-guest": self.qmp_query_guest,
            "x-migration-fault": self.qmp_migration_fault,
            "x-migration-continue": lambda args: self.vm.faults.release(),
            "x-query-fault": lambda args: self.vm.faults.query(),
        }
        for name, handler in commands.items():
            server.register(name, handler)
        server.register("migrate", self.qmp_migrate, with_session=True)

    def qmp_query_status(self, args: dict) -> dict:
        return {"running": self.vm.running, "singlestep": False, "status": self.vm.runstate}

    def qmp_stop(self, args: dict) -> None:
        if self.vm.runstate == "inmigrate":
            raise QMPError("GenericError", "The VM is waiting for an incoming migration")
        if self.vm.running:
            self.vm.vm_stop("paused")

    def qmp_cont(self, args: dict) -> None:
        if self.vm.runstate in ("inmigrate", "postmigrate", "finish-migrate"):
            raise QMPError("GenericError", f"cannot continue a VM in state '{self.vm.runstate}'")
        if not self.vm.running:
            self.vm.vm_start()

    def qmp_quit(self, args: dict) -> None:
        assert self.vm.server is not None
        self.vm.server.request_close()

    def _migration_active(self) -> bool:
        m = self.vm.migration
        return m is not None and not m.finished.is_set()

    def qmp_migrate_set_parameters(self, args: dict) -> None:
        """As QEMU: tunables change at any time, also during a migration.

        A parameter that shapes the stream (backend-transfer, x-batch-fds,
        x-fds-per-message, x-early-fds) is fixed once a stream has started: on the source
        from ``migrate`` on, on the destination from the moment a source
        connected. Until then a listening or deferred destination takes every
        change.
        """
        self._apply_params(self.vm.params.updated(args))

    def _apply_params(self, new: MigrationParameters) -> None:
        m = self.vm.migration
        if m is not None and not m.finished.is_set():
            changed = {name for name in STREAM_SHAPING if getattr(new, name) != getattr(self.vm.params, name)}
            if isinstance(m, IncomingMigration) and not m.connected:
                m.set_params(new)  # raises the transport check's error for a wrong listener
            elif changed:
                raise QMPError(MIGRATION_IN_PROGRESS)
            else:
                m.params = new
        self.vm.params = new

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
        if isinstance(self.vm.migration, OutgoingMigration) and not self.vm.migration.finished.is_set():
            raise QMPError(MIGRATION_IN_PROGRESS)
        if "backend-transfer" in states:
            self._apply_params(replace(self.vm.params, backend_transfer=states.pop("backend-transfer")))
        self.vm.capabilities.update(states)

    def qmp_query_migrate_capabilities(self, args: dict) -> list[dict]:
        states = dict(self.vm.capabilities, **{"backend-transfer": self.vm.params.backend_transfer})
        return [{"capability": name, "state": states[name]} for name in CAPABILITIES]

    def qmp_migrate(self, args: dict, session) -> None:
        if self.vm.runstate in ("inmigrate", "postmigrate"):
            raise QMPError("GenericError", f"cannot migrate a VM in state '{self.vm.runstate}'")
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
            check_transport(address, self.vm.params)  # before anything is opened or sent
            migration = OutgoingMigration(self.vm, address, self.vm.params, self.vm.on_migration_status)
        except BaseException:
            if named_fd is not None:
                close_fd(named_fd)
            raise
        if named_fd is not None:
            migration.owned_fds.append(named_fd)
        self.vm.migration = migration
        migration.hook = self.vm.faults.hook(migration)
        migration.start()

    def qmp_migrate_incoming(self, args: dict) -> None:
        if self.vm.runstate != "inmigrate":
            raise QMPError("GenericError", "'-incoming' was not specified on the command line")
        if self.vm.migration is not None:
            raise QMPError("GenericError", "The incoming migration has already been started")
        address = parse_address(args.get("uri"), args.get("channels"))
        check_transport(address, self.vm.params)  # file: opens no listener that would check it
        self.vm.start_incoming(address)

    def qmp_query_migrate(self, args: dict) -> dict:
        out = {} if self.vm.migration is None else self.vm.migration.query()
        if self.vm.server is not None and self.vm.server.refused:
            out["x-refused-qmp-connections"] = self.vm.server.refused
        return out

    def qmp_migrate_cancel(self, args: dict) -> None:
        if isinstance(self.vm.migration, OutgoingMigration):
            self.vm.migration.cancel()

    def qmp_query_guest(self, args: dict) -> dict:
        """migfd's own: what the guest workload did, and RAM verification on request."""
        out: dict[str, Any] = {"status": self.vm.runstate, "pid": os.getpid(),
                               "devices": [d.info() for d in self.vm.devices], "accel": self.vm.accel.info()}
        if args.get("verify"):
            # A running guest changes pages while they are read: check a still image.
            with self.vm.run_lock:
                if self.vm.running:
                    self.vm.ctl.pause()
                try:
                    checks = {d.id: d.verify() for d in self.vm.devices}
                    out["ram-verify"] = {name: check for name, check in checks.items() if check is not None}
                finally:
                    if self.vm.running:
                        self.vm.ctl.resume()
        return out

    def qmp_migration_fault(self, args: dict) -> None:
        """migfd's own: arm a fault at a phase, or with phase "now" do it at once."""
        phase, action = args.get("phase"), args.get("action")
        if not isinstance(phase, str) or not isinstance(action, str):
            raise QMPError("GenericError", "x-migration-fault takes 'phase' and 'action' strings")
        if phase != "now":
            self.vm.faults.arm(phase, action)
            return
        if self.vm.migration is None or self.vm.migration.finished.is_set():
            raise QMPError("GenericError", "no migration is running")
        if action == "pause":
            raise QMPError("GenericError", "'pause' needs a phase")
        self.vm.faults.fire(self.vm.migration, action)
