"""The ``Merger``: a plan and its inputs, and a candidate's ``Columns`` merged to disk or
into a live model. It is the one-shot merge behind ``evomerge-merge`` and the export of a
found recipe; the search's ``ResidentMerger`` (``resident.py``) is a ``Merger`` whose inputs
stay in memory.

``Merger(recipe)`` opens every referenced model lazily, builds the merge ``Plan``
(``plan.py``: one ``TensorTask`` per output tensor, its inputs and checks) and resolves the
recipe's parameters into ``Columns`` (gradients interpolated over depth, filters applied).
A candidate (``what``) is those columns by default, another recipe that fits the plan, or
``Columns`` from a compiled search space. Then:

- ``merger.write(out_dir, what)`` streams the merge to disk: inputs are memory-mapped and
  released tensor by tensor, each result is written at its offset in its shard, and the
  folder appears atomically (temporary folder, renamed);
- ``merger.materialize(what, into=model)`` writes every merged tensor into a live model's
  own parameters, with no second model and no disk;
- ``merger.merge_tensor(task, what)`` merges a single tensor.

A method that reads data (``MethodSpec.statistics``: Fisher-weighted averaging, RegMean)
gets, for every tensor, each input model's statistic of that tensor: computed once per
model from the recipe's ``data`` for it (``statistics.examples``) on the model loaded live,
in float32 on the merge's device (streamed block by block where forward passes are all it
takes: ``statistics.load_streamed``), and cached on disk (``statistics.compute``), on the
first merge; a merge reads them back tensor by tensor as it reaches each tensor.

A recipe with ``align`` (or a method that aligns, ``weight_matching``) reads every model
but the reference through its permutations onto the reference (``align.AlignedCheckpoint``),
found on the first read or with ``align()``, and cached on disk; their statistics are
permuted alike.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor

from ..checkpoint import (
    Checkpoint,
    CheckpointError,
    CheckpointWriter,
    refuse_overlap,
    TensorEntry,
    torch_dtype,
)
from ..recipe import ModelRef, Recipe
from . import native
from .methods import MethodSpec
from .plan import Columns, MergeError, Plan, TensorTask

__all__ = ["Columns", "Merger", "MergeError", "TensorTask"]


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _max_positions(config: dict) -> int | None:
    """The longest sequence a model's config says it takes (None: not said)."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        v = config.get(key)
        if isinstance(v, int) and v > 0:
            return v
    return None


class _Stop(Exception):
    """Ends a forward pass at the layer whose inputs were wanted."""


def _inputs_of_layer(run: Callable[[], Any], module: torch.nn.Module, mask: Tensor) -> Tensor:
    """The inputs ``module`` sees in the forward pass ``run()`` makes (stopped there), over
    the real tokens of ``mask``, in float64."""
    got: list[Tensor] = []

    def hook(mod, args):
        got.append(args[0])
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        h.remove()
    if not got:
        raise MergeError("a linear layer was not reached by the forward pass")
    x = got[0].reshape(-1, got[0].shape[-1])
    keep = mask.reshape(-1).bool().to(x.device)
    return (x[keep] if keep.numel() == x.shape[0] else x).double()


class _Blocks:
    """One model run over batches block by block: the inputs (arguments and keyword
    arguments) of its current decoder block are kept per batch, so the inputs of a layer in
    that block cost a pass through the block alone, and moving on to a later block a pass
    through each block between (their layers final by then: the layers are taken in forward
    order). A layer outside the blocks (a head), a block before the current one, or blocks
    that cannot be run alone (of several attention types, whose masks differ; hidden states
    not passed first) take a whole forward pass, stopped at the layer."""

    def __init__(self, model: torch.nn.Module, batches: list):
        dev = next(model.parameters()).device
        self.model, self.batches = model, [tuple(t.to(dev) for t in b) for b in batches]
        self.stack: str | None = None
        self.at: int | None = None
        self.kept: list[tuple[tuple, dict]] | None = None  # per batch, the current block's inputs
        types = getattr(getattr(model, "config", None), "layer_types", None)
        self.alone = not (isinstance(types, (list, tuple)) and len(set(types)) > 1)

    def _block(self, i: int) -> torch.nn.Module:
        return self.model.get_submodule(f"{self.stack}.{i}")

    def _capture(self, i: int) -> None:
        """Block ``i``'s inputs per batch, from forward passes stopped at it."""
        kept = []
        for ids, mask, *_ in self.batches:
            got: list = []

            def hook(mod, args, kwargs):
                got.append((args, kwargs))
                raise _Stop

            h = self._block(i).register_forward_pre_hook(hook, with_kwargs=True)
            try:
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)
            except _Stop:
                pass
            finally:
                h.remove()
            if not got or not got[0][0] or not isinstance(got[0][0][0], Tensor):
                self.alone = False  # (hidden states passed by keyword: not run alone here)
                return
            kept.append(got[0])
        self.kept, self.at = kept, i

    def _advance(self, i: int) -> None:
        streamed = hasattr(self.model, "hold_blocks")  # (``statistics.load_streamed``: read once for every batch)
        while self.at < i:
            block, nxt = self._block(self.at), []
            if streamed:
                self.model.hold_blocks = True
            try:
                for args, kwargs in self.kept:
                    h = block(*args, **kwargs)
                    h = h[0] if isinstance(h, tuple) else h
                    nxt.append(((h, *args[1:]), kwargs))
            finally:
                if streamed:
                    self.model.hold_blocks = False
                    block.release_weights()
            self.kept, self.at = nxt, self.at + 1

    def inputs(self, name: str, module: torch.nn.Module) -> Iterator[Tensor]:
        """Per batch, the inputs of the layer whose weight is ``name`` (``module``)."""
        from ..checkpoint import split_layer

        lay = split_layer(name)
        if self.alone and lay is not None and (self.stack is None or lay.stack == self.stack):
            if self.stack is None:
                self.stack = lay.stack
            if self.at is None or lay.index < self.at:
                self._capture(lay.index)
            if self.alone:
                self._advance(lay.index)
                block = self._block(lay.index)
                for (args, kwargs), (_, mask, *_) in zip(self.kept, self.batches):
                    yield _inputs_of_layer(lambda: block(*args, **kwargs), module, mask)
                return
        for ids, mask, *_ in self.batches:
            yield _inputs_of_layer(lambda: self.model(input_ids=ids, attention_mask=mask, use_cache=False), module,
                                   mask)


class Merger:
    """Plans a recipe and merges it, or candidates that fit its plan.

    Args:
        recipe: a parsed ``Recipe``.
        device: where the arithmetic runs (``cpu``, ``cuda``, ``cuda:1``).
        seed: seeds the random methods (DARE, DELLA); masks depend only on the seed, the
            tensor and the model, never on the order of work.
        out_dtype: overrides the recipe's ``out_dtype``.
        allow_pickle: accept pickled ``.bin`` checkpoints (loaded with ``weights_only``).
        check_finite: refuse NaN or inf in input weights.
        checkpoints: already opened models, by reference (used by tests and workers).
        compile: merge the task-arithmetic family (task arithmetic, TIES, DARE) through
            ``torch.compile``, each tensor as a flat block of one (``flat.FlatGroup``):
            one fused kernel per piece instead of a dozen operations (for GPUs; the same
            bits; each new combination of method and dtypes compiles once).
    """

    def __init__(
        self,
        recipe: Recipe,
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
        out_dtype: str | None = None,
        allow_pickle: bool = False,
        check_finite: bool = True,
        checkpoints: dict[ModelRef, Checkpoint] | None = None,
        compile: bool = False,
    ):
        self.recipe = recipe
        self.method: MethodSpec = recipe.method
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise MergeError("device 'cuda' was asked for, but torch sees no CUDA device")
        if self.device.type == "cuda" and self.device.index is None:  # compare equal to tensors' devices
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.seed = int(seed)
        self.check_finite = check_finite
        self.compile = bool(compile)
        self.models: dict[ModelRef, Checkpoint] = dict(checkpoints or {})
        for ref in recipe.referenced_models():
            if ref not in self.models:
                try:
                    self.models[ref] = Checkpoint.open(ref, allow_pickle=allow_pickle)
                except CheckpointError as e:
                    raise MergeError(str(e)) from None
        self._ref_key: dict[ModelRef, str] = {}  # the alignment reference's weight fingerprint
        self._aligned: dict[ModelRef, Any] = self._wrap_aligned() if recipe.align is not None else {}
        self.plan = Plan(recipe, self.models, out_dtype=out_dtype)
        from .statistics import SEQUENTIAL

        self._seq = next((n for n in self.method.statistics if n in SEQUENTIAL), None)  # measured on the merge
        if recipe.align is not None or self._seq is not None:
            self._same_layers()
        self.recipe_columns = self.plan.columns()
        self.seeds = self.plan.seeds(self.seed)
        self._index = {t.name: i for i, t in enumerate(self.plan.tasks)}
        self._plan_seen: tuple | None = None  # the last candidate columns' plan found equal to this one
        self._data_stats: dict[ModelRef, dict[str, dict[str, Tensor]]] | None = None  # per model
        self._current: Columns | None = None  # the candidate being merged (``_begin``)
        self._current_key: str | None = None  # its parameters, where a statistic depends on them
        self._sequential: tuple[str, dict] | None = None  # (its parameters, the ``_seq`` measured for them)
        self._widening: dict[str, tuple] | None = None  # partial merging's wider tensors (``_wide_units``)
        self._seq_models: tuple | None = None  # the pass's (data, live models, merged model), kept for the next
        # candidate by a merger of many (``hold_statistics``)

    # the statistics of a data-reading method are read tensor by tensor from their cache as the
    # merge reaches them (one-shot merges: memory for one tensor's at a time); a merger that
    # merges many candidates holds them in memory instead (``ResidentMerger``)
    hold_statistics = False

    @property
    def tasks(self) -> list[TensorTask]:
        return self.plan.tasks

    @property
    def reference(self) -> Checkpoint:
        return self.plan.reference

    @property
    def compute_dtype(self) -> torch.dtype | None:
        return self.plan.compute_dtype

    @property
    def out_dtype(self) -> torch.dtype | None:
        return self.plan.out_dtype

    @property
    def out_layers(self) -> int | None:
        return self.plan.out_layers

    def columns(self, recipe: Recipe) -> Columns:
        """A candidate recipe's parameters over this plan (nothing is read). It must fit the
        plan (``Plan.misfit``: only parameter values differ) and keep its output dtype. A
        search compiles its space instead (``Space.compile``): no recipe."""
        if recipe is self.recipe:
            return self.recipe_columns
        why = self.plan.misfit(recipe)
        if why is not None:
            raise MergeError(f"the candidate recipe does not fit the merge plan: {why}")
        out, own = torch_dtype(recipe.out_dtype or recipe.dtype), torch_dtype(self.recipe.out_dtype or self.recipe.dtype)
        if out != own:  # (an out_dtype given to the Merger overrides every candidate's alike)
            raise MergeError(f"the candidate recipe's output dtype ({out}) is not the plan's ({own})")
        return self.plan.columns(recipe)

    def candidate(self, what: Recipe | Columns | None) -> Columns:
        """A candidate's columns: the recipe's own (None), another recipe's, or ``Columns``
        made for this plan (a compiled space's)."""
        if what is None:
            return self.recipe_columns
        cols = what if isinstance(what, Columns) else self.columns(what)
        if cols.plan is not self._plan_seen:  # (a compiled map's columns share one signature object)
            if cols.method.name != self.method.name or cols.plan != self.plan.signature:
                raise MergeError("the candidate's parameters were made for another plan (other tensors, models, "
                                 "model order or method)")
            self._plan_seen = cols.plan
        return cols

    def _same_layers(self) -> None:
        """Alignment lines each model's layer up with the reference's same layer, and the
        merged-input methods measure each layer where the merged model has it: a slice that
        merges one model's layer into another layer fits neither."""
        from ..checkpoint import split_layer

        what = f"align ({self.recipe.align.method})" if self.recipe.align is not None else self.method.name
        for t in self.plan.tasks:
            if t.copy:
                continue
            out = split_layer(t.name)
            for m, n in t.sources:
                src = split_layer(n)
                if src is not None and out is not None and src.index != out.index:
                    raise MergeError(f"{what}: tensor '{t.name}' is made from layer {src.index} of model '{m}'; "
                                     "slices that merge other layers than the output's are not supported here")

    def _begin(self, cols: Columns) -> Columns:
        """The candidate about to be merged: statistics measured on the merge itself
        (``statistics.SEQUENTIAL``) are measured again when its parameters differ from those
        they were measured for (compared once per candidate)."""
        if self._seq is not None and cols is not self._current:
            every = [cols.params(i) for i in range(len(self.tasks))]
            widths = {float(p["width"]) for p, t in zip(every, self.tasks) if "width" in p and not t.copy}
            if widths and widths != {self.width()}:
                raise MergeError(f"{self.method.name}: the candidate's width {sorted(widths)} is not the merge's "
                                 f"({self.width()}): width sets the merged model's shape, one per merge")
            self._current_key = repr([sorted(p.items()) for p in every])
        self._current = cols
        return cols

    def params(self, task: TensorTask | int, what: Recipe | Columns | None = None) -> dict[str, Any]:
        """A tensor's parameters as its method takes them (with its seeds, for the random
        methods): a candidate's (by default the recipe's), resolved for this tensor."""
        i = task if isinstance(task, int) else self._index[task.name]
        out = self.candidate(what).params(i)
        if self.seeds[i] is not None:
            out["seeds"] = self.seeds[i]
        return out

    # ----------------------------------------------------------------------------------
    # Alignment
    # ----------------------------------------------------------------------------------
    def _wrap_aligned(self) -> dict[ModelRef, Any]:
        """Every model but the alignment's reference read through its permutations (found
        on its first read, or read from the cache): layouts are checked now."""
        from . import align as A

        spec = self.recipe.align
        ref = self.recipe.align_reference()

        def layout(r: ModelRef):
            ck = self.models[r]
            try:
                return A.layout_of({n: ck.meta(n)[0] for n in ck.names()}, ck.config, model=str(r))
            except A.AlignError as e:
                raise MergeError(f"align ({spec.method}): {e}") from None
            except CheckpointError as e:
                raise MergeError(str(e)) from None

        lay = layout(ref)
        out: dict[ModelRef, Any] = {}
        for r in self.recipe.referenced_models():
            if r == ref:
                continue
            own = layout(r)
            if own.signature() != lay.signature():
                raise MergeError(f"align ({spec.method}): model '{r}' does not have the layout of the reference "
                                 f"'{ref}' (other tensors, heads or sizes); only models of one architecture and "
                                 "size can be permuted onto each other")
            out[r] = self.models[r] = A.AlignedCheckpoint(self.models[r], lay, lambda r=r: self._permutations(r))
        return out

    def _permutations(self, r: ModelRef) -> dict[str, Tensor]:
        """Model ``r``'s permutations onto the reference: from the cache, or found."""
        from . import align as A
        from . import statistics as S

        spec = self.recipe.align
        ref = self.recipe.align_reference()
        aligned = self._aligned[r]
        lay, inner, refck = aligned.layout, aligned._inner, self.models[ref]
        aligner = A.ALIGNERS[spec.method](max_sweeps=spec.max_sweeps, seed=spec.seed)
        cache = S.StatisticCache(native.cache_dir() / "alignment")
        batches: list = []
        if aligner.needs_data:  # both models run on the reference's data
            data = self.recipe.data_for(ref)
            if data is None:
                raise MergeError(f"align ({spec.method}) runs the models on data: give the recipe a 'data' entry "
                                 f"with a 'path' or a 'dataset' (top level, or under the reference model '{ref}')")
            try:
                batches = self._batches(ref, data)
            except MergeError:
                raise
            except Exception as e:  # bad data
                first = (str(e).strip().splitlines() or [""])[0]
                raise MergeError(f"model '{ref}' ({refck.folder}): {type(e).__name__}: {first}") from None
        try:
            if ref not in self._ref_key:  # the reference's bytes hashed once, not once per aligned model
                self._ref_key[ref] = S.model_fingerprint(refck.folder, contents=True)
            key = cache.key(aligner, f"{S.model_fingerprint(inner.folder, contents=True)}|"
                                     f"{self._ref_key[ref]}|"
                                     f"{json.dumps(lay.signature(), sort_keys=True)}", batches)
        except (OSError, ValueError) as e:
            raise MergeError(f"align: cannot read the weights of model '{r}' or '{ref}': {e}") from None
        hit = cache.get(aligner, key)
        if hit is not None and set(A.identity(lay)) <= set(hit):
            return hit
        try:  # (weight matching reads them again and again: held; otherwise read when asked for)
            a, b = ({n: ck.get(n) for n in lay.axes} if not aligner.needs_data else
                    S.TensorMap(lay.axes, ck.get) for ck in (refck, inner))
        except CheckpointError as e:
            raise MergeError(str(e)) from None
        if aligner.needs_data:
            try:
                live = [S.load_streamed(f, device=self.device) for f in (refck.folder, inner.folder)]  # (forward only)
            except Exception as e:  # a model transformers cannot load
                first = (str(e).strip().splitlines() or [""])[0]
                raise MergeError(f"align ({spec.method}): model '{r}' or '{ref}': {type(e).__name__}: {first}") from None
            perms = aligner(lay, *live, batches)
            del live
        else:
            perms = aligner(lay, a, b)
        try:
            record = {"aligner": spec.method, "settings": aligner.settings(), "model": str(r), "reference": str(ref),
                      "similarity_before": A.similarity(lay, a, b), "similarity_after": A.similarity(lay, a, b, perms)}
        except CheckpointError as e:
            raise MergeError(str(e)) from None
        try:
            cache.put(aligner, key, perms, record)
        except OSError as e:
            import warnings

            warnings.warn(f"alignment cache '{cache.root}' cannot be written ({e}); the permutations of "
                          f"model '{r}' are found again by the next merge", stacklevel=2)
        return perms

    def align(self, progress: bool = False) -> None:
        """Find (or read from the cache) every model's permutations now, not on its first
        read (a search does it once, before its workers start)."""
        if not self._aligned:
            return
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(self._aligned), desc=f"aligning ({self.recipe.align.method})", unit="model")
        try:
            for a in self._aligned.values():
                a.perms
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    # ----------------------------------------------------------------------------------
    # Statistics from data
    # ----------------------------------------------------------------------------------
    def _batches(self, ref: ModelRef, spec) -> list:
        """Model ``ref``'s examples (a recipe ``data`` entry) encoded by its tokenizer (or,
        without one, the reference model's: fine-tunes share their base's)."""
        from transformers import AutoTokenizer

        from . import statistics as S

        folder = self.models[ref].folder
        src = next((f for f in (Path(folder), Path(self.reference.folder))
                    if any((f / n).is_file() for n in _TOKENIZER_FILES)), None)
        if src is None:
            raise MergeError(f"model '{ref}' ({folder}): no tokenizer files ({', '.join(_TOKENIZER_FILES)})"
                             f" in its folder or the reference model's ({self.reference.folder}) to "
                             "encode its data with")
        tok = AutoTokenizer.from_pretrained(src)
        return S.examples(spec, tok, max_length=_max_positions(self.models[ref].config))

    def _data_files(self) -> dict[str, Path]:
        """The data files a merge reads (inputs, like the models)."""
        out = {}
        refs = self._data_models() if self.method.statistics else []
        if self.recipe.align is not None:
            refs = refs + [self.recipe.align_reference()]
        for ref in refs:
            spec = self.recipe.data_for(ref)
            if spec is not None and spec.path is not None:
                out[f"data file of model '{ref}'"] = Path(spec.path)
            elif spec is not None and Path(spec.dataset).exists():  # a local dataset folder
                out[f"dataset folder of model '{ref}'"] = Path(spec.dataset)
        return out

    def _data_models(self) -> list[ModelRef]:
        """The models whose tensors a data-reading method merges, in plan order."""
        seen: dict[ModelRef, None] = {}
        for t in self.plan.tasks:
            if not t.copy:
                for m, _ in t.sources:
                    seen[m] = None
        return list(seen)

    def statistics(self, progress: bool = False) -> dict[ModelRef, dict[str, dict[str, Tensor]]]:
        """Every input model's statistics (``{model: {statistic: {tensor: value}}}``) for a
        data-reading method: computed on the first call (or read from the cache), each model
        loaded in float32 on the merge's device (streamed, for forward passes alone), on its recipe
        ``data``; read back from the cache tensor by tensor (``hold_statistics``: held)."""
        if self._data_stats is not None:
            return self._data_stats
        from transformers import AutoModelForCausalLM

        from . import statistics as S

        cache = S.StatisticCache(native.cache_dir() / "statistics")
        refs = self._data_models()
        for ref in refs:
            if self.recipe.data_for(ref) is None:
                raise MergeError(f"merge_method '{self.method.name}' reads data: give the recipe a 'data' entry "
                                 f"with a 'path' or a 'dataset' (top level, or under model '{ref}')")
        out: dict[ModelRef, dict[str, dict[str, Tensor]]] = {}
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(refs) * len(self.method.statistics), desc="statistics", unit="model")
        per_model = [n for n in self.method.statistics if n in S.STATISTICS]
        try:
            for ref in refs if per_model else []:
                folder = self.models[ref].folder
                spec = self.recipe.data_for(ref)
                try:
                    data = self._batches(ref, spec)
                    live: list[torch.nn.Module] = []

                    streamed = all(getattr(S.STATISTICS[n], "forward_only", False) for n in per_model)

                    def model(folder=folder, live=live, streamed=streamed):  # loaded once, if a statistic is computed
                        if not live:  # (forward passes alone: one block's weights in memory at a time)
                            live.append(S.load_streamed(folder, device=self.device) if streamed else
                                        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
                                        .to(self.device).eval())
                        return live[0]

                    key = S.model_fingerprint(folder, contents=True)
                    out[ref] = {}
                    for name in per_model:
                        stat = S.STATISTICS[name](**({"kind": spec.fisher} if name == "fisher" else {}))
                        out[ref][name] = S.compute(stat, model, data, cache=cache, model_key=key,
                                                   dtypes=[str(torch.float32)], lazy=not self.hold_statistics)
                        if bar is not None:
                            bar.update(1)
                    live.clear()
                except MergeError:
                    raise
                except Exception as e:  # a tokenizer or model transformers cannot load, bad data
                    first = (str(e).strip().splitlines() or [""])[0]
                    raise MergeError(f"model '{ref}' ({folder}): {type(e).__name__}: {first}") from None
                if ref in self._aligned:  # the statistics of the model as it is read: permuted alike
                    # (the statistics of the merge are measured on the aligned inputs already)
                    out[ref] = {k: self._aligned_statistic(ref, k, v) for k, v in out[ref].items()}
                gram = out[ref].get("gram")
                if gram is not None:  # per token, once: a model with more data does not outweigh the others
                    out[ref]["gram"] = S.TensorMap(gram, lambda k, gram=gram: gram[k] / int(gram[f"{k}:tokens"])
                                                   if f"{k}:tokens" in gram else gram[k])
                if self.hold_statistics:
                    out[ref] = {k: dict(v.items()) for k, v in out[ref].items()}
                names = {n for _, n in self._inputs_of(ref)}
                if names and not any(n in v for v in out[ref].values() for n in names):
                    raise MergeError(f"model '{ref}': none of its tensors has a statistic ({', '.join(out[ref])}): "
                                     "the live model's parameter names differ from the checkpoint's")
            if self._seq is not None:
                self._merged_input_statistics(bar)
        finally:
            if bar is not None:
                bar.close()
        self._data_stats = out
        return out

    def _merged_input_statistics(self, bar=None) -> dict[str, Tensor]:
        """The linear layers fitted by the sequential pass (``_merged_inputs``) for the
        candidate being merged, in the output dtype: made again whenever its parameters differ
        from those of the last pass."""
        if self._current is None:
            self._begin(self.recipe_columns)
        cols, key = self._current, self._current_key
        if self._sequential is None or self._sequential[0] != key:
            try:
                self._sequential = (key, self._merged_inputs(self._data_models(), cols, bar))
            except Exception as e:
                self._seq_models = None  # (a failed pass keeps no models)
                if isinstance(e, MergeError):
                    raise
                if not isinstance(e, (RuntimeError, ValueError, OSError, CheckpointError)):
                    raise
                first = (str(e).strip().splitlines() or [""])[0]
                raise MergeError(f"{self.method.name}: the layer-by-layer pass failed: {type(e).__name__}: "
                                 f"{first}") from None
        return self._sequential[1]

    @torch.no_grad()
    def _merged_inputs(self, refs: list[ModelRef], cols: Columns, bar=None) -> dict[str, Tensor]:
        """The linear layers fitted to statistics of the merge itself, in the output dtype (what
        the merge writes). Per model and linear layer, ``(G, C, in_first)``
        (``merged_inputs``) or ``(G, in_first)`` (``merged_grams``): G = Xm^T Xm / n and C =
        Xm^T X / n, where Xm are the inputs the layer sees in the merged model and X those it
        sees in the model (read through its permutations), both over the real tokens of the
        model's data; each layer's are let go once it is fitted.
        The merged model is built as it goes: every tensor starts as the weighted average of
        the inputs, then the linear layers, in the order a forward pass reaches them, are each
        merged by the method from their statistics before the next is measured (RegMean++,
        PLeaS). The merged model is held live in float32 (PLeaS's models run streamed beside
        it); each model keeps the inputs of the decoder block being worked on (``_Blocks``),
        so a layer costs a pass through its own block over each model's data, and moving on to
        the next block one pass through the finished one."""
        from transformers import AutoModelForCausalLM

        from .statistics import _linear_layers

        for ref in refs:
            if self.recipe.data_for(ref) is None:
                raise MergeError(f"merge_method '{self.method.name}' reads data: give the recipe a 'data' entry "
                                 f"with a 'path' or a 'dataset' (top level, or under model '{ref}')")
        if self._seq_models is None:  # (loaded once, then every candidate's pass reuses them)
            self._seq_models = ({}, {}, [])
        data, live, made = self._seq_models
        for ref in refs:
            if ref in data:
                continue
            folder = self.models[ref].folder
            try:
                data[ref] = self._batches(ref, self.recipe.data_for(ref))
                if self._seq == "merged_inputs":  # (the models' own inputs: RegMean++ reads none)
                    from .statistics import load_streamed

                    live[ref] = load_streamed(folder, device=self.device)  # (forward only: a block at a time)
            except MergeError:
                raise
            except Exception as e:  # a tokenizer or model transformers cannot load, bad data
                first = (str(e).strip().splitlines() or [""])[0]
                raise MergeError(f"model '{ref}' ({folder}): {type(e).__name__}: {first}") from None
        wide = self._wide_units()
        if made:  # the merged model of the last candidate: every tensor of it is set again below
            merged = made[0]
        elif wide:  # the wider model, every tensor of it set below
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.reference.folder)
            own = config.to_dict()
            for k, v in self._wide_config(own).items():
                if own.get(k) != v:  # (the MLP width alone)
                    setattr(config, k, v)
            merged = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(self.device).eval()
        else:
            merged = AutoModelForCausalLM.from_pretrained(self.reference.folder, dtype=torch.float32).to(
                self.device).eval()
        made[:] = [merged]
        state = self.live_state(merged)
        for i, task in enumerate(self.tasks):  # the weighted average of every tensor to start from
            raw = self._read(task)
            if task.copy:
                state[task.name].copy_(raw[0])
            else:
                w = [float(x) for x in cols.params(i).get("weight") or [1.0] * len(raw)]
                if task.name in wide:  # merged units averaged; each model's own ones its share of the layer reading them
                    from .methods import _wide

                    keep, sep, axis, role = wide[task.name]
                    state[task.name].copy_(_wide(raw, w, (keep, sep), axis, torch.float64, torch.float64, None,
                                                 scale_apart=role == "in"))
                else:
                    state[task.name].copy_(sum(x * t.double() for x, t in zip(w, raw)) / sum(w))
            self._release(task)
        layers = _linear_layers(merged)
        index = {t.name: i for i, t in enumerate(self.tasks) if not t.copy}
        order: list[str] = []  # the linear layers the plan merges, in the order a forward pass reaches them
        hooks = [mod.register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
                 for n, mod in layers.items() if n in index]
        try:
            ids, mask, *_ = data[refs[0]][0]
            merged(input_ids=ids[:1].to(self.device), attention_mask=mask[:1].to(self.device), use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        fitted: dict[str, Tensor] = {}  # each fitted layer in the output dtype: what the merge writes
        cross = self._seq == "merged_inputs"  # (RegMean++ reads G alone: no model run, no C)
        runs = {ref: (_Blocks(merged, data[ref]), _Blocks(live[ref], data[ref]) if cross else None) for ref in refs}
        for name in order:
            task = self.tasks[index[name]]
            in_first = not isinstance(layers[name], torch.nn.Linear)
            out: dict[ModelRef, tuple] = {}  # this layer's statistics per model (let go once it is fitted)
            for ref in refs:
                own = live[ref].get_submodule(name[: -len(".weight")]) if ref in live else None
                idx = self._aligned[ref].axis_index(name, 0 if in_first else 1) if ref in self._aligned else None
                g = c = None
                n = 0
                mine = runs[ref][1].inputs(name, own) if cross else iter(())
                for xm in runs[ref][0].inputs(name, layers[name]):
                    g = xm.T @ xm if g is None else g + xm.T @ xm
                    if cross:
                        x = next(mine)
                        if idx is not None:
                            x = x.index_select(1, idx.to(x.device))
                        c = xm.T @ x if c is None else c + xm.T @ x
                    n += xm.shape[0]
                out[ref] = (g / n, c / n, in_first) if cross else (g / n, in_first)
            i = index[name]
            params = {("lambda_" if k == "lambda" else k): v for k, v in cols.params(i).items()}
            stats = {self._seq: [out.get(m) for m, _ in task.sources]}
            if name in wide:
                stats["units"] = wide[name]
            raw = self._read(task)
            base, tensors = self._prepare(task, raw)
            try:  # (in float64: into the merged model as float32, kept in the output dtype for the merge)
                res = self.method.fn(base, tensors, **params, statistics=stats, out_dtype=torch.float64)
            except (ValueError, RuntimeError) as e:
                raise MergeError(f"tensor '{name}': {self.method.name} failed: {e}") from None
            finally:
                del raw
                self._release(task)
            state[name].copy_(res)
            fitted[name] = res.to(self.output_dtype(task))
            del res, out, stats
        if bar is not None:
            bar.update(len(refs))
        if not self.hold_statistics:  # (one merge: the models go now, before the merge is written)
            self._seq_models = None
        return fitted

    def _aligned_statistic(self, ref: ModelRef, kind: str, values: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """A statistic of an aligned model, permuted as its tensors are read (each when asked
        for): a Fisher diagonal as its tensor; a Gram matrix on both axes by its layer's
        input axis."""
        from .align import permute
        from .statistics import TensorMap

        a = self._aligned[ref]

        def fn(n: str) -> Tensor:
            v = values[n]
            if kind == "gram" and f"{n}:in_first" in values:
                idx = a.axis_index(n, 0 if bool(int(values[f"{n}:in_first"])) else 1)
                return v if idx is None else v.index_select(0, idx).index_select(1, idx)
            if kind != "gram" and n in a.layout.axes:
                return permute(a.layout, a.perms, n, v)
            return v

        return TensorMap(values, fn)

    def _inputs_of(self, ref: ModelRef) -> list[tuple[ModelRef, str]]:
        return [(m, n) for t in self.plan.tasks if not t.copy for m, n in t.sources if m == ref]

    def _task_statistics(self, task: TensorTask) -> dict[str, list]:
        """Each input's statistics of this tensor, as the method takes them (and, for a
        tensor of a wider MLP, its ``units``)."""
        stats = self.statistics()
        out: dict[str, Any] = {}
        if self._seq is not None and task.name in self._wide_units():
            out["units"] = self._wide_units()[task.name]
        for name in self.method.statistics:
            vals = []
            if name == self._seq:  # (the fitted layers come from the pass: ``compute``)
                out[name] = [None] * len(task.sources)
                continue
            for m, n in task.sources:
                v = stats[m][name]
                if name == "gram":  # (per token: divided once, in ``statistics``)
                    vals.append((v[n], bool(int(v[f"{n}:in_first"]))) if n in v else None)
                else:
                    vals.append(v.get(n))
            out[name] = vals
        return out

    # ----------------------------------------------------------------------------------
    # Execution
    # ----------------------------------------------------------------------------------
    def _read(self, task: TensorTask) -> list[Tensor]:
        """A task's inputs (base first): read-only memory-mapped views on the CPU, read as
        the arithmetic touches them; copies on another device."""
        return [self.models[m].get(n, self.device, copy=False) for m, n in task.sources]

    def _release(self, task: TensorTask) -> None:
        for m, n in task.sources:
            self.models[m].release(n)

    def _prepare(self, task: TensorTask, raw: list[Tensor]) -> tuple[Tensor | None, list[Tensor]]:
        """Round inputs to the recipe's ``dtype``."""
        out = []
        for t in raw:
            if self.compute_dtype is not None and t.is_floating_point() and t.dtype != self.compute_dtype:
                t = t.to(self.compute_dtype)
            out.append(t)
        return (out[0], out[1:]) if task.base else (None, out)

    def _check_finite(self, task: TensorTask, out: Tensor, raw: list[Tensor]) -> None:
        """Every method multiplies or adds each input entry into the result, so a NaN or
        inf in an input shows in the output: one reduction over the output finds it, and
        only then are the inputs searched for the culprit."""
        if native.known_finite(out):  # the fused kernel checked every value as it stored it
            return
        if not self.check_finite or not out.is_floating_point() or bool(torch.isfinite(out.sum())):
            return
        if bool(torch.isfinite(out).all()):
            return  # the sum overflowed; every entry is finite
        for (model, name), t in zip(task.sources, raw):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise MergeError(f"model '{model}': tensor '{name}' contains NaN or inf")
        raise MergeError(f"tensor '{task.name}': the merged values overflow {out.dtype}")

    def shape(self, task: TensorTask) -> tuple[int, ...]:
        shape = self.plan.shape(task)
        wide = self._wide_units().get(task.name) if self._seq is not None else None
        if wide is None:
            return shape
        keep, sep, axis, _ = wide
        return tuple(len(keep) + len(task.sources) * len(sep) if a == axis else d for a, d in enumerate(shape))

    # ----------------------------------------------------------------------------------
    # Partial merging (PLeaS's ``width``): wider MLPs
    # ----------------------------------------------------------------------------------
    def width(self) -> float:
        """The merged MLPs' width as a multiple of the models' (the recipe's ``width``, one
        number for the whole merge; 1 for a method without one)."""
        if not any(p.name == "width" for p in self.method.params):
            return 1.0
        vals = {float(self.recipe_columns.params(i).get("width", 1.0)) for i, t in enumerate(self.tasks) if not t.copy}
        if len(vals) > 1:
            raise MergeError(f"{self.method.name}: width sets the merged model's shape, one number for the whole "
                             f"merge; the recipe gives {sorted(vals)}")
        return vals.pop() if vals else 1.0

    def _wide_units(self) -> dict[str, tuple]:
        """Per tensor of a wider MLP, ``(merged, separate, axis, role)``: the reference's MLP
        units merged and kept apart (``align.partial_units``), the tensor's axis over them,
        and whether its layer writes them ("out") or reads them ("in"). Empty at width 1."""
        if self._widening is not None:
            return self._widening
        width = self.width()
        if width == 1.0:
            self._widening = {}
            return self._widening
        from . import align as A

        order = self._data_models()
        if len(order) < 2 or not self._aligned:
            raise MergeError(f"{self.method.name}: width {width} keeps units of each model apart: it needs at least "
                             "two models, aligned by activation matching")
        lay = next(iter(self._aligned.values())).layout
        try:
            units = A.partial_units(lay, [self._aligned[r].perms for r in order if r in self._aligned], len(order),
                                    width)
        except A.AlignError as e:
            raise MergeError(f"{self.method.name}: {e}") from None
        out_axis = 0 if lay.family == "llama" else 1  # a weight's output axis: [out, in], or Conv1D's [in, out]
        table: dict[str, tuple] = {}
        for t in self.tasks:
            kinds = lay.axes.get(t.name, ())
            for a, k in enumerate(kinds):
                if k is not None and k[0] == "mlp":
                    if [m for m, _ in t.sources] != order:
                        raise MergeError(f"tensor '{t.name}': width needs every model in every MLP tensor, in one "
                                         "order")
                    keep, sep = units[k[1]]
                    table[t.name] = (keep, sep, a, "out" if len(kinds) == 1 or a == out_axis else "in")
        self._widening = table
        return table

    def _wide_config(self, cfg: dict) -> dict:
        """A model config with the MLPs' width the partial merge gives them."""
        wide = self._wide_units()
        if not wide:
            return cfg
        task = self.tasks[self._index[next(iter(wide))]]
        keep, sep, _, _ = wide[task.name]
        n = len(keep) + len(task.sources) * len(sep)
        key = next((k for k in ("intermediate_size", "n_inner", "ffn_dim") if k in cfg), "intermediate_size")
        return {**cfg, key: n}

    def output_dtype(self, task: TensorTask) -> torch.dtype:
        return self.plan.output_dtype(task)

    def compute(self, task: TensorTask, params: dict[str, Any], base: Tensor | None, tensors: list[Tensor],
                out: Tensor | None = None) -> Tensor:
        """Apply the method, with a tensor's ``params`` (``self.params(task)`` for the
        recipe's), to loaded inputs; the result is in the output dtype, or written into
        ``out`` (any float dtype) when given."""
        if task.copy:
            src = base if base is not None else tensors[0]
            return src.clone() if out is None else out.copy_(src)
        native.forget_finite()  # only a kernel run for this result may vouch for it
        if self.compile:
            res = self._compiled(task, params, base, tensors, out)
            if res is not None:
                return res
        kwargs = {("lambda_" if k == "lambda" else k): v for k, v in params.items()}
        if self._seq is not None:  # a layer the sequential pass fitted: its result
            fit = self._merged_input_statistics().get(task.name)
            if fit is not None:
                return fit.clone() if out is None else out.view(fit.shape).copy_(fit)
        if self.method.statistics:
            kwargs["statistics"] = self._task_statistics(task)
        try:
            res = self.method.fn(base, tensors, **kwargs, out_dtype=self.output_dtype(task), out=out)
        except (ValueError, RuntimeError) as e:
            raise MergeError(f"tensor '{task.name}': {self.method.name} failed: {e}") from None
        return res if out is not None else res.to(self.output_dtype(task))

    def _compiled(self, task: TensorTask, params: dict[str, Any], base: Tensor | None, tensors: list[Tensor],
                  out: Tensor | None) -> Tensor | None:
        """``compute`` through ``torch.compile`` for the task-arithmetic family: the tensor
        as a flat block of one, merged as the search's flat path merges its blocks (the
        reference's operations in the same order, so the same bits); None where that path
        does not apply (another method, no base, DARE's L1 rescale, TIES with rescale)."""
        import numpy as np

        from .flat import FLAT_METHODS, FlatGroup

        family = FLAT_METHODS.get(self.method.name)
        if family is None or base is None or not base.is_floating_point():
            return None
        sparsify = family[0]
        rescale = params.get("rescale", False)
        if (sparsify == "magnitude" and rescale is not False) or (sparsify == "random" and rescale not in (True, False)):
            return None
        if len({t.dtype for t in (base, *tensors)}) != 1:
            return None
        table = {"weight": np.asarray(params["weight"], dtype=np.float64)[:, None],
                 "lambda": np.asarray([params.get("lambda", 1.0)], dtype=np.float64),
                 "normalize": bool(params.get("normalize", False)), "rescale": rescale}
        if sparsify is not None:
            table["density"] = np.asarray(params["density"], dtype=np.float64)[:, None]
        if sparsify == "random":
            table["seeds"] = np.asarray(params["seeds"], dtype=np.uint64)[:, None]
        group = FlatGroup([task.name], [base], [list(tensors)], self.device, base.dtype, compile=True)
        res = out if out is not None else torch.empty(self.shape(task), dtype=self.output_dtype(task),
                                                      device=self.device)
        try:
            group.merge(self.method.name, table, res.view(-1))
        except (ValueError, RuntimeError) as e:
            raise MergeError(f"tensor '{task.name}': {self.method.name} failed (compiled): {e}") from None
        return res

    def _merge(self, cols: Columns, i: int, out: Tensor | None = None, check: bool = True) -> Tensor:
        """Tensor ``i`` of the plan with a candidate's columns: its inputs read, merged (into
        ``out`` when given), checked finite unless ``check`` is false, released."""
        task = self.plan.tasks[i]
        raw = self._read(task)
        try:
            params = cols.params(i)
            if self.seeds[i] is not None:
                params["seeds"] = self.seeds[i]
            res = self.compute(task, params, *self._prepare(task, raw), out=out)
            if check:
                self._check_finite(task, res, raw)
        finally:
            del raw
            self._release(task)
        return res

    def merge_tensor(self, task: TensorTask, what: Recipe | Columns | None = None,
                     out: Tensor | None = None) -> Tensor:
        """Merge one tensor of a candidate (by default the recipe's), into ``out`` when given."""
        return self._merge(self._begin(self.candidate(what)), self._index[task.name], out)

    def iter_merged(
        self, what: Recipe | Columns | None = None, progress: bool = False,
        out: Callable[[TensorTask], Tensor | None] | None = None,
    ) -> Iterator[tuple[str, Tensor]]:
        """A candidate's merged tensors in plan order. ``out(task)`` may give the memory each
        result is written into (the writer's scratch buffer, a live parameter)."""
        cols = self._begin(self.candidate(what))
        bar = self._progress_bar() if progress else None
        try:
            for i, task in enumerate(self.tasks):
                yield task.name, self._merge(cols, i, out(task) if out is not None else None)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def _progress_bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=len(self.tasks), desc=f"merging ({self.method.name})", unit="tensor")

    @torch.no_grad()
    def materialize(self, what: Recipe | Columns | None = None, *, into: torch.nn.Module) -> None:
        """Write a candidate's merged tensors (by default the recipe's) into ``into``'s own
        parameters and buffers, in place: the arithmetic writes straight into their storage
        (no second copy of the model)."""
        cols = self._begin(self.candidate(what))
        state = self.live_state(into)
        for i, task in enumerate(self.tasks):
            dst = state[task.name]
            direct = dst.is_contiguous() and dst.device == self.device and dst.is_floating_point()
            res = self._merge(cols, i, out=dst.data if direct else None)
            if not direct:
                dst.copy_(res)

    def live_state(self, into: torch.nn.Module) -> dict[str, Tensor]:
        """``into``'s parameters and buffers by their checkpoint names (``live_names``),
        checked to receive every merged tensor."""
        from ..checkpoint import live_names

        named = dict(into.named_parameters())
        named.update(dict(into.named_buffers()))
        state = {ck: named[live] for ck, live in live_names(into).items()}
        for task in self.tasks:
            dst = state.get(task.name)
            if dst is None:
                raise MergeError(f"the live model ({type(into).__name__}) has no parameter '{task.name}'")
            if tuple(dst.shape) != self.shape(task):
                raise MergeError(f"tensor '{task.name}': merged shape {list(self.shape(task))} does not "
                                 f"fit the live model's {list(dst.shape)}")
        return state

    def write(
        self,
        out_dir: str | Path,
        what: Recipe | Columns | None = None,
        *,
        shard_size: int | str = "5GB",
        overwrite: bool = False,
        progress: bool = False,
        recipe_text: str | None = None,
        lanes: int | None = None,
    ) -> Path:
        """Stream a candidate's merge (by default the recipe's) into a new model folder
        (atomic: nothing is left on failure), with the candidate's recipe as
        ``evomerge_recipe.yaml``: ``recipe_text``, or the recipe given; ``Columns`` need
        their ``recipe_text`` (``Space.recipe_yaml(x)``). On the CPU every result is
        computed into a reused scratch buffer, then written at its offset in its shard;
        ``lanes`` tensors at a time (default: ``self.lanes()``)."""
        cols = self._begin(self.candidate(what))
        if recipe_text is None:
            if isinstance(what, Columns):
                raise MergeError("writing a candidate given as Columns needs its recipe_text "
                                 "(Space.recipe_yaml(x)) for the folder's evomerge_recipe.yaml")
            recipe_text = (what if what is not None else self.recipe).to_yaml()
        self._tokenizer_source()  # opened now: its folder is an input too
        inputs = {f"model '{ref}'": ck.folder for ref, ck in self.models.items()}
        inputs.update(self._data_files())  # the data files are inputs too
        refuse_overlap(out_dir, inputs)
        self.align(progress)  # before anything is written, and not from the lanes' threads
        if self.method.statistics:
            self.statistics(progress)
        entries = [TensorEntry(t.name, self.shape(t), self.output_dtype(t)) for t in self.tasks]
        with CheckpointWriter(out_dir, entries, shard_size=shard_size, overwrite=overwrite) as w:
            lanes = self.lanes() if lanes is None else max(1, int(lanes))
            if lanes > 1:
                self._write_lanes(w, cols, lanes, progress)
            else:
                direct = (lambda t: w.buffer(t.name)) if self.device.type == "cpu" else None
                for name, t in self.iter_merged(cols, progress=progress, out=direct):
                    w.add(name, t)
            self._write_metadata(w, recipe_text)
            return w.commit()

    MAX_LANES = 4  # each lane holds a scratch buffer of the largest tensor; memory bandwidth is shared

    def lanes(self) -> int:
        """How many tensors a CPU merge works on at once: one per torch thread, up to
        ``MAX_LANES``, where the fused kernels run (each merges a whole tensor without
        holding the GIL), else one: torch's own threads share out each operation, and
        two lanes of torch operations were slower than one or not worth their memory
        (merging and writing 4 x 374M parameters: SLERP 1.38-1.57 s against 1.13-1.19 s,
        Model Stock 4.05-4.16 s against 2.30-2.60 s, DELLA 5-10% faster but with a third
        more peak memory)."""
        if self.device.type != "cpu" or self.compile or not self.method.kernels or not native.available():
            return 1
        return max(1, min(torch.get_num_threads(), self.MAX_LANES, len(self.tasks)))

    def _write_lanes(self, w: CheckpointWriter, cols: Columns, lanes: int, progress: bool) -> None:
        """Merge and write ``lanes`` tensors at a time, the largest first; each thread
        computes into its own scratch buffer and writes at the tensor's offset."""
        import contextvars
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        def one(i: int) -> None:
            name = self.tasks[i].name
            w.add(name, self._merge(cols, i, w.buffer(name)))

        order = sorted(range(len(self.tasks)), key=lambda i: -math.prod(self.shape(self.tasks[i])))
        bar = self._progress_bar() if progress else None
        pool = ThreadPoolExecutor(lanes, thread_name_prefix="evomerge-merge")
        try:
            # each task runs in a copy of this context (a test's torch-only switch, say)
            pending = {pool.submit(contextvars.copy_context().run, one, i) for i in order}
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    f.result()  # raises the first failure; the writer then removes its folder
                    if bar is not None:
                        bar.update(1)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            if bar is not None:
                bar.close()

    # ----------------------------------------------------------------------------------
    # Metadata: config, generation config, tokenizer, model card
    # ----------------------------------------------------------------------------------
    def _write_metadata(self, w: CheckpointWriter, recipe_text: str) -> None:
        ref = self.reference
        cfg = dict(ref.config)
        dt = self.out_dtype
        if dt is None:
            floats = [self.output_dtype(t) for t in self.tasks if not t.copy]
            dt = floats[0] if floats else None
        if dt is not None:
            name = str(dt).replace("torch.", "")
            keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
            for k in keys:
                cfg[k] = name
        if not self.recipe.uses_models_form:
            n_ref = next(iter(ref.num_layers().values()), None)
            for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
                if key in cfg and cfg[key] == n_ref:
                    cfg[key] = self.out_layers
            if isinstance(cfg.get("layer_types"), list):
                lt = cfg["layer_types"]
                cfg["layer_types"] = (lt * (self.out_layers // max(1, len(lt)) + 1))[: self.out_layers]
        if self._seq is not None:
            cfg = self._wide_config(cfg)
        w.write_text("config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = ref.folder / "generation_config.json"
        if gen.is_file():
            w.copy_file(gen)
        for f in self._tokenizer_source().tokenizer_files():
            w.copy_file(f)
        proc = ref.folder / "preprocessor_config.json"  # an image model's: how its inputs are resized and scaled
        if proc.is_file():
            w.copy_file(proc)
        w.write_text("evomerge_recipe.yaml", recipe_text)
        w.write_text("README.md", model_card(self.recipe, recipe_text, self.seed))

    def _tokenizer_source(self) -> Checkpoint:
        src = self.recipe.tokenizer_source
        if isinstance(src, ModelRef):
            if src not in self.models:
                try:
                    self.models[src] = Checkpoint.open(src)
                except CheckpointError as e:
                    raise MergeError(f"tokenizer_source: {e}") from None
            return self.models[src]
        if src == "union":
            vocabs = {}
            for r, ck in self.models.items():
                p = ck.folder / "tokenizer.json"
                vocabs[r] = json.loads(p.read_text()).get("model", {}).get("vocab") if p.is_file() else None
            distinct = {json.dumps(v, sort_keys=True) for v in vocabs.values()}
            if len(distinct) > 1:
                raise MergeError(
                    "tokenizer_source 'union': the models' vocabularies differ; merging vocabularies "
                    "is not supported, name one model's tokenizer as tokenizer_source"
                )
        return self.reference


def model_card(recipe: Recipe, recipe_text: str, seed: int) -> str:
    names = [str(m) for m in recipe.referenced_models()]
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, evomerge]",
        "---",
        f"# {recipe.name or 'Merged model'}",
        "",
        f"This model was merged with evomerge using the `{recipe.merge_method}` method"
        f" ({recipe.method.reference}).",
        "",
        "## Models merged",
        "",
    ]
    lines += [f"- {n}" + (" (base)" if recipe.base_model and n == str(recipe.base_model) else "") for n in names]
    lines += [
        "",
        "## Recipe",
        "",
        f"Reproduce with `evomerge-merge recipe.yaml OUT --seed {seed}`:",
        "",
        "```yaml",
        recipe_text.rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
