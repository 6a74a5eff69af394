"""Merges that read data (Fisher-weighted averaging, RegMean) from a recipe's ``data``: the
recipe's schema, the merged weights against the formulas on independently computed
statistics (RegMean against the least-squares solution on the layers' own inputs), on the
Llama test family and on the GPT-2 word family, the statistics' cache, and bad inputs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.cli import merge_main
from evomerge.merge import statistics as S
from evomerge.merge.engine import Merger, MergeError
from evomerge.recipe import DataSpec, RecipeError, parse_recipe
from evomerge.testing import tiny_family

ROWS = [("rev:abc=", "cba"), ("srt:31=", "13"), ("inc:5=", "6"), ("rev:ab=", "ba"), ("alt:abab=", "baba")]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("datafam")
    paths = {k: str(v) for k, v in tiny_family(root, n_experts=2, layers=2, hidden=32).items()}
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in ROWS))
    paths["data"] = str(data)
    return paths


def _recipe(fam, method, **extra):
    return {"merge_method": method, "models": [{"model": fam["expert_0"]}, {"model": fam["expert_1"]}],
            "data": {"path": fam["data"], "text": "q", "target": "a", "batch_size": 2}, "dtype": "float32", **extra}


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


def _write(tmp_path, rec, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(rec, sort_keys=False))
    return str(p)


# --------------------------------------------------------------------------------------
# The recipe's data
# --------------------------------------------------------------------------------------


def test_data_is_given_at_the_top_and_overridden_per_model(fam):
    rec = _recipe(fam, "fisher")
    rec["models"][1]["data"] = {"path": "other.jsonl", "limit": 8}
    r = parse_recipe(rec)
    top = DataSpec(fam["data"], text="q", target="a", limit=256, batch_size=2)
    assert r.data == top
    (m0, m1) = [s.model for s in r.slices[0].sources]
    assert r.data_for(m0) == top
    assert r.data_for(m1) == DataSpec("other.jsonl", text="q", target="a", limit=8, batch_size=2)
    # what mergekit's schema lacks is written back only when used
    assert "data" not in parse_recipe({"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}]}).raw


@pytest.mark.parametrize("data,needle", [
    ({"path": "x.jsonl", "txt": "q"}, "data: unknown key(s) 'txt'"),
    ({"path": 3}, "data.path: expected the path"),
    ({"path": "x.jsonl", "limit": 0}, "data.limit: expected a positive integer"),
    ({"path": "x.jsonl", "batch_size": True}, "data.batch_size: expected a positive integer"),
    ({"path": "x.jsonl", "target": 3}, "data.target: expected a field name"),
    ("x.jsonl", "data: expected a mapping"),
    ({"path": "x.jsonl", "fisher": "exact"}, "data.fisher: expected 'empirical' (the data's tokens) or 'sampled'"),
    ({"path": "x.jsonl", "dataset": "org/set"}, "give either 'path' (a JSON-lines file) or 'dataset'"),
    ({"path": "x.jsonl", "subset": "en"}, "data.subset: only a 'dataset' has a subset"),
    ({"path": "x.jsonl", "split": "train"}, "data.split: only a 'dataset' has a split"),
    ({"dataset": ""}, "data.dataset: expected a dataset's hub id or local folder"),
    ({"dataset": "org/set", "split": 3}, "data.split: expected a name"),
])
def test_bad_data_entries_are_named(fam, data, needle):
    rec = _recipe(fam, "fisher")
    rec["data"] = data
    with pytest.raises(RecipeError) as e:
        parse_recipe(rec)
    assert needle in str(e.value)


def test_a_top_level_without_a_path_leaves_it_to_each_model(fam, tmp_path):
    rec = _recipe(fam, "fisher")
    del rec["data"]["path"]
    rec["models"][0]["data"] = {"path": fam["data"]}
    r = parse_recipe(rec)
    (m0, m1) = [s.model for s in r.slices[0].sources]
    assert r.data_for(m0) == DataSpec(fam["data"], text="q", target="a", batch_size=2)
    assert r.data_for(m1) is None
    with pytest.raises(MergeError, match=f"reads data: give the recipe a 'data' entry with a 'path'.*{m1}"):
        Merger(r).write(tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(RecipeError, match=r"models\[0\]\.data\.path"):
        rec["models"][0]["data"] = {"limit": 3}
        parse_recipe(rec)


def test_a_model_entry_with_a_path_takes_none_of_the_top_levels_dataset_keys(fam):
    rec = _recipe(fam, "fisher")
    rec["data"] = {"dataset": "org/set", "subset": "en", "split": "validation", "text": "q"}
    rec["models"][1]["data"] = {"path": "own.jsonl"}
    r = parse_recipe(rec)
    (m0, m1) = [s.model for s in r.slices[0].sources]
    assert r.data_for(m0) == DataSpec(None, text="q", dataset="org/set", subset="en", split="validation")
    assert r.data_for(m1) == DataSpec("own.jsonl", text="q")
    assert r.data_for(m1).describe() == "data file 'own.jsonl'"
    assert r.data_for(m0).describe() == "dataset 'org/set', subset 'en', split 'validation'"


def _dataset_folder(tmp_path, rows, split="validation"):
    """A local ``datasets`` folder: a training file of other rows, and ``split``'s file."""
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"q": "inc:1=", "a": "2"}) + "\n")
    (folder / f"{split}.jsonl").write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in rows))
    return folder


def test_data_from_a_datasets_folder_gives_the_merge_of_the_same_rows_in_a_file(fam, tmp_path, monkeypatch):
    """``data: {dataset: FOLDER, split: validation}`` reads the split's rows (streamed, the
    first ``limit``) and gives the weights the same rows in a JSON-lines file give."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    folder = _dataset_folder(tmp_path, ROWS + [("rev:zz=", "zz")])
    rec = _recipe(fam, "regmean")
    rec["data"] = {"path": fam["data"], "text": "q", "target": "a", "batch_size": 2, "limit": len(ROWS)}
    from_file = load_file(str(Merger(parse_recipe(rec)).write(tmp_path / "file") / "model.safetensors"))
    rec["data"] = {"dataset": str(folder), "split": "validation", "text": "q", "target": "a", "batch_size": 2,
                   "limit": len(ROWS)}
    r = parse_recipe(rec)
    batches = S.examples(r.data, AutoTokenizer.from_pretrained(fam["expert_0"]))
    assert sum(int(b[0].shape[0]) for b in batches) == len(ROWS)  # the limit, and not the training split's row
    from_set = load_file(str(Merger(r).write(tmp_path / "set") / "model.safetensors"))
    assert from_file.keys() == from_set.keys()
    assert all(torch.equal(from_file[k], from_set[k]) for k in from_file)
    # another split of the folder is other data: other weights
    rec["data"]["split"] = "train"
    other = load_file(str(Merger(parse_recipe(rec)).write(tmp_path / "train") / "model.safetensors"))
    assert any(not torch.equal(other[k], from_set[k]) for k in other)


@pytest.mark.parametrize("change,needles", [
    ({"split": "bogus"}, ["split 'bogus'", "Bad split"]),
    ({"dataset": "no-such-org/no-such-set"}, ["dataset 'no-such-org/no-such-set'", "cannot be read"]),
    ({"text": "question"}, ["row 0: no field 'question'"]),
])
def test_a_dataset_that_cannot_be_read_names_it(fam, tmp_path, change, needles):
    folder = _dataset_folder(tmp_path, ROWS)
    rec = _recipe(fam, "fisher")
    rec["data"] = {"dataset": str(folder), "split": "validation", "text": "q", "target": "a", **change}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "EVOMERGE_CACHE": str(tmp_path / "c")}
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", _write(tmp_path, rec), str(out), "--no-progress"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert all(n in last for n in needles), last
    assert not out.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["train.jsonl", "validation.jsonl"]  # the input untouched


def test_a_model_listed_twice_with_other_data_is_refused(fam):
    rec = _recipe(fam, "fisher")
    rec["models"] = [{"model": fam["expert_0"], "data": {"path": "a.jsonl"}},
                     {"model": fam["expert_0"], "data": {"path": "b.jsonl"}}]
    with pytest.raises(RecipeError, match=r"models\[1\]\.data: model .* listed again with other data"):
        parse_recipe(rec)


# --------------------------------------------------------------------------------------
# Fisher-weighted averaging
# --------------------------------------------------------------------------------------


def test_fisher_merge_weighs_each_entry_by_each_models_fisher(fam, tmp_path, monkeypatch):
    """The written weights are sum_k w_k F_k theta_k / sum_k w_k F_k with F_k computed here
    from the same data, independently of the merge; a second merge reads the statistics
    from the cache and computes none."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    rec = _recipe(fam, "fisher", parameters={"floor": 1e-10})
    rec["models"][0]["parameters"] = {"weight": 2.0}
    other = tmp_path / "other.jsonl"  # the second model on data of its own
    other.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in [("inc:17=", "18"), ("srt:5213=", "1235")]))
    rec["models"][1]["data"] = {"path": str(other)}
    out = Merger(parse_recipe(rec)).write(tmp_path / "out")
    merged = load_file(str(out / "model.safetensors"))
    specs = [DataSpec(fam["data"], text="q", target="a", batch_size=2),
             DataSpec(str(other), text="q", target="a", batch_size=2)]
    fishers, weights = [], []
    for i in range(2):
        model, tok = _load(fam[f"expert_{i}"])
        fishers.append(S.FisherDiagonal()(model, S.examples(specs[i], tok)))
        weights.append(load_file(str(Path(fam[f"expert_{i}"]) / "model.safetensors")))
    checked = 0
    for name, got in merged.items():
        if name not in fishers[0]:
            continue  # a tied head: named once in the live model
        f0, f1 = (f[name].clamp(min=1e-10) for f in fishers)
        want = (2 * f0 * weights[0][name].double() + f1 * weights[1][name].double()) / (2 * f0 + f1)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6), name
        checked += 1
    assert checked >= 15
    # where the Fishers differ the result is not the weighted average
    name = "model.layers.1.mlp.down_proj.weight"
    avg = (2 * weights[0][name] + weights[1][name]) / 3
    assert not torch.allclose(merged[name], avg, atol=1e-4)
    # the second merge takes the statistics from the cache
    monkeypatch.setattr(S.FisherDiagonal, "__call__", lambda *a, **k: pytest.fail("computed again"))
    again = Merger(parse_recipe(rec)).write(tmp_path / "again")
    assert all(torch.equal(a, b) for a, b in zip(load_file(str(again / "model.safetensors")).values(),
                                                  merged.values()))
    assert {p.suffix for p in (tmp_path / "cache" / "statistics").rglob("*") if p.is_file()} == {".json",
                                                                                                ".safetensors"}


def test_a_sampled_fisher_is_asked_for_in_the_data_entry(fam, tmp_path, monkeypatch):
    """``data.fisher: sampled`` weighs by the Fisher of tokens drawn from each model's own
    predictions (computed here independently), not the data's tokens; both are cached apart."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    rec = _recipe(fam, "fisher", parameters={"floor": 1e-10})
    rec["data"]["fisher"] = "sampled"
    merged = load_file(str(Merger(parse_recipe(rec)).write(tmp_path / "sampled") / "model.safetensors"))
    spec = DataSpec(fam["data"], text="q", target="a", batch_size=2)
    fishers, weights = [], []
    for i in range(2):
        model, tok = _load(fam[f"expert_{i}"])
        fishers.append(S.FisherDiagonal(kind="sampled")(model, S.examples(spec, tok)))
        weights.append(load_file(str(Path(fam[f"expert_{i}"]) / "model.safetensors")))
    name = "model.layers.1.mlp.down_proj.weight"
    f0, f1 = (f[name].clamp(min=1e-10) for f in fishers)
    want = (f0 * weights[0][name].double() + f1 * weights[1][name].double()) / (f0 + f1)
    assert torch.allclose(merged[name].double(), want, rtol=1e-5, atol=1e-6)
    rec["data"]["fisher"] = "empirical"
    empirical = load_file(str(Merger(parse_recipe(rec)).write(tmp_path / "empirical") / "model.safetensors"))
    assert not torch.allclose(empirical[name], merged[name], atol=1e-6)
    assert len([d for d in (tmp_path / "cache" / "statistics").iterdir() if d.is_dir()]) == 4


# --------------------------------------------------------------------------------------
# RegMean
# --------------------------------------------------------------------------------------


def _layer_inputs(model, tok, spec, layer):
    """The inputs ``layer`` sees over every real token of the data, one record at a time
    (no padding), recorded by a hook of this test's own."""
    seen = []
    h = layer.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    try:
        with torch.no_grad():
            for ids, mask, _ in S.examples(DataSpec(spec.path, spec.text, spec.target, spec.limit, 1), tok):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
    finally:
        h.remove()
    return torch.cat(seen)


def test_regmean_solves_the_least_squares_problem_on_gpt2_layer_inputs(words, tmp_path, monkeypatch):
    """On the GPT-2 family (Conv1D layers, weight [in, out]; each expert's own task data in
    the family's own field names): a merged linear weight W minimises sum_k ||X_k W - X_k
    W_k||^2 / n_k over the n_k inputs X_k the layer sees on expert k's data (alpha = 1; the
    two experts given 24 and 6 records), as a least-squares solve of the stacked system gives
    it; every other tensor is the average."""
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    tasks = words.tasks[:2]
    q, a = words.fields["prompt"], words.fields["answer"]
    limits = {tasks[0]: 24, tasks[1]: 6}  # other amounts of data: each Gram is per token
    rec = {"merge_method": "regmean", "parameters": {"alpha": 1.0}, "dtype": "float32",
           "models": [{"model": str(words.experts[t]),
                       "data": {"path": str(words.data[t]["dev"]), "text": q, "target": a, "limit": limits[t]}}
                      for t in tasks]}
    out = tmp_path / "out"
    assert merge_main([_write(tmp_path, rec), str(out), "--no-progress"]) == 0
    merged = load_file(str(out / "model.safetensors"))
    name = "transformer.h.1.mlp.c_fc.weight"
    xs, ws = [], []
    for t in tasks:
        model, tok = _load(words.experts[t])
        spec = DataSpec(str(words.data[t]["dev"]), q, a, limits[t], 16)
        xs.append(_layer_inputs(model, tok, spec, model.transformer.h[1].mlp.c_fc))
        ws.append(dict(model.named_parameters())[name].detach().double())
    stacked = torch.cat([x / math.sqrt(x.shape[0]) for x in xs])
    target = torch.cat([x @ w / math.sqrt(x.shape[0]) for x, w in zip(xs, ws)])
    want = torch.linalg.lstsq(stacked, target).solution
    got = merged[name].double()
    assert torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    assert not torch.allclose(got, (ws[0] + ws[1]) / 2, atol=1e-4)
    for other in ("transformer.h.1.ln_1.weight", "transformer.wte.weight", "transformer.h.1.mlp.c_fc.bias"):
        w0, w1 = (load_file(str(Path(words.experts[t]) / "model.safetensors"))[other].double() for t in tasks)
        assert torch.allclose(merged[other].double(), (w0 + w1) / 2, atol=1e-6), other


# --------------------------------------------------------------------------------------
# Bad inputs, from the command line
# --------------------------------------------------------------------------------------


def _fails(tmp_path, rec, *needles):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", _write(tmp_path, rec), str(out), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_no_data_is_a_clear_error(fam, tmp_path):
    rec = _recipe(fam, "regmean")
    del rec["data"]
    _fails(tmp_path, rec, "merge_method 'regmean' reads data", "'data'")


def test_a_missing_data_file_names_the_model_and_the_file(fam, tmp_path):
    rec = _recipe(fam, "fisher")
    rec["models"][1]["data"] = {"path": str(tmp_path / "missing.jsonl")}
    _fails(tmp_path, rec, f"model '{fam['expert_1']}'", "missing.jsonl", "not found")


def test_a_data_field_that_is_not_there_names_the_line(fam, tmp_path):
    rec = _recipe(fam, "fisher")
    rec["data"]["target"] = "answer"
    _fails(tmp_path, rec, "train.jsonl:1: no field 'answer'")


def test_data_too_short_to_score_is_refused(fam, tmp_path):
    """Texts of one token and no target: nothing for a Fisher to score."""
    p = tmp_path / "short.jsonl"
    p.write_text("".join(json.dumps({"q": c}) + "\n" for c in "abc"))
    rec = _recipe(fam, "fisher")
    rec["data"] = {"path": str(p), "text": "q"}
    _fails(tmp_path, rec, "no sequence with a token to score")


def test_regmean_with_fewer_tokens_than_inputs_gives_the_minimum_norm_solution():
    """alpha = 1 and fewer tokens than the layer has inputs: sum G is singular; the merge is
    the least-squares solution of least norm, not values blown up by rounding."""
    from evomerge.merge.methods import regmean

    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(3, 8, generator=g, dtype=torch.float64) for _ in range(2)]  # 6 rows, 8 inputs
    ws = [torch.randn(5, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    grams = [(x.T @ x / 3, False) for x in xs]
    got = regmean(None, ws, alpha=1.0, statistics={"gram": grams})
    a = torch.cat([x / math.sqrt(3) for x in xs])
    y = torch.cat([x @ w.T / math.sqrt(3) for x, w in zip(xs, ws)])
    want = (torch.linalg.pinv(a) @ y).T
    assert float(got.abs().max()) < 10 * float(want.abs().max())
    assert torch.allclose(got, want, atol=1e-5)


def test_regmean_refuses_weights_that_sum_to_zero():
    from evomerge.merge.methods import regmean

    w = torch.ones(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="sum to zero"):
        regmean(None, [w, w], weight=[0.0, 0.0], statistics={"gram": [(torch.eye(2), False)] * 2})


def test_a_record_longer_than_the_model_takes_is_named(words, tmp_path):
    """The GPT-2 family takes 64 positions: a longer record is an error naming its line,
    exit 2, nothing written."""
    p = tmp_path / "long.jsonl"
    p.write_text(json.dumps({"q": "a b"}) + "\n" + json.dumps({"q": " ".join(["alpha"] * 80)}) + "\n")
    rec = {"merge_method": "fisher", "models": [{"model": str(m)} for m in list(words.experts.values())[:2]],
           "data": {"path": str(p), "text": "q"}}
    _fails(tmp_path, rec, "long.jsonl:2:", "more than the model's 64 positions")


def _without_tokenizer(src, dst: Path) -> Path:
    """A copy of a model folder with its tokenizer files removed."""
    import shutil

    shutil.copytree(src, dst)
    for f in dst.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            f.unlink()
    return dst


def test_a_model_without_a_tokenizer_takes_the_reference_models(fam, tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    bare = _without_tokenizer(fam["expert_1"], tmp_path / "bare")
    rec = _recipe(fam, "regmean")
    rec["models"][1]["model"] = str(bare)
    out = Merger(parse_recipe(rec)).write(tmp_path / "out")
    with_own = Merger(parse_recipe(_recipe(fam, "regmean"))).write(tmp_path / "own")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(with_own / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same tokenizer, so the same statistics


def test_a_data_file_that_is_not_utf8_is_named(fam, tmp_path):
    p = tmp_path / "latin.jsonl"
    p.write_bytes(b'{"q": "rev:ab="}\n{"q": "caf\xe9"}\n')
    rec = _recipe(fam, "fisher")
    rec["data"] = {"path": str(p), "text": "q"}
    _fails(tmp_path, rec, "latin.jsonl:2 is not UTF-8")


def test_data_given_to_a_method_that_reads_none_is_warned_about(fam):
    with pytest.warns(UserWarning, match="reads no data"):
        parse_recipe({"merge_method": "linear", "models": [{"model": fam["expert_0"]}, {"model": fam["expert_1"]}],
                      "data": {"path": fam["data"]}})


def test_an_output_over_the_data_is_refused_and_the_data_stays(fam, tmp_path):
    """The data files are inputs: --overwrite of the folder that holds one, or of the file
    itself, is refused (it would have replaced the data with the merged model)."""
    folder = tmp_path / "data"
    folder.mkdir()
    data = folder / "d.jsonl"
    data.write_bytes(Path(fam["data"]).read_bytes())
    before = data.read_bytes()
    rec = _recipe(fam, "fisher")
    rec["data"]["path"] = str(data)
    rfile = _write(tmp_path, rec)
    for out in (folder, data):
        r = subprocess.run([sys.executable, "-m", "evomerge.cli", rfile, str(out), "--no-progress", "--overwrite"],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 2 and "data file of model" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert data.read_bytes() == before


def test_an_output_over_a_local_dataset_folder_is_refused_and_the_data_stays(fam, tmp_path):
    folder = _dataset_folder(tmp_path, ROWS)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    rec = _recipe(fam, "fisher")
    rec["data"] = {"dataset": str(folder), "split": "validation", "text": "q", "target": "a"}
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", _write(tmp_path, rec), str(folder), "--no-progress",
                        "--overwrite"], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r.returncode == 2 and "dataset folder of model" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_cache_that_cannot_be_written_is_warned_about_and_the_merge_goes_on(fam, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache would go")
    monkeypatch.setenv("EVOMERGE_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="cannot be written"):
        out = Merger(parse_recipe(_recipe(fam, "fisher"))).write(tmp_path / "out")
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    again = Merger(parse_recipe(_recipe(fam, "fisher"))).write(tmp_path / "again")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_cached_statistic_changed_on_disk_is_made_again(fam, tmp_path, monkeypatch):
    """Values that still load but are not those written (negated here) fail the entry's
    digest: the statistic is computed again and the merge is the fresh one's."""
    from safetensors.torch import save_file

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    first = load_file(str(Merger(parse_recipe(_recipe(fam, "fisher"))).write(tmp_path / "out") / "model.safetensors"))
    for entry in (tmp_path / "cache" / "statistics").iterdir():
        vals = load_file(str(entry / "values.safetensors"))
        save_file({k: -v if v.is_floating_point() else v for k, v in vals.items()}, str(entry / "values.safetensors"))
    again = load_file(str(Merger(parse_recipe(_recipe(fam, "fisher"))).write(tmp_path / "again") / "model.safetensors"))
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_copies_with_the_same_names_sizes_and_times_have_their_own_statistics(fam, tmp_path):
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(fam["expert_0"], a)
    shutil.copytree(fam["expert_1"], b)
    for f in [*a.iterdir(), *b.iterdir()]:
        os.utime(f, ns=(1_700_000_000_000_000_000, 1_700_000_000_000_000_000))
    assert S.model_fingerprint(a) == S.model_fingerprint(b)  # what the quick key sees: alike
    assert S.model_fingerprint(a, contents=True) != S.model_fingerprint(b, contents=True)


def test_fisher_does_not_depend_on_the_scale_of_the_weights():
    from evomerge.merge.methods import fisher

    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(4, 3, generator=g) for _ in range(2)]
    fs = [torch.rand(4, 3, generator=g) for _ in range(2)]
    want = fisher(None, ts, weight=[1.0, 2.0], statistics={"fisher": fs})
    for scale in (1e-40, 1e30):
        got = fisher(None, ts, weight=[scale, 2 * scale], statistics={"fisher": fs}, floor=1e-6)
        assert torch.allclose(got, want, rtol=1e-6), scale


def test_no_tokenizer_anywhere_is_one_line(fam, tmp_path):
    bare = _without_tokenizer(fam["expert_0"], tmp_path / "bare")
    rec = _recipe(fam, "fisher")
    rec["models"][0]["model"] = str(bare)  # the first model: the reference
    _fails(tmp_path, rec, f"model '{bare}'", "no tokenizer files")


def test_a_bound_without_an_upper_end_reads_as_such(fam):
    rec = _recipe(fam, "fisher", parameters={"floor": -1.0})
    with pytest.raises(RecipeError, match=r"floor=-1.0 is outside \(0.0, inf\)"):
        parse_recipe(rec)


def test_a_one_shot_merge_reads_statistics_tensor_by_tensor_and_a_resident_one_holds_them(fam, tmp_path, monkeypatch):
    """One-shot: each model's statistics read from the cache as the merge reaches a tensor
    (a ``TensorMap``, nothing held); a merger of many candidates holds them in memory. Both
    give the same weights."""
    from evomerge.merge.resident import ResidentMerger

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    r = parse_recipe(_recipe(fam, "regmean"))
    one = Merger(r)
    assert all(isinstance(v, S.TensorMap) for per in one.statistics().values() for v in per.values())
    held = ResidentMerger(r)
    assert all(isinstance(v, dict) for per in held.statistics().values() for v in per.values())
    a = load_file(str(one.write(tmp_path / "one") / "model.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(fam["expert_0"], dtype=torch.float32).eval()
    held.materialize(into=model)
    live = dict(model.named_parameters())
    assert all(torch.equal(a[k], live[k].detach()) for k in a if k in live)
