"""QEMUFile: a buffered migration channel over a connected socket or a file.

Bytes are buffered and sent in large writes. An fd is one service byte 0x20
in the byte stream with the fd beside it as SCM_RIGHTS. Unbatched, it travels
as QEMU's qemu_file_put_fd sends it: everything buffered is flushed first,
then the service byte with the fd in its own sendmsg. Batched (the default),
the service byte joins the buffered bytes and the fd rides, as SCM_RIGHTS, in
the sendmsg that carries that buffer, with at most ``fds_per_message`` fds
a message: so the device state of a whole switchover can leave in one
message. That is QEMU's :data:`~migfd.fds.MAX_FDS_PER_MESSAGE` unless both
ends are migfd (x-fds-per-message, up to the kernel's SCM_MAX_FD). Both read
back the same way in QEMU's reader and ours: every fd received with any read
is queued in arrival order, and an fd field takes the oldest queued fd when it
reads its service byte; an fd never arrives after its service byte, so the
byte order of the stream and the order of fds agree. The reading side
receives with MSG_CMSG_CLOEXEC and room for SCM_MAX_FD fds on every read (so
any batch a sender can make fits), queues fds in arrival order, and treats a
truncated control message as fatal, because the kernel then has dropped fds
silently.

A state copy's pages take no copy in user space on their way: the source
hands :meth:`QEMUFile.put_buffers` record headers and runs of pages in guest
RAM, sent by writev from an iovec array numpy builds; the destination's
reader lends the channel the free end of its buffer and
:meth:`QEMUFile.read_into` receives into it. Bytes whose place is known (or
guessed) before they arrive go straight there: :meth:`QEMUFile.read_into_buffers`
receives a packet's pages into views of guest RAM (recvmsg_into), and
:meth:`QEMUFile.read_into_iovec` the record words and pages of a guessed run
into an iovec array (recvmsg through ctypes, for the same reason as writev).

A socket stays in blocking mode: a bound on a write is the kernel's
SO_SNDTIMEO, and a read first polls (bounded) only when nothing is there, so
data that has arrived costs one system call.

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
import ctypes
import errno
import os
import select
import socket
import struct
import time
from collections import deque
from typing import BinaryIO, Sequence

import numpy as np

from migfd.errors import ChannelBrokenError, ChannelClosedError, ChannelError
from migfd.fds import MAX_FDS_PER_MESSAGE, SCM_MAX_FD, close_fds
from migfd.stream.constants import FD_SERVICE_BYTE
from migfd.stream.gather import Interleaved
from migfd.timeline import Timeline
from migfd.units import KiB

#: Bound on received fds not yet claimed, so a peer cannot exhaust our fd table.
MAX_QUEUED_FDS = 1024
DEFAULT_BUFSIZE = 256 * KiB

#: buffers one sendmsg/writev takes at most (Linux's UIO_MAXIOV)
IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)

#: Linux's SO_SNDBUFFORCE (socket(7)), which the socket module does not name
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)

_FD_SIZE = array.array("i").itemsize


class _MsgHdr(ctypes.Structure):
    """struct msghdr (recvmsg(2))."""

    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


# writev(2), readv(2) and recvmsg(2) themselves, for iovec arrays: the socket module
# wants a Python buffer per iovec entry, two per page of a state copy. ctypes drops
# the GIL for each call.
_libc = ctypes.CDLL(None, use_errno=True)
_libc_writev = _libc.writev
_libc_writev.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_libc_writev.restype = ctypes.c_ssize_t
_libc_readv = _libc.readv
_libc_readv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_int)
_libc_readv.restype = ctypes.c_ssize_t
_libc_recvmsg = _libc.recvmsg
_libc_recvmsg.argtypes = (ctypes.c_int, ctypes.POINTER(_MsgHdr), ctypes.c_int)
_libc_recvmsg.restype = ctypes.c_ssize_t
#: struct cmsghdr: cmsg_len (size_t), cmsg_level, cmsg_type (int); data after it, aligned
_CMSG_HEADER = struct.Struct("@Nii")
_CMSG_ALIGN = ctypes.sizeof(ctypes.c_size_t)


def advance_iovec(iov: np.ndarray, nbytes: int) -> np.ndarray:
    """The part of an (n, 2) iovec array after its first ``nbytes`` bytes; the entry
    cut in part is changed in place to start at its first byte not covered."""
    ends = np.cumsum(iov[:, 1])
    done = int(np.searchsorted(ends, nbytes, side="right"))
    rest = iov[done:]
    if len(rest):
        taken = nbytes - (int(ends[done - 1]) if done else 0)
        rest[0, 0] += np.uint64(taken)
        rest[0, 1] -= np.uint64(taken)
    return rest


def _cmsgs(control: bytes) -> list[tuple[int, int, bytes]]:
    """A received control buffer's messages as (level, type, data), as the socket module gives them."""
    out = []
    at = 0
    while at + _CMSG_HEADER.size <= len(control):
        length, level, kind = _CMSG_HEADER.unpack_from(control, at)
        if length < _CMSG_HEADER.size:
            break
        out.append((level, kind, control[at + _CMSG_HEADER.size:at + length]))
        at += (length + _CMSG_ALIGN - 1) & ~(_CMSG_ALIGN - 1)
    return out


_ANCBUF = socket.CMSG_SPACE(SCM_MAX_FD * _FD_SIZE)
# The MSG_* flags as plain ints: socket.MsgFlag is an enum.IntFlag, whose | and &
# cost about a µs each in Python 3.11, on every read of a message that carries fds.
_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_MSG_DONTWAIT = int(socket.MSG_DONTWAIT)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


def socket_supports_fds(sock: socket.socket) -> bool:
    return sock.family == socket.AF_UNIX


class QEMUFile:
    """One direction-agnostic channel; QEMU's QEMUFile over a QIOChannel.

    Build it with :meth:`from_socket` or :meth:`open_file`. ``name`` is used in
    errors, like QEMU's channel names ("migration-socket-outgoing", a path).
    With ``batch_fds`` an fd rides with the buffered bytes that hold its
    service byte (see the module docstring), ``fds_per_message`` fds a
    sendmsg at most; without, each fd takes its own sendmsg after a flush,
    exactly as QEMU sends it.
    """

    def __init__(self, *, name: str, sock: socket.socket | None = None,
                 file: BinaryIO | None = None, bufsize: int = DEFAULT_BUFSIZE,
                 batch_fds: bool = True, fds_per_message: int = MAX_FDS_PER_MESSAGE):
        if (sock is None) == (file is None):
            raise ValueError("a QEMUFile needs exactly one of a socket or a file")
        if not 1 <= fds_per_message <= SCM_MAX_FD:
            raise ValueError(f"fds_per_message must be 1 to {SCM_MAX_FD}, not {fds_per_message}")
        self.name = name
        self._sock = sock
        self._file = file
        self.bufsize = bufsize
        self.batch_fds = batch_fds
        self.fds_per_message = fds_per_message
        self.supports_fds = sock is not None and socket_supports_fds(sock)
        self._wbuf = bytearray()
        self._pending_fds: list[int] = []
        self._rbuf = bytearray()
        self._rpos = 0
        self._rfds: deque[int] = deque()
        # Reads that no reader lends a buffer for go into one reused buffer: a
        # fresh 256 KiB object per read costs page faults.
        self._scratch = bytearray(bufsize)
        self._scratch_view = memoryview(self._scratch)
        self._control = ctypes.create_string_buffer(_ANCBUF)  # read_into_iovec's, for fds
        self._eof = False
        self._timeout_s: float | None = None
        self._poller: select.poll | None = None
        #: the first I/O failure (see _io_error)
        self._broken: str | None = None
        self.closed = False
        #: bytes handed to the kernel, service bytes included
        self.bytes_sent = 0
        self.bytes_received = 0
        self.fds_sent = 0
        self.fds_received = 0
        #: sendmsg calls that carried fds
        self.fd_messages = 0
        #: where the migration records each message that carries fds ("fds-sent", "fds-received")
        self.timeline: Timeline | None = None

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
        return self.bytes_sent + len(self._wbuf)

    @property
    def socket(self) -> socket.socket | None:
        return self._sock

    def settimeout(self, seconds: float | None) -> None:
        """Bound every blocking read and write of this channel (None: no bound).

        The socket itself stays blocking (Python's own timeout would poll
        before every call): writes are bounded by SO_SNDTIMEO, reads by the
        poll that only runs when nothing has arrived yet.
        """
        self._timeout_s = seconds
        if self._sock is None:
            return
        self._sock.settimeout(None)
        usec = 0 if seconds is None else max(int(seconds * 1_000_000), 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                              struct.pack("@ll", usec // 1_000_000, usec % 1_000_000))

    def set_send_buffer(self, nbytes: int) -> int:
        """Ask for a kernel send buffer of ``nbytes`` (beyond net.core.wmem_max where
        allowed: SO_SNDBUFFORCE needs CAP_NET_ADMIN); returns what the kernel gave.

        A sender that writes a large batch while its peer parses the previous
        one needs room for it in the kernel, or the two take turns instead of
        overlapping.
        """
        if self._sock is None:
            return 0
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, nbytes)
        except OSError:
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, nbytes)
            except OSError:
                pass
        return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)

    def _check_open(self) -> None:
        if self.closed:
            raise ChannelClosedError(f"{self.name} is closed")
        if self._broken is not None:
            raise ChannelBrokenError(f"{self.name}: {self._broken}")

    def _io_error(self, message: str) -> ChannelError:
        """The error for failed I/O: closed if this side closed it meanwhile, else broken.

        As QEMU's QEMUFile keeps its first error, a broken channel stays
        broken: every later use raises.
        """
        if self.closed:
            return ChannelClosedError(f"{self.name}: {message}")
        if self._broken is None:
            self._broken = message
        return ChannelBrokenError(f"{self.name}: {message}")

    def _no_fds(self) -> ChannelError:
        return ChannelError(f"{self.name} does not support fd passing")

    # -- writing ----------------------------------------------------------

    def put_buffer(self, data) -> None:
        """Queue bytes (any C-contiguous buffer); large ones go out at once, uncopied."""
        if self.closed or self._broken is not None:
            self._check_open()
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

    def put_buffers(self, buffers: Sequence) -> None:
        """Send byte buffers and :class:`~migfd.stream.gather.Interleaved` runs in order,
        none of them copied (a state copy's page records: record words and views
        of guest RAM).

        What is buffered goes first: in the same system call unless it
        carries fds, which keep their own sendmsg. Then one writev per
        :data:`IOV_MAX` buffers, from an iovec array numpy builds (no Python
        object per page); a call that took only part of them goes on from the
        first byte it did not take.
        """
        if self.closed or self._broken is not None:
            self._check_open()
        if self._pending_fds:
            self._send_buffer()
        keep: list = []  # the memory every iovec entry points into, alive until sent
        parts: list[np.ndarray] = []
        if self._wbuf:
            buffers = [self._wbuf, *buffers]
            self._wbuf = bytearray()
        for buf in buffers:
            if isinstance(buf, Interleaved):
                if len(buf.first):
                    parts.append(buf.iovec())
                    keep.append(buf)
            elif len(buf):
                arr = np.frombuffer(buf, dtype=np.uint8)
                keep.append(arr)
                parts.append(np.array([[arr.ctypes.data, len(arr)]], dtype=np.uint64))
        if parts:
            self._writev(np.concatenate(parts))
        del keep

    def put_fd(self, fd: int) -> None:
        """Send ``fd`` beside one service byte; the caller keeps its own fd.

        The fd must stay open until the next :meth:`flush` (batched, it
        leaves with the buffer).
        """
        self._check_open()
        if not self.supports_fds:
            raise self._no_fds()
        if not self.batch_fds:
            if self._wbuf:
                self._send_buffer()
            self._pending_fds.append(fd)
            self._wbuf.append(FD_SERVICE_BYTE)
            self._send_buffer()
            return
        self._wbuf.append(FD_SERVICE_BYTE)
        self._pending_fds.append(fd)
        if len(self._pending_fds) >= self.fds_per_message:
            self._send_buffer()

    def flush(self) -> None:
        self._check_open()
        if self._wbuf:
            self._send_buffer()

    def _send_buffer(self) -> None:
        """Send the buffer, with the fds whose service bytes it holds."""
        data = self._wbuf
        self._wbuf = bytearray()
        if self._pending_fds:
            self._send_fds(memoryview(data))
        else:
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
        except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: SO_SNDTIMEO ran out
            raise self._io_error("timed out writing") from exc
        except OSError as exc:
            raise self._io_error(f"write failed: {exc.strerror or exc}") from exc
        self.bytes_sent += len(data)

    def _writev(self, iov: np.ndarray) -> None:
        """Send every byte an (n, 2) iovec array names (which it changes), IOV_MAX entries a call."""
        fd = self._sock.fileno() if self._sock is not None else self._file.fileno()  # type: ignore[union-attr]
        while len(iov):
            chunk = iov[:IOV_MAX]
            sent = _libc_writev(fd, chunk.ctypes.data, len(chunk))
            if sent < 0:
                err = ctypes.get_errno()
                if err == errno.EINTR:
                    continue
                if err in (errno.EAGAIN, errno.EWOULDBLOCK):  # SO_SNDTIMEO ran out
                    raise self._io_error("timed out writing") from BlockingIOError(err, os.strerror(err))
                raise self._io_error(f"write failed: {os.strerror(err)}") from OSError(err, os.strerror(err))
            self.bytes_sent += sent
            # A partial write (SO_SNDTIMEO ran out, a signal, a full disk) goes on
            # from the first byte not taken.
            iov = iov[len(chunk) - len(advance_iovec(chunk, sent)):]

    def _send_fds(self, payload: memoryview) -> None:
        """One sendmsg of ``payload`` with the pending fds (their service bytes are in it)."""
        fds = self._pending_fds
        self._pending_fds = []
        assert self._sock is not None
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        start = time.monotonic_ns()
        try:
            sent = self._sock.sendmsg([payload], ancillary)
            if sent != len(payload):
                # The fds went with the first bytes; the rest is plain data.
                self._sock.sendall(payload[sent:])
        except (TimeoutError, BlockingIOError) as exc:
            raise self._io_error("timed out sending fds") from exc
        except OSError as exc:
            raise self._io_error(f"sending fds failed: {exc.strerror or exc}") from exc
        if self.timeline is not None:
            self.timeline.add("fds-sent", start, time.monotonic_ns())
        self.bytes_sent += len(payload)
        self.fds_sent += len(fds)
        self.fd_messages += 1

    # -- reading ----------------------------------------------------------

    def _fill(self) -> int:
        """One read from the kernel into the read buffer; 0 at end of stream."""
        if self._rpos and self._rpos == len(self._rbuf):
            self._rbuf.clear()
            self._rpos = 0
        got = self._receive()
        assert got is not None
        data, fds = got
        self._rbuf += data
        self._rfds.extend(fds)
        if len(self._rfds) > MAX_QUEUED_FDS:
            raise ChannelError(f"{self.name}: more than {MAX_QUEUED_FDS} fds received and not claimed")
        return len(data)

    def _receive(self, block: bool = True) -> tuple[bytes | memoryview, list[int]] | None:
        """One read from the kernel: the bytes and the fds that came with them.

        Without ``block``, None when nothing has arrived. ``(b"", [])`` is the
        end of the stream.
        """
        got = self._receive_into(self._scratch_view, block)
        if got is None:
            return None
        nbytes, fds = got
        return self._scratch_view[:nbytes], fds

    def _receive_into(self, buffer: memoryview, block: bool) -> tuple[int, list[int]] | None:
        """One read from the kernel into ``buffer``: how many bytes, and the fds with them.

        Without ``block``, None when nothing has arrived. ``(0, [])`` is the
        end of the stream.
        """
        self._check_open()
        if self._eof:
            return 0, []
        try:
            if self._sock is None:
                assert self._file is not None
                nbytes = self._file.readinto(buffer) or 0
                fds: list[int] = []
            else:
                got = self._recvmsg([buffer])
                while got is None:
                    if not block:
                        return None
                    self.wait_readable()
                    got = self._recvmsg([buffer])
                nbytes, fds = got
        except TimeoutError as exc:
            raise self._io_error("timed out waiting for data") from exc
        except OSError as exc:
            raise self._io_error(f"read failed: {exc.strerror or exc}") from exc
        return self._received(nbytes, fds)

    def _received(self, nbytes: int, fds: list[int]) -> tuple[int, list[int]]:
        """Count a read's bytes and fds; a read of nothing is the end of the stream."""
        if not nbytes:
            self._eof = True
            close_fds(fds)
            return 0, []
        self.bytes_received += nbytes
        self.fds_received += len(fds)
        return nbytes, fds

    def wait_readable(self) -> None:
        """Block until something can be read (bounded by :meth:`settimeout`)."""
        if self._sock is None or self._eof:
            return
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self._sock.fileno(), select.POLLIN)
        timeout_ms = None if self._timeout_s is None else self._timeout_s * 1000
        if not self._poller.poll(timeout_ms):
            raise self._io_error("timed out waiting for data") from TimeoutError(
                f"nothing to read within {self._timeout_s} s")

    def _recvmsg(self, buffers: list) -> tuple[int, list[int]] | None:
        """One non-blocking read into ``buffers``, in order; None when nothing has arrived."""
        assert self._sock is not None
        try:
            if not self.supports_fds:
                return self._sock.recvmsg_into(buffers, 0, _MSG_DONTWAIT)[0], []
            start = time.monotonic_ns()
            nbytes, ancdata, flags, _ = self._sock.recvmsg_into(buffers, _ANCBUF, _RECV_FLAGS)
        except BlockingIOError:
            return None
        return nbytes, self._claim_fds(ancdata, flags, start)

    def _claim_fds(self, ancdata: list[tuple[int, int, bytes]], flags: int, start_ns: int) -> list[int]:
        """The fds a read received (SCM_RIGHTS); a truncated control message is fatal,
        because the kernel has then dropped fds silently."""
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                usable = len(payload) - len(payload) % _FD_SIZE
                fds.extend(array.array("i", payload[:usable]))
        if fds and self.timeline is not None:
            self.timeline.add("fds-received", start_ns, time.monotonic_ns())
        if flags & _MSG_CTRUNC:
            close_fds(fds)
            raise ChannelError(f"{self.name}: control message truncated, fds were lost")
        return fds

    def read_into(self, buffer: memoryview, block: bool = True) -> tuple[int, list[int]] | None:
        """What has arrived, written into ``buffer``: how many bytes, and the fds with them.

        ``buffer`` is a writable byte view a reader lends (as asyncio's
        BufferedProtocol.get_buffer does), so that bulk data goes from the
        kernel straight into the reader's buffer, with no copy in between.
        Bytes and fds the channel already holds come first, without a read.
        The caller owns the fds returned. ``(0, [])`` means end of stream;
        without ``block``, None when nothing has arrived.
        """
        if not self.holds_input:
            return self._receive_into(buffer, block)
        nbytes = min(len(buffer), len(self._rbuf) - self._rpos)
        buffer[:nbytes] = self._rbuf[self._rpos:self._rpos + nbytes]
        self._rpos += nbytes
        fds = list(self._rfds)
        self._rfds.clear()
        return nbytes, fds

    @property
    def holds_input(self) -> bool:
        """Whether bytes or fds already read from the kernel wait here for a reader."""
        return self._rpos != len(self._rbuf) or bool(self._rfds)

    def read_into_iovec(self, iov: np.ndarray) -> tuple[int, list[int]] | None:
        """One read from the kernel, without waiting, into the memory an (n, 2) iovec
        array names, in order, as far as the bytes go (guest RAM pages between record
        words, say): how many bytes, and the fds with them; None when nothing has
        arrived, ``(0, [])`` at the end of the stream. Only when the channel holds
        nothing (:attr:`holds_input`): no byte may pass the ones held. The caller
        keeps that memory alive and mapped until this returns.
        """
        if self.holds_input:
            raise ChannelError(f"{self.name}: bytes read before wait for a reader")
        self._check_open()
        if self._eof:
            return 0, []
        count = min(len(iov), IOV_MAX)
        fds: list[int] = []
        start = time.monotonic_ns()
        while True:
            if self._sock is None:
                nbytes = _libc_readv(self._file.fileno(), iov.ctypes.data, count)  # type: ignore[union-attr]
            else:
                hdr = _MsgHdr(None, 0, iov.ctypes.data, count, ctypes.addressof(self._control),
                              len(self._control) if self.supports_fds else 0, 0)
                nbytes = _libc_recvmsg(self._sock.fileno(), ctypes.byref(hdr), _RECV_FLAGS)
            if nbytes >= 0:
                break
            err = ctypes.get_errno()
            if err == errno.EINTR:
                continue
            if err in (errno.EAGAIN, errno.EWOULDBLOCK):
                return None
            raise self._io_error(f"read failed: {os.strerror(err)}") from OSError(err, os.strerror(err))
        if self._sock is not None:
            fds = self._claim_fds(_cmsgs(self._control.raw[:hdr.msg_controllen]), hdr.msg_flags, start)
        return self._received(nbytes, fds)

    def read_into_buffers(self, buffers: Sequence[memoryview]) -> None:
        """Fill every one of ``buffers`` (writable byte views), in order, with the next bytes.

        For bytes whose place is known before they arrive, e.g. a packet's
        pages and views of guest RAM: one recvmsg_into takes up to
        :data:`IOV_MAX` of them, nothing is copied on the way. Bytes the
        channel holds already come first; fds that arrive meanwhile queue for
        the next :meth:`read_into`. The end of the stream before they are full
        is a :class:`ChannelBrokenError`.
        """
        views = [b for b in buffers if len(b)]
        first = 0
        while first < len(views) and self._rpos < len(self._rbuf):
            n = min(len(views[first]), len(self._rbuf) - self._rpos)
            views[first][:n] = self._rbuf[self._rpos:self._rpos + n]
            self._rpos += n
            views[first] = views[first][n:]
            first += not len(views[first])
        while first < len(views):
            self._check_open()
            chunk = views[first:first + IOV_MAX]
            try:
                if self._sock is None:
                    assert self._file is not None
                    nbytes, fds = os.readv(self._file.fileno(), chunk), []
                else:
                    got = self._recvmsg(chunk)
                    while got is None:
                        self.wait_readable()
                        got = self._recvmsg(chunk)
                    nbytes, fds = got
            except TimeoutError as exc:
                raise self._io_error("timed out waiting for data") from exc
            except OSError as exc:
                raise self._io_error(f"read failed: {exc.strerror or exc}") from exc
            self._rfds.extend(fds)
            self.fds_received += len(fds)
            if not nbytes:
                self._eof = True
                missing = sum(map(len, views[first:]))
                raise self._io_error(f"end of stream, {missing} more bytes expected")
            self.bytes_received += nbytes
            # Skip the buffers the read filled, cut the one it filled in part.
            while nbytes:
                n = min(nbytes, len(views[first]))
                views[first] = views[first][n:]
                nbytes -= n
                first += not len(views[first])
            if len(self._rfds) > MAX_QUEUED_FDS:
                raise ChannelError(f"{self.name}: more than {MAX_QUEUED_FDS} fds received and not claimed")

    def read_chunk(self, block: bool = True) -> tuple[bytes | memoryview, list[int]] | None:
        """What has arrived: buffered bytes and queued fds, reading once if there are none.

        The caller owns the fds returned. The bytes may be a view of the
        channel's read buffer, valid until the next read: consume or copy
        them first (StreamReader.receive_data copies). ``(b"", [])`` means end
        of stream. Without ``block``, None when nothing has arrived: a reader
        can take everything the kernel holds (one call per message that
        carried fds) before it parses.
        """
        if self._rpos == len(self._rbuf) and not self._rfds:
            return self._receive(block)
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
