"""The destination's RAM check (x-query-guest verify) finds every kind of damaged page."""

from __future__ import annotations

import numpy as np
import pytest

from migfd.devices.memfd import PAGE, MemoryBackendMemfd

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
    ram.stamp(ram.table_pages + 3)
    report = ram.verify()
    assert report["ok"] and report["pages-stamped"] == 256 - ram.table_pages


@pytest.mark.parametrize("where", ["index", "generation", "check", "last"])
def test_a_damaged_stamped_page_is_named(ram, where):
    ram.fill()
    page = ram.table_pages + 7
    column = {"index": 0, "generation": 1, "check": 2, "last": -1}[where]
    words = _words(ram)
    words[page, column] ^= 1
    del words
    report = ram.verify()
    assert not report["ok"] and report["bad-pages"] == 1 and report["first-bad-page"] == page


def test_a_page_never_stamped_must_be_zero(ram):
    ram.stamp(ram.table_pages)  # one stamped page, the rest blank
    page = ram.npages - 1
    ram.map[page * PAGE + 100] = 1
    report = ram.verify()
    assert report == {"ok": False, "pages": 256, "pages-stamped": 1, "bad-pages": 1, "first-bad-page": page}
