"""The strategy protocol (the records that pass between a strategy and the loop live in
``evomerge.types``)."""

from __future__ import annotations

from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from ..types import FAILED_PENALTY, Candidate, Result

__all__ = ["Candidate", "Result", "Strategy", "FAILED_PENALTY"]


@runtime_checkable
class Strategy(Protocol):
    """Proposes genomes (real units, within the space's bounds) and learns from scores.

    Scores are "higher is better"; a failed candidate is told as ``None``. ``state_dict``
    holds everything needed to continue exactly (random generators included).

    Optional attributes the loop reads: ``batch`` (genomes per ``ask`` when the strategy
    takes any number), ``asynchronous`` (True when results may be told one at a time, in any
    order, with others still asked and untold: the loop's ``async`` mode then asks for one
    genome whenever a worker is free), ``wants_metrics`` and ``wants_constraints``.
    """

    name: str

    def ask(self, n: int | None = None) -> list[np.ndarray]: ...

    def tell(self, xs: Sequence[np.ndarray], scores: Sequence[float | None]) -> None: ...

    def best(self) -> tuple[np.ndarray | None, float | None]: ...

    def done(self) -> bool: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class _BestTracker:
    """Keeps the best told genome; shared by the strategies."""

    def __init__(self):
        self.best_x: np.ndarray | None = None
        self.best_score: float | None = None

    def update(self, xs, scores) -> None:
        for x, s in zip(xs, scores):
            if s is not None and np.isfinite(s) and (self.best_score is None or s > self.best_score):
                self.best_x, self.best_score = np.asarray(x, dtype=float).copy(), float(s)

    def state(self) -> dict:
        return {"best_x": None if self.best_x is None else self.best_x.tolist(), "best_score": self.best_score}

    def load(self, d: dict) -> None:
        self.best_x = None if d["best_x"] is None else np.asarray(d["best_x"], dtype=float)
        self.best_score = d["best_score"]
