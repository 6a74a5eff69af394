"""Candidates per minute through the executors: in-process against a local Ray.

    python scripts/bench_parallel.py                # the zoo, 40 candidates, this machine's CPUs
    python scripts/bench_parallel.py --device cuda  # one worker per GPU

Scores the same fixed list of per-layer TIES genomes through (a) the in-process executor
(one worker using every CPU thread), (b) Ray with one worker holding every CPU, and (c) Ray
with one worker per CPU (1 thread each), the Ray workers taking the weights from the object
store as the app does. Prints candidates per minute for each, and the
per-candidate overhead Ray adds: the wall time per candidate through one Ray worker minus
the time the worker itself spent on it.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402


def _build(zoo_root, base, experts, tasks, limit, device):
    def build(shared=None):
        from evomerge.evaluate import build_evaluator
        from evomerge.execute import Worker
        from evomerge.space import Space

        sp = Space("ties", experts, base_model=base, search=["weight", "density"], granularity="per_layer")
        return Worker(sp, build_evaluator("accuracy", data_dir=zoo_root, tasks=tasks, limit=limit), device=device,
                      shared=shared)
    return build


def _inputs(base, experts):
    def inputs():  # the weights, read once by the driver (the app's default)
        from evomerge.execute import shared_inputs
        from evomerge.space import Space

        return shared_inputs(Space("ties", experts, base_model=base, search=["weight", "density"],
                                   granularity="per_layer"))
    return inputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="zoo")
    ap.add_argument("--candidates", type=int, default=40)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    import torch

    from evomerge.execute import LocalExecutor
    from evomerge.execute.ray import RayExecutor
    from evomerge.types import Candidate
    from evomerge.zoo import build_zoo

    z = build_zoo(a.zoo)
    build = _build(str(z.root), str(z.base), [str(p) for p in z.experts.values()], z.tasks, a.limit, a.device)
    probe = build()
    sp = probe.space
    rng = np.random.default_rng(0)
    cands = [Candidate(i, [float(v) for v in rng.uniform(sp.lower, sp.upper)]) for i in range(a.candidates)]
    warm = [Candidate(-1 - i, [float(v) for v in sp.x0]) for i in range(2)]
    rows = []

    def measure(label, ex, workers):
        list(ex.map(warm * workers))  # every worker's caches built before timing
        t0 = time.perf_counter()
        res = list(ex.map(cands))
        wall = time.perf_counter() - t0
        assert all(r.status == "ok" for r in res), [r.error for r in res if r.status != "ok"]
        inside = sum(r.wall_s for r in res) / len(res)
        rows.append((label, 60 * len(res) / wall, wall / len(res), inside))
        return {r.id: r.score for r in res}

    torch.set_num_threads(a.cpus)
    ref = measure(f"local, 1 worker x {a.cpus} threads", LocalExecutor(probe), 1)
    del probe
    for label, n, cpus in ((f"ray, 1 worker x {a.cpus} CPUs", 1, a.cpus), (f"ray, {a.cpus} workers x 1 CPU", a.cpus, 1)):
        ex = RayExecutor(build, num_workers=n, cpus_per_worker=cpus, num_cpus=a.cpus,
                         inputs=_inputs(str(z.base), [str(p) for p in z.experts.values()]),
                         gpus_per_worker=1 if a.device.startswith("cuda") else 0)
        try:
            got = measure(label, ex, n)
        finally:
            ex.close()
        diff = sum(1 for i in ref if got[i] != ref[i])
        if diff:  # other thread counts can round a logit differently: say so, do not hide it
            print(f"{label}: {diff} of {len(ref)} candidates scored differently from the in-process run")
    w = max(len(r[0]) for r in rows)
    print(f"zoo {a.zoo}: {a.candidates} per-layer TIES candidates, accuracy on {a.limit} examples per task")
    print(f"{'executor'.ljust(w)}  candidates/min  wall/candidate  worker/candidate")
    for label, cpm, wall, inside in rows:
        print(f"{label.ljust(w)}  {cpm:14.1f}  {1e3 * wall:11.1f} ms  {1e3 * inside:13.1f} ms")
    one = rows[1]
    print(f"Ray's overhead per candidate (1 worker: wall minus the worker's own time): "
          f"{1e3 * (one[2] - one[3]):.1f} ms; {a.cpus} workers vs local: {rows[2][1] / rows[0][1]:.2f}x "
          "the candidates per minute")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
