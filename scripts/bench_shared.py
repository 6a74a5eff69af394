"""How model weights reach Ray workers: each worker reading the checkpoints, against the
driver reading them once and the workers mapping them from Ray's object store.

    python scripts/bench_shared.py                          # 4 experts of a synthetic family, 2 workers
    python scripts/bench_shared.py --hidden 1024 --layers 16

Starts the same Ray executor twice (``share_weights`` off, then on) with a worker per CPU
and prints, for each: the time until every worker is built; checkpoint bytes read by the
driver (as put into the object store) and by the workers; each worker's resident memory
(RSS), the part of it that is its own heap (anonymous memory: copies, caches, the live
model) and the workers' proportional share (PSS: pages mapped by several workers, such as
the object store's, count once per node); and the time one candidate takes, with the
scores of the same candidates compared between the two.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402


def _memory(w):
    """Inside a worker: its pid, checkpoint bytes it read, and its memory (smaps_rollup, kB)."""
    out = {"pid": os.getpid(), "read": w.engine.bytes_read, "live_from": w.live_from}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts[0] in ("Rss:", "Pss:", "Anonymous:"):
                out[parts[0][:-1]] = int(parts[1]) * 1024
    return out


def _build(base, experts, data):
    def build(shared=None):
        from evomerge.evaluate import build_evaluator
        from evomerge.execute import Worker
        from evomerge.space import Space

        sp = Space("ties", experts, base_model=base, search=["weight", "density"], granularity="per_layer")
        ev = build_evaluator("perplexity", data=data, limit=32, batch_size=32)
        return Worker(sp, ev, shared=shared)
    return build


def _inputs(base, experts):
    def inputs():
        from evomerge.execute import shared_inputs
        from evomerge.space import Space

        return shared_inputs(Space("ties", experts, base_model=base, search=["weight", "density"],
                                   granularity="per_layer"))
    return inputs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--candidates", type=int, default=8)
    a = ap.parse_args()
    import ray

    from evomerge.execute.ray import RayExecutor
    from evomerge.types import Candidate
    from evomerge.testing import tiny_family
    from evomerge.zoo import ZooConfig, write_data

    work = Path(tempfile.mkdtemp(prefix="bench_shared_"))
    try:
        fam = tiny_family(work / "fam", n_experts=4, hidden=a.hidden, layers=a.layers)
        base, experts = str(fam["base"]), [str(fam[f"expert_{i}"]) for i in range(4)]
        files = write_data(ZooConfig(), work)
        data = {s: [files[t][f] for t in files] for s, f in (("search", "validation"), ("test", "test"))}
        ckpt = sum(f.stat().st_size for p in fam.values() for f in Path(p).glob("*.safetensors"))
        print(f"synthetic family: base + 4 experts, hidden {a.hidden}, {a.layers} layers, "
              f"{ckpt / 1e6:.0f} MB of checkpoints; {a.workers} Ray workers x 1 CPU")
        build = _build(base, experts, data)
        rows, scores = [], {}
        for share in (False, True):
            put_bytes = []
            make = _inputs(base, experts)

            def inputs():  # what the driver read and puts into the object store, measured
                shared = make()
                put_bytes.append(shared.nbytes)
                return shared

            t0 = time.perf_counter()
            ex = RayExecutor(build, num_workers=a.workers, cpus_per_worker=1, num_cpus=a.workers,
                             inputs=inputs, share_weights=share)
            put = time.perf_counter() - t0  # the driver's read and put (share) or nothing
            try:
                mem = ray.get([w.call.remote(_memory) for w in ex.actors])  # every worker built
                ready = time.perf_counter() - t0
                sp = ray.get(ex.actors[0].call.remote(lambda w: w.space))
                rng = np.random.default_rng(0)
                cands = [Candidate(i, [float(v) for v in rng.uniform(sp.lower, sp.upper)])
                         for i in range(a.candidates)]
                list(ex.map(cands[:a.workers]))  # warm
                t1 = time.perf_counter()
                res = list(ex.map(cands))
                per = (time.perf_counter() - t1) / len(res)
                scores[share] = {r.id: r.score for r in res}
            finally:
                ex.close()
            driver_read = sum(put_bytes)
            base_bytes = sum(f.stat().st_size for f in Path(base).glob("*.safetensors"))
            # the engine's reads, and the live model's own load of the base where it loads one
            wread = sum(m["read"] + (base_bytes if m["live_from"] == "checkpoint" else 0) for m in mem)
            rows.append(("object store" if share else "each worker reads", put, ready, driver_read, wread, mem, per))
        print(f"{'weights':18}  {'driver':>8}  {'all built':>9}  {'read by driver':>14}  {'read by workers':>15}  "
              f"{'RSS/worker':>10}  {'own heap/worker':>15}  {'PSS, all workers':>16}  {'candidate':>9}")
        for label, put, ready, dread, wread, mem, per in rows:
            rss, anon = (np.mean([m[k] for m in mem]) / 2**20 for k in ("Rss", "Anonymous"))
            pss = sum(m["Pss"] for m in mem) / 2**20
            print(f"{label:18}  {put:7.2f}s  {ready:8.2f}s  {dread / 1e6:11.0f} MB  {wread / 1e6:12.0f} MB  "
                  f"{rss:6.0f} MiB  {anon:11.0f} MiB  {pss:12.0f} MiB  {1e3 * per:6.0f} ms")
        same = sum(scores[True][i] == scores[False][i] for i in scores[True])
        print(f"scores equal between the two: {same} of {len(scores[True])} candidates; "
              f"live models from: {sorted({m['live_from'] for m in rows[1][5]})} with the object store")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
