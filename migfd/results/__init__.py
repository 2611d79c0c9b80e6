"""What the notebooks and ``migfd report`` call: runs' results, read, shown and compared.

:mod:`~migfd.results.load` finds and types a run's ``results.csv`` (from a
directory or a report's embedded copy); :mod:`~migfd.results.describe` says
where it ran, what it skipped and whether the machine was busy;
:mod:`~migfd.results.summary` takes medians with their intervals and formats
numbers; :mod:`~migfd.results.targets` gives the target verdicts;
:mod:`~migfd.results.plots` draws the figures; :mod:`~migfd.results.compare`
compares two runs; :mod:`~migfd.results.tour` lays out the protocol tour;
:mod:`~migfd.results.headline` computes the summary a report opens with,
:mod:`~migfd.results.conclusions` each notebook's closing paragraph;
:mod:`~migfd.results.report` executes the notebooks into one HTML page. The
intervals and verdicts themselves live in :mod:`migfd.stats`, which the
benchmark shares. Nothing here measures: every number comes from the run.
Import from the submodules.
"""
