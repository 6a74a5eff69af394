"""Worker utilization of the two ways a search feeds its workers, on a local Ray with 2 workers.

    python scripts/bench_async.py                 # candidates of uneven cost (sleeps), 40 per search
    python scripts/bench_async.py --zoo zoo       # also real searches on the zoo, from the command line

``generational`` asks a batch, scores all of it, then tells it: a worker that finishes early
waits for the slowest candidate of its batch. ``async`` (``executor.mode=async``) asks for the
next candidate whenever a worker is free. For each strategy and mode this prints the workers'
utilization (their busy time over the search's wall time, as ``summary.json`` reports it),
the wall time, and its ratio to the generational mode's without prefetch, all measured in
this run, with the Ray executor's ``prefetch`` at 0 (a worker gets its next candidate after
a round trip through the driver) and 1 (one waits at each worker).

The uneven costs are sleeps (a candidate costs 0.05 to 0.85 s, from its first gene), so the
figures do not depend on what else the machine's CPUs are doing; ``--zoo`` adds the real
per-layer task-arithmetic search on the zoo, whose candidates differ by how long their
generated answers are.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _sleeper(low: float, high: float):
    """A worker without models: a candidate sleeps from ``low`` to ``high`` seconds (by its
    first gene) and scores minus its distance to a target."""
    def build(shared=None):
        import time as _time

        import numpy as _np

        from evomerge.types import Result

        class Sleeper:
            name = "sleeper"

            def evaluate(self, cand):
                t0 = _time.perf_counter()
                x = _np.asarray(cand.x, dtype=float)
                _time.sleep(low + (high - low) * float(x[0]) if x.size else low)
                s = -float(_np.sum((x - 0.7) ** 2)) if x.size else 0.0
                return Result(cand.id, list(cand.x), "ok", s, {"score": s}, split=cand.split, worker=self.name,
                              kind=cand.kind, generation=cand.generation, wall_s=_time.perf_counter() - t0)
        return Sleeper()
    return build


def synthetic(strategies, budget: int, low: float, high: float, workdir: Path, prefetch: int) -> list[dict]:
    from evomerge.execute.ray import RayExecutor
    from evomerge.search import OptunaSearch, RandomSearch, SteadyStateEvolution, run_search
    from evomerge.space import Space

    space = Space("task_arithmetic", [f"m{i}" for i in range(6)], base_model="base",
                  search={"weight": {"lo": 0.0, "hi": 1.0, "x0": 0.5}}, granularity="per_model")
    make = {"random": lambda: RandomSearch(space, seed=0, batch=8),
            "optuna_tpe": lambda: OptunaSearch(space, "tpe", seed=0, batch=4),
            "steady": lambda: SteadyStateEvolution(space, seed=0, batch=8)}
    ex = RayExecutor(_sleeper(low, high), num_workers=2, cpus_per_worker=1, num_cpus=2, prefetch=prefetch)
    rows = []
    try:
        for name in strategies:
            for mode in ("generational", "async"):
                t0 = time.perf_counter()
                out = run_search(space, make[name](), ex, workdir / f"{name}-{mode}-{prefetch}", budget=budget,
                                 progress=False, sources=False, baselines={}, mode=mode)
                rows.append({"models": "sleeps", "strategy": name, "mode": mode, "prefetch": prefetch,
                             "evaluations": out.evaluations,
                             "utilization": out.summary["search"]["utilization"],
                             "search_s": out.summary["search"]["seconds"], "total_s": time.perf_counter() - t0,
                             "best": out.best_score})
    finally:
        ex.close()
    return rows


def zoo_runs(zoo: str, budget: int, workdir: Path, prefetch: int, strategies) -> list[dict]:
    rows = []
    batches = {"random": "search.batch=8", "optuna_tpe": "search.batch=4", "steady": "search.batch=8"}
    for search, batch in ((s, batches[s]) for s in strategies):
        for mode in ("generational", "async"):
            run = workdir / f"zoo-{search}-{mode}-{prefetch}"
            cmd = [sys.executable, "-m", "evomerge.app", f"models.zoo_dir={zoo}", f"search={search}", batch,
                   "executor=ray", "executor.num_workers=2", "executor.num_cpus=2", "threads=1",
                   f"executor.mode={mode}", f"executor.prefetch={prefetch}", f"budget={budget}", "progress=false",
                   f"hydra.run.dir={run}"]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
            s = json.loads((run / "summary.json").read_text())
            rows.append({"models": "zoo", "strategy": search, "mode": mode, "prefetch": prefetch,
                         "evaluations": s["evaluations"],
                         "utilization": s["search"]["utilization"], "search_s": s["search"]["seconds"],
                         "best": s["best_search_score"], "test": s["results"]["best"]["test"]["score"]})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=40)
    ap.add_argument("--low", type=float, default=0.05)
    ap.add_argument("--high", type=float, default=0.85)
    ap.add_argument("--strategies", default="random,optuna_tpe")
    ap.add_argument("--zoo", help="also run the zoo's search from the command line (a zoo folder)")
    ap.add_argument("--zoo-budget", type=int, default=40)
    ap.add_argument("--prefetch", default="0,1", help="the Ray executor's prefetch values to compare")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for prefetch in map(int, args.prefetch.split(",")):
            rows += synthetic(args.strategies.split(","), args.budget, args.low, args.high, Path(tmp), prefetch)
        if args.zoo:
            for prefetch in map(int, args.prefetch.split(",")):
                rows += zoo_runs(args.zoo, args.zoo_budget, Path(tmp), prefetch, args.strategies.split(","))
    print(f"{'models':7} {'strategy':11} {'mode':13} {'prefetch':>8} {'evals':>5} {'busy':>6} {'search s':>9} "
          f"{'vs gen., no prefetch':>21}")
    wall = {}
    for r in rows:
        key = (r["models"], r["strategy"])
        if r["mode"] == "generational" and key not in wall:
            wall[key] = r["search_s"]
        print(f"{r['models']:7} {r['strategy']:11} {r['mode']:13} {r['prefetch']:8d} {r['evaluations']:5d} "
              f"{r['utilization']:6.1%} {r['search_s']:9.2f} {wall[key] / r['search_s']:20.2f}x"
              + (f"  test {r['test']:.4f}" if "test" in r else ""))


if __name__ == "__main__":
    main()
