"""Merge recipes: a YAML schema compatible with mergekit's.

A recipe names the models, the base model, the method and its parameters::

    merge_method: ties
    base_model: path/or/hub-id
    models:
      - model: expert-a
        parameters: {weight: 0.6, density: [0.2, 0.8]}   # a gradient over depth
      - model: expert-b
        parameters:
          weight: [{filter: self_attn, value: 0.3}, {value: 0.7}]
    parameters: {lambda: 1.0}
    dtype: float32          # inputs are rounded to this dtype before merging
    out_dtype: bfloat16     # dtype of the written checkpoint

or, instead of ``models``, ``slices`` of layer ranges (passthrough, depth up-scaling)::

    slices:
      - sources: [{model: a, layer_range: [0, 24]}]
      - sources: [{model: b, layer_range: [8, 32]}]

Parameter values resolve as mergekit resolves them: a list of numbers is a gradient,
interpolated linearly over the layers of a slice (layer ``i`` of ``n`` sits at
``t = i / (n - 1)``); tensors outside the repeated layers (embeddings, final norm, head)
take ``t = 0``, the first value. A list of ``{filter, value}`` entries picks the first whose
``filter`` is a substring of the tensor name (no filter, or ``*``, matches all). Settings are
looked up per model first, then in the slice, then in the recipe's ``parameters``.

Methods that read data (``fisher``, ``regmean``) take it from ``data``, at the top level
for every model and under a model's entry (in the ``models`` form) for that model, whose
keys override the top level's::

    data: {path: train.jsonl, text: prompt, target: answer, limit: 256, batch_size: 16}

``path`` is a JSON-lines file, ``text`` the field fed to the model, ``target`` an optional
field appended to it whose tokens the empirical Fisher scores (without it every token after
the first is scored), ``limit`` the number of records read (the first ones), ``batch_size``
the rows run at once. mergekit's schema has no such key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import os
import warnings

import yaml

from .merge.methods import METHODS, MethodSpec, ParamSpec

__all__ = [
    "Recipe",
    "RecipeError",
    "DataSpec",
    "ModelRef",
    "SliceSource",
    "OutputSlice",
    "AlignSpec",
    "load_recipe",
    "parse_recipe",
    "evaluate_setting",
    "locate_setting",
    "DTYPES",
]


class RecipeError(ValueError):
    """A recipe that cannot run, with the key at fault in its message."""


DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float64": "float64", "fp64": "float64",
}

_TOP_KEYS = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "data", "align", "keep",
)
_MODEL_KEYS = ("model", "parameters", "data")
_DATA_KEYS = ("path", "dataset", "subset", "split", "revision", "text", "target", "limit", "batch_size", "fisher")
_DATA_SOURCE_KEYS = ("path", "dataset", "subset", "split", "revision")  # where the examples come from
_ALIGN_KEYS = ("method", "reference", "max_sweeps", "seed")
_SOURCE_KEYS = ("model", "layer_range", "parameters")
_SLICE_KEYS = ("sources", "base_model", "parameters", "residual_weight")


def kept(name: str, keep) -> bool:
    """Whether tensor ``name`` is one of ``keep`` or lies in a module ``keep`` names."""
    return any(name == k or name.startswith(k + ".") for k in keep)


@dataclass(frozen=True)
class ModelRef:
    """A model: a local folder or a hub id, with an optional revision (``id@rev``)."""

    path: str
    revision: str | None = None

    @classmethod
    def parse(cls, value: Any, where: str) -> "ModelRef":
        if isinstance(value, ModelRef):
            return value
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if isinstance(value, dict):
            inner = value.get("model", value)
            if isinstance(inner, dict):
                unknown = set(inner) - {"path", "revision"}
                if unknown or "path" not in inner:
                    raise RecipeError(f"{where}: a model given as a mapping needs 'path' "
                                      f"(and optionally 'revision'); got keys {sorted(inner)}")
                return cls(str(inner["path"]), inner.get("revision"))
            return cls.parse(inner, where)
        if not isinstance(value, str) or not value.strip():
            raise RecipeError(f"{where}: expected a model path or hub id, got {value!r}")
        if "+" in value and not Path(value).exists():
            raise RecipeError(
                f"{where}: '{value}' names a LoRA adapter ('model+adapter'); apply the "
                "adapter to the model first (peft's merge_and_unload) and name the result"
            )
        if "@" in value and not Path(value).exists():
            path, rev = value.rsplit("@", 1)
            return cls(path, rev)
        return cls(value)

    def __str__(self) -> str:
        return self.path if self.revision is None else f"{self.path}@{self.revision}"


@dataclass(frozen=True)
class DataSpec:
    """Where a data-reading method takes a model's examples (the recipe's ``data``): a
    JSON-lines file (``path``), or a ``datasets`` dataset (``dataset``: a hub id or a local
    folder, with its ``subset``, ``split`` and ``revision``)."""

    path: str | None  # None only in a top level whose models each name their own source
    text: str = "text"
    target: str | None = None
    limit: int = 256
    batch_size: int = 16
    fisher: str = "empirical"  # the tokens a Fisher scores: the data's (empirical) or drawn from the model (sampled)
    dataset: str | None = None
    subset: str | None = None
    split: str = "train"
    revision: str | None = None

    @property
    def given(self) -> bool:
        """Whether it names a source of examples (a file or a dataset)."""
        return self.path is not None or self.dataset is not None

    def describe(self) -> str:
        """The source, for messages."""
        if self.path is not None:
            return f"data file '{self.path}'"
        sub = f", subset '{self.subset}'" if self.subset else ""
        rev = f" at revision '{self.revision}'" if self.revision else ""
        return f"dataset '{self.dataset}'{sub}{rev}, split '{self.split}'"

    @classmethod
    def parse(cls, value: Any, where: str, default: "DataSpec | None" = None, need_path: bool = True) -> "DataSpec":
        """A ``data`` mapping, its missing keys taken from ``default`` (the top level's,
        which may leave the source to each model's own entry). A model entry that names a
        source (``path`` or ``dataset``) takes none of the top level's source keys."""
        d = _check_keys(value, _DATA_KEYS, where)
        inherited = dict(default.__dict__) if default is not None else {}
        if "path" in d or "dataset" in d:
            for key in _DATA_SOURCE_KEYS:
                inherited.pop(key, None)
        merged = {"path": None, **inherited, **d}
        path, dataset = merged.get("path"), merged.get("dataset")
        if path is not None and dataset is not None:
            raise RecipeError(f"{where}: give either 'path' (a JSON-lines file) or 'dataset' (a datasets name or "
                              f"folder), not both")
        if dataset is not None:
            if not isinstance(dataset, str) or not dataset.strip():
                raise RecipeError(f"{where}.dataset: expected a dataset's hub id or local folder, got {dataset!r}")
            for key in ("subset", "split", "revision"):
                v = merged.get(key)
                if v is not None and (not isinstance(v, str) or not v.strip()):
                    raise RecipeError(f"{where}.{key}: expected a name, got {v!r}")
        else:
            for key in ("subset", "revision", "split"):
                if (d if key == "split" else merged).get(key) is not None:
                    raise RecipeError(f"{where}.{key}: only a 'dataset' has a {key}; a 'path' names one file")
            if (path is not None or need_path) and (not isinstance(path, str) or not path.strip()):
                raise RecipeError(f"{where}.path: expected the path of a JSON-lines file (or give 'dataset': a "
                                  f"datasets name or folder), got {path!r}")
        if merged.get("split") is None:
            merged.pop("split", None)
        for key in ("text", "target"):
            v = merged.get(key)
            if v is not None and (not isinstance(v, str) or not v):
                raise RecipeError(f"{where}.{key}: expected a field name, got {v!r}")
        if merged.get("fisher", cls.fisher) not in ("empirical", "sampled"):
            raise RecipeError(f"{where}.fisher: expected 'empirical' (the data's tokens) or 'sampled' (tokens drawn "
                              f"from the model's predictions), got {merged['fisher']!r}")
        for key in ("limit", "batch_size"):
            v = merged.get(key, getattr(cls, key))
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise RecipeError(f"{where}.{key}: expected a positive integer, got {v!r}")
        return cls(**merged)


@dataclass(frozen=True)
class AlignSpec:
    """How the models are permuted to line up with one of them before the merge (the
    recipe's ``align``: a method name, or a mapping with ``method`` and its settings)."""

    method: str = "weight_matching"
    reference: ModelRef | None = None  # None: the base model, else the first model listed
    max_sweeps: int = 100
    seed: int = 0

    @classmethod
    def parse(cls, value: Any, where: str) -> "AlignSpec":
        from .merge.align import ALIGNERS

        d = {"method": value} if isinstance(value, str) else _check_keys(value, _ALIGN_KEYS, where)
        method = d.get("method", cls.method)
        if not isinstance(method, str) or method not in ALIGNERS:
            raise RecipeError(f"{where}.method: unknown alignment {method!r}; accepted: {', '.join(ALIGNERS)}")
        ref = ModelRef.parse(d["reference"], f"{where}.reference") if d.get("reference") is not None else None
        for key in ("max_sweeps", "seed"):
            v = d.get(key, getattr(cls, key))
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "max_sweeps" else 0):
                raise RecipeError(f"{where}.{key}: expected a{' positive' if key == 'max_sweeps' else ' non-negative'}"
                                  f" integer, got {v!r}")
        return cls(method, ref, d.get("max_sweeps", cls.max_sweeps), d.get("seed", cls.seed))


@dataclass
class SliceSource:
    model: ModelRef
    layer_range: tuple[int, int] | None = None  # None: all layers (the `models:` form)
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class OutputSlice:
    sources: list[SliceSource]
    base_model: ModelRef | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A parsed, validated recipe. ``slices`` is always set: the ``models`` form becomes
    one slice over all layers (with the base model added when it is not listed)."""

    merge_method: str
    method: MethodSpec
    slices: list[OutputSlice]
    base_model: ModelRef | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | ModelRef | None = None
    chat_template: str | None = None
    name: str | None = None
    uses_models_form: bool = True
    raw: dict[str, Any] = field(default_factory=dict)
    data: DataSpec | None = None  # the top level's ``data``
    model_data: dict[ModelRef, DataSpec] = field(default_factory=dict)  # a model entry's own
    align: AlignSpec | None = None  # the recipe's ``align``, or its method's own (``MethodSpec.align``)
    # modules not merged: the merged model takes them from the base (or, without a base, the
    # first model) as they are: each fine-tune's own task head (an image classifier's
    # ``classifier``), or a part of the model no expert changed (CLIP's text tower)
    keep: tuple[str, ...] = ()

    def keeps(self, name: str) -> bool:
        """Whether tensor ``name`` is left out of the merge (``keep``: it, or a module holding it)."""
        return kept(name, self.keep)

    def align_reference(self) -> ModelRef:
        """The model the others are permuted to line up with."""
        if self.align is not None and self.align.reference is not None:
            return self.align.reference
        return self.base_model if self.base_model is not None else self.referenced_models()[0]

    def data_for(self, model: ModelRef) -> DataSpec | None:
        """The examples a data-reading method takes for ``model`` (None: no file named)."""
        spec = self.model_data.get(model, self.data)
        return spec if spec is not None and spec.given else None

    def referenced_models(self) -> list[ModelRef]:
        seen: dict[ModelRef, None] = {}
        if self.base_model is not None:
            seen[self.base_model] = None
        for s in self.slices:
            if s.base_model is not None:
                seen[s.base_model] = None
            for src in s.sources:
                seen[src.model] = None
        return list(seen)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.raw, sort_keys=False, default_flow_style=None)


def _check_keys(d: Any, allowed: tuple[str, ...], where: str) -> dict:
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(d).__name__}")
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise RecipeError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; accepted: {', '.join(allowed)}"
        )
    return d


def _check_params(params: Any, method: MethodSpec, where: str, per_model: bool | None) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RecipeError(f"{where}: expected a mapping of parameters, got {params!r}")
    for key, setting in params.items():
        if key not in method.param_names:
            raise RecipeError(
                f"{where}.{key}: unknown parameter for merge_method '{method.name}'; "
                f"accepted: {', '.join(method.param_names) or '(none)'}"
            )
        spec = method.param(key)
        if per_model and not spec.per_model:
            warnings.warn(
                f"{where}.{key}: '{key}' is shared by all models and is read from the recipe's "
                "or the slice's parameters; the value given for this model is ignored "
                "(as mergekit ignores it)",
                stacklevel=3,
            )
        _check_setting(setting, spec, f"{where}.{key}")
    return params


def _check_setting(setting: Any, spec: ParamSpec, where: str, nested: bool = False) -> None:
    """A setting is a scalar, a list of scalars (a gradient), a ``{filter, value}`` mapping,
    or a list of such mappings; anything else is refused, as mergekit's schema refuses it."""
    if isinstance(setting, dict):
        _check_keys(setting, ("filter", "value"), where)
        if "value" not in setting:
            raise RecipeError(f"{where}: a filtered setting needs a 'value'")
        v = setting["value"]
        if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(e, (dict, list)) for e in v)):
            raise RecipeError(f"{where}.value: expected a number or a list of numbers, got {v!r}")
        _check_setting(v, spec, f"{where}.value", nested=True)
        return
    if isinstance(setting, list):
        if not setting:
            raise RecipeError(f"{where}: an empty list is not a valid setting")
        dicts = [isinstance(e, dict) for e in setting]
        if any(dicts) and not all(dicts):
            raise RecipeError(
                f"{where}: mixes {{filter, value}} entries with bare values; write the fallback "
                "as {value: ...} (an entry without a filter matches every tensor)"
            )
        for i, e in enumerate(setting):
            if isinstance(e, dict):
                _check_setting(e, spec, f"{where}[{i}]")
            elif isinstance(e, list):
                raise RecipeError(f"{where}[{i}]: nested lists are not a valid setting")
            else:
                validate_value(spec, e, f"{where}[{i}]")
        return
    validate_value(spec, setting, where)


def validate_value(spec: ParamSpec, v: Any, where: str) -> Any:
    """Check one resolved value against its spec; returns it converted."""
    if spec.kind == "bool":
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        raise RecipeError(f"{where}: expected true or false, got {v!r}")
    if spec.kind == "rescale":
        if isinstance(v, bool):
            return v
        if isinstance(v, str) and v.lower() in ("true", "false"):
            return v.lower() == "true"
        if isinstance(v, str) and v.lower() in ("l1", "l2", "linf"):
            return v.lower()
        raise RecipeError(f"{where}: expected true, false, l1, l2 or linf, got {v!r}")
    if v is None and not spec.required:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise RecipeError(f"{where}: expected a number, got {v!r}")
    try:
        x = float(v)
    except ValueError:
        raise RecipeError(f"{where}: expected a number, got {v!r}") from None
    if x != x or x in (float("inf"), float("-inf")):
        raise RecipeError(f"{where}: must be finite, got {v!r}")
    low = spec.lo is not None and (x < spec.lo or (spec.lo_open and x <= spec.lo))
    if low or (spec.hi is not None and x > spec.hi):
        lo = "(-inf" if spec.lo is None else f"{'(' if spec.lo_open else '['}{spec.lo}"
        hi = "inf)" if spec.hi is None else f"{spec.hi}]"
        raise RecipeError(f"{where}: {spec.name}={x} is outside {lo}, {hi}")
    return x


def locate_setting(setting: Any, tensor_name: str, t: float) -> tuple | None:
    """Where one setting's value for a tensor at depth ``t`` in [0, 1] comes from: ``None``
    if no filter matches, ``(v,)`` for a plain value, or ``(a, b, frac)`` for the linear
    interpolation ``(1 - frac) * a + frac * b`` of two neighbouring entries of a list.

    Numbers in a list interpolate linearly; lists of booleans or strings pick
    ``values[int(t * (n - 1))]``. (``Space.compile`` locates settings whose numbers stand
    for genes, so that a genome's values come out of the same rules as a recipe's.)
    """
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list):
        return (setting,)
    if not setting:
        return None
    nested, numeric = False, True  # one scan of the element types (this runs per tensor and candidate)
    for e in setting:
        k = type(e)
        if k is float or k is int:
            continue
        if issubclass(k, (dict, list)):
            nested = True
            break
        if issubclass(k, bool) or not issubclass(k, (int, float)):
            numeric = False
    if not nested:
        if not numeric:
            return (setting[int(t * (len(setting) - 1))],)
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return setting[i0], setting[i1], scaled - i0
    for cond in setting:
        if not isinstance(cond, dict):
            continue
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and str(flt) in tensor_name):
            return locate_setting(cond.get("value"), tensor_name, t)
    return None


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """Resolve one setting for a tensor at depth ``t`` in [0, 1]; ``None`` if no filter
    matches (see ``locate_setting``)."""
    loc = locate_setting(setting, tensor_name, t)
    if loc is None:
        return None
    if len(loc) == 1:
        return loc[0]
    a, b, frac = loc
    return (1 - frac) * a + frac * b


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping (as loaded from YAML) and normalise it to slices."""
    d = _check_keys(data, _TOP_KEYS, source)
    if "merge_method" not in d:
        raise RecipeError(f"{source}: 'merge_method' is required; accepted: {', '.join(METHODS)}")
    mname = str(d["merge_method"])
    if mname not in METHODS:
        raise RecipeError(
            f"{source}.merge_method: unknown method '{mname}'; accepted: {', '.join(METHODS)}"
        )
    method = METHODS[mname]
    if ("models" in d) == ("slices" in d):
        raise RecipeError(f"{source}: give exactly one of 'models' or 'slices'")
    if "tokenizer" in d and "tokenizer_source" in d:
        raise RecipeError(f"{source}: give at most one of 'tokenizer' and 'tokenizer_source'")
    base = ModelRef.parse(d["base_model"], f"{source}.base_model") if d.get("base_model") else None
    params = _check_params(d.get("parameters"), method, f"{source}.parameters", None)
    dtype = _dtype(d.get("dtype"), f"{source}.dtype")
    out_dtype = _dtype(d.get("out_dtype"), f"{source}.out_dtype")
    data = DataSpec.parse(d["data"], f"{source}.data", need_path=False) if d.get("data") is not None else None
    model_data: dict[ModelRef, DataSpec] = {}

    slices: list[OutputSlice] = []
    if "models" in d:
        models = d["models"]
        if not isinstance(models, list) or not models:
            raise RecipeError(f"{source}.models: expected a non-empty list of models")
        sources = []
        for i, m in enumerate(models):
            where = f"{source}.models[{i}]"
            if isinstance(m, str):
                m = {"model": m}
            _check_keys(m, _MODEL_KEYS, where)
            if "model" not in m:
                raise RecipeError(f"{where}: 'model' is required")
            ref = ModelRef.parse(m["model"], f"{where}.model")
            p = _check_params(m.get("parameters"), method, f"{where}.parameters", True)
            sources.append(SliceSource(ref, None, p))
            if m.get("data") is not None:
                spec = DataSpec.parse(m["data"], f"{where}.data", data)
                if model_data.get(ref, spec) != spec:
                    raise RecipeError(f"{where}.data: model '{ref}' is listed again with other data")
                model_data[ref] = spec
        if base is not None and all(s.model != base for s in sources):
            sources.append(SliceSource(base, None, {}))
        slices.append(OutputSlice(sources))
    else:
        raw_slices = d["slices"]
        if not isinstance(raw_slices, list) or not raw_slices:
            raise RecipeError(f"{source}.slices: expected a non-empty list of slices")
        for i, s in enumerate(raw_slices):
            where = f"{source}.slices[{i}]"
            _check_keys(s, _SLICE_KEYS, where)
            if s.get("residual_weight") is not None:
                raise RecipeError(f"{where}.residual_weight: not supported")
            srcs = s.get("sources")
            if not isinstance(srcs, list) or not srcs:
                raise RecipeError(f"{where}.sources: expected a non-empty list")
            out = []
            for j, src in enumerate(srcs):
                w = f"{where}.sources[{j}]"
                _check_keys(src, _SOURCE_KEYS, w)
                if "model" not in src or "layer_range" not in src:
                    raise RecipeError(f"{w}: 'model' and 'layer_range' are required")
                lr = src["layer_range"]
                if (not isinstance(lr, (list, tuple)) or len(lr) != 2
                        or not all(isinstance(x, int) and not isinstance(x, bool) for x in lr)
                        or lr[0] < 0 or lr[1] <= lr[0]):
                    raise RecipeError(f"{w}.layer_range: expected [start, end) with 0 <= start < end, got {lr!r}")
                p = _check_params(src.get("parameters"), method, f"{w}.parameters", True)
                out.append(SliceSource(ModelRef.parse(src["model"], f"{w}.model"), (lr[0], lr[1]), p))
            lengths = {x.layer_range[1] - x.layer_range[0] for x in out}
            if len(lengths) != 1:
                raise RecipeError(f"{where}.sources: every source of a slice needs the same number of layers, got {sorted(lengths)}")
            sb = ModelRef.parse(s["base_model"], f"{where}.base_model") if s.get("base_model") else None
            sp = _check_params(s.get("parameters"), method, f"{where}.parameters", None)
            slices.append(OutputSlice(out, sb, sp))

    tok = d.get("tokenizer_source")
    if "tokenizer" in d:
        t = d["tokenizer"]
        _check_keys(t, ("source", "tokens", "pad_to_multiple_of"), f"{source}.tokenizer")
        if t.get("tokens") or t.get("pad_to_multiple_of"):
            raise RecipeError(f"{source}.tokenizer: 'tokens' and 'pad_to_multiple_of' are not supported; use 'tokenizer_source'")
        tok = t.get("source")
    if tok is not None and tok not in ("base", "union"):
        tok = ModelRef.parse(tok, f"{source}.tokenizer_source")

    for key in ("name", "chat_template"):
        if d.get(key) is not None and not isinstance(d[key], str):
            raise RecipeError(f"{source}.{key}: expected a string, got {type(d[key]).__name__}")
    align = AlignSpec.parse(d["align"], f"{source}.align") if d.get("align") is not None else None
    if method.align is not None:
        if align is None:
            align = AlignSpec(method.align)
        elif align.method != method.align:
            raise RecipeError(f"{source}.align.method: merge_method '{mname}' aligns by {method.align}, "
                              f"not {align.method}")
    keep = d.get("keep")
    if keep is not None:
        if isinstance(keep, str):
            keep = [keep]
        if (not isinstance(keep, (list, tuple)) or not keep
                or not all(isinstance(h, str) and h and not h.startswith(".") and not h.endswith(".") for h in keep)):
            raise RecipeError(f"{source}.keep: expected a list of module or tensor names (e.g. [classifier]), "
                              f"got {keep!r}")
    recipe = Recipe(
        merge_method=mname, method=method, slices=slices, base_model=base, parameters=params,
        dtype=dtype, out_dtype=out_dtype, tokenizer_source=tok,
        chat_template=d.get("chat_template"), name=d.get("name"),
        uses_models_form="models" in d, raw=dict(d), data=data, model_data=model_data, align=align,
        keep=tuple(keep or ()),
    )
    if align is not None and align.reference is not None and align.reference not in recipe.referenced_models():
        raise RecipeError(f"{source}.align.reference: '{align.reference}' is not one of the recipe's models "
                          f"({', '.join(map(str, recipe.referenced_models()))})")
    _check_inputs(recipe, source)
    from .merge.align import ALIGNERS

    if (data is not None or model_data) and not method.statistics and not (
            align is not None and ALIGNERS[align.method].needs_data):
        warnings.warn(f"{source}.data: merge_method '{mname}' reads no data; the 'data' given is not used "
                      f"(the methods that read it: {', '.join(m for m, s in METHODS.items() if s.statistics)})",
                      stacklevel=2)
    return recipe


def _dtype(v: Any, where: str) -> str | None:
    if v is None:
        return None
    key = str(v).replace("torch.", "").lower()
    if key not in DTYPES:
        raise RecipeError(f"{where}: unknown dtype {v!r}; accepted: float32, float16, bfloat16, float64")
    return DTYPES[key]


def _check_inputs(r: Recipe, source: str) -> None:
    m = r.method
    for i, s in enumerate(r.slices):
        base = s.base_model or r.base_model
        where = f"{source}.slices[{i}]" if not r.uses_models_form else f"{source}.models"
        if m.needs_base and base is None:
            raise RecipeError(f"{source}.base_model: merge_method '{m.name}' needs a base_model")
        # the base is the first source of the base model; a model listed again is an input
        at = next((j for j, x in enumerate(s.sources) if x.model == base), None) if base is not None else None
        others = [x for j, x in enumerate(s.sources) if j != at] if not m.base_in_inputs else s.sources
        n = len(others)
        if n < m.min_models:
            raise RecipeError(f"{where}: merge_method '{m.name}' needs at least {m.min_models} model(s)"
                              f"{' besides the base' if not m.base_in_inputs else ''}, got {n}")
        if m.max_models is not None and n > m.max_models:
            raise RecipeError(f"{where}: merge_method '{m.name}' takes at most {m.max_models} model(s)"
                              f"{' besides the base' if not m.base_in_inputs else ''}, got {n}")


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe YAML file."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {p}")
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not UTF-8 text ({e})") from None
    try:
        data = yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader without aliases
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    except RecursionError:
        raise RecipeError(f"{p}: its YAML is nested too deeply to be a recipe") from None
    return parse_recipe(data, source=p.name)


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a document whose aliases (``*name``) expand it beyond
    ``MAX_NODES`` values: a few nested aliases turn a small file into gigabytes (the "billion
    laughs"). Aliases that merely share a value, as YAML dumpers write them, are accepted."""

    MAX_NODES = 100_000
    MAX_CHARS = 10_000_000  # of text in its values, once expanded

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, tuple[int, int]] = {}

        def expanded(n) -> tuple[int, int]:
            """(values, characters) of ``n`` with every alias expanded."""
            if id(n) in sizes:
                return sizes[id(n)]
            sizes[id(n)] = (1, 0)  # a cycle counts once
            if isinstance(n, (yaml.MappingNode, yaml.SequenceNode)):
                kids = [x for kv in n.value for x in kv] if isinstance(n, yaml.MappingNode) else n.value
                parts = [expanded(x) for x in kids]
                total = (1 + sum(p[0] for p in parts), sum(p[1] for p in parts))
            else:
                total = (1, len(str(n.value)))
            sizes[id(n)] = total
            return total

        if node is not None:
            values, chars = expanded(node)
            if values > self.MAX_NODES:
                raise yaml.YAMLError(f"its aliases expand it to {values:,} values, more than the "
                                     f"{self.MAX_NODES:,} a recipe may hold")
            if chars > self.MAX_CHARS:
                raise yaml.YAMLError(f"its aliases expand it to {chars:,} characters of values, more than "
                                     f"the {self.MAX_CHARS:,} a recipe may hold")
        return node
