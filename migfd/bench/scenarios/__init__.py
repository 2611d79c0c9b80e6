"""The benchmark's scenarios, one module each; :mod:`migfd.bench.registry` lists them in run order."""
