"""The run directory and its append-only trial log: the source of truth of a search.

``<run_dir>/trials.jsonl`` gets one JSON line per finished evaluation, flushed and fsynced
before the search goes on; ``<run_dir>/strategy.pkl`` holds the strategy's state and the
generation in flight, replaced atomically. A search that crashes or is stopped resumes from
these two files: finished evaluations are read back, never re-run, and the strategy continues
exactly where it was.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any, Iterator

from .search.base import Result

__all__ = ["TrialLog", "atomic_write", "save_state", "load_state"]


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write a file through a temporary sibling, fsynced, then renamed over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(tmp, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, pickle.dumps(state))


def load_state(path: str | Path) -> dict[str, Any] | None:
    """The saved state, or ``None`` when there is none. (The file is the search's own: it is
    written by ``save_state`` in the run directory, never taken from elsewhere.)"""
    path = Path(path)
    if not path.is_file():
        return None
    return pickle.loads(path.read_bytes())


class TrialLog:
    """Append-only JSON-lines log of finished evaluations."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair()

    def _repair(self) -> None:
        """Drop a torn last line (a crash in the middle of a write)."""
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            with open(self.path, "r+b") as f:
                f.truncate(len(keep))

    def append(self, result: Result) -> None:
        line = json.dumps(result.to_json(), sort_keys=True) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def __iter__(self) -> Iterator[Result]:
        if not self.path.is_file():
            return
        with open(self.path) as f:
            for line in f:
                if line.strip():
                    yield Result.from_json(json.loads(line))

    def results(self) -> list[Result]:
        return list(self)
