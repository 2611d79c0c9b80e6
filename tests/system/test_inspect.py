"""``migfd inspect`` on real streams: written by QEMU 7.2 and 10.0 themselves (with and
without a device description), and by ``file:`` migrations of real ``migfd vm`` processes.

The QEMU streams are described in tests/data/qemu/README.md; the offsets below
come from an independent walk of those files (/work/notes/vmdesc/*.walk.txt),
not from migfd. Every section that inspect lists is also checked against the
bytes of the file: its type byte at its offset, its footer at its end.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import KVM_UNUSABLE, VMGroup

from migfd.errors import StreamError
from migfd.stream import StreamReader
from migfd.stream.annotate import walk
from migfd.stream.inspect import format_summary, inspect_stream
from migfd.stream.vmdesc import find_vmdesc, lookup_from_vmdesc

pytestmark = pytest.mark.timeout(120)

DATA = Path(__file__).parents[1] / "data" / "qemu"
TYPE_BYTE = {"START": 0x01, "PART": 0x02, "END": 0x03, "FULL": 0x04}
PC_BLOCKS = [("pc.ram", 16 << 20), ("/rom@etc/acpi/tables", 128 << 10), ("pc.bios", 256 << 10),
             ("pc.rom", 128 << 10), ("/rom@etc/table-loader", 4096), ("/rom@etc/acpi/rsdp", 4096)]

#: file -> what QEMU wrote (README.md, and the independent walk of each file)
QEMU_STREAMS = {
    "pc-16m.bin": dict(
        machine="pc-i440fx-7.2", capabilities=[], blocks=PC_BLOCKS, zero=4096 + 81, normal=49,
        full=30, start=0x1A, part=0xC4, end=0x3A58B, first_full=("timer", 0x3A59D),
        last_full=("globalstate", 0x3D750), eof=0x3D7D6, vmdesc_len=98649),
    "pc-16m-ran1s.bin": dict(
        machine="pc-i440fx-7.2", capabilities=[], blocks=PC_BLOCKS, zero=4035 + 80, normal=61 + 50,
        full=30, start=0x1A, part=0xC4, end=0x7854D, first_full=("timer", 0x7855F),
        last_full=("globalstate", 0x7B731), eof=0x7B7B7, vmdesc_len=98771),
    "q35-16m.bin": dict(
        machine="pc-q35-7.2", capabilities=[], blocks=PC_BLOCKS, zero=4096 + 79, normal=51,
        full=29, start=0x17, part=0xC1, end=0x3C586, first_full=("timer", 0x3C598),
        last_full=("globalstate", 0x443F2), eof=0x44478, vmdesc_len=43520),
    "pc-16m-shared-ignore.bin": dict(
        machine="pc-i440fx-7.2", capabilities=["x-ignore-shared"],
        blocks=[("mem", 16 << 20)] + PC_BLOCKS[1:], zero=81, normal=49,
        full=30, start=0x4E, part=0x125, end=0x315E5, first_full=("timer", 0x315F7),
        last_full=("globalstate", 0x347AA), eof=0x34830, vmdesc_len=98649),
}


def inspect_cli(path: str | os.PathLike, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "migfd.cli", "inspect", *extra, str(path)],
                          capture_output=True, text=True, timeout=60)


def inspect_json(path: str | os.PathLike) -> dict:
    out = inspect_cli(path, "--json")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    return json.loads(out.stdout)


def check_sections_against_bytes(data: bytes, sections: list[dict]) -> None:
    """Each listed section starts with its type byte and id, ends with its footer, in file order."""
    previous_end = 0
    for sec in sections:
        at, size = sec["offset"], sec["size"]
        assert at >= previous_end, f"section {sec} overlaps the one before"
        assert data[at] == TYPE_BYTE[sec["type"]], sec
        assert struct.unpack_from(">I", data, at + 1)[0] == sec["section_id"], sec
        assert data[at + size - 5] == 0x7E, f"no footer at the end of {sec}"
        assert struct.unpack_from(">I", data, at + size - 4)[0] == sec["section_id"], sec
        previous_end = at + size


# -- QEMU 7.2 streams --------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(QEMU_STREAMS))
def test_inspect_reads_real_qemu_streams(name):
    want = QEMU_STREAMS[name]
    path = DATA / name
    data = path.read_bytes()
    summary = inspect_json(path)

    assert summary["size"] == len(data)
    assert summary["magic"] == "0x5145564d" and summary["version"] == 3
    assert summary["configuration"]["machine"] == want["machine"]
    assert summary["configuration"]["capabilities"] == want["capabilities"]
    assert summary["configuration"]["offset"] == 8

    blocks = [(b["id"], b["length"]) for b in summary["ram"]["blocks"]]
    assert blocks == want["blocks"]
    assert summary["ram"]["zero_pages"] == want["zero"]
    assert summary["ram"]["normal_pages"] == want["normal"]

    sections = summary["sections"]
    kinds = [(s["type"], s["name"]) for s in sections]
    assert kinds[:3] == [("START", "ram"), ("PART", "ram"), ("END", "ram")]
    assert [s["offset"] for s in sections[:3]] == [want["start"], want["part"], want["end"]]
    assert all(s["section_id"] == 2 and s["version_id"] == 4 for s in sections[:3])
    full = [s for s in sections if s["type"] == "FULL"]
    assert len(full) == want["full"] == len(sections) - 3
    assert (full[0]["name"], full[0]["offset"]) == want["first_full"]
    assert (full[-1]["name"], full[-1]["offset"]) == want["last_full"]
    # Two instances of one device are two sections (dma, i8259).
    assert sum(1 for s in full if s["name"] == "dma") == 2
    assert sorted(s["instance_id"] for s in full if s["name"] == "i8259") == [0, 1]
    assert next(s for s in full if s["name"] == "cpu")["version_id"] == 12
    check_sections_against_bytes(data, sections)
    # After the last section: EOF, then the vmdesc to the end of the file.
    eof = full[-1]["offset"] + full[-1]["size"]
    assert eof == want["eof"] and data[eof] == 0x00 and data[eof + 1] == 0x06
    assert struct.unpack_from(">I", data, eof + 2)[0] == want["vmdesc_len"] == len(data) - eof - 6

    vmdesc = summary["vmdesc"]
    assert vmdesc == json.loads(data[eof + 6:])
    assert vmdesc["page_size"] == 4096
    names = [(d["name"], d["instance_id"]) for d in vmdesc["devices"]]
    assert names == [(s["name"], s["instance_id"]) for s in full]
    assert summary["commands"] == []  # no return path, no postcopy: no commands in 7.2


@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_the_walk_names_every_byte_of_a_real_qemu_stream(chunk):
    # the one walk under both `migfd inspect` and the protocol tour, fed as a file is read
    path = DATA / "pc-16m.bin"
    data = path.read_bytes()
    reader = StreamReader(lookup_from_vmdesc(find_vmdesc(path)), ram_runs=True)
    try:
        events = list(walk(reader, (data[i:i + chunk] for i in range(0, len(data), chunk))))
    finally:
        reader.close()
    records = [r for e in events for r in e.records]
    assert [r.offset for r in records] == [0] + [r.offset + r.size for r in records[:-1]]
    assert records[-1].offset + records[-1].size == len(data)
    assert all(e.records[0].offset == e.offset and sum(r.size for r in e.records) == e.size for e in events)
    footers = [r for r in records if r.kind.endswith("footer (0x7e)")]
    assert len(footers) == 3 + QEMU_STREAMS["pc-16m.bin"]["full"]
    for r in footers:
        assert data[r.offset + r.size - 5] == 0x7E
    assert {r.section for r in records if r.kind.startswith("RAM page")} == {"ram"}
    assert records[-1].kind == "vmdesc (0x06)"


def test_inspect_text_form_of_a_real_qemu_stream():
    out = inspect_cli(DATA / "pc-16m-shared-ignore.bin")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "configuration: machine pc-i440fx-7.2, capabilities: x-ignore-shared" in text
    assert "pages: 49 normal, 81 zero" in text
    assert "device description: 30 devices" in text
    for name in ("globalstate", "0000:00:01.3/piix4_pm", "mem"):
        assert name in text


TRUNCATIONS = {
    "in the header": 6,
    "in the configuration": 20,
    "in the RAM block list": 100,
    "in a RAM page": 120_000,
    "in the device sections": 0x3C000,
    "in the device description": 0x3D7D7 + 5 + 50_000,
    "one byte short": 350516,
}


@pytest.mark.parametrize("cut", list(TRUNCATIONS.values()), ids=list(TRUNCATIONS))
def test_inspect_of_a_truncated_qemu_stream_is_one_line_error(workdir, cut):
    data = (DATA / "pc-16m.bin").read_bytes()
    path = Path(workdir) / "cut.bin"
    path.write_bytes(data[:cut])
    for extra in ((), ("--json",)):
        out = inspect_cli(path, *extra)
        assert out.returncode != 0
        assert "Traceback" not in out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("migfd inspect: error: "), out.stderr
        assert out.stdout == ""


@pytest.mark.parametrize("content", [b"", b"hello world, not a stream", b"QEVM\x00\x00\x00\x02"],
                         ids=["empty", "text", "version-2"])
def test_inspect_of_something_else_is_one_line_error(workdir, content):
    path = Path(workdir) / "x.bin"
    path.write_bytes(content)
    out = inspect_cli(path)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# -- QEMU 10.0's streams, and streams without a device description ----------------------------
# (tests/unit/test_fuzz_corpus.py reads them with the reader alone, fuzzed and byte by byte)

#: file -> what QEMU 10.0, or QEMU without a vmdesc, wrote (README.md and the same independent walk)
QEMU_STREAMS_10_NOVMDESC = {
    "10.0-pc-16m-novmdesc.bin": dict(
        vmdesc=False, machine=None, normal=114, zero=4112, ram_id=1, switchover=505144, full=30,
        first_full=("timer", 0, 505167, 48), last_full=("globalstate", 39, 517921, 134), device_bytes=12888),
    "7.2-pc-16m-novmdesc.bin": dict(
        vmdesc=False, machine=None, normal=115, zero=4115, ram_id=2, switchover=None, full=30,
        first_full=("timer", 0, 509300, 48), last_full=("globalstate", 40, 522054, 134), device_bytes=12888),
    "10.0-pc-16m-ran1s.bin": dict(
        vmdesc=True, machine="pc-i440fx-10.0", normal=114, zero=4112, ram_id=1, switchover=505163, full=30,
        first_full=("timer", 0, 505186, 48), last_full=("globalstate", 39, 517940, 134), device_bytes=12888),
    "10.0-q35-16m-ran1s.bin": dict(
        vmdesc=True, machine="pc-q35-10.0", normal=121, zero=4105, ram_id=1, switchover=533825, full=29,
        first_full=("timer", 0, 533848, 48), last_full=("globalstate", 38, 566225, 134), device_bytes=32511),
}


@pytest.mark.parametrize("name", sorted(QEMU_STREAMS_10_NOVMDESC))
def test_inspect_reads_qemu_streams_with_and_without_vmdesc(name):
    want = QEMU_STREAMS_10_NOVMDESC[name]
    path = DATA / name
    data = path.read_bytes()
    summary = inspect_stream(str(path)).to_json()

    assert summary["size"] == len(data)
    if want["machine"] is None:
        assert summary["configuration"] is None
    else:
        assert summary["configuration"]["machine"] == want["machine"]
    assert [(b["id"], b["length"]) for b in summary["ram"]["blocks"]] == PC_BLOCKS
    assert (summary["ram"]["normal_pages"], summary["ram"]["zero_pages"]) == (want["normal"], want["zero"])

    sections = summary["sections"]
    assert [(s["type"], s["name"], s["section_id"], s["decoded"]) for s in sections[:3]] == [
        (kind, "ram", want["ram_id"], True) for kind in ("START", "PART", "END")]
    full = sections[3:]
    assert len(full) == want["full"] and {s["type"] for s in full} == {"FULL"}
    assert {s["decoded"] for s in full} == {want["vmdesc"]}
    assert (full[0]["name"], full[0]["section_id"], full[0]["offset"], full[0]["size"]) == want["first_full"]
    assert (full[-1]["name"], full[-1]["section_id"], full[-1]["offset"], full[-1]["size"]) == want["last_full"]
    assert sum(s["size"] for s in full) == want["device_bytes"]
    check_sections_against_bytes(data, sections)
    eof = full[-1]["offset"] + full[-1]["size"]
    assert data[eof] == 0x00

    if want["switchover"] is None:
        assert summary["commands"] == []  # QEMU 7.2 has no SWITCHOVER_START
    else:
        assert summary["commands"] == [
            {"command": 11, "name": "SWITCHOVER_START", "offset": want["switchover"], "length": 0}]
        assert data[want["switchover"]:want["switchover"] + 5] == b"\x08\x00\x0b\x00\x00"
    if want["vmdesc"]:
        assert summary["vmdesc_size"] == len(data) - eof - 1
        assert [d["name"] for d in summary["vmdesc"]["devices"]] == [s["name"] for s in full]
    else:
        assert (summary["vmdesc"], summary["vmdesc_size"]) == (None, None)
        assert eof == len(data) - 1  # EOF is the last byte


def test_text_form_of_a_stream_with_vmdesc_is_unchanged_by_the_mode():
    text = format_summary(inspect_stream(str(DATA / "10.0-q35-16m-ran1s.bin")))
    assert "not decoded" not in text and "delimited" not in text
    assert "device description: 29 devices" in text
    assert "COMMAND SWITCHOVER_START (11) at 533825" in text


@pytest.mark.parametrize("cut", [600, 505150, 505167 + 20, 518055], ids=[
    "in-ram-part", "in-ram-end", "in-a-device-section", "before-eof"])
def test_a_truncated_stream_without_vmdesc_is_a_stream_error(workdir, cut):
    path = Path(workdir) / "cut.bin"
    path.write_bytes((DATA / "10.0-pc-16m-novmdesc.bin").read_bytes()[:cut])
    with pytest.raises(StreamError):
        inspect_stream(str(path))


def test_a_stream_with_a_section_missing_from_its_vmdesc_lists_it(workdir):
    """A vmdesc that leaves a device out: inspect delimits that section and says so, where
    before it stopped with "unknown section".
    """
    data = bytearray((DATA / "10.0-pc-16m-ran1s.bin").read_bytes())
    # Rename 'timer' (section id 0) to 'tImer' in its header: the vmdesc describes no such device.
    at = 505186
    assert data[at + 6:at + 11] == b"timer"
    data[at + 7] = ord("I")
    path = Path(workdir) / "renamed.bin"
    path.write_bytes(bytes(data))
    summary = inspect_stream(str(path))
    opaque = [s for s in summary.sections if not s["decoded"]]
    assert [(s["name"], s["offset"], s["size"]) for s in opaque] == [("tImer", at, 48)]
    assert "1 section not in the device description: delimited by their footers, not decoded" \
        in format_summary(summary)


@pytest.mark.parametrize("name", ["10.0-pc-16m-novmdesc.bin", "7.2-pc-16m-novmdesc.bin"])
def test_inspect_cli_delimits_the_sections_of_a_stream_without_vmdesc(name):
    # the details in process above; here the command a user runs, both forms
    path = DATA / name
    data = path.read_bytes()
    summary = inspect_json(path)
    assert summary["configuration"] is None and summary["vmdesc"] is None
    sections = summary["sections"]
    assert [(s["type"], s["decoded"]) for s in sections[:3]] == [("START", True), ("PART", True), ("END", True)]
    assert [(s["type"], s["decoded"]) for s in sections[3:]] == [("FULL", False)] * 30
    check_sections_against_bytes(data, sections)
    assert sections[-1]["offset"] + sections[-1]["size"] == len(data) - 1  # then EOF, the last byte
    out = inspect_cli(path)
    assert out.returncode == 0, out.stderr
    assert "no device description: 30 sections delimited by their footers, not decoded" in out.stdout
    assert ("COMMAND SWITCHOVER_START (11) at 505144" in out.stdout) == name.startswith("10.0")
    assert "configuration: none" in out.stdout
    timer = next(line for line in out.stdout.splitlines() if " timer " in line)
    assert timer.split()[-2:] == ["not", "decoded"]


def test_inspect_of_a_truncated_stream_without_vmdesc_is_one_line_error(workdir):
    path = Path(workdir) / "cut.bin"
    # cut inside 0000:00:01.3/piix4_pm, section id 16, at 508984 .. 511456
    path.write_bytes((DATA / "10.0-pc-16m-novmdesc.bin").read_bytes()[:510_000])
    out = inspect_cli(path)
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "migfd inspect: error: section '0000:00:01.3/piix4_pm' (id 16) has no footer before the end "
        "of the stream (at byte offset 508984)"]


# -- streams written by migfd VMs ---------------------------------------------------------------


@pytest.fixture(scope="module")
def migfd_stream():
    """One ``file:`` migration of a running migfd VM (RAM every page of which is stamped + a chardev)."""
    workdir = tempfile.mkdtemp(prefix="migfd-", dir="/tmp")
    group = VMGroup(workdir)
    path = os.path.join(workdir, "vm.bin")

    async def write():
        try:
            src = await group.start(
                "src", objects=("memory-backend-memfd,id=ram0,size=16M,fill=on,backend-transfer=on",),
                chardevs=(f"socket,id=ch0,path={workdir}/ch0.sock,server=on,backend-transfer=on",),
                dirty_rate_bytes_s=1 << 20)
            await src.execute("migrate", {"uri": f"file:{path}"})
            return await src.wait_migration(60)
        finally:
            await group.aclose()

    try:
        info = asyncio.run(asyncio.wait_for(write(), 90))
        assert info["status"] == "completed", info.get("error-desc")
        yield path, info
    finally:
        group.kill_all()
        shutil.rmtree(workdir, ignore_errors=True)


def test_inspect_reads_a_migfd_file_migration(migfd_stream):
    path, info = migfd_stream
    data = Path(path).read_bytes()
    summary = inspect_json(path)
    assert summary["size"] == len(data) == info["x-bytes-sent"]
    assert summary["configuration"]["machine"] == "migfd-pc"
    assert summary["configuration"]["capabilities"] == []  # backend-transfer is off for file:
    assert summary["ram"]["blocks"] == [{"id": "ram0", "length": 16 << 20}]
    # The same page counts the source reported; every page of filled RAM is a normal page.
    assert summary["ram"]["normal_pages"] == info["ram"]["normal"]
    assert summary["ram"]["zero_pages"] == info["ram"]["duplicate"]
    assert summary["ram"]["normal_pages"] >= 16 * 256

    sections = summary["sections"]
    kinds = [(s["type"], s["name"]) for s in sections]
    iterations = info["ram"]["dirty-sync-count"]
    assert kinds[0] == ("START", "ram")
    assert kinds[1:1 + iterations] == [("PART", "ram")] * iterations
    # a guest on KVM has a vCPU, whose section comes before the devices' (as in QEMU)
    cpus = [("FULL", "cpu")] if not KVM_UNUSABLE else []
    assert kinds[1 + iterations:] == [("END", "ram"), *cpus, ("FULL", "ram0/memory-backend-memfd"),
                                      ("FULL", "ch0/chardev-socket"), ("FULL", "migfd-migration")]
    check_sections_against_bytes(data, sections)
    # SWITCHOVER_START (11), between the last PART and the END.
    assert [c["command"] for c in summary["commands"]] == [11]
    end = next(s for s in sections if s["type"] == "END")
    assert sections[iterations]["offset"] < summary["commands"][0]["offset"] < end["offset"]

    devices = {d["name"]: d for d in summary["vmdesc"]["devices"]}
    assert set(devices) == {"ram0/memory-backend-memfd", "ch0/chardev-socket", "migfd-migration",
                            *(name for _, name in cpus)}
    ram_fields = [f["name"] for f in devices["ram0/memory-backend-memfd"]["fields"]]
    assert ram_fields[:2] == ["size", "pages_dirtied"]
    chardev_fields = [f["name"] for f in devices["ch0/chardev-socket"]["fields"]]
    assert [n for n in chardev_fields if not n.endswith(".len")][:4] == [
        "path", "connected", "lines_echoed", "pending"]


def test_inspect_text_form_of_a_migfd_stream(migfd_stream):
    path, info = migfd_stream
    out = inspect_cli(path)
    assert out.returncode == 0, out.stderr
    assert "configuration: machine migfd-pc, capabilities: none" in out.stdout
    assert f"pages: {info['ram']['normal']} normal, {info['ram']['duplicate']} zero" in out.stdout
    assert "ch0/chardev-socket" in out.stdout


def test_inspect_of_a_truncated_migfd_stream_is_one_line_error(migfd_stream, workdir):
    path, _ = migfd_stream
    data = Path(path).read_bytes()
    for cut in (len(data) // 2, len(data) - 1):
        short = Path(workdir) / "cut.bin"
        short.write_bytes(data[:cut])
        out = inspect_cli(short, "--json")
        assert out.returncode != 0
        assert "Traceback" not in out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
