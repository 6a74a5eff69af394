"""The run directory and its append-only trial log: the source of truth of a search.

``<run_dir>/trials.jsonl`` gets one JSON line per finished evaluation, flushed and fsynced
before the search goes on; ``<run_dir>/strategy.json`` holds the strategy's state and the
generation in flight as plain JSON (nothing a run directory holds is read back through
pickle), replaced atomically. A search that crashes or is stopped resumes from
these two files: finished evaluations are read back, never re-run, and the strategy continues
exactly where it was.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

if TYPE_CHECKING:  # the search package imports this module: Result is imported where it is used
    from .search.base import Result

__all__ = ["TrialLog", "atomic_write", "save_state", "load_state", "StateError"]


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


class StateError(ValueError):
    """A run directory's saved state that cannot be resumed from; the message names the file."""


def _plain(obj: Any, where: str) -> Any:
    """``obj`` checked to be JSON data (dicts with string keys, lists, strings, finite or
    non-finite floats, ints, bools, None); tuples become lists. Anything else is a bug of the
    strategy that produced it, named by its place."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"state {where}: key {k!r} is not a string")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    raise TypeError(f"state {where}: {type(obj).__name__} is not plain data (JSON)")


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` (plain data only) as JSON, atomically. Floats keep every bit
    (``repr`` round-trips), and NaN/inf are written as JSON's common extension."""
    atomic_write(path, json.dumps(_plain(state, ""), allow_nan=True) + "\n")


def load_state(path: str | Path) -> dict[str, Any] | None:
    """The saved state, or ``None`` when there is none. Only JSON is read: a pickled state
    file (written by an older evomerge, or put there by someone else) is refused, since
    unpickling runs code."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        state = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StateError(f"{path}: not a JSON state file ({e}); it cannot be resumed from") from None
    if not isinstance(state, dict):
        raise StateError(f"{path}: the state is a JSON {type(state).__name__}, not an object")
    return state


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
        from .search.base import Result

        if not self.path.is_file():
            return
        with open(self.path) as f:
            for line in f:
                if line.strip():
                    yield Result.from_json(json.loads(line))

    def results(self) -> list[Result]:
        return list(self)
