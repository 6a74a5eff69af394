"""The resident merge engine: inputs loaded once, each candidate merged into a live model.

A search merges the same models thousands of times with different parameters. The
``ResidentEngine`` reads every input tensor once (onto the device, in the recipe's
``dtype`` or a lower ``store_dtype``), and ``materialize(recipe, into=model)`` plans the
candidate's recipe against the already-open checkpoints and writes every merged tensor
straight into the model's own parameter storage: no second model, no disk, no reload.
Parameters are resolved by the same code as the one-shot ``evomerge-merge``, so a recipe
gives bit-identical weights through both paths.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..checkpoint import torch_dtype
from ..recipe import Recipe
from .engine import MergeEngine, MergeError, TensorTask
from .methods import order_statistics

__all__ = ["ResidentEngine"]


class ResidentEngine:
    """Keeps a recipe's inputs in memory and materializes candidate recipes in place.

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
    """

    def __init__(self, recipe: Recipe, *, device: str | torch.device = "cpu", seed: int = 0,
                 store_dtype: str | torch.dtype | None = None, allow_pickle: bool = False,
                 order_stats: bool = True):
        self.template = MergeEngine(recipe, device=device, seed=seed, allow_pickle=allow_pickle)
        self.device = self.template.device
        self.seed = seed
        self.models = self.template.models
        if isinstance(store_dtype, str):
            store_dtype = torch_dtype(store_dtype)
        self.store_dtype = store_dtype
        self._inputs: dict[tuple[Any, str], Tensor] = {}
        self.order_stats = order_stats
        self._stats: dict[str, dict] = {}
        for task in self.template.tasks:
            raw = self.template._read(task)
            base, tensors = self.template._prepare(task, raw)
            prepared = ([base] if task.base else []) + tensors
            for (ref, name), t in zip(task.sources, prepared):
                if (ref, name) in self._inputs:
                    continue
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise MergeError(f"model '{ref}': tensor '{name}' contains NaN or inf")
                dt = self.store_dtype if self.store_dtype is not None and t.is_floating_point() else t.dtype
                self._inputs[(ref, name)] = t.to(device=self.device, dtype=dt, copy=True)
            del raw, base, tensors, prepared
            self.template._release(task)
        self._structure = self._signature(self.template.tasks)

    @staticmethod
    def _signature(tasks: list[TensorTask]) -> list[tuple]:
        return [(t.name, t.base, tuple(t.inputs), t.copy) for t in tasks]

    @property
    def nbytes(self) -> int:
        """Bytes of the resident inputs."""
        return sum(t.numel() * t.element_size() for t in self._inputs.values())

    def plan(self, recipe: Recipe) -> MergeEngine:
        """Plan a candidate recipe against the open checkpoints (nothing is read)."""
        eng = MergeEngine(recipe, device=self.device, seed=self.seed, checkpoints=self.models)
        if self._signature(eng.tasks) != self._structure:
            raise MergeError("the candidate recipe merges other models or tensors than the resident engine holds")
        return eng

    def inputs(self, task: TensorTask) -> list[Tensor]:
        """A tensor task's resident inputs, the base first (as stored: do not modify)."""
        return [self._inputs[k] for k in task.sources]

    def source(self, model: str) -> dict[str, Tensor]:
        """One merged model's own resident weights, by output tensor name."""
        out = {task.name: self._inputs[(ref, name)]
               for task in self.template.tasks for ref, name in task.sources if str(ref) == model}
        if not out:
            raise MergeError(f"model {model!r} is not one of the merged models")
        return out

    def _inputs_for(self, eng: MergeEngine, task: TensorTask) -> tuple[Tensor | None, list[Tensor]]:
        ins = self.inputs(task)
        if eng.compute_dtype is not None:
            ins = [t.to(eng.compute_dtype) if t.is_floating_point() else t for t in ins]
        return (ins[0], ins[1:]) if task.base else (None, ins)

    def merged(self, recipe: Recipe) -> dict[str, Tensor]:
        """Every merged tensor of a candidate, as new tensors (for tests and export)."""
        eng = self.plan(recipe)
        return {t.name: self._compute(eng, t) for t in eng.tasks}

    def _compute(self, eng: MergeEngine, task: TensorTask, out: Tensor | None = None) -> Tensor:
        if not self.order_stats:
            return eng.compute(task, *self._inputs_for(eng, task), out=out)
        with order_statistics(self._stats.setdefault(task.name, {})):
            return eng.compute(task, *self._inputs_for(eng, task), out=out)

    @torch.no_grad()
    def materialize(self, recipe: Recipe, into: torch.nn.Module) -> None:
        """Write the candidate's merged weights into ``into``'s parameters, in place."""
        eng = self.plan(recipe)
        state = eng.live_state(into)
        for task in eng.tasks:
            dst = state[task.name]
            direct = dst.is_contiguous() and dst.device == self.device and dst.is_floating_point()
            res = self._compute(eng, task, out=dst.data if direct else None)
            if not direct:
                dst.copy_(res)
            if res.is_floating_point() and not bool(torch.isfinite(res.sum())) and not bool(torch.isfinite(res).all()):
                raise MergeError(f"tensor '{task.name}': the merged values are not finite")
