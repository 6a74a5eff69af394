"""The flat path of the resident engine: every tensor of a candidate merged at once gives
bit for bit the weights of the one-shot, per-tensor merge, whatever the parameters."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evomerge.merge.engine import Merger
from evomerge.merge.flat import FlatGroup
from evomerge.merge.resident import ResidentMerger
from evomerge.recipe import parse_recipe
from evomerge.testing import tiny_family


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    root = tmp_path_factory.mktemp("flat")
    return {
        "float32": tiny_family(root / "f32", n_experts=3, layers=3, hidden=32, tie=True),
        # bf16 task vectors repeat values often: cuts fall inside runs of equal magnitudes
        "bfloat16": tiny_family(root / "bf16", n_experts=3, layers=2, hidden=32, dtype=torch.bfloat16,
                                scale=0.05),
    }


# a GPU, where there is one, runs the same checks (the merge core is device-agnostic)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def live(path, dtype, device="cpu"):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def recipe_for(fam, method, weights, densities, lam, normalize, rescale, per_layer):
    models = []
    for i, (w, d) in enumerate(zip(weights, densities)):
        p = {"weight": [w, -w / 2, w] if per_layer else w}
        if method != "task_arithmetic":
            p["density"] = [d, min(1.0, d + 0.3), d / 2] if per_layer else d
        models.append({"model": str(fam[f"expert_{i}"]), "parameters": p})
    params = {"normalize": normalize, "lambda": lam}
    if method.startswith("dare"):
        params["rescale"] = rescale
    return parse_recipe({"merge_method": method, "base_model": str(fam["base"]), "models": models,
                         "parameters": params})


def one_shot(recipe, seed, device="cpu"):
    eng = Merger(recipe, seed=seed, device=device)
    return {t.name: eng.merge_tensor(t) for t in eng.tasks}


def same_bits(a, b) -> bool:
    """Equal bit for bit (torch.equal takes -0.0 for 0.0)."""
    ints = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float64: torch.int64}
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(ints[a.dtype]), b.view(ints[b.dtype]))


def assert_weights(model, want):
    """The live model holds exactly the one-shot merge's weights, bit for bit."""
    got = dict(model.named_parameters())
    for name, t in want.items():
        assert same_bits(got[name].detach(), t.to(got[name].dtype)), name


weights = st.lists(st.sampled_from([0.0, 0.3, 0.5, 1.0, -0.4, 1.7]), min_size=3, max_size=3)
densities = st.lists(st.sampled_from([1e-6, 1e-5, 1e-4, 0.1, 0.37, 0.5, 0.9, 0.99999, 1.0]), min_size=3, max_size=3)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["task_arithmetic", "ties", "dare_ties", "dare_linear"]),
       dtype=st.sampled_from(["float32", "bfloat16"]), w=weights, d=densities,
       lam=st.sampled_from([1.0, 0.7]), normalize=st.booleans(), rescale=st.booleans(),
       per_layer=st.booleans(), seed=st.integers(0, 3), device=st.sampled_from(DEVICES), kernels=st.booleans(),
       threads=st.sampled_from([1, 2, 3]))
def test_flat_equals_one_shot(families, method, dtype, w, d, lam, normalize, rescale, per_layer, seed, device,
                              kernels, threads):
    """On the CPU the flat path runs in the fused kernels (a tensor per call, shared out over
    the threads) or, with them off, in torch: both give the one-shot merge's bits."""
    from evomerge.merge import native

    fam = families[dtype]
    recipe = recipe_for(fam, method, w, d, lam, normalize, rescale, per_layer)
    tdt = getattr(torch, dtype)
    engine = ResidentMerger(recipe, seed=seed, device=device)
    assert engine._groups, "the flat path is built for this method"
    model = live(fam["base"], tdt, device)
    calls = {"merge": 0, "kernels": 0}
    orig, orig_native = FlatGroup.merge, FlatGroup._merge_native

    def spy(self, *a, **k):
        calls["merge"] += 1
        return orig(self, *a, **k)

    def spy_native(self, *a, **k):
        calls["kernels"] += 1
        return orig_native(self, *a, **k)

    FlatGroup.merge, FlatGroup._merge_native = spy, spy_native
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with contextlib.nullcontext() if kernels else native.disabled():
            engine.materialize(recipe, into=model)
    finally:
        FlatGroup.merge, FlatGroup._merge_native = orig, orig_native
        torch.set_num_threads(before)
    assert calls["merge"], "the candidate took the flat path"
    takes = kernels and device == "cpu" and native.available()
    assert bool(calls["kernels"]) == takes, calls
    assert_weights(model, one_shot(recipe, seed, device))


def test_the_flat_kernels_share_a_group_out_over_threads_by_size():
    import numpy as np

    from evomerge.merge.flat import MAX_LANES, PIECE_ALIGN, _native_pieces

    sizes = np.array([10, 10, 1 << 17, 1 << 17, 1 << 17, 1 << 17, 1 << 20])
    for threads in (1, 2, 3, 8):
        seg, start, length, bounds = _native_pieces(sizes, threads)
        # the pieces cover every tensor, in order, cut only at aligned positions
        for i, n in enumerate(sizes):
            mine = seg == i
            assert list(start[mine]) == sorted(start[mine]) and start[mine][0] == 0
            assert all(a % PIECE_ALIGN == 0 for a in start[mine])
            assert int(length[mine].sum()) == n
            assert all(a + m == b for a, m, b in zip(start[mine], length[mine], list(start[mine][1:]) + [n]))
        # each thread a run of consecutive pieces, about an equal share of the entries
        assert bounds[0][0] == 0 and bounds[-1][1] == len(seg)
        assert all(b == c for (_, b), (c, _) in zip(bounds, bounds[1:]))
        assert len(bounds) == min(threads, MAX_LANES)
        shares = [int(length[a:b].sum()) for a, b in bounds]
        assert max(shares) <= 1.5 * sizes.sum() / len(bounds), shares
    seg, _, _, bounds = _native_pieces(np.array([100, 200]), 4)  # too little work to share
    assert bounds == [(0, 2)] and list(seg) == [0, 1]


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flat_kernels_cutting_tensors_between_threads_give_the_one_shot_bits(families, method, dtype, monkeypatch):
    """A tensor cut between threads: each piece's magnitude cut counts positions from the
    piece's start, and DARE's stream goes on from where the piece starts."""
    from evomerge.merge import flat, native

    assert native.available(), "the kernels build here (tests/test_native.py::test_the_kernels_build_here)"
    monkeypatch.setattr(flat, "LANE_WORK", 16)
    monkeypatch.setattr(flat, "PIECE_ALIGN", 4)
    monkeypatch.setattr(flat, "PIECES_PER_LANE", 64)
    fam = families[dtype]
    recipe = recipe_for(fam, method, [0.5, 1.0, -0.4], [0.37, 0.9, 0.1], 0.7, False, True, True)
    engine = ResidentMerger(recipe, seed=2)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        (_, g), = engine._groups
        seg, start, _, bounds = g._work(3)
        assert (start > 0).sum() > 10 and len(bounds) == 3, "tensors are cut in pieces"
        model = live(fam["base"], getattr(torch, dtype))
        engine.materialize(recipe, into=model)
    finally:
        torch.set_num_threads(before)
    assert_weights(model, one_shot(recipe, 2))


@pytest.mark.parametrize("method", ["dare_linear", "ties"])
@pytest.mark.parametrize("kernels", [False, True])
def test_a_model_keeping_nothing_leaves_zeros_signed_as_the_one_shot_merge(method, kernels):
    """A model whose mask keeps nothing (DARE's density rounds to 0 of 65536; TIES with a
    negative weight elsewhere) is multiplied by +0, as the per-tensor masks do: the torch
    flat path multiplied by 0 times its negative weight, -0, and where the base held -0.0 the
    merged entry came out -0.0 instead of 0.0."""
    from evomerge.merge import methods, native

    assert native.available(), "the kernels build here (tests/test_native.py::test_the_kernels_build_here)"
    g = torch.Generator().manual_seed(0)
    n = 4096
    base = torch.randn(n, generator=g)
    base[::3] = -0.0
    ts = [base + torch.randn(n, generator=g) for _ in range(2)]
    if method == "dare_linear":
        w, dens = [-0.5, 0.0], [1e-6, 1.0]  # model 0 keeps nothing; model 1 adds zeros
        want = methods.dare_linear(base, ts, weight=w, density=dens, seeds=[7, 8])
    else:
        w, dens = [-0.5, 0.5], [0.5, 0.5]
        want = methods.ties(base, ts, weight=w, density=dens, normalize=False)
    grp = FlatGroup(["t"], [base], [ts], "cpu", torch.float32)
    table = {"weight": np.array(w)[:, None], "density": np.array(dens)[:, None], "normalize": False,
             "rescale": method == "dare_linear", "seeds": np.array([[7], [8]], dtype=np.uint64)}
    out = torch.empty(n)
    with contextlib.nullcontext() if kernels else native.disabled():
        grp.merge(method, table, out)
    assert (want.view(torch.int32) == 0).any() or method == "ties", "the case at hand: +0.0 results"
    assert same_bits(out, want)


def test_the_flat_kernels_work_in_a_forked_child():
    """A forked child has none of its parent's threads: a pool kept from the parent would
    wait for ever for them (the merge hung)."""
    import os
    import signal

    from evomerge.merge import flat, native

    assert native.available(), "the kernels build here (tests/test_native.py::test_the_kernels_build_here)"
    g = torch.Generator().manual_seed(0)
    n = 1 << 18
    base = torch.randn(n, generator=g)
    ts = [base + torch.randn(n, generator=g) for _ in range(2)]
    grp = FlatGroup(["a", "b"], [base[: n // 2], base[n // 2:]], [[t[: n // 2] for t in ts], [t[n // 2:] for t in ts]],
                    "cpu", torch.float32)
    table = {"weight": np.full((2, 2), 0.5), "density": np.full((2, 2), 0.3), "normalize": False, "rescale": False}
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = torch.empty(n)
        grp.merge("ties", table, out)
        assert flat._POOLS, "the parent merged on a pool of threads"
        want = out.clone()
        pid = os.fork()
        if pid == 0:  # the child: merge again, report by exit status
            signal.alarm(20)
            try:
                out2 = torch.empty(n)
                grp.merge("ties", table, out2)
                # compared in NumPy: torch's own parallel operations are not fork-safe
                os._exit(0 if out2.numpy().tobytes() == want.numpy().tobytes() else 3)
            except BaseException:
                os._exit(4)
        _, status = os.waitpid(pid, 0)
    finally:
        torch.set_num_threads(before)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_flat_buffers_hold_the_inputs_once(families):
    fam = families["float32"]
    recipe = recipe_for(fam, "ties", [0.5] * 3, [0.5] * 3, 1.0, True, False, False)
    flat = ResidentMerger(recipe)
    per_tensor = ResidentMerger(recipe, flat=False)
    assert flat.nbytes == per_tensor.nbytes
    (idx, g), = flat._groups
    for i in idx:  # the resident inputs are views into the flat buffers
        task = flat.tasks[i]
        ins = flat.inputs(task)
        assert ins[0].untyped_storage().data_ptr() == g.B.untyped_storage().data_ptr()
        assert all(t.untyped_storage().data_ptr() == g.T.untyped_storage().data_ptr() for t in ins[1:])


def test_mixed_normalize_falls_back_to_the_per_tensor_path(families):
    fam = families["float32"]
    models = [{"model": str(fam[f"expert_{i}"]), "parameters": {"weight": 0.4, "density": 0.5}} for i in range(3)]
    recipe = parse_recipe({"merge_method": "ties", "base_model": str(fam["base"]), "models": models,
                           "parameters": {"normalize": [{"filter": "mlp", "value": False}, {"value": True}]}})
    engine = ResidentMerger(recipe)
    model = live(fam["base"], torch.float32)
    engine.materialize(recipe, into=model)
    assert_weights(model, one_shot(recipe, 0))


@pytest.mark.parametrize("kernels", [False, True])
def test_the_per_tensor_path_reads_the_flat_groups_sorted_magnitudes(families, kernels):
    """A candidate the flat path takes, then one it cannot (normalize differs between
    tensors): the per-tensor TIES cuts read the group's sorted magnitudes (sorted once for
    the group, nothing sorted again) and give the one-shot merge's bits."""
    from evomerge.merge import native

    fam = families["bfloat16"]  # cuts inside runs of equal magnitudes
    models = [{"model": str(fam[f"expert_{i}"]), "parameters": {"weight": [0.4, 0.7][i % 2], "density": 0.37}}
              for i in range(3)]
    flat_one = parse_recipe({"merge_method": "ties", "base_model": str(fam["base"]), "models": models})
    mixed = parse_recipe({"merge_method": "ties", "base_model": str(fam["base"]), "models": models,
                          "parameters": {"normalize": [{"filter": "mlp", "value": False}, {"value": True}]}})
    engine = ResidentMerger(flat_one)
    model = live(fam["base"], torch.bfloat16)
    with contextlib.nullcontext() if kernels else native.disabled():
        engine.materialize(flat_one, into=model)
        assert_weights(model, one_shot(flat_one, 0))
        (_, g), = engine._groups
        sorted_once = g._sorted
        assert sorted_once is not None
        sorts = []
        real = torch.sort
        torch.sort = lambda *a, **k: sorts.append(1) or real(*a, **k)
        try:
            engine.materialize(mixed, into=model)
        finally:
            torch.sort = real
    assert not sorts and g._sorted is sorted_once, "the per-tensor path sorted again"
    assert_weights(model, one_shot(mixed, 0))
    storage = sorted_once[0].untyped_storage().data_ptr()
    caches = list(engine._stats.values())  # the per-tensor path's, one per tensor it merged
    assert caches and all(c[0][0].untyped_storage().data_ptr() == storage for c in caches)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "dare_ties"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_flat_path_equals_one_shot(families, method, dtype, normalize):
    """``compile=True``: the fused kernels (written model by model) give the same bits as
    the one-shot merge; bf16 puts TIES cuts inside runs of equal magnitudes."""
    fam = families[dtype]
    recipe = recipe_for(fam, method, [0.5, 1.0, -0.4], [0.37, 0.9, 0.1], 0.7, normalize, True, True)
    engine = ResidentMerger(recipe, seed=1, compile=True)
    model = live(fam["base"], getattr(torch, dtype))
    engine.materialize(recipe, into=model)
    assert_weights(model, one_shot(recipe, 1))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
@pytest.mark.parametrize("family", ["float32", "bfloat16", "gpt2"])
def test_a_compiled_one_shot_merge_writes_the_reference_weights(families, words, tmp_path, method, family):
    """``Merger(compile=True)`` (``evomerge-merge --compile``) merges the task-arithmetic
    family through ``torch.compile``, each tensor a flat block of one: it writes the
    reference merge's weights bit for bit (bf16 puts TIES cuts inside runs of equal
    magnitudes; GPT-2 has Conv1D tensors and a tied head), and every merged tensor did
    take the compiled path."""
    from safetensors.torch import load_file

    if family == "gpt2":
        experts = list(words.experts.values())  # two
        fam = {"base": words.base, **{f"expert_{i}": p for i, p in enumerate(experts)}}
    else:
        fam = families[family]
    n = len(fam) - 1
    recipe = recipe_for(fam, method, [0.5, 1.0, -0.4][:n], [0.37, 0.9, 0.1][:n], 0.7, True, True, True)
    compiled = []
    orig = FlatGroup.merge

    def spy(self, *a, **k):
        assert self.compile
        compiled.append(self.names[0])
        return orig(self, *a, **k)

    FlatGroup.merge = spy
    try:
        merger = Merger(recipe, seed=4, compile=True)
        got_dir = merger.write(tmp_path / "compiled", progress=False)
    finally:
        FlatGroup.merge = orig
    want_dir = Merger(recipe, seed=4).write(tmp_path / "reference", progress=False)
    got, want = load_file(str(got_dir / "model.safetensors")), load_file(str(want_dir / "model.safetensors"))
    assert set(got) == set(want)
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert sorted(compiled) == sorted(t.name for t in merger.tasks if not t.copy and t.base is not None)


@pytest.mark.parametrize("compile", [False, True])
def test_a_non_finite_candidate_is_named_on_the_flat_path(families, compile):
    fam = families["float32"]
    ok = recipe_for(fam, "task_arithmetic", [0.5] * 3, [1.0] * 3, 1.0, False, False, False)
    huge = recipe_for(fam, "task_arithmetic", [1e39] * 3, [1.0] * 3, 1.0, False, False, False)  # inf in float32
    engine = ResidentMerger(ok, compile=compile)
    model = live(fam["base"], torch.float32)
    engine.materialize(ok, into=model)
    with pytest.raises(Exception, match="tensor '.*': the merged values are not finite"):
        engine.materialize(huge, into=model)


@pytest.mark.parametrize("compile", [False, True])
def test_a_bound_model_is_merged_into_in_place_and_other_models_are_not_disturbed(families, compile):
    """``bind``: the worker's live model becomes the flat output (no copy per candidate);
    a second model cannot bind the same buffers, takes copies, and neither disturbs the other."""
    fam = families["float32"]
    a = recipe_for(fam, "ties", [0.5, 1.0, -0.4], [0.37, 0.9, 0.1], 0.7, True, False, True)
    b = recipe_for(fam, "ties", [1.0, 0.3, 0.5], [0.5, 0.5, 0.99999], 1.0, False, False, False)
    engine = ResidentMerger(a, compile=compile)
    bound, other = live(fam["base"], torch.float32), live(fam["base"], torch.float32)
    before = {n: p.detach().clone() for n, p in bound.named_parameters()}
    n = engine.bind(bound)
    assert n == len(engine._groups[0][1].names) > 0
    assert_weights(bound, before)  # binding keeps the values
    buf = engine._groups[0][1].output(torch.float32)[0]
    ptrs = {k: p.data_ptr() for k, p in bound.named_parameters()}
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel() * buf.element_size()
    assert sum(lo <= p < hi for p in ptrs.values()) == n  # the parameters live in the flat output
    assert engine.bind(other) == 0  # one model per engine
    for recipe, seed in ((a, 0), (b, 0), (a, 0)):
        engine.materialize(recipe, into=bound)
        assert_weights(bound, one_shot(recipe, seed))
        assert {k: p.data_ptr() for k, p in bound.named_parameters()} == ptrs  # nothing reallocated
    engine.materialize(b, into=other)
    assert_weights(other, one_shot(b, 0))
    assert_weights(bound, one_shot(a, 0))  # untouched by the other model's candidate
    # the bound model still computes with its (bound) weights
    ids = torch.tensor([[1, 2, 3]])
    ref = live(fam["base"], torch.float32)
    engine.materialize(a, into=ref)
    assert torch.equal(bound(ids).logits, ref(ids).logits)


def test_a_replaced_output_buffer_is_not_kept_alive_by_its_block_views():
    """Merging into an output of another dtype replaces the group's buffer: the block
    views made for the old one go too (they held its memory). (The torch path's views: the
    kernels make none.)"""
    import weakref

    from evomerge.merge import native

    g = torch.Generator().manual_seed(0)
    base = [torch.randn(64, 32, generator=g) for _ in range(3)]
    grp = FlatGroup(["a", "b", "c"], base, [[b + 0.1, b - 0.2] for b in base], "cpu", torch.float32)
    table = {"weight": np.full((2, 3), 0.5), "normalize": False, "rescale": False}
    with native.disabled():
        out, _ = grp.output(torch.float32)
        grp.merge("task_arithmetic", table, out)
        assert grp._piece_views, "the torch path made its views"
        gone = weakref.ref(out.untyped_storage())
        del out
        new, _ = grp.output(torch.bfloat16)
        grp.merge("task_arithmetic", table, new)
    assert gone() is None or gone().data_ptr() not in {v[0][0] for v in grp._piece_views.values()}
    assert sum(isinstance(k, tuple) for k in grp._piece_views) == 1


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=40), st.data())
def test_a_cut_read_from_sorted_magnitudes_keeps_exactly_the_ranks_at_or_above_it(values, data):
    """``methods.sorted_cuts``, the one lookup behind the per-tensor cache and the flat
    path's thresholds, in NumPy and in torch: with many equal magnitudes, the cut at rank r
    (v, tie) keeps the entries above v and those equal to v at positions >= tie, which are
    exactly the entries of stable ascending rank >= r."""
    from evomerge.merge.methods import sorted_cuts

    a = np.array(values, dtype=np.float32)
    order = np.argsort(a, kind="stable")
    rank = np.empty(len(a), dtype=np.int64)
    rank[order] = np.arange(len(a))
    r = data.draw(st.integers(1, len(a) - 1))
    vals, pos = a[order], order.astype(np.int32)
    for v, tie in (sorted_cuts(vals, pos, r),
                   tuple(x.numpy() for x in sorted_cuts(torch.from_numpy(vals), torch.from_numpy(pos), r))):
        kept = (a > v) | ((a == v) & (np.arange(len(a)) >= tie))
        assert np.array_equal(kept, rank >= r), (v, tie)
