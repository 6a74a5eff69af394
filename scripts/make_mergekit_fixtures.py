"""Regenerate ``tests/fixtures/mergekit_parity.json.gz``: mergekit's own output for a set of
recipes on a tiny Llama family, so that ``tests/test_mergekit_parity.py`` can check, in CI
and without mergekit, that evomerge writes the same weights.

mergekit is NOT a dependency of evomerge (and none of its code is copied here). To
regenerate the fixture, install it into a separate virtual environment that sees the
same torch, then point this script at its ``mergekit-yaml``::

    python -m venv --system-site-packages /tmp/mkvenv
    /tmp/mkvenv/bin/pip install mergekit==0.1.5
    python scripts/make_mergekit_fixtures.py --mergekit-yaml /tmp/mkvenv/bin/mergekit-yaml

(run from the repository root with the Python that has evomerge installed; the script
only uses mergekit through its command line, as ``mergekit-yaml RECIPE OUT --random-seed 0``).

What it does:

1. builds a tiny Llama family deterministically with ``evomerge.testing.tiny_family``
   (hidden size 8, 3 layers, float32): an untied family (``base``, ``expert_0..2``), a
   ``near`` model (``base + 0.01 * (expert_0 - base)``, nearly collinear with the base so
   SLERP takes its linear fallback) and a tied-embedding family (``tied_base``,
   ``tied_expert_0..1``);
2. writes each recipe of ``RECIPES`` (model paths are placeholders such as ``{base}``)
   and runs ``mergekit-yaml`` on it;
3. stores in one gzipped JSON file: every input model's ``config.json`` and tensors
   (name -> shape and flat list of float32 values), every recipe, and mergekit's output
   config and tensors for each recipe.

The methods covered are the deterministic ones (linear, task_arithmetic, ties,
breadcrumbs, breadcrumbs_ties, slerp, model_stock, passthrough); the random ones (DARE,
DELLA) cannot match draw for draw and are not compared.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "mergekit_parity.json.gz"

HIDDEN = 8
LAYERS = 3

# Filtered settings: the first entry whose filter is a substring of the tensor name wins.
ATTN_MLP_WEIGHT = [
    {"filter": "self_attn", "value": [0.9, 0.2]},
    {"filter": "mlp", "value": 0.4},
    {"value": 0.7},
]
SLERP_T = [
    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
    {"value": 0.5},
]

# name -> recipe (mergekit YAML as a mapping). Every recipe merges in float32.
RECIPES: dict[str, dict] = {
    "linear_gradient": {
        "merge_method": "linear",
        "models": [
            {"model": "{expert_0}", "parameters": {"weight": [1.0, 0.3]}},
            {"model": "{expert_1}", "parameters": {"weight": [0.2, 0.7, 0.4, 0.9]}},
            {"model": "{base}", "parameters": {"weight": 0.5}},
        ],
        "dtype": "float32",
    },
    "linear_filtered_no_normalize": {
        "merge_method": "linear",
        "models": [
            {"model": "{expert_0}", "parameters": {"weight": ATTN_MLP_WEIGHT}},
            {"model": "{expert_1}", "parameters": {"weight": 0.35}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    },
    "linear_base_added_global_weight": {
        # The base is not listed: both tools add it as one more input, weighted by the
        # recipe-level weight.
        "merge_method": "linear",
        "base_model": "{base}",
        "models": [
            {"model": "{expert_0}", "parameters": {"weight": 0.6}},
            {"model": "{expert_2}", "parameters": {"weight": [0.1, 0.9]}},
        ],
        "parameters": {"weight": 0.3},
        "dtype": "float32",
    },
    "task_arithmetic_slices": {
        # Two merged slices (4 output layers): t restarts in each slice, embeddings take the
        # first slice's settings and the final norm/head the last slice's, and the second
        # slice has its own base model.
        "merge_method": "task_arithmetic",
        "base_model": "{base}",
        "slices": [
            {
                "sources": [
                    {"model": "{base}", "layer_range": [0, 2]},
                    {"model": "{expert_0}", "layer_range": [0, 2], "parameters": {"weight": [0.2, 0.8]}},
                    {"model": "{expert_1}", "layer_range": [0, 2]},
                ],
                "parameters": {"weight": 0.5},
            },
            {
                "base_model": "{expert_2}",
                "sources": [
                    {"model": "{expert_2}", "layer_range": [1, 3]},
                    {"model": "{expert_0}", "layer_range": [1, 3]},
                    {"model": "{expert_1}", "layer_range": [1, 3], "parameters": {"weight": -0.3}},
                ],
                "parameters": {"weight": [{"filter": "mlp", "value": 1.0}, {"value": 0.4}], "lambda": 0.9},
            },
        ],
        "parameters": {"lambda": 1.1},
        "dtype": "float32",
    },
    "task_arithmetic_basic": {
        "merge_method": "task_arithmetic",
        "base_model": "{base}",
        "models": [
            {"model": "{expert_0}", "parameters": {"weight": 0.7}},
            {"model": "{expert_1}", "parameters": {"weight": 0.5}},
            {"model": "{expert_2}", "parameters": {"weight": 0.3}},
        ],
        "dtype": "float32",
    },
    "task_arithmetic_negative_lambda_gradient": {
        "merge_method": "task_arithmetic",
        "base_model": "{base}",
        "models": [
            {"model": "{expert_0}", "parameters": {"weight": [1.0, 0.4]}},
            {"model": "{expert_1}", "parameters": {"weight": -0.5}},
        ],
        "parameters": {"lambda": 0.8},
        "dtype": "float32",
    },
    "task_arithmetic_normalize_filtered": {
        "merge_method": "task_arithmetic",
        "base_model": "{base}",
        "models": [
            {"model": "{expert_0}", "parameters": {"weight": ATTN_MLP_WEIGHT}},
            {"model": "{expert_1}", "parameters": {"weight": [0.3, 0.6, 0.1]}},
            {"model": "{expert_2}", "parameters": {"weight": 0.25}},
        ],
        "parameters": {"normalize": True, "lambda": 1.3},
        "dtype": "float32",
    },
    "ties_default": {
        "merge_method": "ties",
        "base_model": "{base}",
        "models": [
            {"model": "{expert_0}", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "{expert_1}", "parameters": {"weight": 0.6, "density": 0.7}},
            {"model": "{expert_2}", "parameters": {"weight": [0.2, 0.8], "density": 0.3}},
        ],
        "dtype": "float32",
    },
    "ties_no_normalize_gradients_filters": {
        "merge_method": "ties",
        "base_model": "{base}",
        "models": [
            {"model": "{expert_0}", "parameters": {"weight": ATTN_MLP_WEIGHT, "density": [0.2, 0.9]}},
            {"model": "{expert_1}", "parameters": {
                "weight": -0.4,
                "density": [{"filter": "mlp", "value": 0.6}, {"value": [0.8, 0.3, 0.5]}],
            }},
        ],
        "parameters": {"normalize": False, "lambda": 1.2},
        "dtype": "float32",
    },
    "ties_rescale": {
        "merge_method": "ties",
        "base_model": "{base}",
        "models": [
            {"model": "{expert_0}", "parameters": {"weight": 0.7, "density": 0.4}},
            {"model": "{expert_1}", "parameters": {"weight": 0.5, "density": 0.6}},
        ],
        "parameters": {"rescale": True},
        "dtype": "float32",
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": "{base}",
        "models": [
            {"model": "{expert_0}", "parameters": {"weight": 0.8, "density": 0.8, "gamma": 0.05}},
            {"model": "{expert_1}", "parameters": {"weight": [0.3, 0.9], "density": [0.5, 0.9], "gamma": 0.1}},
        ],
        "dtype": "float32",
    },
    "breadcrumbs_ties_normalize": {
        "merge_method": "breadcrumbs_ties",
        "base_model": "{base}",
        "models": [
            {"model": "{expert_0}", "parameters": {
                "weight": 1.0, "density": 0.7,
                "gamma": [{"filter": "self_attn", "value": 0.02}, {"value": 0.15}],
            }},
            {"model": "{expert_1}", "parameters": {"weight": 0.5, "density": [0.4, 0.9]}},
            {"model": "{expert_2}", "parameters": {"weight": 0.8, "density": 0.6, "gamma": 0.05}},
        ],
        "parameters": {"normalize": True},
        "dtype": "float32",
    },
    "slerp_scalar": {
        "merge_method": "slerp",
        "base_model": "{base}",
        "models": [{"model": "{base}"}, {"model": "{expert_0}"}],
        "parameters": {"t": 0.3},
        "dtype": "float32",
    },
    "slerp_filtered_gradient": {
        "merge_method": "slerp",
        "base_model": "{expert_1}",
        "models": [{"model": "{expert_1}"}, {"model": "{expert_2}"}],
        "parameters": {"t": SLERP_T},
        "dtype": "float32",
    },
    "slerp_slices_near_collinear": {
        # `near` is almost collinear with `base`: SLERP falls back to linear interpolation.
        "merge_method": "slerp",
        "base_model": "{base}",
        "slices": [{
            "sources": [
                {"model": "{base}", "layer_range": [0, LAYERS]},
                {"model": "{near}", "layer_range": [0, LAYERS]},
            ],
            "parameters": {"t": [0.1, 0.9]},
        }],
        "dtype": "float32",
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": "{base}",
        "models": [{"model": "{expert_0}"}, {"model": "{expert_1}"}, {"model": "{expert_2}"}],
        "dtype": "float32",
    },
    "model_stock_filter_wise": {
        "merge_method": "model_stock",
        "base_model": "{base}",
        "models": [{"model": "{expert_0}"}, {"model": "{expert_1}"}],
        "parameters": {"filter_wise": True},
        "dtype": "float32",
    },
    "passthrough_upscale": {
        # Depth up-scaling: layers 0-1 of expert_0, then layers 1-2 of expert_1 (4 layers).
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "{expert_0}", "layer_range": [0, 2]}]},
            {"sources": [{"model": "{expert_1}", "layer_range": [1, 3]}]},
        ],
        "dtype": "float32",
    },
    "passthrough_scaled_slices": {
        # SOLAR-style: o_proj and down_proj scaled in the repeated slice.
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": "{base}", "layer_range": [0, 3]}]},
            {"sources": [{"model": "{expert_2}", "layer_range": [1, 3], "parameters": {
                "scale": [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": [0.25, 0.75]},
                          {"value": 1.0}],
            }}]},
        ],
        "dtype": "float32",
    },
    "tied_task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": "{tied_base}",
        "models": [
            {"model": "{tied_expert_0}", "parameters": {"weight": [0.6, 1.1]}},
            {"model": "{tied_expert_1}", "parameters": {"weight": 0.4}},
        ],
        "dtype": "float32",
    },
    "tied_ties": {
        "merge_method": "ties",
        "base_model": "{tied_base}",
        "models": [
            {"model": "{tied_expert_0}", "parameters": {"weight": 0.9, "density": 0.5}},
            {"model": "{tied_expert_1}", "parameters": {"weight": 0.6, "density": [0.3, 0.8]}},
        ],
        "dtype": "float32",
    },
}


def _substitute(obj, paths: dict[str, str]):
    if isinstance(obj, str):
        return obj.format(**paths) if obj.startswith("{") else obj
    if isinstance(obj, list):
        return [_substitute(x, paths) for x in obj]
    if isinstance(obj, dict):
        return {k: _substitute(v, paths) for k, v in obj.items()}
    return obj


def _floats(t: torch.Tensor) -> list[float]:
    # The shortest decimal that reads back as the same float32 (keeps the file small).
    return [float(str(x)) for x in t.detach().to(torch.float32).reshape(-1).numpy()]


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def _encode(tensors: dict[str, torch.Tensor]) -> dict:
    return {k: {"shape": list(v.shape), "data": _floats(v)} for k, v in sorted(tensors.items())}


def build_models(root: Path) -> dict[str, Path]:
    from evomerge.testing import tiny_family

    paths = dict(tiny_family(root / "untied", n_experts=3, seed=0, hidden=HIDDEN, layers=LAYERS))
    tied = tiny_family(root / "tied", n_experts=2, seed=1, hidden=HIDDEN, layers=LAYERS, tie=True)
    for k, v in tied.items():
        paths[f"tied_{k}"] = v
    # `near`: base + 0.01 * (expert_0 - base), nearly collinear with the base.
    near = root / "near"
    shutil.copytree(paths["base"], near)
    base_t, e0 = _read_tensors(paths["base"]), _read_tensors(paths["expert_0"])
    for f in near.glob("*.safetensors"):
        f.unlink()
    save_file({k: (b + 0.01 * (e0[k] - b)).contiguous() for k, b in base_t.items()},
              str(near / "model.safetensors"), metadata={"format": "pt"})
    paths["near"] = near
    return paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit-yaml", default=os.environ.get("MERGEKIT_YAML", "mergekit-yaml"),
                    help="the mergekit-yaml command (from a separate venv; default: $MERGEKIT_YAML or PATH)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--only", nargs="*", help="only these recipes (for debugging; the file is still rewritten)")
    args = ap.parse_args(argv)

    mk = shutil.which(args.mergekit_yaml) or args.mergekit_yaml
    if not Path(mk).exists():
        print(f"mergekit-yaml not found ({args.mergekit_yaml}); see this script's docstring", file=sys.stderr)
        return 2
    version = subprocess.run(
        [str(Path(mk).parent / "python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
        capture_output=True, text=True,
    ).stdout.strip() or "unknown"

    fixture: dict = {
        "format": 1,
        "generator": "scripts/make_mergekit_fixtures.py",
        "mergekit_version": version,
        "torch_version": torch.__version__,
        "models": {},
        "recipes": {},
    }
    with tempfile.TemporaryDirectory(prefix="mk-fixtures-") as tmp:
        tmp = Path(tmp)
        paths = build_models(tmp / "models")
        for name, folder in sorted(paths.items()):
            fixture["models"][name] = {
                "config": json.loads((folder / "config.json").read_text()),
                "tensors": _encode(_read_tensors(folder)),
            }
        str_paths = {k: str(v) for k, v in paths.items()}
        names = args.only or list(RECIPES)
        for name in names:
            recipe = RECIPES[name]
            rfile = tmp / f"{name}.yaml"
            rfile.write_text(yaml.safe_dump(_substitute(copy.deepcopy(recipe), str_paths), sort_keys=False))
            out = tmp / "out" / name
            cmd = [mk, str(rfile), str(out), "--random-seed", "0", "--quiet", "--no-copy-tokenizer",
                   "--no-write-model-card"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"[{name}] mergekit failed:\n{res.stdout}\n{res.stderr}", file=sys.stderr)
                return 1
            tensors = _read_tensors(out)
            fixture["recipes"][name] = {
                "recipe": recipe,
                "mergekit_config": json.loads((out / "config.json").read_text()),
                "tensors": _encode(tensors),
            }
            print(f"[{name}] {len(tensors)} tensors")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw = json.dumps(fixture, separators=(",", ":"), sort_keys=True).encode()
    # mtime=0: the same inputs give a byte-identical file.
    with open(args.out, "wb") as fh, gzip.GzipFile(fileobj=fh, mode="wb", mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB, {len(fixture['recipes'])} recipes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
