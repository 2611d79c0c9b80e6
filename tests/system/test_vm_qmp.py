"""The QMP surface of a real ``migfd vm`` process, driven by qemu.qmp, and its command line.

The QMP protocol itself (greeting, negotiation, framing, fds) is tested in
test_qmp.py against the server alone; here it is the VM's commands: run
state, migration parameters, errors for bad arguments, and what ``migfd vm``
does with options it cannot use.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys

import pytest
from helpers import run_vm_test, wait_until
from qemu.qmp import EventListener, ExecuteError

pytestmark = pytest.mark.timeout(60)

RAM = "memory-backend-memfd,id=ram0,size=16M,backend-transfer=on"
DEFAULT_PARAMETERS = {"backend-transfer": False, "downtime-limit": 300, "max-bandwidth": 128 << 20,
                      "x-batch-fds": True}


def chardev(path: str) -> str:
    return f"socket,id=ch0,path={path},server=on,backend-transfer=on"


async def pages_dirtied(vm) -> int:
    info = await vm.execute("x-query-guest")
    return next(dev for dev in info["devices"] if dev["id"] == "ram0")["pages-dirtied"]


def test_greeting_commands_and_name(vms):
    async def body():
        vm = await vms.start("vm1", objects=(RAM,))
        greeting = vm.qmp.greeting
        assert greeting is not None
        version = greeting.QMP.version
        assert {"major", "minor", "micro"} <= set(version["qemu"])
        assert "package" in version
        assert list(greeting.QMP.capabilities) == []
        commands = {c["name"] for c in await vm.execute("query-commands")}
        assert {"qmp_capabilities", "query-status", "stop", "cont", "quit", "migrate-set-parameters",
                "query-migrate-parameters", "migrate", "migrate-incoming", "query-migrate",
                "migrate_cancel", "getfd"} <= commands
        assert await vm.execute("query-name") == {"name": "vm1"}
        with pytest.raises(ExecuteError) as info:
            await vm.execute("no-such-command")
        assert info.value.error_class == "CommandNotFound"
        assert await vm.execute("query-migrate") == {}  # nothing has migrated yet

    run_vm_test(vms, body)


def test_run_states_of_booted_and_incoming_vms(vms):
    async def body():
        src = await vms.start("src", objects=(RAM,))
        dst = await vms.start("dst", objects=(RAM,), incoming="defer")
        assert await src.execute("query-status") == {"running": True, "singlestep": False,
                                                     "status": "running"}
        assert await dst.execute("query-status") == {"running": False, "singlestep": False,
                                                     "status": "inmigrate"}
        # A VM waiting for its state must not run, stop or migrate anything.
        for command, args in (("cont", None), ("stop", None), ("migrate", {"uri": "unix:/nonexistent"})):
            with pytest.raises(ExecuteError) as info:
                await dst.execute(command, args)
            assert info.value.error_class == "GenericError"
            assert (await dst.execute("query-status"))["status"] == "inmigrate"
        # A booted VM takes no incoming migration.
        with pytest.raises(ExecuteError) as info:
            await src.execute("migrate-incoming", {"uri": "unix:/nonexistent"})
        assert "-incoming" in str(info.value)
        # The incoming VM opened no backend: it holds no RAM until a migration brings it.
        links = [os.readlink(f"/proc/{dst.pid}/fd/{n}") for n in os.listdir(f"/proc/{dst.pid}/fd")]
        assert not any(link.startswith("/memfd:") for link in links)

    run_vm_test(vms, body)


def test_stop_and_cont_park_the_guest_with_events(vms):
    path = vms.path("ch0.sock")

    async def body():
        vm = await vms.start("vm1", objects=(RAM,), chardevs=(chardev(path),), dirty_rate_bytes_s=4 << 20)
        events = EventListener(("STOP", "RESUME"))
        vm.qmp.register_listener(events)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(path)
            conn.settimeout(10)
            conn.sendall(b"one\n")
            assert conn.recv(100) == b"one\n"
            first = await pages_dirtied(vm)
            await wait_until(lambda: _more_dirtied(vm, first), what="the guest dirtying RAM")

            await vm.execute("stop")
            assert (await vm.execute("query-status"))["status"] == "paused"
            assert (await events.get())["event"] == "STOP"
            # Parked: no page is dirtied and no line is echoed while stopped.
            frozen = await pages_dirtied(vm)
            conn.sendall(b"two\n")
            await asyncio.sleep(0.3)
            assert await pages_dirtied(vm) == frozen
            conn.setblocking(False)
            with pytest.raises(BlockingIOError):
                conn.recv(100)
            conn.settimeout(10)
            await vm.execute("stop")  # stopping a stopped VM is no error and no event

            await vm.execute("cont")
            assert (await vm.execute("query-status"))["status"] == "running"
            assert (await events.get())["event"] == "RESUME"
            assert conn.recv(100) == b"two\n"  # the line waited in the socket, nothing lost
            await wait_until(lambda: _more_dirtied(vm, frozen), what="the guest dirtying RAM again")
            assert [e["event"] for e in events.history] == ["STOP", "RESUME"]
            assert all("timestamp" in e for e in events.history)
        finally:
            conn.close()
        ram = (await vm.execute("x-query-guest", {"verify": True}))["ram-verify"]["ram0"]
        assert ram["ok"] and ram["pages-stamped"] > 0

    run_vm_test(vms, body)


async def _more_dirtied(vm, than: int) -> bool:
    return await pages_dirtied(vm) > than


def test_migration_parameters_defaults_and_round_trip(vms):
    async def body():
        vm = await vms.start("vm1", objects=(RAM,))
        params = await vm.execute("query-migrate-parameters")
        for key, value in DEFAULT_PARAMETERS.items():
            assert params[key] == value
        await vm.execute("migrate-set-parameters", {"backend-transfer": True, "downtime-limit": 50})
        await vm.execute("migrate-set-parameters", {"max-bandwidth": 1 << 20})
        params = await vm.execute("query-migrate-parameters")
        assert params["backend-transfer"] is True
        assert params["downtime-limit"] == 50  # kept from the first call
        assert params["max-bandwidth"] == 1 << 20

    run_vm_test(vms, body)


BAD_COMMANDS = [
    ("migrate-set-parameters", {"downtime-limit": "300"}, "expects an integer"),
    ("migrate-set-parameters", {"downtime-limit": True}, "expects an integer"),
    ("migrate-set-parameters", {"max-bandwidth": 1.5}, "expects an integer"),
    ("migrate-set-parameters", {"max-bandwidth": -1}, "non-negative"),
    ("migrate-set-parameters", {"backend-transfer": 1}, "expects a boolean"),
    ("migrate-set-parameters", {"backend-transfer": "on"}, "expects a boolean"),
    ("migrate-set-parameters", {"no-such-parameter": 1}, "unexpected"),
    ("migrate", {"uri": 42}, "must be a string"),
    ("migrate", {}, "uri"),
    ("migrate", {"uri": "unix:/x", "channels": []}, "uri"),
    ("migrate", {"uri": "bogus:somewhere"}, "unknown transport"),
    ("migrate", {"uri": "tcp:127.0.0.1:99999"}, "bad port"),
    ("migrate", {"uri": "fd:no-such-name"}, "not been found"),
    ("migrate", {"channels": "unix:/x"}, "channel"),
    ("migrate", {"channels": [{"channel-type": "main", "addr": {"transport": "socket", "type": "unix"}}]},
     "path"),
    ("migrate", {"uri": "unix:/x", "bogus": 1}, "bogus"),
    ("getfd", {"fdname": 5}, "fdname"),
    ("getfd", {"fdname": "nothing-sent"}, "SCM_RIGHTS"),
    ("migrate-incoming", {"uri": 7}, ""),
]


def test_bad_arguments_get_error_replies_and_the_vm_answers(vms):
    async def body():
        vm = await vms.start("vm1", objects=(RAM,), dirty_rate_bytes_s=1 << 20)
        for command, args, words in BAD_COMMANDS:
            with pytest.raises(ExecuteError) as info:
                await vm.execute(command, args)
            assert info.value.error_class == "GenericError", (command, args)
            assert words in str(info.value), (command, args, str(info.value))
            assert vm.proc.poll() is None, f"{command} {args} killed the VM"
            assert (await vm.execute("query-status"))["status"] == "running"
        # Nothing of the refused arguments was applied, and no migration started.
        params = await vm.execute("query-migrate-parameters")
        for key, value in DEFAULT_PARAMETERS.items():
            assert params[key] == value
        assert await vm.execute("query-migrate") == {}
        ram = (await vm.execute("x-query-guest", {"verify": True}))["ram-verify"]["ram0"]
        assert ram["ok"]

    run_vm_test(vms, body)


def test_migration_to_nowhere_fails_and_the_source_runs_on(vms):
    async def body():
        vm = await vms.start("vm1", objects=(RAM,), dirty_rate_bytes_s=1 << 20)
        events = EventListener("MIGRATION")
        vm.qmp.register_listener(events)
        await vm.execute("migrate_cancel")  # nothing to cancel: no error, no event
        await vm.execute("migrate", {"uri": f"unix:{vms.path('nobody-listens.sock')}"})
        info = await vm.wait_migration(30)
        assert info["status"] == "failed"
        assert "Failed to connect" in info["error-desc"]
        assert (await vm.execute("query-status"))["status"] == "running"
        await wait_until(lambda: "failed" in [e["data"]["status"] for e in events.history],
                         what="MIGRATION failed event")
        assert [e["data"]["status"] for e in events.history] == ["setup", "failed"]
        assert (await vm.execute("x-query-guest", {"verify": True}))["ram-verify"]["ram0"]["ok"]

    run_vm_test(vms, body)


def test_quit_ends_the_process_and_removes_the_monitor(vms):
    async def body():
        vm = await vms.start("vm1", objects=(RAM,), chardevs=(chardev(vms.path("ch0.sock")),))
        await vm.execute("quit")
        rc = await asyncio.get_running_loop().run_in_executor(None, vm.proc.wait, 10)
        assert rc == 0
        assert not os.path.exists(vm.qmp_path)
        assert "Traceback" not in vm.log_path.read_text()

    run_vm_test(vms, body)


# -- the command line ---------------------------------------------------------------------


BAD_OPTIONS = [
    (["--object", "memory-backend-memfd,id=r,size=16M,bogus=1"], "bogus"),
    (["--object", "memory-backend-memfd,id=r"], "size"),
    (["--object", "memory-backend-memfd,id=r,size=lots"], "size"),
    (["--object", "memory-backend-memfd,id=r,size=5000"], "multiple"),
    (["--object", "memory-backend-memfd,id=r,size=16M,backend-transfer=maybe"], "on or off"),
    (["--object", "memory-backend-memfd,size=16M"], "id"),
    (["--object", "memory-backend-file,id=r,size=16M"], "not supported"),
    (["--object", "memory-backend-memfd,id=r,size=16M", "--object", "memory-backend-memfd,id=r,size=16M"],
     "unique"),
    (["--chardev", "socket,id=c,path=/tmp/x.sock,server=off"], "server=on"),
    (["--chardev", "socket,id=c,server=on"], "path"),
    (["--chardev", "socket,id=c,path=/nonexistent-dir/c.sock,server=on"], "cannot listen"),
    (["--netdev", "tap,id=n"], "ifname"),
    (["--netdev", "tap,id=n,ifname=t0,queues=many"], "queues"),
    (["--netdev", "tap,id=n,ifname=t0,queues=0"], "queues"),
    (["--netdev", "tap,id=n,ifname=t0,vhost=on"], "vhost"),
]


@pytest.mark.parametrize("options,words", BAD_OPTIONS, ids=[" ".join(o[0][1:]) for o in BAD_OPTIONS])
def test_vm_refuses_bad_device_options_with_one_line(workdir, options, words):
    qmp = os.path.join(workdir, "vm.qmp")
    out = subprocess.run([sys.executable, "-m", "migfd.cli", "vm", "--name", "bad", "--qmp", f"unix:{qmp}",
                          *options], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("migfd vm: error: ")
    assert words in lines[0]
    assert not os.path.exists(qmp), "a VM that cannot start must not serve QMP"


def test_vm_refuses_a_qmp_address_that_is_not_unix(workdir):
    out = subprocess.run([sys.executable, "-m", "migfd.cli", "vm", "--qmp", "tcp:127.0.0.1:4444"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == ["migfd vm: error: --qmp takes unix:PATH"]


def test_the_vm_names_its_threads_as_the_kernel_shows_them(vms, tmp_path):
    # top -H, perf and an ftrace of a switchover tell the threads apart (QEMU's debug-threads=on)
    async def body():
        vm = await vms.start("vm1", objects=(RAM,), chardevs=(chardev(str(tmp_path / "ch0.sock")),))
        await vm.execute("cont")
        names = set()
        for tid in os.listdir(f"/proc/{vm.pid}/task"):
            with open(f"/proc/{vm.pid}/task/{tid}/comm") as f:
                names.add(f.read().strip())
        assert "guest-chardev-c" in names  # guest-chardev-ch0, as the kernel keeps 15 bytes
        assert "vcpu-0" in names or "guest-progress-" in names  # the KVM vCPU, or the thread accelerator's guest

    run_vm_test(vms, body)
