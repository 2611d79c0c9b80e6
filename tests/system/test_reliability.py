"""The fault-injection matrix: every phase of a handover migration x every fault.

Each cell is a real migration between two `migfd vm` processes that hand over
a memfd, a chardev (and, as root, a TAP with numbered frames flowing), while a
second RAM block is copied so that precopy iterations exist. A fault is
injected at the phase; then the test checks the one outcome the design
promises for that cell (:func:`expected`): who runs the guest, and each
side's final migration status. Before the commit point the source runs;
after it the destination runs wherever it can, and "neither runs" is the
promise only where a fault leaves no other safe choice (:data:`WHY` says why
for each). Whatever the outcome, every fd is accounted for (/proc/PID/fd,
before and after): the side that runs holds exactly what it held plus what
was handed to it, the other holds none of it. The side that runs verifies
its RAM, keeps the chardev client on its first connection with no line
lost, and echoes every frame exactly once.

docs/RELIABILITY.md is this matrix's output: MIGFD_WRITE_RELIABILITY=1 writes
it from a full run; every other run compares each cell with it (who runs,
why, both sides' statuses; not error texts or frame counts), so it cannot go
stale unnoticed. :func:`test_the_matrix_fails_when_the_destination_never_resumes`
breaks the destination's resume and shows the matrix catching it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pytest

from helpers import HAVE_TAP, TAP_TXQLEN, run_vm_test, wait_until
from migfd.net.netns import NetNamespace, delete_link, link_up, set_txqlen
from migfd.net.tun import TUN_DEVICE_PATH, open_tap, set_persist
from migfd.peers.chardev import ChardevClient
from migfd.peers.frames import FrameProbe

PHASES = ["setup", "precopy-1", "precopy-2", "device", "device-ram1", "device-net0",
          "device-ch0", "before-ack", "after-ack"]
#: rows run with x-early-fds (the fds go during setup): the phases where the order matters,
#: from the fds at the destination while the source runs to the commit point
EARLY = " (x-early-fds)"
EARLY_PHASES = ["early-fds", "precopy-1" + EARLY, "device" + EARLY, "device-ch0" + EARLY,
                "before-ack" + EARLY, "after-ack" + EARLY]
ROWS = PHASES + EARLY_PHASES
FAULTS = ["kill-destination", "close-source-channel", "close-destination-channel",
          "corrupt-byte", "stall-destination", "migrate-cancel"]
#: the phases after the commit point (the source's receipt of the PONG)
AFTER_COMMIT = ("after-ack",)
#: how a fault is set up on the source: an action at the phase, or a pause there
#: while the test does the fault from outside
SOURCE_ACTION = {"close-source-channel": "close-channel", "corrupt-byte": "corrupt"}
TIMEOUT_MS = 1500
MAX_BANDWIDTH = 64 << 20
NO_TAP = "no TAP here: needs root and /dev/net/tun"
DOC = Path(__file__).resolve().parents[2] / "docs" / "RELIABILITY.md"
WRITE_DOC = os.environ.get("MIGFD_WRITE_RELIABILITY") == "1"

#: why each outcome is the one the design promises (the keys are what docs/RELIABILITY.md shows)
WHY = {
    "rollback":
        "Before the commit point the source owns every backend: any failure or cancel "
        "makes it re-attach what it let go of and resume the guest, and the destination "
        "closes everything it received.",
    "cancel-ignored":
        "A cancel after the commit point is ignored (cancel and commit exclude each "
        "other): the migration completes and the destination runs the guest.",
    "destination-stalled":
        "The destination is stopped (SIGSTOP) after the commit point. The source gives "
        "up waiting for its resume report and fails, but never resumes: the destination "
        "owns the backends. Once continued, the destination reads the EOF and runs the guest.",
    "destination-killed":
        "Unavoidable: the destination, which owns the backends from the commit point on, "
        "is dead. The source cannot tell a dead destination from a cut channel to one that "
        "runs the guest; resuming could run the guest twice, so it never resumes.",
    "channel-cut":
        "Unavoidable: the channel is cut after the commit point, before the destination "
        "read the EOF. The destination cannot know whether its PONG reached the source "
        "(whether the source committed), so it runs nothing and closes what it received; "
        "the source has committed, cannot know whether the destination runs, and never resumes.",
    "corrupted-after-commit":
        "Unavoidable: a byte that does not belong stands where the EOF should be. The "
        "destination runs only on a well-formed end of the stream, so it refuses it, runs "
        "nothing and closes what it received; the source has committed and never resumes.",
}


@dataclass(frozen=True)
class Outcome:
    """What a cell ends in: who runs the guest, why, and each side's final migration status."""

    runs: str  #: "source", "destination" or "neither"
    why: str  #: a key of WHY
    source: str  #: the source's query-migrate status
    destination: str  #: the destination's, or "gone" (its process is dead)


def hook_of(row: str) -> tuple[str, bool]:
    """(the migration phase the fault is armed at, whether the row runs with x-early-fds)."""
    return row.removesuffix(EARLY), row in EARLY_PHASES


def expected(row: str, fault: str) -> Outcome:
    """The outcome the design promises for ``fault`` at ``row``'s phase (the same whichever
    order the fds travel in: before the commit point the source owns every backend either way)."""
    phase, _ = hook_of(row)
    if phase not in AFTER_COMMIT:
        return Outcome("source", "rollback",
                       "cancelled" if fault == "migrate-cancel" else "failed",
                       "gone" if fault == "kill-destination" else "failed")
    return {
        "kill-destination": Outcome("neither", "destination-killed", "failed", "gone"),
        "close-source-channel": Outcome("neither", "channel-cut", "failed", "failed"),
        "close-destination-channel": Outcome("neither", "channel-cut", "failed", "failed"),
        "corrupt-byte": Outcome("neither", "corrupted-after-commit", "failed", "failed"),
        "stall-destination": Outcome("destination", "destination-stalled", "failed", "completed"),
        "migrate-cancel": Outcome("destination", "cancel-ignored", "completed", "completed"),
    }[fault]


@dataclass
class CellResult:
    """One cell as docs/RELIABILITY.md shows it."""

    outcome: Outcome
    source_error: str = ""
    destination_error: str = ""
    frames: str = ""


RESULTS: dict[tuple[str, str], CellResult | str] = {}  # a string: the cell was skipped, why


def _cells():
    for phase in ROWS:
        for fault in FAULTS:
            marks = []
            if phase == "device-net0" and not HAVE_TAP:
                RESULTS[(phase, fault)] = NO_TAP
                marks.append(pytest.mark.skip(reason=NO_TAP))
            yield pytest.param(phase, fault, id=f"{phase}-{fault}", marks=marks)


@pytest.fixture(scope="module")
def namespace():
    """One network namespace for the whole matrix."""
    if not HAVE_TAP:
        yield None
        return
    with NetNamespace() as ns:
        yield ns


@pytest.fixture
def tap(namespace):
    """A fresh persistent TAP per cell: frames a cell left queued must not reach the next."""
    if namespace is None:
        yield None
        return
    fd = open_tap("rtap0", netns=namespace.name)
    try:
        set_persist(fd, True)
    finally:
        os.close(fd)
    try:
        # A stalled side reads nothing for up to TIMEOUT_MS: the kernel queue must hold it all.
        assert set_txqlen("rtap0", TAP_TXQLEN, namespace.name) == TAP_TXQLEN
        link_up("rtap0", namespace.name)
        yield namespace
    finally:
        delete_link("rtap0", namespace.name)


# -- who holds what ----------------------------------------------------------------------


def fd_objects(pid: int) -> Counter[str]:
    """What process ``pid`` holds, one entry per fd: its /proc link, and for a memfd also
    its inode (every memfd of a VM links to the same kind of name; the inode is the object)."""
    out: Counter[str] = Counter()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            link = os.readlink(f"{base}/{name}")
            if link.startswith("/memfd:"):
                link += f"#{os.stat(f'{base}/{name}').st_ino}"
        except FileNotFoundError:
            continue  # closed between listdir and readlink: not held
        out[link] += 1
    return out


def bound_to(pid: int, path: str) -> Counter[str]:
    """The UNIX sockets ``pid`` holds that are bound to ``path``: a listener and the
    connections it accepted (they carry its address), as /proc/net/unix lists them.

    An accepted socket belongs to the network namespace of the peer that connected
    (this process's), the listener to its own: both lists are read.
    """
    inodes = set()
    for table in (f"/proc/{pid}/net/unix", "/proc/self/net/unix"):
        with open(table) as f:
            inodes |= {fields[6] for fields in (line.split() for line in list(f)[1:])
                       if len(fields) > 7 and fields[7] == path}
    held = fd_objects(pid)
    return Counter({link: n for link, n in held.items()
                    if link.startswith("socket:[") and link[8:-1] in inodes})


def memfds(objects: Counter[str], device: str | None = None) -> Counter[str]:
    prefix = "/memfd:" + (f"migfd-{device} " if device else "")
    return Counter({link: n for link, n in objects.items() if link.startswith(prefix)})


def _diff(want: Counter[str], got: Counter[str]) -> str:
    return f"missing {dict(want - got)}, unexpected {dict(got - want)}"


async def _holds_exactly(pid: int, want: Counter[str], who: str) -> None:
    """Wait until ``pid`` holds exactly ``want`` (a side closes its channel just after its
    status turns final), then fail with the difference if it never does."""
    try:
        await wait_until(lambda: fd_objects(pid) == want, 10, what=f"{who} holding exactly its fds")
    except AssertionError:
        raise AssertionError(f"{who} (pid {pid}) fds: {_diff(want, fd_objects(pid))}") from None


# -- one cell ------------------------------------------------------------------------------


async def _status(vm) -> tuple[str | None, str | None, str]:
    """(runstate, migration status, error) of a VM; (None, None, "") when its process is gone.

    A process that is alive but does not answer QMP is a fault, not "gone":
    a hung side must fail the cell.
    """
    if vm.proc.poll() is not None:
        return None, None, ""
    try:
        state = await asyncio.wait_for(vm.execute("query-status"), 5)
        mig = await asyncio.wait_for(vm.execute("query-migrate"), 5)
    except Exception as exc:
        await asyncio.sleep(0.2)  # it may be exiting right now: that is "gone"
        if vm.proc.poll() is not None:
            return None, None, ""
        raise AssertionError(f"{vm.name} (pid {vm.pid}) is alive but does not answer QMP: {exc!r}") from exc
    return state["status"], mig.get("status"), mig.get("error-desc", "")


async def run_cell(vms, tap, row: str, fault: str, break_resume: bool = False) -> CellResult:
    """Migrate with ``fault`` injected at ``row``'s phase; check everything the design promises.

    ``break_resume`` makes the destination fail where it would resume the
    guest (a fault at its ``dest-eof``): the matrix must then fail.
    """
    phase, early = hook_of(row)
    d = vms.workdir
    chardev_path, mig_path = f"{d}/ch0.sock", f"{d}/mig.sock"
    devices = dict(
        objects=("memory-backend-memfd,id=ram0,size=8M",
                 "memory-backend-memfd,id=ram1,size=8M,backend-transfer=on"),
        chardevs=(f"socket,id=ch0,path={chardev_path},server=on,backend-transfer=on",),
        netdevs=("tap,id=net0,ifname=rtap0,backend-transfer=on",) if tap else (),
        dirty_rate_bytes_s=4 << 20, netns=tap)
    want = expected(row, fault)
    src = await vms.start("src", **devices)
    dst = await vms.start("dst", incoming="defer", **devices)
    client = ChardevClient(chardev_path, rate_per_s=500)
    client.start()
    probe = None
    stopped = False
    try:
        assert client.wait_echoes(5)
        if tap:
            probe = FrameProbe("rtap0", netns=tap.name, rate_per_s=5000, max_duration_s=30)
            probe.start()
        # Two precopy iterations, the second one certain: at MAX_BANDWIDTH the first takes
        # long enough (~0.1 s for 8 MiB) for the guest to dirty pages whose expected
        # downtime is over the limit of 0 ms, however busy the machine.
        params = {"backend-transfer": True, "downtime-limit": 0, "x-max-iterations": 2,
                  "x-channel-timeout-ms": TIMEOUT_MS, "max-bandwidth": MAX_BANDWIDTH, "x-early-fds": early}
        for vm in (src, dst):
            await vm.execute("migrate-set-parameters", params)
        await dst.execute("migrate-incoming", {"uri": f"unix:{mig_path}"})
        if break_resume:
            await dst.execute("x-migration-fault", {"phase": "dest-eof", "action": "fail"})

        # Who holds what before: the source every backend, the destination none yet.
        src_before, dst_before = fd_objects(src.pid), fd_objects(dst.pid)
        chardev_sockets = bound_to(src.pid, chardev_path)
        assert sum(chardev_sockets.values()) == 2, f"chardev listener and client: {chardev_sockets}"
        handed = memfds(src_before, "ram1") + chardev_sockets
        if tap:
            handed[TUN_DEVICE_PATH] = 1
        backends = memfds(src_before) + chardev_sockets + Counter({TUN_DEVICE_PATH: src_before[TUN_DEVICE_PATH]})
        # Two memfds, each held twice: by the device, and by the mmap of it (Python's mmap keeps a dup).
        assert len(memfds(src_before)) == 2 and src_before[TUN_DEVICE_PATH] == (1 if tap else 0)
        assert not memfds(dst_before) and not dst_before[TUN_DEVICE_PATH]
        listener = bound_to(dst.pid, mig_path)
        assert sum(listener.values()) == 1, listener

        await src.execute("x-migration-fault", {"phase": phase,
                                                "action": SOURCE_ACTION.get(fault, "pause")})
        await src.execute("migrate", {"uri": f"unix:{mig_path}"})
        if fault not in SOURCE_ACTION:
            over = await wait_until(lambda: _paused_or_over(src, phase), 20, what=f"source paused at {phase}")
            assert over == "paused", f"the migration ended ({over}) without reaching {phase}"
            if fault == "kill-destination":
                dst.kill(signal.SIGKILL)
            elif fault == "close-destination-channel":
                await dst.execute("x-migration-fault", {"phase": "now", "action": "close-channel"})
            elif fault == "stall-destination":
                os.kill(dst.pid, signal.SIGSTOP)
                stopped = True
                # A signal takes effect asynchronously: go on only once it has.
                await wait_until(lambda: _proc_state(dst.pid) == "T", 10, what="destination stopped")
            elif fault == "migrate-cancel":
                await src.execute("migrate_cancel")
            await src.execute("x-migration-continue")
        source = await src.wait_migration(60)
        if stopped:
            os.kill(dst.pid, signal.SIGCONT)
            stopped = False
        if dst.proc.poll() is None:
            # The destination settles too: it failed, or it runs the guest.
            await wait_until(lambda: _settled(dst), 20, what="destination settled")

        # The outcome: exactly the one promised.
        src_state, src_mig, src_error = await _status(src)
        dst_state, dst_mig, dst_error = await _status(dst)
        running = [name for name, state in (("source", src_state), ("destination", dst_state))
                   if state == "running"]
        runs = "both" if len(running) == 2 else running[0] if running else "neither"
        got = Outcome(runs, want.why, src_mig or "gone", dst_mig or "gone")
        assert got.runs == want.runs, (
            f"{phase} x {fault}: " + ("neither side may run" if want.runs == "neither" else
                                      f"the {want.runs} must run") + f" ({WHY[want.why]}), "
            f"but {runs} runs; source {src_mig} ({src_error}), destination {dst_mig} ({dst_error})")
        assert got == want, f"{phase} x {fault}: {got} (errors: {src_error!r}, {dst_error!r}), want {want}"
        if want.destination == "gone":
            assert dst.proc.returncode == -signal.SIGKILL
        assert source.get("x-committed", False) == (phase in AFTER_COMMIT), source
        if early:
            assert "early-fds" in {p["phase"] for p in source["x-timeline"]}, "the fds did not go early"
        if runs != "source":
            assert src_state == "postmigrate", "after the commit point the source never resumes"

        # Every fd accounted for. The side that runs holds what it held plus what it was
        # handed (and the destination its own copy of ram0); the other holds none of it,
        # nor anything it received.
        if runs == "source":
            await _holds_exactly(src.pid, src_before, "the source, resumed")
        else:
            await _holds_exactly(src.pid, src_before - backends, "the source, after the commit point")
        if want.destination != "gone":
            if runs == "destination":
                dst_ram0 = memfds(fd_objects(dst.pid), "ram0")
                assert len(dst_ram0) == 1 and not dst_ram0 & src_before, dst_ram0
                await _holds_exactly(dst.pid, dst_before - listener + handed + dst_ram0,
                                     "the destination, running")
            else:
                await _holds_exactly(dst.pid, dst_before - listener, "the destination, failed")

        # The side that runs lost nothing.
        report = client.stop(drain_s=2.0 if running else 0)
        traffic = probe.stop(drain_timeout_s=2.0 if running else 0) if probe else None
        probe = None
        frames = "not run: " + NO_TAP if traffic is None else "not checked: nobody runs"
        if running:
            owner = src if runs == "source" else dst
            verify = (await owner.execute("x-query-guest", {"verify": True}))["ram-verify"]
            assert set(verify) == {"ram0", "ram1"} and all(v["ok"] for v in verify.values()), verify
            assert report.reconnects == 0 and not report.lost, report
            if traffic is not None:
                assert traffic.frames_sent and not traffic.lost and not traffic.duplicated, (
                    traffic.frames_sent, len(traffic.lost), traffic.duplicated)
                frames = f"{traffic.frames_sent} sent, 0 lost, 0 dup"
        return CellResult(got, src_error, dst_error, frames)
    finally:
        if stopped:
            os.kill(dst.pid, signal.SIGCONT)
        client.stop(drain_s=0)
        if probe is not None:
            probe.stop(drain_timeout_s=0)


@pytest.mark.parametrize("phase, fault", list(_cells()))
def test_fault_matrix(phase, fault, vms, tap):
    cell = run_vm_test(vms, lambda: run_cell(vms, tap, phase, fault), timeout_s=120)
    RESULTS[(phase, fault)] = cell
    if not WRITE_DOC:
        documented = read_doc().get((phase, fault))
        assert documented == cell.outcome, (
            f"docs/RELIABILITY.md says {documented} for {phase} x {fault}, the code does "
            f"{cell.outcome}: regenerate it (MIGFD_WRITE_RELIABILITY=1)")
    if tap is None:
        # Every other check of the cell held; say so, and that the frame checks did not run,
        # rather than pass as if they had.
        pytest.skip("frame checks not run: no TAP here (needs root and /dev/net/tun); "
                    "every other check of this cell passed")


@pytest.mark.parametrize("fault", [f for f in FAULTS if expected("after-ack", f).runs == "destination"])
def test_the_matrix_fails_when_the_destination_never_resumes(fault, vms, tap):
    """The cells where the destination must run, with its resume broken (it fails where it
    would run the guest): the matrix must say that the destination does not run."""
    with pytest.raises(AssertionError, match="the destination must run .* but neither runs"):
        run_vm_test(vms, lambda: run_cell(vms, tap, "after-ack", fault, break_resume=True),
                    timeout_s=120)


def test_the_committed_table_is_the_design():
    """docs/RELIABILITY.md lists every cell, with the outcome :func:`expected` promises or as
    skipped; its grid says what its table says (no process runs here: a hand edit fails at once)."""
    if WRITE_DOC:
        pytest.skip("docs/RELIABILITY.md is being written by this run")
    documented = read_doc()
    assert set(documented) == {(p, f) for p in ROWS for f in FAULTS}
    for (phase, fault), outcome in documented.items():
        assert outcome is None or outcome == expected(phase, fault), (phase, fault, outcome)
    text = DOC.read_text()
    assert _grid(documented) in text, "the grid of docs/RELIABILITY.md disagrees with its table"


async def _paused_or_over(vm, phase) -> str | None:
    """"paused" once ``vm`` is held at ``phase``; the status of a migration that ended instead."""
    if (await vm.execute("x-query-fault"))["paused-at"] == phase:
        return "paused"
    status = (await vm.execute("query-migrate")).get("status")
    return status if status in ("completed", "failed", "cancelled") else None


async def _settled(vm) -> bool:
    state, mig, _ = await _status(vm)
    return state is None or mig in ("failed", "completed", "cancelled")


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


# -- docs/RELIABILITY.md ---------------------------------------------------------------------

CELLS_HEADING = "## Every cell"
COLUMNS = ["phase", "fault", "who runs", "why", "source", "destination", "frames"]


def _short(text: str) -> str:
    return text if len(text) < 90 else text[:87] + "..."


def _status_text(status: str, error: str) -> str:
    return status + (f": {_short(error)}" if error else "")


@lru_cache(maxsize=1)
def read_doc() -> dict[tuple[str, str], Outcome | None]:
    """The cells of docs/RELIABILITY.md: the outcome (who runs, why, both statuses; the errors
    and frame counts are left out), or None for a cell listed as skipped."""
    lines = DOC.read_text().split(CELLS_HEADING, 1)[1].splitlines()
    rows = [line for line in lines if line.startswith("| ")][1:]  # the first is the header
    out: dict[tuple[str, str], Outcome | None] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split(" | ")]
        phase, fault, runs, why, source, destination = cells[:6]
        if runs == "skipped":
            out[(phase, fault)] = None
            continue
        out[(phase, fault)] = Outcome(runs.removesuffix(" runs"), why.strip("`"),
                                      source.split(":", 1)[0], destination.split(":", 1)[0])
    return out


def _grid(outcomes: dict[tuple[str, str], Outcome | None]) -> str:
    lines = ["| phase | " + " | ".join(FAULTS) + " |", "|---|" + "---|" * len(FAULTS)]
    for phase in ROWS:
        cells = []
        for fault in FAULTS:
            o = outcomes[(phase, fault)]
            cells.append("skipped" if o is None else f"{o.runs} (`{o.why}`)")
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_doc(results: dict[tuple[str, str], CellResult | str]) -> str:
    outcomes = {key: (None if isinstance(r, str) else r.outcome) for key, r in results.items()}
    lines = [
        "# Reliability: phase x fault -> outcome",
        "",
        "Generated by `MIGFD_WRITE_RELIABILITY=1 .venv/bin/python -m pytest "
        "tests/system/test_reliability.py` from real runs: two `migfd vm` processes hand over a "
        "memfd, a chardev" + (" and a TAP carrying 5,000 numbered frames/s" if HAVE_TAP else "")
        + ", while another RAM block is copied. Each cell injected one fault at one phase of the "
        "source's migration (`after-ack` is the first after the commit point, the source's "
        "receipt of the PONG that acknowledges the loaded state). The rows marked "
        "`(x-early-fds)`, and `early-fds` (right after the fds went), run with x-early-fds: the "
        "fds go during setup, and the destination validates and adopts them while the source's "
        "guest still runs on the same backends; they repeat the phases where that order matters.",
        "",
        "Each cell asserted the one outcome the design promises for it: who runs the guest, and "
        "the final migration status of each side; never do both run. Whatever the outcome, every "
        "fd is accounted for: the side that runs holds exactly what it held before plus what it "
        "was handed (/proc/PID/fd), the other side holds none of the memfd, chardev sockets or "
        "TAP queue handed over, nor anything it received. The side that runs verifies its RAM, "
        "keeps the chardev client on its first connection with no line lost"
        + (", and echoes every frame exactly once" if HAVE_TAP else "") + ".",
        "",
        "Every run of the matrix compares each cell with this file: who runs, why, and both "
        "statuses (not the error texts, not the frame counts). A cell listed as skipped did not "
        "run where this file was written.",
        "",
        _grid(outcomes),
        "",
        "## Why",
        "",
    ]
    used = {o.why for o in outcomes.values() if o is not None}
    lines += [f"- `{key}`: {text}" for key, text in WHY.items() if key in used]
    lines += ["", CELLS_HEADING, "",
              "The source's and the destination's final migration status, with the error each "
              "reported; `gone`: the process was killed.", "",
              "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for phase in ROWS:
        for fault in FAULTS:
            r = results[(phase, fault)]
            if isinstance(r, str):
                cells = [phase, fault, "skipped", r, "", "", ""]
            else:
                o = r.outcome
                cells = [phase, fault, f"{o.runs} runs", f"`{o.why}`",
                         _status_text(o.source, r.source_error),
                         _status_text(o.destination, r.destination_error), r.frames]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def teardown_module(module):
    if not WRITE_DOC:
        return
    missing = [f"{p} x {f}" for p in ROWS for f in FAULTS if (p, f) not in RESULTS]
    if missing:
        raise AssertionError(f"MIGFD_WRITE_RELIABILITY=1 writes docs/RELIABILITY.md from the whole "
                             f"matrix; these cells did not pass: {', '.join(missing)}")
    DOC.write_text(render_doc(RESULTS))
