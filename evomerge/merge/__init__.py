"""The merge core.

- ``methods``: the specification. One reference function per method (pure tensor maths,
  citing its paper) and the registry (``METHODS``: each method's parameters with their
  bounds and search ranges, its inputs, its task-arithmetic family, its joint limits and the
  statistics it reads). Recipes, search spaces and config checks read their bounds here.
- ``plan``: ``Plan(recipe, models)``, built once: the output tensors, what each is made
  from, the checks; ``Columns``, a candidate's parameters for every tensor (from a recipe,
  or from a genome through ``Space.compile``).
- ``engine``: ``Merger``, a plan and its inputs: any candidate's columns (the recipe's by
  default) written to disk with ``write(out_dir, what)`` (streamed: atomic, sharded, direct
  I/O into the output) or into a live model with ``materialize(what, into=model)``;
  with ``compile=True`` each tensor of the task-arithmetic family is merged as a flat block
  of one through ``torch.compile`` (the same bits).
- ``resident`` and ``flat``: the search's ``ResidentMerger``, a ``Merger`` whose inputs are
  held once; each candidate's columns are merged into a live model (or written), the
  task-arithmetic family over blocks of equal-sized tensors (in torch, compiled, or in the
  fused CPU kernels).
- ``native`` (``_kernels.c``): the fused CPU kernels, the same bits as the torch code.
- ``statistics``: data statistics (Gram matrices, Fisher diagonals) computed once per
  model and data and cached, for methods that read data.
- ``align``: permutation alignment of models that share no base (weight matching): each
  model's permutations onto a reference, found once and cached, applied as its tensors are
  read (the recipe's ``align``; ``MethodSpec.align``).

To add a method: its function in ``methods`` with a ``MethodSpec``; a backend: behind the
reference function (as ``native``), tested bit for bit against it; a statistic: a class in
``statistics.STATISTICS`` tested against a slow reference; an aligner: a class in
``align.ALIGNERS``.
"""

from .methods import METHODS

__all__ = ["METHODS"]
