"""Inputs read once and adopted elsewhere: a resident engine built from another engine's
``share()`` (as Ray workers get it, through the object store) reads no checkpoint, copies
nothing on the CPU, and merges the same weights."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from evomerge.merge.engine import MergeError
from evomerge.merge.resident import ResidentMerger
from evomerge.recipe import parse_recipe
from evomerge.testing import tiny_family


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("shared") / "f", n_experts=3, layers=3, hidden=32, tie=True)


def through_store(obj):
    """A pickle round trip with the arrays out of band and read-only, as Ray's object
    store hands them to a worker."""
    buffers = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    frozen = []
    for b in buffers:
        a = np.frombuffer(bytes(b.raw()), dtype=np.uint8)
        assert not a.flags.writeable
        frozen.append(a)
    return pickle.loads(data, buffers=frozen), frozen


def recipe(fam, method, experts=3):
    models = []
    for i in range(experts if method != "slerp" else 1):
        p = {} if method == "slerp" else {"weight": [0.7, -0.2, 0.5][i]}
        if method in ("ties", "dare_ties", "breadcrumbs"):
            p["density"] = [0.6, 0.9, 0.3][i]
        models.append({"model": str(fam[f"expert_{i}"]), "parameters": p})
    params = {"t": [0.2, 0.7]} if method == "slerp" else {"lambda": 0.9} if method != "breadcrumbs" else {}
    return parse_recipe({"merge_method": method, "base_model": str(fam["base"]), "models": models,
                         "parameters": params})


def live(fam):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(fam["base"]).eval()


@pytest.mark.parametrize("store_dtype", [None, "bfloat16"])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "breadcrumbs", "slerp"])
def test_adopted_inputs_merge_the_same_weights_without_reading_or_copying(fam, method, store_dtype):
    r = recipe(fam, method)
    reader = ResidentMerger(r, store_dtype=store_dtype, seed=3)
    assert reader.bytes_read > 0
    shared, arrays = through_store(reader.share())
    assert shared.nbytes == reader.nbytes
    adopter = ResidentMerger(r, shared=shared, seed=3)
    assert adopter.bytes_read == 0

    # every input the adopter holds lies inside the store's arrays: nothing was copied
    spans = [(a.ctypes.data, a.ctypes.data + a.nbytes) for a in arrays]
    for key, t in adopter._inputs.items():
        p = t.data_ptr()
        assert any(lo <= p and p + t.numel() * t.element_size() <= hi for lo, hi in spans), key

    a, b = live(fam), live(fam)
    reader.materialize(r, into=a)
    adopter.materialize(r, into=b)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_inputs_made_for_other_models_are_refused(fam):
    shared = ResidentMerger(recipe(fam, "ties", experts=2)).share()
    with pytest.raises(MergeError, match="another recipe"):
        ResidentMerger(recipe(fam, "ties", experts=3), shared=shared)


def test_a_worker_on_shared_inputs_reads_no_weights(fam, monkeypatch):
    """Its engine and its live model come from the shared inputs alone: reading a
    checkpoint tensor (or loading a model the usual way) would fail here."""
    import transformers

    from evomerge.checkpoint import Checkpoint
    from evomerge.execute import Worker, shared_inputs
    from evomerge.space import Space

    sp = Space("ties", [str(fam[f"expert_{i}"]) for i in range(3)], base_model=str(fam["base"]),
               search=["weight", "density"], granularity="per_layer")
    shared, _ = through_store(shared_inputs(sp))
    want = live(fam)

    def no_reading(*a, **k):
        raise AssertionError("a weight was read from a checkpoint")

    monkeypatch.setattr(Checkpoint, "get", no_reading)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_reading)
    w = Worker(sp, lambda *a, **k: {"score": 1.0}, shared=shared)
    assert w.live_from == "resident inputs" and w.engine.bytes_read == 0
    got = w.model.state_dict()
    for name, t in want.state_dict().items():  # parameters and buffers (rotary tables too)
        assert torch.equal(got[name], t), name
    x = np.random.default_rng(0).uniform(0.2, 0.8, len(sp))
    from evomerge.types import Candidate

    assert w.evaluate(Candidate(0, list(x))).status == "ok"
    monkeypatch.undo()
    ref = Worker(sp, lambda *a, **k: {"score": 1.0})
    assert ref.live_from == "checkpoint"
    ref.evaluate(Candidate(0, list(x)))
    for (name, a), b in zip(ref.model.state_dict().items(), w.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_candidate_recipes_over_one_plan_and_the_ones_that_do_not_fit_it(fam):
    """A resident engine takes a candidate recipe that differs from its template in
    parameter values only (the models form, or slices), resolved over its one plan with the
    one-shot merge's values; a recipe with the models in another order, another model,
    other slices or another output dtype is refused, naming why."""
    from evomerge.merge.engine import Merger

    def slices(t0, t1, ranges=((0, 2), (1, 3))):
        return parse_recipe({"merge_method": "slerp", "base_model": str(fam["base"]), "slices": [
            {"sources": [{"model": str(fam["base"]), "layer_range": list(r)},
                         {"model": str(fam["expert_0"]), "layer_range": list(r)}], "parameters": {"t": t}}
            for r, t in zip(ranges, (t0, t1))]})

    for template, candidate in ((recipe(fam, "ties"), None), (slices(0.3, 0.6), slices([0.1, 0.9], 0.2))):
        if candidate is None:  # the same models, other weights and densities
            candidate = parse_recipe({**yaml_of(template), "parameters": {"lambda": 0.4}})
        engine = ResidentMerger(template)
        want = {t.name: Merger(candidate).merge_tensor(t) for t in Merger(candidate).tasks}
        got = engine.merged(candidate)
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)

    engine = ResidentMerger(recipe(fam, "ties"))
    swapped = yaml_of(recipe(fam, "ties"))
    swapped["models"] = swapped["models"][::-1]
    fewer = yaml_of(recipe(fam, "ties", experts=2))
    for bad in (swapped, fewer):
        with pytest.raises(MergeError, match="does not fit the merge plan: it merges other models"):
            engine.merged(parse_recipe(bad))
    with pytest.raises(MergeError, match="output dtype"):
        engine.merged(parse_recipe({**yaml_of(recipe(fam, "ties")), "out_dtype": "bfloat16"}))
    with pytest.raises(MergeError, match=r"its dtype \(bfloat16\) is not the plan's \(None\)"):
        engine.merged(parse_recipe({**yaml_of(recipe(fam, "ties")), "dtype": "bfloat16", "out_dtype": None}))
    with pytest.raises(MergeError, match="other models or layers"):
        ResidentMerger(slices(0.3, 0.6)).merged(slices(0.3, 0.6, ranges=((0, 2), (0, 2))))
    # the base listed among the models or not: the same plan (the base is no weighted input)
    listed = yaml_of(recipe(fam, "ties"))
    listed["models"] = [{"model": str(fam["base"])}, *listed["models"]]
    got, want = engine.merged(parse_recipe(listed)), engine.merged(recipe(fam, "ties"))
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_slices_of_different_numbers_of_models_merge_one_shot_and_resident(fam):
    """Slices merging two models, then three: a per-model parameter has another width in
    each, so it is kept per tensor rather than as one table; both engines merge it."""
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import Merger
    from evomerge.merge.methods import linear

    def src(i, r, w):
        return {"model": str(fam[f"expert_{i}"]), "layer_range": list(r), "parameters": {"weight": w}}

    r = parse_recipe({"merge_method": "linear", "dtype": "float32", "slices": [
        {"sources": [src(0, (0, 2), 0.3), src(1, (0, 2), 0.7)]},
        {"sources": [src(0, (2, 3), 0.2), src(1, (2, 3), 0.3), src(2, (2, 3), 0.5)]}]})
    eng = Merger(r)
    one_shot = {t.name: eng.merge_tensor(t) for t in eng.tasks}
    name = "model.layers.2.mlp.down_proj.weight"
    t = next(t for t in eng.tasks if t.name == name)
    assert len(t.inputs) == 3 and eng.params(t)["weight"] == [0.2, 0.3, 0.5]
    from safetensors.torch import load_file

    def weight(i):
        return next(v for f in sorted(fam[f"expert_{i}"].glob("*.safetensors"))
                    for k, v in load_file(f).items() if k == name)

    assert torch.equal(one_shot[name], linear(None, [weight(0), weight(1), weight(2)], weight=[0.2, 0.3, 0.5]))
    res = ResidentMerger(r)
    model = AutoModelForCausalLM.from_pretrained(fam["base"]).eval()
    res.materialize(r, into=model)
    got = dict(model.named_parameters())
    assert all(torch.equal(got[k].detach(), v) for k, v in one_shot.items() if k in got)


def yaml_of(r):
    """A parsed recipe's source dict (what ``parse_recipe`` was given)."""
    import yaml

    return yaml.safe_load(r.to_yaml())


def test_a_model_merged_with_other_layers_of_itself_reads_each_range(fam):
    """A self-merge: one model listed twice in a slice with other layer ranges. Each
    source reads its own layers (the second listing replaced the first, so both inputs were
    the same layer), and a DARE mask is drawn per listing."""
    from safetensors.torch import load_file

    from evomerge.merge.engine import Merger
    from evomerge.merge.methods import linear, slerp

    e0 = str(fam["expert_0"])
    tensors = {k: v for f in sorted(fam["expert_0"].glob("*.safetensors")) for k, v in load_file(f).items()}
    lin = parse_recipe({"merge_method": "linear", "dtype": "float32", "slices": [{"sources": [
        {"model": e0, "layer_range": [0, 2], "parameters": {"weight": 0.5}},
        {"model": e0, "layer_range": [1, 3], "parameters": {"weight": 0.5}}]}]})
        # slerp: the base is the first listing of the base model, the second is the other input
    sl = parse_recipe({"merge_method": "slerp", "base_model": e0, "dtype": "float32", "parameters": {"t": 0.3},
                       "slices": [{"sources": [{"model": e0, "layer_range": [0, 2]},
                                               {"model": e0, "layer_range": [1, 3]}]}]})
    for r, fn in ((lin, lambda a, b: linear(None, [a, b], weight=[0.5, 0.5])),
                  (sl, lambda a, b: slerp(a, [b], t=0.3))):
        eng = Merger(r)
        for i in (0, 1):
            name = f"model.layers.{i}.mlp.up_proj.weight"
            task = next(t for t in eng.tasks if t.name == name)
            assert [n for _, n in task.sources] == [name, f"model.layers.{i + 1}.mlp.up_proj.weight"]
            want = fn(tensors[name], tensors[f"model.layers.{i + 1}.mlp.up_proj.weight"])
            assert torch.equal(eng.merge_tensor(task), want), (r.merge_method, name)
    dare = Merger(parse_recipe({"merge_method": "dare_linear", "base_model": str(fam["base"]), "models": [
        {"model": e0, "parameters": {"weight": 0.5, "density": 0.5}},
        {"model": e0, "parameters": {"weight": 0.5, "density": 0.5}}]}))
    seeds = [s for s in dare.seeds if s is not None]
    assert seeds and all(a != b for a, b in seeds)


@pytest.mark.parametrize("family", ["zoo", "gpt2"])
@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_one_merger_writes_and_materializes_any_candidate_resident_or_streamed(fam, words, tmp_path, family, method):
    """A candidate (``Columns`` of a compiled space) is written to a model folder by the
    resident merger, from its held inputs, and by a streaming one, and materialized into a
    live model by both: the same weights as the one-shot merge of the candidate's recipe,
    with that recipe in the folder. Columns without their recipe text are refused (the
    folder would describe another merge), and nothing is left behind."""
    import yaml
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from evomerge.merge.engine import Merger
    from evomerge.space import Space

    if family == "zoo":
        base, experts = str(fam["base"]), [str(fam[f"expert_{i}"]) for i in range(3)]
    else:
        base, experts = str(words.base), [str(p) for p in words.experts.values()][:3]
    experts = experts[:1] if method == "slerp" else experts
    search = ["t"] if method == "slerp" else ["weight", "density"]
    sp = Space(method, experts, base_model=base, search=search, granularity="per_layer")
    x = np.random.default_rng(4).uniform(sp.lower, sp.upper)
    text = sp.recipe_yaml(x)
    one_shot = Merger(parse_recipe(yaml.safe_load(text)), seed=2)
    want = {t.name: one_shot.merge_tensor(t) for t in one_shot.tasks}

    resident = ResidentMerger(sp.recipe(sp.x0), seed=2)
    streamed = Merger(sp.recipe(sp.x0), seed=2)
    for name, merger in (("resident", resident), ("streamed", streamed)):
        cols = sp.compile(merger.tasks).columns(x)
        with pytest.raises(MergeError, match="recipe_text"):
            merger.write(tmp_path / f"{name}-bare", cols)
        assert not (tmp_path / f"{name}-bare").exists()
        out = merger.write(tmp_path / name, cols, recipe_text=text)
        got = {}
        for f in sorted(out.glob("*.safetensors")):
            got.update(load_file(str(f)))
        assert set(got) == set(want), name
        for k in want:
            assert torch.equal(got[k], want[k].to(got[k].dtype)), (name, k)
        assert (out / "evomerge_recipe.yaml").read_text() == text
        model = AutoModelForCausalLM.from_pretrained(base).eval()
        merger.materialize(cols, into=model)
        state = model.state_dict()
        for k in want:
            assert torch.equal(state[k], want[k].to(state[k].dtype)), (name, k)
