"""The six stages, siblings that talk only through the run directory (:mod:`mkdt.store`).

Each module has ``run(config, out, *, force=False, real=None, runtime=None) -> record``: it skips a
stage finished with the same definition, checks that the stages it reads have finished, does its
work with the library (:mod:`mkdt.train`, :mod:`mkdt.nn`, :mod:`mkdt.data`) and writes its record
last. What each stage reads and which keys define it is declared in :mod:`mkdt.graph`.
"""
