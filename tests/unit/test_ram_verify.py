"""The destination's RAM check (x-query-guest verify) finds every kind of damaged page."""

from __future__ import annotations

import time

import numpy as np
import pytest

from migfd.devices.memfd import PAGE, MemoryBackendMemfd
from migfd.devices.base import RunControl
from migfd.layout import FIRMWARE_BYTES, GUEST_PROGRESS_ADDR, TABLE_ADDR

pytestmark = pytest.mark.unit


@pytest.fixture
def ram():
    dev = MemoryBackendMemfd("ram0", 1 << 20)
    dev.open_backend()
    yield dev
    dev.close()


def _words(dev: MemoryBackendMemfd) -> np.ndarray:
    return np.frombuffer(dev.map, dtype="<u8").reshape(dev.npages, PAGE // 8)


def test_fresh_filled_and_restamped_ram_verifies(ram):
    assert ram.verify() == {"ok": True, "pages": 256, "pages-stamped": 0, "bad-pages": 0}
    ram.fill()
    ram.stamp(ram.first_data_page + 3)
    report = ram.verify()
    assert report["ok"] and report["pages-stamped"] == 256 - ram.first_data_page


@pytest.mark.parametrize("where", ["index", "generation", "check", "last"])
def test_a_damaged_stamped_page_is_named(ram, where):
    ram.fill()
    page = ram.first_data_page + 7
    column = {"index": 0, "generation": 1, "check": 2, "last": -1}[where]
    words = _words(ram)
    words[page, column] ^= 1
    del words
    report = ram.verify()
    assert not report["ok"] and report["bad-pages"] == 1 and report["first-bad-page"] == page


def test_a_page_never_stamped_must_be_zero(ram):
    ram.stamp(ram.first_data_page)  # one stamped page, the rest blank
    page = ram.npages - 1
    ram.map[page * PAGE + 100] = 1
    report = ram.verify()
    assert report == {"ok": False, "pages": 256, "pages-stamped": 1, "bad-pages": 1, "first-bad-page": page}


def test_stamps_stay_out_of_the_firmware_area(ram):
    """The first 64 KiB belong to the guest's code, mailbox and progress counter (migfd.layout)."""
    ram.fill()
    ram.stamp(ram.first_data_page)
    assert not any(ram.map[:FIRMWARE_BYTES])
    table = np.frombuffer(ram.map, dtype="<u4", count=ram.npages, offset=TABLE_ADDR)
    assert table[ram.first_data_page] == 2 and not table[:ram.first_data_page].any()
    assert ram.first_data_page * PAGE >= TABLE_ADDR + ram.npages * 4


def test_thread_guest_progress_moves_only_while_running(ram):
    """The thread accelerator's counter at GUEST_PROGRESS_ADDR: bumped in turns, never while stopped."""
    ctl = RunControl()
    try:
        ram.start_progress(ctl)
        ctl.resume()
        deadline = time.monotonic() + 10
        while _progress(ram) < 10:
            assert time.monotonic() < deadline, "the progress counter does not move"
            time.sleep(0.01)
        ctl.pause()
        stopped = _progress(ram)
        time.sleep(0.05)
        assert _progress(ram) == stopped
        # the bumps are in the dirty log (the fresh backend had every page dirty)
        assert GUEST_PROGRESS_ADDR // PAGE in ram.sync_dirty_bitmap().tolist()
        assert ram.sync_dirty_bitmap().tolist() == []
    finally:
        ctl.close()


def _progress(dev: MemoryBackendMemfd) -> int:
    return int.from_bytes(dev.map[GUEST_PROGRESS_ADDR:GUEST_PROGRESS_ADDR + 4], "little")
