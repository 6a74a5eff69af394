"""Optuna samplers as strategies: TPE, GP, CMA-ES (Optuna's own), NSGA-II and random.

Trials live in an Optuna storage: an SQLite file in the run directory by default, any
SQLAlchemy URL (e.g. PostgreSQL) when given, so ``optuna-dashboard`` can watch a search.
NSGA-II optimises one objective per task (``objectives``: metric names such as
``"reverse/acc"``) and keeps a Pareto front; the other samplers optimise the score.

The strategy's state is plain data. The storage is the record of every trial (with a
storage URL it is already on disk; an in-memory study is rebuilt by replaying the batches it
was asked and told), and the sampler is rebuilt for every ``ask`` with a seed drawn from the
search's seed and the number of genomes asked so far, so a resumed search samples exactly
what an uninterrupted one would, and nothing of a library's internals is written by
evomerge or read back from its state file.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from ..space import Space
from .base import _BestTracker
from .baselines import _batch

__all__ = ["OptunaSearch", "SAMPLERS"]

SAMPLERS = ("tpe", "gp", "cmaes", "nsga2", "random")


# the samplers that model constraints (``constraints_func``): a floor on every task is
# given to them as one constraint per task, besides the penalty in the score
CONSTRAINED = ("tpe", "gp", "nsga2")
_CONSTRAINTS_ATTR = "evomerge_constraints"


def _constraints(trial) -> tuple[float, ...]:
    """A told trial's constraint values (each <= 0 where satisfied), as ``tell`` stored them."""
    return tuple(trial.user_attrs[_CONSTRAINTS_ATTR])


def _sampler(kind: str, seed: int, constrained: bool = False):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # multivariate TPE and samplers' constraints are marked experimental
        return _new_sampler(kind, seed, constrained)


def _new_sampler(kind: str, seed: int, constrained: bool = False):
    import optuna

    kw = {"constraints_func": _constraints} if constrained else {}
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, **kw)
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, deterministic_objective=True, **kw)
    if kind == "cmaes":
        return _checked_cmaes_sampler()(seed=seed)
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, **kw)
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise ValueError(f"optuna sampler {kind!r}: choose one of {', '.join(SAMPLERS)}")


# What Optuna's CMA-ES sampler pickles into the storage (its optimizer, from the ``cmaes``
# package) is built from these alone; anything else in such a pickle is not its own.
_CMAES_PICKLE = {("cmaes._cma", "CMA"), ("cmaes._sepcma", "SepCMA"), ("cmaes._cmawm", "CMAwM"),
                 ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy._core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
                 ("numpy.core.multiarray", "scalar")}


def _checked_cmaes_sampler():
    """Optuna's CMA-ES sampler, reading its optimizer back from the storage (the run
    directory's ``optuna.db``) through an unpickler that builds only ``_CMAES_PICKLE``'s
    classes: a study file from elsewhere cannot run code on resume (with plain
    ``pickle.loads``, as Optuna reads it, any callable could run)."""
    import io
    import pickle

    import optuna

    from ..trials import StateError

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) not in _CMAES_PICKLE:
                raise StateError(f"optuna storage: the CMA-ES sampler's saved optimizer holds {module}.{name}, "
                                 "which is not part of a CMA-ES optimizer; refused unread (was the study "
                                 "file altered?)")
            return super().find_class(module, name)

    class CheckedCmaEsSampler(optuna.samplers.CmaEsSampler):
        def _restore_optimizer(self, completed_trials):
            key = self._attr_key_optimizer
            for trial in reversed(completed_trials):
                attrs = {k: v for k, v in trial.system_attrs.items() if k.startswith(key)}
                if attrs:
                    try:
                        raw = bytes.fromhex(self._concat_optimizer_attrs(attrs))
                        opt = _Unpickler(io.BytesIO(raw)).load()
                    except StateError:
                        raise
                    except Exception as e:  # noqa: BLE001 - a damaged record, named
                        raise StateError(f"optuna storage: the CMA-ES sampler's saved optimizer of trial "
                                         f"{trial.number} cannot be read ({type(e).__name__}: {e})") from None
                    _check_optimizer(opt, trial.number)
                    return opt
            return None

    return CheckedCmaEsSampler


def _check_optimizer(opt, trial: int) -> None:
    """A restored optimizer is one of the ``cmaes`` package's, whole, and sized as an
    optimizer the sampler makes (an altered study can hold one that fails later with a
    traceback, or resamples forever)."""
    import cmaes

    from ..trials import StateError

    where = f"optuna storage: the CMA-ES sampler's saved optimizer of trial {trial}"
    if not isinstance(opt, (cmaes.CMA, cmaes.SepCMA, cmaes.CMAwM)):
        raise StateError(f"{where} is a {type(opt).__name__}, not a CMA-ES optimizer")
    try:
        dim, pop = int(opt.dim), int(opt.population_size)
        resampling = int(getattr(opt, "_n_max_resampling", 100))
        mean = getattr(opt, "_mean", None)
    except Exception as e:  # noqa: BLE001 - missing or malformed parts
        raise StateError(f"{where} is incomplete ({type(e).__name__}: {e})") from None
    if not (0 < dim < 10**6 and 0 < pop < 10**6 and 0 <= resampling <= 10**4) or \
            mean is None or getattr(mean, "shape", None) != (dim,):
        raise StateError(f"{where} is malformed (dimension {dim}, population {pop}, resampling {resampling})")


class OptunaSearch:
    """Args:
        space: the genome space.
        sampler: one of ``SAMPLERS``.
        seed: the sampler's seed.
        storage: an SQLAlchemy URL (``sqlite:///run/optuna.db``, ``postgresql://...``); in
            memory when ``None``.
        study_name: the study's name in the storage.
        objectives: metric names, one objective each (NSGA-II); ``None`` optimises ``score``.
        batch: candidates per ``ask``. Results may be told in any order and any number at a
            time (``asynchronous``: a search that keeps every worker busy tells each as it comes).
        objective_direction: ``"maximize"`` or ``"minimize"`` for every objective (the
            evaluator's direction: e.g. perplexity is minimised).
        constraints: the sampler models constraints (``tpe``, ``gp``, ``nsga2``): each told
            result comes with one value per constraint (<= 0 where met; the search loop gives
            the objective's floor on every task), which the sampler uses to prefer feasible
            regions (Optuna's ``constraints_func``).
    """

    asynchronous = True  # results may be told one at a time, in any order

    def __init__(self, space: Space, sampler: str = "tpe", seed: int = 0, storage: str | None = None,
                 study_name: str = "evomerge", objectives: Sequence[str] | None = None, batch: int = 4,
                 objective_direction: str = "maximize", constraints: bool = False):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.name = f"optuna_{sampler}"
        self.space = space
        self.kind = sampler
        self.seed = int(seed)
        self.batch = _batch(batch, f"optuna {sampler}")
        self.objectives = list(objectives) if objectives else None
        if sampler == "nsga2" and not self.objectives:
            raise ValueError("optuna nsga2 needs objectives (one metric name per task)")
        if objective_direction not in ("maximize", "minimize"):
            raise ValueError(f"optuna: objective_direction must be 'maximize' or 'minimize', not {objective_direction!r}")
        if constraints and sampler not in CONSTRAINED:
            raise ValueError(f"optuna {sampler} takes no constraints (only {', '.join(CONSTRAINED)} do)")
        self.constrained = bool(constraints)
        self.storage = storage
        self.study_name = study_name
        # the score is "higher is better" already; the objectives are the evaluator's raw metrics
        self.directions = [objective_direction] * len(self.objectives) if self.objectives else ["maximize"]
        self.study = self._open()
        self.dists = {f"g{i}": optuna.distributions.FloatDistribution(float(lo), float(hi))
                      for i, (lo, hi) in enumerate(zip(space.lower, space.upper))}
        self._pending: list[int] = []  # trials asked and not yet told, in the order asked
        self._params: dict[int, tuple] = {}  # a pending trial's genome, to know which trial a told genome is
        self._asked = 0  # genomes asked so far: seeds each batch's sampler
        # in memory only: every ask ({"x"}) and every tell ({"tell": trial numbers, "values"}), in order
        self._history: list[dict[str, list]] = []
        self.tracker = _BestTracker()
        self._enqueued_x0 = False

    def _open(self, seed: int | None = None):
        import optuna

        return optuna.create_study(storage=self.storage, study_name=self.study_name,
                                   sampler=_sampler(self.kind, self.seed if seed is None else seed, self.constrained),
                                   directions=self.directions, load_if_exists=True)

    def ask(self, n: int | None = None) -> list[np.ndarray]:
        n = n or self.batch
        if not self._enqueued_x0 and self._asked == 0:
            self.study.enqueue_trial({f"g{i}": float(v) for i, v in enumerate(self.space.x0)})
            self._enqueued_x0 = True
        # a sampler of its own for each batch, seeded by the genomes asked so far: no hidden state
        seed = int(np.random.SeedSequence([self.seed, self._asked]).generate_state(1)[0])
        self.study.sampler = _sampler(self.kind, seed, self.constrained)
        out = []
        for _ in range(n):
            trial = self.study.ask(self.dists)
            x = np.array([trial.params[f"g{i}"] for i in range(len(self.space))])
            self._pending.append(trial.number)
            self._params[trial.number] = tuple(x.tolist())
            out.append(x)
        self._asked += n
        if not self.storage:
            self._history.append({"x": [x.tolist() for x in out]})
        return out

    def _trials_of(self, xs) -> list[int]:
        """The pending trials that asked ``xs``: any of them, in any order (an asynchronous
        search tells each result as it comes); equal genomes are matched in the order asked."""
        left = list(self._pending)
        out = []
        for x in xs:
            key = tuple(float(v) for v in np.asarray(x, dtype=float).ravel())
            number = next((t for t in left if self._params.get(t) == key), None)
            if number is None:
                raise ValueError(f"optuna: told a genome that is not among the {len(self._pending)} asked and not "
                                 "yet told")
            left.remove(number)
            out.append(number)
        return out

    def tell(self, xs, scores, metrics: Sequence[dict] | None = None,
             constraints: Sequence[Sequence[float] | None] | None = None) -> None:
        if self.constrained and constraints is None:
            raise ValueError(f"optuna {self.kind} was built with constraints: tell them with every result")
        numbers = self._trials_of(xs)
        told: list[list[float] | None] = []
        for i, s in enumerate(scores):
            if s is None or not np.isfinite(s):
                told.append(None)
            elif self.objectives:
                m = (metrics or [{}] * len(xs))[i]
                missing = [o for o in self.objectives if o not in m and o != "score"]
                if missing:  # never stand the mean in for a task's own objective
                    raise ValueError(f"optuna {self.kind}: objective(s) {missing} are not among the evaluator's "
                                     f"metrics ({', '.join(sorted(m)) or 'none'}); set search.objectives")
                told.append([float(m.get(o, s)) for o in self.objectives])
            else:
                told.append([float(s)])
        self._tell_values(numbers, told, constraints if self.constrained else None)
        self.tracker.update(xs, scores)

    def _tell_values(self, numbers: list[int], told: list[list[float] | None], constraints=None) -> None:
        import optuna

        trials = self.study.get_trials(deepcopy=False)
        constraints = [None] * len(told) if constraints is None else [None if c is None else [float(v) for v in c]
                                                                       for c in constraints]
        for number, values, c in zip(numbers, told, constraints):
            if trials[number].state.is_finished():
                continue  # told before a crash that came before the checkpoint
            if values is None:
                self.study.tell(number, state=optuna.trial.TrialState.FAIL)
                continue
            if self.constrained:
                if c is None:
                    raise ValueError(f"optuna {self.kind}: trial {number} was told without its constraints")
                # a trial's user attributes are set through a Trial of it (what study.ask hands out)
                optuna.trial.Trial(self.study, trials[number]._trial_id).set_user_attr(_CONSTRAINTS_ATTR, c)
            self.study.tell(number, values)
        if not self.storage:
            self._history.append({"tell": list(numbers), "values": told,
                                  **({"constraints": constraints} if self.constrained else {})})
        for number in numbers:
            self._pending.remove(number)
            self._params.pop(number, None)

    @property
    def wants_constraints(self) -> bool:
        return self.constrained

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
        state = {"sampler": self.kind, "seed": self.seed, "pending": list(self._pending), "asked": self._asked,
                 "enqueued": self._enqueued_x0, **self.tracker.state()}
        if not self.storage:  # an in-memory study: what it was asked and told, to replay
            state["history"] = self._history
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved state. With a storage, its trials are the record (trials a
        crash left unfinished outside ``pending`` are marked failed); in memory, the study is
        rebuilt by asking and telling the recorded batches again, each ask checked against
        the record. Nothing of a sampler's own (e.g. CMA-ES's pickled optimizer) is read
        from the state."""
        import optuna

        if (state.get("sampler"), state.get("seed")) != (self.kind, self.seed):
            raise ValueError(f"optuna: the saved state is of sampler {state.get('sampler')!r} with seed "
                             f"{state.get('seed')!r}, not {self.kind!r} with seed {self.seed}")
        if self.storage:
            self.study = self._open()
            pending = {int(i) for i in state["pending"]}
            for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
                self.study.ask()  # an enqueued trial nobody took: take it, then fail it below
            for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                if t.number not in pending:
                    self.study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            self._pending = sorted(pending)
            trials = self.study.get_trials(deepcopy=False)
            self._params = {t: tuple(float(trials[t].params[f"g{i}"]) for i in range(len(self.space)))
                            for t in self._pending if t < len(trials)}
            self._asked, self._enqueued_x0 = int(state["asked"]), bool(state["enqueued"])
        else:
            self.study = optuna.create_study(sampler=_sampler(self.kind, self.seed, self.constrained),
                                             directions=self.directions)
            self._pending, self._params, self._asked, self._enqueued_x0, self._history = [], {}, 0, False, []
            for b, event in enumerate(state["history"]):
                if "tell" in event:
                    self._tell_values([int(t) for t in event["tell"]], event["values"], event.get("constraints"))
                    continue
                xs = self.ask(len(event["x"]))
                if [x.tolist() for x in xs] != event["x"]:
                    raise ValueError(f"optuna: replaying the saved state, ask {b} asks for other genomes than were "
                                     "asked (another optuna version or space?); it cannot be resumed exactly")
                if event.get("values"):  # a batch asked and told together (states of earlier versions)
                    self._tell_values(self._pending[-len(xs):], event["values"], event.get("constraints"))
        self.tracker.load(state)
