"""One-shot merge throughput: evomerge-merge against the memory-copy floor and mergekit.

    python scripts/bench_merge.py                       # 374M-parameter bf16 models, 1 base + 3 experts
    python scripts/bench_merge.py --hidden 256 --layers 4 --vocab 4096   # a quick smoke run
    python scripts/bench_merge.py --mergekit /path/to/mergekit-yaml      # compare with mergekit
    python scripts/bench_merge.py --torch-path        # also without the fused CPU kernels

Builds (once, cached under .bench/) a Llama-shaped base and three experts (base plus a
random task vector) written directly as bf16 safetensors, then merges them with linear,
task_arithmetic, ties, dare_ties and slerp. Each merge runs in its own process so that its
peak resident memory can be read; the input files are read once beforehand so both tools
start from a warm page cache. Prints, for each method, input GB read per second, peak
memory, and the ratios to (a) a large torch clone measured in the same run and (b) mergekit
on the same recipe, when ``mergekit-yaml`` is found (mergekit is never a dependency: install
it in a separate virtual environment to compare).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = {
    "linear": {"weights": True, "base_in_models": False},
    "task_arithmetic": {"weights": True},
    "ties": {"weights": True, "density": 0.3},
    "dare_ties": {"weights": True, "density": 0.3},
    "slerp": {},
}


def build_models(root: Path, hidden: int, layers: int, vocab: int, experts: int) -> list[Path]:
    """Base + experts as bf16 safetensors; deterministic; skipped when present."""
    from safetensors.torch import save_file

    from evomerge.testing import tiny_config, tiny_tokenizer

    inter = int(hidden * 2.75) // 64 * 64
    cfg = tiny_config(hidden=hidden, layers=layers, vocab=vocab)
    cfg.intermediate_size = inter
    cfg.num_attention_heads = max(1, hidden // 64)
    cfg.num_key_value_heads = cfg.num_attention_heads
    cfg.head_dim = hidden // cfg.num_attention_heads  # the shapes below: the models load in transformers too
    cfg.dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]
    names = ["base"] + [f"expert_{i}" for i in range(experts)]
    paths = [root / n for n in names]
    if all((p / "model.safetensors.index.json").is_file() or (p / "model.safetensors").is_file() for p in paths):
        for p in paths:  # (a config written before head_dim was set)
            cfg.save_pretrained(p)
        return paths
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        kv = cfg.num_key_value_heads * (hidden // cfg.num_attention_heads)
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        })
    tok = tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
            for k, s in shapes.items()}
    for j, path in enumerate(paths):
        path.mkdir(parents=True, exist_ok=True)
        if j == 0:
            sd = base
        else:
            sd = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.002).to(torch.bfloat16) for k, v in base.items()}
        # two shards, as real checkpoints come
        keys = list(sd)
        half = len(keys) // 2
        wm = {}
        for s, part in enumerate((keys[:half], keys[half:])):
            fn = f"model-{s + 1:05d}-of-00002.safetensors"
            save_file({k: sd[k].contiguous() for k in part}, str(path / fn), metadata={"format": "pt"})
            wm.update({k: fn for k in part})
        total = sum(v.numel() * 2 for v in sd.values())
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
        cfg.save_pretrained(path)
        tok.save_pretrained(path)
        if j:
            del sd
    return paths


def recipe_for(method: str, paths: list[Path]) -> dict:
    base, experts = str(paths[0]), [str(p) for p in paths[1:]]
    spec = METHODS[method]
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base,
                "models": [{"model": base}, {"model": experts[0]}],
                "parameters": {"t": 0.4}, "dtype": "bfloat16"}
    models = []
    for e in experts:
        p = {"weight": round(1 / len(experts), 4)}
        if "density" in spec:
            p["density"] = spec["density"]
        models.append({"model": e, "parameters": p})
    r = {"merge_method": method, "models": models, "dtype": "bfloat16"}
    if method != "linear":
        r["base_model"] = base
    return r


def input_bytes(method: str, paths: list[Path]) -> int:
    used = paths[:2] if method == "slerp" else (paths[1:] if method == "linear" else paths)
    return sum(sum(f.stat().st_size for f in p.glob("*.safetensors")) for p in used)


def warm(paths: list[Path]) -> None:
    for p in paths:
        for f in p.glob("*.safetensors"):
            with open(f, "rb") as fh:
                while fh.read(1 << 26):
                    pass


def run_child(cmd: list[str], env: dict | None = None) -> tuple[float, float, int]:
    """Run cmd in a child that reports its own wall time and peak RSS."""
    wrapper = [sys.executable, __file__, "--child", "--", *cmd]
    out = subprocess.run(wrapper, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed:\n{out.stderr[-3000:]}")
    line = [x for x in out.stdout.splitlines() if x.startswith("BENCH ")][-1]
    _, secs, rss_kb, rc = line.split()
    return float(secs), int(rss_kb) / 2**20, int(rc)


def child_main(cmd: list[str]) -> None:
    t0 = time.perf_counter()
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr).returncode
    secs = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"BENCH {secs:.3f} {rss} {rc}")
    sys.exit(rc)


def copy_bandwidth(gb: float = 1.0, device: str = "cpu") -> float:
    """GB/s of a large fp32 clone on ``device`` (bytes read + bytes written over time)."""
    x = torch.ones(int(gb * 2**30 / 4), device=device)
    x.clone()
    best = float("inf")
    for _ in range(3):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        y = x.clone()
        if x.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        del y
    return 2 * x.numel() * 4 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--root", default=".bench/merge")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"),
                    help="path to mergekit-yaml (default: found on PATH)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and method (best is reported)")
    ap.add_argument("--device", default="cpu", help="where both tools do the arithmetic (cpu or cuda)")
    ap.add_argument("--torch-path", action="store_true",
                    help="also time evomerge with its fused CPU kernels turned off (EVOMERGE_NATIVE=0)")
    args = ap.parse_args()

    root = Path(args.root) / f"h{args.hidden}-l{args.layers}-v{args.vocab}-e{args.experts}"
    t0 = time.perf_counter()
    paths = build_models(root, args.hidden, args.layers, args.vocab, args.experts)
    n_params = sum(v for v in [json.loads((paths[0] / "model.safetensors.index.json").read_text())["metadata"]["total_size"] // 2])
    print(f"models: {len(paths)} x {n_params / 1e6:.0f}M parameters (bf16) in {root} "
          f"(ready in {time.perf_counter() - t0:.0f}s)")
    bw = copy_bandwidth()
    print(f"memory copy bandwidth (fp32 clone of 1 GiB, read+write): {bw:.1f} GB/s; torch threads {torch.get_num_threads()}")
    from evomerge.merge import native

    # built here, once, so that no timed run pays for compiling them
    print("fused CPU kernels: " + ("in use" if native.available() else "unavailable (the torch path runs)"))
    if args.device != "cpu":
        print(f"{args.device} copy bandwidth (fp32 clone of 1 GiB, read+write): "
              f"{copy_bandwidth(device=args.device):.0f} GB/s ({torch.cuda.get_device_name()})")
    warm(paths)

    rows = []
    work = root / "work"
    for method in args.methods.split(","):
        rec = recipe_for(method, paths)
        rfile = work / f"{method}.yaml"
        rfile.parent.mkdir(parents=True, exist_ok=True)
        import yaml

        rfile.write_text(yaml.safe_dump(rec, sort_keys=False))
        gb = input_bytes(method, paths) / 1e9
        res = {}
        ours = [shutil.which("evomerge-merge")] if shutil.which("evomerge-merge") else [sys.executable, "-m", "evomerge.cli"]
        ev = [*ours, str(rfile), str(work / f"out-{method}"), "--no-progress", "--overwrite", "--device", args.device]
        tools = {"evomerge": (ev, None)}
        if args.torch_path:
            tools["torch_path"] = (ev, {"EVOMERGE_NATIVE": "0"})
        if args.mergekit:
            mk = [args.mergekit, str(rfile), str(work / f"mk-{method}"), "--random-seed", "0", "--quiet"]
            tools["mergekit"] = (mk + (["--cuda"] if args.device != "cpu" else []), None)
        for tool, (cmd, env) in tools.items():
            best = None
            for _ in range(args.repeat):
                shutil.rmtree(work / f"mk-{method}", ignore_errors=True)
                shutil.rmtree(work / f"out-{method}", ignore_errors=True)
                os.sync()  # start every run with no dirty pages left by the one before,
                time.sleep(3)  # and after the removal of the last output has settled
                secs, rss, _ = run_child(cmd, env)
                if best is None or secs < best[0]:
                    best = (secs, rss)
            res[tool] = best
        ours = res["evomerge"]
        row = {"method": method, "input_gb": gb, "secs": ours[0], "gbps": gb / ours[0], "peak_gib": ours[1],
               "vs_copy": (gb / ours[0]) / bw}
        if "mergekit" in res:
            row.update(mk_secs=res["mergekit"][0], mk_gbps=gb / res["mergekit"][0], mk_peak_gib=res["mergekit"][1],
                       speedup=res["mergekit"][0] / ours[0])
        rows.append(row)
        if "torch_path" in res:
            row.update(torch_secs=res["torch_path"][0], torch_peak_gib=res["torch_path"][1])
        msg = (f"{method:16s} in {gb:5.2f} GB  {row['secs']:7.2f}s  {row['gbps']:5.2f} GB/s  "
               f"peak {row['peak_gib']:5.2f} GiB  {row['vs_copy']:.3f} x copy bw")
        if "torch_secs" in row:
            msg += f" | torch path {row['torch_secs']:7.2f}s peak {row['torch_peak_gib']:5.2f} GiB"
        if "mk_secs" in row:
            msg += (f" | mergekit {row['mk_secs']:7.2f}s {row['mk_gbps']:5.3f} GB/s peak {row['mk_peak_gib']:5.2f} GiB"
                    f" | {row['speedup']:.1f}x faster")
        print(msg, flush=True)
    print(json.dumps({"copy_gbps": bw, "device": args.device, "rows": rows}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[3:])
    else:
        main()
