"""Permutation alignment (weight matching): permuted models compute what the originals do
(Llama with grouped-query attention, biases and tied embeddings, Qwen2, Qwen3 and the GPT-2
word family), weight matching finds a hidden permutation and each of its steps is the best
permutation of its group (against brute force), alignment as a step before any method
(statistics permuted alike), its cache, and bad inputs."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from evomerge.merge import align as A
from evomerge.merge.engine import Merger
from evomerge.recipe import RecipeError, parse_recipe
from evomerge.testing import tiny_config, tiny_family, tiny_model


def _llama(**kw):
    return tiny_model(tiny_config(hidden=32, layers=2, **kw), seed=3)


def _qwen2():
    from transformers import Qwen2Config

    torch.manual_seed(4)
    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _qwen3():
    from transformers import Qwen3Config

    torch.manual_seed(5)
    cfg = Qwen3Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(6)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=32,
                                      bos_token_id=0, eos_token_id=0)).eval()


def _noisy(model, seed):
    """Every parameter moved off its initial value (norms are ones and biases zeros there,
    which no permutation changes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


MODELS = {"llama-gqa": lambda: _llama(), "llama-bias-tied": lambda: _llama(attention_bias=True, mlp_bias=True, tie=True),
          "qwen2": _qwen2, "qwen3": _qwen3, "gpt2": _gpt2}


def _layout(model):
    sd = model.state_dict()
    return A.layout_of({k: tuple(v.shape) for k, v in sd.items()}, model.config.to_dict()), sd


def _logits(model, state, ids):
    with torch.no_grad():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(state)
        out = model(ids).logits
        model.load_state_dict(before)
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("seed", [0, 1])
def test_a_permuted_model_computes_the_same(name, seed):
    model = _noisy(MODELS[name](), seed)
    lay, sd = _layout(model)
    perms = A.random_permutations(lay, seed)
    permuted = {k: A.permute(lay, perms, k, v) for k, v in sd.items()}
    moved = [k for k in sd if not torch.equal(sd[k], permuted[k])]
    # (a small group, two key/value heads, may draw its identity)
    assert len(moved) >= len([k for k in lay.axes if any(lay.axes[k])]) // 2
    ids = torch.randint(3, 40, (2, 11), generator=torch.Generator().manual_seed(seed))
    a, b = _logits(model, sd, ids), _logits(model, permuted, ids)
    assert torch.allclose(a, b, atol=2e-5), (a - b).abs().max()
    # and a permutation that breaks the rules (one query head moved without its key) does not
    bad = dict(perms)
    q = perms[f"{lay.layers[0]}.q"].clone()
    q[[0, -1]] = q[[-1, 0]]
    bad[f"{lay.layers[0]}.q"] = q
    if lay.kv_heads > 1:  # (with one key/value head every query head may go anywhere)
        wrong = {k: A.permute(lay, bad, k, v) for k, v in sd.items()}
        assert not torch.allclose(a, _logits(model, wrong, ids), atol=1e-3)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "qwen3"])
def test_weight_matching_finds_a_hidden_permutation(name):
    model = _noisy(MODELS[name](), 7)
    lay, sd = _layout(model)
    hidden = {k: A.permute(lay, A.random_permutations(lay, 11), k, v) for k, v in sd.items()}
    perms = A.weight_matching(lay, sd, hidden)
    for k in sd:
        assert torch.equal(A.permute(lay, perms, k, hidden[k]), sd[k]), k


def _consistent_heads(lay):
    r = lay.heads // lay.kv_heads
    for kv in itertools.permutations(range(lay.kv_heads)):
        for within in itertools.product(list(itertools.permutations(range(r))), repeat=lay.kv_heads):
            q = [kv[g] * r + w for g in range(lay.kv_heads) for w in within[g]]
            yield torch.tensor(kv), torch.tensor(q)


def test_each_step_is_the_best_permutation_of_its_group():
    """From random starting permutations, one step of each group gives the permutation of
    that group (the others fixed) with the largest similarity, found by trying them all."""
    from transformers import LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=6, hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=2, max_position_embeddings=16)
    ref = AutoModelForCausalLM.from_config(cfg).state_dict()
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(cfg).state_dict()
    lay = A.layout_of({k: tuple(v.shape) for k, v in ref.items()}, cfg.to_dict())
    matcher = A._Matcher(lay, ref, other)
    for group in lay.groups:
        start = A.random_permutations(lay, 5)
        got = dict(start)
        matcher.step(got, group)
        if group == "res" or group.endswith(".mlp"):
            key = "res" if group == "res" else group
            cands = [{**start, key: torch.tensor(p)} for p in itertools.permutations(range(len(start[key])))]
        elif group.endswith(".heads"):
            cands = [{**start, "0.kv": kv, "0.q": q} for kv, q in _consistent_heads(lay)]
        else:
            cands = [{**start, "0.vd": torch.tensor([list(a), list(b)])}
                     for a in itertools.permutations(range(2)) for b in itertools.permutations(range(2))]
        best = max(A.similarity(lay, ref, other, c) for c in cands)
        assert A.similarity(lay, ref, other, got) == pytest.approx(best, rel=1e-9, abs=1e-9), group
        assert len(cands) > 1


def test_weight_matching_never_lowers_the_similarity_of_independent_models():
    a, b = _noisy(_llama(), 1), tiny_model(tiny_config(hidden=32, layers=2), seed=99)
    lay, sa = _layout(a)
    sb = b.state_dict()
    perms = A.weight_matching(lay, sa, sb)
    assert A.similarity(lay, sa, sb, perms) > A.similarity(lay, sa, sb)
    ids = torch.randint(3, 40, (2, 9))
    assert torch.allclose(_logits(b, sb, ids), _logits(b, {k: A.permute(lay, perms, k, v) for k, v in sb.items()},
                                                        ids), atol=2e-5)


# --------------------------------------------------------------------------------------
# Merges: the method, and alignment before any method
# --------------------------------------------------------------------------------------


def _save_permuted(src: Path, dst: Path, seed: int) -> Path:
    """A copy of model folder ``src`` with its units randomly relabeled."""
    import shutil

    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    sd = load_file(str(f))
    cfg = json.loads((dst / "config.json").read_text())
    lay = A.layout_of({k: tuple(v.shape) for k, v in sd.items()}, cfg)
    perms = A.random_permutations(lay, seed)
    save_file({k: A.permute(lay, perms, k, v).contiguous() for k, v in sd.items()}, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("alignfam")
    paths = tiny_family(root, n_experts=2, layers=2, hidden=32)
    paths["expert_0_permuted"] = _save_permuted(paths["expert_0"], root / "expert_0_permuted", 21)
    paths["base_permuted"] = _save_permuted(paths["base"], root / "base_permuted", 22)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in
                            [("rev:abc=", "cba"), ("srt:31=", "13"), ("inc:5=", "6"), ("rev:ab=", "ba")]))
    paths["data"] = data
    return {k: str(v) for k, v in paths.items()}


def _merged(tmp_path, rec, name="out") -> dict[str, torch.Tensor]:
    out = Merger(parse_recipe(rec)).write(tmp_path / name)
    return load_file(str(next(out.glob("*.safetensors"))))


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(next(Path(folder).glob("*.safetensors"))))


def test_merging_a_model_with_its_permuted_copy_gives_the_model(fam, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    rec = {"merge_method": "weight_matching", "models": [fam["expert_0"], fam["expert_0_permuted"]], "dtype": "float32"}
    got, want = _merged(tmp_path, rec), _weights(fam["expert_0"])
    assert all(torch.equal(got[k], want[k]) for k in want)
    # without the alignment, the same average is another model
    plain = _merged(tmp_path, {**rec, "merge_method": "linear",
                               "models": [{"model": m, "parameters": {"weight": 1.0}} for m in rec["models"]]}, "plain")
    assert not all(torch.allclose(plain[k], want[k], atol=1e-3) for k in want)
    # the permutations were found once and kept; a second merge reads them
    entries = list((tmp_path / "cache" / "alignment").iterdir())
    assert len(entries) == 1 and {p.name for p in entries[0].iterdir()} == {"values.safetensors", "record.json"}
    record = json.loads((entries[0] / "record.json").read_text())
    assert record["similarity_after"] > record["similarity_before"]
    monkeypatch.setattr(A.WeightMatching, "__call__", lambda *a, **k: pytest.fail("found again"))
    again = _merged(tmp_path, rec, "again")
    assert all(torch.equal(again[k], got[k]) for k in got)


def test_the_second_family_merged_with_its_permuted_copy(words, tmp_path, monkeypatch):
    """GPT-2 (fused q/k/v in Conv1D layout, LayerNorm biases, position embeddings)."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    src = next(iter(words.experts.values()))
    twin = _save_permuted(src, tmp_path / "twin", 3)
    rec = {"merge_method": "weight_matching", "models": [str(src), str(twin)], "dtype": "float32"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", str(path), str(tmp_path / "out"), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    got, want = _weights(tmp_path / "out"), _weights(src)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_alignment_runs_before_any_method(fam, tmp_path, monkeypatch, method):
    """A fine-tune given relabeled merges as the fine-tune itself does, once aligned to the
    base (the reference when there is a base)."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    params = {"weight": 1.0, **({"density": 0.5} if method == "ties" else {})}
    rec = {"merge_method": method, "base_model": fam["base"], "dtype": "float32",
           "models": [{"model": fam["expert_0"], "parameters": params}, {"model": fam["expert_1"], "parameters": params}]}
    want = _merged(tmp_path, rec, "want")
    rec["models"][0]["model"] = fam["expert_0_permuted"]
    assert not all(torch.allclose(_merged(tmp_path, rec, "unaligned")[k], want[k]) for k in want)
    got = _merged(tmp_path, {**rec, "align": "weight_matching"}, "aligned")
    assert all(torch.equal(got[k], want[k]) for k in want)
    # a reference that is not the base: the base (relabeled) is aligned to it too
    one = {**rec, "models": [{"model": fam["expert_0"], "parameters": params}]}
    want = _merged(tmp_path, one, "want_one")
    got = _merged(tmp_path, {**one, "base_model": fam["base_permuted"], "align": {"reference": fam["expert_0"]}}, "one")
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_statistics_of_an_aligned_model_are_permuted_with_it(fam, tmp_path, monkeypatch, method):
    """Fisher and RegMean of a model and its relabeled copy, on the same data, give back the
    model: the copy's statistics (computed on the copy as it is on disk) follow its units."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    rec = {"merge_method": method, "models": [fam["expert_0"], fam["expert_0_permuted"]], "align": "weight_matching",
           "data": {"path": fam["data"], "text": "q", "target": "a", "batch_size": 2}, "dtype": "float32"}
    got, want = _merged(tmp_path, rec), _weights(fam["expert_0"])
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5, rtol=1e-4), (k, (got[k] - want[k]).abs().max())
    unaligned = _merged(tmp_path, {k: v for k, v in rec.items() if k != "align"}, "unaligned")
    assert not all(torch.allclose(unaligned[k], want[k], atol=1e-3) for k in want)


# --------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------


def _fails(tmp_path, rec, *needles):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", str(path), str(out), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                            "EVOMERGE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    assert not out.exists()


def test_a_tensor_alignment_does_not_know_is_named(fam, tmp_path):
    import shutil

    odd = tmp_path / "odd"
    shutil.copytree(fam["expert_1"], odd)
    f = next(odd.glob("*.safetensors"))
    sd = load_file(str(f))
    sd["model.layers.0.mlp.adapter.weight"] = torch.zeros(4, 32)
    save_file(sd, str(f), metadata={"format": "pt"})
    before = f.read_bytes()
    _fails(tmp_path, {"merge_method": "weight_matching", "models": [str(odd), fam["expert_0"]]},
           f"model '{odd}'", "model.layers.0.mlp.adapter.weight", "permute")
    assert f.read_bytes() == before  # the input is left as it was


def test_a_model_of_no_known_layout_is_refused(tmp_path):
    for name in ("a", "b"):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": "mystery", "num_attention_heads": 2}))
        save_file({"encoder.block.0.w": torch.ones(4, 4)}, str(d / "model.safetensors"))
    _fails(tmp_path, {"merge_method": "weight_matching", "models": [str(tmp_path / "a"), str(tmp_path / "b")]},
           "model '", "mystery", "cannot be permuted")


def test_models_with_other_heads_are_refused(fam, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(fam["expert_1"], other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_attention_heads"], cfg["num_key_value_heads"] = 2, 1  # same shapes, 16-dim heads
    (other / "config.json").write_text(json.dumps(cfg))
    _fails(tmp_path, {"merge_method": "weight_matching", "models": [fam["expert_0"], str(other)]},
           f"model '{other}'", "layout of the reference")


@pytest.mark.parametrize("align,needle", [
    ({"method": "zip_it"}, "align.method: unknown alignment 'zip_it'"),
    ({"reference": "/nowhere/model"}, "align.reference: '/nowhere/model' is not one of the recipe's models"),
    ({"max_sweeps": 0}, "align.max_sweeps: expected a positive integer"),
    ({"seed": -1}, "align.seed"),
    ({"iterations": 5}, "iterations"),
])
def test_bad_align_entries_are_named(fam, align, needle):
    with pytest.raises(RecipeError, match="^") as e:
        parse_recipe({"merge_method": "ties", "base_model": fam["base"], "models": [fam["expert_0"]],
                      "parameters": {"weight": 1.0, "density": 0.5}, "align": align})
    assert needle in str(e.value)


# --------------------------------------------------------------------------------------
# Activation matching, and the merges that fit the merged model's own inputs (PLeaS, RegMean++)
# --------------------------------------------------------------------------------------


def _batches(n: int = 24, length: int = 14, seed: int = 0):
    """Random character strings of the test tokenizer: every token seen, so that every
    layer's inputs span their space."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 49, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, length - 4:] = 0  # some padding, which no statistic may read
    return [(ids[i:i + 8], mask[i:i + 8]) for i in range(0, n, 8)]


def test_correlation_is_pearsons_summed_batch_by_batch():
    import numpy as np

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randn(50, 4, generator=g, dtype=torch.float64)
    a = a * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64) + 5.0  # scales and offsets of their own
    want = np.corrcoef(a.numpy().T, b.numpy().T)[:3, 3:]
    assert np.allclose(A._correlation(a, b).numpy(), want, atol=1e-10)
    m = A._Moments()
    for i in range(0, 50, 7):
        m.add(a[i:i + 7], b[i:i + 7])
    assert np.allclose(m.correlation().numpy(), want, atol=1e-10)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "qwen3"])
def test_activation_matching_finds_a_hidden_permutation(name):
    model = _noisy(MODELS[name](), 7)
    lay, sd = _layout(model)
    twin = MODELS[name]()
    twin.load_state_dict({k: A.permute(lay, A.random_permutations(lay, 13), k, v) for k, v in sd.items()})
    batches = _batches()
    if name != "llama-gqa":  # a vocabulary of 50
        batches = [(ids.clamp(max=49), m) for ids, m in batches]
    perms = A.ActivationMatching()(lay, model, twin, batches)
    tw = twin.state_dict()
    for k in sd:
        assert torch.equal(A.permute(lay, perms, k, tw[k]), sd[k]), k


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def rich(tmp_path_factory):
    """Data over every character of the test tokenizer."""
    import random

    from evomerge.testing import CHARS

    rng = random.Random(0)
    chars = [c for c in CHARS if c != " "]
    return _jsonl(tmp_path_factory.mktemp("rich") / "rich.jsonl",
                  [{"q": "".join(rng.choice(chars) for _ in range(12))} for _ in range(40)])


def _aligned_live(folders, aligned_perms):
    live = []
    for f, perms in zip(folders, aligned_perms):
        m = AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval()
        if perms is not None:
            lay, sd = _layout(m)
            m.load_state_dict({k: A.permute(lay, perms, k, v) for k, v in sd.items()})
        live.append(m)
    return live


def _inputs(model, name, batches):
    """The inputs of the layer whose weight is ``name`` over the real tokens, from whole
    forward passes."""
    mod = dict(model.named_modules())[name[:-len(".weight")]]
    got, keep = [], []
    h = mod.register_forward_pre_hook(lambda m, a: got.append((a[0].reshape(-1, a[0].shape[-1]))))
    try:
        with torch.no_grad():
            for ids, mask in batches:
                model(input_ids=ids, attention_mask=mask)
                keep.append(mask.reshape(-1).bool())
    finally:
        h.remove()
    return torch.cat([x[k] for x, k in zip(got, keep)]).double()


def _wide_index(name: str):
    """(layer, role) of a Llama MLP weight: its layer writes ("out") or reads ("in") the units."""
    import re

    m = re.search(r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight$", name)
    return None if m is None else (int(m.group(1)), "in" if m.group(2) == "down_proj" else "out")


def _slow_sequential(method, folders, aligned_perms, data, weights, units=None):
    """The merged model built the slow way: every model's state permuted as the merge reads
    it, their weighted average, then each linear layer in forward order solved by least
    squares over inputs collected from whole forward passes. With ``units`` (``{layer:
    (merged, separate)}``, Llama only), the MLPs are partially merged: each model's own copy
    of the ``separate`` units sits after the merged ones, its rows fit to that model alone
    and its columns of the layer reading them starting at the model's share."""
    from transformers import AutoConfig

    from evomerge.merge.statistics import _linear_layers

    live = _aligned_live(folders, aligned_perms)
    states = [m.state_dict() for m in live]
    total = sum(weights)
    start = {k: sum(w * s[k].double() for w, s in zip(weights, states)).float() / total for k in states[0]}
    if units:
        config = AutoConfig.from_pretrained(folders[0])
        keep, sep = next(iter(units.values()))
        config.intermediate_size = len(keep) + len(live) * len(sep)
        merged = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        for k in start:
            where = _wide_index(k)
            if where is None:
                continue
            keep, sep = units[where[0]]
            if where[1] == "out":
                start[k] = torch.cat([start[k][keep]] + [s[k][sep] for s in states])
            else:
                start[k] = torch.cat([start[k][:, keep]] + [s[k][:, sep] * (w / total) for s, w in zip(states, weights)],
                                     dim=1)
    else:
        merged = AutoModelForCausalLM.from_pretrained(folders[0], dtype=torch.float32).eval()
    merged.load_state_dict(start)
    layers = _linear_layers(merged)
    stored = set(_weights(folders[0]))
    order = []
    hooks = [mod.register_forward_pre_hook(lambda mod, a, n=n: order.append(n) if n not in order else None)
             for n, mod in layers.items() if n in stored]
    with torch.no_grad():
        merged(input_ids=data[0][0][0][:1], attention_mask=data[0][0][1][:1])
    for h in hooks:
        h.remove()

    def lstsq(rows, ys):
        # (singular values below 1e-6 of the largest are the float32 forward passes' noise: cut)
        return torch.linalg.lstsq(torch.cat(rows), torch.cat(ys), rcond=1e-6, driver="gelsd").solution

    for name in order:
        conv = not isinstance(layers[name], torch.nn.Linear)
        rows, ys = [], []
        for m, batches, w in zip(live, data, weights):
            xm, x = _inputs(merged, name, batches), _inputs(m, name, batches)
            wk = dict(m.named_parameters())[name].double()
            wk = wk if conv else wk.T  # [in, out]
            s = math.sqrt(w / xm.shape[0])
            rows.append(xm * s)
            ys.append((x if method == "pleas" else xm) @ wk * s)
        where = _wide_index(name) if units else None
        if where is not None and where[1] == "out":  # merged outputs fit to all, each model's own to it alone
            keep, sep = units[where[0]]
            sol = torch.cat([lstsq(rows, [y[:, keep] for y in ys])]
                            + [lstsq([r], [y[:, sep]]) for r, y in zip(rows, ys)], dim=1)
        else:
            sol = lstsq(rows, ys)
        with torch.no_grad():
            dict(merged.named_parameters())[name].copy_(sol if conv else sol.T)
    return {k: v for k, v in merged.state_dict().items()}


def _qwen2_mixed():
    """Qwen2 with a sliding-window layer and a full-attention one: masks that differ by block."""
    from transformers import Qwen2Config

    torch.manual_seed(7)
    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True, sliding_window=3,
                      max_window_layers=1, layer_types=["full_attention", "sliding_attention", "full_attention"])
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2", "qwen2-mixed"])
def test_block_by_block_layer_inputs_equal_whole_forward_passes(name):
    """The sequential pass's inputs of each linear layer, from the kept inputs of its block
    (``_Blocks``), equal those of whole forward passes stopped at the layer, in forward order
    and again from the start; a model whose blocks take other masks runs whole passes."""
    from evomerge.merge.engine import _Blocks, _inputs_of_layer
    from evomerge.merge.statistics import _linear_layers

    model = _noisy({"llama-gqa": _llama, "gpt2": _gpt2,
                    "qwen2-mixed": _qwen2_mixed}[name](), 9)
    ids = torch.randint(0, 49, (6, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[3, 4:] = 0
    batches = [(ids[:3], mask[:3]), (ids[3:], mask[3:])]
    layers = _linear_layers(model)
    order = []
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: order.append(n) if n not in order else None)
             for n, m in layers.items()]
    with torch.no_grad():
        model(input_ids=ids[:1])
    for h in hooks:
        h.remove()
    runs = _Blocks(model, batches)
    with torch.no_grad():
        for names in (order, order[:3]):  # a second candidate starts again from the first block
            for n in names:
                got = list(runs.inputs(n, layers[n]))
                want = [_inputs_of_layer(lambda: model(input_ids=i, attention_mask=m, use_cache=False), layers[n], m)
                        for i, m in batches]
                assert len(got) == len(want) == 2
                assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, want)), n
    assert runs.alone is (name != "qwen2-mixed")


@pytest.mark.parametrize("method", ["pleas", "regmean_plus_plus"])
def test_sequential_merges_match_a_slow_reference(fam, rich, tmp_path, monkeypatch, method):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    models = [fam["expert_0"], fam["base_permuted"]]
    rec = {"merge_method": method, "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, (1.0, 2.0))],
           "data": {"path": str(rich), "text": "q", "batch_size": 8}, "dtype": "float32"}
    if method == "regmean_plus_plus":
        rec["parameters"] = {"alpha": 1.0}
    merger = Merger(parse_recipe(rec))
    got = load_file(str(next(merger.write(tmp_path / "out").glob("*.safetensors"))))
    perms = [merger._aligned[r].perms if r in merger._aligned else None for r in merger.recipe.referenced_models()]
    from evomerge.merge import statistics as S
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[0])
    batches = [b[:2] for b in S.examples(merger.recipe.data_for(merger.recipe.referenced_models()[0]), tok)]
    want = _slow_sequential(method, models, perms, [batches, batches], [1.0, 2.0])
    for k in got:
        assert torch.allclose(got[k], want[k], atol=2e-5, rtol=1e-4), (k, (got[k] - want[k]).abs().max())
    if method == "pleas":
        assert perms[0] is None and perms[1] is not None  # the second model aligned onto the first


def test_a_wider_pleas_matches_a_slow_reference(fam, rich, tmp_path, monkeypatch):
    """width 1.5 of two models: per layer the half of the MLP units whose matches correlate
    least kept apart, one copy from each model (the MLPs 1.5 times as wide), against the slow
    reference; the written config says the width, and transformers loads and runs it."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    models = [fam["expert_0"], fam["base_permuted"]]
    rec = {"merge_method": "pleas", "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(models, (1.0, 2.0))],
           "parameters": {"width": 1.5}, "data": {"path": str(rich), "text": "q", "batch_size": 8}, "dtype": "float32"}
    merger = Merger(parse_recipe(rec))
    out = merger.write(tmp_path / "out")
    got = load_file(str(next(out.glob("*.safetensors"))))
    perms = [merger._aligned[r].perms if r in merger._aligned else None for r in merger.recipe.referenced_models()]
    n = json.loads(Path(models[0], "config.json").read_text())["intermediate_size"]
    units = {}
    for layer in range(2):  # the half of the units whose matches correlate least, by the alignment's scores
        score = perms[1][f"{layer}.mlp:score"]
        order = sorted(range(n), key=lambda u: (float(score[u]), u))
        units[layer] = (torch.tensor(sorted(order[n // 2:])), torch.tensor(sorted(order[:n // 2])))
        assert float(score[units[layer][1]].max()) <= float(score[units[layer][0]].min())
    from evomerge.merge import statistics as S
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[0])
    batches = [b[:2] for b in S.examples(merger.recipe.data_for(merger.recipe.referenced_models()[0]), tok)]
    want = _slow_sequential("pleas", models, perms, [batches, batches], [1.0, 2.0], units=units)
    assert got["model.layers.0.mlp.up_proj.weight"].shape == (n // 2 + 2 * (n // 2), 32)
    for k in got:
        assert got[k].shape == want[k].shape, k
        assert torch.allclose(got[k], want[k], atol=2e-5, rtol=1e-4), (k, (got[k] - want[k]).abs().max())
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == n // 2 + 2 * (n // 2)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert bool(torch.isfinite(model(input_ids=_batches()[0][0]).logits).all())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_wider_pleas_of_a_model_and_its_relabeled_copy_computes_as_the_model(fam, words, rich, tmp_path,
                                                                               monkeypatch, family):
    """At width 2 every MLP unit of both copies is kept: the merge still computes as the
    model, on Llama and on GPT-2's Conv1D layers (whose MLP widens ``n_inner``)."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    if family == "llama":
        src, data = fam["expert_0"], {"path": str(rich), "text": "q"}
        copy = fam["expert_0_permuted"]
    else:
        src = str(next(iter(words.experts.values())))
        copy = str(_save_permuted(Path(src), tmp_path / "relabeled", 5))
        data = {"path": str(words.data[words.tasks[0]]["dev"]), "text": "question", "target": "target", "limit": 64}
    rec = {"merge_method": "pleas", "models": [src, copy], "parameters": {"width": 2.0}, "data": data,
           "dtype": "float32"}
    out = Merger(parse_recipe(rec)).write(tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    own = json.loads(Path(src, "config.json").read_text())
    key = "intermediate_size" if family == "llama" else "n_inner"
    assert cfg[key] == 2 * (own.get(key) or 4 * own.get("n_embd", 0))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    wide = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    if family == "llama":
        ids, mask = _batches()[0]
    else:  # (on the data's own inputs: its small vocabulary leaves other directions unfit)
        from evomerge.merge import statistics as S
        from transformers import AutoTokenizer

        ids, mask, _ = S.examples(parse_recipe(rec).data, AutoTokenizer.from_pretrained(src))[0]
    with torch.no_grad():
        a, b = (m(input_ids=ids, attention_mask=mask).logits for m in (model, wide))
    real = mask.bool()
    assert torch.allclose(a[real], b[real], atol=2e-4), float((a[real] - b[real]).abs().max())


def test_bad_widths_are_named(fam, rich, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    base = {"merge_method": "pleas", "models": [fam["expert_0"], fam["expert_1"]],
            "data": {"path": str(rich), "text": "q"}, "dtype": "float32"}
    with pytest.raises(RecipeError, match=r"width"):
        parse_recipe({**base, "parameters": {"width": 0.5}})
    _fails(tmp_path, {**base, "parameters": {"width": 3.0}}, "width 3.0: between 1", "the number of models, 2")
    _fails(tmp_path, {**base, "parameters": {"width": [1.0, 2.0]}}, "width sets the merged model's shape, one number")
    from evomerge.merge.engine import MergeError

    other = parse_recipe({**base, "parameters": {"width": 1.5}})
    with pytest.raises(MergeError, match=r"the candidate's width \[1.5\] is not the merge's \(1.0\)"):
        Merger(parse_recipe(base)).write(tmp_path / "other", other)
    assert not (tmp_path / "other").exists()


def test_pleas_of_a_model_and_its_relabeled_copy_computes_as_the_model(fam, rich, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    rec = {"merge_method": "pleas", "models": [fam["expert_0"], fam["expert_0_permuted"]],
           "data": {"path": str(rich), "text": "q"}, "dtype": "float32"}
    got = load_file(str(next(Merger(parse_recipe(rec)).write(tmp_path / "out").glob("*.safetensors"))))
    model = AutoModelForCausalLM.from_pretrained(fam["expert_0"], dtype=torch.float32).eval()
    ids = _batches()[0][0]
    assert torch.allclose(_logits(model, model.state_dict(), ids), _logits(model, {**model.state_dict(), **got}, ids),
                          atol=1e-4)
    plain = {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in rec["models"]],
             "dtype": "float32"}
    avg = load_file(str(next(Merger(parse_recipe(plain)).write(tmp_path / "avg").glob("*.safetensors"))))
    assert not torch.allclose(_logits(model, model.state_dict(), ids), _logits(model, {**model.state_dict(), **avg}, ids),
                              atol=1e-2)


def test_pleas_on_the_second_family(words, tmp_path, monkeypatch):
    """GPT-2's Conv1D layers ([in, out]), fused q/k/v, and its own data fields."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    experts = [str(p) for p in words.experts.values()]
    data = words.data[words.tasks[0]]["dev"]
    rec = {"merge_method": "pleas", "models": experts, "dtype": "float32",
           "data": {"path": str(data), "text": "question", "target": "target", "limit": 24, "batch_size": 8}}
    merger = Merger(parse_recipe(rec))
    got = load_file(str(next(merger.write(tmp_path / "out").glob("*.safetensors"))))
    from evomerge.merge import statistics as S
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(experts[0])
    batches = [b[:2] for b in S.examples(merger.recipe.data_for(merger.recipe.referenced_models()[0]), tok)]
    perms = [merger._aligned[r].perms if r in merger._aligned else None for r in merger.recipe.referenced_models()]
    # Its data leave some directions of the first layers' inputs unseen (a small vocabulary),
    # where least squares has no single answer: what must hold is that every linear layer
    # solves the normal equations on the inputs it sees in the merged model,
    # sum_k Xm_k^T (Xm_k W^T - X_k W_k^T) / n_k = 0, relative to sum_k Xm_k^T X_k W_k^T / n_k.
    live = _aligned_live(experts, perms)
    merged = AutoModelForCausalLM.from_pretrained(experts[0], dtype=torch.float32).eval()
    merged.load_state_dict({**merged.state_dict(), **got}, strict=False)
    checked = 0
    for name, mod in merged.named_modules():
        if type(mod).__name__ != "Conv1D":
            continue
        w = f"{name}.weight"
        resid = scale = 0
        for m in live:
            xm, x = _inputs(merged, w, batches), _inputs(m, w, batches)
            target = x @ dict(m.named_parameters())[w].detach().double()  # Conv1D: [in, out]
            resid = resid + xm.T @ (xm @ got[w].double() - target) / xm.shape[0]
            scale = scale + (xm.T @ target / xm.shape[0]).abs().max()
        assert float(resid.abs().max()) < 1e-4 * float(scale), (w, float(resid.abs().max()), float(scale))
        checked += 1
    assert checked == 4 * merged.config.n_layer  # q/k/v, attention output, MLP in and out


def test_data_aligners_and_merges_without_data_are_named(fam, tmp_path):
    _fails(tmp_path, {"merge_method": "pleas", "models": [fam["expert_0"], fam["expert_1"]]},
           "align (activation_matching) runs the models on data", "'data'")
    _fails(tmp_path, {"merge_method": "regmean_plus_plus", "models": [fam["expert_0"], fam["expert_1"]]},
           "merge_method 'regmean_plus_plus' reads data")


def test_a_second_candidate_is_measured_for_its_own_weights(fam, rich, tmp_path, monkeypatch):
    """One Merger writing two candidates of other weights gives each what a fresh Merger gives."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))

    def rec(w):
        return {"merge_method": "regmean_plus_plus", "dtype": "float32",
                "models": [{"model": fam["expert_0"], "parameters": {"weight": 1.0}},
                           {"model": fam["expert_1"], "parameters": {"weight": w}}],
                "data": {"path": str(rich), "text": "q", "batch_size": 8}}

    merger = Merger(parse_recipe(rec(1.0)))
    merger.write(tmp_path / "a")
    second = load_file(str(merger.write(tmp_path / "b", parse_recipe(rec(3.0))) / "model.safetensors"))
    fresh = load_file(str(Merger(parse_recipe(rec(3.0))).write(tmp_path / "c") / "model.safetensors"))
    first = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert all(torch.equal(second[k], fresh[k]) for k in fresh)
    assert not all(torch.equal(second[k], first[k]) for k in first)


def test_slices_across_layers_are_refused_where_layers_must_line_up(fam, tmp_path):
    rec = {"merge_method": "linear", "align": "weight_matching", "dtype": "float32",
           "slices": [{"sources": [{"model": fam["expert_0"], "layer_range": [0, 1], "parameters": {"weight": 1.0}},
                                   {"model": fam["expert_1"], "layer_range": [1, 2], "parameters": {"weight": 1.0}}]}]}
    _fails(tmp_path, rec, "align (weight_matching)", "layer 1 of model", "not supported")


def test_activation_matching_with_names_the_live_model_lacks_is_named():
    model = _noisy(_llama(), 2)
    sd = model.state_dict()
    lay = A.layout_of({f"outer.{k}": tuple(v.shape) for k, v in sd.items()}, model.config.to_dict())
    with pytest.raises(A.AlignError, match="do not carry the checkpoint's tensor names"):
        A.ActivationMatching()(lay, model, model, _batches()[:1])


def test_an_align_method_that_is_not_a_name_is_refused(fam):
    with pytest.raises(RecipeError, match="align.method: unknown alignment"):
        parse_recipe({"merge_method": "linear", "models": [{"model": fam["expert_0"], "parameters": {"weight": 1}}],
                      "align": {"method": ["weight_matching"]}})


def test_no_progress_means_no_bars_from_the_libraries_either(fam, rich, tmp_path):
    """``evomerge-merge --no-progress`` of a PLeaS merge (which loads models through
    transformers): nothing but what went wrong on stderr, no loading bars."""
    rec = {"merge_method": "pleas", "models": [fam["expert_0"], fam["expert_1"]],
           "data": {"path": str(rich), "text": "q"}, "dtype": "float32"}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", str(path), str(tmp_path / "out"), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                            "EVOMERGE_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert "Loading weights" not in r.stderr and "it/s]" not in r.stderr, r.stderr
