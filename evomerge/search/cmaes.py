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

Restarts (``restarts=N``; IPOP, Auger & Hansen 2005, https://doi.org/10.1109/CEC.2005.1554902):
when pycma stops (the distribution has converged or stagnated, or ``max_generations`` of a
run are spent) and restarts remain, a new run starts from the same point with the
population multiplied by ``incpopsize`` and a seed of its own, within the search's budget;
the best genome is kept over all runs.

The strategy's state is plain data: its settings and every generation it asked and was told
(the unit-cube samples and the fitness values). ``load_state_dict`` rebuilds pycma from the
seed and replays that history, checking that each replayed generation asks what was asked
before, so a resumed search continues exactly (and a state from another seed, space or pycma
version is refused rather than continued wrongly).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from ..space import Space
from .base import FAILED_PENALTY, _BestTracker

__all__ = ["CMAES"]


class CMAES:
    name = "cmaes"

    def __init__(self, space: Space, seed: int = 0, sigma0: float = 1 / 6, x0: float | None = None,
                 popsize: int | None = None, max_generations: int | None = None, restarts: int = 0,
                 incpopsize: float = 2.0):
        self.space = space
        n = len(space)
        self.popsize = int(popsize) if popsize else 4 + int(3 * math.log(n))
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
            raise ValueError(f"cmaes: restarts must be a whole number >= 0, got {restarts!r}")
        if not isinstance(incpopsize, (int, float)) or isinstance(incpopsize, bool) or not incpopsize >= 1:
            raise ValueError(f"cmaes: incpopsize must be a number >= 1, got {incpopsize!r}")
        self.settings = {"genes": n, "seed": int(seed), "sigma0": float(sigma0),
                         "x0": None if x0 is None else float(x0), "popsize": self.popsize,
                         "max_generations": None if not max_generations else int(max_generations)}
        if restarts:  # (absent otherwise: states saved before restarts existed still resume)
            self.settings.update(restarts=int(restarts), incpopsize=float(incpopsize))
        self.penalty = 1.0
        self._start()

    def _start(self) -> None:
        """A fresh strategy from the settings (the same every time): the first run."""
        self.history: list[dict[str, list]] = []  # per told generation: samples and fitness
        self.tracker = _BestTracker()
        self.restart = 0  # runs started after the first (derived again on replay)
        self._run(0)

    def _run(self, restart: int) -> None:
        """A pycma run: the first, or restart number ``restart`` (a larger population, a seed
        of its own)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pycma warns when matplotlib (for its plots) is missing
            import cma

        st = self.settings
        start = np.full(st["genes"], st["x0"]) if st["x0"] is not None else self.space.to_unit(self.space.x0)
        seed = st["seed"] + 1 + 1000 * restart
        popsize = int(round(self.popsize * st.get("incpopsize", 2.0) ** restart))
        # pycma samples with opts["randn"]; give it a generator of its own (NumPy's global
        # one belongs to whoever else uses it)
        self._randn_source = np.random.RandomState(seed)
        opts = {"randn": self._randn_source.randn, "popsize": popsize, "seed": seed, "verbose": -9,
                "verb_log": 0, "verb_disp": 0, "tolx": 1e-6, "tolfun": 0.0}
        if st["max_generations"]:
            opts["maxiter"] = st["max_generations"]
        state = np.random.get_state()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.es = cma.CMAEvolutionStrategy(start.tolist(), st["sigma0"], opts)
            self._rng = np.random.get_state()  # pycma draws from NumPy's global generator
        finally:
            np.random.set_state(state)
        self._asked: list[np.ndarray] = []
        self._stop, self._stop_checked = False, None

    def _call(self, fn):
        """Run ``fn`` with pycma's own NumPy generator state in place of the global one."""
        outer = np.random.get_state()
        np.random.set_state(self._rng)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = fn()
            self._rng = np.random.get_state()
        finally:
            np.random.set_state(outer)
        return out

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        """One generation (``popsize`` genomes; ``n`` is ignored: CMA-ES needs whole generations)."""
        self.done()  # pycma's stop check updates its state: made once per generation, whoever asks
        self._asked = [np.asarray(u, dtype=float) for u in self._call(self.es.ask)]
        return [self.space.from_unit(np.clip(u, 0.0, 1.0)) for u in self._asked]

    def tell(self, xs, scores) -> None:
        if len(xs) != len(self._asked):
            raise ValueError(f"cmaes: told {len(xs)} results for a generation of {len(self._asked)}")
        ok = [s for s in scores if s is not None and np.isfinite(s)]
        worst = min(ok) if ok else 0.0
        # pycma minimises; a failure counts as a little worse than the worst success
        failed = (worst - max(1.0, abs(worst))) if ok else FAILED_PENALTY
        fitness = [float(-(s if s is not None and np.isfinite(s) else failed)
                         + self.penalty * float(np.sum((u - np.clip(u, 0.0, 1.0)) ** 2)))
                   for s, u in zip(scores, self._asked)]
        self._tell(self._asked, fitness)
        self.tracker.update(xs, scores)

    def _tell(self, us: list[np.ndarray], fitness: list[float]) -> None:
        self._call(lambda: self.es.tell([u.tolist() for u in us], fitness))
        self.history.append({"u": [u.tolist() for u in us], "fitness": list(fitness)})
        self._asked = []

    def best(self):
        return self.tracker.best_x, self.tracker.best_score

    def done(self) -> bool:
        """pycma's stop check, made once per generation (it counts flat generations as it
        checks, so checking more often would change what a resumed search does); where the
        run stops and restarts remain, the next run starts instead."""
        if self._stop_checked != (self.restart, self.es.countiter):
            stop = bool(self.es.stop())
            if stop and self.restart < self.settings.get("restarts", 0):
                self.restart += 1
                self._run(self.restart)
                stop = False
            self._stop, self._stop_checked = stop, (self.restart, self.es.countiter)
        return self._stop

    def state_dict(self) -> dict[str, Any]:
        return {"settings": dict(self.settings), "history": self.history,
                "asked": [u.tolist() for u in self._asked], **self.tracker.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("settings") != self.settings:
            diff = sorted(k for k in set(self.settings) | set(state.get("settings") or {})
                          if (state.get("settings") or {}).get(k) != self.settings.get(k))
            raise ValueError(f"cmaes: the saved state was made with other settings ({', '.join(diff)}: "
                             f"{ {k: (state.get('settings') or {}).get(k) for k in diff} } against "
                             f"{ {k: self.settings.get(k) for k in diff} })")
        self._start()
        for g, gen in enumerate(state["history"]):
            self._replay_ask(gen["u"], g)
            self._tell([np.asarray(u, dtype=float) for u in gen["u"]], [float(f) for f in gen["fitness"]])
        if state["asked"]:
            self._replay_ask(state["asked"], len(state["history"]))
            self._asked = [np.asarray(u, dtype=float) for u in state["asked"]]
        self.tracker.load(state)

    def _replay_ask(self, recorded: list[list[float]], generation: int) -> None:
        self.done()
        us = self._call(self.es.ask)
        if len(us) != len(recorded) or not np.allclose(np.asarray(us), np.asarray(recorded), rtol=1e-6, atol=1e-9):
            raise ValueError(f"cmaes: replaying the saved state, generation {generation} asks for other genomes "
                             "than were asked (another pycma version or space?); it cannot be resumed exactly")
