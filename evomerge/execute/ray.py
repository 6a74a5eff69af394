"""The Ray executor: one actor per worker slot, each holding its own ``Worker``.

A local Ray is started when none is running: dashboard off, every process of it listening
on 127.0.0.1 only, and its processes ended by a watcher should the driver die without
stopping it (a SIGKILL). With ``address`` (``auto``, ``ray://host:port``) an existing cluster
is joined, and it listens where it was started to. Each actor builds
its worker once from ``build_worker`` (a picklable callable returning a ``Worker``), pins
torch to its CPU share, and then scores candidates as they come: ``map`` keeps every actor
busy and yields results in completion order.

Model weights are read once, by the driver, and reach the actors through Ray's object
store (``share_weights``, on by default): ``inputs()`` returns them as numpy arrays, which
actors on one node map from shared memory without a copy (an actor on a GPU copies them
to its device once), so no actor reads a checkpoint (from a network file system, say) and a
node holds one copy of them, however many actors it runs.

A worker that dies (killed, out of memory) is replaced by a new actor and its candidate is
run again; a candidate whose worker dies ``max_attempts`` times is recorded as failed with
the error, and the search goes on. Every candidate given to ``map`` gets exactly one result. ``map`` draws
a candidate from its iterable only when a worker has room for it (the one it runs and
``prefetch`` waiting behind it), so a search that asks for its next candidate only then
(``executor.mode=async``) proposes it knowing every result but those in flight.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Callable, Iterable, Iterator

from ..types import Candidate, Result
from . import _reaper

__all__ = ["RayExecutor"]


# Ray (2.x) binds a node to the address it resolves for it, and resolves 127.0.0.1 to the
# machine's outward address unless clusters are off, as on Windows and macOS: this switch
# is read by the driver (``ray_constants``) and, from the environment, by every process the
# local Ray starts. tests/test_ray.py checks every listening socket of a local Ray.
_CLUSTERS_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def _start_local_ray(num_cpus: int | None):
    """A local Ray bound to 127.0.0.1 (its GCS, raylet, agents and workers listen on the
    loopback interface only), with its dashboard off; returns the watcher that ends its
    processes should this process die without stopping it (``_reaper``)."""
    import ray
    from ray._private import ray_constants

    watcher = _reaper.watch(exclude=set(_reaper.descendants(os.getpid())))  # before: a kill mid-start is covered
    saved = os.environ.get(_CLUSTERS_SWITCH), getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_CLUSTERS_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    finally:
        if saved[0] is None:
            os.environ.pop(_CLUSTERS_SWITCH, None)
        else:
            os.environ[_CLUSTERS_SWITCH] = saved[0]
        if saved[1] is None:
            vars(ray_constants).pop("ENABLE_RAY_CLUSTER", None)
        else:
            ray_constants.ENABLE_RAY_CLUSTER = saved[1]
    return watcher


def _failed(cand: Candidate, error: str) -> Result:
    return Result(id=cand.id, x=list(cand.x), status="failed", split=cand.split, error=error,
                  generation=cand.generation, kind=cand.kind, fidelity=cand.fidelity)


class _Actor:
    def __init__(self, build_worker: Callable, threads: int, name: str, shared=None):
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.worker = build_worker() if shared is None else build_worker(shared)
        self.worker.name = name

    def ready(self) -> str:
        return self.worker.name

    def evaluate(self, cand: Candidate) -> Result:
        return self.worker.evaluate(cand)

    def call(self, fn: Callable):
        return fn(self.worker)


class RayExecutor:
    """Args:
        build_worker: called once inside each actor to make its ``Worker``.
        num_workers: actors (default: one per GPU, else one per ``cpus_per_worker`` CPUs).
        cpus_per_worker, gpus_per_worker: each actor's resources (and torch thread count).
        address: join an existing cluster (``auto``, ``ray://host:port``); default: a local Ray.
        max_attempts: a candidate whose worker dies this many times is recorded as failed.
        inputs: called once, here in the driver, for what every worker is built from
            (``build_worker(inputs())``): the models' weights, put once into the object store.
        share_weights: use ``inputs``; when false, each worker reads the checkpoints itself
            (``build_worker()``).
        prefetch: candidates sent to each worker beyond the one it runs, waiting there, so
            it starts the next as soon as it finishes instead of after a round trip through
            this process (which logs, tells and asks in between); 0 sends one at a time.
    """

    def __init__(self, build_worker: Callable, num_workers: int | None = None, cpus_per_worker: int = 1,
                 gpus_per_worker: float = 0, address: str | None = None, num_cpus: int | None = None,
                 max_attempts: int = 3, inputs: Callable | None = None, share_weights: bool = True,
                 prefetch: int = 1):
        import ray

        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
            raise ValueError(f"prefetch must be a whole number of candidates (0 or more), not {prefetch!r}")
        self.prefetch = prefetch
        self.max_attempts = max(1, int(max_attempts))
        self.replaced = 0  # workers started again after dying
        # the weights first: a bad checkpoint fails here, before any Ray process is started
        payload = inputs() if share_weights and inputs is not None else None

        self._reaper = None
        if not ray.is_initialized():
            if address:
                ray.init(address=address, include_dashboard=False, log_to_driver=False)
            else:
                self._reaper = _start_local_ray(num_cpus)
            self._owns_ray = True
        else:
            self._owns_ray = False
        res = ray.cluster_resources()
        if num_workers is None:
            kind, share = ("GPU", gpus_per_worker) if gpus_per_worker else ("CPU", cpus_per_worker)
            have = res.get(kind, 0)
            num_workers = max(1, int(have // share))
        # a replacement actor adopts the same stored inputs: nothing is read or put again
        self.shared = ray.put(payload) if payload is not None else None
        del payload
        self._new = lambda i: ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0)(
            _Actor).remote(build_worker, cpus_per_worker, f"ray-{i}", self.shared)
        self.actors = [self._new(i) for i in range(num_workers)]
        self._await_workers()

    def _await_workers(self) -> None:
        """Wait until every actor has built its worker (models placed, evaluator ready), so a
        search's clock starts with workers that can score, and a worker that cannot be built
        is an error here, with its cause, rather than a candidate's failure later."""
        import ray

        from ray.exceptions import RayError

        try:
            ray.get([a.ready.remote() for a in self.actors])
        except RayError as e:
            self.close()
            lines = [x for x in str(e).splitlines() if x.strip()]
            cause = next((x for x in reversed(lines) if "Error" in x), lines[-1] if lines else type(e).__name__)
            raise RuntimeError(f"a Ray worker could not be built: {cause.strip()[:500]}") from None

    @property
    def num_workers(self) -> int:
        return len(self.actors)

    def map(self, candidates: Iterable[Candidate]) -> Iterator[Result]:
        import ray

        from ray.exceptions import RayActorError

        source = iter(candidates)  # drawn from only when a worker is free (an asynchronous search asks then)
        todo: list[tuple[Candidate, int]] = []  # candidates whose worker died, with their attempts so far
        running = {}  # ref -> (slot, candidate, attempts including this one)
        queued: dict[int, list] = {i: [] for i in range(len(self.actors))}  # each actor's refs, in order
        # a slot per candidate an actor may hold: the one it runs and ``prefetch`` waiting behind
        # it, so it starts the next the moment it finishes (not after a round trip to here)
        idle = [i for _ in range(1 + self.prefetch) for i in range(len(self.actors))][::-1]
        more = True
        while True:
            while idle and (todo or more):
                cand, tried = todo.pop() if todo else (next(source, None), 0)
                if cand is None:
                    more = False
                    break
                slot = idle.pop()
                ref = self.actors[slot].evaluate.remote(cand)
                running[ref] = (slot, cand, tried + 1)
                queued[slot].append(ref)
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            for ref in ready:
                if ref not in running:  # (its worker died, and it was dealt with then)
                    continue
                slot, cand, _ = running[ref]
                try:
                    res = ray.get(ref)
                except RayActorError as e:  # the worker died: replace it, run its candidates again
                    yield from self._replace(slot, queued, running, todo, idle, e)
                    continue
                except Exception as e:  # noqa: BLE001 - any other error is this candidate's failure
                    res = _failed(cand, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
                del running[ref]
                queued[slot].remove(ref)
                idle.append(slot)
                yield res

    def _replace(self, slot, queued, running, todo, idle, error):
        """A dead worker's replacement; the candidate it ran (the first of its queue) runs
        again unless it has had ``max_attempts``, when it is yielded as failed; the ones
        waiting behind it never started, and run again without an attempt counted."""
        import ray

        ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._new(slot)
        self.replaced += 1
        refs, queued[slot] = queued[slot], []
        for i, ref in enumerate(refs):
            _, cand, tried = running.pop(ref)
            idle.append(slot)
            if i:  # waiting behind the one that ran
                todo.append((cand, tried - 1))
                continue
            again = tried < self.max_attempts
            print(f"evomerge: worker ray-{slot} died while scoring candidate {cand.id} and was replaced; the "
                  "candidate " + ("runs again" if again else "is recorded as failed"), file=sys.stderr, flush=True)
            if again:
                todo.append((cand, tried))
            else:
                yield _failed(cand, f"its worker died {tried} times; last: "
                                    f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")

    def run_on_worker(self, fn: Callable):
        """``fn(worker)`` inside the first actor, where its models are (AdaMerging trains
        there); its return value comes back here."""
        import ray

        return ray.get(self.actors[0].call.remote(fn))

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        self.shared = None
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
        if self._reaper is not None:  # Ray has stopped: the watcher finds nothing left to end
            self._reaper.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._reaper.wait(timeout=_reaper.GRACE + 5)
            self._reaper = None
