"""The strategy protocol and the records that pass between a strategy and the loop."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = ["Candidate", "Result", "Strategy", "FAILED_PENALTY"]

# Told to a strategy in place of the score of a failed candidate: below any real score
# (scores are "higher is better" inside the loop), so failures are never preferred.
FAILED_PENALTY = -1e9


@dataclass
class Candidate:
    """A genome to evaluate, with a stable id (its position in the search)."""

    id: int
    x: list[float]
    generation: int = 0
    kind: str = "search"  # "search", "best", "baseline:<name>" or "source:<name>"
    split: str = "search"
    source: str | None = None  # score this model's own weights instead of a genome


@dataclass
class Result:
    """One finished evaluation: the record the trial log keeps."""

    id: int
    x: list[float]
    status: str  # "ok" or "failed"
    score: float | None = None  # the search objective, higher is better
    metrics: dict[str, float] = field(default_factory=dict)
    split: str = "search"
    error: str | None = None
    wall_s: float = 0.0
    materialize_s: float = 0.0
    worker: str = ""
    generation: int = 0
    kind: str = "search"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Result":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@runtime_checkable
class Strategy(Protocol):
    """Proposes genomes (real units, within the space's bounds) and learns from scores.

    Scores are "higher is better"; a failed candidate is told as ``None``. ``state_dict``
    holds everything needed to continue exactly (random generators included).
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
