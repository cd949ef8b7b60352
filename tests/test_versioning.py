"""The versioned cluster base: patch log, versions, digests, chains, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas_p2p.aggregation import AdapterFactors, Contribution, dense_delta, stack_merge
from atlas_p2p.versioning import (
    DigestMismatchError,
    PatchRecord,
    VersionedBase,
    VersionGapError,
    genesis_chain,
)

SHAPES = {"q": (6, 5), "o": (5, 6)}


def make_patch(seed: int, round_: int = 0):
    """The exact merge of two random heterogeneous-rank contributions, plus a head."""
    g = torch.Generator().manual_seed(seed)
    cs = []
    for node, n, ranks in (("a", 3, {"q": 2, "o": 4}), ("b", 5, {"q": 4})):
        factors = {
            m: AdapterFactors(
                torch.randn(r, SHAPES[m][1], generator=g, dtype=torch.float64),
                torch.randn(SHAPES[m][0], r, generator=g, dtype=torch.float64),
                8.0 / r,
            )
            for m, r in ranks.items()
        }
        head = {"head": torch.randn(2, 6, generator=g, dtype=torch.float64)}
        cs.append(Contribution(factors, n, node, round_, head))
    return stack_merge(cs)


@pytest.fixture
def patches():
    return [make_patch(seed, round_=seed) for seed in range(4)]


@pytest.fixture
def w0():
    g = torch.Generator().manual_seed(99)
    return {
        "q": torch.randn(*SHAPES["q"], generator=g, dtype=torch.float64),
        "o": torch.randn(*SHAPES["o"], generator=g, dtype=torch.float64),
        "head": torch.zeros(2, 6, dtype=torch.float64),
    }


def filled(patches, cluster="c1"):
    base = VersionedBase(cluster)
    for p in patches:
        base.apply(p)
    return base


def test_versions_count_up_and_the_base_is_w0_plus_all_patches(patches, w0):
    base = filled(patches)
    assert base.version == 4 and [r.version for r in base.records] == [1, 2, 3, 4]
    weights = base.materialize(w0)
    expected_q = w0["q"] + sum(dense_delta(p, "q") for p in patches)
    assert torch.allclose(weights["q"], expected_q, atol=1e-12)
    assert torch.allclose(weights["head"], sum(p.dense["head"] for p in patches), atol=1e-12)


def test_two_nodes_with_the_same_patches_share_the_chain(patches):
    one, two = filled(patches), filled(patches)
    assert one.chain == two.chain
    assert filled(patches[:3]).chain != one.chain
    assert filled([patches[1], patches[0]]).chain != filled(patches[:2]).chain  # order matters
    assert genesis_chain("c1") != genesis_chain("c2")


def test_a_lagging_node_catches_up_from_missing_since(patches, w0):
    leader, lagger = filled(patches), filled(patches[:1])
    missing = leader.missing_since(lagger.version)
    assert [r.version for r in missing] == [2, 3, 4]
    lagger.extend(missing)
    assert (lagger.version, lagger.chain) == (leader.version, leader.chain)
    folded = leader.folded_delta(since=1)
    expected = sum(dense_delta(p, "q") for p in patches[1:])
    assert torch.allclose(dense_delta(folded, "q"), expected, atol=1e-12)


def test_a_joiner_starts_from_the_folded_delta(patches, w0):
    leader = filled(patches[:3])
    weights = VersionedBase("c1").materialize(w0)  # W_0
    from atlas_p2p.aggregation import apply_patch

    weights = apply_patch(weights, leader.folded_delta())  # one exact transfer
    joiner = VersionedBase("c1", origin_version=leader.version, origin_chain=leader.chain)
    leader.apply(patches[3])
    joiner.apply(patches[3], version=4, digest=patches[3].digest, chain=leader.chain)
    assert joiner.chain == leader.chain
    assert torch.allclose(joiner.materialize(weights)["q"], leader.materialize(w0)["q"], atol=1e-12)
    with pytest.raises(VersionGapError, match="history starts at version 3"):
        joiner.missing_since(0)


def test_a_version_gap_is_refused_and_changes_nothing(patches):
    base = filled(patches[:1])
    with pytest.raises(VersionGapError, match="at version 1, cannot apply version 3"):
        base.apply(patches[2], version=3)
    assert base.version == 1 and len(base) == 1
    with pytest.raises(VersionGapError, match="log is at 1"):
        base.missing_since(2)


def test_a_digest_mismatch_is_refused_and_changes_nothing(patches):
    base = filled(patches[:1])
    chain = base.chain
    with pytest.raises(DigestMismatchError, match="announced"):
        base.apply(patches[1], version=2, digest=patches[2].digest)
    with pytest.raises(DigestMismatchError, match="diverged"):
        base.apply(patches[1], version=2, chain=genesis_chain("x"))
    assert (base.version, base.chain) == (1, chain)


def test_duplicates_are_harmless_and_conflicts_are_caught(patches):
    base = filled(patches[:2])
    again = base.apply(patches[1], version=2, digest=patches[1].digest)
    assert again is base.records[1] and base.version == 2
    with pytest.raises(DigestMismatchError, match="already version 2"):
        base.apply(patches[3], version=2)


def test_extend_is_all_or_nothing(patches):
    leader = filled(patches)
    records = list(leader.missing_since(1))
    bad = PatchRecord(records[1].version, records[1].patch, patches[0].digest, records[1].chain)
    lagger = filled(patches[:1])
    with pytest.raises(DigestMismatchError):
        lagger.extend([records[0], bad, records[2]])
    assert lagger.version == 1


def test_a_log_that_left_the_peers_history_is_rebased_from_where_they_agree(patches):
    mine = filled([patches[0], patches[1], patches[2]])  # versions 2 and 3 only this node folded
    theirs = filled([patches[0], patches[3]])
    rebased, fork = mine.rebased(theirs.missing_since(0))
    assert fork == 1
    assert (rebased.version, rebased.chain) == (theirs.version, theirs.chain)
    assert (mine.version, mine.chain) == (3, filled(patches[:3]).chain)  # the old log is untouched
    assert mine.chain_at(1) == theirs.chain_at(1) and mine.chain_at(2) != theirs.chain_at(2)
    assert mine.chain_at(0) == genesis_chain("c1") and mine.chain_at(4) is None and mine.chain_at("1") is None
    ahead = filled(patches[:3])  # the peer is further along the same history: everything agrees
    assert ahead.rebased(filled(patches).missing_since(0))[1] == 3


def test_a_rebase_onto_a_prefix_or_a_broken_history_is_refused(patches):
    mine = filled(patches[:3])
    with pytest.raises(VersionGapError, match="prefix"):
        mine.rebased(filled(patches[:2]).missing_since(0))  # behind, not elsewhere
    records = list(filled([patches[0], patches[3]]).missing_since(0))
    forged = PatchRecord(2, patches[3], patches[3].digest, genesis_chain("x"))
    with pytest.raises(DigestMismatchError):
        mine.rebased([records[0], forged])
    with pytest.raises(VersionGapError, match="cannot apply version 2"):
        mine.rebased(records[1:])  # the peer's records must start at this log's origin


def test_state_round_trips_through_safetensors(patches, tmp_path):
    from safetensors.numpy import load_file, save_file

    base = filled(patches)
    save_file(base.to_state(), str(tmp_path / "base.safetensors"))
    back = VersionedBase.from_state(load_file(str(tmp_path / "base.safetensors")))
    assert (back.cluster, back.version, back.chain) == (base.cluster, base.version, base.chain)
    assert [r.digest for r in back.records] == [r.digest for r in base.records]
    assert back.records[2].patch.weights == base.records[2].patch.weights


def test_empty_and_offset_logs_round_trip(patches):
    empty = VersionedBase("c9")
    assert VersionedBase.from_state(empty.to_state()).chain == genesis_chain("c9")
    joiner = VersionedBase("c1", origin_version=7, origin_chain=filled(patches).chain)
    joiner.apply(patches[0])
    back = VersionedBase.from_state(joiner.to_state())
    assert (back.origin_version, back.version, back.chain) == (7, 8, joiner.chain)


def test_tampered_state_is_rejected(patches):
    state = filled(patches).to_state()
    bad = {k: v.copy() for k, v in state.items()}
    bad["p1.m0.B"][0, 0] += 1e-3
    with pytest.raises(DigestMismatchError):
        VersionedBase.from_state(bad)
    with pytest.raises(ValueError, match="unexpected key"):
        VersionedBase.from_state({**state, "p9.meta": state["p0.meta"]})
    with pytest.raises(ValueError, match="no arrays for record 3"):
        VersionedBase.from_state({k: v for k, v in state.items() if not k.startswith("p3.")})
    swapped = dict(state)
    for key in [k for k in state if k.startswith(("p0.", "p1."))]:
        head, rest = key.split(".", 1)
        swapped[("p1." if head == "p0" else "p0.") + rest] = state[key]
    with pytest.raises(ValueError):
        VersionedBase.from_state(swapped)  # records out of order break the chain


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="cluster"):
        VersionedBase("")
    with pytest.raises(ValueError, match="origin_version"):
        VersionedBase("c", origin_version=-1)
    with pytest.raises(ValueError, match="origin_chain"):
        VersionedBase("c", origin_chain="nothex")
    with pytest.raises(ValueError, match="expected a Patch"):
        VersionedBase("c").apply(np.zeros(3))
