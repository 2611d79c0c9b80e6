"""The notebooks run top to bottom, and ``migfd report`` makes one page of them.

02 and 03 run on the committed reference run (``benchmarks/reference/``, the
newest one) or on the directory in $MIGFD_RESULTS; without either they skip
with the reason. 04 compares the reference run with a doctored copy of it
(every time × 3). 01 needs no results and no root: it starts two real
``migfd vm`` processes. Each notebook is executed once for the whole module
(the same executed notebooks make the report), so the file takes well under
two minutes.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from migfd.errors import MigrationError
from migfd.paths import repo_root
from migfd.results import report
from migfd.results.anatomy import TIMELINE_COLUMNS, anatomy_rows, anatomy_table, gantt_trials, load_timelines
from migfd.results.compare import BASE_ENV, NEW_ENV, compare
from migfd.results.load import RESULTS_ENV, find_results, load_results, load_run, newest_run
from migfd.results.targets import floors_beside, targets

NOTEBOOKS = report.NOTEBOOK_DIR
RESULT_NOTEBOOKS = ("02-downtime", "03-packet-loss", "05-anatomy")


def results_dir() -> Path | None:
    if os.environ.get(RESULTS_ENV):
        return find_results(os.environ[RESULTS_ENV])
    return newest_run(repo_root() / "benchmarks" / "reference")


RESULTS = results_dir()
NO_RESULTS = ("no committed reference run under benchmarks/reference/ (and $MIGFD_RESULTS unset): "
              "nothing to execute 02/03 on")


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """name -> executed notebook, run lazily once each."""
    cache: dict[str, object] = {}
    logs = tmp_path_factory.mktemp("kernel-logs")

    def run(name: str):
        if name not in cache:
            cache[name] = report.execute_notebook(NOTEBOOKS / f"{name}.ipynb", RESULTS or Path("/nonexistent"), logs)
        return cache[name]

    return run


def outputs(nb, kind: str | None = None):
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if kind is None or out.get("output_type") == kind:
                yield out


def test_committed_notebooks_have_no_outputs():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        text = path.read_text()
        assert '"output_type"' not in text, f"{path.name} is committed with outputs"
        assert '"execution_count": null' in text or '"cell_type": "code"' not in text
        nb = json.loads(text)
        params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
        if path.stem in RESULT_NOTEBOOKS or path.stem == "04-compare":
            assert len(params) == 1 and "results_dir = None" in "".join(params[0]["source"])


@pytest.mark.timeout(240)
def test_protocol_tour_runs(executed):
    nb = executed("01-protocol-tour")
    assert not list(outputs(nb, "error"))
    text = "\n".join("".join(o.get("text", "")) for o in outputs(nb, "stream"))
    assert "000000  51 45 56 4d 00 00 00 03" in text  # the hex dump starts with the header
    assert text.count("fd record") >= 2
    # the packet of x-multifd-packets, field by field, its pages after the header
    assert "4d 46 44 50" in text and "packet offsets: be64 x 4, normal pages first" in text
    # the transport check refused tcp on both sides
    assert text.count("refused (ExecuteError): Migration requires a UNIX domain socket as transport") == 2
    table = next(o for o in outputs(nb, "execute_result") if "backend-transfer" in o["data"].get("text/plain", ""))
    assert "completed / completed" in table["data"]["text/plain"]


@pytest.mark.skipif(RESULTS is None, reason=NO_RESULTS)
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", RESULT_NOTEBOOKS)
def test_result_notebooks_run(executed, name):
    nb = executed(name)
    assert not list(outputs(nb, "error"))
    images = [o for o in outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= 2
    markdown = "".join(o["data"].get("text/markdown", "") for o in outputs(nb, "display_data"))
    assert str(RESULTS) in markdown  # it says which run it shows


NO_TIMELINES = "This run has no `timelines.csv`"


def assert_shows_the_timelines(nb, run: Path) -> None:
    """05-anatomy executed on ``run`` explains its downtimes phase by phase: the phase table holds the
    steps of the run's own timelines, and the Gantt chart's trials are the run's."""
    assert not list(outputs(nb, "error"))
    text = "".join(o.get("data", {}).get(kind, "") for o in outputs(nb) for kind in ("text/markdown", "text/html"))
    assert NO_TIMELINES not in text
    df, _ = load_results(run)
    timelines = load_timelines(run)
    steps = set(anatomy_table(anatomy_rows(df, timelines), timelines, grouped=True)["label"])
    assert {"stop the guest", "resume the guest"} <= steps  # phase names of the run: stop, resume
    for step in steps:
        assert html.escape(step) in text, step
    shown = gantt_trials(df, timelines)
    assert set(shown) == {"fd-passing", "state copy"}
    for tid in shown.values():
        assert f"`{tid}`" in text and (run / "traces" / f"{tid}.json").is_file()


@pytest.mark.timeout(600)
def test_anatomy_notebook_on_a_real_run_with_timelines(timelines_run, tmp_path):
    # independent of the committed reference run, which may have no timelines: a real bench run that has them
    nb = report.execute_notebook(NOTEBOOKS / "05-anatomy.ipynb", timelines_run, tmp_path)
    assert_shows_the_timelines(nb, timelines_run)
    assert sum("image/png" in o.get("data", {}) for o in outputs(nb)) >= 3  # bars, Gantt, slopes
    # the same run without its timelines: the notebook says so, and the check above fails
    bare = tmp_path / "bare"
    shutil.copytree(timelines_run, bare)
    (bare / "timelines.csv").write_text(",".join(TIMELINE_COLUMNS) + "\n")
    nb = report.execute_notebook(NOTEBOOKS / "05-anatomy.ipynb", bare, tmp_path)
    assert NO_TIMELINES in "".join(o.get("data", {}).get("text/markdown", "") for o in outputs(nb))
    with pytest.raises(AssertionError):
        assert_shows_the_timelines(nb, bare)


def verdict_cells(nb, column: str = "verdict") -> list[str]:
    """The verdict column of the targets table the notebook displayed (its HTML output); or
    ``column`` of the first table that has one."""
    def headers(page: str) -> list[str]:
        head = re.search(r"<thead>(.*?)</thead>", page, re.S)
        return [h.strip() for h in re.findall(r"<th[^>]*>(.*?)</th>", head.group(1), re.S)] if head else []

    page = next(o["data"]["text/html"] for o in outputs(nb) if column in headers(o.get("data", {}).get("text/html", "")))
    at = headers(page).index(column)
    body = re.search(r"<tbody>(.*?)</tbody>", page, re.S).group(1)
    return [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)[at].strip()
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


@pytest.mark.skipif(RESULTS is None, reason=NO_RESULTS)
@pytest.mark.timeout(240)
def test_targets_table_shows_the_runs_verdicts(executed):
    # every target's name contains "fd-passing": the page always holds "pass", so the check
    # is on the verdict column itself, against the verdicts computed from the same run
    df, meta = load_results(RESULTS)
    expected = list(targets(df, meta)["verdict"])
    assert verdict_cells(executed("02-downtime")) == expected
    assert set(expected) <= {"pass", "fail", "inconclusive", "not-measured"}


@pytest.mark.skipif(RESULTS is None, reason=NO_RESULTS)
@pytest.mark.timeout(240)
def test_floors_table_shows_the_runs_floors_and_flags(executed):
    df, meta = load_results(RESULTS)
    expected = floors_beside(df, meta)
    assert verdict_cells(executed("02-downtime"), "flag") == list(expected["flag"])
    assert set(expected["flag"]) <= {"below", "not below", "not-measured"}


@pytest.fixture(scope="module")
def slowed_run(tmp_path_factory) -> Path:
    """The results under test with every downtime and total time × 3: a run that regressed."""
    if RESULTS is None:
        pytest.skip(NO_RESULTS)
    out = tmp_path_factory.mktemp("slowed") / "run"
    shutil.copytree(RESULTS, out)
    df = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    for col in ("downtime_ns", "total_ns"):
        df[col] = [str(int(v) * 3) if v else "" for v in df[col]]
    df.to_csv(out / "results.csv", index=False)
    return out


@pytest.mark.skipif(RESULTS is None, reason=NO_RESULTS)
@pytest.mark.timeout(240)
def test_compare_notebook_shows_the_regression(slowed_run, tmp_path, monkeypatch):
    monkeypatch.setenv(BASE_ENV, str(RESULTS))
    monkeypatch.setenv(NEW_ENV, str(slowed_run))
    nb = report.execute_notebook(NOTEBOOKS / "04-compare.ipynb", slowed_run, tmp_path)
    assert not list(outputs(nb, "error"))
    assert [o for o in outputs(nb) if "image/png" in o.get("data", {})]  # the forest plot
    markdown = "".join(o["data"].get("text/markdown", "") for o in outputs(nb, "display_data"))
    changes = compare(load_run(RESULTS)[0], load_run(slowed_run)[0])
    n = int((changes["verdict"] == "regressed").sum())
    assert n > 0 and f"{n} regressed, 0 improved" in markdown


@pytest.mark.skipif(RESULTS is None, reason=NO_RESULTS)
@pytest.mark.timeout(240)
def test_report_page_is_self_contained(executed, tmp_path):
    books = [(NOTEBOOKS / f"{name}.ipynb", executed(name)) for name in ("01-protocol-tour", *RESULT_NOTEBOOKS)]
    _, meta = load_results(RESULTS)
    html = report.to_html(report.combine(books, RESULTS, meta))
    assert html.count("data:image/png;base64,") >= 5
    assert not re.search(r'<script[^>]*\ssrc=', html)  # nothing loaded from elsewhere
    assert not re.search(r'<img[^>]*\ssrc="(?!data:)', html)
    assert "Targets" in html
    # code of the result notebooks is hidden, the tour's is shown
    assert "plot_downtime_vs_ram(df, meta)" not in html
    assert "write_configuration" in html


@pytest.mark.skipif(RESULTS is None, reason=NO_RESULTS)
def test_the_report_carries_its_run_for_migfd_compare(tmp_path, monkeypatch):
    # build_report without executing the notebooks: what matters here is the page's payload
    monkeypatch.setattr(report, "notebooks", lambda results=None: [NOTEBOOKS / "03-packet-loss.ipynb"])
    index = report.build_report(RESULTS, tmp_path / "report")
    df_page, meta_page = load_run(index)
    df_dir, meta_dir = load_results(RESULTS)
    pd.testing.assert_frame_equal(df_page, df_dir)
    assert meta_page == meta_dir
    proc = subprocess.run([sys.executable, "-m", "migfd.cli", "compare", str(index), str(RESULTS), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["base"]["kind"] == "html" and doc["changes"]
    # the same run on both sides: nothing changed
    assert not [c for c in doc["changes"] if c["verdict"] in ("regressed", "improved")]


def test_the_comparison_notebook_only_when_there_is_a_base(monkeypatch):
    reference = newest_run(repo_root() / "benchmarks" / "reference")
    monkeypatch.delenv(BASE_ENV, raising=False)
    monkeypatch.delenv(NEW_ENV, raising=False)
    if reference is not None:
        names = [p.name for p in report.notebooks(reference)]
        assert "04-compare.ipynb" not in names and "02-downtime.ipynb" in names
    monkeypatch.setenv(BASE_ENV, str(reference or repo_root()))
    assert "04-compare.ipynb" in [p.name for p in report.notebooks(Path("/elsewhere"))]


def test_report_with_missing_results_is_one_line(tmp_path):
    with pytest.raises(MigrationError, match="holds no results.csv"):
        report.build_report(tmp_path / "nothing", tmp_path / "out")
    proc = subprocess.run([sys.executable, "-m", "migfd.cli", "report", "--results", str(tmp_path / "nothing"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "migfd report: error:" in proc.stderr
