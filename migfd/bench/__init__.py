"""``migfd bench``: fd-passing against state copying, from real processes and sockets.

- :mod:`migfd.bench.runner` — the command: scenarios in order, a progress bar
  each, ``results.csv`` and ``metadata.json`` (docs/RESULTS.md);
- :mod:`migfd.bench.metadata` — what metadata.json records about the run and the machine;
- :mod:`migfd.bench.registry` — the one ordered list of scenarios (names and classes);
- :mod:`migfd.bench.scenario` — the framework: plan, trial steps, the migfd VM pair;
- :mod:`migfd.bench.scenarios` — one module per scenario: ram-size, fd-count,
  tap-traffic, chardev, qemu-peer (real QEMU beside migfd), limits (the floors);
- :mod:`migfd.bench.floors` — the physical floors, measured in the same run.
"""
