"""Delimiting a section whose fields migfd cannot read: its footer, told apart by what follows it.

A device section carries no length: only the footer (0x7e + be32 section id)
ends it, and the payload may hold those five bytes as well (a register that
happens to read 0x7e000000xx). QEMU's loader never searches, because it knows
the fields; scripts/analyze-migration.py needs the vmdesc for the same reason.
Without either, :func:`find_footer` takes the *first* candidate footer after
which the stream goes on plausibly (:func:`follows_footer`): the next record
must be one that may come after a section --

- START/FULL: an id no START or FULL used before (QEMU numbers its
  SaveStateEntries as they register but sends iterable ones first and all by
  priority, so ids need not increase: ``timer``, id 0, follows RAM's
  sections), a name of 1-255 printable ASCII characters, then instance and
  version id;
- PART/END: the id of an iterable section that started and has not ended;
- COMMAND: a MIG_CMD number QEMU knows (with its length, for those migfd acts on);
- EOF: then either the end of the stream or 0x06, a be32 length within the
  vmdesc bound and the '{' that opens the JSON.

Residual ambiguity: a payload that holds its own footer *and* right after it
bytes that read as such a record is cut there. The bytes after the false
footer then parse as that record, and the stream usually fails a few bytes
later (its footer must be found in turn) with a StreamError; it can only be
misread silently if the payload's tail is itself a well-formed run of records.
Nothing in the stream can rule that out; a vmdesc (or the device's vmsd) can.

The search stops at the caller's bound and, across retries as bytes arrive,
never judges a candidate again once the bytes after it settled it, so a
hostile stream costs one pass over at most that many bytes.
"""

from __future__ import annotations

import struct
from typing import Callable

from migfd.stream.constants import COMMAND_LENGTH, Command, SectionType
from migfd.stream.writer import section_footer

#: The most bytes after a footer that a verdict needs: START/FULL with a 255-byte name.
LOOKAHEAD_BYTES = 1 + 4 + 1 + 255 + 4 + 4

# Plain ints: this runs once per candidate footer, up to millions of times in a hostile stream.
_EOF, _START, _PART, _END, _FULL, _COMMAND, _VMDESCRIPTION = (int(t) for t in (
    SectionType.EOF, SectionType.START, SectionType.PART, SectionType.END, SectionType.FULL,
    SectionType.COMMAND, SectionType.VMDESCRIPTION))
#: the first bytes of the records that may follow a footer
_MAY_FOLLOW = bytes([_EOF, _START, _PART, _END, _FULL, _COMMAND])
_NAMED = (SectionType.START, SectionType.FULL)
_PRINTABLE = bytes(range(0x20, 0x7F))
_COMMANDS = frozenset(int(c) for c in Command)
_JSON_OBJECT = ord("{")


class Undecided(Exception):
    """The bytes received so far end before a footer was told apart; resume the search at ``resume``."""

    def __init__(self, resume: int):
        super().__init__(resume)
        self.resume = resume


class NoFooterWithin(Exception):
    """No candidate footer within the bound: the section is larger than a record may be."""


class SectionIds:
    """The section ids a stream has used so far: what a record after a footer may refer to."""

    def __init__(self) -> None:
        self.used: set[int] = set()  #: ids of every START and FULL
        self.open: set[int] = set()  #: ids of iterable sections started and not ended

    def note(self, kind: SectionType, section_id: int) -> None:
        """A START, PART, END or FULL of ``section_id`` has been read."""
        if kind == _FULL:  # the most frequent, on every device section (a plain int: see above)
            self.used.add(section_id)
        elif kind is SectionType.START:
            self.used.add(section_id)
            self.open.add(section_id)
        elif kind is SectionType.END:
            self.open.discard(section_id)


def follows_footer(buf: bytes | bytearray, at: int, *, section: tuple[SectionType, int], ids: SectionIds,
                   end_of_stream: bool, max_vmdesc_bytes: int) -> bool | None:
    """Whether ``buf[at:]`` opens a record that may follow the footer of ``section`` (type, id).

    ``ids`` are as they stand before that section. None when the bytes
    received cannot tell yet; once the stream has ended, bytes that are
    missing make the answer False (except EOF as the last byte, which is how
    a stream without vmdesc ends).
    """
    kind_before, id_before = section
    avail = len(buf) - at
    short = False if end_of_stream else None  # the answer while bytes are missing
    if avail < 1:
        return short
    kind = buf[at]
    if kind == _EOF:
        if avail == 1:
            return True if end_of_stream else None
        if buf[at + 1] != _VMDESCRIPTION:
            return False
        if avail < 7:
            return short
        (length,) = struct.unpack_from(">I", buf, at + 2)
        return 0 < length <= max_vmdesc_bytes and buf[at + 6] == _JSON_OBJECT
    if kind == _START or kind == _FULL:
        if avail < 6:
            return short
        (section_id,) = struct.unpack_from(">I", buf, at + 1)
        n = buf[at + 5]
        if section_id in ids.used or n == 0 or (section_id == id_before and kind_before in _NAMED):
            return False
        # Judge the name by the characters that did arrive.
        if bytes(buf[at + 6:at + 6 + n]).translate(None, _PRINTABLE):
            return False
        return short if avail < 6 + n + 8 else True
    if kind == _PART or kind == _END:
        if avail < 5:
            return short
        (section_id,) = struct.unpack_from(">I", buf, at + 1)
        if section_id == id_before and kind_before is not SectionType.FULL:
            return kind_before is not SectionType.END
        return section_id in ids.open
    if kind == _COMMAND:
        if avail < 5:
            return short
        command, length = struct.unpack_from(">HH", buf, at + 1)
        if command not in _COMMANDS:
            return False
        expected = COMMAND_LENGTH.get(command)  # type: ignore[call-overload]
        return expected is None or length == expected
    return False


def find_footer(buf: bytes | bytearray, start: int, stop: int, section_id: int,
                follows: Callable[[int], bool | None]) -> int:
    """Index of the first footer of ``section_id`` in ``buf[start:stop]`` that ``follows`` accepts.

    ``follows(i)`` judges the bytes from index ``i`` (right after a candidate).
    Raises :class:`Undecided` when the received bytes end first (with the
    index to resume from: nothing before it needs looking at again), and
    :class:`NoFooterWithin` when ``buf`` reaches ``stop`` without one.
    """
    pattern = section_footer(section_id)
    at = start
    while True:
        found = buf.find(pattern, at, stop)
        if found < 0:
            if len(buf) >= stop:
                raise NoFooterWithin()
            # A footer may straddle the end of what arrived: look at its start again.
            raise Undecided(max(at, len(buf) - len(pattern) + 1))
        after = found + len(pattern)
        if after < len(buf) and buf[after] not in _MAY_FOLLOW:
            at = found + 1  # the common case, judged without a call
            continue
        verdict = follows(after)
        if verdict is None:
            raise Undecided(found)
        if verdict:
            return found
        at = found + 1
