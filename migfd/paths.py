"""Where migfd finds what it reads (notebooks, the reference run) and where it writes (results, reports).

From a source checkout everything is the checkout's: ``notebooks/``,
``benchmarks/reference/``, and new runs and reports under ``benchmarks/results/``
and ``reports/``. Installed from a wheel, the notebooks and the committed
reference run ship inside the package (``migfd/notebooks/``,
``migfd/reference/``: pyproject.toml maps them there) and new files go under the
current directory, never into the installation.
"""

from __future__ import annotations

from pathlib import Path

#: Inside an installed package: where pyproject.toml puts notebooks/ and benchmarks/reference/.
PACKAGED_NOTEBOOKS = "notebooks"
PACKAGED_REFERENCE = "reference"


def package_dir() -> Path:
    """The directory of the ``migfd`` package itself."""
    return Path(__file__).resolve().parent


def repo_root() -> Path:
    """The directory above the ``migfd`` package (the source checkout when run from one)."""
    return package_dir().parent


def in_checkout() -> bool:
    """True when migfd runs from a source checkout (it has a pyproject.toml)."""
    return (repo_root() / "pyproject.toml").exists()


def notebooks_dir() -> Path:
    """The notebooks ``migfd report`` executes: the checkout's ``notebooks/``, else those shipped in the package."""
    return repo_root() / "notebooks" if in_checkout() else package_dir() / PACKAGED_NOTEBOOKS


def reference_dir() -> Path:
    """Where the committed reference runs are: the checkout's ``benchmarks/reference/``, else the package's copy."""
    return repo_root() / "benchmarks" / "reference" if in_checkout() else package_dir() / PACKAGED_REFERENCE


def output_root() -> Path:
    """The directory new runs and reports go under: the checkout, else the current directory.

    Never the installation: an installed migfd writes ``benchmarks/results/`` and
    ``reports/`` where its user runs it.
    """
    return repo_root() if in_checkout() else Path.cwd()
