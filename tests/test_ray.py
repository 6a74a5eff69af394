"""The Ray executor on a local Ray (2 CPUs): the same results as the in-process executor."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.ray


def _build(zoo_root, models, base, tasks):
    def build():
        from evomerge.evaluate import build_evaluator
        from evomerge.execute import Worker
        from evomerge.space import Space

        sp = Space("task_arithmetic", models, base_model=base, search=["weight"], granularity="per_model")
        return Worker(sp, build_evaluator("choice", data_dir=zoo_root, tasks=tasks, limit=20))
    return build


def test_ray_and_local_give_identical_results(tmp_path_factory):
    from evomerge.execute import LocalExecutor
    from evomerge.execute.ray import RayExecutor
    from evomerge.search.base import Candidate
    from evomerge.zoo import ZooConfig, build_zoo

    z = build_zoo(tmp_path_factory.mktemp("zoo") / "zoo", ZooConfig.test_mode(), progress=False, log=lambda *_: None)
    build = _build(str(z.root), [str(p) for p in z.experts.values()], str(z.base), z.tasks)
    rng = np.random.default_rng(0)
    cands = [Candidate(i, list(rng.uniform(0, 1, 4))) for i in range(6)]
    local = {r.id: r for r in LocalExecutor(build()).map(cands)}
    ex = RayExecutor(build, num_workers=2, cpus_per_worker=1, num_cpus=2)
    try:
        remote = {r.id: r for r in ex.map(cands)}
    finally:
        ex.close()
    assert set(remote) == set(local)
    for i in local:
        assert remote[i].status == "ok" and remote[i].metrics == local[i].metrics
    assert {r.worker for r in remote.values()} <= {"ray-0", "ray-1"}


def test_a_search_through_executor_ray_from_the_command_line(tmp_path_factory, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from evomerge.zoo import ZooConfig, build_zoo

    z = build_zoo(tmp_path_factory.mktemp("zoo2") / "zoo", ZooConfig.test_mode(), progress=False,
                  log=lambda *_: None)
    run = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "evomerge.app", f"models.zoo_dir={z.root}", "executor=ray",
                        "executor.num_workers=2", "executor.num_cpus=2", "eval.name=choice", "eval.limit=20",
                        "space=per_model", "budget=8", "progress=false", f"hydra.run.dir={run}"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    assert {r["worker"] for r in recs if r["kind"] == "search"} == {"ray-0", "ray-1"}
    assert json.loads((run / "summary.json").read_text())["results"]["best"]["test"]["score"] >= 0
