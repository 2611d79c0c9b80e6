"""Finding a run's results directory and loading its ``results.csv`` as a typed table.

The columns and their kinds are those of docs/RESULTS.md; :func:`select`
picks the rows of one scenario, mode or variant, as every summary, target
and figure does. An HTML report made by ``migfd report`` carries its run's
``results.csv`` and ``metadata.json`` inside it (:func:`embed_results`), so
:func:`load_run` reads a report as it reads a directory. Runs age: both files
carry a format version (:func:`format_version`; runs written before it, such as
the committed reference run, are format 1), and a column a run lacks is added
empty, so older runs load as newer ones do and a reader can tell what they lack.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from migfd.bench.metadata import FORMAT_VERSION
from migfd.errors import MigrationError
from migfd.paths import repo_root

#: Environment variable naming a results directory (or its results.csv).
RESULTS_ENV = "MIGFD_RESULTS"

#: Integer columns of results.csv (nullable: an empty cell means "not applicable").
INT_COLUMNS = ("ram_bytes", "n_fds", "dirty_rate_bytes_s", "trial", "downtime_ns", "total_ns",
               "setup_ns", "bytes_sent", "device_state_bytes", "fds_passed", "fd_messages",
               "frames_sent", "frames_lost", "frames_duplicated", "max_gap_ns", "lines_sent",
               "lines_lost", "reconnects", "stop_resume_ns", "outage_ns", "outage_own_ns", "precopy_stall_ns",
               "release_ns", "switchover_silence_ns", "switchover_silence_own_ns")
FLOAT_COLUMNS = ("value",)
TEXT_COLUMNS = ("scenario", "mode", "variant", "backend", "unit", "error", "peer_version", "trial_id", "accel")
BOOL_COLUMNS = ("live", "ok", "observer_realtime")
#: What identifies one measured point: the trials of a point are summarized together.
#: ``peer_version`` names the QEMU of a qemu-peer row (empty for migfd's own rows, and
#: in runs older than the column): two QEMUs at the same size are two points.
POINT_KEYS = ["scenario", "mode", "variant", "backend", "live", "ram_bytes", "n_fds", "peer_version", "accel"]


def _results_dir_of(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.is_file() and p.name == "results.csv":
        p = p.parent
    if not (p / "results.csv").is_file():
        raise MigrationError(f"{p} holds no results.csv")
    return p.resolve()


def newest_run(base: Path) -> Path | None:
    """The newest subdirectory of ``base`` holding a results.csv.

    Run directories are named ``<UTC timestamp>-<host>``, so the name orders
    them in time; the modification time breaks ties.
    """
    if not base.is_dir():
        return None
    runs = [d for d in base.iterdir() if d.is_dir() and (d / "results.csv").is_file()]
    if not runs:
        return None
    return max(runs, key=lambda d: (d.name, d.stat().st_mtime)).resolve()


def find_results(env_or_param: str | os.PathLike | None = None, *, root: str | os.PathLike | None = None) -> Path:
    """The results directory a notebook should show.

    In order: ``env_or_param`` (a notebook's papermill parameter), the
    directory named by ``$MIGFD_RESULTS``, the newest run under
    ``benchmarks/results/``, the newest committed reference run under
    ``benchmarks/reference/``. ``root`` is the checkout (default: this one).
    """
    if env_or_param:
        return _results_dir_of(env_or_param)
    if os.environ.get(RESULTS_ENV):
        return _results_dir_of(os.environ[RESULTS_ENV])
    base = Path(root) if root is not None else repo_root()
    for sub in ("benchmarks/results", "benchmarks/reference"):
        found = newest_run(base / sub)
        if found is not None:
            return found
    raise MigrationError(f"no benchmark results: run `migfd bench` (or set {RESULTS_ENV}); "
                         f"nothing under {base / 'benchmarks/results'} nor {base / 'benchmarks/reference'}")


#: The format of runs written before results.csv and metadata.json carried a version.
FIRST_FORMAT = 1


def format_version(df: pd.DataFrame, meta: dict) -> int:
    """The format a run was written in: results.csv's ``format_version`` column, else metadata.json's
    ``format_version``, else :data:`FIRST_FORMAT` (the files had no version then).

    A reader compares what both runs have, whatever their formats; the version
    says which rules wrote the files. A format newer than this code's
    (:data:`migfd.bench.metadata.FORMAT_VERSION`) is read as far as its columns are known.
    """
    if "format_version" in df.columns:
        found = pd.to_numeric(df["format_version"], errors="coerce").dropna()
        if len(found):
            return int(found.max())
    try:
        return int(meta.get("format_version") or FIRST_FORMAT)
    except (TypeError, ValueError):
        return FIRST_FORMAT


def format_note(version: int) -> str:
    """What a reader should know of a run's format ("" for the current one)."""
    if version < FORMAT_VERSION:
        return (f"format {version} (written before format {FORMAT_VERSION}): what it did not measure "
                f"is not compared")
    if version > FORMAT_VERSION:
        return (f"format {version}, newer than this migfd's {FORMAT_VERSION}: columns it does not know "
                f"are not compared")
    return ""


def _to_bool(value: Any) -> Any:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return pd.NA
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "y", "t"):
        return True
    if text in ("false", "0", "no", "n", "f"):
        return False
    return pd.NA


def clean_results(df: pd.DataFrame) -> pd.DataFrame:
    """Typed columns: nullable integers, booleans, text with "" for "not applicable".

    Columns of docs/RESULTS.md that a run did not write are added empty, so
    every function here can rely on them; unknown columns are kept as they are.
    """
    df = df.copy()
    for col in INT_COLUMNS + FLOAT_COLUMNS + TEXT_COLUMNS + BOOL_COLUMNS:
        if col not in df.columns:
            df[col] = pd.NA
    for col in INT_COLUMNS:
        num = pd.to_numeric(df[col], errors="coerce")
        df[col] = num.round().astype("Int64")
    for col in FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in TEXT_COLUMNS:
        df[col] = df[col].astype("string").fillna("").str.strip().astype(object)
    for col in BOOL_COLUMNS:
        df[col] = df[col].map(_to_bool).astype("boolean")
    # a row without an ok flag did not say it succeeded
    df["ok"] = df["ok"].fillna(False)
    return df


_QEMU_VERSION_RE = re.compile(r"version (\d+\.\d+(?:\.\d+)?)")


def with_peer_version(df: pd.DataFrame, meta: dict) -> pd.DataFrame:
    """Runs older than the ``peer_version`` column ran one QEMU, the one their metadata names:
    its version fills their qemu-peer rows, so they compare with newer runs point by point."""
    qemu = (meta.get("packages") or {}).get("qemu") if isinstance(meta.get("packages"), dict) else None
    found = _QEMU_VERSION_RE.search(qemu or "")
    rows = (df["scenario"] == "qemu-peer") & (df["peer_version"] == "")
    if found is None or not rows.any() or (df["peer_version"] != "").any():
        return df
    df = df.copy()
    df.loc[rows, "peer_version"] = found.group(1)
    return df


#: the accelerator of rows older than the ``accel`` column: migfd's guests were Python
#: threads, real QEMU ran under TCG
OLD_ACCEL = {"qemu-peer": "tcg"}
OLD_VM_ACCEL = "thread"


def with_accel(df: pd.DataFrame) -> pd.DataFrame:
    """Rows of runs older than the ``accel`` column get the accelerator those runs used
    (:data:`OLD_ACCEL`; migfd VMs: ``thread``); floor rows, which run no guest, stay empty."""
    missing = (df["accel"] == "") & (df["mode"].astype(str) != "floor")
    if not missing.any() or (df["accel"] != "").any():
        return df
    df = df.copy()
    df.loc[missing, "accel"] = df.loc[missing, "scenario"].map(OLD_ACCEL).fillna(OLD_VM_ACCEL)
    return df


def load_results(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """``results.csv`` as a typed DataFrame, and ``metadata.json`` (``{}`` if absent)."""
    run = _results_dir_of(path)
    df = pd.read_csv(run / "results.csv", dtype=str, keep_default_na=False, na_values=[""])
    meta: dict = {}
    meta_path = run / "metadata.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as exc:
            raise MigrationError(f"{meta_path} is not JSON: {exc}") from None
    return with_accel(with_peer_version(clean_results(df), meta)), meta


#: The id of the ``<script type="application/json">`` element that holds a report's run.
EMBED_ID = "migfd-results"
_EMBED_RE = re.compile(r'<script type="application/json" id="%s">(.*?)</script>' % EMBED_ID, re.S)


def embed_results(page: str, results_dir: str | os.PathLike) -> str:
    """``page`` (HTML) with the run's results.csv and metadata.json inside, before ``</body>``.

    JSON in a script element: "</" is written "<\\/" (the same string to a
    JSON parser), so no value can end the element early.
    """
    run = Path(results_dir)
    meta_path = run / "metadata.json"
    data = {"results_csv": (run / "results.csv").read_text(),
            "metadata": json.loads(meta_path.read_text()) if meta_path.is_file() else {}}
    text = json.dumps(data).replace("</", "<\\/")
    block = f'<script type="application/json" id="{EMBED_ID}">{text}</script>\n'
    at = page.rfind("</body>")
    return page[:at] + block + page[at:] if at >= 0 else page + block


def embedded_results(page: str, source: str = "the page") -> tuple[str, dict]:
    """(results.csv text, metadata) from a page written by :func:`embed_results`."""
    # the last one: the page's own, appended after everything the notebooks printed
    found = next(reversed(list(_EMBED_RE.finditer(page))), None)
    if found is None:
        raise MigrationError(f"{source} holds no embedded results (not a report written by `migfd report`)")
    try:
        data = json.loads(found.group(1))
        return str(data["results_csv"]), dict(data.get("metadata") or {})
    except (ValueError, KeyError, TypeError) as exc:
        raise MigrationError(f"{source}: its embedded results are damaged ({exc})") from None


def load_run(path: str | os.PathLike) -> tuple[pd.DataFrame, dict]:
    """A run from a results directory, its results.csv, or an HTML report of ``migfd report``."""
    p = Path(path).expanduser()
    if p.is_file() and p.suffix.lower() in (".html", ".htm"):
        csv_text, meta = embedded_results(p.read_text(errors="replace"), str(p))
        df = pd.read_csv(io.StringIO(csv_text), dtype=str, keep_default_na=False, na_values=[""])
        return with_accel(with_peer_version(clean_results(df), meta)), meta
    if not p.exists():
        raise MigrationError(f"{p} does not exist")
    return load_results(p)


def select(df: pd.DataFrame, scenario: str | None = None, mode: str | None = None, *,
           variant: str | None = None, ok: bool | None = True) -> pd.DataFrame:
    """The rows of ``scenario``/``mode``/``variant`` (None: any); by default only successful trials."""
    sel = pd.Series(True, index=df.index)
    if scenario is not None:
        sel &= df["scenario"] == scenario
    if mode is not None:
        sel &= df["mode"] == mode
    if variant is not None:
        sel &= df["variant"] == variant
    if ok is not None:
        sel &= df["ok"].fillna(False).astype(bool) == ok
    return df[sel]
