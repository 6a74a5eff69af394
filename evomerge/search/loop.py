"""The search loop: ask, evaluate through an executor, log, tell; then score the best on test.

    outcome = run_search(space, strategy, executor, run_dir="results/run", budget=60)

Every finished evaluation is appended to ``run_dir/trials.jsonl`` (fsynced) before anything
else happens, and the strategy's state is saved with the generation in flight
(``run_dir/strategy.json``, plain data), so a search killed at any point resumes with
``run_search(..., resume=True)``: finished evaluations are read back instead of re-run and
the strategy continues exactly, so the resumed search ends where an uninterrupted one would.

Two modes feed the workers. ``generational`` (the default, and the only one CMA-ES can use)
asks a batch, scores all of it and tells it; a worker that finishes early waits for the
slowest candidate of the batch. ``async`` asks for one candidate whenever a worker is free
and tells each result as it comes, for strategies that take results one at a time
(``strategy.asynchronous``), so no worker waits; ``summary.json``'s ``search.utilization``
gives the workers' busy time over the wall time in either mode.

At the end the best genome on the search split is scored on the test split, together with
the sources (base and each expert) and the baselines, on both splits; the run directory gets
``best_recipe.yaml`` and ``summary.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..space import Space
from ..trials import RunLock, StateError, TrialLog, atomic_write, check_record, load_state, save_state
from ..types import Candidate, Result

__all__ = ["run_search", "SearchOutcome", "finish_run"]

STATE_FILE = "strategy.json"
LEGACY_STATE_FILE = "strategy.pkl"  # pickled state of older versions: never read
LOG_FILE = "trials.jsonl"


@dataclass
class SearchOutcome:
    run_dir: Path
    best_x: np.ndarray | None
    best_score: float | None
    evaluations: int
    summary: dict[str, Any]
    stopped: bool = False


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="search", unit="eval", disable=not enabled, leave=True)


def run_search(
    space: Space,
    strategy,
    executor,
    run_dir: str | Path,
    budget: int | None = 100,
    max_seconds: float | None = None,
    resume: bool = False,
    baselines: Mapping[str, Any] | None = None,
    sources: bool = True,
    progress: bool = True,
    config: Mapping[str, Any] | None = None,
    record: Mapping[str, Any] | None = None,
    scoring=None,
    mode: str = "generational",
    fidelity: float = 1.0,
    promote: float = 0.25,
    window: int = 16,
) -> SearchOutcome:
    """Run (or resume) a search until ``budget`` evaluations or ``max_seconds`` are spent or
    the strategy stops; then score the best, the baselines and the sources.

    Args:
        baselines: named genomes to report beside the best (default: the space's start ``x0``).
        sources: also score the base and every expert as they are.
        config: recorded in ``summary.json`` (e.g. the experiment's configuration).
        record: what the results depend on (models, method, space, strategy, evaluator,
            seed): kept in ``run.json`` when the search starts; a resume with another record
            is refused, naming the keys.
        scoring: an ``objective.Scoring`` (the objective bound to the evaluator): every
            result's score is its objective, computed here from its per-task metrics; None
            keeps the workers' scores (the evaluator's mean).
        mode: ``"generational"`` asks a batch (a generation), scores all of it, then tells it;
            ``"async"`` keeps every worker busy: a strategy that takes results one at a time
            (``strategy.asynchronous``: random, grid, the Optuna samplers) is told each result
            as it comes and asked for the next candidate when a worker is free. An async
            search's order depends on which candidate finishes first, so two runs of it may
            differ; a resumed one still loses nothing and repeats nothing.
        fidelity: below 1, a multi-fidelity search: every candidate is scored first on this
            seeded share of each task's search split (a first look; the evaluator's
            ``fraction``), and the promising ones again on all of it. The promotion rule: the
            best ``max(1, ceil(promote * n))`` of ``n`` first looks are promoted, ties going to
            the earlier: in the generational mode the ``n`` first looks of each batch, in the
            async mode a first look is promoted as it comes when it is among the best of the
            last ``window`` first looks, its own the latest. The strategy is told a
            candidate's whole-split score where it has one (the better estimate of the same
            quantity, on a superset of the rows; the best first looks of a batch, chosen
            for scoring high, tend to score a little lower on the whole split), else its
            first look's; the best
            of the search is the best whole-split score, never a first look. Each first look
            and each promotion is a line of the trial log (kind ``search`` and ``promoted``),
            and the summary gives the cost in whole-split evaluations (``search.cost``).

    The run directory is locked while the search runs (a second process is refused). A
    resume is refused when there is nothing to resume, when the trial log lacks evaluations
    the strategy's state counts, or when a line of the log is not a trial record.
    """
    run_dir = Path(run_dir)
    if mode not in ("generational", "async"):
        raise ValueError(f"mode must be 'generational' or 'async', not {mode!r}")
    if mode == "async" and not getattr(strategy, "asynchronous", False):
        raise ValueError(f"strategy {getattr(strategy, 'name', type(strategy).__name__)} needs whole batches "
                         "(generations) told together; run it in the generational mode")
    if not 0 < fidelity <= 1 or not 0 < promote <= 1:
        raise ValueError(f"fidelity ({fidelity!r}) and promote ({promote!r}) are shares: in (0, 1]")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive number of first looks, not {window!r}")
    if resume and not (run_dir / LOG_FILE).is_file() and not (run_dir / STATE_FILE).is_file() \
            and not (run_dir / LEGACY_STATE_FILE).is_file():
        raise StateError(f"{run_dir}: nothing to resume (no {LOG_FILE} or {STATE_FILE}); drop resume=true to start "
                         "a search there")
    if not resume and ((run_dir / LOG_FILE).is_file() or (run_dir / STATE_FILE).is_file()):
        raise FileExistsError(f"{run_dir} already holds a search; resume it or choose another run directory")
    with RunLock(run_dir):
        if record is not None:
            check_record(run_dir, dict(record), resume)
        return _run_search(space, strategy, executor, run_dir, budget, max_seconds, resume, baselines, sources,
                           progress, config, scoring, mode, float(fidelity), float(promote), window)


def _rescore(res: Result, scoring) -> Result:
    """A result's score as the objective says (a result whose metrics lack a task's value
    fails, naming it)."""
    if scoring is None or res.status != "ok" or res.kind.startswith("source:"):
        return res  # (a source's row shows its metrics; its score is never compared)
    from ..objective import ObjectiveError

    try:
        res.score = float(scoring(res.metrics))
    except ObjectiveError as e:
        res.status, res.error, res.score = "failed", f"ObjectiveError: {e}", None
    return res


def _sources(space) -> list[tuple[str, str]]:
    """The sources a run scores as they are, by the name its summary gives them."""
    out = [("base", space.base_model)] if space.base_model is not None else []
    return out + [(Path(m).name or m, m) for m in space.models]


def _score_sources(space, executor, log, done: dict, scoring):
    """``scoring`` bound to the sources' search-split metrics (a normalized objective, a
    floor at the base), scored first (once: a resumed run reads them back from the log)."""
    # a source's earlier result is reused if it succeeded; a failure (out of memory, say) is asked again
    have = {(r.kind, r.split): r for r in done.values() if r.kind.startswith("source:") and r.status == "ok"}
    todo = [Candidate(-(10**6) - i, [], -1, kind=f"source:{name}", split="search", source=m)
            for i, (name, m) in enumerate(_sources(space)) if (f"source:{name}", "search") not in have]
    for res in executor.map(todo):
        log.append(res)
        done[(res.kind, res.id)] = res
        have[(res.kind, res.split)] = res
    got = {name: have[(f"source:{name}", "search")] for name, _ in _sources(space)}
    bad = {n: r.error for n, r in got.items() if r.status != "ok"}
    if bad:
        n, err = next(iter(bad.items()))
        raise RuntimeError(f"the objective needs every source's scores, and source {n!r} failed: {err}")
    return scoring.with_sources({n: r.metrics for n, r in got.items()},
                                "base" if space.base_model is not None else None)


def _genome_key(space, x) -> tuple:
    return tuple(float(v) for v in space.clip(np.asarray(x, dtype=float)))


def _reuse(r: Result, c: Candidate) -> Result:
    """``r`` (an identical genome's result) as the result of ``c``, naming the id it copies."""
    return Result(**{**r.to_json(), "id": c.id, "x": list(c.x), "generation": c.generation, "kind": c.kind,
                     "wall_s": 0.0, "materialize_s": 0.0, "worker": "",
                     "reused": r.id if r.reused is None else r.reused})


def _map_once(space, executor, todo: list[Candidate], seen: dict):
    """``executor.map(todo)``, except that a genome equal (after clipping) to one already
    scored well (``seen``: clipped genome -> its result, kept up to date by the caller as
    results come), or to another
    of this batch, is not evaluated again: it yields a copy of that result under its own id
    and genome, with ``reused`` naming the id it copies."""
    def key(x) -> tuple:
        return _genome_key(space, x)

    first: dict[tuple, Candidate] = {}
    later: list[tuple[Candidate, tuple]] = []
    for c in todo:
        k = key(c.x)
        if k in seen:
            yield _reuse(seen[k], c)
        elif k in first:
            later.append((c, k))
        else:
            first[k] = c
    got = {}
    for res in executor.map(list(first.values())):
        got[key(res.x)] = res
        yield res
    # copies of the successes; a genome whose evaluation failed (a worker died, say) is asked
    # again for each of its repeats, as it would be in a later batch
    again = [c for c, k in later if k in got and got[k].status != "ok"]
    for c, k in later:
        if k in got and got[k].status == "ok":  # (an executor stopped early yields none: asked again)
            yield _reuse(got[k], c)
    yield from executor.map(again)


def _run_search(space, strategy, executor, run_dir: Path, budget, max_seconds, resume, baselines, sources, progress,
                config, scoring, mode, fidelity, promote, window) -> SearchOutcome:
    if budget is None and max_seconds is None:
        raise ValueError("run_search: give a budget of evaluations, max_seconds, or both")
    limit = budget if budget is not None else float("inf")  # evaluations; None: until max_seconds
    state_path = run_dir / STATE_FILE
    if resume and not state_path.is_file() and (run_dir / LEGACY_STATE_FILE).is_file():
        raise StateError(f"{run_dir / LEGACY_STATE_FILE}: a pickled strategy state (from an older evomerge); "
                         "pickles can run code when read, so it is not resumed from. Start a new run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    log = TrialLog(run_dir / LOG_FILE)
    done: dict[tuple[str, int], Result] = {(r.kind, r.id): r for r in log}
    state = load_state(state_path) if resume else None
    if state is not None:
        try:
            strategy.load_state_dict(state["strategy"])
            pending = [Candidate(**c) for c in state["pending"]]
            next_id, generation = state["next_id"], state["generation"]
            elapsed = float(state.get("elapsed", 0.0))
            # (a state of an earlier version has no busy time: utilization counts this process then)
            busy_before = float(state.get("busy", 0.0))
            elapsed_counted = elapsed if "busy" in state else 0.0
            for k, v in (("next_id", next_id), ("generation", generation)):
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**40:
                    raise ValueError(f"{k} is {v!r}, not a count")
        except StateError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever is malformed in it, the file is named
            what = f"no {e}" if isinstance(e, KeyError) else str(e).splitlines()[0][:300]
            raise StateError(f"{state_path}: not a state this search can resume from ({type(e).__name__}: "
                             f"{what}); resume with the files the search wrote, or start a new run directory") from None
        have = {c.id for c in pending} | {i for k, i in done if k == "search"}
        have = {i for i in have if 0 <= i < next_id}
        if len(have) < next_id:  # (counted, not listed: the count comes from a file)
            first = next(i for i in range(len(have) + 1) if i not in have)
            raise StateError(f"{run_dir / LOG_FILE} lacks {next_id - len(have)} of the {next_id} evaluations the "
                             f"strategy's state counts (e.g. id {first}): it was truncated or replaced, and resuming "
                             "would repeat or skip work")
    else:
        pending, next_id, generation, elapsed = [], 0, 0, 0.0
        busy_before = elapsed_counted = 0.0

    def checkpoint() -> None:
        save_state(state_path, {
            "strategy": strategy.state_dict(), "pending": [c.__dict__ for c in pending],
            "next_id": next_id, "generation": generation, "elapsed": elapsed + (time.perf_counter() - t_start),
            "busy": busy_before + busy,
        })

    if scoring is not None and scoring.needs_sources:
        scoring = _score_sources(space, executor, log, done, scoring)
    n_search = sum(1 for k in done if k[0] == "search")
    multi = fidelity < 1  # every candidate scored first on a share of the search split, the best of them on all

    def result_of(c: Candidate) -> Result:
        """What the strategy is told of ``c``: its score on the whole search split where it
        (or, for a repeated genome, the candidate it repeats) was promoted and that evaluation
        did not fail, else its first look."""
        first = done[("search", c.id)]
        up = done.get(("promoted", c.id if first.reused is None else first.reused))
        return up if up is not None and up.status == "ok" else first

    # every successfully scored genome (clipped) and the best result it has, built once and kept
    # up to date by record(): a repeat is reused
    seen = {_genome_key(space, r.x): r for k, r in done.items() if k[0] == "search" and r.status == "ok"}
    seen.update({_genome_key(space, r.x): r for k, r in done.items() if k[0] == "promoted" and r.status == "ok"})
    # the scores of the first looks (on a share of the split) in the order they came (the log's),
    # and where each candidate's stands, for the async mode's promotion rule
    looks: list[float] = []
    look_at: dict[int, int] = {}
    for k, r in done.items():
        if k[0] == "search" and r.fidelity < 1 and r.reused is None and r.score is not None:
            look_at[r.id] = len(looks)
            looks.append(r.score)
    t_start = time.perf_counter()
    n_start = n_search  # candidates per minute count this process's evaluations only
    bar = _progress(budget, min(n_search, limit), progress)
    best_seen = max((r.score for k, r in done.items() if k[0] in ("search", "promoted") and r.score is not None
                     and r.fidelity >= 1), default=None)
    busy = 0.0  # seconds the workers spent on this process's evaluations

    def record(res: Result) -> None:
        """A search result (a first look, or a promoted candidate's whole-split score), logged
        (before anything else) and counted."""
        nonlocal n_search, best_seen, busy
        if res.reused is None:  # scored as the loop asked (whatever the worker wrote)
            res.fidelity = 1.0 if res.kind == "promoted" else fidelity
        log.append(_rescore(res, scoring))
        busy += res.wall_s
        if res.kind == "promoted":
            done[("promoted", res.id)] = res
            if res.status == "ok":
                seen[_genome_key(space, res.x)] = res
        else:
            done[("search", res.id)] = res
            n_search += 1
            bar.update(1)
            if res.status == "ok":
                seen.setdefault(_genome_key(space, res.x), res)
            if res.fidelity < 1 and res.reused is None and res.score is not None:
                look_at[res.id] = len(looks)
                looks.append(res.score)
        if res.score is not None and res.fidelity >= 1 and (best_seen is None or res.score > best_seen):
            best_seen = res.score
        done_here = n_search - n_start
        if done_here and (done_here % 5 == 0 or res.score == best_seen):
            per_min = 60 * done_here / max(1e-9, time.perf_counter() - t_start)
            bar.set_postfix(best=None if best_seen is None else f"{best_seen:.4f}",
                            per_min=f"{per_min:.0f}", refresh=False)

    def looked(c: Candidate) -> float | None:
        """The score of ``c``'s own first look (None: it has none to rank: failed, reused or
        scored whole)."""
        first = done[("search", c.id)]
        return first.score if first.fidelity < 1 and first.reused is None else None

    def up(c: Candidate) -> Candidate:
        return Candidate(c.id, list(c.x), c.generation, kind="promoted")

    def promoted_in_batch(cands: list[Candidate]) -> list[Candidate]:
        """The batch's best ``promote`` share of first looks (ties: the earlier asked)."""
        ranked = sorted((c for c in cands if looked(c) is not None), key=lambda c: (-looked(c), c.id))
        return [up(c) for c in ranked[:max(1, math.ceil(promote * len(ranked) - 1e-9))]]

    def promoted_now(c: Candidate) -> Candidate | None:
        """``c`` when its first look is among the best ``promote`` share of the ``window``
        first looks up to its own (ties: the earlier came first)."""
        s = looked(c)
        if s is None:
            return None
        among = looks[:look_at[c.id] + 1][-window:]
        ahead = sum(1 for v in among if v > s) + sum(1 for v in among[:-1] if v == s)
        return up(c) if ahead < max(1, math.ceil(promote * len(among) - 1e-9)) else None

    def tell(cands: list[Candidate]) -> None:
        """The strategy told the results of ``cands`` (each in the log)."""
        results = [result_of(c) for c in cands]
        kw: dict[str, Any] = {}
        if getattr(strategy, "wants_metrics", False):
            kw["metrics"] = [r.metrics for r in results]
        if getattr(strategy, "wants_constraints", False):  # the objective's floor, one constraint per task
            if scoring is None or scoring.objective.floor is None:
                raise ValueError("the strategy takes constraints, and the objective has no floor to give it")
            kw["constraints"] = [scoring.violations(r.metrics) if r.status == "ok" else None for r in results]
        strategy.tell([np.asarray(c.x) for c in cands], [r.score for r in results], **kw)

    def out_of_budget(asked: int = 0) -> bool:
        spent = elapsed + time.perf_counter() - t_start
        return n_search + asked >= limit or strategy.done() or (max_seconds is not None and spent >= max_seconds)

    def ask(n: int | None) -> list[Candidate]:
        nonlocal next_id
        xs = strategy.ask(n)
        out = [Candidate(next_id + i, [float(v) for v in x], generation, fidelity=fidelity) for i, x in enumerate(xs)]
        next_id += len(out)
        return out

    stopped = False
    try:
        if mode == "generational":
            while True:
                if not pending:
                    if out_of_budget():
                        break
                    # a strategy that asks in batches of any size asks no more than the budget
                    # leaves; one that needs whole generations (CMA-ES) ignores n and finishes its own
                    size = getattr(strategy, "batch", None)
                    pending = ask(int(min(size, limit - n_search)) if size else None)
                    if not pending:
                        break
                    checkpoint()
                todo = [c for c in pending if ("search", c.id) not in done]
                for res in _map_once(space, executor, todo, seen):
                    record(res)
                if multi:  # the batch's best first looks on the whole split
                    todo = [u for u in promoted_in_batch(pending) if ("promoted", u.id) not in done]
                    for res in executor.map(todo):
                        record(res)
                tell(pending)
                pending = []
                generation += 1
                checkpoint()
        else:
            queue: list[Candidate] = []  # promoted candidates, scored before any new one is asked

            def told(c: Candidate) -> None:  # one result told as it comes; the state saved with it
                nonlocal generation
                tell([c])
                pending.remove(c)
                generation += 1
                checkpoint()

            def first_look(c: Candidate) -> None:  # promoted (queued), or told now
                u = promoted_now(c) if multi else None
                if u is None or ("promoted", c.id) in done:  # (or scored before a crash, not told)
                    told(c)
                else:
                    queue.append(u)

            def feed(resumed: bool):
                """The next candidate, asked of the strategy when a worker is free (the
                executor draws from here then), knowing every result told so far; promoted
                candidates first."""
                if resumed:
                    for c in [c for c in pending if ("search", c.id) in done]:  # scored before a crash, not told
                        first_look(c)
                    yield from [c for c in pending if ("search", c.id) not in done]  # in flight at the crash
                while True:
                    while queue:
                        yield queue.pop(0)
                    if out_of_budget(sum(1 for c in pending if ("search", c.id) not in done)):
                        return
                    new = ask(1)
                    if not new:
                        return
                    c = new[0]
                    pending.append(c)
                    checkpoint()
                    k = _genome_key(space, c.x)
                    if k in seen:  # scored already: its result is reused, and the next one asked
                        record(_reuse(seen[k], c))
                        told(c)
                        continue
                    yield c

            first = True
            while first or queue:  # (promotions decided after the last ask are scored too)
                for res in executor.map(feed(first)):
                    record(res)
                    c = next(c for c in pending if c.id == res.id)
                    if res.kind == "promoted":
                        told(c)
                    else:
                        first_look(c)
                first = False
    except KeyboardInterrupt:
        stopped = True
    finally:
        bar.close()
    wall = time.perf_counter() - t_start
    best = _best_full(done) if multi else None
    if stopped:
        return SearchOutcome(run_dir, *(best or strategy.best()), n_search, {}, stopped=True)
    # the workers' busy time over their wall time, over the whole search (all its processes)
    workers = max(1, int(getattr(executor, "num_workers", 1)))
    total_busy, total_wall = busy_before + busy, elapsed_counted + wall
    utilization = total_busy / (total_wall * workers) if total_busy > 0 and total_wall > 0 else None
    searched = [r for k, r in done.items() if k[0] in ("search", "promoted") and r.reused is None]
    feeding = {"mode": mode, "utilization": utilization, "seconds": elapsed + wall,
               # forward passes of the search, in evaluations of the whole search split
               "cost": float(sum(r.fidelity for r in searched))}
    if multi:
        n_up = sum(1 for k in done if k[0] == "promoted")
        feeding.update(fidelity=fidelity, promote=promote, promoted=n_up,
                       **({"window": window} if mode == "async" else {}))
        if n_up > 0.5 * n_search:
            feeding["warnings"] = [f"multi-fidelity promoted {n_up} of {n_search} candidates to the whole search "
                                   "split (batches too small for fidelity.promote to leave most out?), so it saved "
                                   "little or nothing"]
    summary = _finish(space, strategy, executor, run_dir, log, done, baselines, sources, config, n_search, scoring,
                      search=feeding, best=best)
    best_x, best_score = best or strategy.best()
    return SearchOutcome(run_dir, best_x, best_score, n_search, summary)


def _best_full(done: dict) -> tuple:
    """The best genome scored on the whole search split (a multi-fidelity search's best: a
    first look's score, on a share of the split, is never taken for it)."""
    full = [r for k, r in done.items() if k[0] in ("search", "promoted") and r.fidelity >= 1 and r.score is not None]
    if not full:
        return None
    top = max(full, key=lambda r: r.score)
    return np.asarray(top.x, dtype=float), top.score


class _Given:
    """A result found by other means (e.g. gradient descent), in the strategy protocol's shape."""

    def __init__(self, name: str, x, score):
        self.name, self._best = name, (None if x is None else np.asarray(x, dtype=float), score)

    def best(self):
        return self._best


def finish_run(space: Space, name: str, best_x, best_score, executor, run_dir: str | Path,
               baselines: Mapping[str, Any] | None = None, sources: bool = True,
               config: Mapping[str, Any] | None = None, scoring=None) -> dict:
    """Score a given best genome, the baselines and the sources on both splits, and write
    ``best_recipe.yaml`` and ``summary.json`` (what ``run_search`` does at its end)."""
    run_dir = Path(run_dir)
    log = TrialLog(run_dir / LOG_FILE)
    done = {(r.kind, r.id): r for r in log}
    n_search = sum(1 for k in done if k[0] == "search")
    return _finish(space, _Given(name, best_x, best_score), executor, run_dir, log, done, baselines, sources,
                   config, n_search, scoring)


def _warnings(space, named: dict, rows: dict) -> list[str]:
    """What the scores themselves say is wrong with the evaluation. Experts are fine-tunes
    for different tasks: when every one of them gets the very same metrics on a split (all
    0, say), the evaluation does not tell models apart (a stop token, the data or a prompt
    format is wrong), and no score of the run means anything."""
    experts = [n for n, info in named.items() if info["kind"] == "source" and info["source"] != space.base_model]
    out = []
    for split in ("search", "test"):
        ms = [rows[n].get(split) for n in experts]
        if len(ms) >= 2 and all(m and "error" not in m for m in ms) and all(m == ms[0] for m in ms[1:]):
            out.append(f"every expert ({', '.join(experts)}) got the same metrics on the {split} split "
                       f"(score {ms[0].get('score')}): the evaluation does not tell the models apart (check the "
                       "evaluator's data, prompt format and where answers end), so no score of this run means anything")
    return out


def _finish(space, strategy, executor, run_dir, log, done, baselines, sources, config, n_search, scoring=None,
            search=None, best=None) -> dict:
    best_x, best_score = best if best is not None else strategy.best()
    searched = [r for k, r in done.items() if k[0] == "search"]
    if best_x is None:
        ok = [r for r in searched if r.status == "ok" and r.score is not None]
        if ok:
            top = max(ok, key=lambda r: r.score)
            best_x, best_score = np.asarray(top.x), top.score
    if scoring is not None and scoring.needs_sources:
        scoring = _score_sources(space, executor, log, done, scoring)
    wanted: list[Candidate] = []
    named: dict[str, dict[str, Any]] = {}
    fid = -1
    # a source's weights never change: its results (scored first, for the objective) are reused
    scored = {(r.kind, r.split): r.id for r in done.values() if r.kind.startswith("source:") and r.status == "ok"}

    def add(name: str, kind: str, x, source=None, splits=("search", "test")):
        nonlocal fid
        named[name] = {"kind": kind, "x": None if x is None else [float(v) for v in x], "source": source}
        for split in splits:
            i = scored.get((f"{kind}:{name}", split)) if source is not None else None
            if i is None:
                i, fid = fid, fid - 1
            wanted.append(Candidate(i, [] if x is None else [float(v) for v in x], -1, kind=f"{kind}:{name}",
                                    split=split, source=source))
            named[name].setdefault("ids", {})[split] = i

    if best_x is not None:
        add("best", "best", best_x)
    for name, x in (baselines if baselines is not None else {"start": space.x0}).items():
        add(name, "baseline", space.clip(x))
    if sources:
        for name, m in _sources(space):
            add(name, "source", None, source=m)
    # scored already, unless under the same name another genome was (the best of a finished
    # run resumed with a larger budget): the later record is the one read back
    todo = [c for c in wanted if (c.kind, c.id) not in done or done[(c.kind, c.id)].x != c.x]
    for res in executor.map(todo):
        log.append(_rescore(res, scoring))
        done[(res.kind, res.id)] = res
    rows = {}
    for name, info in named.items():
        row = {"kind": info["kind"]}
        for split, i in info["ids"].items():
            r = done[(f"{info['kind']}:{name}", i)]
            row[split] = r.metrics if r.status == "ok" else {"error": r.error}
            if scoring is not None and r.status == "ok":  # the objective, the mean and the worst task
                row.setdefault("objective", {})[split] = scoring.summary(r.metrics)
        if info["x"] is not None:
            row["genome"] = dict(zip(space.names, info["x"]))
        if info["source"] is not None:
            row["model"] = info["source"]
        rows[name] = row
    ok = [r for r in searched if r.status == "ok" and r.reused is None]  # evaluations run (timings)
    summary = {
        "warnings": _warnings(space, named, rows) + list((search or {}).pop("warnings", [])),
        "evaluations": n_search,
        "failed": sum(1 for r in searched if r.status != "ok"),
        "reused": sum(1 for r in searched if r.reused is not None),  # identical genomes: scored once
        # workers that died and were started again since this run (or its last resume) began
        "workers_replaced": int(getattr(executor, "replaced", 0)),
        "best_search_score": best_score,
        "space": space.describe(),
        "strategy": getattr(strategy, "name", type(strategy).__name__),
        "objectives": getattr(strategy, "objectives", None),
        "objective": None if scoring is None else scoring.describe(),
        "results": rows,
        "seconds_per_candidate": float(np.mean([r.wall_s for r in ok])) if ok else None,
        "materialize_seconds_per_candidate": float(np.mean([r.materialize_s for r in ok])) if ok else None,
        "config": dict(config or {}),
        # how candidates were fed to the workers, and the workers' busy time over the wall time of
        # the search (this process's part of it, after a resume)
        "search": dict(search or {}),
    }
    if best_x is not None:
        atomic_write(run_dir / "best_recipe.yaml", space.recipe_yaml(best_x))
    atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n")
    return summary
