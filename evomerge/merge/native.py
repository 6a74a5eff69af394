"""Fused CPU kernels (``_kernels.c``), built on first use with the system C compiler.

The one-shot merge of the task-arithmetic family (linear, task arithmetic, TIES, DARE,
breadcrumbs) spends its time in elementwise passes over every tensor. In torch each pass
is a separate operation over a chunk; these kernels do one pass per tensor, reading each
input once, and give the same bits as the torch code they replace (tests compare them).

The shared library is compiled once per machine into the cache folder
(``$EVOMERGE_CACHE``, else ``$XDG_CACHE_HOME/evomerge``, else ``~/.cache/evomerge``) and
loaded with ``ctypes``; the calls release the GIL, so two tensors can be merged at once on
two threads. Without a C compiler, or with ``EVOMERGE_NATIVE=0``, everything runs on the
torch path instead (slower, same results).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["available", "library", "active", "disabled", "cache_dir", "DTYPE_CODES", "Model", "Block",
           "merge_block"]

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_kernels.c")
FLAGS = ["-O3", "-std=gnu11", "-ffp-contract=off", "-fPIC", "-shared"]

MASK_ALL, MASK_CUT, MASK_RANDOM, MASK_NONE = 0, 1, 2, 3
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class Model(ctypes.Structure):
    """One model's input to a tensor of a block (mirrors ``em_model``)."""

    _fields_ = [
        ("ptr", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("kind", ctypes.c_int32),
        ("coef", ctypes.c_float),
        ("weight", ctypes.c_float),
        ("has_start", ctypes.c_int32),
        ("has_stop", ctypes.c_int32),
        ("start_v", ctypes.c_float),
        ("stop_v", ctypes.c_float),
        ("start_pos", ctypes.c_int64),
        ("stop_pos", ctypes.c_int64),
        ("rng", ctypes.c_uint64 * 4),
        ("thresh", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
    ]


_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


def cache_dir() -> Path:
    root = os.environ.get("EVOMERGE_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "evomerge"


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), (sysconfig.get_config_var("CC") or "").split(" ")[0], "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _machine_id() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    parts = [platform.machine(), platform.system()]
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "model name", "Features", "CPU part")):
                parts.append(line)
                if len(parts) > 6:
                    break
    except OSError:
        pass
    return "\n".join(parts)


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        err = ""
        for arch in (["-march=native"], []):
            r = subprocess.run([cc, *FLAGS, *arch, str(SOURCE), "-o", tmp, "-lm"], capture_output=True, text=True)
            if r.returncode == 0:
                os.replace(tmp, out)
                return
            err = r.stderr
        raise RuntimeError(err.strip()[-2000:])
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class Block:
    """The task-arithmetic family's one kernel signature: a block of tensors merged by one
    method, the one-shot merge's single tensor being a block of one. Per tensor ``g``: its
    base at address ``base[g]`` (dtype code ``bdt``), ``length[g]`` entries, ``models[g]``
    (``k`` ``Model`` records, as a NumPy array of ``np.dtype(Model)`` of shape ``(nseg, k)``),
    the division of a plain sum (``div_sum[g]``, by ``wdiv[g]``), ``lambda[g]`` (applied
    where ``scale_lambda[g]``) and its result at ``out[g]`` (dtype code ``odt``). ``consensus``
    (the TIES election) and ``normalize`` hold for the whole block. Every array is
    contiguous, of the dtypes ``merge_block`` reads."""

    __slots__ = ("base", "bdt", "length", "k", "models", "consensus", "normalize", "div_sum", "wdiv",
                 "scale_lambda", "lam", "out", "odt")

    def __init__(self, *, base, bdt, length, k, models, consensus, normalize, div_sum, wdiv, scale_lambda, lam,
                 out, odt):
        import numpy as np

        self.base, self.bdt = np.ascontiguousarray(base, dtype=np.uint64), int(bdt)
        self.length, self.k = np.ascontiguousarray(length, dtype=np.int64), int(k)
        self.models = models
        self.consensus, self.normalize = int(bool(consensus)), int(bool(normalize))
        self.div_sum = np.ascontiguousarray(div_sum, dtype=np.int32)
        self.wdiv = np.ascontiguousarray(wdiv, dtype=np.float32)
        self.scale_lambda = np.ascontiguousarray(scale_lambda, dtype=np.int32)
        self.lam = np.ascontiguousarray(lam, dtype=np.float32)
        self.out, self.odt = np.ascontiguousarray(out, dtype=np.uint64), int(odt)


def merge_block(lib: ctypes.CDLL, b: Block, start: int = 0, stop: int | None = None) -> int:
    """Merge tensors ``start:stop`` of a block in one kernel call (without the GIL, so
    threads can merge other tensors meanwhile). Returns 0, 1 if a stored value is not
    finite, or a negative errno."""
    stop = len(b.length) if stop is None else stop
    p = lambda x: x[start:].ctypes.data  # noqa: E731
    return lib.em_task_arithmetic_many(stop - start, p(b.base), b.bdt, p(b.length), b.k, p(b.models), b.consensus,
                                       b.normalize, p(b.div_sum), p(b.wdiv), p(b.scale_lambda), p(b.lam),
                                       p(b.out), b.odt)


def _signatures(lib: ctypes.CDLL) -> None:
    i32, i64, f32, vp = ctypes.c_int32, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    lib.em_task_arithmetic_many.restype = ctypes.c_int
    lib.em_task_arithmetic_many.argtypes = [i64, vp, i32, vp, i32, vp, i32, i32, vp, vp, vp, vp, vp, i32]
    lib.em_linear.restype = ctypes.c_int
    lib.em_linear.argtypes = [i64, i32, ctypes.POINTER(vp), ctypes.POINTER(i32), ctypes.POINTER(f32),
                              i32, f32, vp, i32]
    lib.em_select.restype = ctypes.c_int
    lib.em_select.argtypes = [vp, i32, vp, i32, i64, i32, vp, vp, vp]
    lib.em_has_f16.restype = ctypes.c_int


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on the first call; ``None`` where they cannot be
    built (no C compiler) or are turned off (``EVOMERGE_NATIVE=0``)."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            _lib = _load()
        except Exception as e:  # no compiler, a failed build: the torch path does the work
            log.warning("fused merge kernels unavailable (%s); using the torch path", e)
            _lib = None
        _tried = True
    return _lib


def _load() -> ctypes.CDLL | None:
    if os.environ.get("EVOMERGE_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    if sys.platform == "win32":
        return None
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), version.encode(), _machine_id().encode()])
    ).hexdigest()[:16]
    so = cache_dir() / "native" / f"kernels-{key}.so"
    if not so.is_file():
        _build(cc, so)
    lib = ctypes.CDLL(str(so))
    _signatures(lib)
    if lib.em_version() != 1:
        raise RuntimeError(f"{so}: unexpected kernel version")
    return lib


_finite = threading.local()


def checked(out: torch.Tensor, rc: int) -> None:
    """Take a kernel's return code for the result it wrote into ``out``: raise on an
    error, and remember (per thread) whether every value it stored is finite."""
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    _finite.key = (out.data_ptr(), out.numel(), out.dtype) if rc == 0 else None


def forget_finite() -> None:
    """Drop what ``checked`` remembered on this thread (before a new result is made)."""
    _finite.key = None


def known_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` is the result a kernel just wrote on this thread and found every
    value finite (asked once: the answer is forgotten)."""
    key = getattr(_finite, "key", None)
    _finite.key = None
    return key is not None and key == (t.data_ptr(), t.numel(), t.dtype)


_ENABLED: contextvars.ContextVar[bool] = contextvars.ContextVar("native_enabled", default=True)


def available() -> bool:
    """Whether merges here (this context: see ``disabled``) run in the kernels."""
    return _ENABLED.get() and library() is not None


@contextlib.contextmanager
def disabled():
    """Within this block (and this context), merges take the torch path."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def active(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The kernels, if enabled here and every tensor is a contiguous CPU tensor of a dtype
    they handle; else ``None``."""
    if not _ENABLED.get():
        return None
    for t in tensors:
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
    lib = library()
    if lib is None or not dtypes_supported(*{t.dtype for t in tensors}):
        return None
    return lib


def dtypes_supported(*dtypes: torch.dtype) -> bool:
    lib = library()
    if lib is None:
        return False
    for dt in dtypes:
        if dt not in DTYPE_CODES or (dt == torch.float16 and not lib.em_has_f16()):
            return False
    return True
