"""Per-entry cost of the merge methods on one large tensor: the fused CPU kernels against
the torch path and the memory-copy floor, in one process, on one thread.

    python scripts/bench_kernels.py                     # the embedding of scripts/bench_merge.py's models
    python scripts/bench_kernels.py --n 4000000         # a synthetic bf16 tensor instead

The inputs (a base and three experts, bf16) are copied into memory first, so page faults
and disk reads are left out: what is timed is the arithmetic and the memory traffic. The
floor is the time to read the four inputs and write the output once at the bandwidth of
a 256 MiB fp32 copy measured in the same run. Best of --repeat calls per row.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from evomerge.merge import native
from evomerge.merge.methods import METHODS

# each writes into ``out`` (allocated once: fresh pages would be timed too)
CASES = {
    "linear": lambda b, x, o: METHODS["linear"].fn(None, [b, *x], weight=[0.25] * 4, out=o),
    "task_arithmetic": lambda b, x, o: METHODS["task_arithmetic"].fn(b, x, weight=[1 / 3] * 3, out=o),
    "ties": lambda b, x, o: METHODS["ties"].fn(b, x, weight=[1 / 3] * 3, density=[0.3] * 3, out=o),
    "dare_linear": lambda b, x, o: METHODS["dare_linear"].fn(b, x, weight=[1 / 3] * 3, density=[0.3] * 3,
                                                             seeds=[1, 2, 3], out=o),
    "dare_ties": lambda b, x, o: METHODS["dare_ties"].fn(b, x, weight=[1 / 3] * 3, density=[0.3] * 3,
                                                         seeds=[1, 2, 3], out=o),
    "breadcrumbs": lambda b, x, o: METHODS["breadcrumbs"].fn(b, x, weight=[1 / 3] * 3, density=[0.3] * 3,
                                                             gamma=[0.01] * 3, out=o),
}


def inputs(args) -> tuple[torch.Tensor, list[torch.Tensor]]:
    root = Path(args.root)
    if args.n is None and (root / "base").is_dir():
        from evomerge.checkpoint import Checkpoint

        ts = [Checkpoint(root / m).get(args.tensor, copy=True) for m in ("base", "expert_0", "expert_1", "expert_2")]
        return ts[0], ts[1:]
    n = args.n or 4_000_000
    g = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=g) * 0.02
    return base.bfloat16(), [(base + torch.randn(n, generator=g) * 0.002).bfloat16() for _ in range(3)]


def best(fn, repeat: int) -> float:
    fn()
    t = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        t = min(t, time.perf_counter() - t0)
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".bench/merge/h1024-l24-v32000-e3")
    ap.add_argument("--tensor", default="model.embed_tokens.weight")
    ap.add_argument("--n", type=int, default=None, help="use a synthetic tensor of this many entries")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base, experts = inputs(args)
    n = base.numel()
    src, dst = torch.ones(1 << 26), torch.zeros(1 << 26)
    copy_bw = 2 * src.numel() * 4 / best(lambda: dst.copy_(src), args.repeat) / 1e9
    del src, dst
    out = torch.zeros_like(base)
    floor = (base.element_size() * n * 5) / (copy_bw * 1e9)
    print(f"{n / 1e6:.1f}M entries, {base.dtype}, 3 experts; one thread; copy bandwidth {copy_bw:.1f} GB/s; "
          f"floor (read 4 inputs, write 1) {floor / n * 1e9:.2f} ns/entry; kernels: "
          f"{'in use' if native.available() else 'unavailable'}")
    print(f"{'method':16s} {'kernels':>10s} {'torch path':>11s} {'speed-up':>9s} {'x floor':>8s}")
    for name, fn in CASES.items():
        fast = best(lambda: fn(base, experts, out), args.repeat)
        with native.disabled():
            slow = best(lambda: fn(base, experts, out), max(1, args.repeat - 1))
        print(f"{name:16s} {fast / n * 1e9:7.2f} ns {slow / n * 1e9:8.2f} ns {slow / fast:8.1f}x {fast / floor:7.1f}x",
              flush=True)


if __name__ == "__main__":
    main()
