"""The merge plan: which tensors a merge makes and what each is made from, built once.

``Plan(recipe, models)`` checks that the models fit together (architecture, tensor names,
shapes) and lists one ``TensorTask`` per output tensor: its inputs (the base first), its
place in the model (group, layer, depth), and whether it is merged or copied. It holds no
coefficient values: a candidate's parameters for every tensor are ``Columns``, made either
from a recipe (``plan.columns(recipe)``: the per-layer settings resolved tensor by tensor,
as ``evomerge-merge`` does) or from a genome by a compiled search space
(``Space.compile(plan.tasks)``), with the same values. Engines execute a plan with columns:
``Merger`` streams it to disk or into a live model, ``ResidentMerger`` keeps its inputs
and merges candidate after candidate.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..checkpoint import Checkpoint, split_layer, tensor_group, torch_dtype
from ..recipe import ModelRef, OutputSlice, Recipe, RecipeError, evaluate_setting, kept, validate_value
from .methods import MethodSpec

__all__ = ["Columns", "MergeError", "Plan", "TensorTask"]


def _is_weight(ck, name: str) -> bool:
    """Whether a checkpoint's tensor is a weight (floating point), which a merge combines;
    any other (an index buffer) is copied."""
    return ck.meta(name)[1].startswith(("float", "bfloat"))


class MergeError(RuntimeError):
    """Inputs that cannot be merged; the message names the model and tensor at fault."""


@dataclass
class TensorTask:
    """How one output tensor is made (no parameter values: see ``Columns``).

    Attributes:
        name: output tensor name.
        group: ``embed``, ``layers`` or ``head``.
        layer: output layer index (``None`` outside the layers).
        t: depth in [0, 1] used to interpolate gradients.
        base: (model, tensor name) of the base input, or ``None``.
        inputs: (model, tensor name) of the other inputs, in recipe order.
        copy: the tensor is not floating point and is copied from the first input.
        slice: the index of the recipe's output slice the tensor comes from (its scope of
            settings; 0 in the ``models`` form).
    """

    name: str
    group: str
    layer: int | None
    t: float
    base: tuple[ModelRef, str] | None
    inputs: list[tuple[ModelRef, str]]
    copy: bool = False
    slice: int = 0

    @property
    def sources(self) -> list[tuple[ModelRef, str]]:
        """Every input, the base first."""
        return ([self.base] if self.base else []) + self.inputs


@dataclass
class Columns:
    """One candidate's merge parameters for every tensor of a plan, column by column.

    ``numeric[p]`` holds a float parameter's values, shape ``(tensors,)`` for a shared one
    or ``(tensors, models)`` for a per-model one (NaN for tensors that are copied);
    ``other[p]`` holds, per tensor, the value of a parameter that is not a plain number
    (a boolean, a norm's name, ``None``). ``Space.compile`` makes them from a genome without
    writing or reading a recipe; ``Plan.columns`` from a recipe. Seeds are the plan's
    (``Plan.seeds``), not a candidate's, and are not here.
    """

    method: MethodSpec
    copy: list[bool]
    numeric: dict[str, Any]
    other: dict[str, list]
    dtype: torch.dtype | None = None  # the recipe's ``dtype``: the arithmetic's input precision
    plan: tuple = ()  # ``signature`` of the plan they were made for

    def __len__(self) -> int:
        return len(self.copy)

    @staticmethod
    def signature(tasks: list[TensorTask]) -> tuple:
        """What columns must match to be merged over a plan: every tensor's name and the
        models (in order) and tensors it is made from."""
        return tuple((t.name, tuple((str(m), n) for m, n in t.sources)) for t in tasks)

    def params(self, i: int) -> dict[str, Any]:
        """Tensor ``i``'s parameters as a method takes them (seeds aside)."""
        if self.copy[i]:
            return {}
        out: dict[str, Any] = {}
        for p in self.method.params:
            if p.name in self.numeric:
                v = self.numeric[p.name][i]
                out[p.name] = [float(x) for x in v] if p.per_model else float(v)
            elif p.name in self.other:
                out[p.name] = self.other[p.name][i]
        return out

    @classmethod
    def from_params(cls, tasks: list[TensorTask], params: list[dict[str, Any] | None], method: MethodSpec,
                    dtype: torch.dtype | None = None, signature: tuple | None = None) -> Columns:
        """Columns from every tensor's parameters (``None`` for a copied tensor). A
        per-model parameter over tensors with different numbers of inputs (slices of
        different models) is kept as a list per tensor (``other``)."""
        copy = [t.copy for t in tasks]
        numeric, other = {}, {}
        for p in method.params:
            if p.ignored:
                continue
            vals = [x.get(p.name) for x in params if x is not None]
            flat = [v for val in vals for v in (val if p.per_model else [val])]
            even = not p.per_model or len({len(v) for v in vals}) <= 1
            if p.kind == "float" and even and all(isinstance(v, float) for v in flat):
                shape = (len(tasks), len(vals[0])) if p.per_model and vals else (len(tasks),)
                arr = np.full(shape, np.nan)
                arr[[i for i, c in enumerate(copy) if not c]] = vals
                numeric[p.name] = arr
            else:
                other[p.name] = [None if x is None else x.get(p.name) for x in params]
        return cls(method, copy, numeric, other, dtype, cls.signature(tasks) if signature is None else signature)


def _seed(seed: int, tensor: str, model: ModelRef) -> int:
    return zlib.crc32(f"{seed}\0{tensor}\0{model}".encode())


class Plan:
    """The tensors a recipe's merge makes, checked against the opened models.

    Args:
        recipe: a parsed ``Recipe`` (its models, method, base, slices and ``dtype`` make the
            plan; its parameter values do not).
        models: every model the recipe references, opened.
        out_dtype: overrides the recipe's ``out_dtype``.
    """

    def __init__(self, recipe: Recipe, models: dict[ModelRef, Checkpoint], out_dtype: str | None = None):
        self.recipe = recipe
        self.method: MethodSpec = recipe.method
        self.models = models
        self.compute_dtype = torch_dtype(recipe.dtype)
        self.out_dtype = torch_dtype(out_dtype or recipe.out_dtype or recipe.dtype)
        self.reference = self.models[self._reference_ref()]
        self._check_architectures()
        self.out_layers: int | None = None
        self.tasks: list[TensorTask] = self._plan()
        self.signature = Columns.signature(self.tasks)

    # ----------------------------------------------------------------------------------
    # The tensors
    # ----------------------------------------------------------------------------------
    def _reference_ref(self) -> ModelRef:
        if self.recipe.base_model is not None:
            return self.recipe.base_model
        return self.recipe.slices[0].sources[0].model

    def _check_architectures(self) -> None:
        ref = self.reference
        if self.recipe.keep:  # a part merged into a whole (CLIP's vision towers into a CLIP model): the
            # architectures may differ, but no model may hold a weight the merge would leave out
            merged = {n for n in ref.names() if not self.kept(n)}
            for r, ck in self.models.items():
                extra = sorted(n for n in ck.names() if n not in merged and not self.kept(n) and _is_weight(ck, n))
                if extra:
                    raise MergeError(f"model '{r}' has tensor '{extra[0]}' ({len(extra)} in all) that "
                                     f"'{ref.name}' lacks: the merge would leave it out; add it to keep, or merge "
                                     "models of one architecture")
            return
        for r, ck in self.models.items():
            if ck.architecture() != ref.architecture():
                raise MergeError(
                    f"models have different architectures: '{ref.name}' is {ref.architecture()}, "
                    f"'{r}' is {ck.architecture()}"
                )

    def _roles(self, s: OutputSlice) -> tuple[int | None, list[int]]:
        """Which of a slice's sources is the base (the first one of the base model), and
        which are the inputs (every other one, in order: one model may be listed again, with
        other layers, as a self-merge does)."""
        base = self._slice_base(s)
        at = next((i for i, x in enumerate(s.sources) if x.model == base), None) if base is not None else None
        return at, [i for i in range(len(s.sources)) if i != at]

    def _slice_base(self, s: OutputSlice) -> ModelRef | None:
        if self.method.base_in_inputs:
            return None
        return s.base_model or self.recipe.base_model

    def _plan(self) -> list[TensorTask]:
        r = self.recipe
        tasks: list[TensorTask] = []
        ref_names = self.reference.names()
        stacks = self.reference.num_layers()
        if not r.uses_models_form and len(stacks) > 1:
            raise RecipeError(
                f"slices need a model with one stack of layers; '{self.reference.name}' has "
                f"{', '.join(stacks)}"
            )
        own = [n for n in ref_names if self.kept(n)]
        for h in r.keep:
            if not any(kept(n, [h]) for n in ref_names):
                raise RecipeError(f"keep: '{h}' names no tensor of '{self.reference.name}'")
        if own and not r.uses_models_form:
            raise RecipeError("keep: only in the models form (not with slices)")
        ref_names = [n for n in ref_names if n not in own]
        pre = [n for n in ref_names if tensor_group(n) == "embed"]
        post = [n for n in ref_names if tensor_group(n) == "head"]

        first, last = r.slices[0], r.slices[-1]
        for n in pre:
            tasks.append(self._task(n, "embed", None, 0.0, 0, [n] * len(first.sources)))

        if r.uses_models_form:
            s = first
            per_stack: dict[str, dict[int, list[str]]] = {}
            for n in ref_names:
                ln = split_layer(n)
                if ln is not None:
                    per_stack.setdefault(ln.stack, {}).setdefault(ln.index, []).append(n)
            for stack, layers in per_stack.items():
                count = stacks[stack]
                for idx in sorted(layers):
                    t = idx / (count - 1) if count > 1 else 1.0
                    for n in layers[idx]:
                        tasks.append(self._task(n, "layers", idx, t, 0, [n] * len(s.sources)))
        else:
            stack = next(iter(stacks)) if stacks else None
            out_idx = 0
            for si, s in enumerate(r.slices):
                length = s.sources[0].layer_range[1] - s.sources[0].layer_range[0]
                base = self._slice_base(s)
                if base is not None and all(x.model != base for x in s.sources):
                    raise RecipeError(f"slices[{si}]: the base model '{base}' must be one of the slice's sources")
                lead = next((x for x in s.sources if x.model == base), s.sources[0])
                for src in s.sources:
                    have = self.models[src.model].num_layers().get(stack, 0)
                    if src.layer_range[1] > have:
                        raise RecipeError(
                            f"slices[{si}]: layer_range {list(src.layer_range)} of '{src.model}' "
                            f"exceeds its {have} layers"
                        )
                for off in range(length):
                    t = off / (length - 1) if length > 1 else 1.0
                    for ln in self._layer_names(lead.model, stack, lead.layer_range[0] + off):
                        names = [ln.with_index(x.layer_range[0] + off) for x in s.sources]
                        tasks.append(self._task(ln.with_index(out_idx), "layers", out_idx, t, si, names))
                    out_idx += 1
            self.out_layers = out_idx

        for n in post:
            tasks.append(self._task(n, "head", None, 0.0, len(r.slices) - 1, [n] * len(last.sources)))
        keeper = r.base_model if r.base_model is not None else first.sources[0].model
        for n in own:  # not merged: the base's (or the first model's), as it is
            if n not in self.models[keeper]:
                raise MergeError(f"keep: model '{keeper}' has no tensor '{n}' to keep")
            tasks.append(TensorTask(n, "head", None, 0.0, None, [(keeper, n)], copy=True))
        return tasks

    def kept(self, name: str) -> bool:
        """Whether tensor ``name`` is one the recipe keeps unmerged (``keep``: the tensor, or
        a module holding it)."""
        return self.recipe.keeps(name)

    def _layer_names(self, model: ModelRef, stack, idx: int):
        out = []
        for n in self.models[model].names():
            ln = split_layer(n)
            if ln is not None and ln.stack == stack and ln.index == idx:
                out.append(ln)
        return out

    def _input_name(self, model: ModelRef, name: str, out_name: str) -> str:
        ck = self.models[model]
        if name in ck:
            return name
        # A tied output head: the model stores only the input embedding.
        if tensor_group(name) == "head" and ck.config.get("tie_word_embeddings", True):
            shape = self.reference.meta(out_name)[0] if out_name in self.reference else None
            for cand in ck.names():
                if tensor_group(cand) == "embed" and (shape is None or ck.meta(cand)[0] == shape):
                    return cand
        raise MergeError(f"model '{model}': tensor '{name}' is missing")

    def _task(self, out_name, group, layer, t, si: int, names: list[str]) -> TensorTask:
        """Tensor ``out_name`` from slice ``si``, whose sources give tensors ``names``."""
        s = self.recipe.slices[si]
        at, rest = self._roles(s)
        i = at if at is not None else rest[0]
        lead, name = s.sources[i].model, names[i]
        if name in self.models[lead] and not _is_weight(self.models[lead], name):
            # not a weight (an index buffer such as CLIP's position_ids, which older checkpoints
            # saved and newer ones do not): copied from the base, or the first model, alone
            return TensorTask(out_name, group, layer, t, None, [(lead, name)], copy=True, slice=si)
        base = None
        if at is not None:
            base = (s.sources[at].model, self._input_name(s.sources[at].model, names[at], out_name))
        inputs = [(s.sources[i].model, self._input_name(s.sources[i].model, names[i], out_name)) for i in rest]
        shape, dt = self.models[(base or inputs[0])[0]].meta((base or inputs[0])[1])
        for m, n in ([base] if base else []) + inputs:
            sh = self.models[m].meta(n)[0]
            if sh != shape:
                raise MergeError(
                    f"shape mismatch for tensor '{out_name}': '{m}' has {list(sh)}, "
                    f"'{(base or inputs[0])[0]}' has {list(shape)}"
                )
        return TensorTask(out_name, group, layer, t, base, inputs, copy=not dt.startswith(("float", "bfloat")),
                          slice=si)

    def shape(self, task: TensorTask) -> tuple[int, ...]:
        m, n = task.base or task.inputs[0]
        return self.models[m].meta(n)[0]

    def output_dtype(self, task: TensorTask) -> torch.dtype:
        if self.out_dtype is not None and not task.copy:
            return self.out_dtype
        m, n = task.base or task.inputs[0]
        t = self.models[m].meta(n)[1]
        return torch_dtype(t) if t in ("float32", "float16", "bfloat16", "float64") else getattr(torch, t)

    # ----------------------------------------------------------------------------------
    # Parameters: a recipe's, resolved tensor by tensor; the random methods' seeds
    # ----------------------------------------------------------------------------------
    def misfit(self, recipe: Recipe) -> str | None:
        """Why ``recipe`` does not merge by this plan, or None when it does: the same method,
        base, slices, input models (in order; where the base is not an input, whether the
        recipe lists it among them or not) and input precision, so that only its parameter
        values differ."""
        a, b = self.recipe, recipe
        if a.method.name != b.method.name:
            return f"its method ({b.method.name}) is not the plan's ({a.method.name})"
        if a.dtype != b.dtype:
            return f"its dtype ({b.dtype}) is not the plan's ({a.dtype}): the inputs are held in the plan's"
        if a.base_model != b.base_model:
            return f"its base model ({b.base_model}) is not the plan's ({a.base_model})"
        if a.uses_models_form != b.uses_models_form or len(a.slices) != len(b.slices):
            return "it has other slices than the plan"
        if a.keep != b.keep:
            return f"it keeps other tensors unmerged ({list(b.keep)}) than the plan ({list(a.keep)})"

        def inputs(s: OutputSlice) -> list:
            at, rest = self._roles(s)
            return [self._slice_base(s), *[(s.sources[i].model, s.sources[i].layer_range) for i in rest]]

        for x, y in zip(a.slices, b.slices):
            if inputs(x) != inputs(y):
                return "it merges other models or layers (or the same in another order) than the plan"
        return None

    def fits(self, recipe: Recipe) -> bool:
        """Whether ``recipe`` merges by this plan (``misfit``): only its values differ."""
        return self.misfit(recipe) is None

    def columns(self, recipe: Recipe | None = None) -> Columns:
        """A recipe's parameters for every tensor of this plan (by default the plan's own
        recipe's): each setting resolved for the tensor's name and depth, in the scopes a
        recipe gives (model, slice, recipe), checked against the method's bounds. The
        recipe must fit the plan (``fits``)."""
        recipe = self.recipe if recipe is None else recipe
        why = None if recipe is self.recipe else self.misfit(recipe)
        if why is not None:
            raise MergeError(f"the recipe does not fit the merge plan: {why}")
        params = [None if t.copy else self.resolve(recipe, t) for t in self.tasks]
        return Columns.from_params(self.tasks, params, self.method, self.compute_dtype, signature=self.signature)

    def resolve(self, r: Recipe, task: TensorTask) -> dict[str, Any]:
        """One tensor's parameters in recipe ``r`` (which fits the plan), as its method takes
        them (seeds aside)."""
        s = r.slices[task.slice]
        sources = [s.sources[i] for i in self._roles(s)[1]]
        out: dict[str, Any] = {}
        for p in self.method.params:
            if p.ignored:
                continue
            if p.per_model:
                vals = []
                for src, (m, n) in zip(sources, task.inputs):
                    v = self._lookup(p.name, n, task.t, (src.parameters, s.parameters, r.parameters))
                    where = f"model '{m}', tensor '{n}', parameter '{p.name}'"
                    if v is None and p.required:
                        raise RecipeError(f"{where}: required but not given")
                    vals.append(validate_value(p, p.default if v is None else v, where))
                out[p.name] = vals
            else:
                v = self._lookup(p.name, task.name, task.t, (s.parameters, r.parameters))
                where = f"tensor '{task.name}', parameter '{p.name}'"
                if v is None and p.required:
                    raise RecipeError(f"{where}: required but not given")
                out[p.name] = validate_value(p, p.default if v is None else v, where)
        return out

    @staticmethod
    def _lookup(key, tensor_name, t, scopes):
        for scope in scopes:
            if scope and key in scope:
                v = evaluate_setting(scope[key], tensor_name, t)
                if v is not None:
                    return v
        return None

    def seeds(self, seed: int) -> list[list[int] | None]:
        """Per tensor, the random methods' seed of each input besides the base (``None``
        where the method draws nothing or the tensor is copied): a function of the seed,
        the tensor and the model only, never of the order of work."""
        if not self.method.random:
            return [None] * len(self.tasks)

        def keys(t: TensorTask) -> list[str]:  # a model listed again draws its own mask
            seen: dict[str, int] = {}
            out = []
            for m, _ in t.inputs:
                k = seen[str(m)] = seen.get(str(m), -1) + 1
                out.append(str(m) if k == 0 else f"{m}#{k}")
            return out

        return [None if t.copy else [_seed(seed, t.name, m) for m in keys(t)] for t in self.tasks]
