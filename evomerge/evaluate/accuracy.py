"""Native accuracy on JSONL tasks of (prompt, answer) rows: the fast evaluator of a search.

Where an answer ends (``stop``) comes from the model and the tokenizer, never from a habit of
one model family: by default the answer is followed by the model's end of generation (its
generation config's ``eos_token_id``, one id or several, else the tokenizer's EOS), as
``model.generate`` stops; ``stop=["\\n"]`` (lm-eval's ``until``) says the answer is followed by
a stop string instead. A stop string the tokenizer cannot encode as itself (a vocabulary
without a newline turns ``"\\n"`` into ``<unk>``) is an error naming it. Prompts are encoded
as the tokenizer encodes text by default (with its BOS token where it adds one) and answers
as their continuation, as lm-eval does (``_batch``).

Three ways to score a row, chosen with ``mode``:

``"teacher_forced"``
    Correct when the greedy (argmax) prediction of every answer token is right given the true
    prefix, and the prediction after the answer is a stop (one of the stop ids; with stop
    strings, the tokens of the first one): one forward pass per batch. For a model decoding
    greedily this says whether greedy decoding reproduces the answer and then stops, up to
    ties between logits and to a stop string reached through other tokens.
``"generate"``
    Batched greedy decoding with a KV cache from left-padded prompts, stopped at a stop (or
    the tokenizer's EOS, as lm-eval always does) or after as many new tokens as the longest
    answer has bytes plus its stop; correct when the text before the first stop string (or
    stop token) equals the answer exactly. This is what lm-eval's ``generate_until`` with
    ``exact_match`` measures.
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
import re
import warnings
from collections.abc import Mapping, Sequence

import torch

from ._batch import encode_context, encode_continuations, encode_pairs
from ._common import (
    EvaluationError, check_disjoint, check_fraction, check_split, check_tasks, eval_mode, model_device, pad_token_id, part,
    read_jsonl, rename_fields, require_fields, resolve_sources, subsample, tokenizer_name,
)

__all__ = ["ExactMatchEvaluator", "greedy_generate", "stop_token_ids", "resolve_stop", "MODES"]

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
        stop: strings that end an answer (lm-eval's ``until``), e.g. ``["\\n"]``; None: the
            model's end of generation (see the module docstring).
        fields: the rows' field names when they are not ``prompt``, ``answer``, ``choices``
            and ``label``, e.g. ``{"prompt": "question", "answer": "target"}``.

    Rows need ``prompt`` and ``answer`` (``prompt``, ``choices`` and ``label`` in choice mode).
    A search row whose prompt also occurs in the test split is an error.
    """

    direction = "maximize"

    @staticmethod
    def primary(task: str) -> str:
        """The metric that stands for a task (what objectives read): ``"<task>/acc"``."""
        return "acc"

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
        stop: str | Sequence[str] | None = None,
        fields: Mapping[str, str] | None = None,
    ):
        if mode not in MODES:
            raise EvaluationError(f"unknown mode {mode!r}; choose one of {MODES}")
        if batch_size < 1:
            raise EvaluationError(f"batch_size must be positive, got {batch_size}")
        self.mode = mode
        self.batch_size = int(batch_size)
        self.limit = limit
        self.seed = seed
        self.stop = _stop_strings(stop)
        self.fields = rename_fields(fields)
        sources = resolve_sources(data, data_dir, tasks, search_split, test_split, default_name="task")
        fields = ("prompt", "choices", "label") if mode == "choice" else ("prompt", "answer")
        self.rows: dict[str, dict[str, list[dict]]] = {}
        for task, splits in sources.items():
            self.rows[task] = {}
            for split, src in splits.items():
                rows = read_jsonl(src, task, split, self.fields)
                require_fields(rows, fields, task, split, src, self.fields)
                if split == "search":
                    rows = [rows[i] for i in subsample(len(rows), limit, seed)]
                self.rows[task][split] = rows
            if len(self.rows[task]) == 2:
                check_disjoint([r["prompt"] for r in self.rows[task]["search"]],
                               [r["prompt"] for r in self.rows[task]["test"]], f"task {task!r}")
        self.tasks = list(self.rows)
        self._cache: dict[str, tuple] = {}

    def inputs(self, split: str = "search", tasks: Sequence[str] | None = None) -> list[str]:
        """The split's prompts without their answers: unlabeled inputs (AdaMerging's, and a
        data-reading merge's), of every task or of ``tasks``."""
        check_split(split)
        return [r["prompt"] for task in check_tasks(self.tasks, tasks) for r in self._rows_for(task, split)]

    # ------------------------------------------------------------------ preparation

    def _rows_for(self, task: str, split: str) -> list[dict]:
        try:
            return self.rows[task][split]
        except KeyError:
            raise EvaluationError(f"task {task!r}: no {split} data was given") from None

    def _prepared(self, model, tokenizer, split: str, device, fraction: float = 1.0) -> dict:
        # what the stop depends on, compared per call; the stop itself is resolved on a miss only
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        key = (device, str(eos), tokenizer.eos_token_id)
        hit = self._cache.get((split, fraction))
        if hit is not None and hit[0] is tokenizer and hit[1] == key:
            return hit[2]
        stop = None if self.mode == "choice" else resolve_stop(model, tokenizer, self.stop)
        pad_token_id(tokenizer)
        prep = {}
        for task in self.tasks:
            rows = part(self._rows_for(task, split), fraction, self.seed)
            if self.mode == "teacher_forced":
                prep[task] = self._prep_teacher_forced(tokenizer, rows, device, stop)
            elif self.mode == "generate":
                prep[task] = self._prep_generate(tokenizer, rows, device, stop)
            else:
                prep[task] = self._prep_choice(tokenizer, rows, device)
        self._cache[(split, fraction)] = (tokenizer, key, prep)
        return prep

    def _chunks(self, items: list, lengths: list[int]) -> list[list]:
        """Items ordered by length (less padding) and cut into batches."""
        order = sorted(range(len(items)), key=lambda i: lengths[i])
        items = [items[i] for i in order]
        return [items[i: i + self.batch_size] for i in range(0, len(items), self.batch_size)]

    def _prep_teacher_forced(self, tokenizer, rows, device, stop):
        """Right-padded prompt + answer + stop, the targets (-100 off the answer), the
        position of the stop's prediction and the ids accepted there."""
        kind, stops = stop
        end = stops[0] if kind == "strings" else [stops[0]]
        accepted = torch.tensor(sorted(set(stops) | _eos_ids(tokenizer)), device=device) if kind == "ids" else None
        batches = []
        for chunk in self._chunks(rows, [len(r["prompt"]) + len(r["answer"]) for r in rows]):
            ids, mask, labels = encode_pairs(tokenizer, [r["prompt"] for r in chunk], [r["answer"] for r in chunk], end)
            tgt = labels[:, 1:]
            end_pos = mask.sum(1) - 2  # the logits row that predicts the last target: the stop
            batches.append((ids.to(device), mask.to(device), tgt.to(device), end_pos.to(device)))
        return len(rows), batches, accepted

    def _prep_generate(self, tokenizer, rows, device, stop):
        kind, stops = stop
        pad = pad_token_id(tokenizer)
        _check_round_trip(tokenizer, [r["answer"] for r in rows[:32]])
        p_ids = encode_context(tokenizer, [r["prompt"] for r in rows])
        end = stops[0] if kind == "strings" else [stops[0]]
        _, cont = encode_continuations(tokenizer, [r["prompt"] for r in rows], [r["answer"] for r in rows], end)
        end_len = len(cont[0]) - len(tokenizer(rows[0]["answer"], add_special_tokens=False)["input_ids"]) \
            if kind == "strings" else 1
        # room for the longest answer even when the model spells it in more tokens than the
        # tokenizer would (at most one per byte), then its stop
        max_new = max(max(len(c) for c in cont), max(len(r["answer"].encode()) for r in rows) + max(1, end_len))
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
        if kind == "ids":
            stop_ids, strings = torch.tensor(sorted(set(stops) | _eos_ids(tokenizer)), dtype=torch.long), ()
        else:
            stop_ids, strings = stop_token_ids(tokenizer, stops), tuple(stops)
        return len(rows), batches, max_new, stop_ids.to(device), strings

    def _prep_choice(self, tokenizer, rows, device):
        """Batches of rows: left-padded prompts ``[R, P]`` and their choices right-padded
        ``[R * k, C]`` (``k`` the most choices of a row; missing ones are masked)."""
        pad = pad_token_id(tokenizer)
        for i, r in enumerate(rows):
            if not (0 <= int(r["label"]) < len(r["choices"])):
                raise EvaluationError(f"row {i}: label {r['label']} is not an index of its {len(r['choices'])} "
                                      "choices")
        k = max(len(r["choices"]) for r in rows)
        pairs = [encode_continuations(tokenizer, [r["prompt"]] * len(r["choices"]), list(r["choices"])) for r in rows]
        p_ids = [ctx[0] for ctx, _ in pairs]
        c_ids = [cont for _, cont in pairs]
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

    def __call__(self, model, tokenizer, split: str = "search", fraction: float = 1.0) -> dict[str, float]:
        """Accuracy per task (``"<task>/acc"``) and their mean (``"score"``); ``fraction``: on
        a seeded share of each task's search rows (``_common.part``)."""
        check_split(split)
        fraction = check_fraction(split, fraction)
        device = model_device(model)
        prep = self._prepared(model, tokenizer, split, device, fraction)
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
    def _teacher_forced(model, n, batches, accepted) -> float:
        hits = 0
        for ids, mask, tgt, end_pos in batches:
            pred = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].argmax(-1)
            ok = (pred == tgt) | (tgt == -100)
            if accepted is not None:  # any stop id ends the answer
                rows = torch.arange(len(end_pos), device=end_pos.device)
                ok[rows, end_pos] = torch.isin(pred[rows, end_pos], accepted)
            hits += int(ok.all(dim=1).sum())
        return hits / n

    @staticmethod
    def _generate(model, tokenizer, n, batches, max_new, stops, strings) -> float:
        stop_set = set(stops.tolist())
        hits = 0
        for ids, mask, answers in batches:
            gen = greedy_generate(model, ids, mask, max_new, stops, pad_token_id(tokenizer))
            for row, answer in zip(gen.tolist(), answers):
                cut = next((i for i, t in enumerate(row) if t in stop_set), len(row))
                text = tokenizer.decode(row[: cut + 1] if strings else row[:cut], skip_special_tokens=True)
                for s in strings:
                    text = text.split(s, 1)[0]
                hits += text == answer
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
    name = tokenizer_name(tokenizer)
    msg = (f"tokenizer {name!r} does not decode the answers it encodes ({bad[0]!r} -> {example!r}), so generated "
           "text cannot match them; give it a decoder (e.g. tokenizers.decoders.Fuse() for a character vocabulary)")
    if multi and set(multi) <= set(bad):
        raise EvaluationError(msg)
    warnings.warn(f"{len(bad)} of {len(answers)} answers checked: {msg}", stacklevel=3)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def _stop_strings(stop) -> tuple[str, ...] | None:
    """Stop strings checked, with the backslash escapes ``\\n``, ``\\t``, ``\\r`` and ``\\\\``
    decoded (a command line passes ``'eval.stop=["\\n"]'`` as a backslash and an ``n``)."""
    if stop is None:
        return None
    items = [stop] if isinstance(stop, str) else list(stop)
    if not items or not all(isinstance(s, str) and s for s in items):
        raise EvaluationError(f"stop: give non-empty strings (lm-eval's until), or nothing for the model's EOS; "
                              f"got {stop!r}")
    return tuple(re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(0)), s) for s in items)


def _eos_ids(tokenizer) -> set[int]:
    return set() if tokenizer.eos_token_id is None else {int(tokenizer.eos_token_id)}


def resolve_stop(model, tokenizer, stop: tuple[str, ...] | None) -> tuple[str, tuple]:
    """``("strings", stop strings)``, each checked to encode as itself, or ``("ids", ids)``:
    the model's end of generation (generation config, else the tokenizer's EOS)."""
    name = tokenizer_name(tokenizer)
    if stop is not None:
        unk = tokenizer.unk_token_id
        for s in stop:
            ids = tokenizer(s, add_special_tokens=False)["input_ids"]
            back = tokenizer.decode(ids, skip_special_tokens=False)
            if not ids or (unk is not None and unk in ids) or back != s:
                raise EvaluationError(f"stop string {s!r}: tokenizer {name!r} cannot encode it as itself (it becomes "
                                      f"{back!r}); a model with this tokenizer never writes it. Leave stop unset to "
                                      "end answers with the model's EOS, or give a string its vocabulary has")
        return "strings", tuple(stop)
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [gen] if isinstance(gen, int) else list(gen or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    if not ids:
        raise EvaluationError(f"no end of answer: tokenizer {name!r} has no EOS token and the model's generation "
                              "config none; give stop=[...] (the strings that end an answer)")
    return "ids", tuple(int(i) for i in ids)


def stop_token_ids(tokenizer, strings: Sequence[str]) -> torch.Tensor:
    """Ids of the tokens whose text contains one of ``strings``, plus EOS: decoding may stop
    after one (a stop string spread over several tokens is found in the decoded text)."""
    cache = getattr(tokenizer, "_evomerge_stop_ids", None)
    if cache is None:
        cache = {}
        try:
            tokenizer._evomerge_stop_ids = cache
        except Exception:  # pragma: no cover - a tokenizer that refuses attributes
            pass
    key = tuple(strings)
    if key not in cache:
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False)
        ids = {i for i, t in enumerate(texts) if any(s in t for s in strings)} | _eos_ids(tokenizer)
        cache[key] = torch.tensor(sorted(ids), dtype=torch.long)
    return cache[key]


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
