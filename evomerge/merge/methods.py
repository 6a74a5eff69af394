"""Weight-space merge methods: pure functions over tensors.

Every method has the signature ``fn(base, tensors, **params) -> Tensor``: ``base`` is the
base model's tensor (or ``None`` for methods without one), ``tensors`` the other inputs'
tensors in recipe order, and ``params`` scalars (shared) or lists with one value per entry
of ``tensors`` (per model). The engine resolves per-layer gradients and name filters before
calling, so a method only ever sees plain numbers.

Arithmetic runs in float32 (float64 if the inputs are float64); the result comes back in
``out_dtype`` (every method takes it) or in that working precision. Inputs are read in
flat chunks small enough to stay in cache, so a merge costs one or two passes over memory. Conventions follow the papers, with the
documented choices that make recipes written for mergekit give the same weights: trimming
keeps exactly ``max(1, int(density * n))`` entries (ties broken by position), TIES elects the
sign of the weighted sum with zero counted as positive, SLERP falls back to linear
interpolation when ``|cos| > 0.9995``.

Trimming never sorts a whole tensor: thresholds come from selection (NumPy's introselect
on a CPU, ``torch.kthvalue`` elsewhere), over a seeded sample's bracket for large tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import os

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import native

__all__ = [
    "METHODS",
    "MethodSpec",
    "ParamSpec",
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "model_stock",
    "wise_ft",
    "passthrough",
    "fisher",
    "regmean",
    "weight_matching",
    "regmean_plus_plus",
    "pleas",
    "rank_range_mask",
    "magnitude_mask",
]


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------
# Trimming by magnitude rank (no full sort)
# --------------------------------------------------------------------------------------


def _rank_at_least(a: Tensor, start: int) -> Tensor:
    """Mask of the entries of flat ``a`` whose ascending rank is >= ``start``.

    Ranks order by value, ties by position, so exactly ``n - start`` entries are set.
    """
    n = a.numel()
    if start <= 0:
        return torch.ones(n, dtype=torch.bool, device=a.device)
    if start >= n:
        return torch.zeros(n, dtype=torch.bool, device=a.device)
    v = torch.kthvalue(a, start + 1).values  # the value holding rank `start`
    above = a > v
    eq = a == v
    n_below = n - int(above.sum()) - int(eq.sum())
    # Among the entries equal to v (ranks n_below .. n_below + n_eq - 1, in position
    # order) keep those whose rank is >= start.
    skip = start - n_below
    if skip <= 0:
        return above | eq
    pos = torch.cumsum(eq, dim=0, dtype=torch.int64)
    return above | (eq & (pos > skip))


def rank_range_mask(magnitudes: Tensor, start: int, stop: int) -> Tensor:
    """Mask (shape of ``magnitudes``) of entries whose ascending rank lies in [start, stop)."""
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    mask = _rank_at_least(flat, start)
    if stop < n:
        mask &= ~_rank_at_least(flat, stop)
    return mask.reshape(magnitudes.shape)


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Keep the ``max(1, int(density * n))`` largest-magnitude entries (TIES trim)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    return rank_range_mask(delta.abs(), n - k, n)


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction and the smallest entries.

    ``int(density * n)`` entries are kept; the ``int(gamma * n)`` largest are removed
    first, fewer when needed to keep that many.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    return rank_range_mask(delta.abs(), n_bot, n_bot + keep)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def della_keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MagPrune: keep probabilities spread over [density - eps, density + eps]
    by magnitude rank within each row (larger magnitude, higher keep probability).

    Ranking every entry needs one sort per row; it is the only method that does.
    """
    if not (0 < density - epsilon and density + epsilon < 1 + 1e-12):
        raise ValueError(
            f"della needs 0 < density - epsilon and density + epsilon <= 1 "
            f"(density={density}, epsilon={epsilon})"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    m = rows.shape[1]
    order = rows.abs().argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, device=delta.device).expand_as(order))
    norm = ranks.to(rows.dtype) / max(1, m - 1)
    return ((density - epsilon) + 2 * epsilon * norm).reshape(delta.shape)


# --------------------------------------------------------------------------------------
# Streaming over chunks
#
# Every method below reads its inputs in flat chunks of CHUNK elements (on a CPU, small
# enough to stay in cache), so a merge is one or two passes over memory whatever the
# number of intermediate steps. Whole-tensor statistics (trim thresholds, norms, cosines)
# come from a first pass; the element-wise combination from a second.
# --------------------------------------------------------------------------------------

CHUNK = 1 << 17
GPU_CHUNK = 1 << 26
EXACT_SELECT_MAX = 1 << 16  # tensors up to this size find thresholds with one selection
_SAMPLE = 1 << 14


def _chunk(device: torch.device) -> int:
    return CHUNK if device.type == "cpu" else GPU_CHUNK


def _spans(n: int, device: torch.device):
    step = _chunk(device)
    for s in range(0, n, step):
        yield s, min(n, s + step)


def _alloc(like: Tensor, out_dtype, out: Tensor | None = None) -> Tensor:
    """The flat result: ``out`` when the caller gives the memory to write into (a live
    model's parameter, a file mapping), else new memory."""
    if out is not None:
        if out.numel() != like.numel() or not out.is_contiguous():
            raise ValueError(f"out must be contiguous with {like.numel()} elements")
        return out.view(-1)
    return torch.empty(like.numel(), dtype=out_dtype or _work_dtype(like), device=like.device)


class _Work:
    """Buffers reused across the chunks of one merge: on a CPU, allocating a fresh
    temporary per operation costs several times the arithmetic. Each buffer is allocated
    on first use, so a method pays only for those it needs."""

    def __init__(self, k: int, n: int, dt: torch.dtype, device):
        self._specs = {
            "D": ((k, n), dt),  # the (weighted, masked) task vectors
            "C": ((k, n), dt),  # scratch, one row per model
            "b": ((n,), dt),  # the base, in the working dtype
            "a": ((n,), dt),  # magnitudes
            "m": ((n,), torch.bool),  # boolean masks (off the CPU)
            "m2": ((n,), torch.bool),
            "fm": ((n,), dt),  # float masks
            "fm2": ((n,), dt),
        }
        self._device = device
        self._f: list[Tensor] = []
        self._n, self._dt = n, dt

    def __getattr__(self, name: str) -> Tensor:
        specs = self.__dict__.get("_specs", {})
        if name not in specs:
            raise AttributeError(name)
        shape, dtype = specs[name]
        t = torch.empty(shape, dtype=dtype, device=self._device)
        setattr(self, name, t)
        return t

    @property
    def f(self) -> list[Tensor]:
        """Three scratch vectors."""
        if not self._f:
            self._f = [torch.empty(self._n, dtype=self._dt, device=self._device) for _ in range(3)]
        return self._f

    def base(self, bf: Tensor, s: int, e: int) -> Tensor:
        b = self.b[: e - s]
        b.copy_(bf[s:e])
        return b


def _work(k: int, n: int, dt, device) -> _Work:
    return _Work(k, min(n, _chunk(torch.device(device))) or 1, dt, device)


# --------------------------------------------------------------------------------------
# Rank cuts: "ascending magnitude rank >= r" as a threshold, found without sorting
# --------------------------------------------------------------------------------------


@dataclass
class _Cut:
    """The entries of ascending magnitude rank >= r, as a threshold: those above ``v``,
    and those equal to ``v`` at positions >= ``pos`` (ties broken by position).
    ``v = None`` selects everything."""

    v: float | None
    pos: int = 0

    def chunk(self, a: Tensor, s: int, out: Tensor) -> Tensor:
        """A float 0/1 mask of the chunk ``a`` starting at flat position ``s``.

        Float masks: on a CPU, comparisons that produce bools cost several times the
        arithmetic, so ``x > v`` is computed as ``sign(x - v)`` clamped at 0; ``x >= v``
        as ``x > prev(v)``, the largest float below ``v``.
        """
        if self.v is None:
            return out.fill_(1)
        n = a.numel()
        split = min(max(self.pos - s, 0), n)  # entries before `split` need a > v
        if split:
            torch.sub(a[:split], self.v, out=out[:split])
        if split < n:
            torch.sub(a[split:], _below(self.v, a.dtype), out=out[split:])
        return out.sign_().clamp_(min=0)


def _below(v: float, dtype) -> float:
    t = torch.tensor(v, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype)))


_NONE = object()  # a cut that selects nothing (rank >= n)


def _cut(v: float, skip: int, eq_positions) -> _Cut:
    """From the value at rank r and the number of entries equal to it that rank below r."""
    if skip <= 0:
        return _Cut(v, 0)
    return _Cut(v, int(eq_positions()[skip]))


def _cut_from(a: Tensor, r: int, v: Tensor | float) -> _Cut:
    v = float(v)
    skip = r - int((a < v).sum())
    return _cut(v, skip, lambda: torch.nonzero(a == v).flatten())


def _kth(x: Tensor, k: int) -> float:
    """The k-th smallest entry (0-based) of a flat tensor, by selection (no sort);
    NumPy's introselect on a CPU is several times faster than ``torch.kthvalue``."""
    if x.device.type == "cpu":
        import numpy as np

        return float(np.partition(x.numpy(), k)[k])
    return float(torch.kthvalue(x, k + 1).values)


def _magnitudes(base: Tensor, t: Tensor, dt) -> Tensor:
    return (t.reshape(-1).to(dt) - base.reshape(-1).to(dt)).abs_()


def _bracket(a, lo: float, hi: float, count: int, w) -> tuple[int, Tensor]:
    """Add the number of entries of ``a`` below ``lo`` to ``count``; return it with the
    entries in [lo, hi] (in position order). ``a`` is a NumPy array on a CPU (NumPy's
    comparisons are several times faster there), else a tensor."""
    if not isinstance(a, torch.Tensor):
        import numpy as np

        m = np.less(a, lo)
        count += int(np.count_nonzero(m))
        m2 = np.less_equal(a, hi)
        np.greater(m2, m, out=m2)  # in the bracket: <= hi and not < lo
        return count, torch.from_numpy(a[m2])
    m, m2 = w.m[: a.numel()], w.m2[: a.numel()]
    torch.lt(a, lo, out=m)
    count += int(torch.count_nonzero(m))
    torch.le(a, hi, out=m2)
    m2 &= m.logical_not_()
    return count, a[m2]


_ORDER_STATS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("order_stats", default=None)


@contextlib.contextmanager
def order_statistics(cache: dict):
    """Within this block, magnitude trims of a tensor read their thresholds from ``cache``
    (one per output tensor, kept by the caller): the first use sorts each task vector's
    magnitudes once (stable, so ties keep position order), and every later call finds any
    rank's cut by a lookup instead of a pass over the weights. The cuts are the same as
    without the cache. Used by the resident engine, which merges the same inputs with many
    densities."""
    token = _ORDER_STATS.set(cache)
    try:
        yield
    finally:
        _ORDER_STATS.reset(token)


def sorted_cuts(values, order, index):
    """Cuts read from ascending magnitudes sorted stably (``values``, with their positions
    ``order``; NumPy arrays or tensors) at sorted positions ``index`` (each >= 1): per cut
    the value ``v`` there and ``tie``, the position from which entries equal to ``v`` are
    kept (an index inside a run of equal values keeps only the later ones; 0 keeps all).
    The one lookup of the per-tensor cache and of the flat path's thresholds."""
    v, prev, p = values[index], values[index - 1], order[index]
    if isinstance(v, Tensor):
        return v, torch.where(prev == v, p.long(), torch.zeros_like(p, dtype=torch.long))
    import numpy as np

    return v, np.where(prev == v, p.astype(np.int64), 0)


def _cut_from_sorted(stats: tuple[Tensor, Tensor], r: int) -> _Cut:
    v, tie = sorted_cuts(*stats, r)
    return _Cut(float(v), int(tie))


def _find_cuts(base: Tensor, tensors: Sequence[Tensor], ranks: list[list[int]], dt, work: _Work) -> list[list]:
    """Cuts for each model's ranks (0-based, ascending) of its magnitudes |t - base|.

    Small tensors: one selection. Large ones: a seeded sample brackets each rank, one
    streamed pass counts the entries below the bracket and keeps those inside it, and a
    selection over the bracket finds the exact value (over the whole tensor if the
    bracket missed, which is rare).
    """
    n = base.numel()
    out = [[None] * len(rs) for rs in ranks]
    todo = []  # (model, index of the rank)
    for i, rs in enumerate(ranks):
        for j, r in enumerate(rs):
            if r <= 0:
                out[i][j] = _Cut(None)
            elif r >= n:
                out[i][j] = _NONE
            else:
                todo.append((i, j))
    if not todo:
        return out
    cache = _ORDER_STATS.get()
    if cache is not None:
        for i, j in todo:
            if i not in cache:
                cache[i] = torch.sort(_magnitudes(base, tensors[i], dt), stable=True)
            out[i][j] = _cut_from_sorted(cache[i], ranks[i][j])
        return out
    if _native_cuts(base, tensors, ranks, todo, out):
        return out
    if n <= EXACT_SELECT_MAX:
        for i in sorted({i for i, _ in todo}):
            a = _magnitudes(base, tensors[i], dt)
            for ii, j in todo:
                if ii == i:
                    r = ranks[i][j]
                    out[i][j] = _cut_from(a, r, _kth(a, r))
        return out
    bf = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    g = torch.Generator().manual_seed(n)
    # a stratified sample: one seeded position in each of m equal blocks (reads memory in
    # order, and cannot alias with the rows of a matrix as a fixed stride could)
    m = min(_SAMPLE, n)
    step = n // m
    idx = (torch.arange(m) * step + torch.randint(0, step, (m,), generator=g)).to(base.device)
    brackets = {}
    samples = {}
    for i, j in todo:
        if i not in samples:
            samples[i] = (flats[i][idx].to(dt) - bf[idx].to(dt)).abs_()
        sample = samples[i]
        m = sample.numel()
        q = ranks[i][j] / n
        sd = (m * q * (1 - q)) ** 0.5
        lo_i, hi_i = int(q * m - 6 * sd - 4), int(q * m + 6 * sd + 4)
        lo = _kth(sample, lo_i) if lo_i >= 0 else float("-inf")
        hi = _kth(sample, hi_i) if hi_i < m else float("inf")
        brackets[(i, j)] = (lo, hi)
    spans = list(_spans(n, base.device))
    models = sorted({i for i, _ in todo})
    below = {key: 0 for key in todo}
    bands: dict = {key: [None] * len(spans) for key in todo}

    for c, (s, e) in enumerate(spans):
        b = work.base(bf, s, e)
        a = work.a[: e - s]
        for i in models:
            torch.sub(flats[i][s:e], b, out=a).abs_()
            x = a.numpy() if a.device.type == "cpu" else a
            for key in todo:
                if key[0] == i:
                    below[key], bands[key][c] = _bracket(x, *brackets[key], below[key], work)
    full = {}
    for key in todo:
        i, j = key
        r = ranks[i][j]
        parts = bands[key]
        band = torch.cat(parts) if parts else torch.empty(0, dtype=dt, device=base.device)
        if below[key] <= r < below[key] + band.numel():
            v = _kth(band, r - below[key])
            skip = r - below[key] - int(torch.count_nonzero(band < v))

            def eq_positions(parts=parts, v=v, i=i, skip=skip):
                # find the chunk holding entry number `skip` among those equal to v
                seen = 0
                for (s, e), p in zip(spans, parts):
                    c = int(torch.count_nonzero(p == v))
                    if seen + c > skip:
                        a = (flats[i][s:e].to(dt) - bf[s:e].to(dt)).abs_()
                        pos = torch.nonzero(a == v).flatten() + s
                        return torch.cat([torch.zeros(seen, dtype=pos.dtype, device=pos.device), pos])
                    seen += c
                raise AssertionError("rank bookkeeping")

            out[i][j] = _cut(v, skip, eq_positions)
        else:  # the sample missed: select over the whole tensor
            if i not in full:
                full[i] = _magnitudes(base, tensors[i], dt)
            out[i][j] = _cut_from(full[i], r, _kth(full[i], r))
    return out


def _native_cuts(base: Tensor, tensors: Sequence[Tensor], ranks, todo, out) -> bool:
    """Exact cuts from the fused kernel's radix select (two passes over each task
    vector's magnitudes; the second also places a cut inside a run of equal values)."""
    bf = base.reshape(-1)
    flats = [t.reshape(-1) for t in tensors]
    lib = native.active(bf, *flats)  # None for float64, which the kernels do not take
    if lib is None:
        return False
    n = bf.numel()
    for i in sorted({i for i, _ in todo}):
        js = [j for ii, j in todo if ii == i]
        k = len(js)
        rs = (ctypes.c_int64 * k)(*[ranks[i][j] for j in js])
        vals, pos = (ctypes.c_float * k)(), (ctypes.c_int64 * k)()
        for a in range(0, k, 2):  # the kernel takes up to two ranks per pass
            m = min(2, k - a)
            rc = lib.em_select(flats[i].data_ptr(), native.DTYPE_CODES[flats[i].dtype], bf.data_ptr(),
                               native.DTYPE_CODES[bf.dtype], n, m, ctypes.addressof(rs) + 8 * a,
                               ctypes.addressof(vals) + 4 * a, ctypes.addressof(pos) + 8 * a)
            if rc < 0:
                raise OSError(-rc, os.strerror(-rc))
        for q, j in enumerate(js):
            out[i][j] = _Cut(float(vals[q]), int(pos[q]))
    return True


# --------------------------------------------------------------------------------------
# Per-model masks, applied chunk by chunk
# --------------------------------------------------------------------------------------


class _Mask:
    """What one model keeps of its task vector, chunk by chunk, and by what it is scaled."""

    scale: float = 1.0

    def chunk(self, s: int, e: int, d: Tensor, work: _Work, coef: float = 1.0) -> Tensor | None:
        """The chunk's float multiplier: the 0/1 mask times ``coef``; None keeps all."""
        return None


class _RankMask(_Mask):
    """Entries ranked in [start, stop) by magnitude (a float 0/1 mask)."""

    def __init__(self, start, stop=None):
        self.start, self.stop = start, stop

    def chunk(self, s, e, d, work, coef=1.0):
        m = work.fm[: e - s]
        if self.start is _NONE:
            return m.fill_(0)
        a = torch.abs(d, out=work.a[: e - s])
        self.start.chunk(a, s, m)
        if self.stop is not None and self.stop is not _NONE:
            m.sub_(self.stop.chunk(a, s, work.fm2[: e - s]))
        return m if coef == 1 else m.mul_(coef)


def dare_stream(seed: int, start: int = 0):
    """DARE's random stream for one (seed, tensor, model), at entry ``start`` (a multiple
    of 4): NumPy's SFC64, each 64-bit draw giving four entries' 16-bit uniforms
    (``dare_draw``). Every path (the chunked masks, the flat path, the kernels, which go on
    from its ``dare_state``) draws this one stream, so a mask never depends on how the work
    is cut."""
    import numpy as np

    if start % 4:
        raise ValueError(f"a DARE stream starts at a multiple of 4 entries, not {start}")
    g = np.random.SFC64(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    if start:
        g.random_raw(start // 4, output=False)  # advanced, nothing kept
    return g


def dare_draw(stream, n: int):
    """The next ``n`` entries' 16-bit uniforms (a uint16 array) of a ``dare_stream``."""
    import numpy as np

    return stream.random_raw((n + 3) // 4).view(np.uint16)[:n]


def dare_state(stream) -> list[int]:
    """A ``dare_stream``'s four 64-bit state words, for the kernels to go on from."""
    return [int(v) for v in stream.state["state"]["state"]]


class _RandomMask(_Mask):
    """DARE's drop mask: one 16-bit uniform per entry from a stream seeded per (seed,
    tensor, model) (``dare_stream``), so the mask is the same whatever the chunking or the
    device; an entry is kept when its uniform is below ``density`` (rounded to a multiple
    of 1/65536)."""

    def __init__(self, seed: int, density: float):
        import numpy as np

        self.bitgen = dare_stream(seed)
        self.thresh = min(65536, max(0, int(round(density * 65536))))
        self._t16 = np.uint16(min(self.thresh, 65535))
        self.pos = 0

    def chunk(self, s, e, d, work, coef=1.0):
        import numpy as np

        if s != self.pos:
            raise RuntimeError("DARE masks must be streamed in order")
        n = e - s
        self.pos = e
        if self.thresh >= 65536:
            return None
        u = dare_draw(self.bitgen, n)
        if d.device.type == "cpu":  # a float 0/1 mask straight from NumPy: no boolean torch ops
            keep = torch.from_numpy(np.less(u, self._t16, out=work.fm[:n].numpy(), casting="unsafe"))
        else:
            keep = torch.from_numpy(np.less(u, self._t16)).to(d.device).to(d.dtype)
        return keep if coef == 1 else keep.mul_(coef)


class _DenseMask(_Mask):
    """A precomputed per-entry multiplier (DELLA: keep / p)."""

    def __init__(self, mult: Tensor):
        self.mult = mult

    def chunk(self, s, e, d, work, coef=1.0):
        return torch.mul(self.mult[s:e], coef, out=work.fm[: e - s])


# --------------------------------------------------------------------------------------
# The task-arithmetic family
# --------------------------------------------------------------------------------------


def _rowsum(D: Tensor, out: Tensor) -> Tensor:
    """Sum of the rows of a (k, n) tensor, in row order (faster than a reduction over a
    short leading dimension)."""
    out.copy_(D[0])
    for row in D[1:]:
        out.add_(row)
    return out


def _combine_masked(D: Tensor, b: Tensor, mixed: Tensor, *, consensus: bool, W=None, WS=None, LAM=None,
                    S: Tensor | None = None, el: Tensor | None = None, A: Tensor | None = None) -> Tensor:
    """theta0 + LAM * combine_k(D_k) into ``mixed``, in place, from the weighted and masked
    task vectors ``D`` (``(k, ...)``, overwritten): the task-arithmetic family's combination,
    written once for the chunked reference loop and the flat path's blocks.

    ``combine`` is the row-order sum, divided by ``WS`` where given, or with ``consensus``
    TIES's disjoint merge: the sign of the sum is elected per entry (zero counts as
    positive), the agreeing entries are summed and, where ``W`` (per-model weights,
    broadcastable to ``D``) is given, divided by the summed weights of the agreeing entries.
    ``S``, ``el`` (like ``mixed``) and ``A`` (like ``D``) are scratch, made when not given."""
    if consensus:
        S = _rowsum(D, torch.empty_like(mixed) if S is None else S)
        el = torch.neg(S, out=torch.empty_like(mixed) if el is None else el).sign_().clamp_(min=0).mul_(-2).add_(1)
        # agree[k] = 1 where sign(D[k]) == e (zeros never agree)
        A = torch.sign(D, out=torch.empty_like(D) if A is None else A).mul_(el).clamp_(min=0)
        _rowsum(D.mul_(A), mixed)  # the masked sum, term by term as (D * A).sum(0)
        if W is not None:  # divide by the summed weights of the agreeing entries
            div = _rowsum(A.mul_(W), S)
            zero = torch.sign(div, out=el).abs_().neg_().add_(1)  # 1 where div == 0
            mixed.div_(div.add_(zero))
    else:
        _rowsum(D, mixed)
        if WS is not None:
            mixed.div_(WS)
    if LAM is not None:
        mixed.mul_(LAM)
    return mixed.add_(b)


def _make_masks(base, tensors, kind, density, rescale, seeds, gamma, epsilon, dt, work) -> list[_Mask]:
    n = base.numel()
    masks: list[_Mask | None] = [None] * len(tensors)
    ranks: list[list[int]] = [[] for _ in tensors]
    for i, t in enumerate(tensors):
        p = density[i] if density is not None else 1.0
        if kind is None or p >= 1:
            masks[i] = _Mask()
        elif kind == "magnitude":
            k = max(1, int(p * n)) if p > 0 and n else 0
            ranks[i] = [n - k]
        elif kind == "outliers":
            keep = int(p * n)
            n_top = int(gamma[i] * n)
            n_bot = max(0, n - keep - n_top)
            ranks[i] = [n_bot, n_bot + keep]
        elif kind == "random":
            m = _RandomMask(seeds[i] if seeds is not None else 0, p)
            if m.thresh == 0:  # p rounds to 0 of 65536: nothing is kept
                m = _RankMask(_NONE)
            elif rescale is True:
                m.scale = 1.0 / p
            masks[i] = m
        elif kind == "della":
            if p <= 0:
                masks[i] = _RankMask(_NONE)
                continue
            delta = (t.to(dt) - base.to(dt)).reshape(base.shape)
            prob = della_keep_probabilities(delta, p, epsilon[i])
            g = _generator(seeds[i] if seeds is not None else 0, base.device)
            keep = torch.rand(prob.shape, generator=g, device=base.device) < prob
            mult = keep.to(dt)
            if rescale is True:
                mult /= prob
            masks[i] = _DenseMask(mult.reshape(-1))
        else:
            raise ValueError(f"unknown sparsification {kind!r}")
    if any(ranks):
        cuts = _find_cuts(base, tensors, ranks, dt, work)
        for i, rs in enumerate(ranks):
            if rs:
                c = cuts[i]
                stop = c[1] if len(c) > 1 and rs[1] < n else None
                masks[i] = _RankMask(c[0], stop)
    how = ("l1" if rescale is True else rescale) if kind in ("magnitude", "outliers") else rescale
    if isinstance(how, str) and kind is not None:
        _norm_rescale(base, tensors, masks, how, dt, work)
    return masks


def _norm_rescale(base, tensors, masks, how, dt, work) -> None:
    """Scale each masked task vector to the norm (l1, l2, linf) it had before masking."""
    n = base.numel()
    bf = base.reshape(-1)
    for t, m in zip(tensors, masks):
        if type(m) is _Mask:
            continue
        before = after = 0.0
        tf = t.reshape(-1)
        state = _clone_mask_state(m)
        for s, e in _spans(n, base.device):
            d = tf[s:e].to(dt) - bf[s:e].to(dt)
            mask = state.chunk(s, e, d, work)
            kept = d if mask is None else d * mask
            if how == "l1":
                before += float(d.abs().sum())
                after += float(kept.abs().sum())
            elif how == "l2":
                before += float(d.square().sum())
                after += float(kept.square().sum())
            elif how == "linf":
                before = max(before, float(d.abs().max()) if d.numel() else 0.0)
                after = max(after, float(kept.abs().max()) if kept.numel() else 0.0)
            else:
                raise ValueError(f"unknown rescale norm {how!r}")
        if how == "l2":
            before, after = before ** 0.5, after ** 0.5
        m.scale = 1.0 if before < 1e-7 or after < 1e-7 else before / after


def _clone_mask_state(m: _Mask) -> _Mask:
    """A fresh copy of a mask's streaming state (cuts' counters, random stream)."""
    import copy

    c = copy.copy(m)
    if isinstance(m, _RankMask):
        c.start = copy.copy(m.start) if isinstance(m.start, _Cut) else m.start
        c.stop = copy.copy(m.stop) if isinstance(m.stop, _Cut) else m.stop
    elif isinstance(m, _RandomMask):
        import numpy as np

        c.bitgen = np.random.SFC64()
        c.bitgen.state = m.bitgen.state
    return c


def _general_task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weight: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
    consensus: bool = False,
    sparsify: str | None = None,
    density: Sequence[float] | None = None,
    rescale=False,
    seeds: Sequence[int] | None = None,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
    out_dtype: torch.dtype | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """theta0 + lambda * combine_k(w_k * scale_k * mask_k(tau_k)), streamed over chunks.

    ``combine`` is the sum (optionally divided by sum_k w_k) or, with ``consensus``, the
    TIES disjoint merge: per entry, the sign of the weighted sum is elected (zero counts
    as positive) and only agreeing entries are summed (divided, with ``normalize``, by the
    summed weights of those entries).
    """
    dt = _work_dtype(base)
    shape = base.shape
    result = _alloc(base, out_dtype, out)
    bf = base.reshape(-1)
    n = bf.numel()
    if not tensors:
        return result.copy_(bf).reshape(shape)
    k = len(tensors)
    work = _work(k, n, dt, base.device)
    masks = _make_masks(base, tensors, sparsify, density, rescale, seeds, gamma, epsilon, dt, work)
    w = [float(x) for x in weight]
    coef = [wi * m.scale for wi, m in zip(w, masks)]
    flats = [t.reshape(-1) for t in tensors]
    wsum = sum(w)
    if _native_task_arithmetic(bf, flats, masks, coef, w, lambda_, normalize, consensus, wsum, result):
        return result.reshape(shape)
    # the combination's divisors and lambda as tensors of the working dtype (a GPU multiplies
    # by the reciprocal of a Python scalar, which rounds differently from a division)
    W = torch.tensor(w, dtype=dt, device=base.device).unsqueeze(-1) if consensus and normalize else None
    WS = (torch.tensor(wsum, dtype=dt, device=base.device)
          if not consensus and normalize and abs(wsum) >= 1e-8 else None)
    LAM = torch.tensor(float(lambda_), dtype=dt, device=base.device) if lambda_ != 1 else None
    for s, e in _spans(n, base.device):
        L = e - s
        b = work.base(bf, s, e)
        D = work.D[:, :L]
        for i, (t, m) in enumerate(zip(flats, masks)):
            d = torch.sub(t[s:e], b, out=D[i])
            mask = m.chunk(s, e, d, work, coef[i])
            if mask is not None:
                d.mul_(mask)
            elif coef[i] != 1:
                d.mul_(coef[i])
        result[s:e] = _combine_masked(D, b, work.f[0][:L], consensus=consensus, W=W, WS=WS, LAM=LAM,
                                      S=work.f[1][:L], el=work.f[2][:L], A=work.C[:, :L] if consensus else None)
    return result.reshape(shape)


def _native_models(flats: list[Tensor], masks: list[_Mask], coef: list[float], w: list[float]):
    """The masks as the fused kernel's per-model inputs; ``None`` for a mask it does not
    apply (DELLA's dense multipliers, a random stream already advanced)."""
    arr = (native.Model * len(flats))()
    for x, t, m, c, wi in zip(arr, flats, masks, coef, w):
        x.ptr, x.dtype, x.coef, x.weight = t.data_ptr(), native.DTYPE_CODES[t.dtype], c, wi
        if type(m) is _Mask:
            x.kind = native.MASK_ALL
        elif type(m) is _RankMask:
            if m.start is _NONE:
                x.kind = native.MASK_NONE
                continue
            x.kind = native.MASK_CUT
            if m.start.v is not None:
                x.has_start, x.start_v, x.start_pos = 1, m.start.v, m.start.pos
            if m.stop is not None and m.stop is not _NONE:
                x.has_stop, x.stop_v, x.stop_pos = 1, (float("-inf") if m.stop.v is None else m.stop.v), m.stop.pos
        elif type(m) is _RandomMask and m.pos == 0:
            if m.thresh >= 65536:
                x.kind = native.MASK_ALL
            else:
                x.kind, x.thresh = native.MASK_RANDOM, m.thresh
                x.rng[:] = dare_state(m.bitgen)
        else:
            return None
    return arr


def _native_task_arithmetic(bf, flats, masks, coef, w, lambda_, normalize, consensus, wsum, result) -> bool:
    """The whole merge in one fused pass (``_kernels.c``) where it applies; the same
    operations, in the same order, as the chunked loop of ``_general_task_arithmetic``."""
    lib = native.active(bf, *flats, result)
    if lib is None:
        return False
    models = _native_models(flats, masks, coef, w)
    if models is None:
        return False
    import numpy as np

    div_sum = (not consensus) and normalize and abs(wsum) >= 1e-8
    block = native.Block(  # a block of one tensor
        base=[bf.data_ptr()], bdt=native.DTYPE_CODES[bf.dtype], length=[bf.numel()], k=len(flats),
        models=np.frombuffer(models, dtype=np.dtype(native.Model)).reshape(1, -1), consensus=consensus, normalize=normalize,
        div_sum=[div_sum], wdiv=[wsum], scale_lambda=[lambda_ != 1], lam=[lambda_],
        out=[result.data_ptr()], odt=native.DTYPE_CODES[result.dtype])
    native.checked(result, native.merge_block(lib, block))
    return True


def task_arithmetic(base, tensors, weight, lambda_=1.0, normalize=False, out_dtype=None, out=None):
    """Task arithmetic: theta = theta0 + lambda * sum_k w_k (theta_k - theta0).

    Negative weights subtract a skill. Ilharco et al. 2023, "Editing Models with Task
    Arithmetic", https://arxiv.org/abs/2212.04089.
    """
    return _general_task_arithmetic(base, tensors, weight, lambda_=lambda_, normalize=normalize,
                                    out_dtype=out_dtype, out=out)


def ties(base, tensors, weight, density, lambda_=1.0, normalize=True, rescale=False, out_dtype=None, out=None):
    """TIES-Merging: trim each task vector to its top-``density`` magnitudes, elect a sign
    per entry (sign of the weighted sum), and average the agreeing entries.

    Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
    https://arxiv.org/abs/2306.01708.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, consensus=True,
        sparsify="magnitude", density=density, rescale=rescale, out_dtype=out_dtype, out=out,
    )


def dare_linear(base, tensors, weight, density, seeds, lambda_=1.0, normalize=False, rescale=True,
                out_dtype=None, out=None):
    """DARE + task arithmetic: drop each task-vector entry with probability p = 1 - density
    and rescale survivors by 1/(1 - p) (``rescale: l1`` matches the tensor's L1 norm
    instead, as mergekit does), then add the weighted sum to the base.

    The drop mask of a model's tensor depends only on its seed (the engine derives one per
    seed, tensor and model), never on chunking or device.

    Yu et al. 2024, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, sparsify="random",
        density=density, rescale=rescale, seeds=seeds, out_dtype=out_dtype, out=out,
    )


def dare_ties(base, tensors, weight, density, seeds, lambda_=1.0, normalize=False, rescale=True,
              out_dtype=None, out=None):
    """DARE drop-and-rescale followed by TIES sign election.

    Yu et al. 2024, https://arxiv.org/abs/2311.03099; election from
    https://arxiv.org/abs/2306.01708.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, consensus=True,
        sparsify="random", density=density, rescale=rescale, seeds=seeds, out_dtype=out_dtype, out=out,
    )


def breadcrumbs(base, tensors, weight, density, gamma, lambda_=1.0, normalize=False, rescale=False,
                out_dtype=None, out=None):
    """Model Breadcrumbs: per tensor drop the ``gamma`` largest and the smallest entries
    of each task vector, keeping a ``density`` fraction, then task arithmetic.

    Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, sparsify="outliers",
        density=density, gamma=gamma, rescale=rescale, out_dtype=out_dtype, out=out,
    )


def breadcrumbs_ties(base, tensors, weight, density, gamma, lambda_=1.0, normalize=False, rescale=False,
                     out_dtype=None, out=None):
    """Model Breadcrumbs masks followed by TIES sign election.

    Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, consensus=True,
        sparsify="outliers", density=density, gamma=gamma, rescale=rescale, out_dtype=out_dtype, out=out,
    )


_DELLA_MARGIN = 1 - 1e-6


def della_epsilon_limit(density: float) -> float:
    """The largest ``epsilon`` DELLA takes with ``density``: keep probabilities in
    ``[density - epsilon, density + epsilon]`` must stay within (0, 1]."""
    return max(0.0, min(density, 1.0 - density)) * _DELLA_MARGIN


def _della_epsilon_range(density: float) -> tuple[float, float]:
    return 0.0, della_epsilon_limit(density)


def _della_density_range(epsilon: float) -> tuple[float, float]:
    """The densities with which ``epsilon`` fits (empty, lo > hi, when none does)."""
    e = epsilon / _DELLA_MARGIN
    return e + 1e-9, 1.0 - e


# epsilon within what density allows; where density alone is searched, density within what
# the fixed epsilon allows
_DELLA_LIMITS = (("epsilon", "density", _della_epsilon_range), ("density", "epsilon", _della_density_range))


def della(base, tensors, weight, density, epsilon, seeds, lambda_=1.0, normalize=True, rescale=True,
          out_dtype=None, out=None):
    """DELLA-Merging: MagPrune (rank-dependent drop probabilities in
    [1-density-eps, 1-density+eps], survivors rescaled by 1/keep-probability), then TIES
    election and disjoint merge.

    Deep et al. 2024, https://arxiv.org/abs/2406.11617.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, consensus=True,
        sparsify="della", density=density, epsilon=epsilon, rescale=rescale, seeds=seeds,
        out_dtype=out_dtype, out=out,
    )


def della_linear(base, tensors, weight, density, epsilon, seeds, lambda_=1.0, normalize=False, rescale=True,
                 out_dtype=None, out=None):
    """DELLA MagPrune followed by plain task arithmetic (no election).

    Deep et al. 2024, https://arxiv.org/abs/2406.11617.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, sparsify="della",
        density=density, epsilon=epsilon, rescale=rescale, seeds=seeds, out_dtype=out_dtype, out=out,
    )


def weight_matching(base, tensors, weight=None, normalize=True, out_dtype=None, out=None):
    """Weight matching: the weighted average (``linear``; uniform by default) of models each
    permuted to line up unit for unit with a reference first. The permutations are found
    once per model (``align.weight_matching``) and applied as its tensors are read
    (``MethodSpec.align``), so here the inputs are already aligned.

    Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin", https://arxiv.org/abs/2209.04836.
    """
    return linear(base, tensors, [1.0] * len(tensors) if weight is None else weight, normalize, out_dtype, out)


def linear(base, tensors, weight, normalize=True, out_dtype=None, out=None):
    """Linear merge (model soup): sum_k w_k theta_k, divided by sum_k w_k if ``normalize``.

    Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482.
    """
    first = tensors[0]
    dt = _work_dtype(first)
    total = float(sum(weight))
    if normalize and total == 0:
        raise ValueError("linear merge with normalize: the weights sum to zero")
    out = _alloc(first, out_dtype, out)
    flats = [t.reshape(-1) for t in tensors]
    n = first.numel()
    lib = native.active(*flats, out)
    if lib is not None:  # one fused pass, the same operations as the loop below
        k = len(flats)
        rc = lib.em_linear(
            n, k, (ctypes.c_void_p * k)(*[t.data_ptr() for t in flats]),
            (ctypes.c_int32 * k)(*[native.DTYPE_CODES[t.dtype] for t in flats]),
            (ctypes.c_float * k)(*[float(x) for x in weight]), int(bool(normalize)), total,
            out.data_ptr(), native.DTYPE_CODES[out.dtype],
        )
        native.checked(out, rc)
        return out.reshape(first.shape)
    work = _work(1, n, dt, first.device)
    for s, e in _spans(n, first.device):
        acc, x = work.f[0][: e - s], work.f[1][: e - s]
        acc.copy_(flats[0][s:e]).mul_(float(weight[0]))  # each term rounded, then summed in order
        for t, w in zip(flats[1:], weight[1:]):
            acc.add_(x.copy_(t[s:e]).mul_(float(w)))
        if normalize:
            acc.div_(torch.tensor(total, dtype=dt, device=acc.device))
        out[s:e] = acc
    return out.reshape(first.shape)


def wise_ft(base, tensors, alpha=0.5, out_dtype=None, out=None):
    """WiSE-FT: theta = (1 - alpha) * theta0 + alpha * theta_ft.

    Wortsman et al. 2022, "Robust fine-tuning of zero-shot models",
    https://arxiv.org/abs/2109.01903.
    """
    dt = _work_dtype(base)
    out = _alloc(base, out_dtype, out)
    b, f = base.reshape(-1), tensors[0].reshape(-1)
    work = _work(1, b.numel(), dt, base.device)
    for s, e in _spans(b.numel(), base.device):
        x, y = work.f[0][: e - s].copy_(b[s:e]), work.f[1][: e - s].copy_(f[s:e])
        out[s:e] = torch.lerp(x, y, float(alpha), out=work.f[2][: e - s])
    return out.reshape(base.shape)


def slerp(base, tensors, t, dot_threshold=0.9995, eps=1e-8, out_dtype=None, out=None):
    """Spherical linear interpolation between the base (t = 0) and one model (t = 1),
    over the whole flattened tensor; linear interpolation when the two are nearly
    collinear (|cos| > ``dot_threshold``).

    Shoemake 1985, "Animating rotation with quaternion curves"; as used for LLM merging in
    WARP, https://arxiv.org/abs/2406.16768.
    """
    dt = _work_dtype(base)
    a, b = base.reshape(-1), tensors[0].reshape(-1)
    t = float(t)
    n = a.numel()
    work = _work(1, n, dt, base.device)
    sq0 = sq1 = dot = torch.zeros((), dtype=dt, device=base.device)
    for s, e in _spans(n, base.device):
        x, y = work.f[0][: e - s].copy_(a[s:e]), work.f[1][: e - s].copy_(b[s:e])
        sq0 = sq0 + torch.dot(x, x)
        sq1 = sq1 + torch.dot(y, y)
        dot = dot + torch.dot(x, y)
    n0, n1 = sq0.sqrt(), sq1.sqrt()
    n0 = n0 if n0 > eps else torch.ones_like(n0)
    n1 = n1 if n1 > eps else torch.ones_like(n1)
    cos = (dot / (n0 * n1)).clamp(-1, 1)
    if cos.abs() > dot_threshold:
        c0, c1 = 1 - t, t
    else:
        theta = torch.acos(cos)
        st = torch.sin(theta)
        c0 = float(torch.sin((1 - t) * theta) / st)
        c1 = float(torch.sin(t * theta) / st)
    out = _alloc(base, out_dtype, out)
    for s, e in _spans(n, base.device):
        x, y = work.f[0][: e - s].copy_(a[s:e]), work.f[1][: e - s].copy_(b[s:e])
        out[s:e] = x.mul_(c0).add_(y, alpha=c1)
    return out.reshape(base.shape)


def model_stock(base, tensors, filter_wise=False, out_dtype=None, out=None):
    """Model Stock: t = k cos(phi) / (1 + (k - 1) cos(phi)) from the mean pairwise cosine
    of the task vectors; theta = t * mean(theta_k) + (1 - t) * theta0. With
    ``filter_wise`` the cosine and t are computed per row.

    Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
    https://arxiv.org/abs/2403.19522.
    """
    dt = _work_dtype(base)
    shape = base.shape
    k = len(tensors)
    rows = shape[0] if filter_wise and base.dim() >= 2 else 1
    b = base.reshape(rows, -1)
    ts = [t.reshape(rows, -1) for t in tensors]
    cols = b.shape[1]
    step = max(1, _chunk(base.device) // rows)
    # pass 1: Gram matrix of the task vectors (per row)
    gram = torch.zeros((k, k, rows), dtype=dt, device=base.device)
    for s in range(0, cols, step):
        e = min(cols, s + step)
        bb = b[:, s:e].to(dt)
        ds = [t[:, s:e].to(dt) - bb for t in ts]
        for i in range(k):
            for j in range(i, k):
                gram[i, j] += (ds[i] * ds[j]).sum(dim=1)
    norms = gram.diagonal(dim1=0, dim2=1).T.clamp(min=0).sqrt()  # (k, rows)
    cos = []
    for i in range(k):
        for j in range(i + 1, k):
            denom = (norms[i] * norms[j]).clamp(min=1e-6)
            cos.append((gram[i, j] / denom).clamp(-1, 1))
    cos_t = torch.stack(cos).mean(dim=0).unsqueeze(-1)  # (rows, 1)
    den = 1 + (k - 1) * cos_t
    singular = den.abs() < 1e-6
    tt = torch.where(singular, torch.zeros_like(cos_t), k * cos_t / torch.where(singular, 1, den))
    # pass 2: t * mean + (1 - t) * base
    out = _alloc(base, out_dtype or dt, out).view(rows, cols)
    for s in range(0, cols, step):
        e = min(cols, s + step)
        bb = b[:, s:e].to(dt)
        mean = ts[0][:, s:e].to(dt).clone()
        for t in ts[1:]:
            mean.add_(t[:, s:e].to(dt))
        mean.div_(k)
        out[:, s:e] = tt * mean + (1 - tt) * bb
    return out.reshape(shape)


def passthrough(base, tensors, scale=None, out_dtype=None, out=None):
    """Passthrough: copy one input tensor (optionally scaled). With ``slices`` it stacks
    layer ranges of one or more models (depth up-scaling).

    Kim et al. 2023, "SOLAR 10.7B", https://arxiv.org/abs/2312.15166.
    """
    t = tensors[0]
    s = scale[0] if isinstance(scale, (list, tuple)) else scale
    res = _alloc(t, out_dtype, out).view(t.shape)
    return res.copy_(t if s is None else t.to(_work_dtype(t)) * float(s))


def _with_statistics(tensors, weight, statistics, name: str, what: str):
    """The working dtype, the per-model weights (1 each by default) and each input's
    ``statistics[name]`` (``None`` each where none are given) of a method that reads data."""
    dt = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    weight = [1.0] * len(tensors) if weight is None else weight
    stats = (statistics or {}).get(name) or [None] * len(tensors)
    if len(stats) != len(tensors):
        raise ValueError(f"{len(tensors)} inputs but {len(stats)} {what}")
    return dt, weight, stats


def fisher(base, tensors, weight=None, floor=1e-6, statistics=None, out_dtype=None, out=None):
    """Fisher-weighted averaging: theta = sum_k w_k F_k theta_k / sum_k w_k F_k entry by
    entry, where F_k = max(Fisher diagonal of model k, ``floor``) (``statistics["fisher"]``,
    one tensor per input, read from data). Where no Fisher is given for an input tensor
    (a buffer), that input's F is 1; with every F alike it is the weighted average.

    Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging",
    https://arxiv.org/abs/2111.09832.
    """
    first = tensors[0]
    dt, weight, fishers = _with_statistics(tensors, weight, statistics, "fisher", "Fisher diagonals")
    total = float(sum(weight))
    if not total > 0:
        raise ValueError("fisher: the weights sum to zero")
    # in float64, the weights as shares of their sum: the result does not depend on their scale
    num = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    den = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
    for t, w, f in zip(tensors, weight, fishers):
        if f is None:
            f = torch.ones((), dtype=torch.float64, device=first.device)
        elif f.shape != first.shape:
            raise ValueError(f"a Fisher diagonal of shape {tuple(f.shape)} for a tensor of shape {tuple(first.shape)}")
        fw = f.to(device=first.device, dtype=torch.float64).clamp(min=float(floor)) * (float(w) / total)
        num += fw * t.to(torch.float64)
        den += fw
    if bool((den == 0).any()):
        raise ValueError("the weighted Fishers sum to zero (weights summing to zero, or a floor of 0 where every "
                         "Fisher is 0)")
    res = _alloc(first, out_dtype or dt, out)
    res.copy_((num / den).reshape(-1))
    return res.reshape(first.shape)


def _gram_solve(lhs: Tensor, rhs: Tensor) -> Tensor:
    """``lhs^-1 rhs`` for a sum of Gram matrices ``lhs`` (symmetric, positive semidefinite)."""
    chol, info = torch.linalg.cholesky_ex(lhs)
    pivots = torch.diagonal(chol) ** 2
    if int(info) == 0 and float(pivots.min()) > 1e-10 * float(pivots.max()):
        return torch.cholesky_solve(rhs, chol)
    # fewer tokens than inputs, or inputs that never vary: the sum is (nearly) singular. A
    # ridge of 1e-9 of its mean diagonal gives the minimum-norm solution (the right-hand
    # sides lie in its range) instead of values blown up by rounding.
    ridge = 1e-9 * float(torch.diagonal(lhs).mean().clamp(min=1e-300))
    return torch.linalg.solve(lhs + ridge * torch.eye(lhs.shape[0], dtype=lhs.dtype, device=lhs.device), rhs)


def _least_squares(tensors, weight, stats, dt, out_dtype, out, what: str, units=None):
    """The weight W solving sum_k w_k G_k W^T = sum_k w_k C_k W_k^T (per input ``(G_k, C_k,
    in_first)``, ``in_first`` for a ``[in, out]`` weight): RegMean's and PLeaS's normal
    equations. G_k may be wider than W_k's inputs (``[m, m]`` with C_k ``[m, in]``: a merged
    layer whose inputs are wider than the models'). With ``units`` (``(merged, separate)``
    output indices), the outputs ``merged`` are fit to every model and each model's
    ``separate`` outputs to that model alone, laid out ``[merged, separate of model 0, of
    model 1, ...]`` (PLeaS's partial merging)."""
    first = tensors[0]
    in_first = stats[0][2]
    ws, gs, rhs = [], [], []
    for t, w, (g, c, _) in zip(tensors, weight, stats):
        wt = t.to(torch.float64)
        wt = wt if in_first else wt.T  # [in, out]
        if g.shape[0] != g.shape[1] or c.shape != (g.shape[0], wt.shape[0]):
            raise ValueError(f"{what} of shapes {tuple(g.shape)} and {tuple(c.shape)} for a weight with "
                             f"{wt.shape[0]} inputs")
        g, c = (x.to(device=first.device, dtype=torch.float64) for x in (g, c))
        ws.append(float(w))
        gs.append(g)
        rhs.append(c @ wt)
    lhs = sum(w * g for w, g in zip(ws, gs))
    if units is None:
        merged = _gram_solve(lhs, sum(w * r for w, r in zip(ws, rhs)))
    else:
        keep, apart = (torch.as_tensor(u, dtype=torch.long, device=first.device) for u in units)
        parts = [_gram_solve(lhs, sum(w * r.index_select(1, keep) for w, r in zip(ws, rhs)))]
        parts += [_gram_solve(g, r.index_select(1, apart)) for g, r in zip(gs, rhs)]
        merged = torch.cat(parts, dim=1)
    merged = merged if in_first else merged.T
    res = _alloc(merged, out_dtype or dt, out)
    res.copy_(merged.reshape(-1))
    return res.reshape(merged.shape)


def _wide(tensors, weight, units, axis: int, dt, out_dtype, out, scale_apart: bool):
    """A tensor of a partially merged layer without a least-squares fit: along ``axis`` its
    ``merged`` units are the weighted average of the models', then each model's own
    ``separate`` units (``units``), times its share of the weights with ``scale_apart`` (the
    inputs of the layer that reads them: the models' outputs are then averaged exactly)."""
    keep, apart = (torch.as_tensor(u, dtype=torch.long, device=tensors[0].device) for u in units)
    total = float(sum(weight))
    parts = [sum(float(w) * t.to(torch.float64).index_select(axis, keep) for w, t in zip(weight, tensors)) / total]
    parts += [t.to(torch.float64).index_select(axis, apart) * (float(w) / total if scale_apart else 1.0)
              for w, t in zip(weight, tensors)]
    wide = torch.cat(parts, dim=axis)
    res = _alloc(wide, out_dtype or dt, out)
    res.copy_(wide.reshape(-1))
    return res.reshape(wide.shape)


def _weighted_average(tensors, weight, dt, out_dtype, out):
    first = tensors[0]
    total = float(sum(weight))
    acc = sum(float(w) * t.to(torch.float64) for w, t in zip(weight, tensors)) / total
    res = _alloc(first, out_dtype or dt, out)
    res.copy_(acc.reshape(-1))
    return res.reshape(first.shape)


def regmean(base, tensors, weight=None, alpha=0.9, statistics=None, out_dtype=None, out=None):
    """RegMean: for a linear layer's weight, the merged W minimises sum_k w_k ||X_k W^T -
    X_k W_k^T||^2 / tokens_k over the layer's inputs X_k on model k's data, W = (sum_k w_k
    G_k W_k^T)^T (sum_k w_k G_k)^-1 with G_k = X_k^T X_k / tokens_k (``statistics["gram"]``:
    per input, ``(G_k, in_first)``, ``in_first`` for a ``[in, out]`` weight such as GPT-2's
    ``Conv1D``; the caller divides by the tokens) and the off-diagonal entries of each G_k
    scaled by ``alpha``. Every other tensor (no Gram matrix: embeddings, norms, biases) is
    the weighted average.

    Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
    https://arxiv.org/abs/2212.09849.
    """
    first = tensors[0]
    dt, weight, grams = _with_statistics(tensors, weight, statistics, "gram", "Gram matrices")
    total = float(sum(weight))
    if total == 0:
        raise ValueError("regmean: the weights sum to zero")
    if any(g is None for g in grams) or first.dim() != 2:
        return _weighted_average(tensors, weight, dt, out_dtype, out)
    scaled = []
    for g, in_first in grams:
        g = g.to(device=first.device, dtype=torch.float64)
        g = g * float(alpha) + torch.diag(torch.diagonal(g)) * (1 - float(alpha))
        scaled.append((g, g, in_first))
    return _least_squares(tensors, weight, scaled, dt, out_dtype, out, "a Gram matrix")


def regmean_plus_plus(base, tensors, weight=None, alpha=0.9, statistics=None, out_dtype=None, out=None):
    """RegMean++: RegMean (``regmean``) with each layer's Gram matrices taken over the inputs
    the layer sees in the merged model, whose earlier layers are already merged, on each
    model's data (``statistics["merged_grams"]``: per input ``(G_k, in_first)``), so that each
    layer's fit accounts for what the merge did before it.

    Nguyen et al. 2025, "RegMean++: Enhancing Effectiveness and Generalization of Regression
    Mean for Model Merging", https://arxiv.org/abs/2508.03121.
    """
    _, _, grams = _with_statistics(tensors, weight, statistics, "merged_grams", "Gram matrices")
    return regmean(base, tensors, weight, alpha, statistics={"gram": grams}, out_dtype=out_dtype, out=out)


def pleas(base, tensors, weight=None, width=1.0, statistics=None, out_dtype=None, out=None):
    """PLeaS's least squares: models permuted onto a reference by their activations
    (``MethodSpec.align``: activation matching), then each linear layer's W the fit of every
    model's own outputs from the merged model's inputs: W minimises sum_k w_k ||Xm_k W^T -
    X_k W_k^T||^2 / n_k, where Xm_k are the inputs the layer sees in the merged model (its
    earlier layers already merged) and X_k those it sees in model k, both on model k's data:
    W^T = (sum_k w_k G_k)^-1 sum_k w_k C_k W_k^T with G_k = Xm_k^T Xm_k / n_k and C_k =
    Xm_k^T X_k / n_k (``statistics["merged_inputs"]``: per input ``(G_k, C_k, in_first)``).
    Every other tensor (embeddings, norms, biases) is the weighted average.

    Partial merging (``width`` > 1, the merged MLPs ``width`` times as wide as the models'):
    the engine chooses, per layer, the MLP units whose matched activations correlate least
    and keeps them apart, one copy from each model (``statistics["units"]``: ``(merged,
    separate, axis, role)``). A layer that writes those units (``role`` "out") fits its
    merged outputs to every model and each model's own copies to that model alone; one that
    reads them ("in") is fit from the wider inputs (G_k wider than W_k's inputs); a bias
    (or a tensor without statistics) of the units takes the weighted average of the merged
    ones and each model's own copies.

    Nasery et al. 2024, "PLeaS: Merging Models with Permutations and Least Squares",
    https://arxiv.org/abs/2407.02447.
    """
    first = tensors[0]
    dt, weight, stats = _with_statistics(tensors, weight, statistics, "merged_inputs", "merged-input statistics")
    if float(sum(weight)) == 0:
        raise ValueError("pleas: the weights sum to zero")
    units = (statistics or {}).get("units")
    if any(x is None for x in stats) or first.dim() != 2:
        if units is not None:
            keep, apart, axis, role = units
            return _wide(tensors, weight, (keep, apart), axis, dt, out_dtype, out, scale_apart=role == "in")
        return _weighted_average(tensors, weight, dt, out_dtype, out)
    return _least_squares(tensors, weight, stats, dt, out_dtype, out, "merged-input statistics",
                          units=units[:2] if units is not None and units[3] == "out" else None)


# --------------------------------------------------------------------------------------
# The registry: what each method takes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method.

    Args:
        name: the recipe key (``lambda`` is passed to the function as ``lambda_``).
        kind: ``float``, ``bool`` or ``rescale`` (bool or a norm name).
        per_model: one value per merged model (else shared across models).
        default: value when the recipe gives none; ``None`` with ``required``.
        lo, hi, lo_open: allowed numeric range, checked on every resolved value.
        ignored: accepted in recipes (mergekit takes it) but has no effect here.
        structural: sets the merged model's shape (PLeaS's ``width``): one value for the
            whole merge, kept at its default in a search (one live model of the models' shape).
        search: ``(lo, hi, x0)``, the range a search explores when it is given none (within
            ``lo``/``hi``); ``None`` for what cannot be searched (booleans, norms).

    This registry is the one table of parameters and their bounds: recipes are checked
    against it, and ``Space`` and the app's config checks read their ranges from it.
    """

    name: str
    kind: str = "float"
    per_model: bool = False
    default: object = None
    required: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    ignored: bool = False  # accepted for compatibility, never passed to the function
    structural: bool = False  # sets the merged model's shape: one value per merge, never searched
    search: tuple[float, float, float] | None = None


@dataclass(frozen=True)
class MethodSpec:
    """A merge method, its parameters and the inputs it accepts."""

    name: str
    fn: Callable[..., Tensor]
    params: tuple[ParamSpec, ...]
    needs_base: bool = True
    min_models: int = 1  # models besides the base
    max_models: int | None = None
    base_in_inputs: bool = False  # linear: the base (if named) is one more weighted input
    random: bool = False  # takes per-model seeds
    kernels: bool = False  # merged on the CPU by the fused kernels (native.py) where they are built
    statistics: tuple[str, ...] = ()  # what it reads from data besides the weights (``statistics.STATISTICS``)
    align: str | None = None  # permutes the models to line up first (``align.ALIGNERS``), whatever the recipe says
    # for the generalized task arithmetic: (sparsification, sign election) it passes to
    # ``_general_task_arithmetic``, which the engine's flat path reads too
    family: tuple[str | None, bool] | None = None
    # joint limits a box of search ranges cannot hold: (param, other, fn) keeps param
    # within fn(other) = (lo, hi) wherever both are set (``Space`` clips a genome to them)
    limits: tuple[tuple[str, str, Callable[[float], tuple[float, float]]], ...] = ()
    reference: str = ""
    param_names: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "param_names", tuple(p.name for p in self.params))

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


_W = ParamSpec("weight", per_model=True, required=True, search=(0.0, 1.0, 0.5))
_LAMBDA = ParamSpec("lambda", default=1.0, search=(0.0, 2.0, 1.0))
_DENSITY = ParamSpec("density", per_model=True, default=1.0, lo=0.0, hi=1.0, lo_open=True, search=(0.05, 1.0, 0.5))
_GAMMA = ParamSpec("gamma", per_model=True, default=0.01, lo=0.0, hi=1.0, search=(0.0, 0.2, 0.01))
_EPS = ParamSpec("epsilon", per_model=True, default=0.15, lo=0.0, hi=0.5, search=(0.0, 0.2, 0.05))
_SHARE = ParamSpec("weight", per_model=True, default=1.0, lo=0.0, search=(0.0, 1.0, 0.5))  # a model's weight, given as shares of their sum
_ALPHA = ParamSpec("alpha", default=0.9, lo=0.0, hi=1.0, search=(0.5, 1.0, 0.9))  # RegMean's scaling of off-diagonal Gram entries


def _ta_params(normalize: bool, rescale, *extra: ParamSpec, sparse: bool = True) -> tuple[ParamSpec, ...]:
    return (
        _W,
        _LAMBDA,
        ParamSpec("normalize", kind="bool", default=normalize),
        ParamSpec("rescale", kind="rescale", default=rescale, ignored=not sparse),
        ParamSpec("int8_mask", kind="bool", default=False, ignored=True),  # a memory knob
        *extra,
    )


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        "linear", linear, (_W, ParamSpec("normalize", kind="bool", default=True)),
        needs_base=False, base_in_inputs=True, kernels=True,
        reference="https://arxiv.org/abs/2203.05482",
    ),
    "task_arithmetic": MethodSpec(
        # density and rescale are accepted (and unused) so that recipes written for
        # mergekit, whose task arithmetic takes them, run unchanged.
        "task_arithmetic", task_arithmetic,
        _ta_params(False, False, ParamSpec("density", per_model=True, default=1.0, ignored=True), sparse=False),
        kernels=True, family=(None, False), reference="https://arxiv.org/abs/2212.04089",
    ),
    "ties": MethodSpec(
        "ties", ties, _ta_params(True, False, _DENSITY),
        kernels=True, family=("magnitude", True), reference="https://arxiv.org/abs/2306.01708",
    ),
    "dare_linear": MethodSpec(
        "dare_linear", dare_linear, _ta_params(False, True, _DENSITY), random=True,
        kernels=True, family=("random", False), reference="https://arxiv.org/abs/2311.03099",
    ),
    "dare_ties": MethodSpec(
        "dare_ties", dare_ties, _ta_params(False, True, _DENSITY), random=True,
        kernels=True, family=("random", True), reference="https://arxiv.org/abs/2311.03099",
    ),
    "breadcrumbs": MethodSpec(
        "breadcrumbs", breadcrumbs, _ta_params(False, False, _DENSITY, _GAMMA),
        kernels=True, family=("outliers", False), reference="https://arxiv.org/abs/2312.06795",
    ),
    "breadcrumbs_ties": MethodSpec(
        "breadcrumbs_ties", breadcrumbs_ties, _ta_params(False, False, _DENSITY, _GAMMA),
        kernels=True, family=("outliers", True), reference="https://arxiv.org/abs/2312.06795",
    ),
    "della": MethodSpec(
        "della", della, _ta_params(True, True, _DENSITY, _EPS), random=True,
        family=("della", True), limits=_DELLA_LIMITS, reference="https://arxiv.org/abs/2406.11617",
    ),
    "della_linear": MethodSpec(
        "della_linear", della_linear, _ta_params(False, True, _DENSITY, _EPS), random=True,
        family=("della", False), limits=_DELLA_LIMITS, reference="https://arxiv.org/abs/2406.11617",
    ),
    "slerp": MethodSpec(
        "slerp", slerp, (ParamSpec("t", required=True, lo=0.0, hi=1.0, search=(0.0, 1.0, 0.5)),),
        min_models=1, max_models=1, reference="https://arxiv.org/abs/2406.16768",
    ),
    "model_stock": MethodSpec(
        "model_stock", model_stock, (ParamSpec("filter_wise", kind="bool", default=False),),
        min_models=2, reference="https://arxiv.org/abs/2403.19522",
    ),
    "wise_ft": MethodSpec(
        "wise_ft", wise_ft, (ParamSpec("alpha", default=0.5, search=(0.0, 1.0, 0.5)),),
        min_models=1, max_models=1, reference="https://arxiv.org/abs/2109.01903",
    ),
    "fisher": MethodSpec(
        "fisher", fisher,
        (_SHARE, ParamSpec("floor", default=1e-6, lo=0.0, lo_open=True)),
        needs_base=False, base_in_inputs=True, statistics=("fisher",),
        reference="https://arxiv.org/abs/2111.09832",
    ),
    "regmean": MethodSpec(
        "regmean", regmean,
        (_SHARE, _ALPHA),
        needs_base=False, base_in_inputs=True, statistics=("gram",),
        reference="https://arxiv.org/abs/2212.09849",
    ),
    "regmean_plus_plus": MethodSpec(
        "regmean_plus_plus", regmean_plus_plus,
        (_SHARE, _ALPHA),
        needs_base=False, base_in_inputs=True, statistics=("merged_grams",),
        reference="https://arxiv.org/abs/2508.03121",
    ),
    "pleas": MethodSpec(
        # width: the merged MLPs' width, a multiple of the models' (structural: fixed, never searched)
        "pleas", pleas, (_SHARE, ParamSpec("width", default=1.0, lo=1.0, structural=True)),
        needs_base=False, base_in_inputs=True, statistics=("merged_inputs",), align="activation_matching",
        reference="https://arxiv.org/abs/2407.02447",
    ),
    "weight_matching": MethodSpec(
        # Git Re-Basin: every model permuted to line up with the reference (``align.py``),
        # then their weighted average (uniform by default: the midpoint of two models)
        "weight_matching", weight_matching,
        (_SHARE, ParamSpec("normalize", kind="bool", default=True)),
        needs_base=False, base_in_inputs=True, kernels=True, align="weight_matching",
        reference="https://arxiv.org/abs/2209.04836",
    ),
    "passthrough": MethodSpec(
        "passthrough", passthrough, (ParamSpec("scale", per_model=True, default=None, search=(0.0, 2.0, 1.0)),),
        needs_base=False, base_in_inputs=True, min_models=1, max_models=1,
        reference="https://arxiv.org/abs/2312.15166",
    ),
}
