"""Token-level perplexity of a causal LM on text, with a sliding window.

Each document is tokenized on its own (with the tokenizer's default special tokens, so a
BOS is added when the tokenizer adds one) and scored with windows of at most
``max_length`` tokens whose ends are ``stride`` tokens apart; each token after a
document's first is predicted exactly once, with at least ``max_length - stride`` tokens
of context once past the first window (the method of the Hugging Face perplexity guide,
per document). Windows of all documents are batched together, longest first.

Per task: ``"<task>/nll"``, the mean negative log-likelihood per predicted token (nats),
and ``"<task>/ppl"`` = ``exp(nll)``. ``"score"`` is the mean ``ppl`` over tasks, to be
minimised.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ._common import (
    EvaluationError, check_fraction, check_split, eval_mode, part, model_device, pad_token_id, read_jsonl, rename_fields, resolve_sources,
    subsample,
)

__all__ = ["PerplexityEvaluator", "load_documents", "sliding_windows"]


def load_documents(src, task: str, split: str, field: str = "text", dataset_split: str | None = None,
                   fields: Mapping[str, str] | None = None) -> list[str]:
    """Documents of a source: a ``.txt`` file is one document; a ``.jsonl`` row gives
    ``row[field]``, or ``prompt + answer`` when it has no ``field`` (``fields`` renames
    ``prompt`` and ``answer`` as the accuracy evaluators' ``fields`` does); a datasets spec ``{"path", "name", "split", "field", ...}`` gives one document
    per non-empty row (the remaining keys, e.g. ``data_files``, go to
    ``datasets.load_dataset``; ``split`` defaults to ``dataset_split``)."""
    if isinstance(src, Mapping):
        import datasets

        spec = dict(src)
        fld = spec.pop("field", field)
        try:
            ds = datasets.load_dataset(spec.pop("path"), spec.pop("name", None),
                                       split=spec.pop("split", dataset_split or split), **spec)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds
            raise EvaluationError(f"task {task!r}, {split} split: cannot load dataset {dict(src)}: {e}") from e
        if fld not in ds.column_names:
            raise EvaluationError(f"task {task!r}, {split} split: dataset has no field {fld!r} "
                                  f"(fields: {ds.column_names})")
        docs = [t for t in ds[fld] if t and t.strip()]
    else:
        paths = [Path(src)] if isinstance(src, (str, os.PathLike)) else [Path(p) for p in src]
        docs = []
        for path in paths:
            if path.suffix == ".jsonl":
                for i, row in enumerate(read_jsonl(path, task, split, fields)):
                    if field in row:
                        docs.append(row[field])
                    elif "prompt" in row and "answer" in row:
                        docs.append(row["prompt"] + row["answer"])
                    else:
                        raise EvaluationError(f"task {task!r}, {split} split: {path} row {i} has neither "
                                              f"{field!r} nor 'prompt' and 'answer'")
            else:
                docs.append(path.read_text())
        docs = [d for d in docs if d]
    if not docs:
        raise EvaluationError(f"task {task!r}: the {split} split has no text ({src})")
    return docs


def sliding_windows(n_tokens: int, max_length: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows ``(begin, end, first_target)`` covering a document of ``n_tokens`` tokens:
    the window holds tokens ``[begin, end)`` and predicts tokens ``[first_target, end)``.
    The first window is the first ``max_length`` tokens; each next one ends ``stride``
    tokens later and is ``max_length`` long, so every token from position 1 on is predicted
    exactly once, with at least ``max_length - stride`` tokens of context past the first
    window."""
    if max_length < 2:
        raise EvaluationError(f"max_length must be at least 2, got {max_length}")
    if not 0 < stride < max_length:
        raise EvaluationError(f"stride must be in [1, max_length - 1 = {max_length - 1}], got {stride}")
    if n_tokens < 2:
        return []
    end = min(max_length, n_tokens)
    out = [(0, end, 1)]
    while end < n_tokens:
        new_end = min(end + stride, n_tokens)
        out.append((new_end - max_length, new_end, end))
        end = new_end
    return out


class PerplexityEvaluator:
    """Perplexity on text (see the module docstring).

    Args:
        data: ``{split: source}`` for one task named ``name``, or ``{task: {split: source}}``;
            ``split`` is ``"search"``/``"test"`` or ``search_split``/``test_split``. A source is
            a ``.txt``/``.jsonl`` path, a list of them, or a datasets spec
            ``{"path": ..., "name": ..., "split": ..., "field": ...}``.
        data_dir, tasks: instead of ``data``, ``<data_dir>/<task>/<split>.jsonl`` for each task
            (as the accuracy evaluators take them).
        fields: the JSONL rows' names for ``prompt`` and ``answer``.
        name: the task name of the one-task form.
        max_length: tokens per window; None: the model's ``max_position_embeddings`` (at most
            1024), read on the first call.
        stride: window step, below ``max_length``; None: ``max_length // 2``. A smaller
            stride gives each token more context, at more cost.
        batch_size: windows per forward pass.
        limit, seed: a seeded subsample of ``limit`` documents of the search split.
        field: the text field of JSONL rows and datasets.
    """

    direction = "minimize"

    @staticmethod
    def primary(task: str) -> str:
        """The metric that stands for a task (what objectives read): ``"<task>/ppl"``."""
        return "ppl"

    def __init__(
        self,
        data: Mapping | None = None,
        *,
        data_dir: str | os.PathLike | None = None,
        tasks: list[str] | None = None,
        fields: Mapping[str, str] | None = None,
        name: str = "text",
        max_length: int | None = None,
        stride: int | None = None,
        batch_size: int = 8,
        limit: int | None = None,
        seed: int = 0,
        search_split: str = "validation",
        test_split: str = "test",
        field: str = "text",
    ):
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be positive, got {batch_size}")
        self.max_length = max_length
        self.stride = stride
        self.batch_size = int(batch_size)
        fields = rename_fields(fields)
        self.seed = int(seed)  # (of the search split's subsample, and of its shares)
        sources = resolve_sources(data, data_dir, tasks, search_split, test_split, default_name=name)
        self.docs: dict[str, dict[str, list[str]]] = {}
        for task, splits in sources.items():
            self.docs[task] = {}
            for split, src in splits.items():
                docs = load_documents(src, task, split, field,
                                      dataset_split=search_split if split == "search" else test_split, fields=fields)
                if split == "search":
                    docs = [docs[i] for i in subsample(len(docs), limit, seed)]
                self.docs[task][split] = docs
        self.tasks = list(self.docs)
        self._cache: dict[str, tuple] = {}

    def _window_size(self, model) -> tuple[int, int]:
        length = self.max_length
        if length is None:
            length = min(int(getattr(model.config, "max_position_embeddings", 1024) or 1024), 1024)
        return length, self.stride or max(1, length // 2)

    def _prepared(self, model, tokenizer, split: str, fraction: float = 1.0):
        device = model_device(model)
        length, stride = self._window_size(model)
        hit = self._cache.get((split, fraction))
        if hit is not None and hit[0] is tokenizer and hit[1] == (device, length, stride):
            return hit[2]
        pad = pad_token_id(tokenizer)
        prep = {}
        for task in self.tasks:
            try:
                docs = part(self.docs[task][split], fraction, self.seed)
            except KeyError:
                raise EvaluationError(f"task {task!r}: no {split} data was given") from None
            windows = []
            for ids in tokenizer(docs)["input_ids"]:
                for begin, end, first in sliding_windows(len(ids), length, stride):
                    windows.append((ids[begin:end], first - begin))
            windows.sort(key=lambda w: -len(w[0]))
            batches = []
            for i in range(0, len(windows), self.batch_size):
                chunk = windows[i: i + self.batch_size]
                width = len(chunk[0][0])
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                labels = torch.full((len(chunk), width), -100, dtype=torch.long)
                for j, (w, first) in enumerate(chunk):
                    ids[j, : len(w)] = torch.tensor(w)
                    mask[j, : len(w)] = 1
                    labels[j, first: len(w)] = torch.tensor(w[first:])
                batches.append((ids.to(device), mask.to(device), labels[:, 1:].to(device)))
            if not batches:
                raise EvaluationError(f"task {task!r}: the {split} split has no token to predict")
            prep[task] = batches
        self._cache[(split, fraction)] = (tokenizer, (device, length, stride), prep)
        return prep

    def __call__(self, model, tokenizer, split: str = "search", fraction: float = 1.0) -> dict[str, float]:
        """``"<task>/nll"`` and ``"<task>/ppl"`` per task, ``"score"`` = mean ppl; ``fraction``:
        on a seeded share of each task's search documents."""
        check_split(split)
        fraction = check_fraction(split, fraction)
        prep = self._prepared(model, tokenizer, split, fraction)
        out: dict[str, float] = {}
        ppls = []
        with eval_mode(model):
            for task in self.tasks:
                total, count = 0.0, 0
                for ids, mask, tgt in prep[task]:
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
                    total += float(torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1), ignore_index=-100,
                        reduction="sum"))
                    count += int((tgt != -100).sum())
                nll = total / count
                ppl = math.exp(nll) if nll < 700 else math.inf
                out[f"{task}/nll"] = float(nll)
                out[f"{task}/ppl"] = float(ppl)
                ppls.append(ppl)
        out["score"] = float(sum(ppls) / len(ppls))
        return out
