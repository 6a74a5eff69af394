"""Ends a local Ray's processes when the process that started them dies without stopping it.

A local Ray's GCS and raylet share the fate of the process that started them, but its
agents (the dashboard and runtime-env agents) outlive a SIGKILLed starter by about a minute
(they report the raylet's death to the GCS, which is already gone, and wait out that call's
timeout). ``watch`` starts this module as a small child process, before ``ray.init``: while
the starter lives it records the starter's new descendants (pid and start time) every
``POLL`` seconds; once the starter is gone (its end of a pipe closes: a clean exit, a crash
or a SIGKILL alike), after a grace period for Ray's own shutdown, it kills those still
alive. A pid is killed only when its start time is still the one recorded, so a reused pid
is never touched.

A process that appears between two polls, or after the starter died (an agent the raylet
starts just then), is no descendant the watcher could still see once its parent is gone too:
every process of a local Ray holds files open in that Ray's session folder, whose name ends
in the starter's pid (``session_<time>_<starter pid>``). The watcher learns that folder from
the processes it recorded, and once the starter is gone it also ends every process holding a
file open in it. Linux only (it reads /proc); elsewhere nothing is watched.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

__all__ = ["descendants", "watch"]

GRACE = 5.0  # seconds Ray gets to stop by itself


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or
    None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if rest[0] in ("Z", "X") else rest[19]


def descendants(pid: int) -> dict[int, str]:
    """pid -> start time for every living descendant of ``pid``."""
    out: dict[int, str] = {}
    todo = [pid]
    while todo:
        p = todo.pop()
        kids = []
        try:
            tasks = os.listdir(f"/proc/{p}/task")  # every thread's children, not only the main one's
        except OSError:
            continue
        for tid in tasks:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids += [int(c) for c in f.read().split()]
            except OSError:
                continue
        for c in kids:
            t = _start_time(c)
            if t is not None:
                out[c] = t
                todo.append(c)
    return out


def _open_paths(pid: int) -> list[str]:
    """The paths of the files ``pid`` holds open (those readable to this user)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for fd in fds:
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    return out


def sessions(pid: int, starter: int) -> set[str]:
    """The Ray session folders of ``starter`` that ``pid`` holds files open in: a path's
    folder named ``session_..._<starter>``."""
    out = set()
    suffix = f"_{starter}"
    for path in _open_paths(pid):
        parts = path.split("/")
        for i, part in enumerate(parts):
            if part.startswith("session_") and part.endswith(suffix):
                out.add("/".join(parts[:i + 1]))
                break
    return out


def holding(folders: set[str], skip: set[int]) -> dict[int, str]:
    """pid -> start time for every living process (not in ``skip``) holding a file open in
    one of ``folders``."""
    out: dict[int, str] = {}
    if not folders:
        return out
    prefixes = tuple(f + "/" for f in folders)
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) in skip:
            continue
        if any(path.startswith(prefixes) for path in _open_paths(int(name))):
            t = _start_time(int(name))
            if t is not None:
                out[int(name)] = t
    return out


def watch(exclude: set[int] | None = None):
    """Start the watcher of this process's descendants; returns it (a ``Popen``), or None
    where /proc is missing. Until this process is gone it records, every ``POLL`` seconds,
    every descendant that is not in ``exclude`` (those that were there before: start it
    before ``ray.init``, so that a kill during the start is covered too); then it ends them,
    and every process holding files open in their Ray session folder. It ends by itself once
    this process is gone and so are they."""
    if not os.path.isdir("/proc/self"):
        return None
    # run as a file, not as a module of the package: it needs the standard library only
    return subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                            env={**os.environ, "EVOMERGE_REAP": json.dumps({"parent": os.getpid(),
                                                                            "exclude": sorted(exclude or ())})})


POLL = 0.2


def _main() -> None:
    import select

    # a Ctrl-C or a SIGTERM for the whole process group is the starter's to handle
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    spec = json.loads(os.environ["EVOMERGE_REAP"])
    parent = int(spec["parent"])
    # the starter itself is never ended (after a clean stop it lives on, its Ray logs open)
    exclude = set(spec["exclude"]) | {os.getpid(), parent}
    procs: dict[int, str] = {}
    folders: set[str] = set()  # the starter's Ray session folders, learnt from what it started

    def record(found: dict[int, str]) -> None:
        for p, t in found.items():
            if p not in exclude and procs.get(p) != t:
                procs[p] = t
                folders.update(sessions(p, parent))

    while True:  # until the starter is gone (its end of the pipe closes)
        record(descendants(parent))
        if not folders:  # a process opens its session's files a moment after it starts
            for p in procs:
                folders.update(sessions(p, parent))
        ready, _, _ = select.select([sys.stdin.buffer], [], [], POLL)
        if ready and not os.read(sys.stdin.buffer.fileno(), 65536):
            break

    def alive() -> dict[int, str]:
        # what the recorded processes started meanwhile is theirs too (an agent the raylet
        # starts late), and so is whatever holds their Ray session open (an orphan of theirs)
        for p in list(procs):
            if _start_time(p) == procs[p]:
                record(descendants(p))
                folders.update(sessions(p, parent))
        record(holding(folders, exclude))
        return {p: t for p, t in procs.items() if _start_time(p) == t}

    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline:
        procs = alive()
        if not procs:
            return
        time.sleep(0.25)
    for _ in range(20):  # a dying parent may start one more: end them until none is left
        procs = alive()
        if not procs:
            return
        for p, t in procs.items():
            if _start_time(p) == t:
                try:
                    os.kill(p, signal.SIGKILL)
                except OSError:
                    pass
        time.sleep(0.1)


if __name__ == "__main__":
    _main()
