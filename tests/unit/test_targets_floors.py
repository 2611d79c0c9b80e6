"""The floors beside the targets (migfd.results.targets.floors_beside) on small hand-built tables:
each floor listed with its ratio to the migrations it bounds, and one that is not below them flagged.

The rows are fixtures of the analysis code (tests/unit/result_rows.py), not measurements.
"""

from __future__ import annotations

import pytest

from migfd.results.targets import BELOW, FLOOR_FLAG_COLOURS, NOT_BELOW, floors_beside, format_floors
from migfd.units import MiB
from result_rows import MS, US, fd_count_rows, fd_floor_rows, floor_row, ram_rows, table, traffic_rows, with_outage

FULL_VM = "ram+tap+chardev"
#: each handover floor of the fixture, µs (three trials around it)
HANDOVER_US = {"handover-floor": 100, "handover-floor-loaded": 150, "handover-oneway": 50, "commit-roundtrip": 40}
COPY_FLOOR_MS = 20


def spread(median: float) -> list[float]:
    return [0.9 * median, median, 1.1 * median]


def run(doctored: str | None = None, factor: float = 100) -> list[dict]:
    """A run with every floor well below its migrations, except ``doctored``'s, made ``factor`` times longer."""
    k = lambda variant: factor if variant == doctored else 1  # noqa: E731
    rows = with_outage(traffic_rows([0] * 3, [0] * 3), [1.5] * 3)  # downtime 1 ms, outage 1.5 ms
    for variant, us in HANDOVER_US.items():
        rows += [floor_row(variant, backend=FULL_VM, n_fds=3, device_state_bytes=600, trial=t,
                           total_ns=int(v * k(variant) * US), unit="ns") for t, v in enumerate(spread(us))]
    rows += fd_count_rows(10) + fd_count_rows(20, variant="unbatched")  # downtime 1 ms + 10 (20) µs a fd
    rows += [dict(r, total_ns=int(r["total_ns"] * k("fd-roundtrip"))) for r in fd_floor_rows()]  # 1 µs a fd
    rows += [floor_row("fd-roundtrip-unbatched", backend="socket", n_fds=21, trial=t, unit="ns/fd",
                       total_ns=int(v * k("fd-roundtrip-unbatched") * US)) for t, v in enumerate(spread(110))]
    rows += ram_rows("state-copy", 64 * MiB, spread(30))
    rows += [floor_row("unix-throughput", backend="socket", ram_bytes=64 * MiB, trial=t, unit="bytes/s",
                       total_ns=int(v * k("unix-throughput") * MS)) for t, v in enumerate(spread(COPY_FLOOR_MS))]
    return rows


def lines(df) -> dict[tuple[str, str], dict]:
    return {(r["row"], r["floor"].split(" (")[0]): r for r in floors_beside(df).to_dict("records")}


def test_every_floor_is_listed_beside_its_row_with_its_ratio():
    got = lines(table(run()))
    expected = {  # (row, floor): floor / migration, from the fixture's medians
        ("handover-floor", "handover-floor"): 0.1, ("handover-floor", "handover-floor-loaded"): 0.15,
        ("handover-floor", "handover-oneway"): 0.05, ("handover-floor", "commit-roundtrip"): 0.04,
        ("below-cpr-transfer", "handover-floor"): 0.1 / 1.5, ("below-cpr-transfer", "handover-floor-loaded"): 0.1,
        ("per-fd-cost", "fd-roundtrip"): 0.1,  # 1 µs a fd against 10
        ("unbatched-linear", "fd-roundtrip-unbatched"): 0.11 / 1.4, ("unbatched-linear", "fd-roundtrip"): 0.03 / 1.2,
        ("copy-throughput", "unix-throughput"): COPY_FLOOR_MS / 30,
    }
    assert set(got) == set(expected)
    for key, ratio in expected.items():
        line = got[key]
        assert line["ratio"] == pytest.approx(ratio, rel=1e-3), key
        assert line["ratio_low"] <= line["ratio"] <= line["ratio_high"] < 1, key
        assert line["floor_value"] < line["migration"] and line["flag"] == BELOW and line["why"] == "", key
    # the floor each target is judged against says so; the others are shown beside it
    judges = {key for key, line in got.items() if line["judges"]}
    assert judges == {("handover-floor", "handover-floor"), ("per-fd-cost", "fd-roundtrip"),
                      ("copy-throughput", "unix-throughput")}
    assert got[("handover-floor", "handover-oneway")]["floor_value"] == pytest.approx(50 * US)
    assert got[("per-fd-cost", "fd-roundtrip")]["floor_value"] == pytest.approx(1 * US)
    assert got[("per-fd-cost", "fd-roundtrip")]["unit"] == "ns/fd"


@pytest.mark.parametrize("doctored", ["handover-floor-loaded", "commit-roundtrip", "fd-roundtrip-unbatched",
                                      "fd-roundtrip", "unix-throughput"])
def test_a_floor_above_its_migrations_is_flagged_and_no_other(doctored):
    got = lines(table(run(doctored)))
    flagged = {key for key, line in got.items() if line["flag"] == NOT_BELOW}
    assert flagged and flagged == {key for key in got if key[1] == doctored}
    for key in flagged:
        assert got[key]["ratio_low"] > 1 and "above" in got[key]["why"]
    # the table shows the word in the verdict's colour
    html = format_floors(floors_beside(table(run(doctored)))).to_html()
    assert html.count(f">{NOT_BELOW}<") == len(flagged) and FLOOR_FLAG_COLOURS[NOT_BELOW].split(": ")[1] in html


def test_a_floor_whose_interval_reaches_the_migrations_is_flagged_too():
    # the loaded floor's median is below the downtime's, but its trials reach above it
    rows = [r for r in run() if r.get("variant") != "handover-floor-loaded"]
    rows += [floor_row("handover-floor-loaded", backend=FULL_VM, n_fds=3, trial=t, total_ns=int(v * US), unit="ns")
             for t, v in enumerate([300, 900, 1500])]
    line = lines(table(rows))[("handover-floor", "handover-floor-loaded")]
    assert line["ratio"] < 1 < line["ratio_high"]
    assert line["flag"] == NOT_BELOW and "reaches 1" in line["why"]


def test_a_floor_the_run_lacks_is_listed_as_not_measured_with_why():
    rows = [r for r in run() if r.get("variant") != "handover-floor-loaded"]
    meta = {"scenarios": {"limits": {"ran": True, "handover_load": "not measured: needs a TAP (root, /dev/net/tun)"}}}
    line = {(r["row"], r["floor"].split(" (")[0]): r for r in
            floors_beside(table(rows), meta).to_dict("records")}[("handover-floor", "handover-floor-loaded")]
    assert line["flag"] == "not-measured" and "needs a TAP" in line["why"]
    # a row whose migrations the run did not measure is left out: the targets table says why
    no_fd_count = [r for r in run() if r.get("scenario") != "fd-count"]
    assert not {key[0] for key in lines(table(no_fd_count))} & {"per-fd-cost", "unbatched-linear"}
