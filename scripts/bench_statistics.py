"""What the merges that read data cost: each statistic per model, and the merge after it.

    python scripts/bench_statistics.py                      # 374M-parameter bf16 models (bench_merge's)
    python scripts/bench_statistics.py --hidden 256 --layers 4 --vocab 4096 --examples 8   # a quick run

Builds (once, cached under .bench/, as ``bench_merge.py`` does) a Llama-shaped base and
three experts, and a JSON-lines file of ``--examples`` records of ``--chars`` characters.
Each step runs in its own process, so that its wall time and peak resident memory can be
read:

  * each statistic (``fisher``: a backward pass per record; ``gram``: one forward pass per
    batch, the Gram matrix of every linear layer's inputs) of one model, computed in
    float32 on the CPU: its own time scaled to 1,000 records, and the process's peak memory;
  * ``evomerge-merge`` of the three experts with ``fisher`` and with ``regmean``, the
    statistics already cached (the merge alone), and with an empty cache (statistics and
    merge: what a first merge costs);

  * ``evomerge-merge`` of two experts with ``weight_matching`` (the permutations found, then
    read from the cache), and with ``regmean_plus_plus`` and ``pleas`` (the merged model built
    layer by layer, on ``--sequential-examples`` records: a forward pass per linear layer and
    model, so their time grows with depth times data);

and what a 7B Llama (32 layers, hidden 4096, MLP 11008) would need: the statistics'
sizes, and the time scaled by parameters (Fisher) or by forward cost (Gram).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_merge  # noqa: E402


def one_statistic(name: str, folder: str, data: str, threads: int) -> None:
    """(child) Compute one statistic of one model, uncached; its own seconds (without the
    loading) go to ``DATA.seconds``."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge import statistics as S
    from evomerge.recipe import DataSpec

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(folder)
    # as a merge runs it: streamed (one block's weights at a time) for forward passes alone
    model = (S.load_streamed(folder) if getattr(S.STATISTICS[name], "forward_only", False) else
             AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    batches = S.examples(DataSpec(data, text="text", batch_size=8, limit=10**9), tok)
    t0 = time.perf_counter()
    S.STATISTICS[name]()(model, batches)
    Path(data + ".seconds").write_text(f"{time.perf_counter() - t0:.6f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--examples", type=int, default=16, help="records per statistic (the figures are per 1,000)")
    ap.add_argument("--chars", type=int, default=64, help="characters per record (one token each here)")
    ap.add_argument("--sequential-examples", type=int, default=4,
                    help="records for regmean_plus_plus and pleas (each linear layer runs every model over them)")
    ap.add_argument("--skip", default="",
                    help="comma-separated parts to leave out: statistics,data,align,sequential (or one of its methods, "
                         "regmean_plus_plus or pleas)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--root", default=".bench/merge")
    ap.add_argument("--one", nargs=3, metavar=("STAT", "MODEL", "DATA"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        one_statistic(*a.one, threads=a.threads)
        return 0
    root = Path(a.root) / f"h{a.hidden}-l{a.layers}-v{a.vocab}-e3"
    paths = bench_merge.build_models(root, a.hidden, a.layers, a.vocab, 3)
    params = json.loads((paths[0] / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data.jsonl"
        letters = "abcdefghijklmnopqrstuvwxyz0123456789+=:"
        data.write_text("".join(json.dumps({"text": "".join(rng.choice(letters) for _ in range(a.chars))}) + "\n"
                                for _ in range(a.examples)))
        print(f"models: 4 x {params / 1e6:.0f}M parameters (bf16), statistics in float32 on the CPU, "
              f"{a.threads} threads; {a.examples} records of {a.chars} tokens", flush=True)
        skip = set(a.skip.split(",")) - {""}
        stats = {}
        for name in () if "statistics" in skip else ("gram", "fisher"):
            secs, peak, _ = bench_merge.run_child([sys.executable, __file__, "--threads", str(a.threads), "--one",
                                                   name, str(paths[1]), str(data)])
            own = float(Path(str(data) + ".seconds").read_text())
            stats[name] = (own, peak)
            print(f"{name:7s} one model: {own:7.1f} s for {a.examples} records, {own * 1000 / a.examples:7.0f} s per "
                  f"1,000 records ({secs:.1f} s with loading the model), peak {peak:.2f} GiB", flush=True)
        env = {"EVOMERGE_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": str(a.threads)}
        for method, extra in () if "data" in skip else (("fisher", {}), ("regmean", {"parameters": {"alpha": 0.9}})):
            rec = {"merge_method": method, "models": [{"model": str(p)} for p in paths[1:]],
                   "data": {"path": str(data), "text": "text", "batch_size": 8}, "dtype": "float32",
                   "out_dtype": "bfloat16", **extra}
            rfile = tmp / f"{method}.yaml"
            rfile.write_text(json.dumps(rec))
            for label in ("statistics and merge", "merge, statistics cached"):
                out = tmp / f"out-{method}"
                cmd = [sys.executable, "-m", "evomerge.cli", str(rfile), str(out), "--no-progress", "--overwrite"]
                secs, peak, rc = bench_merge.run_child(cmd, env=env)
                if rc:
                    raise SystemExit(f"evomerge-merge {method} failed")
                print(f"{method:8s} {label:26s} {secs:7.1f} s, peak {peak:.2f} GiB", flush=True)
        small = tmp / "small.jsonl"
        small.write_text("".join(data.read_text().splitlines(keepends=True)[: a.sequential_examples]))
        runs = [] if "align" in skip else [("weight_matching", {}, ("alignment and merge", "merge, permutations cached"))]
        if "sequential" not in skip:
            runs += [(m, {"data": {"path": str(small), "text": "text", "batch_size": 8}}, ("statistics and merge",))
                     for m in ("regmean_plus_plus", "pleas") if m not in skip]
        for method, extra, labels in runs:
            rec = {"merge_method": method, "models": [{"model": str(p)} for p in paths[1:3]], "dtype": "float32",
                   "out_dtype": "bfloat16", **extra}
            rfile = tmp / f"{method}.yaml"
            rfile.write_text(json.dumps(rec))
            for label in labels:
                out = tmp / f"out-{method}"
                cmd = [sys.executable, "-m", "evomerge.cli", str(rfile), str(out), "--no-progress", "--overwrite"]
                secs, peak, rc = bench_merge.run_child(cmd, env=env)
                if rc:
                    raise SystemExit(f"evomerge-merge {method} failed")
                what = f" ({a.sequential_examples} records)" if "data" in extra else ""
                print(f"{method:17s} 2 models {label:26s} {secs:7.1f} s{what}, peak {peak:.2f} GiB", flush=True)
        # a 7B Llama: what the statistics hold, per model
        h, m, layers, vocab = 4096, 11008, 32, 32000
        p7 = layers * (4 * h * h + 3 * h * m) + 2 * vocab * h
        gram7 = layers * (6 * h * h + m * m)  # q, k, v, o, gate, up read h inputs; down reads m
        here_gram = a.layers * (6 * a.hidden ** 2 + (int(a.hidden * 2.75) // 64 * 64) ** 2)
        print(f"7B Llama (32 x {h}, MLP {m}): Fisher {p7 * 8 / 2**30:.0f} GiB per model in float64; Gram "
              f"matrices {gram7 * 8 / 2**30:.0f} GiB per model in float64; a Fisher pass about "
              f"{p7 / params:.0f}x this model's time per record, the Gram pass about the same factor", flush=True)
        print(f"(here: Fisher {params * 8 / 2**30:.1f} GiB, Gram matrices {here_gram * 8 / 2**30:.1f} GiB per model)")
        block7 = (4 * h * h + 3 * h * m) * 4  # one decoder block's weights in float32
        outside7 = 2 * vocab * h * 4  # the embeddings and the head
        print(f"7B alignment: weight matching holds the reference and the model in float32, "
              f"{2 * p7 * 4 / 2**30:.0f} GiB; activation matching runs both streamed, "
              f"{2 * (block7 + outside7) / 2**30:.1f} GiB of weights; pleas holds the merged model live in float32 "
              f"and runs each model streamed beside it, {(p7 * 4 + 2 * (block7 + outside7)) / 2**30:.0f} GiB for two "
              f"models, regmean_plus_plus the merged one, {p7 * 4 / 2**30:.0f} GiB; both pass through one block per "
              f"linear layer ({layers * 7 + 1} of them) over the data, and through each block once more to move on")
        print(f"7B Gram pass: one block streamed at a time, {(block7 + outside7) / 2**30:.1f} GiB of weights, "
              "besides the Gram matrices it holds")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
