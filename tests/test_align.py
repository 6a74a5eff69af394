"""Permutation alignment (weight matching): permuted models compute what the originals do
(Llama with grouped-query attention, biases and tied embeddings, Qwen2, Qwen3 and the GPT-2
word family), weight matching finds a hidden permutation and each of its steps is the best
permutation of its group (against brute force), alignment as a step before any method
(statistics permuted alike), its cache, and bad inputs."""

from __future__ import annotations

import itertools
import json
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
