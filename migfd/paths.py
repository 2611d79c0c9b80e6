"""Where migfd's checkout is: benchmarks/, notebooks/ and reports/ live there."""

from __future__ import annotations

from pathlib import Path


def repo_root() -> Path:
    """The directory above the ``migfd`` package (the source checkout when run from one)."""
    return Path(__file__).resolve().parents[1]


def in_checkout() -> bool:
    """True when migfd runs from a source checkout (it has a pyproject.toml)."""
    return (repo_root() / "pyproject.toml").exists()
