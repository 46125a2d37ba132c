"""The transfer suite: few-shot adaptation on real distribution shifts.

Modules: :mod:`~transfer_suite.tasks` (data, shifts, fixed draws), :mod:`~transfer_suite.source`
(the source-network recipe), :mod:`~transfer_suite.ntk` (pyro_ntk methods),
:mod:`~transfer_suite.baselines` and :mod:`~transfer_suite.laplace_torch` (the baselines),
:mod:`~transfer_suite.scores` (metrics and the paired rule), :mod:`~transfer_suite.report`
(tables and figure) and ``run.py`` (the command line). Run: ``python benchmarks/transfer_suite/run.py [--quick]``.
"""
