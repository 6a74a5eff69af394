"""The fused CPU kernels give, bit for bit, the weights of the torch path they replace,
for every method they serve, every input and output dtype, and tensors large enough for
the streamed threshold search (with the runs of equal magnitudes bf16 makes)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.merge import native
from evomerge.merge.methods import EXACT_SELECT_MAX, METHODS

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the kernels are built for POSIX systems")

SERVED = ["linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"]


def test_the_kernels_build_here():
    """Where a C compiler exists (CI has one), the kernels must build and load: a silent
    fall-back to the torch path would hide a broken build."""
    assert native.library() is not None


def call(method, base, tensors, out_dtype, **params):
    fn = METHODS[method].fn
    k = len(tensors)
    kw = dict(weight=params.get("weight", [0.7, -0.4, 0.55][:k]))
    if method != "linear":
        kw["lambda_"] = params.get("lambda_", 1.0)
        kw["normalize"] = params.get("normalize", method in ("ties",))
    else:
        kw["normalize"] = params.get("normalize", True)
    if method not in ("linear", "task_arithmetic"):
        kw["density"] = params.get("density", [0.3] * k)
    if method.startswith("dare"):
        kw["seeds"] = params.get("seeds", [11 + i for i in range(k)])
        kw["rescale"] = params.get("rescale", True)
    if method.startswith("breadcrumbs"):
        kw["gamma"] = params.get("gamma", [0.05] * k)
    if method == "linear":
        return fn(None, [base, *tensors], out_dtype=out_dtype, **kw)
    return fn(base, tensors, out_dtype=out_dtype, **kw)


@contextlib.contextmanager
def kernels_run():
    """Fails the block unless the fused kernels served at least one call in it."""
    used = []
    real = native.active

    def spy(*ts):
        lib = real(*ts)
        used.append(lib is not None)
        return lib

    native.active = spy
    try:
        yield
    finally:
        native.active = real
    assert any(used), "the fused kernels did not run"


def both(method, base, tensors, out_dtype, **params):
    """The torch path's result and the kernels' (checked to have run)."""
    with native.disabled():
        ref = call(method, base, tensors, out_dtype, **params)
    with kernels_run():
        got = call(method, base, tensors, out_dtype, **params)
    return ref, got


def same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    ia = a.reshape(-1).view(torch.int16 if a.element_size() == 2 else torch.int32)
    ib = b.reshape(-1).view(torch.int16 if b.element_size() == 2 else torch.int32)
    bad = (ia != ib).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} entries differ, first at {bad[:5].tolist()}: {a.reshape(-1)[bad[:5]]} vs {b.reshape(-1)[bad[:5]]}"


def family(n, k, dtype, seed, scale=0.01, zeros=0.0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    tensors = [base + torch.randn(n, generator=g) * scale for _ in range(k)]
    if zeros:
        z = torch.rand(n, generator=g) < zeros
        base[z] = 0
        tensors[0][z] = 0  # an unchanged entry: a task vector of exactly zero
    return base.to(dtype), [t.to(dtype) for t in tensors]


@pytest.mark.parametrize("method", SERVED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_large_tensors_match_the_torch_path(method, dtype):
    """Above EXACT_SELECT_MAX the thresholds come from the streamed band pass."""
    n = EXACT_SELECT_MAX * 3 + 12345
    base, tensors = family(n, 3, dtype, seed=1, zeros=0.01)
    for out_dtype in {dtype, torch.float32}:
        ref, got = both(method, base, tensors, out_dtype)
        same_bits(ref, got)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(SERVED),
    n=st.sampled_from([1, 7, 2047, 2049, 5000, EXACT_SELECT_MAX + 3]),
    k=st.integers(1, 6),  # the kernels draw up to four DARE streams at once, then three, two, one
    dtype=st.sampled_from([torch.bfloat16, torch.float32]),
    density=st.sampled_from([1e-6, 0.1, 0.5, 0.97, 1.0]),
    lam=st.sampled_from([1.0, 0.6, -1.3]),
    normalize=st.booleans(),
    rescale=st.sampled_from([True, False]),
    w0=st.sampled_from([0.0, 1.0, -0.5, 0.35]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_parameters_match_the_torch_path(method, n, k, dtype, density, lam, normalize, rescale, w0, seed):
    base, tensors = family(n, k, dtype, seed=seed % 1000, scale=0.05, zeros=0.05)
    weight = [w0, 0.5, -0.25, 0.8, 0.1, -0.6][:k]
    if method == "linear" and normalize and abs(w0 + 1.0 + sum(weight[1:])) < 1e-6:
        normalize = False  # linear refuses weights summing to zero
    params = dict(weight=weight if method != "linear" else [1.0, *weight], lambda_=lam, normalize=normalize,
                  density=[density] * k, rescale=rescale, seeds=[seed + i for i in range(k)])
    ref, got = both(method, base, tensors, dtype, **params)
    same_bits(ref, got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_the_portable_build_gives_the_same_bits(tmp_path, monkeypatch, dtype):
    """Where ``-march=native`` does not build, the kernels are built for the generic CPU:
    narrower vectors (and float16 converted in software) must give the same bits."""
    import subprocess as sp

    def portable(cc, out):  # the second of _build's attempts: no -march
        out.parent.mkdir(parents=True, exist_ok=True)
        r = sp.run([cc, *native.FLAGS, str(native.SOURCE), "-o", str(out), "-lm"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_build", portable)
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_tried", False)
    assert native.library() is not None and str(tmp_path) in native.library()._name
    if dtype == torch.float16 and not native.library().em_has_f16():
        pytest.skip("this compiler has no _Float16: float16 takes the torch path")
    for k in (3, 4):  # DARE's streams three at a time, and four in one vector
        base, tensors = family(2 * 2047 + 5, k, dtype, seed=k, scale=0.05, zeros=0.05)
        for method in SERVED:
            params = dict(weight=[0.7, -0.4, 0.55, 0.3][:k], density=[0.4] * k, seeds=[5 + i for i in range(k)],
                          gamma=[0.05] * k, normalize=True)
            ref, got = both(method, base, tensors, dtype, **params)
            same_bits(ref, got)


def test_dare_stream_is_numpys_sfc64():
    """The kernel draws DARE's uniforms from the same SFC64 stream as NumPy: a density of
    exactly one half keeps the entries whose 16-bit uniform is below 32768."""
    n = 10_001
    base = torch.zeros(n)
    t = torch.ones(n)
    with kernels_run():
        got = METHODS["dare_linear"].fn(base, [t], weight=[1.0], density=[0.5], seeds=[1234], rescale=False)
    raw = np.random.SFC64(1234).random_raw((n + 3) // 4).view(np.uint16)[:n]
    assert torch.equal(got, torch.from_numpy((raw < 32768).astype(np.float32)))


@pytest.mark.parametrize("k", [4, 5, 7, 8])
def test_many_dare_streams_drawn_together_are_each_numpys(k):
    """The kernel draws four models' streams at once (one per vector lane), then the rest
    three, two or one at a time: each model's mask is still its own NumPy stream's."""
    n = 3_001
    base = torch.zeros(n)
    seeds = [99 + 7 * i for i in range(k)]
    with kernels_run():
        got = METHODS["dare_linear"].fn(base, [torch.full((n,), float(2**i)) for i in range(k)], weight=[1.0] * k,
                                        density=[0.5] * k, seeds=seeds, rescale=False)
    want = sum((np.random.SFC64(s).random_raw((n + 3) // 4).view(np.uint16)[:n] < 32768) * float(2**i)
               for i, s in enumerate(seeds))
    assert torch.equal(got, torch.from_numpy(want.astype(np.float32)))


@pytest.mark.parametrize("method", ["linear", "ties", "dare_ties"])
def test_a_non_finite_input_still_names_the_culprit(tmp_path, method):
    from safetensors.torch import load_file, save_file

    from evomerge.merge.engine import Merger, MergeError
    from evomerge.recipe import parse_recipe
    from evomerge.testing import tiny_family

    fam = tiny_family(tmp_path, n_experts=2, layers=2, hidden=32)
    f = fam["expert_1"] / "model.safetensors"
    sd = load_file(str(f))
    sd["model.layers.1.mlp.up_proj.weight"][5, 6] = float("nan")
    save_file(sd, str(f))
    p = {"weight": 0.5} if method == "linear" else {"weight": 0.5, "density": 0.5}
    rec = {"merge_method": method, "models": [{"model": str(fam[f"expert_{i}"]), "parameters": p} for i in range(2)]}
    if method != "linear":
        rec["base_model"] = str(fam["base"])
    rec = parse_recipe(rec)
    with pytest.raises(MergeError, match="expert_1.*model.layers.1.mlp.up_proj.weight"):
        Merger(rec).write(tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_without_a_compiler_merges_take_the_torch_path(tmp_path):
    """No compiler on PATH and an empty cache: a merge still runs, on the torch path."""
    code = ("from evomerge.merge import native; import torch;"
            "from evomerge.merge.methods import task_arithmetic as ta;"
            "b=torch.zeros(10); r=ta(b,[torch.ones(10)],[0.5]);"
            "assert native.library() is None and torch.equal(r, torch.full((10,), 0.5)); print('ok')")
    env = dict(os.environ, PATH=str(tmp_path), CC="", EVOMERGE_CACHE=str(tmp_path / "cache"))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ok" in r.stdout and "torch path" in r.stderr


@pytest.mark.parametrize("method", ["ties", "dare_ties", "linear"])
def test_lanes_write_the_same_files(tmp_path, method, monkeypatch):
    """Merging two tensors at a time on threads writes byte for byte the folder that one
    at a time does, sharded or not, with direct I/O or through the page cache; the torch
    path writes it too."""
    from evomerge.merge.engine import Merger
    from evomerge.recipe import parse_recipe
    from evomerge.testing import tiny_family

    fam = tiny_family(tmp_path / "fam", n_experts=3, layers=3, hidden=64, dtype=torch.bfloat16, scale=0.05)
    p = {"weight": 0.4} if method == "linear" else {"weight": 0.4, "density": [0.2, 0.6]}
    rec = {"merge_method": method, "models": [{"model": str(fam[f"expert_{i}"]), "parameters": p} for i in range(3)]}
    if method != "linear":
        rec["base_model"] = str(fam["base"])
    rec = parse_recipe(rec)
    outs = {}
    for lanes in (1, 2):
        monkeypatch.setenv("EVOMERGE_DIRECT_IO", "1" if lanes == 2 else "0")
        eng = Merger(rec, seed=5)
        outs[lanes] = eng.write(tmp_path / f"out{lanes}", shard_size="40KB", lanes=lanes, progress=False)
    with native.disabled():
        outs["torch"] = Merger(rec, seed=5).write(tmp_path / "outt", shard_size="40KB", progress=False)
    shards = sorted(p.name for p in outs[1].glob("*.safetensors"))
    assert len(shards) > 1
    for other in (2, "torch"):
        assert sorted(p.name for p in outs[other].glob("*.safetensors")) == shards
        for f in shards:
            assert (outs[other] / f).read_bytes() == (outs[1] / f).read_bytes(), (other, f)


@pytest.mark.parametrize("torch_path", [False, True])
def test_an_overflowing_result_is_refused(tmp_path, torch_path):
    """Finite inputs whose merge overflows the output dtype: the kernels' own check
    reports it like the torch path's, and nothing is written."""

    from safetensors.torch import load_file, save_file

    from evomerge.merge.engine import Merger, MergeError
    from evomerge.recipe import parse_recipe
    from evomerge.testing import tiny_family

    fam = tiny_family(tmp_path, n_experts=2, layers=2, hidden=32)
    name = "model.layers.0.mlp.down_proj.weight"
    for m in ("expert_0", "expert_1"):
        f = fam[m] / "model.safetensors"
        sd = load_file(str(f))
        sd[name][1, 2] = 3e38
        save_file(sd, str(f))
    rec = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
                        "models": [{"model": str(fam[f"expert_{i}"]), "parameters": {"weight": 1.0}}
                                   for i in range(2)]})
    with native.disabled() if torch_path else contextlib.nullcontext():
        with pytest.raises(MergeError, match=f"{name}.*overflow"):
            Merger(rec).write(tmp_path / "out", progress=False, lanes=1)
    assert not (tmp_path / "out").exists()


def test_a_stale_finite_report_does_not_vouch_for_the_next_result(tmp_path):
    """A kernel's 'all finite' is remembered for the tensor it wrote; a later result
    written into the same memory by the torch path (DELLA) must still be checked."""
    from evomerge.merge.engine import Merger, MergeError
    from evomerge.recipe import parse_recipe
    from evomerge.testing import tiny_family

    fam = tiny_family(tmp_path, n_experts=1, layers=2, hidden=32)
    rec = parse_recipe({"merge_method": "della", "base_model": str(fam["base"]),
                        "models": [{"model": str(fam["expert_0"]),
                                    "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}}]})
    eng = Merger(rec)
    task = next(t for t in eng.tasks if not t.copy and len(eng.shape(t)) == 2)
    raw = eng._read(task)
    base, tensors = eng._prepare(task, raw)
    tensors = [tensors[0].clone()]
    tensors[0].view(-1)[0] = float("nan")
    out = torch.empty(eng.shape(task), dtype=eng.output_dtype(task))
    native.checked(out, 0)  # a kernel said this memory held finite values
    res = eng.compute(task, eng.params(task), base, tensors, out=out)
    with pytest.raises(MergeError, match="overflow|NaN"):
        eng._check_finite(task, res, [raw[0], tensors[0]])


def test_lanes_only_where_the_kernels_merge(tmp_path, monkeypatch):
    """Several lanes for the methods the kernels serve (one per torch thread, at most
    MAX_LANES); one for the torch-path methods, and one without the kernels."""
    from evomerge.merge.engine import Merger
    from evomerge.recipe import parse_recipe
    from evomerge.testing import tiny_family

    fam = tiny_family(tmp_path / "fam", n_experts=2, layers=2, hidden=32)
    models = [{"model": str(fam[f"expert_{i}"]), "parameters": {"weight": 0.5}} for i in range(2)]
    ta = parse_recipe({"merge_method": "task_arithmetic", "base_model": str(fam["base"]), "models": models})
    sl = parse_recipe({"merge_method": "slerp", "base_model": str(fam["base"]),
                       "models": [{"model": str(fam["expert_0"])}], "parameters": {"t": 0.3}})
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert Merger(ta).lanes() == Merger.MAX_LANES
    assert Merger(sl).lanes() == 1
    with native.disabled():
        assert Merger(ta).lanes() == 1
