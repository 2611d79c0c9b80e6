"""``migfd compare``: its JSON shape, HTML reports as input, the page it writes, older formats, and
one-line errors.

The runs compared are the committed reference run and doctored copies of it
(every downtime and total time × 3; a column or a floor added or taken away),
or small hand-made tables: FIXTURES of the comparison, not measurements. The
statistics behind the verdicts are tested in test_stats.py and test_coverage.py,
their power in test_compare_power.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from migfd import cli
from migfd.paths import repo_root
from migfd.results.compare import (
    CHANGE_FIELDS,
    changes_json,
    compare,
    default_pair,
    format_changes,
    metadata_differences,
    plot_forest,
    verdict_counts,
)
from migfd.results.load import EMBED_ID, clean_results, embed_results, embedded_results, load_run


#: a real run of format 1 (Python-thread guests, 3-5 trials a point), kept as test data: the power
#: and shape of compare are held on it, whatever run benchmarks/reference/ holds now
REFERENCE = repo_root() / "tests" / "data" / "runs" / "20261201T214847Z-vm"
needs_reference = pytest.mark.skipif(REFERENCE is None, reason="no committed reference run under benchmarks/reference/")


def run_dir(path: Path, rows: list[dict], meta: dict | None = None) -> Path:
    path.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path / "results.csv", index=False)
    (path / "metadata.json").write_text(json.dumps(meta or {"host": "fixture"}))
    return path


def rows_of(scenario: str, downtimes: list[float], **kw) -> list[dict]:
    return [{"scenario": scenario, "mode": "fd-passing", "variant": "", "backend": "ram", "ram_bytes": 1 << 26,
             "n_fds": 1, "live": True, "trial": i, "downtime_ns": d, "total_ns": d * 2, "ok": True, "error": "",
             **kw} for i, d in enumerate(downtimes)]


@pytest.fixture
def slowed_reference(tmp_path) -> tuple[Path, Path]:
    """The reference run and a copy of it with every downtime and total time × 3."""
    if REFERENCE is None:
        pytest.skip("no committed reference run under benchmarks/reference/")
    new = tmp_path / "new"
    shutil.copytree(REFERENCE, new)
    df = pd.read_csv(new / "results.csv", dtype=str, keep_default_na=False)
    for col in ("downtime_ns", "total_ns"):
        df[col] = [str(int(v) * 3) if v else "" for v in df[col]]
    df.to_csv(new / "results.csv", index=False)
    meta = json.loads((new / "metadata.json").read_text())
    meta["kernel"] = "Linux 9.9.9-doctored"
    (new / "metadata.json").write_text(json.dumps(meta))
    return REFERENCE, new


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["compare", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_has_the_documented_shape(slowed_reference, capsys):
    base, new = slowed_reference
    code, out, err = run_cli(capsys, base, new, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"base", "new", "machine", "not_compared", "notes", "changes"}
    assert doc["base"]["kind"] == "directory" and doc["new"]["kernel"] == "Linux 9.9.9-doctored"
    # the floors were not touched: the same machine, judged first
    assert set(doc["machine"]) >= {"floor_ratio", "ci_low", "ci_high", "verdict"}
    assert doc["machine"]["verdict"] == "same" and doc["machine"]["floor_ratio"] == pytest.approx(1.0)
    assert doc["machine"]["ci_low"] < 1 < doc["machine"]["ci_high"] and doc["machine"]["floors"] >= 10
    # the reference run is older than format versions: said so, and nothing else is missing
    assert doc["base"]["format_version"] == 1 and any("BASE is format 1" in n for n in doc["notes"])
    assert doc["not_compared"]["metrics_only_base"] == [] == doc["not_compared"]["floors_only_new"]
    # exactly the documented fields; the reference run has QEMU rows, so each change also says
    # which QEMU its point ran (empty for migfd's own points): the versions the run has, and the
    # accelerator (older runs: migfd's thread, QEMU's TCG)
    assert doc["changes"] and all(list(c) == CHANGE_FIELDS + ["peer_version", "accel"] for c in doc["changes"])
    rows = pd.read_csv(base / "results.csv")
    versions = set(rows.loc[rows["scenario"] == "qemu-peer", "peer_version"].dropna().astype(str))
    assert versions and {c["peer_version"] for c in doc["changes"] if c["scenario"] == "qemu-peer"} == versions
    assert doc["base"]["points_not_in_the_other"] == 0 == doc["new"]["points_not_in_the_other"]
    down = [c for c in doc["changes"] if c["metric"] == "downtime_ns"]
    assert sum(c["verdict"] == "regressed" for c in down) >= 0.8 * len(down)
    # the floors did not move, so over them the code regressed just as much
    assert all(c["verdict_normalized"] == c["verdict"] or c["verdict"] != "regressed" for c in down)
    assert sum(c["verdict_normalized"] == "regressed" for c in down) >= 0.8 * len(down)
    one = down[0]
    assert one["ratio"] == pytest.approx(3.0, rel=0.01) and one["ci_low"] <= one["ratio"] <= one["ci_high"]
    assert one["new_median"] == pytest.approx(3 * one["base_median"], rel=0.01)
    assert isinstance(one["n_base"], int) and one["live"] in (True, False) and one["kind"] == "time"
    counts = [c for c in doc["changes"] if c["kind"] == "count"]
    assert {c["metric"] for c in counts} == {"frames_lost", "frames_duplicated", "lines_lost", "reconnects"}
    # a rate per frame or line sent: no floor scales it, its verdict over the floors is its own
    assert all(c["verdict_normalized"] == c["verdict"] and c["base_rate"] is not None for c in counts)
    # throughput fell with the tripled downtime: a regression, since more is better
    tp = [c for c in doc["changes"] if c["metric"] == "throughput_bytes_s"]
    assert tp and all(c["verdict"] in ("regressed", "inconclusive") for c in tp)
    assert any(c["verdict"] == "regressed" for c in tp)


def test_an_html_report_is_as_good_as_its_directory(slowed_reference, tmp_path, capsys):
    base, new = slowed_reference
    page = tmp_path / "report.html"
    page.write_text(embed_results("<html><body><p>a report</p></body></html>", base))
    assert f'id="{EMBED_ID}"' in page.read_text()
    from_dir = compare(load_run(base)[0], load_run(new)[0])
    from_page = compare(load_run(page)[0], load_run(new)[0])
    pd.testing.assert_frame_equal(from_dir, from_page)
    code, out, _ = run_cli(capsys, page, new, "--json")
    assert code == 0 and json.loads(out)["base"]["kind"] == "html"


def test_embedded_results_survive_markup_in_the_data(tmp_path):
    run = run_dir(tmp_path / "run", rows_of("chardev", [1, 2], error="</script><b>x"),
                  {"host": "</script>", "note": "a & b"})
    page = embed_results("<html><body></body></html>", run)
    csv_text, meta = embedded_results(page)
    assert meta == {"host": "</script>", "note": "a & b"}
    assert "</script><b>x" in csv_text and page.count("</script>") == 1


def test_out_writes_a_page_with_the_forest_plot_and_what_differed(slowed_reference, tmp_path, capsys):
    base, new = slowed_reference
    code, out, err = run_cli(capsys, base, new, "--out", tmp_path / "cmp")
    assert code == 0, err
    page = (tmp_path / "cmp" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 1  # the forest plot, embedded
    assert "Linux 9.9.9-doctored" in page and "What else differed" in page
    assert "Points that changed" in page and "regressed" in page
    # the machine first, then what changed, then the figure
    assert page.index("The machine") < page.index("Points that changed") < page.index("Ratios NEW/BASE")
    assert "the machines are alike" in page and "Over the machine's floors" in page
    assert "regressed" in out  # the text summary still goes to stdout


def test_metadata_differences():
    diff = metadata_differences({"kernel": "a", "packages": {"numpy": "1"}, "git_revision": "x"},
                                {"kernel": "b", "packages": {"numpy": "1", "scipy": "2"}, "git_revision": "x"})
    d = diff.set_index("what")
    assert d.loc["kernel", "differs"] and not d.loc["git_revision", "differs"]
    assert d.loc["packages.scipy", "differs"] and not d.loc["packages.numpy", "differs"]


@pytest.mark.parametrize("case", ["missing", "html-without-data", "no-common-points", "not-a-csv"])
def test_bad_input_is_one_line_and_status_2(case, tmp_path, capsys):
    good = run_dir(tmp_path / "good", rows_of("chardev", [1, 2, 3]))
    if case == "missing":
        other = tmp_path / "nowhere"
    elif case == "html-without-data":
        other = tmp_path / "plain.html"
        other.write_text("<html><body>no data</body></html>")
    elif case == "no-common-points":
        other = run_dir(tmp_path / "other", rows_of("fd-count", [1, 2, 3]))
    else:
        other = tmp_path / "bad"
        other.mkdir()
        (other / "results.csv").write_text('scenario,mode\n"unterminated\n')
    code, out, err = run_cli(capsys, good, other)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("migfd compare: error: ") and "Traceback" not in err


def test_failed_trials_count_for_losses_not_for_times():
    base = rows_of("tap-traffic", [10, 11, 12], frames_sent=100, frames_lost=0)
    new = rows_of("tap-traffic", [10, 11, 12], frames_sent=100, frames_lost=0)
    new[2].update(ok=False, error="check failed", downtime_ns=500, frames_lost=40)
    c = compare(clean_results(pd.DataFrame(base)), clean_results(pd.DataFrame(new))).set_index("metric")
    assert c.loc["downtime_ns", "n_new"] == 2 and c.loc["frames_lost", "n_new"] == 3
    assert c.loc["frames_lost", "new_median"] == 0  # one trial of three lost frames: the median did not move


def test_peer_version_is_part_of_the_point_when_present():
    def qemu(version, downtimes):
        return rows_of("qemu-peer", downtimes, mode="qemu-ram-copied", peer_version=version)

    base = clean_results(pd.DataFrame(qemu("7.2.22", [10, 11, 12]) + qemu("10.0.2", [20, 21, 22])))
    new = clean_results(pd.DataFrame(qemu("7.2.22", [10, 11, 12]) + qemu("10.0.2", [60, 63, 66])))
    c = compare(base, new)
    down = c[c["metric"] == "downtime_ns"].set_index("peer_version")
    assert down.loc["10.0.2", "verdict"] != down.loc["7.2.22", "verdict"]
    assert down.loc["10.0.2", "ratio"] == pytest.approx(3.0)
    without = compare(clean_results(pd.DataFrame(rows_of("chardev", [1, 2]))),
                      clean_results(pd.DataFrame(rows_of("chardev", [1, 2]))))
    assert "peer_version" not in without.columns and "accel" not in without.columns
    assert [list(c) for c in changes_json(without)] == [CHANGE_FIELDS] * len(without)
    assert all(list(c) == CHANGE_FIELDS + ["peer_version"] for c in changes_json(c))


@needs_reference
def test_default_pair(tmp_path, monkeypatch):
    for name in ("MIGFD_BASE", "MIGFD_NEW", "MIGFD_RESULTS"):
        monkeypatch.delenv(name, raising=False)
    root = tmp_path / "checkout"
    ref = run_dir(root / "benchmarks/reference/20250101T000000Z-a", rows_of("chardev", [1, 2]))
    # only the reference: nothing to compare it with
    assert default_pair(root=root) == (None, ref.resolve())
    fresh = run_dir(root / "benchmarks/results/20250301T000000Z-a", rows_of("chardev", [1, 2]))
    base, new = default_pair(root=root)
    assert base.resolve() == ref.resolve() and new.resolve() == fresh.resolve()
    monkeypatch.setenv("MIGFD_BASE", str(fresh))
    monkeypatch.setenv("MIGFD_NEW", str(ref))
    assert default_pair(root=root) == (fresh, ref)


def test_tables_and_forest_plot_of_the_changes():
    base = clean_results(pd.DataFrame(rows_of("chardev", [10, 11, 12, 10, 11]) + rows_of("ram-size", [5, 5, 5])))
    new = clean_results(pd.DataFrame(rows_of("chardev", [30, 33, 36, 30, 33]) + rows_of("ram-size", [5, 5, 5])))
    changes = compare(base, new)
    assert verdict_counts(changes) == {"regressed": 2, "improved": 0, "unchanged": 2, "inconclusive": 0}
    table = format_changes(changes)
    assert list(table["verdict"]) == ["regressed", "regressed", "unchanged", "unchanged"]  # changes first
    assert table.loc[0, "NEW/BASE [95% CI]"].startswith("3 [") and table.loc[0, "trials (base / new)"] == "5 / 5"
    assert len(format_changes(changes, only_changed=True)) == 2
    fig = plot_forest(changes, floor_ratio=0.9)
    changed, every = fig.axes[:2]
    # what changed first, one line a point; then every comparison, one row a family
    labels = [t.get_text() for t in changed.get_yticklabels()]
    assert sorted(labels) == ["chardev fd-passing 64 MiB live: downtime_ns", "chardev fd-passing 64 MiB live: total_ns"]
    families = [t.get_text() for t in every.get_yticklabels()]
    assert families == ["chardev · fd-passing · downtime_ns (1)", "chardev · fd-passing · total_ns (1)",
                        "ram-size · fd-passing · downtime_ns (1)", "ram-size · fd-passing · total_ns (1)"]
    assert changed.get_xscale() == "log" == every.get_xscale()
    assert any(list(l.get_xdata()) == [0.9, 0.9] for l in every.get_lines())  # the machine's floor ratio


def test_the_forest_plot_of_the_reference_run_fits_a_screen_or_two(slowed_reference):
    base, new = slowed_reference
    changes = compare(load_run(base)[0], load_run(new)[0])
    assert len(changes) > 150
    height_px = plot_forest(changes).get_size_inches()[1] * 100
    assert height_px < 2000, "one row per family, not per point: was 3,571 px with a row per point"


def doctored(tmp_path, name: str, edit) -> Path:
    """A copy of the reference run whose results.csv went through ``edit`` (a DataFrame of strings)."""
    if REFERENCE is None:
        pytest.skip("no committed reference run under benchmarks/reference/")
    out = tmp_path / name
    shutil.copytree(REFERENCE, out)
    df = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    edit(df).to_csv(out / "results.csv", index=False)
    return out


def test_an_older_run_is_compared_on_what_both_measured_and_the_output_says_so(tmp_path, capsys):
    def newer(df):
        # a run of the current format with a time column the reference run predates, and one floor fewer
        df = df[df["variant"] != "memcpy"].copy()
        df["outage_ns"] = [str(int(v) + 1000) if v else "" for v in df["downtime_ns"]]
        df["format_version"] = "2"
        return df

    new = doctored(tmp_path, "new", newer)
    code, out, err = run_cli(capsys, REFERENCE, new, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["base"]["format_version"], doc["new"]["format_version"]) == (1, 2)
    assert doc["not_compared"]["metrics_only_new"] == ["outage_ns"]
    assert doc["not_compared"]["floors_only_base"] == ["memcpy 256 MiB"]
    assert not any(c["metric"] == "outage_ns" for c in doc["changes"])
    notes = "\n".join(doc["notes"])
    assert "BASE is format 1" in notes and "NEW is" not in notes
    assert "measured only by NEW: outage_ns" in notes and "floors only in BASE: memcpy 256 MiB" in notes
    code, out, _ = run_cli(capsys, REFERENCE, new)
    assert "measured only by NEW: outage_ns" in out and "format 1" in out


def test_a_new_time_column_is_compared_once_both_runs_have_it(tmp_path):
    def with_outage(factor):
        def edit(df):
            df = df.copy()
            df["outage_ns"] = [str(int(int(v) * factor)) if v else "" for v in df["downtime_ns"]]
            df["format_version"] = "2"
            return df
        return edit

    base = load_run(doctored(tmp_path, "base", with_outage(1)))[0]
    new = load_run(doctored(tmp_path, "new", with_outage(3)))[0]
    changes = compare(base, new)
    outage = changes[changes["metric"] == "outage_ns"]
    assert len(outage) == len(changes[changes["metric"] == "downtime_ns"]) > 20
    assert (outage["kind"] == "time").all() and (outage["verdict"] == "regressed").mean() >= 0.8
    assert not changes[changes["metric"] == "downtime_ns"]["verdict"].isin(["regressed", "improved"]).any()


def test_a_newer_format_is_read_and_said(tmp_path, capsys):
    new = doctored(tmp_path, "new", lambda df: df.assign(format_version="9"))
    code, out, err = run_cli(capsys, REFERENCE, new, "--json")
    assert code == 0, err
    assert any("NEW is format 9, newer than" in n for n in json.loads(out)["notes"])


def test_written_runs_carry_the_format_version():
    from migfd.bench.metadata import FORMAT_VERSION
    from migfd.bench.runner import COLUMNS
    assert "format_version" in COLUMNS and FORMAT_VERSION >= 2
