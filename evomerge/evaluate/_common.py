"""Helpers shared by the evaluators: the error type, data-source resolution, JSONL reading,
seeded subsampling and a context manager that puts a model in evaluation mode."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Iterator

import numpy as np

__all__ = [
    "EvaluationError", "SPLITS", "check_split", "check_fraction", "part", "resolve_sources", "read_jsonl", "subsample",
    "eval_mode", "model_device", "pad_token_id", "text_hash", "rename_fields", "FIELDS", "tokenizer_name",
]

SPLITS = ("search", "test")


class EvaluationError(ValueError):
    """Bad evaluator input: unknown task, missing or empty data, unusable tokenizer, a search
    split that would touch a benchmark's test data. The message names the thing at fault."""


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise EvaluationError(f"unknown split {split!r}: use 'search' (what the search optimises) or 'test'")
    return split


def check_tasks(known: Sequence[str], tasks: Sequence[str] | None) -> list[str]:
    """``tasks`` (default: every one ``known``), each checked to be one of them."""
    if tasks is None:
        return list(known)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise EvaluationError(f"unknown task(s) {', '.join(map(repr, unknown))}; the evaluator's tasks: "
                              f"{', '.join(map(repr, known))}")
    return list(tasks)


def check_fraction(split: str, fraction) -> float:
    """A share of the search split to score (multi-fidelity search): in (0, 1]; the test
    split is always scored whole."""
    try:
        f = float(fraction)
    except (TypeError, ValueError):
        f = float("nan")
    if not 0 < f <= 1:
        raise EvaluationError(f"fraction must be in (0, 1], got {fraction!r}")
    if f < 1 and split != "search":
        raise EvaluationError(f"fraction={f}: only the search split is scored in part; the {split} split is "
                              "always scored whole")
    return f


def part(items: list, fraction: float, seed: int) -> list:
    """A seeded share of ``items``: ``ceil(fraction * n)`` of them (at least one), in their
    order. The shares of one seed are nested (the first items of one seeded permutation), so
    a candidate promoted from a share to the whole split is scored again on a superset."""
    if fraction >= 1:
        return items
    n = len(items)
    k = max(1, int(np.ceil(fraction * n - 1e-9)))
    chosen = np.random.Generator(np.random.PCG64([int(seed), 1])).permutation(n)[:k]
    return [items[i] for i in sorted(chosen.tolist())]


# A data source is a path (str / PathLike), a list of paths, or a datasets spec
# ({"path": ..., "name": ..., "split": ..., "field": ...}; perplexity only).
Source = Any


def _is_source(v: Any) -> bool:
    if isinstance(v, (str, os.PathLike)):
        return True
    if isinstance(v, Mapping):
        return "path" in v  # a datasets spec
    if isinstance(v, Sequence):
        return all(isinstance(x, (str, os.PathLike)) for x in v)
    return False


def resolve_sources(
    data: Mapping | None,
    data_dir: str | os.PathLike | None,
    tasks: Sequence[str] | None,
    search_split: str,
    test_split: str,
    default_name: str,
    suffix: str = ".jsonl",
) -> dict[str, dict[str, Source]]:
    """Normalise the ways data can be given into ``{task: {"search": source, "test": source}}``.

    Accepted forms:

    * ``data={task: {split: source}}`` where ``split`` is ``"search"``/``"test"`` or a file
      split name (``search_split``, ``test_split``, e.g. ``"validation"``/``"test"``);
    * ``data={split: source}``: one task named ``default_name``;
    * ``data_dir`` and ``tasks``: ``<data_dir>/<task>/<search_split><suffix>`` and
      ``<data_dir>/<task>/<test_split><suffix>`` (``data_dir`` may also be a zoo folder that
      holds ``data/``).

    A split that is not given is left out (asking for it later is an error); a given file
    that does not exist is an error now.
    """
    if (data is None) == (data_dir is None):
        raise EvaluationError("give exactly one of data= (a mapping) or data_dir= (with tasks=)")
    if data_dir is not None:
        if not tasks:
            raise EvaluationError("data_dir= needs tasks= (the task folder names)")
        root = Path(data_dir)
        if not (root / tasks[0]).is_dir() and (root / "data" / tasks[0]).is_dir():
            root = root / "data"
        data = {t: {search_split: root / t / f"{search_split}{suffix}", test_split: root / t / f"{test_split}{suffix}"}
                for t in tasks}
    if not isinstance(data, Mapping) or not data:
        raise EvaluationError(f"data must be a non-empty mapping, got {type(data).__name__}")
    if set(data) <= {"search", "test", search_split, test_split} and all(_is_source(v) for v in data.values()):
        data = {default_name: data}
    out: dict[str, dict[str, Source]] = {}
    for task, splits in data.items():
        if tasks is not None and data_dir is None and task not in tasks:
            continue
        if not isinstance(splits, Mapping):
            raise EvaluationError(f"task {task!r}: expected a mapping of split to file(s), got {splits!r}")
        res = {}
        for want, alias in (("search", search_split), ("test", test_split)):
            src = splits.get(want, splits.get(alias))
            if src is None:
                continue
            for p in _paths(src):
                if not p.is_file():
                    raise EvaluationError(f"task {task!r}, {want} split: data file {str(p)!r} does not exist")
            res[want] = src
        unknown = set(splits) - {"search", "test", search_split, test_split}
        if unknown:
            raise EvaluationError(f"task {task!r}: unknown split name(s) {sorted(unknown)}; use 'search'/'test' "
                                  f"or {search_split!r}/{test_split!r}")
        if not res:
            raise EvaluationError(f"task {task!r}: no data for the search or the test split")
        out[str(task)] = res
    if tasks is not None and data_dir is None:
        missing = [t for t in tasks if t not in out]
        if missing:
            raise EvaluationError(f"no data given for task(s) {missing}")
    return out


def _paths(src: Source) -> list[Path]:
    if isinstance(src, Mapping):
        return []
    if isinstance(src, (str, os.PathLike)):
        return [Path(src)]
    return [Path(p) for p in src]


FIELDS = ("prompt", "answer", "choices", "label")


def rename_fields(fields: Mapping[str, str] | None) -> dict[str, str]:
    """``{canonical name: the data's name}`` checked: keys among ``FIELDS``."""
    fields = dict(fields or {})
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise EvaluationError(f"fields: unknown key(s) {unknown}; rename any of {list(FIELDS)} "
                              "(e.g. fields={'prompt': 'question', 'answer': 'target'})")
    return {k: str(v) for k, v in fields.items()}


def jsonl_records(path: str | Path) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file; a line that is
    not UTF-8, not JSON or not an object is a ``ValueError`` naming ``path:line``."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not UTF-8 text ({e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not JSON ({e})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno} is a JSON {type(row).__name__}, not an object")
            yield lineno, row


def read_jsonl(src: Source, task: str, split: str, fields: Mapping[str, str] | None = None) -> list[dict]:
    """Rows of one or more JSONL files, in order; an empty result is an error. With
    ``fields`` (``{canonical: data name}``), each row also gets its values under the
    canonical names."""
    rows: list[dict] = []
    for path in _paths(src):
        try:
            for _, row in jsonl_records(path):
                for canonical, name in (fields or {}).items():
                    if name in row:
                        row[canonical] = row[name]
                rows.append(row)
        except ValueError as e:
            raise EvaluationError(f"task {task!r}, {split} split: {e}") from None
    if not rows:
        raise EvaluationError(f"task {task!r}: the {split} split is empty ({', '.join(map(str, _paths(src)))})")
    return rows


def require_fields(rows: list[dict], fields: Sequence[str], task: str, split: str, src: Source,
                   names: Mapping[str, str] | None = None) -> None:
    for i, r in enumerate(rows):
        miss = [(names or {}).get(f, f) for f in fields if f not in r]
        if miss:
            raise EvaluationError(f"task {task!r}, {split} split ({src}): row {i} lacks field(s) {miss}"
                                  + ("" if names else "; name the data's own fields with fields={...}"))


def subsample(n: int, limit: int | None, seed: int) -> np.ndarray:
    """Sorted indices of a seeded subsample of ``limit`` out of ``n`` (all when ``limit`` is
    None or at least ``n``), drawn with NumPy's PCG64."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise EvaluationError(f"limit must be positive, got {limit}")
    rng = np.random.Generator(np.random.PCG64(seed))
    return np.sort(rng.choice(n, size=limit, replace=False))


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


def check_disjoint(search_keys: Sequence[str], test_keys: Sequence[str], what: str) -> None:
    """Refuse a search split that shares an item with the test split (compared by hash)."""
    test = {text_hash(k) for k in test_keys}
    shared = [k for k in search_keys if text_hash(k) in test]
    if shared:
        raise EvaluationError(f"{what}: {len(shared)} search example(s) also occur in the test split, e.g. "
                              f"{shared[0]!r}; the search split must not overlap the test split")


def tokenizer_name(tokenizer) -> str:
    """How errors name a tokenizer: its path or hub id, else its class."""
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def pad_token_id(tokenizer) -> int:
    """The id that fills padded positions (masked out, so any id serves): the tokenizer's pad
    token, else its EOS, else its unknown token, as lm-eval pads."""
    for pad in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id):
        if pad is not None:
            return int(pad)
    raise EvaluationError(f"tokenizer {tokenizer_name(tokenizer)!r} has no pad, EOS or unknown token to pad batches "
                          "with; set tokenizer.pad_token")


def model_device(model):
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """Evaluation mode and no autograd for the duration; the training flag is restored."""
    import torch

    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)
