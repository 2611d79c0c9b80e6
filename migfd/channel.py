"""QEMUFile: a buffered migration channel over a connected socket or a file.

Bytes are buffered and sent in large writes. An fd travels as QEMU's
qemu_file_put_fd sends it: everything buffered is flushed first, then one
service byte 0x20 with the fd as SCM_RIGHTS in its own sendmsg, so the byte
order of the stream and the order of fds agree. The reading side receives
with MSG_CMSG_CLOEXEC and room for SCM_MAX_FD fds on every read, queues fds in
arrival order, and treats a truncated control message as fatal, because the
kernel then has dropped fds silently.

Ownership: ``put_fd`` does not take the fd (the sender keeps it until the
handover commits). Received fds belong to the channel until ``get_fd`` or
``read_chunk`` hands them out; ``close`` closes the ones never claimed.

Errors are :class:`ChannelClosedError` when this side closed the channel and
used it after, :class:`ChannelBrokenError` when it broke from outside (the
peer closed it mid-record or reset it, a timeout, a failed read or write; the
OSError is the ``__cause__``), and plain :class:`ChannelError` for a request
the channel cannot meet. :meth:`QEMUFile.shutdown` makes the channel look
broken, as if the peer had vanished.
"""

from __future__ import annotations

import array
import socket
import struct
from collections import deque
from typing import BinaryIO

from migfd.errors import ChannelBrokenError, ChannelClosedError, ChannelError
from migfd.fds import close_fds
from migfd.units import KiB
from migfd.stream.constants import FD_SERVICE_BYTE

#: The kernel's limit of fds in one SCM_RIGHTS message.
SCM_MAX_FD = 253
#: QEMU's reader accepts up to this many fd records in one message; so do we when batching.
MAX_FDS_PER_MESSAGE = 16
#: Bound on received fds not yet claimed, so a peer cannot exhaust our fd table.
MAX_QUEUED_FDS = 1024
DEFAULT_BUFSIZE = 256 * KiB

_FD_SIZE = array.array("i").itemsize
_ANCBUF = socket.CMSG_SPACE(SCM_MAX_FD * _FD_SIZE)


def socket_supports_fds(sock: socket.socket) -> bool:
    return sock.family == socket.AF_UNIX


class QEMUFile:
    """One direction-agnostic channel; QEMU's QEMUFile over a QIOChannel.

    Build it with :meth:`from_socket` or :meth:`open_file`. ``name`` is used in
    errors, like QEMU's channel names ("migration-socket-outgoing", a path).
    With ``batch_fds``, consecutive fd records share one sendmsg (up to
    :data:`MAX_FDS_PER_MESSAGE`, each with its own service byte), which QEMU's
    reader accepts; it cuts the per-message cost of many fds.
    """

    def __init__(self, *, name: str, sock: socket.socket | None = None,
                 file: BinaryIO | None = None, bufsize: int = DEFAULT_BUFSIZE,
                 batch_fds: bool = False):
        if (sock is None) == (file is None):
            raise ValueError("a QEMUFile needs exactly one of a socket or a file")
        self.name = name
        self._sock = sock
        self._file = file
        self.bufsize = bufsize
        self.batch_fds = batch_fds
        self.supports_fds = sock is not None and socket_supports_fds(sock)
        self._wbuf = bytearray()
        self._pending_fds: list[int] = []
        self._rbuf = bytearray()
        self._rpos = 0
        self._rfds: deque[int] = deque()
        self._scratch = bytearray(bufsize)
        self._scratch_view = memoryview(self._scratch)
        self._eof = False
        self.closed = False
        #: bytes handed to the kernel, service bytes included
        self.bytes_sent = 0
        self.bytes_received = 0
        self.fds_sent = 0
        self.fds_received = 0
        #: sendmsg calls that carried fds
        self.fd_messages = 0

    @classmethod
    def from_socket(cls, sock: socket.socket, name: str | None = None, **kwargs) -> "QEMUFile":
        """Take ownership of a connected stream socket."""
        return cls(name=name or f"migration-socket-{sock.fileno()}", sock=sock, **kwargs)

    @classmethod
    def open_file(cls, path: str, mode: str, **kwargs) -> "QEMUFile":
        """A ``file:`` channel: mode "wb" for an outgoing, "rb" for an incoming stream.

        ``offset=N`` starts at byte N of the file, as QEMU's file:PATH,offset=N.
        """
        if mode not in ("rb", "wb"):
            raise ValueError("mode must be 'rb' or 'wb'")
        offset = kwargs.pop("offset", 0)
        try:
            f = open(path, mode, buffering=0)
        except OSError as exc:
            raise ChannelError(f"cannot open {path}: {exc.strerror}") from exc
        if offset:
            try:
                f.seek(offset)
            except OSError as exc:
                f.close()
                raise ChannelError(f"cannot seek {path} to {offset}: {exc.strerror}") from exc
        return cls(name=path, file=f, **kwargs)

    @property
    def bytes_written(self) -> int:
        """Bytes put so far, sent or still buffered (service bytes of fds included)."""
        return self.bytes_sent + len(self._wbuf) + len(self._pending_fds)

    @property
    def socket(self) -> socket.socket | None:
        return self._sock

    def settimeout(self, seconds: float | None) -> None:
        """Bound every blocking read and write of this channel."""
        if self._sock is not None:
            self._sock.settimeout(seconds)

    def _check_open(self) -> None:
        if self.closed:
            raise ChannelClosedError(f"{self.name} is closed")

    def _io_error(self, message: str) -> ChannelError:
        """The error for failed I/O: closed if this side closed it meanwhile, else broken."""
        kind = ChannelClosedError if self.closed else ChannelBrokenError
        return kind(f"{self.name}: {message}")

    def _no_fds(self) -> ChannelError:
        return ChannelError(f"{self.name} does not support fd passing")

    # -- writing ----------------------------------------------------------

    def put_buffer(self, data) -> None:
        """Queue bytes (any C-contiguous buffer); large ones go out at once, uncopied."""
        self._check_open()
        if self._pending_fds:
            self._send_fds()
        view = memoryview(data).cast("B")
        if len(view) >= self.bufsize:
            if self._wbuf:
                self._send_buffer()
            self._send(view)
            return
        self._wbuf += view
        if len(self._wbuf) >= self.bufsize:
            self._send_buffer()

    def put_byte(self, value: int) -> None:
        self.put_buffer(bytes((value,)))

    def put_be16(self, value: int) -> None:
        self.put_buffer(struct.pack(">H", value))

    def put_be32(self, value: int) -> None:
        self.put_buffer(struct.pack(">I", value))

    def put_be64(self, value: int) -> None:
        self.put_buffer(struct.pack(">Q", value))

    def put_fd(self, fd: int) -> None:
        """Send ``fd`` beside one service byte; the caller keeps its own fd."""
        self._check_open()
        if not self.supports_fds:
            raise self._no_fds()
        if self._wbuf:
            self._send_buffer()
        self._pending_fds.append(fd)
        if not self.batch_fds or len(self._pending_fds) >= MAX_FDS_PER_MESSAGE:
            self._send_fds()

    def flush(self) -> None:
        self._check_open()
        if self._pending_fds:
            self._send_fds()
        if self._wbuf:
            self._send_buffer()

    def _send_buffer(self) -> None:
        data = self._wbuf
        self._wbuf = bytearray()
        self._send(memoryview(data))

    def _send(self, data: memoryview) -> None:
        try:
            if self._sock is not None:
                self._sock.sendall(data)
            else:
                assert self._file is not None
                view = data
                while view:
                    view = view[self._file.write(view):]
        except TimeoutError as exc:
            raise self._io_error("timed out writing") from exc
        except OSError as exc:
            raise self._io_error(f"write failed: {exc.strerror or exc}") from exc
        self.bytes_sent += len(data)

    def _send_fds(self) -> None:
        fds = self._pending_fds
        self._pending_fds = []
        assert self._sock is not None
        payload = bytes((FD_SERVICE_BYTE,)) * len(fds)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            sent = self._sock.sendmsg([payload], ancillary)
            if sent != len(payload):
                # The fds went with the first byte; the rest is plain data.
                self._sock.sendall(payload[sent:])
        except TimeoutError as exc:
            raise self._io_error("timed out sending fds") from exc
        except OSError as exc:
            raise self._io_error(f"sending fds failed: {exc.strerror or exc}") from exc
        self.bytes_sent += len(payload)
        self.fds_sent += len(fds)
        self.fd_messages += 1

    # -- reading ----------------------------------------------------------

    def _fill(self) -> int:
        """One read from the kernel into the read buffer; 0 at end of stream."""
        if self._rpos and self._rpos == len(self._rbuf):
            self._rbuf.clear()
            self._rpos = 0
        data, fds = self._receive()
        self._rbuf += data
        self._rfds.extend(fds)
        if len(self._rfds) > MAX_QUEUED_FDS:
            raise ChannelError(f"{self.name}: more than {MAX_QUEUED_FDS} fds received and not claimed")
        return len(data)

    def _receive(self) -> tuple[bytes, list[int]]:
        """One read from the kernel: the bytes and the fds that came with them."""
        self._check_open()
        if self._eof:
            return b"", []
        try:
            if self._sock is None:
                assert self._file is not None
                data = self._file.read(self.bufsize)
                fds: list[int] = []
            else:
                data, fds = self._recvmsg()
        except TimeoutError as exc:
            raise self._io_error("timed out waiting for data") from exc
        except OSError as exc:
            raise self._io_error(f"read failed: {exc.strerror or exc}") from exc
        if not data:
            self._eof = True
            close_fds(fds)
            return b"", []
        self.bytes_received += len(data)
        self.fds_received += len(fds)
        return data, fds

    def _recvmsg(self) -> tuple[memoryview, list[int]]:
        assert self._sock is not None
        if not self.supports_fds:
            nbytes = self._sock.recv_into(self._scratch)
            return self._scratch_view[:nbytes], []
        # Into one reused buffer: a fresh 256 KiB object per read costs page faults.
        nbytes, ancdata, flags, _ = self._sock.recvmsg_into([self._scratch], _ANCBUF,
                                                           socket.MSG_CMSG_CLOEXEC)
        data = self._scratch_view[:nbytes]
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _FD_SIZE
                fds.extend(array.array("i", payload[:usable]))
        if flags & socket.MSG_CTRUNC:
            close_fds(fds)
            raise ChannelError(f"{self.name}: control message truncated, fds were lost")
        return data, fds

    def read_chunk(self) -> tuple[bytes | memoryview, list[int]]:
        """What has arrived: buffered bytes and queued fds, reading once if there are none.

        The caller owns the fds returned. The bytes may be a view of the
        channel's read buffer, valid until the next read: consume or copy
        them first (StreamReader.receive_data copies). ``(b"", [])`` means end
        of stream.
        """
        if self._rpos == len(self._rbuf) and not self._rfds:
            return self._receive()
        data = bytes(self._rbuf[self._rpos:])
        self._rbuf.clear()
        self._rpos = 0
        fds = list(self._rfds)
        self._rfds.clear()
        return data, fds

    def get_buffer(self, n: int) -> bytes:
        """Exactly ``n`` bytes, or a ChannelBrokenError at end of stream."""
        while len(self._rbuf) - self._rpos < n:
            if not self._fill():
                raise ChannelBrokenError(f"{self.name}: end of stream, {n} bytes expected")
        out = bytes(self._rbuf[self._rpos:self._rpos + n])
        self._rpos += n
        return out

    def get_byte(self) -> int:
        return self.get_buffer(1)[0]

    def get_be16(self) -> int:
        return struct.unpack(">H", self.get_buffer(2))[0]

    def get_be32(self) -> int:
        return struct.unpack(">I", self.get_buffer(4))[0]

    def get_be64(self) -> int:
        return struct.unpack(">Q", self.get_buffer(8))[0]

    def get_fd(self) -> int:
        """Read one service byte and return the oldest queued fd; the caller owns it."""
        if not self.supports_fds:
            raise self._no_fds()
        byte = self.get_byte()
        if byte != FD_SERVICE_BYTE:
            raise ChannelError(f"{self.name}: unexpected service byte 0x{byte:02x}")
        if not self._rfds:
            raise ChannelError(f"{self.name}: no FD come with service byte")
        return self._rfds.popleft()

    # -- the end ----------------------------------------------------------

    def shutdown(self) -> None:
        """Wake a reader blocked on this channel (used to cancel a migration)."""
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Close the channel and every received fd that was never claimed."""
        if self.closed:
            return
        self.closed = True
        close_fds(self._rfds)
        self._rfds.clear()
        self._pending_fds = []
        for closable in (self._sock, self._file):
            if closable is not None:
                try:
                    closable.close()
                except OSError:
                    pass

    def __enter__(self) -> "QEMUFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
