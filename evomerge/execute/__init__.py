"""Executors: ``map(candidates)`` yields each candidate's ``Result`` as it completes."""

from .local import LocalExecutor
from .worker import Worker, shared_inputs

__all__ = ["LocalExecutor", "Worker", "shared_inputs"]
