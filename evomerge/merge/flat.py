"""The task-arithmetic family over one flat vector: a candidate in a few dozen operations.

The per-tensor path of the merge core spends, per tensor and model, a handful of small
operations (and, on a GPU, a synchronisation for every magnitude threshold), so a model of
hundreds of tensors costs thousands of operations per candidate. A ``FlatGroup`` holds the
inputs of many tensors back to back in one flat buffer per model, with the tensors as
*segments*; a candidate's per-tensor parameters (weights, densities, lambda) become short
per-segment tables, expanded chunk by chunk to per-entry values, and the method runs over
the whole buffer at once. The arithmetic is, entry by entry, the same sequence of
operations as ``methods._general_task_arithmetic``, so the weights are bit-identical to the
one-shot merge.

Covered: ``task_arithmetic``, ``ties`` and ``dare_linear`` / ``dare_ties`` (with ``rescale``
true or false); anything else (and a candidate whose tensors disagree on ``normalize`` or
``rescale``) takes the per-tensor path.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .methods import _chunk, _rowsum, _work_dtype

__all__ = ["FlatGroup", "FLAT_METHODS"]

# method -> (sparsification, consensus)
FLAT_METHODS = {
    "task_arithmetic": (None, False),
    "ties": ("magnitude", True),
    "dare_linear": ("random", False),
    "dare_ties": ("random", True),
}

CPU_CHUNK = 1 << 16


class FlatGroup:
    """Tensors sharing a base and the same models, stored as one flat vector per model.

    Args:
        names: the output tensors, in plan order.
        base: each tensor's base weights.
        models: ``models[i][j]`` is model j's weights for tensor i.
        device: where the buffers live.
        dtype: the stored dtype.
    """

    def __init__(self, names: list[str], base: list[Tensor], models: list[list[Tensor]], device, dtype):
        self.names = list(names)
        self.k = len(models[0])
        self.sizes = np.array([b.numel() for b in base], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n = int(self.offsets[-1])
        self.device = torch.device(device)
        self.B = torch.empty(self.n, dtype=dtype, device=self.device)
        self.T = torch.empty(self.k, self.n, dtype=dtype, device=self.device)
        for i, (b, ts) in enumerate(zip(base, models)):
            s, e = self.offsets[i], self.offsets[i + 1]
            self.B[s:e].copy_(b.reshape(-1))
            for j, t in enumerate(ts):
                self.T[j, s:e].copy_(t.reshape(-1))
        step = _chunk(self.device) if self.device.type != "cpu" else CPU_CHUNK
        self.chunks = []  # (start, stop, segment ids, entries of each segment in the chunk)
        for s in range(0, self.n, step):
            e = min(self.n, s + step)
            first = int(np.searchsorted(self.offsets, s, side="right")) - 1
            last = int(np.searchsorted(self.offsets, e, side="left"))  # exclusive
            ids = np.arange(first, last)
            counts = np.minimum(self.offsets[ids + 1], e) - np.maximum(self.offsets[ids], s)
            pieces = [(int(i), int(a), int(a + c)) for i, a, c in
                      zip(ids, np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)]
            self.chunks.append((s, e, torch.as_tensor(ids, device=self.device),
                                torch.as_tensor(counts, device=self.device), pieces))
        self._sorted: tuple[Tensor, Tensor] | None = None
        self._uniform: Tensor | None = None

    def base_view(self, i: int) -> Tensor:
        return self.B[self.offsets[i]:self.offsets[i + 1]]

    def model_view(self, i: int, j: int) -> Tensor:
        return self.T[j, self.offsets[i]:self.offsets[i + 1]]

    @property
    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self._sorted or ()))
        if self._uniform is not None:
            extra += self._uniform.numel() * self._uniform.element_size()
        return (self.B.numel() + self.T.numel()) * self.B.element_size() + extra

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
                    g = np.random.SFC64(int(seeds[j, i]) & 0xFFFF_FFFF_FFFF_FFFF)
                    raw = g.random_raw((e - s + 3) // 4).view(np.uint16)[: e - s]
                    u[j, s:e] = (raw.astype(np.int32) - 32768).astype(np.int16)
            self._uniform = torch.from_numpy(u).to(self.device)
            self._uniform_seeds = seeds.copy()
        return self._uniform

    # ----------------------------------------------------------------------------------
    # A candidate
    # ----------------------------------------------------------------------------------
    def merge(self, method: str, params: list[dict], out: Tensor, compute_dtype=None) -> None:
        """Merge every segment into the flat ``out`` (length n, any float dtype).

        ``params[i]`` are tensor i's resolved method parameters (as the per-tensor path
        receives them)."""
        sparsify, consensus = FLAT_METHODS[method]
        k, S = self.k, len(self.names)
        cd = compute_dtype or self.B.dtype
        dt = _work_dtype(torch.empty(0, dtype=cd))
        w = np.array([p["weight"] for p in params], dtype=np.float64).T  # (k, S)
        lam = np.array([p.get("lambda", 1.0) for p in params], dtype=np.float64)
        normalize = bool(params[0].get("normalize", False))
        rescale = params[0].get("rescale", False)
        dens = (np.array([p["density"] for p in params], dtype=np.float64).T
                if sparsify is not None else np.ones((k, S)))
        n = self.sizes[None, :]

        scale = np.ones((k, S))
        rows = {}
        if sparsify == "magnitude":
            keep = np.where((dens > 0) & (n > 0), np.maximum(1, (dens * n).astype(np.int64)), 0)
            rank = np.where(dens >= 1, 0, n - keep)
            rows["thr"] = self._thresholds(rank, dt)
        elif sparsify == "random":
            thresh = np.clip(np.rint(dens * 65536), 0, 65536).astype(np.int64)
            thresh = np.where(dens >= 1, 65536, thresh)
            if rescale is True:
                scale = np.where((dens < 1) & (thresh > 0), 1.0 / np.where(dens > 0, dens, 1.0), 1.0)
            seeds = np.array([p["seeds"] for p in params], dtype=np.uint64).T
            uniforms = self._uniforms(seeds)
            t16 = torch.as_tensor(thresh - 32768, dtype=torch.int32, device=self.device)
        coef = w * scale
        table = [torch.as_tensor(coef, dtype=dt)]
        if normalize and not consensus:
            ws = np.array([sum(float(x) for x in p["weight"]) for p in params])
            table.append(torch.as_tensor(np.where(np.abs(ws) >= 1e-8, ws, 1.0)[None, :], dtype=dt))
        if normalize and consensus:
            table.append(torch.as_tensor(w, dtype=dt))
        use_lam = bool((lam != 1).any())
        if use_lam:
            table.append(torch.as_tensor(lam[None, :], dtype=dt))
        table = torch.cat(table).to(self.device)
        if "thr" in rows:
            thr_seg, fixups = rows["thr"]
            table = torch.cat([table, thr_seg])

        o = out.view(-1)
        gpu = self.device.type != "cpu"
        for s, e, ids, counts, pieces in self.chunks:
            L = e - s
            X = self._expand(table, ids, counts, pieces, L, gpu)
            C = X[:k]
            r = k
            WS = W = LAM = None
            if normalize and not consensus:
                WS, r = X[r], r + 1
            if normalize and consensus:
                W, r = X[r:r + k], r + k
            if use_lam:
                LAM, r = X[r], r + 1
            b = self.B[s:e].to(cd).to(dt)
            D = self.T[:, s:e].to(cd).to(dt) - b
            if sparsify == "magnitude":
                THR = X[r:r + k]
                for j, fs, fe, v in fixups:  # ties at a cut: the first of them stay out
                    lo, hi = max(fs, s), min(fe, e)
                    if lo < hi:
                        THR[j, lo - s:hi - s] = v
                M = torch.abs(D).sub_(THR).sign_().clamp_(min=0)
                D.mul_(M.mul_(C))
            elif sparsify == "random":
                T16 = self._expand(t16, ids, counts, pieces, L, gpu)
                M = (uniforms[:, s:e] < T16).to(dt)
                D.mul_(M.mul_(C))
            else:
                D.mul_(C)
            mixed = torch.empty(L, dtype=dt, device=self.device)
            if consensus:
                S_ = _rowsum(D, torch.empty_like(mixed))
                el = S_.neg_().sign_().clamp_(min=0).mul_(-2).add_(1)
                A = torch.sign(D).mul_(el).clamp_(min=0)
                _rowsum(D.mul_(A), mixed)
                if normalize:
                    div = _rowsum(A.mul_(W), S_)
                    zero = torch.sign(div).abs_().neg_().add_(1)
                    mixed.div_(div.add_(zero))
            else:
                _rowsum(D, mixed)
                if WS is not None:
                    mixed.div_(WS)
            if LAM is not None:
                mixed.mul_(LAM)
            o[s:e] = mixed.add_(b)

    @staticmethod
    def _expand(table: Tensor, ids: Tensor, counts: Tensor, pieces: list, L: int, gpu: bool) -> Tensor:
        """Per-segment columns repeated over each segment's entries of a chunk: one kernel
        on a GPU; on a CPU (where ``repeat_interleave`` builds an index first) one
        broadcast copy per segment."""
        if gpu:
            return torch.repeat_interleave(table[:, ids], counts, dim=1, output_size=L)
        X = torch.empty(table.shape[0], L, dtype=table.dtype)
        for i, a, b in pieces:
            X[:, a:b] = table[:, i:i + 1]
        return X

    def _thresholds(self, rank: np.ndarray, dt) -> tuple[Tensor, list]:
        """Per (model, segment) the magnitude threshold keeping ranks >= ``rank``: entries
        >= the value at that rank, except that entries equal to it at positions before
        the rank's own stay out (the fixups: (model, start, stop, value))."""
        vals, pos = self._sorted_magnitudes(dt)
        k, S = rank.shape
        n = self.sizes[None, :]
        valid = (rank > 0) & (rank < n)
        g = np.minimum(np.where(valid, self.offsets[None, :-1] + np.clip(rank, 1, None), 1), self.n - 1)
        flat = torch.as_tensor((np.arange(k)[:, None] * self.n + g).reshape(-1), device=self.device)
        v = vals.reshape(-1)[flat].reshape(k, S)
        prev = vals.reshape(-1)[flat - 1].reshape(k, S)
        p = pos.reshape(-1)[flat].reshape(k, S)
        below = torch.nextafter(v, torch.full_like(v, float("-inf")))
        validt = torch.as_tensor(valid, device=self.device)
        inf = torch.full_like(v, float("inf"))
        none = torch.as_tensor(rank >= n, device=self.device)
        thr = torch.where(validt, below, torch.where(none, inf, -inf))
        tie = validt & (prev == v) & (p > 0)
        fixups = []
        idx = torch.nonzero(tie).tolist()
        if idx:
            vv = v[tie].tolist()
            pp = p[tie].tolist()
            for (j, i), val, q in zip(idx, vv, pp):
                s = int(self.offsets[i])
                fixups.append((j, s, s + int(q), val))
        return thr, fixups
