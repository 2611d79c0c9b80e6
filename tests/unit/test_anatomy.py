"""Downtime anatomy: partitioning a trial's downtime among nested, overlapping phases of both sides."""

from __future__ import annotations

import pandas as pd
import pytest

from migfd.results.anatomy import (
    UNACCOUNTED,
    anatomy_table,
    covered_fraction,
    load_timelines,
    median_trial,
    partition,
    plot_anatomy,
    plot_gantt,
    trial_anatomy,
)


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
