"""Steady-state evolution: regularized ("aging") evolution over a space's genome.

Real et al. 2019, "Regularized Evolution for Image Classifier Architecture Search"
(https://arxiv.org/abs/1802.01548), on a real-valued genome: a population of the last
``population`` results told; each new genome is a child of a tournament's winner (the best
of ``sample`` members drawn at random), every gene moved by a Gaussian step of ``sigma``
in the unit cube (each gene scaled by its bounds) and clipped to it; each result told joins
the population and pushes out its oldest member, not its worst, so no lucky score stays
forever. The first ``population`` genomes are the space's start and uniform draws.

Results may be told one at a time and in any order (``asynchronous``): a child is made
from whatever has been told when it is asked, which is what keeps every worker busy in the
search loop's ``async`` mode. The state is plain data (the population, the generator's
state, the count asked), so a resumed search continues exactly.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..space import Space
from .base import _BestTracker
from .baselines import _batch

__all__ = ["SteadyStateEvolution"]


class SteadyStateEvolution:
    """Args:
        space: the genome space.
        seed: the generator's seed.
        population: results kept (the oldest leaves when a new one is told); also the
            number of start genomes (the space's start, then uniform draws).
        sample: members drawn for each tournament (at most ``population``).
        sigma: the mutation's step, in the unit cube.
        batch: genomes per ``ask`` in the generational mode.
    """

    name = "steady"
    asynchronous = True  # results may be told one at a time, in any order

    def __init__(self, space: Space, seed: int = 0, population: int = 16, sample: int = 4, sigma: float = 0.1,
                 batch: int = 8):
        for key, v in (("population", population), ("sample", sample)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"steady: {key} must be a whole number >= 1, got {v!r}")
        if not isinstance(sigma, (int, float)) or isinstance(sigma, bool) or not 0 < sigma <= 1:
            raise ValueError(f"steady: sigma must be a step in the unit cube, in (0, 1], got {sigma!r}")
        self.space = space
        self.seed, self.size, self.sample, self.sigma = int(seed), population, min(sample, population), float(sigma)
        self.batch = _batch(batch, "steady")
        self.rng = np.random.Generator(np.random.PCG64(self.seed))
        self.members: list[tuple[list[float], float]] = []  # (unit-cube genome, score), oldest first
        self.asked = 0
        self.tracker = _BestTracker()

    def _child(self) -> np.ndarray:
        """A unit-cube genome: a start genome, or a mutated tournament winner."""
        n = len(self.space)
        if self.asked == 0:
            return np.clip(self.space.to_unit(self.space.x0), 0.0, 1.0)
        if self.asked < self.size or not self.members:
            return self.rng.uniform(0.0, 1.0, n)
        picks = self.rng.choice(len(self.members), size=min(self.sample, len(self.members)), replace=False)
        parent = max((self.members[i] for i in picks), key=lambda m: m[1])[0]
        return np.clip(np.asarray(parent) + self.sigma * self.rng.standard_normal(n), 0.0, 1.0)

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        out = []
        for _ in range(n or self.batch):
            out.append(self.space.clip(self.space.from_unit(self._child())))
            self.asked += 1
        return out

    def tell(self, xs: Sequence[np.ndarray], scores: Sequence[float | None]) -> None:
        for x, s in zip(xs, scores):
            if s is None or not np.isfinite(s):
                continue  # a failed candidate leaves the population as it was
            self.members.append((self.space.to_unit(np.asarray(x, dtype=float)).tolist(), float(s)))
            if len(self.members) > self.size:
                self.members.pop(0)  # the oldest leaves, however good
        self.tracker.update(xs, scores)

    def best(self):
        return self.tracker.best_x, self.tracker.best_score

    def done(self) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"settings": {"seed": self.seed, "population": self.size, "sample": self.sample,
                             "sigma": self.sigma, "genes": len(self.space)},
                "rng": self.rng.bit_generator.state, "members": [[x, s] for x, s in self.members],
                "asked": self.asked, **self.tracker.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()["settings"]
        if state.get("settings") != mine:
            raise ValueError(f"steady: the saved state is of settings {state.get('settings')!r}, not {mine!r} "
                             "(another seed, population, sample, sigma or space)")
        self.rng.bit_generator.state = state["rng"]
        self.members = [(list(map(float, x)), float(s)) for x, s in state["members"]]
        self.asked = int(state["asked"])
        self.tracker.load(state)
