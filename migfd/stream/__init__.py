"""Sans-IO codec of QEMU's migration stream (version 3), with fd records.

``StreamWriter`` turns records into bytes and fds for a sink;
``StreamReader`` turns received bytes and fds into events. No sockets here:
:mod:`migfd.channel` moves the bytes and fds.
"""

from migfd.errors import StreamError
from migfd.stream.constants import (
    FD_SERVICE_BYTE,
    TARGET_PAGE_SIZE,
    Command,
    ReturnPathMessage,
    SectionType,
)
from migfd.stream.events import (
    NEED_DATA,
    CommandRecord,
    Configuration,
    EndOfState,
    Event,
    Header,
    RamMemSize,
    RamPage,
    RamPageRun,
    RamPacket,
    RamPacketPages,
    SectionFooter,
    SectionFull,
    SectionHeader,
    SectionOpaque,
    VMDescription,
)
from migfd.stream.compiled import compile_vmsd
from migfd.stream.ram import PageBatch, RamBlock
from migfd.stream.reader import StreamReader
from migfd.stream.vmstate import (
    Bool,
    Buffer,
    Fd,
    Field,
    Int,
    Int8,
    Int16,
    Int32,
    Int64,
    List,
    Struct,
    Subsection,
    UInt8,
    UInt16,
    UInt32,
    UInt64,
    VArray,
    VBuffer,
    VMStateDescription,
    vmsd_from_vmdesc,
)
from migfd.stream.writer import FdRecord, MemorySink, StreamWriter

__all__ = [
    "FD_SERVICE_BYTE", "NEED_DATA", "TARGET_PAGE_SIZE",
    "Bool", "Buffer", "Command", "CommandRecord", "Configuration", "EndOfState",
    "Event", "Fd", "FdRecord", "Field", "Header", "Int", "Int8", "Int16", "Int32", "Int64",
    "List", "MemorySink", "PageBatch", "RamBlock", "RamMemSize", "RamPage", "RamPageRun", "RamPacket", "RamPacketPages",
    "ReturnPathMessage",
    "SectionFooter", "SectionFull", "SectionHeader", "SectionOpaque", "SectionType", "StreamError",
    "StreamReader", "StreamWriter", "Struct", "Subsection", "UInt8", "UInt16", "UInt32",
    "UInt64", "VArray", "VBuffer", "VMDescription", "VMStateDescription", "compile_vmsd", "vmsd_from_vmdesc",
]
