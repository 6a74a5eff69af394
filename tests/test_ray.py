"""The Ray executor on a local Ray (2 CPUs): the same results as the in-process executor."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from evomerge.zoo import ZooConfig, build_zoo

    return build_zoo(tmp_path_factory.mktemp("zoo") / "zoo", ZooConfig.test_mode(), progress=False,
                     log=lambda *_: None)


def app(args, run, env=None):
    """The evomerge command, in a subprocess, writing into ``run``."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "evomerge.app", *args, "progress=false", f"hydra.run.dir={run}"],
                          capture_output=True, text=True, env=env, timeout=300)


# (the closures below import what they use: Ray workers cannot import this test module)
def _build(zoo_root, models, base, tasks):
    def build(shared=None):
        from evomerge.evaluate import build_evaluator
        from evomerge.execute import Worker
        from evomerge.space import Space

        sp = Space("task_arithmetic", models, base_model=base, search=["weight"], granularity="per_model")
        return Worker(sp, build_evaluator("choice", data_dir=zoo_root, tasks=tasks, limit=20), shared=shared)
    return build


def _inputs(models, base):
    def inputs():
        from evomerge.execute import shared_inputs
        from evomerge.space import Space

        return shared_inputs(Space("task_arithmetic", models, base_model=base, search=["weight"],
                                   granularity="per_model"))
    return inputs


def test_ray_and_local_give_identical_results(zoo):
    from evomerge.execute import LocalExecutor
    from evomerge.execute.ray import RayExecutor
    from evomerge.types import Candidate

    z = zoo
    models, base = [str(p) for p in z.experts.values()], str(z.base)
    build = _build(str(z.root), models, base, z.tasks)
    rng = np.random.default_rng(0)
    cands = [Candidate(i, list(rng.uniform(0, 1, 4))) for i in range(6)]
    # both executors are built alike: from build_worker and the inputs to share
    lex = LocalExecutor(build, inputs=_inputs(models, base))
    local = {r.id: r for r in lex.map(cands)}

    def where_inputs_live(w):  # defined here so that Ray sends it by value
        """Inside a worker: what it read, where its live model came from, and the file that
        backs the memory of its resident inputs (anonymous memory would mean a copy)."""
        B = w.engine._groups[0][1].B
        p = B.data_ptr()
        backing = None
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                if lo <= p < hi:
                    backing = parts[5] if len(parts) > 5 else "(anonymous)"
        return w.engine.bytes_read, w.live_from, backing

    # the weights are read once, here, and reach both workers through the object store
    ex = RayExecutor(build, num_workers=2, cpus_per_worker=1, num_cpus=2, inputs=_inputs(models, base))
    from evomerge.execute import Executor

    assert isinstance(ex, Executor) and isinstance(lex, Executor)
    try:
        remote = {r.id: r for r in ex.map(cands)}
        import ray

        places = ray.get([a.call.remote(where_inputs_live) for a in ex.actors])
    finally:
        ex.close()
    for read, live_from, backing in places:  # nothing read, nothing copied: shared memory
        assert read == 0 and live_from == "resident inputs"
        assert backing is not None and backing != "(anonymous)", backing
    assert set(remote) == set(local)
    for i in local:
        assert remote[i].status == "ok" and remote[i].metrics == local[i].metrics
    assert {r.worker for r in remote.values()} <= {"ray-0", "ray-1"}


@pytest.mark.parametrize("mode", ["generational", "async"])
def test_a_search_through_executor_ray_from_the_command_line(zoo, tmp_path, mode):
    """Both ways of feeding the workers (async: a free worker asks for the next candidate),
    each with its workers' utilization in the summary."""
    import json

    run = tmp_path / "run"
    p = app([f"models.zoo_dir={zoo.root}", "executor=ray", "executor.num_workers=2", "executor.num_cpus=2",
             "eval.name=choice", "eval.limit=20", "space=per_model", "budget=8", f"executor.mode={mode}",
             *(["search=optuna_tpe"] if mode == "async" else [])], run)
    assert p.returncode == 0, p.stderr[-2000:]
    recs = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    search = [r for r in recs if r["kind"] == "search"]
    assert {r["worker"] for r in search} == {"ray-0", "ray-1"}
    assert sorted(r["id"] for r in search) == list(range(8))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["results"]["best"]["test"]["score"] >= 0
    assert summary["search"]["mode"] == mode and 0 < summary["search"]["utilization"] <= 1
    if mode == "async":  # each result told before the next candidate was asked, but for the first four
        assert sorted(r["generation"] for r in search) == [0, 0, 0, 0, 1, 2, 3, 4]  # (2 workers, prefetch 1)


def _fake_worker(marker_dir, slow=0.3):
    """A worker without models: candidate 3 kills its own process the first time it runs,
    candidate 5 every time; the others sleep a little and return their id as the score, and
    the sum of the shared inputs they were built with."""
    def build(shared):
        import os
        import signal
        import time
        from pathlib import Path

        from evomerge.types import Result

        class Fake:
            name = "fake"

            def evaluate(self, cand):
                if cand.id == 5 or (cand.id == 3 and not (Path(marker_dir) / "3").exists()):
                    (Path(marker_dir) / str(cand.id)).touch()
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(slow)
                return Result(cand.id, list(cand.x), "ok", score=float(cand.id),
                              metrics={"score": float(cand.id), "inputs": float(shared["w"].sum())},
                              split=cand.split, worker=self.name, kind=cand.kind)
        return Fake()
    return build


def test_dead_workers_are_replaced_and_every_candidate_gets_one_result(tmp_path):
    import ray

    from evomerge.execute.ray import RayExecutor
    from evomerge.types import Candidate

    made = []

    def inputs():  # put into the object store once; replacement workers adopt the same
        made.append(1)
        return {"w": np.arange(1000)}

    # three attempts: candidate 3 dies once by itself and may be the one the external kill hits
    ex = RayExecutor(_fake_worker(str(tmp_path)), num_workers=2, cpus_per_worker=1, num_cpus=2, max_attempts=3,
                     inputs=inputs)
    try:
        drawn = []

        def cands():  # drawn from only when a worker has room: the one it runs and one waiting (prefetch)
            for i in range(10):
                assert len(drawn) - len(results) < 4
                drawn.append(i)
                yield Candidate(i, [0.0])
        results = []
        for r in ex.map(cands()):
            results.append(r)
            if len(results) == 1:  # and one killed from outside, mid-evaluation
                ray.kill(ex.actors[0], no_restart=True)
        ids = [r.id for r in results]
        assert sorted(ids) == list(range(10))  # exactly one result each
        by_id = {r.id: r for r in results}
        assert by_id[3].status == "ok" and by_id[3].score == 3.0  # re-run on a replacement
        assert by_id[5].status == "failed" and "died 3 times" in by_id[5].error
        assert all(by_id[i].status == "ok" for i in range(10) if i != 5)
        assert ex.replaced >= 3 and len(ex.actors) == 2
        assert made == [1] and all(r.metrics["inputs"] == 499500 for r in results if r.status == "ok")
        # the replacements serve later calls too
        again = list(ex.map([Candidate(20, [0.0]), Candidate(21, [0.0])]))
        assert sorted(r.id for r in again) == [20, 21] and all(r.status == "ok" for r in again)
    finally:
        ex.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_search_joins_an_existing_cluster_by_address(zoo, tmp_path):
    """A head node started here (on 127.0.0.1, its own temp dir, token authentication off),
    joined through executor.address; its processes are stopped by their ids, found by that
    temp dir, never by a broad `ray stop`."""
    import json
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    ray_bin = shutil.which("ray") or os.path.join(os.path.dirname(sys.executable), "ray")
    temp = f"/tmp/evomerge-ray-{os.getpid()}-{_free_port()}"
    port = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0"}
    start = subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                            "--num-cpus=2", "--include-dashboard=false", f"--temp-dir={temp}",
                            "--disable-usage-stats"], capture_output=True, text=True, env=env, timeout=180)

    def ours() -> list[int]:
        """The head's processes: their command line names the temp dir, or (for those that
        retitle themselves, like the dashboard agent) one of their open files lies in it."""
        pids = []
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == os.getpid():
                continue
            try:
                cmd = open(f"/proc/{d}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
                mine = temp in cmd
                if not mine:
                    for fd in os.listdir(f"/proc/{d}/fd"):
                        try:
                            if os.readlink(f"/proc/{d}/fd/{fd}").startswith(temp):
                                mine = True
                                break
                        except OSError:
                            continue
            except OSError:
                continue
            if mine:
                pids.append(int(d))
        return pids

    try:
        assert start.returncode == 0, start.stderr[-2000:]
        run = tmp_path / "run"
        p = app([f"models.zoo_dir={zoo.root}", "executor=ray", f"executor.address=127.0.0.1:{port}",
                 "executor.num_workers=2", "eval.name=choice", "eval.limit=20", "space=per_model", "budget=6"],
                run, env={"RAY_AUTH_MODE": "disabled"})
        assert p.returncode == 0, p.stderr[-3000:]
        recs = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
        assert {r["worker"] for r in recs if r["kind"] == "search"} == {"ray-0", "ray-1"}
        assert (run / "summary.json").is_file()
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in ours():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.time() + 10
            while ours() and time.time() < deadline:
                time.sleep(0.2)
        shutil.rmtree(temp, ignore_errors=True)
    assert not ours()


def test_adamerging_trains_inside_a_ray_worker(zoo, tmp_path):
    import json

    run = tmp_path / "am"
    p = app([f"models.zoo_dir={zoo.root}", "executor=ray", "executor.num_workers=2", "executor.num_cpus=2",
             "search=adamerging_taskwise", "space=per_model", "search.steps=5", "search.lr=0.05", "eval.limit=20"],
            run)
    assert p.returncode == 0, p.stderr[-3000:]
    s = json.loads((run / "summary.json").read_text())
    assert s["strategy"] == "adamerging" and s["evaluations"] == 5
    recs = [json.loads(x) for x in (run / "trials.jsonl").read_text().splitlines()]
    assert {r["worker"] for r in recs if r["kind"] != "search"} <= {"ray-0", "ray-1"}  # finals through Ray
    assert (run / "report.md").is_file()


def test_a_bad_checkpoint_fails_in_the_driver_before_ray_starts(tmp_path):
    """The weights are read (and checked) once, in the driver: a NaN in a model is named
    there, and no Ray process is started for a search that cannot run."""
    import ray
    from safetensors.torch import load_file, save_file

    from evomerge.execute import shared_inputs
    from evomerge.execute.ray import RayExecutor
    from evomerge.merge.engine import MergeError
    from evomerge.space import Space
    from evomerge.testing import tiny_family

    fam = tiny_family(tmp_path / "f", n_experts=2)
    f = fam["expert_1"] / "model.safetensors"
    weights = load_file(f)
    name = "model.layers.0.mlp.up_proj.weight"
    weights[name][0, 0] = float("nan")
    save_file(weights, f, metadata={"format": "pt"})
    sp = Space("ties", [str(fam["expert_0"]), str(fam["expert_1"])], base_model=str(fam["base"]),
               search=["weight", "density"], granularity="per_layer")

    def never(shared=None):
        raise AssertionError("no worker should be built")

    assert not ray.is_initialized()
    with pytest.raises(MergeError, match=f"expert_1.*'{name}' contains NaN"):
        RayExecutor(never, num_workers=1, num_cpus=1, inputs=lambda: shared_inputs(sp))
    assert not ray.is_initialized()


def _listening(pids: set[int]) -> list[str]:
    """The local addresses (``ip:port``) on which any of ``pids`` listens (TCP) or is bound
    (UDP), read from /proc: each socket's inode is matched to the processes' open files."""
    import ipaddress
    import os

    inodes: dict[str, int] = {}
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = pid
        except OSError:
            continue

    def addr(hexaddr: str) -> str:
        ip, port = hexaddr.split(":")
        raw = bytes.fromhex(ip)
        # /proc prints each 32-bit word of the address in host (little-endian) order
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        a = ipaddress.ip_address(raw)
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
            a = a.ipv4_mapped
        return f"{a}:{int(port, 16)}"

    out = []
    for table, listen in (("tcp", "0A"), ("tcp6", "0A"), ("udp", None), ("udp6", None)):
        with open(f"/proc/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[9] in inodes and (listen is None or cols[3] == listen):
                    out.append(addr(cols[1]))
    return out


def _fake_driver_script(tmp_path):
    """A driver that starts a local Ray with two idle actors, prints ``ready`` and sleeps."""
    script = tmp_path / "driver.py"
    script.write_text(
        "import time\n"
        "import ray\n"
        "from evomerge.execute.ray import RayExecutor\n"
        "def build(shared=None):\n"
        "    class W:\n"
        "        name = 'w'\n"
        "    return W()\n"
        "ex = RayExecutor(build, num_workers=2, num_cpus=2, share_weights=False)\n"
        "ray.get([a.call.remote(lambda w: 1) for a in ex.actors])\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n")
    return script


def test_a_local_ray_listens_on_the_loopback_interface_only():
    """Every socket that the driver, the GCS, the raylet, its agents and the workers listen
    on is on 127.0.0.1: a local Ray is not reachable from another machine."""
    import ipaddress
    import os

    import ray

    from evomerge.execute import _reaper
    from evomerge.execute.ray import RayExecutor

    ex = RayExecutor(_fake_worker("/nonexistent"), num_workers=2, num_cpus=2, inputs=lambda: {"w": np.zeros(1)})
    try:
        ray.get([a.call.remote(lambda w: 1) for a in ex.actors])  # both workers up
        procs = {os.getpid(), *_reaper.descendants(os.getpid())}
        names = {open(f"/proc/{p}/comm").read().strip() for p in procs if os.path.exists(f"/proc/{p}")}
        assert {"gcs_server", "raylet"} <= names
        addrs = _listening(procs)
        assert len(addrs) >= 4, addrs  # the GCS, the raylet, its agents, the workers
        exposed = [a for a in addrs if not ipaddress.ip_address(a.rsplit(":", 1)[0]).is_loopback]
        assert not exposed, f"listening beyond the loopback interface: {exposed}"
        assert ray.util.get_node_ip_address() == "127.0.0.1"
    finally:
        ex.close()
    assert not ray.is_initialized()
    # the Ray it started is gone, and the switch it used is not left in this process
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def test_a_driver_killed_with_sigkill_leaves_no_ray_process_behind(tmp_path):
    """Ray's agents outlive a SIGKILLed driver by a minute on their own; the watcher ends
    every process the local Ray started within seconds."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from evomerge.execute import _reaper

    p = subprocess.Popen([sys.executable, str(_fake_driver_script(tmp_path))], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    procs = {}
    try:
        assert p.stdout.readline().strip() == "ready"
        procs = _reaper.descendants(p.pid)
        names = {open(f"/proc/{q}/comm").read().strip() for q in procs if os.path.exists(f"/proc/{q}")}
        assert {"gcs_server", "raylet"} <= names and len(procs) >= 6, names
        # all but the watcher hold files open in the session folder named for the driver's pid,
        # by which the watcher finds the orphans of a process that died before its next poll
        marked = {q for q in procs if _reaper.sessions(q, p.pid)}
        assert set(procs) - marked == {watcher_pid(procs)}, {_comm(q) for q in set(procs) - marked}
        assert len({f for q in procs for f in _reaper.sessions(q, p.pid)}) == 1
        t0 = time.monotonic()
        p.kill()
        p.wait()
        while time.monotonic() - t0 < 20 and any(_reaper._start_time(q) == t for q, t in procs.items()):
            time.sleep(0.2)
        left = {q: open(f"/proc/{q}/comm").read().strip() for q, t in procs.items()
                if _reaper._start_time(q) == t}
        assert not left, f"still running {time.monotonic() - t0:.0f} s after the driver died: {left}"
    finally:
        if p.poll() is None:
            p.kill()
        for q, t in procs.items():  # what a failing test would leave
            if _reaper._start_time(q) == t:
                os.kill(q, signal.SIGKILL)


def watcher_pid(procs) -> int:
    """The one process among a driver's descendants that runs the watcher."""
    found = [q for q in procs if b"_reaper.py" in open(f"/proc/{q}/cmdline", "rb").read()]
    assert len(found) == 1, found
    return found[0]


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def test_a_driver_killed_while_its_ray_starts_leaves_no_ray_process_behind(tmp_path):
    """The watcher starts before ray.init and records the driver's new processes as they
    appear: a SIGKILL while Ray is still starting (its GCS up, its agents starting) leaves
    nothing running either."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from evomerge.execute import _reaper

    p = subprocess.Popen([sys.executable, str(_fake_driver_script(tmp_path))], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    seen: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "gcs_server" not in {_comm(q) for q in seen}:
            seen.update(_reaper.descendants(p.pid))
            time.sleep(0.05)
        assert "gcs_server" in {_comm(q) for q in seen}
        time.sleep(1.0)  # the raylet and its agents come up now
        seen.update(_reaper.descendants(p.pid))
        t0 = time.monotonic()
        p.kill()
        p.wait()
        while time.monotonic() - t0 < 20 and any(_reaper._start_time(q) == t for q, t in seen.items()):
            time.sleep(0.2)
        left = {q: _comm(q) for q, t in seen.items() if _reaper._start_time(q) == t}
        assert not left, f"still running {time.monotonic() - t0:.0f} s after the driver died: {left}"
    finally:
        if p.poll() is None:
            p.kill()
        for q, t in seen.items():
            if _reaper._start_time(q) == t:
                os.kill(q, signal.SIGKILL)


def test_the_watcher_ends_processes_started_after_the_starter_died_and_orphans_in_its_session(tmp_path):
    """A process Ray starts after the driver died (the raylet starting an agent late), or
    whose parent exited before the watcher's next poll, was never recorded as a descendant and
    outlived the driver (2 agents were still running 20 s after a kill during Ray's start).
    The watcher now also follows what the recorded processes start after the driver is gone,
    and ends every process holding files open in their session folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from evomerge.execute import _reaper

    late, orphan = tmp_path / "late.pid", tmp_path / "orphan.pid"
    # as Ray's processes do, each child holds a file open in a session folder named for the
    # starter's pid; each waits for the starter to be gone, then starts a sleeper holding one
    # too: one child stays its parent (a late descendant), one exits at once (an orphan)
    child = ("import os, subprocess, sys, time\n"
             "starter, out, stay = int(sys.argv[1]), sys.argv[2], sys.argv[3] == 'stay'\n"
             "folder = os.path.join(os.path.dirname(out), f'session_2026_{starter}')\n"
             "os.makedirs(folder, exist_ok=True)\n"
             "log = open(os.path.join(folder, os.path.basename(out) + '.log'), 'w')\n"
             "while os.getppid() == starter: time.sleep(0.01)\n"
             "q = subprocess.Popen(['sleep', '600'], stdout=log)\n"
             "open(out, 'w').write(str(q.pid))\n"
             "if stay: time.sleep(600)\n")
    starter = tmp_path / "starter.py"
    starter.write_text(
        "import os, subprocess, sys, time\n"
        "from evomerge.execute import _reaper\n"
        "w = _reaper.watch(exclude=set(_reaper.descendants(os.getpid())))\n"
        f"for out, stay in (({str(late)!r}, 'stay'), ({str(orphan)!r}, 'go')):\n"
        f"    subprocess.Popen([sys.executable, '-c', {child!r}, str(os.getpid()), out, stay])\n"
        "time.sleep(0.6)\n"  # the watcher records both children, not their sleepers
        "print('ready', flush=True)\n"
        "time.sleep(600)\n")
    p = subprocess.Popen([sys.executable, str(starter)], stdout=subprocess.PIPE, text=True)
    pids: dict[int, str] = {}
    try:
        assert p.stdout.readline().strip() == "ready"
        p.kill()
        p.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (late.exists() and orphan.exists()):
            time.sleep(0.05)
        time.sleep(0.1)
        pids = {int(f.read_text()): _reaper._start_time(int(f.read_text())) for f in (late, orphan)}
        assert all(pids.values()), "the sleepers were started"
        t0 = time.monotonic()
        while time.monotonic() - t0 < _reaper.GRACE + 10 and any(_reaper._start_time(q) == t for q, t in pids.items()):
            time.sleep(0.2)
        left = [q for q, t in pids.items() if _reaper._start_time(q) == t]
        assert not left, f"still running {time.monotonic() - t0:.0f} s after the starter died: {left}"
    finally:
        if p.poll() is None:
            p.kill()
        for q, t in pids.items():
            if t and _reaper._start_time(q) == t:
                os.kill(q, signal.SIGKILL)


def test_a_ray_search_killed_at_random_gives_the_trial_log_of_an_uninterrupted_one(zoo, tmp_path):
    """Chaos: a CMA-ES search through a local Ray whose workers are SIGKILLed at random
    moments (mid-evaluation, as they are always busy) and whose driver is SIGKILLed twice and
    resumed, ends with the trial log of a search that nothing interrupted: the same
    candidates, genomes, scores and final evaluations, each exactly once. And nothing of the
    killed runs' Ray is left running."""
    import json
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    from evomerge.execute import _reaper

    args = [f"models.zoo_dir={zoo.root}", "executor=ray", "executor.num_workers=2", "executor.num_cpus=2",
            "executor.max_attempts=10", "eval.name=choice", "eval.limit=20", "space=per_model", "budget=40"]

    def records(run) -> dict:
        out = {}
        for line in (run / "trials.jsonl").read_text().splitlines():
            r = json.loads(line)
            key = (r["kind"], r["id"], r["split"])
            assert key not in out, f"{key} recorded twice"
            out[key] = {k: r[k] for k in ("x", "score", "status", "metrics", "generation", "error")}
        return out

    ref = tmp_path / "uninterrupted"
    p = app(args, ref)
    assert p.returncode == 0, p.stderr[-3000:]
    expect = records(ref)
    searched = sum(k[0] == "search" for k in expect)
    assert searched >= 40

    seed = random.randrange(2**32)
    rng = random.Random(seed)
    run = tmp_path / "chaos"
    log = run / "trials.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    everything: dict[int, str] = {}  # every Ray process any driver started, to check at the end
    kills = {"worker": 0, "driver": 0}
    killed: set[int] = set()

    def count() -> int:
        try:
            return sum('"kind": "search"' in x for x in log.read_text().splitlines())
        except FileNotFoundError:
            return 0

    # the search-record counts at which to kill a worker, and the driver (twice: then it finishes)
    plan = sorted(rng.sample(range(2, searched - 4), 7))
    driver_at = {plan[2], plan[4]}
    for attempt in range(3):
        cmd = [sys.executable, "-m", "evomerge.app", *args, "progress=false", f"hydra.run.dir={run}"]
        if attempt:
            cmd.append("resume=true")
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        kills["worker"] = 0  # of this driver
        try:
            while p.poll() is None:
                everything.update(_reaper.descendants(p.pid))
                due = [n for n in plan if count() >= n]
                if not due:
                    time.sleep(0.01)
                    continue
                if due[0] in driver_at:
                    plan.remove(due[0])
                    p.kill()
                    kills["driver"] += 1
                    break
                workers = [q for q in _reaper.descendants(p.pid)
                           if _comm(q).startswith("ray::_Actor") and q not in killed]
                if workers:  # (none while the Ray of a resumed search starts: wait for them)
                    plan.remove(due[0])
                    victim = rng.choice(workers)
                    killed.add(victim)
                    os.kill(victim, signal.SIGKILL)
                    kills["worker"] += 1
            err = p.communicate(timeout=300)[1]
        finally:
            if p.poll() is None:
                p.kill()
        if p.returncode == 0:
            break
        assert p.returncode == -signal.SIGKILL, err[-3000:]
    assert p.returncode == 0, f"seed {seed}: the search did not finish after two resumes"
    print(f"seed {seed}: {kills}")
    # the last driver's workers were killed twice, and it said so
    assert kills["driver"] == 2 and kills["worker"] == 2, (seed, kills)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["workers_replaced"] == 2 and err.count("was replaced; the candidate runs again") == 2, err
    got = records(run)
    assert set(got) == set(expect), f"seed {seed}: {set(got) ^ set(expect)}"
    for key, r in expect.items():
        assert got[key] == r, f"seed {seed}: {key} differs: {got[key]} != {r}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_reaper._start_time(q) == t for q, t in everything.items()):
        time.sleep(0.2)
    left = [q for q, t in everything.items() if _reaper._start_time(q) == t]
    for q in left:
        os.kill(q, signal.SIGKILL)
    assert not left, f"Ray processes of the killed drivers still running: {left}"


def test_a_worker_on_shared_weights_scores_the_zoo_as_one_that_read_the_checkpoints(zoo):
    """The default quickstart (a local Ray, shared weights) scored every source and every
    candidate 0, silently: the workers' live model, built from the config and the shared
    weights, took the config's generation defaults (stop token 2) instead of the zoo's
    generation config (stop token 47), so no answer ended where the evaluator reads it."""
    import numpy as np

    from evomerge.evaluate import build_evaluator
    from evomerge.execute import Worker, shared_inputs
    from evomerge.space import Space
    from evomerge.types import Candidate

    sp = Space("ties", [str(p) for p in zoo.experts.values()], base_model=str(zoo.base),
               search=["weight", "density"], granularity="per_layer")
    ev = build_evaluator("accuracy", data_dir=zoo.root, tasks=zoo.tasks, limit=20)
    own, shared = Worker(sp, ev), Worker(sp, ev, shared=shared_inputs(sp))
    assert shared.live_from == "resident inputs"
    # where answers end: the zoo's stop token, as loading the model gives it
    assert shared.model.generation_config.eos_token_id == own.model.generation_config.eos_token_id != \
        shared.model.config.eos_token_id
    assert shared.model.generation_config.to_diff_dict() == own.model.generation_config.to_diff_dict()
    x = list(np.full(len(sp), 0.6))
    for i, src in enumerate([*map(str, zoo.experts.values()), None]):
        a, b = (w.evaluate(Candidate(i, x, split="search", source=src)) for w in (own, shared))
        assert a.status == b.status == "ok" and a.metrics == b.metrics, (src, a.metrics, b.metrics)


def test_a_worker_that_cannot_be_built_is_an_error_before_any_candidate(tmp_path):
    """The executor waits for its workers to be built (so a search's clock and its workers'
    utilization start with workers that can score): one that cannot be built is an error
    naming its cause, and the local Ray it started is stopped."""
    import ray

    from evomerge.execute.ray import RayExecutor

    def build(shared=None):
        raise FileNotFoundError(f"no checkpoint at {tmp_path}/model.safetensors")

    with pytest.raises(RuntimeError, match=r"could not be built: FileNotFoundError: no checkpoint at .*model\."):
        RayExecutor(build, num_workers=2, num_cpus=2)
    assert not ray.is_initialized()
