"""The resident merger: inputs loaded once, each candidate merged into a live model.

A search merges the same models thousands of times with different parameters. The
``ResidentMerger`` is a ``Merger`` (``engine.py``) that plans the template recipe once and
reads every input tensor once (onto the device, in the recipe's ``dtype`` or a lower
``store_dtype``); ``materialize(columns, into=model)`` writes a candidate's merged tensors
straight into the model's own parameter storage: no second model, no disk, no reload, and
``write(out_dir, columns, recipe_text=...)`` writes one without reading a checkpoint again.
A candidate is its ``Columns`` (from a compiled search space, ``Space.compile``) or a recipe
that fits the plan (its parameters resolved by the same code as the one-shot
``evomerge-merge``), and gives the one-shot merge's weights bit for bit.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..checkpoint import torch_dtype
from ..recipe import Recipe
from .engine import Merger
from .plan import Columns, MergeError, TensorTask
from .flat import FLAT_METHODS, FlatGroup
from .methods import order_statistics

__all__ = ["ResidentMerger", "SharedInputs"]


def _to_bytes(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _from_bytes(a: np.ndarray, dtype: torch.dtype, shape) -> Tensor:
    with warnings.catch_warnings():  # a shared array is read-only, and is only ever read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a).view(dtype).view(shape)


@dataclass
class SharedInputs:
    """A resident engine's inputs as plain byte arrays, for other processes to adopt
    (``ResidentMerger(recipe, shared=...)``) instead of reading every checkpoint again.
    Ray's object store keeps numpy arrays in shared memory, so workers on one node map
    them without a copy, and a worker on a GPU copies them to its device once.

    ``structure`` is the plan they were made for; ``meta`` gives every input's shape and
    dtype; ``arrays`` holds the inputs outside flat groups, ``groups`` each flat group's
    tensor names and its ``B`` and ``T`` buffers.
    """

    structure: list
    store_dtype: Any
    meta: dict
    arrays: dict
    groups: list

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values()) + sum(b.nbytes + t.nbytes for _, b, t in self.groups)


_MIXED = object()  # a flag whose value differs between a group's tensors


class _GroupSorted(dict):
    """One tensor's magnitude order statistics (``methods.order_statistics``'s cache: per
    model, its sorted |tau| and their positions) read from its flat group's, which sorts
    every tensor of the group once: the sorted magnitudes exist once, whichever path a
    candidate takes."""

    def __init__(self, group: FlatGroup, seg: int):
        super().__init__()
        self.group, self.seg = group, seg

    def __contains__(self, model) -> bool:
        return isinstance(model, int) and 0 <= model < self.group.k

    def __getitem__(self, model: int):
        from .methods import _work_dtype

        vals, pos = self.group._sorted_magnitudes(_work_dtype(self.group.B))
        s, e = int(self.group.offsets[self.seg]), int(self.group.offsets[self.seg + 1])
        return vals[model, s:e], pos[model, s:e]


class ResidentMerger(Merger):
    """A ``Merger`` that keeps its inputs in memory and materializes candidates in place.

    Args:
        recipe: a template recipe: the models, method and slices every candidate shares
            (its parameters are placeholders; each candidate brings its own).
        device: where inputs live and the arithmetic runs.
        seed: seeds DARE/DELLA masks, as in the one-shot path.
        store_dtype: keep inputs in this dtype (e.g. ``bfloat16`` to halve memory); by
            default the recipe's ``dtype`` (or the checkpoint's).
        order_stats: keep each task vector's sorted magnitudes (12 bytes per weight and
            model) after the first candidate, so that magnitude trims (TIES, breadcrumbs)
            with any density cost a lookup instead of a pass over the weights.
        flat: for the task-arithmetic family (task arithmetic, TIES, DARE), keep the
            inputs as one flat vector per model and merge a candidate over all tensors at
            once (``flat.FlatGroup``): the same weights in far fewer operations.
        compile: run the flat path's arithmetic through ``torch.compile`` (one fused
            kernel per chunk; the first candidate pays the compilation).
        shared: the ``SharedInputs`` of an engine built for the same recipe (``share()``):
            adopted instead of reading the checkpoints (only their headers are read).
    """

    hold_statistics = True  # (every candidate reads them: held in memory, not read from the cache each time)

    def __init__(self, recipe: Recipe, *, device: str | torch.device = "cpu", seed: int = 0,
                 store_dtype: str | torch.dtype | None = None, allow_pickle: bool = False,
                 order_stats: bool = True, flat: bool = True, compile: bool = False,
                 shared: SharedInputs | None = None):
        super().__init__(recipe, device=device, seed=seed, allow_pickle=allow_pickle)
        if isinstance(store_dtype, str):
            store_dtype = torch_dtype(store_dtype)
        self.store_dtype = store_dtype
        self._inputs: dict[tuple[Any, str], Tensor] = {}
        self.order_stats = order_stats
        self._stats: dict[str, dict] = {}
        self._structure = self.plan.signature  # what shared inputs must have been made for
        self.bytes_read = 0  # of checkpoint data (none when the inputs are adopted)
        if shared is not None:
            self._adopt(shared)
        else:
            self._load()
        self.compile = compile
        flat = flat and self.method.name in FLAT_METHODS
        if shared is not None and shared.groups and not flat:
            raise MergeError("the shared inputs are stored in flat groups: adopt them with flat=True")
        self._groups = self._flat_groups(shared.groups if shared is not None else None) if flat else []
        # plan index -> (its flat group, its segment there): a candidate that takes the
        # per-tensor path reads the group's sorted magnitudes instead of sorting again
        self._segment = {int(i): (g, seg) for sel, g in self._groups for seg, i in enumerate(sel)}
        # the plan's DARE/DELLA seeds per (tensor, model): fixed for the engine's life
        seeds = self.seeds
        k = max((len(x) for x in seeds if x), default=0)
        self._seeds = np.array([x if x else [0] * k for x in seeds], dtype=np.uint64).reshape(len(seeds), k)
        self._task_shapes = {t.name: tuple(self.shape(t)) for t in self.tasks}
        self._flags: dict[tuple, tuple] = {}  # a candidate's normalize/rescale over a group, by list
        self._live: tuple | None = None  # (model, its tensors' module paths) of the last materialize

    def _load(self) -> None:
        """Read every input once, onto the device, in the stored dtype."""
        for task in self.tasks:
            raw = Merger._read(self, task)
            base, tensors = self._prepare(task, raw)
            prepared = ([base] if task.base else []) + tensors
            for (ref, name), t in zip(task.sources, prepared):
                if (ref, name) in self._inputs:
                    continue
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise MergeError(f"model '{ref}': tensor '{name}' contains NaN or inf")
                self.bytes_read += t.numel() * t.element_size()
                dt = self.store_dtype if self.store_dtype is not None and t.is_floating_point() else t.dtype
                self._inputs[(ref, name)] = t.to(device=self.device, dtype=dt, copy=True)
            del raw, base, tensors, prepared
            Merger._release(self, task)

    def _adopt(self, shared: SharedInputs) -> None:
        """Take the inputs of another engine's ``share()`` (checked when it loaded them)."""
        if shared.structure != self._structure:
            raise MergeError("the shared inputs were made for another recipe (other models or tensors)")
        self.store_dtype = shared.store_dtype
        for key, (shape, dtype) in shared.meta.items():  # flat groups' inputs: views, made below
            self._inputs[key] = torch.empty(shape, dtype=dtype, device="meta")
        for key, a in shared.arrays.items():
            shape, dtype = shared.meta[key]
            self._inputs[key] = _from_bytes(a, dtype, shape).to(self.device)

    def share(self) -> SharedInputs:
        """Every resident input as byte arrays (see ``SharedInputs``)."""
        in_groups = {src for idx, _ in self._groups for i in idx for src in self.tasks[i].sources}
        return SharedInputs(
            structure=self._structure, store_dtype=self.store_dtype,
            meta={k: (tuple(t.shape), t.dtype) for k, t in self._inputs.items()},
            arrays={k: _to_bytes(t) for k, t in self._inputs.items() if k not in in_groups},
            groups=[(g.names, _to_bytes(g.B), _to_bytes(g.T)) for _, g in self._groups])

    def _flat_groups(self, shared: list | None = None) -> list[tuple[np.ndarray, FlatGroup]]:
        """Tensors with a base and the same models, stored back to back (the resident
        inputs become views into the flat buffers, so nothing is held twice); with
        ``shared``, the groups' buffers as ``share()`` gave them."""
        by_key: dict[tuple, list[int]] = {}
        for i, task in enumerate(self.tasks):
            if task.copy or task.base is None:
                continue
            ins = self.inputs(task)
            key = (tuple(ref for ref, _ in task.sources), ins[0].dtype,
                   self.output_dtype(task))
            by_key.setdefault(key, []).append(i)
        groups = []
        if shared is not None and len(shared) != len(by_key):
            raise MergeError(f"the shared inputs hold {len(shared)} flat groups, this plan makes {len(by_key)}")
        for gi, (key, idx) in enumerate(by_key.items()):
            tasks = [self.tasks[i] for i in idx]
            ins = [self.inputs(t) for t in tasks]
            buffers = None
            if shared is not None:
                names, b_bytes, t_bytes = shared[gi]
                k, n = len(ins[0]) - 1, sum(x[0].numel() for x in ins)
                buffers = (_from_bytes(b_bytes, key[1], (n,)), _from_bytes(t_bytes, key[1], (k, n)))
            g = FlatGroup([t.name for t in tasks], [x[0] for x in ins], [x[1:] for x in ins],
                          self.device, key[1], compile=self.compile, buffers=buffers)
            if shared is not None and g.names != names:
                raise MergeError("the shared inputs' flat groups hold other tensors than this plan")
            for j, (t, x) in enumerate(zip(tasks, ins)):
                seg = g.segment(j)
                self._inputs[t.sources[0]] = g.B[seg].view(x[0].shape)
                for m, src in enumerate(t.sources[1:]):
                    self._inputs[src] = g.T[m, seg].view(x[m + 1].shape)
            groups.append((np.array([idx[i] for i in g.order], dtype=np.int64), g))  # plan indices, stored order
        return groups

    def _flat_table(self, cols: Columns, sel: np.ndarray, dsts: list[Tensor]) -> dict | None:
        """A candidate's parameters for a flat group's tensors (``sel``: their plan indices,
        in the group's order), or None where they cannot take the flat path: one value of
        ``normalize`` and ``rescale`` over them (DARE's rescale true or false, TIES's false),
        magnitude order statistics kept, and live parameters of one dtype on the device."""
        sparsify, _ = FLAT_METHODS[cols.method.name]
        if any(p not in cols.numeric for p in ("weight", "density") if p == "weight" or sparsify is not None):
            return None  # values that are no table of numbers (slices of different models): per tensor
        flags = []
        for name in ("normalize", "rescale"):
            vals = cols.other.get(name)
            # a compiled map hands every candidate the same list: its values over the group
            # are read once
            key = (name, sel.ctypes.data)
            hit = self._flags.get(key)
            if hit is None or hit[0] is not vals:
                seen = {False} if vals is None else {vals[i] for i in sel}
                hit = self._flags[key] = (vals, seen.pop() if len(seen) == 1 else _MIXED)
            if hit[1] is _MIXED:
                return None
            flags.append(hit[1])
        normalize, rescale = flags
        if sparsify == "magnitude" and (rescale is not False or not self.order_stats):
            return None
        if sparsify == "random" and rescale not in (True, False):
            return None
        if not (len({d.dtype for d in dsts}) == 1 and all(d.device == self.device for d in dsts)
                and dsts[0].is_floating_point()):
            return None
        table = {"weight": cols.numeric["weight"][sel].T, "normalize": bool(normalize), "rescale": rescale}
        if "lambda" in cols.numeric:
            table["lambda"] = cols.numeric["lambda"][sel]
        if sparsify is not None:
            table["density"] = cols.numeric["density"][sel].T
        if sparsify == "random":
            table["seeds"] = self._seeds[sel].T
        return table

    @property
    def nbytes(self) -> int:
        """Bytes of the resident inputs."""
        return sum(t.numel() * t.element_size() for t in self._inputs.values())

    def inputs(self, task: TensorTask) -> list[Tensor]:
        """A tensor task's resident inputs, the base first (as stored: do not modify)."""
        return [self._inputs[k] for k in task.sources]

    def source(self, model: str) -> dict[str, Tensor]:
        """One merged model's own resident weights, by output tensor name."""
        out = {task.name: self._inputs[(ref, name)]
               for task in self.tasks for ref, name in task.sources if str(ref) == model}
        if not out:
            raise MergeError(f"model {model!r} is not one of the merged models")
        return out

    def _read(self, task: TensorTask) -> list[Tensor]:
        return self.inputs(task)

    def _compiled(self, task, params, base, tensors, out):
        return None  # compile applies to the flat groups; a tensor merged alone takes the method itself

    def _release(self, task: TensorTask) -> None:
        pass  # held for the merger's life

    def _merge(self, cols: Columns, i: int, out: Tensor | None = None, check: bool = True) -> Tensor:
        """``Merger._merge`` on the resident inputs, with magnitude trims reading the
        tensor's cached order statistics (its flat group's sorted magnitudes, if it has one)."""
        if not self.order_stats:
            return super()._merge(cols, i, out, check)
        task = self.tasks[i]
        cache = self._stats.get(task.name)
        if cache is None:
            cache = self._stats[task.name] = _GroupSorted(*self._segment[i]) if i in self._segment else {}
        with order_statistics(cache):
            return super()._merge(cols, i, out, check)

    def merged(self, what: Recipe | Columns | None = None) -> dict[str, Tensor]:
        """Every merged tensor of a candidate (a recipe, or ``Columns``), as new tensors
        (for tests and export)."""
        cols = self._begin(self.candidate(what))
        return {t.name: self._merge(cols, i) for i, t in enumerate(self.tasks)}

    def _live_state(self, into: torch.nn.Module) -> dict[str, Tensor]:
        """``live_state(into)``, fast for the model of the last call: each tensor
        is fetched again along its module path (a replaced parameter or module is found,
        never a stale one written into) and its shape checked again. Walking the whole
        module tree for every candidate cost more than the rest of a small model's fixed
        cost."""
        import weakref

        last = self._live
        if last is None or last[0]() is not into:
            from ..checkpoint import live_names

            state = self.live_state(into)
            live = live_names(into)  # (a checkpoint name's module path is its live name's)
            self._live = (weakref.ref(into),
                          {name: live[name].split(".") for name in state if name in self._task_shapes})
            return state
        state = {}
        for name, path in last[1].items():
            mod = into
            for part in path[:-1]:
                mod = mod._modules.get(part) if mod is not None else None
            t = None if mod is None else (mod._parameters.get(path[-1]) if path[-1] in mod._parameters
                                          else mod._buffers.get(path[-1]))
            if t is None or tuple(t.shape) != self._task_shapes[name]:  # (``p.data = ...`` keeps the object)
                self._live = None
                return self._live_state(into)  # the full check names what is missing or misshapen
            state[name] = t
        return state

    @torch.no_grad()
    def bind(self, model: torch.nn.Module) -> int:
        """Make ``model``'s parameters that the flat path merges views of the flat
        groups' output buffers (their values kept), so that every later candidate is merged
        straight into them instead of into a buffer then copied. For a live model that
        this engine alone writes (a worker's), once, before its first candidate; one model
        per engine (a second one is refused and keeps taking copies). Returns the number
        of parameters bound."""
        import weakref

        state = self.live_state(model)
        bound = 0
        for _, g in self._groups:
            if g.bound_to is not None and g.bound_to() not in (None, model):
                continue
            dsts = [state[n] for n in g.names]
            if (len({d.dtype for d in dsts}) != 1 or any(d.device != self.device for d in dsts)
                    or not dsts[0].is_floating_point()):
                continue
            _, views = g.output(dsts[0].dtype)
            for d, v in zip(dsts, views):
                if d.data_ptr() != v.data_ptr():
                    v.copy_(d)
                    d.data = v
            g.bound_to = weakref.ref(model)
            bound += len(dsts)
        return bound

    @torch.no_grad()
    def materialize(self, what: Recipe | Columns | None = None, *, into: torch.nn.Module) -> None:
        """Write a candidate's merged weights into ``into``'s parameters, in place. The
        candidate is a recipe, or its ``Columns`` (a compiled space's ``columns(x)``)."""
        cols = self._begin(self.candidate(what))
        state = self._live_state(into)
        sums = []  # one finiteness check at the end: a check per tensor would stall a GPU each time
        done = set()
        for sel, group in self._groups:
            names = group.names
            table = self._flat_table(cols, sel, [state[n] for n in names])
            if table is None:
                continue
            # a model other than the bound one is merged into a spare buffer, then copied
            spare = group.bound_to is not None and group.bound_to() not in (None, into)
            out, views = group.output(state[names[0]].dtype, spare=spare)
            total = group.merge(cols.method.name, table, out, cols.dtype)
            dsts = [state[n].data for n in names]
            if any(d.data_ptr() != v.data_ptr() for d, v in zip(dsts, views)):  # not bound: copy
                torch._foreach_copy_(dsts, views)  # one multi-tensor copy
            sums.append((group, total))
            done.update(names)
        for i, task in enumerate(self.tasks):
            if task.name in done:
                continue
            dst = state[task.name]
            direct = dst.is_contiguous() and dst.device == self.device and dst.is_floating_point()
            res = self._merge(cols, i, out=dst.data if direct else None, check=False)
            if not direct:
                dst.copy_(res)
            if res.is_floating_point():
                sums.append((task.name, res.sum(dtype=torch.float32)))
        if sums and not bool(torch.isfinite(torch.stack([s for _, s in sums])).all()):
            # a sum over a flat group covers its tensors; a float32 sum may also overflow
            # with every value finite, so the culprit is looked for in the tensors themselves
            names = [n for key, s in sums if not bool(torch.isfinite(s))
                     for n in (key.names if isinstance(key, FlatGroup) else [key])]
            bad = next((n for n in names if not bool(torch.isfinite(state[n]).all())), None)
            if bad is not None:
                raise MergeError(f"tensor '{bad}': the merged values are not finite")
