"""The guest-physical layout every migfd guest follows, under every accelerator.

This is the contract between the VM (its accelerators and its RAM device)
and whoever watches a guest from outside: an observer that maps the memfd
through ``/proc/PID/fd`` reads :data:`GUEST_PROGRESS_ADDR` at that offset of
the file. Guest physical address == offset in the first memory backend.

::

    0x00000 +------------------------------+  "firmware": set up by the VMM
            | 0x01000  guest code (kvm)    |
            | 0x02000  page tables (kvm)   |  PML4, PDPT; the 4 page directories at 0x8000
            | 0x06000  mailbox             |  parameters VMM -> guest, per-vCPU state
            | 0x07000  guest progress u32  |  little-endian, bumped while the guest runs
            | 0x0C000  vCPU stacks         |
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
GUEST_CODE_MAX_BYTES = 0x1000
#: the KVM guest's identity page tables: PML4, PDPT, and four page directories of
#: 2 MiB pages that map the first 4 GiB (guest virtual = guest physical)
PML4_ADDR = 0x2000
PDPT_ADDR = 0x3000
PD_ADDR = 0x8000
PD_COUNT = 4
#: the port the KVM guest writes to when its duty cycle asks the VMM to idle
IDLE_PORT = 0x510
#: the mailbox: parameters the VMM writes, and per-vCPU state the guest keeps
MAILBOX_ADDR = 0x6000
#: mailbox fields (offsets from MAILBOX_ADDR; migfd/accel/guest.S reads the same)
MB_MAGIC = 0x00          #: u32 MAILBOX_MAGIC once the VMM has set the guest up
MB_NCPUS = 0x04          #: u32 vCPUs
MB_WS_FIRST = 0x08       #: u32 first page of the working set
MB_WS_PAGES = 0x0C       #: u32 pages in the working set
MB_TSC_PER_PAGE = 0x10   #: u64 TSC cycles between two stamps of one vCPU (0: no dirtying)
MB_BUSY_TSC = 0x18       #: u64 TSC cycles a vCPU runs before it halts (0: never halts)
MB_CATCHUP_TSC = 0x20    #: u32 how far behind a vCPU still catches up on stamps
MAILBOX_MAGIC = 0x4446474D  # "MGFD"
#: per-vCPU blocks of the mailbox: vCPU i's at MAILBOX_ADDR + PERCPU_OFFSET + i * PERCPU_BYTES
PERCPU_OFFSET = 0x100
PERCPU_BYTES = 0x40
C_CURSOR = 0x00          #: u32 its next page, relative to the working set
C_INFLIGHT = 0x04        #: u32 the page being stamped + 1 (0: none): a stop may catch it half-written
C_NEXT = 0x08            #: u64 TSC when its next stamp is due
C_BUSY_END = 0x10        #: u64 TSC when its busy part ends
C_DIRTIED = 0x18         #: u64 pages it stamped
C_IDLES = 0x20           #: u32 idle requests it made (duty cycle)
#: per-vCPU counters, one u32 each from here (vCPU i at + 4 * i); 0x7000 itself sums them all
VCPU_PROGRESS_ADDR = 0x7100
#: top of vCPU 0's stack; vCPU i's is ``STACK_TOP - i * STACK_BYTES``
STACK_TOP = 0x10000
STACK_BYTES = 0x400
#: the most vCPUs the firmware area has room for (stacks from 0xC000 to 0x10000)
MAX_VCPUS = (STACK_TOP - 0xC000) // STACK_BYTES
#: where the generation table of the page stamps starts (offset in every memory backend)
TABLE_ADDR = FIRMWARE_BYTES


def percpu_addr(index: int) -> int:
    """Guest-physical address of vCPU ``index``'s block of the mailbox."""
    return MAILBOX_ADDR + PERCPU_OFFSET + index * PERCPU_BYTES


def table_pages(npages: int) -> int:
    """Pages of the generation table of a backend of ``npages`` pages (a u32 per page)."""
    return (npages * 4 + PAGE_BYTES - 1) // PAGE_BYTES


def first_data_page(npages: int) -> int:
    """The first page a guest stamps: after the firmware area and the generation table."""
    return FIRMWARE_PAGES + table_pages(npages)
