"""One client connection of the QMP server: credentials, requests in order, replies and events.

Theory of operation
-------------------
Every accepted connection is a :class:`QMPSession` (QEMU calls the
per-monitor state ``MonitorQMP``) with two tasks:

* the *reader* checks the peer's credentials, queues the greeting, then cuts
  the input into JSON values as QEMU's json-streamer does
  (:class:`~migfd.qmp.json_stream.JSONStreamSplitter`: where braces
  balance, not at newlines: qemu.qmp sends none) and runs the commands one
  at a time, in order.  One request may be at most ``max_request_bytes``
  (1 MiB); a longer one ends that session, not the server.  While a handler
  runs, the reader reads nothing more, so one session's commands never
  overlap, and a slow client is held back by the kernel's socket buffer;
  other sessions have their own reader and are not blocked by an awaiting
  handler.  A sync handler runs in the event loop thread and blocks every
  session while it runs: anything slow should be an ``async def``.  Fds that
  arrive with SCM_RIGHTS (qemu.qmp's ``send_fd_scm``) wait in the session,
  oldest first, until ``getfd`` names one.
* the *writer* sends queued lines in order.  Replies and events go through
  the same queue, so an event emitted while a command runs is sent before
  that command's reply, as in QEMU.  When the reader ends (EOF, a fatal
  error, :meth:`~migfd.qmp.QMPServer.close`) it queues an end marker; the
  writer sends everything before it and only then closes the socket.  This
  is what makes "reply, then EOF" work for ``quit``.

Every connection's SO_PEERCRED uid must be in the server's ``allowed_uids``;
anyone else gets one error line and EOF.
"""

from __future__ import annotations

import array
import asyncio
import inspect
import json
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from migfd.errors import MigrationError, QMPError
from migfd.fds import close_fd, close_fds
from migfd.qmp.json_stream import JSONStreamSplitter, ValueTooLongError

__all__ = ["MAX_PENDING_FDS", "PeerCredentials", "QMPSession"]

logger = logging.getLogger("migfd.qmp")

#: Most file descriptors a client may have sent and not yet claimed with
#: ``getfd`` (QEMU's chardev keeps at most TCP_MAX_FDS = 16).
MAX_PENDING_FDS = 16

# The kernel never passes more than SCM_MAX_FD fds in one message; a control
# buffer that large means MSG_CTRUNC can only come from something abnormal.
_SCM_MAX_FD = 253
_RECV_BYTES = 65536
_CMSG_SPACE = socket.CMSG_SPACE(_SCM_MAX_FD * array.array("i").itemsize)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[..., Any]


class PeerCredentials(NamedTuple):
    """The peer of a connection as the kernel saw it at connect() (struct ucred)."""

    pid: int
    uid: int
    gid: int


class Command(NamedTuple):
    """A registered QMP command: its handler and whether it takes the session."""

    handler: Handler
    with_session: bool


class SessionHost(Protocol):
    """What a session uses of the server that accepted it (a ``QMPServer``)."""

    path: str
    allowed_uids: frozenset[int]
    refused: int
    max_request_bytes: int
    _commands: dict[str, Command]

    def greeting(self) -> dict[str, Any]: ...

    def _schedule_close(self) -> None: ...

    def _forget(self, session: QMPSession) -> None: ...


def json_line(obj: object) -> bytes:
    """One message as QEMU writes it: a JSON object and CRLF, ASCII only."""
    return json.dumps(obj, allow_nan=False).encode("ascii") + b"\r\n"


def error_reply(error_class: str, desc: str) -> dict[str, Any]:
    """The ``{"error": ...}`` member of a failed command's reply."""
    return {"error": {"class": error_class, "desc": desc}}


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON and QEMU do not.
    raise ValueError(f"invalid keyword '{name}'")


class _SessionFatal(Exception):
    """The session cannot go on; the message is sent as a GenericError first."""


class QMPSession:
    """One client connection: its negotiation state, its queues and its fds.

    Created by :class:`~migfd.qmp.QMPServer` for each accepted connection.
    Handlers registered with ``with_session=True`` receive it.
    """

    def __init__(self, server: SessionHost, sock: socket.socket) -> None:
        self._server = server
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        #: The peer's credentials, read from SO_PEERCRED at accept time.
        self.peer: PeerCredentials | None = None
        #: True once ``qmp_capabilities`` succeeded: commands and events flow.
        self.negotiated = False
        # fds received with SCM_RIGHTS, oldest first, until getfd names one.
        self._pending_fds: list[int] = []
        # getfd's named fds (QEMU's mon->fds); the session owns them.
        self._named_fds: dict[str, int] = {}
        self._outq: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._output_closed = False
        self._dispatching = False
        self._close_server_after_reply = False
        self._reader_task = self._loop.create_task(self._read_loop())
        self._writer_task = self._loop.create_task(self._write_loop())
        # A callback, not a finally: it also runs if the task is cancelled
        # before its first step.
        self._writer_task.add_done_callback(lambda _task: self._release())

    def __repr__(self) -> str:
        return f"<QMPSession peer={self.peer}>"

    # -- fds passed by the client ------------------------------------------

    def get_fd(self, fdname: str) -> int:
        """Take the fd a client named with ``getfd`` (QEMU's monitor_get_fd).

        The fd leaves the session: the caller owns it from now on and must
        close it.  Raises :class:`QMPError` when no fd has that name, so a
        handler can let it propagate as the command's error.
        """
        try:
            return self._named_fds.pop(fdname)
        except KeyError:
            raise QMPError(f"File descriptor named '{fdname}' has not been found") from None

    def _qmp_getfd(self, arguments: dict[str, Any]) -> None:
        fdname = arguments.get("fdname")
        if not isinstance(fdname, str):
            raise QMPError("Invalid parameter type for 'fdname', expected: string")
        if fdname[:1].isdigit():
            raise QMPError("Parameter 'fdname' expects a name not starting with a digit")
        if not self._pending_fds:
            raise QMPError("No file descriptor supplied via SCM_RIGHTS")
        fd = self._pending_fds.pop(0)
        old = self._named_fds.pop(fdname, None)
        if old is not None:
            close_fd(old)  # QEMU replaces a name that is reused
        self._named_fds[fdname] = fd

    def _qmp_closefd(self, arguments: dict[str, Any]) -> None:
        fdname = arguments.get("fdname")
        if not isinstance(fdname, str):
            raise QMPError("Invalid parameter type for 'fdname', expected: string")
        fd = self._named_fds.pop(fdname, None)
        if fd is None:
            raise QMPError(f"File descriptor named '{fdname}' not found")
        close_fd(fd)

    # -- output ------------------------------------------------------------

    def _queue(self, line: bytes) -> None:
        if not self._output_closed:
            self._outq.put_nowait(line)

    def _close_output(self) -> None:
        if not self._output_closed:
            self._output_closed = True
            self._outq.put_nowait(None)

    async def _write_loop(self) -> None:
        broken = False
        while (line := await self._outq.get()) is not None:
            if broken:
                continue  # keep draining until the reader's end marker
            try:
                await self._loop.sock_sendall(self._sock, line)
            except OSError as exc:
                logger.debug("QMP session %s: send failed: %s", self.peer, exc)
                broken = True

    def _release(self) -> None:
        self._output_closed = True
        close_fds(self._pending_fds)
        close_fds(self._named_fds.values())
        self._pending_fds.clear()
        self._named_fds.clear()
        self._sock.close()
        self._server._forget(self)

    # -- input -------------------------------------------------------------

    async def _recvmsg(self) -> tuple[bytes, list[int]]:
        """Read some bytes and the fds that came with them (owned by the caller)."""
        fd = self._sock.fileno()
        while True:
            try:
                data, ancdata, msg_flags, _ = self._sock.recvmsg(
                    _RECV_BYTES, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC
                )
                break
            except (BlockingIOError, InterruptedError):
                pass
            readable = self._loop.create_future()
            self._loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
            try:
                await readable
            finally:
                self._loop.remove_reader(fd)
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                fds.extend(received)
        if msg_flags & socket.MSG_CTRUNC:
            # The kernel dropped fds it could not fit: the client's fds and
            # its getfd commands would no longer match up.
            close_fds(fds)
            raise _SessionFatal("file descriptors were truncated (MSG_CTRUNC)")
        return data, fds

    def _check_peer(self) -> bool:
        try:
            pid, uid, gid = _UCRED.unpack(
                self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
        except OSError as exc:
            logger.warning("QMP connection refused: cannot read SO_PEERCRED: %s", exc)
            self._queue(json_line(error_reply("GenericError",
                                              "access denied: no peer credentials")))
            return False
        self.peer = PeerCredentials(pid, uid, gid)
        if uid not in self._server.allowed_uids:
            self._server.refused += 1
            logger.warning(
                "QMP connection refused on %s: peer pid %d uid %d gid %d is not allowed",
                self._server.path, pid, uid, gid,
            )
            self._queue(json_line(error_reply(
                "GenericError", f"access denied: peer uid {uid} is not allowed"
            )))
            return False
        logger.debug("QMP session opened on %s by %s", self._server.path, self.peer)
        return True

    async def _read_loop(self) -> None:
        try:
            if not self._check_peer():
                return
            self._queue(json_line(self._server.greeting()))
            await self._read_requests()
        except (_SessionFatal, ValueTooLongError) as exc:
            logger.warning("QMP session %s closed: %s", self.peer, exc)
            self._queue(json_line(error_reply("GenericError", str(exc))))
        except OSError as exc:
            logger.debug("QMP session %s: receive failed: %s", self.peer, exc)
        except Exception:
            # A bug here must end this session only, and leave a trace.
            logger.exception("QMP session %s failed", self.peer)
        finally:
            self._close_output()

    async def _read_requests(self) -> None:
        splitter = JSONStreamSplitter(self._server.max_request_bytes)
        while True:
            data, fds = await self._recvmsg()
            if fds:
                self._pending_fds.extend(fds)
                if len(self._pending_fds) > MAX_PENDING_FDS:
                    raise _SessionFatal(
                        f"more than {MAX_PENDING_FDS} file descriptors not claimed by getfd"
                    )
            if not data:
                return  # EOF; an unfinished last request is dropped, as QEMU does
            splitter.feed(data)
            while (request := splitter.next_value()) is not None:
                await self._handle_request(request)

    async def _handle_request(self, text: bytes) -> None:
        try:
            request = json.loads(text, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            # No id can be known; qemu.qmp treats an id-less error as the
            # server's parser failing, as QEMU intends.
            self._queue(json_line(error_reply("GenericError", f"JSON parse error, {exc}")))
            return
        self._dispatching = True
        try:
            reply = await self._dispatch(request)
        finally:
            self._dispatching = False
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request["id"]
        try:
            encoded = json_line(reply)
        except (TypeError, ValueError) as exc:
            logger.error("QMP command %r returned a value that is not JSON: %s",
                         request.get("execute"), exc)
            fallback = error_reply("GenericError",
                                   f"the command returned a value that is not JSON: {exc}")
            if "id" in reply:
                fallback["id"] = reply["id"]
            encoded = json_line(fallback)
        self._queue(encoded)
        if self._close_server_after_reply:
            self._server._schedule_close()

    async def _dispatch(self, request: object) -> dict[str, Any]:
        """Check the request like QEMU's qmp_dispatch(), run it, return the reply."""
        if not isinstance(request, dict):
            return error_reply("GenericError", "QMP input must be a JSON object")
        for member, value in request.items():
            if member == "execute":
                if not isinstance(value, str):
                    return error_reply("GenericError",
                                       "QMP input member 'execute' must be a string")
            elif member == "arguments":
                if not isinstance(value, dict):
                    return error_reply("GenericError",
                                       "QMP input member 'arguments' must be an object")
            elif member != "id":
                # 'exec-oob' too: the greeting offers no 'oob' capability.
                return error_reply("GenericError", f"QMP input member '{member}' is unexpected")
        if "execute" not in request:
            return error_reply("GenericError", "QMP input lacks member 'execute'")
        name: str = request["execute"]
        arguments: dict[str, Any] = request.get("arguments", {})

        if name == "qmp_capabilities":
            return self._qmp_capabilities(arguments)
        if not self.negotiated:
            # QEMU's monitor knows only qmp_capabilities until negotiation.
            return error_reply("CommandNotFound",
                               "Expecting capabilities negotiation with 'qmp_capabilities'")
        command = self._server._commands.get(name)
        if command is None:
            return error_reply("CommandNotFound", f"The command {name} has not been found")

        logger.debug("QMP session %s: execute %s %s", self.peer, name, arguments)
        try:
            if command.with_session:
                result = command.handler(arguments, self)
            else:
                result = command.handler(arguments)
            if inspect.isawaitable(result):
                result = await result
        except QMPError as exc:
            return error_reply(exc.error_class, exc.desc)
        except MigrationError as exc:
            # An expected failure with a message for the user, not a bug.
            logger.info("QMP command %s failed: %s", name, exc)
            return error_reply("GenericError", str(exc))
        except Exception as exc:
            logger.exception("QMP command %s raised", name)
            return error_reply("GenericError", str(exc) or type(exc).__name__)
        return {"return": {} if result is None else result}

    def _qmp_capabilities(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.negotiated:
            return error_reply("CommandNotFound",
                               "Capabilities negotiation is already complete, command ignored")
        for member in arguments:
            if member != "enable":
                return error_reply("GenericError", f"Parameter '{member}' is unexpected")
        enable = arguments.get("enable", [])
        if not isinstance(enable, list):
            return error_reply("GenericError",
                               "Invalid parameter type for 'enable', expected: array")
        # The greeting offers no capability, so any one asked for is refused,
        # with the text QEMU gives for its kind.
        if enable:
            capability = enable[0]
            if not isinstance(capability, str):
                return error_reply("GenericError",
                                   "Invalid parameter type for 'enable[0]', expected: string")
            if capability == "oob":
                return error_reply("GenericError", "Capability 'oob' not available")
            return error_reply("GenericError",
                               f"Parameter 'enable[0]' does not accept value '{capability}'")
        self.negotiated = True
        return {"return": {}}
