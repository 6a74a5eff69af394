"""Tests for the pure merge maths in ``evomerge.merge.methods``.

Expected values are worked out by hand from the definitions (see /work/shared/METHODS.md and
the module docstring) and written out literally; the property tests use independent
reference computations (a stable ``torch.argsort`` for ranks, the TIES definition spelled
out element by element), never the functions under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from evomerge.merge import methods as M
from evomerge.merge.methods import (
    METHODS,
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_keep_probabilities,
    della_linear,
    fisher,
    linear,
    magnitude_mask,
    model_stock,
    outlier_mask,
    passthrough,
    rank_range_mask,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    wise_ft,
)

F64 = torch.float64
PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def T(*xs) -> torch.Tensor:
    """A float64 tensor (float64 inputs keep the maths in float64, so results are exact)."""
    if len(xs) == 1 and isinstance(xs[0], (list, tuple)):
        xs = xs[0]
    return torch.tensor(xs, dtype=F64)


def close(actual, expected, rtol=1e-12, atol=1e-12):
    if not isinstance(expected, torch.Tensor):
        expected = T(expected)
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


def ref_ranks(a: torch.Tensor) -> torch.Tensor:
    """Ascending rank of each entry of flat ``a``; equal values ranked by position."""
    flat = a.reshape(-1)
    order = torch.argsort(flat, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(flat.numel())
    return ranks.reshape(a.shape)


def ref_ties_combine(deltas, weights, normalize):
    """TIES election + disjoint merge, element by element, straight from the definition."""
    n = deltas[0].numel()
    out = []
    flat = [d.reshape(-1).tolist() for d in deltas]
    for i in range(n):
        wd = [w * f[i] for w, f in zip(weights, flat)]
        elected = 1.0 if sum(wd) >= 0 else -1.0
        agree = [k for k, v in enumerate(wd) if v != 0 and math.copysign(1.0, v) == elected]
        s = sum(wd[k] for k in agree)
        if normalize:
            div = sum(weights[k] for k in agree)
            s = s / div if div != 0 else s
        out.append(s)
    return torch.tensor(out, dtype=deltas[0].dtype).reshape(deltas[0].shape)


# --------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------

# Exactly representable values: sums and differences of these stay exact in float64, and
# the small set makes duplicate magnitudes (ties in trimming) common.
GRID = st.sampled_from([-3.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 4.0])


@st.composite
def model_sets(draw, k_min=1, k_max=3, n_min=1, n_max=12):
    """(base, [experts...]) as float64 1-D tensors of one shared length."""
    n = draw(st.integers(n_min, n_max))
    k = draw(st.integers(k_min, k_max))
    vec = st.lists(GRID, min_size=n, max_size=n)
    base = T(draw(vec))
    experts = [T(draw(vec)) for _ in range(k)]
    return base, experts


pos_weight = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0, 3.0])
nonzero_weight = st.sampled_from([-2.0, -1.0, -0.5, 0.25, 0.5, 1.0, 1.5, 3.0])
lambdas = st.sampled_from([0.0, 0.3, 0.5, 1.0, 1.7])
densities = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, allow_nan=False)
seeds = st.integers(min_value=0, max_value=2**40)


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

HAND_TESTED = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "wise_ft", "passthrough",
    "fisher", "regmean", "weight_matching", "regmean_plus_plus", "pleas",
}


def test_every_registered_method_has_hand_computed_tests():
    # A method added to the registry must get its own tests here.
    assert set(METHODS) == HAND_TESTED


def test_registry_matches_the_functions():
    for name, spec in METHODS.items():
        assert spec.name == name
        assert spec.fn is getattr(M, name)
        assert spec.reference.startswith("https://arxiv.org/abs/")
    assert METHODS["slerp"].max_models == 1 and METHODS["wise_ft"].max_models == 1
    assert METHODS["model_stock"].min_models == 2
    assert not METHODS["linear"].needs_base and METHODS["linear"].base_in_inputs
    for name in ("dare_linear", "dare_ties", "della", "della_linear"):
        assert METHODS[name].random
    for name in ("linear", "task_arithmetic", "ties", "slerp", "model_stock", "wise_ft"):
        assert not METHODS[name].random
    d = METHODS["ties"].param("density")
    assert (d.lo, d.hi, d.lo_open, d.per_model) == (0.0, 1.0, True, True)


# --------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------


def test_linear_normalized_is_weighted_mean():
    x, y = T(1, 2, 3, 4), T(5, -2, 0, 8)
    # (1*x + 3*y) / 4
    close(linear(None, [x, y], [1.0, 3.0]), [4.0, -1.0, 0.75, 7.0])
    close(linear(None, [x, y], [1.0, 3.0], normalize=True), [4.0, -1.0, 0.75, 7.0])


def test_linear_unnormalized_is_weighted_sum():
    x, y = T(1, 2, 3, 4), T(5, -2, 0, 8)
    close(linear(None, [x, y], [1.0, 3.0], normalize=False), [16.0, -4.0, 3.0, 28.0])


def test_linear_uniform_soup_of_three():
    a, b, c = T(3, 0, -3, 6), T(0, 3, 3, 0), T(0, 0, 3, 3)
    close(linear(None, [a, b, c], [1 / 3] * 3, normalize=False), [1.0, 1.0, 1.0, 3.0])
    close(linear(None, [a, b, c], [7.0] * 3), [1.0, 1.0, 1.0, 3.0])


def test_linear_ignores_base_tensor():
    x, y = T(1, 2), T(3, 4)
    close(linear(T(100, 100), [x, y], [1.0, 1.0]), [2.0, 3.0])


def test_linear_normalize_with_zero_weight_sum_is_an_error():
    with pytest.raises(ValueError, match="sum to zero"):
        linear(None, [T(1, 2), T(3, 4)], [1.0, -1.0])


# --------------------------------------------------------------------------------------
# task arithmetic
# --------------------------------------------------------------------------------------

TA_BASE = (1, 1, 1, 1, 1)
TA_X = (2, 0, 1, 3, -1)  # tau_x = [1, -1, 0, 2, -2]
TA_Y = (0, 1, 3, 1, 3)  # tau_y = [-1, 0, 2, 0, 2]


def test_task_arithmetic_negative_weight():
    base, x, y = T(TA_BASE), T(TA_X), T(TA_Y)
    # tau_x - 0.5 tau_y = [1.5, -1, -1, 2, -3]
    close(task_arithmetic(base, [x, y], [1.0, -0.5]), [2.5, 0.0, 0.0, 3.0, -2.0])


def test_task_arithmetic_negation_removes_a_skill():
    base, x = T(TA_BASE), T(TA_X)
    close(task_arithmetic(base, [x], [-1.0]), [0.0, 2.0, 1.0, -1.0, 3.0])


def test_task_arithmetic_lambda_scales_the_sum():
    base, x, y = T(TA_BASE), T(TA_X), T(TA_Y)
    close(task_arithmetic(base, [x, y], [1.0, -0.5], lambda_=0.5), [1.75, 0.5, 0.5, 2.0, -0.5])


def test_task_arithmetic_normalize_divides_by_weight_sum():
    base, x, y = T(TA_BASE), T(TA_X), T(TA_Y)
    # weights sum to 0.5: [1.5, -1, -1, 2, -3] / 0.5 = [3, -2, -2, 4, -6]
    close(task_arithmetic(base, [x, y], [1.0, -0.5], normalize=True), [4.0, -1.0, -1.0, 5.0, -5.0])
    close(
        task_arithmetic(base, [x, y], [1.0, -0.5], lambda_=0.5, normalize=True),
        [2.5, 0.0, 0.0, 3.0, -2.0],
    )


def test_task_arithmetic_without_models_returns_base():
    close(task_arithmetic(T(1, 2), [], []), [1.0, 2.0])


# --------------------------------------------------------------------------------------
# TIES
# --------------------------------------------------------------------------------------

# tau1 = [3, -1, 0.5, -2, 0.125, 1.5]   -> top 3 by magnitude: 3, -2, 1.5
# tau2 = [-1, -2, 0.75, 4, 0.25, -0.375] -> top 3 by magnitude: 4, -2, -1
TIES_BASE = (2,) * 6
TIES_X = (5, 1, 2.5, 0, 2.125, 3.5)
TIES_Y = (1, 0, 2.75, 6, 2.25, 1.625)


def test_ties_trim_elect_disjoint_mean():
    base, x, y = T(TIES_BASE), T(TIES_X), T(TIES_Y)
    # trimmed: t1 = [3, 0, 0, -2, 0, 1.5], t2 = [-1, -2, 0, 4, 0, 0]; weights [1, 2]
    # weighted: [3, 0, 0, -2, 0, 1.5] and [-2, -4, 0, 8, 0, 0]
    # sum [1, -4, 0, 6, 0, 1.5] -> elected signs [+, -, +, +, +, +]
    # agreeing: model 1 at 0 and 5, model 2 at 1 and 3
    # disjoint mean: [3/1, -4/2, 0, 8/2, 0, 1.5/1] = [3, -2, 0, 4, 0, 1.5]
    out = ties(base, [x, y], [1.0, 2.0], [0.5, 0.5])
    close(out, [5.0, 0.0, 2.0, 6.0, 2.0, 3.5])


def test_ties_lambda_scales_merged_vector():
    base, x, y = T(TIES_BASE), T(TIES_X), T(TIES_Y)
    out = ties(base, [x, y], [1.0, 2.0], [0.5, 0.5], lambda_=0.5)
    close(out, [3.5, 1.0, 2.0, 4.0, 2.0, 2.75])


def test_ties_without_normalize_sums_agreeing_entries():
    base, x, y = T(TIES_BASE), T(TIES_X), T(TIES_Y)
    out = ties(base, [x, y], [1.0, 2.0], [0.5, 0.5], normalize=False)
    # [3, -4, 0, 8, 0, 1.5] + base
    close(out, [5.0, -2.0, 2.0, 10.0, 2.0, 3.5])


def test_ties_keeps_at_least_one_entry():
    base, x, y = T(TIES_BASE), T(TIES_X), T(TIES_Y)
    # density 0.1 of 6 entries: int(0.6) = 0, but max(1, .) = 1 entry survives per model
    out = ties(base, [x, y], [1.0, 1.0], [0.1, 0.1])
    close(out, [5.0, 2.0, 2.0, 6.0, 2.0, 2.0])


def test_ties_zero_sum_elects_positive_and_divides_by_agreeing_weights():
    base = T(1, 1, 1, 1)
    x = T(3, -1, 2, 5)  # tau1 = [2, -2, 1, 4]
    y = T(0, 2, 0.25, 1)  # tau2 = [-1, 1, -0.75, 0]
    # weights [1, 2] -> weighted [2, -2, 1, 4] and [-2, 2, -1.5, 0]
    # sums [0, 0, -0.5, 4]: zero counts as positive; the third entry is elected negative
    # by the weighted sum (the unweighted sum 0.25 would be positive)
    # kept: [2 (m1), 2 (m2), -1.5 (m2), 4 (m1; the zero of m2 never agrees)]
    # divisors: [1, 2, 2, 1]
    out = ties(base, [x, y], [1.0, 2.0], [1.0, 1.0])
    close(out, [3.0, 2.0, 0.25, 5.0])
    out = ties(base, [x, y], [1.0, 2.0], [1.0, 1.0], normalize=False)
    close(out, [3.0, 3.0, -0.5, 5.0])


def test_ties_trims_per_tensor_not_per_row():
    base = torch.zeros(2, 3, dtype=F64)
    x = T([[1, 2, 3], [10, 20, 30]])
    # density 0.5 of 6 entries keeps the 3 largest of the whole tensor: the second row
    out = ties(base, [x], [1.0], [0.5])
    close(out, T([[0, 0, 0], [10, 20, 30]]))


def test_ties_trim_ties_broken_by_position():
    base = torch.zeros(5, dtype=F64)
    x = T(1, -1, 1, -1, 1)  # all magnitudes equal: the later positions rank higher
    out = ties(base, [x], [1.0], [0.4])
    close(out, [0.0, 0.0, 0.0, -1.0, 1.0])


def test_ties_rescale_norms():
    base = torch.zeros(6, dtype=F64)
    x = T(3, -1, 0.5, -2, 0.125, 1.5)  # L1 8.125; the top 3 (3, -2, 1.5) have L1 6.5
    c1 = 8.125 / 6.5
    expected_l1 = [3 * c1, 0.0, 0.0, -2 * c1, 0.0, 1.5 * c1]
    close(ties(base, [x], [1.0], [0.5], rescale="l1"), expected_l1)
    # a deterministic trim has no keep probability to divide by: ``true`` means the L1
    # norm there, as in mergekit
    close(ties(base, [x], [1.0], [0.5], rescale=True), expected_l1)
    c2 = math.sqrt(9 + 1 + 0.25 + 4 + 0.015625 + 2.25) / math.sqrt(9 + 4 + 2.25)
    close(ties(base, [x], [1.0], [0.5], rescale="l2"), [3 * c2, 0.0, 0.0, -2 * c2, 0.0, 1.5 * c2])
    # the largest entry survives the trim: the L-inf norm is unchanged
    close(ties(base, [x], [1.0], [0.5], rescale="linf"), [3.0, 0.0, 0.0, -2.0, 0.0, 1.5])
    close(ties(base, [x], [1.0], [0.5], rescale=False), [3.0, 0.0, 0.0, -2.0, 0.0, 1.5])
    # density 1 never rescales
    close(ties(base, [x], [1.0], [1.0], rescale="l2"), x)


# --------------------------------------------------------------------------------------
# DARE
# --------------------------------------------------------------------------------------

def _dare_inputs(n=2000, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g, dtype=F64)
    tau = torch.randn(n, generator=g, dtype=F64)
    tau[tau.abs() < 1e-3] = 0.5  # every entry non-zero, so a kept entry is visible
    return base, tau


@pytest.mark.parametrize("fn", [dare_linear, dare_ties])
def test_dare_is_seeded(fn):
    base, tau = _dare_inputs()
    x = base + tau
    a = fn(base, [x], [1.0], [0.5], [123])
    b = fn(base, [x], [1.0], [0.5], [123])
    c = fn(base, [x], [1.0], [0.5], [124])
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal((a - base) != 0, (c - base) != 0)


def test_dare_rescale_true_divides_survivors_by_density():
    base = torch.zeros(4000, dtype=F64)
    _, tau = _dare_inputs(4000)
    density = 0.25  # drop rate p = 0.75, survivors times 1 / (1 - p) = 4
    out = dare_linear(base, [tau], [1.0], [density], [7])
    kept = out != 0
    frac = kept.double().mean().item()
    assert abs(frac - density) < 0.03
    close(out[kept], tau[kept] * 4.0)
    # rescale=True is the default
    assert torch.equal(out, dare_linear(base, [tau], [1.0], [density], [7], rescale=True))


def test_dare_rescale_false_keeps_survivors_unchanged():
    base = torch.zeros(3000, dtype=F64)
    _, tau = _dare_inputs(3000)
    out = dare_linear(base, [tau], [1.0], [0.4], [9], rescale=False)
    kept = out != 0
    assert abs(kept.double().mean().item() - 0.4) < 0.04
    close(out[kept], tau[kept])
    # same mask as with rescaling: only the scale differs
    scaled = dare_linear(base, [tau], [1.0], [0.4], [9], rescale=True)
    assert torch.equal(scaled != 0, kept)


def test_dare_rescale_l1_keeps_the_l1_norm_of_each_task_vector():
    base, tau = _dare_inputs(2500)
    x = base + tau
    out = dare_linear(base, [x], [1.0], [0.3], [5], rescale="l1")
    delta = out - base
    close(delta.abs().sum(), tau.abs().sum(), rtol=1e-9, atol=1e-9)
    kept = delta != 0
    assert 0.25 < kept.double().mean().item() < 0.35
    ratio = delta[kept] / tau[kept]
    # every survivor is the original entry times one common factor L1(tau) / L1(masked)
    close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-9, atol=1e-9)
    close(ratio[0], tau.abs().sum() / tau[kept].abs().sum(), rtol=1e-9, atol=1e-9)


def test_dare_linear_weights_and_lambda_act_after_dropping():
    base, tau = _dare_inputs(500)
    single = dare_linear(base, [base + tau], [1.0], [0.5], [11]) - base
    out = dare_linear(base, [base + tau], [-2.0], [0.5], [11], lambda_=0.5)
    close(out, base + (-2.0 * 0.5) * single, rtol=1e-12, atol=1e-12)


def test_dare_ties_is_ties_election_over_dropped_vectors():
    base, t1 = _dare_inputs(800, seed=1)
    _, t2 = _dare_inputs(800, seed=2)
    x, y = base + t1, base + t2
    # each model's drop-and-rescale depends on its own seed only
    d1 = dare_linear(base, [x], [1.0], [0.5], [31]) - base
    d2 = dare_linear(base, [y], [1.0], [0.5], [32]) - base
    for normalize in (False, True):
        out = dare_ties(base, [x, y], [1.0, 0.5], [0.5, 0.5], [31, 32], normalize=normalize)
        close(out, base + ref_ties_combine([d1, d2], [1.0, 0.5], normalize), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------
# Model Breadcrumbs
# --------------------------------------------------------------------------------------

# magnitudes .5 3 1 7 2 .25 6 4 5 .75 -> ascending order of positions: 5 0 9 2 4 1 7 8 6 3
BC_TAU1 = (0.5, -3, 1, 7, -2, 0.25, 6, -4, 5, -0.75)
# magnitudes 1 2 .5 3 1.5 6 .25 4.5 5 .125 -> ascending order of positions: 9 6 2 0 4 1 3 7 8 5
BC_TAU2 = (-1, 2, -0.5, 3, 1.5, -6, 0.25, 4.5, -5, 0.125)


def test_breadcrumbs_drops_top_gamma_and_keeps_density_next():
    base = torch.ones(10, dtype=F64)
    x = base + T(BC_TAU1)
    # n = 10, density 0.5 -> keep 5; gamma 0.2 -> drop the 2 largest (7, 6), and the 3
    # smallest (.25, .5, .75); kept: 1, -2, -3, -4, 5
    out = breadcrumbs(base, [x], [1.0], [0.5], [0.2])
    close(out, [1.0, -2.0, 2.0, 1.0, -1.0, 1.0, 1.0, -3.0, 6.0, 1.0])
    out = breadcrumbs(base, [x], [2.0], [0.5], [0.2], lambda_=0.5)
    close(out, [1.0, -2.0, 2.0, 1.0, -1.0, 1.0, 1.0, -3.0, 6.0, 1.0])


def test_breadcrumbs_drops_fewer_top_entries_when_density_needs_them():
    base = torch.zeros(10, dtype=F64)
    # density 0.8 keeps 8, so only 2 of the int(0.5 * 10) = 5 largest can go: 7 and 6
    out = breadcrumbs(base, [T(BC_TAU1)], [1.0], [0.8], [0.5])
    close(out, [0.5, -3.0, 1.0, 0.0, -2.0, 0.25, 0.0, -4.0, 5.0, -0.75])


def test_breadcrumbs_with_gamma_zero_is_magnitude_trim():
    base = torch.zeros(10, dtype=F64)
    out = breadcrumbs(base, [T(BC_TAU1)], [1.0], [0.3], [0.0])
    close(out, [0.0, 0.0, 0.0, 7.0, 0.0, 0.0, 6.0, 0.0, 5.0, 0.0])


def test_breadcrumbs_sums_models_with_task_arithmetic():
    base = torch.zeros(10, dtype=F64)
    # t1' = [0, -3, 1, 0, -2, 0, 0, -4, 5, 0]; t2' = [-1, 2, 0, 3, 1.5, 0, 0, 4.5, 0, 0]
    out = breadcrumbs(base, [T(BC_TAU1), T(BC_TAU2)], [1.0, 1.0], [0.5, 0.5], [0.2, 0.2])
    close(out, [-1.0, -1.0, 1.0, 3.0, -0.5, 0.0, 0.0, 0.5, 5.0, 0.0])


def test_breadcrumbs_ties_elects_signs():
    base = torch.ones(10, dtype=F64)
    x, y = base + T(BC_TAU1), base + T(BC_TAU2)
    # weighted (w = [1, 2]): [0, -3, 1, 0, -2, 0, 0, -4, 5, 0] and [-2, 4, 0, 6, 3, 0, 0, 9, 0, 0]
    # sum [-2, 1, 1, 6, 1, 0, 0, 5, 5, 0] -> signs [-, +, +, +, +, +, +, +, +, +]
    # kept: [-2 (m2), 4 (m2), 1 (m1), 6 (m2), 3 (m2), 0, 0, 9 (m2), 5 (m1), 0]
    args = (base, [x, y], [1.0, 2.0], [0.5, 0.5], [0.2, 0.2])
    close(breadcrumbs_ties(*args), [-1.0, 5.0, 2.0, 7.0, 4.0, 1.0, 1.0, 10.0, 6.0, 1.0])
    # disjoint mean: divisors [2, 2, 1, 2, 2, 1, 1, 2, 1, 1]
    close(breadcrumbs_ties(*args, normalize=True), [0.0, 3.0, 2.0, 4.0, 2.5, 1.0, 1.0, 5.5, 6.0, 1.0])


def test_breadcrumbs_rescale_l1():
    base = torch.zeros(10, dtype=F64)
    out = breadcrumbs(base, [T(BC_TAU1)], [1.0], [0.5], [0.2], rescale="l1")
    # L1(tau) = 29.5, L1(kept) = 1 + 2 + 3 + 4 + 5 = 15 -> kept entries times 29.5 / 15
    c = 29.5 / 15
    close(out, [0.0, -3 * c, 1 * c, 0.0, -2 * c, 0.0, 0.0, -4 * c, 5 * c, 0.0])
    close(breadcrumbs(base, [T(BC_TAU1)], [1.0], [0.5], [0.2], rescale=True), out)


# --------------------------------------------------------------------------------------
# DELLA
# --------------------------------------------------------------------------------------


def test_della_keep_probabilities_by_rank():
    tau = T(0.5, -4, 2, -1, 3)  # magnitude ranks 0 4 2 1 3
    p = della_keep_probabilities(tau, 0.5, 0.2)
    # spread over [0.3, 0.7] in steps of 0.4 / 4
    close(p, [0.3, 0.7, 0.5, 0.4, 0.6])


def test_della_keep_probabilities_are_ranked_within_each_row():
    tau = T([[1, -3, 2], [-6, 5, 4]])
    p = della_keep_probabilities(tau, 0.5, 0.1)
    close(p, T([[0.4, 0.6, 0.5], [0.6, 0.5, 0.4]]))
    assert p.shape == tau.shape


@pytest.mark.parametrize("density,eps", [(0.9, 0.15), (0.1, 0.1), (0.05, 0.2)])
def test_della_rejects_probabilities_outside_0_1(density, eps):
    with pytest.raises(ValueError, match="epsilon"):
        della_keep_probabilities(T(1, 2, 3), density, eps)


def test_della_linear_survivors_rescaled_by_one_over_p():
    n = 6000
    base = torch.zeros(n, dtype=F64)
    tau = torch.linspace(0.01, 1.0, n, dtype=F64) * torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(F64)
    tau = tau[torch.randperm(n, generator=torch.Generator().manual_seed(3))]
    density, eps = 0.5, 0.3
    out = della_linear(base, [tau], [1.0], [density], [eps], [17])
    p = 0.2 + 0.6 * (tau.abs().argsort().argsort().to(F64) / (n - 1))  # distinct magnitudes
    kept = out != 0
    close(out[kept], tau[kept] / p[kept], rtol=1e-10, atol=1e-10)
    # survival follows the probabilities: overall ~ density, small entries rarer than large
    assert abs(kept.double().mean().item() - density) < 0.03
    small = tau.abs() < 0.25
    large = tau.abs() > 0.75
    assert abs(kept[small].double().mean().item() - 0.275) < 0.05
    assert abs(kept[large].double().mean().item() - 0.725) < 0.05
    # seeded
    assert torch.equal(out, della_linear(base, [tau], [1.0], [density], [eps], [17]))
    assert not torch.equal(out, della_linear(base, [tau], [1.0], [density], [eps], [18]))


def test_della_is_ties_over_magpruned_vectors():
    base, t1 = _dare_inputs(600, seed=4)
    _, t2 = _dare_inputs(600, seed=5)
    x, y = base + t1, base + t2
    d1 = della_linear(base, [x], [1.0], [0.4], [0.1], [1]) - base
    d2 = della_linear(base, [y], [1.0], [0.6], [0.2], [2]) - base
    out = della(base, [x, y], [1.0, 3.0], [0.4, 0.6], [0.1, 0.2], [1, 2])  # normalize default
    close(out, base + ref_ties_combine([d1, d2], [1.0, 3.0], True), rtol=1e-10, atol=1e-10)
    out = della(base, [x, y], [1.0, 3.0], [0.4, 0.6], [0.1, 0.2], [1, 2], normalize=False, lambda_=0.5)
    close(out, base + 0.5 * ref_ties_combine([d1, d2], [1.0, 3.0], False), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------------------
# SLERP
# --------------------------------------------------------------------------------------


def test_slerp_orthogonal_equal_norm_midpoint():
    v0, v1 = T(2, 0, 0, 0), T(0, 2, 0, 0)
    # Omega = pi / 2: both coefficients sin(pi / 4) / sin(pi / 2)
    r = math.sqrt(2.0)
    close(slerp(v0, [v1], 0.5), [r, r, 0.0, 0.0])
    # t = 1/3: sin(pi/3) and sin(pi/6)
    close(slerp(v0, [v1], 1 / 3), [math.sqrt(3.0), 1.0, 0.0, 0.0])


def test_slerp_sixty_degrees_stays_on_the_circle():
    v0, v1 = T(1, 0), T(0.5, math.sqrt(3) / 2)
    # coefficients sin(30 deg) / sin(60 deg); the result is the unit vector at 30 degrees
    close(slerp(v0, [v1], 0.5), [math.sqrt(3) / 2, 0.5])


def test_slerp_endpoints():
    v0, v1 = T(1, -2, 3, 0.5), T(-1, 0, 2, 4)
    close(slerp(v0, [v1], 0.0), v0)
    close(slerp(v0, [v1], 1.0), v1)


def test_slerp_collinear_falls_back_to_lerp():
    v0 = T(1, 2, -1)
    close(slerp(v0, [T(2, 4, -2)], 0.25), [1.25, 2.5, -1.25])
    # anti-parallel: also linear
    close(slerp(v0, [T(-1, -2, 1)], 0.5), [0.0, 0.0, 0.0])


def test_slerp_threshold():
    v0 = T(1, 0)
    near = T(1, 0.01)  # cos = 0.99995 > 0.9995: linear
    close(slerp(v0, [near], 0.5), [1.0, 0.005])
    a = math.acos(0.999)  # cos = 0.999 < 0.9995: spherical
    out = slerp(v0, [T(math.cos(a), math.sin(a))], 0.5)
    close(out, [math.cos(a / 2), math.sin(a / 2)])
    # with a lower threshold the same pair is interpolated linearly
    out = slerp(v0, [T(math.cos(a), math.sin(a))], 0.5, dot_threshold=0.99)
    close(out, [(1 + math.cos(a)) / 2, math.sin(a) / 2])


def test_slerp_works_on_matrices_as_one_vector():
    v0 = T([[2, 0], [0, 0]])
    v1 = T([[0, 0], [0, 2]])
    r = math.sqrt(2.0)
    close(slerp(v0, [v1], 0.5), T([[r, 0], [0, r]]))


# --------------------------------------------------------------------------------------
# Model Stock
# --------------------------------------------------------------------------------------


def test_model_stock_two_models_known_cosine():
    base = T(1, 1, 1, 1)
    x = base + T(5, 0, 0, 0)
    y = base + T(3, 4, 0, 0)
    # cos = 15 / 25 = 0.6 -> t = 2 * 0.6 / (1 + 0.6) = 0.75
    # t * mean + (1 - t) * base = base + 0.75 * [4, 2, 0, 0]
    close(model_stock(base, [x, y]), [4.0, 2.5, 1.0, 1.0])


def test_model_stock_three_models():
    base = T(2, -1, 0)
    taus = [T(1, 0, 0), T(0, 1, 0), T(1, 1, 0)]
    # pairwise cosines 0, 1/sqrt2, 1/sqrt2
    c = (0 + 2 / math.sqrt(2)) / 3
    t = 3 * c / (1 + 2 * c)
    expected = [2 + t * 2 / 3, -1 + t * 2 / 3, 0.0]
    close(model_stock(base, [base + tau for tau in taus]), expected)


def test_model_stock_orthogonal_task_vectors_return_base():
    base = T(1, 2, 3)
    out = model_stock(base, [base + T(1, 0, 0), base + T(0, 3, 0)])
    close(out, base)


def test_model_stock_filter_wise_uses_one_cosine_per_row():
    base = torch.zeros(2, 3, dtype=F64)
    x = T([[5, 0, 0], [0, 1, 0]])
    y = T([[3, 4, 0], [0, 0, 1]])
    # row 0: cos 0.6 -> t = 0.75; row 1: cos 0 -> t = 0 (the base row)
    close(model_stock(base, [x, y], filter_wise=True), T([[3, 1.5, 0], [0, 0, 0]]))
    # whole tensor: cos = 15 / 26 -> t = 30 / 41
    t = 30 / 41
    close(model_stock(base, [x, y]), t * T([[4, 2, 0], [0, 0.5, 0.5]]))


# --------------------------------------------------------------------------------------
# WiSE-FT and passthrough
# --------------------------------------------------------------------------------------


def test_wise_ft():
    base, ft = T(0, 2, -4), T(4, 2, 0)
    close(wise_ft(base, [ft], alpha=0.25), [1.0, 2.0, -3.0])
    close(wise_ft(base, [ft]), [2.0, 2.0, -2.0])
    close(wise_ft(base, [ft], alpha=0.0), base)
    close(wise_ft(base, [ft], alpha=1.0), ft)


def test_passthrough_scale():
    x = T(1, -2, 3)
    close(passthrough(None, [x]), [1.0, -2.0, 3.0])
    close(passthrough(None, [x], scale=2.0), [2.0, -4.0, 6.0])
    close(passthrough(None, [x], scale=[0.5]), [0.5, -1.0, 1.5])
    close(passthrough(None, [x], scale=[None]), [1.0, -2.0, 3.0])


def test_fisher_by_hand():
    x, y = T(1.0, 2.0, -1.0), T(3.0, 4.0, 5.0)
    fx, fy = T(1.0, 0.0, 2.0), T(1.0, 1.0, 0.0)
    # entry 0: (1*1 + 3*1) / 2; entry 1: x's Fisher is floored at 1e-6;
    # entry 2: y's Fisher is floored at 0.5: (2*-1 + 0.5*5) / 2.5
    close(fisher(None, [x, y], statistics={"fisher": [fx, fy]}, floor=1e-6),
          [2.0, (2e-6 + 4.0) / (1.0 + 1e-6), (-2.0 + 5e-6) / (2.0 + 1e-6)])
    close(fisher(None, [x, y], statistics={"fisher": [fx, fy]}, floor=0.5), [2.0, (1.0 + 4.0) / 1.5, 0.5 / 2.5])
    # per-model weights multiply the Fishers: entry 0 is (3*1 + 1*3) / 4
    close(fisher(None, [x, y], weight=[3.0, 1.0], statistics={"fisher": [fx, fy]})[0:1], [1.5])
    # no Fisher for an input (a buffer): F = 1, the weighted average
    close(fisher(None, [x, y], weight=[1.0, 3.0]), [2.5, 3.5, 3.5])
    close(fisher(None, [x, y], statistics={"fisher": [None, fy]}, floor=1e-6)[1:2], [3.0])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=2, max_size=4), st.floats(1e-3, 10.0))
def test_fisher_with_equal_fishers_is_the_weighted_average(weights, scale):
    g = torch.Generator().manual_seed(len(weights))
    ts = [torch.randn(5, 3, generator=g, dtype=F64) for _ in weights]
    f = torch.full((5, 3), scale, dtype=F64)
    got = fisher(None, ts, weight=weights, statistics={"fisher": [f] * len(ts)}, floor=1e-9)
    want = sum(w * t for w, t in zip(weights, ts)) / sum(weights)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_fisher_refuses_what_it_cannot_weigh():
    x = T(1.0, 2.0)
    with pytest.raises(ValueError, match="sum to zero"):
        fisher(None, [x, x], weight=[0.0, 0.0])
    with pytest.raises(ValueError, match="shape"):
        fisher(None, [x, x], statistics={"fisher": [T(1.0), T(1.0)]})
    with pytest.raises(ValueError, match="2 inputs but 1"):
        fisher(None, [x, x], statistics={"fisher": [T(1.0, 1.0)]})


def test_regmean_by_hand():
    # one input feature: W = sum g_k W_k / sum g_k, whatever the layout
    w1, w2 = torch.tensor([[2.0]], dtype=F64), torch.tensor([[6.0]], dtype=F64)
    g1, g2 = torch.tensor([[1.0]], dtype=F64), torch.tensor([[3.0]], dtype=F64)
    for in_first in (False, True):
        close(regmean(None, [w1, w2], statistics={"gram": [(g1, in_first), (g2, in_first)]}), [[5.0]])
    # two inputs, diagonal Grams: each input column is averaged with its own weights
    a, b = torch.tensor([[1.0, 10.0]], dtype=F64), torch.tensor([[3.0, 20.0]], dtype=F64)  # [out=1, in=2]
    ga, gb = torch.diag(torch.tensor([1.0, 3.0], dtype=F64)), torch.diag(torch.tensor([1.0, 1.0], dtype=F64))
    close(regmean(None, [a, b], statistics={"gram": [(ga, False), (gb, False)]}), [[2.0, (30.0 + 20.0) / 4.0]])
    # alpha = 0 keeps only the diagonals: off-diagonal entries change nothing
    ga2 = ga + torch.tensor([[0.0, 0.5], [0.5, 0.0]], dtype=F64)
    close(regmean(None, [a, b], alpha=0.0, statistics={"gram": [(ga2, False), (gb, False)]}), [[2.0, 12.5]])
    # tensors without a Gram matrix (norms, embeddings, biases): the weighted average
    close(regmean(None, [T(1.0, 2.0), T(3.0, 6.0)], weight=[1.0, 3.0]), [2.5, 5.0])


def test_weight_matching_by_hand():
    """A two-unit MLP (up rows and down columns are its units; 2 channels). The model is
    the reference with its units swapped, then (second case) with its channels swapped.
    Weight matching finds the swap (the permuted model is the reference again), and the
    method's average of the two is the reference."""
    from evomerge.merge.align import Layout, permute, similarity, weight_matching

    ref = {"up": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "down": torch.tensor([[5.0, 0.0], [1.0, 6.0]])}
    cases = [
        # units swapped: up rows, down columns. Unaligned <ref, model> = (1*3 + 2*4 + 3*1 + 4*2)
        # + (5*0 + 0*5 + 1*6 + 6*1) = 34; the unit cost matrix is [[11+6, 5+26], [25+36, 11+6]]
        ("mlp", {"up": (("mlp", 0), None), "down": (None, ("mlp", 0))},
         {"up": torch.tensor([[3.0, 4.0], [1.0, 2.0]]), "down": torch.tensor([[0.0, 5.0], [6.0, 1.0]])}, 34.0),
        # channels swapped: up columns, down rows. Unaligned: (1*2 + 2*1 + 3*4 + 4*3) + (5*1 + 1*5) = 38
        ("res", {"up": (None, ("res", None)), "down": (("res", None), None)},
         {"up": torch.tensor([[2.0, 1.0], [4.0, 3.0]]), "down": torch.tensor([[1.0, 6.0], [5.0, 0.0]])}, 38.0),
    ]
    for group, axes, model, before in cases:
        lay = Layout("llama", hidden=2, heads=1, kv_heads=1, head_dim=2, intermediate=2, layers=[0], axes=axes)
        assert similarity(lay, ref, model) == before
        perms = weight_matching(lay, ref, model)
        assert perms["res" if group == "res" else "0.mlp"].tolist() == [1, 0]
        # aligned: the sum of squares 1 + 4 + 9 + 16 + 25 + 0 + 1 + 36
        assert similarity(lay, ref, model, perms) == 92.0
        for n in ("up", "down"):
            aligned = permute(lay, perms, n, model[n])
            assert torch.equal(aligned, ref[n])
            close(M.weight_matching(None, [ref[n], aligned]), ref[n].tolist())
    assert METHODS["weight_matching"].align == "weight_matching"


def test_pleas_and_regmean_plus_plus_by_hand():
    # one input feature: PLeaS's W = sum w_k C_k W_k / sum w_k G_k
    w1, w2 = torch.tensor([[3.0]], dtype=F64), torch.tensor([[4.0]], dtype=F64)
    s1 = (torch.tensor([[1.0]], dtype=F64), torch.tensor([[2.0]], dtype=F64))
    s2 = (torch.tensor([[2.0]], dtype=F64), torch.tensor([[1.0]], dtype=F64))
    for in_first in (False, True):
        stats = {"merged_inputs": [(*s1, in_first), (*s2, in_first)]}
        close(M.pleas(None, [w1, w2], statistics=stats), [[(2 * 3 + 1 * 4) / 3]])
        close(M.pleas(None, [w1, w2], weight=[3.0, 1.0], statistics=stats), [[(3 * 2 * 3 + 1 * 4) / (3 + 2)]])
        # RegMean++ reads G alone: (1 * 3 + 2 * 4) / 3
        grams = {"merged_grams": [(s1[0], in_first), (s2[0], in_first)]}
        close(M.regmean_plus_plus(None, [w1, w2], statistics=grams), [[11 / 3]])
    # tensors without statistics (norms, embeddings, biases): the weighted average
    close(M.pleas(None, [T(1.0, 2.0), T(3.0, 6.0)], weight=[1.0, 3.0]), [2.5, 5.0])
    close(M.regmean_plus_plus(None, [T(1.0, 2.0), T(3.0, 6.0)], weight=[1.0, 3.0]), [2.5, 5.0])
    with pytest.raises(ValueError, match="weights sum to zero"):
        M.pleas(None, [w1, w2], weight=[0.0, 0.0])


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([False, True]), st.integers(2, 3))
def test_pleas_is_the_least_squares_fit_of_each_models_outputs(seed, in_first, k):
    """W minimises sum_k w_k ||Xm_k W^T - X_k W_k^T||^2 / n_k: checked against a least-squares
    solve of the stacked system, with G_k and C_k made from the inputs."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 4, 3
    xm = [torch.randn(7 + 2 * i, d_in, generator=g, dtype=F64) for i in range(k)]
    xs = [x + 0.3 * torch.randn(x.shape, generator=g, dtype=F64) for x in xm]
    ws = [torch.randn(d_out, d_in, generator=g, dtype=F64) for _ in range(k)]
    wt = [0.5 + i for i in range(k)]
    stats = [(a.T @ a / a.shape[0], a.T @ b / a.shape[0], in_first) for a, b in zip(xm, xs)]
    stored = [w.T.contiguous() if in_first else w for w in ws]
    got = M.pleas(None, stored, weight=wt, statistics={"merged_inputs": stats})
    got = got.T if in_first else got
    a = torch.cat([x * math.sqrt(c / x.shape[0]) for x, c in zip(xm, wt)])
    y = torch.cat([x @ w.T * math.sqrt(c / x.shape[0]) for x, w, c in zip(xs, ws, wt)])
    assert torch.allclose(got, torch.linalg.lstsq(a, y).solution.T, rtol=1e-8, atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([False, True]), st.integers(2, 3), st.floats(0.0, 1.0))
def test_regmean_is_the_least_squares_merge(seed, in_first, k, alpha):
    """W minimises sum_k w_k ||X_k W^T - X_k W_k^T||^2 / n_k (alpha = 1), or the same with
    each G_k's off-diagonal entries scaled by alpha: checked against a least-squares solve
    of the stacked, scaled system (or the normal equations written out)."""
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = 4, 3
    xs = [torch.randn(6 + 2 * i, d_in, generator=g, dtype=F64) for i in range(k)]
    ws = [torch.randn(d_out, d_in, generator=g, dtype=F64) for _ in range(k)]
    wt = [0.5 + i for i in range(k)]
    grams = [x.T @ x / x.shape[0] for x in xs]
    stored = [w.T.contiguous() if in_first else w for w in ws]
    got = regmean(None, stored, weight=wt, alpha=alpha, statistics={"gram": [(gm, in_first) for gm in grams]})
    got = got.T if in_first else got
    if alpha == 1.0:
        a = torch.cat([x * math.sqrt(w / x.shape[0]) for x, w in zip(xs, wt)])
        y = torch.cat([x @ w.T * math.sqrt(c / x.shape[0]) for x, w, c in zip(xs, ws, wt)])
        want = torch.linalg.lstsq(a, y).solution.T
    else:
        gt = [gm * alpha + torch.diag(torch.diagonal(gm)) * (1 - alpha) for gm in grams]
        lhs = sum(c * gm for c, gm in zip(wt, gt))
        rhs = sum(c * gm @ w.T for c, gm, w in zip(wt, gt, ws))
        want = torch.linalg.solve(lhs, rhs).T
    assert torch.allclose(got, want, rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------------------
# Working precision
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,work", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                        (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_results_come_back_in_working_precision(dtype, work):
    base = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=dtype)
    x = torch.tensor([2.0, 2.0, -1.0, 0.5], dtype=dtype)
    y = torch.tensor([0.0, 3.0, 3.0, 4.0], dtype=dtype)
    calls = {
        "linear": lambda: linear(None, [x, y], [1.0, 1.0]),
        "task_arithmetic": lambda: task_arithmetic(base, [x, y], [0.5, 0.5]),
        "ties": lambda: ties(base, [x, y], [1.0, 1.0], [0.5, 0.5]),
        "dare_linear": lambda: dare_linear(base, [x, y], [1.0, 1.0], [0.5, 0.5], [1, 2]),
        "dare_ties": lambda: dare_ties(base, [x, y], [1.0, 1.0], [0.5, 0.5], [1, 2]),
        "breadcrumbs": lambda: breadcrumbs(base, [x, y], [1.0, 1.0], [0.5, 0.5], [0.25, 0.25]),
        "breadcrumbs_ties": lambda: breadcrumbs_ties(base, [x, y], [1.0, 1.0], [0.5, 0.5], [0.25, 0.25]),
        "della": lambda: della(base, [x, y], [1.0, 1.0], [0.5, 0.5], [0.1, 0.1], [1, 2]),
        "della_linear": lambda: della_linear(base, [x, y], [1.0, 1.0], [0.5, 0.5], [0.1, 0.1], [1, 2]),
        "slerp": lambda: slerp(base, [x], 0.3),
        "model_stock": lambda: model_stock(base, [x, y]),
        "wise_ft": lambda: wise_ft(base, [x], 0.5),
        "passthrough": lambda: passthrough(None, [x], 2.0),
        "fisher": lambda: fisher(None, [x, y], statistics={"fisher": [x.abs(), y.abs()]}),
        "regmean": lambda: regmean(None, [x, y]),
        "weight_matching": lambda: M.weight_matching(None, [x, y]),
        "regmean_plus_plus": lambda: M.regmean_plus_plus(None, [x, y]),
        "pleas": lambda: M.pleas(None, [x, y]),
    }
    assert set(calls) == set(METHODS)
    for name, call in calls.items():
        out = call()
        assert out.dtype == work, name
        assert out.shape == base.shape, name
        assert torch.isfinite(out).all(), name
    # the value itself is computed in the working precision
    close(calls["task_arithmetic"](), torch.tensor([1.0, 2.5, 1.0, 2.25], dtype=F64), rtol=1e-6, atol=1e-6)


def test_inputs_are_not_modified():
    base, x, y = T(TIES_BASE), T(TIES_X), T(TIES_Y)
    copies = [base.clone(), x.clone(), y.clone()]
    ties(base, [x, y], [1.0, 2.0], [0.5, 0.5])
    dare_ties(base, [x, y], [1.0, 2.0], [0.5, 0.5], [1, 2])
    della(base, [x, y], [1.0, 2.0], [0.5, 0.5], [0.1, 0.1], [1, 2])
    linear(None, [x, y], [1.0, 2.0])
    slerp(base, [x], 0.5)
    model_stock(base, [x, y])
    wise_ft(base, [x], 0.5)
    passthrough(None, [x], 2.0)
    for orig, now in zip(copies, [base, x, y]):
        assert torch.equal(orig, now)


# --------------------------------------------------------------------------------------
# Masks: exact counts and tie-breaking, against a stable-sort reference
# --------------------------------------------------------------------------------------

mask_values = st.one_of(
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 0.5]),
    st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_subnormal=False),
)


@st.composite
def mask_tensors(draw):
    n = draw(st.integers(1, 48))
    vals = draw(st.lists(mask_values, min_size=n, max_size=n))
    t = torch.tensor(vals, dtype=draw(st.sampled_from([torch.float32, torch.float64])))
    divisors = [d for d in (2, 3, 4) if n % d == 0 and n > d]
    if divisors and draw(st.booleans()):
        d = draw(st.sampled_from(divisors))
        t = t.reshape(d, n // d)
    return t


@PROPS
@given(a=mask_tensors(), data=st.data())
def test_rank_range_mask_matches_stable_sort(a, data):
    n = a.numel()
    start = data.draw(st.integers(-3, n + 3))
    stop = data.draw(st.integers(-3, n + 3))
    mask = rank_range_mask(a, start, stop)
    r = ref_ranks(a)
    assert mask.shape == a.shape and mask.dtype == torch.bool
    assert torch.equal(mask, (r >= start) & (r < stop))
    assert int(mask.sum()) == max(0, min(n, stop) - max(0, start))


@PROPS
@given(delta=mask_tensors(), density=densities)
def test_magnitude_mask_matches_stable_sort(delta, density):
    n = delta.numel()
    mask = magnitude_mask(delta, density)
    k = n if density >= 1 else max(1, int(density * n))
    assert int(mask.sum()) == k
    assert torch.equal(mask, ref_ranks(delta.abs()) >= n - k)
    # every kept magnitude is >= every dropped one
    if 0 < k < n:
        assert delta.abs()[mask].min() >= delta.abs()[~mask].max()


@PROPS
@given(delta=mask_tensors(), density=densities, gamma=st.floats(0.0, 1.0, allow_nan=False))
def test_outlier_mask_matches_stable_sort(delta, density, gamma):
    n = delta.numel()
    mask = outlier_mask(delta, density, gamma)
    if density >= 1:
        assert bool(mask.all())
        return
    keep = int(density * n)
    n_top = min(int(gamma * n), n - keep)  # fewer top entries dropped when needed
    r = ref_ranks(delta.abs())
    assert int(mask.sum()) == keep
    assert torch.equal(mask, (r >= n - n_top - keep) & (r < n - n_top))


def test_masks_with_many_equal_values_break_ties_by_position():
    a = T(1, 1, 1, 1, 1, 1, 1, 1)
    assert magnitude_mask(a, 0.25).tolist() == [False] * 6 + [True] * 2
    assert rank_range_mask(a, 2, 5).tolist() == [False, False, True, True, True, False, False, False]
    assert outlier_mask(a, 0.5, 0.25).tolist() == [False, False, True, True, True, True, False, False]
    b = T(3, 1, 3, 2, 3, 3, 0, 3)  # 3 at positions 0 2 4 5 7 (ranks 3..7)
    assert magnitude_mask(b, 0.375).tolist() == [False, False, False, False, True, True, False, True]


def test_trimming_never_sorts(monkeypatch):
    delta = torch.randn(64, 33, generator=torch.Generator().manual_seed(0))
    expected_mag = magnitude_mask(delta, 0.3)
    expected_out = outlier_mask(delta, 0.3, 0.05)

    def boom(*a, **k):
        raise AssertionError("trimming must not sort the tensor")

    for name in ("sort", "argsort", "topk", "msort"):
        monkeypatch.setattr(torch, name, boom)
        monkeypatch.setattr(torch.Tensor, name, boom)
    assert torch.equal(magnitude_mask(delta, 0.3), expected_mag)
    assert torch.equal(outlier_mask(delta, 0.3, 0.05), expected_out)
    base = torch.zeros_like(delta)
    ties(base, [delta, -delta], [1.0, 1.0], [0.2, 0.2])
    breadcrumbs_ties(base, [delta, -delta], [1.0, 1.0], [0.2, 0.2], [0.01, 0.01])


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------


@PROPS
@given(ms=model_sets(k_min=1, k_max=4), w=st.lists(pos_weight, min_size=4, max_size=4))
def test_prop_linear_of_identical_models_is_the_model(ms, w):
    _, experts = ms
    x = experts[0]
    k = len(experts)
    close(linear(None, [x] * k, w[:k]), x)
    close(linear(None, [x] * k, w[:k], normalize=False), sum(w[:k]) * x)


@PROPS
@given(ms=model_sets(k_min=2, k_max=4), w=st.lists(pos_weight, min_size=4, max_size=4),
       normalize=st.booleans())
def test_prop_task_arithmetic_of_identical_experts(ms, w, normalize):
    base, experts = ms
    x = experts[0]
    k = len(experts)
    if normalize:
        weights = w[:k]  # any positive weights: divided out
    else:
        weights = [1.0 / k] * k  # weights summing to 1
    close(task_arithmetic(base, [x] * k, weights, normalize=normalize), x, rtol=1e-9, atol=1e-9)


@PROPS
@given(ms=model_sets(k_min=2, k_max=4), w=st.lists(pos_weight, min_size=4, max_size=4),
       density=densities, lam=lambdas)
def test_prop_ties_of_identical_experts(ms, w, density, lam):
    base, experts = ms
    x = experts[0]
    k = len(experts)
    tau = x - base
    n = tau.numel()
    kk = n if density >= 1 else max(1, int(density * n))
    trimmed = tau * (ref_ranks(tau.abs()) >= n - kk)
    # normalize: the disjoint mean of k copies of the same trimmed vector is that vector
    out = ties(base, [x] * k, w[:k], [density] * k, lambda_=lam)
    close(out, base + lam * trimmed)
    if density == 1.0 and lam == 1.0:
        close(out, x)
    # without normalize the weights add up
    out = ties(base, [x] * k, w[:k], [density] * k, lambda_=lam, normalize=False)
    close(out, base + lam * sum(w[:k]) * trimmed, rtol=1e-10, atol=1e-10)


@PROPS
@given(ms=model_sets(k_min=1, k_max=1), t=st.floats(0.0, 1.0))
def test_prop_slerp_of_identical_models_is_the_model(ms, t):
    _, (x,) = ms
    close(slerp(x, [x.clone()], t), x)


@PROPS
@given(ms=model_sets(k_min=1, k_max=1), k=st.integers(2, 4), filter_wise=st.booleans())
def test_prop_model_stock_of_identical_models_is_the_model(ms, k, filter_wise):
    base, (x,) = ms
    close(model_stock(base, [x] * k, filter_wise=filter_wise), x)


@PROPS
@given(ms=model_sets(k_min=1, k_max=3), density=densities, s=st.lists(seeds, min_size=3, max_size=3),
       normalize=st.booleans(), lam=lambdas)
def test_prop_zero_weights_return_the_base(ms, density, s, normalize, lam):
    base, experts = ms
    k = len(experts)
    w, d, sd = [0.0] * k, [density] * k, s[:k]
    close(task_arithmetic(base, experts, w, lambda_=lam, normalize=normalize), base)
    close(ties(base, experts, w, d, lambda_=lam, normalize=normalize), base)
    close(dare_linear(base, experts, w, d, sd, lambda_=lam, normalize=normalize), base)
    close(dare_ties(base, experts, w, d, sd, lambda_=lam, normalize=normalize), base)
    close(breadcrumbs(base, experts, w, d, [0.1] * k, lambda_=lam, normalize=normalize), base)
    close(breadcrumbs_ties(base, experts, w, d, [0.1] * k, lambda_=lam, normalize=normalize), base)


@PROPS
@given(ms=model_sets(k_min=2, k_max=2), w=nonzero_weight, density=densities,
       s=st.lists(seeds, min_size=2, max_size=2), normalize=st.booleans(), lam=lambdas)
def test_prop_a_zero_weight_model_changes_nothing(ms, w, density, s, normalize, lam):
    base, (x, y) = ms
    kw = dict(lambda_=lam, normalize=normalize)
    close(ties(base, [x, y], [w, 0.0], [density] * 2, **kw), ties(base, [x], [w], [density], **kw))
    close(dare_ties(base, [x, y], [w, 0.0], [density] * 2, s, **kw),
          dare_ties(base, [x], [w], [density], s[:1], **kw))
    close(dare_linear(base, [x, y], [w, 0.0], [density] * 2, s, **kw),
          dare_linear(base, [x], [w], [density], s[:1], **kw))
    close(task_arithmetic(base, [x, y], [w, 0.0], **kw), task_arithmetic(base, [x], [w], **kw))


@PROPS
@given(ms=model_sets(k_min=1, k_max=1), w=nonzero_weight, lam=lambdas)
def test_prop_ties_density_one_single_model(ms, w, lam):
    base, (x,) = ms
    tau = x - base
    # without normalize TIES of one model is task arithmetic
    close(ties(base, [x], [w], [1.0], lambda_=lam, normalize=False),
          task_arithmetic(base, [x], [w], lambda_=lam))
    close(ties(base, [x], [w], [1.0], lambda_=lam, normalize=False), base + lam * w * tau)
    # with normalize the weight divides out (also for negative weights)
    close(ties(base, [x], [w], [1.0], lambda_=lam), base + lam * tau)
    close(ties(base, [x], [w], [1.0], lambda_=lam),
          task_arithmetic(base, [x], [w], lambda_=lam, normalize=True))


@PROPS
@given(ms=model_sets(k_min=1, k_max=3), w=st.lists(nonzero_weight, min_size=3, max_size=3),
       s=st.lists(seeds, min_size=3, max_size=3), normalize=st.booleans(), lam=lambdas,
       rescale=st.sampled_from([True, False, "l1", "l2"]))
def test_prop_dare_with_density_one_is_plain_merging(ms, w, s, normalize, lam, rescale):
    base, experts = ms
    k = len(experts)
    kw = dict(lambda_=lam, normalize=normalize)
    if normalize:
        assume(abs(sum(w[:k])) > 1e-3)
    close(dare_linear(base, experts, w[:k], [1.0] * k, s[:k], rescale=rescale, **kw),
          task_arithmetic(base, experts, w[:k], **kw), rtol=1e-9, atol=1e-9)
    close(dare_ties(base, experts, w[:k], [1.0] * k, s[:k], rescale=rescale, **kw),
          ties(base, experts, w[:k], [1.0] * k, **kw), rtol=1e-9, atol=1e-9)


@PROPS
@given(ms=model_sets(k_min=1, k_max=3), w=st.lists(nonzero_weight, min_size=3, max_size=3),
       density=densities, normalize=st.booleans(), lam=lambdas)
def test_prop_ties_matches_the_definition(ms, w, density, normalize, lam):
    base, experts = ms
    k = len(experts)
    trimmed = []
    for x in experts:
        tau = x - base
        n = tau.numel()
        kk = n if density >= 1 else max(1, int(density * n))
        trimmed.append(tau * (ref_ranks(tau.abs()) >= n - kk))
    expected = base + lam * ref_ties_combine(trimmed, w[:k], normalize)
    close(ties(base, experts, w[:k], [density] * k, lambda_=lam, normalize=normalize), expected,
          rtol=1e-10, atol=1e-10)


@PROPS
@given(ms=model_sets(k_min=2, k_max=3, n_min=6, n_max=6), w=st.lists(nonzero_weight, min_size=3, max_size=3),
       density=densities, normalize=st.booleans())
def test_prop_ties_trims_the_flattened_tensor(ms, w, density, normalize):
    base, experts = ms
    k = len(experts)
    flat = ties(base, experts, w[:k], [density] * k, normalize=normalize)
    shaped = ties(base.reshape(2, 3), [x.reshape(2, 3) for x in experts], w[:k], [density] * k,
                  normalize=normalize)
    close(shaped.reshape(-1), flat)


@PROPS
@given(ms=model_sets(k_min=2, k_max=3, n_min=8, n_max=12), w=st.lists(nonzero_weight, min_size=3, max_size=3),
       density=densities, s=st.lists(seeds, min_size=3, max_size=3), rescale=st.sampled_from([True, False, "l1"]))
def test_prop_dare_linear_adds_independent_per_model_contributions(ms, w, density, s, rescale):
    base, experts = ms
    k = len(experts)
    total = dare_linear(base, experts, w[:k], [density] * k, s[:k], rescale=rescale)
    parts = [dare_linear(base, [x], [wi], [density], [si], rescale=rescale) - base
             for x, wi, si in zip(experts, w, s)]
    close(total, base + sum(parts), rtol=1e-10, atol=1e-10)


@PROPS
@given(ms=model_sets(k_min=1, k_max=1), t=st.sampled_from([0.0, 1.0]))
def test_prop_slerp_endpoints(ms, t):
    base, (x,) = ms
    out = slerp(base, [x], t)
    close(out, base if t == 0.0 else x, rtol=1e-9, atol=1e-9)


@PROPS
@given(angle=st.floats(0.1, 3.0), radius=st.floats(0.5, 4.0), t=st.floats(0.0, 1.0),
       phase=st.floats(0.0, 6.28))
def test_prop_slerp_stays_on_the_sphere(angle, radius, t, phase):
    v0 = T(radius * math.cos(phase), radius * math.sin(phase), 0.0)
    v1 = T(radius * math.cos(phase + angle), radius * math.sin(phase + angle), 0.0)
    out = slerp(v0, [v1], t)
    # the interpolant rotates v0 towards v1 by t * angle at constant norm
    close(out, T(radius * math.cos(phase + t * angle), radius * math.sin(phase + t * angle), 0.0),
          rtol=1e-9, atol=1e-9)


@PROPS
@given(ms=model_sets(k_min=1, k_max=3), w=st.lists(nonzero_weight, min_size=3, max_size=3),
       lam=st.floats(-2.0, 3.0), density=densities)
def test_prop_lambda_interpolates_linearly(ms, w, lam, density):
    base, experts = ms
    k = len(experts)
    full = task_arithmetic(base, experts, w[:k])
    close(task_arithmetic(base, experts, w[:k], lambda_=lam), base + lam * (full - base),
          rtol=1e-9, atol=1e-9)
    full = ties(base, experts, w[:k], [density] * k)
    close(ties(base, experts, w[:k], [density] * k, lambda_=lam), base + lam * (full - base),
          rtol=1e-9, atol=1e-9)


@PROPS
@given(ms=model_sets(k_min=1, k_max=1), a=st.floats(0.0, 1.0))
def test_prop_wise_ft_is_linear_in_alpha(ms, a):
    base, (x,) = ms
    close(wise_ft(base, [x], a), (1 - a) * base + a * x, rtol=1e-9, atol=1e-9)
    close(linear(None, [base, x], [1 - a, a], normalize=False), wise_ft(base, [x], a), rtol=1e-9, atol=1e-9)


def test_no_method_writes_into_its_inputs():
    """Inputs in the working dtype are views, not copies: a method must never modify them."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    experts = [base + 0.1 * torch.randn(6, 5, generator=g) for _ in range(3)]
    kept = [base.clone()] + [e.clone() for e in experts]
    per = {"weight": [0.5, 0.3, 0.2], "density": [0.5] * 3, "gamma": [0.1] * 3,
           "epsilon": [0.1] * 3, "seeds": [1, 2, 3]}
    for name, spec in METHODS.items():
        n_models = spec.max_models or 3
        kwargs = {}
        for p in spec.params:
            if p.ignored:
                continue
            if p.per_model:
                kwargs[p.name] = per.get(p.name, [p.default] * n_models)[:n_models]
            elif p.name == "t":
                kwargs["t"] = 0.3
        if spec.random:
            kwargs["seeds"] = per["seeds"][:n_models]
        out = spec.fn(base, experts[:n_models], **kwargs)
        assert out.shape == base.shape, name
        for a, b in zip([base] + experts, kept):
            assert torch.equal(a, b), f"{name} modified an input"


# --------------------------------------------------------------------------------------
# Streaming: chunked thresholds and masks equal the whole-tensor definitions
# --------------------------------------------------------------------------------------


def _tied_values(n, seed, levels=7):
    """Task vectors whose magnitudes repeat a lot (as bf16 deltas do), so thresholds fall
    inside groups of equal values and ties must be broken by position."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-levels, levels + 1, (n,), generator=g).double() / levels)


@pytest.mark.parametrize("sample", [1 << 16, 8])  # 8: the bracket often misses; fallback path
@pytest.mark.parametrize("chunk", [64, 100, 4096])
def test_streamed_cuts_equal_whole_tensor_masks(monkeypatch, chunk, sample):
    n = 3000
    base = _tied_values(n, 0)
    experts = [base + _tied_values(n, s) for s in (1, 2, 3)]
    want_ties = ties(base, experts, [0.5, 0.3, 0.4], [0.2, 0.55, 0.9])
    want_bc = breadcrumbs_ties(base, experts, [0.5, 0.3, 0.4], [0.5, 0.7, 0.3], [0.1, 0.05, 0.2])
    monkeypatch.setattr(M, "EXACT_SELECT_MAX", 16)
    monkeypatch.setattr(M, "CHUNK", chunk)
    monkeypatch.setattr(M, "_SAMPLE", sample)
    got_ties = ties(base, experts, [0.5, 0.3, 0.4], [0.2, 0.55, 0.9])
    got_bc = breadcrumbs_ties(base, experts, [0.5, 0.3, 0.4], [0.5, 0.7, 0.3], [0.1, 0.05, 0.2])
    assert torch.equal(got_ties, want_ties)
    assert torch.equal(got_bc, want_bc)
    # and both agree with the reference masks, tensor by tensor
    for e, d in zip(experts, [0.2, 0.55, 0.9]):
        single = ties(base, [e], [1.0], [d])
        tau = e - base
        assert torch.equal(single, base + tau * magnitude_mask(tau, d))


def test_dare_masks_do_not_depend_on_chunking(monkeypatch):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5000, generator=g, dtype=F64)
    experts = [base + torch.randn(5000, generator=g, dtype=F64) for _ in range(2)]
    want = dare_ties(base, experts, [0.6, 0.4], [0.3, 0.5], seeds=[11, 12])
    for chunk in (4, 64, 1000):
        monkeypatch.setattr(M, "CHUNK", chunk)
        assert torch.equal(dare_ties(base, experts, [0.6, 0.4], [0.3, 0.5], seeds=[11, 12]), want)
    kept = (dare_linear(base, [experts[0]], [1.0], [0.3], seeds=[11], rescale=False) != base).double().mean()
    assert abs(float(kept) - 0.3) < 0.03


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_cached_order_statistics_give_the_same_cuts(method):
    from evomerge.merge.methods import METHODS, order_statistics

    g = torch.Generator().manual_seed(0)
    base = torch.randn(3000, generator=g)
    # many equal magnitudes, so that ties are broken by position
    tensors = [base + torch.randint(-3, 4, (3000,), generator=g).float() * 0.25 for _ in range(3)]
    fn = METHODS[method].fn
    cache: dict = {}
    for density in (0.1, 0.37, 0.8, 1.0):
        kw = dict(weight=[0.5, 0.3, 0.2], density=[density, density / 2, 0.5])
        if method == "breadcrumbs_ties":
            kw["gamma"] = [0.05, 0.01, 0.1]
        plain = fn(base, tensors, **kw)
        with order_statistics(cache):
            cached = fn(base, tensors, **kw)
        assert torch.equal(plain, cached), density
    assert set(cache) == {0, 1, 2}


@pytest.mark.parametrize("name", [n for n, s in METHODS.items() if s.family is not None])
def test_the_registry_family_is_what_the_method_computes(name):
    """``MethodSpec.family`` (read by the engine's flat path) names the sparsification and
    election each task-arithmetic method passes to the general task arithmetic."""
    from evomerge.merge.methods import _general_task_arithmetic

    spec = METHODS[name]
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=g)
    ts = [base + 0.1 * torch.randn(64, 48, generator=g) for _ in range(3)]
    kw = {"weight": [0.7, 0.4, 0.9]}
    for p in spec.params:
        if p.ignored or p.name == "weight":
            continue
        v = {"density": 0.6, "gamma": 0.05, "epsilon": 0.1}.get(p.name, p.default)
        kw["lambda_" if p.name == "lambda" else p.name] = [v] * 3 if p.per_model else v
    if spec.random:
        kw["seeds"] = [11, 12, 13]
    got = spec.fn(base, ts, **kw)
    sparsify, consensus = spec.family
    want = _general_task_arithmetic(base, ts, sparsify=sparsify, consensus=consensus, **kw)
    assert torch.equal(got, want)
