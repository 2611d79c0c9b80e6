"""What the process-level tests share besides fixtures: skip markers, running an
async test body, polling for a state, who holds which kernel object
(/proc/PID/fd), the VM processes of one test (:class:`VMGroup`), a destination
the test plays itself (:class:`FakeDestination`) and becoming a stranger.

It is a module of its own because ``from conftest import`` takes whichever
conftest.py comes first on sys.path: a second one shadowed this one's
helpers and broke collection once (612363e). Fixtures stay in conftest.py,
which pytest loads itself; it puts this directory on sys.path, so test files
in tests/system import ``helpers`` as the unit tests import ``strategies``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from migfd.accel.kvm import probe as kvm_probe
from migfd.channel import QEMUFile
from migfd.net.tun import TUN_DEVICE_PATH
from migfd.peers import tapnet
from migfd.peers.process import VMProcess, proc_fds

__all__ = [
    "FakeDestination", "HAVE_TAP", "IS_ROOT", "NOBODY", "TAP_TXQLEN", "VMGroup", "become",
    "memfd_inodes", "needs_root", "needs_tap", "proc_fds", "run_async", "run_vm_test",
    "sockets_of", "tun_fds", "wait_until",
]

# -- skip markers ----------------------------------------------------------------

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21


def _has_capabilities(*caps: int) -> bool:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    effective = int(line.split()[1], 16)
                    return all(effective >> cap & 1 for cap in caps)
    except OSError:
        pass
    return False


def _tun_usable() -> bool:
    try:
        fd = os.open(TUN_DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


IS_ROOT = os.geteuid() == 0
HAVE_TAP = IS_ROOT and _has_capabilities(CAP_NET_ADMIN, CAP_SYS_ADMIN) and _tun_usable()

needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root")
#: why KVM cannot run a guest here ("" when it can)
KVM_UNUSABLE = kvm_probe()
needs_kvm = pytest.mark.skipif(bool(KVM_UNUSABLE), reason=f"needs a working /dev/kvm: {KVM_UNUSABLE}")
needs_tap = pytest.mark.skipif(
    not HAVE_TAP,
    reason="needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN and a usable /dev/net/tun "
           "(TAP devices inside a network namespace the test creates)")


# -- helpers ---------------------------------------------------------------------------


def run_async(coro: Awaitable[Any], timeout_s: float = 90.0) -> Any:
    """Run an async test body to completion with asyncio.run, bounded by ``timeout_s``."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout_s)
    return asyncio.run(bounded())


def run_vm_test(vms: "VMGroup", body: Callable[[], Awaitable[Any]], timeout_s: float = 90.0) -> Any:
    """Run ``body()`` with asyncio.run; every VM of ``vms`` is quit afterwards, pass or fail."""
    async def main():
        try:
            return await asyncio.wait_for(body(), timeout_s)
        finally:
            await vms.aclose()
    return asyncio.run(main())


async def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, poll_s: float = 0.02,
                     what: str = "condition") -> Any:
    """Poll ``predicate`` (sync or async) until it returns something true; fail after ``timeout_s``.

    This waits for a state, it does not measure: the assertion is on the state.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s} s")
        await asyncio.sleep(poll_s)


async def connect_as_source(vms: "VMGroup", objects: tuple[str, ...],
                            params: dict[str, Any]) -> tuple[VMProcess, QEMUFile]:
    """A destination VM with ``objects`` and ``params``, listening; and the test's socket connected
    to it as the source: (the destination, the source's QEMUFile)."""
    dst = await vms.start("dst", incoming="defer", objects=objects)
    await dst.execute("migrate-set-parameters", params)
    path = vms.path("mig.sock")
    await dst.execute("migrate-incoming", {"uri": f"unix:{path}"})
    await wait_until(lambda: os.path.exists(path), what="destination listening")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return dst, QEMUFile.from_socket(sock, "fake-source")


def memfd_inodes(pid: int) -> set[int]:
    """Inodes of the memfds process ``pid`` holds (the same memfd has the same inode everywhere)."""
    out = set()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            if os.readlink(f"{base}/{name}").startswith("/memfd:"):
                out.add(os.stat(f"{base}/{name}").st_ino)
        except OSError:
            pass
    return out


def sockets_of(pid: int) -> set[str]:
    """The ``socket:[inode]`` links of process ``pid``."""
    return {link for link in proc_fds(pid) if link.startswith("socket:")}


def tun_fds(pid: int) -> int:
    return sum(1 for link in proc_fds(pid) if link == TUN_DEVICE_PATH)


class VMGroup:
    """The VM processes of one test; ``await start(...)`` one, ``aclose()`` quits them all."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.vms: list[VMProcess] = []

    async def start(self, name: str, **kwargs: Any) -> VMProcess:
        vm = VMProcess(name, self.workdir, **kwargs)
        self.vms.append(vm)
        await vm.start()
        return vm

    def path(self, name: str) -> str:
        return os.path.join(self.workdir, name)

    async def aclose(self) -> None:
        for vm in self.vms:
            try:
                await vm.quit(timeout_s=5)
            except Exception:
                pass
            vm.kill()

    def kill_all(self) -> None:
        for vm in self.vms:
            try:
                vm.kill(signal.SIGKILL)
            except Exception:
                pass


#: frames the TAP's kernel queue holds: the benchmark's value (migfd.peers.tapnet.TAP_TXQLEN)
TAP_TXQLEN = tapnet.TAP_TXQLEN


# -- a destination played by the test ----------------------------------------------------------


def _device_vmsds(name: str, instance_id: int, version_id: int):
    from migfd.accel.vcpu import CPU_VMSD
    from migfd.devices.chardev import VMSD as CHARDEV_VMSD
    from migfd.devices.memfd import VMSD as MEMFD_VMSD
    from migfd.devices.tap import VMSD as TAP_VMSD
    from migfd.migration import MIGRATION_SECTION, MIGRATION_VMSD

    if name == MIGRATION_SECTION:
        return MIGRATION_VMSD
    if name == CPU_VMSD.name:  # a KVM guest's vCPUs, one instance each
        return CPU_VMSD
    for vmsd in (CHARDEV_VMSD, MEMFD_VMSD, TAP_VMSD):
        if name.endswith("/" + vmsd.name):
            return vmsd
    return None


class FakeDestination:
    """Listens like a destination and reads the source's stream with migfd's own reader.

    It answers the PING that ends the source's setup (no device section yet);
    at the PING after the device sections (the source asking for the commit
    point) it does as told:
    ``answer=None`` never replies (the source waits, stopped); ``"close"``
    vanishes without a reply; ``"pong"`` acknowledges and then vanishes, as a
    destination dying right after the commit point. Every fd that arrives is
    kept (to compare with the source's) and closed by :meth:`close`.
    """

    def __init__(self, path: str, answer: str | None):
        from migfd.stream.reader import StreamReader

        assert answer in (None, "close", "pong")
        self.reader = StreamReader(_device_vmsds)
        self.answer = answer
        self.fds: list[int] = []
        self.pinged = threading.Event()
        self.error: BaseException | None = None
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(1)
        self._conn: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="fake-destination", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from migfd.stream.constants import Command, ReturnPathMessage
        from migfd.stream.reader import CommandRecord, SectionFull

        try:
            self._listener.settimeout(30)
            conn, _ = self._listener.accept()
            self._conn = conn
            sections = 0
            while True:
                data, ancdata, _, _ = conn.recvmsg(1 << 20, socket.CMSG_SPACE(253 * 4))
                fds: list[int] = []
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds += list(memoryview(payload).cast("i"))
                self.reader.receive_data(data, fds)
                for event in self.reader.events():
                    if isinstance(event, SectionFull):
                        self.fds += event.fds
                        sections += 1
                    elif (isinstance(event, CommandRecord) and event.command == Command.PING
                          and not sections):
                        # the PING that ends the source's setup: answered, as a destination does
                        conn.sendall(struct.pack(">HH", ReturnPathMessage.PONG, len(event.data)) + event.data)
                    elif isinstance(event, CommandRecord) and event.command == Command.PING:
                        if self.answer == "pong":
                            conn.sendall(struct.pack(">HH", ReturnPathMessage.PONG, len(event.data))
                                         + event.data)
                        self.pinged.set()
                        if self.answer is not None:
                            conn.close()
                            return
                if not data:
                    return
        except BaseException as exc:  # the test reports it
            self.error = exc

    def inodes(self) -> set[int]:
        return {os.fstat(fd).st_ino for fd in self.fds}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._listener.close()
        self._thread.join(10)
        self.reader.close()
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


# -- a peer of another uid --------------------------------------------------------------

#: the uid a stranger runs as in the peer-credential tests
NOBODY = 65534


def become(uid: int) -> None:
    """In a forked child: drop every group and become ``uid`` (root only), as a stranger would be."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
