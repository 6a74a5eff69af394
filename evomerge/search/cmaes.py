"""CMA-ES over a space's genome, with pycma (``cma``).

As in the evolutionary model-merging paper (Akiba et al. 2024, https://arxiv.org/abs/2403.13187)
and mergekit-evolve: the search runs in the unit cube (each gene scaled by its bounds),
starting at x0 (the space's start, or a constant such as 0.5) with step size sigma0 = 1/6 and
the default population 4 + floor(3 ln n). Bounds: a sample outside the unit cube is
evaluated at its nearest point inside, and told with a penalty growing with its squared
distance to the cube, so the distribution is pulled back inside. (The loop, not pycma, keeps
the map from samples to genomes: pycma's own boundary handler finds its samples again
through Python's per-process salted hashes, which a resumed search in a new process could
not reproduce.)
"""

from __future__ import annotations

import io
import math
import pickle
import warnings
from typing import Any

import numpy as np

from ..space import Space
from .base import FAILED_PENALTY, _BestTracker

__all__ = ["CMAES"]


class CMAES:
    name = "cmaes"

    def __init__(self, space: Space, seed: int = 0, sigma0: float = 1 / 6, x0: float | None = None,
                 popsize: int | None = None, max_generations: int | None = None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pycma warns when matplotlib (for its plots) is missing
            import cma

        self.space = space
        n = len(space)
        self.popsize = int(popsize) if popsize else 4 + int(3 * math.log(n))
        start = np.full(n, float(x0)) if x0 is not None else space.to_unit(space.x0)
        self.penalty = 1.0
        # pycma samples with opts["randn"]; give it a generator of its own, which travels
        # with the pickled strategy (NumPy's global one would be copied at pickling time)
        self._randn_source = np.random.RandomState(int(seed) + 1)
        opts = {"randn": self._randn_source.randn, "popsize": self.popsize, "seed": int(seed) + 1, "verbose": -9,
                "verb_log": 0, "verb_disp": 0, "tolx": 1e-6, "tolfun": 0.0}
        if max_generations:
            opts["maxiter"] = int(max_generations)
        state = np.random.get_state()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.es = cma.CMAEvolutionStrategy(start.tolist(), float(sigma0), opts)
            self._rng = np.random.get_state()  # pycma draws from NumPy's global generator
        finally:
            np.random.set_state(state)
        self._asked: list[np.ndarray] = []
        self.tracker = _BestTracker()

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        """One generation (``popsize`` genomes; ``n`` is ignored: CMA-ES needs whole generations)."""
        outer = np.random.get_state()
        np.random.set_state(self._rng)
        try:
            us = self.es.ask()
            self._rng = np.random.get_state()
        finally:
            np.random.set_state(outer)
        self._asked = [np.asarray(u, dtype=float) for u in us]
        self._settle()
        return [self.space.from_unit(np.clip(u, 0.0, 1.0)) for u in self._asked]

    def tell(self, xs, scores) -> None:
        if len(xs) != len(self._asked):
            raise ValueError(f"cmaes: told {len(xs)} results for a generation of {len(self._asked)}")
        ok = [s for s in scores if s is not None and np.isfinite(s)]
        worst = min(ok) if ok else 0.0
        # pycma minimises; a failure counts as a little worse than the worst success
        failed = (worst - max(1.0, abs(worst))) if ok else FAILED_PENALTY
        fitness = [-(s if s is not None and np.isfinite(s) else failed)
                   + self.penalty * float(np.sum((u - np.clip(u, 0.0, 1.0)) ** 2))
                   for s, u in zip(scores, self._asked)]
        outer = np.random.get_state()
        np.random.set_state(self._rng)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.es.tell([u.tolist() for u in self._asked], fitness)
            self._rng = np.random.get_state()
        finally:
            np.random.set_state(outer)
        self.tracker.update(xs, scores)
        self._asked = []
        self._settle()

    def _settle(self) -> None:
        """Replace the live pycma object by a pickled copy of itself. pycma keeps lazily
        updated caches that pickling drops, so a strategy resumed from its checkpoint would
        otherwise sample differently from one that never stopped; settling after every ask
        and tell makes the two identical."""
        self.es = pickle.loads(pickle.dumps(self.es))

    def best(self):
        return self.tracker.best_x, self.tracker.best_score

    def done(self) -> bool:
        return bool(self.es.stop())

    def state_dict(self) -> dict[str, Any]:
        buf = io.BytesIO()
        pickle.dump((self.es, self._rng, self._asked), buf)
        return {"pickle": buf.getvalue(), **self.tracker.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.es, self._rng, self._asked = pickle.loads(state["pickle"])
        self.tracker.load(state)
