"""Reproduce the classification claims of the merging literature on the vision zoo, and write
the "Classification" section of ``results/reproductions.md``.

    python scripts/reproduce_vision.py [--zoo zoo_vision] [--seeds 0,1,2] [--out results/reproductions.md]

Every search runs from the command line (``python -m evomerge.app experiment=vision_...``,
in-process executor) into ``--work``; every figure is the test split's mean top-1 accuracy
over the zoo's tasks (each through its own head), mean +- std over the seeds. The claims:

1. layer-wise AdaMerging > task-wise AdaMerging >= task arithmetic at its best lambda
   (chosen on validation), and AdaMerging++ >= AdaMerging (Yang et al. 2024);
2. greedy soup >= the best single ingredient on test, and >= the uniform soup
   (Wortsman et al. 2022), on three tasks' ingredients;
3. WiSE-FT: interpolating the base and a fine-tune keeps more of the base's accuracy on the
   other tasks at a small cost on the fine-tune's task (Wortsman et al. 2022);
4. Model Stock with 3 fine-tunes is about greedy soup (Jang et al. 2024);
5. CMA-ES per layer against layer-wise AdaMerging at the same number of forward passes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HEADER = "## Classification: the vision zoo"


def ms(vals) -> str:
    vals = [100 * v for v in vals]
    return f"{st.mean(vals):.1f} ± {st.pstdev(vals):.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


class Runner:
    def __init__(self, zoo: Path, work: Path, threads: int):
        self.zoo, self.work, self.threads = zoo, work, threads
        self.log: list[str] = []

    def run(self, name: str, *overrides: str) -> dict:
        """One search from the command line; its summary (reused when already there)."""
        run = self.work / name
        if (run / "summary.json").is_file():
            return json.loads((run / "summary.json").read_text())
        if run.exists():
            import shutil

            shutil.rmtree(run)
        zoo = [] if "models=custom" in overrides else [f"models.zoo_dir={self.zoo}", "models.zoo_kind=vision"]
        args = [sys.executable, "-m", "evomerge.app", *zoo, "executor=local", "progress=false",
                f"threads={self.threads}", *overrides, f"hydra.run.dir={run}"]
        t0 = time.perf_counter()
        r = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode != 0:
            raise SystemExit(f"{name} failed:\n{r.stderr[-3000:]}")
        secs = time.perf_counter() - t0
        self.log.append(f"{name}: {secs:.0f} s")
        print(f"{name}: {secs:.0f} s", flush=True)
        return json.loads((run / "summary.json").read_text())


def test_mean(summary: dict, key: str = "best") -> float:
    return float(summary["results"][key]["test"]["score"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="zoo_vision")
    ap.add_argument("--work", default="results/vision-reproductions")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="results/reproductions.md")
    ap.add_argument("--steps", type=int, default=500, help="AdaMerging's steps")
    ap.add_argument("--soup-tasks", default="digits,shape,count")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    from evomerge.vision.zoo import VisionZooConfig
    from evomerge.zoo import build_zoo, load_zoo

    zoo = load_zoo(a.zoo) if (Path(a.zoo) / "zoo.json").is_file() else build_zoo(a.zoo, VisionZooConfig())
    seeds = [int(s) for s in a.seeds.split(",")]
    R = Runner(zoo.root.resolve(), Path(a.work).resolve(), a.threads)
    t_all = time.perf_counter()
    out: list[str] = [HEADER, "", f"`python scripts/reproduce_vision.py --seeds {a.seeds}` on the vision zoo "
                      f"(`{zoo.root.name}`, key `{zoo.info['key']}`: {len(zoo.tasks)} tasks, "
                      f"{', '.join(zoo.tasks)}). Mean test accuracy over the tasks, each through its own head; "
                      f"mean ± std over seeds {a.seeds} where a seed changes the run.", ""]

    # 1. AdaMerging against task arithmetic
    ta = R.run("ta_grid", "experiment=vision_ta_grid")
    lam = ", ".join(f"{v:g}" for v in ta["results"]["best"]["genome"].values())
    ada = {k: [test_mean(R.run(f"adamerging_{k}_s{s}", f"experiment=vision_adamerging_{k}", f"seed={s}",
                                f"search.steps={a.steps}")) for s in seeds]
           for k in ("taskwise", "layerwise", "plus_plus")}
    base = test_mean(ta, "base")
    ta_best = test_mean(ta)
    tw, lw, pp = (st.mean(ada[k]) for k in ("taskwise", "layerwise", "plus_plus"))
    out += ["### AdaMerging (Yang et al. 2024)", "",
            f"Task arithmetic's lambda is the validation-best of 11 points in [0, 1] ({lam}); AdaMerging runs "
            f"{a.steps} Adam steps (lr 0.001, 16 unlabeled search images per task and step, coefficients from "
            "0.3 clamped to [0, 1]); layer-wise learns one coefficient per expert and weight tensor, as the paper's "
            "code does.", "",
            "| merge | test accuracy |", "|---|---|",
            f"| base | {100 * base:.1f} |", f"| task arithmetic, best lambda | {100 * ta_best:.1f} |",
            f"| task-wise AdaMerging | {ms(ada['taskwise'])} |", f"| layer-wise AdaMerging | {ms(ada['layerwise'])} |",
            f"| layer-wise AdaMerging++ | {ms(ada['plus_plus'])} |", ""]
    claims = [("layer-wise > task-wise", lw > tw), ("task-wise >= task arithmetic at its best lambda", tw >= ta_best),
              ("AdaMerging++ >= AdaMerging (layer-wise)", pp >= lw)]
    out += [f"- {c}: **{'holds' if ok else 'does not hold'}**" for c, ok in claims] + [""]

    # 2. greedy soup, 4. Model Stock
    soup_rows, stock_rows = [], []
    for task in a.soup_tasks.split(","):
        s = R.run(f"greedy_soup_{task}", "experiment=vision_greedy_soup", f"models.ingredients={task}")
        res = s["results"]
        singles = {k: v["test"]["score"] for k, v in res.items() if v.get("kind") == "source"}
        best_single = max(singles.values())
        uniform = res["start"]["test"]["score"]  # every ingredient at weight 0.5: the uniform soup
        greedy = res["best"]["test"]["score"]
        soup_rows.append((task, best_single, uniform, greedy))
        ingredients = [str(p) for p in zoo.ingredients(task)]
        stock = R.run(f"model_stock_{task}", "models=custom", f"models.base={zoo.base}",
                      f"models.experts=[{','.join(ingredients[:3])}]", "merge=model_stock", "eval=classification",
                      f"eval.data_dir={zoo.root}", f"eval.tasks=[{task}]", "budget=1")
        stock_rows.append((task, test_mean(stock), greedy))
    out += ["### Greedy soup (Wortsman et al. 2022) and Model Stock (Jang et al. 2024)", "",
            "Six fine-tunes of the base on one task (their own seeds; learning rates 0.3x to 2.5x the experts'; "
            "half the experts' steps): the best single one, the uniform soup, the greedy soup (ingredients ranked "
            "by validation accuracy, each kept only if the soup improves), and Model Stock over the first three.", "",
            "| task | best ingredient | uniform soup | greedy soup | Model Stock (3) |", "|---|---|---|---|---|"]
    for (task, bs, un, gr), (_, sk, _) in zip(soup_rows, stock_rows):
        out.append(f"| {task} | {100 * bs:.1f} | {100 * un:.1f} | {100 * gr:.1f} | {100 * sk:.1f} |")
    g_best = sum(gr >= bs for _, bs, _, gr in soup_rows)
    g_uni = sum(gr >= un for _, _, un, gr in soup_rows)
    close = sum(abs(sk - gr) <= 0.02 for _, sk, gr in stock_rows)
    n = len(soup_rows)
    out += ["", f"- greedy soup >= best ingredient: **{'holds' if g_best == n else 'does not hold'}** ({g_best} of {n})",
            f"- greedy soup >= uniform soup: **{'holds' if g_uni == n else 'does not hold'}** ({g_uni} of {n})",
            f"- Model Stock (3) within 2 points of greedy soup: **{'holds' if close == n else 'does not hold'}** "
            f"({close} of {n})", ""]

    # 3. WiSE-FT
    out += ["### WiSE-FT (Wortsman et al. 2022)", "",
            "theta = (1 - alpha) theta_base + alpha theta_expert for each expert: its own task's accuracy, and "
            "the mean over the other tasks (the base's accuracy on them is what fine-tuning costs).", "",
            "| expert | alpha | own task | other tasks |", "|---|---|---|---|"]
    wise_ok = 0
    from transformers import CLIPVisionModel

    from evomerge.evaluate import build_evaluator
    from evomerge.merge.engine import Merger
    from evomerge.recipe import parse_recipe

    ev = build_evaluator("classification", data_dir=zoo.root, tasks=zoo.tasks)
    model = CLIPVisionModel.from_pretrained(zoo.base).eval()
    for task in zoo.tasks:
        table = []
        for al in (0.0, 0.25, 0.5, 0.75, 1.0):
            Merger(parse_recipe({"merge_method": "task_arithmetic", "base_model": str(zoo.base), "dtype": "float32",
                                 "models": [{"model": str(zoo.experts[task]), "parameters": {"weight": al}}]})
                   ).materialize(into=model)
            m = ev(model, None, split="test")
            own = m[f"{task}/acc"]
            other = st.mean(m[f"{t}/acc"] for t in zoo.tasks if t != task)
            table.append((al, own, other))
            out.append(f"| {task} | {al} | {100 * own:.1f} | {100 * other:.1f} |")
        full = table[-1]
        if any(other > full[2] and full[1] - own <= 0.10 for al, own, other in table[1:-1]):
            wise_ok += 1
    out += ["", f"- some alpha < 1 keeps more of the other tasks than the fine-tune (alpha 1) at a cost of at most "
            f"10 points on its own task: **{'holds' if wise_ok == len(zoo.tasks) else 'does not hold'}** "
            f"({wise_ok} of {len(zoo.tasks)} experts)", ""]

    # 5. CMA-ES against AdaMerging at the same forward passes
    per_step = 16 * len(zoo.tasks)  # images AdaMerging reads per step (forward and backward)
    limit = 200
    per_eval = limit * len(zoo.tasks)  # images one search-split evaluation reads (forward only)
    same = max(1, round(a.steps * per_step * 3 / per_eval))  # a backward pass counted as two forwards
    cma = [test_mean(R.run(f"cmaes_s{s}", "experiment=vision_cmaes_per_layer", f"seed={s}", f"budget={same}"))
           for s in seeds]
    out += ["### CMA-ES per layer against layer-wise AdaMerging, same forward passes", "",
            f"AdaMerging reads {a.steps} x {per_step} images forward and backward ({a.steps * per_step * 3:,} image "
            f"forward passes, a backward pass counted as two); a CMA-ES evaluation reads {per_eval:,} (the search "
            f"split's {limit} images per task), so CMA-ES gets {same} evaluations.", "",
            "| search | test accuracy |", "|---|---|", f"| layer-wise AdaMerging | {ms(ada['layerwise'])} |",
            f"| CMA-ES per layer, {same} evaluations | {ms(cma)} |", "",
            f"- CMA-ES {'above' if st.mean(cma) > lw else 'below'} AdaMerging by "
            f"{abs(100 * (st.mean(cma) - lw)):.1f} points at the same forward passes (labels: CMA-ES reads the "
            "search split's labels, AdaMerging none).", ""]
    out += [f"All runs took {time.perf_counter() - t_all:.0f} s here (runs already in `{a.work}` are reused).", ""]
    section = "\n".join(out)
    path = Path(a.out)
    text = path.read_text() if path.is_file() else ""
    at = text.find("\n" + HEADER)
    keep = text if at < 0 else text[:at]
    path.write_text(keep.rstrip("\n") + "\n\n" + section)
    print(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
