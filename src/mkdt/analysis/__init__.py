"""Analyses beside the pipeline: they read a run directory (or nothing) and write a table (.md),
the numbers (.json) and a plot (.png) to ``RUN/analysis/`` (or ``--out``). No stage reads them but
the evaluation's optional ``mtt_ssl`` method, which pre-trains on the set ``mtt`` writes; ``mkdt run``
runs the window check of ``trajectories`` (:func:`mkdt.analysis.trajectories.check_window`)
before distilling.

Each analysis module defines ``SUMMARY`` (one line for ``mkdt analyze --help``), ``NEEDS_RUN``
(whether it takes the run's config and ``--out RUN``), ``add_arguments(parser)`` for its own
options and ``main(args, config)``, which raises :class:`mkdt.errors.MkdtError` on user mistakes;
``mkdt.cli.ANALYSES`` makes each a subcommand of ``mkdt analyze``.

- ``trajectories``: linear-probe accuracy along the expert trajectories, the distillation window
  marked, and how much of the full-data gain lies inside it;
- ``replay``: the experts' own initialisations trained on the distilled set as the inner loop
  does, probed and compared with the experts at the window's end;
- ``variance``: variance of the weights across runs that differ only in batch order, for SSL,
  supervised learning and KD (the paper's Fig. 1a);
- ``mtt``: naive trajectory matching of Barlow Twins (MTT-SSL) and supervised (MTT-SL) experts
  next to MKDT: matching loss and pixel change per iteration (the paper's Fig. 1b/c);
- ``theorem``: a Monte Carlo check of the paper's Theorem 4.1, Var(grad SSL) > Var(grad SL).
"""
