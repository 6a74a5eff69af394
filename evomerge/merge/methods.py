"""Weight-space merge methods: pure functions over tensors.

Every method has the signature ``fn(base, tensors, **params) -> Tensor``: ``base`` is the
base model's tensor (or ``None`` for methods without one), ``tensors`` the other inputs'
tensors in recipe order, and ``params`` scalars (shared) or lists with one value per entry
of ``tensors`` (per model). The engine resolves per-layer gradients and name filters before
calling, so a method only ever sees plain numbers.

Arithmetic runs in float32 (float64 if the inputs are float64); the result is returned in
that working precision and cast by the caller. Conventions follow the papers, with the
documented choices that make recipes written for mergekit give the same weights: trimming
keeps exactly ``max(1, int(density * n))`` entries (ties broken by position), TIES elects the
sign of the weighted sum with zero counted as positive, SLERP falls back to linear
interpolation when ``|cos| > 0.9995``.

Trimming never sorts a whole tensor: thresholds come from ``torch.kthvalue``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "METHODS",
    "MethodSpec",
    "ParamSpec",
    "linear",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "slerp",
    "model_stock",
    "wise_ft",
    "passthrough",
    "rank_range_mask",
    "magnitude_mask",
]


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _f(t: Tensor) -> Tensor:
    dt = _work_dtype(t)
    return t if t.dtype == dt else t.to(dt)


# --------------------------------------------------------------------------------------
# Trimming by magnitude rank (no full sort)
# --------------------------------------------------------------------------------------


def _rank_at_least(a: Tensor, start: int) -> Tensor:
    """Mask of the entries of flat ``a`` whose ascending rank is >= ``start``.

    Ranks order by value, ties by position, so exactly ``n - start`` entries are set.
    """
    n = a.numel()
    if start <= 0:
        return torch.ones(n, dtype=torch.bool, device=a.device)
    if start >= n:
        return torch.zeros(n, dtype=torch.bool, device=a.device)
    v = torch.kthvalue(a, start + 1).values  # the value holding rank `start`
    above = a > v
    eq = a == v
    n_below = n - int(above.sum()) - int(eq.sum())
    # Among the entries equal to v (ranks n_below .. n_below + n_eq - 1, in position
    # order) keep those whose rank is >= start.
    skip = start - n_below
    if skip <= 0:
        return above | eq
    pos = torch.cumsum(eq, dim=0, dtype=torch.int64)
    return above | (eq & (pos > skip))


def rank_range_mask(magnitudes: Tensor, start: int, stop: int) -> Tensor:
    """Mask (shape of ``magnitudes``) of entries whose ascending rank lies in [start, stop)."""
    flat = magnitudes.reshape(-1)
    n = flat.numel()
    start, stop = max(0, start), min(n, stop)
    if stop <= start:
        return torch.zeros_like(magnitudes, dtype=torch.bool)
    mask = _rank_at_least(flat, start)
    if stop < n:
        mask &= ~_rank_at_least(flat, stop)
    return mask.reshape(magnitudes.shape)


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Keep the ``max(1, int(density * n))`` largest-magnitude entries (TIES trim)."""
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    if density <= 0 or n == 0:
        return torch.zeros_like(delta, dtype=torch.bool)
    k = max(1, int(density * n))
    return rank_range_mask(delta.abs(), n - k, n)


def outlier_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the top ``gamma`` fraction and the smallest entries.

    ``int(density * n)`` entries are kept; the ``int(gamma * n)`` largest are removed
    first, fewer when needed to keep that many.
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - keep - n_top)
    return rank_range_mask(delta.abs(), n_bot, n_bot + keep)


def _rescale(delta: Tensor, masked: Tensor, how) -> Tensor:
    """Match the norm of ``masked`` to that of ``delta`` (mergekit's ``rescale``)."""
    if how == "l1":
        before, after = delta.abs().sum(), masked.abs().sum()
    elif how == "l2":
        before, after = delta.norm(), masked.norm()
    elif how == "linf":
        before, after = delta.abs().max(), masked.abs().max()
    else:  # pragma: no cover - validated by the spec
        raise ValueError(f"unknown rescale norm {how!r}")
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def _generator(seed: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(seed) & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def random_keep_mask(shape, density: float, seed: int, device) -> Tensor:
    """DARE: keep each entry with probability ``density`` (drop rate p = 1 - density)."""
    g = _generator(seed, torch.device(device))
    return torch.rand(shape, generator=g, device=device) < density


# --------------------------------------------------------------------------------------
# The task-arithmetic family
# --------------------------------------------------------------------------------------


def _sparsify(
    delta: Tensor,
    kind: str | None,
    density: float,
    rescale,
    seed: int | None,
    gamma: float,
    epsilon: float,
) -> Tensor:
    if kind is None or density >= 1:
        return delta
    if kind in ("magnitude", "outliers"):
        # mergekit reads ``rescale: true`` as "match the L1 norm" for every sparsification;
        # deterministic trims have no keep probability to divide by, so do the same here
        # (the random methods below keep their documented 1/p meaning of ``true``).
        how = "l1" if rescale is True else rescale
        if kind == "magnitude":
            masked = delta * magnitude_mask(delta, density)
        else:
            masked = delta * outlier_mask(delta, density, gamma)
        return _rescale(delta, masked, how) if isinstance(how, str) else masked
    if kind == "random":
        if density <= 0:
            return torch.zeros_like(delta)
        masked = delta * random_keep_mask(delta.shape, density, seed or 0, delta.device)
        if rescale is True:
            return masked / density
        return _rescale(delta, masked, rescale) if isinstance(rescale, str) else masked
    if kind == "della":
        if density <= 0:
            return torch.zeros_like(delta)
        p = della_keep_probabilities(delta, density, epsilon)
        g = _generator(seed or 0, delta.device)
        keep = torch.rand(p.shape, generator=g, device=delta.device) < p
        masked = delta * keep
        if rescale is True:
            return masked / p
        return _rescale(delta, masked, rescale) if isinstance(rescale, str) else masked
    raise ValueError(f"unknown sparsification {kind!r}")


def della_keep_probabilities(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA MagPrune: keep probabilities spread over [density - eps, density + eps]
    by magnitude rank within each row (larger magnitude, higher keep probability).

    Ranking every entry needs one sort per row; it is the only method that does.
    """
    if not (0 < density - epsilon and density + epsilon < 1 + 1e-12):
        raise ValueError(
            f"della needs 0 < density - epsilon and density + epsilon <= 1 "
            f"(density={density}, epsilon={epsilon})"
        )
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    m = rows.shape[1]
    order = rows.abs().argsort(dim=1)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(m, device=delta.device).expand_as(order))
    norm = ranks.to(rows.dtype) / max(1, m - 1)
    return ((density - epsilon) + 2 * epsilon * norm).reshape(delta.shape)


def _elect_and_sum(deltas: Tensor, weights: Tensor, consensus: bool, normalize: bool) -> Tensor:
    """Combine weighted deltas ``deltas[k] = w_k * tau_k``.

    With ``consensus`` (TIES): elect per entry the sign of the sum (zero counts as
    positive) and keep only the entries that agree; ``normalize`` divides by the sum of
    the weights of the kept entries (the disjoint mean).
    """
    wshape = (-1,) + (1,) * (deltas.dim() - 1)
    w = weights.reshape(wshape)
    if consensus:
        elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)
        agree = deltas.sign() == elected
        mixed = (deltas * agree).sum(dim=0)
        if normalize:
            div = (w * agree).sum(dim=0)
            div[div == 0] = 1
            mixed /= div
        return mixed
    mixed = deltas.sum(dim=0)
    if normalize:
        div = weights.sum()
        if div.abs() >= 1e-8:
            mixed /= div
    return mixed


def _general_task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weight: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
    consensus: bool = False,
    sparsify: str | None = None,
    density: Sequence[float] | None = None,
    rescale=False,
    seeds: Sequence[int] | None = None,
    gamma: Sequence[float] | None = None,
    epsilon: Sequence[float] | None = None,
) -> Tensor:
    b = _f(base)
    if not tensors:
        return b.clone()
    k = len(tensors)
    deltas = torch.empty((k, *b.shape), dtype=b.dtype, device=b.device)
    for i, t in enumerate(tensors):
        torch.sub(_f(t), b, out=deltas[i])
        if sparsify is not None:
            deltas[i] = _sparsify(
                deltas[i],
                sparsify,
                density[i] if density is not None else 1.0,
                rescale,
                seeds[i] if seeds is not None else 0,
                gamma[i] if gamma is not None else 0.0,
                epsilon[i] if epsilon is not None else 0.0,
            )
    w = torch.tensor(list(weight), dtype=b.dtype, device=b.device)
    deltas.mul_(w.reshape((-1,) + (1,) * b.dim()))
    mixed = _elect_and_sum(deltas, w, consensus, normalize)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(b)


def task_arithmetic(base, tensors, weight, lambda_=1.0, normalize=False):
    """Task arithmetic: theta = theta0 + lambda * sum_k w_k (theta_k - theta0).

    Negative weights subtract a skill. Ilharco et al. 2023, "Editing Models with Task
    Arithmetic", https://arxiv.org/abs/2212.04089.
    """
    return _general_task_arithmetic(base, tensors, weight, lambda_=lambda_, normalize=normalize)


def ties(base, tensors, weight, density, lambda_=1.0, normalize=True, rescale=False):
    """TIES-Merging: trim each task vector to its top-``density`` magnitudes, elect a sign
    per entry (sign of the weighted sum), and average the agreeing entries.

    Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
    https://arxiv.org/abs/2306.01708.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, consensus=True,
        sparsify="magnitude", density=density, rescale=rescale,
    )


def dare_linear(base, tensors, weight, density, seeds, lambda_=1.0, normalize=False, rescale=True):
    """DARE + task arithmetic: drop each task-vector entry with probability p = 1 - density
    and rescale survivors by 1/(1 - p) (``rescale: l1`` matches the tensor's L1 norm
    instead, as mergekit does), then add the weighted sum to the base.

    Yu et al. 2024, "Language Models are Super Mario", https://arxiv.org/abs/2311.03099.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, sparsify="random",
        density=density, rescale=rescale, seeds=seeds,
    )


def dare_ties(base, tensors, weight, density, seeds, lambda_=1.0, normalize=False, rescale=True):
    """DARE drop-and-rescale followed by TIES sign election.

    Yu et al. 2024, https://arxiv.org/abs/2311.03099; election from
    https://arxiv.org/abs/2306.01708.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, consensus=True,
        sparsify="random", density=density, rescale=rescale, seeds=seeds,
    )


def breadcrumbs(base, tensors, weight, density, gamma, lambda_=1.0, normalize=False, rescale=False):
    """Model Breadcrumbs: per tensor drop the ``gamma`` largest and the smallest entries
    of each task vector, keeping a ``density`` fraction, then task arithmetic.

    Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, sparsify="outliers",
        density=density, gamma=gamma, rescale=rescale,
    )


def breadcrumbs_ties(base, tensors, weight, density, gamma, lambda_=1.0, normalize=False, rescale=False):
    """Model Breadcrumbs masks followed by TIES sign election.

    Davari & Belilovsky 2023, https://arxiv.org/abs/2312.06795.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, consensus=True,
        sparsify="outliers", density=density, gamma=gamma, rescale=rescale,
    )


def della(base, tensors, weight, density, epsilon, seeds, lambda_=1.0, normalize=True, rescale=True):
    """DELLA-Merging: MagPrune (rank-dependent drop probabilities in
    [1-density-eps, 1-density+eps], survivors rescaled by 1/keep-probability), then TIES
    election and disjoint merge.

    Deep et al. 2024, https://arxiv.org/abs/2406.11617.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, consensus=True,
        sparsify="della", density=density, epsilon=epsilon, rescale=rescale, seeds=seeds,
    )


def della_linear(base, tensors, weight, density, epsilon, seeds, lambda_=1.0, normalize=False, rescale=True):
    """DELLA MagPrune followed by plain task arithmetic (no election).

    Deep et al. 2024, https://arxiv.org/abs/2406.11617.
    """
    return _general_task_arithmetic(
        base, tensors, weight, lambda_=lambda_, normalize=normalize, sparsify="della",
        density=density, epsilon=epsilon, rescale=rescale, seeds=seeds,
    )


def linear(base, tensors, weight, normalize=True):
    """Linear merge (model soup): sum_k w_k theta_k, divided by sum_k w_k if ``normalize``.

    Wortsman et al. 2022, "Model soups", https://arxiv.org/abs/2203.05482.
    """
    out = torch.zeros_like(_f(tensors[0]))
    for t, w in zip(tensors, weight):
        out.add_(_f(t), alpha=float(w))
    if normalize:
        total = float(sum(weight))
        if total == 0:
            raise ValueError("linear merge with normalize: the weights sum to zero")
        out.div_(total)
    return out


def wise_ft(base, tensors, alpha=0.5):
    """WiSE-FT: theta = (1 - alpha) * theta0 + alpha * theta_ft.

    Wortsman et al. 2022, "Robust fine-tuning of zero-shot models",
    https://arxiv.org/abs/2109.01903.
    """
    b = _f(base)
    return torch.lerp(b, _f(tensors[0]), float(alpha))


def slerp(base, tensors, t, dot_threshold=0.9995, eps=1e-8):
    """Spherical linear interpolation between the base (t = 0) and one model (t = 1),
    over the whole flattened tensor; linear interpolation when the two are nearly
    collinear (|cos| > ``dot_threshold``).

    Shoemake 1985, "Animating rotation with quaternion curves"; as used for LLM merging in
    WARP, https://arxiv.org/abs/2406.16768.
    """
    v0, v1 = _f(base), _f(tensors[0])
    t = float(t)
    n0 = torch.linalg.vector_norm(v0)
    n1 = torch.linalg.vector_norm(v1)
    n0 = n0 if n0 > eps else torch.ones_like(n0)
    n1 = n1 if n1 > eps else torch.ones_like(n1)
    dot = (torch.dot((v0 / n0).reshape(-1), (v1 / n1).reshape(-1))).clamp(-1, 1)
    if dot.abs() > dot_threshold:
        return torch.lerp(v0, v1, t)
    theta = torch.acos(dot)
    s = torch.sin(theta)
    c0 = torch.sin((1 - t) * theta) / s
    c1 = torch.sin(t * theta) / s
    return v0 * c0 + v1 * c1


def model_stock(base, tensors, filter_wise=False):
    """Model Stock: t = k cos(phi) / (1 + (k - 1) cos(phi)) from the mean pairwise cosine
    of the task vectors; theta = t * mean(theta_k) + (1 - t) * theta0.

    Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
    https://arxiv.org/abs/2403.19522.
    """
    b = _f(base)
    shape = b.shape
    if filter_wise and b.dim() >= 1:
        rows = (lambda x: x.reshape(1, -1)) if b.dim() == 1 else (lambda x: x.reshape(shape[0], -1))
    else:
        rows = lambda x: x.reshape(1, -1)  # noqa: E731
    w0 = rows(b)
    ws = [rows(_f(t)) for t in tensors]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for c in offsets[i + 1:]:
            denom = (a.norm(dim=-1) * c.norm(dim=-1)).clamp(min=1e-6)
            cos.append(((a * c).sum(dim=-1) / denom).clamp(-1, 1))
    cos_t = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    den = 1 + (k - 1) * cos_t
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_t), k * cos_t / torch.where(singular, 1, den))
    mean = torch.stack(ws).mean(dim=0)
    return (t * mean + (1 - t) * w0).reshape(shape)


def passthrough(base, tensors, scale=None):
    """Passthrough: copy one input tensor (optionally scaled). With ``slices`` it stacks
    layer ranges of one or more models (depth up-scaling).

    Kim et al. 2023, "SOLAR 10.7B", https://arxiv.org/abs/2312.15166.
    """
    t = _f(tensors[0])
    s = scale[0] if isinstance(scale, (list, tuple)) else scale
    return t if s is None else t * float(s)


# --------------------------------------------------------------------------------------
# The registry: what each method takes
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method.

    Args:
        name: the recipe key (``lambda`` is passed to the function as ``lambda_``).
        kind: ``float``, ``bool`` or ``rescale`` (bool or a norm name).
        per_model: one value per merged model (else shared across models).
        default: value when the recipe gives none; ``None`` with ``required``.
        lo, hi, lo_open: allowed numeric range, checked on every resolved value.
        ignored: accepted in recipes (mergekit takes it) but has no effect here.
    """

    name: str
    kind: str = "float"
    per_model: bool = False
    default: object = None
    required: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    ignored: bool = False  # accepted for compatibility, never passed to the function


@dataclass(frozen=True)
class MethodSpec:
    """A merge method, its parameters and the inputs it accepts."""

    name: str
    fn: Callable[..., Tensor]
    params: tuple[ParamSpec, ...]
    needs_base: bool = True
    min_models: int = 1  # models besides the base
    max_models: int | None = None
    base_in_inputs: bool = False  # linear: the base (if named) is one more weighted input
    random: bool = False  # takes per-model seeds
    reference: str = ""
    param_names: tuple[str, ...] = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "param_names", tuple(p.name for p in self.params))

    def param(self, name: str) -> ParamSpec:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)


_W = ParamSpec("weight", per_model=True, required=True)
_W1 = ParamSpec("weight", per_model=True, default=1.0)
_LAMBDA = ParamSpec("lambda", default=1.0)
_DENSITY = ParamSpec("density", per_model=True, default=1.0, lo=0.0, hi=1.0, lo_open=True)
_GAMMA = ParamSpec("gamma", per_model=True, default=0.01, lo=0.0, hi=1.0)
_EPS = ParamSpec("epsilon", per_model=True, default=0.15, lo=0.0, hi=0.5)


def _ta_params(normalize: bool, rescale, *extra: ParamSpec, sparse: bool = True) -> tuple[ParamSpec, ...]:
    return (
        _W,
        _LAMBDA,
        ParamSpec("normalize", kind="bool", default=normalize),
        ParamSpec("rescale", kind="rescale", default=rescale, ignored=not sparse),
        ParamSpec("int8_mask", kind="bool", default=False, ignored=True),  # a memory knob
        *extra,
    )


METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        "linear", linear, (_W, ParamSpec("normalize", kind="bool", default=True)),
        needs_base=False, base_in_inputs=True, reference="https://arxiv.org/abs/2203.05482",
    ),
    "task_arithmetic": MethodSpec(
        # density and rescale are accepted (and unused) so that recipes written for
        # mergekit, whose task arithmetic takes them, run unchanged.
        "task_arithmetic", task_arithmetic,
        _ta_params(False, False, ParamSpec("density", per_model=True, default=1.0, ignored=True), sparse=False),
        reference="https://arxiv.org/abs/2212.04089",
    ),
    "ties": MethodSpec(
        "ties", ties, _ta_params(True, False, _DENSITY),
        reference="https://arxiv.org/abs/2306.01708",
    ),
    "dare_linear": MethodSpec(
        "dare_linear", dare_linear, _ta_params(False, True, _DENSITY), random=True,
        reference="https://arxiv.org/abs/2311.03099",
    ),
    "dare_ties": MethodSpec(
        "dare_ties", dare_ties, _ta_params(False, True, _DENSITY), random=True,
        reference="https://arxiv.org/abs/2311.03099",
    ),
    "breadcrumbs": MethodSpec(
        "breadcrumbs", breadcrumbs, _ta_params(False, False, _DENSITY, _GAMMA),
        reference="https://arxiv.org/abs/2312.06795",
    ),
    "breadcrumbs_ties": MethodSpec(
        "breadcrumbs_ties", breadcrumbs_ties, _ta_params(False, False, _DENSITY, _GAMMA),
        reference="https://arxiv.org/abs/2312.06795",
    ),
    "della": MethodSpec(
        "della", della, _ta_params(True, True, _DENSITY, _EPS), random=True,
        reference="https://arxiv.org/abs/2406.11617",
    ),
    "della_linear": MethodSpec(
        "della_linear", della_linear, _ta_params(False, True, _DENSITY, _EPS), random=True,
        reference="https://arxiv.org/abs/2406.11617",
    ),
    "slerp": MethodSpec(
        "slerp", slerp, (ParamSpec("t", required=True, lo=0.0, hi=1.0),),
        min_models=1, max_models=1, reference="https://arxiv.org/abs/2406.16768",
    ),
    "model_stock": MethodSpec(
        "model_stock", model_stock, (ParamSpec("filter_wise", kind="bool", default=False),),
        min_models=2, reference="https://arxiv.org/abs/2403.19522",
    ),
    "wise_ft": MethodSpec(
        "wise_ft", wise_ft, (ParamSpec("alpha", default=0.5),),
        min_models=1, max_models=1, reference="https://arxiv.org/abs/2109.01903",
    ),
    "passthrough": MethodSpec(
        "passthrough", passthrough, (ParamSpec("scale", per_model=True, default=None),),
        needs_base=False, base_in_inputs=True, min_models=1, max_models=1,
        reference="https://arxiv.org/abs/2312.15166",
    ),
}
