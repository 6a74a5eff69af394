"""Reports: ``report.md`` with PNG plots for a finished search, and a table comparing runs.

``write_report(run_dir)`` reads what a search leaves in its run directory (``summary.json``
and the trial log) and writes ``report.md`` beside them with:

* ``convergence.png``: every evaluation's search score, the best so far, and the final
  best's search and test scores against the baselines';
* ``coefficients.png``: the best genome as a heatmap, one panel per searched parameter
  (rows: models, columns: layer blocks);
* ``tasks.png``: per-task test scores of the best, the baselines and the sources;
* ``pareto.png`` for multi-objective searches: every evaluation on the first two
  objectives, the non-dominated ones marked.

``evomerge-report PATH ...`` (re)writes the report of each run directory given, and for a
sweep directory (Hydra's multirun output) prints and writes ``report.md`` with one row per
configuration and the mean ± std over its seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

__all__ = ["write_report", "compare_runs", "main"]

SPLITS = ("search", "test")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def _score(row: dict, split: str) -> float | None:
    m = row.get(split)
    if not isinstance(m, dict) or "score" not in m:
        return None
    return float(m["score"])


def _save(fig, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    tmp.replace(path)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def _convergence(summary: dict, searched: list, path: Path, promoted: list = ()) -> None:
    """Scores in the order of the candidates, and the best so far: of the whole search split
    (a multi-fidelity search's first looks, on a share of it, are drawn apart and never taken
    for the best)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    at = {r.id: i + 1 for i, r in enumerate(searched)}
    ok = [r for r in [*searched, *promoted] if r.status == "ok" and r.score is not None and r.id in at]
    looks = [r for r in ok if r.fidelity < 1]
    if looks:
        ax.scatter([at[r.id] for r in looks], [r.score for r in looks], s=6, alpha=0.3, color="C2", marker=".",
                   label=f"first looks ({looks[0].fidelity:.0%} of the search split)")
    full = sorted(((at[r.id], r.score) for r in ok if r.fidelity >= 1))
    xs, ys = [x for x, _ in full], [y for _, y in full]
    ax.scatter(xs, ys, s=8, alpha=0.45, label="evaluations (search split)")
    best, run = [], -math.inf
    for y in ys:
        run = max(run, y)
        best.append(run)
    ax.plot(xs, best, color="C1", lw=2, label="best so far (search)")
    rows = summary.get("results", {})
    n = max(xs) if xs else 1
    for name, row in rows.items():
        if row.get("kind") != "baseline":
            continue
        s = _score(row, "search")
        if s is not None:
            ax.axhline(s, ls="--", lw=1, color="gray")
            ax.annotate(f"{name} (search)", (1, s), fontsize=7, color="gray", va="bottom")
    if "best" in rows:
        for split, marker, color in (("search", "o", "C1"), ("test", "*", "C3")):
            s = _score(rows["best"], split)
            if s is not None:
                ax.scatter([n], [s], marker=marker, s=90, color=color, zorder=5, label=f"best, {split} split")
    ax.set_xlabel("evaluation")
    ax.set_ylabel("score")
    ax.set_title("convergence")
    ax.legend(fontsize=7, loc="lower right")
    _save(fig, path)
    plt.close(fig)


def _coefficients(summary: dict, path: Path) -> bool:
    space = summary.get("space", {})
    genes = space.get("gene_table")
    best = summary.get("results", {}).get("best", {}).get("genome")
    if not genes or not best:
        return False
    models = space.get("models") or []
    params = list(OrderedDict.fromkeys(g[1] for g in genes))
    plt = _plt()
    import numpy as np

    fig, axes = plt.subplots(len(params), 1, figsize=(max(6, 0.5 * 12 + 2), 1.2 + 1.1 * len(params) * 2),
                             squeeze=False)
    for ax, p in zip(axes[:, 0], params):
        mine = [g for g in genes if g[1] == p]
        units = list(OrderedDict.fromkeys(g[3] for g in mine))
        who = list(OrderedDict.fromkeys(g[2] for g in mine))
        grid = np.full((len(who), len(units)), np.nan)
        for name, _, m, u in mine:
            grid[who.index(m), units.index(u)] = best.get(name, np.nan)
        im = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(units)))
        ax.set_xticklabels(units, rotation=60, ha="right", fontsize=7)
        labels = ["shared" if m is None else (Path(models[m]).name if m < len(models) else f"model {m}")
                  for m in who]
        ax.set_yticks(range(len(who)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_title(f"best genome: {p}", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def _task_metrics(row: dict, split: str) -> dict[str, float]:
    m = row.get(split)
    if not isinstance(m, dict):
        return {}
    return {k: float(v) for k, v in m.items() if k != "score" and isinstance(v, (int, float))}


_KIND_ORDER = {"best": 0, "baseline": 1, "source": 2}


def _ordered(names: list[str], rows: dict) -> list[str]:
    """The best first, then the baselines, then the base, then the other sources."""
    return sorted(names, key=lambda n: (_KIND_ORDER.get(rows[n].get("kind"), 3), n != "base"))


def _tasks(summary: dict, path: Path) -> bool:
    rows = summary.get("results", {})
    names = _ordered([n for n in rows if _task_metrics(rows[n], "test")], rows)
    if not names:
        return False
    metrics = list(OrderedDict.fromkeys(k for n in names for k in _task_metrics(rows[n], "test")))
    floors, sign = _floors(summary)
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(metrics) + 2), 4))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = _task_metrics(rows[n], "test")
        bars = ax.bar([j + i * width for j in range(len(metrics))], [vals.get(k, 0.0) for k in metrics], width,
                      label=n)
        for bar, k in zip(bars, metrics):  # a task below the objective's floor is hatched
            if k in floors and k in vals and sign * (floors[k] - vals[k]) > 0:
                bar.set_hatch("//")
    for j, k in enumerate(metrics):
        if k in floors:
            ax.hlines(floors[k], j - width / 2, j + 0.8 - width / 2, colors="black", linestyles="--",
                      label="floor (hatched: below it)" if j == min(i for i, m in enumerate(metrics) if m in floors)
                      else None)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(metrics))])
    ax.set_xticklabels(metrics, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test split")
    ax.set_title("per-task scores")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _save(fig, path)
    plt.close(fig)
    return True


def _floors(summary: dict) -> tuple[dict[str, float], float]:
    """The objective's floor per task metric (``"<task>/<metric>"``), and +1 where a task
    must reach it from below (accuracy), -1 from above (perplexity)."""
    obj = summary.get("objective") or {}
    sign = -1.0 if obj.get("direction") == "minimize" else 1.0
    out = {}
    for t, key in (obj.get("tasks") or {}).items():
        f = (obj.get("floors") or {}).get(t) if obj.get("floor") == "base" else obj.get("floor")
        if isinstance(f, (int, float)) and not isinstance(f, bool):
            out[f"{t}/{key}"] = float(f)
    return out, sign


def pareto_front(points: list[tuple[float, ...]]) -> list[int]:
    """Indices of the non-dominated points (every objective maximised)."""
    front = []
    for i, p in enumerate(points):
        if not any(all(q[j] >= p[j] for j in range(len(p))) and any(q[j] > p[j] for j in range(len(p)))
                   for q in points):
            front.append(i)
    return front


def _objectives(summary: dict) -> list[str]:
    objs = summary.get("objectives")
    if not objs:  # older summaries: the configured ones
        search = (summary.get("config") or {}).get("search") or {}
        objs = search.get("objectives") if isinstance(search, dict) else None
    return list(objs or [])


def _pareto(summary: dict, searched: list, path: Path) -> bool:
    objs = _objectives(summary)
    if len(objs) < 2:
        return False
    ok = [r for r in searched if r.status == "ok" and all(o in r.metrics for o in objs[:2])]
    if not ok:
        return False
    pts = [tuple(float(r.metrics[o]) for o in objs[:2]) for r in ok]
    front = set(pareto_front(pts))
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=10, alpha=0.4, label="evaluations")
    fr = sorted(pts[i] for i in front)
    ax.plot([p[0] for p in fr], [p[1] for p in fr], "o-", color="C3", label="Pareto front")
    ax.set_xlabel(objs[0])
    ax.set_ylabel(objs[1])
    ax.set_title("Pareto front (search split)")
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)
    return True


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md`` and its plots into a finished run directory; returns its path."""
    from .search import Result  # noqa: F401  (the trial log's records; imports the search package first)
    from .trials import TrialLog, atomic_write

    run_dir = Path(run_dir)
    sfile = run_dir / "summary.json"
    if not sfile.is_file():
        raise FileNotFoundError(f"{run_dir}: no summary.json (is this a finished run directory?)")
    summary = json.loads(sfile.read_text())
    log = run_dir / "trials.jsonl"
    trials = list(TrialLog(log)) if log.is_file() else []
    searched = [r for r in trials if r.kind == "search"]
    images = []
    _convergence(summary, searched, run_dir / "convergence.png", [r for r in trials if r.kind == "promoted"])
    images.append(("Convergence", "convergence.png"))
    if _coefficients(summary, run_dir / "coefficients.png"):
        images.append(("Coefficients of the best genome", "coefficients.png"))
    if _tasks(summary, run_dir / "tasks.png"):
        images.append(("Per-task scores (test split)", "tasks.png"))
    # each candidate's whole-split result where a multi-fidelity search promoted it, else its own
    whole = {r.id: r for r in trials if r.kind == "promoted" and r.status == "ok"}
    if _pareto(summary, [whole.get(r.id, r) for r in searched], run_dir / "pareto.png"):
        images.append(("Pareto front", "pareto.png"))

    space = summary.get("space", {})
    cfg = summary.get("config") or {}
    lines = [f"# {cfg.get('name', run_dir.name)}: {summary.get('strategy', '?')} over "
             f"{space.get('genes', '?')} genes ({space.get('method', '?')}, {space.get('granularity', '?')})", ""]
    spc = summary.get("seconds_per_candidate")
    lines.append(f"{summary.get('evaluations', 0)} evaluations, {summary.get('failed', 0)} failed"
                 + (f", {spc:.3f} s per candidate" if spc else "") + ".")
    fed = summary.get("search") or {}
    if fed.get("utilization") is not None:
        lines[-1] += f" Workers busy {fed['utilization']:.0%} of the search ({fed['mode']} mode)."
    if fed.get("fidelity") is not None:
        lines += ["", f"Multi-fidelity: every candidate was scored first on {fed['fidelity']:.0%} of the search "
                  f"split; {fed['promoted']} whose first look was among the best {fed['promote']:.0%} "
                  + (f"of the last {fed['window']} first looks" if fed.get("window") else "of its batch's")
                  + f" were scored on all of it. The search cost {fed['cost']:.1f} evaluations of the whole split."]
    lines += [f"\n**Warning:** {w}." for w in summary.get("warnings", ())]
    obj = summary.get("objective")
    if obj:
        extra = ", ".join(f"{k} {v}" for k, v in obj.items() if k not in ("name", "direction", "tasks", "references", "floors"))
        lines += ["", f"Objective: **{obj['name']}**" + (f" ({extra})" if extra else "")
                  + "; the search and test columns are the mean over tasks."]
    lines += ["", "| | kind | search | test |" + (" objective (test) | worst task (test) |" if obj else ""),
              "|---|---|---|---|" + ("---|---|" if obj else "")]
    results = summary.get("results", {})
    for name in _ordered(list(results), results):
        row = results[name]
        line = f"| {name} | {row.get('kind', '')} | {_fmt(_score(row, 'search'))} | {_fmt(_score(row, 'test'))} |"
        if obj:
            t = (row.get("objective") or {}).get("test")
            line += (f" {_fmt(t['objective'])} | {t['worst_task']} {_fmt(t['worst'])}"
                     f"{' (below the floor)' if t['below_floor'] else ''} |" if t else " | |")
        lines.append(line)
    lines.append("")
    if (run_dir / "best_recipe.yaml").is_file():
        lines += ["The best genome as a recipe: `best_recipe.yaml` (runs with `evomerge-merge`).", ""]
    for title, img in images:
        lines += [f"## {title}", "", f"![{title}]({img})", ""]
    out = run_dir / "report.md"
    atomic_write(out, "\n".join(lines))
    return out


# --------------------------------------------------------------------------------------
# Comparing runs (a multirun sweep)
# --------------------------------------------------------------------------------------


def _overrides(run_dir: Path) -> list[str]:
    f = run_dir / ".hydra" / "overrides.yaml"
    if not f.is_file():
        return []
    import yaml

    return [str(o) for o in (yaml.safe_load(f.read_text()) or [])]


def _mean_std(vals: list[float]) -> str:
    if not vals:
        return "—"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.4f}"
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))
    return f"{m:.4f} ± {sd:.4f}"


# overrides that name no configuration of a sweep (a seed, where and how a run reports)
_NOT_CONFIG = ("seed", "name", "progress", "threads", "resume", "hydra.run.dir", "hydra.sweep.dir")


def compare_runs(runs: list[Path]) -> list[dict[str, Any]]:
    """One row per configuration (the runs' overrides without ``seed``), with the mean and
    std over its runs of the best's search and test scores (the mean over tasks), of its
    worst task's test score (and which tasks were worst) and normalized mean where the runs
    had an objective, and of each baseline's test score."""
    groups: dict[str, list[dict]] = OrderedDict()
    for r in runs:
        summary = json.loads((r / "summary.json").read_text())
        key = " ".join(o for o in _overrides(r) if o.split("=", 1)[0].lstrip("+~") not in _NOT_CONFIG) \
            or "(defaults)"
        groups.setdefault(key, []).append(summary)
    table = []
    for key, sums in groups.items():
        row: dict[str, Any] = {"config": key, "runs": len(sums)}
        for split in SPLITS:
            vals = [_score(s["results"]["best"], split) for s in sums if "best" in s.get("results", {})]
            row[f"best {split}"] = [v for v in vals if v is not None]
        # the objective's view of the best on test: its worst task (and which), its normalized mean
        objs = [s["results"]["best"].get("objective", {}).get("test") for s in sums if "best" in s.get("results", {})]
        objs = [o for o in objs if o]
        if objs:
            row["best worst task test"] = [o["worst"] for o in objs]
            row["worst tasks"] = ", ".join(sorted({o["worst_task"] for o in objs}))
            if all("normalized_mean" in o for o in objs):
                row["best normalized test"] = [o["normalized_mean"] for o in objs]
        names = OrderedDict.fromkeys(n for s in sums for n, x in s.get("results", {}).items()
                                     if x.get("kind") == "baseline")
        for n in names:
            vals = [_score(s["results"][n], "test") for s in sums if n in s.get("results", {})]
            row[f"{n} test"] = [v for v in vals if v is not None]
        table.append(row)
    return table


def _render(table: list[dict[str, Any]]) -> str:
    cols = list(OrderedDict.fromkeys(k for row in table for k in row))
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in table:
        cells = []
        for c in cols:
            v = row.get(c, "")
            cells.append(_mean_std(v) if isinstance(v, list) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="evomerge-report", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="run directories, or a sweep directory holding them")
    a = ap.parse_args(argv)
    status = 0
    for p in map(Path, a.paths):
        if (p / "summary.json").is_file():
            print(f"{write_report(p)}")
            continue
        runs = sorted(d.parent for d in p.glob("**/summary.json"))
        if not runs:
            print(f"evomerge-report: {p}: no finished run (no summary.json) in it", file=sys.stderr)
            status = 1
            continue
        for r in runs:
            write_report(r)
        from .trials import atomic_write

        text = _render(compare_runs(runs))
        atomic_write(p / "report.md", f"# {p.name}: {len(runs)} runs\n\n{text}\n")
        print(text)
        print(f"\n{p / 'report.md'}")
    return status


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
