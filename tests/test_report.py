"""Reports: report.md with its plots from a run directory, Pareto fronts, and the table
comparing the runs of a sweep (mean ± std over seeds)."""

from __future__ import annotations

import json
import math

import pytest

from evomerge.report import compare_runs, main, pareto_front, write_report
from evomerge.types import Result
from evomerge.trials import TrialLog

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(path, seed, best=(0.7, 0.65), start=(0.4, 0.38), objectives=None, overrides=()):
    path.mkdir(parents=True)
    genes = [[f"weight[{m}].{u}", "weight", m, u] for m in range(2) for u in ("embed", "layers[0:1]", "head")]
    genes += [["density.all", "density", None, "all"]]
    genome = {g[0]: 0.1 * i for i, g in enumerate(genes)}
    summary = {
        "evaluations": 12, "failed": 1, "best_search_score": best[0], "strategy": "cmaes",
        "space": {"method": "ties", "granularity": "per_layer", "genes": len(genes), "gene_table": genes,
                  "models": ["/z/expert_a", "/z/expert_b"]},
        "results": {
            "best": {"kind": "best", "genome": genome,
                     "search": {"score": best[0], "a/acc": 0.8, "b/acc": 0.6},
                     "test": {"score": best[1], "a/acc": 0.75, "b/acc": 0.55}},
            "start": {"kind": "baseline", "search": {"score": start[0], "a/acc": 0.5, "b/acc": 0.3},
                      "test": {"score": start[1], "a/acc": 0.45, "b/acc": 0.31}},
            "base": {"kind": "source", "search": {"score": 0.0}, "test": {"score": 0.0, "a/acc": 0.0, "b/acc": 0.0}},
        },
        "seconds_per_candidate": 0.2, "objectives": objectives,
        "config": {"name": "demo", "seed": seed},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    log = TrialLog(path / "trials.jsonl")
    for i in range(12):
        ok = i != 3
        a, b = (i % 5) / 5, ((7 * i) % 5) / 5
        log.append(Result(i, [0.0], "ok" if ok else "failed", score=(a + b) / 2 if ok else None,
                          metrics={"a/acc": a, "b/acc": b} if ok else {}))
    if overrides:
        (path / ".hydra").mkdir()
        (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return path


def test_report_has_every_plot_and_the_scores(tmp_path):
    run = fake_run(tmp_path / "run", 0)
    out = write_report(run)
    text = out.read_text()
    for img in ("convergence.png", "coefficients.png", "tasks.png"):
        assert (run / img).read_bytes()[:8] == PNG
        assert f"]({img})" in text
    assert not (run / "pareto.png").exists()  # one objective: no front to draw
    assert "| best | best | 0.7000 | 0.6500 |" in text
    assert "| start | baseline | 0.4000 | 0.3800 |" in text
    assert "12 evaluations, 1 failed" in text
    assert not list(run.glob("*.tmp"))


def test_multi_objective_runs_get_a_pareto_plot(tmp_path):
    run = fake_run(tmp_path / "run", 0, objectives=["a/acc", "b/acc"])
    assert "](pareto.png)" in write_report(run).read_text()
    assert (run / "pareto.png").read_bytes()[:8] == PNG


def test_pareto_front_by_hand():
    pts = [(1, 0), (0, 1), (0.5, 0.5), (0.4, 0.4), (1, 0), (0.2, 0.9)]
    # (0.4, 0.4) is dominated by (0.5, 0.5); equal points do not dominate each other
    assert pareto_front(pts) == [0, 1, 2, 4, 5]


def test_a_sweep_is_compared_by_configuration(tmp_path):
    sweep = tmp_path / "sweep"
    for seed, best in ((0, (0.7, 0.6)), (1, (0.8, 0.7))):
        fake_run(sweep / f"{seed}_s{seed}", seed, best=best, overrides=["search=cmaes", f"seed={seed}"])
    fake_run(sweep / "2_tpe", 0, best=(0.5, 0.5), overrides=["search=optuna_tpe", "seed=0"])
    table = compare_runs(sorted(p for p in sweep.iterdir()))
    rows = {r["config"]: r for r in table}
    assert rows["search=cmaes"]["runs"] == 2 and rows["search=optuna_tpe"]["runs"] == 1
    assert rows["search=cmaes"]["best test"] == [0.6, 0.7]
    assert main([str(sweep)]) == 0
    text = (sweep / "report.md").read_text()
    sd = math.sqrt(((0.6 - 0.65) ** 2 + (0.7 - 0.65) ** 2) / 1)
    assert f"0.6500 ± {sd:.4f}" in text  # mean ± sample std over the two seeds
    assert all((d / "report.md").is_file() for d in sweep.iterdir() if d.is_dir())


def test_report_of_a_folder_without_runs_fails(tmp_path, capsys):
    assert main([str(tmp_path)]) == 1
    assert "no finished run" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="summary.json"):
        write_report(tmp_path)


def test_a_sweep_over_objectives_compares_their_worst_tasks(tmp_path):
    """``evomerge-report`` over a sweep: per configuration the best's worst task on test (its
    mean and spread over seeds, and which tasks were worst) and its normalized mean."""
    from evomerge.report import compare_runs

    sweep = tmp_path / "sweep"
    runs = []
    for seed, (name, worst) in enumerate([("mean", 0.1), ("mean", 0.3), ("worst", 0.4), ("worst", 0.5)]):
        r = fake_run(sweep / f"{seed}", seed, overrides=[f"objective={name}", f"seed={seed}", "name=objectives",
                                                         "progress=false"])
        s = json.loads((r / "summary.json").read_text())
        s["objective"] = {"name": name, "direction": "maximize"}
        s["results"]["best"]["objective"] = {"test": {"objective": worst, "mean": 0.6, "worst_task": "ab"[seed % 2],
                                                      "worst": worst, "below_floor": [], "normalized_mean": 0.9}}
        (r / "summary.json").write_text(json.dumps(s))
        runs.append(r)
    table = {row["config"]: row for row in compare_runs(runs)}
    assert table["objective=mean"]["best worst task test"] == [0.1, 0.3]
    assert table["objective=worst"]["best worst task test"] == [0.4, 0.5]
    assert table["objective=worst"]["worst tasks"] == "a, b"
    assert table["objective=mean"]["best normalized test"] == [0.9, 0.9]


def test_the_per_task_plot_knows_each_tasks_floor(tmp_path):
    """A run with a floor (a number, or the base's scores): each task metric's floor for the
    per-task plot, reached from below for accuracy and from above for perplexity."""
    from evomerge.report import _floors

    run = fake_run(tmp_path / "run", 0)
    s = json.loads((run / "summary.json").read_text())
    s["objective"] = {"name": "worst", "floor": 0.6, "penalty": 10.0, "direction": "maximize",
                      "tasks": {"a": "acc", "b": "acc"}}
    (run / "summary.json").write_text(json.dumps(s))
    assert _floors(s) == ({"a/acc": 0.6, "b/acc": 0.6}, 1.0)
    write_report(run)
    assert (run / "tasks.png").read_bytes()[:8] == PNG
    assert "Objective: **worst** (floor 0.6, penalty 10.0)" in (run / "report.md").read_text()
    base = {"name": "mean", "floor": "base", "direction": "minimize", "tasks": {"a": "ppl"},
            "floors": {"a": 3.5}}
    assert _floors({"objective": base}) == ({"a/ppl": 3.5}, -1.0)
