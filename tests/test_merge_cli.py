"""End to end: `evomerge-merge` on tiny Llama models, and every kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.checkpoint import Checkpoint
from evomerge.cli import merge_main
from evomerge.merge.engine import Merger
from evomerge.recipe import parse_recipe
from evomerge.testing import tiny_family

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    paths = {k: str(v) for k, v in tiny_family(root, n_experts=3, layers=3).items()}
    data = root / "data.jsonl"  # for the methods that read data
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("12+34=46", "rev:abc=cba", "srt:31=13")))
    paths["data"] = str(data)
    return paths


def _experts(fam, n=3, **params):
    return [{"model": fam[f"expert_{i}"], "parameters": dict(params)} for i in range(n)]


def recipes(fam) -> dict[str, dict]:
    b = fam["base"]
    return {
        "linear": {"merge_method": "linear", "models": _experts(fam, weight=1.0)},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b,
                            "models": _experts(fam, weight=[0.2, 0.5]), "parameters": {"lambda": 0.8}},
        "ties": {"merge_method": "ties", "base_model": b, "models": _experts(fam, weight=0.4, density=0.3)},
        "dare_linear": {"merge_method": "dare_linear", "base_model": b, "models": _experts(fam, weight=0.4, density=0.5)},
        "dare_ties": {"merge_method": "dare_ties", "base_model": b,
                      "models": _experts(fam, weight=0.4, density=0.5), "parameters": {"rescale": "l1"}},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": b,
                        "models": _experts(fam, weight=0.4, density=0.8, gamma=0.05)},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": b,
                             "models": _experts(fam, weight=0.4, density=0.8, gamma=0.05)},
        "della": {"merge_method": "della", "base_model": b, "models": _experts(fam, weight=0.4, density=0.5, epsilon=0.1)},
        "della_linear": {"merge_method": "della_linear", "base_model": b,
                         "models": _experts(fam, weight=0.4, density=0.5, epsilon=0.1)},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": fam["expert_0"]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"value": 0.5}]}},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": _experts(fam)},
        "wise_ft": {"merge_method": "wise_ft", "base_model": b, "models": [{"model": fam["expert_0"]}],
                    "parameters": {"alpha": 0.3}},
        "fisher": {"merge_method": "fisher", "models": _experts(fam, weight=1.0), "data": {"path": fam["data"]}},
        "regmean": {"merge_method": "regmean", "models": _experts(fam), "parameters": {"alpha": 0.8},
                    "data": {"path": fam["data"], "batch_size": 2}},
        "passthrough": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": fam["expert_0"], "layer_range": [0, 3]}]},
            {"sources": [{"model": fam["expert_1"], "layer_range": [1, 3]}]}]},
    }


def _write(tmp_path, name, recipe) -> str:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(p)


def _generate(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("12+34=", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5
    return model


@pytest.mark.parametrize("method", list(recipes({k: "x" for k in ["base", "expert_0", "expert_1", "expert_2", "data"]})))
def test_every_method_end_to_end(fam, tmp_path, method):
    rec = recipes(fam)[method]
    rfile = _write(tmp_path, method, rec)
    out = tmp_path / "out"
    assert merge_main([rfile, str(out), "--no-progress", "--seed", "3"]) == 0
    model = _generate(str(out))
    card = (out / "README.md").read_text()
    assert f"merge_method: {method}" in card and "```yaml" in card
    assert yaml.safe_load((out / "evomerge_recipe.yaml").read_text()) == rec
    n_layers = 4 + 1 if method == "passthrough" else 3
    assert model.config.num_hidden_layers == n_layers
    # no temporary folder left beside the output
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    # the model differs from the base unless the method is passthrough of one expert
    merged = load_file(str(out / "model.safetensors"))
    base = load_file(str(Path(fam["base"]) / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    assert merged[name].shape == base[name].shape
    assert not torch.equal(merged[name], base[name])


def test_cli_as_a_subprocess_matches_in_process_engine(fam, tmp_path):
    rec = recipes(fam)["ties"]
    rfile = _write(tmp_path, "ties", rec)
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", rfile, str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "merging (ties)" in r.stderr  # the progress bar
    written = load_file(str(out / "model.safetensors"))
    engine = Merger(parse_recipe(rec))
    for name, t in engine.iter_merged():
        assert torch.equal(written[name], t), name


def test_sharded_output_loads_and_equals_unsharded(fam, tmp_path):
    rfile = _write(tmp_path, "ta", recipes(fam)["task_arithmetic"])
    assert merge_main([rfile, str(tmp_path / "one"), "--no-progress"]) == 0
    assert merge_main([rfile, str(tmp_path / "many"), "--no-progress", "--shard-size", "20KB"]) == 0
    idx = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for s in shards:
        assert (tmp_path / "many" / s).stat().st_size <= 20_000 + 4096 or len(load_file(str(tmp_path / "many" / s))) == 1
    one, many = Checkpoint(tmp_path / "one"), Checkpoint(tmp_path / "many")
    assert sorted(one.names()) == sorted(many.names())
    for n in one.names():
        assert torch.equal(one.get(n), many.get(n))
    _generate(str(tmp_path / "many"))


def test_sharded_input_is_read(tmp_path):
    fam = tiny_family(tmp_path / "sh", n_experts=2, max_shard_size="30KB")
    assert (fam["base"] / "model.safetensors.index.json").is_file()
    rec = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
           "models": [{"model": str(fam["expert_0"]), "parameters": {"weight": 1.0}}]}
    out = tmp_path / "out"
    assert merge_main([_write(tmp_path, "r", rec), str(out), "--no-progress"]) == 0
    # weight 1 on one expert and lambda 1 gives the expert back
    ex = Checkpoint(fam["expert_0"])
    got = Checkpoint(out)
    for n in ex.names():
        torch.testing.assert_close(got.get(n), ex.get(n), rtol=0, atol=1e-6)


def test_dtype_option_and_tied_embeddings(tmp_path):
    fam = tiny_family(tmp_path / "tied", n_experts=2, tie=True)
    rec = {"merge_method": "ties", "base_model": str(fam["base"]),
           "models": [{"model": str(fam[f"expert_{i}"]), "parameters": {"weight": 0.5, "density": 0.5}} for i in range(2)]}
    out = tmp_path / "out"
    assert merge_main([_write(tmp_path, "r", rec), str(out), "--no-progress", "--dtype", "bfloat16"]) == 0
    ck = Checkpoint(out)
    assert "lm_head.weight" not in ck.names()
    assert {ck.meta(n)[1] for n in ck.names()} == {"bfloat16"}
    assert json.loads((out / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"
    _generate(str(out))


def test_same_seed_same_weights_other_seed_differs(fam, tmp_path):
    rfile = _write(tmp_path, "dare", recipes(fam)["dare_ties"])
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert merge_main([rfile, str(tmp_path / name), "--no-progress", "--seed", str(seed)]) == 0
        outs.append(load_file(str(tmp_path / name / "model.safetensors")))
    n = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(outs[0][n], outs[1][n])
    assert not torch.equal(outs[0][n], outs[2][n])


def test_materialize_writes_into_live_model_in_place(fam):
    from transformers import AutoModelForCausalLM

    rec = parse_recipe(recipes(fam)["ties"])
    engine = Merger(rec)
    model = AutoModelForCausalLM.from_pretrained(fam["base"])
    ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    engine.materialize(into=model)
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == ptrs
    sd = model.state_dict()
    for name, t in engine.iter_merged():
        assert torch.equal(sd[name], t)


# --------------------------------------------------------------------------------------
# Bad input: a clear error naming what is at fault, exit code 2, no output left behind
# --------------------------------------------------------------------------------------


def _fails(tmp_path, rec_or_file, *needles, extra=()):
    rfile = rec_or_file if isinstance(rec_or_file, str) else _write(tmp_path, "bad", rec_or_file)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", rfile, str(out), "--no-progress", *extra],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, (r.returncode, r.stderr)
    err = r.stderr
    assert "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    return err


def _copy_model(src, dst) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return Path(dst)


def test_missing_model_folder(fam, tmp_path):
    rec = recipes(fam)["ties"]
    rec["models"][1]["model"] = str(tmp_path / "nope")
    _fails(tmp_path, rec, str(tmp_path / "nope"), "no such folder")


def test_hub_id_offline_is_a_clear_error(fam, tmp_path):
    rec = recipes(fam)["ties"]
    rec["models"][1]["model"] = "some-org/some-model"
    _fails(tmp_path, rec, "some-org/some-model", "hub")


def test_missing_tensor(fam, tmp_path):
    m = _copy_model(fam["expert_1"], tmp_path / "m")
    sd = load_file(str(m / "model.safetensors"))
    del sd["model.layers.2.mlp.down_proj.weight"]
    save_file(sd, str(m / "model.safetensors"))
    rec = recipes(fam)["ties"]
    rec["models"][1]["model"] = str(m)
    _fails(tmp_path, rec, str(m), "model.layers.2.mlp.down_proj.weight", "missing")


def test_shape_mismatch(fam, tmp_path):
    m = _copy_model(fam["expert_1"], tmp_path / "m")
    sd = load_file(str(m / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"] = sd["model.layers.0.mlp.up_proj.weight"][:-1].contiguous()
    save_file(sd, str(m / "model.safetensors"))
    rec = recipes(fam)["task_arithmetic"]
    rec["models"][1]["model"] = str(m)
    _fails(tmp_path, rec, str(m), "model.layers.0.mlp.up_proj.weight", "shape")


def test_different_architectures(fam, tmp_path):
    m = _copy_model(fam["expert_1"], tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["architectures"] = ["MistralForCausalLM"]
    cfg["model_type"] = "mistral"
    (m / "config.json").write_text(json.dumps(cfg))
    rec = recipes(fam)["ties"]
    rec["models"][1]["model"] = str(m)
    _fails(tmp_path, rec, "different architectures", "MistralForCausalLM", "LlamaForCausalLM")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight(fam, tmp_path, bad):
    m = _copy_model(fam["expert_2"], tmp_path / "m")
    sd = load_file(str(m / "model.safetensors"))
    sd["model.layers.1.self_attn.q_proj.weight"][3, 4] = bad
    save_file(sd, str(m / "model.safetensors"))
    rec = recipes(fam)["linear"]
    rec["models"][2]["model"] = str(m)
    _fails(tmp_path, rec, str(m), "model.layers.1.self_attn.q_proj.weight", "NaN or inf")


def test_unknown_method_and_parameter(fam, tmp_path):
    rec = recipes(fam)["ties"]
    rec["merge_method"] = "tiess"
    _fails(tmp_path, rec, "tiess", "accepted", "ties", "task_arithmetic")
    rec = recipes(fam)["ties"]
    rec["models"][0]["parameters"]["densty"] = 0.3
    _fails(tmp_path, rec, "densty", "accepted", "density")


@pytest.mark.parametrize("density", [0, -0.1, 1.5])
def test_density_out_of_range(fam, tmp_path, density):
    rec = recipes(fam)["ties"]
    rec["models"][2]["parameters"]["density"] = [0.5, density]
    _fails(tmp_path, rec, "models[2]", "density", "(0.0, 1.0]")


def test_pickled_checkpoint_refused_then_allowed(fam, tmp_path):
    m = _copy_model(fam["expert_1"], tmp_path / "m")
    sd = load_file(str(m / "model.safetensors"))
    (m / "model.safetensors").unlink()
    torch.save(sd, m / "pytorch_model.bin")
    rec = recipes(fam)["ties"]
    rec["models"][1]["model"] = str(m)
    rfile = _write(tmp_path, "pk", rec)
    _fails(tmp_path, rfile, str(m), "pickle", "--allow-pickle")
    out = tmp_path / "ok"
    assert merge_main([rfile, str(out), "--no-progress", "--allow-pickle"]) == 0
    ref = tmp_path / "ref"
    rec["models"][1]["model"] = fam["expert_1"]
    assert merge_main([_write(tmp_path, "ref", rec), str(ref), "--no-progress"]) == 0
    a, b = load_file(str(out / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pickle_with_code_is_refused_even_when_allowed(fam, tmp_path):
    m = _copy_model(fam["expert_1"], tmp_path / "m")
    (m / "model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, m / "pytorch_model.bin", _use_new_zipfile_serialization=True)
    rec = recipes(fam)["ties"]
    rec["models"][1]["model"] = str(m)
    _fails(tmp_path, rec, str(m), "weights_only", extra=("--allow-pickle",))
    assert not (tmp_path / "pwned").exists()


def test_existing_output_refused_unless_overwrite(fam, tmp_path):
    rfile = _write(tmp_path, "ta", recipes(fam)["task_arithmetic"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", rfile, str(out), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"
    assert merge_main([rfile, str(out), "--no-progress", "--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_failure_midway_leaves_nothing(fam, tmp_path):
    """A NaN in the last tensor is found after most shards are written: no output remains."""
    m = _copy_model(fam["expert_0"], tmp_path / "m")
    sd = load_file(str(m / "model.safetensors"))
    sd["lm_head.weight"][0, 0] = float("nan")
    save_file(sd, str(m / "model.safetensors"))
    rec = recipes(fam)["linear"]
    rec["models"][0]["model"] = str(m)
    _fails(tmp_path, rec, "lm_head.weight", extra=("--shard-size", "10KB"))


def test_unknown_recipe_key_and_bad_yaml(tmp_path):
    _fails(tmp_path, {"merge_method": "linear", "modles": []}, "modles", "accepted")
    p = tmp_path / "broken.yaml"
    p.write_text("merge_method: [linear\n")
    _fails(tmp_path, str(p), "not valid YAML")
    _fails(tmp_path, str(tmp_path / "absent.yaml"), "not found")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["base", "expert", "parent of the models", "inside the base",
                                   "a link to an expert", "the recipe's folder"])
def test_an_output_over_the_inputs_is_refused_and_they_stay(fam, tmp_path, where):
    """--overwrite of an input model, of the folder holding them, a folder inside one, a
    symbolic link to one, or the folder holding the recipe: refused, every input unchanged."""
    root = tmp_path / "models"
    models = {k: _copy_model(v, root / k) for k, v in fam.items() if k != "data"}
    rec = recipes(fam)["task_arithmetic"]
    rec["base_model"] = str(models["base"])
    for i, m in enumerate(rec["models"]):
        m["model"] = str(models[f"expert_{i}"])
    rdir = tmp_path / "recipes"
    rdir.mkdir()
    rfile = _write(rdir, "ta", rec)
    (tmp_path / "link").symlink_to(models["expert_1"], target_is_directory=True)
    out = {"base": models["base"], "expert": models["expert_0"], "parent of the models": root,
           "inside the base": models["base"] / "merged", "a link to an expert": tmp_path / "link",
           "the recipe's folder": rdir}[where]
    before = {k: _snapshot(v) for k, v in models.items()}
    recipe_before = Path(rfile).read_bytes()
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", rfile, str(out), "--no-progress", "--overwrite"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, (r.returncode, r.stderr)
    last = r.stderr.strip().splitlines()[-1]
    assert "Traceback" not in r.stderr and "output" in last and "input" in last, r.stderr
    assert {k: _snapshot(v) for k, v in models.items()} == before
    assert Path(rfile).read_bytes() == recipe_before
    assert not (models["base"] / "merged").exists()
    assert not [p for p in tmp_path.rglob(".*tmp-*")]  # no temporary folder left behind


def test_a_shard_with_overlapping_offsets_is_named_and_nothing_is_merged(fam, tmp_path):
    """Before: merged from the wrong bytes, exit 0. Now: one line naming the model, file and
    tensor, exit 2, no output, and no 'Exception ignored' from a half-made file reader."""
    m = _copy_model(fam["expert_0"], tmp_path / "m")
    f = m / "model.safetensors"
    raw = f.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8: 8 + size])
    names = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    a, b = header[names[0]]["data_offsets"], header[names[1]]["data_offsets"]
    shift = min(4, a[1] - a[0])
    header[names[1]]["data_offsets"] = [b[0] - shift, b[1] - shift]  # now it overlaps the one before
    blob = json.dumps(header, separators=(",", ":")).encode()
    assert len(blob) <= size
    blob = blob.ljust(size)  # the same header length: JSON allows trailing spaces
    f.write_bytes(raw[:8] + blob + raw[8 + size:])
    rec = recipes(fam)["linear"]
    rec["models"][0]["model"] = str(m)
    rfile = _write(tmp_path, "lin", rec)
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", rfile, str(tmp_path / "out"), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2, r.stderr
    assert "Exception ignored" not in r.stderr and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert str(m) in line and "model.safetensors" in line and names[1] in line and "overlaps" in line
    assert not (tmp_path / "out").exists()


def _sharded(fam, tmp_path, edit) -> Path:
    """A copy of expert_0 saved in two shards, its index edited by ``edit(weight_map)``."""
    from transformers import AutoModelForCausalLM

    m = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(fam["expert_0"]).save_pretrained(m, max_shard_size="20KB")
    idx = m / "model.safetensors.index.json"
    d = json.loads(idx.read_text())
    edit(d["weight_map"])
    idx.write_text(json.dumps(d))
    return m


@pytest.mark.parametrize("shard", ["../base/model.safetensors", "/etc/hostname", "sub/../model.safetensors", ".."])
def test_an_index_naming_a_file_outside_the_model_folder_is_refused(fam, tmp_path, shard):
    def edit(wm):
        wm[next(iter(wm))] = shard

    m = _sharded(fam, tmp_path, edit)
    rec = recipes(fam)["linear"]
    rec["models"][0]["model"] = str(m)
    _fails(tmp_path, rec, str(m), repr(shard), "not a file of the model's folder")


def test_malformed_inputs_and_options_are_named(fam, tmp_path):
    rec = recipes(fam)["linear"]
    listed = _copy_model(fam["expert_1"], tmp_path / "listed")
    (listed / "config.json").write_text("[1, 2]")
    bad = {**rec, "models": [{**rec["models"][0], "model": str(listed)}, *rec["models"][1:]]}
    _fails(tmp_path, bad, str(listed), "config.json is a JSON list")
    aliased = tmp_path / "aliased.yaml"
    laughs = "name: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]\n" for i in range(1, 7))  # 10**7 values in 600 bytes
    aliased.write_text(open(_write(tmp_path, "ok", rec)).read() + laughs)
    _fails(tmp_path, str(aliased), "aliased.yaml", "aliases expand it to", "more than the 100,000")
    # few values, long ones: a 4 KB string 9,000 times from a 4 KB file (was a model card of as many)
    long = tmp_path / "long.yaml"
    long.write_text(open(_write(tmp_path, "ok", rec)).read() + "x: &a [" + "y" * 4000 + "]\n" + "".join(
        f"x{i}: &{c} [{', '.join([f'*{p}'] * 30)}]\n" for i, (p, c) in enumerate(zip("ab", "bc")))
        + f"name: [{', '.join(['*c'] * 10)}]\n")
    _fails(tmp_path, str(long), "long.yaml", "aliases expand it to", "characters")
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: " + "[" * 20000 + "]" * 20000 + "\n")
    _fails(tmp_path, str(deep), "deep.yaml", "nested too deeply")
    named = _write(tmp_path, "named", {**rec, "name": ["a", "list"]})
    _fails(tmp_path, named, ".name: expected a string")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"name: caf\xe9\n" + open(_write(tmp_path, "ok", rec), "rb").read())
    _fails(tmp_path, str(latin), "latin.yaml", "not UTF-8")
    ok = _write(tmp_path, "ok", rec)
    for size in ("5Ki", "0", "-3MB", "lots"):
        _fails(tmp_path, ok, "--shard-size", extra=("--shard-size", size))
    for dev in ("foo", "meta", "xla", "mps"):  # (mps: refused where torch has none, as here)
        _fails(tmp_path, ok, "--device", repr(dev), extra=("--device", dev))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", ok, str(a_file / "out"), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "cannot create it" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert a_file.read_text() == "x"


def test_an_output_the_final_rename_could_not_make_is_refused_before_merging(fam, tmp_path):
    """A symbolic link as the output (dangling, or to a folder, with --overwrite) failed after
    the whole merge with a traceback; a name too long for the file system failed with one at
    once. Both are named up front, and the link's target is left as it was."""
    ok = _write(tmp_path, "ok", recipes(fam)["linear"])
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep").write_text("x")
    for link, to in (("dangling", tmp_path / "nowhere" / "x"), ("linked", target)):
        (tmp_path / link).symlink_to(to)
        for extra in ((), ("--overwrite",)):
            r = subprocess.run([sys.executable, "-m", "evomerge.cli", ok, str(tmp_path / link), "--no-progress",
                                *extra], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            assert r.returncode == 2 and "is a symbolic link" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert (target / "keep").read_text() == "x" and (tmp_path / "linked").is_symlink()
    for long, says in ((tmp_path / ("a" * 250), "byte limit"), (tmp_path / ("b" * 300) / "sub", "longer than the 255"),
                       (tmp_path.joinpath(*["c" * 200] * 25), "more than a file system takes")):
        r = subprocess.run([sys.executable, "-m", "evomerge.cli", ok, str(long), "--no-progress"],
                           capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_the_output_folder_follows_the_umask(fam, tmp_path):
    rfile = _write(tmp_path, "lin", recipes(fam)["linear"])
    for mask, folder, file in ((0o022, 0o755, 0o644), (0o077, 0o700, 0o600), (0o002, 0o775, 0o664)):
        old = os.umask(mask)
        try:
            assert merge_main([rfile, str(tmp_path / "out"), "--no-progress", "--overwrite"]) == 0
        finally:
            os.umask(old)
        assert (tmp_path / "out").stat().st_mode & 0o777 == folder
        assert (tmp_path / "out" / "model.safetensors").stat().st_mode & 0o777 == file  # shards too


SLOW_MERGE = """
import sys, time
from evomerge import checkpoint
from evomerge.cli import merge_command
add = checkpoint.CheckpointWriter.add
def slow_add(self, name, t):
    time.sleep(0.2)
    return add(self, name, t)
checkpoint.CheckpointWriter.add = slow_add
sys.argv = ["evomerge-merge", *sys.argv[1:]]
sys.exit(merge_command())
"""


def _start_slow_merge(tmp_path, fam, out):
    import time

    script = tmp_path / "slow.py"
    script.write_text(SLOW_MERGE)
    rfile = _write(tmp_path, "slerp", recipes(fam)["slerp"])  # one lane: tensors go through add()
    p = subprocess.Popen([sys.executable, str(script), rfile, str(out), "--no-progress", "--overwrite"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "EVOMERGE_NATIVE": "0"})
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(f".{out.name}.tmp-*/*.safetensors")):
        time.sleep(0.05)
    assert p.poll() is None, p.communicate()
    return p, rfile


def test_sigterm_removes_the_partial_output_and_a_sigkilled_ones_is_swept_next_time(fam, tmp_path):
    import signal

    out = tmp_path / "out"
    for sig in (signal.SIGTERM, signal.SIGHUP):  # (a closed terminal: SIGHUP)
        p, rfile = _start_slow_merge(tmp_path, fam, out)
        p.send_signal(sig)
        _, err = p.communicate(timeout=60)
        assert p.returncode == 130 and "nothing was written" in err, err
        assert not list(tmp_path.glob(".out.*")) and not out.exists()

    p, rfile = _start_slow_merge(tmp_path, fam, out)
    p.send_signal(signal.SIGKILL)
    p.communicate()
    assert list(tmp_path.glob(".out.tmp-*"))  # a killed process cleans nothing up itself
    assert merge_main([rfile, str(out), "--no-progress"]) == 0
    assert not list(tmp_path.glob(".out.*")) and (out / "model.safetensors").is_file()


def test_an_overwrite_killed_between_its_renames_is_put_back(fam, tmp_path):
    """The old output moved aside by a killed --overwrite is restored by the next writer,
    and an --overwrite of a regular file leaves nothing beside it."""
    rfile = _write(tmp_path, "lin", recipes(fam)["linear"])
    out = tmp_path / "out"
    assert merge_main([rfile, str(out), "--no-progress"]) == 0
    before = _snapshot(out)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    aside = tmp_path / f".out.old-{int(dead.stdout)}"  # as a process killed after its first rename leaves it
    os.replace(out, aside)
    r = subprocess.run([sys.executable, "-m", "evomerge.cli", rfile, str(tmp_path / "other"), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0 and not out.exists()  # another output's writer leaves it alone
    ta = _write(tmp_path, "ta", recipes(fam)["task_arithmetic"])
    assert merge_main([ta, str(out), "--no-progress"]) == 2  # the output is back, so it is not replaced
    assert not aside.exists() and _snapshot(out) == before
    target = tmp_path / "plain_file"
    target.write_text("x")
    assert merge_main([rfile, str(target), "--no-progress", "--overwrite"]) == 0
    assert target.is_dir() and not list(tmp_path.glob(".plain_file.*"))


SIGNAL_IN_COMMIT = """
import os, signal, sys
from evomerge import checkpoint
from evomerge.cli import merge_command
replace, calls = os.replace, []
def replace_and_stop(a, b):
    calls.append(1)
    if len(calls) == 2:  # the new output going into place, the old one aside: a SIGHUP now
        os.kill(os.getpid(), signal.SIGHUP)
    return replace(a, b)
checkpoint.os.replace = replace_and_stop
sys.argv = ["evomerge-merge", *sys.argv[1:]]
sys.exit(merge_command())
"""


def test_a_stop_signal_during_an_overwrites_swap_leaves_a_complete_output_and_nothing_beside(fam, tmp_path):
    """A SIGHUP between the renames of an --overwrite used to end the merge there, saying
    nothing was written while the output had been replaced, and leave the old one half
    removed, which the next writer then put back as the output. Stop signals now wait for
    the swap: the merge completes, and what it replaced goes where no writer restores it."""
    rfile = _write(tmp_path, "lin", recipes(fam)["linear"])
    ta = _write(tmp_path, "ta", recipes(fam)["task_arithmetic"])
    out = tmp_path / "out"
    assert merge_main([rfile, str(out), "--no-progress"]) == 0
    script = tmp_path / "stop.py"
    script.write_text(SIGNAL_IN_COMMIT)
    r = subprocess.run([sys.executable, str(script), ta, str(out), "--overwrite", "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob(".out.*"))
    assert merge_main([ta, str(tmp_path / "again"), "--no-progress"]) == 0
    assert _snapshot(out) == _snapshot(tmp_path / "again")  # the new merge, whole
    # a replaced output a killed writer was removing is removed by the next one, never restored
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    trash = tmp_path / f".fresh.trash-{int(dead.stdout)}"
    trash.mkdir()
    (trash / "generation_config.json").write_text("{}")
    assert merge_main([rfile, str(tmp_path / "fresh"), "--no-progress"]) == 0
    assert not trash.exists() and (tmp_path / "fresh" / "model.safetensors").is_file()


def test_a_missing_tokenizer_source_is_refused_before_anything_is_merged(fam, tmp_path, monkeypatch):
    from evomerge.merge import engine

    rec = {**recipes(fam)["linear"], "tokenizer_source": str(tmp_path / "no-tokenizer-here")}
    _fails(tmp_path, rec, "tokenizer_source", "no-tokenizer-here")
    merged = []
    monkeypatch.setattr(engine.Merger, "iter_merged", lambda self, **kw: merged.append(1) or iter(()))
    monkeypatch.setattr(engine.Merger, "_write_lanes", lambda self, *a: merged.append(1))
    assert merge_main([_write(tmp_path, "tok", rec), str(tmp_path / "out2"), "--no-progress"]) == 2
    assert not merged and not (tmp_path / "out2").exists()


RACING_MERGE = """
import os, sys, time
from evomerge import checkpoint
real = os.replace
def slow_replace(a, b):
    time.sleep(0.4)  # widen the window between the two renames of an --overwrite
    return real(a, b)
checkpoint.os.replace = slow_replace
from evomerge.cli import merge_command
sys.argv = ["evomerge-merge", *sys.argv[1:]]
sys.exit(merge_command())
"""


def test_two_overwrites_of_one_output_at_once_both_succeed(fam, tmp_path):
    """Two --overwrite merges into one folder, their commits overlapping: both succeed, one
    whole output is left (the last to commit), and nothing beside it."""
    script = tmp_path / "race.py"
    script.write_text(RACING_MERGE)
    out = tmp_path / "out"
    ra, rb = _write(tmp_path, "lin", recipes(fam)["linear"]), _write(tmp_path, "ta", recipes(fam)["task_arithmetic"])
    assert merge_main([ra, str(out), "--no-progress"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), r, str(out), "--no-progress", "--overwrite"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for r in (ra, rb)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e[-1500:] for _, e in results]
    assert (out / "model.safetensors").is_file() and (out / "evomerge_recipe.yaml").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out")) == []


def test_an_index_that_maps_a_tensor_to_a_shard_without_it_is_named(fam, tmp_path):
    def edit(wm):
        name = next(iter(wm))
        wm[name] = next(f for f in sorted(set(wm.values())) if f != wm[name])

    m = _sharded(fam, tmp_path, edit)
    rec = recipes(fam)["linear"]
    rec["models"][0]["model"] = str(m)
    _fails(tmp_path, rec, str(m), "the index maps tensor", "which does not hold it")


@pytest.mark.parametrize("method", ["ties", "slerp"])
def test_compile_writes_the_same_weights(fam, tmp_path, method):
    """``--compile`` merges the task-arithmetic family through torch.compile and leaves the
    other methods on their reference path: the same weights either way."""
    rfile = _write(tmp_path, method, recipes(fam)[method])
    assert merge_main([rfile, str(tmp_path / "plain"), "--no-progress", "--seed", "3"]) == 0
    assert merge_main([rfile, str(tmp_path / "compiled"), "--no-progress", "--seed", "3", "--compile"]) == 0
    want = load_file(str(tmp_path / "plain" / "model.safetensors"))
    got = load_file(str(tmp_path / "compiled" / "model.safetensors"))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
