"""Multi-fidelity search on the zoo: the same final score for fewer forward passes?

    python scripts/bench_fidelity.py --zoo zoo                      # 3 seeds, the quickstart's search
    python scripts/bench_fidelity.py --zoo zoo --share 0.25 --promote 0.25 --budget 200 --seeds 0,1,2

For each seed it runs the quickstart search (per-layer CMA-ES over task-arithmetic weights,
``evomerge models.zoo_dir=ZOO seed=S budget=B``) twice from the command line: scoring every
candidate on the whole search split, and with ``fidelity.share=SHARE fidelity.promote=P``
(every candidate first on that share of each task's search rows, each generation's best
``P`` share on all of them). It prints, per seed and as means:

* the best's test score (mean over tasks) and worst task of both, and their difference;
* the forward passes each search spent, in evaluations of the whole search split
  (``summary.json``'s ``search.cost``), and the share the multi-fidelity search saved;
* how well a first look ranks candidates: the Spearman correlation, over every candidate of
  the full search, between its score on the share (scored here, in-process, on the same
  rows a multi-fidelity search would use) and its score on the whole split; and how many of
  the full search's best 10% a first look puts in its own best ``P`` share.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402


def ranks(v: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their mean rank."""
    order = np.argsort(v, kind="stable")
    r = np.empty(len(v))
    r[order] = np.arange(1, len(v) + 1)
    for value in np.unique(v):
        tie = v == value
        r[tie] = r[tie].mean()
    return r


def spearman(a, b) -> float:
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    return float(np.corrcoef(ra, rb)[0, 1])


def search(zoo: str, seed: int, budget: int, run: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "evomerge.app", f"models.zoo_dir={zoo}", f"seed={seed}", f"budget={budget}",
           "progress=false", f"hydra.run.dir={run}", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads((run / "summary.json").read_text())


def first_looks(zoo: str, run: Path, share: float) -> tuple[list[float], list[float]]:
    """Every candidate of a full search scored again on the share of the search split a
    multi-fidelity search would use, in this process: (first looks, whole-split scores)."""
    import torch
    from hydra import compose, initialize_config_dir

    from evomerge import app
    from evomerge.execute import Worker
    from evomerge.trials import TrialLog
    from evomerge.types import Candidate

    torch.set_num_threads(2)
    with initialize_config_dir(str(app.conf_dir()), version_base=None):
        cfg = compose("config", overrides=[f"models.zoo_dir={zoo}"])
    base, experts, zoo_obj = app._models(cfg)
    space = app.build_space(cfg, base, experts)
    evaluator = app.build(cfg.eval, **app._eval_kwargs(cfg, zoo_obj))
    worker = Worker(space, evaluator)
    low, full = [], []
    for r in TrialLog(run / "trials.jsonl"):
        if r.kind == "search" and r.status == "ok" and r.reused is None:
            res = worker.evaluate(Candidate(r.id, r.x, fidelity=share))
            if res.status != "ok":
                raise SystemExit(f"candidate {r.id}: {res.error}")
            low.append(res.score)
            full.append(r.score)
    return low, full


def worst(summary: dict) -> tuple[str, float]:
    test = summary["results"]["best"]["test"]
    tasks = {k.split("/")[0]: v for k, v in test.items() if k.endswith("/acc")}
    name = min(tasks, key=tasks.get)
    return name, tasks[name]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="zoo")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--budget", type=int, default=200)
    ap.add_argument("--share", type=float, default=0.25)
    ap.add_argument("--promote", type=float, default=0.25)
    ap.add_argument("--keep", help="keep the run directories here")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp())
    rows = []
    for seed in seeds:
        full = search(args.zoo, seed, args.budget, out / f"full-{seed}", [])
        multi = search(args.zoo, seed, args.budget, out / f"multi-{seed}",
                       [f"fidelity.share={args.share}", f"fidelity.promote={args.promote}"])
        low, whole = first_looks(args.zoo, out / f"full-{seed}", args.share)
        top = set(np.argsort(whole)[::-1][: max(1, len(whole) // 10)].tolist())
        kept = set(np.argsort(low)[::-1][: max(1, int(np.ceil(args.promote * len(low))))].tolist())
        rows.append({
            "seed": seed,
            "full_test": full["results"]["best"]["test"]["score"], "full_worst": worst(full),
            "multi_test": multi["results"]["best"]["test"]["score"], "multi_worst": worst(multi),
            "full_cost": full["search"]["cost"], "multi_cost": multi["search"]["cost"],
            "promoted": multi["search"]["promoted"], "candidates": multi["evaluations"],
            "spearman": spearman(low, whole), "top_kept": len(top & kept) / len(top),
        })
        r = rows[-1]
        print(f"seed {seed}: full {r['full_test']:.4f} (cost {r['full_cost']:.1f}); multi-fidelity "
              f"{r['multi_test']:.4f} (cost {r['multi_cost']:.1f}, {r['promoted']} of {r['candidates']} promoted); "
              f"Spearman {r['spearman']:.3f}, full top 10% in the first looks' top {args.promote:.0%}: "
              f"{r['top_kept']:.0%}", flush=True)
    print(f"\nshare {args.share}, promote {args.promote}, budget {args.budget} candidates, seeds {seeds}")
    print("| seed | full: test (worst task) | cost | multi-fidelity: test (worst task) | cost | saved | "
          "Spearman | top 10% kept |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['full_test']:.1%} ({r['full_worst'][0]} {r['full_worst'][1]:.1%}) | "
              f"{r['full_cost']:.1f} | {r['multi_test']:.1%} ({r['multi_worst'][0]} {r['multi_worst'][1]:.1%}) | "
              f"{r['multi_cost']:.1f} | {1 - r['multi_cost'] / r['full_cost']:.0%} | {r['spearman']:.3f} | "
              f"{r['top_kept']:.0%} |")
    m = {k: float(np.mean([r[k] for r in rows])) for k in ("full_test", "multi_test", "full_cost", "multi_cost",
                                                            "spearman", "top_kept")}
    print(f"| mean | {m['full_test']:.1%} | {m['full_cost']:.1f} | {m['multi_test']:.1%} | {m['multi_cost']:.1f} | "
          f"{1 - m['multi_cost'] / m['full_cost']:.0%} | {m['spearman']:.3f} | {m['top_kept']:.0%} |")
    print(f"test score, multi-fidelity minus full: {100 * (m['multi_test'] - m['full_test']):+.1f} points; "
          f"forward passes: {m['multi_cost'] / m['full_cost']:.2f} of the full search's")


if __name__ == "__main__":
    main()
