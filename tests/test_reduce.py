"""The reduce form of the exact merge: tree layout, partial sums, stacked-or-full, bookkeeping, wire."""

import pytest
import torch

from atlas_p2p.aggregation import (
    AdapterFactors,
    Contribution,
    Partial,
    Patch,
    ReduceTree,
    apply_patch,
    combine,
    finalize,
    fold_patches,
    partial_of,
    patch_from_arrays,
    patch_to_arrays,
    stack_merge,
)
from benchmarks.merge_traffic import max_rel_error, reference
from nodes.merge import ReduceBuffer, merge_contributions
from nodes.wireconv import partial_from_msg, partial_to_msg
from transport.codec import decode, encode
from transport.messages import Envelope, PartialMsg

D_OUT, D_IN = 12, 10  # full form is smaller once the rank reaches 120 / 22, i.e. R >= 6


def _contribution(node: int, rank: int = 2, n: int = 3, round_: int = 0, dense: bool = True) -> Contribution:
    g = torch.Generator().manual_seed(node)
    factors = {
        "q": AdapterFactors(torch.randn(rank, D_IN, generator=g), torch.randn(D_OUT, rank, generator=g), 2.0 / rank),
        "v": AdapterFactors(torch.randn(1, D_IN, generator=g), torch.randn(D_OUT, 1, generator=g), 1.5),
    }
    heads = {"head": torch.randn(3, 4, generator=g)} if dense else {}
    return Contribution(factors, n, str(node), round_, heads)


# ---- tree layout ---------------------------------------------------------------------------
def test_tree_is_heap_ordered_over_sorted_members_with_the_anchor_as_root():
    tree = ReduceTree.of([9, 3, 7, 1, 5, 2], root=5, fan_in=2)
    assert tree.order == (5, 1, 2, 3, 7, 9)
    assert tree.parent(5) is None and tree.children(5) == [1, 2]
    assert tree.parent(3) == 1 and tree.parent(7) == 1 and tree.parent(9) == 2
    assert [tree.depth(n) for n in tree.order] == [0, 1, 1, 2, 2, 2]
    assert tree.children(9) == []
    with pytest.raises(KeyError, match="not in the reduce tree"):
        tree.parent(4)


@pytest.mark.parametrize("fan_in", [1, 2, 3])
@pytest.mark.parametrize("closed", [[], [2], [2, 3], [1, 2, 3, 4], [2, 3, 4, 5, 6]])
def test_nobody_pushes_to_a_member_nobody_can_dial(fan_in, closed):
    """Whatever the number of unreachable members (none, fewer than the leaves, more, all but the
    root): every member has one path to the root, every parent is dialable, and a dialable
    member keeps its heap place."""
    members = [0, 1, 2, 3, 4, 5, 6]
    tree = ReduceTree.of(members, root=0, fan_in=fan_in, last=closed)

    for m in members:
        assert tree.parent(m) not in closed
        assert (tree.parent(m) is None) == (m == 0)
        assert all(tree.parent(c) == m for c in tree.children(m))
    assert sorted(c for m in members for c in tree.children(m)) == members[1:]
    assert max(tree.depth(m) for m in members) < len(members)
    plain = ReduceTree.of([m for m in members if m not in closed], root=0, fan_in=fan_in)
    for m in plain.order:
        assert tree.parent(m) == plain.parent(m)


def test_an_unreachable_member_whose_heap_parent_is_unreachable_is_adopted_round_robin():
    tree = ReduceTree.of([0, 1, 2, 3, 4], root=0, fan_in=1, last=[2, 3, 4])  # a chain: 0 1 | 2 3 4
    assert tree.parent(2) == 1  # a leaf of a dialable parent: its heap place
    assert tree.adopted == ((3, 0), (4, 1))
    assert tree.children(0) == [1, 3] and tree.children(1) == [2, 4] and tree.children(2) == []
    assert [tree.depth(n) for n in (0, 1, 2, 3, 4)] == [0, 1, 2, 1, 2]


def test_tree_depth_grows_with_log_of_the_cluster():
    tree = ReduceTree.of(range(32), root=0, fan_in=4)
    assert max(tree.depth(n) for n in range(32)) == 3
    assert all(len(tree.children(n)) <= 4 for n in range(32))
    with pytest.raises(ValueError, match="fan_in"):
        ReduceTree.of([1, 2], root=1, fan_in=0)


# ---- partial sums --------------------------------------------------------------------------
def test_any_tree_of_combines_gives_the_weighted_mean_stack_merge_gives():
    cs = [_contribution(k, n=k + 1) for k in range(1, 6)]
    parts = [partial_of(c) for c in cs]
    by_tree = finalize(combine([combine([parts[3], parts[0]]), combine([parts[4], combine([parts[2], parts[1]])])]))
    flat = finalize(combine(parts))
    stacked = stack_merge(cs)
    for name in stacked.modules:
        want = stacked.modules[name].dense()
        for got in (by_tree, flat):
            assert torch.allclose(got.module_delta(name), want, rtol=1e-6, atol=1e-6)
    assert max_rel_error(by_tree, reference(cs)) < 1e-6
    assert by_tree.weights == pytest.approx(stacked.weights)
    assert finalize(combine(parts[::-1])).digest == flat.digest  # same parts in any arrival order: same bytes


def test_a_module_turns_full_once_its_stacked_rank_reaches_the_bound_and_stays_exact():
    cs = [_contribution(k, rank=2) for k in range(1, 5)]  # q: rank 2 each, bound R >= 6
    two = combine([partial_of(c) for c in cs[:2]])
    assert "q" in two.sums.modules and two.sums.modules["q"].rank == 4
    three = combine([two, partial_of(cs[2])])
    assert "q" in three.sums.full and "q" not in three.sums.modules  # rank 6: full is smaller
    assert "v" in three.sums.modules  # v: rank 3 stays stacked
    four = finalize(combine([three, partial_of(cs[3])]))  # full + stacked -> full
    assert tuple(four.full["q"].shape) == (D_OUT, D_IN)
    assert max_rel_error(four, reference(cs)) < 1e-6


def test_a_contribution_above_the_bound_is_sent_full_from_the_start():
    c = _contribution(1, rank=8)
    assert "q" in partial_of(c).sums.full
    assert max_rel_error(finalize(partial_of(c)), reference([c])) < 1e-6


def test_overlapping_or_mixed_round_partials_do_not_combine():
    a, b = partial_of(_contribution(1)), partial_of(_contribution(2))
    ab = combine([a, b])
    with pytest.raises(ValueError, match="count twice"):
        combine([ab, b])
    with pytest.raises(ValueError, match="share a round"):
        combine([a, partial_of(_contribution(3, round_=1))])
    with pytest.raises(ValueError, match="same dense trainables"):
        combine([a, partial_of(_contribution(4, dense=False))])


def test_a_partial_must_cover_exactly_the_nodes_it_weighs():
    p = partial_of(_contribution(1))
    with pytest.raises(ValueError, match="must agree"):
        Partial(p.sums, {"2": "ab"})
    with pytest.raises(ValueError, match="at least one"):
        Partial(p.sums, {})
    with pytest.raises(ValueError, match="sample count"):
        Partial(Patch({}, weights={"1": float("inf")}), {"1": "ab"})


# ---- full modules in patches ---------------------------------------------------------------
def test_patches_with_full_modules_round_trip_apply_and_fold():
    cs = [_contribution(k, rank=3) for k in range(1, 4)]
    patch = finalize(merge_contributions(cs))
    assert patch.full and patch.modules
    back = patch_from_arrays(patch_to_arrays(patch))
    assert back.digest == patch.digest and set(back.full) == set(patch.full)
    base = {"q": torch.zeros(D_OUT, D_IN), "v": torch.zeros(D_OUT, D_IN), "head": torch.zeros(3, 4)}
    once = apply_patch(base, patch)
    folded = fold_patches([stack_merge(cs[:2]), patch])  # stacked then full: the fold is full
    assert "q" in folded.full
    twice = apply_patch(apply_patch(base, stack_merge(cs[:2])), patch)
    assert torch.allclose(apply_patch(base, folded)["q"], twice["q"], atol=1e-6)
    assert torch.allclose(once["q"], patch.module_delta("q"))


def test_a_stacked_patch_keeps_its_digest_and_layout():
    patch = stack_merge([_contribution(1), _contribution(2)])
    assert not patch.full and "full" not in patch_from_arrays(patch_to_arrays(patch)).full


# ---- bookkeeping: a contribution counts once -----------------------------------------------
def test_the_buffer_refuses_overlap_and_takes_exact_duplicates_as_held():
    buf = ReduceBuffer()
    a, b, c = (partial_of(_contribution(k)) for k in (1, 2, 3))
    assert buf.offer(0, a, now=1.0) == "new"
    assert buf.offer(0, combine([b, c]), now=2.0) == "new"
    assert buf.offer(0, c, now=3.0) == "held"  # came directly too: nothing to add
    assert buf.offer(0, combine([a, partial_of(_contribution(4))]), now=3.0) == "overlap"
    assert buf.offer(0, partial_of(_contribution(1, rank=1)), now=3.0) == "overlap"  # node 1 re-made: refused
    assert buf.offer(0, partial_of(_contribution(5, dense=False)), now=3.0) == "mismatch"  # no head: cannot sum
    assert sorted(buf.covers(0, 0)) == ["1", "2", "3"]
    total = finalize(buf.total(0, 0))
    ref = reference([_contribution(k) for k in (1, 2, 3)])
    assert max_rel_error(total, ref) < 1e-6
    assert buf.holds(0, 0, "2", b.covers["2"]) and not buf.holds(0, 0, "4", "x")


def test_the_buffer_forwards_when_children_are_in_or_the_wait_passed_then_at_once():
    buf = ReduceBuffer()
    own, child = partial_of(_contribution(1)), partial_of(_contribution(2))
    buf.offer(0, own, now=10.0)
    assert not buf.due(0, 0, {"1", "2"}, now=11.0, wait_s=2.0)
    assert buf.due(0, 0, {"1", "2"}, now=12.0, wait_s=2.0)  # the child is late: go without it
    buf.mark_sent(0, 0, buf.unsent(0, 0))
    assert not buf.due(0, 0, {"1", "2"}, now=12.0, wait_s=2.0)
    buf.offer(0, child, now=12.5)
    assert buf.due(0, 0, {"1", "2"}, now=12.5, wait_s=2.0) and buf.unsent(0, 0) == [child]
    buf.forget_before(0, 1)
    assert buf.rounds(0) == []


# ---- wire ------------------------------------------------------------------------------------
def test_a_partial_survives_the_wire_and_bad_ones_are_refused():
    p = combine([partial_of(_contribution(k, rank=3)) for k in (1, 2)])
    body = decode(encode(Envelope.of(partial_to_msg(p, cluster=0, sender=1), 1, "x"))).body
    back = partial_from_msg(body)
    assert back.covers == p.covers and back.sums.digest == p.sums.digest
    with pytest.raises(ValueError, match="round"):
        partial_from_msg(PartialMsg(**{**body.to_dict(), "round": 3}))
    with pytest.raises(ValueError, match="not node ids"):
        partial_from_msg(PartialMsg(**{**body.to_dict(), "covers": {"x1": "a", "1": "b"}}))
    with pytest.raises(ValueError, match="must agree"):
        partial_from_msg(PartialMsg(**{**body.to_dict(), "covers": {"1": "a"}}))
    tensors = dict(body.tensors)
    tensors.pop("m0.A")
    with pytest.raises(ValueError):
        partial_from_msg(PartialMsg(**{**body.to_dict(), "tensors": tensors}))


def test_members_nobody_can_dial_are_leaves_while_there_are_leaves_enough():
    """Children dial their parent, so a member nobody can dial must have no children."""
    tree = ReduceTree.of(range(1, 8), root=1, fan_in=2, last=[2, 3])
    assert tree.order == (1, 4, 5, 6, 7, 2, 3)
    assert tree.children(2) == [] and tree.children(3) == []
    assert {tree.parent(2), tree.parent(3)} <= {5, 6}  # dialable parents
    same = ReduceTree.of(range(1, 8), root=1, fan_in=2)
    assert sorted(tree.order) == sorted(same.order)  # the same members, only placed
