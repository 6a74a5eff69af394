"""Executors: ``map(candidates)`` yields each candidate's ``Result`` as it completes."""

from .local import LocalExecutor
from .worker import Worker

__all__ = ["LocalExecutor", "Worker"]
