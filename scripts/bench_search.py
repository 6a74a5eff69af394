"""Per-candidate cost of a search: materialize + evaluate in memory, against the disk round trip.

    python scripts/bench_search.py                        # the zoo (./zoo, built if missing)
    python scripts/bench_search.py --hidden 512 --layers 8 # a larger synthetic family, to see the floor

For one merge method and a per-layer genome space, prints:
  * the fixed cost of a candidate's parameters: the compiled coefficient map against the
    recipe round trip (write, parse, resolve) it replaced;
  * materialize time per candidate (the resident engine writing into the live model) against
    the memory-bandwidth floor: bytes of the resident inputs read plus the model's bytes
    written, over the copy bandwidth of a large torch ``clone`` measured in the same run;
    within the search loop (evaluations in between) and alone, candidate after candidate,
    where on the CPU it is also timed with the fused kernels off (the torch path), and the
    fixed cost outside the arithmetic (the kernels' work replaced by a call that returns);
  * evaluate time per candidate, and the loop's overhead outside evaluation (trial log, strategy,
    planning) as a share of a candidate's time, from a real ``run_search``;
  * the time per candidate of the path a mergekit-evolve user takes: write the merge to disk,
    load it with ``from_pretrained``, evaluate; and the ratio of candidates per hour.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 1 << 30, device: str = "cpu") -> float:
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    y = x.clone()
    best = float("inf")
    for _ in range(3):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best  # read + write


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="zoo")
    ap.add_argument("--hidden", type=int, default=None, help="use a synthetic family of this width instead")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--method", default="ties")
    ap.add_argument("--candidates", type=int, default=20)
    ap.add_argument("--limit", type=int, default=100, help="search examples per task (zoo)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", help="where the models live and the merge runs (cpu or cuda)")
    ap.add_argument("--compile", type=int, default=0, help="1: merge through torch.compile (the first candidate compiles)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM

    from evomerge.evaluate import build_evaluator
    from evomerge.execute import LocalExecutor, Worker
    from evomerge.merge.engine import Merger
    from evomerge.search import RandomSearch, run_search
    from evomerge.space import Space

    work = Path(tempfile.mkdtemp(prefix="bench_search_"))
    try:
        if a.hidden:
            from evomerge.testing import tiny_family
            from evomerge.zoo import ZooConfig, write_data

            fam = tiny_family(work / "fam", n_experts=4, hidden=a.hidden, layers=a.layers)
            base, experts = str(fam["base"]), [str(fam[f"expert_{i}"]) for i in range(4)]
            data = write_data(ZooConfig(), work)
            ev = build_evaluator("perplexity", data={s: [data[t][f] for t in data] for s, f in
                                                     (("search", "validation"), ("test", "test"))},
                                 limit=a.limit, batch_size=64)
            what = f"synthetic family, hidden {a.hidden}, {a.layers} layers"
        else:
            from evomerge.zoo import build_zoo

            z = build_zoo(a.zoo)
            base, experts = str(z.base), [str(p) for p in z.experts.values()]
            ev = build_evaluator("accuracy", data_dir=z.root, tasks=z.tasks, limit=a.limit)
            what = f"zoo {a.zoo}"
        search = ["weight", "density"] if a.method in ("ties", "dare_ties", "breadcrumbs") else ["weight"]
        sp = Space(a.method, experts, base_model=base, search=search, granularity="per_layer")
        worker = Worker(sp, ev, device=a.device, compile=bool(a.compile))
        n_params = sum(p.numel() for p in worker.model.parameters())
        model_bytes = sum(p.numel() * p.element_size() for p in worker.model.parameters())
        print(f"{what}: {n_params / 1e6:.2f}M parameters per model, {len(experts)} experts, {a.method}, "
              f"{len(sp)} genes, {a.threads} threads, device {a.device}, compile {bool(a.compile)}")

        bw = copy_bandwidth(device=a.device)
        floor = (worker.engine.nbytes + model_bytes) / bw
        rng = np.random.default_rng(0)
        genomes = [rng.uniform(sp.lower, sp.upper) for _ in range(a.candidates)]
        mat, evs = [], []
        for x in genomes:
            sync(a.device)
            t0 = time.perf_counter()
            worker.engine.materialize(worker.coefficients.columns(x), into=worker.model)
            sync(a.device)
            t1 = time.perf_counter()
            with torch.no_grad():
                ev(worker.model, worker.tokenizer, split="search")
            sync(a.device)
            t2 = time.perf_counter()
            mat.append(t1 - t0)
            evs.append(t2 - t1)
        m, e = statistics.median(mat), statistics.median(evs)
        # the same candidates with the fused CPU kernels off: the torch path
        from evomerge.merge import native

        # the fixed cost of a candidate outside the arithmetic: the same materialize with the
        # kernels' work replaced by a call that returns at once (the parameters, the masks'
        # tables, the live model's tensors, the threads' dispatch and the checks remain)
        from evomerge.merge import flat

        fixed = []
        if a.device == "cpu" and not a.compile and native.available():
            class _NoWork:
                @staticmethod
                def em_task_arithmetic_many(*args):
                    return 0

            real = flat.FlatGroup._merge_native
            flat.FlatGroup._merge_native = lambda self, lib, *r, **k: real(self, _NoWork, *r, **k)
            try:
                for x in genomes:
                    t0 = time.perf_counter()
                    worker.engine.materialize(worker.coefficients.columns(x), into=worker.model)
                    fixed.append(time.perf_counter() - t0)
            finally:
                flat.FlatGroup._merge_native = real
        def tight(n: int) -> float:  # materialize alone, candidate after candidate (warm caches)
            out = []
            for x in genomes[:n]:
                sync(a.device)
                t0 = time.perf_counter()
                worker.engine.materialize(worker.coefficients.columns(x), into=worker.model)
                sync(a.device)
                out.append(time.perf_counter() - t0)
            return statistics.median(out)

        n_tight = max(3, a.candidates // 2)
        alone = tight(n_tight)
        eager = None
        if a.device == "cpu" and not a.compile and native.available():
            with native.disabled():
                eager = tight(n_tight)

        # the fixed cost of turning a genome into every tensor's parameters: the compiled
        # map (what a worker does) against writing, parsing and resolving a recipe
        def per_call(fn) -> float:
            t0 = time.perf_counter()
            for x in genomes:
                fn(x)
            return (time.perf_counter() - t0) / len(genomes)

        via_map = min(per_call(worker.coefficients.columns) for _ in range(5))
        via_recipe = min(per_call(lambda x: worker.engine.columns(sp.recipe(x))) for _ in range(5))

        # the loop's own overhead: a real search, minus the worker's time
        t0 = time.perf_counter()
        out = run_search(sp, RandomSearch(sp, seed=0, batch=a.candidates), LocalExecutor(worker), work / "run",
                         budget=a.candidates, progress=False, sources=False, baselines={})
        loop_total = time.perf_counter() - t0
        from evomerge.trials import TrialLog

        recs = [r for r in TrialLog(work / "run" / "trials.jsonl") if r.kind == "search"]
        worker_time = sum(r.wall_s for r in recs)
        finals = sum(r.wall_s for r in TrialLog(work / "run" / "trials.jsonl") if r.kind != "search")
        overhead = (loop_total - worker_time - finals) / len(recs)
        walls = [r.wall_s for r in recs]
        per_candidate = statistics.median(walls) + overhead
        print("search loop, wall time of each candidate (s):", " ".join(f"{w:.3f}" for w in walls))

        # the disk round trip: write the merge, load it, evaluate
        disk = []
        for x in genomes[: max(3, a.candidates // 4)]:
            t0 = time.perf_counter()
            out_dir = work / "merged"
            Merger(sp.recipe(x), device=a.device).write(out_dir, overwrite=True, progress=False)
            model = AutoModelForCausalLM.from_pretrained(out_dir).to(a.device).eval()
            with torch.no_grad():
                ev(model, worker.tokenizer, split="search")
            sync(a.device)
            disk.append(time.perf_counter() - t0)
            shutil.rmtree(out_dir)
        d = statistics.median(disk)

        rows = [
            ("copy bandwidth (1 GiB clone, read + write)", f"{bw / 1e9:.1f} GB/s"),
            ("resident inputs read + model written", f"{(worker.engine.nbytes + model_bytes) / 1e6:.1f} MB"),
            ("bandwidth floor per materialize", f"{floor * 1e3:.2f} ms"),
            ("materialize per candidate (median)", f"{m * 1e3:.2f} ms ({m / floor:.1f}x the floor)"),
            ("materialize alone, candidate after candidate (median)", f"{alone * 1e3:.2f} ms ({alone / floor:.1f}x "
                                                                       "the floor)"),
            *([("the same with the fused CPU kernels off (torch path)",
                f"{eager * 1e3:.2f} ms ({eager / floor:.1f}x the floor, {eager / alone:.1f}x the time)")]
              if eager is not None else []),
            *([("fixed cost per candidate outside the arithmetic (columns + materialize, median)",
                f"{statistics.median(fixed) * 1e3:.3f} ms")] if fixed else []),
            ("genome -> parameters: compiled map vs recipe round trip",
             f"{via_map * 1e3:.3f} ms vs {via_recipe * 1e3:.3f} ms ({via_recipe / via_map:.0f}x)"),
            ("evaluate per candidate (median)", f"{e * 1e3:.1f} ms"),
            ("search loop per candidate (run_search, median + loop overhead)", f"{per_candidate * 1e3:.1f} ms"),
            ("overhead outside the worker", f"{overhead * 1e3:.2f} ms ({100 * overhead / per_candidate:.1f}% "
                                            "of a candidate)"),
            ("disk round trip per candidate (write, load, evaluate)", f"{d * 1e3:.1f} ms"),
            ("candidates per hour: in memory vs disk round trip",
             f"{3600 / per_candidate:.0f} vs {3600 / d:.0f} ({d / per_candidate:.1f}x)"),
        ]
        w = max(len(k) for k, _ in rows)
        for k, v in rows:
            print(f"{k.ljust(w)}  {v}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
