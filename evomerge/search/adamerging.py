"""AdaMerging: merge coefficients learned by entropy minimisation on unlabeled inputs.

Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning",
https://arxiv.org/abs/2310.02575. theta = theta_0 + sum_k lambda_k tau_k, with one lambda
per task (``space`` granularity ``per_model``: task-wise) or per task and layer group
(``per_layer`` / ``per_layer_filtered``: layer-wise), initialised at 0.3, clamped to [0, 1]
and trained with Adam to minimise the Shannon entropy of the merged model's predictions on
unlabeled inputs of the search split: for a causal LM, of its next-token distribution after
each prompt; for an image encoder read through task heads (the classification evaluators,
the setting of the paper), of each task's class distribution, summed over the tasks, with
``batch_size`` images of every task per step. (The paper draws those images from the test
split, transductively; evomerge keeps the test split held out and uses the search split's.) The merge is differentiable and goes
through ``torch.func.functional_call`` over the live model, so no second model is built.
AdaMerging++ (``plus_plus``) learns the same coefficients over TIES-trimmed task vectors
(top-``density`` magnitudes kept, entries disagreeing with the elected sign dropped).

It runs where the models are (inside a worker, from the resident engine's inputs) and logs
every step in the trial log like any other evaluation: its genome is the space's (the
coefficients are task-arithmetic weights), so the result exports as a recipe.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..evaluate.entropy import encode_prompts, prediction_entropy
from ..merge.flat import agree, elect, merge_deltas
from ..space import Space
from ..trials import StateError, TrialLog, load_state, save_state
from ..types import Result

__all__ = ["AdaMerging", "coefficient_map"]


def coefficient_map(space: Space, tasks) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """For every merged tensor, ``(A, c)`` (models x genes, models) with the per-model
    weights ``A @ x + c``: the space's compiled map (``Space.compile``) over the plan's
    ``tasks``, the same map every candidate of a search is merged with."""
    cmap = space.compile(tasks)
    A, c = cmap.matrix("weight")
    k = cmap.k
    return {t.name: (torch.tensor(A[i * k:(i + 1) * k], dtype=torch.float32),
                     torch.tensor(c[i * k:(i + 1) * k], dtype=torch.float32))
            for i, t in enumerate(tasks) if not t.copy}


class AdaMerging:
    """Args:
        space: a ``task_arithmetic`` space searching ``weight`` (``per_model`` for task-wise,
            a per-layer granularity for layer-wise).
        worker: a ``Worker`` holding the models (its resident engine and live model).
        prompts: unlabeled inputs (the search split's prompts) for a causal LM; None for an
            image encoder, whose inputs are its evaluator's search-split images.
        lr, steps, batch_size, init: Adam's learning rate, the number of steps, prompts per
            step, and the starting coefficient.
        plus_plus, density: AdaMerging++ over TIES-trimmed task vectors.
        seed: order of the prompt batches.
    """

    name = "adamerging"

    def __init__(self, space: Space, worker, prompts: Sequence[str] | None = None, lr: float = 1e-3,
                 steps: int = 100, batch_size: int = 16, init: float = 0.3, plus_plus: bool = False,
                 density: float = 0.2, seed: int = 0):
        if space.method.name != "task_arithmetic" or set(space.ranges) != {"weight"}:
            raise ValueError("adamerging needs a task_arithmetic space searching 'weight' only")
        for name, v in (("plus_plus", plus_plus),):
            if not isinstance(v, bool):
                raise ValueError(f"adamerging: {name} must be true or false, got {v!r}")
        if not 0 < float(density) <= 1:
            raise ValueError(f"adamerging: density must be in (0, 1], got {density!r}")
        self.vision = getattr(worker, "kind", "causal_lm") == "vision"
        if not self.vision and not prompts:
            raise ValueError("adamerging: no unlabeled prompts")
        self.space, self.worker = space, worker
        self.lr, self.steps, self.batch_size = float(lr), int(steps), int(batch_size)
        self.seed = seed
        self.model = worker.model
        dev = next(self.model.parameters()).device
        if self.vision:  # each task's search-split images, as model inputs
            ev = worker.evaluator
            self.images = {t: ev.pixels(t, "search", worker.tokenizer, dev) for t in ev.tasks}
        else:
            self.batches = encode_prompts(worker.tokenizer, list(prompts))
        eng = worker.engine
        self.A = coefficient_map(space, eng.tasks)
        self.base: dict[str, torch.Tensor] = {}
        self.taus: dict[str, torch.Tensor] = {}
        for task in eng.tasks:
            if task.copy or task.name not in self.A:
                continue
            b, *experts = (t.float() for t in eng.inputs(task))
            tau = torch.stack([e - b for e in experts])
            if plus_plus:
                tau = _ties_filter(tau, density)
            self.base[task.name], self.taus[task.name] = b, tau
        from ..checkpoint import live_names

        self.live = live_names(self.model)  # checkpoint name -> the live model's (functional_call's keys)
        self.x = torch.full((len(space),), float(init), device=dev, requires_grad=True)
        self.opt = torch.optim.Adam([self.x], lr=self.lr)
        self.step = 0

    def merged_params(self) -> dict[str, torch.Tensor]:
        """The merged tensors as differentiable functions of the coefficients: the flat
        path's model-by-model merge (``flat.merge_deltas``) of the weighted task vectors."""
        out = {}
        for name, tau in self.taus.items():
            A, c = self.A[name]
            w = A.to(self.x.device) @ self.x + c.to(self.x.device)
            out[self.live.get(name, name)] = merge_deltas([tau[j] * w[j] for j in range(tau.shape[0])],
                                                          self.base[name])
        return out

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.batches
        rng = np.random.Generator(np.random.PCG64([self.seed, step]))
        idx = torch.as_tensor(rng.choice(ids.shape[0], size=min(self.batch_size, ids.shape[0]), replace=False))
        dev = self.x.device
        return ids[idx].to(dev), mask[idx].to(dev)

    def _images(self, step: int) -> dict[str, torch.Tensor]:
        """``batch_size`` images of every task (seeded by the step and the task's place)."""
        out = {}
        for i, (task, px) in enumerate(self.images.items()):
            rng = np.random.Generator(np.random.PCG64([self.seed, step, i]))
            idx = rng.choice(px.shape[0], size=min(self.batch_size, px.shape[0]), replace=False)
            out[task] = px[torch.as_tensor(idx, device=px.device)]
        return out

    def train_step(self) -> float:
        params = self.merged_params()

        if self.vision:  # through the module that reads the images (a whole CLIP model's vision tower)
            from ..vision.heads import vision_tower

            tower, prefix = vision_tower(self.model)
            sub = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}

            def call(**kw):
                return torch.func.functional_call(tower, sub, args=(), kwargs=kw)

            loss = self.worker.evaluator.entropy_loss(tower, call, self._images(self.step))
        else:
            def call(**kw):
                return torch.func.functional_call(self.model, params, args=(), kwargs={**kw, "use_cache": False})

            loss = prediction_entropy(call, self._batch(self.step), differentiable=True).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.x.clamp_(0.0, 1.0)
        self.step += 1
        return float(loss.detach())

    def genome(self) -> np.ndarray:
        return self.space.clip(self.x.detach().cpu().numpy().astype(float))

    def state_dict(self) -> dict[str, Any]:
        """Plain data: the coefficients, the step and Adam's moments (float32 values are exact
        as JSON numbers)."""
        opt = self.opt.state_dict()
        moments = {str(i): {k: _tensor_json(v) for k, v in st.items()} for i, st in opt["state"].items()}
        return {"x": self.x.detach().cpu().tolist(), "step": self.step,
                "opt": {"state": moments, "param_groups": opt["param_groups"]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.x.copy_(torch.tensor(state["x"], dtype=self.x.dtype))
        opt = state["opt"]
        dev = self.x.device
        moments = {int(i): {k: _tensor_from_json(v, dev if k != "step" else "cpu") for k, v in st.items()}
                   for i, st in opt["state"].items()}
        self.opt.load_state_dict({"state": moments, "param_groups": opt["param_groups"]})
        self.step = int(state["step"])

    def run(self, run_dir: str | Path, resume: bool = False, progress: bool = True) -> tuple[np.ndarray, float]:
        """Train for ``steps`` steps, logging each in ``run_dir/trials.jsonl`` (score: minus
        the step's entropy); resumable from ``run_dir/adamerging.json``."""
        from tqdm.auto import tqdm

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        log = TrialLog(run_dir / "trials.jsonl")
        state_path = run_dir / "adamerging.json"
        if resume and not state_path.is_file() and (run_dir / "adamerging.pkl").is_file():
            raise StateError(f"{run_dir / 'adamerging.pkl'}: a pickled state (from an older evomerge); pickles can "
                             "run code when read, so it is not resumed from. Start a new run directory")
        if resume and (state := load_state(state_path)) is not None:
            self.load_state_dict(state)
        done = {r.id for r in log if r.kind == "search"}
        bar = tqdm(total=self.steps, initial=self.step, desc="adamerging", disable=not progress)
        while self.step < self.steps:
            t0 = time.perf_counter()
            x = self.genome()
            step = self.step
            entropy = self.train_step()
            if step not in done:
                log.append(Result(step, [float(v) for v in x], "ok", -entropy, {"entropy": entropy, "score": entropy},
                                  wall_s=time.perf_counter() - t0, worker=self.worker.name, generation=step))
            save_state(state_path, self.state_dict())
            bar.update(1)
            bar.set_postfix(entropy=f"{entropy:.4f}")
        bar.close()
        return self.genome(), -entropy if self.steps else float("nan")


def _tensor_json(t) -> dict[str, Any]:
    t = torch.as_tensor(t).detach().cpu()
    return {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "data": t.flatten().tolist()}


def _tensor_from_json(d: dict[str, Any], device) -> torch.Tensor:
    dtype = getattr(torch, d["dtype"])
    return torch.tensor(d["data"], dtype=dtype, device=device).reshape(d["shape"])


def _ties_filter(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim and elect on stacked task vectors ``[k, ...]``, by ``methods.ties``'s rules:
    keep each one's top ``max(1, int(density * n))`` magnitudes (``methods.magnitude_mask``:
    ties broken by position), then drop the entries whose sign disagrees with the sign of
    the sum (zero counts as positive). Summed over the models, the result is ``methods.ties``
    with unit weights, no normalisation, over a zero base."""
    from ..merge.methods import magnitude_mask

    k = tau.shape[0]
    flat = tau.reshape(k, -1)
    kept = [flat[i] * magnitude_mask(flat[i], density) for i in range(k)]
    el = elect(kept)
    return torch.stack([d * agree(d, el) for d in kept]).reshape(tau.shape)
