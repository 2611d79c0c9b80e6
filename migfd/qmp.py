"""A QMP server (QEMU's machine protocol monitor) that VM processes of migfd run.

It speaks the protocol on the wire exactly as QEMU's monitor does, so the PyPI
``qemu.qmp`` client (``QMPClient``), ``qmp-shell`` and any tool written for
QEMU drive a migfd VM unchanged: the same greeting, the same capabilities
negotiation, the same error classes and texts, events with wall-clock
timestamps, and file descriptors passed with SCM_RIGHTS for ``getfd``.

Theory of operation
-------------------
One listening UNIX socket; every accepted connection is a :class:`QMPSession`
(QEMU calls the per-monitor state ``MonitorQMP``) with two tasks:

* the *reader* checks the peer's credentials, queues the greeting, then cuts
  the input into JSON values as QEMU's json-streamer does (where braces
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
  error, :meth:`QMPServer.close`) it queues an end marker; the writer sends
  everything before it and only then closes the socket.  This is what makes
  "reply, then EOF" work for ``quit``.

Commands
--------
``server.register(name, handler)``.  The handler is called with one
positional argument, the ``arguments`` object of the request as a ``dict``
(``{}`` when absent).  A dict, not ``**kwargs``, because QMP argument names
have dashes (``downtime-limit``).  With ``with_session=True`` it is called as
``handler(arguments, session)``, for commands that need the peer's
credentials or the fds it sent (``session.get_fd(fdname)``).  It may be a
plain function or a coroutine function; its return value is the ``return``
member (``None`` becomes ``{}``).  It fails by raising :class:`QMPError`;
a :class:`migfd.errors.MigrationError` becomes a GenericError with its
message; any other exception also becomes a GenericError with ``str(exc)``,
and its traceback is logged, because it is a bug.  The session goes on in
every case.

Built in, as in QEMU: ``qmp_capabilities``, ``query-commands``,
``query-version``, ``getfd`` and ``closefd``.  ``quit`` is not built in: the
VM process registers it, because only it knows how to stop.

Closing after the reply (``quit``)
----------------------------------
A handler calls :meth:`QMPServer.request_close` and returns normally::

    async def qmp_quit(arguments):
        server.request_close()   # the close starts after the reply is queued
        return None              # -> {"return": {}}, then EOF

The close starts once this command's reply is queued, whatever the handler
awaits after the call, and each session's writer sends what it has queued
before its socket closes.  ``await server.close()`` inside a handler would
cancel the handler itself, so it raises :class:`RuntimeError` there.  From
another thread use ``loop.call_soon_threadsafe(server.request_close)``.  The
process can then ``await server.wait_closed()`` and exit.

Access control
--------------
The socket file is created with ``mode`` (0600 by default) without a moment
of a wider mode, and every connection's SO_PEERCRED uid must be in
``allowed_uids`` (default: the server's own uid, and not root unless the
server runs as root).  Anyone else gets one error line and EOF.
"""

from __future__ import annotations

import array
import asyncio
import errno
import inspect
import json
import logging
import os
import re
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple, overload

from migfd import __version__
from migfd.errors import MigrationError

__all__ = [
    "MAX_REQUEST_BYTES",
    "MAX_PENDING_FDS",
    "PeerCredentials",
    "QMPError",
    "QMPServer",
    "QMPSession",
]

logger = logging.getLogger("migfd.qmp")

#: Longest request accepted, in bytes of its JSON text; a longer one is an
#: error that closes that session (not the server): after it the stream
#: cannot be trusted to be in step.
MAX_REQUEST_BYTES = 1 << 20

#: Most file descriptors a client may have sent and not yet claimed with
#: ``getfd`` (QEMU's chardev keeps at most TCP_MAX_FDS = 16).
MAX_PENDING_FDS = 16

# The kernel never passes more than SCM_MAX_FD fds in one message; a control
# buffer that large means MSG_CTRUNC can only come from something abnormal.
_SCM_MAX_FD = 253
_RECV_BYTES = 65536
_CMSG_SPACE = socket.CMSG_SPACE(_SCM_MAX_FD * array.array("i").itemsize)

# How long close() lets a session's writer flush before the socket is
# dropped: only a client that stopped reading with a full socket buffer
# waits this long.
_CLOSE_FLUSH_TIMEOUT_S = 5.0

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[..., Any]


class PeerCredentials(NamedTuple):
    """The peer of a connection as the kernel saw it at connect() (struct ucred)."""

    pid: int
    uid: int
    gid: int


class QMPError(Exception):
    """A command failed: becomes ``{"error": {"class": ..., "desc": ...}}``.

    ``QMPError(desc)`` is a GenericError (the class QEMU uses for nearly
    everything); ``QMPError(error_class, desc)`` names another class, one of
    QEMU's: CommandNotFound, DeviceNotActive, DeviceNotFound, KVMMissingCap.
    """

    @overload
    def __init__(self, desc: str, /) -> None: ...

    @overload
    def __init__(self, error_class: str, desc: str, /) -> None: ...

    def __init__(self, *args: str) -> None:
        if len(args) == 1:
            error_class, desc = "GenericError", args[0]
        elif len(args) == 2:
            error_class, desc = args
        else:
            raise TypeError("QMPError(desc) or QMPError(error_class, desc)")
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc

    def __str__(self) -> str:
        return self.desc


class _Command(NamedTuple):
    handler: Handler
    with_session: bool


def _json_line(obj: object) -> bytes:
    """One message as QEMU writes it: a JSON object and CRLF, ASCII only."""
    return json.dumps(obj, allow_nan=False).encode("ascii") + b"\r\n"


def _error(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN and Infinity; JSON and QEMU do not.
    raise ValueError(f"invalid keyword '{name}'")


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class QMPSession:
    """One client connection: its negotiation state, its queues and its fds.

    Created by :class:`QMPServer` for each accepted connection.  Handlers
    registered with ``with_session=True`` receive it.
    """

    def __init__(self, server: QMPServer, sock: socket.socket) -> None:
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
            _close_fds([old])  # QEMU replaces a name that is reused
        self._named_fds[fdname] = fd

    def _qmp_closefd(self, arguments: dict[str, Any]) -> None:
        fdname = arguments.get("fdname")
        if not isinstance(fdname, str):
            raise QMPError("Invalid parameter type for 'fdname', expected: string")
        fd = self._named_fds.pop(fdname, None)
        if fd is None:
            raise QMPError(f"File descriptor named '{fdname}' not found")
        _close_fds([fd])

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
        _close_fds(self._pending_fds)
        _close_fds(self._named_fds.values())
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
            _close_fds(fds)
            raise _SessionFatal("file descriptors were truncated (MSG_CTRUNC)")
        return data, fds

    def _check_peer(self) -> bool:
        try:
            pid, uid, gid = _UCRED.unpack(
                self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
        except OSError as exc:
            logger.warning("QMP connection refused: cannot read SO_PEERCRED: %s", exc)
            self._queue(_json_line(_error("GenericError", "access denied: no peer credentials")))
            return False
        self.peer = PeerCredentials(pid, uid, gid)
        if uid not in self._server.allowed_uids:
            logger.warning(
                "QMP connection refused on %s: peer pid %d uid %d gid %d is not allowed",
                self._server.path, pid, uid, gid,
            )
            self._queue(_json_line(_error(
                "GenericError", f"access denied: peer uid {uid} is not allowed"
            )))
            return False
        logger.debug("QMP session opened on %s by %s", self._server.path, self.peer)
        return True

    async def _read_loop(self) -> None:
        try:
            if not self._check_peer():
                return
            self._queue(_json_line(self._server.greeting()))
            await self._read_requests()
        except _SessionFatal as exc:
            logger.warning("QMP session %s closed: %s", self.peer, exc)
            self._queue(_json_line(_error("GenericError", str(exc))))
        except OSError as exc:
            logger.debug("QMP session %s: receive failed: %s", self.peer, exc)
        except Exception:
            # A bug here must end this session only, and leave a trace.
            logger.exception("QMP session %s failed", self.peer)
        finally:
            self._close_output()

    async def _read_requests(self) -> None:
        splitter = _JSONSplitter(self._server.max_request_bytes)
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
            self._queue(_json_line(_error("GenericError", f"JSON parse error, {exc}")))
            return
        self._dispatching = True
        try:
            reply = await self._dispatch(request)
        finally:
            self._dispatching = False
        if isinstance(request, dict) and "id" in request:
            reply["id"] = request["id"]
        try:
            encoded = _json_line(reply)
        except (TypeError, ValueError) as exc:
            logger.error("QMP command %r returned a value that is not JSON: %s",
                         request.get("execute"), exc)
            fallback = _error("GenericError",
                              f"the command returned a value that is not JSON: {exc}")
            if "id" in reply:
                fallback["id"] = reply["id"]
            encoded = _json_line(fallback)
        self._queue(encoded)
        if self._close_server_after_reply:
            self._server._schedule_close()

    async def _dispatch(self, request: object) -> dict[str, Any]:
        """Check the request like QEMU's qmp_dispatch(), run it, return the reply."""
        if not isinstance(request, dict):
            return _error("GenericError", "QMP input must be a JSON object")
        for member, value in request.items():
            if member == "execute":
                if not isinstance(value, str):
                    return _error("GenericError", "QMP input member 'execute' must be a string")
            elif member == "arguments":
                if not isinstance(value, dict):
                    return _error("GenericError", "QMP input member 'arguments' must be an object")
            elif member != "id":
                # 'exec-oob' too: the greeting offers no 'oob' capability.
                return _error("GenericError", f"QMP input member '{member}' is unexpected")
        if "execute" not in request:
            return _error("GenericError", "QMP input lacks member 'execute'")
        name: str = request["execute"]
        arguments: dict[str, Any] = request.get("arguments", {})

        if name == "qmp_capabilities":
            return self._qmp_capabilities(arguments)
        if not self.negotiated:
            # QEMU's monitor knows only qmp_capabilities until negotiation.
            return _error("CommandNotFound",
                          "Expecting capabilities negotiation with 'qmp_capabilities'")
        command = self._server._commands.get(name)
        if command is None:
            return _error("CommandNotFound", f"The command {name} has not been found")

        logger.debug("QMP session %s: execute %s %s", self.peer, name, arguments)
        try:
            if command.with_session:
                result = command.handler(arguments, self)
            else:
                result = command.handler(arguments)
            if inspect.isawaitable(result):
                result = await result
        except QMPError as exc:
            return _error(exc.error_class, exc.desc)
        except MigrationError as exc:
            # An expected failure with a message for the user, not a bug.
            logger.info("QMP command %s failed: %s", name, exc)
            return _error("GenericError", str(exc))
        except Exception as exc:
            logger.exception("QMP command %s raised", name)
            return _error("GenericError", str(exc) or type(exc).__name__)
        return {"return": {} if result is None else result}

    def _qmp_capabilities(self, arguments: dict[str, Any]) -> dict[str, Any]:
        if self.negotiated:
            return _error("CommandNotFound",
                          "Capabilities negotiation is already complete, command ignored")
        for member in arguments:
            if member != "enable":
                return _error("GenericError", f"Parameter '{member}' is unexpected")
        enable = arguments.get("enable", [])
        if not isinstance(enable, list):
            return _error("GenericError", "Invalid parameter type for 'enable', expected: array")
        # The greeting offers no capability, so any one asked for is refused,
        # with the text QEMU gives for its kind.
        if enable:
            capability = enable[0]
            if not isinstance(capability, str):
                return _error("GenericError",
                              "Invalid parameter type for 'enable[0]', expected: string")
            if capability == "oob":
                return _error("GenericError", "Capability 'oob' not available")
            return _error("GenericError",
                          f"Parameter 'enable[0]' does not accept value '{capability}'")
        self.negotiated = True
        return {"return": {}}


class _SessionFatal(Exception):
    """The session cannot go on; the message is sent as a GenericError first."""


# Outside strings only these bytes change the nesting; inside a string only
# the quote and the backslash matter.  Regexes skip everything else in C.
_STRUCTURAL = re.compile(rb'[{}\[\]"]')
_STRING_SPECIAL = re.compile(rb'["\\]')
_NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")
_SCALAR_END = re.compile(rb'[ \t\r\n{}\[\]",:]')


class _JSONSplitter:
    """Cut a byte stream into JSON values, the way QEMU's json-streamer does.

    QEMU does not frame requests by lines: a request ends where its braces
    and brackets balance, outside strings (qemu.qmp sends no newline at all).
    Whitespace between values is skipped, so the ' ' byte that carries an
    fd with SCM_RIGHTS is harmless.  A top-level scalar ends at whitespace
    or punctuation.  This only finds the boundaries; json.loads judges the
    value.  A value longer than ``max_value_bytes`` raises _SessionFatal:
    the stream cannot be resynchronised after it.
    """

    def __init__(self, max_value_bytes: int) -> None:
        self._max = max_value_bytes
        self._buffer = bytearray()
        self._pos = 0  # next byte to scan
        self._start: int | None = None  # first byte of the value being cut
        self._depth = 0
        self._in_string = False
        self._scalar = False

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_value(self) -> bytes | None:
        """The next complete value, or None until more data is fed."""
        buf = self._buffer
        while True:
            if self._start is None:
                match = _NOT_WHITESPACE.search(buf, self._pos)
                if match is None:
                    del buf[:]
                    self._pos = 0
                    return None
                self._start = match.start()
                self._pos = self._start + 1
                first = buf[self._start : self._pos]
                if first in (b"{", b"["):
                    self._depth = 1
                elif first == b'"':
                    self._in_string = True
                elif first in (b"}", b"]"):
                    return self._cut(self._pos)  # unbalanced: json.loads refuses it
                else:
                    self._scalar = True
            elif self._in_string:
                match = _STRING_SPECIAL.search(buf, self._pos)
                if match is None:
                    self._pos = len(buf)
                    break
                if match.group() == b"\\":
                    if match.end() == len(buf):
                        self._pos = match.start()  # the escaped byte is not here yet
                        break
                    self._pos = match.end() + 1
                else:
                    self._in_string = False
                    self._pos = match.end()
                    if self._depth == 0:
                        return self._cut(self._pos)
            elif self._scalar:
                match = _SCALAR_END.search(buf, self._pos)
                if match is None:
                    self._pos = len(buf)
                    break
                self._scalar = False
                return self._cut(match.start())
            else:
                match = _STRUCTURAL.search(buf, self._pos)
                if match is None:
                    self._pos = len(buf)
                    break
                self._pos = match.end()
                byte = match.group()
                if byte == b'"':
                    self._in_string = True
                elif byte in (b"{", b"["):
                    self._depth += 1
                else:
                    self._depth -= 1
                    if self._depth == 0:
                        return self._cut(self._pos)
        # Incomplete: keep only the value being cut.
        assert self._start is not None
        if len(buf) - self._start > self._max:
            raise _SessionFatal(f"JSON parse error, request longer than {self._max} bytes")
        del buf[: self._start]
        self._pos -= self._start
        self._start = 0
        return None

    def _cut(self, end: int) -> bytes:
        assert self._start is not None
        if end - self._start > self._max:
            raise _SessionFatal(f"JSON parse error, request longer than {self._max} bytes")
        value = bytes(self._buffer[self._start : end])
        self._start = None
        self._pos = end
        self._depth = 0
        return value


class QMPServer:
    """A QMP monitor listening on a UNIX socket; one :class:`QMPSession` per client.

    ``version`` is (major, minor, micro) of the QEMU this monitor claims to
    be; ``package`` is the greeting's package string.  ``allowed_uids``
    defaults to the server's own uid only.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        mode: int = 0o600,
        allowed_uids: Iterable[int] | None = None,
        version: tuple[int, int, int] = (7, 2, 0),
        package: str | None = None,
        max_request_bytes: int = MAX_REQUEST_BYTES,
    ) -> None:
        self.path = os.fspath(path)
        self.mode = mode
        self.allowed_uids = frozenset({os.getuid()} if allowed_uids is None else allowed_uids)
        major, minor, micro = version
        self.version = {
            "qemu": {"micro": micro, "minor": minor, "major": major},
            "package": f"migfd-{__version__}" if package is None else package,
        }
        self.max_request_bytes = max_request_bytes
        self._commands: dict[str, _Command] = {}
        self._sessions: set[QMPSession] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._listen_sock: socket.socket | None = None
        self._socket_inode: tuple[int, int] | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._close_task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self.register("query-commands", self._qmp_query_commands)
        self.register("query-version", lambda arguments: self.version)
        self.register("getfd", lambda arguments, session: session._qmp_getfd(arguments),
                      with_session=True)
        self.register("closefd", lambda arguments, session: session._qmp_closefd(arguments),
                      with_session=True)

    # -- commands and events -------------------------------------------------

    def register(self, name: str, handler: Handler, *, with_session: bool = False) -> None:
        """Add the command ``name``: ``handler(arguments)`` or, with
        ``with_session``, ``handler(arguments, session)``; sync or async."""
        if not isinstance(name, str) or not name:
            raise ValueError("a QMP command needs a non-empty name")
        if name == "qmp_capabilities" or name in self._commands:
            raise ValueError(f"QMP command {name!r} is already registered")
        self._commands[name] = _Command(handler, with_session)

    def greeting(self) -> dict[str, Any]:
        """The first message of every session."""
        return {"QMP": {"version": self.version, "capabilities": []}}

    def _qmp_query_commands(self, arguments: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": "qmp_capabilities"}] + [{"name": name} for name in self._commands]

    @property
    def sessions(self) -> tuple[QMPSession, ...]:
        """The sessions open now."""
        return tuple(self._sessions)

    def emit(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        """Send an event to every negotiated session; call in the loop's thread.

        ``data`` that is not JSON raises TypeError or ValueError here.
        """
        if self._loop_thread is not None and threading.get_ident() != self._loop_thread:
            raise RuntimeError("QMPServer.emit() called from another thread; use emit_threadsafe()")
        self._broadcast(self._event_line(event, data))

    def emit_threadsafe(self, event: str, data: Mapping[str, Any] | None = None) -> None:
        """:meth:`emit` from any thread; the timestamp is taken now, in the caller."""
        if self._loop is None:
            raise RuntimeError("QMPServer.emit_threadsafe() before start()")
        self._loop.call_soon_threadsafe(self._broadcast, self._event_line(event, data))

    @staticmethod
    def _event_line(event: str, data: Mapping[str, Any] | None) -> bytes:
        # Encoded in the caller so that bad data raises there, not in the loop.
        now_us = time.time_ns() // 1000
        message: dict[str, Any] = {
            "timestamp": {"seconds": now_us // 1_000_000, "microseconds": now_us % 1_000_000},
            "event": event,
        }
        if data is not None:
            message["data"] = dict(data)
        return _json_line(message)

    def _broadcast(self, line: bytes) -> None:
        for session in self._sessions:
            if session.negotiated:
                session._queue(line)

    # -- lifetime ------------------------------------------------------------

    async def __aenter__(self) -> QMPServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Create the socket file and accept clients."""
        if self._listen_sock is not None or self._closing:
            raise RuntimeError("QMPServer.start() called twice or after close()")
        self._remove_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Linux creates the socket file with the socket inode's mode minus
            # the umask, so it never exists with a wider mode than this; no
            # umask change, which would race with other threads.
            os.fchmod(sock.fileno(), self.mode)
            sock.bind(self.path)
            st = os.stat(self.path)
            if stat.S_IMODE(st.st_mode) != self.mode:
                os.chmod(self.path, self.mode)  # the umask made it narrower
            self._socket_inode = (st.st_dev, st.st_ino)
            sock.listen(16)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._listen_sock = sock
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._accept_task = self._loop.create_task(self._accept_loop())
        logger.info("QMP monitor listening on %s", self.path)

    def _remove_stale_socket(self) -> None:
        # QEMU unlinks the path before bind; do it only for a socket nobody
        # listens on any more, so a running monitor is not hijacked.
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", self.path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.path)
            except ConnectionRefusedError:
                os.unlink(self.path)
                return
        raise FileExistsError(errno.EADDRINUSE, "a server is listening on it", self.path)

    async def _accept_loop(self) -> None:
        assert self._loop is not None and self._listen_sock is not None
        while True:
            try:
                conn, _ = await self._loop.sock_accept(self._listen_sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of fds or memory: the connection waits in the
                    # backlog; retrying at once would spin.
                    logger.error("QMP accept on %s failed: %s", self.path, exc)
                    await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            self._sessions.add(QMPSession(self, conn))

    def _forget(self, session: QMPSession) -> None:
        self._sessions.discard(session)

    def request_close(self) -> None:
        """Close the server; from a handler, once that command's reply is queued.

        Call it in the event loop thread.  See the module docstring.
        """
        current = asyncio.current_task()
        for session in self._sessions:
            if session._reader_task is current and session._dispatching:
                session._close_server_after_reply = True
                return
        self._schedule_close()

    def _schedule_close(self) -> None:
        if self._close_task is None and not self._closing:
            assert self._loop is not None
            self._close_task = self._loop.create_task(self.close())

    async def close(self) -> None:
        """Stop listening, end every session (flushing what is queued), remove the socket file."""
        current = asyncio.current_task()
        if any(session._reader_task is current for session in self._sessions):
            raise RuntimeError("await QMPServer.close() inside a QMP handler would cancel "
                               "the handler; call request_close() instead")
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._accept_task is not None:
                self._accept_task.cancel()
                await asyncio.gather(self._accept_task, return_exceptions=True)
            if self._listen_sock is not None:
                self._listen_sock.close()
                self._unlink_socket()
            sessions = tuple(self._sessions)
            for session in sessions:
                session._reader_task.cancel()  # it queues its end marker as it exits
            tasks = [t for s in sessions for t in (s._reader_task, s._writer_task)]
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=_CLOSE_FLUSH_TIMEOUT_S)
                for task in pending:
                    logger.warning("QMP session did not flush its output in time; dropped")
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            logger.info("QMP monitor on %s closed", self.path)
        finally:
            self._closed.set()

    def _unlink_socket(self) -> None:
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._socket_inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished (e.g. after ``quit``)."""
        await self._closed.wait()
