"""Strategies (one conformance suite), the trial log, the loop and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from evomerge.search import (
    CMAES, GreedySoup, GridSearch, OptunaSearch, RandomSearch, Result, SteadyStateEvolution, run_search,
)
from evomerge.types import Candidate
from evomerge.space import Space
from evomerge.trials import TrialLog

TARGET = np.array([0.9, 0.6, 0.8, 0.5, 0.7, 0.7])


def synthetic_space() -> Space:
    # a global space over explicit genes: 6 per-model weights of task arithmetic
    return Space("task_arithmetic", [f"m{i}" for i in range(6)], base_model="base",
                 search={"weight": {"lo": 0.0, "hi": 1.0, "x0": 0.5}}, granularity="per_model")


def objective(x) -> float:
    return -float(np.sum((np.asarray(x) - TARGET) ** 2))


class FunctionExecutor:
    """Scores genomes with a plain function; genomes in ``fail_if`` fail."""

    def __init__(self, fn=objective, fail_if=None):
        self.fn, self.fail_if, self.calls = fn, fail_if, []

    def map(self, cands):
        for c in cands:
            self.calls.append((c.kind, c.id, c.split))
            if c.source is not None:
                yield Result(c.id, [], "ok", 0.0, {"score": 0.0}, split=c.split, kind=c.kind)
            elif self.fail_if is not None and self.fail_if(c.x):
                yield Result(c.id, list(c.x), "failed", None, split=c.split, error="boom", kind=c.kind,
                             generation=c.generation)
            else:
                s = self.fn(c.x)
                yield Result(c.id, list(c.x), "ok", s, {"score": s}, split=c.split, kind=c.kind,
                             generation=c.generation)


class Dies:
    """An executor that stops the search (as Ctrl-C would) once ``inner`` has been asked for
    more than ``after`` evaluations."""

    def __init__(self, inner, after: int):
        self.inner, self.after = inner, after

    def map(self, cands):
        for r in self.inner.map(cands):
            if len(self.inner.calls) > self.after:
                raise KeyboardInterrupt
            yield r


STRATEGIES = {
    "cmaes": lambda sp, seed: CMAES(sp, seed=seed),
    "cmaes_restarts": lambda sp, seed: CMAES(sp, seed=seed, max_generations=2, restarts=2),
    "optuna_tpe": lambda sp, seed: OptunaSearch(sp, "tpe", seed=seed),
    "optuna_cmaes": lambda sp, seed: OptunaSearch(sp, "cmaes", seed=seed),
    "optuna_random": lambda sp, seed: OptunaSearch(sp, "random", seed=seed),
    "optuna_nsga2": lambda sp, seed: OptunaSearch(sp, "nsga2", seed=seed, objectives=["score"]),
    "optuna_gp": lambda sp, seed: OptunaSearch(sp, "gp", seed=seed),
    "random": lambda sp, seed: RandomSearch(sp, seed=seed),
    "grid": lambda sp, seed: GridSearch(sp, points=5),
    "steady": lambda sp, seed: SteadyStateEvolution(sp, seed=seed),
}


def drive(strategy, space, rounds: int, fail_if=None):
    scores = []
    for _ in range(rounds):
        if strategy.done():
            break
        xs = strategy.ask()
        s = [None if fail_if is not None and fail_if(x) else objective(x) for x in xs]
        strategy.tell(xs, s)
        scores += s
    return scores


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_conformance(name):
    sp = synthetic_space()
    st = STRATEGIES[name](sp, 0)
    xs = st.ask()
    for x in xs:
        assert x.shape == (len(sp),) and np.all(x >= sp.lower) and np.all(x <= sp.upper)
    st.tell(xs, [objective(x) for x in xs])
    drive(st, sp, 15)
    bx, bs = st.best()
    assert np.all(bx >= sp.lower) and np.all(bx <= sp.upper)
    assert bs > objective(sp.x0)  # improves over the starting point
    assert bs == pytest.approx(objective(bx))


@pytest.mark.parametrize("name", ["cmaes", "random", "optuna_tpe", "optuna_cmaes", "steady"])
def test_reproducible_with_a_seed(name):
    sp = synthetic_space()
    a, b, c = STRATEGIES[name](sp, 3), STRATEGIES[name](sp, 3), STRATEGIES[name](sp, 4)
    sa, sb, sc = drive(a, sp, 5), drive(b, sp, 5), drive(c, sp, 5)
    assert sa == sb and sa != sc


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_state_dict_round_trip_continues_exactly(name):
    sp = synthetic_space()
    a = STRATEGIES[name](sp, 1)
    drive(a, sp, 3)
    # the state is plain data: it survives JSON exactly, and nothing in it is pickled
    text = json.dumps(a.state_dict(), allow_nan=True)
    b = STRATEGIES[name](sp, 1)
    b.load_state_dict(json.loads(text))
    np.random.seed(123)  # global NumPy state must not matter
    xa = a.ask()
    np.random.seed(7)
    xb = b.ask()
    assert [x.tolist() for x in xa] == [x.tolist() for x in xb]
    # the state, not the settings, decides: the same settings without it start over
    assert [x.tolist() for x in STRATEGIES[name](sp, 1).ask()] != [x.tolist() for x in xa]
    a.tell(xa, [objective(x) for x in xa])
    b.tell(xb, [objective(x) for x in xb])
    assert a.best()[1] == b.best()[1]
    assert [x.tolist() for x in a.ask()] == [x.tolist() for x in b.ask()]


@pytest.mark.parametrize("name", ["cmaes", "optuna_tpe", "optuna_nsga2", "steady"])
def test_a_state_of_another_seed_is_refused(name):
    sp = synthetic_space()
    a = STRATEGIES[name](sp, 1)
    drive(a, sp, 2)
    with pytest.raises(ValueError, match="seed"):
        STRATEGIES[name](sp, 2).load_state_dict(json.loads(json.dumps(a.state_dict())))


def test_cmaes_state_that_does_not_replay_is_refused():
    sp = synthetic_space()
    a = CMAES(sp, seed=1)
    drive(a, sp, 3)
    state = json.loads(json.dumps(a.state_dict()))
    state["history"][1]["u"][0][0] += 0.25  # not what this seed asks in generation 1
    with pytest.raises(ValueError, match="generation 1"):
        CMAES(sp, seed=1).load_state_dict(state)


def test_pickled_strategy_state_is_never_read(tmp_path):
    """A run directory from elsewhere may hold a crafted pickle: resume refuses it, unread."""
    import evomerge.trials as trials

    run = tmp_path / "run"
    run.mkdir()
    (run / "trials.jsonl").write_text("")
    marker = tmp_path / "ran"
    payload = b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    (run / "strategy.pkl").write_bytes(payload)
    sp = synthetic_space()
    with pytest.raises(trials.StateError, match="pickled"):
        run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), run, budget=8, progress=False, resume=True,
                   sources=False)
    (run / "strategy.json").write_bytes(payload)  # the same bytes under the new name
    with pytest.raises(trials.StateError, match="not a JSON state"):
        run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), run, budget=8, progress=False, resume=True,
                   sources=False)
    assert not marker.exists()


def test_run_directory_state_is_json(tmp_path):
    sp = synthetic_space()
    run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), tmp_path / "run", budget=20, progress=False,
               sources=False)
    state = json.loads((tmp_path / "run" / "strategy.json").read_text())
    assert state["strategy"]["settings"]["seed"] == 0 and len(state["strategy"]["history"]) >= 2


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_failed_candidates_are_told_not_crashed(name):
    sp = synthetic_space()
    st = STRATEGIES[name](sp, 0)
    fail = lambda x: x[0] > 0.8  # noqa: E731
    drive(st, sp, 8, fail_if=fail)
    bx, bs = st.best()
    assert bx is not None and not fail(bx)


def test_cmaes_population_and_sigma_defaults():
    sp = synthetic_space()
    st = CMAES(sp)
    assert st.popsize == 4 + int(3 * np.log(len(sp)))
    assert st.es.sigma0 == pytest.approx(1 / 6)
    assert len(st.ask()) == st.popsize


def test_grid_covers_the_values_once():
    sp = synthetic_space()
    g = GridSearch(sp, values={"weight": [0.1, 0.5, 0.9]})
    xs = g.ask(10)
    assert [x[0] for x in xs] == [0.1, 0.5, 0.9] and all(np.all(x == x[0]) for x in xs)
    assert g.done() and g.ask() == []


def test_trial_log_survives_a_torn_line(tmp_path):
    log = TrialLog(tmp_path / "t.jsonl")
    log.append(Result(0, [0.1], "ok", 1.0))
    with open(tmp_path / "t.jsonl", "a") as f:
        f.write('{"id": 1, "x": [0.')
    again = TrialLog(tmp_path / "t.jsonl")
    assert [r.id for r in again] == [0]
    again.append(Result(2, [0.2], "ok", 2.0))
    assert [r.id for r in TrialLog(tmp_path / "t.jsonl")] == [0, 2]


def test_loop_logs_everything_once_and_writes_summary(tmp_path):
    sp = synthetic_space()
    ex = FunctionExecutor()
    out = run_search(sp, CMAES(sp, seed=0), ex, tmp_path / "run", budget=40, progress=False, sources=False)
    recs = TrialLog(tmp_path / "run" / "trials.jsonl").results()
    search = [r for r in recs if r.kind == "search"]
    assert len({r.id for r in search}) == len(search) >= 40
    assert out.best_score == max(r.score for r in search)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["results"]["best"]["search"]["score"] == pytest.approx(out.best_score)
    assert "test" in s["results"]["best"] and "start" in s["results"]
    assert (tmp_path / "run" / "best_recipe.yaml").is_file()
    with pytest.raises(FileExistsError):
        run_search(sp, CMAES(sp, seed=0), ex, tmp_path / "run", budget=40, progress=False)


def test_loop_records_failures(tmp_path):
    sp = synthetic_space()
    ex = FunctionExecutor(fail_if=lambda x: x[1] > 0.6)
    out = run_search(sp, RandomSearch(sp, seed=0), ex, tmp_path / "run", budget=32, progress=False, sources=False)
    recs = [r for r in TrialLog(tmp_path / "run" / "trials.jsonl") if r.kind == "search"]
    failed = [r for r in recs if r.status == "failed"]
    assert failed and all(r.error == "boom" and r.score is None for r in failed)
    assert out.summary["failed"] == len(failed)


def test_resume_after_interrupted_generation_reruns_nothing(tmp_path):
    sp = synthetic_space()
    full = run_search(sp, CMAES(sp, seed=5), FunctionExecutor(), tmp_path / "full", budget=50, progress=False,
                      sources=False)

    out = run_search(sp, CMAES(sp, seed=5), Dies(FunctionExecutor(), after=17), tmp_path / "cut", budget=50,
                     progress=False,
                     sources=False)
    assert out.stopped
    ex = FunctionExecutor()
    res = run_search(sp, CMAES(sp, seed=5), ex, tmp_path / "cut", budget=50, progress=False, resume=True,
                     sources=False)
    ran = [c for c in ex.calls if c[0] == "search"]
    assert min(i for _, i, _ in ran) == 17  # the first 17 were read back, not re-run
    assert res.best_score == full.best_score and np.array_equal(res.best_x, full.best_x)


RESUME_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import numpy as np
    sys.path.insert(0, {tests!r})
    from test_search import synthetic_space, FunctionExecutor, objective
    from evomerge.search import CMAES, run_search

    seed, pause, budget = (int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])) if len(sys.argv) > 2 \
        else (11, 0.01, 60)

    def slow(x):
        time.sleep(pause)
        return objective(x)

    sp = synthetic_space()
    run = Path(sys.argv[1])
    started = (run / "trials.jsonl").is_file() or (run / "strategy.json").is_file()
    out = run_search(sp, CMAES(sp, seed=seed), FunctionExecutor(slow), run, budget=budget, progress=False,
                     resume=started, sources=False)
    print(repr(out.best_score), list(out.best_x))
""")


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(tests=os.path.dirname(__file__)))
    rng = np.random.default_rng(0)

    def env():  # every process gets its own hash salt: nothing may depend on it
        return {**os.environ, "PYTHONHASHSEED": str(int(rng.integers(1, 2**31)))}

    ref = subprocess.run([sys.executable, str(script), str(tmp_path / "ref")], capture_output=True, text=True,
                         env=env(), check=True).stdout
    run = tmp_path / "killed"
    kills = 0
    for _ in range(6):
        p = subprocess.Popen([sys.executable, str(script), str(run)], stdout=subprocess.PIPE, text=True, env=env())
        time.sleep(float(rng.uniform(1.0, 2.2)))  # imports take about 1 s; the search about 1 s more
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.communicate()
    final = subprocess.run([sys.executable, str(script), str(run)], capture_output=True, text=True, env=env(),
                           check=True).stdout
    assert final == ref
    recs = [r for r in TrialLog(run / "trials.jsonl") if r.kind == "search"]
    ids = [r.id for r in recs]
    assert len(ids) == len(set(ids)) and set(ids) == set(range(max(ids) + 1))
    assert kills >= 1


# --------------------------------------------------------------------------------------
# On the zoo of tests: the whole path (resident engine, live model, evaluator, loop)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory):
    from evomerge.zoo import ZooConfig, build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "zoo", ZooConfig.test_mode(), progress=False,
                     log=lambda *_: None)


def test_per_layer_cmaes_on_the_zoo_reports_best_baselines_and_sources(small_zoo, tmp_path):
    from evomerge.evaluate import build_evaluator
    from evomerge.execute import LocalExecutor, Worker

    z = small_zoo
    sp = Space("task_arithmetic", [str(p) for p in z.experts.values()], base_model=str(z.base),
               search=["weight"], granularity="per_layer")
    ev = build_evaluator("choice", data_dir=z.root, tasks=z.tasks, limit=40)
    worker = Worker(sp, ev)
    out = run_search(sp, CMAES(sp, seed=0), LocalExecutor(worker), tmp_path / "run", budget=12, progress=False)
    s = out.summary
    names = {"best", "start", "base", *z.tasks}
    assert names <= set(s["results"])
    for name in names:
        for split in ("search", "test"):
            assert 0.0 <= s["results"][name][split]["score"] <= 1.0
    assert s["results"]["best"]["search"]["score"] == pytest.approx(out.best_score)
    assert s["results"]["best"]["search"]["score"] >= s["results"]["start"]["search"]["score"]
    # the sources were scored on their own weights: the same as scoring the checkpoints directly
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = z.tasks[0]
    m = AutoModelForCausalLM.from_pretrained(z.experts[task]).eval()
    direct = ev(m, AutoTokenizer.from_pretrained(z.experts[task]), split="test")
    assert s["results"][task]["test"] == direct
    # and the best genome's exported recipe reproduces its search score
    from evomerge.merge.engine import Merger
    from evomerge.recipe import load_recipe

    model = worker.model
    Merger(load_recipe(tmp_path / "run" / "best_recipe.yaml")).materialize(into=model)
    assert ev(model, worker.tokenizer, split="search")["score"] == pytest.approx(out.best_score)


def test_worker_turns_errors_into_failed_results(small_zoo):
    from evomerge.execute import Worker

    z = small_zoo
    sp = Space("task_arithmetic", [str(p) for p in z.experts.values()], base_model=str(z.base),
               search=["weight"], granularity="global")

    def broken(model, tok, split="search"):
        raise RuntimeError("evaluator exploded")

    w = Worker(sp, broken)
    r = w.evaluate(Candidate(0, list(sp.x0)))
    assert r.status == "failed" and "evaluator exploded" in r.error and r.score is None
    r = w.evaluate(Candidate(1, [0.5, 0.5]))  # wrong genome length
    assert r.status == "failed" and "genome" in r.error


# --------------------------------------------------------------------------------------
# Optuna storage, NSGA-II, GP; greedy soup
# --------------------------------------------------------------------------------------


def test_optuna_sqlite_storage_resumes_from_the_run_directory(tmp_path):
    sp = synthetic_space()
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    full = run_search(sp, OptunaSearch(sp, "tpe", seed=2, storage=f"sqlite:///{tmp_path / 'full.db'}"),
                      FunctionExecutor(), tmp_path / "full", budget=24, progress=False, sources=False)

    assert run_search(sp, OptunaSearch(sp, "tpe", seed=2, storage=url), Dies(FunctionExecutor(), 10), tmp_path / "cut",
                      budget=24,
                      progress=False, sources=False).stopped
    res = run_search(sp, OptunaSearch(sp, "tpe", seed=2, storage=url), FunctionExecutor(), tmp_path / "cut",
                     budget=24, progress=False, sources=False, resume=True)
    assert res.best_score == full.best_score
    import optuna

    study = optuna.load_study(storage=url, study_name="evomerge")
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 24


def test_a_crafted_cma_es_optimizer_in_the_study_file_is_refused_unread(tmp_path):
    """Optuna's CMA-ES sampler pickles its optimizer into the study (the run directory's
    optuna.db) and read it back with pickle.loads: a study file from elsewhere ran code on
    resume. Only a CMA-ES optimizer's own classes are built now; anything else is refused,
    naming the storage, and the payload never runs. A genuine study resumes exactly."""
    import pickle
    import sqlite3

    sp = synthetic_space()
    db = tmp_path / "optuna.db"
    url = f"sqlite:///{db}"
    full = run_search(sp, OptunaSearch(sp, "cmaes", seed=2, storage=f"sqlite:///{tmp_path / 'full.db'}"),
                      FunctionExecutor(), tmp_path / "full", budget=40, progress=False, sources=False)
    assert run_search(sp, OptunaSearch(sp, "cmaes", seed=2, storage=url), Dies(FunctionExecutor(), 30),
                      tmp_path / "cut", budget=40, progress=False, sources=False).stopped
    con = sqlite3.connect(db)
    keys = con.execute("select trial_id, key from trial_system_attributes where key like 'cma:optimizer:%'").fetchall()
    assert keys  # the sampler keeps its optimizer in the study
    saved = con.execute("select trial_id, key, value_json from trial_system_attributes").fetchall()
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = json.dumps(pickle.dumps(Payload()).hex())
    con.execute("update trial_system_attributes set value_json = ? where key like 'cma:optimizer:%'", (evil,))
    con.execute("delete from trial_system_attributes where key like 'cma:optimizer:%' and key != 'cma:optimizer:0'")
    con.commit()
    from evomerge.trials import StateError

    with pytest.raises(StateError, match="optuna storage: .*posix.system.*refused unread"):
        run_search(sp, OptunaSearch(sp, "cmaes", seed=2, storage=url), FunctionExecutor(), tmp_path / "cut",
                   budget=40, progress=False, sources=False, resume=True)
    assert not marker.exists()
    # built from allowed classes, but not an optimizer the sampler makes: named, not a traceback or a hang
    import cmaes

    stuck = cmaes.CMA(mean=np.zeros(len(sp)), sigma=0.3)
    stuck._n_max_resampling = 10**9
    for thing, says in ((np.zeros(3), "not a CMA-ES optimizer"), (stuck, "malformed")):
        con.execute("update trial_system_attributes set value_json = ? where key = 'cma:optimizer:0'",
                    (json.dumps(pickle.dumps(thing).hex()),))
        con.commit()
        with pytest.raises(StateError, match=says):
            run_search(sp, OptunaSearch(sp, "cmaes", seed=2, storage=url), FunctionExecutor(), tmp_path / "cut",
                       budget=40, progress=False, sources=False, resume=True)
    # the genuine study resumes, exactly
    con.execute("delete from trial_system_attributes")
    con.executemany("insert into trial_system_attributes (trial_id, key, value_json) values (?, ?, ?)", saved)
    con.commit()
    con.close()
    res = run_search(sp, OptunaSearch(sp, "cmaes", seed=2, storage=url), FunctionExecutor(), tmp_path / "cut",
                     budget=40, progress=False, sources=False, resume=True)
    assert res.best_score == full.best_score and not marker.exists()


def test_optuna_nsga2_keeps_a_pareto_front_over_tasks(tmp_path):
    sp = synthetic_space()

    def two_tasks(x):
        x = np.asarray(x)
        return {"a/acc": float(1 - (x[0] - 1) ** 2), "b/acc": float(1 - x[0] ** 2)}

    class Multi(FunctionExecutor):
        def map(self, cands):
            for c in cands:
                m = two_tasks(c.x)
                m["score"] = (m["a/acc"] + m["b/acc"]) / 2
                yield Result(c.id, list(c.x), "ok", m["score"], m, split=c.split, kind=c.kind)

    st = OptunaSearch(sp, "nsga2", seed=0, objectives=["a/acc", "b/acc"], batch=8)
    run_search(sp, st, Multi(), tmp_path / "run", budget=40, progress=False, sources=False, baselines={})
    front = st.pareto_front()
    assert len(front) >= 3
    xs = sorted(f["x"][0] for f in front)
    assert xs[0] < 0.5 < xs[-1]  # the front trades task a against task b
    with pytest.raises(ValueError, match="objectives"):
        OptunaSearch(sp, "nsga2")
    # an objective the evaluator does not report is an error, never replaced by the mean score
    st = OptunaSearch(sp, "nsga2", seed=0, objectives=["a/acc", "c/acc"], batch=2)
    xs = st.ask()
    with pytest.raises(ValueError, match=r"\['c/acc'\].*a/acc, b/acc"):
        st.tell(xs, [0.5, 0.5], metrics=[{**two_tasks(x), "score": 0.5} for x in xs])


def test_optuna_nsga2_resumes_exactly_from_its_storage(tmp_path):
    """The app's NSGA-II search over two tasks (SQLite storage in the run directory) killed
    midway and resumed ends with the same trials and Pareto front as one that never stopped."""
    sp = synthetic_space()

    def make(db):
        return OptunaSearch(sp, "nsga2", seed=4, objectives=["a/acc", "b/acc"], batch=6, storage=f"sqlite:///{db}")

    class TwoTasks(FunctionExecutor):
        def map(self, cands):
            for c in cands:
                self.calls.append((c.kind, c.id, c.split))
                x = np.asarray(c.x)
                m = {"a/acc": float(1 - (x[0] - 1) ** 2), "b/acc": float(1 - x[0] ** 2) - 0.1 * float(x[1])}
                m["score"] = (m["a/acc"] + m["b/acc"]) / 2
                yield Result(c.id, list(c.x), "ok", m["score"], m, split=c.split, kind=c.kind, generation=c.generation)

    full_st = make(tmp_path / "full.db")
    full = run_search(sp, full_st, TwoTasks(), tmp_path / "full", budget=30, progress=False, sources=False,
                      baselines={})
    assert run_search(sp, make(tmp_path / "cut.db"), Dies(TwoTasks(), 14), tmp_path / "cut", budget=30,
                      progress=False,
                      sources=False, baselines={}).stopped
    cut_st = make(tmp_path / "cut.db")
    res = run_search(sp, cut_st, TwoTasks(), tmp_path / "cut", budget=30, progress=False, sources=False,
                     resume=True, baselines={})
    xs = lambda run: [r.x for r in TrialLog(run / "trials.jsonl") if r.kind == "search"]  # noqa: E731
    assert sorted(map(tuple, xs(tmp_path / "cut"))) == sorted(map(tuple, xs(tmp_path / "full")))
    assert res.best_score == full.best_score
    front = lambda st: sorted(tuple(f["values"]) for f in st.pareto_front())  # noqa: E731
    assert front(cut_st) == front(full_st) and len(front(full_st)) >= 2


def test_optuna_storage_survives_a_crash_on_either_side_of_the_checkpoint(tmp_path):
    """Killed after asking but before the checkpoint (trials left running in the storage), or
    after telling but before it (trials told twice on resume): the next batches are the same."""
    sp = synthetic_space()

    def make(db):
        return OptunaSearch(sp, "tpe", seed=6, batch=4, storage=f"sqlite:///{tmp_path / db}")

    ref = make("ref.db")
    drive(ref, sp, 3)
    want = [x.tolist() for x in ref.ask()]

    a = make("ask.db")
    drive(a, sp, 3)
    saved = json.loads(json.dumps(a.state_dict()))
    a.ask()  # ... and the process dies before the checkpoint
    b = make("ask.db")
    b.load_state_dict(saved)
    assert [x.tolist() for x in b.ask()] == want

    c = make("tell.db")
    drive(c, sp, 2)
    xs = c.ask()
    saved = json.loads(json.dumps(c.state_dict()))  # the checkpoint with the batch in flight
    c.tell(xs, [objective(x) for x in xs])  # ... told, and the process dies before the next checkpoint
    d = make("tell.db")
    d.load_state_dict(saved)
    d.tell(xs, [objective(x) for x in xs])  # the resumed loop tells the batch again
    assert [x.tolist() for x in d.ask()] == want


def test_optuna_objectives_follow_the_evaluators_direction():
    """Perplexity is minimised: NSGA-II over per-task perplexities keeps the low ones."""
    sp = synthetic_space()
    st = OptunaSearch(sp, "nsga2", seed=0, objectives=["a/ppl"], objective_direction="minimize", batch=8)
    for _ in range(6):
        xs = st.ask()
        ppl = [1.0 + float(x[0]) for x in xs]
        st.tell(xs, [-p for p in ppl], metrics=[{"a/ppl": p} for p in ppl])
    best = min(t.values[0] for t in st.study.trials if t.values)
    assert [f["values"][0] for f in st.pareto_front()] == [best]


def test_optuna_gp_improves_over_the_start():
    sp = synthetic_space()
    st = OptunaSearch(sp, "gp", seed=0)
    drive(st, sp, 5)
    assert st.best()[1] > objective(sp.x0)


def soup_space():
    return Space("linear", [f"m{i}" for i in range(5)], search=["weight"], granularity="per_model")


def test_greedy_soup_follows_the_recipe():
    sp = soup_space()
    single = [0.50, 0.70, 0.60, 0.65, 0.10]

    def score(x):  # a soup is better the more good ingredients it averages, ruined by m4
        members = [i for i, v in enumerate(x) if v > 0.5]
        if 4 in members:
            return 0.0
        return float(np.mean([single[i] for i in members]) + 0.05 * (len(members) - 1))

    st = GreedySoup(sp)
    calls = []
    while not st.done():
        xs = st.ask()
        calls.append([sorted(i for i, v in enumerate(x) if v > 0.5) for x in xs])
        st.tell(xs, [score(x) for x in xs])
    assert calls[0] == [[0], [1], [2], [3], [4]]  # every ingredient alone, first
    assert calls[1:] == [[[1, 3]], [[1, 2, 3]], [[0, 1, 2, 3]], [[0, 1, 2, 3, 4]]]  # best first, then in order
    bx, bs = st.best()
    assert sorted(i for i, v in enumerate(bx) if v > 0.5) == [0, 1, 2, 3]
    assert bs >= max(single)
    with pytest.raises(ValueError, match="linear"):
        GreedySoup(synthetic_space())


ZOO_STRATEGIES = {
    "cmaes": lambda sp: CMAES(sp, seed=0, popsize=5),
    "optuna_tpe": lambda sp: OptunaSearch(sp, "tpe", seed=0),
    "random": lambda sp: RandomSearch(sp, seed=0, batch=5),
    "grid": lambda sp: GridSearch(sp, points=4, batch=4),
    "steady": lambda sp: SteadyStateEvolution(sp, seed=0, population=4, batch=5),
}


@pytest.mark.parametrize("name", ["cmaes", "optuna_tpe", "random", "grid", "greedy_soup", "steady"])
def test_every_strategy_runs_on_the_zoo(small_zoo, tmp_path, name):
    from evomerge.evaluate import build_evaluator
    from evomerge.execute import LocalExecutor, Worker

    z = small_zoo
    if name == "greedy_soup":
        sp = Space("linear", [str(p) for p in z.experts.values()], search=["weight"], granularity="per_model")
        strategy = GreedySoup(sp)
    else:
        sp = Space("task_arithmetic", [str(p) for p in z.experts.values()], base_model=str(z.base),
                   search=["weight"], granularity="per_layer", layer_granularity=2)
        strategy = ZOO_STRATEGIES[name](sp)
    ev = build_evaluator("choice", data_dir=z.root, tasks=z.tasks, limit=30)
    out = run_search(sp, strategy, LocalExecutor(Worker(sp, ev)), tmp_path / "run", budget=10, progress=False,
                     sources=False)
    recs = [r for r in TrialLog(tmp_path / "run" / "trials.jsonl") if r.kind == "search"]
    assert recs and all(r.status == "ok" for r in recs)
    for r in recs:
        assert np.all(np.asarray(r.x) >= sp.lower) and np.all(np.asarray(r.x) <= sp.upper)
    if name != "greedy_soup":  # the best told genome (greedy soup reports its soup instead)
        assert out.best_score == max(r.score for r in recs)
    assert out.best_score in {r.score for r in recs}
    s = out.summary["results"]["best"]
    assert s["search"]["score"] == pytest.approx(out.best_score)
    if name == "greedy_soup":  # never worse than the best single ingredient
        singles = [r.score for r in recs if sum(v > 0.5 for v in r.x) == 1]
        assert out.best_score >= max(singles)


# --------------------------------------------------------------------------------------
# The run directory: its record, its lock, and resumes that cannot be right
# --------------------------------------------------------------------------------------


def _started(tmp_path, record=None, budget=16):
    sp = synthetic_space()
    run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), tmp_path / "run", budget=budget, progress=False,
               sources=False, record=record)
    return sp, tmp_path / "run"


def test_a_resume_with_another_configuration_is_refused_naming_the_keys(tmp_path):
    record = {"merge": {"method": "ties", "search": ["weight"]}, "seed": 0, "eval": {"name": "accuracy"}}
    sp, run = _started(tmp_path, record)
    log_before = (run / "trials.jsonl").read_bytes()
    other = {"merge": {"method": "dare_ties", "search": ["weight"]}, "seed": 0, "eval": {"name": "choice"}}
    from evomerge.trials import StateError

    with pytest.raises(StateError, match=r"eval.name: 'accuracy' -> 'choice'; merge.method: 'ties' -> 'dare_ties'"):
        run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), run, budget=24, progress=False, sources=False,
                   resume=True, record=other)
    assert (run / "trials.jsonl").read_bytes() == log_before  # nothing appended
    res = run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), run, budget=24, progress=False, sources=False,
                     resume=True, record=record)  # the same record (a larger budget is not part of it)
    assert res.evaluations >= 24


def test_nothing_to_resume_and_a_truncated_or_corrupted_log_are_refused(tmp_path):
    from evomerge.trials import StateError

    sp = synthetic_space()
    with pytest.raises(StateError, match="nothing to resume"):
        run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), tmp_path / "typo", budget=8, progress=False,
                   sources=False, resume=True)
    sp, run = _started(tmp_path, budget=24)
    lines = (run / "trials.jsonl").read_text().splitlines(keepends=True)
    (run / "trials.jsonl").write_text("".join(lines[:3] + ["{garbage\n"] + lines[3:]))
    with pytest.raises(StateError, match=r"trials.jsonl:4: not a trial record"):
        run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), run, budget=30, progress=False, sources=False,
                   resume=True)
    bad = json.loads(lines[2])
    bad["x"] = "0.5, 0.5"  # a record, but its genome is text
    (run / "trials.jsonl").write_text("".join(lines[:2] + [json.dumps(bad) + "\n"] + lines[3:]))
    with pytest.raises(StateError, match=r"trials.jsonl:3: not a trial record \(its id must be"):
        run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), run, budget=30, progress=False, sources=False,
                   resume=True)
    (run / "trials.jsonl").write_text("".join(lines[:5]))  # truncated: the state counts more
    with pytest.raises(StateError, match=r"lacks \d+ of the \d+ evaluations"):
        run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), run, budget=30, progress=False, sources=False,
                   resume=True)
    (run / "trials.jsonl").unlink()
    with pytest.raises(StateError, match="lacks"):
        run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), run, budget=30, progress=False, sources=False,
                   resume=True)


@pytest.mark.parametrize("name", ["random", "optuna_tpe", "optuna_nsga2", "cmaes"])
def test_a_budget_is_not_overrun_except_by_a_generation_in_flight(tmp_path, name):
    """Strategies that ask in batches stop at the budget (random and Optuna asked a whole
    batch of 8 for a budget of 3); CMA-ES finishes its generation, as the README says."""
    sp = synthetic_space()
    st = STRATEGIES[name](sp, 0)
    out = run_search(sp, st, FunctionExecutor(), tmp_path / "run", budget=11, progress=False, sources=False,
                     baselines={})
    if name == "cmaes":
        assert 11 <= out.evaluations < 11 + st.popsize
    else:
        assert out.evaluations == 11


def test_a_search_limited_by_time_alone(tmp_path):
    sp = synthetic_space()
    out = run_search(sp, RandomSearch(sp, seed=0), FunctionExecutor(), tmp_path / "run", budget=None,
                     max_seconds=0.5, progress=False, sources=False, baselines={})
    assert out.evaluations > 0
    with pytest.raises(ValueError, match="give a budget"):
        run_search(sp, RandomSearch(sp, seed=0), FunctionExecutor(), tmp_path / "other", budget=None,
                   progress=False, sources=False)


@pytest.mark.parametrize("edit", [
    lambda d: {},
    lambda d: {**d, "pending": 5},
    lambda d: {**d, "strategy": []},
    lambda d: {**d, "strategy": {**d["strategy"], "history": 5}},
    lambda d: {**d, "next_id": "many"},
    lambda d: {**d, "next_id": 1e300},  # was a list of 1e300 ids: out of memory
    lambda d: {**d, "next_id": 10**30},
], ids=["empty", "pending-a-number", "strategy-a-list", "history-a-number", "next-id-text", "next-id-1e300",
        "next-id-huge"])
def test_a_malformed_strategy_state_is_named_not_a_traceback(tmp_path, edit):
    from evomerge.trials import StateError

    sp, run = _started(tmp_path, budget=24)
    state = run / "strategy.json"
    state.write_text(json.dumps(edit(json.loads(state.read_text()))))
    log = (run / "trials.jsonl").read_text()
    with pytest.raises(StateError, match=r"strategy.json: not a state this search can resume from"):
        run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), run, budget=30, progress=False, sources=False,
                   resume=True)
    assert (run / "trials.jsonl").read_text() == log  # nothing appended


def test_a_state_file_that_is_not_json_data_is_named(tmp_path):
    from evomerge.trials import StateError

    sp, run = _started(tmp_path, budget=24)
    state = run / "strategy.json"
    good = json.loads(state.read_text())
    for text in ("[" * 100000 + "]" * 100000, '{"next_id": ' + "9" * 5000 + "}"):
        state.write_text(text)
        with pytest.raises(StateError, match=r"strategy.json: not a JSON state file"):
            run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), run, budget=30, progress=False, sources=False,
                       resume=True)
    state.write_text(json.dumps({**good, "next_id": 10**9}))  # a count the log cannot hold: counted, not listed
    t0 = time.time()
    with pytest.raises(StateError, match=r"lacks \d+ of the 1000000000 evaluations"):
        run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), run, budget=30, progress=False, sources=False,
                   resume=True)
    assert time.time() - t0 < 10


def test_a_second_process_on_the_same_run_directory_is_refused(tmp_path):
    from evomerge.trials import StateError

    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT.format(tests=os.path.dirname(__file__)))
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(script), str(run), "1", "0.05", "400"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        log = run / "trials.jsonl"
        while time.time() < deadline and not (log.is_file() and log.stat().st_size):
            time.sleep(0.1)
        assert first.poll() is None
        sp = synthetic_space()
        with pytest.raises(StateError, match=rf"in use by process {first.pid} on"):
            run_search(sp, CMAES(sp, seed=1), FunctionExecutor(), run, budget=400, progress=False, sources=False,
                       resume=True)
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    # the lock dies with its process: the run resumes
    sp = synthetic_space()
    out = run_search(sp, CMAES(sp, seed=1), FunctionExecutor(), run, budget=30, progress=False, sources=False,
                     resume=True)
    assert out.evaluations >= 30


def test_experts_that_all_score_the_same_are_flagged_as_an_evaluation_that_tells_nothing(tmp_path):
    """The default quickstart once scored every source and candidate 0 without a word (the
    workers stopped no answer where the evaluator reads it). Experts are fine-tunes for
    different tasks: when all of them get the very same metrics on a split, summary.json
    says the evaluation does not tell models apart; experts that differ raise nothing."""
    sp = synthetic_space()
    out = run_search(sp, RandomSearch(sp, seed=0), FunctionExecutor(), tmp_path / "same", budget=4,
                     progress=False)  # FunctionExecutor scores every source 0.0
    warnings = json.loads((tmp_path / "same" / "summary.json").read_text())["warnings"]
    assert out.summary["warnings"] == warnings and len(warnings) == 2
    assert all("every expert (m0, m1, m2, m3, m4, m5) got the same metrics" in w for w in warnings)

    class Differs(FunctionExecutor):
        def map(self, cands):
            for r in super().map(cands):
                if r.kind.startswith("source:"):
                    r.metrics = {"score": 0.25, f"{r.kind[7:]}/acc": 1.0}
                yield r

    out = run_search(sp, RandomSearch(sp, seed=0), Differs(), tmp_path / "differs", budget=4, progress=False)
    assert out.summary["warnings"] == []


class _Repeats:
    """A strategy that proposes the same genomes again (as a grid, or points clipped onto a
    bound, do): batches [a, b, a], then [b, c (outside the bounds: clipped onto b's)]."""

    name = "repeats"
    batch = 3

    def __init__(self, space):
        self.space, self.told, self.round = space, [], 0
        a, b = np.full(len(space), 0.25), np.full(len(space), 1.0)
        self.batches = [[a, b, a.copy()], [b.copy(), np.full(len(space), 7.0)]]

    def ask(self, n=None):
        out = self.batches[self.round] if self.round < len(self.batches) else []
        self.round += 1
        return out

    def tell(self, xs, scores):
        self.told.append(list(scores))

    def done(self):
        return self.round >= len(self.batches)

    def best(self):
        flat = [s for b in self.told for s in b if s is not None]
        return None, max(flat) if flat else None

    def state_dict(self):
        return {"round": self.round, "told": self.told}

    def load_state_dict(self, d):
        self.round, self.told = d["round"], d["told"]


def test_identical_genomes_are_scored_once_and_their_result_reused(tmp_path):
    """Genomes equal after clipping, in one batch or across batches, are evaluated once:
    the others get the same metrics and score, logged under their own ids with the id they
    reuse, and count as evaluations of the budget (a strategy repeating itself still ends)."""
    sp = synthetic_space()
    ex = FunctionExecutor()
    strat = _Repeats(sp)
    run_search(sp, strat, ex, tmp_path / "run", budget=10, progress=False, sources=False)
    assert [c[1] for c in ex.calls if c[0] == "search"] == [0, 1]  # a and b, nothing else
    recs = {r.id: r for r in TrialLog(tmp_path / "run" / "trials.jsonl") if r.kind == "search"}
    assert sorted(recs) == [0, 1, 2, 3, 4]
    assert (recs[2].reused, recs[3].reused, recs[4].reused) == (0, 1, 1)
    assert recs[2].score == recs[0].score and recs[3].metrics == recs[1].metrics == recs[4].metrics
    assert recs[2].x == recs[0].x and recs[4].x == [7.0] * len(sp)  # each keeps the genome it was asked for
    assert strat.told == [[recs[0].score, recs[1].score, recs[0].score], [recs[1].score, recs[1].score]]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["evaluations"] == 5 and s["reused"] == 3


class _TaskExecutor:
    """Two tasks whose accuracies are the first two genes."""

    def map(self, cands):
        for c in cands:
            m = {"a/acc": float(c.x[0]) if c.x else 0.0, "b/acc": float(c.x[1]) if c.x else 0.0}
            m["score"] = (m["a/acc"] + m["b/acc"]) / 2
            yield Result(c.id, list(c.x), "ok", m["score"], m, split=c.split, kind=c.kind, generation=c.generation)


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_a_floor_reaches_optunas_constrained_samplers_as_one_constraint_per_task(tmp_path, sampler):
    """With a floor, Optuna's samplers that model constraints are told one per task (how far
    the task is below the floor), which the sampler itself records for every trial; an
    in-memory study replayed from the saved state gets them again; a sampler without
    constraints refuses them."""
    from evomerge.objective import Objective, Scoring

    class Ev:
        direction, tasks = "maximize", ["a", "b"]

        @staticmethod
        def primary(task):
            return "acc"

    sp = synthetic_space()
    sc = Scoring.of(Objective("mean", floor=0.5), Ev())
    kw = {"objectives": ["a/acc", "b/acc"]} if sampler == "nsga2" else {}
    strat = OptunaSearch(sp, sampler, seed=0, constraints=True, batch=4, **kw)
    run_search(sp, strat, _TaskExecutor(), tmp_path / "run", budget=12, progress=False, sources=False, scoring=sc)
    done = [t for t in strat.study.get_trials() if t.state.name == "COMPLETE"]
    assert len(done) == 12
    for t in done:
        a, b = t.params["g0"], t.params["g1"]
        assert t.user_attrs["evomerge_constraints"] == pytest.approx([0.5 - a, 0.5 - b])
        assert list(t.system_attrs["constraints"]) == pytest.approx([0.5 - a, 0.5 - b])  # the sampler's own record
    again = OptunaSearch(sp, sampler, seed=0, constraints=True, batch=4, **kw)
    again.load_state_dict(json.loads(json.dumps(strat.state_dict())))
    replayed = [t for t in again.study.get_trials() if t.state.name == "COMPLETE"]
    assert [t.user_attrs["evomerge_constraints"] for t in replayed] == [t.user_attrs["evomerge_constraints"]
                                                                        for t in done]
    with pytest.raises(ValueError, match="takes no constraints"):
        OptunaSearch(sp, "random", constraints=True)
    with pytest.raises(ValueError, match="told without|tell them"):
        fresh = OptunaSearch(sp, sampler, seed=0, constraints=True, **kw)
        xs = fresh.ask(2)
        fresh.tell(xs, [0.1, 0.2], metrics=[{"a/acc": 0.1, "b/acc": 0.2}] * 2)


def test_cmaes_restarts_with_a_larger_population_within_the_budget(tmp_path):
    """IPOP: when a run stops (here: its max_generations), the next starts with the
    population doubled and a seed of its own, until the restarts are spent; the best is
    kept over all runs, and a search killed inside a restart resumes exactly."""
    sp = synthetic_space()
    st = CMAES(sp, seed=0, max_generations=2, restarts=2)
    p = st.popsize
    sizes = []
    while not st.done():
        xs = st.ask()
        sizes.append(len(xs))
        st.tell(xs, [objective(x) for x in xs])
    assert sizes == [p, p, 2 * p, 2 * p, 4 * p, 4 * p] and st.restart == 2
    flat = CMAES(sp, seed=0, max_generations=2)
    drive(flat, sp, 10)
    assert flat.done() and len(flat.history) == 2
    assert st.best()[1] >= flat.best()[1]  # the first run is the same; later ones only add
    with pytest.raises(ValueError, match="restarts"):
        CMAES(sp, restarts=-1)
    # through the loop, killed inside the second run, then resumed: the same trials
    whole = tmp_path / "whole"
    run_search(sp, CMAES(sp, seed=0, max_generations=2, restarts=2), FunctionExecutor(), whole, budget=200,
               progress=False, sources=False)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        out = run_search(sp, CMAES(sp, seed=0, max_generations=2, restarts=2), Dies(FunctionExecutor(), 3 * p),
                         cut, budget=200, progress=False, sources=False)
        if out.stopped:
            raise KeyboardInterrupt
    run_search(sp, CMAES(sp, seed=0, max_generations=2, restarts=2), FunctionExecutor(), cut, budget=200,
               progress=False, sources=False, resume=True)
    a = {r.id: r.x for r in TrialLog(whole / "trials.jsonl") if r.kind == "search"}
    b = {r.id: r.x for r in TrialLog(cut / "trials.jsonl") if r.kind == "search"}
    assert len(a) == 14 * p and a == b


def test_a_finished_search_resumed_with_a_larger_budget_scores_its_new_best(tmp_path):
    """The budget may grow on resume: a finished run continued further finds a better
    genome, and the final scoring scores that one (the first finish's best, logged under
    the same name, is not taken for it)."""
    sp = synthetic_space()
    first = run_search(sp, CMAES(sp, seed=2), FunctionExecutor(), tmp_path / "run", budget=20, progress=False,
                       sources=False)
    ex = FunctionExecutor()
    more = run_search(sp, CMAES(sp, seed=2), ex, tmp_path / "run", budget=120, progress=False, resume=True,
                      sources=False)
    assert more.best_score > first.best_score
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["results"]["best"]["search"]["score"] == pytest.approx(objective(more.best_x))
    assert s["results"]["best"]["genome"] == dict(zip(sp.names, more.best_x.tolist()))
    assert [c for c in ex.calls if c[0] == "best:best"], "the new best was scored"


class _FlakyOnce(FunctionExecutor):
    """Fails each genome (or source) the first time it is asked, then scores it."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def map(self, cands):
        for c in cands:
            key = (c.kind, c.split, tuple(c.x)) if c.source is not None else tuple(c.x)
            if key not in self.seen:
                self.seen.add(key)
                self.calls.append((c.kind, c.id, c.split))
                yield Result(c.id, list(c.x), "failed", None, split=c.split, error="oom", kind=c.kind,
                             generation=c.generation)
            else:
                yield from super().map([c])


def test_failures_are_asked_again_not_copied(tmp_path):
    """A duplicate in a batch whose genome's one evaluation failed is evaluated itself (as
    in a later batch), never logged as a copy of the failure; a source that failed while
    scored for the objective is scored again on resume instead of refusing the run."""
    from evomerge.objective import Objective, Scoring

    sp = synthetic_space()
    ex = _FlakyOnce()
    strat = _Repeats(sp)
    run_search(sp, strat, ex, tmp_path / "run", budget=10, progress=False, sources=False)
    recs = {r.id: r for r in TrialLog(tmp_path / "run" / "trials.jsonl") if r.kind == "search"}
    assert recs[0].status == "failed" and recs[2].status == "ok" and recs[2].reused is None

    class Ev:
        direction, tasks = "maximize", ["a"]

        @staticmethod
        def primary(task):
            return "acc"

    class Sources(_FlakyOnce):
        def map(self, cands):
            for r in super().map(cands):
                r.metrics = {**r.metrics, "a/acc": 0.5} if r.status == "ok" else r.metrics
                yield r

    sc = Scoring.of(Objective("mean", floor="base"), Ev())
    ex = Sources()
    with pytest.raises(RuntimeError, match="source 'base' failed"):
        run_search(sp, RandomSearch(sp, seed=0), ex, tmp_path / "src", budget=4, progress=False, scoring=sc)
    out = run_search(sp, RandomSearch(sp, seed=0), ex, tmp_path / "src", budget=4, progress=False, scoring=sc,
                     resume=True)
    assert out.evaluations == 4


# --------------------------------------------------------------------------------------
# The asynchronous mode: a worker that finishes asks for the next candidate
# --------------------------------------------------------------------------------------

ASYNC = [n for n in STRATEGIES if getattr(STRATEGIES[n](synthetic_space(), 0), "asynchronous", False)]


def test_the_asynchronous_strategies_are_the_ones_that_can_be():
    assert set(ASYNC) == {"optuna_tpe", "optuna_cmaes", "optuna_random", "optuna_nsga2", "optuna_gp", "random",
                          "grid", "steady"}


def _scrambled(strategy, rounds: int, seed: int, pending=None):
    """Asks one genome at a time and tells results out of order, with up to 3 in flight."""
    rng = np.random.default_rng(seed)
    pending = [] if pending is None else pending
    for _ in range(rounds):
        while len(pending) < 3 and not strategy.done():
            xs = strategy.ask(1)
            if not xs:
                break
            pending.append(xs[0])
        if not pending:
            break
        x = pending.pop(int(rng.integers(len(pending))))
        strategy.tell([x], [objective(x)])
    return pending


@pytest.mark.parametrize("name", ASYNC)
def test_asynchronous_strategies_take_results_one_at_a_time_in_any_order(name):
    """The conformance suite's async part: results told one by one, out of the order asked,
    with others still in flight; the strategy improves, its state round-trips mid-flight
    (some asked and not told) and continues exactly; a genome never asked is refused."""
    sp = synthetic_space()
    st = STRATEGIES[name](sp, 0)
    pending = _scrambled(st, 40, seed=1)
    bx, bs = st.best()
    assert bs > objective(sp.x0) and bs == pytest.approx(objective(bx))
    # mid-flight: a copy from the saved state takes the same results and asks the same next
    copy = STRATEGIES[name](sp, 0)
    copy.load_state_dict(json.loads(json.dumps(st.state_dict())))
    for s in (st, copy):
        for x in pending[::-1]:
            s.tell([x], [objective(x)])
    if not st.done():
        assert [x.tolist() for x in st.ask(2)] == [x.tolist() for x in copy.ask(2)]
    assert st.best()[1] == copy.best()[1]
    if name.startswith("optuna"):
        with pytest.raises(ValueError, match="not among"):
            st.tell([np.full(len(sp), 0.123)], [0.0])


class VirtualPool:
    """An executor with ``workers`` slots on a virtual clock: a candidate takes ``cost(x)``
    seconds; ``map`` draws a candidate only when a slot is free and yields results in the
    order they finish, as the Ray executor does. ``in_flight_max`` and ``search_clock`` (when the
    last search result came) are recorded."""

    def __init__(self, workers=2, cost=lambda x: 1.0 + 4.0 * float(x[0] > 0.5)):
        self.workers, self.cost, self.calls, self.in_flight_max = workers, cost, [], 0
        self.clock = self.search_clock = 0.0

    @property
    def num_workers(self):
        return self.workers

    def map(self, cands):
        import heapq

        source, running, more = iter(cands), [], True
        while True:
            while more and len(running) < self.workers:
                c = next(source, None)
                if c is None:
                    more = False
                    break
                self.calls.append((c.kind, c.id, c.split))
                t = self.cost(c.x) if c.source is None else 0.0
                heapq.heappush(running, (self.clock + t, c.id, c, t))
                self.in_flight_max = max(self.in_flight_max, len(running))
            if not running:
                return
            end, _, c, t = heapq.heappop(running)
            self.clock = end
            if c.kind == "search":
                self.search_clock = end  # when the search's last result came
            s = objective(c.x) if c.source is None else 0.0
            yield Result(c.id, list(c.x), "ok", s, {"score": s}, split=c.split, kind=c.kind, generation=c.generation,
                         wall_s=t)


@pytest.mark.parametrize("name", ["random", "optuna_tpe"])
def test_async_mode_keeps_every_worker_busy_and_spends_the_budget_exactly(tmp_path, name):
    """With uneven candidate costs, the generational mode leaves a worker idle while the
    slowest of a batch finishes; the asynchronous mode asks for a candidate whenever a worker
    is free (never more in flight than workers), tells each result as it comes, logs every
    evaluation once and stops at the budget exactly."""
    sp = synthetic_space()
    spans = {}
    for mode in ("generational", "async"):
        pool = VirtualPool()
        out = run_search(sp, STRATEGIES[name](sp, 0), pool, tmp_path / mode, budget=30, progress=False,
                         sources=False, mode=mode)
        recs = [r for r in TrialLog(tmp_path / mode / "trials.jsonl") if r.kind == "search"]
        assert sorted(r.id for r in recs) == list(range(len(recs)))
        assert pool.in_flight_max <= 2
        spans[mode] = pool.search_clock  # virtual wall time of the search
        assert out.summary["search"]["mode"] == mode
        if mode == "async":
            assert len(recs) == 30 and out.evaluations == 30
            # each candidate was asked once a worker was free, knowing every result but the one
            # still running: its generation (the results told before it) is its id less one
            assert sorted(r.generation for r in recs) == [0] + list(range(29))
    work = sum(1.0 + 4.0 * float(r.x[0] > 0.5) for r in recs)
    assert spans["async"] <= work / 2 + 5 + 1e-9  # no worker idle but while the last candidate finishes
    assert spans["async"] < spans["generational"]


class _InterruptTell:
    """Wraps a strategy; its ``after``-th tell raises KeyboardInterrupt (a crash after a
    result is logged and before the strategy learns of it)."""

    def __init__(self, inner, after):
        self.inner, self.after, self.n = inner, after, 0

    def __getattr__(self, k):
        return getattr(self.inner, k)

    def tell(self, *a, **kw):
        self.n += 1
        if self.n == self.after:
            raise KeyboardInterrupt
        return self.inner.tell(*a, **kw)


@pytest.mark.parametrize("name", ["random", "optuna_tpe", "optuna_nsga2"])
@pytest.mark.parametrize("cut", ["evaluating", "telling"])
def test_an_async_search_killed_anywhere_resumes_losing_and_repeating_nothing(tmp_path, name, cut):
    """Killed while candidates are in flight (they run again) or between logging a result
    and telling it (it is told from the log, not run again): the resumed search scores every
    asked genome exactly once; with one worker (no race between finishing orders) it also
    ends with the same trials as an uninterrupted one, and with two it loses nothing."""
    sp = synthetic_space()
    whole = tmp_path / "whole"
    run_search(sp, STRATEGIES[name](sp, 0), FunctionExecutor(), whole, budget=24, progress=False, sources=False,
               mode="async")
    for workers in (1, 2):
        run = tmp_path / f"cut{workers}"
        first = VirtualPool(workers, cost=lambda x: 1.0) if workers == 1 else VirtualPool(workers)
        if cut == "evaluating":
            out = run_search(sp, STRATEGIES[name](sp, 0), Dies(first, 9), run, budget=24, progress=False,
                             sources=False, mode="async")
        else:
            out = run_search(sp, _InterruptTell(STRATEGIES[name](sp, 0), 9), first, run, budget=24, progress=False,
                             sources=False, mode="async")
        assert out.stopped
        before = {r.id for r in TrialLog(run / "trials.jsonl") if r.kind == "search"}
        again = VirtualPool(workers, cost=lambda x: 1.0) if workers == 1 else VirtualPool(workers)
        run_search(sp, STRATEGIES[name](sp, 0), again, run, budget=24, progress=False, sources=False, mode="async",
                   resume=True)
        recs = [r for r in TrialLog(run / "trials.jsonl") if r.kind == "search"]
        ids = [r.id for r in recs]
        assert len(ids) == len(set(ids)) == 24 and set(ids) == set(range(24))
        assert not before & {i for k, i, _ in again.calls if k == "search"}  # nothing logged ran again
        if workers == 1:
            a = {r.id: r.x for r in TrialLog(whole / "trials.jsonl") if r.kind == "search"}
            assert {r.id: r.x for r in recs} == a


def test_a_generational_strategy_is_refused_in_async_mode_and_modes_switch_on_resume(tmp_path):
    """CMA-ES needs whole generations: async mode refuses it. A search may change mode on
    resume (how workers are fed is not what its results depend on) and loses nothing."""
    sp = synthetic_space()
    with pytest.raises(ValueError, match="generational"):
        run_search(sp, CMAES(sp, seed=0), FunctionExecutor(), tmp_path / "c", budget=8, progress=False,
                   sources=False, mode="async")
    with pytest.raises(ValueError, match="mode must be"):
        run_search(sp, RandomSearch(sp), FunctionExecutor(), tmp_path / "c", budget=8, progress=False,
                   sources=False, mode="steady")
    run = tmp_path / "switch"
    out = run_search(sp, OptunaSearch(sp, "tpe", seed=0), Dies(FunctionExecutor(), 6), run, budget=20,
                     progress=False, sources=False)  # generational: killed inside its second batch of 4
    assert out.stopped
    run_search(sp, OptunaSearch(sp, "tpe", seed=0), VirtualPool(), run, budget=20, progress=False, sources=False,
               mode="async", resume=True)
    ids = [r.id for r in TrialLog(run / "trials.jsonl") if r.kind == "search"]
    assert sorted(ids) == list(range(20))


# --------------------------------------------------------------------------------------
# Multi-fidelity: a first look on a share of the search split, the promising on all of it
# --------------------------------------------------------------------------------------


class Looks(FunctionExecutor):
    """Scores a first look (fidelity < 1) with a deterministic error, the whole split exactly."""

    def map(self, cands):
        for c in cands:
            if c.source is not None or c.fidelity >= 1:
                for r in super().map([c]):
                    r.fidelity = c.fidelity
                    yield r
                continue
            self.calls.append((c.kind, c.id, c.split))
            s = objective(c.x) + 0.05 * float(np.sin(997.0 * c.x[0]))
            yield Result(c.id, list(c.x), "ok", s, {"score": s}, split=c.split, kind=c.kind, generation=c.generation,
                         fidelity=c.fidelity)


class _Recorder:
    """Wraps a strategy and keeps what it was told."""

    def __init__(self, inner):
        self.inner, self.told = inner, []

    def __getattr__(self, k):
        return getattr(self.inner, k)

    def tell(self, xs, scores, **kw):
        self.told += [(tuple(np.asarray(x).tolist()), s) for x, s in zip(xs, scores)]
        return self.inner.tell(xs, scores, **kw)


def _promotions_by_the_rule(recs, promote, window=None):
    """Replays the promotion rule: ``recs`` in batches (the best share of each, ties to the
    lower id) or, with a window, one by one (among the last ``window`` first looks, ties to
    the earlier)."""
    import math

    looks, out = [], set()
    for batch in recs:
        if window is None:
            ranked = sorted(batch, key=lambda r: (-r.score, r.id))
            out |= {r.id for r in ranked[:max(1, math.ceil(promote * len(batch) - 1e-9))]}
            continue
        for r in batch:
            looks.append(r.score)
            among = looks[-window:]
            ahead = sum(1 for v in among if v > r.score) + sum(1 for v in among[:-1] if v == r.score)
            if ahead < max(1, math.ceil(promote * len(among) - 1e-9)):
                out.add(r.id)
    return out


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_multi_fidelity_first_looks_then_the_promising_on_the_whole_split(tmp_path, name):
    """Every candidate is scored first on a share of the split; after each batch, those whose
    first look is among the best quarter of the batch's are scored on the whole split; the strategy is told the whole-split score where there is one; the best is a
    whole-split score; the summary counts the cost in whole-split evaluations."""
    sp = synthetic_space()
    ex = Looks()
    strat = _Recorder(STRATEGIES[name](sp, 0))
    out = run_search(sp, strat, ex, tmp_path / "run", budget=24, progress=False, sources=False, fidelity=0.25,
                     promote=0.25)
    recs = list(TrialLog(tmp_path / "run" / "trials.jsonl"))
    first = [r for r in recs if r.kind == "search"]
    up = {r.id: r for r in recs if r.kind == "promoted"}
    assert first and all(r.fidelity == 0.25 for r in first if r.reused is None)
    by_gen: dict[int, list] = {}
    for r in first:
        if r.reused is None:
            by_gen.setdefault(r.generation, []).append(r)
    assert set(up) == _promotions_by_the_rule([by_gen[g] for g in sorted(by_gen)], 0.25)
    assert all(r.fidelity == 1.0 and r.score == pytest.approx(objective(r.x)) for r in up.values())
    told = dict(strat.told)
    for r in first:
        assert told[tuple(r.x)] == (up[r.id].score if r.id in up else r.score)
    assert out.best_score == max(r.score for r in up.values())
    s = out.summary["search"]
    assert s["cost"] == pytest.approx(0.25 * sum(1 for r in first if r.reused is None) + len(up))
    assert s["promoted"] == len(up) and s["fidelity"] == 0.25
    assert out.summary["results"]["best"]["search"]["score"] == pytest.approx(out.best_score)


@pytest.mark.parametrize("name", ["random", "optuna_tpe"])
def test_multi_fidelity_in_async_mode_and_resumed_after_a_crash(tmp_path, name):
    """Async: a first look is promoted (against the last 16 first looks) as soon as it comes,
    and its whole-split score is taken before any new candidate is asked. Killed anywhere and
    resumed, nothing is lost or scored twice; with one worker the trials equal an
    uninterrupted run's."""
    sp = synthetic_space()
    whole = tmp_path / "whole"
    run_search(sp, STRATEGIES[name](sp, 0), Looks(), whole, budget=40, progress=False, sources=False, mode="async",
               fidelity=0.5, promote=0.3)
    recs = list(TrialLog(whole / "trials.jsonl"))
    assert set(_promotions_by_the_rule([[r] for r in recs if r.kind == "search" and r.reused is None], 0.3,
                                       window=16)) == {r.id for r in recs if r.kind == "promoted"}
    for after in (3, 8, 29):
        run = tmp_path / f"cut{after}"
        out = run_search(sp, STRATEGIES[name](sp, 0), Dies(Looks(), after), run, budget=40, progress=False,
                         sources=False, mode="async", fidelity=0.5, promote=0.3)
        assert out.stopped
        before = {(r.kind, r.id) for r in TrialLog(run / "trials.jsonl")}
        again = Looks()
        run_search(sp, STRATEGIES[name](sp, 0), again, run, budget=40, progress=False, sources=False, mode="async",
                   fidelity=0.5, promote=0.3, resume=True)
        assert not before & {(k, i) for k, i, _ in again.calls}
        got = [(r.kind, r.id, r.x) for r in TrialLog(run / "trials.jsonl") if r.kind in ("search", "promoted")]
        assert len(got) == len(set((k, i) for k, i, _ in got))
        assert sorted(got) == sorted((r.kind, r.id, r.x) for r in recs if r.kind in ("search", "promoted"))


def test_multi_fidelity_generational_resume_ends_where_an_uninterrupted_search_does(tmp_path):
    sp = synthetic_space()
    whole = run_search(sp, CMAES(sp, seed=3), Looks(), tmp_path / "whole", budget=40, progress=False, sources=False,
                       fidelity=0.25)
    for after in (5, 12, 17):
        run = tmp_path / f"cut{after}"
        assert run_search(sp, CMAES(sp, seed=3), Dies(Looks(), after), run, budget=40, progress=False, sources=False,
                          fidelity=0.25).stopped
        res = run_search(sp, CMAES(sp, seed=3), Looks(), run, budget=40, progress=False, sources=False,
                         fidelity=0.25, resume=True)
        assert res.best_score == whole.best_score and np.array_equal(res.best_x, whole.best_x)
        a = sorted((r.kind, r.id, r.x) for r in TrialLog(tmp_path / "whole" / "trials.jsonl"))
        b = sorted((r.kind, r.id, r.x) for r in TrialLog(run / "trials.jsonl"))
        assert a == b
    with pytest.raises(ValueError, match="shares"):
        run_search(sp, CMAES(sp), Looks(), tmp_path / "bad", budget=4, progress=False, fidelity=0.0)


def test_utilization_is_the_workers_busy_time_over_the_searchs_wall_time(tmp_path):
    """A worker that reports 20 ms of work per candidate and takes about that long keeps
    busy most of the search; one that reports no work is never busy."""
    sp = synthetic_space()

    class Timed(FunctionExecutor):
        def __init__(self, work):
            super().__init__()
            self.work = work

        def map(self, cands):
            for r in super().map(cands):
                time.sleep(0.02)
                r.wall_s = 0.02 if self.work else 0.0
                yield r

    busy = run_search(sp, RandomSearch(sp), Timed(True), tmp_path / "a", budget=24, progress=False, sources=False)
    u = busy.summary["search"]["utilization"]
    assert 0.5 < u <= 1.0
    idle = run_search(sp, RandomSearch(sp), Timed(False), tmp_path / "b", budget=24, progress=False, sources=False)
    assert idle.summary["search"]["utilization"] is None  # no busy time to report


def test_an_in_memory_optuna_state_of_the_batch_format_still_resumes():
    """States saved before asks and tells were recorded apart (each batch with its told
    values) load and continue as the state of the same asks and tells does now."""
    sp = synthetic_space()
    a = OptunaSearch(sp, "tpe", seed=2)
    drive(a, sp, 3)
    new = json.loads(json.dumps(a.state_dict()))
    events, old = new["history"], []
    for ask_, tell_ in zip(events[::2], events[1::2]):
        assert "x" in ask_ and "tell" in tell_
        old.append({"x": ask_["x"], "values": tell_["values"]})
    b = OptunaSearch(sp, "tpe", seed=2)
    b.load_state_dict({**new, "history": old})
    assert [x.tolist() for x in b.ask()] == [x.tolist() for x in a.ask()]


def test_multi_fidelity_promotes_exactly_its_share_of_a_batch_when_first_looks_tie(tmp_path):
    """Scores on a share of a split come in steps (a count of rows): many first looks tie.
    Exactly ceil(promote * batch) of each batch are promoted, ties going to the earlier asked."""
    sp = synthetic_space()

    class Steps(Looks):
        def map(self, cands):
            for r in super().map(cands):
                if r.fidelity < 1:
                    r.score = round(r.score, 1)
                    r.metrics = {"score": r.score}
                yield r

    run_search(sp, RandomSearch(sp, seed=1, batch=8), Steps(), tmp_path / "run", budget=40, progress=False,
               sources=False, fidelity=0.25, promote=0.25)
    recs = list(TrialLog(tmp_path / "run" / "trials.jsonl"))
    up = {r.id for r in recs if r.kind == "promoted"}
    by_gen: dict[int, list] = {}
    for r in recs:
        if r.kind == "search":
            by_gen.setdefault(r.generation, []).append(r)
    assert any(len({r.score for r in b}) < len(b) for b in by_gen.values())  # ties happened
    for g, batch in by_gen.items():
        assert len(up & {r.id for r in batch}) == 2
    assert up == _promotions_by_the_rule([by_gen[g] for g in sorted(by_gen)], 0.25)


@pytest.mark.parametrize("name", ["random", "optuna_tpe"])
def test_async_multi_fidelity_on_two_workers_scores_every_promotion_and_spends_the_budget(tmp_path, name):
    """With candidates in flight when the budget is spent, the promotions decided after the
    last ask are still scored and told (nothing is left pending), the budget is spent
    exactly (a candidate awaiting its promotion is not counted twice), and resuming the
    finished search scores nothing again."""
    sp = synthetic_space()
    pool = VirtualPool(workers=3)
    out = run_search(sp, STRATEGIES[name](sp, 0), pool, tmp_path / "run", budget=30, progress=False, sources=False,
                     mode="async", fidelity=0.5, promote=0.3, window=8)
    recs = list(TrialLog(tmp_path / "run" / "trials.jsonl"))
    first = [r for r in recs if r.kind == "search"]
    assert len(first) == 30 and out.evaluations == 30
    assert json.loads((tmp_path / "run" / "strategy.json").read_text())["pending"] == []
    up = {r.id for r in recs if r.kind == "promoted"}
    ranked = sorted(first, key=lambda r: [i for i, x in enumerate(recs) if x is r][0])  # in the order they came
    assert up == _promotions_by_the_rule([[r] for r in ranked], 0.3, window=8)
    assert out.summary["search"]["cost"] == pytest.approx(0.5 * 30 + len(up))
    again = VirtualPool(workers=3)
    run_search(sp, STRATEGIES[name](sp, 0), again, tmp_path / "run", budget=30, progress=False, sources=False,
               mode="async", fidelity=0.5, promote=0.3, window=8, resume=True)
    assert not [c for c in again.calls if c[0] in ("search", "promoted")]


def test_steady_state_evolution_by_hand():
    """Aging, not elitism: the population holds the last ``population`` results told (a
    failure joins nothing), and a child is a mutated copy of its tournament's winner, within
    the bounds; the first genome is the space's start."""
    sp = synthetic_space()
    st = SteadyStateEvolution(sp, seed=0, population=3, sample=3, sigma=0.05)
    first = st.ask(3)
    assert np.allclose(first[0], sp.x0)
    st.tell(first, [5.0, 1.0, None])
    assert [s for _, s in st.members] == [5.0, 1.0]
    st.tell([first[1]], [2.0])
    st.tell([first[2]], [3.0])
    assert [s for _, s in st.members] == [1.0, 2.0, 3.0]  # the best (5.0) was the oldest: it left
    child = st.ask(1)[0]  # the winner of all three is the 3.0 genome (first[2])
    assert np.all(np.abs(sp.to_unit(child) - sp.to_unit(first[2])) < 0.3) and np.all(child >= sp.lower)
    assert st.best()[1] == 5.0  # the best told is kept apart from the population
    with pytest.raises(ValueError, match="sigma"):
        SteadyStateEvolution(sp, sigma=0)
