"""Exact heterogeneous-rank aggregation, the lossy refactor and the baselines' rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_p2p.aggregation import (
    AdapterFactors,
    Contribution,
    DigestMismatchError,
    Patch,
    apply_patch,
    cluster_adjacency,
    common_rank,
    concat_factors,
    cosine_adjacency,
    dense_delta,
    dense_nbytes,
    fedavg_factors,
    fedavg_partial,
    finalize,
    fold_patches,
    mira_mixing_matrix,
    mira_personal_patch,
    mira_update,
    numerical_rank,
    patch_from_arrays,
    patch_nbytes,
    patch_to_arrays,
    refactor_lossy,
    refactor_within,
    sample_weights,
    stack_merge,
    stacked_is_smaller,
    stacked_singular_values,
)
from atlas_p2p.aggregation.stacking import StackedFactors

SHAPES = {"q": (12, 10), "v": (12, 10), "mlp": (7, 12)}  # module -> (d_out, d_in)
ALPHA = 16.0


def make_contribution(gen, node, n, ranks, dtype=torch.float64, round_=0, dense=None):
    """Random non-zero factors (B too, as after training) with classic α/r scaling."""
    factors = {}
    for module, r in ranks.items():
        d_out, d_in = SHAPES[module]
        a = torch.randn(r, d_in, generator=gen, dtype=torch.float64).to(dtype)
        b = torch.randn(d_out, r, generator=gen, dtype=torch.float64).to(dtype)
        factors[module] = AdapterFactors(a, b, ALPHA / r if r else 0.0)
    return Contribution(factors, n, node, round_, dense or {})


def reference(contributions, module, use_scaling=True):
    """Σ_k p_k γ_k B_k A_k computed densely in float64, absent module = 0, p over all."""
    total = sum(c.n_samples for c in contributions)
    d_out, d_in = SHAPES[module]
    out = torch.zeros(d_out, d_in, dtype=torch.float64)
    for c in contributions:
        if module in c.factors:
            f = c.factors[module]
            gamma = f.scaling if use_scaling else 1.0
            out += (c.n_samples / total) * gamma * (f.B.double() @ f.A.double())
    return out


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def hetero(gen):
    """Five clients with unequal ranks, sample counts, a rank-0 and a missing module."""
    plan = [
        ("n0", 30, {"q": 2, "v": 4, "mlp": 8}),
        ("n1", 5, {"q": 8, "v": 2, "mlp": 2}),
        ("n2", 12, {"q": 4, "v": 0, "mlp": 4}),
        ("n3", 50, {"q": 16, "mlp": 2}),  # no "v" at all
        ("n4", 1, {"q": 1, "v": 8, "mlp": 16}),
    ]
    return [make_contribution(gen, node, n, ranks) for node, n, ranks in plan]


# -- exactness -----------------------------------------------------------------------------


def test_stack_merge_equals_dense_weighted_mean_float64(hetero):
    patch = stack_merge(hetero)
    for module in SHAPES:
        expected = reference(hetero, module)
        got = dense_delta(patch, module)
        assert got.dtype == torch.float64
        assert torch.allclose(got, expected, rtol=0, atol=1e-12 * expected.abs().max().item())


def test_stacked_rank_is_sum_of_contributing_ranks(hetero):
    patch = stack_merge(hetero)
    assert patch.modules["q"].rank == 2 + 8 + 4 + 16 + 1
    assert patch.modules["v"].rank == 4 + 2 + 8  # rank 0 and the missing one add no columns
    assert patch.modules["q"].shape == SHAPES["q"]


def test_dropping_the_scaling_would_be_caught(hetero):
    merged = dense_delta(stack_merge(hetero), "q")
    without_gamma = reference(hetero, "q", use_scaling=False)
    with_gamma = reference(hetero, "q")
    assert torch.allclose(merged, with_gamma, atol=1e-10)
    # the ranks differ, so γ_k = α/r_k differs: forgetting it changes the result a lot
    assert (merged - without_gamma).norm() > 0.5 * with_gamma.norm()


def test_float32_merge_is_close_to_float64_reference(gen):
    cs = [make_contribution(gen, f"n{k}", 10 + k, {"q": r}, dtype=torch.float32) for k, r in enumerate([2, 4, 8, 16])]
    got = dense_delta(stack_merge(cs), "q")
    assert got.dtype == torch.float32
    expected = reference(cs, "q")
    assert ((got.double() - expected).norm() / expected.norm()).item() < 1e-5


def test_merge_is_independent_of_arrival_order(hetero):
    forward = stack_merge(hetero)
    backward = stack_merge(list(reversed(hetero)))
    assert forward.digest == backward.digest
    assert torch.equal(forward.modules["q"].B, backward.modules["q"].B)


@settings(max_examples=25, deadline=None)
@given(
    ranks=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    counts=st.lists(st.integers(0, 100), min_size=6, max_size=6),
    seed=st.integers(0, 2**16),
)
def test_stack_merge_exact_for_any_ranks_and_counts(ranks, counts, seed):
    counts = counts[: len(ranks)]
    if sum(counts) == 0:
        counts[0] = 1
    g = torch.Generator().manual_seed(seed)
    cs = [make_contribution(g, f"n{k}", n, {"mlp": r}) for k, (r, n) in enumerate(zip(ranks, counts))]
    got = dense_delta(stack_merge(cs), "mlp")
    expected = reference(cs, "mlp")
    assert torch.allclose(got, expected, rtol=0, atol=1e-12 * max(1.0, expected.abs().max().item()))


# -- missing modules and rank 0 -------------------------------------------------------------


def test_missing_module_counts_as_zero_update_and_dilutes(gen):
    with_v = make_contribution(gen, "a", 10, {"q": 2, "v": 4})
    without_v = make_contribution(gen, "b", 30, {"q": 2})
    patch = stack_merge([with_v, without_v])
    # p_a = 10/40 over ALL contributions, not 1 over the holders of "v"
    expected = 0.25 * with_v.delta("v")
    assert torch.allclose(dense_delta(patch, "v"), expected, atol=1e-12)
    assert patch.weights == {"a": 0.25, "b": 0.75}


def test_rank_zero_everywhere_gives_an_empty_stack_of_the_right_shape(gen):
    cs = [make_contribution(gen, "a", 3, {"v": 0}), make_contribution(gen, "b", 4, {"v": 0})]
    patch = stack_merge(cs)
    assert patch.modules["v"].rank == 0
    assert torch.equal(dense_delta(patch, "v"), torch.zeros(SHAPES["v"], dtype=torch.float64))


def test_zero_sample_contribution_adds_nothing(gen):
    a = make_contribution(gen, "a", 8, {"q": 4})
    idle = make_contribution(gen, "b", 0, {"q": 4})
    patch = stack_merge([a, idle])
    assert patch.modules["q"].rank == 4
    assert torch.allclose(dense_delta(patch, "q"), a.delta("q"), atol=1e-12)


# -- dense trainables ---------------------------------------------------------------------------


def test_dense_head_is_the_sample_weighted_mean(gen):
    heads = [torch.randn(3, 12, generator=gen, dtype=torch.float64) for _ in range(3)]
    counts = [1, 2, 7]
    cs = [make_contribution(gen, f"n{k}", counts[k], {"q": 2}, dense={"score.weight": heads[k]}) for k in range(3)]
    patch = stack_merge(cs)
    expected = sum(n / 10 * h for n, h in zip(counts, heads))
    assert torch.allclose(patch.dense["score.weight"], expected, atol=1e-14)


def test_dense_names_must_agree(gen):
    a = make_contribution(gen, "a", 1, {"q": 2}, dense={"head": torch.zeros(2, 2)})
    b = make_contribution(gen, "b", 1, {"q": 2})
    with pytest.raises(ValueError, match="same dense trainables"):
        stack_merge([a, b])


def test_apply_patch_adds_every_update_and_leaves_inputs_alone(gen):
    cs = [
        make_contribution(
            gen,
            f"n{k}",
            1 + k,
            {"q": 2, "mlp": 3},
            dense={"head": torch.randn(2, 12, generator=gen, dtype=torch.float64)},
        )
        for k in range(3)
    ]
    patch = stack_merge(cs)
    base = {
        "q": torch.randn(*SHAPES["q"], dtype=torch.float64),
        "mlp": torch.randn(*SHAPES["mlp"], dtype=torch.float64),
        "head": torch.zeros(2, 12, dtype=torch.float64),
        "other": torch.ones(3),
    }
    before = {k: v.clone() for k, v in base.items()}
    new = apply_patch(base, patch)
    assert torch.allclose(new["q"], before["q"] + reference(cs, "q"), atol=1e-12)
    assert torch.allclose(new["head"], patch.dense["head"])
    assert new["other"] is base["other"]
    assert all(torch.equal(base[k], before[k]) for k in base)
    with pytest.raises(ValueError, match="no base tensor"):
        apply_patch({"q": base["q"]}, patch)


# -- bytes ------------------------------------------------------------------------------------------


def test_stacked_is_smaller_rule_matches_real_byte_counts(gen):
    d_out, d_in = SHAPES["q"]  # threshold 120 / 22 ≈ 5.45: R <= 5 is smaller
    for total in range(0, 12):
        c = make_contribution(gen, "a", 1, {"q": total})
        patch = stack_merge([c])
        assert stacked_is_smaller(total, d_in, d_out) == (patch_nbytes(patch) < dense_nbytes(patch))
    assert stacked_is_smaller(383, 768, 768) and not stacked_is_smaller(384, 768, 768)
    with pytest.raises(ValueError, match="total_rank"):
        stacked_is_smaller(-1, 768, 768)


# -- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "factors, n, match",
    [
        ({"q": (torch.zeros(2, 10), torch.zeros(12, 3), 1.0)}, 1, "rank mismatch"),
        ({"q": (torch.zeros(2, 10), torch.zeros(12, 2), 1.0)}, -1, "n_samples must be >= 0"),
        ({"q": (torch.zeros(10), torch.zeros(12, 2), 1.0)}, 1, "2-D"),
        ({"q": (torch.zeros(2, 10), torch.zeros(12, 2), float("nan"))}, 1, "scaling must be finite"),
        ({"q": (torch.full((2, 10), float("inf")), torch.zeros(12, 2), 1.0)}, 1, "NaN or infinity"),
        ({"q": (torch.zeros(2, 10, dtype=torch.int64), torch.zeros(12, 2), 1.0)}, 1, "floating"),
        ({"q": ([[0.0]], torch.zeros(12, 1), 1.0)}, 1, "tensor or array"),
        ({"q": "nonsense"}, 1, "expected factors"),
        ({"q": (torch.zeros(2, 10), torch.zeros(12, 2), 1.0)}, True, "n_samples must be an int"),
    ],
)
def test_bad_contributions_are_clear_value_errors(factors, n, match):
    with pytest.raises(ValueError, match=match):
        Contribution(factors, n, "bad", 0)


def test_bad_merges_are_clear_value_errors(gen):
    a = make_contribution(gen, "a", 1, {"q": 2})
    with pytest.raises(ValueError, match="no contributions"):
        stack_merge([])
    with pytest.raises(ValueError, match="duplicate"):
        stack_merge([a, make_contribution(gen, "a", 1, {"q": 2})])
    with pytest.raises(ValueError, match="share a round"):
        stack_merge([a, make_contribution(gen, "b", 1, {"q": 2}, round_=1)])
    with pytest.raises(ValueError, match="Σ n_k = 0"):
        stack_merge([make_contribution(gen, "z", 0, {"q": 2})])
    wrong = Contribution({"q": (torch.zeros(2, 11), torch.zeros(12, 2), 1.0)}, 1, "w", 0)
    with pytest.raises(ValueError, match="differs across nodes"):
        stack_merge([a, wrong])
    with pytest.raises(KeyError, match="no module 'nope'"):
        dense_delta(stack_merge([a]), "nope")


def test_numpy_factors_and_lora_style_objects_are_accepted():
    class Factors:  # any object with A, B and scaling
        def __init__(self, A, B, scaling):
            self.A, self.B, self.scaling = A, B, scaling

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 10)), rng.standard_normal((12, 2))
    c1 = Contribution({"q": Factors(a, b, 0.5)}, 1, "x", 0)
    c2 = Contribution({"q": (a, b, 0.5)}, 1, "y", 0)
    assert torch.allclose(c1.delta("q"), torch.from_numpy(0.5 * b @ a))
    assert c1.factors["q"].shape == c2.factors["q"].shape == (12, 10)


def test_concat_factors_sums_adapters_exactly(gen):
    f1 = make_contribution(gen, "a", 1, {"q": 2}).factors["q"]
    f2 = make_contribution(gen, "b", 1, {"q": 4}).factors["q"]
    both = concat_factors(f1, f2)
    assert both.rank == 6 and both.scaling == 1.0
    assert torch.allclose(both.delta(), f1.delta() + f2.delta(), atol=1e-12)


def test_contribution_digest_covers_scaling_and_weight(gen):
    c = make_contribution(gen, "a", 3, {"q": 2})
    f = c.factors["q"]
    same = Contribution({"q": (f.A.clone(), f.B.clone(), f.scaling)}, 3, "a", 0)
    other_scaling = Contribution({"q": (f.A, f.B, f.scaling * 2)}, 3, "a", 0)
    other_n = Contribution({"q": (f.A, f.B, f.scaling)}, 4, "a", 0)
    assert c.digest == same.digest
    assert len({c.digest, other_scaling.digest, other_n.digest}) == 3


# -- lossy refactor -----------------------------------------------------------------------------


def test_refactor_error_equals_discarded_singular_values(hetero):
    stacked = stack_merge(hetero).modules["q"]
    dense = stacked.dense()
    sigma = torch.linalg.svdvals(dense)  # reference, from the dense matrix
    assert torch.allclose(stacked_singular_values(stacked)[: sigma.numel()], sigma, atol=1e-10)
    for rank in (1, 3, 6):
        b, a, error = refactor_lossy(stacked, rank)
        assert b.shape == (12, rank) and a.shape == (rank, 10)
        expected = math.sqrt(float((sigma[rank:] ** 2).sum()))
        assert error == pytest.approx(expected, rel=1e-9)
        assert (dense - b @ a).norm().item() == pytest.approx(expected, rel=1e-9)


def test_refactor_is_exact_at_full_rank_and_pads(gen):
    cs = [make_contribution(gen, "a", 1, {"q": 2}), make_contribution(gen, "b", 3, {"q": 3})]
    stacked = stack_merge(cs).modules["q"]  # true rank 5
    b, a, error = refactor_lossy(stacked, 8, scaling=ALPHA / 8)
    assert error < 1e-12
    assert b.shape == (12, 8) and torch.count_nonzero(b[:, 5:]) == 0
    assert torch.allclose((ALPHA / 8) * b @ a, stacked.dense(), atol=1e-12)


def test_refactor_rank_zero_and_bad_arguments(hetero):
    stacked = stack_merge(hetero).modules["q"]
    b, a, error = refactor_lossy(stacked, 0)
    assert b.shape == (12, 0) and error == pytest.approx(stacked.dense().norm().item(), rel=1e-9)
    with pytest.raises(ValueError, match="rank"):
        refactor_lossy(stacked, -1)
    with pytest.raises(ValueError, match="scaling"):
        refactor_lossy(stacked, 2, scaling=0.0)
    empty = StackedFactors(torch.zeros(4, 0), torch.zeros(0, 5))
    assert refactor_lossy(empty, 3).error == 0.0


def test_refactor_within_picks_the_numerical_rank_from_the_same_svd(hetero):
    stacked = stack_merge(hetero).modules["q"]
    sigma = torch.linalg.svdvals(stacked.dense())  # reference, from the dense matrix
    for tol, cap in ((1e-12, None), (0.3, None), (1e-12, 2)):
        low, s, exact = refactor_within(stacked, tol, cap)
        assert exact == numerical_rank(stacked, tol)
        assert torch.allclose(s[: sigma.numel()], sigma, atol=1e-10)
        rank = exact if cap is None else min(cap, exact)
        want = refactor_lossy(stacked, rank)
        assert low.B.shape == (12, rank) and low.error == pytest.approx(want.error, rel=1e-9, abs=1e-12)
        assert torch.allclose(low.B @ low.A, want.B @ want.A, atol=1e-10)
    empty = StackedFactors(torch.zeros(4, 0), torch.zeros(0, 5))
    low, s, exact = refactor_within(empty, 1e-6)
    assert exact == 0 and low.B.shape == (4, 1) and low.error == 0.0  # peft needs r >= 1
    with pytest.raises(ValueError, match="cap"):
        refactor_within(stacked, 1e-6, 0)


# -- flat arrays (wire and checkpoints) --------------------------------------------------------


def test_patch_round_trips_through_arrays_and_safetensors(hetero, tmp_path):
    from safetensors.numpy import load_file, save_file

    patch = stack_merge(hetero)
    save_file(patch_to_arrays(patch), str(tmp_path / "patch.safetensors"))
    back = patch_from_arrays(load_file(str(tmp_path / "patch.safetensors")))
    assert back.digest == patch.digest
    assert back.weights == patch.weights and back.round == patch.round
    assert torch.equal(dense_delta(back, "mlp"), dense_delta(patch, "mlp"))


def test_tampered_patch_arrays_are_rejected(hetero):
    arrays = patch_to_arrays(stack_merge(hetero))
    tampered = {k: v.copy() for k, v in arrays.items()}
    tampered["m0.A"][0, 0] += 1.0
    with pytest.raises(DigestMismatchError):
        patch_from_arrays(tampered)
    with pytest.raises(ValueError, match="unexpected keys"):
        patch_from_arrays({**arrays, "m9.B": arrays["m0.B"]})
    with pytest.raises(ValueError, match="float32 or float64"):
        patch_from_arrays({**arrays, "m0.A": arrays["m0.A"].astype(np.float16)})
    with pytest.raises(ValueError, match="JSON"):
        patch_from_arrays({**arrays, "meta": np.frombuffer(b"\xff{", dtype=np.uint8)})
    nan = arrays["m0.B"].copy()
    nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        patch_from_arrays({**arrays, "m0.B": nan})


def test_fold_patches_is_the_sum(hetero, gen):
    p1 = stack_merge(hetero)
    p2 = stack_merge([make_contribution(gen, "x", 2, {"q": 3, "mlp": 1})])
    folded = fold_patches([p1, p2])
    assert torch.allclose(dense_delta(folded, "q"), dense_delta(p1, "q") + dense_delta(p2, "q"), atol=1e-12)
    assert torch.allclose(dense_delta(folded, "v"), dense_delta(p1, "v"))
    assert folded.weights == {}


# -- baselines: SplitLoRA's factor-wise FedAvg -------------------------------------------------


def test_fedavg_of_factors_averages_each_factor(gen):
    cs = [make_contribution(gen, f"n{k}", n, {"q": 4, "mlp": 2}) for k, n in enumerate([1, 3, 6])]
    avg = fedavg_factors(cs)
    p = sample_weights(cs)
    expected_a = sum(p[c.node_id] * c.factors["q"].A for c in cs)
    assert torch.allclose(avg.factors["q"].A, expected_a, atol=1e-14)
    assert avg.factors["q"].scaling == ALPHA / 4


def test_fedavg_of_factors_is_not_exact_but_stacking_is(gen):
    cs = [make_contribution(gen, f"n{k}", n, {"q": 4}) for k, n in enumerate([1, 3, 6])]
    exact = reference(cs, "q")
    fedavg = fedavg_factors(cs).factors["q"].delta()
    stacked = dense_delta(stack_merge(cs), "q")
    assert (fedavg - exact).norm() > 0.1 * exact.norm()  # cross terms B_k A_l
    assert (stacked - exact).norm() < 1e-12 * exact.norm()


def test_fedavg_of_factors_refuses_heterogeneous_settings(gen):
    a = make_contribution(gen, "a", 1, {"q": 4})
    with pytest.raises(ValueError, match="equal ranks"):
        fedavg_factors([a, make_contribution(gen, "b", 1, {"q": 2})])
    with pytest.raises(ValueError, match="same modules"):
        fedavg_factors([a, make_contribution(gen, "b", 1, {"q": 4, "v": 4})])
    f = a.factors["q"]
    with pytest.raises(ValueError, match="equal scalings"):
        fedavg_factors([a, Contribution({"q": (f.A, f.B, 1.0)}, 1, "b", 0)])


def test_the_fedavg_partial_publishes_the_product_of_the_averaged_factors(gen):
    cs = [make_contribution(gen, f"n{k}", n, {"q": 4, "mlp": 2}) for k, n in enumerate([1, 3, 6])]
    patch = finalize(fedavg_partial(cs))
    p = sample_weights(cs)
    for module in ("q", "mlp"):
        b = sum(p[c.node_id] * c.factors[module].B for c in cs)
        a = sum(p[c.node_id] * c.factors[module].A for c in cs)
        expected = cs[0].factors[module].scaling * b @ a  # SplitLoRA: (Σ p_k B_k)(Σ p_k γ A_k)
        assert torch.allclose(dense_delta(patch, module), expected, atol=1e-12)
        assert not torch.allclose(dense_delta(patch, module), reference(cs, module), atol=1e-6)  # not the exact mean
    assert patch.weights == pytest.approx(p)
    assert fedavg_partial(cs).covers == {c.node_id: c.digest for c in cs}


def test_a_carried_contribution_is_brought_to_the_common_rank_and_keeps_its_digest(gen):
    cs = [make_contribution(gen, f"n{k}", 2, {"q": 4}) for k in range(3)]
    carried = make_contribution(gen, "late", 2, {"q": 8})  # two rounds stacked
    aligned = common_rank([*cs, carried])
    assert aligned[:3] == cs  # the ones at the common rank are untouched
    assert aligned[3].factors["q"].rank == 4
    # the re-factored update is the best rank-4 approximation of the carried one
    s = torch.linalg.svdvals(carried.delta("q"))
    error = (aligned[3].delta("q") - carried.delta("q")).norm()
    assert float(error) == pytest.approx(float(s[4:].norm()), rel=1e-6)
    assert fedavg_partial([*cs, carried]).covers["late"] == carried.digest


# -- baselines: MIRA ----------------------------------------------------------------------------


def _mira_dense(cs, adjacency, eta_lambda, module):
    deltas = [c.delta(module) if module in c.factors else torch.zeros(SHAPES[module], dtype=torch.float64) for c in cs]
    a = torch.as_tensor(adjacency, dtype=torch.float64).clone()
    a.fill_diagonal_(0)
    return [
        deltas[k] - eta_lambda * sum(a[k, l] * (deltas[k] - deltas[l]) for l in range(len(cs))) for k in range(len(cs))
    ]


def test_mira_with_empty_graph_is_identity(hetero):
    out = mira_update(hetero, np.zeros((5, 5)), eta_lambda=0.3)
    for c in hetero:
        for module in c.factors:
            assert torch.allclose(dense_delta(out[c.node_id], module), c.delta(module), atol=1e-12)


def test_mira_full_graph_contracts_towards_the_mean(gen):
    cs = [make_contribution(gen, f"n{k}", 1, {"q": r}) for k, r in enumerate([2, 4, 8, 16])]
    full = np.ones((4, 4))
    eta_lambda = 0.1  # deg = 3, ηλ·deg = 0.3 < 1
    out = mira_update(cs, full, eta_lambda)
    mean = sum(c.delta("q") for c in cs) / 4
    for c in cs:
        new = dense_delta(out[c.node_id], "q")
        # complete graph: ΔW'_k − mean = (1 − ηλK)(ΔW_k − mean)
        assert torch.allclose(new - mean, (1 - eta_lambda * 4) * (c.delta("q") - mean), atol=1e-10)
    new_mean = sum(dense_delta(out[c.node_id], "q") for c in cs) / 4
    assert torch.allclose(new_mean, mean, atol=1e-10)


def test_mira_matches_the_dense_rule_for_unequal_ranks_and_weighted_graph(hetero):
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, (5, 5))
    a = (a + a.T) / 2
    out = mira_update(hetero, a, eta_lambda=0.2)
    for module in SHAPES:
        expected = _mira_dense(hetero, a, 0.2, module)
        for k, c in enumerate(hetero):
            assert torch.allclose(dense_delta(out[c.node_id], module), expected[k], atol=1e-10)


def test_mira_checks_stability_and_graph(hetero):
    with pytest.raises(ValueError, match="unstable MIRA step"):
        mira_update(hetero, np.ones((5, 5)), eta_lambda=0.25)  # 0.25 · 4 = 1
    with pytest.raises(ValueError, match="adjacency is 4x4"):
        mira_update(hetero, np.ones((4, 4)), eta_lambda=0.1)
    with pytest.raises(ValueError, match=">= 0"):
        mira_mixing_matrix(-np.ones((3, 3)), 0.1)
    with pytest.raises(ValueError, match="square"):
        mira_mixing_matrix(np.ones((3, 2)), 0.1)
    with pytest.raises(ValueError, match="eta_lambda"):
        mira_mixing_matrix(np.ones((3, 3)), -0.1)


def test_task_graphs():
    a = cluster_adjacency([0, 1, 0, 1, 1])
    assert a[0, 2] == 1 and a[0, 1] == 0 and a[3, 4] == 1 and a.trace() == 0
    f = np.array([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]])
    c = cosine_adjacency(f)
    assert c[0, 1] == pytest.approx(1 / math.sqrt(2)) and c[0, 2] == 0.0 and c.trace() == 0
    assert cosine_adjacency(f, floor=0.8)[0, 1] == 0.0
    with pytest.raises(ValueError, match="zero"):
        cosine_adjacency(np.zeros((2, 3)))


def test_mira_personal_patches_keep_every_adapter_where_the_mixing_rule_puts_it(gen):
    """Three nodes, three rounds: folding each node's personal patch gives, every round,
    MIRA's cumulative ΔW_k' = Σ_l m_kl (ΔW_l + δ_l) with a complete graph and ηλ = pull / n."""
    ids, pull = ["a", "b", "c"], 0.5
    mix = mira_mixing_matrix(np.ones((3, 3)), pull / 3)
    want = {k: torch.zeros(SHAPES["q"], dtype=torch.float64) for k in ids}
    want_head = {k: torch.zeros(2, 3, dtype=torch.float64) for k in ids}
    own = {k: Patch({}) for k in ids}
    mean_total = Patch({})
    for r in range(3):
        heads = [torch.randn(2, 3, generator=gen, dtype=torch.float64) for _ in ids]
        cs = [
            make_contribution(gen, k, 1 + i, {"q": 2 + 2 * i}, round_=r, dense={"head": heads[i]})
            for i, k in enumerate(ids)
        ]
        after = [want[k] + c.delta("q") for k, c in zip(ids, cs)]
        after_head = [want_head[k] + h for k, h in zip(ids, heads)]
        want = {k: sum(mix[i, j] * after[j] for j in range(3)) for i, k in enumerate(ids)}
        want_head = {k: sum(mix[i, j] * after_head[j] for j in range(3)) for i, k in enumerate(ids)}
        for k in ids:
            patch, new_mean = mira_personal_patch(cs, k, own[k], mean_total, pull)
            assert patch.weights[k] == pytest.approx(1 - pull + pull / 3)
            own[k] = fold_patches([own[k], patch])
        mean_total = new_mean
        for k in ids:
            assert torch.allclose(dense_delta(own[k], "q"), want[k], atol=1e-10), (r, k)
            assert torch.allclose(own[k].dense["head"], want_head[k], atol=1e-12), (r, k)
    assert not torch.allclose(dense_delta(own["a"], "q"), dense_delta(own["b"], "q"))  # personal, not shared


def test_a_pull_outside_zero_to_one_is_refused(gen):
    cs = [make_contribution(gen, "a", 1, {"q": 2})]
    with pytest.raises(ValueError, match="pull"):
        mira_personal_patch(cs, "a", Patch({}), Patch({}), pull=1.0)
