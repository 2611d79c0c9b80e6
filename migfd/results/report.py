"""``migfd report``: run the benchmark, execute the notebooks on its results, write one HTML page.

The page is ``reports/<UTC timestamp>-<host>/index.html`` (under the checkout,
or the current directory when migfd is installed; ``--out`` chooses): first the
summary (:mod:`migfd.results.headline`: the answers with their intervals, the
targets' verdicts, one figure, what changed against the reference run), then a
table of contents linking every section, the run's description, and the
notebooks executed on one results directory (the comparison with the reference
run when there is one). Code of the result notebooks is removed, the tour's is
collapsed and opens with a click; every figure is a data URI so the file can be
mailed as it is; the run's ``results.csv`` and ``metadata.json`` are embedded in
the page (so ``migfd compare`` can read the page alone) and copied beside it.
Every expected failure is a :class:`~migfd.errors.MigrationError`, which the
command line turns into one line.
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
from migfd.paths import notebooks_dir, output_root
from migfd.results.compare import BASE_ENV, COMPARE_NOTEBOOK, default_pair
from migfd.results.describe import busy_note, describe_run
from migfd.results.headline import SUMMARY_ANCHOR, Summary, reference_for, run_summary
from migfd.results.load import embed_results, load_results

NOTEBOOK_DIR = notebooks_dir()
#: The notebook that shows the summary in JupyterLab; the report draws the same summary itself, first.
SUMMARY_NOTEBOOK = "00-summary.ipynb"
#: The protocol tour keeps its code in the report: the code is what it teaches. The other
#: notebooks' code is only calls into migfd.results: the report shows their outputs.
SHOW_CODE = ("01-protocol-tour.ipynb",)
#: Per notebook; the tour starts VMs, the others only read a CSV.
CELL_TIMEOUT_S = 600


def _stamp(now: dt.datetime | None = None) -> str:
    return (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%SZ")


def run_benchmark(quick: bool) -> Path:
    """``migfd bench`` in its default (or quick) mode, into benchmarks/results/<UTC>-<host>/ under the
    checkout, or under the current directory when migfd is installed (:func:`migfd.paths.output_root`)."""
    try:
        # Only a new run needs the runner (and the VM and QEMU peers under it); a report on
        # existing results must work where they cannot be imported.
        from migfd.bench import runner
    except ImportError as exc:
        raise MigrationError(f"the benchmark runner is not available ({exc}); "
                             f"use --results DIR to report on existing results") from None
    out = output_root() / "benchmarks" / "results" / f"{_stamp()}-{socket.gethostname()}"
    args = argparse.Namespace(quick=quick, scenarios=None, trials=None, out=str(out))
    code = runner.main(args)
    if code != 0:
        raise MigrationError(f"migfd bench exited with status {code}; nothing to report "
                             f"(partial results, if any, in {out})")
    if not (out / "results.csv").is_file():
        raise MigrationError(f"migfd bench wrote no results.csv in {out}")
    return out


def reference_run(results: Path | None = None) -> Path | None:
    """The run a report on ``results`` compares with (:func:`~migfd.results.headline.reference_for`),
    None when there is none or it is ``results`` itself."""
    base = reference_for(results)
    if base is None or results is None:
        return base
    return default_pair(base=base, new=results)[0]


def notebooks(results: Path | None = None) -> list[Path]:
    """The notebooks a report on ``results`` executes, in order (00-summary not: the report draws it first).

    The comparison (04) only when there is a base to compare with: a committed
    reference run ($MIGFD_BASE overrides it) that is not ``results`` itself.
    """
    found = [p for p in sorted(NOTEBOOK_DIR.glob("[0-9][0-9]-*.ipynb")) if p.name != SUMMARY_NOTEBOOK]
    if not found:
        raise MigrationError(f"no notebooks in {NOTEBOOK_DIR}: this migfd was installed without them")
    if results is not None and reference_run(results) is None:
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


def execute_notebook(path: Path, results: Path, log_dir: Path, base: Path | None = None):
    """Run one notebook top to bottom on ``results``; returns the executed notebook.

    The kernel gets MIGFD_RESULTS in its environment and the parameter cell a
    ``results_dir`` (either suffices); ``base`` becomes its MIGFD_BASE (the run
    04-compare compares with); its working directory is the notebooks' directory.
    A cell error becomes a MigrationError naming the notebook, the cell and the error.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

    nb = nbformat.read(path, as_version=4)
    _inject_parameters(nb, results)
    env = dict(os.environ, MIGFD_RESULTS=str(results), PYTHONWARNINGS="ignore")
    if base is not None:
        env[BASE_ENV] = str(base)
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


def _figure_png(fig) -> str:
    import base64
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode()


def notebook_anchor(path: Path) -> str:
    """The element id a notebook's part of the page starts at: ``nb-02-downtime``."""
    return "nb-" + re.sub(r"[^A-Za-z0-9-]+", "-", path.stem).strip("-")


#: Where the table of contents goes; :func:`link_contents` fills it once the page is rendered.
CONTENTS_ID = "contents"


def _raw_html(text: str):
    import nbformat

    cell = nbformat.v4.new_raw_cell(text)
    cell.metadata["raw_mimetype"] = "text/html"
    return cell


def summary_cells(summary: Summary, results: Path, metadata: dict) -> list:
    """The top of the page: the summary (Markdown, its title the page's, and its figure), the contents, the run."""
    import nbformat

    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    busy = busy_note(metadata)
    note = (f"Report written {now} by `migfd report`; every number and figure below is computed from the "
            f"run's [`results.csv`](results.csv) and [`metadata.json`](metadata.json) (beside this page, and "
            f"inside it); nothing is typed in." + (f"\n\n**⚠ Warning:** {busy}" if busy else ""))
    figure = nbformat.v4.new_code_cell("summary.figure()")
    figure.metadata["tags"] = ["remove_input"]
    figure.outputs = [nbformat.v4.new_output(
        "display_data", data={"image/png": _figure_png(summary.figure()),
                              "text/plain": "downtime (and outage) against guest RAM size"})]
    run = f"<a id=\"run\"></a>\n\n## The run\n\n{describe_run(metadata, results)}"
    return [nbformat.v4.new_markdown_cell(summary.markdown("# migfd report:", note)), figure,
            _raw_html(f'<div id="{CONTENTS_ID}" class="migfd-contents"></div>'),
            nbformat.v4.new_markdown_cell(run)]


def combine(executed: list[tuple[Path, object]], results: Path, metadata: dict, summary: Summary | None = None):
    """One notebook: the summary first, then every executed notebook, each after an anchor of its own.

    Code of all but SHOW_CODE notebooks is tagged for removal (the page shows their outputs);
    the tour's code stays, collapsed (see :func:`to_html`).
    """
    import nbformat

    if summary is None:
        df, _ = load_results(results)
        summary = run_summary(df, metadata, path=results)
    book = nbformat.v4.new_notebook()
    book.metadata = executed[0][1].metadata if executed else {}
    book.cells.extend(summary_cells(summary, results, metadata))
    for path, nb in executed:
        book.cells.append(_raw_html(f'<div id="{notebook_anchor(path)}" class="migfd-notebook"></div>'))
        for cell in nb.cells:
            tags = set(cell.get("metadata", {}).get("tags", []))
            if tags & {"parameters", "injected-parameters"}:
                continue  # the results directory is named in the header
            if cell.cell_type == "code" and path.name not in SHOW_CODE:
                cell.metadata["tags"] = sorted(tags | {"remove_input"})
            cell["id"] = f"{path.stem}-{cell.get('id') or len(book.cells)}"  # unique across notebooks
            book.cells.append(cell)
    return book


_HEADING_RE = re.compile(r'<h([12]) id="([^"]+)">(.*?)<a class="anchor-link"', re.S)
# nbconvert's sanitizer keeps a raw cell's <div> but may reorder its attributes
_NOTEBOOK_RE = re.compile(r'<div[^>]*\sid="(nb-[^"]+)"[^>]*></div>')
_CONTENTS_RE = re.compile(r'<div[^>]*\sid="%s"[^>]*></div>' % CONTENTS_ID)


def link_contents(page: str) -> str:
    """The table of contents, made from the rendered page itself: the summary, the run, then each
    notebook (its title) with its sections, every entry a link to an id that the page has."""
    import html as html_lib

    marks = list(_NOTEBOOK_RE.finditer(page))
    items = [f'<li><a href="#{SUMMARY_ANCHOR}">Summary</a></li>', '<li><a href="#run">The run</a></li>']
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(page)
        headings = list(_HEADING_RE.finditer(page, mark.end(), end))
        title = next((h for h in headings if h.group(1) == "1"), None)
        name = re.sub(r"<[^>]+>", "", title.group(3)).strip() if title else mark.group(1)
        sections = "".join(
            f'<li><a href="#{h.group(2)}">{html_lib.escape(re.sub(r"<[^>]+>", "", h.group(3)).strip())}</a></li>'
            for h in headings if h.group(1) == "2")
        items.append(f'<li><a href="#{mark.group(1)}">{name}</a>' + (f"<ul>{sections}</ul>" if sections else "")
                     + "</li>")
    contents = (f'<nav id="{CONTENTS_ID}" class="migfd-contents"><h2>Contents</h2><ul>' + "".join(items)
                + "</ul></nav>")
    return _CONTENTS_RE.sub(lambda _: contents, page, count=1)


#: The report's template: nbconvert's "lab" page, with each code cell's input in a <details>
#: element, closed (a click opens it), and tables kept compact so the summary fits one screen.
_TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{%- block extra_css -%}
<style type="text/css">
details.migfd-code > summary { cursor: pointer; color: #555; font-size: 85%; padding: 2px 0; }
.jp-RenderedHTMLCommon table { font-size: 12px; }
.jp-RenderedHTMLCommon td, .jp-RenderedHTMLCommon th { padding: 0.25em 0.6em; }
.jp-RenderedHTMLCommon h1 { margin-top: 0.4em; }
nav.migfd-contents ul { margin: 0.2em 0; }
.jp-MarkdownOutput:has(#summary) td:not(:first-child) { white-space: nowrap; }
</style>
{%- endblock extra_css -%}
{% block input_group -%}
<details class="migfd-code"><summary>code</summary>
{{ super() }}
</details>
{%- endblock input_group %}
"""


def to_html(book, title: str = "migfd report") -> str:
    """A single self-contained page: figures are data URIs, and no script is loaded from elsewhere."""
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter
    from traitlets.config import Config

    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_input_tags = {"remove_input"}
    config.HTMLExporter.exclude_input_prompt = True
    config.HTMLExporter.exclude_output_prompt = True
    config.HTMLExporter.embed_images = True
    exporter = HTMLExporter(config=config, template_name="lab",
                            extra_loaders=[DictLoader({"migfd-report.html.j2": _TEMPLATE})])
    exporter.template_file = "migfd-report.html.j2"
    exporter.mathjax_url = ""  # no formulas here; keeps the page free of a CDN script
    html, _ = exporter.from_notebook_node(book, resources={"metadata": {"name": title}})
    # nbconvert still writes a MathJax <script src> (and a require.js one for widgets):
    # without network they only fail; drop them so the page never reaches out.
    html = re.sub(r'<script[^>]*\ssrc="(https?://[^"]*)?"[^>]*>\s*</script>', "", html)
    return link_contents(html)


def build_report(results: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Execute the notebooks on ``results`` and write ``out/index.html`` with the CSV and metadata beside it.

    Without ``out``: ``reports/<UTC>-<host>/`` under the checkout, or under the current directory
    when migfd is installed (never inside the installation).
    """
    results_dir = Path(results).expanduser().resolve()
    if not (results_dir / "results.csv").is_file():
        raise MigrationError(f"{results_dir} holds no results.csv")
    df, metadata = load_results(results_dir)
    report_dir = Path(out) if out else output_root() / "reports" / f"{_stamp()}-{socket.gethostname()}"
    report_dir = report_dir.expanduser().resolve()
    report_dir.mkdir(parents=True, exist_ok=True)
    base = reference_run(results_dir)
    print("migfd report: the summary ...", file=sys.stderr, flush=True)
    summary = run_summary(df, metadata, path=results_dir, reference=reference_for(results_dir))
    executed = []
    with tempfile.TemporaryDirectory(prefix="migfd-report-") as logs:
        for path in notebooks(results_dir):
            t0 = time.monotonic()
            print(f"migfd report: executing {path.name} ...", file=sys.stderr, flush=True)
            executed.append((path, execute_notebook(path, results_dir, Path(logs), base)))
            print(f"migfd report: {path.name} done in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    html = to_html(combine(executed, results_dir, metadata, summary),
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
