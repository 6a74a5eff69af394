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
from typing import Any, Iterator

from .types import Result

__all__ = ["TrialLog", "atomic_write", "save_state", "load_state", "StateError", "RunLock", "check_record",
           "RECORD_FILE"]

RECORD_FILE = "run.json"  # the configuration a run directory was started with


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
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # (ValueError: also a number of 5,000 digits)
        raise StateError(f"{path}: not a JSON state file ({type(e).__name__}: {str(e)[:200]}); it cannot be "
                         "resumed from") from None
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
        """The logged results in order. A line that is not a result (anywhere but a torn last
        line, which ``_repair`` drops) is an error naming the file and line: guessing past it
        could resume a search that is not the one logged."""
        if not self.path.is_file():
            return
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    d = json.loads(raw.decode("utf-8"))
                    if not isinstance(d, dict) or not {"id", "x", "status"} <= set(d):
                        raise ValueError("not a trial record")
                    x = d["x"]
                    if not isinstance(d["id"], int) or isinstance(d["id"], bool) or not isinstance(x, list) \
                            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
                        raise ValueError("its id must be a whole number and its x a list of numbers")
                    yield Result.from_json(d)
                except (ValueError, TypeError, UnicodeDecodeError) as e:
                    raise StateError(f"{self.path}:{lineno}: not a trial record ({e}); the log was changed by "
                                     "something other than evomerge, and a search cannot be resumed from it") from None

    def results(self) -> list[Result]:
        return list(self)


class RunLock:
    """An exclusive lock on a run directory while a process works in it (``.lock``, an
    advisory ``flock``, released by the system when the process ends, however it ends).
    A second process is refused, with the holder's process id and host."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl
        import socket

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise StateError(f"{self.path.parent} is in use by {holder}; wait for it to finish or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock; the file stays (removing it would race)
            self._fd = None


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): d}


def check_record(run_dir: str | Path, record: dict[str, Any], resume: bool) -> None:
    """Keep ``record`` (what a search's results depend on: its models, method, space,
    strategy, evaluator, seed, ...) in ``run_dir/run.json`` when a search starts; on resume,
    refuse a record that differs, naming the keys, since the trial log and the strategy's
    state would then mix two searches."""
    path = Path(run_dir) / RECORD_FILE
    if not resume or not path.is_file():
        if resume and (Path(run_dir) / "trials.jsonl").is_file():
            raise StateError(f"{path} is missing: the run directory does not say what search it holds, so it "
                             "cannot be resumed safely")
        atomic_write(path, json.dumps(_plain(record, ""), indent=2, sort_keys=True, allow_nan=True) + "\n")
        return
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise StateError(f"{path}: not JSON ({e})") from None
    old, new = _flat(saved), _flat(json.loads(json.dumps(_plain(record, ""), allow_nan=True)))
    diff = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    if diff:
        shown = "; ".join(f"{k}: {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in diff[:6])
        more = f" (and {len(diff) - 6} more)" if len(diff) > 6 else ""
        raise StateError(f"{run_dir} holds a search with another configuration; resuming it with this one would mix "
                         f"the two: {shown}{more}. Resume with the original settings, or start a new run directory")
