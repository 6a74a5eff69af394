"""Genome spaces: a flat vector of merge coefficients, and the recipe it stands for.

A ``Space`` names which parameters of a merge method are searched (``weight``, ``density``,
``t``, ``lambda``, ``epsilon``, ...), which are fixed, and how finely:

* ``global``: one value per searched parameter (shared by every model);
* ``per_model``: one value per model for per-model parameters (``weight``, ``density``);
* ``per_layer``: one set per block of ``layer_granularity`` layers, with the embeddings and
  the head (final norm, output projection) as their own groups;
* ``per_layer_filtered``: as ``per_layer``, with separate values for attention tensors and
  for the rest of each block (MLP and norms);
* ``per_tensor``: one set per weight tensor (the granularity of the AdaMerging paper's
  layer-wise coefficients, and of FusionBench's).

With ``smoothing=k`` the layer values are ``k`` control points interpolated linearly over
depth (a recipe "gradient") instead of one value per block.

A genome ``x`` (real units, within ``lower``/``upper``) stands for a recipe in mergekit's
schema (:meth:`Space.recipe`, exported by :meth:`Space.recipe_yaml`), so ``evomerge-merge``
reproduces a genome exactly. A search does not build that recipe per candidate:
:meth:`Space.compile` turns the space and a merge plan into a ``CoefficientMap`` once, and
``columns(x)`` gives every tensor's parameters from a genome by a gather and an
interpolation over small arrays, with the values the recipe would resolve to, bit for bit.
Search ranges and the values each parameter may take come from the method registry
(``merge.methods.ParamSpec``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import yaml

from .merge.methods import METHODS
from .recipe import Recipe, RecipeError, parse_recipe

__all__ = ["Space", "Gene", "GRANULARITIES", "CoefficientMap", "search_range"]

GRANULARITIES = ("global", "per_model", "per_layer", "per_layer_filtered", "per_tensor")


def search_range(method: str, param: str, given: Mapping[str, Any] | None = None,
                 where: str = "space.search") -> tuple[float, float, float]:
    """``(lo, hi, x0)`` for searching ``param`` of ``method``: ``given`` (any of ``lo``,
    ``hi``, ``x0``) over the registry's default range, checked against the parameter's
    legal bounds (``methods.ParamSpec``), so that no candidate is out of range by
    construction. Raises ``RecipeError`` naming ``where.param``."""
    spec = METHODS[method]
    specs = {p.name: p for p in spec.params if not p.ignored}
    if param not in specs:
        raise RecipeError(f"{where}: {method} has no parameter {param!r}; accepted: {', '.join(specs)}")
    ps = specs[param]
    given = dict(given or {})
    default = ps.search
    if default is None:
        if ps.structural or ps.kind != "float":
            why = "sets the merged model's shape, which one search keeps fixed" if ps.structural else "is not a number"
            raise RecipeError(f"{where}.{param}: {method}'s {param!r} {why} and cannot be searched")
        if given.get("lo") is None or given.get("hi") is None:  # (e.g. Fisher's floor: no range fits every model)
            raise RecipeError(f"{where}.{param}: {method}'s {param!r} has no range a search takes by default; "
                              f"give its lo and hi (space.ranges.{param}={{lo: ..., hi: ...}})")
        default = (None, None, None)
    unknown = set(given) - {"lo", "hi", "x0"}
    if unknown:
        raise RecipeError(f"{where}.{param}: unknown keys {sorted(unknown)}; accepted: lo, hi, x0")
    try:
        lo, hi, x0 = (float(given[k]) if given.get(k) is not None else d
                      for k, d in zip(("lo", "hi", "x0"), default))
    except (TypeError, ValueError):
        raise RecipeError(f"{where}.{param}: lo, hi and x0 must be numbers, got {given}") from None
    if not lo < hi:
        raise RecipeError(f"{where}.{param}: lo ({lo}) must be below hi ({hi})")
    if x0 is None:  # (a range given for a parameter without one: its default, or the middle)
        x0 = float(ps.default) if lo <= float(ps.default) <= hi else (lo + hi) / 2
    if not lo <= x0 <= hi:
        raise RecipeError(f"{where}.{param}: x0 ({x0}) must lie within [lo, hi] = [{lo}, {hi}]")
    legal = f"{'(' if ps.lo_open else '['}{ps.lo}, {ps.hi}]"
    if ps.lo is not None and (lo < ps.lo or (lo == ps.lo and ps.lo_open)):
        raise RecipeError(f"{where}.{param}.lo: {lo} is outside the values {param} may take, {legal}")
    if ps.hi is not None and hi > ps.hi:
        raise RecipeError(f"{where}.{param}.hi: {hi} is outside the values {param} may take, {legal}")
    return lo, hi, x0


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
        search: the searched parameters: a list of names (their ranges from the method
            registry, ``ParamSpec.search``) or a mapping ``name -> {lo, hi, x0}``.
        fixed: parameters held constant (recipe-level ``parameters``).
        granularity: one of ``GRANULARITIES``.
        layer_granularity: layers per block for the per-layer granularities.
        smoothing: number of control points over depth (per-layer granularities only).
        num_layers: layers of the models; read from the base's config when omitted.
        embed_names, head_names: non-layer tensor names of the two outer groups; read from
            the base checkpoint when omitted.
        dtype: the recipe's ``dtype``.
        data: for a method that reads data (``fisher``, ``regmean``), the recipe's ``data``
            (``path``, ``text``, ``target``, ``limit``, ``batch_size``), or with ``paths``
            instead of ``path`` one file per model, in the order of ``models`` (the base
            first where the method merges it too).
        align: the recipe's ``align`` (a method name such as ``weight_matching``, or a
            mapping with ``method``, ``reference``, ``max_sweeps``, ``seed``): every model
            permuted to line up with the reference before any candidate is merged.
        keep: the recipe's ``keep``: modules not merged, taken from the base as they are
            (each fine-tune's own task head, such as an image classifier's ``classifier``;
            a tower no expert changed).
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
        data: Mapping[str, Any] | None = None,
        align: str | Mapping[str, Any] | None = None,
        keep: Sequence[str] | None = None,
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
        for ps in self.method.params:  # a parameter that shapes the merged model: the live model's shape
            if ps.structural and self.fixed.get(ps.name, ps.default) != ps.default:
                raise RecipeError(f"space.fixed.{ps.name}: {method}'s {ps.name!r} other than {ps.default} changes the "
                                  "merged model's shape, and a search merges every candidate into one live model "
                                  "of the models' shape; merge it with evomerge-merge")
        self.data = {k: v for k, v in dict(data or {}).items() if v is not None}
        self.align = (align if isinstance(align, str) else
                      {k: v for k, v in dict(align).items() if v is not None} if align else None)
        self.keep = [keep] if isinstance(keep, str) else list(keep or [])
        paths = self.data.get("paths")
        if paths is not None and (isinstance(paths, str) or len(paths) != len(self.models)):
            raise RecipeError(f"space.data.paths: one data file per model, {len(self.models)} in the order "
                              f"{', '.join(self.models)}; got {paths!r}")
        self.granularity = granularity
        self.layer_granularity = int(layer_granularity)
        if self.layer_granularity < 1:
            raise RecipeError("space.layer_granularity must be >= 1")
        self.smoothing = smoothing
        if smoothing is not None and (granularity not in ("per_layer", "per_layer_filtered") or smoothing < 2):
            raise RecipeError("space.smoothing needs a per-layer granularity and at least 2 control points")
        self.dtype = dtype
        specs = {p.name: p for p in self.method.params if not p.ignored}
        given = search if isinstance(search, Mapping) else {k: None for k in search}
        ranges = {k: search_range(method, k, v) for k, v in given.items()}
        both = set(ranges) & set(self.fixed)
        if both:
            raise RecipeError(f"space: {sorted(both)} both searched and fixed")
        self.ranges = ranges
        self.specs = specs

        self.tensor_names: list[str] = []
        if granularity == "per_tensor":
            self.tensor_names = _structure(self.base_model or self.models[0], self.keep, tensors=True)["tensors"]
        if granularity in ("per_layer", "per_layer_filtered") and (
                num_layers is None or embed_names is None or head_names is None or attn_key is None):
            info = _structure(self.base_model or self.models[0], self.keep)
            num_layers = num_layers if num_layers is not None else info["num_layers"]
            embed_names = embed_names if embed_names is not None else info["embed"]
            head_names = head_names if head_names is not None else info["head"]
            attn_key = attn_key if attn_key is not None else info["attn_key"]
        self.num_layers = int(num_layers or 0)
        self.embed_names = list(embed_names or [])
        self.head_names = list(head_names or [])
        self.attn_key = attn_key or "self_attn"
        self.genes = self._genes()
        self._limits = self._joint_limits()
        self.names = [g.name for g in self.genes]
        self.lower = np.array([g.lo for g in self.genes])
        self.upper = np.array([g.hi for g in self.genes])
        self.x0 = np.array([g.x0 for g in self.genes])

    # ------------------------------------------------------------------ genes
    def _units(self) -> list[str]:
        if self.granularity in ("global", "per_model"):
            return ["all"]
        if self.granularity == "per_tensor":
            return list(self.tensor_names)
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
        if self.granularity == "per_tensor":  # a filter is a substring: a name inside a longer one comes after it
            return [{"filter": n, "value": values[n]} for n in sorted(self.tensor_names, key=len, reverse=True)]
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

    def _parameters(self, leaves: Sequence[Any]) -> tuple[dict, list[dict]]:
        """The recipe's top-level ``parameters`` and each model's, with ``leaves[i]``
        standing for gene i's value (a number, or the gene's ``_GeneRef`` when compiling)."""
        per: dict[tuple[str, int | None], dict[str, Any]] = {}
        for g, v in zip(self.genes, leaves):
            per.setdefault((g.param, g.model), {})[g.unit] = v
        top = dict(self.fixed)
        models: list[dict] = [{} for _ in self.models]
        for (p, mi), values in per.items():
            setting = self._setting(values)
            if mi is None and self.specs[p].per_model:
                for m in models:
                    m[p] = setting
            elif mi is None:
                top[p] = setting
            else:
                models[mi][p] = setting
        return top, models

    def _genome(self, x) -> np.ndarray:
        """``x`` clipped to the bounds, then to the method's joint limits (``MethodSpec.limits``:
        DELLA's epsilon to what each density allows), as a recipe and a compiled map read it."""
        x = np.asarray(x, dtype=float)
        if x.shape != (len(self.genes),):
            raise ValueError(f"genome of length {x.shape} for a space of {len(self.genes)} genes")
        x = self.clip(x)
        for gene, limit in self._limits:
            lo, hi = limit(x)
            x[gene] = min(max(x[gene], lo), hi)
        return x

    def _joint_limits(self) -> list[tuple[int, Any]]:
        """(gene, limit(x) -> (lo, hi)) for every gene a joint limit bounds: paired with the
        other parameter's gene of the same model and unit where that is searched, else with
        its fixed (or default) value where that is one number. A pairing that cannot be made
        (the other fixed per layer, say) is left alone: such candidates fail as recipes do.
        Where both are searched, the first limit listed clips (DELLA: epsilon to density),
        and the second then finds its parameter within range."""
        out = []
        index = {(g.param, g.model, g.unit): i for i, g in enumerate(self.genes)}
        paired: set[frozenset] = set()  # parameter pairs already limited gene by gene
        for param, other, fn in self.method.limits:
            if frozenset((param, other)) in paired:
                continue
            for i, g in enumerate(self.genes):
                if g.param != param:
                    continue
                j = index.get((other, g.model, g.unit))
                if j is not None:
                    out.append((i, lambda x, j=j, fn=fn: fn(float(x[j]))))
                    paired.add(frozenset((param, other)))
                    continue
                if other in self.ranges:
                    continue
                v = self.fixed.get(other, self.specs[other].default)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    out.append((i, lambda x, v=float(v), fn=fn: fn(v)))
        return out

    def recipe_dict(self, x) -> dict:
        """The recipe (mergekit schema, as a plain dict) that genome ``x`` stands for."""
        top, params = self._parameters([float(v) for v in self._genome(x)])
        d: dict[str, Any] = {"merge_method": self.method.name}
        if self.base_model is not None:
            d["base_model"] = self.base_model
        d["models"] = [{"model": m, "parameters": p} if p else {"model": m} for m, p in zip(self.models, params)]
        if top:
            d["parameters"] = top
        d["dtype"] = self.dtype
        if self.align:
            d["align"] = self.align
        if self.keep:
            d["keep"] = list(self.keep)
        if self.data:
            top_data = {k: v for k, v in self.data.items() if k != "paths"}
            if top_data:
                d["data"] = top_data
            for entry, path in zip(d["models"], self.data.get("paths") or ()):
                entry["data"] = {"path": str(path)}
        return d

    def compile(self, tasks: Sequence[Any]) -> "CoefficientMap":
        """The map from a genome to every tensor's merge parameters over a plan's ``tasks``
        (``Merger(space.recipe(x0)).tasks``): built once, it replaces writing, parsing
        and resolving a recipe for each candidate (see ``CoefficientMap``)."""
        return CoefficientMap(self, tasks)

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


class _GeneRef(int):
    """Gene i's index where a recipe holds its value: ``locate_setting`` takes it for a
    number, so a compiled map follows the recipe's own rules (filters, interpolation)."""


class CoefficientMap:
    """A genome's merge parameters for every tensor of a plan, with no recipe in between.

    Each numeric parameter of each tensor (and model) is, by the rules a recipe follows,
    a constant, one gene's value, or the linear interpolation of two neighbouring genes
    over depth: ``(1 - f) * x[a] + f * x[b]``. The map keeps the two indices and ``f`` of
    every entry (constants are indices past the genome), so ``columns(x)`` is a gather and
    an interpolation over small arrays, computed with the same floating-point operations
    as a recipe's resolution (bit-identical values; tests/test_space.py checks every
    method and granularity against ``parse(recipe_yaml(x))``). ``matrix()`` gives the same
    map as ``A`` and ``c`` with ``values = A @ x + c``, for a gradient method.

    Args:
        space: the genome space.
        tasks: the plan's tensors (``TensorTask``: name, depth, inputs, copy), as a
            ``Merger`` plans ``space.recipe(space.x0)``.
    """

    def __init__(self, space: Space, tasks: Sequence[Any]):
        from .merge.plan import Columns
        from .recipe import ModelRef, locate_setting, validate_value

        self.space = space
        self.method = space.method
        self.names = [t.name for t in tasks]
        self.copy = [bool(t.copy) for t in tasks]
        self._copied = np.array(self.copy, dtype=bool)
        self._inputs = [list(t.inputs) for t in tasks]
        self.plan = Columns.signature(tasks)  # the plan these columns fit (checked by the engine)
        self._Columns = Columns
        top, model_params = space._parameters([_GeneRef(i) for i in range(len(space.genes))])
        base = None if space.method.base_in_inputs else space.base_model
        at = space.models.index(base) if base in space.models else None  # as the plan: its first listing
        sources = [(m, p) for j, (m, p) in enumerate(zip(space.models, model_params)) if j != at]
        want = [str(ModelRef.parse(m, "space.models")) for m, _ in sources]
        n_genes = len(space.genes)
        self.k = len(sources)
        self._maps: dict[str, tuple] = {}  # p -> (ia, ib, f, lerp, consts, where-names)
        self.numeric: dict[str, np.ndarray] = {}  # float parameters that no gene touches
        self.other: dict[str, list] = {}
        for t in tasks:
            if not t.copy and [str(r) for r, _ in t.inputs] != want:
                raise RecipeError(f"tensor '{t.name}': the plan's inputs {[str(r) for r, _ in t.inputs]} "
                                  f"are not the space's models {want}")
        for spec in self.method.params:
            if spec.ignored:
                continue
            shape = (len(tasks), self.k) if spec.per_model else (len(tasks),)
            ia = np.zeros(shape, dtype=np.int64)
            ib = np.zeros(shape, dtype=np.int64)
            f = np.zeros(shape)
            lerp = np.zeros(shape, dtype=bool)
            consts: list[float] = []
            values: list = []  # per tensor: the resolved constant (or per-model list), for `other`
            mapped = False
            for i, t in enumerate(tasks):
                if t.copy:
                    consts.append(float("nan"))
                    ia[i] = ib[i] = n_genes + len(consts) - 1
                    values.append(None)
                    continue
                cells = list(enumerate(sources)) if spec.per_model else [(None, None)]
                row = []
                for j, src in cells:
                    scopes = (src[1], top) if src is not None else (top,)
                    # per-model values are filtered by the model's own tensor name, as the
                    # engine does (a tied head reads the embedding), shared ones by the output's
                    tname = t.inputs[j][1] if j is not None else t.name
                    loc = None
                    for scope in scopes:
                        if spec.name in scope:
                            loc = locate_setting(scope[spec.name], tname, t.t)
                            if loc is not None and not (len(loc) == 1 and loc[0] is None):
                                break
                            loc = None
                    cell = (i, j) if j is not None else i
                    where = (f"model '{t.inputs[j][0]}', tensor '{t.inputs[j][1]}', parameter '{spec.name}'"
                             if j is not None else f"tensor '{t.name}', parameter '{spec.name}'")
                    if loc is not None and isinstance(loc[0], _GeneRef):
                        mapped = True
                        ia[cell], ib[cell] = loc[0], loc[1 if len(loc) == 3 else 0]
                        if len(loc) == 3:
                            f[cell], lerp[cell] = loc[2], True
                        row.append(None)
                        continue
                    if loc is None:
                        if spec.required:
                            raise RecipeError(f"{where}: required but not given")
                        v = spec.default
                    else:
                        v = loc[0] if len(loc) == 1 else (1 - loc[2]) * loc[0] + loc[2] * loc[1]
                    v = validate_value(spec, v, where)
                    consts.append(v if isinstance(v, float) else float("nan"))
                    ia[cell] = ib[cell] = n_genes + len(consts) - 1
                    row.append(v)
                values.append(row if spec.per_model else row[0])
            if mapped:
                self._maps[spec.name] = (ia, ib, f, 1 - f, lerp, np.array(consts), spec)
            elif spec.kind == "float" and all(isinstance(v, float) for i, r in enumerate(values) if not self.copy[i]
                                              for v in (r if spec.per_model else [r])):
                self.numeric[spec.name] = np.concatenate([np.zeros(n_genes), consts])[ia]
            else:
                self.other[spec.name] = values
        from .checkpoint import torch_dtype

        self.dtype = torch_dtype(space.dtype)

    def columns(self, x) -> Any:
        """Genome ``x`` (clipped to the space's bounds, as ``recipe(x)`` clips it) as every
        tensor's parameters (``merge.plan.Columns``); a value outside its parameter's
        legal range raises ``RecipeError`` naming the tensor, model and parameter."""
        from .recipe import validate_value

        x = self.space._genome(x)
        numeric = dict(self.numeric)
        for name, (ia, ib, f, g, lerp, consts, spec) in self._maps.items():
            xe = np.concatenate([x, consts])
            a = xe[ia]
            v = np.where(lerp, g * a + f * xe[ib], a)
            bad = ~np.isfinite(v)
            bad[self._copied] = False
            if spec.lo is not None:
                bad |= (v <= spec.lo) if spec.lo_open else (v < spec.lo)
            if spec.hi is not None:
                bad |= v > spec.hi
            if bad.any():  # the recipe's own check, for its message
                cell = tuple(int(c) for c in np.argwhere(bad)[0])
                validate_value(spec, float(v[cell]), self._where(spec, cell))
            numeric[name] = v
        return self._Columns(self.method, self.copy, numeric, self.other, self.dtype, self.plan)

    def _where(self, spec, cell) -> str:
        i = cell[0]
        if spec.per_model:  # as the engine names it: the model and its own tensor
            ref, name = self._inputs[i][cell[1]]
            return f"model '{ref}', tensor '{name}', parameter '{spec.name}'"
        return f"tensor '{self.names[i]}', parameter '{spec.name}'"

    def matrix(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Parameter ``name`` as ``(A, c)``: its values, flattened in tensor (then model)
        order, are ``A @ g + c`` (NaN in ``c`` for copied tensors), ``g`` being the genome
        clipped to the bounds and joint limits (the genome itself within them)."""
        n = len(self.space.genes)
        if name not in self._maps:
            v = self.numeric[name].reshape(-1)
            return np.zeros((v.size, n)), v.copy()
        ia, ib, f, g, lerp, consts, _ = self._maps[name]
        ia, ib, f, g, lerp = (a.reshape(-1) for a in (ia, ib, f, g, lerp))
        A = np.zeros((ia.size, n))
        c = np.zeros(ia.size)
        rows = np.arange(ia.size)
        wa = np.where(lerp, g, 1.0)
        for idx, w in ((ia, wa), (ib, np.where(lerp, f, 0.0))):
            gene = idx < n
            np.add.at(A, (rows[gene], idx[gene]), w[gene])
            c[~gene] += w[~gene] * consts[idx[~gene] - n]
        return A, c


def _structure(model: str, keep: Sequence[str] = (), tensors: bool = False) -> dict:
    """Layer count, embedding and head tensor names, and the attention keyword of a model,
    the tensors of the modules ``keep`` names (not merged) left out; with ``tensors``, only
    its weight (floating-point) tensors' names, in the checkpoint's order."""
    from .checkpoint import Checkpoint, split_layer, tensor_group
    from .recipe import kept

    ck = Checkpoint.open(model)
    names = [n for n in ck.names() if not kept(n, keep)]
    if tensors:
        from .merge.plan import _is_weight

        weights = [n for n in names if _is_weight(ck, n)]
        if not weights:
            raise RecipeError(f"model '{model}': no weight tensors to give coefficients to")
        return {"tensors": weights}
    stacks: dict[str, int] = {}
    for n in names:
        ln = split_layer(n)
        if ln is not None:
            stacks[ln.stack] = max(stacks.get(ln.stack, 0), ln.index + 1)
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
