"""The dirty-rate figure: x is the rate the guest reached, one series per mode, the raised limit apart."""

from __future__ import annotations

import pytest

from migfd.results.plots import plot_dirty_rate
from migfd.units import MiB
from result_rows import MS, fixture_row, medians_line, table, texts

pytestmark = pytest.mark.unit


def rate_rows(mode: str, variant: str, reached_mib: float, downtimes_ms, outage_ms) -> list[dict]:
    return [fixture_row(scenario="dirty-rate", mode=mode, variant=variant, backend="ram", ram_bytes=256 * MiB,
                        live=True, trial=i, downtime_ns=int(d * MS), outage_ns=int(o * MS),
                        value=reached_mib * MiB, unit="bytes/s", accel="kvm")
            for i, (d, o) in enumerate(zip(downtimes_ms, outage_ms))]


def test_each_mode_is_drawn_at_the_rate_its_trials_reached():
    rows = (rate_rows("fd-passing", "rate-0", 0, [1, 1], [2, 2]) + rate_rows("fd-passing", "rate-max", 900, [1, 1], [2, 2])
            + rate_rows("state-copy", "rate-0", 0, [10, 10], [12, 12])
            + rate_rows("state-copy", "rate-max", 100, [50, 50], [60, 60])
            + rate_rows("state-copy", "rate-max-limit-3000", 90, [400, 400], [410, 410]))
    fig = plot_dirty_rate(table(rows), {"scenarios": {"dirty-rate": {"raised_downtime_limit_ms": 3000}}})
    down, outage = fig.axes[:2]
    copy = medians_line(down, "state copy (")
    assert list(copy.get_xdata()) == [0.0, 100.0] and list(copy.get_ydata()) == [10.0, 50.0]
    raised = medians_line(down, "state copy, downtime-limit 3000 ms")
    assert list(raised.get_xdata()) == [90.0] and list(raised.get_ydata()) == [400.0]
    assert list(medians_line(outage, "fd-passing").get_ydata()) == [2.0, 2.0]
    assert list(medians_line(down, "fd-passing").get_xdata()) == [0.0, 900.0]


def test_no_dirty_rate_trials_say_so():
    fig = plot_dirty_rate(table([fixture_row(scenario="ram-size", mode="fd-passing", trial=0, downtime_ns=MS)]), {})
    assert "no data" in texts(fig)
