"""migfd.qmp against real UNIX sockets: raw lines, and the real qemu.qmp client.

pytest-asyncio is not used: each test is a plain function that runs its
scenario with ``asyncio.run``.  Nothing waits for time to pass; every step
waits for the message or event it needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import stat
import struct
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qemu.qmp import ConnectError, ExecuteError, QMPClient

from migfd import __version__
from migfd.errors import MigrationError, QMPError
from migfd.qmp import MAX_PENDING_FDS, MAX_REQUEST_BYTES, QMPServer
from migfd.qmp.json_stream import JSONStreamSplitter, ValueTooLongError

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def sock_path() -> Iterator[str]:
    # Not tmp_path: its long names would break the 108-byte sun_path limit.
    directory = tempfile.mkdtemp(prefix="qmp-")
    try:
        yield os.path.join(directory, "mon.sock")
    finally:
        shutil.rmtree(directory)


class RawClient:
    """A QMP peer that reads and writes raw lines, to see the exact wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: str, *, negotiate: bool = False) -> RawClient:
        reader, writer = await asyncio.open_unix_connection(path, limit=4 * MAX_REQUEST_BYTES)
        client = cls(reader, writer)
        if negotiate:
            assert "QMP" in await client.recv()
            assert await client.call({"execute": "qmp_capabilities"}) == {"return": {}}
        return client

    async def recv_line(self) -> bytes:
        return await self.reader.readline()

    async def recv(self) -> dict:
        line = await self.recv_line()
        assert line.endswith(b"\r\n"), line
        return json.loads(line)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def call(self, request: object) -> dict:
        await self.send(json.dumps(request).encode() + b"\n")
        return await self.recv()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def qmp_client(path: str) -> QMPClient:
    client = QMPClient("test")
    await client.connect(path)
    return client


def run(coro) -> object:
    return asyncio.run(coro)


# -- greeting and negotiation --------------------------------------------------


def test_greeting_is_qemus_on_the_wire(sock_path):
    async def scenario():
        async with QMPServer(sock_path):
            raw = await RawClient.connect(sock_path)
            line = await raw.recv_line()
            await raw.close()
        return line

    line = run(scenario())
    assert line.endswith(b"\r\n") and line.count(b"\n") == 1
    assert json.loads(line) == {
        "QMP": {
            "version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                        "package": f"migfd-{__version__}"},
            "capabilities": [],
        }
    }


def test_greeting_version_is_configurable_and_seen_by_qemu_qmp(sock_path):
    async def scenario():
        async with QMPServer(sock_path, version=(10, 1, 3), package="test-pkg"):
            client = await qmp_client(sock_path)
            greeting = client.greeting
            version = await client.execute("query-version")
            await client.disconnect()
        return greeting, version

    greeting, version = run(scenario())
    expected = {"qemu": {"micro": 3, "minor": 1, "major": 10}, "package": "test-pkg"}
    assert greeting.QMP.version == expected
    assert list(greeting.QMP.capabilities) == []
    assert version == expected


def test_capabilities_negotiation_errors(sock_path):
    async def scenario():
        async with QMPServer(sock_path):
            raw = await RawClient.connect(sock_path)
            await raw.recv()
            replies = [
                await raw.call({"execute": "query-version", "id": 1}),
                await raw.call({"execute": "no-such-command"}),
                await raw.call({"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}),
                await raw.call({"execute": "qmp_capabilities", "arguments": {"enable": ["bogus"]}}),
                await raw.call({"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}),
                await raw.call({"execute": "qmp_capabilities", "arguments": {"other": 1}}),
                # Still not negotiated after all the refusals:
                await raw.call({"execute": "query-version"}),
                await raw.call({"execute": "qmp_capabilities", "arguments": {"enable": []},
                                "id": "c"}),
                await raw.call({"execute": "qmp_capabilities", "id": "again"}),
                await raw.call({"execute": "query-version"}),
            ]
            await raw.close()
        return replies

    replies = run(scenario())
    expecting = {"class": "CommandNotFound",
                 "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}
    assert replies[0] == {"error": expecting, "id": 1}
    assert replies[1] == {"error": expecting}
    for refused in replies[2:6]:
        assert refused["error"]["class"] == "GenericError"
    assert replies[2]["error"]["desc"] == "Capability 'oob' not available"
    assert "bogus" in replies[3]["error"]["desc"]
    assert replies[6] == {"error": expecting}
    assert replies[7] == {"return": {}, "id": "c"}
    assert replies[8] == {
        "error": {"class": "CommandNotFound",
                  "desc": "Capabilities negotiation is already complete, command ignored"},
        "id": "again",
    }
    assert replies[9]["return"]["package"] == f"migfd-{__version__}"


# -- cutting the input into requests -------------------------------------------


def split_all(chunks: list[bytes], limit: int = 1000) -> list[bytes]:
    splitter = JSONStreamSplitter(limit)
    values = []
    for chunk in chunks:
        splitter.feed(chunk)
        while (value := splitter.next_value()) is not None:
            values.append(value)
    return values


def test_requests_are_cut_where_braces_balance_not_at_newlines():
    stream = (b' {"execute":"a","arguments":{"s":"}{\\"\\\\","l":[1,[2]]}}{"execute":"b"}'
              b'\r\n[1,\n2]  "top \\" string" 17 null\t}{"x":\n1}')
    expected = [b'{"execute":"a","arguments":{"s":"}{\\"\\\\","l":[1,[2]]}}', b'{"execute":"b"}',
                b"[1,\n2]", b'"top \\" string"', b"17", b"null", b"}", b'{"x":\n1}']
    assert split_all([stream]) == expected
    # The same cut whatever the chunking, down to one byte at a time (an
    # escape split from its backslash, a scalar split from its end).
    assert split_all([stream[i : i + 1] for i in range(len(stream))]) == expected
    assert json.loads(expected[0])["arguments"]["s"] == '}{"\\'


def test_splitter_waits_for_the_end_and_bounds_the_value():
    splitter = JSONStreamSplitter(10)
    splitter.feed(b'{"a": 1')
    assert splitter.next_value() is None
    splitter.feed(b"}   17")
    assert splitter.next_value() == b'{"a": 1}'
    assert splitter.next_value() is None  # 17 may go on: 170, 17.5 ...
    splitter.feed(b" " * 100)  # whitespace does not count against the bound
    assert splitter.next_value() == b"17"
    assert splitter.next_value() is None
    splitter.feed(b"[" * 11)
    with pytest.raises(ValueTooLongError, match="longer than 10 bytes"):
        splitter.next_value()
    exact = JSONStreamSplitter(10)
    exact.feed(b'["123456"]["1234567"]')
    assert exact.next_value() == b'["123456"]'
    with pytest.raises(ValueTooLongError):
        exact.next_value()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
whitespace = st.text(alphabet=" \t\r\n", min_size=1, max_size=3)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(json_values, whitespace), max_size=6), st.data())
def test_splitter_returns_every_value_whatever_the_chunks(values_and_gaps, data):
    stream = b"".join(json.dumps(v).encode() + gap.encode() for v, gap in values_and_gaps)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    split = split_all(chunks, limit=len(stream) + 1)
    assert [json.loads(value) for value in split] == [v for v, _ in values_and_gaps]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=6))
def test_splitter_on_any_bytes_cuts_or_reports_too_long(chunks):
    # The only failure a client can cause is the bound; never anything else.
    try:
        values = split_all(chunks, limit=32)
    except ValueTooLongError:
        return
    assert all(0 < len(value) <= 32 for value in values)


# -- commands ------------------------------------------------------------------


def test_sync_and_async_commands_with_arguments(sock_path):
    def add(arguments):
        return {"sum": arguments["a"] + arguments["b-value"]}

    async def echo_later(arguments):
        await asyncio.sleep(0)  # a real suspension point in the handler
        return [arguments, "done"]

    async def scenario():
        async with QMPServer(sock_path) as server:
            server.register("add", add)
            server.register("echo-later", echo_later)
            server.register("nothing", lambda arguments: None)
            client = await qmp_client(sock_path)
            results = (
                await client.execute("add", {"a": 2, "b-value": 40}),
                await client.execute("echo-later", {"x": [1, 2]}),
                await client.execute("echo-later"),
                await client.execute("nothing"),
                await client.execute("query-commands"),
            )
            await client.disconnect()
        return results

    added, echoed, echoed_empty, nothing, commands = run(scenario())
    assert added == {"sum": 42}
    assert echoed == [{"x": [1, 2]}, "done"]
    assert echoed_empty == [{}, "done"]
    assert nothing == {}
    names = {entry["name"] for entry in commands}
    assert {"qmp_capabilities", "query-commands", "query-version", "getfd", "closefd",
            "add", "echo-later", "nothing"} <= names
    assert "quit" not in names  # the VM process registers it, not the monitor


def test_register_refuses_duplicates(sock_path):
    server = QMPServer(sock_path)
    server.register("x", lambda arguments: None)
    for name in ("x", "qmp_capabilities", "query-version", ""):
        with pytest.raises(ValueError):
            server.register(name, lambda arguments: None)


def test_qmp_error_class_and_desc_reach_qemu_qmp(sock_path):
    def not_found(arguments):
        raise QMPError("DeviceNotFound", f"Device '{arguments['id']}' not found")

    def generic(arguments):
        raise QMPError("plain failure")

    def migration_failure(arguments):
        raise MigrationError("backend-transfer needs a UNIX socket")

    async def scenario():
        async with QMPServer(sock_path) as server:
            server.register("find", not_found)
            server.register("generic", generic)
            server.register("migrate-ish", migration_failure)
            client = await qmp_client(sock_path)
            errors = []
            for command, arguments in (("find", {"id": "net0"}), ("generic", None),
                                       ("migrate-ish", None), ("nope", None)):
                with pytest.raises(ExecuteError) as info:
                    await client.execute(command, arguments)
                errors.append((info.value.error_class, str(info.value)))
            still_alive = await client.execute("query-version")
            await client.disconnect()
        return errors, still_alive

    errors, still_alive = run(scenario())
    assert errors == [
        ("DeviceNotFound", "Device 'net0' not found"),
        ("GenericError", "plain failure"),
        ("GenericError", "backend-transfer needs a UNIX socket"),
        ("CommandNotFound", "The command nope has not been found"),
    ]
    assert "qemu" in still_alive


def test_handler_exception_keeps_session_and_logs_traceback(sock_path, caplog):
    def broken(arguments):
        raise ValueError("boom")

    def not_json(arguments):
        return {"x": object()}

    async def scenario():
        async with QMPServer(sock_path) as server:
            server.register("broken", broken)
            server.register("not-json", not_json)
            client = await qmp_client(sock_path)
            outcomes = []
            for command in ("broken", "not-json"):
                with pytest.raises(ExecuteError) as info:
                    await client.execute(command)
                outcomes.append(info.value.error_class)
                outcomes.append(await client.execute("query-version"))
            await client.disconnect()
        return outcomes

    with caplog.at_level(logging.ERROR, logger="migfd.qmp"):
        outcomes = run(scenario())
    assert outcomes[0] == "GenericError"
    assert outcomes[1]["package"] == f"migfd-{__version__}"
    assert outcomes[2] == "GenericError"
    assert "qemu" in outcomes[3]
    traced = [r for r in caplog.records if r.name == "migfd.qmp" and r.exc_info]
    assert traced and isinstance(traced[0].exc_info[1], ValueError)


def generic_error(desc: str, **request_id: object) -> dict:
    return {"error": {"class": "GenericError", "desc": desc}, **request_id}


def test_malformed_input_gets_qemus_errors_and_the_session_goes_on(sock_path):
    requests = [
        b'{"execute": }\r\n',
        b"\xff\xfe\n",
        b"NaN\n",
        b"[1, 2]\n",
        b'{"id": 5}\n',
        b'{"execute": "query-version", "arguments": [], "id": 6}\n',
        b'{"execute": 7, "id": 8}\n',
        b'{"execute": "query-version", "exec-oob": "x"}\n',
        b"   \n",  # whitespace only: no reply
        b'{"execute": "query-version", "id": "ok"}\n',
    ]

    async def scenario():
        async with QMPServer(sock_path):
            raw = await RawClient.connect(sock_path, negotiate=True)
            await raw.send(b"".join(requests))
            replies = [await raw.recv() for _ in range(len(requests) - 1)]
            await raw.close()
        return replies

    replies = run(scenario())
    for parse_error in replies[0:3]:
        assert parse_error["error"]["class"] == "GenericError"
        assert parse_error["error"]["desc"].startswith("JSON parse error, ")
        assert "id" not in parse_error
    assert replies[3:8] == [
        generic_error("QMP input must be a JSON object"),
        generic_error("QMP input lacks member 'execute'", id=5),
        generic_error("QMP input member 'arguments' must be an object", id=6),
        generic_error("QMP input member 'execute' must be a string", id=8),
        generic_error("QMP input member 'exec-oob' is unexpected"),
    ]
    assert replies[8]["id"] == "ok" and "qemu" in replies[8]["return"]


def test_id_is_echoed_whatever_its_type(sock_path):
    ids = ["a", 17, 2.5, None, [1, "x"], {"nested": {"k": True}}]

    def fail(arguments):
        raise QMPError("no")

    async def scenario():
        async with QMPServer(sock_path) as server:
            server.register("fail", fail)
            raw = await RawClient.connect(sock_path, negotiate=True)
            pairs = []
            for request_id in ids:
                ok = await raw.call({"execute": "query-version", "id": request_id})
                failed = await raw.call({"execute": "fail", "id": request_id})
                unknown = await raw.call({"id": request_id, "execute": "unknown"})
                pairs.append((ok, failed, unknown))
            await raw.close()
        return pairs

    for request_id, (ok, failed, unknown) in zip(ids, run(scenario())):
        assert "id" in ok and ok["id"] == request_id and "return" in ok
        assert failed == {"error": {"class": "GenericError", "desc": "no"}, "id": request_id}
        assert unknown["id"] == request_id and unknown["error"]["class"] == "CommandNotFound"


def test_commands_run_in_order_per_session_and_do_not_block_others(sock_path):
    async def scenario():
        release = asyncio.Event()
        order = []

        async def wait_release(arguments):
            order.append("wait started")
            await release.wait()
            order.append("wait done")
            return "released"

        def fast(arguments):
            order.append(f"fast {arguments['n']}")
            return arguments["n"]

        def do_release(arguments):
            order.append("release")
            release.set()

        async with QMPServer(sock_path) as server:
            server.register("wait-release", wait_release)
            server.register("fast", fast)
            server.register("release", do_release)
            a = await RawClient.connect(sock_path, negotiate=True)
            b = await qmp_client(sock_path)
            # Pipelined on session a: "fast" must wait for "wait-release".
            await a.send(b'{"execute": "wait-release", "id": 1}\n'
                         b'{"execute": "fast", "arguments": {"n": 2}, "id": 2}\n')
            # Session b runs while a's handler is suspended, and unblocks it.
            assert await b.execute("fast", {"n": 0}) == 0
            await b.execute("release")
            replies = [await a.recv(), await a.recv()]
            await b.disconnect()
            await a.close()
        return order, replies

    order, replies = run(scenario())
    assert replies == [{"return": "released", "id": 1}, {"return": 2, "id": 2}]
    assert order == ["wait started", "fast 0", "release", "wait done", "fast 2"]


# -- events --------------------------------------------------------------------


def test_events_reach_qemu_qmp_with_wall_clock_timestamp(sock_path):
    async def scenario():
        async with QMPServer(sock_path) as server:
            client = await qmp_client(sock_path)
            before = time.time()
            server.emit("STOP")
            server.emit("MIGRATION", {"status": "active"})
            thread = threading.Thread(target=server.emit_threadsafe,
                                      args=("RESUME", {"from": "thread"}))
            thread.start()
            events = [await client.events.get() for _ in range(3)]
            after = time.time()
            thread.join()
            await client.disconnect()
        return before, after, events

    before, after, events = run(scenario())
    assert [e["event"] for e in events] == ["STOP", "MIGRATION", "RESUME"]
    assert "data" not in events[0]
    assert events[1]["data"] == {"status": "active"}
    assert events[2]["data"] == {"from": "thread"}
    for event in events:
        stamp = event["timestamp"]
        assert set(stamp) == {"seconds", "microseconds"}
        assert 0 <= stamp["microseconds"] < 1_000_000
        assert int(before) <= stamp["seconds"] + stamp["microseconds"] / 1e6 <= after + 1e-6


def test_events_only_reach_negotiated_sessions(sock_path):
    async def scenario():
        async with QMPServer(sock_path) as server:
            raw = await RawClient.connect(sock_path)
            await raw.recv()  # greeting: the session exists, not negotiated
            server.emit("EARLY")
            negotiated = await raw.call({"execute": "qmp_capabilities"})
            server.emit("LATE", {"n": 1})
            event = await raw.recv()
            await raw.close()
        return negotiated, event

    negotiated, event = run(scenario())
    assert negotiated == {"return": {}}  # not the EARLY event
    assert event["event"] == "LATE" and event["data"] == {"n": 1}


def test_emit_from_another_thread_is_refused(sock_path):
    async def scenario():
        async with QMPServer(sock_path) as server:
            errors = []

            def wrong_thread():
                try:
                    server.emit("STOP")
                except RuntimeError as exc:
                    errors.append(exc)

            await asyncio.to_thread(wrong_thread)
            with pytest.raises(TypeError):
                server.emit("BAD", {"not-json": object()})
        return errors

    errors = run(scenario())
    assert len(errors) == 1 and "emit_threadsafe" in str(errors[0])


# -- the socket file and access control ----------------------------------------


def test_socket_file_mode_is_0600_whatever_the_umask(sock_path, monkeypatch):
    # The mode right after bind() is the widest the file ever has: a chmod
    # that comes later leaves a window in which anyone may connect.
    modes_at_bind = []
    real_bind = socket.socket.bind

    def bind_and_look(self, address):
        real_bind(self, address)
        if address == sock_path:
            modes_at_bind.append(stat.S_IMODE(os.stat(address).st_mode))

    monkeypatch.setattr(socket.socket, "bind", bind_and_look)

    async def scenario(mode=None):
        kwargs = {} if mode is None else {"mode": mode}
        async with QMPServer(sock_path, **kwargs):
            st = os.stat(sock_path)
        return st, os.path.exists(sock_path)

    old_umask = os.umask(0)
    try:
        st, exists_after_close = run(scenario())
    finally:
        os.umask(old_umask)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert not exists_after_close

    old_umask = os.umask(0o077)
    try:
        st, _ = run(scenario(0o660))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(st.st_mode) == 0o660  # the umask did not narrow it
    assert modes_at_bind == [0o600, 0o660 & ~0o077]


def test_stale_socket_is_replaced_but_a_live_one_is_not(sock_path):
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(sock_path)
    stale.close()  # the file stays, nobody listens: what a crash leaves

    async def scenario():
        async with QMPServer(sock_path):
            with pytest.raises(FileExistsError):
                await QMPServer(sock_path).start()
            client = await qmp_client(sock_path)  # the first server still serves
            version = await client.execute("query-version")
            await client.disconnect()
        return version

    assert "qemu" in run(scenario())

    with open(sock_path, "w"):
        pass
    with pytest.raises(FileExistsError):
        run(QMPServer(sock_path).start())
    assert os.path.isfile(sock_path)  # a regular file is never removed


def test_peer_uid_not_allowed_is_refused_and_logged(sock_path, caplog):
    refused_uid = os.getuid()

    async def scenario():
        async with QMPServer(sock_path, allowed_uids={refused_uid + 1}):
            raw = await RawClient.connect(sock_path)
            line = await raw.recv_line()
            rest = await raw.reader.read()
            await raw.close()
            client = QMPClient("refused")
            with pytest.raises(ConnectError):
                await client.connect(sock_path)
        return line, rest

    with caplog.at_level(logging.WARNING, logger="migfd.qmp"):
        line, rest = run(scenario())
    assert line == (b'{"error": {"class": "GenericError", "desc": "access denied: peer uid %d '
                    b'is not allowed"}}\r\n' % refused_uid)
    assert rest == b""  # EOF, no greeting
    assert any(r.name == "migfd.qmp" and r.levelno == logging.WARNING and f"uid {refused_uid}" in
               r.getMessage() for r in caplog.records)


def test_session_sees_peer_credentials(sock_path):
    async def scenario():
        async with QMPServer(sock_path) as server:
            server.register("whoami", lambda arguments, session: session.peer._asdict(),
                            with_session=True)
            client = await qmp_client(sock_path)
            me = await client.execute("whoami")
            await client.disconnect()
        return me

    assert run(scenario()) == {"pid": os.getpid(), "uid": os.getuid(), "gid": os.getgid()}


# -- bounded input -------------------------------------------------------------


def test_request_over_1_mib_closes_that_session_only(sock_path):
    def padded(length: int) -> bytes:
        head = b'{"execute": "query-version", "id": "'
        tail = b'"}'
        return head + b"x" * (length - len(head) - len(tail)) + tail

    async def scenario():
        async with QMPServer(sock_path):
            raw = await RawClient.connect(sock_path, negotiate=True)
            await raw.send(padded(MAX_REQUEST_BYTES))
            at_limit = await raw.recv()
            # Whitespace between requests is skipped and never piles up ...
            await raw.send(b" \r\n" * MAX_REQUEST_BYTES)
            # ... but one request that does not end in time is an error.
            await raw.send(b'{"execute": "' + b"x" * MAX_REQUEST_BYTES)
            error = await raw.recv()
            rest = await raw.reader.read()
            await raw.close()
            other = await qmp_client(sock_path)
            version = await other.execute("query-version")
            await other.disconnect()
        return at_limit, error, rest, version

    at_limit, error, rest, version = run(scenario())
    assert len(padded(MAX_REQUEST_BYTES)) == MAX_REQUEST_BYTES
    assert "qemu" in at_limit["return"]
    assert error["error"]["class"] == "GenericError"
    assert str(MAX_REQUEST_BYTES) in error["error"]["desc"]
    assert rest == b""  # the session was closed
    assert "qemu" in version  # the server was not


def test_complete_request_over_the_limit_is_refused(sock_path):
    async def scenario():
        async with QMPServer(sock_path, max_request_bytes=64):
            raw = await RawClient.connect(sock_path, negotiate=True)
            await raw.send(b'{"execute": "query-version", "id": "' + b"y" * 64 + b'"}')
            error = await raw.recv()
            rest = await raw.reader.read()
            await raw.close()
        return error, rest

    error, rest = run(scenario())
    assert "64 bytes" in error["error"]["desc"] and rest == b""


# -- file descriptors with SCM_RIGHTS --------------------------------------------


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_getfd_hands_a_passed_fd_to_a_handler(sock_path):
    async def scenario():
        def write_to(arguments, session):
            fd = session.get_fd(arguments["fdname"])  # the handler owns it now
            try:
                os.write(fd, b"hello over SCM_RIGHTS")
            finally:
                os.close(fd)

        async with QMPServer(sock_path) as server:
            server.register("write-to", write_to, with_session=True)
            client = await qmp_client(sock_path)
            read_end, write_end = os.pipe()
            errors = []
            with pytest.raises(ExecuteError) as info:
                await client.execute("getfd", {"fdname": "pipe"})  # no fd sent yet
            errors.append(str(info.value))
            client.send_fd_scm(write_end)
            os.close(write_end)  # the server holds its own copy now
            await client.execute("getfd", {"fdname": "pipe"})
            await client.execute("write-to", {"fdname": "pipe"})
            with pytest.raises(ExecuteError) as info:
                await client.execute("write-to", {"fdname": "pipe"})  # taken already
            errors.append(str(info.value))
            with pytest.raises(ExecuteError) as info:
                await client.execute("closefd", {"fdname": "pipe"})
            errors.append(str(info.value))
            await client.disconnect()
        with os.fdopen(read_end, "rb") as pipe:
            data = pipe.read()  # EOF proves no copy of the write end is left
        return errors, data

    before = _open_fds()
    errors, data = run(scenario())
    assert data == b"hello over SCM_RIGHTS"
    assert errors == [
        "No file descriptor supplied via SCM_RIGHTS",
        "File descriptor named 'pipe' has not been found",
        "File descriptor named 'pipe' not found",
    ]
    assert _open_fds() == before


def test_unclaimed_and_named_fds_are_closed_with_the_session(sock_path):
    async def scenario():
        async with QMPServer(sock_path):
            client = await qmp_client(sock_path)
            pipes = [os.pipe() for _ in range(2)]
            for _, write_end in pipes:
                client.send_fd_scm(write_end)
                os.close(write_end)
            await client.execute("getfd", {"fdname": "named"})  # the second stays unclaimed
            await client.disconnect()
        ends = []
        for read_end, _ in pipes:
            with os.fdopen(read_end, "rb") as pipe:
                ends.append(pipe.read())
        return ends

    before = _open_fds()
    assert run(scenario()) == [b"", b""]  # EOF on both: the server closed its copies
    assert _open_fds() == before


def test_too_many_unclaimed_fds_end_the_session(sock_path):
    async def scenario():
        async with QMPServer(sock_path):
            raw = await RawClient.connect(sock_path, negotiate=True)
            conn = raw.writer.get_extra_info("socket")
            read_end, write_end = os.pipe()
            for _ in range(MAX_PENDING_FDS + 1):
                # What qemu.qmp's send_fd_scm() sends: one space and one fd.
                conn._sock.sendmsg([b" "], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             struct.pack("@i", write_end))])
            os.close(write_end)
            error = await raw.recv()
            rest = await raw.reader.read()
            await raw.close()
            eof = await asyncio.to_thread(os.read, read_end, 1)  # every copy was closed
            os.close(read_end)
        return error, rest, eof

    before = _open_fds()
    error, rest, eof = run(scenario())
    assert error["error"]["class"] == "GenericError"
    assert f"more than {MAX_PENDING_FDS} file descriptors" in error["error"]["desc"]
    assert rest == b"" and eof == b""
    assert _open_fds() == before


def test_closefd_closes_a_named_fd(sock_path):
    async def scenario():
        async with QMPServer(sock_path):
            client = await qmp_client(sock_path)
            read_end, write_end = os.pipe()
            client.send_fd_scm(write_end)
            os.close(write_end)
            await client.execute("getfd", {"fdname": "x"})
            await client.execute("closefd", {"fdname": "x"})
            # EOF while the session is still open: closefd closed it.
            eof = await asyncio.to_thread(os.read, read_end, 1)
            os.close(read_end)
            await client.disconnect()
        return eof

    assert run(scenario()) == b""


# -- closing -------------------------------------------------------------------


@pytest.mark.parametrize("handler_kind", ["sync", "async-awaits-after-request"])
def test_quit_like_handler_replies_then_closes(sock_path, handler_kind):
    async def scenario():
        server = QMPServer(sock_path)

        def quit_sync(arguments):
            server.request_close()

        async def quit_async(arguments):
            server.request_close()
            # Give the loop many turns (not time: a close started now would
            # reach the sessions within a handful of turns); the close must
            # still wait for this reply.
            for _ in range(100):
                await asyncio.sleep(0)
            return {}

        server.register("quit", quit_sync if handler_kind == "sync" else quit_async)
        await server.start()
        bystander = await RawClient.connect(sock_path, negotiate=True)
        client = await qmp_client(sock_path)
        reply = await client.execute("quit")
        await server.wait_closed()
        bystander_rest = await bystander.reader.read()
        await bystander.close()
        try:
            await client.disconnect()
        except EOFError:
            pass  # qemu.qmp may report the server's hang-up here, as with QEMU
        return reply, bystander_rest, os.path.exists(sock_path), server.sessions

    reply, bystander_rest, exists, sessions = run(scenario())
    assert reply == {}
    assert bystander_rest == b""
    assert not exists
    assert sessions == ()


def test_awaiting_close_inside_a_handler_is_an_error_not_a_hang(sock_path):
    async def scenario():
        async with QMPServer(sock_path) as server:

            async def bad_quit(arguments):
                await server.close()

            server.register("bad-quit", bad_quit)
            client = await qmp_client(sock_path)
            with pytest.raises(ExecuteError) as info:
                await client.execute("bad-quit")
            alive = await client.execute("query-version")
            await client.disconnect()
        return str(info.value), alive

    message, alive = run(scenario())
    assert "request_close()" in message
    assert "qemu" in alive


def test_close_ends_connected_sessions(sock_path):
    async def scenario():
        server = QMPServer(sock_path)
        await server.start()
        raw = await RawClient.connect(sock_path, negotiate=True)
        await server.close()
        await server.close()  # twice is harmless
        rest = await raw.reader.read()
        await raw.close()
        with pytest.raises(ConnectError):
            await qmp_client(sock_path)
        return rest

    assert run(scenario()) == b""
