"""Fixtures of the process-level tests: short work directories, VM processes that
are always stopped, a TAP in a network namespace, a TCP listener, a real bench
run with timelines; and the hook that marks each test by its half.

Every ``migfd vm`` a test starts goes through :class:`helpers.VMGroup`, so it is
quit (or killed) when the test ends, whether the test passed or not: first by
the test body's own ``finally`` (:func:`helpers.run_vm_test`), then, as a last
resort, by the ``vms`` fixture's teardown, which SIGKILLs whatever is still alive.

Test files import what they share from ``helpers`` (tests/helpers.py), never
from this file.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from helpers import HAVE_TAP, TAP_TXQLEN, VMGroup, needs_tap
from migfd.bench import runner
from migfd.peers.tapnet import netns_with_tap
from migfd.units import MiB

# -- fixtures --------------------------------------------------------------------------


@pytest.fixture
def workdir():
    """A fresh directory with a short path: UNIX socket paths are limited to 108 bytes."""
    path = tempfile.mkdtemp(prefix="migfd-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vms(workdir):
    group = VMGroup(workdir)
    try:
        yield group
    finally:
        group.kill_all()  # a last resort: run_vm_test has normally quit them already


@pytest.fixture
def netns_tap(request):
    """A NetNamespace with a persistent, up TAP in it (a :class:`migfd.peers.tapnet.NetnsTap`);
    both removed at the end, always.

    Parametrize indirectly with the number of queues (default 1) for a multi-queue TAP.
    """
    if not HAVE_TAP:
        pytest.skip(needs_tap.kwargs["reason"])
    queues = getattr(request, "param", 1)
    # The TAP's kernel queue keeps frames while no guest reads (a stopped source):
    # sized as the benchmark's (why: migfd.peers.tapnet.TAP_TXQLEN).
    with netns_with_tap("mtap0", queues=queues, txqlen=TAP_TXQLEN) as tap:
        yield tap


@pytest.fixture
def tcp_listener():
    """A listening TCP socket on loopback that the test owns (to prove nobody connects)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        sock.setblocking(False)
        yield sock
    finally:
        sock.close()


# -- the two halves ----------------------------------------------------------------------


#: the duty cycle of every KVM guest the suite starts (``migfd vm --guest-duty``, by the
#: environment its VMs inherit): spinning, each vCPU would hold a core of this 2-core
#: machine for the whole test; at 0.1 it runs 100 µs of every ms and still dirties RAM
#: at the asked rate (it catches up after each idle part)
SUITE_GUEST_DUTY = "0.1"


@pytest.fixture(scope="session", autouse=True)
def guest_duty():
    os.environ.setdefault("MIGFD_GUEST_DUTY", SUITE_GUEST_DUTY)
    yield


@pytest.fixture
def thread_accel(monkeypatch):
    """The VMs this test starts run their guest on the thread accelerator (``MIGFD_ACCEL``)."""
    monkeypatch.setenv("MIGFD_ACCEL", "thread")


def pytest_collection_modifyitems(config, items):
    """Mark each test by its half: tests/unit (``-m unit``) or tests/system (``-m system``)."""
    for item in items:
        half = item.path.parent.name
        if half in ("unit", "system"):
            item.add_marker(getattr(pytest.mark, half))


@pytest.fixture(scope="session")
def timelines_run(tmp_path_factory) -> Path:
    """A real ``migfd bench`` results directory with ``timelines.csv`` and ``traces/``: the smallest
    ram-size point (fd-passing and state copy, live and not), one trial each, made once per session.

    test_bench_timelines.py checks the files; test_notebooks.py runs 05-anatomy on them.
    """
    out = tmp_path_factory.mktemp("bench-timelines") / "run"
    args = argparse.Namespace(quick=True, scenarios=["ram-size"], trials=1, out=str(out),
                              ram_sizes=[16 * MiB])
    # The guest spins, as in a real run: at the suite's duty cycle it halts most of each ms,
    # which the guest-progress observer rightly sees as silence, and the outage means nothing.
    duty = os.environ.get("MIGFD_GUEST_DUTY")
    os.environ["MIGFD_GUEST_DUTY"] = "1"
    try:
        assert runner.main(args) == 0
    finally:
        if duty is None:
            os.environ.pop("MIGFD_GUEST_DUTY", None)
        else:
            os.environ["MIGFD_GUEST_DUTY"] = duty
    return out
