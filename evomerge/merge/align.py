"""Permutation alignment: models trained from different random initializations lined up unit
for unit before they are merged (weight matching, "Git Re-Basin": Ainsworth, Hayase &
Srinivasa 2023, https://arxiv.org/abs/2209.04836).

A transformer computes the same function when the units inside it are relabeled
consistently. Two networks trained from different seeds learn similar units in different
orders, so averaging them entry by entry mixes unrelated units and destroys both; aligning
one to the other first (choosing, for every group of interchangeable units, the relabeling
that makes its weights most like the reference's) is what makes them mergeable.

The groups of a decoder (``Layout``, read from a checkpoint's tensor names and shapes):

- ``res``: the residual stream's channels, one permutation for the whole model (the
  embeddings' columns, every norm's weight and bias, the inputs of the attention and MLP
  projections, the outputs of the output and down projections, the LM head's columns):
  RMSNorm and LayerNorm are the same function of permuted channels;
- ``L.mlp``: the hidden units of layer L's MLP (gate and up rows, down columns);
- ``L.kv`` and ``L.q``: layer L's attention heads, whole (rotary embeddings tie the
  dims of a query or key head to their frequencies, so those stay in place). With
  grouped-query attention a key/value head moves with its group of query heads, and the
  query heads of one group may be permuted among themselves;
- ``L.vd``: the dims of each value head, with the output projection's columns that read
  them (nothing rotates values).

Llama-style checkpoints (Llama, Mistral, Qwen2/3, Gemma: ``layers.N.self_attn.q_proj``,
``mlp.gate_proj`` …) and GPT-2-style ones (``h.N.attn.c_attn``, fused q/k/v in ``Conv1D``
layout) are read; any other tensor is refused by name (``AlignError``): a permutation that
misses one tensor would change the model's function.

``weight_matching(reference, model, layout)`` finds the permutations that maximize
Σ⟨W_ref, P(W_model)⟩ over every weight, by coordinate descent: each group in turn (in a
seeded random order) is the linear assignment that is optimal with the others fixed
(``scipy.optimize.linear_sum_assignment``), until a sweep changes none. ``permute(layout,
perms, name, tensor)`` applies them to one tensor, so a merge reads an aligned model tensor
by tensor (``AlignedCheckpoint``), streaming like any other. Permutations are cached on
disk, keyed by both models' weight bytes and the settings.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["AlignError", "Layout", "layout_of", "identity", "random_permutations", "permute", "weight_matching",
           "activation_matching", "correlations", "similarity", "AlignedCheckpoint", "WeightMatching", "ActivationMatching", "ALIGNERS"]


class AlignError(ValueError):
    """A model that cannot be permuted (with the model and tensor at fault)."""


# per tensor (after the layer prefix), what each axis holds: a group kind or None (untouched)
_LLAMA_LAYER = {
    "self_attn.q_proj.weight": ("q", "res"), "self_attn.q_proj.bias": ("q",),
    "self_attn.k_proj.weight": ("k", "res"), "self_attn.k_proj.bias": ("k",),
    "self_attn.v_proj.weight": ("v", "res"), "self_attn.v_proj.bias": ("v",),
    "self_attn.o_proj.weight": ("res", "o"), "self_attn.o_proj.bias": ("res",),
    "mlp.gate_proj.weight": ("mlp", "res"), "mlp.gate_proj.bias": ("mlp",),
    "mlp.up_proj.weight": ("mlp", "res"), "mlp.up_proj.bias": ("mlp",),
    "mlp.down_proj.weight": ("res", "mlp"), "mlp.down_proj.bias": ("res",),
    "self_attn.q_norm.weight": (None,), "self_attn.k_norm.weight": (None,),  # over a head's dims
    "self_attn.rotary_emb.inv_freq": None,  # (a buffer older checkpoints hold: no units)
    **{f"{n}.{p}": ("res",) for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                       "post_feedforward_layernorm") for p in ("weight", "bias")},
}
_LLAMA_TOP = {"embed_tokens.weight": (None, "res"), "norm.weight": ("res",), "norm.bias": ("res",),
              "lm_head.weight": (None, "res"), "rotary_emb.inv_freq": None}
_GPT2_LAYER = {
    "attn.c_attn.weight": ("res", "qkv"), "attn.c_attn.bias": ("qkv",),
    "attn.c_proj.weight": ("o", "res"), "attn.c_proj.bias": ("res",),
    "mlp.c_fc.weight": ("res", "mlp"), "mlp.c_fc.bias": ("mlp",),
    "mlp.c_proj.weight": ("mlp", "res"), "mlp.c_proj.bias": ("res",),
    "attn.bias": None, "attn.masked_bias": None,  # the causal mask's buffers
    **{f"{n}.{p}": ("res",) for n in ("ln_1", "ln_2") for p in ("weight", "bias")},
}
_GPT2_TOP = {"wte.weight": (None, "res"), "wpe.weight": (None, "res"), "ln_f.weight": ("res",),
             "ln_f.bias": ("res",), "lm_head.weight": (None, "res")}
_FAMILIES = {  # name: (the layer pattern, per-layer table, top-level table, a tensor only it has)
    "llama": (re.compile(r"^(?:.*\.)?layers\.(\d+)\.(.+)$"), _LLAMA_LAYER, _LLAMA_TOP, "self_attn.q_proj.weight"),
    "gpt2": (re.compile(r"^(?:.*\.)?h\.(\d+)\.(.+)$"), _GPT2_LAYER, _GPT2_TOP, "attn.c_attn.weight"),
}


@dataclass
class Layout:
    """Where the interchangeable units of one architecture sit: ``axes[name]`` gives, per
    axis of the tensor, ``(kind, layer)`` or None."""

    family: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    layers: list[int]
    axes: dict[str, tuple[tuple[str, int | None] | None, ...]] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        """The permutation groups, in a fixed order (``res``; per layer mlp, heads, vd)."""
        return ["res"] + [f"{i}.{g}" for i in self.layers for g in ("mlp", "heads", "vd")]

    def signature(self) -> dict:
        return {"family": self.family, "hidden": self.hidden, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "intermediate": self.intermediate, "layers": self.layers,
                "tensors": sorted(self.axes)}


def layout_of(shapes: Mapping[str, tuple[int, ...]], config: Mapping, model: str = "model") -> Layout:
    """The layout of a checkpoint from its tensors' shapes (``{name: shape}``) and its
    config (only the number of attention heads is read from it); ``AlignError`` names the
    first tensor that fits no known layout."""
    names = list(shapes)
    family = next((f for f, (pat, _, _, mark) in _FAMILIES.items()
                   if any((m := pat.match(n)) and m.group(2) == mark for n in names)), None)
    if family is None:
        raise AlignError(f"model '{model}': no attention layers of a layout alignment knows (Llama-style "
                         "'layers.N.self_attn.q_proj.weight' or GPT-2-style 'h.N.attn.c_attn.weight'); "
                         f"its architecture ({config.get('model_type', '?')}) cannot be permuted")
    pat, per_layer, top, mark = _FAMILIES[family]
    heads = config.get("num_attention_heads", config.get("n_head"))
    if not isinstance(heads, int) or heads < 1:
        raise AlignError(f"model '{model}': its config gives no number of attention heads "
                         "('num_attention_heads' or 'n_head')")
    axes: dict[str, tuple] = {}
    layers: set[int] = set()
    for n in names:
        m = pat.match(n)
        if m is not None and m.group(2) in per_layer:
            i = int(m.group(1))
            kinds = per_layer[m.group(2)]
            layers.add(i)
        else:
            suffix = next((s for s in top if n == s or n.endswith("." + s)), None)
            if suffix is None:
                raise AlignError(f"model '{model}': tensor '{n}' is not part of a {family}-style decoder alignment "
                                 "knows how to permute (permuting the others alone would change the model's "
                                 "function)")
            kinds, i = top[suffix], None
        if kinds is None:
            continue
        if len(kinds) != len(shapes[n]):
            raise AlignError(f"model '{model}': tensor '{n}' has shape {tuple(shapes[n])}, expected "
                             f"{len(kinds)} dimension(s)")
        axes[n] = tuple(None if k is None else (k, i if k != "res" else None) for k in kinds)

    def dim(kind: str, where: str) -> int:
        for n, ax in axes.items():
            for a, k in enumerate(ax):
                if k is not None and k[0] == kind:
                    return shapes[n][a]
        raise AlignError(f"model '{model}': no {where} tensor found to read its size from")

    hidden = dim("res", "residual-stream")
    intermediate = dim("mlp", "MLP")
    if family == "llama":
        q, k = dim("q", "query projection"), dim("k", "key projection")
        if q % heads:
            raise AlignError(f"model '{model}': the query projection's {q} rows do not split into {heads} heads")
        head_dim = q // heads
        if k % head_dim or heads % (k // head_dim):
            raise AlignError(f"model '{model}': the key projection's {k} rows are not a whole number of key/value "
                             f"heads of {head_dim} dims that divides the {heads} query heads")
        kv_heads = k // head_dim
    else:
        qkv = dim("qkv", "fused q/k/v projection")
        if qkv % 3 or (qkv // 3) % heads:
            raise AlignError(f"model '{model}': the fused q/k/v projection's {qkv} outputs do not split into "
                             f"3 x {heads} heads")
        head_dim, kv_heads = qkv // 3 // heads, heads
    out = Layout(family, hidden, heads, kv_heads, head_dim, intermediate, sorted(layers), axes)
    for n, ax in axes.items():  # every unit axis must have the size its group has
        for a, k in enumerate(ax):
            if k is not None and shapes[n][a] != _axis_size(out, k[0]):
                raise AlignError(f"model '{model}': tensor '{n}' has {shapes[n][a]} entries on axis {a}, "
                                 f"where its {k[0]} units need {_axis_size(out, k[0])}")
    return out


def _axis_size(lay: Layout, kind: str) -> int:
    return {"res": lay.hidden, "mlp": lay.intermediate, "q": lay.heads * lay.head_dim,
            "o": lay.heads * lay.head_dim, "k": lay.kv_heads * lay.head_dim, "v": lay.kv_heads * lay.head_dim,
            "qkv": (lay.heads + 2 * lay.kv_heads) * lay.head_dim}[kind]


# --------------------------------------------------------------------------------------
# Permutations and their application
# --------------------------------------------------------------------------------------
# ``perms``: "res" [H]; "L.mlp" [I]; "L.kv" [kv heads]; "L.q" [heads], consistent with
# L.kv (query head g*r + j of the permuted model is the original's kv[g]*r + something);
# "L.vd" [kv heads, head_dim], indexed by the original kv head. Permuted = original[index]:
# unit u of the permuted model is unit perm[u] of the original.


def identity(lay: Layout) -> dict[str, Tensor]:
    out = {"res": torch.arange(lay.hidden)}
    for i in lay.layers:
        out[f"{i}.mlp"] = torch.arange(lay.intermediate)
        out[f"{i}.kv"] = torch.arange(lay.kv_heads)
        out[f"{i}.q"] = torch.arange(lay.heads)
        out[f"{i}.vd"] = torch.arange(lay.head_dim).repeat(lay.kv_heads, 1)
    return out


def random_permutations(lay: Layout, seed: int = 0) -> dict[str, Tensor]:
    """Random permutations of every group (for tests: the permuted model computes the same)."""
    g = torch.Generator().manual_seed(seed)
    r = lay.heads // lay.kv_heads
    out = {"res": torch.randperm(lay.hidden, generator=g)}
    for i in lay.layers:
        kv = torch.randperm(lay.kv_heads, generator=g)
        out[f"{i}.mlp"] = torch.randperm(lay.intermediate, generator=g)
        out[f"{i}.kv"] = kv
        out[f"{i}.q"] = torch.cat([kv[c] * r + torch.randperm(r, generator=g) for c in range(lay.kv_heads)])
        out[f"{i}.vd"] = torch.stack([torch.randperm(lay.head_dim, generator=g) for _ in range(lay.kv_heads)])
    return out


def _index(lay: Layout, perms: Mapping[str, Tensor], kind: str, layer: int | None) -> Tensor:
    """The index of one axis kind: permuted = original.index_select(axis, index)."""
    if kind == "res":
        return perms["res"]
    if kind == "mlp":
        return perms[f"{layer}.mlp"]
    hd, r = lay.head_dim, lay.heads // lay.kv_heads
    q, kv, vd = perms[f"{layer}.q"], perms[f"{layer}.kv"], perms[f"{layer}.vd"]
    if kind == "q":
        return (q[:, None] * hd + torch.arange(hd)).reshape(-1)
    if kind == "k":
        return (kv[:, None] * hd + torch.arange(hd)).reshape(-1)
    if kind == "v":
        return (kv[:, None] * hd + vd[kv]).reshape(-1)
    if kind == "o":
        return (q[:, None] * hd + vd[q // r]).reshape(-1)
    if kind == "qkv":
        nq, nk = lay.heads * hd, lay.kv_heads * hd
        return torch.cat([_index(lay, perms, "q", layer), nq + _index(lay, perms, "k", layer),
                          nq + nk + _index(lay, perms, "v", layer)])
    raise KeyError(kind)


def permute(lay: Layout, perms: Mapping[str, Tensor], name: str, t: Tensor) -> Tensor:
    """Tensor ``name`` of a model, permuted (itself when no axis of it moves)."""
    for a, k in enumerate(lay.axes.get(name, ())):
        if k is not None:
            t = t.index_select(a, _index(lay, perms, *k).to(t.device))
    return t


def similarity(lay: Layout, ref: Mapping[str, Tensor], model: Mapping[str, Tensor],
               perms: Mapping[str, Tensor] | None = None) -> float:
    """Σ⟨W_ref, P(W_model)⟩ over the tensors with units: what weight matching maximizes."""
    total = 0.0
    for n in lay.axes:
        m = model[n] if perms is None else permute(lay, perms, n, model[n])
        total += float((ref[n].double() * m.double()).sum())
    return total


# --------------------------------------------------------------------------------------
# Weight matching
# --------------------------------------------------------------------------------------


def _units(t: Tensor, axis: int, n: int) -> Tensor:
    """Axis ``axis`` of ``t`` as ``n`` rows of everything else."""
    return t.movedim(axis, 0).reshape(n, -1)


def _lap(cost: np.ndarray) -> tuple[np.ndarray, float]:
    """The column matched to each row maximizing the total, and the total."""
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost, maximize=True)
    return cols[np.argsort(rows)], float(cost[rows, cols].sum())


class _Matcher:
    def __init__(self, lay: Layout, ref: Mapping[str, Tensor], model: Mapping[str, Tensor]):
        self.lay = lay
        self.ref = {n: ref[n].float() for n in lay.axes}
        self.model = {n: model[n].float() for n in lay.axes}
        self.by_group: dict[str, list[str]] = {}  # group -> tensors with an axis of it
        for n, ax in lay.axes.items():
            for k in ax:
                if k is not None:
                    g = "res" if k[0] == "res" else f"{k[1]}.{'mlp' if k[0] == 'mlp' else 'heads'}"
                    self.by_group.setdefault(g, []).append(n)
                    if k[0] in ("v", "o", "qkv"):
                        self.by_group.setdefault(f"{k[1]}.vd", []).append(n)

    def _others(self, perms: dict[str, Tensor], name: str, free: Callable[[tuple], bool]) -> Tensor:
        """Tensor ``name`` of the model with every axis permuted but those ``free`` says."""
        t = self.model[name]
        for a, k in enumerate(self.lay.axes[name]):
            if k is not None and not free(k):
                t = t.index_select(a, _index(self.lay, perms, *k))
        return t

    def _parts(self, perms, name: str, layer: int, kinds: tuple[str, ...]) -> list[tuple[str, int, Tensor, Tensor]]:
        """(kind, axis, reference part, model part) of a tensor's head axes in layer
        ``layer`` (a fused q/k/v axis split in three), the model's permuted by ``perms``."""
        lay = self.lay
        out = []
        m = self._others(perms, name, lambda k: False)
        for a, k in enumerate(lay.axes[name]):
            if k is None or k[1] != layer or k[0] not in kinds + ("qkv",):
                continue
            if k[0] == "qkv":
                nq, nk = lay.heads * lay.head_dim, lay.kv_heads * lay.head_dim
                for kind, s, e in (("q", 0, nq), ("k", nq, nq + nk), ("v", nq + nk, nq + 2 * nk)):
                    if kind in kinds:
                        out.append((kind, a, self.ref[name].narrow(a, s, e - s), m.narrow(a, s, e - s)))
            else:
                out.append((k[0], a, self.ref[name], m))
        return out

    def step(self, perms: dict[str, Tensor], group: str) -> bool:
        """Solve one group with the others fixed; True when its permutation changed."""
        lay = self.lay
        if group == "res" or group.endswith(".mlp"):
            kind, layer = ("res", None) if group == "res" else ("mlp", int(group.split(".")[0]))
            size = lay.hidden if kind == "res" else lay.intermediate
            cost = torch.zeros(size, size, dtype=torch.float64)
            for n in self.by_group.get(group, []):
                m = self._others(perms, n, lambda k: k == (kind, layer))
                for a, k in enumerate(lay.axes[n]):
                    if k == (kind, layer):
                        cost += (_units(self.ref[n], a, size) @ _units(m, a, size).T).double()
            new = torch.from_numpy(_lap(cost.numpy())[0])
            key = "res" if kind == "res" else group
            changed = not torch.equal(new, perms[key])
            perms[key] = new
            return changed
        layer, what = int(group.split(".")[0]), group.split(".")[1]
        hd, nh, nkv = lay.head_dim, lay.heads, lay.kv_heads
        r = nh // nkv
        if what == "heads":
            # the model's tensors with every other axis and the value dims permuted, its
            # heads in their original order (value dims travel with their original head)
            vd_only = dict(perms)
            vd_only[f"{layer}.q"], vd_only[f"{layer}.kv"] = torch.arange(nh), torch.arange(nkv)
            cq = torch.zeros(nh, nh, dtype=torch.float64)
            ckv = torch.zeros(nkv, nkv, dtype=torch.float64)
            for n in self.by_group.get(group, []):
                for kind, a, rp, mp in self._parts(vd_only, n, layer, ("q", "k", "v", "o")):
                    units = nh if kind in ("q", "o") else nkv
                    c = (_units(rp, a, units) @ _units(mp, a, units).T).double()
                    if kind in ("q", "o"):
                        cq += c
                    else:
                        ckv += c
            total = ckv.numpy().copy()
            within: dict[tuple[int, int], np.ndarray] = {}
            for g in range(nkv):
                for h in range(nkv):
                    within[g, h], v = _lap(cq[g * r:(g + 1) * r, h * r:(h + 1) * r].numpy())
                    total[g, h] += v
            kv = _lap(total)[0]
            q = torch.from_numpy(np.concatenate([kv[g] * r + within[g, int(kv[g])] for g in range(nkv)]))
            kv = torch.from_numpy(kv)
            changed = not (torch.equal(kv, perms[f"{layer}.kv"]) and torch.equal(q, perms[f"{layer}.q"]))
            perms[f"{layer}.kv"], perms[f"{layer}.q"] = kv, q
            return changed
        # value dims: per (new) kv head, its value rows and the output columns that read them
        kv = perms[f"{layer}.kv"]
        plain = dict(perms)
        plain[f"{layer}.vd"] = torch.arange(hd).repeat(nkv, 1)
        cost = torch.zeros(nkv, hd, hd, dtype=torch.float64)
        for n in self.by_group.get(group, []):
            for kind, a, rp, mp in self._parts(plain, n, layer, ("v", "o")):
                units = nkv if kind == "v" else nh
                rr = _units(rp, a, units * hd).reshape(units, hd, -1)
                mm = _units(mp, a, units * hd).reshape(units, hd, -1)
                c = torch.einsum("uik,ujk->uij", rr, mm).double()
                if kind == "o":  # the query heads of a group read its value dims
                    c = c.reshape(nkv, r, hd, hd).sum(1)
                cost += c
        new = perms[f"{layer}.vd"].clone()
        for g in range(nkv):
            new[int(kv[g])] = torch.from_numpy(_lap(cost[g].numpy())[0])
        changed = not torch.equal(new, perms[f"{layer}.vd"])
        perms[f"{layer}.vd"] = new
        return changed


def weight_matching(lay: Layout, ref: Mapping[str, Tensor], model: Mapping[str, Tensor], *,
                    max_sweeps: int = 100, seed: int = 0, progress: Callable[[int, bool], None] | None = None
                    ) -> dict[str, Tensor]:
    """Permutations of ``model`` (``{name: tensor}``) that line it up with ``ref``, both of
    layout ``lay``: coordinate descent over the groups until a sweep changes none (or
    ``max_sweeps``). ``progress(sweep, changed)`` is called after every sweep."""
    m = _Matcher(lay, ref, model)
    perms = identity(lay)
    order = np.random.default_rng(seed)
    groups = lay.groups
    for sweep in range(max_sweeps):
        changed = False
        for i in order.permutation(len(groups)):
            changed |= m.step(perms, groups[int(i)])
        if progress is not None:
            progress(sweep, changed)
        if not changed:
            break
    return perms


@dataclass(frozen=True)
class WeightMatching:
    """The weight-matching aligner's settings (part of its cache key)."""

    max_sweeps: int = 100
    seed: int = 0
    name: str = "weight_matching"
    needs_data: bool = False

    def settings(self) -> dict:
        return {"max_sweeps": self.max_sweeps, "seed": self.seed, "version": 1}

    def __call__(self, lay: Layout, ref: Mapping[str, Tensor], model: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return weight_matching(lay, ref, model, max_sweeps=self.max_sweeps, seed=self.seed)


# --------------------------------------------------------------------------------------
# Activation matching
# --------------------------------------------------------------------------------------


def _readers(lay: Layout, model: torch.nn.Module) -> dict[str, tuple[torch.nn.Module, str]]:
    """The linear layers whose input axis holds MLP units or attention-head outputs, by
    weight name, with that group (``L.mlp``, ``L.o``)."""
    from .statistics import _linear_layers

    out = {}
    for name, mod in _linear_layers(model).items():
        ax = lay.axes.get(name)
        if ax is None or len(ax) != 2:
            continue
        k = ax[1] if isinstance(mod, torch.nn.Linear) else ax[0]  # the input axis
        if k is not None and k[0] in ("mlp", "o"):
            out[name] = (mod, f"{k[1]}.{k[0]}")
    missing = sorted({f"{i}.{g}" for i in lay.layers for g in ("mlp", "o")} - {g for _, g in out.values()})
    if missing:  # the live model's layer names are not the checkpoint's: nothing to match those units by
        raise AlignError(f"activation matching: the live model's layers do not carry the checkpoint's tensor names "
                         f"(no activations for {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
    return out


@torch.no_grad()
def _batch_features(model: torch.nn.Module, readers, ids: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """One batch's activations over its real tokens (rows): ``res:<i>`` the residual stream
    after block i (the embeddings, i = 0), and each reader's input (``L.mlp``, ``L.o``)."""
    dev = next(model.parameters()).device
    ids, mask = ids.to(dev), mask.to(dev)
    keep = mask.reshape(-1).bool()
    feats: dict[str, Tensor] = {}

    def hook(group):
        def fn(module, args):
            feats[group] = args[0].reshape(-1, args[0].shape[-1])[keep].double()
        return fn

    handles = [mod.register_forward_pre_hook(hook(g)) for mod, g in readers.values()]
    try:
        out = model(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    for i, h in enumerate(out.hidden_states):
        feats[f"res:{i}"] = h.reshape(-1, h.shape[-1])[keep].double()
    return feats


class _Moments:
    """Running sums of two sets of columns over rows, for their Pearson correlations."""

    def __init__(self):
        self.n, self.sums = 0, None

    def add(self, a: Tensor, b: Tensor) -> None:
        parts = (a.sum(0), b.sum(0), (a * a).sum(0), (b * b).sum(0), a.T @ b)
        self.sums = parts if self.sums is None else tuple(x + y for x, y in zip(self.sums, parts))
        self.n += a.shape[0]

    def correlation(self) -> Tensor:
        sa, sb, saa, sbb, sab = (x / self.n for x in self.sums)
        sda = (saa - sa * sa).clamp(min=0).sqrt() + 1e-8
        sdb = (sbb - sb * sb).clamp(min=0).sqrt() + 1e-8
        return (sab - sa[:, None] * sb[None, :]) / (sda[:, None] * sdb[None, :])


def _correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlations between the columns of ``a`` and of ``b`` (rows: samples)."""
    m = _Moments()
    m.add(a, b)
    return m.correlation()


def correlations(lay: Layout, ref: torch.nn.Module, model: torch.nn.Module, batches) -> dict[str, Tensor]:
    """The correlation of every unit of ``ref`` with every unit of ``model`` in the same group
    (the keys of ``_batch_features``), both run on the same batches; only running sums are
    kept, batch by batch."""
    ra, rb = _readers(lay, ref), _readers(lay, model)
    acc: dict[str, _Moments] = {}
    for ids, mask, *_ in batches:
        fa, fb = _batch_features(ref, ra, ids, mask), _batch_features(model, rb, ids, mask)
        for k, a in fa.items():
            if k not in fb or fb[k].shape != a.shape:
                raise AlignError(f"the activations '{k}' of the two models differ in shape")
            acc.setdefault(k, _Moments()).add(a, fb[k])
    return {k: m.correlation().cpu() for k, m in acc.items()}


def activation_matching(lay: Layout, corr: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Permutations of a model that line its units up with the reference's by the
    correlation of their activations on the same inputs (``correlations``): every
    group's assignment maximizes the summed correlation of matched units (Ainsworth et al.
    2023, activation matching; the first step of PLeaS). The residual stream's channels are
    matched over every block's output at once; a head's value dims are matched with the
    head; with grouped-query attention each key/value head's query heads are matched within
    it and the group's dims once for all of them."""
    perms = identity(lay)
    res = [k for k in corr if k.startswith("res:")]
    perms["res"] = torch.from_numpy(_lap(sum(corr[k] for k in res).numpy())[0])
    hd, nh, nkv = lay.head_dim, lay.heads, lay.kv_heads
    r = nh // nkv
    for i in lay.layers:
        perms[f"{i}.mlp"] = torch.from_numpy(_lap(corr[f"{i}.mlp"].numpy())[0])
        # how well each reference unit's match correlates (what partial merging keeps apart)
        perms[f"{i}.mlp:score"] = corr[f"{i}.mlp"].gather(1, perms[f"{i}.mlp"][:, None]).reshape(-1).double()
        c = corr[f"{i}.o"].reshape(nh, hd, nh, hd).permute(0, 2, 1, 3).numpy()
        value = np.zeros((nkv, nkv))
        plans = {}
        for g in range(nkv):
            for h in range(nkv):
                qs, qd = range(g * r, (g + 1) * r), range(h * r, (h + 1) * r)
                head = np.array([[_lap(c[a, b])[1] for b in qd] for a in qs])  # each pair at its best dims
                within = _lap(head)[0]
                dims, v = _lap(sum(c[g * r + j, h * r + int(within[j])] for j in range(r)))
                plans[g, h] = (within, dims)
                value[g, h] = v
        kv = _lap(value)[0]
        perms[f"{i}.kv"] = torch.from_numpy(kv)
        perms[f"{i}.q"] = torch.from_numpy(np.concatenate([kv[g] * r + plans[g, int(kv[g])][0] for g in range(nkv)]))
        vd = perms[f"{i}.vd"].clone()
        for g in range(nkv):
            vd[int(kv[g])] = torch.from_numpy(plans[g, int(kv[g])][1])
        perms[f"{i}.vd"] = vd
    return perms


def partial_units(lay: Layout, scores: Sequence[Mapping[str, Tensor]], models: int,
                  width: float) -> dict[int, tuple[Tensor, Tensor]]:
    """PLeaS's partial merging: per layer, ``(merged, separate)`` indices of the reference's
    MLP units, the ``separate`` ones those whose matched units correlate least (the mean of
    ``L.mlp:score`` over the aligned models' ``scores``), as many as make the merged MLP,
    with one copy of them from each of the ``models``, ``width`` times as wide as the
    models' (rounded to a whole number of units)."""
    n = lay.intermediate
    apart = int(round((float(width) - 1.0) * n / max(1, models - 1)))
    if not 0 <= apart <= n:
        raise AlignError(f"width {width}: between 1 (every unit merged) and the number of models, {models} "
                         "(every unit kept apart)")
    out = {}
    for i in lay.layers:
        s = [sc[f"{i}.mlp:score"] for sc in scores if f"{i}.mlp:score" in sc]
        if apart and not s:
            raise AlignError("partial merging needs the models aligned by activation matching (each unit's "
                             "matched correlation)")
        mean = torch.stack(s).mean(0) if s else torch.zeros(n, dtype=torch.float64)
        order = torch.argsort(mean, stable=True)  # least correlated first
        sep = torch.sort(order[:apart]).values
        keep = torch.sort(order[apart:]).values
        out[i] = (keep, sep)
    return out


@dataclass(frozen=True)
class ActivationMatching:
    """The activation-matching aligner: both models run on the same data (the reference's
    ``data``), their units matched by correlation."""

    max_sweeps: int = 100  # (unused: one pass)
    seed: int = 0
    name: str = "activation_matching"
    needs_data: bool = True

    def settings(self) -> dict:
        return {"version": 2}  # (2: with each MLP unit's matched correlation, ``L.mlp:score``)

    def __call__(self, lay: Layout, ref: torch.nn.Module, model: torch.nn.Module, batches) -> dict[str, Tensor]:
        return activation_matching(lay, correlations(lay, ref, model, batches))


ALIGNERS = {"weight_matching": WeightMatching, "activation_matching": ActivationMatching}


class AlignedCheckpoint:
    """A ``Checkpoint`` whose tensors are read permuted: ``perms()`` (called once, on the
    first read, from any thread) gives the permutations."""

    def __init__(self, inner, lay: Layout, perms: Callable[[], dict[str, Tensor]]):
        self._inner = inner
        self.layout = lay
        self._make = perms
        self._perms: dict[str, Tensor] | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def __contains__(self, name: str) -> bool:
        return name in self._inner

    @property
    def perms(self) -> dict[str, Tensor]:
        if self._perms is None:
            with self._lock:
                if self._perms is None:
                    self._perms = self._make()
        return self._perms

    def get(self, name: str, device="cpu", copy: bool = True) -> Tensor:
        t = self._inner.get(name, device, copy=copy)
        if name not in self.layout.axes or all(k is None for k in self.layout.axes[name]):
            return t
        return permute(self.layout, self.perms, name, t)

    def axis_index(self, name: str, axis: int) -> Tensor | None:
        """The index that axis ``axis`` of tensor ``name`` is read through (None: in place)."""
        ax = self.layout.axes.get(name, ())
        k = ax[axis] if axis < len(ax) else None
        return None if k is None else _index(self.layout, self.perms, *k)
