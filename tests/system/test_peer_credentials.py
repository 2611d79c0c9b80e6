"""Peers of another uid (SO_PEERCRED) at the migration and QMP sockets: refused, and nothing else.

These tests fork a child that drops to uid 65534, so they need root; the
checks that need neither (a listener that allows only another uid) live in
tests/unit.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import tempfile

import pytest
from helpers import NOBODY, become
from qemu.qmp import QMPClient

from migfd.errors import TransportError
from migfd.params import MigrationParameters
from migfd.qmp import QMPServer
from migfd.transport import IncomingListener, UnixAddress

ON = MigrationParameters(backend_transfer=True)


async def qmp_client(path: str) -> QMPClient:
    client = QMPClient("test")
    await client.connect(path)
    return client


def run(coro) -> object:
    return asyncio.run(coro)




def _connect_as(uid: int, path: str) -> tuple[int, int]:
    """Fork a child that drops to ``uid`` and connects to ``path``; returns
    (pid, read end of a pipe carrying what the child saw).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(r)
            become(uid)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            except OSError as exc:
                os.write(w, f"connect failed: errno {exc.errno}".encode())
            else:
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                os.write(w, b"read: " + data)
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    return pid, r


def _child_report(pid: int, r: int) -> str:
    with os.fdopen(r, "rb") as f:
        report = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return report


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer under another uid")
def test_listener_refuses_another_uid_and_keeps_listening():
    tmp = tempfile.mkdtemp()
    os.chmod(tmp, 0o755)  # let uid 65534 reach the socket
    path = os.path.join(tmp, "in.sock")
    # 0666 so the file mode lets the stranger in: the uid check must stop it
    refusals = []
    listener = IncomingListener(UnixAddress(path), ON, mode=0o666, on_refused=lambda: refusals.append(1))
    source = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        pid, r = _connect_as(NOBODY, path)
        # the stranger alone: no channel, only the timeout, and it was counted
        with pytest.raises(TransportError, match="no source connected"):
            listener.accept(timeout_s=1.0)
        report = _child_report(pid, r)
        assert report.startswith("read: ")
        assert "access denied" in report and str(NOBODY) in report
        assert listener.refused == 1 and refusals == [1]
        # the rightful source still gets its channel
        source.connect(path)
        f = listener.accept(timeout_s=5.0)
        f.close()
        assert listener.refused == 1
    finally:
        source.close()
        listener.close()
        os.rmdir(tmp)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer under another uid")
def test_listener_default_mode_keeps_another_uid_out():
    tmp = tempfile.mkdtemp()
    os.chmod(tmp, 0o755)
    path = os.path.join(tmp, "in.sock")
    listener = IncomingListener(UnixAddress(path), ON)
    try:
        pid, r = _connect_as(NOBODY, path)
        assert _child_report(pid, r) == f"connect failed: errno {errno.EACCES}"
    finally:
        listener.close()
        os.rmdir(tmp)


def _fork_client_as(uid: int, path: str) -> tuple[int, int]:
    """Fork a child that connects as ``uid`` and writes all it read to a pipe.

    A fork without exec, because the interpreter may live under a directory
    the other uid cannot enter (/root).  Called before any thread exists in
    the process, so the child cannot inherit a lock held by another thread.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no asyncio here, only blocking calls, then _exit
        status = 1
        try:
            os.close(read_end)
            become(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.connect(path)
                data = b""
                while chunk := conn.recv(4096):
                    data += chunk
            os.write(write_end, data)
            status = 0
        except BaseException as exc:  # report anything to the parent
            os.write(write_end, f"child failed: {exc!r}".encode())
        finally:
            os._exit(status)
    os.close(write_end)
    return pid, read_end


def _child_output(pid: int, read_end: int) -> bytes:
    with os.fdopen(read_end, "rb") as pipe:
        output = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, output
    return output


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
def test_client_with_another_uid_is_refused():
    # The default allowed_uids is {0} here; the socket and its directory are
    # opened up so the kernel lets the other uid connect at all.
    directory = tempfile.mkdtemp(prefix="qmp-")
    os.chmod(directory, 0o755)
    path = os.path.join(directory, "mon.sock")

    async def scenario():
        async with QMPServer(path, mode=0o666) as server:
            assert server.allowed_uids == {0}
            pid, read_end = _fork_client_as(NOBODY, path)
            seen = await asyncio.to_thread(_child_output, pid, read_end)
            client = await qmp_client(path)  # root, the allowed uid, still gets in
            version = await client.execute("query-version")
            await client.disconnect()
        return seen, version

    try:
        seen, version = run(scenario())
    finally:
        shutil.rmtree(directory)
    assert seen == (b'{"error": {"class": "GenericError", "desc": "access denied: peer uid 65534 '
                    b'is not allowed"}}\r\n')
    assert "qemu" in version
