"""The ``evomerge`` Hydra app: every config option composes and instantiates; a search runs
from the command line, survives SIGKILL and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ["models", "merge", "space", "search", "eval", "objective", "executor"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_and_its_target_exists(group):
    import importlib

    from hydra import compose, initialize_config_dir

    assert options(group)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for opt in options(group):
            cfg = compose(config_name="config", overrides=[f"{group}={opt}"])
            node = cfg[group]
            if "_target_" in node:
                mod, _, attr = node["_target_"].rpartition(".")
                target = getattr(importlib.import_module(mod), attr)
                import inspect

                params = inspect.signature(target).parameters
                if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
                    from evomerge.app import APP_KEYS

                    unknown = [k for k in node if not k.startswith("_") and k not in params
                               and k not in APP_KEYS.get(group, ())]
                    assert not unknown, f"{group}={opt}: keys {unknown} are not arguments of {node['_target_']}"


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    from evomerge.zoo import ZooConfig, build_zoo

    root = tmp_path_factory.mktemp("zoo") / "zoo"
    build_zoo(root, ZooConfig.test_mode(), progress=False, log=lambda *_: None)
    return root


def evomerge(args, run_dir, **kw):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # in-process: these tests are about the app, the trial log and resume (test_ray.py runs the
    # app through Ray); a SIGKILLed driver would also leave its local Ray's agents behind
    if not any(a.startswith("executor=") for a in args):
        args = [*args, "executor=local"]
    cmd = [sys.executable, "-m", "evomerge.app", *args, f"hydra.run.dir={run_dir}", "progress=false"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_search_from_the_command_line_then_kill_and_resume(zoo_dir, tmp_path):
    args = [f"models.zoo_dir={zoo_dir}", "eval.name=choice", "eval.limit=30", "budget=30", "space=per_layer"]
    run = tmp_path / "run"
    p = evomerge(args, run)
    log = run / "trials.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 8):
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()
    p.send_signal(signal.SIGKILL)
    p.communicate()
    before = len(log.read_text().splitlines())
    assert 8 <= before < 30 and not (run / "summary.json").exists()

    record = {f.name: f.read_text() for f in (run / ".hydra").iterdir()}
    refused = evomerge(args + ["resume=true", "seed=7"], run)  # another seed: refused, and records nothing
    assert refused.wait(timeout=120) == 2
    p = evomerge(args + ["resume=true", "export_model=true"], run)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    # the run's .hydra/ record is the first run's: resumes (refused or not) leave it alone
    assert {f.name: f.read_text() for f in (run / ".hydra").iterdir()} == record
    assert "best (searched)" in out
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    ids = [r["id"] for r in recs if r["kind"] == "search"]
    assert len(ids) == len(set(ids)) >= 30
    s = json.loads((run / "summary.json").read_text())
    for name in ["best", "start", "base"]:
        assert set(s["results"][name]) >= {"search", "test"}
    assert (run / "best_recipe.yaml").is_file() and (run / ".hydra" / "config.yaml").is_file()
    assert "report.md" in out
    for img in ("convergence.png", "coefficients.png", "tasks.png"):
        assert (run / img).read_bytes()[:4] == b"\x89PNG" and f"]({img})" in (run / "report.md").read_text()
    # the exported model is the best genome's merge, and scores what the search recorded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.evaluate import build_evaluator
    from evomerge.zoo import load_zoo

    z = load_zoo(zoo_dir)
    ev = build_evaluator("choice", data_dir=z.root, tasks=z.tasks, limit=30)
    model = AutoModelForCausalLM.from_pretrained(run / "best_model").eval()
    got = ev(model, AutoTokenizer.from_pretrained(run / "best_model"), split="search")["score"]
    assert got == pytest.approx(s["best_search_score"])


def test_a_multirun_writes_one_directory_per_job_and_the_report_compares_them(zoo_dir, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "evomerge.app", "-m", f"models.zoo_dir={zoo_dir}", "eval.name=choice",
           "eval.limit=20", "budget=6", "search=random", "seed=0,1", f"hydra.sweep.dir={sweep}", "progress=false",
           "executor=local"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    runs = sorted(d.parent for d in sweep.glob("*/summary.json"))
    assert len(runs) == 2 and runs[0] != runs[1]
    assert all((r / "trials.jsonl").is_file() and (r / "report.md").is_file() for r in runs)
    seeds = {json.loads((r / "summary.json").read_text())["config"]["seed"] for r in runs}
    assert seeds == {0, 1}
    rep = subprocess.run([sys.executable, "-m", "evomerge.report", str(sweep)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert rep.returncode == 0, rep.stderr
    row = next(line for line in rep.stdout.splitlines() if "search=random" in line)
    assert "| 2 |" in row and "±" in row  # two seeds of one configuration, as mean ± std


def test_greedy_soup_over_ingredients_from_the_command_line(zoo_dir, tmp_path):
    from evomerge.zoo import build_ingredients, load_zoo

    run = tmp_path / "soup"
    p = evomerge([f"models.zoo_dir={zoo_dir}", "experiment=zoo_greedy_soup", "models.ingredient_count=3",
                  "eval.limit=40"], run)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    zoo = load_zoo(zoo_dir)
    ingredients = zoo.ingredients("sort")
    assert [q.name for q in ingredients] == ["00", "01", "02"]
    s = json.loads((run / "summary.json").read_text())
    sources = {n: r for n, r in s["results"].items() if r["kind"] == "source"}
    assert set(sources) == {"00", "01", "02"}  # the soup's sources are the ingredients, not the base
    assert set(s["results"]["best"]["search"]) == {"score", "sort/acc"}  # scored on the ingredients' task
    best_single = max(r["search"]["score"] for r in sources.values())
    assert s["results"]["best"]["search"]["score"] >= best_single  # greedy soup's guarantee
    # built once: asking again reuses them; another count rebuilds
    stamp = (ingredients[0] / "model.safetensors").stat().st_mtime_ns
    assert build_ingredients(zoo, "sort", 3, progress=False, log=lambda *_: None) == ingredients
    assert (ingredients[0] / "model.safetensors").stat().st_mtime_ns == stamp
    assert len(build_ingredients(zoo, "sort", 2, progress=False, log=lambda *_: None)) == 2
    assert not [d for d in (zoo_dir / "ingredients").iterdir() if d.name.startswith(".")]


@pytest.mark.parametrize("override,expect", [
    ("search=no_such_strategy", "search"),
    ("budget=-3", "budget"),
    ("budget=lots", "budget"),
    ("+space.ranges.density.hi=1.5", "space.ranges.density.hi"),
    ("+space.ranges.weight={lo:2,hi:1}", "space.ranges.weight"),
    ("search._target_=os.system", "search._target_"),
    ("device=foo", "device: 'foo' is not a device"),
    ("device=meta", "device: 'meta' is not a device"),
    ("store_dtype=foo", "store_dtype: 'foo'"),
    ("threads=0", "threads: must be a positive"),
    ("seed=abc", "seed: must be a whole number"),
    ("seed=-1", "seed: must be a whole number"),
    ("max_seconds=nan", "max_seconds: must be a positive"),
    ("max_seconds=true", "max_seconds: must be a positive"),
    ("executor.mode=steady", "executor.mode: 'steady' is not"),
    ("fidelity.share=0", "fidelity.share: must be a share"),
    ("fidelity.promote=2", "fidelity.promote: must be a share"),
    ("fidelity.window=0", "fidelity.window: must be a positive"),
    ("fidelity=0.5", "fidelity: a group of share"),
    ("executor=ray executor.prefetch=-1", "executor.prefetch: must be a whole number"),
    ("executor=ray executor.prefetch=1.5", "executor.prefetch: must be a whole number"),
    ("executor.mode=async", "executor.mode: async needs a strategy"),  # the default search, CMA-ES
    ("executor.mode=async search=greedy_soup", "GreedySoup"),
    ("hydra.run.dir=/tmp/" + "x" * 300, "longer than the 255 bytes"),
    ("merge.method=regmean", "merge.data.path: merge method 'regmean' reads data"),  # and none was given
    ("merge.method=pleas", "merge.data.path: merge method 'pleas' reads data"),
    ("merge.align=zip_it", "merge.align.method: unknown alignment 'zip_it'"),
    ("merge.align=activation_matching", "merge.data.path: merge.align=activation_matching runs the models on data"),
    ("merge.align={max_sweeps:0}", "merge.align.max_sweeps: expected a positive integer"),
])
def test_bad_config_values_fail_before_anything_loads(tmp_path, override, expect):
    zoo = tmp_path / "no_zoo_here"  # were the check to pass, the zoo would be built: minutes, not seconds
    run = tmp_path / "run"
    p = evomerge([f"models.zoo_dir={zoo}", "merge=ties", *override.split()], run)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert expect in err, err[-2000:]
    assert not zoo.exists() and not (run / "trials.jsonl").exists()


@pytest.mark.parametrize("override,expect", [
    ("merge.data.eval_split=test", "merge.data.eval_split: only 'search' (the test split is held out)"),
    ("merge.data.eval_split=search merge.data.path=x.jsonl", "drop merge.data.path"),
    ("merge.data.eval_split=search merge.data.target=a", "drop merge.data.target"),
    ("merge.data.path=x.jsonl merge.data.tasks=[a]", "merge.data.tasks: names the evaluator's task"),
    ("merge.method=ties merge.data.eval_split=search", "merge.data.eval_split: merge method 'ties' reads no data"),
])
def test_bad_data_sources_of_a_search_fail_before_anything_loads(tmp_path, override, expect):
    zoo = tmp_path / "no_zoo_here"
    run = tmp_path / "run"
    p = evomerge([f"models.zoo_dir={zoo}", "merge=fisher", *override.split()], run)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and expect in err, err[-2000:]
    assert not zoo.exists() and not (run / "trials.jsonl").exists() and not (run / "data").exists()


@pytest.mark.parametrize("override", [
    "+search.foo={_target_:evomerge.trials.atomic_write,path:PATH,data:hi}",
    "search._target_=evomerge.trials.atomic_write",
    "+executor.extra={_target_:evomerge.trials.atomic_write,path:PATH,data:hi}",
    "+models.x={_target_:evomerge.evaluate.build_evaluator,name:accuracy}",
])
def test_a_target_outside_the_groups_own_classes_is_refused(tmp_path, override):
    """Any function of the package given as a _target_ would run with the config's arguments
    (this one writes a file): only the classes a group builds are accepted."""
    victim = tmp_path / "written"
    run = tmp_path / "run"
    p = evomerge([f"models.zoo_dir={tmp_path / 'no_zoo'}", override.replace("PATH", str(victim))], run)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err[-2000:]
    assert "_target_" in err and "is not built here" in err
    assert not victim.exists() and not (tmp_path / "no_zoo").exists()


@pytest.mark.parametrize("override", [
    "+hydra.callbacks.x={_target_:evomerge.trials.atomic_write,path:PATH,data:hi}",
    "++hydra.job_logging.handlers.x={'()':evomerge.trials.atomic_write,path:PATH,data:hi}",
    "hydra.hydra_logging.root.level=INFO",
    "++hydra={callbacks:{x:{_target_:logging.FileHandler,filename:PATH,mode:w}}}",  # the whole node
    "+evil@hydra.callbacks.x=fh",  # a config placed into hydra's package
    "+hydra.job.env_set.PYTHONPATH=PATH",  # code every Ray worker would import
    "hydra.searchpath=[file://PATH]",  # configs (with hydra settings) read from elsewhere
    "resume=on",  # neither true nor false: Hydra would record it before any check
])
def test_hydra_settings_that_build_load_or_set_things_are_refused_from_the_command_line(tmp_path, override):
    """Hydra builds its callbacks (and logging's ``()`` factories), sets its environment and
    reads its search path before the app sees the config: only the run folders and the
    packaged logging choices are taken, and they are refused before Hydra starts."""
    victim = tmp_path / "written"
    victim.write_text("precious")
    run = tmp_path / "run"
    p = evomerge([f"models.zoo_dir={tmp_path / 'no_zoo'}", override.replace("PATH", str(victim))], run)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err[-2000:]
    assert "evomerge: error in the configuration:" in err and "Traceback" not in err
    assert victim.read_text() == "precious" and not run.exists()


def test_hydra_s_packaged_logging_options_stay_allowed():
    from evomerge.app import check_overrides

    check_overrides(["hydra/job_logging=disabled", "hydra/hydra_logging=none", "hydra.run.dir=x", "hydra.verbose=true",
                     "resume=true", "resume=False", "hydra.sweep.dir=y"])


def test_a_search_whose_every_candidate_failed_says_so_and_exits_non_zero(zoo_dir, tmp_path):
    """Weights near 1e40 overflow float32 in every tensor: every candidate fails. The search
    used to exit 0 with a summary holding no best; it says so, with the first error, and
    exits 1 (the trial log and summary stay for a look)."""
    run = tmp_path / "run"
    p = evomerge([f"models.zoo_dir={zoo_dir}", "eval.name=choice", "eval.limit=20", "space=global", "budget=4",
                  "search=random", "+space.ranges.weight={lo:1e40,hi:2e40,x0:1e40}"], run)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 1, err[-2000:]
    assert "every one of the 4 candidates failed; the first: MergeError" in err and "not finite" in err
    assert "Traceback" not in err and (run / "trials.jsonl").is_file()


def test_a_multi_objective_search_reports_its_pareto_front(zoo_dir, tmp_path):
    run = tmp_path / "nsga2"
    p = evomerge([f"models.zoo_dir={zoo_dir}", "experiment=zoo_optuna_nsga2", "budget=8", "eval.limit=20"], run)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err
    s = json.loads((run / "summary.json").read_text())
    assert len(s["objectives"]) == 4  # one per zoo task
    assert (run / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "](pareto.png)" in (run / "report.md").read_text()


def test_an_existing_run_directory_is_not_overwritten(zoo_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trials.jsonl").write_text("")
    p = evomerge([f"models.zoo_dir={zoo_dir}", "budget=4"], run)
    out, err = p.communicate(timeout=120)
    assert p.returncode != 0 and "already holds a search" in err


def test_adamerging_from_the_command_line(zoo_dir, tmp_path):
    run = tmp_path / "am"
    p = evomerge([f"models.zoo_dir={zoo_dir}", "search=adamerging_taskwise", "space=per_model", "search.steps=6",
                  "search.lr=0.05"], run)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    s = json.loads((run / "summary.json").read_text())
    assert s["strategy"] == "adamerging" and s["evaluations"] == 6
    assert {"search", "test"} <= set(s["results"]["best"])
    assert (run / "best_recipe.yaml").is_file()


@pytest.mark.parametrize("name", options("experiment"))
def test_experiments_compose_and_carry_their_command(name):
    from hydra import compose, initialize_config_dir

    text = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
    assert text[0] == "# @package _global_"
    assert text[1].startswith(f"# evomerge experiment={name}")
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=[f"experiment={name}"])
    assert cfg.name == name and cfg.budget > 0
    assert cfg.merge.method and cfg.space.granularity and cfg.search._target_.startswith("evomerge.")


def test_every_config_file_ships_with_a_regular_install():
    import ast
    import glob

    root = CONF.parent
    text = (root / "pyproject.toml").read_text()
    section = text.split("[tool.setuptools.data-files]", 1)[1].split("\n[", 1)[0]
    patterns = [p for line in section.splitlines() if "=" in line and not line.startswith("#")
                for p in ast.literal_eval(line.split("=", 1)[1].strip())]
    shipped = {Path(f).resolve() for p in patterns for f in glob.glob(str(root / p))}
    assert set(CONF.rglob("*.yaml")) <= shipped


def test_conf_dir_is_found():
    from evomerge.app import conf_dir

    assert (conf_dir() / "config.yaml").is_file()


def test_lm_eval_on_a_freshly_built_zoo(zoo_dir, tmp_path):
    """The zoo's lm-eval task folder is written on first use: eval=lm_eval_zoo and eval=lm_eval
    work on a zoo that has never had it."""
    import shutil

    shutil.rmtree(zoo_dir / "lm_eval_tasks", ignore_errors=True)
    for opt in ("lm_eval_zoo", "lm_eval"):
        run = tmp_path / opt
        p = evomerge([f"models.zoo_dir={zoo_dir}", f"eval={opt}", "eval.limit=10", "budget=4", "search=random"], run)
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        s = json.loads((run / "summary.json").read_text())
        assert any(k.startswith("zoo_") and k.endswith("/exact_match") for k in s["results"]["best"]["test"])


def test_settings_added_later_keep_older_runs_resumable_until_they_change_the_search(tmp_path):
    """The record a run keeps (run.json) leaves out the objective and CMA-ES's restarts while
    they are the defaults that search as before: a run recorded before they existed resumes
    under the defaults, and one with another objective or with restarts is refused."""
    from hydra import compose, initialize_config_dir

    from evomerge.app import search_record
    from evomerge.trials import StateError, check_record

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        plain = search_record(compose(config_name="config"))
        worst = search_record(compose(config_name="config", overrides=["objective=worst"]))
        floor = search_record(compose(config_name="config", overrides=["objective.floor=0.2"]))
        restarts = search_record(compose(config_name="config", overrides=["search.restarts=2"]))
    assert "objective" not in plain and "restarts" not in plain["search"]
    assert worst["objective"]["name"] == "worst" and floor["objective"]["floor"] == 0.2
    assert restarts["search"]["restarts"] == 2
    old = json.loads(json.dumps(plain))  # what a run recorded before these settings existed
    check_record(tmp_path, old, resume=False)
    (tmp_path / "trials.jsonl").write_text("")
    check_record(tmp_path, plain, resume=True)
    for changed, key in ((worst, "objective"), (floor, "objective.floor"), (restarts, "search.restarts")):
        with pytest.raises(StateError, match=key.replace(".", r"\.")):
            check_record(tmp_path, changed, resume=True)


def test_weights_of_a_weighted_objective_are_given_on_the_command_line():
    """``objective=weighted objective.weights={TASK:W}`` composes and builds (the README's
    form); a task the evaluator does not score is named."""
    from hydra import compose, initialize_config_dir

    from evomerge.app import ConfigError, _scoring, build

    class Ev:
        direction, tasks = "maximize", ["reverse", "sort"]

        @staticmethod
        def primary(task):
            return "acc"

    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config", overrides=["objective=weighted", "objective.weights={reverse:3}"])
        bad = compose(config_name="config", overrides=["objective=weighted", "objective.weights={zzz:2}"])
    assert build(cfg.objective).weights == {"reverse": 3}
    assert _scoring(cfg, Ev())({"reverse/acc": 1.0, "sort/acc": 0.0}) == 0.75
    with pytest.raises(ConfigError, match="'zzz' is not a task"):
        _scoring(bad, Ev())
