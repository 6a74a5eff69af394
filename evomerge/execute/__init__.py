"""Executors: ``map(candidates)`` yields each candidate's ``Result`` as it completes.

Every executor is built alike, ``Executor(build_worker, inputs=...)``: ``build_worker``
makes a ``Worker`` where the executor runs it (in this process, or inside each Ray actor),
``inputs`` gives the weights to share among workers (read once, by the caller's process).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Protocol, runtime_checkable

from ..types import Candidate, Result
from .local import LocalExecutor
from .worker import Worker, shared_inputs

__all__ = ["Executor", "LocalExecutor", "Worker", "shared_inputs"]


@runtime_checkable
class Executor(Protocol):
    """Scores candidates on its workers; a failure comes back as a failed ``Result``, and
    every candidate given to ``map`` gets exactly one result."""

    @property
    def num_workers(self) -> int: ...

    def map(self, candidates: Iterable[Candidate]) -> Iterator[Result]: ...

    def run_on_worker(self, fn: Callable): ...

    def close(self) -> None: ...
