"""Statistics from data (the seam data-aware merges read): each checked against a slow
reference, on the Llama test family and on the GPT-2 word family; computed once and read
back from a cache keyed by statistic, model and data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.evaluate import build_evaluator
from evomerge.evaluate.entropy import encode_prompts
from evomerge.merge.statistics import (
    FisherDiagonal,
    GramMatrix,
    StatisticCache,
    TensorMap,
    _linear_layers,
    batches,
    compute,
    load_streamed,
    model_fingerprint,
)
from evomerge.testing import tiny_family

PROMPTS = ["rev:abc=", "srt:31=", "inc:5=", "rev:a=", "alt:abab=", "srt:9876=", "inc:42="]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("stats"), n_experts=2, layers=2, hidden=32)


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _padded(tok, prompts, size):
    return [encode_prompts(tok, prompts[i:i + size]) for i in range(0, len(prompts), size)]


def _gram_reference(model, tok, prompts):
    """Each prompt alone (no padding), its layers' inputs recorded, X^T X summed in float64."""
    layers = _linear_layers(model)
    seen = {n: [] for n in layers}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].reshape(-1, a[0].shape[-1])))
             for n, m in layers.items()]
    try:
        with torch.no_grad():
            for p in prompts:
                ids, _ = encode_prompts(tok, [p])
                model(input_ids=ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: sum(x.double().T @ x.double() for x in xs) for n, xs in seen.items()}, \
        {n: sum(x.shape[0] for x in xs) for n, xs in seen.items()}


def _check_gram(model, tok, prompts):
    got = GramMatrix()(model, _padded(tok, prompts, 3))
    want, tokens = _gram_reference(model, tok, prompts)
    assert set(want) and {k for k in got if ":" not in k} == set(want)
    conv1d = {n for n, m in _linear_layers(model).items() if not isinstance(m, torch.nn.Linear)}
    assert {n for n in want if int(got[f"{n}:in_first"])} == conv1d  # the weight's layout, [in, out]
    for n, g in want.items():
        assert got[n].dtype == torch.float64 and got[n].shape == g.shape
        # (a padded batch and a prompt alone differ in float32's last bits from the first layer on)
        assert float((got[n] - g).abs().max()) <= 1e-5 * float(g.abs().max()), n
        assert int(got[f"{n}:tokens"]) == tokens[n]
    return got


def test_gram_matrices_of_padded_batches_equal_each_prompt_alone(fam):
    model, tok = _load(fam["expert_0"])
    got = _check_gram(model, tok, PROMPTS)
    real = sum(len(encode_prompts(tok, [p])[0][0]) for p in PROMPTS)
    assert int(got["model.layers.0.mlp.down_proj.weight:tokens"]) == real  # padding never counted


def test_gram_matrices_on_gpt2_conv1d_layers_from_an_evaluators_inputs(words):
    """The word family (GPT-2: Conv1D layers, weight [in, out]; byte-level BPE with a BOS),
    its inputs taken through the evaluator seam."""
    model, tok = _load(words.base)
    data = {t: {"search": d["dev"], "test": d["test"]} for t, d in words.data.items()}
    ev = build_evaluator("exact_match", data=data, fields=words.fields, limit=4)
    prompts = ev.inputs("search")
    assert batches(ev, tok, "search", batch_size=5)[0][0].shape[0] == 5
    got = _check_gram(model, tok, prompts)
    n = model.config.n_embd
    assert int(got["transformer.h.0.attn.c_attn.weight:in_first"]) == 1
    assert got["transformer.h.0.attn.c_attn.weight"].shape == (n, n)
    assert got["transformer.h.0.mlp.c_proj.weight"].shape == (4 * n, 4 * n)


def test_fisher_is_the_mean_squared_gradient_of_each_sequences_log_likelihood(fam):
    model, tok = _load(fam["expert_1"])
    fisher = FisherDiagonal()
    got = fisher(model, _padded(tok, PROMPTS, 3))
    assert torch.equal(got["model.norm.weight"], fisher(model, _padded(tok, PROMPTS, 7))["model.norm.weight"])
    assert all(q.grad is None for q in model.parameters()) and not model.training  # nothing left behind
    # the reference: Hugging Face's own loss (mean token NLL) over each prompt alone
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for p in PROMPTS:
        ids, _ = encode_prompts(tok, [p])
        model.zero_grad()
        out = model(input_ids=ids, labels=ids, use_cache=False)
        (-out.loss * (ids.shape[1] - 1)).backward()
        for n, q in model.named_parameters():
            want[n] += q.grad.double() ** 2
    assert int(got["sequences"]) == len(PROMPTS)
    for n, w in want.items():
        w = w / len(PROMPTS)
        assert float((got[n] - w).abs().max()) <= 1e-4 * float(w.abs().max()), n


def test_a_targets_fisher_scores_only_its_tokens_on_gpt2(words, tmp_path):
    """A recipe's data with a target: the empirical Fisher of the target's tokens given the
    text, against Hugging Face's loss with the text's tokens masked out (-100), one record
    at a time; on the GPT-2 family (BOS added, no pad token, Conv1D layers)."""
    from evomerge.recipe import DataSpec
    from evomerge.merge.statistics import examples

    task = words.tasks[0]
    model, tok = _load(words.experts[task])
    path = words.data[task]["dev"]  # the family's own layout: its own field names
    q, a = words.fields["prompt"], words.fields["answer"]
    rows = [json.loads(line) for line in path.read_text().splitlines()[:5]]
    data = examples(DataSpec(str(path), text=q, target=a, limit=5, batch_size=2), tok)
    assert [b[0].shape[0] for b in data] == [2, 2, 1]
    got = FisherDiagonal()(model, data)
    want = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for r in rows:
        ctx = tok(r[q].rstrip())["input_ids"]
        whole = tok(r[q] + r[a])["input_ids"]
        ids = torch.tensor([whole])
        labels = ids.clone()
        labels[0, :len(ctx)] = -100
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, use_cache=False)
        (-out.loss * int((labels[0, 1:] != -100).sum())).backward()
        for n, p in model.named_parameters():
            want[n] += p.grad.double() ** 2
    for n, w in want.items():
        w = w / len(rows)
        assert float((got[n] - w).abs().max()) <= 1e-4 * float(w.abs().max()), n
    # without the target every token after the first is scored: another Fisher
    whole = FisherDiagonal()(model, examples(DataSpec(str(path), text=q, limit=5, batch_size=2), tok))
    name = "transformer.h.0.attn.c_attn.weight"
    assert not torch.allclose(whole[name], got[name])


def test_a_sampled_fisher_draws_its_labels_from_the_model(fam):
    """kind="sampled": each scored position's label drawn from the model's own prediction
    there, from a seed (a random model of the Llama family, whose predictions are spread)."""
    model, tok = _load(fam["expert_0"])
    data = _padded(tok, PROMPTS, 3)
    empirical = FisherDiagonal()(model, data)
    name = "model.layers.0.mlp.down_proj.weight"
    s1 = FisherDiagonal("sampled", seed=1)(model, data)
    assert torch.equal(s1[name], FisherDiagonal("sampled", seed=1)(model, data)[name])
    assert not torch.equal(s1[name], FisherDiagonal("sampled", seed=2)(model, data)[name])
    assert not torch.allclose(s1[name], empirical[name])
    assert FisherDiagonal("sampled", seed=1).settings() != FisherDiagonal("sampled", seed=2).settings()
    with pytest.raises(ValueError, match="kind"):
        FisherDiagonal("exact")


def test_data_files_that_cannot_be_read_are_named(fam, tmp_path):
    from evomerge.recipe import DataSpec
    from evomerge.merge.statistics import examples

    _, tok = _load(fam["expert_0"])
    p = tmp_path / "d.jsonl"
    cases = [
        ('{"q": "rev:ab="}\n[1, 2]\n', "d.jsonl:2 is a JSON list, not an object"),
        ('{"q": "rev:ab="}\n{"q": \n', "d.jsonl:2 is not JSON"),
        ('{"q": "rev:ab="}\n{"x": "a"}\n', "d.jsonl:2: no field 'q'"),
        ('{"q": ""}\n', "d.jsonl:1: field 'q' must be a non-empty string"),
        ('\n\n', "has no records"),
    ]
    for text, needle in cases:
        p.write_text(text)
        with pytest.raises(ValueError, match=needle.replace("[", r"\[")):
            examples(DataSpec(str(p), text="q"), tok)
    p.write_text('{"q": "rev:ab="}\n')
    with pytest.raises(ValueError, match="no field 'a'"):
        examples(DataSpec(str(p), text="q", target="a"), tok)
    with pytest.raises(ValueError, match="not found"):
        examples(DataSpec(str(tmp_path / "none.jsonl"), text="q"), tok)
    # limit: the first records only
    p.write_text("".join(json.dumps({"q": f"rev:{c}="}) + "\n" for c in "abcdef"))
    assert sum(b[0].shape[0] for b in examples(DataSpec(str(p), text="q", limit=4, batch_size=3), tok)) == 4


def test_a_statistic_is_computed_once_and_then_read_from_its_cache(fam, tmp_path):
    model, tok = _load(fam["expert_0"])
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    cache = StatisticCache(tmp_path / "cache")
    key = model_fingerprint(fam["expert_0"])
    data = _padded(tok, PROMPTS, 4)
    first = compute(GramMatrix(), model, data, cache=cache, model_key=key)
    n = len(calls)
    assert n == 2  # two batches, one pass each
    again = compute(GramMatrix(), model, data, cache=cache, model_key=key)
    assert len(calls) == n and set(again) == set(first)
    assert all(torch.equal(again[k], first[k]) for k in first)
    # only safetensors and JSON on disk: nothing is read back through pickle
    files = {p.suffix for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert files == {".safetensors", ".json"}
    (entry,) = (tmp_path / "cache").iterdir()
    assert json.loads((entry / "record.json").read_text())["statistic"] == "gram"
    # other data, another model, other settings: computed anew
    compute(GramMatrix(), model, _padded(tok, PROMPTS[:3], 4), cache=cache, model_key=key)
    assert len(calls) == n + 1
    compute(GramMatrix(), model, data, cache=cache, model_key=model_fingerprint(fam["expert_1"]))
    assert len(calls) == n + 3
    compute(GramMatrix(dtype=torch.float32), model, data, cache=cache, model_key=key)
    assert len(calls) == n + 5
    # the same checkpoint run in another precision gives other values: another entry
    half = AutoModelForCausalLM.from_pretrained(fam["expert_0"], dtype=torch.bfloat16).eval()
    half_calls = []
    half.register_forward_hook(lambda *a: half_calls.append(1))
    compute(GramMatrix(), half, data, cache=cache, model_key=key)
    assert len(half_calls) == 2
    # a damaged entry is a miss: made again, and repaired
    (entry / "values.safetensors").write_bytes(b"not a safetensors file")
    repaired = compute(GramMatrix(), model, data, cache=cache, model_key=key)
    assert len(calls) == n + 7 and all(torch.equal(repaired[k], first[k]) for k in first)
    compute(GramMatrix(), model, data, cache=cache, model_key=key)
    assert len(calls) == n + 7
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_a_rewritten_checkpoint_gets_a_new_fingerprint(fam, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "m"
    shutil.copytree(fam["expert_0"], copy)
    before = model_fingerprint(copy)
    assert model_fingerprint(copy) == before
    w = load_file(copy / "model.safetensors")
    w["model.norm.weight"] = w["model.norm.weight"] + 1
    save_file(w, copy / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(copy) != before
    with pytest.raises(ValueError, match="no weight files"):
        model_fingerprint(tmp_path)


# --------------------------------------------------------------------------------------
# Streamed models and statistics read tensor by tensor
# --------------------------------------------------------------------------------------


def _streamed_family(fam, words, which):
    if which == "llama":
        folder = fam["expert_0"]
        tok = AutoTokenizer.from_pretrained(folder)
        return folder, _padded(tok, PROMPTS, 4)
    folder = next(iter(words.experts.values()))
    tok = AutoTokenizer.from_pretrained(folder)
    return folder, _padded(tok, ["reverse: stone ->", "upper: cat ->", "count: a b c ->"], 2)


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_a_streamed_model_holds_one_blocks_weights_and_computes_what_the_whole_one_does(fam, words, which):
    """``load_streamed``: the same logits and Gram matrices as the model loaded whole, and
    inside any block's layers every other block's weights are gone."""
    folder, data = _streamed_family(fam, words, which)
    whole = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    streamed = load_streamed(folder)
    params = dict(streamed.named_parameters())
    blocks = {n for n in params if ".h." in n or ".layers." in n}
    assert blocks and all(params[n].numel() == 0 for n in blocks)  # nothing of a block held before a pass
    held = []

    def seen(module, args):
        held.append({n.split(".h.")[-1].split(".layers.")[-1].split(".")[0] for n in blocks if params[n].numel()})

    hooks = [m.register_forward_pre_hook(seen) for m in _linear_layers(streamed).values()]
    with torch.no_grad():
        for ids, mask in data:
            a = whole(input_ids=ids, attention_mask=mask).logits
            b = streamed(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(a, b)
    for h in hooks:
        h.remove()
    assert held and all(len(h) <= 1 for h in held), held  # one block's weights at a time (none at the head)
    assert all(params[n].numel() == 0 for n in blocks)
    ga, gb = GramMatrix()(whole, data), GramMatrix()(streamed, data)
    assert set(ga) == set(gb) and all(torch.equal(ga[k], gb[k]) for k in ga)


def test_a_checkpoint_named_otherwise_than_its_model_is_loaded_whole(words, tmp_path):
    """GPT-2 weights saved without the ``transformer.`` prefix (as old checkpoints are):
    transformers maps them; the streamed loader, which reads by the model's own names,
    falls back to the whole model, which computes the same."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = Path(next(iter(words.experts.values())))
    dst = tmp_path / "legacy"
    shutil.copytree(src, dst)
    f = next(dst.glob("*.safetensors"))
    save_file({k.removeprefix("transformer."): v for k, v in load_file(str(f)).items()}, str(f),
              metadata={"format": "pt"})
    model = load_streamed(dst)
    assert all(p.numel() > 0 for p in model.parameters())  # whole
    ids = torch.tensor([[3, 5, 7, 11]])
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_cached_statistics_come_back_read_tensor_by_tensor(fam, tmp_path):
    """``compute(..., lazy=True)`` hands back a ``TensorMap`` over the cache's file (the
    values computed are written, then read back so), equal to the values computed; without
    a cache to write to, the values themselves."""
    model, tok = _load(fam["expert_0"])
    data = _padded(tok, PROMPTS, 4)
    key = model_fingerprint(fam["expert_0"])
    want = compute(GramMatrix(), model, data)
    for _ in range(2):  # computed, then a hit
        got = compute(GramMatrix(), model, data, cache=StatisticCache(tmp_path / "c"), model_key=key, lazy=True)
        assert isinstance(got, TensorMap) and set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(KeyError):
        got["no.such.weight"]
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache's folder would be")
    with pytest.warns(UserWarning, match="cannot be written"):
        kept = compute(GramMatrix(), model, data, cache=StatisticCache(blocked / "c"), model_key=key, lazy=True)
    assert isinstance(kept, dict) and all(torch.equal(kept[k], want[k]) for k in want)


def test_a_block_by_block_pass_reads_each_streamed_blocks_weights_once(fam, monkeypatch):
    """The sequential pass over a streamed model (``_Blocks``): within a block its layers'
    passes stop inside it, and moving on passes every batch through it, with the weights
    read once; each block's weights are let go as the pass moves on."""
    from collections import Counter

    from evomerge.checkpoint import Checkpoint
    from evomerge.merge.engine import _Blocks

    folder = fam["expert_0"]
    data = _padded(AutoTokenizer.from_pretrained(folder), PROMPTS, 3)
    reads: Counter = Counter()
    get = Checkpoint.get
    monkeypatch.setattr(Checkpoint, "get", lambda self, n, *a, **k: (reads.update([n]), get(self, n, *a, **k))[1])
    model = load_streamed(folder)
    reads.clear()
    layers = {n: m for n, m in _linear_layers(model).items() if ".layers." in n}  # (the head: a whole pass)
    params = dict(model.named_parameters())
    runs = _Blocks(model, data)
    with torch.no_grad():
        for n, m in layers.items():  # (nn.Module order is forward order here)
            assert len(list(runs.inputs(n, m))) == len(data) == 3
    blocks = [n for n in params if ".layers." in n]
    assert {n: reads[n] for n in blocks} == {n: 1 for n in blocks}
    assert all(params[n].numel() == 0 for n in blocks if ".layers.0." in n)  # moved on past block 0: gone


def test_pickled_weights_are_loaded_whole(fam, tmp_path):
    """A folder of pickled weights (accepted by a merge with --allow-pickle) is not read
    block by block: transformers loads it whole, and it computes the same."""
    import shutil

    from safetensors.torch import load_file

    src = Path(fam["expert_0"])
    dst = tmp_path / "pickled"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors*"))
    torch.save(load_file(str(next(src.glob("*.safetensors")))), dst / "pytorch_model.bin")
    model = load_streamed(dst)
    assert all(p.numel() > 0 for p in model.parameters())
    ids = torch.tensor([[3, 5, 7, 11, 13]])
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref(input_ids=ids).logits)
