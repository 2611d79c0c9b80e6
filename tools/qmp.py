#!/usr/bin/env python3
"""A small QMP client for scripts that drive real QEMU (standard library only).

As a command:

    tools/qmp.py SOCKET STEP...

connects to the QMP UNIX socket SOCKET (waiting up to --timeout seconds for it to
appear), sends qmp_capabilities, then runs each STEP in order and prints one JSON line
per reply:

    'query-status'                                   a command without arguments
    'migrate {"uri": "file:/tmp/x.bin"}'             a command and its arguments
    'sleep 1'                                        wait 1 s
    'wait-migrate'                                   poll query-migrate until it ends
    'wait-event STOP'                                wait for an event

Exits 1 on a QMP error reply (unless --keep-going), or when a migration fails.
Events are printed too, with --events.

As a module: `with QMP(path) as q: q.cmd("query-status")`.
"""
from __future__ import annotations

import argparse
import json
import socket
import sys
import time

__all__ = ["QMP", "QMPError"]


class QMPError(Exception):
    """An error reply: .desc is QEMU's text, .klass its class."""

    def __init__(self, command: str, error: dict):
        self.command = command
        self.klass = error.get("class", "")
        self.desc = error.get("desc", "")
        super().__init__(f"{command}: {self.klass}: {self.desc}")


class QMP:
    def __init__(self, path: str, timeout: float = 10.0, early: bool = False):
        """early: send qmp_capabilities before the greeting arrives, for a QEMU whose
        -qmp is server=on,wait=on: the command waits in the socket until QEMU's main loop
        runs, so no event of the start (e.g. RESUME after an incoming migration) is lost."""
        self.path = path
        self.events: list[dict] = []
        self.greeting: dict = {}
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.002)
        sock.settimeout(timeout)
        self.sock = sock
        self.buf = b""
        if early:
            sock.sendall(b'{"execute": "qmp_capabilities"}\n')
            self.greeting = self._read()
            reply = self._reply()
            if "error" in reply:
                raise QMPError("qmp_capabilities", reply["error"])
        else:
            self.greeting = self._read()
            self.cmd("qmp_capabilities")

    def __enter__(self) -> "QMP":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"QMP socket {self.path} closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def _reply(self) -> dict:
        while True:
            msg = self._read()
            if "event" in msg:
                self.events.append(msg)
                continue
            return msg

    def send(self, command: str, args: dict | None = None) -> dict:
        """Send one command and return its whole reply ({"return": ..} or {"error": ..})."""
        msg: dict = {"execute": command}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        return self._reply()

    def cmd(self, command: str, args: dict | None = None, **kwargs):
        """Send one command; return its "return" value or raise QMPError."""
        reply = self.send(command, {**(args or {}), **kwargs} or None)
        if "error" in reply:
            raise QMPError(command, reply["error"])
        return reply.get("return")

    def wait_event(self, name: str, timeout: float = 30.0) -> dict:
        for i, ev in enumerate(self.events):
            if ev["event"] == name:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self._read()
            if "event" in msg and msg["event"] == name:
                return msg
            if "event" in msg:
                self.events.append(msg)
        raise TimeoutError(f"no {name} event within {timeout} s")

    def wait_migration(self, timeout: float = 120.0, poll: float = 0.05) -> dict:
        """Poll query-migrate until completed/failed/cancelled; return the last reply."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in ("completed", "failed", "cancelled"):
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"migration still {info.get('status')} after {timeout} s")
            time.sleep(poll)


def _run(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("socket")
    ap.add_argument("steps", nargs="*")
    ap.add_argument("--timeout", type=float, default=10.0, help="wait this long for the socket")
    ap.add_argument("--keep-going", action="store_true", help="go on after an error reply")
    ap.add_argument("--events", action="store_true", help="print events as they are seen")
    opts = ap.parse_args(argv)

    try:
        q = QMP(opts.socket, timeout=opts.timeout)
    except (OSError, EOFError) as e:
        print(f"qmp.py: {opts.socket}: {e}", file=sys.stderr)
        return 1
    status = 0

    def flush_events() -> None:
        if opts.events:
            for ev in q.events:
                print(json.dumps(ev), flush=True)
        q.events.clear()

    try:
        for step in opts.steps:
            name, _, rest = step.strip().partition(" ")
            if name == "sleep":
                time.sleep(float(rest))
            elif name == "wait-migrate":
                info = q.wait_migration()
                print(json.dumps({"return": info}), flush=True)
                if info.get("status") != "completed":
                    status = 1
                    break
            elif name == "wait-event":
                ev = q.wait_event(rest.strip())
                if opts.events:
                    print(json.dumps(ev), flush=True)
            else:
                args = json.loads(rest) if rest.strip() else None
                try:
                    reply = q.send(name, args)
                except (EOFError, OSError) as e:
                    if name == "quit":
                        break
                    print(f"qmp.py: {name}: QMP connection lost ({e})", file=sys.stderr)
                    return 1
                print(json.dumps(reply), flush=True)
                if "error" in reply and not opts.keep_going:
                    status = 1
                    break
            flush_events()
    finally:
        flush_events()
        q.close()
    return status


if __name__ == "__main__":
    sys.exit(_run(sys.argv[1:]))
