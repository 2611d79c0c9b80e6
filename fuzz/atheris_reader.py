"""Coverage-guided fuzzing of the stream reader with atheris (long runs, outside CI).

    pip install atheris        # or: pip install -e '.[fuzz]'
    mkdir -p /tmp/migfd-corpus
    python fuzz/atheris_reader.py /tmp/migfd-corpus tests/data/qemu/ -max_total_time=3600

libFuzzer writes new inputs into the FIRST directory, so give it a scratch
one; the seeds are the real QEMU 7.2 streams in tests/data/qemu/ (add more
directories, e.g. streams saved by `migfd` file: migrations). The invariant is
the one the Hypothesis tests hold in CI: the reader yields events or raises
StreamError, never anything else, and never hangs. Input bytes are split into
chunks and fds by the fuzzer, so fd records without service bytes (and the
reverse) are explored too.
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports():
    from migfd.errors import StreamError
    from migfd.stream import NEED_DATA, StreamReader
    from migfd.stream.vmstate import Bool, Fd, Subsection, UInt32, VBuffer, VMStateDescription

# A device with every kind of field, so FULL sections get past the lookup.
_SUB = VMStateDescription("dev/sub", 1, 1, (UInt32("n"),))
_DEV = VMStateDescription("dev", 1, 1, (Bool("b"), VBuffer("v", max_size=4096), Fd("fd")),
                          (Subsection(_SUB),))
_NULL = os.open(os.devnull, os.O_RDONLY)


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    reader = StreamReader({"dev": _DEV}, ram_runs=fdp.ConsumeBool(), max_queued_fds=8)
    try:
        while fdp.remaining_bytes():
            chunk = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 4096))
            fds = [os.dup(_NULL) for _ in range(fdp.ConsumeIntInRange(0, 2))]
            reader.receive_data(chunk, fds)
            while (event := reader.next_event()) is not NEED_DATA:
                for fd in getattr(event, "fds", ()):
                    os.close(fd)
        reader.receive_eof()
        while reader.next_event() is not NEED_DATA:
            pass
    except StreamError:
        pass
    finally:
        reader.close()


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
