"""Pre-training sets from outside a run, and a run's sets for outside use.

- :mod:`mkdt.external.sources`: readers of the four kinds of source ``mkdt import`` takes (index
  lists into D_real, image tensors, image folders, other mkdt runs) with their checks;
- :mod:`mkdt.external.importer`: ``mkdt import NAME SOURCE --out RUN`` turns a source into
  ``RUN/imported/NAME.safetensors`` (the distill stage's set format), evaluated as the method
  ``ext:NAME``;
- :mod:`mkdt.external.exporter`: ``mkdt export RUN --to DIR`` writes a set as PNG files plus its
  targets, a folder that ``mkdt import`` reads back.
"""
