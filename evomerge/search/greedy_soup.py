"""Greedy soup (Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482).

Ingredients are the space's models. First each ingredient is scored alone on the search
split; then, from the best down, an ingredient joins the soup (the uniform average of its
members) only if the soup's score with it is at least the soup's score without it. The
result is never worse than the best single ingredient on the search split.

The space must be a ``linear`` merge with per-model ``weight`` (``normalize`` on, the
default): a genome puts weight 1 on the soup's members and 0 elsewhere.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..space import Space
from .base import _BestTracker

__all__ = ["GreedySoup"]


class GreedySoup:
    name = "greedy_soup"

    def __init__(self, space: Space, seed: int = 0):
        if space.method.name != "linear" or set(space.ranges) != {"weight"} or space.granularity != "per_model":
            raise ValueError("greedy_soup needs a linear space with per_model granularity over 'weight' only")
        self.space = space
        self.k = len(space.models)
        self.phase = "rank"  # "rank": score each ingredient; "grow": try adding the next one
        self.order: list[int] = []
        self.soup: list[int] = []
        self.soup_score: float | None = None
        self.next = 0
        self.tracker = _BestTracker()
        self._asked: list[list[int]] = []

    def _genome(self, members: list[int]) -> np.ndarray:
        x = np.zeros(len(self.space))
        for g, gene in enumerate(self.space.genes):
            if gene.model in members:
                x[g] = 1.0
        return self.space.clip(x)

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        if self.phase == "rank":
            self._asked = [[i] for i in range(self.k)]
        elif self.phase == "grow" and self.next < len(self.order):
            self._asked = [self.soup + [self.order[self.next]]]
        else:
            self._asked = []
        return [self._genome(m) for m in self._asked]

    def tell(self, xs, scores) -> None:
        self.tracker.update(xs, scores)
        if self.phase == "rank":
            vals = [(-np.inf if s is None else s) for s in scores]
            self.order = sorted(range(self.k), key=lambda i: (-vals[i], i))
            self.soup, self.soup_score = [self.order[0]], vals[self.order[0]]
            self.next = 1
            self.phase = "grow"
        elif self._asked:
            s = scores[0]
            if s is not None and s >= self.soup_score:
                self.soup, self.soup_score = self._asked[0], s
            self.next += 1
        if self.next >= len(self.order):
            self.phase = "done"
        self._asked = []

    def best(self):
        if not self.soup:
            return None, None
        return self._genome(self.soup), self.soup_score

    def done(self) -> bool:
        return self.phase == "done"

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "order": self.order, "soup": self.soup, "soup_score": self.soup_score,
                "next": self.next, "asked": self._asked, **self.tracker.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.phase, self.order, self.soup = state["phase"], list(state["order"]), list(state["soup"])
        self.soup_score, self.next, self._asked = state["soup_score"], state["next"], list(state["asked"])
        self.tracker.load(state)
