#!/usr/bin/env python3
"""List the sections of a QEMU migration stream file, with offsets and sizes.

    tools/stream-sections.py FILE [--summary]

Standard library only; independent of migfd, to cross-check it. RAM records are
parsed; every other section is delimited by its footer (0x7e + be32 section id),
so no vmdesc is needed: it also reads streams saved with suppress-vmdesc=on.
"""
from __future__ import annotations

import argparse
import json
import struct
import sys

EOF, START, PART, END, FULL, SUBSECTION, VMDESC, CONFIG, COMMAND, FOOTER = (
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x7E)
COMMANDS = {1: "OPEN_RETURN_PATH", 2: "PING", 3: "REQ_PAGES", 4: "POSTCOPY_ADVISE",
            5: "POSTCOPY_LISTEN", 6: "POSTCOPY_RUN", 7: "POSTCOPY_RAM_DISCARD",
            8: "POSTCOPY_RESUME", 9: "RECV_BITMAP", 10: "ENABLE_COLO", 11: "SWITCHOVER_START"}
# RAM record flags (migration/ram.c)
R_ZERO, R_MEM_SIZE, R_PAGE, R_EOS, R_CONTINUE, R_XBZRLE, R_HOOK, R_COMPRESS, R_MFLUSH = (
    0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0x100, 0x200)
PAGE = 4096


class Reader:
    def __init__(self, data: bytes):
        self.d, self.p = data, 0

    def take(self, n: int) -> bytes:
        if self.p + n > len(self.d):
            raise ValueError(f"truncated at {self.p} (wanted {n} bytes)")
        b = self.d[self.p:self.p + n]
        self.p += n
        return b

    def u8(self) -> int: return self.take(1)[0]
    def be16(self) -> int: return struct.unpack(">H", self.take(2))[0]
    def be32(self) -> int: return struct.unpack(">I", self.take(4))[0]
    def be64(self) -> int: return struct.unpack(">Q", self.take(8))[0]
    def name(self) -> str: return self.take(self.u8()).decode("latin-1")


def parse_config(r: Reader) -> dict:
    cfg = {"machine": r.take(r.be32()).decode("latin-1"), "subsections": []}
    while r.p < len(r.d) and r.d[r.p] == SUBSECTION:
        r.u8()
        name, version = r.name(), r.be32()
        sub = {"name": name, "version": version}
        if name.endswith("/capabilities"):
            sub["capabilities"] = [r.name() for _ in range(r.be32())]
        elif name.endswith("/target-page-bits"):
            sub["target_page_bits"] = r.be32()
        elif name.endswith("/uuid"):
            sub["uuid"] = r.take(16).hex()
        else:
            raise ValueError(f"unknown configuration subsection {name!r} at {r.p}")
        cfg["subsections"].append(sub)
    return cfg


def parse_ram(r: Reader, start: bool, ignore_shared: bool, stats: dict) -> None:
    """RAM payload up to and including its EOS."""
    while True:
        word = r.be64()
        flags = word & (PAGE - 1)
        if flags & R_MEM_SIZE:
            total = word & ~(PAGE - 1)
            while total > 0:
                block, length = r.name(), r.be64()
                if ignore_shared:
                    r.be64()  # the block's guest address
                stats["blocks"].append((block, length))
                total -= length
            continue
        if flags & R_EOS:
            return
        if flags & R_MFLUSH or flags & R_HOOK:
            continue
        if not flags & R_CONTINUE:
            r.name()
        if flags & R_ZERO:
            r.u8()
            stats["zero"] += 1
        elif flags & R_PAGE:
            r.take(PAGE)
            stats["page"] += 1
        else:
            raise ValueError(f"RAM record flags {flags:#x} not handled at {r.p - 8}")


def find_footer(r: Reader, sid: int) -> int:
    """Offset of this section's footer: the first 0x7e + be32 id after which the
    stream goes on with something that looks like the next record."""
    pat = bytes([FOOTER]) + struct.pack(">I", sid)
    at = r.p
    while True:
        at = r.d.find(pat, at)
        if at < 0:
            raise ValueError(f"no footer for section {sid} after {r.p}")
        nxt = r.d[at + 5:at + 6]
        if nxt == b"" or nxt[0] in (EOF, START, PART, END, FULL, COMMAND):
            return at
        at += 1


def walk(data: bytes) -> dict:
    r = Reader(data)
    magic, version = r.be32(), r.be32()
    if magic != 0x5145564D or version != 3:
        raise ValueError("not a QEMU migration stream (QEVM v3)")
    out: dict = {"sections": [], "config": None, "vmdesc": None, "commands": []}
    names: dict[int, tuple] = {}
    ram = {"blocks": [], "zero": 0, "page": 0}
    ignore_shared = False
    while True:
        off = r.p
        kind = r.u8()
        if kind == CONFIG:
            out["config"] = parse_config(r)
            caps = [c for s in out["config"]["subsections"] for c in s.get("capabilities", [])]
            ignore_shared = "x-ignore-shared" in caps
            out["config"]["bytes"] = r.p - off
            continue
        if kind == COMMAND:
            cmd, length = r.be16(), r.be16()
            r.take(length)
            out["commands"].append({"offset": off, "command": COMMANDS.get(cmd, cmd), "bytes": r.p - off})
            continue
        if kind == EOF:
            out["eof"] = off
            if r.p < len(data):
                if r.u8() != VMDESC:
                    raise ValueError(f"unexpected byte after EOF at {r.p - 1}")
                desc = r.take(r.be32())
                out["vmdesc"] = {"offset": r.p - len(desc) - 5, "bytes": len(desc) + 5,
                                 "json": json.loads(desc)}
            out["trailing"] = len(data) - r.p
            break
        if kind not in (START, PART, END, FULL):
            raise ValueError(f"unknown section type {kind:#x} at {off}")
        sid = r.be32()
        if kind in (START, FULL):
            names[sid] = (r.name(), r.be32(), r.be32())
        name, instance, ver = names.get(sid, ("?", 0, 0))
        body = r.p
        if name == "ram":
            parse_ram(r, kind == START, ignore_shared, ram)
            if r.u8() != FOOTER or r.be32() != sid:
                raise ValueError(f"bad footer of ram section at {r.p - 5}")
        else:
            r.p = find_footer(r, sid) + 5
        out["sections"].append({
            "offset": off, "type": {START: "START", PART: "PART", END: "END", FULL: "FULL"}[kind],
            "id": sid, "name": name, "instance": instance, "version": ver,
            "payload": r.p - 5 - body, "bytes": r.p - off})
    out["ram"] = ram
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--summary", action="store_true", help="only the totals")
    ap.add_argument("--json", action="store_true", help="print the result as JSON (vmdesc left out)")
    opts = ap.parse_args(argv)
    data = open(opts.file, "rb").read()
    w = walk(data)
    if opts.json:
        if w["vmdesc"]:
            w["vmdesc"].pop("json")
        print(json.dumps(w, indent=1))
        return 0
    full = [s for s in w["sections"] if s["type"] == "FULL"]
    iterable = [s for s in w["sections"] if s["type"] != "FULL"]
    if not opts.summary:
        if w["config"]:
            print(f"{8:>8}  CONFIG  {w['config']['machine']}  {w['config']['bytes']} B "
                  f"{[s['name'] for s in w['config']['subsections']]}")
        for s in w["sections"]:
            print(f"{s['offset']:>8}  {s['type']:<6} id={s['id']:<3} {s['name']}/{s['instance']} "
                  f"v{s['version']}  payload {s['payload']} B, section {s['bytes']} B")
        for c in w["commands"]:
            print(f"{c['offset']:>8}  COMMAND {c['command']}")
        print(f"{w['eof']:>8}  EOF")
        if w["vmdesc"]:
            print(f"{w['vmdesc']['offset']:>8}  VMDESC  {w['vmdesc']['bytes']} B")
    ram = w["ram"]
    print(f"file {len(data)} B; configuration: {w['config']['machine'] if w['config'] else 'none'}; "
          f"vmdesc: {w['vmdesc']['bytes'] if w['vmdesc'] else 'none'} B; "
          f"commands: {[c['command'] for c in w['commands']]}")
    print(f"RAM: {len(iterable)} sections, {sum(s['bytes'] for s in iterable)} B "
          f"({ram['page']} PAGE, {ram['zero']} ZERO records; blocks {[b for b, _ in ram['blocks']]})")
    print(f"device state: {len(full)} FULL sections, {sum(s['bytes'] for s in full)} B with headers "
          f"and footers, {sum(s['payload'] for s in full)} B of payload")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
