"""Optuna samplers as strategies: TPE, GP, CMA-ES (Optuna's own), NSGA-II and random.

Trials live in an Optuna storage: an SQLite file in the run directory by default, any
SQLAlchemy URL (e.g. PostgreSQL) when given, so ``optuna-dashboard`` can watch a search.
NSGA-II optimises one objective per task (``objectives``: metric names such as
``"reverse/acc"``) and keeps a Pareto front; the other samplers optimise the score.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, Sequence

import numpy as np

from ..space import Space
from .base import _BestTracker

__all__ = ["OptunaSearch", "SAMPLERS"]

SAMPLERS = ("tpe", "gp", "cmaes", "nsga2", "random")


def _sampler(kind: str, seed: int):
    import optuna

    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, deterministic_objective=True)
    if kind == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"optuna sampler {kind!r}: choose one of {', '.join(SAMPLERS)}")


class OptunaSearch:
    """Args:
        space: the genome space.
        sampler: one of ``SAMPLERS``.
        seed: the sampler's seed.
        storage: an SQLAlchemy URL (``sqlite:///run/optuna.db``, ``postgresql://...``); in
            memory when ``None``.
        study_name: the study's name in the storage.
        objectives: metric names, one objective each (NSGA-II); ``None`` optimises ``score``.
        batch: candidates per ``ask``.
    """

    def __init__(self, space: Space, sampler: str = "tpe", seed: int = 0, storage: str | None = None,
                 study_name: str = "evomerge", objectives: Sequence[str] | None = None, batch: int = 4):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.name = f"optuna_{sampler}"
        self.space = space
        self.kind = sampler
        self.batch = int(batch)
        self.objectives = list(objectives) if objectives else None
        if sampler == "nsga2" and not self.objectives:
            raise ValueError("optuna nsga2 needs objectives (one metric name per task)")
        self.storage = storage
        self.study_name = study_name
        directions = ["maximize"] * (len(self.objectives) if self.objectives else 1)
        self.study = optuna.create_study(storage=storage, study_name=study_name, sampler=_sampler(sampler, seed),
                                         directions=directions, load_if_exists=True)
        self.dists = {f"g{i}": optuna.distributions.FloatDistribution(float(lo), float(hi))
                      for i, (lo, hi) in enumerate(zip(space.lower, space.upper))}
        self._pending: list[int] = []
        self.tracker = _BestTracker()
        self._enqueued_x0 = False

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        n = n or self.batch
        if not self._enqueued_x0 and len(self.study.trials) == 0:
            self.study.enqueue_trial({f"g{i}": float(v) for i, v in enumerate(self.space.x0)})
            self._enqueued_x0 = True
        out = []
        for _ in range(n):
            trial = self.study.ask(self.dists)
            self._pending.append(trial.number)
            out.append(np.array([trial.params[f"g{i}"] for i in range(len(self.space))]))
        return out

    def tell(self, xs, scores, metrics: Sequence[dict] | None = None) -> None:
        import optuna

        if len(xs) != len(self._pending):
            raise ValueError(f"optuna: told {len(xs)} results for {len(self._pending)} asked")
        for i, (number, s) in enumerate(zip(self._pending, scores)):
            if s is None or not np.isfinite(s):
                self.study.tell(number, state=optuna.trial.TrialState.FAIL)
                continue
            if self.objectives:
                m = (metrics or [{}] * len(xs))[i]
                values = [float(m.get(o, s)) for o in self.objectives]
                self.study.tell(number, values)
            else:
                self.study.tell(number, float(s))
        self._pending = []
        self.tracker.update(xs, scores)

    @property
    def wants_metrics(self) -> bool:
        return self.objectives is not None

    def pareto_front(self) -> list[dict]:
        """Non-dominated trials: genome and objective values."""
        return [{"x": [t.params[f"g{i}"] for i in range(len(self.space))], "values": list(t.values)}
                for t in self.study.best_trials]

    def best(self):
        return self.tracker.best_x, self.tracker.best_score

    def done(self) -> bool:
        return False

    def state_dict(self) -> dict[str, Any]:
        buf = io.BytesIO()
        # the sampler carries its random state; an in-memory study carries its trials too
        pickle.dump((self.study.sampler, None if self.storage else self.study), buf)
        return {"pickle": buf.getvalue(), "pending": list(self._pending), "enqueued": self._enqueued_x0,
                **self.tracker.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import optuna

        sampler, study = pickle.loads(state["pickle"])
        if study is not None:
            self.study = study
        else:
            self.study = optuna.load_study(storage=self.storage, study_name=self.study_name, sampler=sampler)
        self.study.sampler = sampler
        self._pending = list(state["pending"])
        self._enqueued_x0 = state["enqueued"]
        self.tracker.load(state)
