"""The KVM guest: its committed bytes are its source assembled, and its cpu section round-trips."""

from __future__ import annotations

import shutil

import pytest

from migfd.accel.guest_code import GUEST_CODE, SOURCE, assemble
from migfd.accel.vcpu import CPU_VMSD
from migfd.layout import GUEST_CODE_MAX_BYTES, MAILBOX_ADDR, MB_TSC_PER_PAGE
from migfd.stream import MemorySink
from migfd.stream.vmstate import Cursor, load_vmstate, save_vmstate

pytestmark = pytest.mark.unit


@pytest.mark.skipif(shutil.which("as") is None or shutil.which("objcopy") is None,
                    reason="needs GNU as and objcopy (binutils) to assemble guest.S")
def test_committed_guest_code_is_guest_s_assembled():
    assert assemble() == GUEST_CODE, ("guest.S and GUEST_CODE differ: "
                                      "python -m migfd.accel.guest_code --assemble")


def test_guest_code_fits_and_follows_the_layout():
    assert len(GUEST_CODE) <= GUEST_CODE_MAX_BYTES
    # guest.S spells the mailbox out again: its constants must be migfd.layout's
    text = SOURCE.read_text()
    assert f".set MAILBOX,          {MAILBOX_ADDR:#x}" in text
    assert f".set MB_TSC_PER_PAGE,  MAILBOX + {MB_TSC_PER_PAGE:#04x}" in text


def test_cpu_section_round_trips():
    state = {name: i + 1 for i, name in enumerate(
        ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "rip", "rflags", "cr0", "cr3", "cr4", "efer"))}
    state["tsc"] = 1 << 40
    for seg in ("cs", "ds", "es", "fs", "gs", "ss"):
        state.update({f"{seg}_selector": 0x2B, f"{seg}_base": 0, f"{seg}_limit": 0xFFFFFFFF,
                      f"{seg}_flags": 0xA0FB00})
    sink = MemorySink()
    save_vmstate(sink, CPU_VMSD, state)
    data = sink.getvalue()
    assert len(data) == 15 * 8 + 6 * (4 + 8 + 4 + 4)
    # a footer after the fields, as in a stream: the loader looks for subsections there
    assert load_vmstate(Cursor(data + b"\x7e"), CPU_VMSD, CPU_VMSD.version_id) == state
