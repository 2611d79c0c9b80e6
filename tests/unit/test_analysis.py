"""migfd.results on small hand-built tables: loading, summaries with intervals, figures, the run's
description (targets: test_targets.py; the protocol tour's tables: test_tour.py).

The rows are fixtures of the analysis code (tests/unit/result_rows.py), not measurements.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure

from migfd.errors import MigrationError
from migfd.results.describe import busy_note, describe_run
from migfd.results.load import RESULTS_ENV, find_results, load_results
from migfd.results.plots import (
    plot_chardev,
    plot_downtime_vs_fds,
    plot_downtime_vs_ram,
    plot_packet_loss,
    plot_throughput,
)
from migfd.results.summary import fmt_bytes, fmt_ns, format_summary, slope_per_fd, summarize, trials_table
from migfd.results.targets import format_targets, targets
from migfd.stats import median_ci
from migfd.units import GiB, MiB
from result_rows import (
    MS,
    US,
    error_bars,
    fd_count_rows,
    fd_floor_rows,
    fixture_row,
    floor_row,
    medians_line,
    qemu_rows,
    ram_rows,
    table,
    texts,
    traffic_rows,
)


# -- loading --------------------------------------------------------------------


def write_run(path, rows, metadata=None):
    path.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path / "results.csv", index=False)
    if metadata is not None:
        (path / "metadata.json").write_text(json.dumps(metadata))
    return path


def test_load_results_types_columns_and_metadata(tmp_path):
    rows = [{"scenario": "ram-size", "mode": "fd-passing", "ram_bytes": 64 * MiB, "live": "True",
             "trial": 0, "downtime_ns": 5 * MS, "ok": "True", "error": ""},
            {"scenario": "ram-size", "mode": "state-copy", "ram_bytes": 64 * MiB, "live": "False",
             "trial": 0, "downtime_ns": "", "ok": "False", "error": "migration: timed out"}]
    run = write_run(tmp_path / "run", rows, {"host": "fixture", "scenarios": {}})
    df, meta = load_results(run)
    assert meta == {"host": "fixture", "scenarios": {}}
    assert str(df["downtime_ns"].dtype) == "Int64" and str(df["ram_bytes"].dtype) == "Int64"
    assert df["ok"].tolist() == [True, False]
    assert df["live"].tolist() == [True, False]
    assert pd.isna(df.loc[1, "downtime_ns"])
    assert df.loc[1, "error"] == "migration: timed out" and df.loc[0, "error"] == ""
    # columns of the schema the file lacks are there, empty
    assert "frames_lost" in df.columns and df["frames_lost"].isna().all()
    assert df["variant"].tolist() == ["", ""]


def test_load_results_accepts_the_csv_path_and_no_metadata(tmp_path):
    run = write_run(tmp_path / "run", [{"scenario": "limits", "mode": "floor", "ok": "True"}])
    df, meta = load_results(run / "results.csv")
    assert meta == {} and len(df) == 1


def test_a_run_older_than_peer_version_gets_the_qemu_of_its_metadata(tmp_path):
    rows = [{"scenario": "qemu-peer", "mode": "qemu-ram-copied", "ram_bytes": 64 * MiB, "trial": 0, "ok": "True"},
            {"scenario": "ram-size", "mode": "fd-passing", "ram_bytes": 64 * MiB, "trial": 0, "ok": "True"}]
    meta = {"packages": {"qemu": "QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18+b3)"}}
    df, _ = load_results(write_run(tmp_path / "old", rows, meta))
    assert df["peer_version"].tolist() == ["7.2.22", ""]
    # a run that names its QEMUs row by row is left as it is
    rows[0]["peer_version"] = "10.0.2"
    df, _ = load_results(write_run(tmp_path / "new", rows, meta))
    assert df["peer_version"].tolist() == ["10.0.2", ""]


def test_find_results_order(tmp_path, monkeypatch):
    monkeypatch.delenv(RESULTS_ENV, raising=False)
    with pytest.raises(MigrationError, match="no benchmark results"):
        find_results(root=tmp_path)
    row = [{"scenario": "limits", "mode": "floor", "ok": "True"}]
    ref_old = write_run(tmp_path / "benchmarks/reference/20250101T000000Z-a", row)
    ref_new = write_run(tmp_path / "benchmarks/reference/20250102T000000Z-a", row)
    (tmp_path / "benchmarks/reference/20250103T000000Z-empty").mkdir()  # no results.csv: ignored
    assert find_results(root=tmp_path) == ref_new.resolve()
    assert ref_old != ref_new
    run_old = write_run(tmp_path / "benchmarks/results/20250201T000000Z-a", row)
    run_new = write_run(tmp_path / "benchmarks/results/20250202T000000Z-a", row)
    assert find_results(root=tmp_path) == run_new.resolve()
    monkeypatch.setenv(RESULTS_ENV, str(run_old))
    assert find_results(root=tmp_path) == run_old.resolve()
    assert find_results(ref_old, root=tmp_path) == ref_old.resolve()  # the parameter wins
    with pytest.raises(MigrationError, match="holds no results.csv"):
        find_results(tmp_path / "nowhere")


# -- summaries ------------------------------------------------------------------


def test_summarize_median_percentiles_n_and_failures():
    rows = ram_rows("fd-passing", 64 * MiB, [1, 2, 3, 4, 5])
    rows.append(fixture_row(scenario="ram-size", mode="fd-passing", backend="ram", ram_bytes=64 * MiB,
                            live=False, trial=5, downtime_ns=1000 * MS, ok=False, error="check: RAM differs"))
    s = summarize(table(rows))
    assert len(s) == 1
    point = s.iloc[0]
    assert point["n"] == 5 and point["n_failed"] == 1  # the failed trial's 1000 ms is not counted
    assert point["median"] == 3 * MS
    assert point["p5"] == pytest.approx(1.2 * MS)  # linear between the two lowest of five
    assert point["p95"] == pytest.approx(4.8 * MS)
    # the median's 95% interval (migfd.stats.median_ci: a t interval on the logs), around the median
    ci = median_ci([1 * MS, 2 * MS, 3 * MS, 4 * MS, 5 * MS])
    assert (point["ci_low"], point["ci_high"]) == (ci.low, ci.high) and ci.low < 3 * MS < ci.high


def test_summarize_one_trial_has_no_interval_and_peer_versions_are_points():
    rows = ram_rows("fd-passing", 64 * MiB, [7])
    rows += [fixture_row(scenario="qemu-peer", mode="qemu-ram-copied", backend="ram", ram_bytes=64 * MiB,
                         live=True, trial=i, downtime_ns=d * MS, ok=True, peer_version=v)
             for i, (d, v) in enumerate([(2, "7.2.22"), (2, "7.2.22"), (5, "10.0.2"), (5, "10.0.2")])]
    s = summarize(table(rows)).set_index(["scenario", "peer_version"])
    assert s.loc[("ram-size", ""), "median"] == 7 * MS and np.isnan(s.loc[("ram-size", ""), "ci_low"])
    assert s.loc[("qemu-peer", "7.2.22"), "median"] == 2 * MS
    assert s.loc[("qemu-peer", "10.0.2"), "median"] == 5 * MS


def test_summarize_keeps_points_apart():
    rows = (ram_rows("fd-passing", 64 * MiB, [1, 1]) + ram_rows("fd-passing", 128 * MiB, [2, 2])
            + ram_rows("fd-passing", 64 * MiB, [3, 3], live=True) + ram_rows("state-copy", 64 * MiB, [4, 4]))
    s = summarize(table(rows)).set_index(["mode", "live", "ram_bytes"])
    assert s.loc[("fd-passing", False, 64 * MiB), "median"] == 1 * MS
    assert s.loc[("fd-passing", False, 128 * MiB), "median"] == 2 * MS
    assert s.loc[("fd-passing", True, 64 * MiB), "median"] == 3 * MS
    assert s.loc[("state-copy", False, 64 * MiB), "median"] == 4 * MS


def test_slope_per_fd():
    pts = pd.DataFrame({"n_fds": [1, 11, 21], "median": [10.0, 30.0, 50.0]})
    assert slope_per_fd(pts) == pytest.approx(2.0)
    assert np.isnan(slope_per_fd(pts.iloc[:1]))


def test_formatting():
    assert fmt_bytes(64 * MiB) == "64 MiB" and fmt_bytes(GiB) == "1 GiB"
    assert fmt_ns(1_500_000) == "1.5 ms" and fmt_ns(2_000) == "2 µs"
    assert fmt_ns(999.9999) == "1 µs"  # rounded before the unit is chosen


# -- figures --------------------------------------------------------------------


def full_table() -> pd.DataFrame:
    rows = (ram_rows("fd-passing", 64 * MiB, [10, 11, 12]) + ram_rows("fd-passing", 256 * MiB, [10, 11, 12])
            + ram_rows("state-copy", 64 * MiB, [100, 110, 120], bytes_sent=64 * MiB)
            + ram_rows("state-copy", 256 * MiB, [400, 410, 420], bytes_sent=256 * MiB)
            + ram_rows("fd-passing", 64 * MiB, [8, 9], live=True)
            + qemu_rows([20, 30]) + fd_count_rows(2) + fd_count_rows(5, "unbatched") + fd_floor_rows()
            + traffic_rows([0, 0], [0, 0]) + traffic_rows([300, 200], [0, 1], "state-copy")
            + [fixture_row(scenario="chardev", mode=m, backend="ram+chardev", ram_bytes=64 * MiB, live=True,
                           trial=0, downtime_ns=5 * MS, lines_sent=1000, lines_lost=lost, reconnects=rec,
                           max_gap_ns=gap * MS)
               for m, lost, rec, gap in (("fd-passing", 0, 0, 5), ("state-copy", 30, 1, 50))]
            + [floor_row("unix-throughput", ram_bytes=GiB, value=GiB, unit="bytes/s"),
               floor_row("memcpy", ram_bytes=GiB, value=4 * GiB, unit="bytes/s"),
               floor_row("handover-floor", backend="ram+tap+chardev", n_fds=3, total_ns=50 * US)])
    # one failed trial, which the figure must own up to
    rows.append(fixture_row(scenario="ram-size", mode="state-copy", backend="ram", ram_bytes=64 * MiB, live=False,
                            trial=7, ok=False, error="migration: timed out"))
    return table(rows)


def test_plot_downtime_vs_ram_series_floors_and_labels():
    fig = plot_downtime_vs_ram(full_table(), {})
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
    assert "ms" in ax.get_ylabel() and "RAM" in ax.get_xlabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(l.startswith("fd-passing, non-live (n=3/point)") for l in labels)
    assert any(l.startswith("fd-passing, live (n=2/point)") for l in labels)
    assert any("state copy, non-live" in l and "1 failed trial not shown" in l for l in labels)
    assert any(l.startswith("QEMU") and "RAM copied" in l for l in labels)
    assert any("floor: all RAM through AF_UNIX at 1 GiB/s" in l for l in labels)
    assert any("floor: raw handover" in l for l in labels)
    # the fd-passing medians are the medians of the fixture rows, in ms, with their intervals as error bars
    line = medians_line(ax, "fd-passing, non-live")
    assert list(line.get_ydata()) == [11.0, 11.0]
    bars = error_bars(ax, "fd-passing, non-live")
    ci = median_ci([10.0, 11.0, 12.0])
    assert bars[:, 0] == pytest.approx([ci.low] * 2) and bars[:, 1] == pytest.approx([ci.high] * 2)
    # the RAM floor is RAM / measured throughput: 64 MiB at 1 GiB/s = 62.5 ms
    floor = next(l for l in ax.get_lines() if l.get_label().startswith("floor: all RAM"))
    assert floor.get_ydata()[0] == pytest.approx(62.5)
    assert "64 MiB" in texts(fig) and "256 MiB" in texts(fig)


def test_plot_downtime_vs_fds_has_both_variants_and_the_floor():
    fig = plot_downtime_vs_fds(full_table(), {})
    ax = fig.axes[0]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(l.startswith("fd-passing, batched: 2 µs/fd") for l in labels)
    assert any(l.startswith("fd-passing, unbatched: 5 µs/fd") for l in labels)
    assert any(l.startswith("floor: raw fd round trip, batched: 1 µs/fd") for l in labels)
    assert ax.get_yscale() == "log" and "ms" in ax.get_ylabel() and "fds" in ax.get_xlabel()


def test_plot_packet_loss_and_chardev():
    df = full_table()
    fig = plot_packet_loss(df, {})
    ax_lost, ax_gap = fig.axes
    assert ax_lost.get_yscale() == "linear" and ax_lost.get_ylim()[0] <= 0  # counts from 0
    assert ax_gap.get_yscale() == "log" and "ms" in ax_gap.get_ylabel()
    text = texts(fig)
    assert "fd-passing\n(n=2)" in text and "state copy\n(n=2)" in text
    assert "floor: raw handover" in text and "target: 0 lost" in text
    fig = plot_chardev(df, {})
    text = texts(fig)
    assert "reconnects" in text and "lines lost" in text and "floor: raw handover" in text


def test_plot_throughput_against_the_floor():
    fig = plot_throughput(full_table(), {})
    ax = fig.axes[0]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any(l.startswith("floor: raw AF_UNIX into fresh memory (limits)") for l in labels)
    assert any(l.startswith("target: 0.8") for l in labels)
    # non-live only, bytes / downtime, at the one size with a floor: 1 GiB / 1 GiB/s
    assert list(medians_line(ax, "floor: raw AF_UNIX").get_ydata()) == [1.0]
    assert list(medians_line(ax, "state copy, non-live").get_xdata()) == [64 * MiB, 256 * MiB]
    assert "no floor measured at 64 MiB, 256 MiB" in texts(fig)
    assert ax.get_ylim()[0] == 0 and "GiB/s" in ax.get_ylabel()
    assert "memcpy" in ax.get_title()


def test_plots_without_data_say_why():
    names = ("ram-size", "fd-count", "tap-traffic", "chardev", "qemu-peer", "limits")
    meta = {"scenarios": {name: {"ran": False, "reason": f"{name} reason"} for name in names}}
    empty = table([])
    for plot, scenario in ((plot_downtime_vs_ram, "ram-size"), (plot_downtime_vs_fds, "fd-count"),
                           (plot_packet_loss, "tap-traffic"), (plot_chardev, "chardev"),
                           (plot_throughput, "ram-size")):
        fig = plot(empty, meta)
        assert isinstance(fig, Figure)
        assert f"{scenario} reason" in texts(fig)


def test_describe_run_and_tables():
    meta = {"host": "h", "kernel": "k", "cpu_model": "c", "cpu_count": 2, "start": "s", "end": "e",
            "git_revision": "abc", "options": {"quick": True, "argv": ["x"]},
            "scenarios": {"ram-size": {"ran": True}, "tap-traffic": {"ran": False, "reason": "needs root"}},
            "warnings": {"cleanup slow": 3}}
    text = describe_run(meta, "/x/benchmarks/reference/run")
    assert "committed reference run" in text and "tap-traffic — needs root" in text
    assert "cleanup slow (×3)" in text and '"quick": true' in text and "argv" not in text
    df = full_table()
    summary = format_summary(summarize(df[df["scenario"] == "ram-size"]))
    assert "64 MiB" in set(summary["RAM"]) and "peer_version" not in summary.columns
    cells = summary.set_index(["mode", "live", "RAM"])["median [95% CI] (ms)"]
    assert cells[("state-copy", "non-live", "256 MiB")] == "410 [386, 436]"
    assert cells[("fd-passing", "live", "64 MiB")] == "8.5 [4.02, 17.9]"  # two trials: t on 1 df
    trials = trials_table(df, "tap-traffic", ["frames_lost", "max_gap_ns"])
    assert list(trials.columns) == ["mode", "variant", "trial", "frames_lost", "max_gap_ms", "ok", "error"]
    # the verdict column of the HTML table holds each target's verdict (every target's *name*
    # contains "fd-passing", so looking for "pass" anywhere in the page proves nothing)
    table_ = targets(df, {})
    styled = format_targets(table_)
    page = styled.to_html()
    at = list(styled.data.columns).index("verdict")
    rows = re.findall(r"<tr>(.*?)</tr>", page, re.S)[1:]
    shown = [re.findall(r"<td[^>]*>(.*?)</td>", r, re.S)[at].strip() for r in rows]
    assert shown == list(table_["verdict"])
    assert "pass" in shown and "not-measured" in shown and "inconclusive" in shown


def test_busy_machine_is_flagged_by_the_documented_rule():
    quiet = {"cpu_count": 2, "loadavg_start": [1.2, 1.0, 1.0], "loadavg_end": [1.9, 1.0, 1.0],
             "busy_processes_start": [{"pid": 7, "comm": "sshd", "cpu_percent": 3.0}], "busy_processes_end": []}
    assert busy_note(quiet) == ""  # 0.6 per CPU; the end's load is the benchmark's own
    assert "Warning" not in describe_run(quiet)
    loaded = dict(quiet, loadavg_start=[1.6, 1.0, 1.0])
    assert "load average 1.60" in busy_note(loaded)
    neighbours = dict(quiet, busy_processes_end=[{"pid": 8, "comm": "cc1", "cpu_percent": 45.0},
                                                 {"pid": 9, "comm": "ld", "cpu_percent": 20.0}])
    note = busy_note(neighbours)
    assert "65% of a CPU at the end" in note and "cc1 (45%)" in note
    assert "⚠ Warning:** the machine was busy" in describe_run(neighbours)
    assert busy_note({}) == ""  # a run that did not record it is not called busy
