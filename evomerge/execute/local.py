"""The in-process executor: one worker, candidates one after another."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from ..types import Candidate, Result

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Runs candidates on one in-process ``Worker`` (tests, debugging, single-device runs).

    Built as every executor is, from ``build_worker`` (called here, once) and an optional
    ``inputs`` (unused: the one worker reads the checkpoints itself, with no copy to share);
    a ``Worker`` already built is taken as it is.
    """

    def __init__(self, build_worker: Callable | object, inputs: Callable | None = None):
        built = hasattr(type(build_worker), "evaluate")  # a Worker (not its class, nor a function)
        self.worker = build_worker if built else build_worker()

    @property
    def num_workers(self) -> int:
        return 1

    def map(self, candidates: Iterable[Candidate]) -> Iterator[Result]:
        for c in candidates:
            yield self.worker.evaluate(c)

    def run_on_worker(self, fn):
        """``fn(worker)`` where the worker is (here: in this process)."""
        return fn(self.worker)

    def close(self) -> None:
        pass
