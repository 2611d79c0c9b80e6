"""QMP as QEMU behaves around a migration, and strangers that cost nothing.

- A destination listening with ``--incoming unix:PATH`` takes parameters and
  capabilities until a source connects; a source takes tunables during its
  migration and refuses what would change the stream, in QEMU's words.
- Where QEMU is installed, the same QMP sequence runs against QEMU and against
  migfd, and both must accept or refuse each command alike.
- A process of another uid that reaches the incoming migration socket or the
  QMP socket (connects and closes, sends garbage, or holds on) is refused and
  counted, and the rightful source still migrates.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path

import pytest
from helpers import NOBODY, become, run_vm_test, wait_until
from qemu.qmp import ExecuteError

from migfd.paths import repo_root
from migfd.peers.qemu import QemuProcess, qemu_binary

pytestmark = pytest.mark.timeout(120)

RAM = "memory-backend-memfd,id=ram0,size=16M,backend-transfer=on"
BIG_RAM = "memory-backend-memfd,id=ram0,size=64M,fill=on"
IN_PROGRESS = "There's a migration process in progress"


async def _outcome(vm, command: str, args: dict | None = None) -> str:
    """'ok', or the error's description: what a script sees of one command."""
    try:
        await vm.execute(command, args)
    except ExecuteError as exc:
        return exc.error.error.desc
    return "ok"


def test_listening_destination_takes_parameters_then_migrates(vms):
    async def body():
        mig = vms.path("mig.sock")
        src = await vms.start("src", objects=(RAM,))
        dst = await vms.start("dst", objects=(RAM,), incoming=f"unix:{mig}")
        assert (await dst.execute("query-migrate"))["status"] == "setup"
        await dst.execute("migrate-set-parameters", {"backend-transfer": True, "downtime-limit": 100})
        await dst.execute("migrate-set-capabilities",
                          {"capabilities": [{"capability": "events", "state": True}]})
        params = await dst.execute("query-migrate-parameters")
        assert params["backend-transfer"] is True and params["downtime-limit"] == 100
        await src.execute("migrate-set-parameters", {"backend-transfer": True})
        await src.execute("migrate", {"uri": f"unix:{mig}"})
        source = await src.wait_migration(60)
        destination = await dst.wait_migration(60)
        assert source["status"] == destination["status"] == "completed", (source, destination)
        assert source["x-fds-passed"] >= 1  # the RAM travelled as an fd: the setting took effect
        assert (await dst.execute("query-status"))["status"] == "running"

    run_vm_test(vms, body)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_listening_tcp_destination_refuses_backend_transfer(vms):
    async def body():
        port = _free_port()
        dst = await vms.start("dst", objects=(RAM,), incoming=f"tcp:127.0.0.1:{port}")
        assert await _outcome(dst, "migrate-set-parameters", {"backend-transfer": True}) == (
            "Migration requires a UNIX domain socket as transport, because backend-transfer is enabled")
        assert (await dst.execute("query-migrate-parameters"))["backend-transfer"] is False
        assert (await dst.execute("query-migrate"))["status"] == "setup"

    run_vm_test(vms, body)


def test_source_takes_tunables_and_refuses_stream_changes_during_migration(vms):
    async def body():
        mig = vms.path("mig.sock")
        src = await vms.start("src", objects=(BIG_RAM,))
        dst = await vms.start("dst", objects=(BIG_RAM,), incoming="defer")
        await src.execute("migrate-set-parameters", {"max-bandwidth": 4 << 20})  # ~16 s for 64 MiB
        await dst.execute("migrate-incoming", {"uri": f"unix:{mig}"})
        await src.execute("migrate", {"uri": f"unix:{mig}"})
        await wait_until(lambda: _status(src, "active"))
        assert await _outcome(src, "migrate-set-parameters", {"downtime-limit": 250}) == "ok"
        assert await _outcome(src, "migrate-set-parameters", {"backend-transfer": True}) == IN_PROGRESS
        assert await _outcome(src, "migrate-set-capabilities",
                              {"capabilities": [{"capability": "events", "state": True}]}) == IN_PROGRESS
        assert await _outcome(src, "migrate", {"uri": f"unix:{mig}"}) == IN_PROGRESS
        params = await src.execute("query-migrate-parameters")
        assert params["downtime-limit"] == 250 and params["backend-transfer"] is False
        # a tunable takes effect at once: unthrottled, the migration now finishes
        assert await _outcome(src, "migrate-set-parameters", {"max-bandwidth": 64 << 30}) == "ok"
        source = await src.wait_migration(60)
        assert source["status"] == "completed", source
        assert (await dst.wait_migration(60))["status"] == "completed"

    run_vm_test(vms, body)


async def _status(vm, want: str) -> bool:
    return (await vm.execute("query-migrate")).get("status") == want


# -- strangers ---------------------------------------------------------------------


def _stranger(path: str, how: str) -> tuple[int, int]:
    """Fork a process of uid 65534 that reaches ``path``; returns (pid, pipe for its release).

    ``how``: "close" connects and closes; "garbage" sends bytes that are no
    stream; "hold" stays connected until the pipe is closed.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 1
        try:
            os.close(w)
            become(NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            if how == "garbage":
                try:
                    s.sendall(b"QEVM\x00\x00\x00\x03" + b"\xff" * 64)
                except OSError:
                    pass  # refused and closed before the bytes went out: as good

            if how == "hold":
                os.read(r, 1)  # until the test lets go
            s.close()
            code = 0
        finally:
            os._exit(code)
    os.close(r)
    return pid, w


def _open_to_strangers(*paths: str) -> None:
    # The sockets are 0600: only their mode keeps another uid out. Open the mode
    # so that the SO_PEERCRED check is what has to refuse the stranger.
    for path in paths:
        os.chmod(os.path.dirname(path), 0o755)
        os.chmod(path, 0o666)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a peer under another uid")
@pytest.mark.parametrize("how", ["close", "garbage", "hold"])
def test_stranger_on_incoming_sockets_costs_nothing(vms, how):
    async def body():
        mig = vms.path("mig.sock")
        src = await vms.start("src", objects=(RAM,))
        dst = await vms.start("dst", objects=(RAM,), incoming=f"unix:{mig}")
        await wait_until(lambda: os.path.exists(mig))
        _open_to_strangers(mig, dst.qmp_path)
        released = []
        try:
            for path in (mig, dst.qmp_path):
                pid, release = _stranger(path, how)
                released.append((pid, release))
            await wait_until(lambda: _refusals(dst, 1, 1), timeout_s=10)
            state = await dst.execute("query-migrate")
            assert state["status"] == "setup", state
            # the rightful source migrates, whatever the stranger still does
            await src.execute("migrate", {"uri": f"unix:{mig}"})
            source = await src.wait_migration(60)
            destination = await dst.wait_migration(60)
            assert source["status"] == destination["status"] == "completed", (source, destination)
            assert destination["x-refused-connections"] == 1
            assert destination["x-refused-qmp-connections"] == 1
        finally:
            # every release first: a later child inherited the earlier pipes' write ends
            for _, release in released:
                os.close(release)
            for pid, _ in released:
                _, status = os.waitpid(pid, 0)
                assert os.waitstatus_to_exitcode(status) == 0

    run_vm_test(vms, body)


async def _refusals(vm, migration: int, qmp: int) -> bool:
    state = await vm.execute("query-migrate")
    return (state.get("x-refused-connections") == migration
            and state.get("x-refused-qmp-connections") == qmp)


# -- the same sequence against real QEMU ---------------------------------------------


def _qemus() -> list[str]:
    found = []
    system = qemu_binary()
    if system:
        found.append(system)
    local = repo_root() / ".qemu" / "qemu-10.0"
    if local.exists():
        found.append(str(local))
    return found


SEQUENCE_IDLE_DESTINATION = [
    ("migrate-set-parameters", {"downtime-limit": 100}),
    ("migrate-set-parameters", {"max-bandwidth": 1_000_000}),
    ("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}),
    ("migrate-incoming", {"uri": "unix:/nonexistent/other.sock"}),
]


async def _destination_outcomes(vm) -> list[str]:
    return [await _outcome(vm, command, args) for command, args in SEQUENCE_IDLE_DESTINATION]


@pytest.mark.skipif(not _qemus(), reason="no QEMU installed (make test installs Debian's qemu-system-x86 as root)")
@pytest.mark.parametrize("qemu", _qemus() or ["none"])
def test_listening_destination_agrees_with_qemu(vms, qemu):
    async def body():
        qemu_dir = Path(vms.path("q"))
        qemu_dir.mkdir()
        qmp = qemu_dir / "dst.qmp"
        argv = [qemu, "-M", "pc", "-m", "64", "-accel", "tcg", "-nodefaults", "-nographic", "-display", "none",
                "-qmp", f"unix:{qmp},server=on,wait=off", "-incoming", f"unix:{qemu_dir / 'mig.sock'}"]
        ref = QemuProcess("qemu-dst", qemu_dir, argv)
        await ref.start()
        try:
            want = await _destination_outcomes(ref)
        finally:
            await ref.quit()
        dst = await vms.start("dst", objects=(RAM,), incoming=f"unix:{vms.path('mig.sock')}")
        got = await _destination_outcomes(dst)
        assert [w == "ok" for w in want] == [g == "ok" for g in got], (want, got)
        assert want[-1] == got[-1] == "The incoming migration has already been started"

    run_vm_test(vms, body)


def test_qemu_list_is_not_empty_where_root():
    """make test installs Debian's QEMU as root: the comparison above must not skip there."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("not root on Debian: QEMU is not installed by make test")
    assert _qemus(), "make test should have installed qemu-system-x86"
