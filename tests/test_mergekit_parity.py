"""evomerge writes the same weights as mergekit for its deterministic methods.

``tests/fixtures/mergekit_parity.json.gz`` holds a tiny Llama family, a set of recipes
(gradients, filters, normalize on/off, negative weights, lambda, SLERP with per-layer t,
passthrough slices, tied embeddings) and the tensors mergekit 0.1.5 wrote for each. It is
made by ``scripts/make_mergekit_fixtures.py``; mergekit itself is not needed here.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.merge.engine import Merger
from evomerge.recipe import parse_recipe

FIXTURE = Path(__file__).parent / "fixtures" / "mergekit_parity.json.gz"
ATOL, RTOL = 1e-6, 1e-5


def _load_fixture() -> dict:
    with gzip.open(FIXTURE, "rt") as f:
        return json.load(f)


DATA = _load_fixture()
RECIPES = sorted(DATA["recipes"])


def _tensor(entry: dict) -> torch.Tensor:
    return torch.tensor(entry["data"], dtype=torch.float32).reshape(entry["shape"])


def _substitute(obj, paths: dict[str, str]):
    if isinstance(obj, str):
        return obj.format(**paths) if obj.startswith("{") else obj
    if isinstance(obj, list):
        return [_substitute(x, paths) for x in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, paths) for k, v in obj.items()}
    return obj


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory) -> dict[str, str]:
    """The fixture's input models rebuilt as tokenizer-less model folders."""
    root = tmp_path_factory.mktemp("mergekit_parity_models")
    paths = {}
    for name, m in DATA["models"].items():
        folder = root / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(m["config"], indent=2))
        save_file({k: _tensor(v) for k, v in m["tensors"].items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        paths[name] = str(folder)
    return paths


def _read_output(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def test_fixture_is_complete():
    methods = {DATA["recipes"][r]["recipe"]["merge_method"] for r in RECIPES}
    assert methods >= {"linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties",
                       "slerp", "model_stock", "passthrough"}
    for r in RECIPES:
        assert DATA["recipes"][r]["recipe"]["dtype"] == "float32"


@pytest.mark.parametrize("name", RECIPES)
def test_matches_mergekit(name, model_paths, tmp_path):
    case = DATA["recipes"][name]
    recipe = parse_recipe(_substitute(case["recipe"], model_paths), source=name)
    out = Merger(recipe).write(tmp_path / "out")
    got = _read_output(Path(out))
    want = {k: _tensor(v) for k, v in case["tensors"].items()}

    assert sorted(got) == sorted(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == torch.float32, k
        assert tuple(g.shape) == tuple(w.shape), k
        if not torch.allclose(g, w, atol=ATOL, rtol=RTOL):
            diff = (g - w).abs().max().item()
            pytest.fail(f"{name}: tensor '{k}' differs from mergekit's by up to {diff:.3g}")

    cfg = json.loads((Path(out) / "config.json").read_text())
    assert cfg["num_hidden_layers"] == case["mergekit_config"]["num_hidden_layers"]
    if recipe.merge_method == "passthrough":
        layers = {int(k.split(".")[2]) for k in want if k.startswith("model.layers.")}
        assert cfg["num_hidden_layers"] == len(layers)
