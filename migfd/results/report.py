"""``migfd report``: run the benchmark, execute the notebooks on its results, write one HTML page.

The page is ``reports/<UTC timestamp>-<host>/index.html``: the notebooks
executed on one results directory (the comparison with the committed
reference run when there is one), code of the result notebooks hidden, every
figure embedded as a data URI so the file can be mailed or attached as it is;
the run's ``results.csv`` and ``metadata.json`` are embedded in the page (so
``migfd compare`` can read the page alone) and copied beside it. Every expected
failure is a :class:`~migfd.errors.MigrationError`, which the command line
turns into one line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

from migfd.errors import MigrationError
from migfd.paths import repo_root
from migfd.results.compare import COMPARE_NOTEBOOK, default_pair
from migfd.results.describe import describe_run
from migfd.results.load import embed_results, load_results

NOTEBOOK_DIR = repo_root() / "notebooks"
#: The protocol tour keeps its code in the report: the code is what it teaches. The other
#: notebooks' code is only calls into migfd.results: the report shows their outputs.
SHOW_CODE = ("01-protocol-tour.ipynb",)
#: Per notebook; the tour starts VMs, the others only read a CSV.
CELL_TIMEOUT_S = 600


def _stamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def run_benchmark(quick: bool) -> Path:
    """``migfd bench`` in its default (or quick) mode, into benchmarks/results/<UTC>-<host>/."""
    try:
        # Only a new run needs the runner (and the VM and QEMU peers under it); a report on
        # existing results must work where they cannot be imported.
        from migfd.bench import runner
    except ImportError as exc:
        raise MigrationError(f"the benchmark runner is not available ({exc}); "
                             f"use --results DIR to report on existing results") from None
    out = repo_root() / "benchmarks" / "results" / f"{_stamp()}-{socket.gethostname()}"
    args = argparse.Namespace(quick=quick, scenarios=None, trials=None, out=str(out))
    code = runner.main(args)
    if code != 0:
        raise MigrationError(f"migfd bench exited with status {code}; nothing to report "
                             f"(partial results, if any, in {out})")
    if not (out / "results.csv").is_file():
        raise MigrationError(f"migfd bench wrote no results.csv in {out}")
    return out


def notebooks(results: Path | None = None) -> list[Path]:
    """The notebooks a report on ``results`` executes, in order.

    The comparison (04) only when there is a base to compare with: a committed
    reference run ($MIGFD_BASE overrides it) that is not ``results`` itself.
    """
    found = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]-*.ipynb"))
    if not found:
        raise MigrationError(f"no notebooks in {NOTEBOOK_DIR} (migfd report runs from a source checkout)")
    if results is not None and default_pair(new=results)[0] is None:
        found = [p for p in found if p.name != COMPARE_NOTEBOOK]
    return found


def _inject_parameters(nb, results: Path) -> None:
    """papermill's convention: a cell tagged injected-parameters right after the parameters cell."""
    import nbformat

    cell = nbformat.v4.new_code_cell(f"results_dir = {str(results)!r}")
    cell.metadata["tags"] = ["injected-parameters"]
    for i, c in enumerate(nb.cells):
        if "parameters" in c.get("metadata", {}).get("tags", []):
            nb.cells.insert(i + 1, cell)
            return


def _kernel_log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    useful = [t for t in text if "running over TCP without encryption" not in t]
    return " | ".join(useful[-lines:])


def execute_notebook(path: Path, results: Path, log_dir: Path):
    """Run one notebook top to bottom on ``results``; returns the executed notebook.

    The kernel gets MIGFD_RESULTS in its environment and the parameter cell a
    ``results_dir`` (either suffices); its working directory is notebooks/.
    A cell error becomes a MigrationError naming the notebook, the cell and the error.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    _inject_parameters(nb, results)
    env = dict(os.environ, MIGFD_RESULTS=str(results), PYTHONWARNINGS="ignore")
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    log_path = log_dir / f"{path.stem}.kernel.log"
    with open(log_path, "w") as log:
        try:
            client.execute(env=env, stderr=log)
        except CellExecutionError as exc:
            cell = next((i for i, c in enumerate(nb.cells)
                         if any(o.get("output_type") == "error" for o in c.get("outputs", []))), None)
            where = f"cell {cell}" if cell is not None else "a cell"
            raise MigrationError(f"notebook {path.name}: {where} failed: {exc.ename}: "
                                 f"{_one_line(exc.evalue)}") from None
        except (CellTimeoutError, DeadKernelError) as exc:
            raise MigrationError(f"notebook {path.name}: {_one_line(str(exc))} "
                                 f"{_kernel_log_tail(log_path)}".strip()) from None
        except RuntimeError as exc:  # kernel did not start
            raise MigrationError(f"notebook {path.name}: cannot run a python3 kernel: {_one_line(str(exc))}; "
                                 f"{_kernel_log_tail(log_path)}") from None
    return nb


def _one_line(text: str, limit: int = 300) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(text))
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _header_cell(results: Path, metadata: dict, names: list[str]):
    import nbformat

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = "\n".join(f"- {name}" for name in names)
    text = (f"# migfd report: fd-passing against state copying\n\n"
            f"Written {now} by `migfd report` from the run below; every number and figure comes "
            f"from its [`results.csv`](results.csv) (beside this page, with "
            f"[`metadata.json`](metadata.json)); nothing is typed in.\n\n"
            f"{describe_run(metadata, results)}\n\n"
            f"Contents (the notebooks of `notebooks/`, executed on this run):\n\n{parts}\n")
    return nbformat.v4.new_markdown_cell(text)


def combine(executed: list[tuple[Path, object]], results: Path, metadata: dict):
    """One notebook of all executed ones, a header first; code of all but SHOW_CODE notebooks tagged for removal."""
    import nbformat

    book = nbformat.v4.new_notebook()
    book.metadata = executed[0][1].metadata if executed else {}
    names = []
    for path, nb in executed:
        first = next((c for c in nb.cells if c.cell_type == "markdown"), None)
        title = first.source.splitlines()[0].lstrip("# ").strip() if first is not None else path.stem
        names.append(title)
    book.cells.append(_header_cell(results, metadata, names))
    for path, nb in executed:
        for cell in nb.cells:
            tags = set(cell.get("metadata", {}).get("tags", []))
            if tags & {"parameters", "injected-parameters"}:
                continue  # the results directory is named in the header
            if cell.cell_type == "code" and path.name not in SHOW_CODE:
                cell.metadata["tags"] = sorted(tags | {"remove_input"})
            cell["id"] = f"{path.stem}-{cell.get('id') or len(book.cells)}"  # unique across notebooks
            book.cells.append(cell)
    return book


def to_html(book, title: str = "migfd report") -> str:
    """A single self-contained page: figures are data URIs, and no script is loaded from elsewhere."""
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_input_tags = {"remove_input"}
    config.HTMLExporter.exclude_input_prompt = True
    config.HTMLExporter.exclude_output_prompt = True
    config.HTMLExporter.embed_images = True
    exporter = HTMLExporter(config=config, template_name="lab")
    exporter.mathjax_url = ""  # no formulas here; keeps the page free of a CDN script
    html, _ = exporter.from_notebook_node(book, resources={"metadata": {"name": title}})
    # nbconvert still writes a MathJax <script src> (and a require.js one for widgets):
    # without network they only fail; drop them so the page never reaches out.
    html = re.sub(r'<script[^>]*\ssrc="(https?://[^"]*)?"[^>]*>\s*</script>', "", html)
    return html


def build_report(results: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Execute the notebooks on ``results`` and write ``out/index.html`` with the CSV and metadata beside it."""
    results_dir = Path(results).expanduser().resolve()
    if not (results_dir / "results.csv").is_file():
        raise MigrationError(f"{results_dir} holds no results.csv")
    _, metadata = load_results(results_dir)
    report_dir = Path(out) if out else repo_root() / "reports" / f"{_stamp()}-{socket.gethostname()}"
    report_dir = report_dir.expanduser().resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    executed = []
    with tempfile.TemporaryDirectory(prefix="migfd-report-") as logs:
        for path in notebooks(results_dir):
            t0 = time.monotonic()
            print(f"migfd report: executing {path.name} ...", file=sys.stderr, flush=True)
            executed.append((path, execute_notebook(path, results_dir, Path(logs))))
            print(f"migfd report: {path.name} done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    html = to_html(combine(executed, results_dir, metadata),
                   f"migfd report — {metadata.get('host', results_dir.name)}")
    index = report_dir / "index.html"
    # the run travels inside the page: `migfd compare` reads a report as it reads a directory
    index.write_text(embed_results(html, results_dir), encoding="utf-8")
    for name in ("results.csv", "metadata.json"):
        if (results_dir / name).is_file():
            shutil.copy2(results_dir / name, report_dir / name)
    return index


def main(args: argparse.Namespace) -> int:
    """``migfd report [--results DIR] [--quick] [--out DIR]``; prints the page's path last."""
    t0 = time.monotonic()
    if getattr(args, "results", None):
        results = Path(args.results)
        if results.is_file() and results.name == "results.csv":
            results = results.parent
    else:
        results = run_benchmark(bool(getattr(args, "quick", False)))
    index = build_report(results, getattr(args, "out", None))
    print(f"migfd report: written in {time.monotonic() - t0:.0f} s from {results}", file=sys.stderr)
    print(index)
    return 0
