"""Importance scores, water-filled ranks, split points, pairing, repair and re-planning.

Planning is pure: tables of NodeInfo in, a Plan out. Budgets in the tables are derived
from the memory model so each case sits just above or below a threshold.
"""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch

from atlas_p2p import importance as I
from atlas_p2p import memory as M
from atlas_p2p import planning as P
from atlas_p2p.capabilities import Capabilities
from atlas_p2p.lora import attach_lora, lora_targets
from atlas_p2p.models import causal_lm_labels, split_model, tiny_model, unsplit_forward
from tests.planner_inputs import SHAPE, WORK

CTX = P.PlanContext(SHAPE, WORK)
MODULES = M.lora_candidates(SHAPE)
L = SHAPE.num_layers
MB = 10**6


def owner_memory(split, ctx=CTX):
    """Smallest memory whose headroom fits the owner at `split` with its minimum adapters."""
    hosted = [m for m in MODULES if m.block < split]
    need = M.owner_footprint(SHAPE, split, P.minimum_ranks(hosted, {}), ctx.workload)
    return math.ceil(need.total / ctx.config.headroom) + 1


def node(node_id, memory, cluster=0, has_data=True, bandwidth=100e6, compute=1.0):
    return P.NodeInfo(node_id, Capabilities(int(memory), bandwidth, compute, has_data), cluster)


BIG = 100 * MB  # trains the whole model with room to host several owners


def helper_room_for_one(split=2, ctx=CTX):
    """Memory of a pure helper that hosts one owner at `split` with minimum tail ranks, not two."""
    tail = P.minimum_ranks([m for m in MODULES if m.block >= split], {})
    one = M.ServedOwner(split, ctx.workload, tail, head=not ctx.config.u_shape)
    need = M.helper_footprint(SHAPE, [one], weight_bytes=ctx.workload.weight_bytes).total
    return math.ceil(need / ctx.config.headroom) + 1


def helper_used(plan, helper_id, head=True):
    """Bytes the plan puts on `helper_id`, recomputed from the rows with the memory model."""
    ctx, row = plan.context, plan[helper_id]
    owners = [
        M.ServedOwner(
            plan[o].split,
            ctx.workload,
            {n: r for n, r in plan[o].ranks.items() if M.candidate(SHAPE, n).block >= plan[o].split},
            head=head,
        )
        for o in row.serves
    ]
    own = M.whole_model_footprint(SHAPE, row.ranks, ctx.workload).total if row.role == P.WHOLE else 0
    return own + M.helper_footprint(SHAPE, owners, holds_weights=row.role == P.WHOLE).total


# ================================================================ importance


def _probe_model():
    model = tiny_model("gpt2", "causal_lm", vocab_size=50, num_layers=2)
    names = lora_targets(model, kinds=("attn", "mlp"))
    peft_model = attach_lora(model, {n: 2 for n in names[:2]}, seed=1)
    # nonzero B so the adapters take part in the loss
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(3, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    return peft_model, names, {"ids": ids, "mask": mask, "labels": causal_lm_labels(ids, mask)}


def _full_loss(model, batch):
    return unsplit_forward(model, batch["ids"], batch["mask"], batch["labels"])[0]


def test_probe_scores_are_weight_times_gradient_over_rank1_cost():
    model, names, batch = _probe_model()
    weights = {n: dict(model.named_modules())["base_model.model." + n] for n in names}
    weights = {n: getattr(m, "base_layer", m).weight for n, m in weights.items()}

    scores = I.probe_scores(model, batch, _full_loss, names)

    for w in weights.values():
        w.requires_grad_(True)
    grads = torch.autograd.grad(_full_loss(model, batch), list(weights.values()))
    for (name, w), g in zip(weights.items(), grads):
        w.requires_grad_(False)
        expected = float((w * g).abs().sum()) / (w.shape[0] + w.shape[1])
        assert scores[name] == pytest.approx(expected, rel=1e-5)
    assert all(s > 0 for s in scores.values())


def test_probe_changes_no_flag_and_no_gradient():
    model, names, batch = _probe_model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    values = {n: p.detach().clone() for n, p in model.named_parameters()}

    I.probe_scores(model, batch, _full_loss, names)

    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(values[n], p) for n, p in model.named_parameters())


def test_owner_probe_with_the_helpers_gradient_scores_like_the_whole_model():
    model, names, batch = _probe_model()
    owner, helper = split_model(model, 1)
    hidden = owner(batch["ids"], batch["mask"]).detach().requires_grad_(True)
    loss, _ = helper(hidden, batch["mask"], batch["labels"])
    grad_from_helper = torch.autograd.grad(loss, hidden)[0]  # what the helper sends back
    owner_names = [n for n in names if ".h.0." in n]

    # the part shares the model's weights, so names are looked up in the model it was cut from
    on_owner = I.probe_scores(
        model, batch, lambda _, b: (owner(b["ids"], b["mask"]) * grad_from_helper).sum(), owner_names
    )
    on_whole = I.probe_scores(model, batch, _full_loss, owner_names)

    assert on_owner == pytest.approx(on_whole, rel=1e-4)


def test_weights_the_loss_does_not_reach_score_zero():
    model, names, batch = _probe_model()
    owner, _ = split_model(model, 1)

    scores = I.probe_scores(model, batch, lambda _, b: owner(b["ids"], b["mask"]).pow(2).mean(), names)

    assert all(scores[n] == 0 for n in names if ".h.1." in n)
    assert all(scores[n] > 0 for n in names if ".h.0." in n)


@pytest.mark.parametrize(
    "names,loss_fn,match",
    [
        (["transformer.h.0.attn.nope"], _full_loss, "nope"),
        (["transformer.h.0.attn.c_attn"] * 2, _full_loss, "duplicates"),
        ([], _full_loss, "at least one"),
        (["transformer.h.0.attn.c_attn"], lambda m, b: _full_loss(m, b).expand(2), "scalar"),
        (["transformer.h.0.attn.c_attn"], lambda m, b: _full_loss(m, b) * float("nan"), "not finite"),
    ],
)
def test_probe_rejects_bad_input_and_restores_flags(names, loss_fn, match):
    model, _, batch = _probe_model()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    with pytest.raises(ValueError, match=match):
        I.probe_scores(model, batch, loss_fn, names)

    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize(
    "scores,expected",
    [
        ({"a": 1.0, "b": 3.0}, {"a": 0.25, "b": 0.75}),
        ({"a": 0.0, "b": 0.0}, {"a": 0.5, "b": 0.5}),
        ({}, {}),
    ],
)
def test_normalise(scores, expected):
    assert I.normalise(scores) == pytest.approx(expected)


def test_normalise_rejects_negative_or_nan():
    for bad in ({"a": -1.0}, {"a": float("nan")}):
        with pytest.raises(ValueError, match="scores"):
            I.normalise(bad)


def test_smoothing_follows_beta_and_starts_from_the_first_probe():
    first = I.smooth(None, {"a": 2.0, "b": 2.0})
    second = I.smooth(first, {"a": 1.0, "b": 0.0}, beta=0.85)

    assert first == pytest.approx({"a": 0.5, "b": 0.5})
    assert second == pytest.approx({"a": 0.85 * 0.5 + 0.15, "b": 0.85 * 0.5})
    with pytest.raises(ValueError, match="beta=1"):
        I.smooth(first, first, beta=1)


def test_cluster_importance_averages_members_over_the_modules_they_report():
    members = [{"a": 1.0, "b": 1.0}, {"a": 3.0, "b": 1.0, "c": 4.0}]

    mean = I.cluster_importance(members)

    raw = {"a": (0.5 + 0.375) / 2, "b": (0.5 + 0.125) / 2, "c": 0.5}
    assert mean == pytest.approx({k: v / sum(raw.values()) for k, v in raw.items()})
    with pytest.raises(ValueError, match="members"):
        I.cluster_importance([])


@pytest.mark.parametrize(
    "old,new,change,replan",
    [
        ({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}, 0.0, False),
        ({"a": 0.5, "b": 0.5}, {"a": 0.54, "b": 0.46}, 0.08, False),
        ({"a": 0.5, "b": 0.5}, {"a": 0.6, "b": 0.4}, 0.2, True),
        ({"a": 1.0}, {"b": 1.0}, 2.0, True),
        (None, {"a": 1.0}, 2.0, True),
    ],
)
def test_l1_change_decides_replanning(old, new, change, replan):
    assert I.importance_change(old, new) == pytest.approx(change)
    assert I.needs_replan(old, new) is replan


def test_vectors_round_trip_and_reject_bad_wire_values():
    names = ["x", "y", "z"]
    scores = {"x": 0.25, "z": 0.75}

    vec = I.to_vector(scores, names)

    assert vec.dtype == np.float32 and I.from_vector(vec, names) == {"x": 0.25, "y": 0.0, "z": 0.75}
    for bad, match in (([0.1, 0.2], "shape"), ([0.1, -0.2, 0.3], "finite"), ([0.1, np.inf, 0.3], "finite")):
        with pytest.raises(ValueError, match=match):
            I.from_vector(bad, names)
    with pytest.raises(ValueError, match="not in names"):
        I.to_vector({"w": 1.0}, names)


# ================================================================ water-filling


def _mods(*specs):
    """(name, block) modules with d_in = d_out = 5: one rank costs 4 copies * 4 bytes * 10 = 160 bytes."""
    return [M.LoraModule(name, block, "k", 5, 5) for name, block in specs]


THREE = _mods(("m0", 0), ("m1", 0), ("m2", 1))
IMP = {"m0": 0.2, "m1": 0.5, "m2": 0.3}
RANK = 160  # bytes per unit of rank on these modules


@pytest.mark.parametrize(
    "budget,expected",
    [
        (4 * RANK, {"m0": 0, "m1": 2, "m2": 2}),  # exactly the two reservations
        (18 * RANK, {"m0": 0, "m1": 16, "m2": 2}),  # m1 takes all it can, m2 keeps its reserved 2
        (26 * RANK, {"m0": 2, "m1": 16, "m2": 8}),
        (30 * RANK, {"m0": 4, "m1": 16, "m2": 8}),
        (48 * RANK, {"m0": 16, "m1": 16, "m2": 16}),
        (10**9, {"m0": 16, "m1": 16, "m2": 16}),
    ],
)
def test_water_fill_gives_the_most_important_the_largest_rank_that_fits(budget, expected):
    assert P.water_fill(THREE, IMP, budget, WORK) == expected


def test_water_fill_keeps_one_adapter_per_block_and_never_overspends():
    for budget in range(4 * RANK, 60 * RANK, 37):
        ranks = P.water_fill(THREE, IMP, budget, WORK)
        assert ranks["m1"] > 0 and ranks["m2"] > 0
        assert sum(ranks.values()) * RANK <= budget
        assert set(ranks.values()) <= set(P.RANK_SET)


def test_water_fill_refuses_a_budget_below_the_reservations():
    with pytest.raises(ValueError, match="budget_bytes=639"):
        P.water_fill(THREE, IMP, 4 * RANK - 1, WORK)


def test_water_fill_spreads_equal_scores_over_blocks_first():
    assert P.water_fill(THREE, {}, 18 * RANK, WORK) == {"m0": 16, "m1": 0, "m2": 2}
    assert P.water_fill(THREE, {}, 34 * RANK, WORK) == {"m0": 16, "m1": 2, "m2": 16}


def test_cluster_members_share_the_pattern_at_sizes_set_by_their_budget():
    imp = {m.name: (i * 7919 % 13 + 1) / 100 for i, m in enumerate(MODULES)}
    small = P.water_fill(MODULES, imp, 300_000, WORK)
    large = P.water_fill(MODULES, imp, 900_000, WORK)

    assert all(large[n] >= small[n] for n in small)
    assert sum(large.values()) > sum(small.values())


# ================================================================ split points


@pytest.mark.parametrize("split", [1, 2, 3])
def test_split_is_the_deepest_that_fits_the_headroom(split):
    just = owner_memory(split)
    plan = P.make_plan([node("a", just), node("b", just - 2, cluster=1), node("h", BIG)], CTX)

    assert plan["a"].role == P.OWNER and plan["a"].split == split
    assert plan["b"].split == split - 1 or plan["b"].role == P.WAITING
    assert plan["a"].reason.startswith(f"split {split}/{L}: ")


def test_a_device_that_fits_everything_trains_alone():
    plan = P.make_plan([node("a", BIG)], CTX)

    assert (plan["a"].role, plan["a"].split, plan["a"].helper) == (P.WHOLE, L, None)
    assert set(plan["a"].ranks) == {m.name for m in MODULES}
    assert plan["a"].reason.startswith(f"whole model {L}/{L}")


def test_split_all_splits_even_a_device_that_fits_everything():
    ctx = dataclasses.replace(CTX, config=P.PlanConfig(split_all=True))

    plan = P.make_plan([node("a", BIG), node("h", BIG, has_data=False, cluster=None)], ctx)

    assert (plan["a"].role, plan["a"].split, plan["a"].helper) == (P.OWNER, L - 1, "h")


def test_a_fixed_split_and_uniform_rank_make_every_data_node_the_same_owner():
    """SplitLoRA's plan (the evaluation's baseline): one cut, one rank, strong or weak."""
    ctx = dataclasses.replace(CTX, config=P.PlanConfig(fixed_split=2, uniform_rank=8))
    infos = [node("strong", BIG), node("weak", owner_memory(2)), node("h", BIG, cluster=None, has_data=False)]

    plan = P.make_plan(infos, ctx)

    for name in ("strong", "weak"):
        assert (plan[name].role, plan[name].split) == (P.OWNER, 2)
        assert plan[name].helper is not None
        assert plan[name].ranks == {m.name: 8 for m in MODULES}  # its blocks and the helper's tail
        assert plan[name].reason.startswith(f"split 2/{L}: ")


def test_splitlora_s_one_rank_holds_for_owners_paired_later_or_after_a_repair():
    """An owner paired with a helper already planned (a late join; a helper that died) gets the
    helper's side at the one rank too, not the minimum: b2's SplitLoRA anchor refused a client
    whose tail held one rank-4 adapter a block ("needs the same modules on every client")."""
    ctx = dataclasses.replace(CTX, config=P.PlanConfig(fixed_split=2, uniform_rank=8))
    first = [
        node("strong", BIG),
        node("h", BIG, cluster=None, has_data=False),
        node("g", BIG, cluster=None, has_data=False),
    ]
    plan = P.make_plan(first, ctx)

    admitted = P.admit(plan, [*first, node("late", owner_memory(2))])
    repaired = P.repair(
        admitted,
        [admitted["late"].helper],
        [i for i in [*first, node("late", owner_memory(2))] if i.node_id != admitted["late"].helper],
    )

    assert admitted["late"].helper is not None
    assert admitted["late"].ranks == {m.name: 8 for m in MODULES}
    assert repaired["late"].helper not in (None, admitted["late"].helper)
    assert repaired["late"].ranks == {m.name: 8 for m in MODULES}


def test_a_fixed_split_alone_keeps_water_filled_ranks():
    ctx = dataclasses.replace(CTX, config=P.PlanConfig(fixed_split=2))

    plan = P.make_plan([node("a", BIG), node("h", BIG, cluster=None, has_data=False)], ctx)

    assert (plan["a"].role, plan["a"].split) == (P.OWNER, 2)
    own = {m.name for m in MODULES if m.block < 2}
    assert {n for n, r in plan["a"].ranks.items() if r > 0} & own  # its blocks carry adapters
    assert set(plan["a"].ranks.values()) <= set(P.PlanConfig().rank_set)


def test_a_device_below_the_fixed_split_waits_and_says_why():
    ctx = dataclasses.replace(CTX, config=P.PlanConfig(fixed_split=2))

    plan = P.make_plan([node("a", owner_memory(1)), node("h", BIG, cluster=None, has_data=False)], ctx)

    assert plan["a"].role == P.WAITING and "cannot run the fixed split of 2/" in plan["a"].reason


@pytest.mark.parametrize("field", ["fixed_split", "uniform_rank"])
@pytest.mark.parametrize("value", [0, -1, 2.5, "3"])
def test_bad_fixed_split_or_rank_is_refused(field, value):
    with pytest.raises(ValueError, match=field):
        P.PlanConfig(**{field: value})


def test_u_shape_owner_keeps_the_head_so_its_split_is_shallower():
    infos = [node("a", owner_memory(3)), node("h", BIG, cluster=None, has_data=False)]
    u_shape = dataclasses.replace(CTX, config=P.PlanConfig(u_shape=True))

    two_part, u = P.make_plan(infos, CTX), P.make_plan(infos, u_shape)

    assert u["a"].role == P.OWNER and u["a"].split < two_part["a"].split == 3
    used = helper_used(u, "h", head=False)  # the helper runs no head for a u-shape owner
    assert used < helper_used(u, "h", head=True) and f"({P.format_bytes(used)} of" in u["h"].reason


def test_privacy_floor_makes_a_small_device_wait():
    ctx = dataclasses.replace(CTX, config=P.PlanConfig(min_split=2))

    plan = P.make_plan([node("a", owner_memory(1)), node("h", BIG)], ctx)

    assert plan["a"].role == P.WAITING and "privacy floor needs 2" in plan["a"].reason


def test_a_device_too_small_for_one_block_waits():
    plan = P.make_plan([node("a", owner_memory(1) - 2), node("h", BIG)], CTX)

    assert plan["a"].role == P.WAITING and "cannot fit 1 block" in plan["a"].reason
    assert plan["h"].serves == ()


@pytest.mark.parametrize(
    "leakage,floor,expected",
    [
        ([9.0, 5.0, 2.0, 1.0], 2.5, 2),
        ([9.0, 5.0, 2.0, 1.0], 5.0, 1),
        ([9.0, 5.0, 2.0, 1.0], 1.0, 3),
    ],
)
def test_privacy_min_split_is_the_first_split_under_the_floor(leakage, floor, expected):
    assert P.privacy_min_split(leakage, floor) == expected


def test_privacy_min_split_without_a_safe_split_is_an_error():
    with pytest.raises(ValueError, match="floor=0.5"):
        P.privacy_min_split([9.0, 5.0, 2.0], 0.5)


def test_owner_ranks_fit_its_budget_and_cover_every_block():
    memory = owner_memory(2) * 3
    plan = P.make_plan([node("a", memory), node("h", BIG)], CTX)
    row = plan["a"]

    own = M.owner_footprint(SHAPE, row.split, row.ranks, WORK)
    assert own.total <= memory * 0.8
    for block in range(L):  # owner-side and helper-side blocks alike
        assert any(r > 0 for n, r in row.ranks.items() if M.candidate(SHAPE, n).block == block)


def test_ranks_follow_the_cluster_importance():
    favourite = MODULES[2].name  # block 0 mlp c_fc
    imp = {m.name: 0.01 for m in MODULES} | {favourite: 0.9}
    memory = owner_memory(2) + 40_000  # a little room beyond the minimum adapters

    plan = P.make_plan([node("a", memory), node("h", BIG)], CTX, importance={0: imp})

    owner_side = {n: r for n, r in plan["a"].ranks.items() if M.candidate(SHAPE, n).block < 2}
    assert owner_side[favourite] == max(owner_side.values()) > 2


# ================================================================ pairing


def test_owner_prefers_a_helper_of_its_own_cluster():
    infos = [node("a", owner_memory(2)), node("x", 2 * BIG, cluster=1, bandwidth=1e9), node("y", BIG, cluster=0)]

    plan = P.make_plan(infos, CTX, centroids={0: [0.0], 1: [1.0]})

    assert plan["a"].helper == "y" and plan["a"].fallbacks == ("x",)
    assert plan["y"].serves == ("a",) and plan["x"].serves == ()
    assert "helper y (100 MB, 100 Mbps)" in plan["a"].reason


def test_unclustered_pure_helper_comes_after_the_cluster_and_before_other_clusters():
    infos = [
        node("a", owner_memory(1)),
        node("p", BIG, cluster=None, has_data=False),
        node("x", BIG, cluster=1),
        node("y", BIG, cluster=0),
    ]

    plan = P.make_plan(infos, CTX, centroids={0: [0.0], 1: [1.0]})

    assert plan["a"].helper == "y" and plan["a"].fallbacks == ("p", "x")
    assert plan["p"].role == P.HELPER and plan["p"].reason == "helper: 100 MB budget; idle"


def test_with_no_helper_in_its_cluster_an_owner_takes_the_nearest_cluster():
    infos = [node("a", owner_memory(2)), node("far", BIG, cluster=2, bandwidth=1e9), node("near", BIG, cluster=1)]

    plan = P.make_plan(infos, CTX, centroids={0: [0.0, 0.0], 1: [1.0, 0.0], 2: [3.0, 4.0]})

    assert plan["a"].helper == "near" and plan["a"].fallbacks == ("far",)
    assert "from cluster 1" in plan["a"].reason


def test_equal_helpers_share_the_owners():
    owners = [node(f"o{i}", owner_memory(2)) for i in range(4)]

    plan = P.make_plan(owners + [node("h1", BIG), node("h2", BIG)], CTX)

    assert sorted(len(plan[h].serves) for h in ("h1", "h2")) == [2, 2]


def test_a_device_the_operator_does_not_let_host_never_serves_an_owner():
    owners = [node(f"o{i}", owner_memory(2)) for i in range(2)]
    barred = dataclasses.replace(node("strong", BIG), may_host=False)  # trains alone, hosts nobody
    barred_pure = dataclasses.replace(node("p", BIG, cluster=None, has_data=False), may_host=False)

    plan = P.make_plan([*owners, barred, barred_pure, node("h", BIG)], CTX)

    assert plan["strong"].role == P.WHOLE and plan["strong"].serves == () and plan["p"].serves == ()
    assert {plan[o.node_id].helper for o in owners} == {"h"}
    repaired = P.repair(plan, ["h"], [*owners, barred, barred_pure], centroids=None)
    assert all(repaired[o.node_id].helper is None for o in owners)  # they wait rather than go to a barred host
    with pytest.raises(ValueError, match="may_host"):
        dataclasses.replace(barred, may_host="no")


def test_no_helper_is_filled_over_its_capacity_and_the_rest_wait():
    owners = [node(f"o{i}", owner_memory(1)) for i in range(6)]
    one_owner = M.served_owner_footprint(
        SHAPE, M.ServedOwner(1, WORK, P.minimum_ranks([m for m in MODULES if m.block >= 1], {}))
    ).total
    helper_mem = math.ceil((M.helper_weights_bytes(SHAPE, 1, 4) + 2.5 * one_owner) / 0.8)  # two owners, not three
    pure = dict(cluster=None, has_data=False)

    plan = P.make_plan(owners + [node("h", helper_mem, **pure), node("p", BIG, **pure)], CTX)

    for helper_id in ("h", "p"):
        assert helper_used(plan, helper_id) <= plan.infos[helper_id].caps.memory_bytes * 0.8
    assert len(plan["h"].serves) == 2
    assert sum(plan[o.node_id].role == P.OWNER for o in owners) == len(plan["h"].serves) + len(plan["p"].serves)


def test_owner_with_no_helper_anywhere_waits_with_the_reason():
    plan = P.make_plan([node("a", owner_memory(2)), node("b", owner_memory(3))], CTX)

    for n in ("a", "b"):
        assert plan[n].role == P.WAITING and plan[n].helper is None
        assert "needs a helper" in plan[n].reason and plan[n].fallbacks == ()


def test_the_plan_does_not_depend_on_input_order():
    infos = [
        node("a", owner_memory(1)),
        node("b", owner_memory(2), cluster=1),
        node("c", owner_memory(3)),
        node("h", BIG),
        node("p", BIG, cluster=None, has_data=False),
        node("q", BIG, cluster=1),
    ]
    cents = {0: [0.0], 1: [1.0]}
    reference = P.make_plan(infos, CTX, centroids=cents)

    for perm in itertools.islice(itertools.permutations(infos), 0, 720, 97):
        assert P.make_plan(list(perm), CTX, centroids=cents).nodes == reference.nodes


def test_helper_side_ranks_grow_with_the_helpers_spare_room():
    tight = P.make_plan([node("a", owner_memory(1)), node("p", 8 * MB, cluster=None, has_data=False)], CTX)
    roomy = P.make_plan([node("a", owner_memory(1)), node("p", BIG, cluster=None, has_data=False)], CTX)

    def tail(plan):
        return sum(r for n, r in plan["a"].ranks.items() if M.candidate(SHAPE, n).block >= 1)

    assert tight["a"].helper == roomy["a"].helper == "p"
    assert tail(roomy) > tail(tight) > 0


# ================================================================ repair


def _two_cluster_plan():
    infos = [
        node("a", owner_memory(2)),
        node("b", owner_memory(1)),
        node("c", owner_memory(2), cluster=1),
        node("h", BIG, bandwidth=1e9),
        node("g", BIG, cluster=0),
        node("k", BIG, cluster=1),
    ]
    cents = {0: [0.0], 1: [1.0]}
    return P.make_plan(infos, CTX, centroids=cents), infos, cents


def test_repair_moves_only_the_owners_of_the_dead_helper():
    plan, infos, cents = _two_cluster_plan()
    dead = plan["a"].helper
    orphans = set(plan[dead].serves)

    repaired = P.repair(plan, [dead], infos, cents)

    assert dead not in repaired.nodes
    for n, row in repaired.nodes.items():
        if n in orphans:
            assert row.helper not in (dead, None) and row.split == plan[n].split and row.ranks == plan[n].ranks
            assert f"(replaces {dead})" in row.reason
        elif row.serves == plan[n].serves:
            assert row.helper == plan[n].helper and dead not in row.fallbacks
    for helper_id in ("g", "h", "k"):
        if helper_id in repaired.nodes:
            assert helper_used(repaired, helper_id) <= repaired.infos[helper_id].caps.memory_bytes * 0.8


def test_repair_uses_the_same_cluster_first_then_the_nearest():
    infos = [
        node("a", owner_memory(2)),
        node("h", BIG),
        node("g", BIG),
        node("k", BIG, cluster=1),
        node("far", BIG, cluster=2),
    ]
    cents = {0: [0.0], 1: [1.0], 2: [5.0]}
    plan = P.make_plan(infos, CTX, centroids=cents)
    first = plan["a"].helper
    second = ({"g", "h"} - {first}).pop()

    once = P.repair(plan, [first], infos, cents)
    twice = P.repair(once, [second], infos, cents)

    assert once["a"].helper == second
    assert twice["a"].helper == "k" and "from cluster 1" in twice["a"].reason


def test_repair_hands_out_a_silent_helper_only_when_no_other_fits():
    infos = [node("a", owner_memory(2)), node("h", BIG), node("g", BIG), node("k", BIG, cluster=1)]
    cents = {0: [0.0], 1: [1.0]}
    plan = P.make_plan(infos, CTX, centroids=cents)
    first = plan["a"].helper
    second = ({"g", "h"} - {first}).pop()

    avoided = P.repair(plan, [first], infos, cents, avoid=[second])  # silent: likely dead too
    last_resort = P.repair(plan, [first], infos, cents, avoid=[second, "k"])

    assert P.repair(plan, [first], infos, cents)["a"].helper == second  # same cluster first
    assert avoided["a"].helper == "k"  # the nearest cluster rather than a silent node
    assert last_resort["a"].helper == second  # all silent: the planner's own order


def test_repair_without_any_helper_left_makes_the_owner_wait():
    plan = P.make_plan([node("a", owner_memory(2)), node("h", BIG)], CTX)

    repaired = P.repair(plan, ["h"], [node("a", owner_memory(2))])

    assert repaired["a"].role == P.WAITING and "helper h left" in repaired["a"].reason


def test_a_repair_pairs_an_owner_left_waiting_once_room_frees_up():
    owners = [node("a", owner_memory(2)), node("b", owner_memory(2))]
    small = node("h", helper_room_for_one(), cluster=None, has_data=False)
    plan = P.make_plan([*owners, small], CTX)
    waiting = "a" if plan["a"].role == P.WAITING else "b"
    served = ({"a", "b"} - {waiting}).pop()
    assert plan[waiting].role == P.WAITING and plan[served].helper == "h"

    repaired = P.repair(plan, [served], [owners[0], owners[1], small])  # served finished: h has room again

    assert repaired[waiting].role == P.OWNER and repaired[waiting].helper == "h"
    assert "replaces" not in repaired[waiting].reason and repaired["h"].serves == (waiting,)
    tail = [n for n, r in repaired[waiting].ranks.items() if r > 0 and M.candidate(SHAPE, n).block >= 2]
    assert tail  # the helper has something to train for it


def test_a_dead_owner_frees_its_helper():
    plan = P.make_plan([node("a", owner_memory(2)), node("b", owner_memory(2)), node("h", BIG)], CTX)

    repaired = P.repair(plan, ["a"], plan.infos.values())

    assert repaired["h"].serves == ("b",) and "serves b " in repaired["h"].reason
    assert repaired["b"] is plan["b"]


def test_unpair_moves_one_owner_off_a_live_helper_that_keeps_the_rest():
    owners = [node("a", owner_memory(2)), node("b", owner_memory(2))]
    plan = P.admit(P.make_plan([*owners, node("h", BIG)], CTX), [*owners, node("h", BIG), node("g", BIG)])
    assert plan["a"].helper == plan["b"].helper == "h" and plan["g"].serves == ()

    moved = P.repair(plan, [], plan.infos.values(), unpair={"a": "h", "zz": "h", "b": "g"})  # stale pairs ignored

    assert moved["a"].helper == "g" and "(replaces h)" in moved["a"].reason
    assert moved["b"] is plan["b"] and moved["h"].serves == ("b",) and moved["g"].serves == ("a",)


def test_repair_rejects_unknown_dead_ids_and_missing_records():
    plan = P.make_plan([node("a", owner_memory(2)), node("h", BIG)], CTX)

    with pytest.raises(ValueError, match="dead_node_ids"):
        P.repair(plan, ["zz"], plan.infos.values())
    with pytest.raises(ValueError, match="no record"):
        P.repair(plan, ["h"], [])


# ================================================================ admitting newcomers


def test_admit_keeps_every_planned_row_and_pairs_a_new_owner_with_spare_room():
    plan, infos, cents = _two_cluster_plan()
    newcomers = [node("d", owner_memory(2)), node("p", BIG, cluster=None, has_data=False)]

    admitted = P.admit(plan, infos + newcomers, centroids=cents)

    for n in plan.nodes:
        if n != admitted["d"].helper:
            assert admitted[n] is plan[n]  # untouched rows are the very same objects
    assert admitted["d"].role == P.OWNER and admitted["d"].helper in {"g", "h", "p"}
    assert admitted["d"].split == P.make_plan([newcomers[0]], CTX)["d"].split
    helper = admitted["d"].helper
    assert "d" in admitted[helper].serves and set(plan[helper].serves) < set(admitted[helper].serves)
    if helper != "p":
        assert admitted["p"].role == P.HELPER and admitted["p"].serves == ()
    assert helper_used(admitted, helper) <= admitted.infos[helper].caps.memory_bytes * 0.8


def test_admit_gives_a_waiting_owner_the_new_helper():
    alone = [node("a", owner_memory(2))]
    plan = P.make_plan(alone, CTX)
    assert plan["a"].role == P.WAITING

    admitted = P.admit(plan, [*alone, node("h", BIG)])

    assert admitted["a"].role == P.OWNER and admitted["a"].helper == "h"
    assert admitted["a"].split == plan["a"].split and admitted["h"].serves == ("a",)
    assert "needs a helper" not in admitted["a"].reason and "helper h" in admitted["a"].reason


def test_a_helper_back_after_a_repair_is_admitted_idle():
    plan, infos, cents = _two_cluster_plan()
    dead = plan["a"].helper
    repaired = P.repair(plan, [dead], infos, cents)

    back = P.admit(repaired, infos, centroids=cents)

    assert all(back[n] is repaired[n] for n in repaired.nodes)
    assert back[dead].serves == () and back[dead].role in (P.HELPER, P.WHOLE)


def test_admit_needs_every_planned_node():
    plan = P.make_plan([node("a", owner_memory(2)), node("h", BIG)], CTX)

    with pytest.raises(ValueError, match="no record for planned nodes"):
        P.admit(plan, [node("a", owner_memory(2))])


# ================================================================ re-planning and validation

BASE = [node("a", 10 * MB), node("b", 20 * MB, cluster=1)]


@pytest.mark.parametrize(
    "new,moved,expected",
    [
        (BASE, 0.0, None),
        (BASE, 0.05, None),
        (BASE, 0.2, "importance moved"),
        (BASE[:1], 0.0, "membership changed"),
        (BASE + [node("c", MB)], 0.0, "membership changed"),
        ([node("a", 10 * MB, cluster=1), BASE[1]], 0.0, "changed cluster"),
        ([node("a", 12 * MB), BASE[1]], 0.0, "memory budget"),
        ([node("a", 10.5 * MB), BASE[1]], 0.0, None),
        ([node("a", 10 * MB, bandwidth=50e6), BASE[1]], 0.0, "bandwidth"),
        ([dataclasses.replace(BASE[0], may_host=False), BASE[1]], 0.0, "may no longer host"),
    ],
)
def test_replan_reason(new, moved, expected):
    reason = P.replan_reason(BASE, new, moved)
    assert (reason is None) if expected is None else (expected in reason)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(node_id=""), "node_id=''"),
        (dict(memory_bytes=0), "memory_bytes must be an int >= 1, got 0"),
        (dict(memory_bytes=1.5), "memory_bytes .*got 1.5"),
        (dict(bandwidth_bps=float("inf")), "bandwidth_bps .*got inf"),
        (dict(compute_score=-1.0), "compute_score .*got -1.0"),
        (dict(has_data=1), "has_data must be a bool, got 1"),
        (dict(cluster=-1), "cluster .*got -1"),
        (dict(cluster=None), "needs a cluster"),
    ],
)
def test_node_info_validation(kwargs, match):
    offer = dict(memory_bytes=MB, bandwidth_bps=1e6, compute_score=1.0, has_data=True)
    place = dict(node_id="a", cluster=0)
    with pytest.raises(ValueError, match=match):
        caps = Capabilities(**(offer | {k: v for k, v in kwargs.items() if k in offer}))
        P.NodeInfo(caps=caps, **(place | {k: v for k, v in kwargs.items() if k in place}))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(headroom=0.0), "headroom=0.0"),
        (dict(rank_set=(2, 4)), "rank_set"),
        (dict(rank_set=(0,)), "rank_set"),
        (dict(rank_set=(0, 8, 4)), "rank_set"),
        (dict(min_split=0), "min_split=0"),
        (dict(adapter_share=2.0), "adapter_share=2.0"),
        (dict(max_fallbacks=-1), "max_fallbacks=-1"),
    ],
)
def test_plan_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        P.PlanConfig(**kwargs)


def test_plan_inputs_are_validated():
    with pytest.raises(ValueError, match="given twice"):
        P.make_plan([node("a", MB), node("a", MB)], CTX)
    with pytest.raises(ValueError, match="min_split=4"):
        P.PlanContext(SHAPE, WORK, P.PlanConfig(min_split=4))


@pytest.mark.parametrize("n,text", [(1.1e9, "1.1 GB"), (300e6, "300 MB"), (12_345, "12 KB"), (5, "5 B")])
def test_format_bytes(n, text):
    assert P.format_bytes(n) == text


def test_format_bps():
    assert [P.format_bps(b) for b in (100e6, 1.5e9, 500)] == ["100 Mbps", "1.5 Gbps", "500 bps"]


def test_a_node_s_own_privacy_floor_makes_it_wait_or_keeps_its_split():
    # Prepare: "a" fits 2 blocks; its own floor needs 3, "b" (same budget) needs 2
    a = dataclasses.replace(node("a", owner_memory(2)), min_split=3)
    b = dataclasses.replace(node("b", owner_memory(2)), min_split=2)
    # Execute
    plan = P.make_plan([a, b, node("h", BIG)], CTX)
    # Assert
    assert plan["a"].role == P.WAITING and "privacy floor needs 3" in plan["a"].reason
    assert plan["b"].role == P.OWNER and plan["b"].split == 2


def test_a_fixed_split_below_a_node_s_privacy_floor_makes_it_wait():
    ctx = dataclasses.replace(CTX, config=P.PlanConfig(fixed_split=1))
    a = dataclasses.replace(node("a", BIG), min_split=2)
    plan = P.make_plan([a, node("b", BIG), node("h", BIG, has_data=False)], ctx)
    assert plan["a"].role == P.WAITING and "below its privacy floor 2" in plan["a"].reason
    assert plan["b"].role == P.OWNER and plan["b"].split == 1
