"""Small model families for tests and examples, made locally (no model hub).

``tiny_family(root)`` writes a Llama-architecture base and ``n_experts`` "fine-tunes" of it
(base plus a seeded random task vector) with a character-level tokenizer, in seconds, so
every loading, merging and writing path runs::

    from evomerge.testing import tiny_family
    paths = tiny_family("/tmp/tiny", n_experts=3)   # {"base": ..., "expert_0": ..., ...}

``word_family(root)`` trains a family that shares none of the zoo's conventions, for checking
that scores are right on models evomerge did not shape: a GPT-2 architecture (fused
``c_attn``, ``Conv1D`` weights, tied embeddings, ``transformer.h.N`` names), a byte-level BPE
tokenizer that adds a BOS token and has no pad token, answers that end with the EOS token
(no newline anywhere), and data in ``<task>/dev.jsonl`` and ``<task>/test.jsonl`` with the
fields ``question``, ``target``, ``options`` and ``gold``. Each expert is fine-tuned from the
base until it answers its own task (about a minute on 2 CPU cores)::

    python -m evomerge.testing words /tmp/words      # base, experts/<task>, data/<task>/*.jsonl

``vit_family(root)`` is the second family of the classification path: ViT image classifiers
(``ViTForImageClassification``: ``vit.encoder.layer.N`` names, a pooled first token after a
final layer norm, no image processor saved) whose experts each carry their own
``classifier`` with their task's label set (6 and 10 classes), and data in
``data/<task>/{dev,test}.safetensors``. The merge keeps each expert's classifier as its
task's head (the recipe's ``keep: [classifier]``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

__all__ = ["tiny_config", "tiny_tokenizer", "tiny_model", "tiny_family", "CHARS", "word_family", "WordFamily",
           "WORD_TASKS", "vit_family", "VitFamily"]

CHARS = list("0123456789abcdefghijklmnopqrstuvwxyz +-=:,.?>")
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def tiny_tokenizer():
    """A character-level fast tokenizer built locally (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
    )
    tok.model_max_length = 512
    return tok


def tiny_config(hidden: int = 32, layers: int = 2, vocab: int | None = None, tie: bool = False, **kw):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab or len(SPECIAL) + len(CHARS),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4 if hidden % 4 == 0 else 1,
        num_key_value_heads=2 if hidden % 4 == 0 else 1,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        **kw,
    )


def tiny_model(config, seed: int = 0):
    """A randomly initialised causal LM, deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _perturb(model, seed: int, scale: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.detach().abs().mean() + 1e-3))


def tiny_family(
    root: str | Path,
    n_experts: int = 3,
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    tie: bool = False,
    scale: float = 0.3,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
) -> dict[str, Path]:
    """Write ``base`` and ``expert_i`` folders under ``root``; returns their paths."""
    from .zoo import _save_tokenizer

    root = Path(root)
    cfg = tiny_config(hidden=hidden, layers=layers, tie=tie)
    tok = tiny_tokenizer()
    out: dict[str, Path] = {}
    base = tiny_model(cfg, seed)
    names = ["base"] + [f"expert_{i}" for i in range(n_experts)]
    for i, name in enumerate(names):
        m = tiny_model(cfg, seed)
        if i:
            _perturb(m, seed * 1000 + i, scale)
        m = m.to(dtype)
        path = root / name
        kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
        m.save_pretrained(path, **kw)
        _save_tokenizer(tok, path)
        out[name] = path
    del base
    return out



# --------------------------------------------------------------------------------------
# A second family with other conventions: GPT-2, byte-level BPE, EOS-terminated answers
# --------------------------------------------------------------------------------------

WORDS = ("red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird", "star", "rain", "snow",
         "fire", "wind", "rock")
WORD_TASKS = {  # name: (prompt head, answer from the input words)
    "reverse": ("reverse", lambda ws: " ".join(reversed(ws))),
    "rotate": ("rotate", lambda ws: " ".join([*ws[1:], ws[0]])),
}
_WORD_FIELDS = {"prompt": "question", "answer": "target", "choices": "options", "label": "gold"}


@dataclass
class WordFamily:
    """Paths of a built word family; ``fields`` maps evomerge's row fields to its data's."""

    root: Path
    tasks: list[str]
    base: Path
    experts: dict[str, Path]
    data: dict[str, dict[str, Path]]  # task -> {"dev": path, "test": path}
    accuracy: dict[str, dict[str, float]]
    fields: dict[str, str] = field(default_factory=lambda: dict(_WORD_FIELDS))


def _word_prompt(task: str, ws: Sequence[str]) -> str:
    return f"{WORD_TASKS[task][0]}: {' '.join(ws)} ="


def _word_rows(task: str, inputs: list[tuple[str, ...]], rng) -> list[dict]:
    rows = []
    for ws in inputs:
        answer = WORD_TASKS[task][1](ws)
        wrong = set()
        while len(wrong) < 3:  # near misses: one word of the answer changed
            parts = answer.split(" ")
            parts[int(rng.integers(len(parts)))] = WORDS[int(rng.integers(len(WORDS)))]
            if " ".join(parts) != answer:
                wrong.add(" ".join(parts))
        options = [answer, *sorted(wrong)]
        order = rng.permutation(len(options))
        rows.append({"question": _word_prompt(task, ws), "target": answer,
                     "options": [options[j] for j in order], "gold": int(np.flatnonzero(order == 0)[0])})
    return rows


def word_tokenizer(corpus: Sequence[str]):
    """A byte-level BPE tokenizer trained on ``corpus``: BOS added to every encoding by its
    post-processor, EOS and BOS distinct, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|bos|>", "<|eos|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    bos = tk.token_to_id("<|bos|>")
    tk.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                      special_tokens=[("<|bos|>", bos)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|bos|>", eos_token="<|eos|>")
    tok.model_max_length = 64
    return tok


def word_family(root: str | Path, tasks: Sequence[str] = tuple(WORD_TASKS), seed: int = 0, n_words: int = 3,
                eval_size: int = 100, base_steps: int = 400, expert_steps: int = 500, lr: float = 5e-3,
                batch_size: int = 48, hidden: int = 64) -> WordFamily:
    """Train and write the word family under ``root`` (see the module docstring); returns its
    paths and each model's teacher-forced accuracy on each task's test rows. A family already
    there (``family.json``) is returned as it is."""
    import itertools

    from transformers import GPT2Config, GPT2LMHeadModel

    from .zoo import _save_tokenizer, accuracy, train

    root = Path(root)
    meta = root / "family.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        return WordFamily(root, info["tasks"], root / "base", {t: root / "experts" / t for t in info["tasks"]},
                          {t: {s: root / "data" / t / f"{s}.jsonl" for s in ("dev", "test")} for t in info["tasks"]},
                          info["accuracy"])
    rng = np.random.Generator(np.random.PCG64(seed))
    every = list(itertools.product(WORDS, repeat=n_words))
    order = rng.permutation(len(every))
    held = [every[i] for i in order[: 2 * eval_size]]  # dev and test inputs, never trained on
    train_pool = [every[i] for i in order[2 * eval_size:]]
    rows = {t: {"dev": _word_rows(t, held[:eval_size], rng), "test": _word_rows(t, held[eval_size:], rng)}
            for t in tasks}
    corpus = [_word_prompt(t, ws) + WORD_TASKS[t][1](ws) for t in tasks for ws in train_pool[:500]]
    corpus += [f"copy: {' '.join(ws)} ={' '.join(ws)}" for ws in train_pool[:200]]
    tok = word_tokenizer(corpus)
    eos = tok.eos_token_id

    class Mix:  # training pairs for zoo.train: the tasks (the base sees them on shorter inputs) and copying
        def __init__(self, names, short):
            self.names, self.short = names, short

        def batch(self, n):
            prompts, answers = [], []
            for _ in range(n):
                name = self.names[int(rng.integers(len(self.names)))]
                ws = train_pool[int(rng.integers(len(train_pool)))]
                if name == "copy":
                    prompts.append(f"copy: {' '.join(ws)} ="), answers.append(" ".join(ws))
                    continue
                ws = ws[: n_words - 1] if self.short else ws
                prompts.append(_word_prompt(name, ws)), answers.append(WORD_TASKS[name][1](ws))
            return prompts, answers

    def fit(model, names, steps, short=False):
        train(model, tok, Mix(names, short), steps, lr, batch_size, weight_decay=0.0, warmup=max(1, steps // 10),
              progress=False, end=[eos])

    def measure(model):
        return {t: round(accuracy(model, tok, [{"prompt": r["question"], "answer": r["target"]}
                                               for r in rows[t]["test"]], end=[eos]), 4) for t in tasks}

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=hidden, n_layer=2, n_head=4,
                     bos_token_id=tok.bos_token_id, eos_token_id=eos)
    model = GPT2LMHeadModel(cfg)
    tmp = root.with_name(f".{root.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    fit(model, ["copy", *tasks], base_steps, short=True)  # knows the formats, not the target length

    def save(model, path):
        model.generation_config.eos_token_id = eos
        model.generation_config.bos_token_id = tok.bos_token_id
        model.save_pretrained(path)
        _save_tokenizer(tok, path)

    save(model, tmp / "base")
    acc = {"base": measure(model)}
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    for t in tasks:
        model.load_state_dict(base_state)
        fit(model, [t], expert_steps)
        save(model, tmp / "experts" / t)
        acc[t] = measure(model)
    for t in tasks:
        for split, rs in rows[t].items():
            path = tmp / "data" / t / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rs))
    (tmp / "family.json").write_text(json.dumps({"tasks": list(tasks), "accuracy": acc, "seed": seed}, indent=2))
    tmp.rename(root)
    return word_family(root)


@dataclass
class VitFamily:
    root: Path
    tasks: list[str]
    base: Path
    experts: dict[str, Path]
    accuracy: dict[str, dict[str, float]] = field(default_factory=dict)

    def data(self, task: str, split: str) -> Path:
        return self.root / "data" / task / f"{split}.safetensors"


def vit_family(root: str | Path, tasks: Sequence[str] = ("shape", "digits"), seed: int = 0, eval_size: int = 64,
               base_steps: int = 60, expert_steps: int = 80, batch_size: int = 32) -> VitFamily:
    """Train and write the ViT family under ``root`` (see the module docstring; seconds on a
    CPU); each model's test accuracy through each task's expert head is recorded. A family
    already there (``family.json``) is returned as it is."""
    from transformers import ViTConfig, ViTForImageClassification

    from .vision.heads import classifier_head, features, pixel_values
    from .vision.images import IMAGE_TASKS, draw_mixture
    from .vision.zoo import write_images

    root = Path(root)
    meta = root / "family.json"
    if meta.is_file():
        info = json.loads(meta.read_text())
        return VitFamily(root, info["tasks"], root / "base", {t: root / "experts" / t for t in info["tasks"]},
                         info["accuracy"])
    tmp = root.with_name(f".{root.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    rng = np.random.Generator(np.random.PCG64(seed))
    ts = [IMAGE_TASKS[t] for t in tasks]
    splits = {}
    for t in ts:
        for split in ("dev", "test"):
            imgs, ys = t.draw(rng, eval_size)
            write_images(tmp / "data" / t.name / f"{split}.safetensors", imgs, ys, list(t.classes))
            splits[t.name, split] = (pixel_values(imgs), torch.from_numpy(ys))

    def config(labels):
        return ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                         image_size=32, patch_size=8, num_labels=len(labels), id2label=dict(enumerate(labels)),
                         label2id={c: i for i, c in enumerate(labels)})

    def fit(model, batch, steps, lr):
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
        model.train()
        for _ in range(steps):
            x, y = batch()
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()

    torch.manual_seed(seed)
    domains = [t.name for t in ts]
    base = ViTForImageClassification(config(domains))  # pretrained on which task an image comes from

    def mixture():
        imgs, which, _ = draw_mixture(ts, rng, batch_size)
        return pixel_values(imgs), torch.from_numpy(which)

    fit(base, mixture, base_steps, 3e-3)
    try:
        from transformers import ViTImageProcessorPil as ViTImageProcessor  # (no torchvision needed)
    except ImportError:  # transformers < 5
        from transformers import ViTImageProcessor

    # the images are made at the model's size: scaled to [-1, 1], as pixel_values() does
    processor = ViTImageProcessor(do_resize=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    base.save_pretrained(tmp / "base")
    processor.save_pretrained(tmp / "base")
    heads = {}
    for t in ts:
        expert = ViTForImageClassification(config(t.classes))
        state = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
        expert.load_state_dict(state, strict=False)

        def task_batch(t=t):
            imgs, ys = t.draw(rng, batch_size)
            return pixel_values(imgs), torch.from_numpy(ys)

        fit(expert, task_batch, expert_steps, 2e-3)
        expert.save_pretrained(tmp / "experts" / t.name)
        processor.save_pretrained(tmp / "experts" / t.name)
        heads[t.name] = classifier_head(expert)

    def measure(model):
        out = {}
        with torch.no_grad():
            for t in ts:
                x, y = splits[t.name, "test"]
                out[t.name] = round(float((heads[t.name].logits(features(model, x)).argmax(-1) == y).float().mean()), 4)
        return out

    acc = {"base": measure(base)}
    for t in ts:
        acc[t.name] = measure(ViTForImageClassification.from_pretrained(tmp / "experts" / t.name).eval())
    (tmp / "family.json").write_text(json.dumps({"tasks": list(tasks), "accuracy": acc, "seed": seed}, indent=2))
    tmp.rename(root)
    return vit_family(root)


def main(argv: list[str] | None = None) -> int:
    """``python -m evomerge.testing OUT [--experts N] [--layers N] [--hidden N]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m evomerge.testing",
                                 description="Write a tiny base model and its experts (seconds).")
    ap.add_argument("out")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if (Path(a.out) / "base" / "config.json").is_file():
        print(f"{a.out}: already there")
        return 0
    paths = tiny_family(a.out, n_experts=a.experts, seed=a.seed, hidden=a.hidden, layers=a.layers)
    print("\n".join(f"{k}: {v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
