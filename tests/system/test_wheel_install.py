"""Installed, not only cloned: the wheel a new user builds reports from any directory.

The test builds the wheel (``pip wheel --no-deps``, without build isolation so
nothing is downloaded), installs it into a fresh venv that reuses this venv's
packages (a .pth line, and $JUPYTER_PATH for nbconvert's templates; ``--no-deps
--no-index``), and from an empty directory
runs ``migfd report --results`` on the reference run the wheel ships. The page
must be written under that directory, the summary must have found that
reference inside the installed package (it says the run is the reference), and
nothing may be written into site-packages. A benchmark is not run: it takes
minutes.
"""

from __future__ import annotations

import importlib.util
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from migfd.paths import repo_root

pytestmark = pytest.mark.skipif(importlib.util.find_spec("hatchling") is None,
                                reason="hatchling is not installed (the test extra has it): cannot build "
                                       "the wheel without downloading it")


def _files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            st = path.lstat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(python of a fresh venv with the wheel installed, its site-packages)."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(work / "dist"), str(repo_root())], check=True, timeout=180)
    wheel = next((work / "dist").glob("migfd-*.whl"))
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies are this venv's (no download): its site-packages after the new venv's own
    ours = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "_test_venv_packages.pth").write_text("\n".join(dict.fromkeys(ours)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "--quiet", str(wheel)], check=True, timeout=180)
    return python, purelib


def test_the_wheel_ships_notebooks_and_the_reference_and_writes_under_the_current_directory(installed, tmp_path):
    python, purelib = installed
    package = purelib / "migfd"
    notebooks = sorted(p.name for p in (package / "notebooks").glob("*.ipynb"))
    assert notebooks == sorted(p.name for p in (repo_root() / "notebooks").glob("*.ipynb"))
    runs = [d for d in (package / "reference").iterdir() if (d / "results.csv").is_file()]
    assert runs, "the wheel ships no reference run"
    shipped = max(runs)

    empty = tmp_path / "cwd"
    empty.mkdir()
    where = subprocess.run([str(python), "-c", "import migfd, migfd.paths as p, migfd.results.headline as h; "
                            "print(migfd.__file__); print(p.in_checkout()); print(p.output_root()); "
                            "print(h.reference_for())"],
                           cwd=empty, capture_output=True, text=True, check=True).stdout.split("\n")
    assert Path(where[0]).is_relative_to(package), f"the test would run the checkout's migfd: {where[0]}"
    assert where[1] == "False" and Path(where[2]) == empty
    assert Path(where[3]) == shipped  # the reference a report compares with: the one in the package

    before = _files(purelib)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MIGFD_")}
    # nbconvert's templates are data files of this venv (share/jupyter), not in its site-packages
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(Path(sys.prefix) / "share" / "jupyter"),
                                                      os.environ.get("JUPYTER_PATH")) if p)
    proc = subprocess.run([str(python.parent / "migfd"), "report", "--results", str(shipped)], cwd=empty, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = Path(proc.stdout.strip().splitlines()[-1])
    assert index.is_file() and index.resolve().is_relative_to(empty.resolve()), index
    assert index.parent.parent == (empty / "reports").resolve()
    assert (index.parent / "results.csv").read_text() == (shipped / "results.csv").read_text()
    page = index.read_text()
    assert 'id="summary"' in page and 'id="nb-02-downtime"' in page
    # the summary found the reference shipped in the package: the run it reports on is that one
    assert f"this run is the committed reference run (<code>{shipped.name}</code>)" in page
    # nothing written into the installation
    after = _files(purelib)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:10]
    assert not list(purelib.glob("**/reports")) and not list(purelib.glob("**/benchmarks/results"))
