"""A guest on KVM: vCPUs that start, run, stop, resume and migrate, with KVM's dirty log feeding precopy.

The guest is machine code on real vCPUs (migfd.accel): what is checked is
what an outsider sees -- the guest-progress counter read from the memfd
through /proc/PID/fd, as an observer reads it; RAM stamped by the guest's
code and verified page by page on the side that runs; the pages KVM's dirty
log hands to a migration -- plus the thread accelerator and the fallback to
it, which must stay as honest. Tests that need KVM skip where /dev/kvm does
not work.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import memfd_inodes, needs_kvm, needs_root, run_vm_test, wait_until
from qemu.qmp import QMPClient

from migfd.accel.base import GuestConfig
from migfd.accel.vcpu import KvmAccelerator
from migfd.devices.base import RunControl
from migfd.devices.memfd import PAGE, MemoryBackendMemfd
from migfd.layout import GUEST_PROGRESS_ADDR, MAILBOX_ADDR, TABLE_ADDR, VCPU_PROGRESS_ADDR, first_data_page
from migfd.peers.migrate import migrate
from migfd.peers.process import VMProcess, quit_over_qmp

pytestmark = pytest.mark.timeout(120)

RAM_MIB = 32
DATA_PAGES = RAM_MIB * 256 - first_data_page(RAM_MIB * 256)


def ram_opt(transfer: bool = True) -> str:
    return (f"memory-backend-memfd,id=ram0,size={RAM_MIB}M,fill=on,"
            f"backend-transfer={'on' if transfer else 'off'}")


class ProgressCounter:
    """The guest-progress counter of a VM process, read from outside as an observer reads it:
    its memfd mapped through /proc/PID/fd (a mapping of our own, so it outlives the VM's)."""

    def __init__(self, pid: int):
        inode = next(iter(memfd_inodes(pid)))
        for name in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{name}"
            try:
                if os.readlink(path).startswith("/memfd:") and os.stat(path).st_ino == inode:
                    break
            except OSError:
                continue
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.map = mmap.mmap(fd, MAILBOX_ADDR + 2 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)

    def read(self, addr: int = GUEST_PROGRESS_ADDR) -> int:
        return int.from_bytes(self.map[addr:addr + 4], "little")

    def close(self) -> None:
        self.map.close()


async def guest(vm) -> dict:
    return await vm.execute("x-query-guest")


async def stamped(vm) -> int:
    info = await guest(vm)
    return next(dev for dev in info["devices"] if dev["id"] == "ram0")["pages-dirtied"]


async def moves(counter: ProgressCounter, what: str) -> None:
    first = counter.read()
    await wait_until(lambda: counter.read() != first, what=what)


# -- in one process: the accelerator itself ---------------------------------------------------


@needs_kvm
def test_dirty_log_holds_every_page_the_guest_stamped():
    """Two vCPUs stamp RAM; each page whose generation changed while the log was on is in it."""
    fds_before = set(os.listdir("/proc/self/fd"))
    ram = MemoryBackendMemfd("ram0", 16 << 20)
    ram.open_backend()
    accel = KvmAccelerator(GuestConfig(smp=2, dirty_rate_bytes_s=16 << 20, duty=0.5))
    ctl = RunControl()
    try:
        cpus = accel.attach([ram])
        assert [c.section_key for c in cpus] == ["cpu", "cpu:1"]
        accel.setup_firmware()
        accel.start(ctl)
        ctl.resume()
        _wait(lambda: ram.guest_stamps() > 0, "the guest stamping pages")
        ram.start_dirty_log()
        ram.sync_dirty_bitmap()  # every page: from here on only what KVM logs
        ctl.pause()
        table = _table(ram).copy()
        stamps = ram.guest_stamps()
        ctl.resume()
        _wait(lambda: ram.guest_stamps() > stamps + 200, "200 more stamps")
        ctl.pause()
        changed = set(np.flatnonzero(_table(ram) != table).tolist())
        logged = set(ram.sync_dirty_bitmap().tolist())
        assert changed, "the guest stamped nothing while the log was on"
        assert changed <= logged, f"stamped but not logged: {sorted(changed - logged)[:10]}"
        # the generation table's pages too (the stamps wrote it), and the counter's
        assert {TABLE_ADDR // PAGE + page * 4 // PAGE for page in changed} <= logged
        assert GUEST_PROGRESS_ADDR // PAGE in logged
        assert ram.dirty_log.info()["pages-logged"] >= len(changed)
        # both vCPUs ran their share, and a stop left each with registers to migrate
        assert all(accel.info()["vcpus"][i]["progress"] > 0 for i in range(2))
        for cpu in cpus:
            state = cpu.save_state(handover=False)
            assert state["cs_flags"] >> 21 & 1, "not in 64-bit mode"
            assert state["rsi"] == cpu.instance_id
        report = ram.verify()
        assert report["ok"] and report["pages-stamped"] > 0, report
        ram.stop_dirty_log()
        ram.sync_dirty_bitmap()
        ctl.resume()
        _wait(lambda: ram.guest_stamps() > stamps + 400, "stamps after the log stopped")
        ctl.pause()
        assert ram.dirty_log.info()["active"] is False
        assert len(ram.sync_dirty_bitmap()) == 0, "a stopped log still reports pages"
    finally:
        ctl.close()
        accel.close()
        ram.close()
    assert set(os.listdir("/proc/self/fd")) == fds_before


def _table(ram: MemoryBackendMemfd) -> np.ndarray:
    return np.frombuffer(ram.map, dtype="<u4", count=ram.npages, offset=TABLE_ADDR)


def _wait(predicate, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.01)


# -- VM processes -----------------------------------------------------------------------------


@needs_kvm
def test_kvm_guest_starts_runs_stops_and_resumes(vms):
    async def body():
        vm = await vms.start("vm", objects=(ram_opt(),), dirty_rate_bytes_s=4 << 20)
        accel = (await guest(vm))["accel"]
        assert accel["name"] == "kvm" and "fallback-reason" not in accel, accel
        counter = ProgressCounter(vm.pid)
        try:
            await moves(counter, "the guest's progress counter")
            await wait_until(lambda: stamped(vm), what="the guest stamping pages")
            await vm.execute("stop")
            stopped = counter.read()
            per_vcpu = counter.read(VCPU_PROGRESS_ADDR)
            await asyncio.sleep(0.2)
            assert (counter.read(), counter.read(VCPU_PROGRESS_ADDR)) == (stopped, per_vcpu), \
                "a stopped guest runs"
            info = await guest(vm)
            assert info["status"] == "paused" and "error" not in info["accel"]["vcpus"][0]
            await vm.execute("cont")
            await moves(counter, "the counter after cont")
        finally:
            counter.close()
        ram = (await vm.execute("x-query-guest", {"verify": True}))["ram-verify"]["ram0"]
        assert ram["ok"] and ram["pages-stamped"] == DATA_PAGES, ram

    run_vm_test(vms, body)


@needs_kvm
@pytest.mark.parametrize("transfer", [True, False], ids=["backend-transfer", "state-copy"])
def test_kvm_guest_migrates_and_runs_on(vms, transfer):
    """Live migration of a KVM guest: its vCPUs' registers travel in the cpu sections, its RAM as
    the memfd (fd-passing) or as pages KVM's dirty log names (state copy); it runs on there."""
    async def body():
        rate = 16 << 20
        src = await vms.start("src", objects=(ram_opt(),), dirty_rate_bytes_s=rate)
        dst = await vms.start("dst", objects=(ram_opt(),), dirty_rate_bytes_s=rate, incoming="defer")
        await wait_until(lambda: stamped(src), what="the guest stamping pages")
        # a first pass of about 1 s for 32 MiB while the guest dirties pages under the log,
        # then passes until the third (downtime-limit 0 is never met: the counter's page is dirty)
        params = {"backend-transfer": transfer, "max-bandwidth": 32 << 20, "downtime-limit": 0,
                  "x-max-iterations": 3}
        result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}", params, timeout_s=60)
        assert result.ok, result.error
        s, d = result.source, result.destination
        # every page as the guest last stamped it (a page the log missed would be stale)
        ram = (await dst.execute("x-query-guest", {"verify": True}))["ram-verify"]["ram0"]
        assert ram["ok"] and ram["pages-stamped"] == DATA_PAGES, ram
        dst_info = await guest(dst)
        assert dst_info["accel"]["name"] == "kvm" and dst_info["status"] == "running"
        src_log = next(dev for dev in (await guest(src))["devices"] if dev["id"] == "ram0")["dirty-log"]
        if transfer:
            assert s["ram"]["transferred"] == 0
            assert src_log["pages-logged"] == 0 and not src_log["active"], "fd-passing needs no dirty log"
        else:
            assert s["ram"]["dirty-sync-count"] == 3
            assert src_log["source"].startswith("kvm") and src_log["pages-logged"] > 0, src_log
            assert d["ram"]["normal"] == s["ram"]["normal"]
        # the guest runs on where it arrived: its counter moves and it stamps more pages
        counter = ProgressCounter(dst.pid)
        try:
            await moves(counter, "the destination guest's progress counter")
        finally:
            counter.close()
        arrived = await stamped(dst)
        await wait_until(lambda: _more(dst, arrived), what="stamps on the destination")
        ram = (await dst.execute("x-query-guest", {"verify": True}))["ram-verify"]["ram0"]
        assert ram["ok"], ram

    run_vm_test(vms, body)


async def _more(vm, than: int) -> bool:
    return await stamped(vm) > than


def test_thread_accelerator_counts_and_migrates(vms, thread_accel):
    """The thread accelerator, asked for: a counter that stops with the VM, RAM that verifies after
    a state copy, nothing migrated as CPU state."""
    async def body():
        src = await vms.start("src", objects=(ram_opt(),), dirty_rate_bytes_s=4 << 20)
        dst = await vms.start("dst", objects=(ram_opt(),), dirty_rate_bytes_s=4 << 20, incoming="defer")
        accel = (await guest(src))["accel"]
        assert accel == {"name": "thread", "requested": "thread", "dirty-log": "vmm"}
        counter = ProgressCounter(src.pid)
        try:
            await moves(counter, "the thread guest's progress counter")
            await vm_stop_freezes(src, counter)
        finally:
            counter.close()
        await src.execute("cont")
        result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}", {"backend-transfer": False})
        assert result.ok, result.error
        assert not any(dev["id"].startswith("cpu") for dev in (await guest(dst))["devices"])
        counter = ProgressCounter(dst.pid)
        try:
            await moves(counter, "the destination's progress counter")
        finally:
            counter.close()
        ram = (await dst.execute("x-query-guest", {"verify": True}))["ram-verify"]["ram0"]
        assert ram["ok"] and ram["pages-stamped"] == DATA_PAGES, ram

    run_vm_test(vms, body)


async def vm_stop_freezes(vm, counter: ProgressCounter) -> None:
    await vm.execute("stop")
    stopped = counter.read()
    await asyncio.sleep(0.2)
    assert counter.read() == stopped, "a stopped guest runs"


@needs_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare(1) (util-linux)")
def test_without_kvm_the_vm_falls_back_to_threads_and_says_why(workdir):
    """A VM whose /dev/kvm is not KVM (/dev/null bound over it, in a mount namespace of its
    own) runs its guest on threads, and says why over QMP and in its log."""
    qmp_path = os.path.join(workdir, "vm.qmp")
    log_path = os.path.join(workdir, "vm.log")
    vm = [sys.executable, "-m", "migfd.cli", "vm", "--name", "vm", "--qmp", f"unix:{qmp_path}",
          "--accel", "kvm", "--object", "memory-backend-memfd,id=ram0,size=4M"]
    argv = ["unshare", "--mount", "sh", "-c", 'mount --bind /dev/null /dev/kvm && exec "$@"', "sh", *vm]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    async def body():
        deadline = time.monotonic() + 30
        while True:  # as VMProcess.start: a fresh client for each try, once the socket exists
            assert proc.poll() is None, open(log_path).read()
            assert time.monotonic() < deadline, "no QMP monitor"
            if os.path.exists(qmp_path):
                client = QMPClient("vm")
                try:
                    await client.connect(qmp_path)
                    break
                except Exception:
                    await client.disconnect()
            await asyncio.sleep(0.05)
        try:
            return await client.execute("x-query-guest")
        finally:
            await quit_over_qmp(client, proc)

    try:
        info = asyncio.run(asyncio.wait_for(body(), 60))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    accel = info["accel"]
    assert accel["name"] == "thread" and accel["requested"] == "kvm"
    assert accel["fallback-reason"].startswith("/dev/kvm") or "ioctl" in accel["fallback-reason"], accel
    assert not any(dev["id"].startswith("cpu") for dev in info["devices"])
    assert "running the guest on threads" in open(log_path).read()


@needs_kvm
def test_two_vcpus_migrate_each_in_its_own_cpu_section(vms):
    """-smp 2: two cpu sections (instance ids 0 and 1) travel, and both vCPUs run on where they arrive."""
    async def body():
        rate = 8 << 20
        src = await start_smp(vms, "src", 2, objects=(ram_opt(),), dirty_rate_bytes_s=rate)
        dst = await start_smp(vms, "dst", 2, objects=(ram_opt(),), dirty_rate_bytes_s=rate,
                              incoming="defer")
        assert [v["index"] for v in (await guest(src))["accel"]["vcpus"]] == [0, 1]
        await wait_until(lambda: stamped(src), what="the guest stamping pages")
        result = await migrate(src, dst, f"unix:{vms.path('mig.sock')}",
                               {"backend-transfer": False, "downtime-limit": 0, "x-max-iterations": 2})
        assert result.ok, result.error
        ram = (await dst.execute("x-query-guest", {"verify": True}))["ram-verify"]["ram0"]
        assert ram["ok"] and ram["pages-stamped"] == DATA_PAGES, ram
        counter = ProgressCounter(dst.pid)
        try:
            for index in range(2):
                await moves_at(counter, VCPU_PROGRESS_ADDR + 4 * index, f"vCPU {index} on the destination")
        finally:
            counter.close()

    run_vm_test(vms, body)


async def start_smp(vms, name: str, smp: int, **kwargs):
    """A VM of ``vms`` with ``smp`` vCPUs (the harness knows no -smp: the option is added here)."""
    vm = VMProcess(name, vms.workdir, **kwargs)
    vm.argv += ["--smp", str(smp)]
    vms.vms.append(vm)
    await vm.start()
    return vm


async def moves_at(counter: ProgressCounter, addr: int, what: str) -> None:
    first = counter.read(addr)
    await wait_until(lambda: counter.read(addr) != first, what=what)


@needs_kvm
def test_a_spinning_vcpu_reports_its_thread_and_kvm_counters_without_stopping(vms, monkeypatch):
    # The guest never leaves KVM_RUN (duty 1): a query that took a vCPU ioctl would wait
    # for it forever (KVM holds the vCPU's mutex in KVM_RUN); the counters come from a
    # stats fd taken when the vCPU was made.
    monkeypatch.setenv("MIGFD_GUEST_DUTY", "1")

    async def body():
        vm = await vms.start("vm", objects=(ram_opt(),), dirty_rate_bytes_s=4 << 20)
        counter = ProgressCounter(vm.pid)
        try:
            await moves(counter, "the guest's progress counter")
            first = (await asyncio.wait_for(guest(vm), 10))["accel"]["vcpus"][0]
            await asyncio.sleep(0.2)
            second = (await asyncio.wait_for(guest(vm), 10))["accel"]["vcpus"][0]
            await moves(counter, "the counter after the queries")
        finally:
            counter.close()
        with open(f"/proc/{vm.pid}/task/{first['thread-id']}/comm") as f:
            assert f.read().strip() == "vcpu-0"  # the thread QEMU's query-cpus-fast would name
        stats = first["kvm-stats"]
        assert {"exits", "pf_taken", "signal_exits"} <= set(stats)
        # the guest stamps new pages all along: KVM fixes their faults, and the counter grows
        assert second["kvm-stats"]["pf_fixed"] > stats["pf_fixed"]

    run_vm_test(vms, body)
