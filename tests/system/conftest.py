"""Fixtures of the system tests that cost a real benchmark run, made once per session and shared."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from migfd.bench import runner
from migfd.units import MiB


@pytest.fixture(scope="session")
def timelines_run(tmp_path_factory) -> Path:
    """A real ``migfd bench`` results directory with ``timelines.csv`` and ``traces/``: the smallest
    ram-size point (fd-passing and state copy, live and not), one trial each.

    test_bench_timelines.py checks the files; test_notebooks.py runs 05-anatomy on them.
    """
    out = tmp_path_factory.mktemp("bench-timelines") / "run"
    args = argparse.Namespace(quick=True, scenarios=["ram-size"], trials=1, out=str(out),
                              ram_sizes=[16 * MiB])
    assert runner.main(args) == 0
    return out
