"""Your own models from the command line, on a family evomerge did not make (the second
family of ``tests/conftest.py``): the README's "Your own models" commands run end to end,
every merge option scores, and mistakes end in one line naming the key, with exit code 2."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"


def readme_commands(section: str) -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", body, re.S).group(1)
    return [shlex.split(c) for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}


def app(args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "evomerge.app", *args], cwd=cwd, capture_output=True, text=True,
                          env=env(), timeout=timeout)


@pytest.fixture(scope="module")
def lm_tasks(words, tmp_path_factory):
    from evomerge.evaluate import write_jsonl_tasks

    files = {t: {"validation": d["dev"], "test": d["test"]} for t, d in words.data.items()}
    return write_jsonl_tasks(files, tmp_path_factory.mktemp("tasks"), prefix="w_", fields=words.fields)


def _substitute(arg: str, words, lm_tasks, out: Path) -> str:
    subs = {"/models/base": str(words.base), **{f"/models/{t}": str(p) for t, p in words.experts.items()},
            "/data": str(words.root / "data"), "/tasks": str(lm_tasks), "results/": f"{out}/"}
    for k in sorted(subs, key=len, reverse=True):
        arg = re.sub(re.escape(k) + r"(?=[,\]/]|$)", subs[k], arg) if k != "results/" else arg.replace(k, subs[k])
    return arg


@pytest.mark.slow
def test_the_readme_commands_run_on_the_second_family(words, lm_tasks, tmp_path):
    cmds = readme_commands("Your own models")
    assert len(cmds) == 2 and all(c[0] == "evomerge" for c in cmds)
    work = tmp_path / "cwd"
    work.mkdir()
    for cmd in cmds:
        args = [_substitute(a, words, lm_tasks, tmp_path) for a in cmd[1:]] + ["progress=false"]
        p = app(args, cwd=work)
        assert p.returncode == 0, p.stderr[-3000:]
        run = Path(next(a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")))
        s = json.loads((run / "summary.json").read_text())
        assert s["evaluations"] >= 40
        key = "acc" if "eval=exact_match" in args else "exact_match"
        prefix = "" if key == "acc" else "w_"
        for task in words.tasks:  # every expert scores its own task
            for split in ("search", "test"):
                assert s["results"][task][split][f"{prefix}{task}/{key}"] >= 0.99, (cmd, task, split)
        assert s["results"]["best"]["test"]["score"] >= s["results"]["start"]["test"]["score"]
        assert (run / "report.md").is_file() and (run / "best_recipe.yaml").is_file()
    assert not any(work.iterdir())  # no zoo, nothing else written where it ran
    assert not (ROOT / "zoo").exists() or (ROOT / "zoo" / "zoo.json").is_file()


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=overrides)


MERGES = sorted(p.stem for p in (CONF / "merge").glob("*.yaml"))


def _data(words, merge) -> list[str]:
    """The data a merge that reads it takes: the first task's search rows, in the family's own fields."""
    from evomerge.merge.methods import METHODS

    if not METHODS[merge].statistics:
        return []
    return [f"merge.data.path={words.data[words.tasks[0]]['dev']}", "merge.data.text=question",
            "merge.data.target=target", "merge.data.limit=8"]


@pytest.mark.parametrize("merge", MERGES)
def test_every_merge_option_scores_on_the_second_family(words, merge):
    """Each merge= option builds its space over the GPT-2 family (per layer and per layer
    with attention apart from the MLP) and its starting genome is merged and scored."""
    from hydra.utils import instantiate

    from evomerge.app import _eval_kwargs, _models, build_space
    from evomerge.execute import Worker
    from evomerge.types import Candidate

    experts = list(words.experts.values())
    if merge in ("slerp", "wise_ft"):
        experts = experts[:1]
    for space in ("per_layer", "per_layer_filtered"):
        cfg = _compose([f"merge={merge}", f"space={space}", "models=custom", f"models.base={words.base}",
                        f"models.experts=[{','.join(map(str, experts))}]", f"eval.data_dir={words.root / 'data'}",
                        f"eval.tasks=[{','.join(words.tasks)}]", "eval.search_split=dev", "eval.limit=20",
                        "eval.fields={prompt:question,answer:target}", *_data(words, merge)])
        base, exps, zoo = _models(cfg)
        assert zoo is None
        sp = build_space(cfg, base, exps)
        ev = instantiate(cfg.eval, **_eval_kwargs(cfg, zoo))
        r = Worker(sp, ev).evaluate(Candidate(0, list(sp.x0)))
        assert r.status == "ok", (merge, space, r.error)
        assert 0.0 <= r.score <= 1.0
        if merge == "model_stock":
            assert len(sp) == 0
        else:
            assert len(sp) > 0 and any(n.startswith(("t", "alpha", "weight")) for n in sp.names)


def test_model_stock_has_nothing_to_search_and_is_scored_once(words, tmp_path):
    run = tmp_path / "run"
    p = app(["models=custom", f"models.base={words.base}",
             f"models.experts=[{','.join(str(e) for e in words.experts.values())}]", "merge=model_stock",
             f"eval.data_dir={words.root / 'data'}", f"eval.tasks=[{','.join(words.tasks)}]", "eval.search_split=dev",
             "eval.fields={prompt:question,answer:target}", "eval.limit=20", "executor=local", "progress=false",
             f"hydra.run.dir={run}"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "scoring its merge once" in p.stderr
    assert json.loads((run / "summary.json").read_text())["evaluations"] == 1


def _fails(args, cwd, *words_in_message):
    p = app([*args, "executor=local", "progress=false", f"hydra.run.dir={cwd / 'run'}"], cwd=cwd)
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    last = p.stderr.strip().splitlines()
    assert "Traceback" not in p.stderr and len(last) == 1, p.stderr[-2000:]
    for w in words_in_message:
        assert w in last[0], (w, last[0])
    return last[0]


def test_mistakes_end_in_one_line_naming_the_value(words, tmp_path):
    data = [f"eval.data_dir={words.root / 'data'}", f"eval.tasks=[{','.join(words.tasks)}]", "eval.search_split=dev",
            "eval.fields={prompt:question,answer:target}"]
    experts = f"models.experts=[{','.join(str(e) for e in words.experts.values())}]"
    missing = tmp_path / "no-such-model"
    _fails(["models=custom", f"models.base={missing}", experts, *data], tmp_path, str(missing))
    _fails(["models=custom", f"models.base={words.base}", *data], tmp_path, "models.experts")
    _fails(["models=custom", f"models.base={words.base}", experts], tmp_path, "eval.data_dir")
    _fails(["models=custom", f"models.base={words.base}", experts, *data[:1], "eval.tasks=[nope]", *data[2:]],
           tmp_path, "nope", "does not exist")
    _fails(["models=custom", f"models.base={words.base}", experts, "eval=lm_eval", "eval.tasks=[w_nope]",
            f"eval.include_path={tmp_path}"], tmp_path, "w_nope")
    _fails(["models=custom", f"models.base={words.base}", experts, "eval=lm_eval"], tmp_path, "eval.tasks")
    user_zoo = tmp_path / "zoo"
    user_zoo.mkdir()
    (user_zoo / "mine.txt").write_text("the user's own file")
    _fails([f"models.zoo_dir={user_zoo}"], tmp_path, "models.zoo_dir", "is not a zoo", "models=custom")
    assert (user_zoo / "mine.txt").read_text() == "the user's own file"
    # a strategy's own settings are named in one line, before any weights are read
    mine = ["models=custom", f"models.base={words.base}", experts, *data]
    _fails([*mine, "search=steady", "search.sigma=0"], tmp_path, "search (evomerge.search.SteadyStateEvolution)",
           "sigma must be")
    _fails([*mine, "search=steady", "search.population=0"], tmp_path, "population must be")
    for search in ("random", "optuna_tpe", "steady"):
        _fails([*mine, f"search={search}", "search.batch=0"], tmp_path, "batch must be a whole number >= 1")


@pytest.mark.parametrize("merge", MERGES)
def test_every_method_written_by_evomerge_merge_loads_and_equals_the_search_merge(words, merge, tmp_path):
    """The best genome's recipe, written by ``evomerge-merge`` on the GPT-2 family (tied
    embeddings, Conv1D weights), loads as a GPT-2 model whose weights are the ones the
    search scored (the resident merge of the same genome)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.app import _models, build_space
    from evomerge.cli import merge_main
    from evomerge.execute import Worker
    from evomerge.types import Candidate

    experts = list(words.experts.values())
    if merge in ("slerp", "wise_ft"):
        experts = experts[:1]
    cfg = _compose([f"merge={merge}", "space=per_layer", "models=custom", f"models.base={words.base}",
                    f"models.experts=[{','.join(map(str, experts))}]", *_data(words, merge)])
    sp = build_space(cfg, *_models(cfg)[:2])
    x = sp.clip(np.random.default_rng(0).uniform(sp.lower, sp.upper)) if len(sp) else sp.x0
    if merge.startswith("della"):  # its bounds allow density +- epsilon outside [0, 1]: stay near the start
        x = sp.clip(sp.x0 + 0.1 * (x - sp.x0))
    (tmp_path / "best_recipe.yaml").write_text(sp.recipe_yaml(x))
    assert merge_main([str(tmp_path / "best_recipe.yaml"), str(tmp_path / "out"), "--no-progress"]) == 0
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(written).__name__ == "GPT2LMHeadModel"
    w = Worker(sp, lambda model, tok, split="search": {"score": 0.0})
    assert w.evaluate(Candidate(0, [float(v) for v in x])).status == "ok"
    live = dict(w.model.named_parameters())
    for name, p in written.named_parameters():
        assert torch.equal(p, live[name]), name


def test_hub_ids_with_a_revision_come_from_the_hub_cache(words, tmp_path):
    """``org/name@revision`` models, found offline in a hub cache laid out as the hub's client
    lays it out (refs/<revision> naming a snapshot), are searched like local folders."""
    import shutil

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    ids = {}
    for name, folder in {"base": words.base, **words.experts}.items():
        repo = cache / f"models--words-org--{name}"
        shutil.copytree(folder, repo / "snapshots" / commit)
        (repo / "refs").mkdir()
        (repo / "refs" / "v1").write_text(commit)
        ids[name] = f"words-org/{name}@v1"
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "evomerge.app", "models=custom", f"models.base={ids['base']}",
           f"models.experts=[{','.join(ids[t] for t in words.tasks)}]", f"eval.data_dir={words.root / 'data'}",
           f"eval.tasks=[{','.join(words.tasks)}]", "eval.search_split=dev", "eval.fields={prompt:question,answer:target}",
           "eval.limit=30", "budget=8", "executor=local", "progress=false", f"hydra.run.dir={run}"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**env(), "HF_HUB_CACHE": str(cache)})
    assert p.returncode == 0, p.stderr[-2000:]
    s = json.loads((run / "summary.json").read_text())
    for task in words.tasks:
        assert s["results"][f"{task}@v1"]["test"][f"{task}/acc"] >= 0.99
    assert "words-org/base@v1" in (run / "best_recipe.yaml").read_text()
    # a revision the cache does not hold is named, in one line
    bad = subprocess.run(cmd[:4] + ["models.base=words-org/base@v2"] + cmd[5:-1] + [f"hydra.run.dir={run}-v2"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**env(), "HF_HUB_CACHE": str(cache)})
    assert bad.returncode == 2 and "words-org/base@v2" in bad.stderr.strip().splitlines()[-1], bad.stderr[-1500:]


def on_words(words, run, *overrides, limit=20):
    """The command line of a run on the GPT-2 word family, its data as a folder of tasks."""
    return ["models=custom", f"models.base={words.base}",
            f"models.experts=[{','.join(str(e) for e in words.experts.values())}]",
            f"eval.data_dir={words.root / 'data'}", f"eval.tasks=[{','.join(words.tasks)}]",
            "eval.search_split=dev", "eval.fields={prompt:question,answer:target}", f"eval.limit={limit}",
            "executor=local", "progress=false", *overrides, f"hydra.run.dir={run}"]


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_a_search_over_a_merge_that_reads_data(words, tmp_path, method):
    """merge=regmean / merge=fisher on the GPT-2 family: each model's statistics computed
    once (before the workers start) on its own task's data, given one file per model, then
    read from the cache; the search runs and exports a recipe that carries the data."""
    import yaml

    run = tmp_path / "run"
    tasks = list(words.tasks)
    paths = [words.data[tasks[0]]["dev"]] + [words.data[t]["dev"] for t in tasks]  # the base, then each expert
    cache = tmp_path / "cache"
    over = [f"merge={method}", f"merge.data.paths=[{','.join(map(str, paths))}]", "merge.data.text=question",
            "merge.data.target=target", "merge.data.limit=16", "space=per_model", "search=random", "budget=3"]
    p = subprocess.run([sys.executable, "-m", "evomerge.app", *on_words(words, run, *over, limit=10)], cwd=tmp_path,
                       capture_output=True, text=True, env={**env(), "EVOMERGE_CACHE": str(cache)}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["results"]["best"]["search"]["score"] >= 0
    entries = [d for d in (cache / "statistics").iterdir() if d.is_dir()]
    assert len(entries) == len(paths)  # once per model, not once per worker or candidate
    recipe = yaml.safe_load((run / "best_recipe.yaml").read_text())
    assert recipe["merge_method"] == method and recipe["data"]["target"] == "target"
    assert [m["data"]["path"] for m in recipe["models"]] == [str(x) for x in paths]


def _words_evaluator(words, limit=10):
    from evomerge.evaluate import build_evaluator

    return build_evaluator("accuracy", data_dir=str(words.root / "data"), tasks=list(words.tasks),
                           search_split="dev", fields={"prompt": "question", "answer": "target"}, limit=limit)


def test_a_search_reads_the_evaluators_search_prompts_as_its_data(words, tmp_path):
    """merge.data.eval_split=search on the GPT-2 family: the evaluator's search prompts of
    each model's task (merge.data.tasks; null: every task) become the run's data files, the
    statistics are computed on them once per model, and the exported recipe names them."""
    import yaml

    run = tmp_path / "run"
    tasks = list(words.tasks)
    cache = tmp_path / "cache"
    over = ["merge=fisher", "merge.data.eval_split=search", f"merge.data.tasks=[null,{','.join(tasks)}]",
            "merge.data.fisher=sampled", "space=per_model", "search=random", "budget=2"]
    p = subprocess.run([sys.executable, "-m", "evomerge.app", *on_words(words, run, *over, limit=10)], cwd=tmp_path,
                       capture_output=True, text=True, env={**env(), "EVOMERGE_CACHE": str(cache)}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ev = _words_evaluator(words)
    files = [run / "data" / "all.jsonl"] + [run / "data" / "tasks" / f"{t}.jsonl" for t in tasks]
    for f, t in zip(files, [None, *tasks]):
        assert [json.loads(line)["text"] for line in f.read_text().splitlines()] == ev.inputs(
            "search", None if t is None else [t])
    assert len(ev.inputs("search", [tasks[0]])) == 10  # the search split's subsample (eval.limit), not the file
    recipe = yaml.safe_load((run / "best_recipe.yaml").read_text())
    assert [m["data"]["path"] for m in recipe["models"]] == [str(f.resolve()) for f in files]
    assert "eval_split" not in recipe["data"] and "tasks" not in recipe["data"]  # the app's, not the recipe's
    assert len([d for d in (cache / "statistics").iterdir() if d.is_dir()]) == len(files)
    # a resume rewrites nothing and computes nothing again
    stamps = [f.stat().st_mtime_ns for f in files]
    p = subprocess.run([sys.executable, "-m", "evomerge.app", *on_words(words, run, *over, limit=10), "resume=true",
                        "budget=3"], cwd=tmp_path, capture_output=True, text=True,
                       env={**env(), "EVOMERGE_CACHE": str(cache)}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert len([d for d in (cache / "statistics").iterdir() if d.is_dir()]) == len(files)


def test_the_evaluators_prompts_per_model_and_their_mistakes(words, tmp_path):
    """Without merge.data.tasks a zoo expert reads its own task's prompts and every other
    model every task's; a wrong count, an unknown task, an evaluator without prompts and a
    data folder holding other prompts are refused by name."""
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from evomerge.app import ConfigError, eval_data

    ev = _words_evaluator(words)
    tasks = list(words.tasks)
    zoo = SimpleNamespace(experts={t: Path(p) for t, p in words.experts.items()})
    models = [str(words.base), *(str(words.experts[t]) for t in tasks)]
    cfg = OmegaConf.create({"merge": {"data": {"eval_split": "search", "tasks": None, "text": "q"}},
                            "eval": {"name": "accuracy"}})
    got = eval_data(cfg, ev, models, zoo, tmp_path / "run", "search")
    assert got == {"paths": [str((tmp_path / "run" / "data" / n).resolve())
                             for n in ["all.jsonl", *(f"tasks/{t}.jsonl" for t in tasks)]]}
    assert [json.loads(x)["q"] for x in Path(got["paths"][1]).read_text().splitlines()] == ev.inputs("search",
                                                                                                    [tasks[0]])
    assert eval_data(cfg, ev, models, zoo, tmp_path / "run", "search") == got  # again: the same files
    cfg.merge.data.tasks = [None]
    with pytest.raises(ConfigError, match="merge.data.tasks: one task .* per model"):
        eval_data(cfg, ev, models, zoo, tmp_path / "r2", "search")
    cfg.merge.data.tasks = ["nope"] + tasks
    with pytest.raises(ConfigError, match="unknown task.*'nope'"):
        eval_data(cfg, ev, models, zoo, tmp_path / "r3", "search")
    cfg.merge.data.tasks = None
    with pytest.raises(ConfigError, match="offers no unlabeled prompts"):
        eval_data(cfg, object(), models, zoo, tmp_path / "r4", "search")
    other = tmp_path / "run" / "data" / "tasks" / f"{tasks[0]}.jsonl"  # another search's prompts: never overwritten
    other.write_text('{"q": "mine"}\n')
    with pytest.raises(ConfigError, match="holds other data"):
        eval_data(cfg, ev, models, zoo, tmp_path / "run", "search")
    assert other.read_text() == '{"q": "mine"}\n'
    (tmp_path / "r5").mkdir()
    (tmp_path / "r5" / "trials.jsonl").write_text("")  # another search's run directory: nothing written there
    with pytest.raises(FileExistsError, match="already holds a search"):
        eval_data(cfg, ev, models, zoo, tmp_path / "r5", "search")
    assert not (tmp_path / "r5" / "data").exists()


def test_a_search_that_aligns_the_models_first(words, tmp_path):
    """merge.align=weight_matching before TIES on the GPT-2 family: every expert's
    permutations onto the base found once (before the workers start) and cached; the
    exported recipe carries the alignment."""
    import yaml

    run = tmp_path / "run"
    cache = tmp_path / "cache"
    over = ["merge=ties", "merge.align=weight_matching", "space=per_model", "search=random", "budget=3"]
    p = subprocess.run([sys.executable, "-m", "evomerge.app", *on_words(words, run, *over, limit=10)], cwd=tmp_path,
                       capture_output=True, text=True, env={**env(), "EVOMERGE_CACHE": str(cache)}, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    entries = [d for d in (cache / "alignment").iterdir() if d.is_dir()]
    assert len(entries) == len(words.experts)  # each expert onto the base, once
    recipe = yaml.safe_load((run / "best_recipe.yaml").read_text())
    assert recipe["merge_method"] == "ties" and recipe["align"] == "weight_matching"
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["results"]["best"]["search"]["score"] <= 1.0


def test_adamerging_on_your_own_models_and_data(words, tmp_path):
    """AdaMerging learns from the search split's prompts when there is no zoo: the entropy
    falls over its steps, and the run finishes like any search."""
    run = tmp_path / "run"
    p = app(on_words(words, run, "search=adamerging_layerwise", "search.steps=12", "search.lr=0.02", limit=40),
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    steps = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    entropy = [r["metrics"]["entropy"] for r in steps if r["kind"] == "search"]
    assert len(entropy) == 12 and entropy[-1] < entropy[0]
    assert json.loads((run / "summary.json").read_text())["strategy"] == "adamerging"


def test_a_stopped_search_exits_130_and_its_resume_command_is_the_original(words, tmp_path):
    """SIGTERM (as a scheduler sends it; handled as Ctrl-C is): exit 130 and a resume hint that
    repeats the command's own overrides; that hint resumes; a resume with another method is
    refused naming merge.method."""
    import shlex
    import signal
    import time

    run = tmp_path / "run"
    args = ["models=custom", f"models.base={words.base}",
            f"models.experts=[{','.join(str(e) for e in words.experts.values())}]", "merge=ties",
            f"eval.data_dir={words.root / 'data'}", f"eval.tasks=[{','.join(words.tasks)}]", "eval.search_split=dev",
            "eval.fields={prompt:question,answer:target}", "eval.limit=20", "budget=400", "executor=local",
            "progress=false", f"hydra.run.dir={run}"]
    p = subprocess.Popen([sys.executable, "-m", "evomerge.app", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env())
    log = run / "trials.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 5):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    hint = err.split("resume with: ", 1)[1].strip().splitlines()[0]
    cmd = shlex.split(hint)
    assert cmd[0] == "evomerge" and "merge=ties" in cmd and "resume=true" in cmd and f"hydra.run.dir={run}" in cmd
    other = [a if a != "merge=ties" else "merge=task_arithmetic" for a in cmd[1:]]
    bad = app(other, cwd=tmp_path)
    assert bad.returncode == 2 and "merge.method: 'ties' -> 'task_arithmetic'" in bad.stderr, bad.stderr[-2000:]
    done = app([a if a != "budget=400" else "budget=24" for a in cmd[1:]], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "summary.json").read_text())["evaluations"] >= 24


def test_an_objective_from_the_command_line_scores_the_search_and_a_resume_keeps_it(words, tmp_path):
    """``objective=worst objective.floor=0.5`` on the second family: every search result's
    score is its worst task's accuracy less the floor's penalty, summary.json names the
    objective and gives each row's mean and worst task, and resuming the run under another
    objective is refused, naming it."""
    run = tmp_path / "run"
    args = on_words(words, run, "merge=task_arithmetic", "search=random", "budget=3")
    p = app([*args, "objective=worst", "objective.floor=0.5"], cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    trials = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    search = [t for t in trials if t["kind"] == "search" and t["status"] == "ok"]
    assert len(search) == 3
    for t in trials:  # every scored genome (a source's row keeps its evaluator's mean: never compared)
        if t["status"] == "ok" and not t["kind"].startswith("source:"):
            accs = [t["metrics"][f"{task}/acc"] for task in words.tasks]
            assert t["score"] == pytest.approx(min(accs) - 10.0 * sum(max(0.0, 0.5 - a) for a in accs))
    assert "objective: worst (floor 0.5, penalty 10.0)" in p.stdout and "worst task (test)" in p.stdout, p.stdout
    s = json.loads((run / "summary.json").read_text())
    assert s["objective"]["name"] == "worst" and s["objective"]["floor"] == 0.5
    for name in words.tasks:  # each expert: its worst task is the other one
        row = s["results"][name]["objective"]["test"]
        assert row["worst_task"] != name and row["worst"] == min(s["results"][name]["test"][f"{t}/acc"]
                                                                 for t in words.tasks)
    report = (run / "report.md").read_text()
    assert "Objective: **worst** (floor 0.5, penalty 10.0)" in report and "worst task (test)" in report
    again = app([*args, "objective=mean", "resume=true"], cwd=tmp_path)
    assert again.returncode != 0 and "objective" in again.stderr, again.stderr[-2000:]


def test_a_normalized_objective_with_a_floor_at_the_base_scores_the_sources_first_and_once(words, tmp_path):
    """``objective=normalized objective.floor=base`` on the second family: the sources are
    scored on the search split before the first candidate (and not again at the end), each
    task's reference is the best source's accuracy on it, and every candidate's score is its
    mean normalized accuracy less the penalty below the base's own accuracies."""
    run = tmp_path / "run"
    p = app(on_words(words, run, "merge=task_arithmetic", "search=random", "budget=3", "objective=normalized",
                     "objective.floor=base"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    trials = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    first_search = next(i for i, t in enumerate(trials) if t["kind"] == "search")
    sources = [(t["kind"], t["split"]) for t in trials if t["kind"].startswith("source:")]
    assert len(sources) == len(set(sources)) == 2 * (1 + len(words.experts))  # each split once
    early = {t["kind"]: t["metrics"] for t in trials[:first_search] if t["kind"].startswith("source:")}
    assert len(early) == 1 + len(words.experts) and all(t["split"] == "search" for t in trials[:first_search])
    refs = {task: max(m[f"{task}/acc"] for m in early.values()) for task in words.tasks}
    floors = {task: early["source:base"][f"{task}/acc"] for task in words.tasks}
    s = json.loads((run / "summary.json").read_text())
    assert s["objective"]["references"] == pytest.approx(refs) and s["objective"]["floors"] == pytest.approx(floors)
    for t in trials:
        if t["kind"] == "search" and t["status"] == "ok":
            acc = {task: t["metrics"][f"{task}/acc"] for task in words.tasks}
            want = sum(acc[k] / refs[k] for k in acc) / len(acc) - 10.0 * sum(
                max(0.0, floors[k] - acc[k]) for k in acc)
            assert t["score"] == pytest.approx(want)
    for name in words.tasks:  # an expert is at its own reference on its own task
        assert s["results"][name]["objective"]["search"]["normalized_mean"] <= 1.0 + 1e-9


def test_a_floor_from_the_command_line_constrains_optunas_tpe(words, tmp_path):
    """``search=optuna_tpe objective.floor=0.5``: the TPE sampler of the run's study is told
    the floor as one constraint per task (recorded with each trial in optuna.db)."""
    import optuna

    run = tmp_path / "run"
    p = app(on_words(words, run, "merge=task_arithmetic", "search=optuna_tpe", "search.batch=2", "budget=4",
                     "objective.floor=0.5"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    study = optuna.load_study(study_name="evomerge", storage=f"sqlite:///{run / 'optuna.db'}")
    trials = {t.number: t for t in study.get_trials() if t.state.name == "COMPLETE"}
    logged = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    logged = {t["id"]: t for t in logged if t["kind"] == "search"}
    assert len(trials) == 4 and sorted(trials) == sorted(logged)
    for i, t in trials.items():
        want = [0.5 - logged[i]["metrics"][f"{task}/acc"] for task in words.tasks]
        assert t.user_attrs["evomerge_constraints"] == pytest.approx(want)


@pytest.mark.parametrize("search", ["optuna_tpe", "steady"])
def test_an_async_search_on_the_second_family_and_its_resume(words, tmp_path, search):
    """executor.mode=async from the command line on GPT-2: every candidate scored once, each
    told before the next is asked (one worker), the mode and the workers' utilization in the
    summary; resumed with a larger budget, it continues from its log."""
    run = tmp_path / "run"
    p = app(on_words(words, run, f"search={search}", "executor.mode=async", "budget=6"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    p = app(on_words(words, run, f"search={search}", "executor.mode=async", "budget=9", "resume=true"),
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    search = sorted((r for r in recs if r["kind"] == "search"), key=lambda r: r["id"])
    assert [r["id"] for r in search] == list(range(9))
    assert [r["generation"] for r in search] == list(range(9))
    s = json.loads((run / "summary.json").read_text())
    assert s["evaluations"] == 9 and s["search"]["mode"] == "async" and 0 < s["search"]["utilization"] <= 1
    assert "of the search (async mode)" in p.stdout and "of the search (async mode)" in (run / "report.md").read_text()


def test_multi_fidelity_from_the_command_line_on_the_second_family(words, tmp_path):
    """fidelity.share=0.5: every candidate's first look scores half of each task's search
    rows (its record says so), the promoted are scored on all of them, the best is one of
    those, and the summary, the table and the report give the cost."""
    run = tmp_path / "run"
    p = app(on_words(words, run, "search=random", "search.batch=4", "budget=8", "fidelity.share=0.5",
                     "fidelity.promote=0.5"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    first = [r for r in recs if r["kind"] == "search"]
    up = [r for r in recs if r["kind"] == "promoted"]
    assert len(first) == 8 and all(r["fidelity"] == 0.5 for r in first if r["reused"] is None)
    assert 1 <= len(up) < 8 and all(r["fidelity"] == 1.0 and r["status"] == "ok" for r in up)
    s = json.loads((run / "summary.json").read_text())
    assert s["best_search_score"] == max(r["score"] for r in up)
    assert s["search"]["cost"] == pytest.approx(0.5 * 8 + len(up)) and s["search"]["promoted"] == len(up)
    assert "promoted to all of it" in p.stdout and "Multi-fidelity" in (run / "report.md").read_text()
    bad = app(on_words(words, tmp_path / "bad", "fidelity.share=1.5"), cwd=tmp_path)
    assert bad.returncode != 0 and "fidelity.share: must be a share" in bad.stderr
