"""``migfd bench``: fd-passing against state copying, from real processes and sockets.

- :mod:`migfd.bench.runner` — the command: scenarios in order, a progress bar
  each, ``results.csv`` and ``metadata.json`` (docs/RESULTS.md);
- :mod:`migfd.bench.scenarios` — ram-size, fd-count, tap-traffic, chardev, limits;
- :mod:`migfd.bench.limits` — the physical floor, measured in the same run;
- :mod:`migfd.bench.qemu_peer` — real QEMU 7.2 migrating beside migfd.
"""

from migfd.bench.scenarios import SCENARIO_NAMES

__all__ = ["SCENARIO_NAMES"]
