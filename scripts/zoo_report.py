"""Measure the zoo's merging signal and write ``results/zoo.md``.

    python scripts/zoo_report.py                    # builds ./zoo if missing, then measures
    python scripts/zoo_report.py --zoo DIR --rebuild-timing   # also times a fresh build

On the test split (exact-match accuracy), checks that
  (a) each expert beats the base on its own task by >= 30 points,
  (b) the base does not already solve the tasks (< 50% on each),
  (c) task arithmetic over all experts, at the single lambda that is best on the validation
      split, beats the base on mean accuracy by >= 10 points,
  (d) the merge is sensitive to its coefficient (the lambda curve, validation and test).
Merges go through evomerge's merge engine straight into a live model.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from evomerge.merge.engine import Merger  # noqa: E402
from evomerge.recipe import parse_recipe  # noqa: E402
from evomerge.evaluate import build_evaluator  # noqa: E402
from evomerge.zoo import ZooConfig, build_zoo  # noqa: E402

LAMBDAS = [round(0.1 * i, 1) for i in range(0, 16)]


def task_arithmetic(zoo, lam: float, tasks: list[str]):
    return parse_recipe({
        "merge_method": "task_arithmetic",
        "base_model": str(zoo.base),
        "models": [{"model": str(zoo.experts[t]), "parameters": {"weight": lam}} for t in tasks],
        "dtype": "float32",
    })


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", default="zoo")
    ap.add_argument("--out", default="results/zoo.md")
    ap.add_argument("--rebuild-timing", action="store_true",
                    help="also build a second zoo from scratch in a temporary folder and compare its files")
    a = ap.parse_args()
    torch.set_num_threads(ZooConfig.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    zoo = build_zoo(a.zoo)
    first_build = time.perf_counter() - t0
    cfg = ZooConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in zoo.info["config"].items()})
    tasks = zoo.tasks
    tok = AutoTokenizer.from_pretrained(zoo.tokenizer)
    ev = build_evaluator("accuracy", data_dir=zoo.root, tasks=tasks)  # search = validation split

    def measure(model) -> dict[str, dict[str, float]]:
        out = {}
        for name, split in (("validation", "search"), ("test", "test")):
            m = ev(model, tok, split=split)
            out[name] = {t: m[f"{t}/acc"] for t in tasks}
        return out

    def mean(d: dict[str, float]) -> float:
        return sum(d.values()) / len(d)

    scores = {}
    model = AutoModelForCausalLM.from_pretrained(zoo.base).eval()
    scores["base"] = measure(model)
    for t in tasks:
        scores[f"expert:{t}"] = measure(AutoModelForCausalLM.from_pretrained(zoo.experts[t]).eval())
    curve, best = lambda_curve(zoo, tasks, model, measure)

    Merger(task_arithmetic(zoo, best, tasks)).materialize(into=model)
    gen = build_evaluator("exact_match", data_dir=zoo.root, tasks=tasks)(model, tok, split="test")
    tf_best = mean(curve[best]["test"])

    rebuild = rebuild_timing(zoo, cfg, _same_files) if a.rebuild_timing else None

    checks = signal_checks(tasks, scores, curve, best, LAMBDAS)

    lines = [
        "# The local zoo and its merging signal",
        "",
        "Made by `python scripts/zoo_report.py" + (" --rebuild-timing" if a.rebuild_timing else "") + "` "
        f"(zoo key `{zoo.info['key']}`, {zoo.info['parameters'] / 1e6:.2f}M parameters per model, "
        f"{cfg.layers} layers, hidden {cfg.hidden}). Exact-match accuracy (teacher-forced argmax of every "
        "answer token and the closing newline, which equals greedy decoding's exact match), "
        f"{cfg.eval_size} examples per task and split. Merges are made by evomerge's merge engine "
        "straight into a live model.",
        "",
        "## Tasks",
        "",
        "| task | example prompt | answer | target size | base pretrained on sizes |",
        "|---|---|---|---|---|",
    ]
    for t in tasks:
        info = zoo.info["tasks"][t]
        ex = info["example"]
        lines.append(f"| {t} | `{ex['prompt']}` | `{ex['answer']}` | {info['target_n']} | "
                     f"{', '.join(map(str, info['pretrain_n']))} |")
    lines += check_lines(checks)
    lines += sources_lines(tasks, [(k, v["test"]) for k, v in scores.items()]
                           + [(f"task arithmetic, lambda {best}", curve[best]["test"])])
    lines += ["", f"Greedy decoding (the `exact_match` evaluator) of the lambda {best} merge gives "
              f"{100 * gen['score']:.1f}% mean test accuracy, against {100 * tf_best:.1f}% teacher-forced."]
    lines += curve_lines(tasks, curve, best, LAMBDAS)
    lines += ["", "## Build", ""]
    if rebuild:
        secs, again, same = rebuild
        lines.append(f"A fresh build took {secs:.0f} s on {cfg.threads} threads "
                     f"({os.cpu_count()} CPUs); building again into the same folder took {again:.2f} s; "
                     f"the two builds' files are {'identical' if same else '**not identical**'}.")
    else:
        lines.append(f"Opening (or building) the zoo took {first_build:.1f} s in this run.")
    lines.append("")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    old = Path(a.out).read_text() if Path(a.out).is_file() else ""
    vision = old[old.find("\n# The vision zoo"):] if "\n# The vision zoo" in old else ""  # (vision_zoo_report.py's)
    Path(a.out).write_text("\n".join(lines) + vision)
    print("\n".join(lines))
    return 0 if all(ok for _, ok, _ in checks) else 1


def _same_files(a: Path, b: Path) -> bool:
    """Same relative file names and bytes, ignoring the lm-eval YAMLs (they hold absolute paths)."""
    return same_files(a, b, lambda p: "lm_eval_tasks" not in p.parts)


def same_files(a: Path, b: Path, keep) -> bool:
    """Whether two folders hold the same files (those ``keep(path)`` accepts), byte for byte."""
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and keep(p)}
    fa, fb = files(a), files(b)
    diff = [k for k in sorted(set(fa) | set(fb)) if fa.get(k) != fb.get(k)]
    if diff:
        print("differing files:", diff[:10], file=sys.stderr)
    return not diff


def lambda_curve(zoo, tasks, model, measure, lambdas=LAMBDAS):
    """Task arithmetic over every expert at each lambda, merged into ``model``:
    ``({lambda: measure(model)}, the validation-best lambda)``."""
    curve = {}
    for lam in lambdas:
        Merger(task_arithmetic(zoo, lam, tasks)).materialize(into=model)
        curve[lam] = measure(model)
        print(f"lambda {lam:.1f}: validation {_mean(curve[lam]['validation']):.3f} "
              f"test {_mean(curve[lam]['test']):.3f}", flush=True)
    return curve, max(lambdas, key=lambda lam: (_mean(curve[lam]["validation"]), -lam))


def rebuild_timing(zoo, cfg, same) -> tuple[float, float, bool]:
    """A fresh build of ``cfg`` in a temporary folder: its seconds, the seconds of building
    it again (the cache), and whether its files equal ``zoo``'s (``same(a, b)``)."""
    with tempfile.TemporaryDirectory() as d:
        t1 = time.perf_counter()
        other = build_zoo(Path(d) / "zoo", cfg, progress=False)
        secs = time.perf_counter() - t1
        t2 = time.perf_counter()
        build_zoo(Path(d) / "zoo", cfg, progress=False)
        return secs, time.perf_counter() - t2, same(zoo.root, other.root)


def _mean(d: dict[str, float]) -> float:
    return sum(d.values()) / len(d)


def signal_checks(tasks, scores, curve, best, lambdas) -> list[tuple[str, bool, str]]:
    """The four checks of a zoo's merging signal on the test split: ``scores`` holds
    ``"base"`` and ``"expert:<task>"``, each ``{"validation"|"test": {task: accuracy}}``;
    ``curve`` the same for task arithmetic at each lambda."""
    base_test = scores["base"]["test"]
    gains = {t: scores[f"expert:{t}"]["test"][t] - base_test[t] for t in tasks}
    low = min(gains, key=gains.get)
    top = max(base_test, key=base_test.get)
    gain = _mean(curve[best]["test"]) - _mean(base_test)
    tests = [_mean(curve[lam]["test"]) for lam in lambdas]
    spread = max(tests) - min(tests)
    return [
        ("(a) each expert beats the base on its own task by >= 30 points", gains[low] >= 0.30,
         f"smallest gain {100 * gains[low]:.1f} points ({low})"),
        ("(b) the base does not already solve the tasks (< 50% on each)", base_test[top] < 0.5,
         f"best base accuracy {100 * base_test[top]:.1f}% ({top})"),
        (f"(c) task arithmetic at the validation-best lambda ({best}) beats the base by >= 10 points", gain >= 0.10,
         f"{100 * _mean(curve[best]['test']):.1f}% vs {100 * _mean(base_test):.1f}% (+{100 * gain:.1f} points)"),
        ("(d) the merge is sensitive to lambda (test mean spread over the curve >= 20 points)", spread >= 0.20,
         f"spread {100 * spread:.1f} points"),
    ]


def check_lines(checks) -> list[str]:
    return (["", "## Checks (test split)", "", "| check | holds | measured |", "|---|---|---|"]
            + [f"| {c} | {'yes' if ok else '**no**'} | {m} |" for c, ok, m in checks])


def sources_lines(tasks, rows) -> list[str]:
    """The sources' (and the best merge's) test accuracy per task: ``rows`` of ``(name, {task: acc})``."""
    out = ["", "## Sources and the best single-lambda merge (test split)", "",
           "| model | " + " | ".join(tasks) + " | mean |", "|---" * (len(tasks) + 2) + "|"]
    return out + [f"| {name} | " + " | ".join(f"{100 * acc[t]:.1f}" for t in tasks) + f" | {100 * _mean(acc):.1f} |"
                  for name, acc in rows]


def curve_lines(tasks, curve, best, lambdas) -> list[str]:
    out = ["", "## Task arithmetic over all experts: the lambda curve", "",
           "theta = theta_base + lambda * sum_k tau_k (mean accuracy in %; per-task test accuracy after the bar)",
           "", "| lambda | validation mean | test mean | " + " | ".join(f"test {t}" for t in tasks) + " |",
           "|---" * (len(tasks) + 3) + "|"]
    for lam in lambdas:
        v, te = curve[lam]["validation"], curve[lam]["test"]
        mark = " (best on validation)" if lam == best else ""
        out.append(f"| {lam}{mark} | {100 * _mean(v):.1f} | {100 * _mean(te):.1f} | "
                   + " | ".join(f"{100 * te[t]:.1f}" for t in tasks) + " |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
