"""A worker: the resident merge engine, one live model and an evaluator, built once.

Each candidate is materialized into the live model's own parameters and scored; nothing is
reloaded between candidates. Failures (a bad genome, a merge error, an evaluator error)
come back as a failed ``Result`` with the error, never as an exception.
"""

from __future__ import annotations

import time

import torch

from ..checkpoint import build_from_config, live_class, live_names, model_folder, torch_dtype
from ..merge.resident import ResidentMerger
from ..types import Candidate, Result, signed_score
from ..space import Space

__all__ = ["Worker", "shared_inputs"]


def shared_inputs(space: Space, store_dtype: str | None = None):
    """The weights every ``Worker`` of ``space`` is built from, read once (on the CPU) as
    ``SharedInputs`` for ``Worker(..., shared=...)`` (the Ray executor's ``inputs``)."""
    return ResidentMerger(space.recipe(space.x0), store_dtype=store_dtype).share()


class Worker:
    """Args:
        space: the genome space (its models and method).
        evaluator: an ``Evaluator`` (``evomerge.evaluate``).
        model_path: the folder whose config and tokenizer make the live model (default: the base).
        device: where the inputs live and the model runs.
        store_dtype: keep the resident inputs in a lower precision (e.g. ``bfloat16``).
        seed: seeds DARE/DELLA masks.
        compile: merge through ``torch.compile`` (task arithmetic, TIES, DARE; see
            ``ResidentMerger``).
        shared: ``SharedInputs`` made by another engine for the same space: the worker
            adopts them and reads no weights itself (its live model starts from the held
            weights of the model it is made from).
    """

    def __init__(self, space: Space, evaluator, model_path: str | None = None, device: str = "cpu",
                 store_dtype: str | None = None, seed: int = 0, name: str = "local", compile: bool = False,
                 shared=None):
        from transformers import AutoTokenizer

        self.space = space
        self.evaluator = evaluator
        self.name = name
        self.engine = ResidentMerger(space.recipe(space.x0), device=device, seed=seed, store_dtype=store_dtype,
                                     compile=compile, shared=shared)
        path = model_path or space.base_model or space.models[0]
        folder = model_folder(path)  # a hub id with its revision, as the merge engine reads it
        dtype = torch_dtype(space.dtype)
        self.kind = getattr(evaluator, "model_kind", "causal_lm")  # what the evaluator reads
        self.model_class = live_class(folder, self.kind)
        self.model = None
        self.live_from = "checkpoint"  # or "resident inputs": where the live model's weights came from
        if shared is not None and str(path) in {str(m) for m in self.engine.models}:
            self.model = self._bare_model(folder, str(path), dtype, device)
        if self.model is not None:
            self._load_source(str(path))
            self.live_from = "resident inputs"
        else:
            self.model = self.model_class.from_pretrained(folder, dtype=dtype).to(device).eval()
        self.engine.bind(self.model)  # candidates are merged straight into its parameters
        # a genome -> every tensor's parameters, compiled once over the engine's plan
        self.coefficients = space.compile(self.engine.tasks)
        if self.kind == "vision":  # the evaluator's second argument: the model's image processor (or None)
            from ..checkpoint import CheckpointError
            from ..vision.heads import load_processor

            self.tokenizer = load_processor(folder)
            if self.tokenizer is None:
                raise CheckpointError(f"model '{path}' ({folder}): no preprocessor_config.json, which says how images "
                                      "are resized and normalized for it; save its image processor there "
                                      "(processor.save_pretrained)")
        else:
            self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def _bare_model(self, folder, path, dtype, device):
        """The live model built from ``path``'s config alone (no weights read, none
        initialised), for the resident inputs to fill; None when those do not hold every
        one of its parameters."""
        from transformers import AutoConfig

        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # transformers < 5
            from transformers.modeling_utils import no_init_weights

        from transformers import GenerationConfig

        with no_init_weights():
            model = build_from_config(self.model_class, AutoConfig.from_pretrained(folder), dtype=dtype)
        model.tie_weights()  # tied embeddings, as loading a checkpoint would leave them
        # and its generation config, as loading it would: where answers end (its stop token)
        # is read from there, and a config's defaults stopped none of the zoo's answers
        if self.kind == "causal_lm":
            try:
                model.generation_config = GenerationConfig.from_pretrained(folder)
            except OSError:  # the folder has none: the config's defaults, as from_pretrained keeps
                pass
        held, params = set(self.engine.source(str(path))), dict(model.named_parameters())
        if any(ck not in held for ck, live in live_names(model).items() if live in params):
            return None
        return model.to(device).eval()

    def _load_source(self, source: str) -> None:
        """Copy one model's own weights (held by the resident engine) into the live model."""
        state = self.engine.live_state(self.model)
        with torch.no_grad():
            for name, t in self.engine.source(source).items():
                state[name].copy_(t)

    def evaluate(self, cand: Candidate) -> Result:
        t0 = time.perf_counter()
        res = Result(id=cand.id, x=list(cand.x), status="ok", split=cand.split, worker=self.name,
                     generation=cand.generation, kind=cand.kind, fidelity=cand.fidelity)
        try:
            if cand.source is not None:
                self._load_source(cand.source)
            else:
                self.engine.materialize(self.coefficients.columns(cand.x), into=self.model)
            res.materialize_s = time.perf_counter() - t0
            with torch.no_grad():
                part = {"fraction": cand.fidelity} if cand.fidelity < 1 else {}  # (any evaluator takes a whole split)
                metrics = self.evaluator(self.model, self.tokenizer, split=cand.split, **part)
            res.metrics = {k: float(v) for k, v in metrics.items()}
            score = res.metrics["score"]
            res.score = signed_score(score, getattr(self.evaluator, "direction", "maximize"))
        except Exception as e:  # a failed candidate is a result, not a crash
            res.status, res.error = "failed", f"{type(e).__name__}: {e}"
            res.metrics, res.score = {}, None
        res.wall_s = time.perf_counter() - t0
        return res
