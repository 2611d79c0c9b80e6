"""Cutting a byte stream into JSON values where each one ends, as QEMU's json-streamer does.

The QMP server feeds it what a client sends; it finds the boundaries of the
values only, and :func:`json.loads` judges each one.
"""

from __future__ import annotations

import re

__all__ = ["JSONStreamSplitter", "ValueTooLongError"]


class ValueTooLongError(Exception):
    """A value grew longer than the splitter's bound (the message says by how much)."""


# Outside strings only these bytes change the nesting; inside a string only
# the quote and the backslash matter.  Regexes skip everything else in C.
_STRUCTURAL = re.compile(rb'[{}\[\]"]')
_STRING_SPECIAL = re.compile(rb'["\\]')
_NOT_WHITESPACE = re.compile(rb"[^ \t\r\n]")
_SCALAR_END = re.compile(rb'[ \t\r\n{}\[\]",:]')


class JSONStreamSplitter:
    """Cut a byte stream into JSON values, the way QEMU's json-streamer does.

    QEMU does not frame requests by lines: a request ends where its braces
    and brackets balance, outside strings (qemu.qmp sends no newline at all).
    Whitespace between values is skipped, so the ' ' byte that carries an
    fd with SCM_RIGHTS is harmless.  A top-level scalar ends at whitespace
    or punctuation.  This only finds the boundaries; json.loads judges the
    value.  A value longer than ``max_value_bytes`` raises
    :class:`ValueTooLongError`: the stream cannot be resynchronised after it.
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
        """Add bytes received; :meth:`next_value` cuts them."""
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
            raise ValueTooLongError(f"JSON parse error, request longer than {self._max} bytes")
        del buf[: self._start]
        self._pos -= self._start
        self._start = 0
        return None

    def _cut(self, end: int) -> bytes:
        assert self._start is not None
        if end - self._start > self._max:
            raise ValueTooLongError(f"JSON parse error, request longer than {self._max} bytes")
        value = bytes(self._buffer[self._start : end])
        self._start = None
        self._pos = end
        self._depth = 0
        return value
