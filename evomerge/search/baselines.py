"""Baseline strategies every report compares against: uniform random search and a grid."""

from __future__ import annotations

import itertools
from typing import Any, Mapping, Sequence

import numpy as np

from ..space import Space
from .base import _BestTracker

__all__ = ["RandomSearch", "GridSearch"]


def _batch(v, who: str) -> int:
    """A strategy's batch: genomes per ``ask``, at least one."""
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{who}: batch must be a whole number >= 1, got {v!r}")
    return v


class RandomSearch:
    """Genomes drawn uniformly within the space's bounds from a seeded generator."""

    name = "random"
    asynchronous = True  # results may be told one at a time, in any order

    def __init__(self, space: Space, seed: int = 0, batch: int = 8):
        self.space = space
        self.batch = _batch(batch, "random")
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.tracker = _BestTracker()

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        return [self.rng.uniform(self.space.lower, self.space.upper) for _ in range(n or self.batch)]

    def tell(self, xs, scores) -> None:
        self.tracker.update(xs, scores)

    def best(self):
        return self.tracker.best_x, self.tracker.best_score

    def done(self) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state, **self.tracker.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rng.bit_generator.state = state["rng"]
        self.tracker.load(state)


class GridSearch:
    """Every combination of given values, one value per searched parameter shared by all of
    that parameter's genes (e.g. a single task-arithmetic lambda: ``{"weight": [0.1, ..., 1.0]}``)."""

    name = "grid"
    asynchronous = True

    def __init__(self, space: Space, values: Mapping[str, Sequence[float]] | None = None, points: int = 11,
                 batch: int = 8, seed: int = 0):  # seed: accepted like every strategy's; a grid has no randomness
        self.space = space
        self.batch = _batch(batch, "grid")
        params = list(space.ranges)
        if values is None:
            values = {p: list(np.linspace(space.ranges[p][0], space.ranges[p][1], points)) for p in params}
        missing = [p for p in params if p not in values]
        if missing:
            raise ValueError(f"grid: no values for searched parameter(s) {missing}")
        self.params = params
        self.points = [dict(zip(params, combo)) for combo in itertools.product(*(values[p] for p in params))]
        self.next = 0
        self.tracker = _BestTracker()

    def _genome(self, point: dict[str, float]) -> np.ndarray:
        return self.space.clip([point[g.param] for g in self.space.genes])

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        n = n or self.batch
        out = [self._genome(p) for p in self.points[self.next: self.next + n]]
        self.next += len(out)
        return out

    def tell(self, xs, scores) -> None:
        self.tracker.update(xs, scores)

    def best(self):
        return self.tracker.best_x, self.tracker.best_score

    def done(self) -> bool:
        return self.next >= len(self.points)

    def state_dict(self) -> dict[str, Any]:
        return {"next": self.next, **self.tracker.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.next = int(state["next"])
        self.tracker.load(state)
