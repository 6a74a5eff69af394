"""The task-arithmetic family over blocks of equal-sized tensors: a candidate in a few
dozen operations.

The per-tensor path of the merge core spends, per tensor and model, a handful of small
operations (and, on a GPU, a synchronisation for every magnitude threshold), so a model of
hundreds of tensors costs thousands of operations per candidate. A ``FlatGroup`` stores
the inputs of many tensors back to back in one flat buffer per model, ordered by size, so
that the tensors of one size (every layer's ``q_proj``, every ``gate_proj``, ...) form a
*block*: an ``(m, n)`` matrix per model. A candidate's per-tensor parameters (weights,
densities, lambda, magnitude cuts) are ``(k, m, 1)`` columns broadcast over a block, so a
whole block merges in one sequence of operations, with no per-entry parameter tensors.
The arithmetic is, entry by entry, the operations of ``methods._general_task_arithmetic``
in the same order, so the weights are bit-identical to the one-shot merge.

Three backends give the same bits. In torch, a block merges in a dozen operations over
cache-sized pieces (``_combine``). With ``compile=True`` each piece runs through
``torch.compile`` as one fused kernel (``_combine_by_model``, whose combination step,
``merge_deltas``, AdaMerging differentiates through; the first candidate pays the
compilation). On the CPU they run in the fused C kernels of the one-shot merge
(``_kernels.c``), one pass per tensor with that tensor's parameters and masks, the tensors
shared out over the threads (``_native_pieces``).

Covered: ``task_arithmetic``, ``ties`` and ``dare_linear`` / ``dare_ties`` (with ``rescale``
true or false); anything else (and a candidate whose tensors disagree on ``normalize`` or
``rescale``) takes the per-tensor path.
"""

from __future__ import annotations

import contextlib
import os
import threading
import types

import numpy as np
import torch
from torch import Tensor

from . import native
from .methods import METHODS, _chunk, _combine_masked, _work_dtype, dare_draw, dare_state, dare_stream, sorted_cuts

__all__ = ["FlatGroup", "FLAT_METHODS", "agree", "elect", "merge_deltas"]

# method -> (sparsification, consensus): the registry's task-arithmetic methods whose
# sparsification the flat path implements
FLAT_METHODS = {name: spec.family for name, spec in METHODS.items()
                if spec.family is not None and spec.family[0] in (None, "magnitude", "random")}

CPU_CHUNK = 1 << 16  # entries per model per operation on a CPU: a few such buffers stay in cache
COMPILED_CHUNK = 1 << 24


def _combine(B: Tensor, T: Tensor, C: Tensor, WS, W, LAM, mask_in: tuple, sparsify, consensus: bool,
             cd: torch.dtype, dt: torch.dtype, out: Tensor | None = None) -> Tensor:
    """A piece of a block (``B``: (m, n), ``T``: (k, m, n)) with parameters as columns
    (``C``, ``W``: (k, m, 1); ``WS``, ``LAM``: (m, 1)): the operations of
    ``methods._general_task_arithmetic``, in the same order (so the same roundings). With
    ``out`` of the working dtype, the result is computed in it (no copy)."""
    b = B.to(cd).to(dt)
    D = T.to(cd).to(dt) - b
    if sparsify == "magnitude":
        v, below, tie, local = mask_in
        # entries > below are kept; before position `tie`, entries equal to v are not
        thr = below if local is None else torch.where(local < tie, v, below)
        M = torch.abs(D).sub_(thr).sign_().clamp_(min=0)
        D.mul_(M.mul_(C))
    elif sparsify == "random":
        U, T16 = mask_in
        M = (U < T16).to(dt)
        D.mul_(M.mul_(C))
    else:
        D.mul_(C)
    mixed = out if out is not None and out.dtype == b.dtype else torch.empty_like(b)
    return _combine_masked(D, b, mixed, consensus=consensus, W=W, WS=WS, LAM=LAM)


def _combine_by_model(B: Tensor, T: Tensor, C: Tensor, WS, W, LAM, mask_in: tuple, sparsify, consensus: bool,
                      cd: torch.dtype, dt: torch.dtype) -> Tensor:
    """``_combine`` written model by model, out of place: the same operations on the same
    values in the same order (so the same bits), but with no reduction over the models'
    dimension, so that ``torch.compile`` fuses the whole piece into one elementwise loop
    that reads each input once (a reduction over a short leading dimension would be a
    separate loop, each reading ``T`` again)."""
    k = T.shape[0]
    b = B.to(cd).to(dt)
    Ds = []
    for j in range(k):
        D = T[j].to(cd).to(dt) - b
        if sparsify == "magnitude":
            v, below, tie, local = mask_in
            thr = below[j] if local is None else torch.where(local < tie[j], v[j], below[j])
            D = D * ((torch.abs(D) - thr).sign().clamp(min=0) * C[j])
        elif sparsify == "random":
            U, T16 = mask_in
            D = D * ((U[j] < T16[j]).to(dt) * C[j])
        else:
            D = D * C[j]
        Ds.append(D)
    return merge_deltas(Ds, b, WS=WS, W=W, LAM=LAM, consensus=consensus)


def elect(Ds: list[Tensor]) -> Tensor:
    """TIES's elected sign of each entry: +1 where the sum of the (weighted, masked) task
    vectors ``Ds`` is >= 0 (zero counts as positive), else -1."""
    S = Ds[0]
    for D in Ds[1:]:
        S = S + D
    return (-S).sign().clamp(min=0) * -2 + 1


def agree(D: Tensor, el: Tensor) -> Tensor:
    """1 where ``D``'s sign is the elected one, else 0 (a zero never agrees)."""
    return (torch.sign(D) * el).clamp(min=0)


def merge_deltas(Ds: list[Tensor], b: Tensor, *, WS=None, W=None, LAM=None, consensus: bool = False) -> Tensor:
    """theta0 + LAM * combine_k(D_k), out of place and model by model: the task-arithmetic
    family's combination of weighted, masked task vectors ``Ds`` (``methods.
    _general_task_arithmetic``'s, operation for operation). ``combine`` is the sum, divided
    by ``WS`` where given, or with ``consensus`` TIES's disjoint merge (the agreeing entries
    summed, divided by their summed weights ``W`` where given). Differentiable in every
    input: the compiled flat path fuses it, and AdaMerging learns its coefficients
    through it."""
    if consensus:
        el = elect(Ds)
        mixed = div = None
        for j, D in enumerate(Ds):
            A = agree(D, el)
            mixed = D * A if mixed is None else mixed + D * A
            if W is not None:
                div = A * W[j] if div is None else div + A * W[j]
        if W is not None:
            mixed = mixed / (div + (-(torch.sign(div).abs()) + 1))
    else:
        mixed = Ds[0]
        for D in Ds[1:]:
            mixed = mixed + D
        if WS is not None:
            mixed = mixed / WS
    if LAM is not None:
        mixed = mixed * LAM
    return mixed + b


def _combine_into(out: Tensor, *args) -> Tensor:
    """``_combine_by_model`` written into ``out``, and the float32 sum of what was
    written (a finiteness check): compiled, all of it is one pass."""
    out.copy_(_combine_by_model(*args))
    return out.sum(dtype=torch.float32)


_MODEL = np.dtype(native.Model)  # the kernels' per-model input, as a NumPy record
MAX_LANES = 4  # threads a CPU merge shares its tensors out over: memory bandwidth is shared
_POOLS: dict[int, object] = {}
_POOLS_LOCK = threading.Lock()
# a forked child has none of the pools' threads (an executor there would wait for ever)
if hasattr(os, "register_at_fork"):  # POSIX
    os.register_at_fork(after_in_child=_POOLS.clear)


def _pool(lanes: int):
    from concurrent.futures import ThreadPoolExecutor

    with _POOLS_LOCK:
        p = _POOLS.get(lanes)
        if p is None:
            p = _POOLS[lanes] = ThreadPoolExecutor(lanes, thread_name_prefix="evomerge-flat")
    return p


LANE_WORK = 1 << 16  # entries below which a second thread is not worth starting
PIECE_ALIGN = 1024  # where a tensor may be cut between threads (DARE's streams draw 4 entries at a time)
PIECES_PER_LANE = 4  # a thread's share is cut in about this many pieces, at most


def _native_pieces(sizes: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """The kernels' work over segments of ``sizes`` for ``threads`` threads (up to
    ``MAX_LANES``; fewer where the work is small): pieces (segment, start, length) of at
    most ``1 / PIECES_PER_LANE`` of a thread's share (a large tensor, an embedding, is cut at multiples of
    ``PIECE_ALIGN``), and per thread a range of consecutive pieces of about equal entries."""
    total = int(sizes.sum())
    lanes = max(1, min(int(threads), MAX_LANES, total // LANE_WORK or 1))
    unit = max(PIECE_ALIGN, -(-total // (PIECES_PER_LANE * lanes) // PIECE_ALIGN) * PIECE_ALIGN) if lanes > 1 else max(total, 1)
    seg, start, length = [], [], []
    for i, n in enumerate(int(x) for x in sizes):
        for a in range(0, n, unit):
            seg.append(i)
            start.append(a)
            length.append(min(unit, n - a))
    seg, start, length = (np.array(x, dtype=np.int64) for x in (seg, start, length))
    if lanes == 1:
        return seg, start, length, [(0, len(seg))]
    ends = np.searchsorted(np.cumsum(length), [total * (i + 1) / lanes for i in range(lanes - 1)], side="left") + 1
    cuts = [0, *sorted({int(e) for e in ends if 0 < e < len(seg)}), len(seg)]
    return seg, start, length, [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


_COMPILED: dict[tuple, object] = {}

# Pieces of a group come in a handful of shapes, each of which may specialise the compiled
# kernel (a dimension of 1, sizes that happen to be equal): a search stays within these
# limits, and none of them may turn into a failure.
_RECOMPILES = 64


def _compile_scope():
    """torch.compile's settings while the flat path's kernels run (this scope only)."""
    import torch._dynamo.config as dynamo_config
    import torch.fx.experimental._config as fx_config

    stack = contextlib.ExitStack()
    stack.enter_context(dynamo_config.patch(recompile_limit=_RECOMPILES))
    stack.enter_context(fx_config.patch(use_duck_shape=False))
    return stack


def _compiled_combine(key: tuple):
    """``_combine_into`` through ``torch.compile`` (shapes dynamic): one fused kernel per
    piece (the merge, the store and the check) instead of a pass per operation. Each
    configuration ``key`` (method, dtypes, number of models, ...) compiles its own copy of
    the function, so that a process merging many configurations never runs out of
    torch's recompilations per function."""
    fn = _COMPILED.get(key)
    if fn is None:
        code = _combine_into.__code__.replace(co_name=f"_combine_into_{len(_COMPILED)}")
        f = types.FunctionType(code, _combine_into.__globals__, code.co_name)
        fn = _COMPILED[key] = torch.compile(f, dynamic=True, fullgraph=True)
    return fn


class FlatGroup:
    """Tensors sharing a base and the same models, stored as one flat vector per model,
    in blocks of equal-sized tensors.

    Args:
        names: the output tensors, in plan order.
        base: each tensor's base weights.
        models: ``models[i][j]`` is model j's weights for tensor i.
        device: where the buffers live.
        dtype: the stored dtype.
        compile: run the arithmetic through ``torch.compile``.
        buffers: the flat ``(B, T)`` of an identical group (``buffers()``) to adopt instead
            of copying ``base`` and ``models`` into new ones (then only their shapes are
            used: they may be meta tensors). Adopted buffers on the group's device are
            used as they are (they are never written to), others are copied there once.

    ``order`` gives, for each stored segment, the index of its tensor in ``names``.
    """

    def __init__(self, names: list[str], base: list[Tensor], models: list[list[Tensor]], device, dtype,
                 compile: bool = False, buffers: tuple[Tensor, Tensor] | None = None):
        self.compile = compile
        sizes = np.array([b.numel() for b in base], dtype=np.int64)
        self.order = [int(i) for i in np.argsort(sizes, kind="stable")]
        self.names = [names[i] for i in self.order]
        self.shapes = [tuple(base[i].shape) for i in self.order]
        self.k = len(models[0])
        self.sizes = sizes[self.order]
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n = int(self.offsets[-1])
        self.device = torch.device(device)
        if buffers is not None:
            B, T = buffers
            if tuple(B.shape) != (self.n,) or tuple(T.shape) != (self.k, self.n) or B.dtype != dtype \
                    or T.dtype != dtype:
                raise ValueError(f"flat buffers {tuple(B.shape)}/{tuple(T.shape)} {B.dtype} do not fit a group "
                                 f"of {self.k} models x {self.n} {dtype} entries")
            self.B, self.T = B.to(self.device), T.to(self.device)
        else:
            self.B = torch.empty(self.n, dtype=dtype, device=self.device)
            self.T = torch.empty(self.k, self.n, dtype=dtype, device=self.device)
            for seg, i in enumerate(self.order):
                s, e = self.offsets[seg], self.offsets[seg + 1]
                self.B[s:e].copy_(base[i].reshape(-1))
                for j, t in enumerate(models[i]):
                    self.T[j, s:e].copy_(t.reshape(-1))
        # blocks: runs of segments of one size; pieces: (first segment, last + 1, column
        # range) small enough for one pass (rows of a block, or columns of a large tensor)
        step = _chunk(self.device) if self.device.type != "cpu" else CPU_CHUNK
        if compile:  # one fused kernel keeps nothing but its inputs and output in memory
            step = max(step, COMPILED_CHUNK)
        self.pieces = []
        seg = 0
        while seg < len(self.sizes):
            n = int(self.sizes[seg])
            end = seg
            while end < len(self.sizes) and self.sizes[end] == n:
                end += 1
            if n:
                rows = max(1, step // n)
                for a in range(seg, end, rows):
                    b = min(end, a + rows)
                    for c in range(0, n, step):
                        self.pieces.append((a, b, c, min(n, c + step)))
            seg = end
        self.widest = max((d - c for _, _, c, d in self.pieces), default=0)
        self._sorted: tuple[Tensor, Tensor] | None = None
        self._rng: tuple | None = None  # DARE's streams where the kernels' pieces start
        self._native_work: dict[int, tuple] = {}  # the kernels' pieces, per thread count
        self._native_ptrs: tuple | None = None  # (threads, output), and the kernels' pointers for them
        self._uniform: Tensor | None = None
        self._uniform_seeds = None
        self._out: tuple[Tensor, list[Tensor]] | None = None
        self._spare: tuple[Tensor, list[Tensor]] | None = None
        self._consts: dict = {}  # small constant tensors the candidates share (made once)
        self._piece_views: dict = {}  # block views of kept tensors, per piece (``_views``)
        self.bound_to = None  # a weak reference to the model whose parameters live in the output

    def output(self, dtype: torch.dtype, spare: bool = False) -> tuple[Tensor, list[Tensor]]:
        """The flat buffer candidates are merged into (made once per dtype), and its
        segments shaped as the tensors, in ``names`` order. ``spare``: a second one, for
        models other than the one whose parameters live in the first (``bound_to``)."""
        slot = "_spare" if spare else "_out"
        cur = getattr(self, slot)
        if cur is None or cur[0].dtype != dtype:
            if cur is not None:  # the replaced buffer's block views go with it (they would pin it)
                old = cur[0].data_ptr()
                for key in [k for k, v in self._piece_views.items() if isinstance(k, tuple) and v[0][0] == old]:
                    del self._piece_views[key]
            buf = torch.empty(self.n, dtype=dtype, device=self.device)
            views = [buf[self.offsets[j]:self.offsets[j + 1]].view(shape) for j, shape in enumerate(self.shapes)]
            cur = (buf, views)
            setattr(self, slot, cur)
        return cur

    def _const(self, key: tuple, make) -> Tensor:
        t = self._consts.get(key)
        if t is None:
            t = self._consts[key] = make()
        return t

    def segment(self, name_index: int) -> slice:
        """The flat range of tensor ``names_in_plan_order[name_index]``."""
        seg = self.order.index(name_index)
        return slice(int(self.offsets[seg]), int(self.offsets[seg + 1]))

    def _views(self, x: Tensor, role: str) -> list[Tensor]:
        """``x`` (a flat ``(..., n)`` tensor: the inputs ``B``/``T``, DARE's uniforms ``U``,
        an output) as one block view per piece, made once: a candidate then slices nothing.
        One tensor is kept per role (a new one replaces it), and a few outputs."""
        key = (x.data_ptr(), x.dtype, tuple(x.shape))
        slot = role if role != "out" else key
        hit = self._piece_views.get(slot)
        if hit is None or hit[0] != key:
            if role == "out" and len([k for k in self._piece_views if isinstance(k, tuple)]) >= 4:
                del self._piece_views[next(k for k in self._piece_views if isinstance(k, tuple))]
            hit = self._piece_views[slot] = (key, [self._block(x, *piece) for piece in self.pieces])
        return hit[1]

    def _block(self, x: Tensor, a: int, b: int, c: int, d: int) -> Tensor:
        """Segments a..b (of one size) of a flat (..., n) tensor as (..., b - a, width)."""
        n = int(self.sizes[a])
        s = int(self.offsets[a])
        return x[..., s:s + (b - a) * n].unflatten(-1, (b - a, n))[..., c:d]

    # ----------------------------------------------------------------------------------
    # What does not change between candidates
    # ----------------------------------------------------------------------------------
    def _sorted_magnitudes(self, dt) -> tuple[Tensor, Tensor]:
        """Each model's |tau| sorted within each segment (stable: ties keep position
        order), with the positions (within the segment) they came from."""
        if self._sorted is None:
            vals = torch.empty(self.k, self.n, dtype=dt, device=self.device)
            pos = torch.empty(self.k, self.n, dtype=torch.int32, device=self.device)
            for i in range(len(self.names)):
                s, e = self.offsets[i], self.offsets[i + 1]
                a = (self.T[:, s:e].to(dt) - self.B[s:e].to(dt)).abs_()
                v, o = torch.sort(a, dim=1, stable=True)
                vals[:, s:e] = v
                pos[:, s:e] = o
            self._sorted = (vals, pos)
        return self._sorted

    def _uniforms(self, seeds: np.ndarray) -> Tensor:
        """DARE's 16-bit uniforms (minus 32768, as int16), the same stream per (seed,
        tensor, model) as the per-tensor masks draw."""
        if self._uniform is None or not np.array_equal(self._uniform_seeds, seeds):
            u = np.empty((self.k, self.n), dtype=np.int16)
            for i in range(len(self.names)):
                s, e = int(self.offsets[i]), int(self.offsets[i + 1])
                for j in range(self.k):
                    raw = dare_draw(dare_stream(seeds[j, i]), e - s)
                    u[j, s:e] = (raw.astype(np.int32) - 32768).astype(np.int16)
            self._uniform = torch.from_numpy(u).to(self.device)
            self._uniform_seeds = seeds.copy()
        return self._uniform

    # ----------------------------------------------------------------------------------
    # A candidate
    # ----------------------------------------------------------------------------------
    def _masks(self, sparsify, table: dict) -> dict:
        """A candidate's per-(model, tensor) mask parameters, ``(k, S)`` arrays, as the
        per-tensor masks of ``methods`` derive them, for both backends: ``rank`` (magnitude:
        entries of ascending rank >= it are kept; 0 keeps all), ``thresh`` (DARE: uniforms
        below it, of 65536, are kept), ``scale`` (DARE's rescale) and ``nothing`` (the pairs
        that keep no entry); ``ws`` is the weights' sum per tensor, summed model by model as
        the per-tensor path sums a list."""
        w = table["weight"]
        k, S = w.shape
        dens = table["density"] if sparsify is not None else np.ones((k, S))
        n = self.sizes[None, :]
        out = {"scale": np.ones((k, S)), "nothing": np.zeros((k, S), dtype=bool)}
        if sparsify == "magnitude":
            keep = np.where((dens > 0) & (n > 0), np.maximum(1, (dens * n).astype(np.int64)), 0)
            out["rank"] = rank = np.where(dens >= 1, 0, n - keep)
            out["nothing"] = rank >= n
        elif sparsify == "random":
            thresh = np.clip(np.rint(dens * 65536), 0, 65536).astype(np.int64)
            out["thresh"] = thresh = np.where(dens >= 1, 65536, thresh)
            out["nothing"] = thresh == 0
            if table.get("rescale", False) is True:
                out["scale"] = np.where((dens < 1) & (thresh > 0), 1.0 / np.where(dens > 0, dens, 1.0), 1.0)
        ws = w[0] + 0.0
        for row in w[1:]:
            ws = ws + row
        out["ws"] = ws
        return out

    def merge(self, method: str, table: dict, out: Tensor, compute_dtype=None) -> Tensor:
        """Merge every segment into the flat ``out`` (length n, any float dtype); returns
        the float32 sum of ``out`` (not finite if any merged value is not).

        ``table`` holds the segments' parameters, in ``names`` order: ``weight`` and (for
        the sparsifying methods) ``density`` as ``(k, S)`` arrays, ``lambda`` as ``(S,)``
        (absent: 1), ``seeds`` ``(k, S)`` for DARE, and one ``normalize`` and ``rescale``."""
        sparsify, consensus = FLAT_METHODS[method]
        k, S = self.k, len(self.names)
        cd = compute_dtype or self.B.dtype
        dt = _work_dtype(torch.empty(0, dtype=cd))
        lib = None if self.compile else self._kernels(cd, out)
        if lib is not None:
            return self._merge_native(lib, sparsify, consensus, table, out.view(-1))
        w = table["weight"]  # (k, S)
        lam = table.get("lambda")
        lam = np.ones(S) if lam is None else lam
        normalize = bool(table.get("normalize", False))
        dev = self.device
        mk = self._masks(sparsify, table)

        def col(x, dtype=dt):  # a per-(model, segment) table as (k, S, 1) on the device
            return torch.as_tensor(np.ascontiguousarray(x), dtype=dtype).to(dev).unsqueeze(-1)

        cuts = ties = uniforms = t16 = None
        if sparsify == "magnitude":
            v, below, tie = self._thresholds(mk["rank"], dt)
            cuts = (v.unsqueeze(-1), below.unsqueeze(-1), tie.unsqueeze(-1))
            ties = bool((tie > 0).any())  # one synchronisation: is any cut inside a run of equal values
        elif sparsify == "random":
            uniforms = self._uniforms(table["seeds"])
            t16 = col(mk["thresh"] - 32768, torch.int32)
        # a model that keeps nothing is multiplied by +0, as the per-tensor masks do: its
        # weight is not applied (0 times a negative weight is -0, which flips zeros' signs)
        C = col(np.where(mk["nothing"], 1.0, w * mk["scale"]))
        WS = W = LAM = None
        if normalize and not consensus:
            ws = mk["ws"]
            WS = col(np.where(np.abs(ws) >= 1e-8, ws, 1.0)[None, :])[0]
        if normalize and consensus:
            W = col(w)
        if (lam != 1).any():
            LAM = col(lam[None, :])[0]

        if self.compile:  # no optional inputs: each None would be one more compiled variant
            ones = self._const(("ones", dt), lambda: torch.ones(S, 1, dtype=dt, device=dev))
            LAM = ones if LAM is None else LAM
            if not consensus:
                WS = ones if WS is None else WS
            fn = _compiled_combine((sparsify, consensus, W is not None, k, cd, dt, dev.type))
        o = out.view(-1)
        sums = []
        Bv, Tv, Ov = self._views(self.B, "B"), self._views(self.T, "T"), self._views(o, "out")
        Uv = self._views(uniforms, "U") if sparsify == "random" else None
        with _compile_scope() if self.compile else contextlib.nullcontext():
            for p, (a, b, c, d) in enumerate(self.pieces):
                if sparsify == "magnitude":
                    local, tie = None, cuts[2][:, a:b]
                    if ties or self.compile:  # positions within the piece, and the tie cut shifted to match
                        local = self._const(("arange",), lambda: torch.arange(self.widest, device=dev))[: d - c]
                        tie = tie - c
                    mask_in = (cuts[0][:, a:b], cuts[1][:, a:b], tie, local)
                elif sparsify == "random":
                    mask_in = (Uv[p], t16[:, a:b])
                else:
                    mask_in = ()
                args = (Bv[p], Tv[p], C[:, a:b],
                        None if WS is None else WS[a:b], None if W is None else W[:, a:b],
                        None if LAM is None else LAM[a:b], mask_in, sparsify, consensus, cd, dt)
                if self.compile:
                    sums.append(fn(Ov[p], *args))
                else:
                    res = _combine(*args, out=Ov[p])
                    if res is not Ov[p]:  # another dtype than the working one: rounded here
                        Ov[p].copy_(res)
        return torch.stack(sums).sum() if sums else out.sum(dtype=torch.float32)

    # ----------------------------------------------------------------------------------
    # The CPU backend: the fused kernels, a tensor per call (``_kernels.c``)
    # ----------------------------------------------------------------------------------
    def _kernels(self, cd: torch.dtype, out: Tensor):
        """The fused kernels where they give this group's torch path's bits: on the CPU,
        inputs and output of dtypes they take, and a compute dtype that rounds nothing
        (the stored one, or float32, to which every stored dtype widens exactly). On 4 x
        18.9M float32 parameters, 2 threads (``scripts/bench_search.py``), TIES took 13.4 ms
        in them against 165 ms in torch, and plain task arithmetic 9.5 against 34.7 (it
        took 31 against 25 before float32 inputs were read by the fused steps too)."""
        if cd not in (self.B.dtype, torch.float32):
            return None
        return native.active(self.B, self.T, out)

    def _work(self, threads: int) -> tuple:
        """``_native_pieces`` for this group and thread count (made once)."""
        hit = self._native_work.get(threads)
        if hit is None:
            hit = self._native_work[threads] = _native_pieces(self.sizes, threads)
        return hit

    def _rng_states(self, seeds: np.ndarray, seg: np.ndarray, start: np.ndarray) -> np.ndarray:
        """DARE's random streams where each piece starts, ``(pieces, k, 4)``: the stream of
        each (seed, tensor, model) the per-tensor masks draw, advanced to the piece's first
        entry (4 entries a draw), for the kernels to go on from. Made once per seeds and
        pieces."""
        key = (seg.tobytes(), start.tobytes())
        if self._rng is None or self._rng[1] != key or not np.array_equal(self._rng[0], seeds):
            st = np.empty((len(seg), self.k, 4), dtype=np.uint64)
            for q, (i, a) in enumerate(zip(seg, start)):
                for j in range(self.k):
                    st[q, j] = dare_state(dare_stream(seeds[j, i], int(a)))
            self._rng = (seeds.copy(), key, st)
            return st
        return self._rng[2]

    def _merge_native(self, lib, sparsify, consensus: bool, table: dict, o: Tensor) -> Tensor:
        """``merge`` through the fused kernels: each tensor as the one-shot merge's kernel
        merges it (one pass over its inputs), with the same per-tensor parameters and masks
        (cuts from the cached sorted magnitudes, DARE's streams), so the same bits. The
        tensors, a large one cut in pieces, are shared out over up to
        ``torch.get_num_threads()`` threads (the kernels run without the GIL)."""
        with np.errstate(over="ignore"):  # a weight beyond float32 becomes inf, as on the torch path
            return self._run_native(lib, sparsify, consensus, table, o)

    def _pointers(self, threads: int, o: Tensor) -> tuple:
        """What a candidate's kernel calls share with the last one's into the same output:
        the pieces for this thread count, the models' records with their pointers and
        dtypes, and the base's and output's pointers per piece (made once per output)."""
        key = (threads, o.data_ptr(), o.dtype)
        hit = self._native_ptrs
        if hit is not None and hit[0] == key:
            return hit[1]
        seg, start, length, bounds = self._work(threads)
        k = self.k
        models = np.zeros((len(seg), k), dtype=_MODEL)
        first = self.offsets[:-1][seg] + start  # each piece's first entry in the flat buffers
        models["ptr"] = self.T.data_ptr() + (np.arange(k)[None, :] * self.n + first[:, None]) * self.T.element_size()
        models["dtype"] = native.DTYPE_CODES[self.T.dtype]
        base = (self.B.data_ptr() + first * self.B.element_size()).astype(np.uint64)
        outp = (o.data_ptr() + first * o.element_size()).astype(np.uint64)
        made = (seg, start, length, bounds, models, base, outp)
        self._native_ptrs = (key, made)
        return made

    def _run_native(self, lib, sparsify, consensus: bool, table: dict, o: Tensor) -> Tensor:
        k, S = self.k, len(self.names)
        seg, start, length, bounds, template, base, outp = self._pointers(torch.get_num_threads(), o)
        w = np.asarray(table["weight"], dtype=np.float64)  # (k, S)
        lam = table.get("lambda")
        lam = np.ones(S) if lam is None else np.asarray(lam, dtype=np.float64)
        normalize = bool(table.get("normalize", False))
        mk = self._masks(sparsify, {**table, "weight": w})
        n = self.sizes[None, :]
        models = template.copy()  # every field but the pointers and dtypes is set below
        models["weight"] = w.T[seg]
        kind = np.full((k, S), native.MASK_ALL, dtype=np.int32)
        if sparsify == "magnitude":
            rank = mk["rank"]
            cut = (rank > 0) & (rank < n)
            kind = np.where(cut, native.MASK_CUT, np.where(rank >= n, native.MASK_NONE, native.MASK_ALL))
            if cut.any():
                v, _, tie = self._thresholds(rank, torch.float32)
                models["has_start"] = cut.T[seg]
                models["start_v"] = v.numpy().T[seg]
                # equal magnitudes are kept from position tie on, counted from the piece's start
                models["start_pos"] = tie.numpy().T[seg] - start[:, None]
        elif sparsify == "random":
            thresh = mk["thresh"]
            kind = np.where(thresh >= 65536, native.MASK_ALL, np.where(thresh == 0, native.MASK_NONE,
                                                                        native.MASK_RANDOM))
            models["thresh"] = np.minimum(thresh, 65535).T[seg]
            models["rng"] = self._rng_states(table["seeds"], seg, start)
        models["kind"] = kind.T[seg]
        models["coef"] = (w * mk["scale"]).T[seg]
        block = native.Block(
            base=base, bdt=native.DTYPE_CODES[self.B.dtype], length=length, k=k, models=models,
            consensus=consensus, normalize=normalize,
            div_sum=((not consensus) & normalize & (np.abs(mk["ws"]) >= 1e-8))[seg], wdiv=mk["ws"][seg],
            scale_lambda=(lam != 1)[seg], lam=lam[seg], out=outp, odt=native.DTYPE_CODES[o.dtype])

        def run(bound: tuple[int, int]) -> int:
            return native.merge_block(lib, block, *bound)

        rcs = [run(bounds[0])] if len(bounds) == 1 else list(_pool(len(bounds)).map(run, bounds))
        if any(rc < 0 for rc in rcs):
            rc = min(rcs)
            raise OSError(-rc, os.strerror(-rc))
        return torch.tensor(float("inf") if any(rcs) else 0.0)

    def _thresholds(self, rank: np.ndarray, dt) -> tuple[Tensor, Tensor, Tensor]:
        """Per (model, segment) the magnitude cut keeping ranks >= ``rank``, as
        ``(v, below, tie)``: entries > ``below`` (the float just under the value ``v`` at
        that rank) are kept, except that entries equal to ``v`` at positions before
        ``tie`` (0 where the cut is not inside a run of equal values) stay out. ``below``
        is -inf to keep everything, +inf to keep nothing."""
        vals, pos = self._sorted_magnitudes(dt)
        k, S = rank.shape
        n = self.sizes[None, :]
        valid = (rank > 0) & (rank < n)
        g = np.minimum(np.where(valid, self.offsets[None, :-1] + np.clip(rank, 1, None), 1), self.n - 1)
        fl = np.arange(k)[:, None] * self.n + g
        if self.device.type == "cpu":  # a few hundred lookups: NumPy, without torch's per-operation cost
            v, tie = sorted_cuts(vals.numpy().reshape(-1), pos.numpy().reshape(-1), fl)
            inf = np.full_like(v, np.inf)
            below = np.where(valid, np.nextafter(v, -inf), np.where(rank >= n, inf, -inf))
            return torch.from_numpy(v), torch.from_numpy(below), torch.from_numpy(np.where(valid, tie, 0))
        v, tie = sorted_cuts(vals.reshape(-1), pos.reshape(-1), torch.as_tensor(fl, device=self.device))
        validt = torch.as_tensor(valid, device=self.device)
        inf = torch.full_like(v, float("inf"))
        none = torch.as_tensor(rank >= n, device=self.device)
        below = torch.where(validt, torch.nextafter(v, -inf), torch.where(none, inf, -inf))
        return v, below, torch.where(validt, tie, torch.zeros_like(tie))
