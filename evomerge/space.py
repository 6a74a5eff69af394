"""Genome spaces: a flat vector of merge coefficients, and the recipe it stands for.

A ``Space`` names which parameters of a merge method are searched (``weight``, ``density``,
``t``, ``lambda``, ``epsilon``, ...), which are fixed, and how finely:

* ``global``: one value per searched parameter (shared by every model);
* ``per_model``: one value per model for per-model parameters (``weight``, ``density``);
* ``per_layer``: one set per block of ``layer_granularity`` layers, with the embeddings and
  the head (final norm, output projection) as their own groups;
* ``per_layer_filtered``: as ``per_layer``, with separate values for attention tensors and
  for the rest of each block (MLP and norms).

With ``smoothing=k`` the layer values are ``k`` control points interpolated linearly over
depth (a recipe "gradient") instead of one value per block.

A genome ``x`` (real units, within ``lower``/``upper``) maps to a recipe in mergekit's
schema with :meth:`Space.recipe`; every search candidate is materialized from that recipe,
and :meth:`Space.recipe_yaml` exports it, so ``evomerge-merge`` reproduces a genome exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from .merge.methods import METHODS
from .recipe import Recipe, RecipeError, parse_recipe

__all__ = ["Space", "Gene", "GRANULARITIES", "PARAM_RANGES"]

GRANULARITIES = ("global", "per_model", "per_layer", "per_layer_filtered")

# (low, high, start) for parameters searched without explicit bounds.
PARAM_RANGES: dict[str, tuple[float, float, float]] = {
    "weight": (0.0, 1.0, 0.5),
    "density": (0.05, 1.0, 0.5),
    "lambda": (0.0, 2.0, 1.0),
    "t": (0.0, 1.0, 0.5),
    "epsilon": (0.0, 0.2, 0.05),
    "gamma": (0.0, 0.2, 0.01),
    "alpha": (0.0, 1.0, 0.5),
}

_ATTN_KEYS = ("self_attn", "attention", "attn")


@dataclass(frozen=True)
class Gene:
    """One coordinate of a genome."""

    name: str
    param: str
    model: int | None  # index into the space's models, or None for a shared value
    unit: str  # "all", "embed", "head", "layers[a:b]", "cp3", "attn:layers[a:b]", ...
    lo: float
    hi: float
    x0: float


class Space:
    """Searched merge parameters of one method over one set of models.

    Args:
        method: merge method name (``task_arithmetic``, ``ties``, ``dare_ties``, ...).
        models: the models merged (local folders or hub ids), in recipe order.
        base_model: the base (required by task-vector methods).
        search: the searched parameters: a list of names (default ranges from
            ``PARAM_RANGES``) or a mapping ``name -> {lo, hi, x0}``.
        fixed: parameters held constant (recipe-level ``parameters``).
        granularity: one of ``GRANULARITIES``.
        layer_granularity: layers per block for the per-layer granularities.
        smoothing: number of control points over depth (per-layer granularities only).
        num_layers: layers of the models; read from the base's config when omitted.
        embed_names, head_names: non-layer tensor names of the two outer groups; read from
            the base checkpoint when omitted.
        dtype: the recipe's ``dtype``.
    """

    def __init__(
        self,
        method: str,
        models: Sequence[str],
        base_model: str | None = None,
        search: Sequence[str] | Mapping[str, Mapping[str, float]] = ("weight",),
        fixed: Mapping[str, Any] | None = None,
        granularity: str = "per_layer",
        layer_granularity: int = 1,
        smoothing: int | None = None,
        num_layers: int | None = None,
        embed_names: Sequence[str] | None = None,
        head_names: Sequence[str] | None = None,
        attn_key: str | None = None,
        dtype: str = "float32",
    ):
        if method not in METHODS:
            raise RecipeError(f"space.method: unknown method {method!r}; accepted: {', '.join(METHODS)}")
        if granularity not in GRANULARITIES:
            raise RecipeError(f"space.granularity: {granularity!r} is not one of {', '.join(GRANULARITIES)}")
        if not models:
            raise RecipeError("space.models: at least one model is needed")
        self.method = METHODS[method]
        self.models = [str(m) for m in models]
        self.base_model = str(base_model) if base_model is not None else None
        if self.method.base_in_inputs and self.base_model is not None and self.base_model not in self.models:
            self.models.insert(0, self.base_model)  # linear: the base is one more weighted model
        self.fixed = dict(fixed or {})
        self.granularity = granularity
        self.layer_granularity = int(layer_granularity)
        if self.layer_granularity < 1:
            raise RecipeError("space.layer_granularity must be >= 1")
        self.smoothing = smoothing
        if smoothing is not None and (granularity not in ("per_layer", "per_layer_filtered") or smoothing < 2):
            raise RecipeError("space.smoothing needs a per-layer granularity and at least 2 control points")
        self.dtype = dtype
        specs = {p.name: p for p in self.method.params if not p.ignored}
        if isinstance(search, Mapping):
            ranges = {}
            for k, v in search.items():
                d = PARAM_RANGES.get(k, (0.0, 1.0, 0.5))
                v = dict(v or {})
                ranges[k] = (float(v.get("lo", d[0])), float(v.get("hi", d[1])), float(v.get("x0", d[2])))
        else:
            ranges = {k: PARAM_RANGES.get(k, (0.0, 1.0, 0.5)) for k in search}
        for k, (lo, hi, x0) in ranges.items():
            if k not in specs:
                raise RecipeError(f"space.search: {method} has no parameter {k!r}; accepted: {', '.join(specs)}")
            if not lo <= x0 <= hi or lo >= hi:
                raise RecipeError(f"space.search.{k}: need lo < hi and lo <= x0 <= hi, got {lo}, {hi}, {x0}")
        both = set(ranges) & set(self.fixed)
        if both:
            raise RecipeError(f"space: {sorted(both)} both searched and fixed")
        self.ranges = ranges
        self.specs = specs

        if granularity in ("per_layer", "per_layer_filtered") and (
                num_layers is None or embed_names is None or head_names is None or attn_key is None):
            info = _structure(self.base_model or self.models[0])
            num_layers = num_layers if num_layers is not None else info["num_layers"]
            embed_names = embed_names if embed_names is not None else info["embed"]
            head_names = head_names if head_names is not None else info["head"]
            attn_key = attn_key if attn_key is not None else info["attn_key"]
        self.num_layers = int(num_layers or 0)
        self.embed_names = list(embed_names or [])
        self.head_names = list(head_names or [])
        self.attn_key = attn_key or "self_attn"
        self.genes = self._genes()
        self.names = [g.name for g in self.genes]
        self.lower = np.array([g.lo for g in self.genes])
        self.upper = np.array([g.hi for g in self.genes])
        self.x0 = np.array([g.x0 for g in self.genes])

    # ------------------------------------------------------------------ genes
    def _units(self) -> list[str]:
        if self.granularity in ("global", "per_model"):
            return ["all"]
        if self.smoothing:
            inner = [f"cp{i}" for i in range(self.smoothing)]
        else:
            g, n = self.layer_granularity, self.num_layers
            inner = [f"layers[{a}:{min(a + g, n)}]" for a in range(0, n, g)]
        if self.granularity == "per_layer_filtered":
            inner = [f"attn:{u}" for u in inner] + [f"mlp:{u}" for u in inner]
        return ["embed"] + inner + ["head"]

    def _genes(self) -> list[Gene]:
        genes = []
        units = self._units()
        for p, (lo, hi, x0) in self.ranges.items():
            per_model = self.specs[p].per_model and self.granularity != "global"
            for mi in (range(len(self.models)) if per_model else [None]):
                for u in units:
                    who = f"[{mi}]" if mi is not None else ""
                    at = "" if u == "all" else f"@{u}"
                    genes.append(Gene(f"{p}{who}{at}", p, mi, u, lo, hi, x0))
        return genes

    def __len__(self) -> int:
        return len(self.genes)

    def clip(self, x) -> np.ndarray:
        return np.clip(np.asarray(x, dtype=float), self.lower, self.upper)

    def to_unit(self, x) -> np.ndarray:
        """Real units to [0, 1] per coordinate."""
        return (np.asarray(x, dtype=float) - self.lower) / (self.upper - self.lower)

    def from_unit(self, u) -> np.ndarray:
        return self.lower + np.clip(np.asarray(u, dtype=float), 0.0, 1.0) * (self.upper - self.lower)

    # ------------------------------------------------------------------ recipes
    def _setting(self, values: dict[str, float]) -> Any:
        """One parameter's recipe setting from its values per unit."""
        if self.granularity in ("global", "per_model"):
            return values["all"]
        conds: list[dict] = [{"filter": n, "value": values["embed"]} for n in self.embed_names]
        conds += [{"filter": n, "value": values["head"]} for n in self.head_names]

        def depth(prefix: str) -> list[float]:
            if self.smoothing:
                return [values[f"{prefix}cp{i}"] for i in range(self.smoothing)]
            g = self.layer_granularity
            return [values[f"{prefix}layers[{(i // g) * g}:{min((i // g) * g + g, self.num_layers)}]"]
                    for i in range(self.num_layers)]

        if self.granularity == "per_layer_filtered":
            conds.append({"filter": self.attn_key, "value": depth("attn:")})
            conds.append({"value": depth("mlp:")})
        else:
            conds.append({"value": depth("")})
        return conds

    def recipe_dict(self, x) -> dict:
        """The recipe (mergekit schema, as a plain dict) that genome ``x`` stands for."""
        x = np.asarray(x, dtype=float)
        if x.shape != (len(self.genes),):
            raise ValueError(f"genome of length {x.shape} for a space of {len(self.genes)} genes")
        x = self.clip(x)
        per: dict[tuple[str, int | None], dict[str, float]] = {}
        for g, v in zip(self.genes, x):
            per.setdefault((g.param, g.model), {})[g.unit] = float(v)
        top = dict(self.fixed)
        models = [{"model": m, "parameters": {}} for m in self.models]
        for (p, mi), values in per.items():
            setting = self._setting(values)
            if mi is None and self.specs[p].per_model:
                for m in models:
                    m["parameters"][p] = setting
            elif mi is None:
                top[p] = setting
            else:
                models[mi]["parameters"][p] = setting
        d: dict[str, Any] = {"merge_method": self.method.name}
        if self.base_model is not None:
            d["base_model"] = self.base_model
        d["models"] = [m if m["parameters"] else {"model": m["model"]} for m in models]
        if top:
            d["parameters"] = top
        d["dtype"] = self.dtype
        return d

    def recipe(self, x) -> Recipe:
        return parse_recipe(self.recipe_dict(x), source="genome")

    def recipe_yaml(self, x) -> str:
        return yaml.safe_dump(self.recipe_dict(x), sort_keys=False)

    def describe(self) -> dict:
        return {"method": self.method.name, "granularity": self.granularity, "genes": len(self.genes),
                "searched": {k: list(v) for k, v in self.ranges.items()}, "fixed": self.fixed,
                "layer_granularity": self.layer_granularity, "smoothing": self.smoothing,
                "models": list(self.models), "base_model": self.base_model,
                "gene_table": [[g.name, g.param, g.model, g.unit] for g in self.genes]}


def _structure(model: str) -> dict:
    """Layer count, embedding and head tensor names, and the attention keyword of a model."""
    from .checkpoint import Checkpoint, split_layer, tensor_group

    ck = Checkpoint.open(model)
    names = ck.names()
    stacks = ck.num_layers()
    if len(stacks) != 1:
        raise RecipeError(f"model '{model}': per-layer spaces need one stack of layers, found {list(stacks) or 'none'}")
    layer_names = [n for n in names if split_layer(n) is not None]
    attn = next((k for k in _ATTN_KEYS if any(k in n for n in layer_names)), "self_attn")
    return {
        "num_layers": next(iter(stacks.values())),
        "embed": [n for n in names if tensor_group(n) == "embed"],
        "head": [n for n in names if tensor_group(n) == "head"],
        "attn_key": attn,
    }
