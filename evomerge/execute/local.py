"""The in-process executor: one worker, candidates one after another."""

from __future__ import annotations

from typing import Iterable, Iterator

from ..search.base import Candidate, Result

__all__ = ["LocalExecutor"]


class LocalExecutor:
    """Runs candidates on one in-process ``Worker`` (tests, debugging, single-device runs)."""

    def __init__(self, worker):
        self.worker = worker

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
