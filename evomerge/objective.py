"""Objectives: how a candidate's per-task metrics become the one score a search optimizes.

An evaluator scores every task (``"<task>/<metric>"``; ``evaluator.primary(task)`` names the
metric that stands for the task, and ``evaluator.direction`` says whether higher or lower is
better). The objective, stated once per search (``objective=NAME`` on the command line,
``conf/objective/``), turns those task values into the score the strategy is told, always
"higher is better" inside the search loop:

=============== =======================================================================
``mean``        the unweighted mean over tasks (the evaluators' own ``"score"``)
``weighted``    the weighted mean (``weights``: per task; tasks not named weigh 1)
``worst``       the worst task (the minimum of accuracies, the maximum of perplexities)
``softmin``     a smooth worst task: ``-T log mean exp(-v / T)`` over the tasks' values
                (signed so that higher is better), from ``worst`` (``T -> 0``) to ``mean``
                (``T -> inf``); ``temperature`` in the metric's units
``quantile``    the conditional value at risk: the mean of the worst ``alpha`` fraction of
                the tasks (at least one), from ``worst`` (small alpha) to ``mean`` (1)
``normalized``  the mean of normalized values (below)
=============== =======================================================================

``normalize: true`` (any aggregate; implied by ``normalized``) first divides each task's
value by a reference, the merging literature's "normalized accuracy": the best score any
source model (the base or an expert, as it is) reaches on that task on the search split,
which for experts fine-tuned per task is the task's own expert (for a metric to minimize,
the reference over the value). The sources are then scored on the search split before the
search starts.

A ``floor`` (any objective) is a constraint: every task at least ``floor`` (at most, for a
metric to minimize), a number in the metric's units, or ``base``: at least the base model's
own score on each task (search split). A candidate below it is scored ``aggregate - penalty
* shortfall``, the shortfall summed over tasks (over each task's reference, for a normalized
objective), so a search first climbs back above the floor.

Worked example, accuracies ``{a: 0.9, b: 0.5, c: 0.1}``: ``mean`` 0.5, ``worst`` 0.1,
``quantile`` with ``alpha=0.5`` 0.3 (the worst two: 0.5 and 0.1), ``weighted`` with
``{a: 2}`` 0.6, ``floor=0.2`` takes 10 x 0.1 = 1.0 off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from .types import Direction

__all__ = ["Objective", "OBJECTIVES", "ObjectiveError", "task_values"]

OBJECTIVES = ("mean", "weighted", "worst", "softmin", "quantile", "normalized")


class ObjectiveError(ValueError):
    """An objective that cannot be computed: a bad setting, or metrics without a task's value."""


def task_values(metrics: Mapping[str, float], tasks, primary) -> dict[str, float]:
    """Each task's value: ``metrics["<task>/<primary(task)>"]``, checked present and a number."""
    out = {}
    for t in tasks:
        key = f"{t}/{primary(t)}"
        v = metrics.get(key)
        if v is None:
            have = ", ".join(sorted(k for k in metrics if k.startswith(f"{t}/"))) or "none"
            raise ObjectiveError(f"the metrics have no {key!r}, the value of task {t!r} (its metrics: {have})")
        if not math.isfinite(float(v)):  # NaN would order arbitrarily: no objective can rank it
            raise ObjectiveError(f"task {t!r}: its value {key!r} is {v}, not a finite number")
        out[t] = float(v)
    return out


@dataclass(frozen=True)
class Objective:
    """Args:
        name: one of ``OBJECTIVES``.
        weights: ``weighted``: task -> weight (> 0; tasks not named weigh 1).
        temperature: ``softmin``: in the metric's units (> 0).
        alpha: ``quantile``: the fraction of the tasks averaged, the worst first (0 < alpha <= 1).
        floor: every task at least this value (at most, when the metric is minimized), or
            ``"base"``: at least the base model's own score on each task; None: no floor.
        penalty: the score taken off per unit of a task's shortfall below the floor (> 0).
        normalize: divide each task's value by its reference (``normalized`` implies it).
    """

    name: str = "mean"
    weights: Mapping[str, float] = field(default_factory=dict)
    temperature: float = 0.05
    alpha: float = 0.25
    floor: float | str | None = None
    penalty: float = 10.0
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ObjectiveError(f"objective.name: {self.name!r} is not one of {', '.join(OBJECTIVES)}")
        object.__setattr__(self, "weights", dict(self.weights or {}))
        for t, w in self.weights.items():
            if not _finite(w) or w <= 0:
                raise ObjectiveError(f"objective.weights.{t}: a weight must be a positive number, got {w!r}")
        if not _finite(self.temperature) or self.temperature <= 0:
            raise ObjectiveError(f"objective.temperature: must be a positive number, got {self.temperature!r}")
        if not _finite(self.alpha) or not 0 < self.alpha <= 1:
            raise ObjectiveError(f"objective.alpha: must be in (0, 1], got {self.alpha!r}")
        if self.floor is not None and self.floor != "base" and not _finite(self.floor):
            raise ObjectiveError(f"objective.floor: must be a number, 'base' or null, got {self.floor!r}")
        if not isinstance(self.normalize, bool):
            raise ObjectiveError(f"objective.normalize: must be true or false, got {self.normalize!r}")
        if self.name == "normalized":
            object.__setattr__(self, "normalize", True)
        if not _finite(self.penalty) or self.penalty <= 0:
            raise ObjectiveError(f"objective.penalty: must be a positive number, got {self.penalty!r}")

    def check_tasks(self, tasks) -> None:
        """Refuse weights naming tasks the evaluator does not score."""
        unknown = sorted(set(self.weights) - set(tasks))
        if unknown:
            raise ObjectiveError(f"objective.weights: {', '.join(map(repr, unknown))} is not a task of the "
                                 f"evaluator ({', '.join(tasks)})")

    def aggregate(self, values: Mapping[str, float], direction: Direction) -> float:
        """The objective of task values, in the metric's own units and direction (a mean of
        accuracies, a worst perplexity), before any floor."""
        if not values:
            raise ObjectiveError("no task values to aggregate")
        s = 1.0 if direction == "maximize" else -1.0
        v = [s * x for x in values.values()]  # higher is better
        if self.name == "mean":
            out = sum(v) / len(v)
        elif self.name == "weighted":
            w = [float(self.weights.get(t, 1.0)) for t in values]
            out = sum(wi * vi for wi, vi in zip(w, v)) / sum(w)
        elif self.name == "normalized":
            out = sum(v) / len(v)
        elif self.name == "worst":
            out = min(v)
        elif self.name == "softmin":
            lo, T = min(v), self.temperature
            if math.isinf(lo):
                out = lo
            else:  # shifted by the minimum: no overflow, exact at one task
                out = lo - T * math.log(sum(math.exp(-(x - lo) / T) for x in v) / len(v))
        else:  # quantile: CVaR over the tasks
            m = max(1, math.ceil(self.alpha * len(v) - 1e-9))
            out = sum(sorted(v)[:m]) / m
        return s * out

    @property
    def references(self) -> bool:
        """Whether it needs the sources' scores (normalized values, a floor at the base's)."""
        return self.normalize or self.floor == "base"

    def shortfall(self, values: Mapping[str, float], direction: Direction,
                  floors: Mapping[str, float] | None = None) -> dict[str, float]:
        """Per task below the floor (above it, for a metric to minimize), by how much, in the
        metric's units; ``floors`` gives each task's floor where it is ``base``."""
        if self.floor is None:
            return {}
        if self.floor == "base" and floors is None:
            raise ObjectiveError("objective.floor 'base' needs the base model's scores (a run with a base model)")
        s = 1.0 if direction == "maximize" else -1.0
        out = {}
        for t, x in values.items():
            f = floors[t] if self.floor == "base" else self.floor
            if s * (f - x) > 0:
                out[t] = s * (f - x)
        return out

    def normalized(self, values: Mapping[str, float], direction: Direction,
                   references: Mapping[str, float]) -> dict[str, float]:
        """Each task's value over its reference (the reference over the value, for a metric
        to minimize): 1 where a task does as well as the reference."""
        out = {}
        for t, x in values.items():
            ref = references[t]
            num, den = (x, ref) if direction == "maximize" else (ref, x)
            if den == 0:
                why = "every source scores 0 on it" if direction == "maximize" else "its value is 0"
                raise ObjectiveError(f"task {t!r}: cannot normalize, {why}")
            out[t] = num / den
        return out

    def score(self, values: Mapping[str, float], direction: Direction,
              references: Mapping[str, float] | None = None, floors: Mapping[str, float] | None = None) -> float:
        """The score the search optimizes, higher is better: the aggregate (of normalized
        values where ``normalize``; negated for a metric to minimize) less the floor's
        penalty (on the raw values)."""
        short = self.shortfall(values, direction, floors)
        if self.normalize:
            if references is None:
                raise ObjectiveError("a normalized objective needs references (the sources' scores)")
            # the shortfall in the aggregate's units (a task's value over its reference), so the
            # penalty outweighs what a task below its floor gains elsewhere
            penalty = self.penalty * sum(d / abs(references[t]) for t, d in short.items())
            return self.aggregate(self.normalized(values, direction, references), "maximize") - penalty
        penalty = self.penalty * sum(short.values())
        s = 1.0 if direction == "maximize" else -1.0
        return s * self.aggregate(values, direction) - penalty

    def describe(self) -> dict[str, Any]:
        """Its settings, as plain data (summary.json)."""
        out: dict[str, Any] = {"name": self.name}
        if self.name == "weighted":
            out["weights"] = dict(self.weights)
        if self.name == "softmin":
            out["temperature"] = self.temperature
        if self.name == "quantile":
            out["alpha"] = self.alpha
        if self.normalize and self.name != "normalized":
            out["normalize"] = True
        if self.floor is not None:
            out.update(floor=self.floor, penalty=self.penalty)
        return out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Scoring:
    """An objective bound to an evaluator's tasks, their metrics and its direction: what the
    search loop applies to every result's metrics (plain data: it travels and pickles)."""

    objective: Objective
    tasks: tuple[str, ...]
    keys: tuple[str, ...]  # each task's metric name ("acc", "ppl", ...)
    direction: Direction
    references: tuple[float, ...] | None = None  # per task: the best source's value (normalize)
    floors: tuple[float, ...] | None = None  # per task: the base's value (floor: base)

    @classmethod
    def of(cls, objective: Objective, evaluator) -> "Scoring":
        tasks = tuple(evaluator.tasks)
        objective.check_tasks(tasks)
        return cls(objective, tasks, tuple(evaluator.primary(t) for t in tasks), evaluator.direction)

    def values(self, metrics: Mapping[str, float]) -> dict[str, float]:
        keys = dict(zip(self.tasks, self.keys))
        return task_values(metrics, self.tasks, keys.__getitem__)

    @property
    def needs_sources(self) -> bool:
        """Whether the sources' search-split scores must be known first (``with_sources``)."""
        return self.objective.references and (self.references is None or
                                               (self.objective.floor == "base" and self.floors is None))

    def with_sources(self, sources: Mapping[str, Mapping[str, float]], base: str | None) -> "Scoring":
        """Bound to the sources' metrics on the search split (``name -> metrics``; ``base``
        names the base among them): each task's reference is the best value any source
        reaches on it, its floor the base's value."""
        from dataclasses import replace

        if not sources:
            raise ObjectiveError("a normalized objective or a floor at the base needs the sources' scores")
        vals = {n: self.values(m) for n, m in sources.items()}
        pick = max if self.direction == "maximize" else min
        refs = tuple(pick(v[t] for v in vals.values()) for t in self.tasks)
        zero = [t for t, r in zip(self.tasks, refs) if r == 0]
        if self.objective.normalize and zero:
            raise ObjectiveError(f"objective {self.objective.name}: no source scores above 0 on task {zero[0]!r} "
                                 "(search split), so its values cannot be normalized; use another objective")
        floors = None
        if self.objective.floor == "base":
            if base is None or base not in vals:
                raise ObjectiveError("objective.floor 'base': the run has no base model to take the floor from")
            floors = tuple(vals[base][t] for t in self.tasks)
        return replace(self, references=refs, floors=floors)

    def _kw(self) -> dict[str, Any]:
        return {"references": None if self.references is None else dict(zip(self.tasks, self.references)),
                "floors": None if self.floors is None else dict(zip(self.tasks, self.floors))}

    def __call__(self, metrics: Mapping[str, float]) -> float:
        """The score a strategy is told (higher is better)."""
        return self.objective.score(self.values(metrics), self.direction, **self._kw())

    def violations(self, metrics: Mapping[str, float]) -> tuple[float, ...]:
        """The floor as constraints, one per task: how far the task is below it (above, for a
        metric to minimize), <= 0 where it is met (what Optuna's constrained samplers read)."""
        if self.objective.floor is None:
            raise ObjectiveError("the objective has no floor: there are no constraints")
        if self.objective.floor == "base" and self.floors is None:
            raise ObjectiveError("objective.floor 'base' needs the base model's scores")
        v = self.values(metrics)
        s = 1.0 if self.direction == "maximize" else -1.0
        floors = dict(zip(self.tasks, self.floors)) if self.objective.floor == "base" else None
        return tuple(s * ((floors[t] if floors else self.objective.floor) - v[t]) for t in self.tasks)

    def summary(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """What a report shows of one evaluation: the objective (in the metric's units, or
        normalized), the mean, the worst task and its value, the normalized mean where
        references are known, and the tasks below the floor."""
        v = self.values(metrics)
        s = 1.0 if self.direction == "maximize" else -1.0
        worst = min(v, key=lambda t: s * v[t])
        kw = self._kw()
        out = {"mean": sum(v.values()) / len(v), "worst_task": worst, "worst": v[worst],
               "below_floor": sorted(self.objective.shortfall(v, self.direction, kw["floors"]))}
        if kw["references"] is not None and all(x != 0 for x in kw["references"].values()) and \
                (self.direction == "maximize" or all(x != 0 for x in v.values())):
            nv = self.objective.normalized(v, self.direction, kw["references"])
            out["normalized_mean"] = sum(nv.values()) / len(nv)
            out["objective"] = self.objective.aggregate(nv, "maximize") if self.objective.normalize else \
                self.objective.aggregate(v, self.direction)
        else:
            out["objective"] = self.objective.aggregate(v, self.direction)
        return out

    def describe(self) -> dict[str, Any]:
        out = {**self.objective.describe(), "direction": self.direction,
               "tasks": {t: k for t, k in zip(self.tasks, self.keys)}}
        if self.references is not None:
            out["references"] = dict(zip(self.tasks, self.references))
        if self.floors is not None:
            out["floors"] = dict(zip(self.tasks, self.floors))
        return out
