"""Prediction entropy on unlabeled prompts: the AdaMerging objective.

For each prompt, the Shannon entropy (nats) of the model's next-token distribution after
the prompt's last token. Lower is more confident; AdaMerging chooses merge coefficients
that minimise it on unlabeled inputs of the target tasks. ``"<task>/entropy"`` is the mean
over a task's prompts, ``"score"`` the mean over tasks (to be minimised).

``prediction_entropy(model, batch, differentiable=True)`` keeps the autograd graph, so the
same quantity can be minimised by gradient descent on the coefficients, e.g. with the
merged parameters passed through ``torch.func.functional_call``::

    ids, mask = encode_prompts(tokenizer, prompts)
    call = lambda **kw: torch.func.functional_call(model, merged_params(coeffs), args=(), kwargs=kw)
    loss = prediction_entropy(call, (ids, mask), differentiable=True).mean()
    loss.backward()
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from ._batch import encode_context
from ._common import (
    EvaluationError, check_fraction, check_split, check_tasks, eval_mode, part, model_device, pad_token_id, read_jsonl, require_fields,
    resolve_sources, subsample,
)

__all__ = ["EntropyEvaluator", "prediction_entropy", "encode_prompts"]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` of prompts, encoded as every
    evaluator encodes them (with the tokenizer's default special tokens, e.g. its BOS)."""
    pad = pad_token_id(tokenizer)
    enc = encode_context(tokenizer, prompts)
    if any(len(e) == 0 for e in enc):
        raise EvaluationError("an empty prompt has no next-token distribution")
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    return ids, mask


def prediction_entropy(model, batch: tuple[torch.Tensor, torch.Tensor], differentiable: bool = False) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution after each prompt of a right-padded
    batch ``(input_ids, attention_mask)``; returns a ``[batch]`` tensor.

    ``model`` is anything called as ``model(input_ids=..., attention_mask=...)`` that returns
    logits (a tensor or an object with ``.logits``): a module, or a closure over
    ``torch.func.functional_call``. With ``differentiable`` the graph is kept (gradients flow
    to whatever the logits depend on); otherwise it is computed without autograd."""
    ids, mask = batch
    with torch.set_grad_enabled(differentiable):
        out = model(input_ids=ids, attention_mask=mask)
        logits = out.logits if hasattr(out, "logits") else out
        last = mask.sum(dim=1) - 1
        final = logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)].float()
        logp = torch.log_softmax(final, dim=-1)
        return -(logp.exp() * logp).sum(dim=-1)


class EntropyEvaluator:
    """Mean prediction entropy at the end of unlabeled prompts (see the module docstring).

    Args:
        data: ``{split: path or [paths]}`` (one task named ``name``) or
            ``{task: {split: path(s)}}``; JSONL rows with a ``field`` (default ``"prompt"``)
            and no label needed. ``split`` is ``"search"``/``"test"`` or
            ``search_split``/``test_split``.
        data_dir, tasks: alternative to ``data``: ``<data_dir>/<task>/<split>.jsonl``.
        limit, seed: a seeded subsample of ``limit`` prompts of each task's search split.
        batch_size: prompts per forward pass.
    """

    direction = "minimize"

    @staticmethod
    def primary(task: str) -> str:
        """The metric that stands for a task (what objectives read): ``"<task>/entropy"``."""
        return "entropy"

    def __init__(
        self,
        data: Mapping | None = None,
        *,
        data_dir: str | os.PathLike | None = None,
        tasks: Sequence[str] | None = None,
        name: str = "prompts",
        search_split: str = "validation",
        test_split: str = "test",
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = 256,
        field: str = "prompt",
    ):
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be positive, got {batch_size}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)  # (of the search split's subsample, and of its shares)
        sources = resolve_sources(data, data_dir, tasks, search_split, test_split, default_name=name)
        self.prompts: dict[str, dict[str, list[str]]] = {}
        for task, splits in sources.items():
            self.prompts[task] = {}
            for split, src in splits.items():
                rows = read_jsonl(src, task, split)
                require_fields(rows, (field,), task, split, src)
                if split == "search":
                    rows = [rows[i] for i in subsample(len(rows), limit, seed)]
                self.prompts[task][split] = [r[field] for r in rows]
        self.tasks = list(self.prompts)
        self._cache: dict[str, tuple] = {}

    def inputs(self, split: str = "search", tasks: Sequence[str] | None = None) -> list[str]:
        """The split's prompts (unlabeled inputs), of every task or of ``tasks``."""
        check_split(split)
        return [p for task in check_tasks(self.tasks, tasks) for p in self.prompts[task].get(split, [])]

    def _prepared(self, tokenizer, split: str, device, fraction: float = 1.0):
        hit = self._cache.get((split, fraction))
        if hit is not None and hit[0] is tokenizer and hit[1] == device:
            return hit[2]
        prep = {}
        for task in self.tasks:
            try:
                prompts = part(self.prompts[task][split], fraction, self.seed)
            except KeyError:
                raise EvaluationError(f"task {task!r}: no {split} data was given") from None
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            prompts = [prompts[i] for i in order]
            batches = []
            for i in range(0, len(prompts), self.batch_size):
                ids, mask = encode_prompts(tokenizer, prompts[i: i + self.batch_size])
                batches.append((ids.to(device), mask.to(device)))
            prep[task] = (len(prompts), batches)
        self._cache[(split, fraction)] = (tokenizer, device, prep)
        return prep

    def __call__(self, model, tokenizer, split: str = "search", fraction: float = 1.0) -> dict[str, float]:
        """``"<task>/entropy"`` per task and ``"score"``, their mean; ``fraction``: on a seeded
        share of each task's search prompts."""
        check_split(split)
        fraction = check_fraction(split, fraction)
        prep = self._prepared(tokenizer, split, model_device(model), fraction)
        out: dict[str, float] = {}
        with eval_mode(model):
            for task in self.tasks:
                n, batches = prep[task]
                total = sum(float(prediction_entropy(model, b).sum()) for b in batches)
                out[f"{task}/entropy"] = total / n
        out["score"] = float(sum(out.values()) / len(self.tasks))
        return out
