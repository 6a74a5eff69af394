"""``evomerge``: the Hydra application that runs a merge search from configs in ``conf/``.

    evomerge                                          # per-layer CMA-ES on the local zoo
    evomerge merge=ties space=per_layer_filtered search=optuna_tpe budget=120
    evomerge -m search=cmaes,random seed=0,1,2        # one run directory per job
    evomerge resume=true hydra.run.dir=results/quickstart/2026-11-23_10-00-00

Each run directory holds Hydra's ``.hydra/`` (the composed config and overrides), the trial
log, the strategy's checkpoint, ``best_recipe.yaml`` (``evomerge-merge`` reproduces the best
merge from it) and ``summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__all__ = ["main", "run"]

def _models(cfg) -> tuple[str | None, list[str], Any]:
    zoo = None
    if cfg.models.get("zoo_dir"):
        from .zoo import ZooError, build_zoo, load_zoo

        root = Path(cfg.models.zoo_dir)
        kind = str(cfg.models.get("zoo_kind") or "language")
        if kind not in ("language", "vision"):
            raise ConfigError(f"models.zoo_kind: {kind!r} is not 'language' or 'vision'")
        # a zoo already there is used as built (any seed or size); a missing one is built
        try:
            if (root / "zoo.json").is_file():
                zoo = load_zoo(root)
            else:
                from .vision.zoo import VisionZooConfig

                zoo = build_zoo(root, VisionZooConfig() if kind == "vision" else None, progress=cfg.progress)
            if zoo.kind != kind:
                hint = ("give models.zoo_kind=vision eval=classification, as the vision_* experiments do"
                        if zoo.kind == "vision" else "give models.zoo_kind=language, or a vision zoo's folder")
                raise ConfigError(f"models.zoo_dir: the zoo at {root} is a {zoo.kind} zoo, and models.zoo_kind={kind}: "
                                  f"{hint}")
        except ZooError as e:
            raise ConfigError(f"models.zoo_dir: {e}. For your own models use models=custom models.base=... "
                              "models.experts=[...]") from None
    base = cfg.models.get("base") or (str(zoo.base) if zoo else None)
    experts = list(cfg.models.get("experts") or ([str(p) for p in zoo.experts.values()] if zoo else []))
    task = cfg.models.get("ingredients")
    if task:
        if zoo is None:
            raise ConfigError("models.ingredients needs the zoo (models.zoo_dir)")
        from .zoo import build_ingredients

        experts = [str(p) for p in build_ingredients(zoo, str(task), int(cfg.models.get("ingredient_count", 6)),
                                                     cfg.models.get("ingredient_steps"), progress=bool(cfg.progress))]
        if cfg.merge.get("method") == "linear":
            base = None  # a soup averages the ingredients alone
    if not experts:
        raise ConfigError("models.experts: no models to merge; give them as models.experts=[DIR_OR_HUB_ID,...] "
                          "(with models=custom), or use the zoo (models=zoo)")
    return base, experts, zoo


# Keys of a config group that the app reads itself rather than passing to the group's target:
# ``executor.mode`` is how the search loop feeds the executor's workers.
APP_KEYS = {"executor": ("mode",)}


class ConfigError(ValueError):
    """A configuration value that cannot work, found before anything is loaded."""


def buildable() -> dict[str, set[str]]:
    """The classes each config group may build (its ``_target_``): the strategies, the
    evaluators' factory and the executors, and nothing else (an arbitrary function of the
    package, given as a target, would run with the config's arguments)."""
    from .search import STRATEGIES, AdaMerging

    return {"search": {f"evomerge.search.{c.__name__}" for c in (*STRATEGIES.values(), AdaMerging)},
            "eval": {"evomerge.evaluate.build_evaluator"},
            "objective": {"evomerge.objective.Objective"},
            "executor": {"evomerge.execute.LocalExecutor", "evomerge.execute.ray.RayExecutor"}}


def check_config(cfg) -> None:
    """Refuse values that cannot work, naming the key, before any model is loaded."""
    from omegaconf import OmegaConf

    budget = cfg.get("budget")
    if budget is None and cfg.get("max_seconds") is None:
        raise ConfigError("budget: give a number of evaluations (or max_seconds)")
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        raise ConfigError(f"budget: must be a positive number of evaluations, got {budget!r}")
    ms = cfg.get("max_seconds")
    if ms is not None and (not isinstance(ms, (int, float)) or isinstance(ms, bool) or not 0 < ms < float("inf")):
        raise ConfigError(f"max_seconds: must be a positive number of seconds, got {ms!r}")
    from .cli import check_device
    from .merge.methods import METHODS
    from .recipe import DTYPES, RecipeError
    from .space import search_range

    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ConfigError(f"seed: must be a whole number from 0 to 2**32 - 1, got {seed!r}")
    threads = cfg.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"threads: must be a positive number of torch threads, got {threads!r}")
    sd = cfg.get("store_dtype")
    if sd is not None and str(sd).lower() not in DTYPES:
        raise ConfigError(f"store_dtype: {sd!r} is not one of {', '.join(sorted(set(DTYPES)))}")
    try:
        check_device(cfg.get("device", "cpu"), where="device")
    except RecipeError as e:
        raise ConfigError(str(e)) from None

    ranges = cfg.space.get("ranges") or {}
    method = METHODS.get(str(cfg.merge.get("method")))
    from .merge.align import ALIGNERS
    from .recipe import AlignSpec

    align_method = None
    if cfg.merge.get("align") is not None:
        try:
            align_method = AlignSpec.parse(_plain(cfg.merge.align), "merge.align").method
        except RecipeError as e:
            raise ConfigError(str(e)) from None
    if method is not None and method.align is not None:  # (a method that aligns: its own way, the recipe checks)
        align_method = method.align

    reads = (f"merge method '{method.name}' reads data" if method is not None and method.statistics else
             f"merge.align={align_method} runs the models on data"
             if align_method in ALIGNERS and ALIGNERS[align_method].needs_data else None)
    data = cfg.merge.get("data") or {}
    if reads and (not hasattr(data, "get") or not any(data.get(k) for k in ("path", "paths", "dataset",
                                                                             "eval_split"))):
        raise ConfigError(f"merge.data.path: {reads}; give merge.data.path=FILE.jsonl "
                          "(JSON lines; merge.data.text and merge.data.target name its fields), "
                          "merge.data.paths=[FILE,...] with one file per model, merge.data.dataset=NAME_OR_DIR "
                          "(a datasets dataset; merge.data.split), or merge.data.eval_split=search (the "
                          "evaluator's unlabeled prompts of its search split)")
    if hasattr(data, "get") and data.get("eval_split") is not None:
        if data.get("eval_split") != "search":
            raise ConfigError(f"merge.data.eval_split: only 'search' (the test split is held out), got "
                              f"{data.get('eval_split')!r}")
        taken = [k for k in ("path", "paths", "dataset", "target") if data.get(k) is not None]
        if taken:
            raise ConfigError(f"merge.data.eval_split: the evaluator's unlabeled prompts are the data; drop "
                              f"merge.data.{taken[0]}")
        if not reads:
            raise ConfigError(f"merge.data.eval_split: merge method '{cfg.merge.get('method')}' reads no data"
                              + ("" if align_method is None else f" and merge.align={align_method} runs none"))
    elif hasattr(data, "get") and data.get("tasks") is not None:
        raise ConfigError("merge.data.tasks: names the evaluator's task each model reads with "
                          "merge.data.eval_split=search; without it there is nothing to name")
    for param, r in (OmegaConf.to_container(ranges, resolve=True) if OmegaConf.is_config(ranges) else ranges).items():
        # (ranges of parameters the method does not take are unused: a sweep over methods may set them)
        if method is not None and param in {p.name for p in method.params if not p.ignored}:
            try:
                search_range(method.name, param, r, where="space.ranges")
            except RecipeError as e:
                raise ConfigError(str(e)) from None

    fid = cfg.get("fidelity")
    if fid is not None and not hasattr(fid, "get"):
        raise ConfigError(f"fidelity: a group of share, promote and window (e.g. fidelity.share=0.25), not {fid!r}")
    prefetch = (cfg.get("executor") or {}).get("prefetch", 0)
    if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
        raise ConfigError(f"executor.prefetch: must be a whole number of candidates (0 or more), got {prefetch!r}")
    for key in ("share", "promote"):
        v = (cfg.get("fidelity") or {}).get(key, 1.0)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 < v <= 1:
            raise ConfigError(f"fidelity.{key}: must be a share, in (0, 1], got {v!r}")
    w = (cfg.get("fidelity") or {}).get("window", 16)
    if not isinstance(w, int) or isinstance(w, bool) or w < 1:
        raise ConfigError(f"fidelity.window: must be a positive number of first looks, got {w!r}")
    mode = (cfg.get("executor") or {}).get("mode")
    if mode not in (None, "generational", "async"):
        raise ConfigError(f"executor.mode: {mode!r} is not 'generational' or 'async'")
    if mode == "async":
        from .search import STRATEGIES, AdaMerging

        target = str((cfg.get("search") or {}).get("_target_", ""))
        cls = {f"evomerge.search.{c.__name__}": c for c in (*STRATEGIES.values(), AdaMerging)}.get(target)
        if cls is not None and not getattr(cls, "asynchronous", False):
            raise ConfigError(f"executor.mode: async needs a strategy that takes results one at a time (random, "
                              f"grid, steady, the optuna samplers); {cls.__name__} ({target}) does not: use "
                              "executor.mode=generational")

    allowed = buildable()

    def targets(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                key = f"{path}.{k}" if path else str(k)
                if k == "_target_" and str(v) not in allowed.get(path, ()):
                    where = f"one of {', '.join(sorted(allowed[path]))}" if path in allowed else \
                        f"nothing (only {', '.join(sorted(allowed))} build objects)"
                    raise ConfigError(f"{key}: {v!r} is not built here; {path or 'the top level'} builds {where}")
                targets(v, key)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                targets(v, f"{path}[{i}]")

    targets(OmegaConf.to_container(cfg, resolve=False), "")


def _scoring(cfg, evaluator, has_base: bool = True):
    """The objective (``objective`` group; the mean when a config has none) bound to the
    evaluator's tasks and direction."""
    from .objective import Objective, ObjectiveError, Scoring

    node = cfg.get("objective")
    try:
        objective = Objective() if node is None else build(node)
        if objective.floor == "base" and not has_base:
            raise ObjectiveError("objective.floor: 'base' needs a base model, and this merge has none; give the "
                                 "floor as a number")
        return Scoring.of(objective, evaluator)
    except ObjectiveError as e:
        raise ConfigError(str(e)) from None


def build(node, **kwargs) -> Any:
    """``hydra.utils.instantiate``, except that an error of the target's (e.g. an evaluator
    naming a data file that does not exist) comes out as itself rather than wrapped in
    Hydra's ``InstantiationException``, so the app reports it in one line."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        if e.__cause__ is not None:
            raise e.__cause__ from None
        raise


def _plain(node) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else (node or {})


# merge.data keys the app reads itself: the evaluator's split whose prompts it writes into
# data files for the merge, and which task's prompts each model reads
_EVAL_DATA_KEYS = ("eval_split", "tasks")


def build_space(cfg, base: str | None, experts: list[str], data_paths: dict | None = None):
    """The genome space a composed config describes (``merge`` and ``space`` groups);
    ``data_paths`` (``{"paths": [...]}``) replaces the merge's data source."""
    from .space import Space

    ranges = _plain(cfg.space.get("ranges"))
    search = {p: ranges.get(p, {}) for p in (cfg.merge.search or [])}
    data = {k: v for k, v in (_plain(cfg.merge.get("data")) or {}).items() if k not in _EVAL_DATA_KEYS}
    data.update(data_paths or {})
    return Space(cfg.merge.method, experts, base_model=base, search=search, fixed=_plain(cfg.merge.get("fixed")),
                 granularity=cfg.space.granularity, layer_granularity=cfg.space.get("layer_granularity", 1),
                 smoothing=cfg.space.get("smoothing"), dtype=cfg.merge.get("dtype", "float32"),
                 data=data or None, align=_plain(cfg.merge.get("align")) or None,
                 keep=_plain(cfg.models.get("keep")) or None)


_DATA_EVALS = ("accuracy", "exact_match", "choice", "perplexity", "entropy", "classification",
               "classification_entropy")
_VISION_EVALS = ("classification", "classification_entropy")  # (those that read a vision zoo)


def _eval_kwargs(cfg, zoo) -> dict[str, Any]:
    """What the eval group leaves to the models: the zoo's tasks and lm-eval task folder; and
    a clear error when data the evaluator needs was not given."""
    name = cfg.eval.get("name")
    kw: dict[str, Any] = {}
    if zoo is not None and (zoo.kind == "vision") != (name in _VISION_EVALS):
        raise ConfigError(f"eval={name}: the zoo at {zoo.root} is a {zoo.kind} zoo; "
                          + ("score it with eval=classification (or classification_entropy)" if zoo.kind == "vision"
                             else f"eval={name} scores image classifiers (a vision zoo: evomerge-zoo build --kind "
                                  "vision, or your own encoders with eval.data and eval.heads)"))
    if zoo is not None:
        ingredients = cfg.models.get("ingredients")
        if cfg.eval.get("tasks") is None:
            if name == "lm_eval":
                kw["tasks"] = [f"zoo_{ingredients}"] if ingredients else ["zoo"]
            else:  # a soup of one task's fine-tunes is scored on that task
                kw["tasks"] = [str(ingredients)] if ingredients else zoo.tasks
        if name == "lm_eval" and cfg.eval.get("include_path") in (None, str(zoo.root / "lm_eval_tasks")):
            kw["include_path"] = str(zoo.lm_eval_tasks)  # written on first use
    elif name in _DATA_EVALS and cfg.eval.get("data") is None:
        if cfg.eval.get("data_dir") is None:
            raise ConfigError(f"eval.data_dir: eval={name} needs data and there is no zoo; give "
                              "eval.data_dir=DIR eval.tasks=[TASK,...] (DIR/TASK/<split>.jsonl files) or eval.data")
        if not cfg.eval.get("tasks"):
            raise ConfigError(f"eval.tasks: name the task folders of eval.data_dir={cfg.eval.data_dir}")
    elif name == "lm_eval" and not cfg.eval.get("tasks"):
        raise ConfigError("eval.tasks: name the lm-eval tasks or groups to score (e.g. eval.tasks=[arc_easy])")
    return kw


# Keys a resumed search may change: how long it runs, where and how it reports. Every other
# key (models, merge, space, search, eval, seed, store_dtype, compile) decides its results.
_RESUME_FREE = ("budget", "max_seconds", "resume", "progress", "threads", "executor", "export_model", "device",
                "name")


# Settings added after searches were already being recorded, left out of the record while
# they keep the behaviour of before (so such runs still resume), recorded once they change it.
_NEUTRAL = {
    ("objective",): {"_target_": "evomerge.objective.Objective", "name": "mean", "floor": None, "penalty": 10.0},
    ("search", "restarts"): 0,
    ("search", "incpopsize"): 2,
    ("fidelity",): {"share": 1.0, "promote": 0.25, "window": 16},
    ("models", "zoo_kind"): "language",
    ("models", "keep"): None,
    **{("merge", "data", key): None for key in ("dataset", "subset", "split", "revision", "eval_split", "tasks")},
}


def search_record(cfg) -> dict[str, Any]:
    """What a search's results depend on: kept in the run directory, checked on resume."""
    from omegaconf import OmegaConf

    full = OmegaConf.to_container(cfg, resolve=True)
    out = {k: v for k, v in full.items() if k not in _RESUME_FREE}
    for path, neutral in _NEUTRAL.items():
        node = out
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node and node[path[-1]] == neutral:
            del node[path[-1]]
    return out


def resume_command(run_dir: Path) -> str:
    """The command that resumes this run: this process's own overrides, with resume=true."""
    import shlex

    try:
        from hydra.core.hydra_config import HydraConfig

        given = list(HydraConfig.get().overrides.task)
    except Exception:  # noqa: BLE001 - not running under Hydra (called as a library)
        given = []
    keep = [o for o in given if not o.split("=", 1)[0].lstrip("+~") in ("resume", "hydra.run.dir")]
    return " ".join(["evomerge", *map(shlex.quote, keep), "resume=true", shlex.quote(f"hydra.run.dir={run_dir}")])


def run(cfg, run_dir: str | Path) -> dict:
    """Run (or resume) the search a composed config describes; returns the summary."""
    import torch
    from omegaconf import OmegaConf

    from .execute import Worker, shared_inputs
    from .search import run_search

    check_config(cfg)
    torch.set_num_threads(int(cfg.threads))
    if not cfg.progress:
        from .cli import quiet_loading

        quiet_loading()
    run_dir = Path(run_dir)
    base, experts, zoo = _models(cfg)
    space = build_space(cfg, base, experts)
    eval_kw = _eval_kwargs(cfg, zoo)
    evaluator = build(cfg.eval, **eval_kw)
    if getattr(evaluator, "model_kind", "causal_lm") == "vision":
        from .merge.align import ALIGNERS

        align = space.recipe(space.x0).align
        if space.method.statistics or (align is not None and ALIGNERS[align.method].needs_data):
            raise ConfigError(f"merge={cfg.merge.get('method')}: its statistics come from a causal LM's forward passes "
                              f"on text, and eval={cfg.eval.get('name')} scores image encoders; use a method that "
                              "reads no data (task_arithmetic, ties, dare_ties, linear, model_stock, ...)")
    split = (cfg.merge.get("data") or {}).get("eval_split")
    if split is not None:  # the evaluator's prompts, one data file per task, in the run directory
        space = build_space(cfg, base, experts, eval_data(cfg, evaluator, space.models, zoo, run_dir, split))
    if space.method.statistics or space.recipe(space.x0).align is not None:
        from .merge.engine import Merger

        # found once here, and cached: every worker reads them from the cache
        once = Merger(space.recipe(space.x0), device=cfg.device)
        once.align(progress=bool(cfg.progress))
        from .merge.statistics import SEQUENTIAL

        if any(n not in SEQUENTIAL for n in space.method.statistics):  # (those of the merge depend on each candidate)
            once.statistics(progress=bool(cfg.progress))
        del once
    scoring = _scoring(cfg, evaluator, has_base=space.base_model is not None)
    strat_kw: dict[str, Any] = {"seed": int(cfg.seed)}
    target = cfg.search.get("_target_", "")
    if target.endswith("OptunaSearch"):
        if cfg.search.get("storage") is None:
            strat_kw["storage"] = f"sqlite:///{(run_dir / 'optuna.db').resolve()}"
        if cfg.search.get("sampler") == "nsga2" and not cfg.search.get("objectives"):
            # each task's own metric, as the evaluator names it
            strat_kw["objectives"] = [f"{t}/{evaluator.primary(t)}" for t in evaluator.tasks]
        if cfg.search.get("objectives") or "objectives" in strat_kw:  # the evaluator's metrics, as it orders them
            strat_kw["objective_direction"] = evaluator.direction
        from .search.optuna import CONSTRAINED

        if scoring.objective.floor is not None and cfg.search.get("sampler") in CONSTRAINED:
            strat_kw["constraints"] = True  # the floor, one constraint per task, for samplers that model them
    eval_cfg, device, seed = cfg.eval, cfg.device, int(cfg.seed)
    engine_kw = {"store_dtype": cfg.get("store_dtype"), "compile": bool(cfg.get("compile", False))}

    def build_worker(shared=None) -> Worker:  # runs where the worker lives (in-process, or in a Ray actor)
        return Worker(space, build(eval_cfg, **eval_kw), device=device, seed=seed, shared=shared,
                      **engine_kw)

    def inputs():  # the weights, read once here (on the CPU) and shared with every worker
        return shared_inputs(space, engine_kw["store_dtype"])

    strategy = None
    if target.endswith("AdaMerging"):
        pass  # (built where the worker is: it trains through the live model)
    elif len(space) == 0:  # nothing to search (e.g. model_stock): the merge is scored as it is
        from .search import GridSearch

        print(f"evomerge: {space.method.name} has no searched parameters here; scoring its merge once",
              file=sys.stderr)
        strategy = GridSearch(space)
    else:
        try:  # before any weights are read: a bad setting of the strategy's is the config's fault
            strategy = build(cfg.search)(space, **strat_kw)
        except ValueError as e:
            raise ConfigError(f"search ({cfg.search.get('_target_', '?')}): {e}") from None
    # every executor is built alike: from where a worker comes, and the weights to share
    mode = str(cfg.executor.get("mode") or "generational")  # how the loop feeds it (not the executor's own)
    fidelity = cfg.get("fidelity") or {}
    executor = build(OmegaConf.masked_copy(cfg.executor, [k for k in cfg.executor if k not in APP_KEYS["executor"]]))(
        build_worker, inputs=inputs)
    if strategy is None:
        return _adamerging(cfg, space, getattr(executor, "worker", None), executor, zoo, evaluator, run_dir, scoring)
    try:
        outcome = run_search(space, strategy, executor, run_dir, budget=None if cfg.budget is None else int(cfg.budget),
                             max_seconds=cfg.max_seconds, resume=bool(cfg.resume), progress=bool(cfg.progress),
                             config=OmegaConf.to_container(cfg, resolve=True), record=search_record(cfg),
                             scoring=scoring, mode=mode, fidelity=float(fidelity.get("share", 1.0)),
                             promote=float(fidelity.get("promote", 0.25)), window=int(fidelity.get("window", 16)))
    finally:
        executor.close()
    if outcome.stopped:
        print(f"stopped after {outcome.evaluations} evaluations; resume with: {resume_command(run_dir)}",
              file=sys.stderr)
        raise KeyboardInterrupt
    _export(cfg, space, outcome.best_x, run_dir)
    _report(run_dir)
    _print_summary(outcome.summary, run_dir)
    return outcome.summary


def _export(cfg, space, best_x, run_dir: Path) -> None:
    """``export_model``: the best merge written as a model folder (``run_dir/best_model``)."""
    if cfg.get("export_model") and best_x is not None:
        from .merge.engine import Merger

        path = Merger(space.recipe(best_x), device=cfg.device, seed=int(cfg.seed)).write(
            run_dir / "best_model", overwrite=True, progress=bool(cfg.progress), recipe_text=space.recipe_yaml(best_x))
        print(f"best merge written to {path}")


def eval_data(cfg, evaluator, models: list[str], zoo, run_dir: Path, split: str) -> dict[str, Any]:
    """``merge.data.eval_split``: the evaluator's unlabeled prompts of ``split`` written as
    JSON-lines files under ``run_dir/data`` (``tasks/<task>.jsonl``, and ``all.jsonl`` for every task),
    and the data each of ``models`` reads: ``merge.data.tasks`` (a task, or null for every
    task, per model in order), else a zoo expert's own task and every task for the others.
    Returns the merge's data source (``{"paths": [...]}``)."""
    from .evaluate import EvaluationError

    if not hasattr(evaluator, "inputs"):
        raise ConfigError(f"merge.data.eval_split: eval={cfg.eval.get('name')} offers no unlabeled prompts; "
                          "give merge.data.path=FILE.jsonl (or merge.data.dataset) instead")
    data = cfg.merge.get("data") or {}
    tasks = data.get("tasks")
    if tasks is not None:
        tasks = list(tasks)
        if len(tasks) != len(models):
            raise ConfigError(f"merge.data.tasks: one task (or null: every task) per model, {len(models)} in the "
                              f"order {', '.join(models)}; got {tasks!r}")
    else:
        own = {str(p): t for t, p in zoo.experts.items()} if zoo is not None else {}
        tasks = [own.get(m) if own.get(m) in evaluator.tasks else None for m in models]
    if not cfg.get("resume") and (run_dir / "trials.jsonl").is_file():  # (refused below; nothing written there)
        raise FileExistsError(f"{run_dir} already holds a search; resume it or choose another run directory")
    field = str(data.get("text") or "text")
    folder = run_dir / "data"
    paths = []
    for task in tasks:
        try:
            prompts = evaluator.inputs(split, None if task is None else [str(task)])
        except EvaluationError as e:
            raise ConfigError(f"merge.data.tasks: {e}") from None
        if not prompts:
            raise ConfigError(f"merge.data.eval_split: the evaluator has no {split} prompts for "
                              f"{'task ' + repr(task) if task is not None else 'any task'}")
        name = str(task)
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
            name = "task-" + hashlib.sha256(name.encode()).hexdigest()[:16]
        path = folder / "all.jsonl" if task is None else folder / "tasks" / f"{name}.jsonl"
        text = "".join(json.dumps({field: p}) + "\n" for p in prompts)
        if path.exists():  # a resume writes the same prompts; other ones are another search's
            if not path.is_file() or path.read_bytes() != text.encode("utf-8"):
                raise ConfigError(f"merge.data.eval_split: {path} holds other data than the evaluator's {split} "
                                  f"prompts{'' if task is None else ' of task ' + repr(task)}; run the search "
                                  "in another directory")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        paths.append(str(path.resolve()))
    return {"paths": paths}


def _report(run_dir: Path) -> None:
    """report.md and its plots; the search's results are already safe if this fails."""
    from .report import write_report

    try:
        write_report(run_dir)
    except Exception as e:  # noqa: BLE001 - a failed plot must not hide a finished search
        print(f"evomerge: the report could not be written ({type(e).__name__}: {e}); "
              f"retry with: evomerge-report {run_dir}", file=sys.stderr)


def _adamerging(cfg, space, worker, executor, zoo, evaluator, run_dir: Path, scoring=None) -> dict:
    """AdaMerging runs inside one worker (its gradient steps need the models), under the
    run's executor, then the usual finish."""
    from omegaconf import OmegaConf

    from .search import finish_run
    from .trials import RunLock, StateError, check_record

    if getattr(evaluator, "model_kind", "causal_lm") == "vision":
        prompts = None  # (each task's search-split images, which the worker's evaluator holds)
    elif zoo is not None:  # the zoo's whole validation split
        prompts = [json.loads(line)["prompt"] for t in evaluator.tasks
                   for line in zoo.data(t, "validation").read_text().splitlines()]
    elif hasattr(evaluator, "inputs"):  # the search split's prompts, without their answers
        prompts = evaluator.inputs("search")
    else:
        raise ConfigError(f"search=adamerging* needs unlabeled prompts, which eval={cfg.eval.get('name')} does not "
                          "offer; use eval=accuracy, exact_match or choice on your data")
    if ((run_dir / "summary.json").is_file() or (run_dir / "trials.jsonl").is_file()) and not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a search; resume it or choose another run directory")
    if cfg.resume and not (run_dir / "trials.jsonl").is_file():
        raise StateError(f"{run_dir}: nothing to resume (no trials.jsonl); drop resume=true to start a search there")
    search_cfg = OmegaConf.to_container(cfg.search, resolve=True)
    seed, resume, progress = int(cfg.seed), bool(cfg.resume), bool(cfg.progress)

    def train(w):  # runs where the worker is: in-process, or inside a Ray actor
        am = build(search_cfg)(space, w, prompts, seed=seed)
        x, score = am.run(run_dir, resume=resume, progress=progress and w is worker)
        return am.name, x, score

    with RunLock(run_dir):
        check_record(run_dir, search_record(cfg), bool(cfg.resume))
        name, x, score = executor.run_on_worker(train)
        summary = finish_run(space, name, x, score, executor, run_dir,
                             config=OmegaConf.to_container(cfg, resolve=True), scoring=scoring)
    _export(cfg, space, x, run_dir)
    _report(run_dir)
    _print_summary(summary, run_dir)
    return summary


def _print_summary(summary: dict, run_dir: Path) -> None:
    """The results table, then (on stderr) what the scores say is wrong with the run."""
    print(format_summary(summary, run_dir))
    for w in summary.get("warnings", ()):
        print(f"evomerge: warning: {w}", file=sys.stderr)


def format_summary(summary: dict, run_dir: Path) -> str:
    """The results table: per row the mean over tasks on each split and, where the run had
    an objective, its value and the worst task on the test split."""
    obj = summary.get("objective") or None
    aggregate = obj is not None and obj.get("name") != "mean"
    head = ["", "search", "test"] + ([f"{obj['name']} (search)", f"{obj['name']} (test)"] if aggregate else []) \
        + (["worst task (test)"] if obj is not None else [])
    rows = [tuple(head)]
    for name, row in summary["results"].items():
        label = {"best": "best (searched)", "start": "start (baseline)"}.get(name, name)
        if row["kind"] == "source":
            label = f"{name} (source)"
        cells = []
        for split in ("search", "test"):
            m = row.get(split, {})
            cells.append(f"{m['score']:.4f}" if "score" in m else "failed")
        o = row.get("objective", {})
        if aggregate:
            cells += [f"{o[sp]['objective']:.4f}" if sp in o else "-" for sp in ("search", "test")]
        if obj is not None:
            t = o.get("test")
            cells.append(f"{t['worst_task']} {t['worst']:.4f}" + (" (below the floor)" if t["below_floor"] else "")
                         if t else "-")
        rows.append((label, *cells))
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [f"{summary['strategy']} over {summary['space']['genes']} genes "
             f"({summary['space']['method']}, {summary['space']['granularity']}): "
             f"{summary['evaluations']} evaluations, {summary['failed']} failed"]
    fed = summary.get("search") or {}
    if fed.get("utilization") is not None:
        lines[0] += f"; workers busy {fed['utilization']:.0%} of the search ({fed['mode']} mode)"
    if fed.get("fidelity") is not None:
        lines[0] += (f"; first looks on {fed['fidelity']:.0%} of the search split, {fed['promoted']} promoted to all "
                     f"of it, {fed['cost']:.1f} evaluations' worth of forward passes")
    if obj is not None:
        extra = ", ".join(f"{k} {v}" for k, v in obj.items() if k not in ("name", "direction", "tasks", "references", "floors"))
        lines.append(f"objective: {obj['name']}" + (f" ({extra})" if extra else "")
                     + "; the search and test columns are the mean over tasks")
    lines += ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    files = "report.md, summary.json, best_recipe.yaml, trials.jsonl" if (run_dir / "report.md").is_file() \
        else "summary.json, best_recipe.yaml, trials.jsonl"
    lines.append(f"run directory: {run_dir} ({files})")
    return "\n".join(lines)


def conf_dir() -> Path:
    """The configuration folder: ``conf/`` beside the package (a source checkout or an
    editable install), else the copy a regular install puts under ``sys.prefix``."""
    for d in (Path(__file__).resolve().parent.parent / "conf", Path(sys.prefix) / "share" / "evomerge" / "conf"):
        if (d / "config.yaml").is_file():
            return d
    raise SystemExit("evomerge: cannot find the configuration folder conf/ (reinstall the package)")


def _first_error(run_dir: Path) -> str:
    from .trials import TrialLog

    error = next((r.error for r in TrialLog(run_dir / "trials.jsonl") if r.kind == "search" and r.error),
                 "(no error recorded)")
    return error.strip().splitlines()[0] if error.strip() else error  # one line; the log has it whole


# Hydra's own settings that may be given on the command line: where runs go, and the
# choice of Hydra's packaged logging configs. Anything else under hydra (callbacks and
# logging factories it builds, environment variables it sets, search paths it reads
# configs from) would run or load code before any check of evomerge's.
_HYDRA_KEYS = ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir", "hydra.job.chdir", "hydra.verbose",
               "hydra.job.name")
_HYDRA_CHOICES = ("hydra/job_logging", "hydra/hydra_logging")


def check_overrides(args: list[str]) -> None:
    """Refuse command-line overrides that reach Hydra's own settings beyond ``_HYDRA_KEYS``
    (and the packaged logging choices), and values of ``resume`` other than true or false;
    Hydra acts on these before the app runs, so ``check_config`` would come too late."""
    import re

    for a in args:
        key, _, value = a.partition("=")
        key = key.strip().lstrip("+~").strip()
        path, _, package = key.partition("@")
        touches = any(re.match(r"^hydra($|[./])", x.strip()) for x in (path, package) if x)
        if touches:
            choice = path in _HYDRA_CHOICES and re.fullmatch(r"[\w-]+", value.strip() or "-")
            if not (package == "" and (path in _HYDRA_KEYS or choice)):
                raise ConfigError(f"{key}: evomerge takes only {', '.join(_HYDRA_KEYS)} and Hydra's packaged "
                                  f"{' / '.join(_HYDRA_CHOICES)} of Hydra's own settings from the command line "
                                  "(Hydra would build, load or set what the others name before any check)")
        if path == "resume" and value.strip().lower() not in ("true", "false"):
            raise ConfigError(f"resume: must be true or false, got {value!r}")
        if path in ("hydra.run.dir", "hydra.sweep.dir") and value.strip():
            from .checkpoint import CheckpointError, check_path_length

            try:
                check_path_length(value.strip(), path)
            except CheckpointError as e:
                raise ConfigError(str(e)) from None


def main() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    conf = str(conf_dir())
    import signal

    from .cli import _terminated

    for sig in (signal.SIGTERM, signal.SIGHUP):  # stop as Ctrl-C does: resumable, exit 130, the hint
        signal.signal(sig, _terminated)
    overrides = [a for a in sys.argv[1:] if not a.startswith("-")]
    try:
        check_overrides(overrides)
    except ConfigError as e:
        print(f"evomerge: error in the configuration: {e}", file=sys.stderr)
        sys.exit(2)
    if any(o.partition("=")[0].strip().lstrip("+~").strip() == "resume" and o.partition("=")[2].strip().lower()
           == "true" for o in overrides):
        # a resume leaves the run's .hydra/ record (its composed config and overrides) as the
        # first run wrote it: the resumed config is checked against run.json, not recorded
        sys.argv.append("hydra.output_subdir=null")

    @hydra.main(version_base=None, config_path=conf, config_name="config")
    def _main(cfg) -> None:
        from .cli import user_errors

        try:
            check_config(cfg)
        except ConfigError as e:
            print(f"evomerge: error in the configuration: {e}", file=sys.stderr)
            sys.exit(2)
        try:
            summary = run(cfg, HydraConfig.get().runtime.output_dir)
            if summary.get("evaluations") and summary.get("failed") == summary["evaluations"]:
                print(f"evomerge: every one of the {summary['evaluations']} candidates failed; the first: "
                      f"{_first_error(Path(HydraConfig.get().runtime.output_dir))}", file=sys.stderr)
                sys.exit(1)
        except user_errors() as e:
            print(f"evomerge: error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)

    _main()


if __name__ == "__main__":  # pragma: no cover
    from evomerge.app import main as _main  # the module's own classes (errors), not __main__'s copies

    _main()
