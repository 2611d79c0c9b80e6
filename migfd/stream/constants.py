"""Numbers of QEMU's migration stream (migration/savevm.c, migration/ram.c)."""

from __future__ import annotations

import enum

QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION = 3

#: The byte that carries one fd as SCM_RIGHTS (qemu_file_put_fd).
FD_SERVICE_BYTE = 0x20

TARGET_PAGE_SIZE = 4096
TARGET_PAGE_BITS = 12


class SectionType(enum.IntEnum):
    """First byte of every top-level record of the stream."""

    EOF = 0x00  #: end of device state; the vmdesc may follow
    START = 0x01  #: first part of an iterable section (header with name)
    PART = 0x02  #: one more part of an iterable section (id only)
    END = 0x03  #: last part of an iterable section (id only)
    FULL = 0x04  #: a whole non-iterable device section
    SUBSECTION = 0x05  #: optional part of a vmstate, after the fields
    VMDESCRIPTION = 0x06  #: JSON description of the devices, after EOF
    CONFIGURATION = 0x07  #: machine type and capabilities, after the header
    COMMAND = 0x08  #: out-of-band command (return path, ping, switchover)
    SECTION_FOOTER = 0x7E  #: closes START/PART/END/FULL with the section id


class Command(enum.IntEnum):
    """QEMU's MIG_CMD_* numbers (be16 on the wire), enum qemu_vm_cmd of migration/savevm.c."""

    OPEN_RETURN_PATH = 1  #: the destination opens its return path
    PING = 2  #: be32 value, answered by PONG on the return path
    POSTCOPY_ADVISE = 3  #: postcopy may follow (page sizes)
    POSTCOPY_LISTEN = 4  #: the destination starts listening for page requests
    POSTCOPY_RUN = 5  #: the destination runs the guest
    POSTCOPY_RAM_DISCARD = 6  #: pages sent in precopy that are dirty again
    PACKAGED = 7  #: be32 length, then a whole stream wrapped in this one
    ENABLE_COLO = 8  #: COLO fault tolerance follows
    POSTCOPY_RESUME = 9  #: postcopy resumes after a recovery
    RECV_BITMAP = 10  #: the source asks for the received-pages bitmap
    SWITCHOVER_START = 11  #: the source is about to send the final state


def command_name(command: int) -> str:
    """QEMU's name of a MIG_CMD number (without MIG_CMD_), or the number for one QEMU does not have."""
    try:
        return Command(command).name
    except ValueError:
        return str(command)


#: Payload length of each command migfd acts on; migfd sends and answers no others.
COMMAND_LENGTH = {
    Command.OPEN_RETURN_PATH: 0,
    Command.PING: 4,
    Command.SWITCHOVER_START: 0,
}


class ReturnPathMessage(enum.IntEnum):
    """QEMU's MIG_RP_MSG_* numbers: destination to source, be16 type + be16 len."""

    SHUT = 1  #: be32 status: 0 loaded everything, else failed
    PONG = 3  #: be32 value of the PING it answers


# migration/ram.c: flags in the low bits of each be64 page record.
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200
#: migfd-only: the record is a multifd-style packet (migfd.stream.multifd). QEMU
#: keeps its flags at or below 0x200 (1 KiB target pages), so it never sends it.
RAM_SAVE_FLAG_X_PACKET = 0x400
#: the migfd capability under which RAM goes in such packets
X_MULTIFD_PACKETS = "x-multifd-packets"

RAM_SECTION_NAME = "ram"
RAM_SECTION_VERSION = 4
