"""Finding a run's results directory and loading its ``results.csv`` as a typed table.

The columns and their kinds are those of docs/RESULTS.md; :func:`select`
picks the rows of one scenario, mode or variant, as every summary, target
and figure does.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from migfd.errors import MigrationError
from migfd.paths import repo_root

#: Environment variable naming a results directory (or its results.csv).
RESULTS_ENV = "MIGFD_RESULTS"

#: Integer columns of results.csv (nullable: an empty cell means "not applicable").
INT_COLUMNS = ("ram_bytes", "n_fds", "dirty_rate_bytes_s", "trial", "downtime_ns", "total_ns",
               "setup_ns", "bytes_sent", "device_state_bytes", "fds_passed", "fd_messages",
               "frames_sent", "frames_lost", "frames_duplicated", "max_gap_ns", "lines_sent",
               "lines_lost", "reconnects", "stop_resume_ns")
FLOAT_COLUMNS = ("value",)
TEXT_COLUMNS = ("scenario", "mode", "variant", "backend", "unit", "error")
BOOL_COLUMNS = ("live", "ok")
#: What identifies one measured point: the trials of a point are summarized together.
POINT_KEYS = ["scenario", "mode", "variant", "backend", "live", "ram_bytes", "n_fds"]


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
    return clean_results(df), meta


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
