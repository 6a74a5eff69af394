"""Native accuracy on JSONL tasks of (prompt, answer) rows: the fast evaluator of a search.

Three ways to score a row, chosen with ``mode``:

``"teacher_forced"``
    Correct when the greedy (argmax) prediction of every answer token and of the final
    ``"\\n"`` is right given the true prefix: one forward pass per batch. For a model
    decoding greedily this is the same as ``"generate"`` (both say whether greedy decoding
    reproduces ``answer + "\\n"``), up to ties between logits.
``"generate"``
    Batched greedy decoding with a KV cache from left-padded prompts, stopped at a newline
    (or the tokenizer's EOS) or after ``max answer tokens + 1`` new tokens; correct when the
    text before the first newline equals the answer exactly. This is what lm-eval's
    ``generate_until`` with ``until: ["\\n"]`` and ``exact_match`` measures.
``"choice"``
    Multiple choice over the row's ``choices`` with the correct index in ``label``: correct
    when the choice with the highest summed log-likelihood given the prompt is the label
    (lm-eval's ``acc`` for ``multiple_choice`` tasks with ``target_delimiter: ""``).

The metric of every task is ``"<task>/acc"``; ``"score"`` is the unweighted mean over tasks.
Everything that does not depend on the weights (rows, tokenized and padded batches on the
model's device) is computed on the first call and reused.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence

import torch

from ._batch import encode_pairs
from ._common import (
    EvaluationError, check_disjoint, check_split, eval_mode, model_device, pad_token_id, read_jsonl,
    require_fields, resolve_sources, subsample,
)

__all__ = ["ExactMatchEvaluator", "greedy_generate", "stop_token_ids", "MODES"]

MODES = ("teacher_forced", "generate", "choice")


class ExactMatchEvaluator:
    """Accuracy of a causal LM on JSONL tasks (see the module docstring for the modes).

    Args:
        data: ``{task: {split: path or [paths]}}`` with split ``"search"``/``"test"`` or the
            file split names ``search_split``/``test_split``; or ``{split: path}`` for one
            task named ``"task"``.
        data_dir: alternative to ``data``: ``<data_dir>/<task>/<split>.jsonl`` for each of
            ``tasks`` (``data_dir`` may be a zoo folder holding ``data/``).
        tasks: task names (required with ``data_dir``; with ``data``, a selection).
        search_split, test_split: file split names used for ``split="search"``/``"test"``.
        limit: size of a seeded subsample of each task's search split (the test split is
            always used whole).
        seed: seed of that subsample (NumPy PCG64).
        batch_size: rows per forward pass (in ``"choice"`` mode, prompt + choice sequences:
            the prompts of ``batch_size // choices`` rows are run once, with a KV cache, then
            all their choices in one pass).
        mode: ``"teacher_forced"``, ``"generate"`` or ``"choice"``.

    Rows need ``prompt`` and ``answer`` (``prompt``, ``choices`` and ``label`` in choice mode).
    A search row whose prompt also occurs in the test split is an error.
    """

    direction = "maximize"

    def __init__(
        self,
        data: Mapping | None = None,
        *,
        data_dir: str | os.PathLike | None = None,
        tasks: Sequence[str] | None = None,
        search_split: str = "validation",
        test_split: str = "test",
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = 256,
        mode: str = "teacher_forced",
    ):
        if mode not in MODES:
            raise EvaluationError(f"unknown mode {mode!r}; choose one of {MODES}")
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be positive, got {batch_size}")
        self.mode = mode
        self.batch_size = int(batch_size)
        self.limit = limit
        self.seed = seed
        sources = resolve_sources(data, data_dir, tasks, search_split, test_split, default_name="task")
        fields = ("prompt", "choices", "label") if mode == "choice" else ("prompt", "answer")
        self.rows: dict[str, dict[str, list[dict]]] = {}
        for task, splits in sources.items():
            self.rows[task] = {}
            for split, src in splits.items():
                rows = read_jsonl(src, task, split)
                require_fields(rows, fields, task, split, src)
                if split == "search":
                    rows = [rows[i] for i in subsample(len(rows), limit, seed)]
                self.rows[task][split] = rows
            if len(self.rows[task]) == 2:
                check_disjoint([r["prompt"] for r in self.rows[task]["search"]],
                               [r["prompt"] for r in self.rows[task]["test"]], f"task {task!r}")
        self.tasks = list(self.rows)
        self._cache: dict[str, tuple] = {}

    # ------------------------------------------------------------------ preparation

    def _rows_for(self, task: str, split: str) -> list[dict]:
        try:
            return self.rows[task][split]
        except KeyError:
            raise EvaluationError(f"task {task!r}: no {split} data was given") from None

    def _prepared(self, tokenizer, split: str, device) -> dict:
        key = split
        hit = self._cache.get(key)
        if hit is not None and hit[0] is tokenizer and hit[1] == device:
            return hit[2]
        pad_token_id(tokenizer)
        prep = {}
        for task in self.tasks:
            rows = self._rows_for(task, split)
            if self.mode == "teacher_forced":
                prep[task] = self._prep_teacher_forced(tokenizer, rows, device)
            elif self.mode == "generate":
                prep[task] = self._prep_generate(tokenizer, rows, device)
            else:
                prep[task] = self._prep_choice(tokenizer, rows, device)
        self._cache[key] = (tokenizer, device, prep)
        return prep

    def _chunks(self, items: list, lengths: list[int]) -> list[list]:
        """Items ordered by length (less padding) and cut into batches."""
        order = sorted(range(len(items)), key=lambda i: lengths[i])
        items = [items[i] for i in order]
        return [items[i: i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def _prep_teacher_forced(self, tokenizer, rows, device):
        lengths = [len(r["prompt"]) + len(r["answer"]) for r in rows]
        batches = []
        for chunk in self._chunks(rows, lengths):
            ids, mask, labels = encode_pairs(tokenizer, [r["prompt"] for r in chunk],
                                             [r["answer"] + "\n" for r in chunk])
            batches.append((ids.to(device), mask.to(device), labels[:, 1:].to(device)))
        return len(rows), batches

    def _prep_generate(self, tokenizer, rows, device):
        pad = pad_token_id(tokenizer)
        _check_round_trip(tokenizer, [r["answer"] for r in rows[:32]])
        p_ids = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
        a_len = tokenizer([r["answer"] + "\n" for r in rows], add_special_tokens=False)["input_ids"]
        max_new = max(len(a) for a in a_len)
        items = list(zip(p_ids, [r["answer"] for r in rows]))
        batches = []
        for chunk in self._chunks(items, [len(p) for p in p_ids]):
            width = max(len(p) for p, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, (p, _) in enumerate(chunk):
                ids[i, width - len(p):] = torch.tensor(p)
                mask[i, width - len(p):] = 1
            batches.append((ids.to(device), mask.to(device), [a for _, a in chunk]))
        stops = stop_token_ids(tokenizer).to(device)
        return len(rows), batches, max_new, stops

    def _prep_choice(self, tokenizer, rows, device):
        """Batches of rows: left-padded prompts ``[R, P]`` and their choices right-padded
        ``[R * k, C]`` (``k`` the most choices of a row; missing ones are masked)."""
        pad = pad_token_id(tokenizer)
        for i, r in enumerate(rows):
            if not (0 <= int(r["label"]) < len(r["choices"])):
                raise EvaluationError(f"row {i}: label {r['label']} is not an index of its {len(r['choices'])} "
                                      "choices")
        k = max(len(r["choices"]) for r in rows)
        p_ids = tokenizer([r["prompt"] for r in rows], add_special_tokens=False)["input_ids"]
        c_ids = [tokenizer(list(r["choices"]), add_special_tokens=False)["input_ids"] for r in rows]
        for i, cs in enumerate(c_ids):
            if not p_ids[i] or any(len(c) == 0 for c in cs):
                raise EvaluationError(f"row {i}: an empty prompt or choice cannot be scored")
        per_batch = max(1, self.batch_size // k)
        order = sorted(range(len(rows)), key=lambda i: len(p_ids[i]))
        batches = []
        for b in range(0, len(order), per_batch):
            idx = order[b: b + per_batch]
            width = max(len(p_ids[i]) for i in idx)
            c_width = max(len(c) for i in idx for c in c_ids[i])
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            cids = torch.full((len(idx) * k, c_width), pad, dtype=torch.long)
            cmask = torch.zeros((len(idx) * k, c_width), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, width - len(p_ids[i]):] = torch.tensor(p_ids[i])
                mask[r, width - len(p_ids[i]):] = 1
                for j, c in enumerate(c_ids[i]):
                    cids[r * k + j, : len(c)] = torch.tensor(c)
                    cmask[r * k + j, : len(c)] = 1
            batches.append(tuple(t.to(device) for t in (ids, mask, cids, cmask)) + (torch.tensor(idx),))
        labels = torch.tensor([int(r["label"]) for r in rows])
        return len(rows), batches, k, labels

    # ------------------------------------------------------------------ scoring

    def __call__(self, model, tokenizer, split: str = "search") -> dict[str, float]:
        """Accuracy per task (``"<task>/acc"``) and their mean (``"score"``)."""
        check_split(split)
        device = model_device(model)
        prep = self._prepared(tokenizer, split, device)
        out: dict[str, float] = {}
        with eval_mode(model):
            for task in self.tasks:
                if self.mode == "teacher_forced":
                    hits = self._teacher_forced(model, *prep[task])
                elif self.mode == "generate":
                    hits = self._generate(model, tokenizer, *prep[task])
                else:
                    hits = self._choice(model, *prep[task])
                out[f"{task}/acc"] = float(hits)
        out["score"] = float(sum(out.values()) / len(self.tasks))
        return out

    @staticmethod
    def _teacher_forced(model, n, batches) -> float:
        hits = 0
        for ids, mask, tgt in batches:
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            ok = (logits.argmax(-1) == tgt) | (tgt == -100)
            hits += int(ok.all(dim=1).sum())
        return hits / n

    @staticmethod
    def _generate(model, tokenizer, n, batches, max_new, stops) -> float:
        eos = tokenizer.eos_token_id
        hits = 0
        for ids, mask, answers in batches:
            gen = greedy_generate(model, ids, mask, max_new, stops, pad_token_id(tokenizer))
            for row, answer in zip(gen.tolist(), answers):
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                text = tokenizer.decode(row, skip_special_tokens=True)
                hits += text.split("\n", 1)[0] == answer
        return hits / n

    @staticmethod
    def _choice(model, n, batches, k, labels) -> float:
        """One pass over the prompts with a KV cache, then one over all their choices."""
        ll = torch.full((n, k), float("-inf"))
        for ids, mask, cids, cmask, rows in batches:
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
            first = out.logits[:, -1].float().log_softmax(-1).repeat_interleave(k, dim=0)  # predicts choice token 0
            cache = out.past_key_values
            cache.batch_repeat_interleave(k)
            full_mask = torch.cat([mask.repeat_interleave(k, dim=0), cmask], dim=1)
            cpos = pos[:, -1:].repeat_interleave(k, dim=0) + 1 + torch.arange(cids.shape[1], device=cids.device)
            logits = model(input_ids=cids, attention_mask=full_mask, position_ids=cpos, past_key_values=cache,
                           use_cache=True).logits[:, :-1].float().log_softmax(-1)
            tok = logits.gather(-1, cids[:, 1:].unsqueeze(-1)).squeeze(-1) * cmask[:, 1:]
            total = first.gather(-1, cids[:, :1]).squeeze(-1) + tok.sum(-1)
            total = torch.where(cmask[:, 0] > 0, total, torch.full_like(total, float("-inf")))
            ll[rows] = total.view(-1, k).cpu()
        return int((ll.argmax(-1) == labels).sum()) / n


def _check_round_trip(tokenizer, answers: list[str]) -> None:
    """Generated text is compared with the answers, so the tokenizer must decode what it
    encodes: refuse one that changes every answer of more than one token (e.g. a character
    vocabulary without a decoder joins tokens with spaces), warn when it changes some."""
    encoded = [(a, tokenizer(a, add_special_tokens=False)["input_ids"]) for a in answers]
    bad = [a for a, ids in encoded if tokenizer.decode(ids, skip_special_tokens=True) != a]
    if not bad:
        return
    multi = [a for a, ids in encoded if len(ids) > 1]
    example = tokenizer.decode(tokenizer(bad[0], add_special_tokens=False)["input_ids"], skip_special_tokens=True)
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    msg = (f"tokenizer {name!r} does not decode the answers it encodes ({bad[0]!r} -> {example!r}), so generated "
           "text cannot match them; give it a decoder (e.g. tokenizers.decoders.Fuse() for a character vocabulary)")
    if multi and set(multi) <= set(bad):
        raise EvaluationError(msg)
    warnings.warn(f"{len(bad)} of {len(answers)} answers checked: {msg}", stacklevel=3)


def stop_token_ids(tokenizer) -> torch.Tensor:
    """Ids of the tokens whose text contains a newline, plus EOS: decoding may stop after one."""
    cached = getattr(tokenizer, "_evomerge_stop_ids", None)
    if cached is not None:
        return cached
    n = len(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
    ids = [i for i, t in enumerate(texts) if "\n" in t]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    out = torch.tensor(sorted(set(ids)), dtype=torch.long)
    try:
        tokenizer._evomerge_stop_ids = out
    except Exception:  # pragma: no cover - a tokenizer that refuses attributes
        pass
    return out


def greedy_generate(model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, stop_ids: torch.Tensor,
                    pad_id: int) -> torch.Tensor:
    """Greedy decoding of a left-padded batch with a KV cache. Returns the new tokens
    ``[batch, steps]`` (``steps <= max_new_tokens``); after a row has produced one of
    ``stop_ids`` its later tokens are ``pad_id``. Decoding ends when every row has stopped.
    Positions count from each row's first real token, as ``model.generate`` does."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    past = out.past_key_values
    tok = out.logits[:, -1].argmax(-1)
    done = torch.isin(tok, stop_ids)
    steps = [tok]
    pos = pos[:, -1:]
    ones = mask.new_ones((mask.shape[0], 1))
    for _ in range(max_new_tokens - 1):
        if bool(done.all()):
            break
        mask = torch.cat([mask, ones], dim=1)
        pos = pos + 1
        out = model(input_ids=tok.unsqueeze(-1), attention_mask=mask, position_ids=pos, past_key_values=past,
                    use_cache=True)
        past = out.past_key_values
        tok = torch.where(done, torch.full_like(tok, pad_id), out.logits[:, -1].argmax(-1))
        done = done | torch.isin(tok, stop_ids)
        steps.append(tok)
    return torch.stack(steps, dim=1)
