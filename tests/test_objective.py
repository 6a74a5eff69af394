"""Objectives: per-task metrics into the one score a search optimizes (hand-worked values,
properties of the aggregates, their directions, floors, and bad settings named)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.objective import OBJECTIVES, Objective, ObjectiveError, Scoring, task_values

ACC = {"a": 0.9, "b": 0.5, "c": 0.1}


def test_hand_worked_accuracies():
    """The module docstring's example, worked by hand."""
    assert Objective("mean").aggregate(ACC, "maximize") == pytest.approx(0.5)
    assert Objective("worst").aggregate(ACC, "maximize") == 0.1
    assert Objective("quantile", alpha=0.5).aggregate(ACC, "maximize") == pytest.approx(0.3)  # the worst two
    assert Objective("quantile", alpha=0.2).aggregate(ACC, "maximize") == 0.1  # at least one task
    assert Objective("weighted", weights={"a": 2}).aggregate(ACC, "maximize") == pytest.approx(2.4 / 4)
    # softmin at T = 0.1: -0.1 log((e^-9 + e^-5 + e^-1) / 3)
    want = -0.1 * math.log((math.exp(-9) + math.exp(-5) + math.exp(-1)) / 3)
    assert Objective("softmin", temperature=0.1).aggregate(ACC, "maximize") == pytest.approx(want)
    # a floor of 0.2 takes 10 x 0.1 off the score; 0.05 takes nothing
    assert Objective("mean", floor=0.2).score(ACC, "maximize") == pytest.approx(0.5 - 1.0)
    assert Objective("mean", floor=0.05).score(ACC, "maximize") == pytest.approx(0.5)
    assert Objective("worst", floor=0.2, penalty=2).shortfall(ACC, "maximize") == {"c": pytest.approx(0.1)}


def test_a_metric_to_minimize_has_its_worst_task_highest_and_a_floor_as_a_ceiling():
    """Perplexities: the worst task is the highest, the score (higher is better) is the
    negated aggregate, and the floor caps every task."""
    ppl = {"a": 2.0, "b": 8.0}
    assert Objective("worst").aggregate(ppl, "minimize") == 8.0
    assert Objective("worst").score(ppl, "minimize") == -8.0
    assert Objective("mean").score(ppl, "minimize") == -5.0
    assert Objective("quantile", alpha=0.5).aggregate(ppl, "minimize") == 8.0
    assert Objective("worst", floor=4.0).score(ppl, "minimize") == pytest.approx(-8.0 - 10 * 4.0)
    assert Objective("mean", floor=9.0).score(ppl, "minimize") == -5.0
    sm = Objective("softmin", temperature=0.5).aggregate(ppl, "minimize")
    assert 5.0 < sm < 8.0


values = st.dictionaries(st.sampled_from("abcdefg"), st.floats(0, 1, allow_nan=False), min_size=1)


@settings(max_examples=200, deadline=None)
@given(values, st.sampled_from(["maximize", "minimize"]), st.floats(0.001, 10), st.floats(0.01, 1))
def test_the_aggregates_lie_between_the_worst_task_and_the_mean(v, direction, temperature, alpha):
    s = 1 if direction == "maximize" else -1
    worst = Objective("worst").score(v, direction)
    mean = Objective("mean").score(v, direction)
    assert worst <= mean + 1e-12
    for o in (Objective("softmin", temperature=temperature), Objective("quantile", alpha=alpha)):
        got = o.score(v, direction)
        assert worst - 1e-9 <= got <= mean + 1e-9, o
        assert got == pytest.approx(s * o.aggregate(v, direction))
    # the limits: softmin at a tiny temperature is the worst task, at a huge one the mean;
    # quantile at alpha = 1 and equal weights are the mean
    assert Objective("softmin", temperature=1e-6).score(v, direction) == pytest.approx(worst, abs=1e-4)
    assert Objective("softmin", temperature=1e6).score(v, direction) == pytest.approx(mean, abs=1e-4)
    assert Objective("quantile", alpha=1.0).score(v, direction) == pytest.approx(mean)
    assert Objective("weighted", weights={t: 3.0 for t in v}).score(v, direction) == pytest.approx(mean)
    # the order of the tasks does not matter
    refs = {t: 1.0 for t in v}
    for name in OBJECTIVES:
        if name == "normalized" and direction == "minimize" and 0.0 in v.values():
            continue  # the reference over a value of 0 (tested below)
        o = Objective(name)
        assert o.score(dict(reversed(list(v.items()))), direction, refs) == pytest.approx(o.score(v, direction, refs))


@settings(max_examples=100, deadline=None)
@given(values, st.floats(0, 1), st.floats(0.1, 100))
def test_a_candidate_above_the_floor_pays_nothing_and_one_below_pays_per_unit(v, floor, penalty):
    o = Objective("mean", floor=floor, penalty=penalty)
    short = sum(max(0.0, floor - x) for x in v.values())
    assert o.score(v, "maximize") == pytest.approx(Objective("mean").score(v, "maximize") - penalty * short)


@pytest.mark.parametrize("kw, key", [
    ({"name": "median"}, "objective.name"),
    ({"name": "softmin", "temperature": 0}, "objective.temperature"),
    ({"name": "quantile", "alpha": 1.5}, "objective.alpha"),
    ({"name": "weighted", "weights": {"a": -1}}, "objective.weights.a"),
    ({"floor": float("nan")}, "objective.floor"),
    ({"penalty": 0}, "objective.penalty"),
])
def test_bad_settings_are_named(kw, key):
    with pytest.raises(ObjectiveError, match=key.replace(".", r"\.")):
        Objective(**kw)


class _Ev:
    direction = "maximize"
    tasks = ["a", "b"]

    @staticmethod
    def primary(task):
        return "acc"


def test_scoring_reads_each_tasks_metric_and_names_what_is_missing():
    sc = Scoring.of(Objective("worst"), _Ev())
    m = {"a/acc": 0.25, "b/acc": 0.75, "score": 0.5, "a/other": 9.0}
    assert sc(m) == 0.25
    assert sc.summary(m) == {"objective": 0.25, "mean": 0.5, "worst_task": "a", "worst": 0.25, "below_floor": []}
    with pytest.raises(ObjectiveError, match=r"'b/acc'.*task 'b'"):
        sc({"a/acc": 0.1})
    with pytest.raises(ObjectiveError, match=r"objective.weights: 'z' is not a task"):
        Scoring.of(Objective("weighted", weights={"z": 2}), _Ev())
    assert task_values(m, ["b"], lambda t: "acc") == {"b": 0.75}


def test_normalized_values_and_a_floor_at_the_base_use_the_sources_scores():
    """Normalized accuracy: each task over the best source's score on it (its own expert);
    a floor at the base: each task at least the base's score. Hand-worked."""
    ev = _Ev()
    sources = {"base": {"a/acc": 0.2, "b/acc": 0.1}, "ex_a": {"a/acc": 0.8, "b/acc": 0.0},
               "ex_b": {"a/acc": 0.1, "b/acc": 0.5}}
    sc = Scoring.of(Objective("normalized"), ev)
    assert sc.needs_sources
    with pytest.raises(ObjectiveError, match="references"):
        sc({"a/acc": 0.4, "b/acc": 0.25})
    sc = sc.with_sources(sources, "base")
    assert not sc.needs_sources and sc.references == (0.8, 0.5)
    m = {"a/acc": 0.4, "b/acc": 0.25}
    assert sc(m) == pytest.approx((0.5 + 0.5) / 2)
    assert sc.summary(m)["normalized_mean"] == pytest.approx(0.5)
    worst = Scoring.of(Objective("worst", normalize=True), ev).with_sources(sources, "base")
    assert worst({"a/acc": 0.4, "b/acc": 0.5}) == pytest.approx(0.5)  # a: 0.4 / 0.8, b: 0.5 / 0.5
    floor = Scoring.of(Objective("mean", floor="base"), ev).with_sources(sources, "base")
    assert floor.floors == (0.2, 0.1)
    assert floor({"a/acc": 0.15, "b/acc": 0.3}) == pytest.approx(0.225 - 10 * 0.05)
    assert floor.summary({"a/acc": 0.15, "b/acc": 0.3})["below_floor"] == ["a"]
    # perplexity: the reference (the lowest) over the value
    ppl = Objective("normalized")
    assert ppl.score({"a": 4.0}, "minimize", references={"a": 2.0}) == pytest.approx(0.5)
    with pytest.raises(ObjectiveError, match="no base model"):
        Scoring.of(Objective("mean", floor="base"), ev).with_sources(sources, None)
    with pytest.raises(ObjectiveError, match="objective.floor"):
        Objective(floor="top")
    with pytest.raises(ObjectiveError, match="task 'a': cannot normalize, its value is 0"):
        ppl.score({"a": 0.0}, "minimize", references={"a": 2.0})
    with pytest.raises(ObjectiveError, match="every source scores 0"):
        ppl.score({"a": 0.5}, "maximize", references={"a": 0.0})


def test_what_cannot_be_normalized_or_ranked_is_named():
    """A task no source scores on cannot be normalized (named when the references are
    made); under a floor at the base the references are only reported, and a row whose
    reference is 0 is summarized without a normalized mean; a NaN task value is refused (it
    would order arbitrarily); the floor's penalty of a normalized objective is charged over
    each task's reference."""
    ev = _Ev()
    sources = {"base": {"a/acc": 0.0, "b/acc": 0.1}, "ex": {"a/acc": 0.0, "b/acc": 0.5}}
    with pytest.raises(ObjectiveError, match="no source scores above 0 on task 'a'"):
        Scoring.of(Objective("normalized"), ev).with_sources(sources, "base")
    floor = Scoring.of(Objective("mean", floor="base"), ev).with_sources(sources, "base")
    s = floor.summary({"a/acc": 0.2, "b/acc": 0.05})
    assert "normalized_mean" not in s and s["below_floor"] == ["b"]
    with pytest.raises(ObjectiveError, match=r"task 'b'.*not a finite number"):
        Scoring.of(Objective("worst"), ev)({"a/acc": 0.5, "b/acc": float("nan")})
    o = Objective("normalized", floor=0.5, penalty=10.0)
    refs = {"a": 0.9, "b": 0.05}
    got = o.score({"a": 0.49, "b": 0.05}, "maximize", references=refs)
    assert got == pytest.approx((0.49 / 0.9 + 1.0) / 2 - 10 * (0.01 / 0.9 + 0.45 / 0.05))
