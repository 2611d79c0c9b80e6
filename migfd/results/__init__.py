"""What the notebooks and ``migfd report`` call: one run's results, read and shown.

:mod:`~migfd.results.load` finds and types a run's ``results.csv``;
:mod:`~migfd.results.describe` says where it ran and what it skipped;
:mod:`~migfd.results.summary` takes medians and formats numbers;
:mod:`~migfd.results.targets` gives the target verdicts;
:mod:`~migfd.results.plots` draws the figures; :mod:`~migfd.results.tour` lays out
the protocol tour; :mod:`~migfd.results.report` executes the notebooks into one
HTML page. Nothing here measures: every number comes from the run. Import from
the submodules.
"""
