"""Guest RAM in a memfd (QEMU's memory-backend-memfd), with a workload that dirties it.

The guest stamps pages so RAM can be verified after a migration: page ``i``
of generation ``g`` holds ``i``, ``g`` and a check word in its first 24 bytes
and the check word again in its last 8; a table right after the firmware
area (:mod:`migfd.layout`; also guest RAM, so it migrates like the rest)
keeps the current generation of every page. A page that arrived stale, torn
or at the wrong place fails :meth:`MemoryBackendMemfd.verify`.

The dirty bitmap (a byte a page) holds what the VMM itself writes: the
thread accelerator's stamps and counter, all pages at the start of a
migration. Under KVM the guest's own writes come from KVM's dirty log
(:attr:`MemoryBackendMemfd.dirty_log`), merged into it at each sync.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import random
import select
import stat
import struct
import threading
import time
from typing import Any, Callable

import numpy as np

from migfd.devices.base import Device, GuestThread, RunControl, register_device
from migfd.devices.qemu_opts import opt_bool, opt_size
from migfd.errors import MigrationError
from migfd.fds import close_fd
from migfd.layout import (
    C_DIRTIED,
    C_INFLIGHT,
    FIRMWARE_BYTES,
    GUEST_PROGRESS_ADDR,
    MAILBOX_ADDR,
    MAILBOX_MAGIC,
    MAX_VCPUS,
    MB_MAGIC,
    TABLE_ADDR,
    first_data_page,
    percpu_addr,
    table_pages,
)
from migfd.stream import TARGET_PAGE_SIZE, Fd, Subsection, UInt64, VMStateDescription
from migfd.threads import fine_timer_slack

PAGE = TARGET_PAGE_SIZE
#: madvise(2) advice that allocates every page of a range for writing (Linux 5.14)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)
_ZERO = bytes(PAGE)
_U32 = struct.Struct("<I")
#: the thread accelerator's pause between two bumps of the progress counter; with
#: the thread's timer slack at 1 µs and the bump's own cost a bump comes about every
#: 85 µs (11,800 a second measured here; 80 µs of pause gave 9,000, too few)
PROGRESS_INTERVAL_S = 60e-6
_GOLDEN = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1

_BACKEND = VMStateDescription(
    "memory-backend-memfd/backend", version_id=1, minimum_version_id=1,
    fields=(Fd("fd"),))

VMSD = VMStateDescription(
    "memory-backend-memfd", version_id=1, minimum_version_id=1,
    fields=(UInt64("size"), UInt64("pages_dirtied")),
    subsections=(Subsection(_BACKEND, needed=lambda state: state.get("fd") is not None),))


def check_word(index: int, generation: int) -> int:
    return (index ^ (generation * _GOLDEN)) & _MASK64


@register_device
class MemoryBackendMemfd(Device):
    """``-object memory-backend-memfd,id=ID,size=SIZE[,fill=on][,backend-transfer=on]``."""

    group = "object"
    kind = "memory-backend-memfd"
    vmsd = VMSD

    def __init__(self, id: str, size: int, backend_transfer: bool = False,
                 seed: int = 0, prefill: bool = False):
        super().__init__(id, backend_transfer)
        self.prefill = prefill
        if size < 2 * PAGE or size % PAGE:
            raise MigrationError(f"memory backend '{id}': size {size} must be a multiple of {PAGE} and at least two pages")
        self.size = size
        self.npages = size // PAGE
        # generation table: one u32 per page, after the firmware area (migfd.layout)
        self.table_pages = table_pages(self.npages)
        #: the first page the guest stamps; the pages before it are firmware and table
        self.first_data_page = first_data_page(self.npages)
        if self.first_data_page >= self.npages:
            raise MigrationError(f"memory backend '{id}': {size} bytes is too small "
                                 f"(the first {FIRMWARE_BYTES} bytes are firmware, then the page table)")
        self.fd = -1
        self.map: mmap.mmap | None = None
        self._dirty = bytearray(self.npages)
        self._dirty_lock = threading.Lock()
        self._rng = random.Random(seed)
        self.pages_dirtied = 0
        #: where the guest's own writes are logged when the VMM does not make them
        #: (KVM's dirty log: ``start()``, ``stop()``, ``collect(bitmap)``, ``info()``); None:
        #: every write to this RAM is the VMM's and marks the bitmap itself
        self.dirty_log: Any = None
        #: destination copying state: the pages received so far in this migration, as
        #: QEMU's RAMBlock receivedmap (None elsewhere). The others are still zero.
        self.receivedmap: np.ndarray | None = None
        #: called after this RAM is mapped anew (created, or adopted from a source): an
        #: accelerator points its memory slot at the new mapping there and then
        self.on_map: list[Callable[[], None]] = []

    @classmethod
    def from_opts(cls, id: str, opts: dict[str, str], backend_transfer: bool) -> "MemoryBackendMemfd":
        if "size" not in opts:
            raise MigrationError(f"memory-backend-memfd '{id}' needs size=")
        return cls(id, opt_size(opts.pop("size")), backend_transfer, prefill=opt_bool(opts, "fill"))

    @property
    def block_id(self) -> str:
        return self.id

    # -- backend ------------------------------------------------------------

    def open_backend(self) -> None:
        """A fresh VM's RAM: a new memfd, every page stamped when asked (fill=on)."""
        self._create()
        if self.prefill:
            self.fill()

    def _create(self) -> None:
        fd = os.memfd_create(f"migfd-{self.id}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, self.size)
            # The size is part of the contract with a receiver: seal it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        except BaseException:
            close_fd(fd)
            raise
        self._adopt(fd)
        self.mark_all_dirty()

    def _adopt(self, fd: int) -> None:
        self.fd = fd
        self.backend_generation += 1
        self.map = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        for mapped in self.on_map:
            mapped()

    def owned_fds(self) -> list[int]:
        return [self.fd] if self.fd >= 0 else []

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:
                pass  # a view is still alive; the mapping goes with the process
            self.map = None
        if self.fd >= 0:
            self.backend_generation += 1
        self.fd = close_fd(self.fd)

    # -- guest workload --------------------------------------------------------

    def start_guest(self, ctl: RunControl) -> None:
        """Nothing: what the guest does to RAM is its accelerator's work (migfd.accel)."""

    def start_dirtier(self, ctl: RunControl, rate_bytes_s: int) -> None:
        """The thread accelerator's guest thread that stamps random data pages at ``rate_bytes_s``."""
        if rate_bytes_s > 0:
            self.guests.append(ctl.spawn(f"guest-ram-{self.id}", self._dirtier, rate_bytes_s))

    def _dirtier(self, guest: GuestThread, rate_bytes_s: int) -> None:
        pages_per_s = max(1, rate_bytes_s // PAGE)
        batch = max(1, pages_per_s // 1000)  # ~1 ms of work between checks
        interval_s = batch / pages_per_s
        poller = select.poll()
        poller.register(guest.wake_fd, select.POLLIN)
        next_t = time.monotonic()
        while True:
            for _ in range(batch):
                if not guest.enter():  # a turn per page: a stop waits for one page at most
                    return
                try:
                    self.stamp(self._rng.randrange(self.first_data_page, self.npages))
                finally:
                    guest.leave()
            next_t += interval_s
            delay = next_t - time.monotonic()
            if delay > 0:
                if guest.poll(poller, delay * 1000):
                    guest.drain()
            elif delay < -1.0:
                next_t = time.monotonic()  # fell behind (stopped): do not burst

    def start_progress(self, ctl: RunControl) -> None:
        """The guest-progress counter of the thread accelerator (see :mod:`migfd.layout`).

        A guest thread bumps the u32 at :data:`GUEST_PROGRESS_ADDR` about every
        100 µs, each bump inside a turn: it never moves while the VM is
        stopped, so an observer outside sees exactly when the guest ran.
        """
        self.guests.append(ctl.spawn(f"guest-progress-{self.id}", self._progress))

    def _progress(self, guest: GuestThread) -> None:
        fine_timer_slack()
        page = GUEST_PROGRESS_ADDR // PAGE
        while guest.enter():
            try:
                # self.map is read inside the turn: a destination maps the memfd it
                # adopted while this thread waits for its first turn.
                assert self.map is not None
                (count,) = _U32.unpack_from(self.map, GUEST_PROGRESS_ADDR)
                _U32.pack_into(self.map, GUEST_PROGRESS_ADDR, (count + 1) & 0xFFFFFFFF)
                with self._dirty_lock:
                    self._dirty[page] = 1
            finally:
                guest.leave()
            time.sleep(PROGRESS_INTERVAL_S)  # outside the turn: a stop never waits for it

    def fill(self) -> None:
        """Stamp every data page once (generation 1), so no page of RAM is zero.

        A guest that has touched all its memory is the honest case for state
        copying: zero pages travel as 9-byte records, real pages as 4 KiB.
        """
        assert self.map is not None
        words = np.frombuffer(self.map, dtype="<u8").reshape(self.npages, PAGE // 8)
        table = self._table()
        first = self.first_data_page
        step = 1 << 15  # pages per slice: bounded temporary memory
        for start in range(first, self.npages, step):
            stop = min(start + step, self.npages)
            idx = np.arange(start, stop, dtype=np.uint64)
            gen = table[start:stop].astype(np.uint64) + np.uint64(1)
            word = idx ^ (gen * np.uint64(_GOLDEN))
            rows = words[start:stop]
            rows[:, 0] = idx
            rows[:, 1] = gen
            rows[:, 2] = word
            rows[:, 3:-1] = word[:, None]
            rows[:, -1] = word
            table[start:stop] = gen.astype(np.uint32)
        del words, table
        self.mark_all_dirty()

    def stamp(self, index: int) -> None:
        """Write the next generation of data page ``index`` and its table entry."""
        assert self.map is not None
        table_at = TABLE_ADDR + index * 4
        (generation,) = struct.unpack_from("<I", self.map, table_at)
        generation += 1
        word = check_word(index, generation)
        base = index * PAGE
        struct.pack_into("<QQQ", self.map, base, index, generation, word)
        struct.pack_into("<Q", self.map, base + PAGE - 8, word)
        struct.pack_into("<I", self.map, table_at, generation)
        with self._dirty_lock:
            self._dirty[index] = 1
            self._dirty[table_at // PAGE] = 1
        self.pages_dirtied += 1

    def verify(self) -> dict[str, Any] | None:
        """Check every page against the generation table; raises nothing, reports (None: no RAM here).

        A stamped page must hold its index, generation and check word where
        :meth:`stamp` writes them; a page never stamped must be zero. It reads
        RAM through views, a slice at a time: GiBs are checked without a copy.
        """
        if self.map is None:
            return None  # released (a source after its migration) or not arrived yet
        words = np.frombuffer(self.map, dtype="<u8").reshape(self.npages, PAGE // 8)
        table = self._table()
        in_flight = self.pages_in_flight()
        stamped_pages = 0
        bad_pages = 0
        first_bad: int | None = None
        step = 1 << 15  # pages per slice: bounded temporary memory
        for start in range(self.first_data_page, self.npages, step):
            stop = min(start + step, self.npages)
            gen = table[start:stop].astype(np.uint64)
            idx = np.arange(start, stop, dtype=np.uint64)
            expected = idx ^ (gen * np.uint64(_GOLDEN))
            rows = words[start:stop]
            stamped = gen > 0
            good = ((rows[:, 0] == idx) & (rows[:, 1] == gen) & (rows[:, 2] == expected)
                    & (rows[:, -1] == expected))
            blank = np.flatnonzero(~stamped)
            if blank.size:
                good[blank] = ~rows[blank].any(axis=1)
            for page in in_flight:
                if start <= page < stop:
                    good[page - start] = True  # half-stamped by a stopped vCPU: not yet a page to check
            bad = np.flatnonzero(~good)
            stamped_pages += int(stamped.sum())
            bad_pages += int(bad.size)
            if bad.size and first_bad is None:
                first_bad = start + int(bad[0])
            del rows
        result = {"ok": bad_pages == 0, "pages": int(self.npages),
                  "pages-stamped": stamped_pages, "bad-pages": bad_pages}
        if first_bad is not None:
            result["first-bad-page"] = first_bad
        if in_flight:
            result["pages-in-flight"] = len(in_flight)
        del words, table
        return result

    def _table(self) -> np.ndarray:
        """The generation table: a u32 per page of the backend, a view of guest RAM."""
        assert self.map is not None
        return np.frombuffer(self.map, dtype="<u4", count=self.npages, offset=TABLE_ADDR)

    # -- dirty log -------------------------------------------------------------

    def mark_all_dirty(self) -> None:
        with self._dirty_lock:
            self._dirty[:] = b"\x01" * self.npages

    def start_dirty_log(self) -> None:
        """A migration copies this RAM: log the guest's writes from now on, every page dirty
        to begin with (QEMU's ram_init_bitmaps: the log starts before the bitmap is filled)."""
        if self.dirty_log is not None:
            self.dirty_log.start()
        self.mark_all_dirty()

    def stop_dirty_log(self) -> None:
        """The migration is over here (failed or cancelled): the guest runs unlogged again."""
        if self.dirty_log is not None:
            self.dirty_log.stop()

    def _collect_dirty_log(self) -> None:
        """Merge the guest's logged writes into the bitmap (under ``_dirty_lock``)."""
        if self.dirty_log is not None:
            view = np.frombuffer(self._dirty, dtype=np.uint8)
            try:
                self.dirty_log.collect(view)
            finally:
                del view

    def sync_dirty_bitmap(self) -> np.ndarray:
        """Indices of pages dirtied since the last sync, in order; the log is cleared (QEMU's bitmap sync)."""
        with self._dirty_lock:
            self._collect_dirty_log()
            snapshot = bytes(self._dirty)
            self._dirty[:] = bytes(self.npages)
        return np.flatnonzero(np.frombuffer(snapshot, dtype=np.uint8))

    def dirty_pages(self) -> int:
        """Pages dirty now (the guest's logged writes included; they stay in the bitmap)."""
        with self._dirty_lock:
            self._collect_dirty_log()
            return self._dirty.count(1)

    def pages_array(self) -> np.ndarray:
        """Guest RAM as a (pages, PAGE) uint8 array over the mapping (no copy)."""
        assert self.map is not None
        return np.frombuffer(self.map, dtype=np.uint8).reshape(self.npages, PAGE)

    def page_rows(self, index: np.ndarray) -> np.ndarray:
        """The pages at ``index`` (ascending) as (k, PAGE) rows: a view of guest RAM
        when they are consecutive (nothing copied; the source sends from it), else a copy."""
        ram = self.pages_array()
        if len(index) and int(index[-1]) - int(index[0]) == len(index) - 1:
            return ram[int(index[0]):int(index[-1]) + 1]
        return ram[index]

    def write_page(self, offset: int, data: bytes | None, fill: int = 0) -> None:
        """Destination: store one received page."""
        assert self.map is not None
        if self.receivedmap is not None:
            self.receivedmap[offset // PAGE] = True
        if data is not None:
            self.map[offset:offset + PAGE] = data
        elif fill or self.map[offset:offset + PAGE] != _ZERO:
            # As QEMU's ram_handle_zero: write only when the page is not already the fill.
            self.map[offset:offset + PAGE] = bytes([fill]) * PAGE

    def write_pages(self, offsets: np.ndarray, data: np.ndarray | None) -> None:
        """Destination: store a run of received pages (zero pages when ``data`` is None)."""
        ram = self.pages_array()
        index = (offsets // PAGE).astype(np.intp)
        if self.receivedmap is not None:
            self.receivedmap[index] = True
        first = int(index[0]) if len(index) else 0
        if data is not None and int(index[-1]) - first == len(index) - 1 and np.all(np.diff(index) == 1):
            ram[first:first + len(index)] = data  # a contiguous run: one memcpy
        elif data is not None:
            ram[index] = data
        else:
            stale = index[ram[index].any(axis=1)]
            if len(stale):
                ram[stale] = 0
        del ram

    def unreceived_run(self, first: int, limit: int) -> int:
        """Destination copying state: how many pages from page ``first`` on (``limit`` at
        most) have not been received: zero still, so a read may guess they come next."""
        if self.receivedmap is None:
            return 0
        window = self.receivedmap[first:first + limit]
        return int(np.argmax(window)) if window.any() else len(window)

    def mark_received(self, first: int, count: int) -> None:
        """Destination: pages ``first`` .. ``first + count - 1`` were received straight into RAM."""
        if self.receivedmap is not None:
            self.receivedmap[first:first + count] = True

    def page_views(self, offsets: np.ndarray) -> list[memoryview]:
        """Destination: writable views of guest RAM for the pages at byte ``offsets``, in
        order, one per run of neighbouring pages: a packet's pages are received into them.

        The caller releases every view (the mapping cannot close while one is held).
        """
        assert self.map is not None
        index = (offsets // PAGE).astype(np.intp)
        breaks = (np.flatnonzero(np.diff(index) != 1) + 1).tolist()
        ram = memoryview(self.map)
        try:
            return [ram[int(index[a]) * PAGE:(int(index[b - 1]) + 1) * PAGE]
                    for a, b in zip([0, *breaks], [*breaks, len(index)])]
        finally:
            ram.release()  # the views keep the mapping exported, not this one

    # -- migration ---------------------------------------------------------------

    def save_state(self, handover: bool) -> dict[str, Any]:
        return {"size": self.size, "pages_dirtied": self.pages_dirtied,
                "fd": self.fd if handover else None}

    def prepare_incoming_copy(self) -> None:
        """Destination copying state: a fresh memfd the pages are written into.

        Its pages are allocated at once (MADV_POPULATE_WRITE), not one page
        fault per page as they arrive: in bulk the kernel allocates them
        several times faster, and this happens at RAM START, while the source
        still runs.
        """
        self._create()
        self.receivedmap = np.zeros(self.npages, dtype=bool)
        assert self.map is not None
        try:
            self.map.madvise(MADV_POPULATE_WRITE)
        except OSError:
            pass  # kernel before 5.14: the pages fault in as they are written

    def load_state(self, state: dict[str, Any], received_fds: tuple[int, ...]) -> None:
        if state["size"] != self.size:
            raise MigrationError(f"memory backend '{self.id}': source has {state['size']} bytes, "
                                 f"destination {self.size}")
        self.pages_dirtied = state["pages_dirtied"]
        fd = state.get("fd")
        if fd is None:
            if self.fd < 0:
                raise MigrationError(f"memory backend '{self.id}': no RAM arrived")
            return
        validate_memfd(fd, self.size, self.id)
        self._adopt(fd)

    def info(self) -> dict[str, Any]:
        out = {"id": self.id, "size": self.size, "pages-dirtied": self.pages_dirtied + self.guest_stamps()}
        out["dirty-log"] = self.dirty_log.info() if self.dirty_log is not None else {"source": "vmm"}
        return out

    def _mailbox_cpus(self) -> int:
        """vCPUs whose state the KVM guest keeps in this RAM's mailbox (0: no such guest here)."""
        if self.map is None:
            return 0
        magic, ncpus = struct.unpack_from("<II", self.map, MAILBOX_ADDR + MB_MAGIC)
        return min(ncpus, MAX_VCPUS) if magic == MAILBOX_MAGIC else 0

    def guest_stamps(self) -> int:
        """Pages the KVM guest's code stamped (its counters live in guest RAM, so they migrate)."""
        return sum(struct.unpack_from("<Q", self.map, percpu_addr(i) + C_DIRTIED)[0]  # type: ignore[arg-type]
                   for i in range(self._mailbox_cpus()))

    def pages_in_flight(self) -> list[int]:
        """Pages a stopped KVM guest was caught stamping (it finishes them when it runs again)."""
        out = []
        for i in range(self._mailbox_cpus()):
            (page,) = struct.unpack_from("<I", self.map, percpu_addr(i) + C_INFLIGHT)  # type: ignore[arg-type]
            if page:
                out.append(page - 1)
        return out


def validate_memfd(fd: int, size: int, device: str) -> None:
    """A handed-over RAM fd must be a memfd of exactly the expected size.

    This runs inside the downtime. A memfd whose size is sealed (as every
    migfd source seals its own) proves itself with one fcntl: only a memfd
    can carry those seals. Any other fd is identified by its /proc link,
    which costs ten times more (tens of µs).
    """
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise MigrationError(f"memory backend '{device}': received fd is unusable: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise MigrationError(f"memory backend '{device}': received fd is not a memfd (not a regular file)")
    if not _size_sealed(fd):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as exc:
            raise MigrationError(f"memory backend '{device}': received fd is unusable: {exc.strerror}") from exc
        if not target.startswith("/memfd:"):
            raise MigrationError(f"memory backend '{device}': received fd is not a memfd ({target})")
    if st.st_size != size:
        raise MigrationError(f"memory backend '{device}': received memfd has {st.st_size} bytes, expected {size}")


def _size_sealed(fd: int) -> bool:
    """True for a file whose size is sealed: tmpfs files refuse these seals, so it is a memfd."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False  # not shmem at all (EINVAL)
    return seals & _SIZE_SEALS == _SIZE_SEALS


_SIZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
