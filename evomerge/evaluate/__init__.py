"""Evaluators: score a live ``(model, tokenizer)`` on a named split.

Every evaluator follows one protocol (``Evaluator``)::

    ev = build_evaluator("accuracy", data_dir="zoo/data", tasks=["add", "sort"], limit=200)
    metrics = ev(model, tokenizer, split="search")   # {"add/acc": 0.4, "sort/acc": 0.7, "score": 0.55}
    ev.direction                                      # "maximize": how to treat metrics["score"]

* ``split`` is ``"search"`` (what a search optimises; may be a seeded subsample) or
  ``"test"`` (held out, whole). The two never overlap.
* ``fraction`` (default 1) scores a seeded share of each task's search split, the same
  share for every candidate, nested within any larger share (``_common.part``): the cheap
  first look of a multi-fidelity search.
* The result is a flat ``dict[str, float]`` of Python floats: ``"<task>/<metric>"`` per task
  and the aggregate under ``"score"``.
* Everything that does not depend on the weights is computed once and cached (rows,
  tokenized batches, lm-eval task objects, requests and the ``HFLM`` wrapper of a model
  object), so scoring the next candidate (the same model object with its weights changed
  in place) costs only the forward passes.

Registered names (``EVALUATORS``):

=============== ================================================ ===========
name            class                                            direction
=============== ================================================ ===========
``accuracy``    ``ExactMatchEvaluator(mode="teacher_forced")``   maximize
``exact_match`` ``ExactMatchEvaluator(mode="generate")``         maximize
``choice``      ``ExactMatchEvaluator(mode="choice")``           maximize
``lm_eval``     ``LMEvalEvaluator``                              maximize
``perplexity``  ``PerplexityEvaluator``                          minimize
``entropy``     ``EntropyEvaluator``                             minimize
``classification`` ``ClassificationEvaluator(metric="accuracy")``  maximize
``classification_entropy`` ``ClassificationEvaluator(metric="entropy")`` minimize
=============== ================================================ ===========

The classification evaluators read a vision encoder (``model_kind = "vision"``: the worker
builds the live model with the class its config names and passes its image processor as
the second argument) through each task's head.

lm-eval is imported only when an ``LMEvalEvaluator`` is built.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Literal, Protocol, Sequence, runtime_checkable

from ._common import EvaluationError
from .accuracy import ExactMatchEvaluator
from .classification import ClassificationEvaluator
from .entropy import EntropyEvaluator, prediction_entropy
from .lm_eval import LMEvalEvaluator, write_jsonl_tasks
from .perplexity import PerplexityEvaluator

__all__ = [
    "Evaluator", "EvaluationError", "EVALUATORS", "build_evaluator", "ExactMatchEvaluator", "LMEvalEvaluator",
    "PerplexityEvaluator", "EntropyEvaluator", "ClassificationEvaluator", "prediction_entropy", "write_jsonl_tasks",
]


@runtime_checkable
class Evaluator(Protocol):
    """What a search needs from an evaluator."""

    direction: Literal["maximize", "minimize"]
    tasks: Sequence[str]

    def __call__(self, model: Any, tokenizer: Any, split: str = "search", fraction: float = 1.0) -> dict[str, float]:
        """``"<task>/<metric>"`` for every task and ``"score"``, as Python floats;
        ``fraction`` < 1 scores a seeded share of each task's search split (multi-fidelity)."""
        ...

    def primary(self, task: str) -> str:
        """The metric that stands for ``task`` (``"<task>/<metric>"`` of a result), which
        objectives read (``evomerge.objective``)."""
        ...


EVALUATORS: dict[str, Callable[..., Evaluator]] = {
    "accuracy": partial(ExactMatchEvaluator, mode="teacher_forced"),
    "exact_match": partial(ExactMatchEvaluator, mode="generate"),
    "choice": partial(ExactMatchEvaluator, mode="choice"),
    "lm_eval": LMEvalEvaluator,
    "perplexity": PerplexityEvaluator,
    "entropy": EntropyEvaluator,
    "classification": partial(ClassificationEvaluator, metric="accuracy"),
    "classification_entropy": partial(ClassificationEvaluator, metric="entropy"),
}


def build_evaluator(name: str, **kwargs: Any) -> Evaluator:
    """The evaluator registered as ``name``, built with ``kwargs``."""
    try:
        factory = EVALUATORS[name]
    except KeyError:
        raise EvaluationError(f"unknown evaluator {name!r}; choose one of {sorted(EVALUATORS)}") from None
    return factory(**kwargs)
