"""Migration addresses, the backend-transfer transport check, the incoming
listener, and migration parameters.

Network traffic stays on 127.0.0.1; UNIX sockets live in temporary directories.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import tempfile
from dataclasses import replace

import pytest

from strategies import open_fd_names

from migfd.errors import MigrationError, TransportError
from migfd.params import MigrationParameters, check_capabilities
from migfd.transport import (
    UNIX_REQUIRED,
    FdAddress,
    FileAddress,
    IncomingListener,
    TcpAddress,
    UnixAddress,
    check_transport,
    connect_outgoing,
    open_incoming_file,
    parse_address,
    parse_channels,
    parse_uri,
)

MESSAGE = ("Migration requires a UNIX domain socket as transport, "
           "because backend-transfer is enabled")
ON = MigrationParameters(backend_transfer=True)
OFF = MigrationParameters()


@pytest.fixture
def no_fd_leak():
    before = open_fd_names()
    yield
    assert open_fd_names() == before


def test_message_is_exactly_the_seed_message():
    assert UNIX_REQUIRED == MESSAGE


# ---------------------------------------------------------------------------
# parse_uri


@pytest.mark.parametrize("uri, address, text", [
    ("unix:/run/migfd/mig.sock", UnixAddress("/run/migfd/mig.sock"), None),
    ("unix:relative.sock", UnixAddress("relative.sock"), None),
    ("tcp:127.0.0.1:4444", TcpAddress("127.0.0.1", 4444), None),
    ("tcp:localhost:0", TcpAddress("localhost", 0), None),
    ("tcp:[::1]:4444", TcpAddress("::1", 4444), None),
    ("tcp:[fe80::1%lo]:65535", TcpAddress("fe80::1%lo", 65535), None),
    ("fd:7", FdAddress(7), None),
    ("file:/var/tmp/vm.bin", FileAddress("/var/tmp/vm.bin", 0), None),
    ("file:/var/tmp/vm.bin,offset=4096", FileAddress("/var/tmp/vm.bin", 4096), None),
    ("file:/var/tmp/vm.bin,offset=0x1000", FileAddress("/var/tmp/vm.bin", 4096),
     "file:/var/tmp/vm.bin,offset=4096"),
])
def test_parse_uri(uri, address, text):
    parsed = parse_uri(uri)
    assert parsed == address
    assert str(parsed) == (text or uri)
    assert parse_uri(str(parsed)) == parsed


@pytest.mark.parametrize("uri, words", [
    ("", "Invalid migration URI ''"),
    ("unix:", "expected unix:, tcp:, fd: or file:"),
    ("unix", "expected unix:"),
    ("exec:cat", "unknown transport 'exec'"),
    ("tcp:127.0.0.1", "is not a number"),
    ("tcp:127.0.0.1:", "bad port"),
    ("tcp:127.0.0.1:65536", "bad port '65536'"),
    ("tcp:127.0.0.1:-1", "bad port"),
    ("tcp:127.0.0.1:http", "'http' is not a number"),
    ("tcp:[::1]", "bad port"),
    ("fd:", "expected unix:"),
    ("fd:x", "fd: takes a number"),
    ("fd:-1", "fd: takes a number"),
    ("file:/x,offset=abc", "'abc' is not a number"),
])
def test_parse_uri_errors(uri, words):
    with pytest.raises(TransportError) as info:
        parse_uri(uri)
    assert words in str(info.value)


def test_parse_uri_refuses_non_strings():
    with pytest.raises(TransportError, match="must be a string"):
        parse_uri(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("uri", ["file:/x,offset=-1", "file:/x,offset=-0x1000"])
def test_parse_uri_refuses_negative_file_offset(uri):
    """QEMU's file: offset is a uint64; a negative one must be refused up front."""
    with pytest.raises(TransportError):
        parse_uri(uri)


# ---------------------------------------------------------------------------
# parse_channels


def main_channel(addr):
    return [{"channel-type": "main", "addr": addr}]


@pytest.mark.parametrize("addr, address", [
    ({"transport": "socket", "type": "unix", "path": "/run/m.sock"}, UnixAddress("/run/m.sock")),
    ({"transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"},
     TcpAddress("127.0.0.1", 4444)),
    ({"transport": "socket", "type": "inet", "host": "::1", "port": "1"}, TcpAddress("::1", 1)),
    ({"transport": "socket", "type": "fd", "str": "9"}, FdAddress(9)),
    ({"transport": "file", "filename": "/tmp/vm.bin"}, FileAddress("/tmp/vm.bin", 0)),
    ({"transport": "file", "filename": "/tmp/vm.bin", "offset": 8192},
     FileAddress("/tmp/vm.bin", 8192)),
])
def test_parse_channels(addr, address):
    assert parse_channels(main_channel(addr)) == address
    assert parse_address(channels=main_channel(addr)) == address


@pytest.mark.parametrize("channels, words", [
    ([], "exactly one channel"),
    ({}, "exactly one channel"),
    ([{"channel-type": "main", "addr": {}}] * 2, "exactly one channel"),
    (["main"], "exactly one channel"),
    ([{"channel-type": "cpr", "addr": {"transport": "file", "filename": "x"}}],
     "channel-type is 'main'"),
    ([{"channel-type": "main"}], "lacks member 'addr'"),
    (main_channel({"transport": "exec", "args": ["cat"]}), "transport 'exec' is not supported"),
    (main_channel({"transport": "rdma", "host": "h", "port": "1"}), "'rdma' is not supported"),
    (main_channel({"transport": "socket", "type": "vsock", "cid": "3", "port": "1"}),
     "socket type 'vsock' is not supported"),
    (main_channel({"transport": "socket", "type": "unix"}), "lacks member 'path'"),
    (main_channel({"transport": "socket", "type": "inet", "host": "127.0.0.1"}),
     "lacks member 'port'"),
    (main_channel({"transport": "socket", "type": "inet", "host": "h", "port": "99999"}),
     "bad port"),
    (main_channel({"transport": "socket", "type": "fd", "str": "monitor-fd-name"}),
     "fd: takes a number"),
    (main_channel({"transport": "socket", "type": "fd"}), "lacks member 'str'"),
    (main_channel({"transport": "file"}), "lacks member 'filename'"),
])
def test_parse_channels_errors(channels, words):
    with pytest.raises(TransportError) as info:
        parse_channels(channels)
    assert words in str(info.value)


@pytest.mark.parametrize("offset", ["abc", None, -4096])
def test_parse_channels_bad_file_offset_is_a_transport_error(offset):
    """A wrong offset is the caller's mistake: TransportError, never ValueError/TypeError."""
    with pytest.raises(TransportError):
        parse_channels(main_channel({"transport": "file", "filename": "/tmp/x", "offset": offset}))


def test_parse_address_needs_exactly_one_of_uri_and_channels():
    with pytest.raises(TransportError, match="not both"):
        parse_address()
    with pytest.raises(TransportError, match="not both"):
        parse_address("unix:/x", main_channel({"transport": "socket", "type": "unix", "path": "/x"}))
    assert parse_address("unix:/x") == UnixAddress("/x")


# ---------------------------------------------------------------------------
# check_transport


@pytest.fixture
def fds_of_every_kind():
    """fd: addresses of a UNIX stream socket, a UNIX datagram socket, a TCP socket, a pipe."""
    unix_a, unix_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dgram_a, dgram_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    server = socket.create_server(("127.0.0.1", 0))
    tcp = socket.create_connection(server.getsockname())
    conn, _ = server.accept()
    r, w = os.pipe()
    yield {"unix-stream": unix_a.fileno(), "unix-dgram": dgram_a.fileno(),
           "tcp": tcp.fileno(), "pipe": r}
    for s in (unix_a, unix_b, dgram_a, dgram_b, server, tcp, conn):
        s.close()
    os.close(r)
    os.close(w)


@pytest.mark.parametrize("kind", ["tcp", "file", "fd-tcp", "fd-pipe", "fd-unix-dgram",
                                  "fd-closed"])
def test_backend_transfer_refuses_non_unix_transports(fds_of_every_kind, kind):
    closed = os.dup(0)
    os.close(closed)
    address = {
        "tcp": TcpAddress("127.0.0.1", 4444),
        "file": FileAddress("/tmp/x"),
        "fd-tcp": FdAddress(fds_of_every_kind["tcp"]),
        "fd-pipe": FdAddress(fds_of_every_kind["pipe"]),
        "fd-unix-dgram": FdAddress(fds_of_every_kind["unix-dgram"]),
        "fd-closed": FdAddress(closed),
    }[kind]
    with pytest.raises(TransportError) as info:
        check_transport(address, ON)
    assert str(info.value) == MESSAGE
    check_transport(address, OFF)  # without backend-transfer, anything goes


@pytest.mark.parametrize("kind", ["unix", "fd-unix-stream"])
def test_backend_transfer_accepts_unix_stream_sockets(fds_of_every_kind, kind, no_fd_leak):
    address = (UnixAddress("/run/m.sock") if kind == "unix"
               else FdAddress(fds_of_every_kind["unix-stream"]))
    check_transport(address, ON)
    check_transport(address, OFF)


def test_connect_outgoing_tcp_with_backend_transfer_never_connects(no_fd_leak):
    server = socket.create_server(("127.0.0.1", 0))
    host, port = server.getsockname()
    try:
        with pytest.raises(TransportError) as info:
            connect_outgoing(TcpAddress(host, port), ON)
        assert str(info.value) == MESSAGE
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody knocked
        # the same address without backend-transfer does connect: the check above is real
        channel = connect_outgoing(TcpAddress(host, port), OFF)
        conn, _ = server.accept()
        conn.close()
        channel.close()
    finally:
        server.close()


def test_connect_outgoing_fd_of_tcp_socket_with_backend_transfer(fds_of_every_kind):
    with pytest.raises(TransportError) as info:
        connect_outgoing(FdAddress(fds_of_every_kind["tcp"]), ON)
    assert str(info.value) == MESSAGE


def test_connect_outgoing_file_with_backend_transfer_creates_nothing(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(TransportError) as info:
        connect_outgoing(FileAddress(str(path)), ON)
    assert str(info.value) == MESSAGE
    assert not path.exists()


def test_connect_outgoing_unix_carries_fds(no_fd_leak):
    with tempfile.TemporaryDirectory() as tmp:
        listener = IncomingListener(UnixAddress(os.path.join(tmp, "m.sock")), ON)
        try:
            out = connect_outgoing(listener.address, ON)
            incoming = listener.accept()
            r, w = os.pipe()
            try:
                out.put_buffer(b"hi")
                out.put_fd(r)
                out.flush()
                assert incoming.get_buffer(2) == b"hi"
                got = incoming.get_fd()
                assert os.fstat(got).st_ino == os.fstat(r).st_ino
                os.close(got)
            finally:
                out.close()
                incoming.close()
                os.close(r)
                os.close(w)
        finally:
            listener.close()


def test_connect_outgoing_fd_of_unix_socket_with_backend_transfer(no_fd_leak):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        out = connect_outgoing(FdAddress(a.fileno()), ON)
        try:
            assert out.supports_fds
            out.put_buffer(b"x")
            out.flush()
            assert b.recv(1) == b"x"
        finally:
            out.close()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("params, per_message", [(ON, 16), (replace(ON, x_fds_per_message=253), 253)])
def test_connect_outgoing_batches_as_many_fds_as_x_fds_per_message(no_fd_leak, params, per_message):
    with tempfile.TemporaryDirectory() as tmp:
        listener = IncomingListener(UnixAddress(os.path.join(tmp, "m.sock")), params)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        channels = []
        try:
            channels.append(connect_outgoing(listener.address, params))
            channels.append(listener.accept())
            channels.append(connect_outgoing(FdAddress(a.fileno()), params))
            assert [c.fds_per_message for c in channels] == [per_message, 16, per_message]
        finally:
            for c in channels:
                c.close()
            listener.close()
            a.close()
            b.close()


def test_connect_outgoing_to_nobody_is_a_transport_error(tmp_path):
    with pytest.raises(TransportError, match="Failed to connect"):
        connect_outgoing(UnixAddress(str(tmp_path / "absent.sock")), ON)


# ---------------------------------------------------------------------------
# IncomingListener


def test_listener_socket_mode_0600(no_fd_leak):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "in.sock")
        old = os.umask(0)  # a permissive umask must not widen the socket's mode
        try:
            listener = IncomingListener(UnixAddress(path), ON)
        finally:
            os.umask(old)
        try:
            mode = os.stat(path).st_mode
            assert stat.S_ISSOCK(mode)
            assert stat.S_IMODE(mode) == 0o600
        finally:
            listener.close()
        assert not os.path.exists(path)


def test_listener_refuses_tcp_with_backend_transfer_before_binding(no_fd_leak):
    # Hold the port: had the listener tried to bind, it would fail differently.
    holder = socket.create_server(("127.0.0.1", 0))
    host, port = holder.getsockname()
    try:
        with pytest.raises(TransportError) as info:
            IncomingListener(TcpAddress(host, port), ON)
        assert str(info.value) == MESSAGE
    finally:
        holder.close()
    # A free port stays free after the refusal.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(TransportError) as info:
        IncomingListener(TcpAddress("127.0.0.1", port), ON)
    assert str(info.value) == MESSAGE
    again = socket.socket()
    try:
        again.bind(("127.0.0.1", port))
    finally:
        again.close()


def test_listener_tcp_without_backend_transfer(no_fd_leak):
    listener = IncomingListener(TcpAddress("127.0.0.1", 0), OFF)
    try:
        port = listener.socket.getsockname()[1]
        out = connect_outgoing(TcpAddress("127.0.0.1", port), OFF)
        incoming = listener.accept()
        try:
            out.put_buffer(b"tcp")
            out.flush()
            assert incoming.get_buffer(3) == b"tcp"
            assert not incoming.supports_fds
        finally:
            out.close()
            incoming.close()
    finally:
        listener.close()


def test_listener_refuses_file_and_fd(tmp_path):
    with pytest.raises(TransportError, match="cannot be listened on"):
        IncomingListener(FileAddress(str(tmp_path / "x")), OFF)
    with pytest.raises(TransportError) as info:
        IncomingListener(FileAddress(str(tmp_path / "x")), ON)
    assert str(info.value) == MESSAGE


def test_listener_accepts_same_uid_peer(no_fd_leak):
    with tempfile.TemporaryDirectory() as tmp:
        listener = IncomingListener(UnixAddress(os.path.join(tmp, "in.sock")), ON)
        try:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(listener.address.path)
            incoming = listener.accept()
            try:
                assert incoming.supports_fds
                client.sendall(b"ok")
                assert incoming.get_buffer(2) == b"ok"
            finally:
                incoming.close()
                client.close()
        finally:
            listener.close()


def test_listener_accept_times_out_as_transport_error(no_fd_leak):
    with tempfile.TemporaryDirectory() as tmp:
        listener = IncomingListener(UnixAddress(os.path.join(tmp, "in.sock")), ON)
        try:
            with pytest.raises(TransportError, match="no source connected"):
                listener.accept(timeout_s=0.01)
        finally:
            listener.close()


def test_listener_allowed_uids_refuses_own_uid(no_fd_leak):
    """Without root: a listener allowing only another uid refuses us, with the line, and waits on."""
    with tempfile.TemporaryDirectory() as tmp:
        listener = IncomingListener(UnixAddress(os.path.join(tmp, "in.sock")), ON,
                                    allowed_uids=frozenset({os.getuid() + 1}))
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(listener.address.path)
            with pytest.raises(TransportError, match="no source connected"):
                listener.accept(timeout_s=0.5)
            assert listener.refused == 1
            data = b""
            while chunk := client.recv(4096):
                data += chunk
            assert data == f"migfd: access denied: peer uid {os.getuid()} is not allowed\n".encode()
        finally:
            client.close()
            listener.close()


def test_open_incoming_file_with_offset(tmp_path):
    path = tmp_path / "vm.bin"
    path.write_bytes(b"skip" + b"QEVM")
    f = open_incoming_file(parse_uri(f"file:{path},offset=4"))
    try:
        assert f.get_buffer(4) == b"QEVM"
    finally:
        f.close()


# ---------------------------------------------------------------------------
# MigrationParameters and capabilities


def test_parameters_updated():
    params = OFF.updated({"backend-transfer": True, "downtime-limit": 100, "x-batch-fds": True})
    assert params.backend_transfer is True
    assert params.downtime_limit == 100
    assert params.x_batch_fds is True
    assert OFF.backend_transfer is False and OFF.downtime_limit == 300  # a copy
    assert params.to_qmp()["backend-transfer"] is True
    assert params.to_qmp()["downtime-limit"] == 100
    assert params.capabilities() == ("backend-transfer",)
    assert OFF.capabilities() == ()


@pytest.mark.parametrize("args, words", [
    ({"downtime-limit": "300"}, "Parameter 'downtime-limit' expects an integer"),
    ({"downtime-limit": 3.5}, "Parameter 'downtime-limit' expects an integer"),
    ({"downtime-limit": True}, "Parameter 'downtime-limit' expects an integer"),
    ({"max-bandwidth": None}, "Parameter 'max-bandwidth' expects an integer"),
    ({"downtime-limit": -1}, "Parameter 'downtime-limit' expects a non-negative value"),
    ({"backend-transfer": 1}, "Parameter 'backend-transfer' expects a boolean"),
    ({"backend-transfer": "on"}, "Parameter 'backend-transfer' expects a boolean"),
    ({"x-batch-fds": 0}, "Parameter 'x-batch-fds' expects a boolean"),
    ({"x-fds-per-message": 0}, "Parameter 'x-fds-per-message' expects a value between 1 and 253"),
    ({"x-fds-per-message": -1}, "Parameter 'x-fds-per-message' expects a value between 1 and 253"),
    ({"x-fds-per-message": 254}, "Parameter 'x-fds-per-message' expects a value between 1 and 253"),
    ({"x-fds-per-message": True}, "Parameter 'x-fds-per-message' expects an integer"),
    ({"x-fds-per-message": "253"}, "Parameter 'x-fds-per-message' expects an integer"),
    ({"no-such-thing": 1}, "Parameter 'no-such-thing' is unexpected"),
])
def test_parameters_updated_type_errors(args, words):
    with pytest.raises(MigrationError) as info:
        OFF.updated(args)
    assert str(info.value) == words


@pytest.mark.parametrize("value", [1, 16, 17, 253])
def test_x_fds_per_message_takes_1_to_253(value):
    params = ON.updated({"x-fds-per-message": value})
    assert params.x_fds_per_message == value
    assert params.to_qmp()["x-fds-per-message"] == value


def test_x_fds_per_message_is_a_capability_only_when_the_source_may_send_more_than_qemu_reads():
    assert MigrationParameters().x_fds_per_message == 16
    large = {"x-fds-per-message": 17}
    assert ON.updated(large).capabilities() == ("backend-transfer", "x-fds-per-message")
    # 16 a message, no fds at all, or one fd a message: a stream QEMU reads, no capability
    assert ON.updated({"x-fds-per-message": 16}).capabilities() == ("backend-transfer",)
    assert OFF.updated(large).capabilities() == ()
    assert ON.updated({**large, "x-batch-fds": False}).capabilities() == ("backend-transfer",)


def test_parameters_updated_is_all_or_nothing():
    with pytest.raises(MigrationError):
        OFF.updated({"backend-transfer": True, "downtime-limit": "x"})
    assert OFF == MigrationParameters()


def test_check_capabilities_agree():
    check_capabilities(ON, ("backend-transfer",))
    check_capabilities(OFF, ())


def test_check_capabilities_on_at_source_off_here():
    with pytest.raises(MigrationError) as info:
        check_capabilities(OFF, ("backend-transfer",))
    assert str(info.value) == ("Capability 'backend-transfer' is on on the source "
                               "but off on the destination")


def test_check_capabilities_off_at_source_on_here():
    with pytest.raises(MigrationError) as info:
        check_capabilities(ON, ())
    assert str(info.value) == ("Capability 'backend-transfer' is off on the source "
                               "but on on the destination")


LARGE = replace(ON, x_fds_per_message=253)


def test_check_capabilities_large_fd_batches_need_the_destinations_consent():
    check_capabilities(LARGE, ("backend-transfer", "x-fds-per-message"))
    check_capabilities(replace(ON, x_fds_per_message=17), ("backend-transfer", "x-fds-per-message"))
    # one way: a destination that takes large batches reads small ones too
    check_capabilities(LARGE, ("backend-transfer",))
    with pytest.raises(MigrationError) as info:
        check_capabilities(ON, ("backend-transfer", "x-fds-per-message"))
    assert str(info.value) == ("Capability 'x-fds-per-message' is on on the source (more than 16 fds in "
                               "one message) but off on the destination (x-fds-per-message 16)")


def test_check_capabilities_unknown():
    with pytest.raises(MigrationError, match="Capability 'x-colo' of the source is unknown"):
        check_capabilities(ON, ("backend-transfer", "x-colo"))


def test_early_fds_is_a_capability_both_sides_must_share():
    early = MigrationParameters(backend_transfer=True, x_early_fds=True)
    assert early.capabilities() == ("backend-transfer", "x-early-fds")
    # without backend-transfer no fd moves, early or not: nothing to agree on
    assert MigrationParameters(x_early_fds=True).capabilities() == ()
    check_capabilities(early, early.capabilities())
    with pytest.raises(MigrationError) as info:
        check_capabilities(ON, early.capabilities())
    assert str(info.value) == "Capability 'x-early-fds' is on on the source but off on the destination"
    with pytest.raises(MigrationError) as info:
        check_capabilities(early, ON.capabilities())
    assert str(info.value) == "Capability 'x-early-fds' is off on the source but on on the destination"
