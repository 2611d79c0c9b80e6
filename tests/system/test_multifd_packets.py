"""x-multifd-packets between real ``migfd vm`` processes: RAM in packets, received straight into guest RAM.

A state copy with packets must leave the destination's RAM exactly the
source's (the guest's stamps verify); a source and a destination that
disagree on the capability fail at once with the source running on; a bad or
cut-short packet fails the destination with one clear error and no memfd left
open.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import connect_as_source, memfd_inodes, run_vm_test, wait_until

from migfd.channel import QEMUFile
from migfd.layout import first_data_page
from migfd.params import MigrationParameters
from migfd.peers.migrate import migrate
from migfd.stream import MemorySink, PageBatch, RamBlock, StreamWriter
from migfd.stream.multifd import header_bytes

pytestmark = pytest.mark.timeout(120)

RAM_MIB = 32
PAGE = 4096


def ram_opt(size_mib: int = RAM_MIB) -> str:
    return f"memory-backend-memfd,id=ram0,size={size_mib}M,fill=on"


async def verify_ram(vm) -> dict:
    return (await vm.execute("x-query-guest", {"verify": True}))["ram-verify"]["ram0"]


@pytest.mark.parametrize("live", [False, True], ids=["non-live", "live"])
def test_state_copy_in_packets_leaves_the_same_ram(vms, live):
    """Non-live: one END of packets, each a view of RAM. Live: precopy passes too, with the
    guest dirtying scattered pages (packets of pages that are not neighbours)."""
    async def body():
        dirty = (4 << 20) if live else 0
        src = await vms.start("src", objects=(ram_opt(),), dirty_rate_bytes_s=dirty)
        dst = await vms.start("dst", objects=(ram_opt(),), incoming="defer")
        params = {"x-multifd-packets": True}
        if not live:
            params["x-max-iterations"] = 0
        result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}", params, timeout_s=60)
        assert result.ok, result.error
        s, d = result.source, result.destination
        assert s["status"] == d["status"] == "completed"
        ram = await verify_ram(dst)
        assert ram["ok"] and ram["bad-pages"] == 0
        pages = RAM_MIB * 256
        assert ram["pages-stamped"] == pages - first_data_page(pages)
        assert d["ram"]["normal"] == s["ram"]["normal"] > 0
        assert d["ram"]["duplicate"] == s["ram"]["duplicate"]
        assert (await dst.execute("query-status"))["status"] == "running"

    run_vm_test(vms, body)


@pytest.mark.parametrize("source_on", [True, False], ids=["source-on", "destination-on"])
def test_a_capability_mismatch_fails_and_the_source_runs_on(vms, source_on):
    async def body():
        src = await vms.start("src", objects=(ram_opt(16),), dirty_rate_bytes_s=1 << 20)
        dst = await vms.start("dst", objects=(ram_opt(16),), incoming="defer")
        src_memfds = memfd_inodes(src.pid)
        await src.execute("migrate-set-parameters", {"x-multifd-packets": source_on})
        await dst.execute("migrate-set-parameters", {"x-multifd-packets": not source_on})
        uri = f"unix:{vms.path('mig.sock')}"
        await dst.execute("migrate-incoming", {"uri": uri})
        await src.execute("migrate", {"uri": uri})
        s = await src.wait_migration(30)
        d = await dst.wait_migration(30)
        assert s["status"] == "failed" and d["status"] == "failed"
        mine, theirs = ("on", "off") if source_on else ("off", "on")
        assert d["error-desc"] == (f"Capability 'x-multifd-packets' is {mine} on the source "
                                   f"but {theirs} on the destination")
        assert (await src.execute("query-status"))["status"] == "running"
        assert memfd_inodes(src.pid) == src_memfds
        ram = await verify_ram(src)
        assert ram["ok"] and ram["bad-pages"] == 0
        await wait_until(lambda: not memfd_inodes(dst.pid), what="destination closing its RAM")

    run_vm_test(vms, body)


def _packet_stream(f: QEMUFile | MemorySink, how: str) -> None:
    """A source (played by the test) with x-multifd-packets: setup, RAM START, then one PART
    whose packet is cut short (``truncated``) or numbered wrong (``bad-number``)."""
    w = StreamWriter(f)
    w.write_header()
    w.write_configuration("migfd-pc", MigrationParameters(x_multifd_packets=True).capabilities())
    w.write_ram_start([RamBlock("ram0", 1 << 20)])
    rows = np.full((4, PAGE), 0x42, dtype=np.uint8)
    batch = PageBatch("ram0", np.arange(4, dtype=np.uint64) * PAGE, rows)
    if how == "bad-number":
        w._packets_sent = 3  # the first packet says it is the fourth
    w.write_ram_part([batch])
    if isinstance(f, QEMUFile):
        f.flush()


@pytest.mark.parametrize("how", ["truncated", "bad-number"])
def test_a_bad_packet_fails_the_destination_and_closes_its_ram(vms, thread_accel, how):
    async def body():
        dst, f = await connect_as_source(vms, ("memory-backend-memfd,id=ram0,size=1M",),
                                         {"x-multifd-packets": True})
        try:
            if how == "truncated":
                # The header and one page and a half of four: then the source is gone.
                sink = MemorySink()
                _packet_stream(sink, "whole")
                data = sink.getvalue()
                cut = data.index(b"MFDP") - 8 + header_bytes(4) + PAGE + PAGE // 2
                f.put_buffer(data[:cut])
                f.flush()
            else:
                _packet_stream(f, how)
        finally:
            f.close()
        info = await dst.wait_migration(30)
        # Both errors come after the RAM START, where the destination made the memfd the pages go to.
        assert info["status"] == "failed"
        # Cut short: found by the reader when the pages came with the header, else by the
        # channel while it receives them into RAM; which one is up to the kernel's timing.
        expected = {"truncated": rf"stream truncated in section 'ram'|end of stream, {2 * PAGE + PAGE // 2} "
                                 "more bytes expected",
                    "bad-number": "packet number 3, expected 0"}[how]
        assert re.search(expected, info["error-desc"]), info["error-desc"]
        assert (await dst.execute("query-status"))["status"] == "inmigrate"
        await wait_until(lambda: not memfd_inodes(dst.pid), what="destination closing its RAM")

    run_vm_test(vms, body)
