"""Ends a local Ray's processes when the process that started them dies without stopping it.

A local Ray's GCS and raylet share the fate of the process that started them, but its
agents (the dashboard and runtime-env agents) outlive a SIGKILLed starter by about a minute
(they report the raylet's death to the GCS, which is already gone, and wait out that call's
timeout). ``watch`` starts this module as a small child process given the processes that
``ray.init`` created, each as (pid, start time); it waits until the starter is gone (its
end of a pipe closes: a clean exit, a crash or a SIGKILL alike) and then, after a grace
period for Ray's own shutdown, kills those of them that are still alive. A pid is killed
only when its start time is still the one recorded, so a reused pid is never touched.
Linux only (it reads /proc); elsewhere nothing is watched.
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
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(c) for c in f.read().split()]
        except OSError:
            continue
        for c in kids:
            t = _start_time(c)
            if t is not None:
                out[c] = t
                todo.append(c)
    return out


def watch(procs: dict[int, str]):
    """Start the watcher for ``procs`` (pid -> start time); returns it (a ``Popen``) or None
    where /proc is missing. It ends by itself once this process is gone and so are they."""
    if not procs or not os.path.isdir("/proc/self"):
        return None
    # run as a file, not as a module of the package: it needs the standard library only
    return subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True,
                            env={**os.environ, "EVOMERGE_REAP": json.dumps(procs)})


def _main() -> None:
    # a Ctrl-C or a SIGTERM for the whole process group is the starter's to handle
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    procs = {int(p): t for p, t in json.loads(os.environ["EVOMERGE_REAP"]).items()}
    while sys.stdin.buffer.read(65536):  # until the starter is gone
        pass
    deadline = time.monotonic() + GRACE
    while time.monotonic() < deadline:
        procs = {p: t for p, t in procs.items() if _start_time(p) == t}
        if not procs:
            return
        time.sleep(0.1)
    for p, t in procs.items():
        if _start_time(p) == t:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    _main()
