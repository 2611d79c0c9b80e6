"""A QMP server (QEMU's machine protocol monitor) that VM processes of migfd run.

It speaks the protocol on the wire exactly as QEMU's monitor does, so the PyPI
``qemu.qmp`` client (``QMPClient``), ``qmp-shell`` and any tool written for
QEMU drive a migfd VM unchanged: the same greeting, the same capabilities
negotiation, the same error classes and texts, events with wall-clock
timestamps, and file descriptors passed with SCM_RIGHTS for ``getfd``.

One listening UNIX socket; every accepted connection is a
:class:`~migfd.qmp.session.QMPSession`, whose module tells how requests,
replies and events flow.

Commands
--------
``server.register(name, handler)``.  The handler is called with one
positional argument, the ``arguments`` object of the request as a ``dict``
(``{}`` when absent).  A dict, not ``**kwargs``, because QMP argument names
have dashes (``downtime-limit``).  With ``with_session=True`` it is called as
``handler(arguments, session)``, for commands that need the peer's
credentials or the fds it sent (``session.get_fd(fdname)``).  It may be a
plain function or a coroutine function; its return value is the ``return``
member (``None`` becomes ``{}``).  It fails by raising
:class:`migfd.errors.QMPError`; a :class:`migfd.errors.MigrationError`
becomes a GenericError with its message; any other exception also becomes
a GenericError with ``str(exc)``, and its traceback is logged, because it is
a bug.  The session goes on in every case.

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

import asyncio
import errno
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from migfd import __version__
from migfd.qmp.session import Command, Handler, QMPSession, json_line
from migfd.units import MiB

__all__ = ["MAX_REQUEST_BYTES", "QMPServer"]

logger = logging.getLogger("migfd.qmp")

#: Longest request accepted, in bytes of its JSON text; a longer one is an
#: error that closes that session (not the server): after it the stream
#: cannot be trusted to be in step.
MAX_REQUEST_BYTES = MiB

# How long close() lets a session's writer flush before the socket is
# dropped: only a client that stopped reading with a full socket buffer
# waits this long.
_CLOSE_FLUSH_TIMEOUT_S = 5.0


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
        #: connections refused because of their peer's uid (query-migrate reports them)
        self.refused = 0
        major, minor, micro = version
        self.version = {
            "qemu": {"micro": micro, "minor": minor, "major": major},
            "package": f"migfd-{__version__}" if package is None else package,
        }
        self.max_request_bytes = max_request_bytes
        self._commands: dict[str, Command] = {}
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
        self._commands[name] = Command(handler, with_session)

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

    def emit_threadsafe(self, event: str, data: Mapping[str, Any] | None = None,
                        time_ns: int | None = None) -> None:
        """:meth:`emit` from any thread; the timestamp is taken now, in the caller.

        ``time_ns`` (CLOCK_REALTIME) stamps an event that happened earlier and
        is sent only now.
        """
        if self._loop is None:
            raise RuntimeError("QMPServer.emit_threadsafe() before start()")
        self._loop.call_soon_threadsafe(self._broadcast, self._event_line(event, data, time_ns))

    @staticmethod
    def _event_line(event: str, data: Mapping[str, Any] | None, time_ns: int | None = None) -> bytes:
        # Encoded in the caller so that bad data raises there, not in the loop.
        now_us = (time.time_ns() if time_ns is None else time_ns) // 1000
        message: dict[str, Any] = {
            "timestamp": {"seconds": now_us // 1_000_000, "microseconds": now_us % 1_000_000},
            "event": event,
        }
        if data is not None:
            message["data"] = dict(data)
        return json_line(message)

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
