"""Genome spaces and the resident engine: genomes export as recipes that the one-shot merge
reproduces bit for bit; candidates are materialized in place."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import merge_main
from evomerge.merge.engine import Merger
from evomerge.merge.resident import ResidentMerger
from evomerge.recipe import RecipeError, load_recipe
from evomerge.space import Space
from evomerge.testing import tiny_family


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return tiny_family(tmp_path_factory.mktemp("fam"), n_experts=3, layers=4, hidden=32)


def experts(family, k=3):
    return [str(family[f"expert_{i}"]) for i in range(k)]


def live_model(family):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(family["base"]).eval()


def test_gene_counts(family):
    m = experts(family)
    kw = dict(base_model=str(family["base"]), search=["weight", "density"])
    assert len(Space("ties", m, granularity="global", **kw)) == 2
    assert len(Space("ties", m, granularity="per_model", **kw)) == 2 * 3
    # embed + 4 layers + head, per model, per parameter
    assert len(Space("ties", m, granularity="per_layer", **kw)) == 2 * 3 * 6
    assert len(Space("ties", m, granularity="per_layer", layer_granularity=2, **kw)) == 2 * 3 * 4
    assert len(Space("ties", m, granularity="per_layer_filtered", **kw)) == 2 * 3 * 10
    assert len(Space("ties", m, granularity="per_layer", smoothing=3, **kw)) == 2 * 3 * 5
    sl = Space("slerp", [str(family["expert_0"])], base_model=str(family["base"]), search=["t"])
    assert len(sl) == 6  # t is not per model


def test_bad_spaces_are_refused(family):
    m = experts(family)
    with pytest.raises(RecipeError, match="no parameter 'epsilon'"):
        Space("ties", m, base_model=str(family["base"]), search=["epsilon"])
    with pytest.raises(RecipeError, match=r"space.search.weight: lo \(1.0\) must be below hi"):
        Space("ties", m, base_model=str(family["base"]), search={"weight": {"lo": 1, "hi": 0}})
    # ranges come from the method registry, and stay inside what the parameter may take
    with pytest.raises(RecipeError, match=r"space.search.density.lo: 0.0 is outside .* \(0.0, 1.0\]"):
        Space("ties", m, base_model=str(family["base"]), search={"density": {"lo": 0}})
    with pytest.raises(RecipeError, match=r"space.search.epsilon.hi: 0.8 is outside .* \[0.0, 0.5\]"):
        Space("della", m, base_model=str(family["base"]), search={"epsilon": {"hi": 0.8}})
    with pytest.raises(RecipeError, match="'normalize' is not a number and cannot be searched"):
        Space("ties", m, base_model=str(family["base"]), search=["normalize"])
    with pytest.raises(RecipeError, match="x0"):
        Space("ties", m, base_model=str(family["base"]), search={"weight": {"x0": 3}})
    with pytest.raises(RecipeError, match="smoothing"):
        Space("ties", m, base_model=str(family["base"]), granularity="global", smoothing=3)
    with pytest.raises(RecipeError, match="granularity"):
        Space("ties", m, base_model=str(family["base"]), granularity="per_head")
    with pytest.raises(RecipeError, match="both searched and fixed"):
        Space("ties", m, base_model=str(family["base"]), search=["weight"], fixed={"weight": 1.0})
    # a number without a default range (Fisher's floor): fixed freely, searched over a range given
    assert Space("fisher", m, search=["weight"], fixed={"floor": 1e-5}).fixed == {"floor": 1e-5}
    with pytest.raises(RecipeError, match=r"space.search.floor: .*no range a search takes by default; give its lo"):
        Space("fisher", m, search=["floor"])
    sp = Space("fisher", m, search={"floor": {"lo": 1e-8, "hi": 1e-4}})
    assert sp.ranges["floor"] == (1e-8, 1e-4, 1e-6)
    # a structural one (PLeaS's width) neither
    with pytest.raises(RecipeError, match=r"space.fixed.width: .*changes the merged model's shape"):
        Space("pleas", m, search=["weight"], fixed={"width": 1.5})
    with pytest.raises(RecipeError, match=r"space.search.width: .*sets the merged model's shape.*cannot be searched"):
        Space("pleas", m, search=["width"])


def resolved(space, x, name):
    """The parameters the engine resolves for one tensor of genome x."""
    eng = Merger(space.recipe(x))
    return next(eng.params(t) for t in eng.tasks if t.name == name)


def test_genes_land_on_their_tensors(family):
    sp = Space("task_arithmetic", experts(family), base_model=str(family["base"]), search=["weight"],
               granularity="per_layer_filtered")
    x = np.arange(len(sp)) / len(sp)
    g = {name: v for name, v in zip(sp.names, x)}
    assert resolved(sp, x, "model.layers.2.self_attn.q_proj.weight")["weight"][1] == pytest.approx(
        g["weight[1]@attn:layers[2:3]"])
    assert resolved(sp, x, "model.layers.3.mlp.up_proj.weight")["weight"][0] == pytest.approx(
        g["weight[0]@mlp:layers[3:4]"])
    assert resolved(sp, x, "model.layers.0.input_layernorm.weight")["weight"][2] == pytest.approx(
        g["weight[2]@mlp:layers[0:1]"])
    assert resolved(sp, x, "model.embed_tokens.weight")["weight"][0] == pytest.approx(g["weight[0]@embed"])
    assert resolved(sp, x, "lm_head.weight")["weight"][2] == pytest.approx(g["weight[2]@head"])
    assert resolved(sp, x, "model.norm.weight")["weight"][2] == pytest.approx(g["weight[2]@head"])


def test_smoothing_interpolates_control_points_over_depth(family):
    sp = Space("task_arithmetic", experts(family, 1), base_model=str(family["base"]), search=["weight"],
               granularity="per_layer", smoothing=2)
    x = np.array([0.9, 0.0, 0.6, 0.1])  # embed, cp0, cp1, head
    vals = [resolved(sp, x, f"model.layers.{i}.mlp.up_proj.weight")["weight"][0] for i in range(4)]
    assert vals == pytest.approx([0.0, 0.2, 0.4, 0.6])


METHOD_SPACES = [
    ("linear", ["weight"], {}),
    ("task_arithmetic", ["weight"], {"lambda": 0.8}),
    ("ties", ["weight", "density"], {}),
    ("dare_ties", ["weight", "density"], {}),
    ("dare_linear", ["weight", "density"], {}),
    ("breadcrumbs", ["weight", "density", "gamma"], {}),
    ("della", ["weight", "density", "epsilon"], {}),
    ("slerp", ["t"], {}),
]


@pytest.mark.parametrize("method,search,fixed", METHOD_SPACES, ids=[m for m, _, _ in METHOD_SPACES])
def test_resident_equals_one_shot_merge_of_the_exported_recipe(family, tmp_path, method, search, fixed):
    models = experts(family, 1 if method == "slerp" else 3)
    sp = Space(method, models, base_model=str(family["base"]), search=search, fixed=fixed,
               granularity="per_layer_filtered" if method != "linear" else "per_layer")
    x = np.random.default_rng(0).uniform(sp.lower, sp.upper)
    if method == "della":  # keep density + epsilon within (0, 1]
        x = np.where(np.array([g.param == "epsilon" for g in sp.genes]), 0.05, x)
        x = np.where(np.array([g.param == "density" for g in sp.genes]), np.clip(x, 0.2, 0.9), x)
    engine = ResidentMerger(sp.recipe(sp.x0), seed=3)
    coefficients = sp.compile(engine.tasks)  # as a search's worker does: no recipe per candidate
    model = live_model(family)
    ptrs = {k: p.data_ptr() for k, p in model.named_parameters()}
    engine.materialize(coefficients.columns(x), into=model)
    engine.materialize(sp.recipe(sp.x0), into=model)  # a recipe takes the same path
    engine.materialize(coefficients.columns(x), into=model)
    assert {k: p.data_ptr() for k, p in model.named_parameters()} == ptrs  # nothing reallocated

    recipe_file = tmp_path / "genome.yaml"
    recipe_file.write_text(sp.recipe_yaml(x))
    assert merge_main([str(recipe_file), str(tmp_path / "out"), "--seed", "3", "--no-progress"]) == 0
    written = load_file(tmp_path / "out" / "model.safetensors")
    live = dict(model.named_parameters())
    assert set(written) == set(live)
    for name, t in written.items():
        assert torch.equal(live[name].detach(), t), name


def _methods_and_spaces():
    from evomerge.merge.methods import METHODS

    cases = []
    for name, spec in METHODS.items():
        searchable = [p.name for p in spec.params if not p.ignored and p.search is not None]
        for gran, extra in (("global", {}), ("per_model", {}), ("per_layer", {"layer_granularity": 3}),
                            ("per_layer_filtered", {}), ("per_layer", {"smoothing": 3}), ("per_tensor", {})):
            cases.append((name, searchable, gran, extra))
    return cases


@pytest.mark.parametrize("method,search,granularity,extra", _methods_and_spaces(),
                         ids=[f"{m}-{g}-{'-'.join(e) or 'plain'}" for m, _, g, e in _methods_and_spaces()])
def test_compiled_columns_equal_the_resolution_of_the_exported_recipe(family, method, search, granularity, extra):
    """For every method and granularity, with fixed settings that filter and interpolate
    over depth: the compiled map's parameters for a genome are exactly (==) those the
    merge engine resolves from parse(recipe_yaml(x)), tensor by tensor and model by model,
    and an out-of-range value is refused with the recipe's own message."""
    import yaml

    from evomerge.merge.methods import METHODS
    from evomerge.recipe import parse_recipe

    spec = METHODS[method]
    one = spec.max_models == 1
    models = experts(family, 1 if one else 3)
    base = None if method == "passthrough" else str(family["base"])
    fixed = {}
    names = {p.name for p in spec.params if not p.ignored}
    for p, setting in (("lambda", [0.5, 1.5]), ("gamma", [{"filter": "mlp", "value": [0.01, 0.05]}, {"value": 0.02}]),
                       ("normalize", [{"filter": "self_attn", "value": True}, {"value": False}])):
        if p in names and p not in search:
            fixed[p] = setting
    sp = Space(method, models, base_model=base, search=search, fixed=fixed, granularity=granularity, **extra)
    template = Merger(sp.recipe(sp.x0))
    cmap = sp.compile(template.tasks)
    rng = np.random.default_rng(len(sp))
    for x in [sp.x0, sp.lower, sp.upper, *(rng.uniform(sp.lower, sp.upper) for _ in range(3))]:
        recipe = parse_recipe(yaml.safe_load(sp.recipe_yaml(x)), source="genome")
        plan = Merger(recipe, checkpoints=template.models).plan
        want = plan.tasks
        cols = cmap.columns(x)
        assert len(cols) == len(want)
        for i, t in enumerate(want):  # against the recipe's own resolution, tensor by tensor
            assert cols.params(i) == ({} if t.copy else plan.resolve(recipe, t)), t.name
        for p in cols.numeric:  # the same map as a matrix: values = A @ x + c
            A, c = cmap.matrix(p)
            live = ~np.isnan(c + A.sum(1))
            g = sp._genome(x)  # clipped to the bounds and the method's joint limits
            assert np.allclose((A @ g + c)[live], np.ravel(cols.numeric[p])[live], rtol=0, atol=1e-12)
    if len(sp):  # a value the recipe refuses (here: not finite) is refused too, naming where
        x = np.array(sp.x0, dtype=float)
        x[-1] = np.nan
        with pytest.raises(RecipeError, match="must be finite"):
            Merger(parse_recipe(yaml.safe_load(sp.recipe_yaml(x)), source="genome"), checkpoints=template.models)
        param = sp.genes[-1].param
        with pytest.raises(RecipeError, match=f"tensor '.*', parameter '{param}': must be finite, got nan"):
            cmap.columns(x)


@pytest.mark.parametrize("granularity,extra", [("per_layer", {}), ("per_model", {}), ("per_layer", {"smoothing": 2})])
def test_della_epsilon_is_clipped_to_what_each_density_allows(family, granularity, extra):
    """DELLA needs density - epsilon > 0 and density + epsilon <= 1, a joint limit no box of
    ranges holds: the genome's epsilon is clipped to it per model and unit (the registry's
    ``MethodSpec.limits``), so no candidate of the default ranges fails; interpolation over
    depth keeps valid pairs valid."""
    from evomerge.merge.methods import della_epsilon_limit

    sp = Space("della", experts(family), base_model=str(family["base"]), search=["weight", "density", "epsilon"],
               granularity=granularity, **extra)
    template = Merger(sp.recipe(sp.x0))
    cmap = sp.compile(template.tasks)
    rng = np.random.default_rng(1)
    for _ in range(50):
        x = rng.uniform(sp.lower, sp.upper)
        cols = cmap.columns(x)
        d, e = cols.numeric["density"], cols.numeric["epsilon"]
        live = ~np.isnan(d)
        assert ((d - e > 0) & (d + e <= 1))[live].all()
    x = np.where([g.param == "density" for g in sp.genes], 0.9, np.where([g.param == "epsilon" for g in sp.genes],
                                                                         0.2, sp.x0))
    assert np.allclose(cmap.columns(x).numeric["epsilon"][~np.isnan(d)], della_epsilon_limit(0.9))
    ResidentMerger(sp.recipe(sp.x0)).merged(cmap.columns(x))  # merges: no error
    # density searched with epsilon at its default (0.15): density is kept where that fits
    dens = Space("della", experts(family), base_model=str(family["base"]), search=["weight", "density"],
                 granularity=granularity, **extra)
    dmap = dens.compile(Merger(dens.recipe(dens.x0)).tasks)
    for x in (dens.lower, dens.upper, *(rng.uniform(dens.lower, dens.upper) for _ in range(20))):
        cols = dmap.columns(x)
        d, e = cols.numeric["density"], cols.numeric["epsilon"]
        live = ~np.isnan(d)
        assert ((d - e > 0) & (d + e <= 1))[live].all()
    # with density fixed, epsilon is clipped to what that one value allows
    fixed = Space("della", experts(family), base_model=str(family["base"]), search=["epsilon"],
                  fixed={"density": 0.1}, granularity="per_model")
    assert fixed.recipe_dict(np.full(len(fixed), 0.2))["models"][0]["parameters"]["epsilon"] == pytest.approx(
        della_epsilon_limit(0.1))


def test_per_model_values_follow_each_models_own_tensor_a_tied_head_reads(tmp_path):
    """An untied base with tied experts: each expert's lm_head is its embedding. The engine
    filters an expert's per-model values by that tensor's name (the embedding's), and so
    does the compiled map (it used the output's, lm_head's: other values than the recipe)."""
    base = tiny_family(tmp_path / "untied", n_experts=1, layers=2, hidden=32, tie=False)["base"]
    tied = tiny_family(tmp_path / "tied", n_experts=2, layers=2, hidden=32, tie=True)
    sp = Space("task_arithmetic", [str(tied["expert_0"]), str(tied["expert_1"])], base_model=str(base),
               search=["weight"], granularity="per_layer")
    template = Merger(sp.recipe(sp.x0))
    head = next(i for i, t in enumerate(template.tasks) if t.name == "lm_head.weight")
    assert template.tasks[head].inputs[0][1] == "model.embed_tokens.weight"  # the case at hand
    cmap = sp.compile(template.tasks)
    x = np.random.default_rng(0).uniform(sp.lower, sp.upper, len(sp))
    eng = Merger(sp.recipe(x), checkpoints=template.models)
    for i, t in enumerate(eng.tasks):
        assert cmap.columns(x).params(i) == eng.params(t), t.name


def merged_into_live_model(family):
    """A TIES space, its resident engine and compiled map, and a live model that received
    the space's first candidate."""
    sp = Space("ties", experts(family), base_model=str(family["base"]), search=["weight", "density"],
               granularity="per_model")
    engine = ResidentMerger(sp.recipe(sp.x0))
    cmap = sp.compile(engine.tasks)
    model = live_model(family)
    engine.materialize(cmap.columns(sp.x0), into=model)
    return sp, engine, cmap, model


def test_a_live_model_whose_parameters_were_replaced_gets_the_next_candidate(family):
    """The live model's parameters are looked up for every candidate: after
    load_state_dict(..., assign=True) swaps them, a candidate lands in the new ones."""
    sp, engine, cmap, model = merged_into_live_model(family)
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    x = np.full(len(sp), 0.9)
    engine.materialize(cmap.columns(x), into=model)
    want = engine.merged(cmap.columns(x))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), want[name]), name


def test_a_replaced_submodule_gets_the_next_candidate_and_a_misshapen_parameter_is_named(family):
    """The fast lookup of the live model's tensors walks each one's module path again: a
    submodule swapped in after a candidate receives the next one, and a parameter replaced
    by one of another shape is named, not written past; a dropped model is not kept alive."""
    import copy
    import gc
    import weakref

    from evomerge.merge.engine import MergeError

    sp, engine, cmap, model = merged_into_live_model(family)
    layer = model.model.layers[0]
    layer.mlp = copy.deepcopy(layer.mlp)  # new parameters, under the same names
    x = np.full(len(sp), 0.8)
    engine.materialize(cmap.columns(x), into=model)
    want = engine.merged(cmap.columns(x))
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), want[name]), name
    proj = layer.mlp.down_proj
    shape = tuple(proj.weight.shape)
    proj.weight = torch.nn.Parameter(torch.zeros(shape[0], shape[1] + 1))
    with pytest.raises(MergeError, match=r"tensor 'model\.layers\.0\.mlp\.down_proj\.weight': merged shape"):
        engine.materialize(cmap.columns(x), into=model)
    # the same Parameter given other data (a broadcasting copy would have taken a row)
    proj.weight = torch.nn.Parameter(torch.zeros(shape))
    engine.materialize(cmap.columns(x), into=model)
    proj.weight.data = torch.zeros(1, shape[1])
    with pytest.raises(MergeError, match=r"down_proj\.weight': merged shape"):
        engine.materialize(cmap.columns(x), into=model)
    gone = weakref.ref(model)
    other = live_model(family)
    del model, layer, proj
    gc.collect()
    assert gone() is None, "the engine keeps no strong reference to a model it merged into"
    engine.materialize(cmap.columns(x), into=other)  # and takes the next one


def test_columns_of_another_plan_are_refused(family):
    """Columns compiled for the same models in another order (or other tensors) would pair
    weights with the wrong models: the engine refuses them."""
    sp = Space("task_arithmetic", experts(family), base_model=str(family["base"]), search=["weight"],
               granularity="per_model")
    other = Space("task_arithmetic", experts(family)[::-1], base_model=str(family["base"]), search=["weight"],
                  granularity="per_model")
    engine = ResidentMerger(sp.recipe(sp.x0))
    foreign = other.compile(Merger(other.recipe(other.x0)).tasks).columns(other.x0)
    with pytest.raises(Exception, match="another plan"):
        engine.merged(foreign)
    engine.merged(sp.compile(engine.tasks).columns(sp.x0))  # its own are taken


def test_store_dtype_bf16_halves_memory_and_stays_close(family):
    sp = Space("task_arithmetic", experts(family), base_model=str(family["base"]), search=["weight"],
               granularity="per_model")
    full = ResidentMerger(sp.recipe(sp.x0))
    half = ResidentMerger(sp.recipe(sp.x0), store_dtype="bfloat16")
    assert half.nbytes * 2 == full.nbytes
    x = np.full(len(sp), 0.4)
    a, b = full.merged(sp.recipe(x)), half.merged(sp.recipe(x))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-2, rtol=2e-2)


def test_a_recipe_over_other_models_is_refused(family):
    sp = Space("task_arithmetic", experts(family), base_model=str(family["base"]), search=["weight"])
    engine = ResidentMerger(sp.recipe(sp.x0))
    other = Space("task_arithmetic", experts(family, 2), base_model=str(family["base"]), search=["weight"])
    with pytest.raises(Exception, match="other models"):
        engine.materialize(other.recipe(other.x0), into=live_model(family))


def test_exported_yaml_loads_as_a_recipe(family, tmp_path):
    sp = Space("ties", experts(family), base_model=str(family["base"]), search=["weight", "density"],
               granularity="per_layer", layer_granularity=2)
    p = tmp_path / "r.yaml"
    p.write_text(sp.recipe_yaml(sp.x0))
    r = load_recipe(p)
    assert r.method.name == "ties"


def test_a_candidate_with_non_finite_weights_is_named(family):
    from evomerge.recipe import parse_recipe

    def recipe(w):  # a sum of two models whose norm weights are 1.0
        return parse_recipe({"merge_method": "linear", "parameters": {"normalize": False},
                             "models": [{"model": m, "parameters": {"weight": w}} for m in experts(family, 2)]})

    engine = ResidentMerger(recipe(0.5))
    model = live_model(family)
    engine.materialize(recipe(1e38), into=model)  # huge but finite: accepted
    with pytest.raises(Exception, match="tensor '.*norm.*': the merged values are not finite"):
        engine.materialize(recipe(3e38), into=model)
