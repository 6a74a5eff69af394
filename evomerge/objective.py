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
=============== =======================================================================

A ``floor`` (any objective) is a constraint: every task at least ``floor`` (at most, for a
metric to minimize); a candidate below it is scored ``aggregate - penalty * shortfall``, the
shortfall summed over tasks, so a search first climbs back above the floor and the
constrained optimum is unchanged wherever the floor can be met.

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

OBJECTIVES = ("mean", "weighted", "worst", "softmin", "quantile")


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
        out[t] = float(v)
    return out


@dataclass(frozen=True)
class Objective:
    """Args:
        name: one of ``OBJECTIVES``.
        weights: ``weighted``: task -> weight (> 0; tasks not named weigh 1).
        temperature: ``softmin``: in the metric's units (> 0).
        alpha: ``quantile``: the fraction of the tasks averaged, the worst first (0 < alpha <= 1).
        floor: every task at least this value (at most, when the metric is minimized); None: no floor.
        penalty: the score taken off per unit of a task's shortfall below the floor (> 0).
    """

    name: str = "mean"
    weights: Mapping[str, float] = field(default_factory=dict)
    temperature: float = 0.05
    alpha: float = 0.25
    floor: float | None = None
    penalty: float = 10.0

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
        if self.floor is not None and not _finite(self.floor):
            raise ObjectiveError(f"objective.floor: must be a number or null, got {self.floor!r}")
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

    def shortfall(self, values: Mapping[str, float], direction: Direction) -> dict[str, float]:
        """Per task below the floor (above it, for a metric to minimize), by how much."""
        if self.floor is None:
            return {}
        s = 1.0 if direction == "maximize" else -1.0
        return {t: s * (self.floor - x) for t, x in values.items() if s * (self.floor - x) > 0}

    def score(self, values: Mapping[str, float], direction: Direction) -> float:
        """The score the search optimizes, higher is better: the aggregate (negated for a
        metric to minimize) less the floor's penalty."""
        s = 1.0 if direction == "maximize" else -1.0
        return s * self.aggregate(values, direction) - self.penalty * sum(self.shortfall(values, direction).values())

    def describe(self) -> dict[str, Any]:
        """Its settings, as plain data (summary.json)."""
        out: dict[str, Any] = {"name": self.name}
        if self.name == "weighted":
            out["weights"] = dict(self.weights)
        if self.name == "softmin":
            out["temperature"] = self.temperature
        if self.name == "quantile":
            out["alpha"] = self.alpha
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

    @classmethod
    def of(cls, objective: Objective, evaluator) -> "Scoring":
        tasks = tuple(evaluator.tasks)
        objective.check_tasks(tasks)
        return cls(objective, tasks, tuple(evaluator.primary(t) for t in tasks), evaluator.direction)

    def values(self, metrics: Mapping[str, float]) -> dict[str, float]:
        keys = dict(zip(self.tasks, self.keys))
        return task_values(metrics, self.tasks, keys.__getitem__)

    def __call__(self, metrics: Mapping[str, float]) -> float:
        """The score a strategy is told (higher is better)."""
        return self.objective.score(self.values(metrics), self.direction)

    def summary(self, metrics: Mapping[str, float]) -> dict[str, Any]:
        """What a report shows of one evaluation: the objective (in the metric's units), the
        mean, the worst task and its value, the tasks below the floor."""
        v = self.values(metrics)
        s = 1.0 if self.direction == "maximize" else -1.0
        worst = min(v, key=lambda t: s * v[t])
        return {"objective": self.objective.aggregate(v, self.direction),
                "mean": sum(v.values()) / len(v), "worst_task": worst, "worst": v[worst],
                "below_floor": sorted(self.objective.shortfall(v, self.direction))}

    def describe(self) -> dict[str, Any]:
        return {**self.objective.describe(), "direction": self.direction,
                "tasks": {t: k for t, k in zip(self.tasks, self.keys)}}
