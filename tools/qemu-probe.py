#!/usr/bin/env python3
"""Probe how real QEMU behaves, for the facts migfd copies (QMP, cpr-transfer, traces).

    tools/qemu-probe.py [--qemu PATH]... PROBE...

PROBE is one of:
  qmp-incoming   a destination started with -incoming unix:PATH (not defer): which
                 migrate-set-parameters / migrate-set-capabilities it accepts before a
                 source connects, while the stream comes in, and after; and, on the
                 source, which it accepts during an active outgoing migration.
  cpr-transfer   (QEMU >= 10.0) a cpr-transfer migration of memfd RAM (--mib, 64)
  precopy-shared precopy with x-ignore-shared of RAM in a file on /dev/shm (share=on)
  precopy-copied plain precopy of anonymous RAM
  precopy-filled the same, RAM first loaded with random bytes (not flattered by zero pages)
                 These four print STOP/RESUME events (µs) and trace lines
                 (vmstate_downtime_checkpoint on 10.0, savevm_*, loadvm_state_*,
                 -msg timestamp=on); --trace-out FILE appends the trace lines to FILE.
  shared         precopy with x-ignore-shared: memfd (share=on) vs memory-backend-file
                 on /dev/shm (share=on); how many RAM bytes each version still sends.
  devstate       device-state sections and bytes of a pc machine (1 and 2 vCPUs).

Default QEMUs: the system's qemu-system-x86_64 and <repo>/.qemu/qemu-10.0 when present.
Prints a transcript (command lines, QMP sent and received) in Markdown. Everything runs
on UNIX sockets under a temporary folder; every QEMU started is ended before exit.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from qmp import QMP  # noqa: E402

REPO = HERE.parent
BASE = ["-accel", "tcg", "-nodefaults", "-nographic", "-display", "none"]


def say(*a) -> None:
    print(*a, flush=True)


def version_of(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"version (\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "?"


def major_minor(qemu: str) -> tuple[int, int]:
    v = version_of(qemu).split(".")
    return int(v[0]), int(v[1])


class Procs:
    """QEMU processes started by a probe; all are ended on exit."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, label: str, qemu: str, args: list[str], show: bool = True) -> subprocess.Popen:
        if show:
            say(f"\n{label}:\n```\n{Path(qemu).name} " + " ".join(_q(a) for a in args) + "\n```")
        err = open(self.tmp / f"{label}.stderr", "wb")
        p = subprocess.Popen([qemu, *args], stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        p.label = label  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def stderr(self, label: str) -> str:
        return (self.tmp / f"{label}.stderr").read_text(errors="replace")

    def close(self) -> None:
        for p in self.procs:
            rc = p.poll()
            if rc is not None and rc != 0 and not getattr(p, "reported", False):
                p.reported = True  # type: ignore[attr-defined]
                say(f"\n    !! {p.label} exited with status {rc}; its stderr: "
                    f"{self.stderr(p.label).strip()[-600:]!r}")
            if rc is None:
                p.terminate()
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def _q(a: str) -> str:
    return a if re.fullmatch(r"[\w@%+=:,./-]+", a) else "'" + a + "'"


def ex(q: QMP, who: str, command: str, args: dict | None = None, show: bool = True, cut: int = 300):
    """Send one command, print it and the reply, return the reply."""
    msg = {"execute": command, **({"arguments": args} if args else {})}
    reply = q.send(command, args)
    if show:
        text = json.dumps(reply)
        if len(text) > cut:
            text = text[:cut] + " …"
        say(f"    {who} → {json.dumps(msg)}\n    {who} ← {text}")
    return reply


def wait_status(q: QMP, states: tuple[str, ...], timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = q.cmd("query-migrate")
        if info.get("status") in states:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"query-migrate still {info.get('status')}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- qmp-incoming

def probe_qmp_incoming(qemu: str, procs: Procs) -> None:
    tmp = procs.tmp
    ver = version_of(qemu)
    say(f"\n## QMP on a listening destination and on an active source — QEMU {ver}")
    mig = tmp / "mig.sock"
    dargs = ["-M", "pc", "-m", "256", *BASE, "-incoming", f"unix:{mig}",
             "-qmp", f"unix:{tmp}/dst.qmp,server=on,wait=off"]
    sargs = ["-M", "pc", "-m", "256", *BASE, "-qmp", f"unix:{tmp}/src.qmp,server=on,wait=off"]
    procs.start("destination", qemu, dargs)
    procs.start("source", qemu, sargs)
    d = QMP(f"{tmp}/dst.qmp")
    s = QMP(f"{tmp}/src.qmp")
    ev = {"capabilities": [{"capability": "events", "state": True}]}

    say("\n### destination, before any source connects")
    ex(d, "dst", "query-status")
    ex(d, "dst", "query-migrate")
    ex(d, "dst", "migrate-set-parameters", {"downtime-limit": 100})
    ex(d, "dst", "migrate-set-parameters", {"max-bandwidth": 1000000})
    ex(d, "dst", "migrate-set-capabilities", ev)
    ex(d, "dst", "migrate-set-capabilities",
       {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})
    ex(d, "dst", "migrate-set-capabilities",
       {"capabilities": [{"capability": "x-ignore-shared", "state": False}]})
    r = d.cmd("query-migrate-parameters")
    say(f"    dst: query-migrate-parameters → downtime-limit {r['downtime-limit']}, "
        f"max-bandwidth {r['max-bandwidth']}")
    ex(d, "dst", "query-migrate")
    ex(d, "dst", "migrate-incoming", {"uri": f"unix:{tmp}/other.sock"})

    say("\n### source: slow migration (256 MiB of zero pages at 128 KiB/s)")
    ex(s, "src", "migrate-set-capabilities", ev)
    ex(s, "src", "migrate-set-parameters", {"max-bandwidth": 131072})
    ex(s, "src", "migrate", {"uri": f"unix:{mig}"})
    wait_status(s, ("active",))
    time.sleep(0.5)

    say("\n### destination, while the stream comes in")
    ex(d, "dst", "query-status")
    ex(d, "dst", "query-migrate")
    ex(d, "dst", "migrate-set-parameters", {"downtime-limit": 200})
    ex(d, "dst", "migrate-set-capabilities", ev)
    ex(d, "dst", "migrate-set-capabilities",
       {"capabilities": [{"capability": "xbzrle", "state": False}]})

    say("\n### source, during the active outgoing migration")
    ex(s, "src", "query-migrate", cut=200)
    ex(s, "src", "migrate-set-parameters", {"downtime-limit": 250})
    ex(s, "src", "migrate-set-parameters", {"max-bandwidth": 262144})
    ex(s, "src", "migrate-set-parameters", {"multifd-channels": 4})
    ex(s, "src", "migrate-set-capabilities", ev)
    ex(s, "src", "migrate-set-capabilities",
       {"capabilities": [{"capability": "xbzrle", "state": True}]})
    ex(s, "src", "migrate", {"uri": f"unix:{tmp}/other.sock"})
    ex(s, "src", "migrate-incoming", {"uri": f"unix:{tmp}/other.sock"})
    ex(s, "src", "migrate-set-parameters", {"max-bandwidth": 1 << 30})
    info = s.wait_migration()
    say(f"    src: query-migrate (end) → status {info['status']}, downtime {info.get('downtime')} ms, "
        f"total-time {info.get('total-time')} ms")
    if "error-desc" in info:
        say(f"    src: error-desc {info['error-desc']!r}")

    say("\n### destination, after the migration")
    wait_status(d, ("completed", "failed"))
    ex(d, "dst", "query-status")
    ex(d, "dst", "query-migrate")
    ex(d, "dst", "migrate-set-parameters", {"downtime-limit": 300})
    ex(d, "dst", "migrate-set-capabilities", ev)
    for q in (d, s):
        try:
            q.send("quit")
        except (EOFError, OSError):
            pass
        q.close()
    procs.close()
    if major_minor(qemu) < (10, 0):
        return

    say(f"\n### QEMU {ver}: the `mode` parameter changed during an active outgoing migration")
    procs.start("destination-2", qemu, dargs, show=False)
    procs.start("source-2", qemu, sargs, show=False)
    d = QMP(f"{tmp}/dst.qmp")
    s = QMP(f"{tmp}/src.qmp")
    say("    (same command lines as above)")
    ex(s, "src", "migrate-set-parameters", {"max-bandwidth": 131072})
    ex(s, "src", "migrate", {"uri": f"unix:{mig}"})
    wait_status(s, ("active",))
    time.sleep(0.5)
    ex(s, "src", "migrate-set-parameters", {"mode": "cpr-reboot"})
    ex(s, "src", "migrate-set-parameters", {"max-bandwidth": 1 << 30})
    time.sleep(2)
    for label in ("source-2", "destination-2"):
        say(f"    {label} stderr: {procs.stderr(label).strip()!r}")
    for q in (d, s):
        try:
            say("    " + json.dumps(q.send("query-migrate"))[:200])
        except (EOFError, OSError) as e:
            say(f"    {'src' if q is s else 'dst'}: QMP gone ({type(e).__name__})")
        q.close()
    procs.close()


# --------------------------------------------------------------------------- cpr-transfer

TRACE = ["-trace", "enable=vmstate_downtime_checkpoint", "-trace", "enable=savevm_*",
         "-trace", "enable=loadvm_state_*", "-trace", "enable=cpr_*",
         "-trace", "enable=migration_precopy_complete", "-msg", "timestamp=on"]
TIMELINE_MODES = ("cpr-transfer", "precopy-shared", "precopy-copied")


def probe_timeline(qemu: str, procs: Procs, mode: str, trace_out: Path | None,
                   mib: int = 64, fill: bool = False) -> None:
    """One migration with trace checkpoints and STOP/RESUME events.

    cpr-transfer    (10.0+) memfd RAM, share=on, aux-ram-share=on; fds over the cpr channel
    precopy-shared  x-ignore-shared; 10.0: memory-backend-file on /dev/shm (share=on),
                    7.2: the same (7.2 also skips a shared memfd, but then the destination
                    gets a new, empty memfd: the guest's RAM is lost)
    precopy-copied  plain precopy of anonymous RAM; fill=True first loads RAM from a file
                    of random bytes (memory-backend-file, share=off: a private copy)
    """
    tmp = procs.tmp
    ver = version_of(qemu)
    say(f"\n## {mode} — QEMU {ver}, {mib} MiB RAM{' filled with random bytes' if fill else ''}, "
        f"1 vCPU, TCG, guest running (SeaBIOS, no boot device)")
    main, cpr = f"{tmp}/main.sock", f"{tmp}/cpr.sock"
    shm = Path(f"/dev/shm/migfd-probe-{os.getpid()}")
    fillfile = Path(f"/dev/shm/migfd-probe-fill-{os.getpid()}")
    trace = TRACE if major_minor(qemu) >= (10, 0) else [
        "-trace", "enable=savevm_*", "-trace", "enable=loadvm_state_*", "-msg", "timestamp=on"]
    if mode == "cpr-transfer":
        sram = dram = ["-M", "pc,memory-backend=ram0,aux-ram-share=on", "-m", f"{mib}", "-object",
                       f"memory-backend-memfd,id=ram0,size={mib}M,share=on"]
    elif mode == "precopy-shared":
        sram = dram = ["-M", "pc,memory-backend=ram0", "-m", f"{mib}", "-object",
                       f"memory-backend-file,id=ram0,size={mib}M,mem-path={shm},share=on"]
    elif fill:
        with open(fillfile, "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        sram = ["-M", "pc,memory-backend=ram0", "-m", f"{mib}", "-object",
                f"memory-backend-file,id=ram0,size={mib}M,mem-path={fillfile},share=off"]
        dram = ["-M", "pc,memory-backend=ram0", "-m", f"{mib}", "-object",
                f"memory-backend-ram,id=ram0,size={mib}M"]
    else:
        sram = dram = ["-M", "pc", "-m", f"{mib}"]
    sargs = [*sram, *BASE, "-qmp", f"unix:{tmp}/src.qmp,server=on,wait=off", *trace]
    if mode == "cpr-transfer":
        chan = lambda kind, path: json.dumps(  # noqa: E731
            {"channel-type": kind, "addr": {"transport": "socket", "type": "unix", "path": path}},
            separators=(",", ":"))
        # wait=on: the destination blocks after the cpr state until a QMP client connects;
        # with qmp_capabilities sent at once, its client sees RESUME.
        dargs = [*dram, *BASE, "-qmp", f"unix:{tmp}/dst.qmp,server=on,wait=on",
                 "-incoming", chan("main", main), "-incoming", chan("cpr", cpr), *trace]
    else:
        dargs = [*dram, *BASE, "-qmp", f"unix:{tmp}/dst.qmp,server=on,wait=off",
                 "-incoming", "defer", *trace]
    try:
        src = procs.start("source", qemu, sargs)
        s = QMP(f"{tmp}/src.qmp")
        ex(s, "src", "cont")
        time.sleep(1.0)
        dst = procs.start("destination", qemu, dargs)
        ev = {"capabilities": [{"capability": "events", "state": True}]}
        if mode == "precopy-shared":
            ev["capabilities"].append({"capability": "x-ignore-shared", "state": True})
        d = None
        if mode != "cpr-transfer":
            d = QMP(f"{tmp}/dst.qmp")
            ex(d, "dst", "migrate-set-capabilities", ev)
            ex(d, "dst", "migrate-incoming", {"uri": f"unix:{main}"})
        else:
            time.sleep(0.5)
            say(f"\n    destination's QMP socket before the source's migrate: "
                f"{'present' if os.path.exists(f'{tmp}/dst.qmp') else 'absent'}")
        ex(s, "src", "migrate-set-capabilities", ev)
        if mode == "cpr-transfer":
            ex(s, "src", "migrate-set-parameters", {"mode": "cpr-transfer"})
            t0 = time.time()
            ex(s, "src", "migrate", {"channels": [
                {"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": main}},
                {"channel-type": "cpr", "addr": {"transport": "socket", "type": "unix", "path": cpr}}]})
            d = QMP(f"{tmp}/dst.qmp", timeout=20, early=True)
            say(f"    destination's QMP answered {1000 * (time.time() - t0):.1f} ms after the "
                f"source's migrate was sent")
        else:
            ex(s, "src", "migrate", {"uri": f"unix:{main}"})
        info = s.wait_migration()
        say("    src: query-migrate → " + json.dumps(info)[:700])
        wait_status(d, ("completed", "failed"), timeout=20)
        ex(d, "dst", "query-migrate")
        ex(d, "dst", "query-status")
        time.sleep(0.2)
        d.send("query-status")
        s.send("query-status")
        say("\n    source events: " + json.dumps(
            [(e["event"], e["timestamp"], e.get("data", {}).get("status", "")) for e in s.events]))
        say("    destination events: " + json.dumps(
            [(e["event"], e["timestamp"], e.get("data", {}).get("status", "")) for e in d.events]))
        stop = [e for e in s.events if e["event"] == "STOP"]
        resume = [e for e in d.events if e["event"] == "RESUME"]
        if stop and resume:
            ts = lambda e: e["timestamp"]["seconds"] + e["timestamp"]["microseconds"] / 1e6  # noqa: E731
            say(f"    STOP (source) → RESUME (destination): "
                f"{1000 * (ts(resume[0]) - ts(stop[0])):.3f} ms")
        for q in (d, s):
            try:
                q.send("quit")
            except (EOFError, OSError):
                pass
            q.close()
        for p in (src, dst):
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
    finally:
        procs.close()
        shm.unlink(missing_ok=True)
        fillfile.unlink(missing_ok=True)
    lines = []
    for label in ("source", "destination"):
        for line in procs.stderr(label).splitlines():
            if mode != "cpr-transfer" and re.search(r":savevm_section_(start|end|skip) ", line):
                continue  # one pair per device section and RAM iteration: left out here
            lines.append(f"{label:<11} {line}")
    marks = checkpoints(lines)
    for a, b in (("src-downtime-start", "dst-precopy-bh-vm-started"),
                 ("src-downtime-start", "src-downtime-end")):
        if a in marks and b in marks:
            say(f"    trace: {a} → {b}: {1000 * (marks[b] - marks[a]):.3f} ms")
    text = f"# {mode}, QEMU {ver}\n" + "\n".join(lines) + "\n"
    if trace_out:
        with open(trace_out, "a") as f:
            f.write(text + "\n")
        say(f"    trace lines ({len(lines)}) appended to {trace_out}")
    else:
        say("\n```\n" + text + "```")


def checkpoints(lines: list[str]) -> dict[str, float]:
    """First time (s) of each vmstate_downtime_checkpoint in trace lines of the log
    backend with -msg timestamp=on: 'TID@SECONDS.MICROS:vmstate_downtime_checkpoint NAME'."""
    seen: dict[str, float] = {}
    for line in lines:
        m = re.search(r"(\d+\.\d{6}):vmstate_downtime_checkpoint (\S+)", line)
        if m:
            seen.setdefault(m.group(2), float(m.group(1)))
    return seen


# --------------------------------------------------------------------------- shared

def probe_shared(qemu: str, procs: Procs) -> None:
    tmp = procs.tmp
    ver = version_of(qemu)
    say(f"\n## precopy with x-ignore-shared — QEMU {ver}, 64 MiB, paused guest (-S)")
    shm = Path(f"/dev/shm/migfd-probe-{os.getpid()}")
    kinds = {
        "memfd": "memory-backend-memfd,id=ram0,size=64M,share=on",
        "file": f"memory-backend-file,id=ram0,size=64M,mem-path={shm},share=on",
    }
    for kind, obj in kinds.items():
        for ignore in (False, True):
            mig = f"{tmp}/mig-{kind}-{int(ignore)}.sock"
            common = ["-M", "pc,memory-backend=ram0", "-m", "64", "-object", obj, *BASE]
            show = kind == "file" and ignore
            dst = procs.start(f"dst-{kind}-{int(ignore)}", qemu, [*common, "-incoming", "defer",
                              "-qmp", f"unix:{tmp}/d-{kind}.qmp,server=on,wait=off"], show=show)
            src = procs.start(f"src-{kind}-{int(ignore)}", qemu, [*common, "-S",
                              "-qmp", f"unix:{tmp}/s-{kind}.qmp,server=on,wait=off"], show=show)
            d, s = QMP(f"{tmp}/d-{kind}.qmp"), QMP(f"{tmp}/s-{kind}.qmp")
            caps = {"capabilities": [{"capability": "x-ignore-shared", "state": ignore}]}
            for q in (d, s):
                q.cmd("migrate-set-capabilities", caps)
            d.cmd("migrate-incoming", uri=f"unix:{mig}")
            s.cmd("migrate", uri=f"unix:{mig}")
            info = s.wait_migration()
            ram = info.get("ram", {})
            say(f"- RAM {kind}, x-ignore-shared={str(ignore).lower()}: {info['status']}, "
                f"ram.transferred {ram.get('transferred')} B, normal pages {ram.get('normal')}, "
                f"duplicate (zero) {ram.get('duplicate')}, total-time {info.get('total-time')} ms")
            for q in (d, s):
                try:
                    q.send("quit")
                except (EOFError, OSError):
                    pass
                q.close()
            for p in (src, dst):
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
            procs.close()
            shm.unlink(missing_ok=True)


# --------------------------------------------------------------------------- devstate

def probe_devstate(qemu: str, procs: Procs) -> None:
    tmp = procs.tmp
    ver = version_of(qemu)
    major = major_minor(qemu)
    say(f"\n## device state of a pc machine — QEMU {ver}")
    walker = _load_walker()
    for smp in (1, 2):
        for shared in (False, True):
            out = tmp / f"dev-{smp}-{int(shared)}.bin"
            uri = f"file:{out}" if major >= (8, 2) else f"exec:cat > {out}"
            shm = Path(f"/dev/shm/migfd-probe-dev-{os.getpid()}")
            mem = (["-M", "pc,memory-backend=ram0", "-object",
                    f"memory-backend-file,id=ram0,size=64M,mem-path={shm},share=on"]
                   if shared else ["-M", "pc"])
            args = [*mem, "-m", "64", "-smp", str(smp), *BASE, "-S",
                    "-qmp", f"unix:{tmp}/dev.qmp,server=on,wait=off"]
            p = procs.start(f"dev-{smp}-{int(shared)}", qemu, args, show=(smp == 2 and shared))
            q = QMP(f"{tmp}/dev.qmp")
            if shared:
                q.cmd("migrate-set-capabilities",
                      capabilities=[{"capability": "x-ignore-shared", "state": True}])
            q.cmd("cont")
            time.sleep(0.5)
            q.cmd("migrate", uri=uri)
            info = q.wait_migration()
            q.send("quit")
            q.close()
            p.wait(5)
            shm.unlink(missing_ok=True)
            w = walker.walk(out.read_bytes())
            full = [x for x in w["sections"] if x["type"] == "FULL"]
            ramb = sum(x["bytes"] for x in w["sections"] if x["type"] != "FULL")
            vm = w["vmdesc"]["bytes"] if w["vmdesc"] else 0
            say(f"- smp {smp}, RAM {'shared file + x-ignore-shared' if shared else 'anonymous'}: file "
                f"{out.stat().st_size} B = header 8 + configuration {w['config']['bytes']} + RAM sections "
                f"{ramb} + commands {sum(c['bytes'] for c in w['commands'])} + device state "
                f"{sum(x['bytes'] for x in full)} B in {len(full)} FULL sections (payload "
                f"{sum(x['payload'] for x in full)} B) + EOF 1 + vmdesc {vm} B "
                f"(query-migrate ram.transferred {info.get('ram', {}).get('transferred')})")
            if smp == 2 and not shared:
                big = sorted(full, key=lambda x: -x["bytes"])[:6]
                say("  largest: " + ", ".join(f"{x['name']}/{x['instance']} {x['bytes']} B" for x in big))
    procs.close()


def _load_walker():
    import importlib.util
    spec = importlib.util.spec_from_file_location("stream_sections", HERE / "stream-sections.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


# --------------------------------------------------------------------------- main

def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probes", nargs="+", choices=["qmp-incoming", *TIMELINE_MODES, "precopy-filled",
                                                  "shared", "devstate"])
    ap.add_argument("--qemu", action="append", default=[], help="QEMU binary (repeatable)")
    ap.add_argument("--trace-out", type=Path, help="timeline probes: append the trace lines here")
    ap.add_argument("--mib", type=int, default=64, help="timeline probes: guest RAM in MiB")
    opts = ap.parse_args(argv)
    qemus = opts.qemu or [q for q in (shutil.which("qemu-system-x86_64"), str(REPO / ".qemu/qemu-10.0"))
                          if q and os.access(q, os.X_OK)]
    for probe in opts.probes:
        for qemu in qemus:
            if probe == "cpr-transfer" and major_minor(qemu) < (10, 0):
                say(f"\n(cpr-transfer skipped for QEMU {version_of(qemu)}: it needs 10.0)")
                continue
            with tempfile.TemporaryDirectory(prefix="qemu-probe.") as t:
                procs = Procs(Path(t))
                try:
                    {"qmp-incoming": lambda: probe_qmp_incoming(qemu, procs),
                     "cpr-transfer": lambda: probe_timeline(qemu, procs, probe, opts.trace_out, opts.mib),
                     "precopy-shared": lambda: probe_timeline(qemu, procs, probe, opts.trace_out, opts.mib),
                     "precopy-copied": lambda: probe_timeline(qemu, procs, probe, opts.trace_out, opts.mib),
                     "precopy-filled": lambda: probe_timeline(qemu, procs, "precopy-copied",
                                                              opts.trace_out, opts.mib, fill=True),
                     "shared": lambda: probe_shared(qemu, procs),
                     "devstate": lambda: probe_devstate(qemu, procs)}[probe]()
                finally:
                    procs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
