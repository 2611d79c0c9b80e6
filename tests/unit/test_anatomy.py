"""Downtime anatomy: partitioning a trial's downtime among nested, overlapping phases of both sides."""

from __future__ import annotations

import pandas as pd
import pytest

from migfd.results.anatomy import (
    UNACCOUNTED,
    anatomy_rows,
    anatomy_scenario,
    anatomy_table,
    covered_fraction,
    describe_point,
    gantt_trials,
    load_timelines,
    median_trial,
    partition,
    plot_anatomy,
    plot_gantt,
    trial_anatomy,
)
from migfd.results.plots import plot_slopes
from migfd.units import GiB, MiB
from result_rows import MS, fd_count_rows, fd_floor_rows, fixture_row, floor_row, medians_line, table, texts


def phases(*spans: tuple[str, str, int, int], trial: str = "t1") -> pd.DataFrame:
    return pd.DataFrame([(trial, side, phase, a, b) for side, phase, a, b in spans],
                        columns=["trial_id", "side", "phase", "start_ns", "end_ns"])


def test_innermost_phase_takes_each_instant_and_gaps_are_unaccounted():
    t = phases(("source", "switchover", 0, 100),
               ("source", "write-ram0", 10, 30),   # nested in switchover
               ("destination", "load-ram0", 20, 60),  # starts later: innermost from 20 on
               ("destination", "resume", 120, 130))
    parts = partition(t, end_ns=130)
    assert parts == {"source: switchover": 10 + 40, "source: write-ram0": 10,
                     "destination: load-ram0": 40, UNACCOUNTED: 20, "destination: resume": 10}
    assert sum(parts.values()) == 130
    assert covered_fraction(t, 130) == pytest.approx(110 / 130)


def test_partition_clips_to_the_window_and_ignores_point_events():
    t = phases(("source", "setup", -500, -10), ("source", "commit", 40, 40), ("source", "stop", -5, 25))
    assert partition(t, end_ns=50) == {"source: stop": 25, UNACCOUNTED: 25}
    assert partition(t, end_ns=0) == {}


def test_equal_starts_go_to_the_shorter_phase():
    t = phases(("source", "outer", 0, 100), ("source", "inner", 0, 40))
    assert partition(t, end_ns=100) == {"source: inner": 40, "source: outer": 60}


def test_the_window_runs_to_the_guests_first_progress_seen_from_outside():
    # the VM reports its resume at 100; the observer saw the guest run again at 160
    t = phases(("source", "stop", 0, 10), ("destination", "resume", 90, 100),
               ("destination", "resumed-report", 100, 120),
               ("observer", "guest-outage", -3, 160), ("observer", "first-progress", 160, 160))
    rows = _rows(("t1", "fd-passing", 100))
    parts = trial_anatomy(rows, t).set_index("label")["ns"].to_dict()
    assert sum(parts.values()) == 160
    # what no VM phase explains after the resume is the guest not running yet, not "unaccounted"
    assert parts["destination: resumed-report"] == 20 and parts["observer: guest-outage"] == 40 + 80
    assert UNACCOUNTED not in parts
    # without the observer, the window ends at the reported resume
    assert sum(trial_anatomy(rows, t[t["side"] != "observer"])["ns"]) == 100


def _rows(*trials: tuple[str, str, int]) -> pd.DataFrame:
    return pd.DataFrame([{"trial_id": tid, "scenario": "tap-traffic", "mode": mode, "downtime_ns": d,
                          "stop_resume_ns": None, "ok": True, "ram_bytes": 64 << 20} for tid, mode, d in trials])


def test_anatomy_table_takes_medians_per_mode_with_absent_phases_as_zero():
    df = _rows(("a", "fd-passing", 100), ("b", "fd-passing", 100), ("c", "fd-passing", 100))
    t = pd.concat([phases(("source", "x", 0, 100), trial="a"),
                   phases(("source", "x", 0, 50), ("source", "y", 50, 100), trial="b"),
                   phases(("source", "x", 0, 60), ("source", "y", 60, 100), trial="c")])
    table = anatomy_table(df, t).set_index("label")
    assert table.loc["source: x", "median_ns"] == 60
    assert table.loc["source: y", "median_ns"] == 40  # 0 (absent in a), 50, 40 -> 40
    assert (table["n"] == 3).all()


def test_failed_trials_and_trials_without_timeline_are_left_out():
    df = _rows(("a", "fd-passing", 100), ("b", "fd-passing", 100))
    df.loc[1, "ok"] = False
    t = phases(("source", "x", 0, 100), trial="a")
    assert set(trial_anatomy(df, t)["trial_id"]) == {"a"}
    assert median_trial(df, t, "fd-passing") == "a"
    assert median_trial(df, t, "state-copy") is None


def test_load_timelines_of_a_run_without_them_is_empty(tmp_path):
    assert load_timelines(tmp_path).empty
    phases(("source", "x", 0, 5)).to_csv(tmp_path / "timelines.csv", index=False)
    assert load_timelines(tmp_path)["end_ns"].tolist() == [5]


def test_figures_draw_with_and_without_timelines():
    df = _rows(("a", "fd-passing", 100), ("b", "state-copy", 300))
    t = pd.concat([phases(("source", "x", 0, 100), trial="a"),
                   phases(("source", "x", 0, 200), ("destination", "y", 150, 300), trial="b")])
    fig = plot_anatomy(df, t)
    bars = [p for p in fig.axes[0].patches]
    assert len(bars) == 3  # fd-passing: x; state-copy: x and y
    assert plot_gantt(df, t).axes
    empty = plot_anatomy(df, t.iloc[0:0])
    assert "no timelines" in empty.axes[0].texts[0].get_text()


def test_waiting_yields_to_work_on_the_other_side():
    t = phases(("source", "save:ram0", 0, 50), ("destination", "wait-data", 10, 40),
               ("destination", "wait-data", 60, 80))
    assert partition(t, end_ns=80) == {"source: save:ram0": 50, UNACCOUNTED: 10, "destination: wait-data": 20}


# -- the per-fd and per-byte slopes beside their floors ---------------------------


def copy_time_rows(size: int, ms_per_gib: float, live=False) -> list[dict]:
    """Two trials 10% either side of ``ms_per_gib``: their median is on it, their spread is not."""
    return [fixture_row(scenario="ram-size", mode="state-copy", backend="ram", ram_bytes=size, live=live, trial=i,
                        downtime_ns=int(k * ms_per_gib * MS * size / GiB),
                        total_ns=int(4 * k * ms_per_gib * MS * size / GiB), bytes_sent=size)
            for i, k in enumerate((0.9, 1.1))]


def slopes_table() -> pd.DataFrame:
    # fd-passing: 2 µs/fd batched, 5 µs/fd unbatched; the raw round trip 1 µs/fd; fd-count's state
    # copy is not fd-passing and stays out. State copy: 1.25 s per GiB (0.8 GiB/s); floor 1 GiB/s.
    rows = (fd_count_rows(2) + fd_count_rows(5, "unbatched") + fd_floor_rows()
            + [dict(r, mode="state-copy", variant="") for r in fd_count_rows(9)]
            + copy_time_rows(64 * MiB, 1250) + copy_time_rows(256 * MiB, 1250)
            + copy_time_rows(64 * MiB, 9000, live=True) + copy_time_rows(256 * MiB, 9000, live=True)
            + [floor_row("unix-throughput", ram_bytes=size, value=GiB, unit="bytes/s")
               for size in (64 * MiB, 256 * MiB) for _ in (0, 1)])
    return table(rows)


def test_slopes_figure_gives_each_series_its_fitted_slope():
    fig = plot_slopes(slopes_table(), {})
    left, right = fig.axes
    assert len(left.containers) == 3 and len(right.containers) == 2
    assert left.get_xscale() == "log" and left.get_yscale() == "log" and right.get_yscale() == "log"
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert [label.split(" (n=")[0] for label in labels] == [
        "fd-passing, batched: 2 µs/fd", "fd-passing, unbatched: 5 µs/fd",
        "floor: raw fd round trip, batched: 1 µs/fd (limits)",
        # the non-live copy (its downtime is the copy alone), not the live one
        "state copy, non-live, downtime: 1.22 ms/MiB = 0.8 GiB/s",
        "floor: the same bytes through raw AF_UNIX: 977 µs/MiB = 1 GiB/s (limits)"]
    # the copy's medians: 64 MiB at 1.25 s per GiB = 78.125 ms
    assert list(medians_line(right, "state copy").get_ydata()) == pytest.approx([78.125, 312.5])


def test_slopes_figure_takes_live_copies_only_without_non_live_ones():
    df = slopes_table()
    df = df[df["live"].fillna(True).astype(bool)]
    labels = [t.get_text() for t in plot_slopes(df, {}).legends[0].get_texts()]
    assert any(label.startswith("state copy, live, total time: 35.2 ms/MiB") for label in labels)


def test_slopes_figure_without_the_rows_says_why():
    meta = {"scenarios": {"fd-count": {"ran": False, "reason": "needs root and /dev/net/tun"}}}
    fig = plot_slopes(table(fd_count_rows(2, "batched")[:0] + copy_time_rows(64 * MiB, 1250)), meta)
    left, right = fig.axes
    assert "needs root and /dev/net/tun" in texts(fig) and not left.containers
    assert len(right.containers) == 1 and "floor not drawn: no limits rows" in texts(fig)
    fig = plot_slopes(table(fd_count_rows(2)), {})
    assert "no ram-size rows" in texts(fig) and not fig.axes[1].containers and len(fig.axes[0].containers) == 1
    empty = plot_slopes(table([]), {})
    assert not empty.legends and "no fd-count rows" in texts(empty)


def test_anatomy_explains_tap_traffic_else_the_smallest_live_ram_size():
    ram = [{"trial_id": f"r{i}", "scenario": "ram-size", "mode": "fd-passing", "downtime_ns": 100, "ok": True,
            "ram_bytes": size, "live": live, "backend": "ram"}
           for i, (size, live) in enumerate([(16 << 20, True), (16 << 20, False), (64 << 20, True)])]
    df = pd.concat([_rows(("t0", "fd-passing", 100)), pd.DataFrame(ram)], ignore_index=True)
    timed = pd.concat([phases(("source", "stop", 0, 100), trial=t) for t in ("r0", "r1", "r2")])
    # tap-traffic has no timeline here: ram-size's smallest size, live, is explained
    assert anatomy_scenario(df, timed) == "ram-size"
    assert list(anatomy_rows(df, timed)["trial_id"]) == ["r0"]
    assert describe_point(anatomy_rows(df, timed)) == "ram-size: ram, 16 MiB, live"
    assert gantt_trials(df, timed) == {"fd-passing": "r0"}
    with_tap = pd.concat([timed, phases(("source", "stop", 0, 100), trial="t0")])
    assert anatomy_scenario(df, with_tap) == "tap-traffic" and anatomy_scenario(df, None) == "tap-traffic"
