"""The guest-physical layout every migfd guest follows, under every accelerator.

This is the contract between the VM (its accelerators and its RAM device)
and whoever watches a guest from outside: an observer that maps the memfd
through ``/proc/PID/fd`` reads :data:`GUEST_PROGRESS_ADDR` at that offset of
the file. Guest physical address == offset in the first memory backend.

::

    0x00000 +------------------------------+  "firmware": set up by the VMM
            | 0x01000  guest code (kvm)    |
            | 0x06000  mailbox             |  parameters VMM -> guest, per-vCPU state
            | 0x07000  guest progress u32  |  little-endian, bumped while the guest runs
            | 0x08000  vCPU stacks         |
    0x10000 +------------------------------+  FIRMWARE_BYTES
            | generation table             |  one u32 per page of the backend
            +------------------------------+  first data page
            | data pages (stamped)         |
            +------------------------------+

The progress counter sits at the address the counting guest for real QEMU in
the design notes uses (0x7000), so one observer reads both.
"""

from __future__ import annotations

#: bytes of a guest page, of the dirty log and of the migration's page records
PAGE_BYTES = 4096
#: the reserved area at the start of guest RAM: code, mailbox, counter, stacks
FIRMWARE_BYTES = 0x10000
FIRMWARE_PAGES = FIRMWARE_BYTES // PAGE_BYTES
#: where the guest's little-endian u32 progress counter lives (guest physical = memfd offset)
GUEST_PROGRESS_ADDR = 0x7000
#: where the KVM guest's code is loaded and starts
GUEST_CODE_ADDR = 0x1000
GUEST_CODE_MAX_BYTES = 0x5000
#: the mailbox: parameters the VMM writes, and per-vCPU state the guest keeps
MAILBOX_ADDR = 0x6000
#: per-vCPU counters, one u32 each from here (vCPU i at + 4 * i); 0x7000 itself sums them all
VCPU_PROGRESS_ADDR = 0x7100
#: top of vCPU 0's stack; vCPU i's is ``STACK_TOP - i * STACK_BYTES``
STACK_TOP = 0x10000
STACK_BYTES = 0x400
#: the most vCPUs the firmware area has room for (stacks from 0x8000 to 0x10000)
MAX_VCPUS = (STACK_TOP - 0x8000) // STACK_BYTES
#: where the generation table of the page stamps starts (offset in every memory backend)
TABLE_ADDR = FIRMWARE_BYTES


def table_pages(npages: int) -> int:
    """Pages of the generation table of a backend of ``npages`` pages (a u32 per page)."""
    return (npages * 4 + PAGE_BYTES - 1) // PAGE_BYTES


def first_data_page(npages: int) -> int:
    """The first page a guest stamps: after the firmware area and the generation table."""
    return FIRMWARE_PAGES + table_pages(npages)
