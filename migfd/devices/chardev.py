"""A socket chardev (QEMU's ``-chardev socket,server=on``) whose guest echoes lines.

The backend is the listening UNIX socket and the client connected to it. With
handover both fds move to the destination and the client notices nothing: the
connection is the same kernel object. With state copy the source closes both
at switchover, the destination listens again at the same path, and the client
sees EOF and must reconnect. A line received in part travels as state.
"""

from __future__ import annotations

import os
import select
import socket
from typing import Any

from migfd.devices.base import Device, GuestThread, RunControl, register_device
from migfd.devices.qemu_opts import opt_bool
from migfd.errors import MigrationError
from migfd.units import KiB
from migfd.stream import Bool, Fd, Subsection, UInt64, VBuffer, VMStateDescription

MAX_PENDING = 64 * KiB

_LISTENER = VMStateDescription(
    "chardev-socket/listener", version_id=1, minimum_version_id=1, fields=(Fd("listener_fd"),))
_CLIENT = VMStateDescription(
    "chardev-socket/client", version_id=1, minimum_version_id=1, fields=(Fd("client_fd"),))

VMSD = VMStateDescription(
    "chardev-socket", version_id=1, minimum_version_id=1,
    fields=(VBuffer("path", max_size=108), Bool("connected"), UInt64("lines_echoed"),
            VBuffer("pending", max_size=MAX_PENDING)),
    subsections=(
        Subsection(_LISTENER, needed=lambda state: state.get("listener_fd") is not None),
        Subsection(_CLIENT, needed=lambda state: state.get("client_fd") is not None),
    ))


@register_device
class ChardevSocket(Device):
    """``-chardev socket,id=ID,path=PATH,server=on[,backend-transfer=on]``."""

    group = "chardev"
    kind = "socket"
    vmsd = VMSD

    @classmethod
    def from_opts(cls, id: str, opts: dict[str, str], backend_transfer: bool) -> "ChardevSocket":
        if "path" not in opts:
            raise MigrationError(f"chardev socket '{id}' needs path=")
        if not opt_bool(opts, "server", False):
            raise MigrationError(f"chardev socket '{id}': only server=on is supported")
        opt_bool(opts, "wait", False)
        return cls(id, opts.pop("path"), backend_transfer)

    def __init__(self, id: str, path: str, backend_transfer: bool = False, mode: int = 0o600):
        super().__init__(id, backend_transfer)
        self.path = path
        self.mode = mode
        self.listener: socket.socket | None = None
        self.client: socket.socket | None = None
        self.pending = b""
        self.lines_echoed = 0
        self.connections = 0

    # -- backend ------------------------------------------------------------

    def open_backend(self) -> None:
        self._listen()

    def _listen(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            old = os.umask(0o777 & ~self.mode)
            try:
                sock.bind(self.path)
            finally:
                os.umask(old)
            sock.listen(1)
        except OSError as exc:
            sock.close()
            raise MigrationError(f"chardev '{self.id}': cannot listen on {self.path}: {exc.strerror}") from exc
        self.listener = sock
        self.backend_generation += 1

    def owned_fds(self) -> list[int]:
        return [s.fileno() for s in (self.listener, self.client) if s is not None]

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
            self.backend_generation += 1

    def close(self) -> None:
        self._drop_client()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self.backend_generation += 1

    # -- guest workload --------------------------------------------------------

    def start_guest(self, ctl: RunControl) -> None:
        self.guests.append(ctl.spawn(f"guest-chardev-{self.id}", self._echo_loop))

    def _echo_loop(self, guest: GuestThread) -> None:
        while True:
            poller = select.poll()
            poller.register(guest.wake_fd, select.POLLIN)
            sock = self.client if self.client is not None else self.listener
            if sock is not None:
                poller.register(sock.fileno(), select.POLLIN)
            ready = guest.poll(poller, 1000)
            with guest.turn() as alive:
                if not alive:
                    return
                fds = {fd for fd, _ in ready}
                if guest.wake_fd in fds:
                    guest.drain()
                    # Woken by a resume: lines may have queued while the VM was
                    # stopped. Serve them in this turn, not after another poll.
                    if self.client is not None:
                        fds.add(self.client.fileno())
                    sock = self.client if self.client is not None else self.listener
                if sock is None or sock.fileno() not in fds:
                    continue
                if sock is self.listener and self.client is None:
                    self._accept()
                elif sock is self.client:  # not a socket that left while we waited
                    self._serve()

    def _accept(self) -> None:
        assert self.listener is not None
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, OSError):
            return
        conn.setblocking(False)
        self.client = conn
        self.connections += 1
        self.backend_generation += 1

    def _serve(self) -> None:
        assert self.client is not None
        try:
            data = self.client.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client()  # client went away: wait for the next one
            self.pending = b""
            return
        buf = self.pending + data
        *lines, self.pending = buf.split(b"\n")
        if len(self.pending) > MAX_PENDING:
            self.pending = self.pending[-MAX_PENDING:]
        if not lines:
            return
        # Every complete line in one send: a send per line would give up the GIL
        # (and wait to take it back) once a line, behind whatever else runs.
        try:
            self.client.setblocking(True)
            self.client.sendall(b"\n".join(lines) + b"\n")
            self.client.setblocking(False)
        except OSError:
            self._drop_client()
            return
        self.lines_echoed += len(lines)

    # -- migration ------------------------------------------------------------

    def save_state(self, handover: bool) -> dict[str, Any]:
        return {"path": self.path.encode(), "connected": self.client is not None,
                "lines_echoed": self.lines_echoed, "pending": self.pending,
                "listener_fd": self.listener.fileno() if handover and self.listener else None,
                "client_fd": self.client.fileno() if handover and self.client else None}

    def detach(self) -> None:
        self.close()
        self.leave_polls()  # the client sees EOF now (no poll holds the socket); it reconnects

    def reattach(self) -> None:
        if self.listener is None:
            self._listen()

    def load_state(self, state: dict[str, Any], received_fds: tuple[int, ...]) -> None:
        path = state["path"].decode("utf-8", "replace")
        if path != self.path:
            raise MigrationError(f"chardev '{self.id}': source listens on {path}, destination on {self.path}")
        self.lines_echoed = state["lines_echoed"]
        self.pending = state["pending"]
        listener_fd = state.get("listener_fd")
        client_fd = state.get("client_fd")
        if listener_fd is None:
            if self.listener is None:  # state copy; else the sockets came early (x-early-fds)
                self._listen()
            return
        listener = adopt_socket_fd(listener_fd, listening=True, device=self.id)
        client = None
        if client_fd is not None:
            try:
                client = adopt_socket_fd(client_fd, listening=False, device=self.id)
            except MigrationError:
                listener.detach()  # the fds stay the migration's, which closes them
                raise
        # From here the sockets own the fds.
        self.listener = listener
        self.client = client
        self.backend_generation += 1

    def info(self) -> dict[str, Any]:
        return {"id": self.id, "path": self.path, "connected": self.client is not None,
                "lines-echoed": self.lines_echoed, "connections": self.connections}


def adopt_socket_fd(fd: int, *, listening: bool, device: str) -> socket.socket:
    """A handed-over chardev fd as a non-blocking socket, if it is a UNIX stream socket, listening or connected.

    The socket object made to check the fd is the one kept: this runs inside
    the downtime, and a probe on a dup of the fd costs as much again. When
    the fd is refused it is left open, for its owner to close.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise MigrationError(f"chardev '{device}': received fd is not a socket: {exc.strerror}") from exc
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            raise MigrationError(f"chardev '{device}': received fd is not a UNIX stream socket")
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        if bool(accepting) != listening:
            what = "listening" if listening else "connected"
            raise MigrationError(f"chardev '{device}': received socket is not {what}")
        if not listening:
            try:
                sock.getpeername()
            except OSError:
                raise MigrationError(f"chardev '{device}': received socket is not connected") from None
        sock.setblocking(False)
    except MigrationError:
        sock.detach()
        raise
    except OSError as exc:
        sock.detach()
        raise MigrationError(f"chardev '{device}': received fd is not a socket: {exc.strerror}") from exc
    return sock
