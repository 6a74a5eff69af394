"""lm-evaluation-harness tasks scored in memory, with everything weight-independent cached.

``LMEvalEvaluator(tasks)`` loads the tasks once (one ``TaskManager``, one set of task
objects, the documents of each split chosen once), builds each split's requests (few-shot
contexts included) on first use, and wraps each model object once in an in-memory
``HFLM``. A call then only resets the requests' responses, runs the model on them through
the ``HFLM`` (the weights may have changed in place since the last call), applies the
task's filters and aggregates its metrics: the work of ``lm_eval.evaluator.evaluate`` for
one process, without rebuilding requests or reloading anything.

Splits:

* ``"test"``: the split lm-eval reports on (the task's test split, else its validation
  split), whole.
* ``"search"``: the task's validation split when that is not the reported split, else its
  training split, subsampled to ``limit`` documents with a fixed seed. When the task has
  neither, a seeded subsample of the reported split is the search split and ``"test"`` is
  the rest of it, so the two never overlap (``limit`` documents, half when ``limit`` is
  None). ``search_split=`` names the split explicitly.

Searching on the reported split of a well-known benchmark (MMLU, GSM8K, ARC, HellaSwag,
...) is refused unless ``allow_test_split=True``, and a search split that shares a
document with the test split (compared by a hash of each document) is always refused.

``write_jsonl_tasks`` writes lm-eval task YAMLs over JSONL files such as the zoo's.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._common import (
    EvaluationError, check_disjoint, check_fraction, check_split, eval_mode, pad_token_id, part, read_jsonl, subsample,
)

__all__ = ["LMEvalEvaluator", "write_jsonl_tasks", "KNOWN_BENCHMARKS", "is_known_benchmark"]

# Names (matched as prefixes) of public benchmarks whose reported split must not be optimised on.
KNOWN_BENCHMARKS = (
    "mmlu", "gsm8k", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "truthfulqa", "bbh",
    "leaderboard", "ifeval", "gpqa", "musr", "minerva_math", "hendrycks_math", "mathqa", "math_500",
    "piqa", "boolq", "openbookqa", "lambada", "humaneval", "mbpp", "triviaqa", "nq_open", "agieval",
    "sciq", "social_iqa", "siqa", "commonsense_qa", "logiqa", "anli", "mgsm", "super_glue", "squad",
    "toxigen", "bigbench", "cmmlu", "kmmlu", "belebele", "xnli", "xcopa", "xwinograd",
)


def is_known_benchmark(name: str) -> bool:
    return any(name == b or name.startswith(b) for b in KNOWN_BENCHMARKS)


_TASK_MANAGERS: dict[tuple, Any] = {}


def _task_manager(include_path: tuple[str, ...], include_defaults: bool):
    """One ``TaskManager`` per (include paths, defaults) in a process (indexing the
    built-in tasks takes seconds)."""
    key = (include_path, include_defaults)
    tm = _TASK_MANAGERS.get(key)
    if tm is None:
        from lm_eval.tasks import TaskManager

        tm = TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)
        _TASK_MANAGERS[key] = tm
    return tm


_SPLIT_METHODS = {
    "test": ("has_test_docs", "test_docs"),
    "validation": ("has_validation_docs", "validation_docs"),
    "train": ("has_training_docs", "training_docs"),
}
_SPLIT_ALIASES = {"training": "train", "valid": "validation", "val": "validation", "dev": "validation"}


def _docs(task, split: str) -> list | None:
    has, get = _SPLIT_METHODS[split]
    if not getattr(task, has)():
        return None
    return list(getattr(task, get)())


def _doc_key(doc) -> str:
    return json.dumps(doc, sort_keys=True, default=str, ensure_ascii=False)


class _Prepared:
    """The requests of one split of one task: documents, their instance groups, and the
    task's filters and metrics (everything a call needs besides the model's answers)."""

    def __init__(self, task, docs: list[tuple[int, dict]], num_fewshot: int):
        self.task = task
        self.docs = docs
        self.groups: list[list] = []
        name = task.config["task"] if hasattr(task, "config") else task.task_name
        repeats = getattr(getattr(task, "config", None), "repeats", 1) or 1
        for doc_id, doc in docs:
            ctx = task.fewshot_context(
                doc, num_fewshot=num_fewshot, system_instruction=None, apply_chat_template=False,
                fewshot_as_multiturn=False, chat_template=None, gen_prefix=task.doc_to_prefix(doc),
            )
            inst = task.construct_requests(doc=doc, ctx=ctx, metadata=(name, doc_id, repeats),
                                           apply_chat_template=False, chat_template=None)
            group = inst if isinstance(inst, list) else [inst]
            group.sort(key=lambda x: x.idx)
            self.groups.append(group)
        self.instances = [i for g in self.groups for i in g]
        if not self.instances:
            raise EvaluationError(f"lm-eval task {name!r}: no requests were built (empty split?)")

    def share(self, fraction: float, seed: int) -> "_Prepared":
        """The requests of a seeded share of the documents (``part``), the very ones of the
        whole split: the few-shot contexts come from one draw of the task's sampler, whichever
        share is scored first."""
        keep = part(list(range(len(self.docs))), fraction, seed)
        out = object.__new__(_Prepared)
        out.task, out.docs, out.groups = self.task, [self.docs[i] for i in keep], [self.groups[i] for i in keep]
        out.instances = [i for g in out.groups for i in g]
        return out


class LMEvalEvaluator:
    """Scores lm-eval tasks on a live ``(model, tokenizer)`` (see the module docstring).

    Args:
        tasks: lm-eval task, group or tag names (groups and tags are expanded to their tasks;
            ``self.tasks`` lists the expanded names).
        include_path: folder(s) of extra task YAMLs (e.g. from ``write_jsonl_tasks``).
        limit: documents in each task's search split (a seeded subsample; the test split is
            always whole).
        seed: seed of the subsamples and of the few-shot sampler.
        batch_size: the ``HFLM`` batch size.
        allow_test_split: allow searching on the reported split of a well-known benchmark.
        num_fewshot: overrides the tasks' few-shot counts (a task configured with 0 keeps 0,
            as in ``lm_eval``); None keeps the configured count (0 when unset).
        search_split: ``"validation"``, ``"train"`` or ``"test"`` to name the search split;
            None chooses as the module docstring says.
        include_defaults: index lm-eval's built-in tasks too. None: only when a requested
            name is not among the ``include_path`` tasks (indexing the built-ins takes
            seconds).
        hflm_kwargs: extra keyword arguments of ``HFLM`` (e.g. ``max_length``).

    Returns from a call: ``"<task>/<metric>"`` for every numeric metric lm-eval computes
    (``"<metric>,<filter>"`` for filters other than ``"none"``; no stderr), and ``"score"``,
    the unweighted mean over tasks of each task's primary metric (the first of its
    ``metric_list``, first filter). Values are Python floats.
    """

    direction = "maximize"

    def __init__(
        self,
        tasks: Sequence[str] | str,
        include_path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
        limit: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        allow_test_split: bool = False,
        num_fewshot: int | None = None,
        search_split: str | None = None,
        include_defaults: bool | None = None,
        hflm_kwargs: Mapping[str, Any] | None = None,
    ):
        names = [tasks] if isinstance(tasks, str) else list(tasks)
        if not names:
            raise EvaluationError("no lm-eval tasks given")
        if search_split is not None:
            search_split = _SPLIT_ALIASES.get(search_split, search_split)
            if search_split not in _SPLIT_METHODS:
                raise EvaluationError(f"unknown search_split {search_split!r}; use 'validation', 'train' or 'test'")
        self.requested = names
        self.limit = limit
        self.seed = seed
        self.batch_size = batch_size
        self.allow_test_split = allow_test_split
        self.num_fewshot = num_fewshot
        self.search_split = search_split
        self.hflm_kwargs = dict(hflm_kwargs or {})
        if search_split == "test" and not allow_test_split:
            bad = [n for n in names if is_known_benchmark(n)]
            if bad:
                raise EvaluationError(self._guard_message(bad[0], "test"))

        if include_path is None:
            paths: tuple[str, ...] = ()
        elif isinstance(include_path, (str, os.PathLike)):
            paths = (str(Path(include_path).resolve()),)
        else:
            paths = tuple(str(Path(p).resolve()) for p in include_path)
        for p in paths:
            if not Path(p).exists():
                raise EvaluationError(f"include_path {p!r} does not exist")
        loaded = self._load(names, paths, include_defaults)
        self._tasks = dict(loaded["tasks"])
        self.tasks = list(self._tasks)
        # The benchmark a task belongs to: its own name, or the group it was requested through.
        self._family = {t: t for t in self.tasks}
        for g, members in _group_members(loaded).items():
            for t in members:
                if is_known_benchmark(g):
                    self._family[t] = g

        self._docs: dict[str, dict[str, list[tuple[int, dict]]]] = {}
        for name, task in self._tasks.items():
            self._configure(task)
            self._docs[name] = self._choose_docs(name, task)
        self._primary = {name: _primary_key(task) for name, task in self._tasks.items()}

        self._prepared: dict[str, list[_Prepared]] = {}
        self._lm = None
        self._lm_model = None
        self._lm_tokenizer = None

    def primary(self, task: str) -> str:
        """The metric that stands for a task (what objectives read and ``"score"``
        averages): the first of its ``metric_list`` under its first filter (lm-eval's own
        first metric where the list is empty), ``"<metric>,<filter>"`` unless the filter is
        ``"none"``."""
        return self._primary[task]

    # ------------------------------------------------------------------ loading

    def _load(self, names, paths, include_defaults):
        if include_defaults is None:
            tries = [False, True] if paths else [True]
        else:
            tries = [include_defaults]
        last_error = None
        for defaults in tries:
            tm = _task_manager(paths, defaults)
            known = set(tm.all_tasks)
            missing = [n for n in names if n not in known]
            if missing:
                if defaults is tries[-1]:
                    close = difflib.get_close_matches(missing[0], tm.all_tasks, n=3)
                    hint = f"; did you mean {', '.join(close)}?" if close else ""
                    where = f" (include_path: {', '.join(paths)})" if paths else ""
                    raise EvaluationError(f"unknown lm-eval task {missing[0]!r}{where}{hint}")
                continue
            try:
                return tm.load(list(names))
            except EvaluationError:
                raise
            except Exception as e:  # noqa: BLE001 - lm-eval raises many kinds; name the tasks
                last_error = e
                if defaults is tries[-1]:
                    break
        raise EvaluationError(f"lm-eval could not load task(s) {names}: {type(last_error).__name__}: "
                              f"{last_error}") from last_error

    def _configure(self, task) -> None:
        """Few-shot count and seed as ``lm_eval.simple_evaluate`` sets them."""
        configured = task.get_config("num_fewshot")
        if self.num_fewshot is not None and configured != 0:
            task.set_config(key="num_fewshot", value=self.num_fewshot)
        elif configured is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=self.seed)

    def _guard_message(self, name: str, split: str) -> str:
        return (f"refusing to search on the {split} split of the benchmark {name!r}: scores on it would no "
                "longer measure generalisation. Search on its validation or training split (the default when "
                "it has one), on your own data, or pass allow_test_split=True if you really mean it")

    def _choose_docs(self, name: str, task) -> dict[str, list[tuple[int, dict]]]:
        reported = "test" if task.has_test_docs() else "validation" if task.has_validation_docs() else None
        if reported is None:
            raise EvaluationError(f"lm-eval task {name!r} has neither a test nor a validation split")
        test_docs = _docs(task, reported)
        if not test_docs:
            raise EvaluationError(f"lm-eval task {name!r}: its {reported} split is empty")
        if self.search_split is not None:
            source = self.search_split
        elif reported != "validation" and task.has_validation_docs():
            source = "validation"
        elif task.has_training_docs():
            source = "train"
        else:
            source = reported
        if source == reported and not self.allow_test_split and is_known_benchmark(self._family[name]):
            raise EvaluationError(self._guard_message(self._family[name], reported))
        if source == reported:
            n = len(test_docs)
            k = self.limit if self.limit is not None else n // 2
            if not 0 < k < n:
                raise EvaluationError(f"lm-eval task {name!r}: searching on part of its only split ({reported}, {n} "
                                      f"documents) needs 0 < limit < {n}, got limit={self.limit}")
            pick = subsample(n, k, self.seed)
            chosen = set(pick.tolist())
            search = [(int(i), test_docs[i]) for i in pick]
            test = [(i, d) for i, d in enumerate(test_docs) if i not in chosen]
        else:
            docs = _docs(task, source)
            if docs is None:
                raise EvaluationError(f"lm-eval task {name!r} has no {source} split")
            if not docs:
                raise EvaluationError(f"lm-eval task {name!r}: its {source} split is empty")
            search = [(int(i), docs[i]) for i in subsample(len(docs), self.limit, self.seed)]
            test = list(enumerate(test_docs))
        check_disjoint([_doc_key(d) for _, d in search], [_doc_key(d) for _, d in test], f"lm-eval task {name!r}")
        return {"search": search, "test": test}

    # ------------------------------------------------------------------ scoring

    def _requests(self, split: str, fraction: float = 1.0) -> list[_Prepared]:
        prep = self._prepared.get((split, fraction))
        if prep is None:
            if fraction < 1:  # a share of the whole split's requests (built first, once)
                prep = [p.share(fraction, self.seed) for p in self._requests(split)]
            else:
                prep = [_Prepared(task, self._docs[name][split], task.get_config("num_fewshot") or 0)
                        for name, task in self._tasks.items()]
            self._prepared[(split, fraction)] = prep
        return prep

    def _hflm(self, model, tokenizer):
        if self._lm is None or self._lm_model is not model or self._lm_tokenizer is not tokenizer:
            from lm_eval.models.huggingface import HFLM

            pad_token_id(tokenizer)
            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, **self.hflm_kwargs)
            self._lm_model, self._lm_tokenizer = model, tokenizer
        return self._lm

    def __call__(self, model, tokenizer, split: str = "search", fraction: float = 1.0) -> dict[str, float]:
        """Metrics of every task on ``split`` and the mean primary metric (``"score"``);
        ``fraction``: on a seeded share of each task's search documents."""
        check_split(split)
        fraction = check_fraction(split, fraction)
        lm = self._hflm(model, tokenizer)
        prepared = self._requests(split, fraction)
        by_type: dict[str, list] = defaultdict(list)
        for p in prepared:
            for inst in p.instances:
                inst.resps = []
                inst.filtered_resps = {}
                by_type[inst.request_type].append(inst)
        with eval_mode(model):
            for req_type, reqs in by_type.items():
                cloned = [r for r in reqs for _ in range(r.repeats or 1)]
                resps = getattr(lm, req_type)(cloned, disable_tqdm=True)
                for x, r in zip(resps, cloned, strict=True):
                    r.resps.append(x)
        out: dict[str, float] = {}
        primaries = []
        for name, p in zip(self._tasks, prepared):
            metrics, primary = self._metrics(p, self._primary[name])
            out.update({f"{name}/{k}": v for k, v in metrics.items()})
            primaries.append(primary)
        out["score"] = float(sum(primaries) / len(primaries))
        return out

    @staticmethod
    def _metrics(p: _Prepared, key: str | None) -> tuple[dict[str, float], float]:
        task = p.task
        task._instances = p.instances
        task.apply_filters()
        aggregation = task.aggregation()
        values: dict[str, float] = {}
        for filter_key in p.instances[0].filtered_resps:
            raw: dict[str, list] = defaultdict(list)
            for (_, doc), group in zip(p.docs, p.groups):
                res = task.process_results(doc, [inst.filtered_resps[filter_key] for inst in group])
                for metric, value in res.items():
                    raw[metric].append(value)
            for metric, items in raw.items():
                agg = aggregation.get(metric)
                if agg is None:
                    continue
                v = agg(items)
                try:
                    v = float(v)
                except (TypeError, ValueError):
                    continue
                values[metric if filter_key == "none" else f"{metric},{filter_key}"] = v
        if not values:
            raise EvaluationError(f"lm-eval task {task.config['task']!r} produced no numeric metric")
        if key not in values:  # never another metric in its place: the objective reads this one
            raise EvaluationError(f"lm-eval task {task.config['task']!r}: its primary metric {key!r} (the first "
                                  f"of its metric_list, first filter) was not computed; it gave "
                                  f"{', '.join(sorted(values))}")
        primary = values[key]
        if math.isnan(primary):
            raise EvaluationError(f"lm-eval task {task.config['task']!r}: its primary metric {key!r} is NaN")
        return values, primary


def _primary_key(task) -> str | None:
    """A task's primary metric as ``_metrics`` names it: the first of its ``metric_list``
    (lm-eval's first default metric where the list is empty) under its first filter."""
    metric_list = getattr(task.config, "metric_list", None) or []
    first = metric_list[0]["metric"] if metric_list and isinstance(metric_list[0], dict) else None
    if first is not None and callable(first):
        first = getattr(first, "__name__", None)
    if first is None:
        first = next(iter(getattr(task, "_metric_fn_list", None) or {}), None)
    if first is None:
        return None
    filters = getattr(task.config, "filter_list", None) or []
    name = filters[0].get("name") if filters and isinstance(filters[0], dict) else None
    return first if name in (None, "none") else f"{first},{name}"


def _group_members(loaded: Mapping) -> dict[str, list[str]]:
    """Every group name → the leaf tasks under it (recursively)."""
    groups = loaded.get("groups") or {}
    out = {}
    for name, g in groups.items():
        try:
            out[name] = [t.task_name for t in g.get_all_tasks()]
        except Exception:  # noqa: BLE001 - older Group objects
            out[name] = []
    return out


# --------------------------------------------------------------------------------------
# Task YAMLs over JSONL files
# --------------------------------------------------------------------------------------


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_jsonl_tasks(
    data: Mapping[str, Mapping[str, str | os.PathLike]],
    out_dir: str | os.PathLike,
    prefix: str = "zoo_",
    groups: bool = True,
    stop: str | Sequence[str] | None = None,
    fields: Mapping[str, str] | None = None,
) -> Path:
    """Write lm-eval task YAMLs over JSONL files of ``prompt``/``answer`` (and
    ``choices``/``label``) rows; returns ``out_dir``, the path to give ``--include_path``.

    ``data`` is ``{task: {"validation": path, "test": path}}`` (the zoo's
    ``write_data`` output). For each task two YAMLs are written:

    * ``<prefix><task>``: ``generate_until`` on ``prompt``, stopping at one of ``stop`` (its
      ``until``) or the tokenizer's EOS (``stop=None``: the EOS alone), with at most as many
      new tokens as the longest answer has bytes + 1, ``exact_match`` against ``answer``;
    * ``<prefix><task>_mc``: ``multiple_choice`` over ``choices`` with the index ``label``,
      ``target_delimiter: ""``, ``acc`` (written when the rows have ``choices``).

    ``fields`` names the rows' own fields (``{"prompt": "question", "answer": "target"}``).
    With ``groups``, also the groups ``<prefix without "_">`` and ``<...>_mc`` over them.
    Data paths are written absolute (lm-eval resolves relative ``data_files`` against the
    working directory). Files are written atomically (temporary file, then rename).
    """
    import yaml

    from .accuracy import _stop_strings
    from ._common import rename_fields

    until = list(_stop_strings(stop) or [])
    names = {k: rename_fields(fields).get(k, k) for k in ("prompt", "answer", "choices", "label")}
    out = Path(out_dir).resolve()
    gen_names, mc_names = [], []
    for task, splits in data.items():
        files = {}
        for split in ("validation", "test"):
            if split not in splits:
                raise EvaluationError(f"task {task!r}: no {split} file given")
            path = Path(splits[split]).resolve()
            if not path.is_file():
                raise EvaluationError(f"task {task!r}, {split} split: data file {str(path)!r} does not exist")
            files[split] = path
        rows = read_jsonl(files["validation"], task, "validation") + read_jsonl(files["test"], task, "test")
        for i, r in enumerate(rows):
            if names["prompt"] not in r or names["answer"] not in r:
                raise EvaluationError(f"task {task!r}: row {i} lacks {names['prompt']!r} or {names['answer']!r}")
        max_gen = max(len(str(r[names["answer"]]).encode()) for r in rows) + 1
        common = {
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
            "validation_split": "validation",
            "test_split": "test",
            "doc_to_text": names["prompt"],
            "num_fewshot": 0,
            "metadata": {"version": 1.0},
        }
        name = f"{prefix}{task}"
        gen = {"task": name, **common, "output_type": "generate_until", "doc_to_target": names["answer"],
               "target_delimiter": "",
               "generation_kwargs": {"until": until, "do_sample": False, "max_gen_toks": max_gen},
               "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
        _atomic_write(out / f"{name}.yaml", yaml.safe_dump(gen, sort_keys=False))
        gen_names.append(name)
        if all(names["choices"] in r and names["label"] in r for r in rows):
            mc = {"task": f"{name}_mc", **common, "output_type": "multiple_choice",
                  "doc_to_choice": names["choices"], "doc_to_target": names["label"], "target_delimiter": "",
                  "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
            _atomic_write(out / f"{name}_mc.yaml", yaml.safe_dump(mc, sort_keys=False))
            mc_names.append(f"{name}_mc")
    if groups and gen_names:
        group = prefix.rstrip("_") or "tasks"
        for gname, members, metric in ((group, gen_names, "exact_match"), (f"{group}_mc", mc_names, "acc")):
            if not members:
                continue
            g = {"group": gname, "task": members,
                 "aggregate_metric_list": [{"metric": metric, "aggregation": "mean", "weight_by_size": False}],
                 "metadata": {"version": 1.0}}
            _atomic_write(out / f"_{gname}.yaml", yaml.safe_dump(g, sort_keys=False))
    return out
