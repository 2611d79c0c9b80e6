"""Migration addresses (unix:, tcp:, fd:, file: and QMP ``channels``) and the transport check.

With backend-transfer on, the channel must be a UNIX domain socket, because fds
only travel over one; the check runs before any socket is opened or byte sent,
for ``migrate`` and ``migrate-incoming`` alike. An ``fd:`` channel counts as a
UNIX socket when its fd is an AF_UNIX stream socket.
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable, Union

from migfd.channel import QEMUFile
from migfd.errors import TransportError
from migfd.params import MigrationParameters

log = logging.getLogger("migfd.transport")

UNIX_REQUIRED = ("Migration requires a UNIX domain socket as transport, "
                 "because backend-transfer is enabled")


@dataclass(frozen=True)
class UnixAddress:
    path: str

    def __str__(self) -> str:
        return f"unix:{self.path}"


@dataclass(frozen=True)
class TcpAddress:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


@dataclass(frozen=True)
class FdAddress:
    fd: int

    def __str__(self) -> str:
        return f"fd:{self.fd}"


@dataclass(frozen=True)
class FileAddress:
    path: str
    offset: int = 0

    def __str__(self) -> str:
        return f"file:{self.path}" + (f",offset={self.offset}" if self.offset else "")


Address = Union[UnixAddress, TcpAddress, FdAddress, FileAddress]


def parse_uri(uri: str) -> Address:
    """Parse a QEMU migration URI: unix:PATH, tcp:HOST:PORT, fd:N, file:PATH."""
    if not isinstance(uri, str):
        raise TransportError("migration URI must be a string")
    scheme, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise TransportError(f"Invalid migration URI '{uri}': expected unix:, tcp:, fd: or file:")
    if scheme == "unix":
        return UnixAddress(rest)
    if scheme == "tcp":
        if rest.startswith("["):
            host, _, port = rest[1:].partition("]:")
        else:
            host, _, port = rest.rpartition(":")
        return TcpAddress(host, _port(port, uri))
    if scheme == "fd":
        if not rest.isdigit():
            raise TransportError(f"Invalid migration URI '{uri}': fd: takes a number")
        return FdAddress(int(rest))
    if scheme == "file":
        path, _, opts = rest.partition(",offset=")
        offset = _int(opts, uri) if opts else 0
        if offset < 0:
            raise TransportError(f"Invalid migration URI '{uri}': offset must not be negative")
        return FileAddress(path, offset)
    raise TransportError(f"Invalid migration URI '{uri}': unknown transport '{scheme}'")


def _int(text: str, uri: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise TransportError(f"Invalid migration URI '{uri}': '{text}' is not a number") from None


def _port(text: str, uri: str) -> int:
    port = _int(text, uri) if text else -1
    if not 0 <= port <= 65535:
        raise TransportError(f"Invalid migration URI '{uri}': bad port '{text}'")
    return port


def parse_channels(channels: Any) -> Address:
    """Parse QMP's ``channels`` argument: one "main" channel with its MigrationAddress."""
    if not isinstance(channels, list) or len(channels) != 1 or not isinstance(channels[0], dict):
        raise TransportError("'channels' must hold exactly one channel")
    channel = channels[0]
    if channel.get("channel-type") != "main":
        raise TransportError("the only supported channel-type is 'main'")
    addr = channel.get("addr")
    if not isinstance(addr, dict):
        raise TransportError("channel lacks member 'addr'")
    transport = addr.get("transport")
    try:
        if transport == "socket":
            kind = addr.get("type")
            if kind == "unix":
                return UnixAddress(str(addr["path"]))
            if kind == "inet":
                return TcpAddress(str(addr["host"]), _port(str(addr["port"]), "channels"))
            if kind == "fd":
                return parse_uri(f"fd:{addr['str']}")
            raise TransportError(f"socket type '{kind}' is not supported")
        if transport == "file":
            offset = addr.get("offset", 0)
            if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
                raise TransportError(f"file offset {offset!r} must be a non-negative integer")
            return FileAddress(str(addr["filename"]), offset)
    except KeyError as exc:
        raise TransportError(f"channel address lacks member '{exc.args[0]}'") from None
    raise TransportError(f"transport '{transport}' is not supported")


def parse_address(uri: str | None = None, channels: Any = None) -> Address:
    """``migrate``/``migrate-incoming`` take either a uri or channels, not both."""
    if (uri is None) == (channels is None):
        raise TransportError("need either 'uri' or 'channels', and not both")
    return parse_uri(uri) if uri is not None else parse_channels(channels)


def fd_is_unix_socket(fd: int) -> bool:
    """True when ``fd`` is an AF_UNIX stream socket (QEMU's first proposal forgot fd:)."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == socket.AF_UNIX
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM)
    finally:
        sock.close()


def is_unix_socket(address: Address) -> bool:
    if isinstance(address, UnixAddress):
        return True
    if isinstance(address, FdAddress):
        return fd_is_unix_socket(address.fd)
    return False


def check_transport(address: Address, params: MigrationParameters) -> None:
    """Refuse a channel that cannot carry fds when backend-transfer is on."""
    if params.backend_transfer and not is_unix_socket(address):
        raise TransportError(UNIX_REQUIRED)


# -- opening channels -----------------------------------------------------


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end of a UNIX socket (SO_PEERCRED)."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


def connect_outgoing(address: Address, params: MigrationParameters, *,
                     timeout_s: float | None = 10.0) -> QEMUFile:
    """Open the source's channel; the transport check comes first."""
    check_transport(address, params)
    fd_batching = {"batch_fds": params.x_batch_fds, "fds_per_message": params.x_fds_per_message}
    try:
        if isinstance(address, UnixAddress):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout_s)
            try:
                sock.connect(address.path)
            except BaseException:
                sock.close()
                raise
            return QEMUFile.from_socket(sock, "migration-socket-outgoing", **fd_batching)
        if isinstance(address, TcpAddress):
            sock = socket.create_connection((address.host, address.port), timeout=timeout_s)
            return QEMUFile.from_socket(sock, "migration-socket-outgoing")
        if isinstance(address, FdAddress):
            sock = socket.socket(fileno=os.dup(address.fd))
            return QEMUFile.from_socket(sock, f"migration-fd-{address.fd}", **fd_batching)
        return QEMUFile.open_file(address.path, "wb")
    except OSError as exc:
        raise TransportError(f"Failed to connect to '{address}': {exc.strerror or exc}") from exc


class IncomingListener:
    """The destination's listening socket for ``unix:`` and ``tcp:`` addresses.

    A UNIX socket is created with ``mode`` (0600 by default) before anyone can
    connect, and a peer of another uid is refused: no fd is ever exchanged with
    a stranger, and the refusal costs the rightful source nothing.
    """

    def __init__(self, address: Address, params: MigrationParameters, *,
                 mode: int = 0o600, allowed_uids: frozenset[int] | None = None,
                 on_refused: Callable[[], None] | None = None):
        check_transport(address, params)
        self._on_refused = on_refused
        self.address = address
        self.params = params
        self.allowed_uids = allowed_uids if allowed_uids is not None else frozenset({os.getuid()})
        self._sock: socket.socket | None = None
        #: connections refused because their peer's uid is not allowed
        self.refused = 0
        try:
            if isinstance(address, UnixAddress):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                old = os.umask(0o777 & ~mode)
                try:
                    sock.bind(address.path)
                finally:
                    os.umask(old)
                os.chmod(address.path, mode)
            elif isinstance(address, TcpAddress):
                sock = socket.create_server((address.host, address.port))
            else:
                raise TransportError(f"'{address}' cannot be listened on")
            sock.listen(1)
        except OSError as exc:
            raise TransportError(f"Failed to listen on '{address}': {exc.strerror or exc}") from exc
        self._sock = sock

    def set_params(self, params: MigrationParameters) -> None:
        """Parameters changed before a source connected; the transport check applies to them too."""
        check_transport(self.address, params)
        self.params = params

    @property
    def socket(self) -> socket.socket:
        assert self._sock is not None
        return self._sock

    def accept(self, timeout_s: float | None = None) -> QEMUFile:
        """The rightful source's channel; strangers are refused and cost nothing.

        A peer of another uid gets one line saying why, is closed, and is
        counted in :attr:`refused`; the listener keeps waiting, within the
        same ``timeout_s``, for a peer that is allowed.
        """
        sock = self.socket
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            sock.settimeout(None if deadline is None else max(deadline - time.monotonic(), 0.0))
            try:
                conn, _ = sock.accept()
            except TimeoutError as exc:
                raise TransportError(f"no source connected to '{self.address}' within {timeout_s} s") from exc
            except OSError as exc:
                raise TransportError(f"accept on '{self.address}' failed: {exc.strerror or exc}") from exc
            if conn.family == socket.AF_UNIX:
                uid = peer_uid(conn)
                if uid not in self.allowed_uids:
                    self._refuse(conn, uid)
                    continue
            conn.settimeout(None)
            return QEMUFile.from_socket(conn, "migration-socket-incoming", batch_fds=self.params.x_batch_fds)

    def _refuse(self, conn: socket.socket, uid: int) -> None:
        self.refused += 1
        if self._on_refused is not None:
            self._on_refused()
        log.warning("refused a migration connection from uid %d on '%s'; still listening", uid, self.address)
        try:
            # Non-blocking: a stranger that never reads must not hold the listener up.
            conn.setblocking(False)
            conn.send(f"migfd: access denied: peer uid {uid} is not allowed\n".encode())
        except OSError:
            pass
        conn.close()

    def close(self) -> None:
        if self._sock is None:
            return
        self._sock.close()
        self._sock = None
        if isinstance(self.address, UnixAddress):
            try:
                os.unlink(self.address.path)
            except OSError:
                pass


def open_incoming_file(address: FileAddress) -> QEMUFile:
    f = QEMUFile.open_file(address.path, "rb", offset=address.offset)
    return f
