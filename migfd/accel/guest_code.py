"""The KVM guest's machine code: the bytes of ``guest.S`` (beside this file), assembled.

The source is the truth; these bytes are what GNU as made of it, committed
so that a VM needs no assembler. ``python -m migfd.accel.guest_code
--assemble`` prints them anew from ``guest.S``; a unit test does the same
where ``as`` is installed and fails when the two differ.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("guest.S")

#: 64-bit code, loaded at migfd.layout.GUEST_CODE_ADDR; position-independent
#: (its jumps are relative, its addresses the fixed ones of migfd.layout)
GUEST_CODE = (
    b"\x89\xf5\xc1\xe5\x06\x81\xc5\x00\x61\x00\x00\x89\x75\x00\xf0\xff"
    b"\x04\x25\x00\x70\x00\x00\xff\x04\xb5\x00\x71\x00\x00\x48\x8b\x04"
    b"\x25\x18\x60\x00\x00\x48\x85\xc0\x74\x2c\x0f\x31\x48\xc1\xe2\x20"
    b"\x48\x09\xd0\x48\x3b\x45\x10\x72\x1d\x66\xba\x10\x05\xee\xff\x45"
    b"\x20\x0f\x31\x48\xc1\xe2\x20\x48\x09\xd0\x48\x03\x04\x25\x18\x60"
    b"\x00\x00\x48\x89\x45\x10\x48\x8b\x04\x25\x10\x60\x00\x00\x48\x85"
    b"\xc0\x74\xab\x8b\x45\x00\x3b\x04\x25\x0c\x60\x00\x00\x72\x0c\x89"
    b"\x75\x00\x3b\x34\x25\x0c\x60\x00\x00\x73\x93\x0f\x31\x48\xc1\xe2"
    b"\x20\x48\x09\xd0\x48\x89\xc1\x48\x2b\x4d\x08\x72\x81\x8b\x14\x25"
    b"\x20\x60\x00\x00\x48\x39\xd1\x76\x04\x48\x89\x45\x08\x48\x8b\x14"
    b"\x25\x10\x60\x00\x00\x48\x01\x55\x08\x8b\x5d\x00\x89\xd8\x03\x04"
    b"\x25\x04\x60\x00\x00\x3b\x04\x25\x0c\x60\x00\x00\x72\x02\x89\xf0"
    b"\x89\x45\x00\x03\x1c\x25\x08\x60\x00\x00\x8d\x43\x01\x89\x45\x04"
    b"\x8b\x0c\x9d\x00\x00\x01\x00\xff\xc1\x48\xb8\x15\x7c\x4a\x7f\xb9"
    b"\x79\x37\x9e\x48\x0f\xaf\xc1\x48\x31\xd8\x48\x89\xdf\x48\xc1\xe7"
    b"\x0c\x48\x89\x1f\x48\x89\x4f\x08\x48\x89\x47\x10\x48\x89\x87\xf8"
    b"\x0f\x00\x00\x89\x0c\x9d\x00\x00\x01\x00\xc7\x45\x04\x00\x00\x00"
    b"\x00\x48\xff\x45\x18\xe9\xf4\xfe\xff\xff"
)  # 282 bytes


def assemble(source: Path = SOURCE) -> bytes | None:
    """``guest.S`` through GNU as (--32) and objcopy; None where either is missing."""
    if shutil.which("as") is None or shutil.which("objcopy") is None:
        return None
    with tempfile.TemporaryDirectory(prefix="migfd-guest-") as tmp:
        obj = os.path.join(tmp, "guest.o")
        out = os.path.join(tmp, "guest.bin")
        subprocess.run(["as", "--64", "-o", obj, str(source)], check=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", obj, out], check=True)
        return Path(out).read_bytes()


def _python_literal(code: bytes) -> str:
    return "\n".join('    b"' + "".join(f"\\x{b:02x}" for b in code[i:i + 16]) + '"'
                     for i in range(0, len(code), 16))


if __name__ == "__main__":
    if sys.argv[1:] != ["--assemble"]:
        sys.exit("usage: python -m migfd.accel.guest_code --assemble")
    code = assemble()
    if code is None:
        sys.exit("needs GNU as and objcopy")
    print(f"GUEST_CODE = (\n{_python_literal(code)}\n)  # {len(code)} bytes")
