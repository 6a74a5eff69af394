"""Optuna samplers as strategies: TPE, GP, CMA-ES (Optuna's own), NSGA-II and random.

Trials live in an Optuna storage: an SQLite file in the run directory by default, any
SQLAlchemy URL (e.g. PostgreSQL) when given, so ``optuna-dashboard`` can watch a search.
NSGA-II optimises one objective per task (``objectives``: metric names such as
``"reverse/acc"``) and keeps a Pareto front; the other samplers optimise the score.

The strategy's state is plain data. The storage is the record of every trial (with a
storage URL it is already on disk; an in-memory study's trials go into the state), and the
sampler is rebuilt for every ``ask`` with a seed drawn from the search's seed and the number
of trials so far, so a resumed search samples exactly what an uninterrupted one would, and
nothing of a library's internals is pickled.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ..space import Space
from .base import _BestTracker

__all__ = ["OptunaSearch", "SAMPLERS"]

SAMPLERS = ("tpe", "gp", "cmaes", "nsga2", "random")


def _sampler(kind: str, seed: int):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate TPE is marked experimental
        return _new_sampler(kind, seed)


def _new_sampler(kind: str, seed: int):
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
        self.seed = int(seed)
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
        # a sampler of its own for each batch, seeded by the trials so far: no hidden state
        seed = int(np.random.SeedSequence([self.seed, len(self.study.trials)]).generate_state(1)[0])
        self.study.sampler = _sampler(self.kind, seed)
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
                missing = [o for o in self.objectives if o not in m and o != "score"]
                if missing:  # never stand the mean in for a task's own objective
                    raise ValueError(f"optuna {self.kind}: objective(s) {missing} are not among the evaluator's "
                                     f"metrics ({', '.join(sorted(m)) or 'none'}); set search.objectives")
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
        state = {"sampler": self.kind, "seed": self.seed, "pending": list(self._pending),
                 "enqueued": self._enqueued_x0, **self.tracker.state()}
        if not self.storage:  # an in-memory study: its trials are the state
            state["trials"] = [_trial_json(t) for t in self.study.get_trials(deepcopy=False)]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import optuna

        if (state.get("sampler"), state.get("seed")) != (self.kind, self.seed):
            raise ValueError(f"optuna: the saved state is of sampler {state.get('sampler')!r} with seed "
                             f"{state.get('seed')!r}, not {self.kind!r} with seed {self.seed}")
        if self.storage:
            self.study = optuna.load_study(storage=self.storage, study_name=self.study_name,
                                           sampler=_sampler(self.kind, self.seed))
        else:
            self.study = optuna.create_study(sampler=_sampler(self.kind, self.seed),
                                             directions=self.study.directions)
            for t in state.get("trials", []):
                self.study.add_trial(_trial_from_json(t))
        self._pending = [int(i) for i in state["pending"]]
        self._enqueued_x0 = bool(state["enqueued"])
        self.tracker.load(state)


def _trial_json(t) -> dict[str, Any]:
    from optuna.distributions import distribution_to_json

    return {"number": t.number, "state": t.state.name, "values": t.values, "params": dict(t.params),
            "distributions": {k: distribution_to_json(d) for k, d in t.distributions.items()},
            "user_attrs": t.user_attrs, "system_attrs": t.system_attrs}


def _trial_from_json(d: dict[str, Any]):
    import optuna
    from optuna.distributions import json_to_distribution

    return optuna.trial.create_trial(
        state=optuna.trial.TrialState[d["state"]], values=d["values"], params=d["params"],
        distributions={k: json_to_distribution(v) for k, v in d["distributions"].items()},
        user_attrs=d["user_attrs"], system_attrs=d["system_attrs"])
