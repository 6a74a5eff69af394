"""The local zoo: a character tokenizer, a tiny Llama base and one expert per synthetic task.

No model hub is needed: ``evomerge-zoo build`` makes everything on a CPU in a few minutes,
deterministically, and caches it (a second build is instant)::

    evomerge-zoo build --out zoo            # zoo/tokenizer, zoo/base, zoo/experts/<task>, zoo/data
    evomerge-zoo info --out zoo             # what is there, with the accuracies measured at build time

How the zoo is made (and why this way):

* **Tasks.** Each is a short string transformation with its own prefix, answered after
  ``=`` and terminated by a newline, e.g. ``rev:kqzbm=`` → ``mbzqk``. Inputs are drawn from
  a seeded NumPy generator; the validation and test sets (>= 300 examples each) are
  disjoint from each other and from everything used for training.
* **Base.** Pretrained on every task at *shorter* input lengths than the target length
  (plus copying), so it knows the formats and the algorithms' shape but does not solve
  the target-length tasks: the tasks are learnable from it, and unsolved by it.
* **Experts.** Each is fully fine-tuned from the base on its one task at the target length,
  with a low learning rate and the loss on answer tokens only, so its task vector stays
  small and the experts merge meaningfully (see ``results/zoo.md``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["TASKS", "Task", "ZooConfig", "zoo_tokenizer", "make_examples"]

ZOO_VERSION = 1
CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz+-=:,.>\n ")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
LETTERS = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"


# --------------------------------------------------------------------------------------
# Tasks
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """A synthetic task: ``sample(rng, n)`` draws one input of size ``n``; ``solve`` gives
    the answer. The prompt is ``f"{prefix}:{input}="`` and the target ``answer + "\\n"``."""

    name: str
    prefix: str
    sample: Callable[[np.random.Generator, int], str]
    solve: Callable[[str], str]
    target_n: int
    pretrain_n: tuple[int, ...]
    description: str

    def prompt(self, x: str) -> str:
        return f"{self.prefix}:{x}="

    def example(self, x: str) -> dict[str, str]:
        return {"prompt": self.prompt(x), "answer": self.solve(x), "input": x}


def _letters(rng: np.random.Generator, n: int) -> str:
    return "".join(LETTERS[i] for i in rng.integers(0, 26, n))


def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(DIGITS[i] for i in rng.integers(0, 10, n))


def _add_sample(rng: np.random.Generator, n: int) -> str:
    lo = 10 ** (n - 1) if n > 1 else 0
    a, b = rng.integers(lo, 10**n, 2)
    return f"{a}+{b}"


def _add_solve(x: str) -> str:
    a, b = x.split("+")
    return str(int(a) + int(b))


TASKS: dict[str, Task] = {
    t.name: t
    for t in [
        Task("add", "add", _add_sample, _add_solve, 2, (1,), "add two n-digit numbers"),
        Task("reverse", "rev", _letters, lambda x: x[::-1], 5, (2, 3, 4), "reverse n letters"),
        Task("sort", "srt", _digits, lambda x: "".join(sorted(x)), 5, (2, 3, 4), "sort n digits"),
        Task("increment", "inc", _digits, lambda x: "".join(str((int(c) + 1) % 10) for c in x), 5, (2, 3, 4),
             "add 1 to each digit, modulo 10"),
        Task("alternate", "alt", _letters, lambda x: x[::2], 10, (4, 6, 8), "every other letter of n"),
    ]
}
COPY = Task("copy", "cpy", _letters, lambda x: x, 6, (2, 3, 4, 5, 6, 7, 8), "copy n letters")


def _stable_seed(*parts) -> int:
    """A seed from strings and ints that does not depend on PYTHONHASHSEED."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def make_examples(task: Task, n: int, count: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``count`` distinct examples of size ``n`` not in ``exclude`` (inputs), seeded."""
    rng = np.random.Generator(np.random.PCG64(_stable_seed("examples", task.name, n, seed)))
    seen: set[str] = set()
    out = []
    tries = 0
    while len(out) < count:
        x = task.sample(rng, n)
        tries += 1
        if tries > 50 * count + 1000:
            raise ValueError(f"task {task.name!r}: cannot draw {count} distinct inputs of size {n}")
        if x in seen or x in exclude:
            continue
        seen.add(x)
        ex = task.example(x)
        ex["choices"], ex["label"] = _choices(ex["answer"], rng)
        out.append(ex)
    return out


def _choices(answer: str, rng: np.random.Generator, k: int = 4) -> tuple[list[str], int]:
    """``k`` candidate answers of the answer's length: the answer and ``k - 1`` near misses
    (one character changed each), in a seeded order; returns (choices, index of the answer)."""
    alphabet = DIGITS if answer.isdigit() else LETTERS
    opts = {answer}
    choices = [answer]
    while len(choices) < k:
        i = int(rng.integers(len(answer)))
        c = alphabet[int(rng.integers(len(alphabet)))]
        wrong = answer[:i] + c + answer[i + 1:]
        if wrong not in opts:
            opts.add(wrong)
            choices.append(wrong)
    order = rng.permutation(k)
    return [choices[j] for j in order], int(np.flatnonzero(order == 0)[0])


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------


def zoo_tokenizer():
    """A character-level fast tokenizer built locally with the ``tokenizers`` library:
    one token per character, no BOS/EOS added, ``<pad>`` for padding."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    tok.model_max_length = 64
    tok.padding_side = "left"
    return tok


# --------------------------------------------------------------------------------------
# Build configuration
# --------------------------------------------------------------------------------------


@dataclass
class ZooConfig:
    """Everything that determines the zoo's files (hashed into its cache key)."""

    seed: int = 0
    tasks: tuple[str, ...] = ("add", "reverse", "sort", "increment", "alternate")
    hidden: int = 128
    layers: int = 6
    intermediate: int = 384
    heads: int = 4
    eval_size: int = 400  # validation and test examples per task
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    expert_steps: int = 400
    expert_lr: float = 3e-4
    batch_size: int = 64
    threads: int = 2
    version: int = ZOO_VERSION

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def test_mode(cls, **kw) -> "ZooConfig":
        """A reduced zoo that builds in seconds, for tests (the models learn little)."""
        base = dict(hidden=32, layers=2, intermediate=64, heads=2, eval_size=300, pretrain_steps=30,
                    expert_steps=10, batch_size=16)
        base.update(kw)
        return cls(**base)


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


def eval_splits(task: Task, cfg: ZooConfig) -> dict[str, list[dict]]:
    """Validation and test examples at the task's target size: disjoint, seeded."""
    both = make_examples(task, task.target_n, 2 * cfg.eval_size, cfg.seed)
    return {"validation": both[: cfg.eval_size], "test": both[cfg.eval_size:]}


class _Sampler:
    """Training examples drawn on the fly from a seeded stream, never one of ``exclude``."""

    def __init__(self, tasks: list[tuple[Task, tuple[int, ...]]], seed: int, exclude: set[str]):
        self.tasks = tasks
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.exclude = exclude

    def batch(self, size: int) -> tuple[list[str], list[str]]:
        prompts, answers = [], []
        for _ in range(size):
            task, sizes = self.tasks[int(self.rng.integers(len(self.tasks)))]
            n = sizes[int(self.rng.integers(len(sizes)))]
            x = task.sample(self.rng, n)
            while x in self.exclude:
                x = task.sample(self.rng, n)
            prompts.append(task.prompt(x))
            answers.append(task.solve(x) + "\n")
        return prompts, answers


# --------------------------------------------------------------------------------------
# Models and training
# --------------------------------------------------------------------------------------


def zoo_model_config(cfg: ZooConfig, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=64, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, rope_theta=10000.0,
    )


def _lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    frac = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def train(model, tokenizer, sampler: _Sampler, steps: int, lr: float, batch_size: int, weight_decay: float,
          warmup: int, desc: str = "", progress: bool = True) -> list[float]:
    """AdamW on answer tokens only; returns the loss per step."""
    import torch
    from tqdm.auto import tqdm

    from .evaluate._batch import encode_pairs

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    losses = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, warmup)
        ids, mask, labels = encode_pairs(tokenizer, *sampler.batch(batch_size))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def accuracy(model, tokenizer, examples: list[dict], batch_size: int = 256) -> float:
    """Exact-match accuracy (teacher-forced, equal to greedy decoding's) on examples."""
    from .evaluate._batch import encode_pairs, teacher_forced_correct

    hits = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        batch = encode_pairs(tokenizer, [e["prompt"] for e in chunk], [e["answer"] + "\n" for e in chunk])
        hits += int(teacher_forced_correct(model, batch).sum())
    return hits / max(1, len(examples))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSON lines, atomically (temporary file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_data(cfg: ZooConfig, root: str | Path) -> dict[str, dict[str, Path]]:
    """``root/data/<task>/{validation,test}.jsonl`` for every task of ``cfg``: rows with
    ``prompt``, ``answer``, ``input``, ``choices`` and ``label``. Returns the paths."""
    root = Path(root)
    out: dict[str, dict[str, Path]] = {}
    for name in cfg.tasks:
        task = TASKS[name]
        out[name] = {}
        for split, rows in eval_splits(task, cfg).items():
            path = root / "data" / name / f"{split}.jsonl"
            write_jsonl(path, rows)
            out[name][split] = path
    return out
