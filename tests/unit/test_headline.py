"""The report's summary (migfd.results.headline) computed from a run: the committed reference run, and
copies of it given an outage column (issue 15's ``outage_ns``), so that the outage shows beside the
downtime only where a run measured it. The numbers are checked against the interval functions
applied to the rows directly, never against typed-in values.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from migfd.paths import repo_root
from migfd.results import headline
from migfd.results.headline import fmt_ratio, has_outage, reference_sentence, run_summary
from migfd.results.load import load_results, newest_run, select
from migfd.results.summary import fmt_interval, fmt_ns
from migfd.results.targets import targets
from migfd.stats import median_ci, ratio_ci

REFERENCE = newest_run(repo_root() / "benchmarks" / "reference")
pytestmark = pytest.mark.skipif(REFERENCE is None, reason="no committed reference run under benchmarks/reference/")


@pytest.fixture(scope="module")
def reference():
    return load_results(REFERENCE)


@pytest.fixture(scope="module")
def summary(reference):
    df, meta = reference
    return run_summary(df, meta, path=REFERENCE)


def _values(rows: pd.DataFrame, column: str = "downtime_ns") -> np.ndarray:
    return pd.to_numeric(rows[column], errors="coerce").dropna().to_numpy(dtype=float)


def test_state_copy_answers_are_the_runs_own_medians_and_ratios(reference, summary):
    df, meta = reference
    copies = [a for a in summary.answers if a.against == "state copy"]
    rows = select(df, "ram-size")
    sizes = sorted(rows["ram_bytes"].dropna().unique())
    assert {a.where.rsplit(" ", 1)[0] for a in copies} == {"64 MiB", "4 GiB"} == {
        f"{int(s) >> 20} MiB" if s < 1 << 30 else f"{int(s) >> 30} GiB" for s in (sizes[0], sizes[-1])}
    for a in copies:
        size = sizes[0] if a.where.startswith("64 MiB") else sizes[-1]
        live = a.where.endswith(" live")
        at = rows[(rows["ram_bytes"] == size) & (rows["live"] == live)]
        fd, sc = _values(at[at["mode"] == "fd-passing"]), _values(at[at["mode"] == "state-copy"])
        assert a.fd == median_ci(fd) and a.other == median_ci(sc) and a.ratio == ratio_ci(fd, sc)
        # the outage beside it, from the same trials (the run has the observer's column)
        fd_o, sc_o = _values(at[at["mode"] == "fd-passing"], "outage_ns"), _values(at[at["mode"] == "state-copy"], "outage_ns")
        assert a.fd_outage == median_ci(fd_o) and a.other_outage == median_ci(sc_o)
        assert a.outage_ratio == ratio_ci(fd_o, sc_o)
    assert has_outage(df) and summary.has_outage
    text = summary.markdown()
    for a in summary.answers:
        assert f"| {fmt_interval(a.fd, fmt_ns)} | {fmt_interval(a.other, fmt_ns)} | {fmt_ratio(a.ratio)} |" in text


def test_a_run_older_than_the_observer_shows_downtime_only():
    df, meta = load_results(repo_root() / "tests" / "data" / "runs" / "20261201T214847Z-vm")
    summary = run_summary(df, meta)
    assert not has_outage(df) and not summary.has_outage
    assert "outage" not in summary.table() and "measured no outage" in summary.markdown()


def test_qemu_answers_take_each_version_and_mode_as_a_point(reference):
    df, meta = reference
    q = select(df, "qemu-peer")
    expected = {(m, v) for m, v in zip(q["mode"], q["peer_version"]) if m in headline.QEMU_MODES}
    answers = headline.qemu_answers(df, outage=False)
    assert len(answers) == len(expected) >= 3
    assert {a.against for a in answers} >= {"QEMU 10.0.2 cpr-transfer", "QEMU 10.0.2 RAM shared (x-ignore-shared)",
                                            "QEMU 7.2.22 RAM shared (x-ignore-shared)"}


def test_verdict_counts_and_failing_targets_are_the_targets_table(reference, summary):
    df, meta = reference
    table = targets(df, meta)
    line = summary.verdict_line()
    counts = table["verdict"].value_counts()
    assert f"{counts.get('pass', 0)} pass, {counts.get('fail', 0)} fail" in line
    assert len(summary.verdicts.get("fail", [])) == counts.get("fail", 0)
    for failing in summary.verdicts.get("fail", []):
        assert failing in line


@pytest.fixture()
def with_outage(tmp_path, reference) -> Path:
    """The reference run with an outage column: downtime + 1 ms for ram-size and qemu-peer rows, else empty."""
    out = tmp_path / "run"
    shutil.copytree(REFERENCE, out)
    raw = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    guest = raw["scenario"].isin(["ram-size", "qemu-peer"]) & (raw["downtime_ns"] != "")
    raw["outage_ns"] = ""
    raw.loc[guest, "outage_ns"] = [str(int(v) + 1_000_000) for v in raw.loc[guest, "downtime_ns"]]
    raw.to_csv(out / "results.csv", index=False)
    return out


def test_outage_shows_beside_downtime_where_the_run_has_it(with_outage):
    df, meta = load_results(with_outage)
    assert has_outage(df)
    summary = run_summary(df, meta, path=with_outage)
    assert summary.has_outage and "its outage" in summary.table()
    rows = select(df, "ram-size")
    for a in summary.answers:
        assert not np.isnan(a.fd_outage.value) and not np.isnan(a.other_outage.value)
        if a.against == "state copy":
            size = rows["ram_bytes"].min() if a.where.startswith("64 MiB") else rows["ram_bytes"].max()
            at = rows[(rows["ram_bytes"] == size) & (rows["live"] == a.where.endswith(" live"))]
            fd = _values(at[at["mode"] == "fd-passing"], "outage_ns")
            sc = _values(at[at["mode"] == "state-copy"], "outage_ns")
            assert a.fd_outage == median_ci(fd) and a.outage_ratio == ratio_ci(fd, sc)
    assert "outage" in summary.figure().axes[0].get_title()


def test_an_empty_outage_column_is_downtime_only(with_outage):
    raw = pd.read_csv(with_outage / "results.csv", dtype=str, keep_default_na=False)
    raw["outage_ns"] = ""
    raw.to_csv(with_outage / "results.csv", index=False)
    df, meta = load_results(with_outage)
    summary = run_summary(df, meta, path=with_outage)
    assert not summary.has_outage and "its outage" not in summary.table()


def test_the_change_against_the_reference_puts_the_machine_first(monkeypatch, tmp_path):
    new = tmp_path / "new"
    shutil.copytree(REFERENCE, new)
    changes = [{"verdict": "regressed", "verdict_normalized": "unchanged"},
               {"verdict": "improved", "verdict_normalized": "unchanged"}]
    doc = {"base": {"host": "vm"}, "new": {}, "changes": changes,
           "machine": {"floor_ratio": 0.5, "ci_low": 0.45, "ci_high": 0.55, "verdict": "faster"}}
    monkeypatch.setattr(headline, "compare_json", lambda base, new: doc)
    line = reference_sentence(REFERENCE, new, {})
    assert line.index("faster") < line.index("1 regressed")
    assert "normalized by the machine: 0 regressed, 0 improved, 2 unchanged" in line
    # a compare without machine verdicts (older): the code's counts, and what is known of the machine
    doc.pop("machine")
    for c in changes:
        c.pop("verdict_normalized")
    line = reference_sentence(REFERENCE, new, {"cpu_model": "Other CPU"})
    assert "not compared by floors" in line and "Other CPU" in line and "normalized" not in line
    assert reference_sentence(REFERENCE, REFERENCE, {}).startswith("this run is the committed reference run")
    assert reference_sentence(None, new, {}) is None


def test_the_change_against_the_reference_from_the_real_compare(tmp_path):
    new = tmp_path / "new"
    shutil.copytree(REFERENCE, new)
    line = reference_sentence(REFERENCE, new, load_results(new)[1])
    n = len(headline.compare_json(REFERENCE, new)["changes"])
    assert f"{n} point × metric comparisons" in line and "0 regressed, 0 improved" in line
