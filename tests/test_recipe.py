"""Tests for recipe parsing, validation and per-tensor parameter resolution."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.merge.methods import METHODS
from evomerge.recipe import (
    ModelRef,
    RecipeError,
    evaluate_setting,
    load_recipe,
    parse_recipe,
)

PROPS = settings(max_examples=80, deadline=None)

ATTN = "model.layers.3.self_attn.q_proj.weight"
MLP = "model.layers.3.mlp.down_proj.weight"
NORM = "model.norm.weight"


# --------------------------------------------------------------------------------------
# evaluate_setting: scalars and gradients
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.3, 2, True, False, "l1", None])
def test_scalars_resolve_to_themselves(value):
    for t in (0.0, 0.4, 1.0):
        assert evaluate_setting(value, ATTN, t) == value
        assert evaluate_setting(value, "", t) == value


def test_two_value_gradient_interpolates():
    assert evaluate_setting([0.0, 1.0], ATTN, 0.0) == 0.0
    assert evaluate_setting([0.0, 1.0], ATTN, 0.25) == pytest.approx(0.25)
    assert evaluate_setting([0.0, 1.0], ATTN, 1.0) == 1.0
    assert evaluate_setting([0.2, 0.8], ATTN, 0.5) == pytest.approx(0.5)
    assert evaluate_setting([1.0, 0.0], ATTN, 0.75) == pytest.approx(0.25)


def test_three_value_gradient_is_piecewise_linear():
    g = [0.0, 1.0, 0.5]  # nodes at t = 0, 0.5, 1
    assert evaluate_setting(g, ATTN, 0.0) == 0.0
    assert evaluate_setting(g, ATTN, 0.25) == pytest.approx(0.5)  # halfway 0 -> 1
    assert evaluate_setting(g, ATTN, 0.5) == pytest.approx(1.0)
    assert evaluate_setting(g, ATTN, 0.75) == pytest.approx(0.75)  # halfway 1 -> 0.5
    assert evaluate_setting(g, ATTN, 1.0) == pytest.approx(0.5)
    assert evaluate_setting(g, ATTN, 0.1) == pytest.approx(0.2)
    assert evaluate_setting(g, ATTN, 0.9) == pytest.approx(0.6)


def test_gradient_over_layers_puts_layer_i_of_n_at_i_over_n_minus_1():
    n = 5
    g = [0.2, 0.8]
    values = [evaluate_setting(g, f"model.layers.{i}.mlp.up_proj.weight", i / (n - 1)) for i in range(n)]
    assert values == pytest.approx([0.2, 0.35, 0.5, 0.65, 0.8])
    # a gradient with one node per layer gives each layer its own value
    g = [1.0, 3.0, 2.0, 7.0]
    values = [evaluate_setting(g, NORM, i / 3) for i in range(4)]
    assert values == pytest.approx(g)


def test_integer_gradients_and_single_values():
    assert evaluate_setting([1, 3], ATTN, 0.5) == pytest.approx(2.0)
    assert evaluate_setting([0.7], ATTN, 0.0) == pytest.approx(0.7)
    assert evaluate_setting([0.7], ATTN, 0.6) == pytest.approx(0.7)
    assert evaluate_setting([0.7], ATTN, 1.0) == pytest.approx(0.7)


def test_empty_list_resolves_to_none():
    assert evaluate_setting([], ATTN, 0.5) is None


def test_bool_lists_pick_a_value_by_position():
    g = [True, False, True]  # values[int(t * 2)]
    assert evaluate_setting(g, ATTN, 0.0) is True
    assert evaluate_setting(g, ATTN, 0.49) is True
    assert evaluate_setting(g, ATTN, 0.5) is False
    assert evaluate_setting(g, ATTN, 0.99) is False
    assert evaluate_setting(g, ATTN, 1.0) is True


def test_string_lists_pick_a_value_by_position():
    g = ["l1", "l2", "linf", "l1"]  # values[int(t * 3)]
    assert evaluate_setting(g, ATTN, 0.0) == "l1"
    assert evaluate_setting(g, ATTN, 0.3) == "l1"
    assert evaluate_setting(g, ATTN, 0.34) == "l2"
    assert evaluate_setting(g, ATTN, 0.7) == "linf"
    assert evaluate_setting(g, ATTN, 1.0) == "l1"


def test_mixed_bool_and_number_list_is_not_interpolated():
    # a bool is not a number here: the list picks instead of interpolating
    assert evaluate_setting([True, 0.5], ATTN, 0.4) is True
    assert evaluate_setting([True, 0.5], ATTN, 1.0) == 0.5


# --------------------------------------------------------------------------------------
# evaluate_setting: filters
# --------------------------------------------------------------------------------------

FILTERED = [
    {"filter": "self_attn", "value": 0.3},
    {"filter": "mlp", "value": 0.5},
    {"value": 0.7},
]


def test_filter_picks_first_matching_substring():
    assert evaluate_setting(FILTERED, ATTN, 0.5) == 0.3
    assert evaluate_setting(FILTERED, MLP, 0.5) == 0.5
    assert evaluate_setting(FILTERED, NORM, 0.5) == 0.7  # no filter: matches all


def test_filter_order_matters():
    s = [{"filter": "proj", "value": 1.0}, {"filter": "q_proj", "value": 2.0}]
    assert evaluate_setting(s, ATTN, 0.0) == 1.0
    s = [{"filter": "q_proj", "value": 2.0}, {"filter": "proj", "value": 1.0}]
    assert evaluate_setting(s, ATTN, 0.0) == 2.0
    assert evaluate_setting(s, MLP, 0.0) == 1.0


def test_star_filter_matches_everything():
    s = [{"filter": "mlp", "value": 0.1}, {"filter": "*", "value": 0.9}]
    assert evaluate_setting(s, MLP, 0.3) == 0.1
    assert evaluate_setting(s, ATTN, 0.3) == 0.9
    assert evaluate_setting(s, NORM, 0.3) == 0.9
    assert evaluate_setting(s, "", 0.3) == 0.9
    # a catch-all first shadows everything after it
    s = [{"filter": "*", "value": 0.9}, {"filter": "mlp", "value": 0.1}]
    assert evaluate_setting(s, MLP, 0.3) == 0.9


def test_no_matching_filter_returns_none():
    s = [{"filter": "self_attn", "value": 0.3}, {"filter": "mlp", "value": 0.5}]
    assert evaluate_setting(s, NORM, 0.5) is None
    assert evaluate_setting(s, "", 0.5) is None
    assert evaluate_setting({"filter": "mlp", "value": 2.0}, ATTN, 0.0) is None


def test_single_filter_mapping():
    assert evaluate_setting({"filter": "mlp", "value": 2.0}, MLP, 0.0) == 2.0
    assert evaluate_setting({"value": 2.0}, NORM, 1.0) == 2.0


def test_filtered_values_can_be_gradients():
    s = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": [1.0, 0.0, 1.0]}]
    assert evaluate_setting(s, MLP, 0.25) == pytest.approx(0.25)
    assert evaluate_setting(s, ATTN, 0.25) == pytest.approx(0.5)
    assert evaluate_setting(s, ATTN, 0.5) == pytest.approx(0.0)
    s = [{"filter": "mlp", "value": [True, False]}]
    assert evaluate_setting(s, MLP, 0.2) is True
    assert evaluate_setting(s, MLP, 1.0) is False


# --------------------------------------------------------------------------------------
# evaluate_setting: properties
# --------------------------------------------------------------------------------------

node_values = st.lists(
    st.floats(min_value=-10.0, max_value=10.0, allow_nan=False, allow_subnormal=False),
    min_size=1, max_size=8,
)


@PROPS
@given(values=node_values, t=st.floats(0.0, 1.0))
def test_prop_gradient_is_linear_interpolation(values, t):
    got = evaluate_setting(values, MLP, t)
    expected = float(np.interp(t, np.linspace(0.0, 1.0, len(values)), values))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)
    assert min(values) - 1e-9 <= got <= max(values) + 1e-9


@PROPS
@given(values=node_values.filter(lambda v: len(v) >= 2), data=st.data())
def test_prop_gradient_hits_nodes_and_is_affine_between_them(values, data):
    n = len(values)
    i = data.draw(st.integers(0, n - 1))
    assert evaluate_setting(values, MLP, i / (n - 1)) == pytest.approx(values[i], rel=1e-9, abs=1e-9)
    j = data.draw(st.integers(0, n - 2))
    a, b = j / (n - 1), (j + 1) / (n - 1)
    u = data.draw(st.floats(0.0, 1.0))
    t = a + u * (b - a)
    # inside a segment the value is the straight line between its two end nodes
    assert evaluate_setting(values, MLP, t) == pytest.approx(
        values[j] + (t - a) / (b - a) * (values[j + 1] - values[j]), rel=1e-7, abs=1e-7
    )


@PROPS
@given(values=st.lists(st.one_of(st.booleans(), st.sampled_from(["l1", "l2", "linf"])), min_size=1, max_size=6),
       t=st.floats(0.0, 1.0))
def test_prop_non_numeric_lists_pick(values, t):
    assert evaluate_setting(values, MLP, t) == values[int(t * (len(values) - 1))]


@PROPS
@given(names=st.lists(st.sampled_from(["self_attn", "mlp", "norm", "embed", "*", None]), min_size=1, max_size=5),
       tensor=st.sampled_from([ATTN, MLP, NORM, "model.embed_tokens.weight", "lm_head.weight"]))
def test_prop_first_matching_filter_wins(names, tensor):
    setting = [{"value": float(i)} if f is None else {"filter": f, "value": float(i)} for i, f in enumerate(names)]
    matches = [i for i, f in enumerate(names) if f is None or f == "*" or f in tensor]
    got = evaluate_setting(setting, tensor, 0.5)
    assert got == (float(matches[0]) if matches else None)


# --------------------------------------------------------------------------------------
# parse_recipe: valid recipes
# --------------------------------------------------------------------------------------


def ties_recipe(**extra):
    d = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/expert-a", "parameters": {"weight": 0.6, "density": [0.2, 0.8]}},
            {"model": "org/expert-b", "parameters": {
                "weight": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}], "density": 0.5}},
        ],
        "parameters": {"lambda": 1.0, "normalize": True},
        "dtype": "bfloat16",
        "out_dtype": "fp16",
    }
    d.update(extra)
    return d


def test_models_form_becomes_one_slice_with_the_base_added():
    r = parse_recipe(ties_recipe())
    assert r.merge_method == "ties" and r.method is METHODS["ties"]
    assert r.uses_models_form
    assert r.base_model == ModelRef("org/base")
    assert len(r.slices) == 1
    srcs = r.slices[0].sources
    assert [str(s.model) for s in srcs] == ["org/expert-a", "org/expert-b", "org/base"]
    assert all(s.layer_range is None for s in srcs)
    assert srcs[0].parameters == {"weight": 0.6, "density": [0.2, 0.8]}
    assert srcs[2].parameters == {}
    assert r.parameters == {"lambda": 1.0, "normalize": True}
    assert (r.dtype, r.out_dtype) == ("bfloat16", "float16")
    assert r.referenced_models() == [ModelRef("org/base"), ModelRef("org/expert-a"), ModelRef("org/expert-b")]


def test_base_listed_among_models_is_not_added_twice():
    d = {"merge_method": "task_arithmetic", "base_model": "b",
         "models": [{"model": "b"}, {"model": "x", "parameters": {"weight": 1.0}}]}
    r = parse_recipe(d)
    assert [str(s.model) for s in r.slices[0].sources] == ["b", "x"]


def test_models_given_as_strings_and_revisions():
    r = parse_recipe({"merge_method": "linear", "models": ["a", "org/m@v2"], "parameters": {"weight": 1.0}})
    assert [s.model for s in r.slices[0].sources] == [ModelRef("a"), ModelRef("org/m", "v2")]
    assert str(r.slices[0].sources[1].model) == "org/m@v2"
    r = parse_recipe({"merge_method": "linear", "models": [{"model": {"path": "org/m", "revision": "abc"}}],
                      "parameters": {"weight": 1.0}})
    assert r.slices[0].sources[0].model == ModelRef("org/m", "abc")


def test_slices_form():
    d = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 24]}]},
            {"sources": [{"model": "b", "layer_range": [8, 32]}], "parameters": {"scale": 0.5}},
        ],
    }
    r = parse_recipe(d)
    assert not r.uses_models_form
    assert [(str(s.sources[0].model), s.sources[0].layer_range) for s in r.slices] == [("a", (0, 24)), ("b", (8, 32))]
    assert r.slices[1].parameters == {"scale": 0.5}


def test_slices_with_a_slice_base_model():
    d = {
        "merge_method": "slerp",
        "slices": [{
            "sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}],
            "base_model": "a",
            "parameters": {"t": [0.0, 0.5, 1.0]},
        }],
    }
    r = parse_recipe(d)
    assert r.slices[0].base_model == ModelRef("a")
    assert r.base_model is None


def test_density_one_is_accepted():
    d = ties_recipe()
    d["models"][0]["parameters"]["density"] = 1.0
    assert parse_recipe(d).slices[0].sources[0].parameters["density"] == 1.0
    d["models"][0]["parameters"]["density"] = 1
    parse_recipe(d)


@PROPS
@given(density=st.floats(-2.0, 3.0, allow_nan=False))
def test_prop_density_accepted_exactly_in_zero_one(density):
    d = ties_recipe()
    d["models"][1]["parameters"]["density"] = density
    if 0.0 < density <= 1.0:
        parse_recipe(d)
    else:
        with pytest.raises(RecipeError, match=r"models\[1\]\.parameters\.density"):
            parse_recipe(d)


def test_yaml_round_trip(tmp_path):
    r = parse_recipe(ties_recipe())
    again = parse_recipe(yaml.safe_load(r.to_yaml()))
    assert again.raw == r.raw
    assert [[(s.model, s.parameters) for s in sl.sources] for sl in again.slices] == \
        [[(s.model, s.parameters) for s in sl.sources] for sl in r.slices]
    p = tmp_path / "recipe.yaml"
    p.write_text(r.to_yaml())
    assert load_recipe(p).raw == r.raw


def test_parse_does_not_modify_its_input():
    d = ties_recipe()
    before = copy.deepcopy(d)
    parse_recipe(d)
    assert d == before


# --------------------------------------------------------------------------------------
# parse_recipe: errors name what is wrong
# --------------------------------------------------------------------------------------


def err(data, **kw) -> str:
    with pytest.raises(RecipeError) as e:
        parse_recipe(data, **kw)
    return str(e.value)


def test_unknown_top_level_key_lists_accepted_keys():
    msg = err(ties_recipe(merge_methd="ties"))
    assert "'merge_methd'" in msg
    assert "accepted:" in msg
    for key in ("merge_method", "base_model", "models", "slices", "parameters", "dtype"):
        assert key in msg.split("accepted:")[1]


def test_source_name_prefixes_messages():
    msg = err(ties_recipe(foo=1), source="my.yaml")
    assert msg.startswith("my.yaml")
    assert "'foo'" in msg


def test_missing_merge_method():
    msg = err({"models": ["a"]})
    assert "merge_method" in msg


def test_unknown_method_lists_accepted_methods():
    msg = err(ties_recipe(merge_method="tiess"))
    assert "'tiess'" in msg and "merge_method" in msg
    accepted = msg.split("accepted:")[1]
    for name in METHODS:
        assert name in accepted


def test_unknown_model_parameter_lists_accepted_parameters():
    d = ties_recipe()
    d["models"][1]["parameters"]["densty"] = 0.5
    msg = err(d)
    assert "models[1].parameters.densty" in msg
    assert "'ties'" in msg
    accepted = msg.split("accepted:")[1]
    for name in ("weight", "density", "lambda", "normalize", "rescale"):
        assert name in accepted


def test_unknown_top_level_parameter():
    d = ties_recipe()
    d["parameters"]["t"] = 0.5  # a slerp parameter
    msg = err(d)
    assert "parameters.t" in msg and "accepted:" in msg


def test_method_without_parameters_of_that_name():
    d = {"merge_method": "model_stock", "base_model": "b", "models": ["x", "y"], "parameters": {"weight": 1.0}}
    msg = err(d)
    assert "parameters.weight" in msg and "'model_stock'" in msg and "filter_wise" in msg


@pytest.mark.parametrize("density", [0, 0.0, 1.5, -0.2, 1.0000001])
def test_density_out_of_range_is_refused(density):
    d = ties_recipe()
    d["models"][0]["parameters"]["density"] = density
    msg = err(d)
    assert "models[0].parameters.density" in msg
    assert "(0.0, 1.0]" in msg


def test_density_out_of_range_inside_gradients_and_filters():
    d = ties_recipe()
    d["models"][0]["parameters"]["density"] = [0.5, 0.0]
    assert "models[0].parameters.density" in err(d)
    d["models"][0]["parameters"]["density"] = [{"filter": "mlp", "value": 1.5}, {"value": 0.5}]
    assert "models[0].parameters.density" in err(d)
    d = ties_recipe()
    d["parameters"]["density"] = 2.0
    assert "parameters.density" in err(d)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "abc", True, [0.5, [0.1]]])
def test_non_numeric_weights_are_refused(bad):
    d = ties_recipe()
    d["models"][0]["parameters"]["weight"] = bad
    assert "models[0].parameters.weight" in err(d)


def test_numeric_strings_are_numbers():
    d = ties_recipe()
    d["models"][0]["parameters"]["weight"] = "0.5"
    parse_recipe(d)


def test_bool_and_rescale_parameters_are_checked():
    d = ties_recipe()
    d["parameters"]["normalize"] = "yes"
    assert "parameters.normalize" in err(d)
    d = ties_recipe()
    d["parameters"]["rescale"] = "l3"
    assert "parameters.rescale" in err(d)
    for ok in (True, False, "l1", "L2", "linf", "true"):
        d = ties_recipe()
        d["parameters"]["rescale"] = ok
        parse_recipe(d)


def test_filtered_setting_needs_a_value_and_known_keys():
    d = ties_recipe()
    d["models"][0]["parameters"]["weight"] = [{"filter": "mlp"}]
    assert "models[0].parameters.weight[0]" in err(d)
    d["models"][0]["parameters"]["weight"] = [{"filter": "mlp", "value": 1.0, "vale": 2}]
    msg = err(d)
    assert "'vale'" in msg and "models[0].parameters.weight" in msg


def test_slerp_t_outside_zero_one():
    d = {"merge_method": "slerp", "base_model": "a", "models": ["a", "b"], "parameters": {"t": [0.0, 1.5]}}
    msg = err(d)
    assert "parameters.t" in msg and "1.5" in msg


def test_both_models_and_slices():
    d = ties_recipe(slices=[{"sources": [{"model": "a", "layer_range": [0, 2]}]}])
    msg = err(d)
    assert "'models'" in msg and "'slices'" in msg


def test_neither_models_nor_slices():
    d = ties_recipe()
    del d["models"]
    msg = err(d)
    assert "'models'" in msg and "'slices'" in msg


def test_empty_models_list():
    assert "models" in err(ties_recipe(models=[]))


def test_slerp_with_two_models_besides_the_base():
    d = {"merge_method": "slerp", "base_model": "base", "models": ["a", "b"], "parameters": {"t": 0.5}}
    msg = err(d)
    assert "models" in msg and "'slerp'" in msg and "at most 1" in msg and "got 2" in msg
    # the base listed among the models does not count
    d["models"] = ["base", "b"]
    parse_recipe(d)


def test_slerp_and_ties_without_base_model():
    d = ties_recipe()
    del d["base_model"]
    msg = err(d)
    assert "base_model" in msg and "'ties'" in msg
    msg = err({"merge_method": "slerp", "models": ["a"], "parameters": {"t": 0.5}})
    assert "base_model" in msg and "'slerp'" in msg


def test_model_stock_needs_two_models():
    msg = err({"merge_method": "model_stock", "base_model": "b", "models": ["b", "x"]})
    assert "'model_stock'" in msg and "at least 2" in msg and "got 1" in msg


def test_linear_needs_no_base():
    r = parse_recipe({"merge_method": "linear", "models": ["a", "b"], "parameters": {"weight": 0.5}})
    assert r.base_model is None


def _slices(*ranges, method="passthrough"):
    return {"merge_method": method, "slices": [{"sources": [{"model": "a", "layer_range": lr}]} for lr in ranges]}


@pytest.mark.parametrize("lr", [[4, 2], [3, 3], [-1, 3], [0], [0, 2, 4], [0, 2.5], [True, 3], "0-4", None])
def test_bad_layer_range(lr):
    msg = err(_slices([0, 2], lr))
    assert "slices[1].sources[0].layer_range" in msg


def test_layer_range_is_required():
    d = {"merge_method": "passthrough", "slices": [{"sources": [{"model": "a"}]}]}
    msg = err(d)
    assert "slices[0].sources[0]" in msg and "layer_range" in msg


def test_slice_sources_with_different_lengths():
    d = {
        "merge_method": "slerp",
        "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 4]}, {"model": "b", "layer_range": [0, 4]}],
             "base_model": "a", "parameters": {"t": 0.5}},
            {"sources": [{"model": "a", "layer_range": [4, 6]}, {"model": "b", "layer_range": [4, 8]}],
             "base_model": "a", "parameters": {"t": 0.5}},
        ],
    }
    msg = err(d)
    assert "slices[1].sources" in msg and "[2, 4]" in msg


def test_unknown_keys_inside_models_and_slices():
    d = ties_recipe()
    d["models"][0]["weight"] = 1.0
    msg = err(d)
    assert "models[0]" in msg and "'weight'" in msg and "accepted: model, parameters" in msg
    d = _slices([0, 2])
    d["slices"][0]["sources"][0]["layers"] = [0, 2]
    assert "'layers'" in err(d)
    d = _slices([0, 2])
    d["slices"][0]["residual_weight"] = 0.5
    assert "slices[0].residual_weight" in err(d)


def test_lora_reference_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder named like the reference
    d = ties_recipe()
    d["models"][1]["model"] = "org/model+org/adapter"
    msg = err(d)
    assert "models[1].model" in msg and "'org/model+org/adapter'" in msg and "LoRA" in msg
    d = ties_recipe(base_model="a+b")
    msg = err(d)
    assert "base_model" in msg and "'a+b'" in msg
    # a local folder whose name contains '+' is a model, not an adapter reference
    (tmp_path / "a+b").mkdir()
    assert parse_recipe(d).base_model == ModelRef("a+b")


def test_bad_model_values():
    d = ties_recipe()
    d["models"][0]["model"] = ""
    assert "models[0].model" in err(d)
    d["models"][0]["model"] = {"path": "x", "rev": "y"}
    assert "models[0].model" in err(d)
    d = ties_recipe()
    d["models"][0] = {"parameters": {"weight": 1.0}}
    assert "models[0]" in err(d) and "'model'" in err(d)


def test_unknown_dtype():
    msg = err(ties_recipe(dtype="int8"))
    assert "dtype" in msg and "'int8'" in msg
    msg = err(ties_recipe(out_dtype="fp8"))
    assert "out_dtype" in msg


@pytest.mark.parametrize("name,canon", [("fp32", "float32"), ("torch.bfloat16", "bfloat16"), ("half", "float16"),
                                        ("float64", "float64")])
def test_dtype_aliases(name, canon):
    assert parse_recipe(ties_recipe(dtype=name)).dtype == canon


def test_not_a_mapping():
    assert "expected a mapping" in err(["merge_method", "ties"])
    assert "recipe.models[0].parameters" in err(ties_recipe(models=[{"model": "a", "parameters": [1]}]))


def test_load_recipe_errors(tmp_path):
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("merge_method: [unclosed\n")
    with pytest.raises(RecipeError, match="bad.yaml"):
        load_recipe(p)
    p = tmp_path / "typo.yaml"
    p.write_text("merge_method: ties\nbase_model: b\nmodels: [a]\nparamters: {}\n")
    with pytest.raises(RecipeError, match=r"typo\.yaml.*'paramters'"):
        load_recipe(p)


# --------------------------------------------------------------------------------------
# Malformed settings are refused; shared settings under a model are flagged
# --------------------------------------------------------------------------------------


def _ties(**model_params):
    return {"merge_method": "ties", "base_model": "/b",
            "models": [{"model": "/e", "parameters": {"weight": 0.5, **model_params}}]}


@pytest.mark.parametrize("setting, needle", [
    ([], "empty list"),
    ([{"filter": "mlp", "value": 0.5}, 0.7], "mixes"),
    ({"filter": "mlp", "value": [[0.5]]}, "value"),
    ([{"filter": "mlp", "value": {"value": 0.5}}], "value"),
])
def test_malformed_settings_are_refused(setting, needle):
    with pytest.raises(RecipeError, match=needle) as e:
        parse_recipe(_ties(density=setting))
    assert "models[0].parameters.density" in str(e.value)


def test_shared_setting_under_a_model_warns_that_it_is_ignored():
    with pytest.warns(UserWarning, match=r"models\[0\]\.parameters\.lambda.*ignored"):
        parse_recipe(_ties(**{"lambda": 0.0}))


def test_paths_are_accepted_as_model_references(tmp_path):
    r = parse_recipe({"merge_method": "linear", "models": [{"model": tmp_path, "parameters": {"weight": 1.0}}]})
    assert r.slices[0].sources[0].model.path == str(tmp_path)
