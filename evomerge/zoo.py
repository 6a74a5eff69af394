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
import contextlib
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
from typing import Callable, ClassVar

import numpy as np

__all__ = [
    "TASKS", "Task", "ZooConfig", "Zoo", "ZooError", "build_zoo", "build_independent", "load_zoo", "default_zoo_dir",
    "zoo_tokenizer", "make_examples", "write_data", "accuracy", "main",
]

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
        Task("alternate", "alt", _letters, lambda x: x[::2], 8, (4, 6), "every other letter of n"),
        Task("shift", "sft", _letters, lambda x: "".join(LETTERS[(LETTERS.index(c) + 1) % 26] for c in x), 5,
             (2, 3, 4), "the next letter of each of n letters, z to a"),
        Task("rotate", "rot", _letters, lambda x: x[1:] + x[:1], 5, (2, 3, 4),
             "move the first of n letters to the end"),
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
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tk.decoder = decoders.Fuse()  # decode "102" as "102", not "1 0 2"
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    tok.model_max_length = 64
    tok.padding_side = "left"
    return tok


# --------------------------------------------------------------------------------------
# Build configuration
# --------------------------------------------------------------------------------------


class BuildConfig:
    """What every zoo's configuration shares: its cache key (a hash of every field) and a
    reduced test mode (``TEST_MODE``'s fields) that builds in seconds (the models learn little)."""

    TEST_MODE: ClassVar[dict] = {}

    def key(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def test_mode(cls, **kw):
        return cls(**{**cls.TEST_MODE, **kw})


@dataclass
class ZooConfig(BuildConfig):
    """Everything that determines the zoo's files (hashed into its cache key)."""

    seed: int = 0
    tasks: tuple[str, ...] = ("reverse", "sort", "increment", "alternate")
    hidden: int = 128
    layers: int = 4
    intermediate: int = 384
    heads: int = 4
    eval_size: int = 400  # validation and test examples per task
    pretrain_steps: int = 1500
    pretrain_lr: float = 3e-3
    expert_steps: int = 300
    expert_lr: float = 3e-4
    batch_size: int = 64
    threads: int = 2
    version: int = ZOO_VERSION

    TEST_MODE: ClassVar[dict] = dict(hidden=32, layers=2, intermediate=64, heads=2, eval_size=300, pretrain_steps=30,
                                     expert_steps=10, batch_size=16)


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


def train(model, tokenizer, sampler, steps: int, lr: float, batch_size: int, weight_decay: float,
          warmup: int, desc: str = "", progress: bool = True, end=()) -> list[float]:
    """AdamW on answer tokens only (and ``end``, e.g. ``[eos_id]``, after each answer);
    ``sampler.batch(n)`` gives ``(prompts, answers)``. Returns the loss per step."""
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
        ids, mask, labels = encode_pairs(tokenizer, *sampler.batch(batch_size), end=end)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def accuracy(model, tokenizer, examples: list[dict], batch_size: int = 256, end="\n") -> float:
    """Exact-match accuracy (teacher-forced, equal to greedy decoding's) on examples whose
    answers end with ``end`` (a string, or token ids such as ``[eos_id]``)."""
    from .evaluate._batch import encode_pairs, teacher_forced_correct

    hits = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        batch = encode_pairs(tokenizer, [e["prompt"] for e in chunk], [e["answer"] for e in chunk], end)
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


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def default_zoo_dir() -> Path:
    """``$EVOMERGE_ZOO`` when set, else ``./zoo``."""
    return Path(os.environ.get("EVOMERGE_ZOO", "zoo"))


class ZooError(RuntimeError):
    """A zoo folder that cannot be used as asked."""


@dataclass
class Zoo:
    """A built zoo: paths and what was measured when it was built."""

    root: Path
    info: dict = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.info["config"]["tasks"])

    @property
    def kind(self) -> str:
        """``"language"`` (causal LMs on text tasks) or ``"vision"`` (image encoders on
        classification tasks, each task with its head: ``evomerge.vision.zoo``)."""
        return str(self.info.get("kind", "language"))

    @property
    def base(self) -> Path:
        return self.root / "base"

    def head(self, task: str) -> Path:
        """A vision zoo task's head (``TaskHead`` file)."""
        self.data(task, "test")  # (names an unknown task)
        return self.root / "heads" / f"{task}.safetensors"

    @property
    def experts(self) -> dict[str, Path]:
        return {t: self.root / "experts" / t for t in self.tasks}

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def lm_eval_tasks(self) -> Path:
        """The folder of lm-eval task YAMLs over this zoo's JSONL files (``zoo_<task>``,
        generate-until with exact match, and ``zoo_<task>_mc``, multiple choice). lm-eval
        needs absolute data paths, so the YAMLs are (re)written whenever the zoo has moved."""
        from .evaluate.lm_eval import write_jsonl_tasks

        folder = self.root / "lm_eval_tasks"
        stamp = folder / ".zoo_root"
        here = str(self.root.resolve())
        if not stamp.is_file() or stamp.read_text() != here:
            files = {t: {s: p.resolve() for s, p in d.items()} for t, d in self.data_files().items()}
            write_jsonl_tasks(files, folder, stop=["\n"])  # the zoo's answers end with a newline
            stamp.write_text(here)
        return folder

    def ingredients(self, task: str) -> list[Path]:
        """The soup ingredients of ``task`` built so far (see :func:`build_ingredients`)."""
        meta = self.root / "ingredients" / task / "ingredients.json"
        if not meta.is_file():
            return []
        return [self.root / "ingredients" / task / r["name"] for r in json.loads(meta.read_text())["runs"]]

    def independent(self) -> dict[str, Path]:
        """The experts trained from their own random initializations, by task (see
        :func:`build_independent`; empty until built)."""
        meta = self.root / "independent" / "independent.json"
        if not meta.is_file():
            return {}
        return {t: self.root / "independent" / t for t in json.loads(meta.read_text())["accuracy"]}

    def data(self, task: str, split: str) -> Path:
        if task not in self.tasks:
            raise ZooError(f"the zoo at {self.root} has no task {task!r}; it has {', '.join(self.tasks)}")
        return self.root / "data" / task / f"{split}{'.safetensors' if self.kind == 'vision' else '.jsonl'}"

    def data_files(self) -> dict[str, dict[str, Path]]:
        return {t: {s: self.data(t, s) for s in ("validation", "test")} for t in self.tasks}


def load_zoo(root: str | Path | None = None) -> Zoo:
    """Open a built zoo (``zoo.json`` present); a clear error otherwise."""
    root = Path(root) if root is not None else default_zoo_dir()
    meta = root / "zoo.json"
    if not meta.is_file():
        raise ZooError(f"no zoo at {root} (missing {meta}); build it with `evomerge-zoo build --out {root}`")
    return Zoo(root, json.loads(meta.read_text()))


def _save_model(model, tokenizer, path: Path) -> None:
    nl = tokenizer.convert_tokens_to_ids("\n")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = nl  # answers end with a newline
    model.generation_config.bos_token_id = None
    model.save_pretrained(path)
    _save_tokenizer(tokenizer, path)


def _save_tokenizer(tokenizer, path: Path) -> None:
    tokenizer.save_pretrained(path)
    tc = path / "tokenizer_config.json"
    c = json.loads(tc.read_text())
    c["model_max_length"] = tokenizer.model_max_length  # transformers leaves 1e30 otherwise
    c["padding_side"] = tokenizer.padding_side
    tc.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def _atomic_dir(dest: Path, threads: int):
    """A temporary folder beside ``dest`` that replaces it when the block completes and is
    removed if the block fails; torch runs on ``threads`` threads meanwhile."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(before)


def build_zoo(out: str | Path | None = None, cfg: ZooConfig | None = None, force: bool = False,
              progress: bool = True, log=print) -> Zoo:
    """Build the zoo into ``out`` (default :func:`default_zoo_dir`), or return the one there.

    A zoo built with the same configuration is reused at once; one built with another
    configuration is an error unless ``force``. The build happens in a temporary folder
    beside ``out`` that is renamed into place when complete.
    """
    import torch
    from transformers import LlamaForCausalLM

    from .vision.zoo import VisionZooConfig, build_vision_zoo

    cfg = cfg or ZooConfig()
    vision = isinstance(cfg, VisionZooConfig)
    unknown = [] if vision else [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise ZooError(f"unknown zoo task(s) {unknown}; accepted: {', '.join(TASKS)}")
    out = Path(out) if out is not None else default_zoo_dir()
    if (out / "zoo.json").is_file():
        zoo = load_zoo(out)
        if zoo.info.get("key") == cfg.key():
            return zoo
        want = "vision" if vision else "language"
        if zoo.kind != want and not force:
            raise ZooError(f"{out} holds a {zoo.kind} zoo, not a {want} one (its files are left alone); choose "
                           "another folder with --out DIR")
        if not force:
            raise ZooError(f"the zoo at {out} was built with another configuration "
                           f"(key {zoo.info.get('key')} != {cfg.key()}); pass --force to rebuild it")
    elif out.exists() and any(out.iterdir()) and not force:
        raise ZooError(f"{out} exists and is not a zoo (its files are left alone); choose another folder "
                       "(evomerge-zoo build: --out DIR, or --force to replace it)")

    t_start = time.perf_counter()
    if vision:
        with _atomic_dir(out, cfg.threads) as tmp:
            build_vision_zoo(tmp, cfg, progress=progress, log=log)
        log(f"zoo: built {out} in {time.perf_counter() - t_start:.0f} s")
        return load_zoo(out)
    with _atomic_dir(out, cfg.threads) as tmp:
        tok = zoo_tokenizer()
        _save_tokenizer(tok, tmp / "tokenizer")
        write_data(cfg, tmp)
        tasks = [TASKS[t] for t in cfg.tasks]
        splits = {t.name: eval_splits(t, cfg) for t in tasks}
        exclude = {e["input"] for t in tasks for s in splits[t.name].values() for e in s}

        def measure(model) -> dict[str, dict[str, float]]:
            return {t.name: {s: round(accuracy(model, tok, rows), 4) for s, rows in splits[t.name].items()}
                    for t in tasks}

        torch.manual_seed(cfg.seed)
        model = LlamaForCausalLM(zoo_model_config(cfg, len(tok)))
        n_params = sum(p.numel() for p in model.parameters())
        log(f"zoo: pretraining the base ({n_params / 1e6:.2f}M parameters, {cfg.pretrain_steps} steps)")
        mix = [(t, t.pretrain_n) for t in tasks] + [(COPY, COPY.pretrain_n)]
        train(model, tok, _Sampler(mix, _stable_seed("pretrain", cfg.seed), exclude), cfg.pretrain_steps,
              cfg.pretrain_lr, cfg.batch_size, weight_decay=0.01, warmup=max(1, cfg.pretrain_steps // 15),
              desc="base", progress=progress)
        _save_model(model, tok, tmp / "base")
        acc = {"base": measure(model)}
        base_state = {k: v.clone() for k, v in model.state_dict().items()}
        for t in tasks:
            model.load_state_dict(base_state)
            log(f"zoo: fine-tuning the {t.name} expert ({cfg.expert_steps} steps)")
            train(model, tok, _Sampler([(t, (t.target_n,))], _stable_seed("expert", t.name, cfg.seed), exclude),
                  cfg.expert_steps, cfg.expert_lr, cfg.batch_size, weight_decay=0.0,
                  warmup=max(1, cfg.expert_steps // 10), desc=t.name, progress=progress)
            _save_model(model, tok, tmp / "experts" / t.name)
            acc[t.name] = measure(model)
        info = {
            "key": cfg.key(),
            "config": asdict(cfg),
            "parameters": n_params,
            "tasks": {t.name: {"prefix": t.prefix, "description": t.description, "target_n": t.target_n,
                               "pretrain_n": list(t.pretrain_n), "example": splits[t.name]["test"][0]}
                      for t in tasks},
            "accuracy": acc,
        }
        (tmp / "zoo.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    log(f"zoo: built {out} in {time.perf_counter() - t_start:.0f} s")
    return load_zoo(out)


INGREDIENT_LRS = (1e-4, 2e-4, 3e-4, 5e-4, 8e-4)


def build_ingredients(zoo: Zoo, task: str, count: int = 6, steps: int | None = None, progress: bool = True,
                      log=print) -> list[Path]:
    """Soup ingredients: ``count`` fine-tunes of the base on one task, each with its own
    data-order seed and learning rate (cycling through ``INGREDIENT_LRS``), as in the model
    soups recipe, for ``steps`` steps (default: a quarter of the experts' steps, so that
    they differ and none has saturated the task). Built once into
    ``<zoo>/ingredients/<task>/`` (a temporary folder renamed into place) and reused; asking
    for another count or number of steps rebuilds them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if zoo.kind == "vision":
        from .vision.zoo import build_vision_ingredients

        return build_vision_ingredients(zoo, task, count, steps, progress, log)
    if task not in zoo.tasks:
        raise ZooError(f"the zoo at {zoo.root} has no task {task!r}; it has {', '.join(zoo.tasks)}")
    if count < 2:
        raise ZooError(f"ingredients: count must be at least 2, got {count}")
    folder = zoo.root / "ingredients" / task
    meta = folder / "ingredients.json"
    cfg = ZooConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in zoo.info["config"].items()})
    steps = int(steps) if steps is not None else max(1, cfg.expert_steps // 4)
    want = {"count": count, "steps": steps, "lrs": list(INGREDIENT_LRS), "key": zoo.info.get("key")}
    if meta.is_file():
        info = json.loads(meta.read_text())
        if {k: info.get(k) for k in want} == want:
            return zoo.ingredients(task)
    t = TASKS[task]
    tok = AutoTokenizer.from_pretrained(zoo.tokenizer)
    splits = eval_splits(t, cfg)
    exclude = {e["input"] for tt in zoo.tasks for sp in eval_splits(TASKS[tt], cfg).values() for e in sp}
    with _atomic_dir(folder, cfg.threads) as tmp:
        runs = []
        for i in range(count):
            lr = INGREDIENT_LRS[i % len(INGREDIENT_LRS)]
            seed = _stable_seed("ingredient", task, i, cfg.seed)
            log(f"zoo: ingredient {i + 1}/{count} of {task} (lr {lr:g}, seed {seed})")
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(zoo.base)
            train(model, tok, _Sampler([(t, (t.target_n,))], seed, exclude), steps, lr,
                  cfg.batch_size, weight_decay=0.0, warmup=max(1, steps // 10),
                  desc=f"{task}-{i}", progress=progress)
            name = f"{i:02d}"
            _save_model(model, tok, tmp / name)
            runs.append({"name": name, "lr": lr, "seed": seed,
                         "accuracy": {s: round(accuracy(model, tok, rows), 4) for s, rows in splits.items()}})
        (tmp / "ingredients.json").write_text(json.dumps({**want, "task": task, "runs": runs}, indent=2) + "\n")
    return zoo.ingredients(task)


def build_independent(zoo: Zoo, steps: int | None = None, progress: bool = True, log=print) -> dict[str, Path]:
    """Experts that share no base: one per task of ``zoo``, each from its own random
    initialization (seeded by the task), trained for ``steps`` steps (default: the base's
    pretraining plus an expert's fine-tuning) on the base's pretraining mix with its own
    task at its target size for half of every batch, so that each knows the formats and
    solves its task, as the zoo's experts do, but shares no weights with the others: their
    units are in unrelated orders, and merging them needs alignment first. Built once into
    ``<zoo>/independent/<task>/`` (a temporary folder renamed into place) and reused;
    asking for another number of steps rebuilds them."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = zoo.root / "independent"
    meta = folder / "independent.json"
    cfg = ZooConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in zoo.info["config"].items()})
    steps = int(steps) if steps is not None else cfg.pretrain_steps + cfg.expert_steps
    if steps < 1:
        raise ZooError(f"independent: steps must be at least 1, got {steps}")
    want = {"steps": steps, "key": zoo.info.get("key")}
    if meta.is_file():
        info = json.loads(meta.read_text())
        if {k: info.get(k) for k in want} == want:
            return zoo.independent()
    tok = AutoTokenizer.from_pretrained(zoo.tokenizer)
    tasks = [TASKS[t] for t in zoo.tasks]
    splits = {t.name: eval_splits(t, cfg) for t in tasks}
    exclude = {e["input"] for t in tasks for sp in splits[t.name].values() for e in sp}
    mix = [(t, t.pretrain_n) for t in tasks] + [(COPY, COPY.pretrain_n)]
    with _atomic_dir(folder, cfg.threads) as tmp:
        acc, seeds = {}, {}
        for t in tasks:
            seed = _stable_seed("independent", t.name, cfg.seed)
            log(f"zoo: the independent {t.name} expert from its own initialization ({steps} steps, seed {seed})")
            torch.manual_seed(seed)
            model = LlamaForCausalLM(zoo_model_config(cfg, len(tok)))
            own = [(t, (t.target_n,))] * len(mix)  # half of every batch at the target size
            train(model, tok, _Sampler(mix + own, seed, exclude), steps, cfg.pretrain_lr, cfg.batch_size,
                  weight_decay=0.01, warmup=max(1, steps // 15), desc=f"independent-{t.name}", progress=progress)
            _save_model(model, tok, tmp / t.name)
            acc[t.name] = {u.name: {s: round(accuracy(model, tok, rows), 4) for s, rows in splits[u.name].items()}
                           for u in tasks}
            seeds[t.name] = seed
        (tmp / "independent.json").write_text(json.dumps({**want, "seeds": seeds, "accuracy": acc}, indent=2) + "\n")
    return zoo.independent()


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------


def _table(zoo: Zoo, split: str = "test", accuracy: dict | None = None) -> str:
    tasks = zoo.tasks
    rows = [["model"] + tasks + ["mean"]]
    for name, acc in (accuracy if accuracy is not None else zoo.info["accuracy"]).items():
        vals = [acc[t][split] for t in tasks]
        rows.append([name] + [f"{v:.3f}" for v in vals] + [f"{sum(vals) / len(vals):.3f}"])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    """``evomerge-zoo build [--out DIR] [--seed N] [--tasks T,T,...] [--test-mode] [--force] [--independent]``,
    ``evomerge-zoo info`` and
    ``evomerge-zoo ingredients --task T [--count N]``."""
    ap = argparse.ArgumentParser(prog="evomerge-zoo", description="Build or inspect the local model zoo.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the zoo (instant when already built)")
    b.add_argument("--out", default=None, help="zoo folder (default $EVOMERGE_ZOO or ./zoo; ./zoo_vision with "
                                                "--kind vision)")
    b.add_argument("--kind", choices=("language", "vision"), default="language",
                   help="language: causal LMs on text tasks; vision: an image encoder and one classification "
                        "expert per task, each task with its own head")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--threads", type=int, default=ZooConfig.threads,
                   help="torch threads for training (part of the zoo's identity: results depend on it)")
    b.add_argument("--tasks", default=None,
                   help=f"comma-separated tasks, one expert each (default {','.join(ZooConfig.tasks)}; "
                        f"known: {','.join(TASKS)})")
    b.add_argument("--test-mode", action="store_true", help="a reduced zoo that builds in seconds (for tests)")
    b.add_argument("--force", action="store_true", help="rebuild even if the folder holds another zoo")
    b.add_argument("--independent", action="store_true",
                   help="also train one expert per task from its own random initialization, sharing no base "
                        "(into <zoo>/independent/; for merges that align models first)")
    b.add_argument("--independent-steps", type=int, default=None,
                   help="training steps of each independent expert (default: pretraining plus fine-tuning)")
    b.add_argument("--no-progress", action="store_true")
    i = sub.add_parser("info", help="print what a zoo holds and its accuracies")
    i.add_argument("--out", default=None)
    g = sub.add_parser("ingredients", help="fine-tune soup ingredients of one task (different seeds and lrs)")
    g.add_argument("--out", default=None)
    g.add_argument("--task", required=True)
    g.add_argument("--count", type=int, default=6)
    g.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: a quarter of the experts')")
    g.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "ingredients":
            zoo = load_zoo(a.out)
            paths = build_ingredients(zoo, a.task, a.count, a.steps, progress=not a.no_progress)
            info = json.loads((paths[0].parent / "ingredients.json").read_text())
            print(f"{len(paths)} ingredients of {a.task} in {paths[0].parent}")
            for r in info["runs"]:
                print(f"  {r['name']}  lr {r['lr']:g}  validation {r['accuracy']['validation']:.3f}  "
                      f"test {r['accuracy']['test']:.3f}")
            return 0
        if a.cmd == "build":
            kw = {"seed": a.seed, "threads": a.threads}
            from .vision.images import IMAGE_TASKS
            from .vision.zoo import VisionZooConfig

            known = IMAGE_TASKS if a.kind == "vision" else TASKS
            if a.tasks is not None:
                tasks = tuple(t.strip() for t in a.tasks.split(",") if t.strip())
                unknown = [t for t in tasks if t not in known]
                if unknown or len(tasks) < 2 or len(set(tasks)) != len(tasks):
                    raise ZooError(f"--tasks {a.tasks!r}: give two or more distinct {a.kind} tasks of "
                                   f"{', '.join(known)}" + (f" ({', '.join(unknown)} unknown)" if unknown else ""))
                kw["tasks"] = tasks
            if a.kind == "vision" and a.independent:
                raise ZooError("--independent: the vision zoo has no independent experts")
            Config = VisionZooConfig if a.kind == "vision" else ZooConfig
            cfg = Config.test_mode(**kw) if a.test_mode else Config(**kw)
            out = a.out if a.out is not None else ("zoo_vision" if a.kind == "vision" else None)
            zoo = build_zoo(out, cfg, force=a.force, progress=not a.no_progress)
            if a.independent:
                build_independent(zoo, a.independent_steps, progress=not a.no_progress)
        else:
            zoo = load_zoo(a.out)
        print(f"zoo at {zoo.root} ({zoo.info['parameters'] / 1e6:.2f}M parameters per model)")
        print("test accuracy (each task through its head):" if zoo.kind == "vision" else
              "test accuracy (exact match):")
        print(_table(zoo))
        ind = zoo.root / "independent" / "independent.json"
        if ind.is_file():
            print("independent experts (no shared base), test accuracy:")
            print(_table(zoo, accuracy=json.loads(ind.read_text())["accuracy"]))
    except ZooError as e:
        print(f"evomerge-zoo: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
