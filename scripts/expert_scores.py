"""Each expert's score on its own task with every evaluator, on both model families, and the
gap between native and lm-eval scores of the same model on the same rows; writes
``results/experts.md``.

    python scripts/expert_scores.py                   # ./zoo (built if missing) and a word family
    python scripts/expert_scores.py --zoo DIR --words DIR

The zoo (Llama, character tokenizer without BOS, answers ended by a newline that its
generation config names) and the word family (GPT-2, byte-level BPE adding a BOS token, no pad
token, answers ended by EOS, its own file and field names: ``evomerge.testing.word_family``)
share no conventions; the evaluators are given nothing but the data and the models.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from evomerge.evaluate import LMEvalEvaluator, build_evaluator, write_jsonl_tasks  # noqa: E402

NATIVE = ("accuracy", "exact_match", "choice")


def family_zoo(root: Path, work: Path):
    from evomerge.zoo import build_zoo, load_zoo

    zoo = load_zoo(root) if (root / "zoo.json").is_file() else build_zoo(root)
    data = {t: {"search": zoo.data(t, "validation"), "test": zoo.data(t, "test")} for t in zoo.tasks}
    return "zoo (Llama, character tokenizer, newline-ended answers)", zoo.experts, data, {}, zoo.lm_eval_tasks, "zoo_"


def family_words(root: Path, work: Path):
    from evomerge.testing import word_family

    fam = word_family(root)
    data = {t: {"search": d["dev"], "test": d["test"]} for t, d in fam.data.items()}
    tasks = write_jsonl_tasks({t: {"validation": d["dev"], "test": d["test"]} for t, d in fam.data.items()},
                              work / "word_tasks", prefix="w_", fields=fam.fields)
    return ("word family (GPT-2, byte-level BPE with BOS, EOS-ended answers)", fam.experts, data, fam.fields,
            tasks, "w_")


def measure(title, experts, data, fields, include, prefix) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    natives = {n: build_evaluator(n, data=data, fields=fields or None) for n in NATIVE}
    tasks = list(data)
    gen = LMEvalEvaluator([f"{prefix}{t}" for t in tasks], include_path=include, include_defaults=False)
    mc = LMEvalEvaluator([f"{prefix}{t}_mc" for t in tasks], include_path=include, include_defaults=False)
    lines = [f"### {title}", "",
             "| expert (own task) | accuracy | exact_match | choice | lm-eval generate_until | lm-eval multiple_choice "
             "| largest native/lm-eval gap, any task |", "|---|---|---|---|---|---|---|"]
    for task in tasks:
        path = experts[task]
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        nat = {n: ev(model, tok, "test") for n, ev in natives.items()}
        g, c = gen(model, tok, "test"), mc(model, tok, "test")
        gap = max(max(abs(g[f"{prefix}{t}/exact_match"] - nat["exact_match"][f"{t}/acc"]),
                      abs(g[f"{prefix}{t}/exact_match"] - nat["accuracy"][f"{t}/acc"]),
                      abs(c[f"{prefix}{t}_mc/acc"] - nat["choice"][f"{t}/acc"])) for t in tasks)
        cells = [nat[n][f"{task}/acc"] for n in NATIVE] + [g[f"{prefix}{task}/exact_match"], c[f"{prefix}{task}_mc/acc"]]
        lines.append(f"| {task} | " + " | ".join(f"{100 * v:.1f}%" for v in cells) + f" | {100 * gap:.1f} points |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="zoo")
    ap.add_argument("--words", default=None, help="a word family folder (built there if missing)")
    ap.add_argument("--out", default="results/experts.md")
    a = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        words = Path(a.words) if a.words else work / "words"
        lines = ["# Each expert on its own task, every evaluator, two model families", "",
                 "Test split, whole; `python scripts/expert_scores.py`. Native evaluators and lm-eval score the same "
                 "rows of the same model; the last column is the largest difference between a native score and "
                 "lm-eval's (exact_match and accuracy against generate_until, choice against multiple_choice) over "
                 "every task for that model.", ""]
        for make, root in ((family_zoo, Path(a.zoo)), (family_words, words)):
            lines += measure(*make(root, work))
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
