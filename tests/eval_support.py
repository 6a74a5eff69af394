"""Shared set-up of the evaluator tests: a tiny random Llama with the zoo's character
tokenizer, and zoo-format data on which it scores somewhere between 0 and 1.

A random model rarely ends an answer with a newline, so its exact-match accuracy would be
0 everywhere (a weak test). Two changes make the scores informative without training:
the newline's output row is set just above the row of the token the model predicts most
often after a prompt (so it now says "\\n" where it said that token), and every other row's
answer is replaced by the text the model generates for it (found with one batched
``model.generate``, independent of the code under test). Roughly half the rows are then
answered correctly by greedy decoding.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

TASK_NAMES = ("add", "reverse")
EVAL_SIZE = 40


@contextlib.contextmanager
def one_thread():
    """One torch thread for the duration (these models are tiny, and the test machine's two
    cores may be busy: more threads then only wait on each other)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def zoo_like_tokenizer():
    """The zoo's character tokenizer."""
    from evomerge.zoo import zoo_tokenizer

    return zoo_tokenizer()


def tiny_lm(tok, seed: int = 0):
    from evomerge.testing import tiny_config, tiny_model

    return tiny_model(tiny_config(hidden=32, layers=2, vocab=len(tok)), seed)


def _generate_texts(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    enc = tok(prompts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def make_setup(root: Path):
    """(model, tokenizer, {task: {"validation": path, "test": path}}) under ``root``."""
    from evomerge.zoo import ZooConfig, write_data

    tok = zoo_like_tokenizer()
    model = tiny_lm(tok)
    paths = write_data(ZooConfig.test_mode(tasks=TASK_NAMES, eval_size=EVAL_SIZE), root)
    rows = {t: {s: [json.loads(x) for x in Path(p).read_text().splitlines()] for s, p in sp.items()}
            for t, sp in paths.items()}
    prompts = [r["prompt"] for sp in rows.values() for rs in sp.values() for r in rs]

    first = _generate_texts(model, tok, prompts, 4)
    counts = collections.Counter(c for text in first for c in text[1:3] if c != "\n")
    frequent = tok.convert_tokens_to_ids(counts.most_common(1)[0][0])
    newline = tok.convert_tokens_to_ids("\n")
    with torch.no_grad():
        model.lm_head.weight[newline] = model.lm_head.weight[frequent] * 1.02
    model.generation_config.eos_token_id = newline  # this family's answers end with a newline, as the zoo's

    texts = iter(_generate_texts(model, tok, prompts, 8))
    for task, splits in rows.items():
        for split, rs in splits.items():
            for i, r in enumerate(rs):
                text = next(texts)
                head, nl, _ = text.partition("\n")
                if i % 2 == 0 and nl and head:
                    r["answer"] = head
            Path(paths[task][split]).write_text("".join(json.dumps(r) + "\n" for r in rs))
    return model, tok, {t: {s: Path(p) for s, p in sp.items()} for t, sp in paths.items()}


def read_rows(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def reference_generate_acc(model, tok, rows: list[dict]) -> float:
    """Exact match by one unpadded ``model.generate`` per row (the slow, plain way)."""
    max_new = max(len(tok(r["answer"] + "\n", add_special_tokens=False)["input_ids"]) for r in rows)
    hits = 0
    with torch.no_grad():
        for r in rows:
            ids = tok(r["prompt"], return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=tok.pad_token_id)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            hits += text.split("\n")[0] == r["answer"]
    return hits / len(rows)


def reference_choice_acc(model, tok, rows: list[dict]) -> float:
    """Multiple choice by summing each choice's token log-probabilities, one row and one
    choice at a time."""
    hits = 0
    with torch.no_grad():
        for r in rows:
            p = tok(r["prompt"], add_special_tokens=False)["input_ids"]
            scores = []
            for c in r["choices"]:
                a = tok(c, add_special_tokens=False)["input_ids"]
                ids = torch.tensor([p + a])
                logp = model(input_ids=ids).logits[0].log_softmax(-1)
                scores.append(sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(a)))
            hits += max(range(len(scores)), key=lambda j: (scores[j], -j)) == r["label"]
    return hits / len(rows)


def perturb_(model, scale: float = 0.05, seed: int = 1) -> None:
    """Change every weight in place (the way a search moves to its next candidate)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
