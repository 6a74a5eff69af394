"""The records every package shares: what a strategy proposes (``Candidate``), what an
evaluation gives back (``Result``, the trial log's line), its status, and the direction of a
score. Search, execute and trials import them from here."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Candidate", "Result", "Status", "Direction", "FAILED_PENALTY", "signed_score"]

Status = Literal["ok", "failed"]
Direction = Literal["maximize", "minimize"]  # how an evaluator's metrics["score"] is read


def signed_score(score: float, direction: Direction) -> float:
    """A score as the search loop holds it: higher is better whatever the direction."""
    if direction not in ("maximize", "minimize"):
        raise ValueError(f"direction must be 'maximize' or 'minimize', got {direction!r}")
    return score if direction == "maximize" else -score


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
    fidelity: float = 1.0  # the share of the search split to score it on (multi-fidelity)


@dataclass
class Result:
    """One finished evaluation: the record the trial log keeps."""

    id: int
    x: list[float]
    status: Status
    score: float | None = None  # the search objective, higher is better
    metrics: dict[str, float] = field(default_factory=dict)
    split: str = "search"
    error: str | None = None
    wall_s: float = 0.0
    materialize_s: float = 0.0
    worker: str = ""
    generation: int = 0
    kind: str = "search"
    reused: int | None = None  # the id of the evaluation whose result this copies (an identical genome)
    fidelity: float = 1.0  # the share of the search split it was scored on

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Result":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


