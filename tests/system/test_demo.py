"""The protocol tour's live demo: two real ``migfd vm`` processes, with and without backend-transfer."""

from __future__ import annotations

import pytest
from helpers import run_async

from migfd.peers.demo import demo_migration
from migfd.results.tour import demo_table


@pytest.mark.timeout(120)
def test_demo_migration_hands_the_fds_over(workdir):
    # two real migfd vm processes, as the protocol tour starts them; it quits them itself
    run = run_async(demo_migration(workdir, backend_transfer=True, ram="16M"))
    assert run.backend_transfer and run.migration.ok, run.migration.error
    assert run.migration.source["x-fds-passed"] == 3  # the memfd and both chardev sockets
    assert run.run_state == ("postmigrate", "running")
    assert run.ram_verify.get("ok") is True
    assert run.chardev.reconnects == 0 and not run.chardev.lost
    assert demo_table([run]).loc["status (source / destination)", True] == "completed / completed"
