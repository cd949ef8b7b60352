"""The bootstrap's assignment brain: clustering, pairing, repair, anchors, versions.

Fake nodes with planted fingerprints (unit vectors near chosen directions) and memory
budgets taken from the memory model (whole model ~8.1 MB, an owner at split 2 ~3.6 MB
for this tiny GPT-2 shape). Everything runs the real k-means, the real planner and the
real codec; only the clock is a number passed in.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atlas_p2p import memory as M
from atlas_p2p.capabilities import Capabilities
from atlas_p2p.planning import HELPER, OWNER, WAITING, WHOLE, PlanConfig
from nodes.coordinator import (
    DEAD,
    DONE,
    FAILED,
    FALLBACK,
    LEFT,
    LIVE,
    REPAIR,
    SLOW,
    UNPAIRED,
    Coordinator,
    CoordinatorConfig,
    Event,
)
from nodes.peer_table import MemoryPeerTable, new_record
from tests.planner_inputs import SHAPE, WORK
from transport.codec import decode, encode
from transport.messages import Assignment, Envelope

MB = 10**6
BIG = 100 * MB  # trains the whole model and hosts several owners
WHOLE_ONLY = 9 * MB  # trains the whole model, no room to host anyone
WEAK = 4 * MB  # splits at 2 of 4 blocks: needs a helper
DIM = 64

E = np.eye(DIM)
# three task directions; B is 60 degrees from A, C is 90 degrees from both (A-B nearest)
DIR_A = E[0]
DIR_B = 0.5 * E[0] + math.sqrt(0.75) * E[1]
DIR_C = E[2]


def planted(direction, node_id, noise=0.01):
    """A fingerprint near `direction`, seeded by the node id."""
    rng = np.random.default_rng(1000 + node_id)
    return (direction + noise * rng.standard_normal(DIM)).astype(np.float32)


def caps(memory, has_data=True, bandwidth_mbps=100.0):
    return Capabilities(memory_bytes=memory, bandwidth_bps=bandwidth_mbps * 1e6, compute_score=1.0, has_data=has_data)


def offer(node_id, memory, has_data=True, bandwidth_mbps=100.0):
    """(capabilities, address) of a node joining: what `Coordinator.on_join` takes."""
    return caps(memory, has_data, bandwidth_mbps), f"127.0.0.1:{7000 + node_id}"


def config(**overrides):
    return CoordinatorConfig(**{"shape": SHAPE, "workload": WORK, "min_nodes": 2, "assign_after_s": 30.0, **overrides})


_SWARMS: dict = {}


def swarm(spec, now=0.0, **overrides):
    """Coordinator with every node of `spec` joined and fingerprinted, first plan made.

    spec: {node_id: (memory, direction or None for a pure helper, bandwidth Mbit/s)}.
    Built once per (spec, overrides) and deep-copied: k-means with its null reference
    is the slow part, and a coordinator is plain data.
    """
    key = (id(spec), now, tuple(sorted(overrides.items())))
    if key not in _SWARMS:
        _SWARMS[key] = _build_swarm(spec, now, **overrides)
    return copy.deepcopy(_SWARMS[key])


def _build_swarm(spec, now, **overrides):
    coord = Coordinator(config(min_nodes=sum(d is not None for _, d, _ in spec.values()), **overrides))
    for n, (memory, direction, bw) in sorted(spec.items()):
        coord.on_join(n, *offer(n, memory, has_data=direction is not None, bandwidth_mbps=bw), now=now)
    for n, (_, direction, _) in sorted(spec.items()):
        if direction is not None:
            coord.on_fingerprint(n, planted(direction, n), 32, now=now)
    assert coord.maybe_assign(now)
    return coord


def groups(coord, ids):
    """Partition of `ids` by cluster, as a set of frozensets (cluster ids are arbitrary)."""
    by = {}
    for n in ids:
        by.setdefault(coord.cluster_of(n), set()).add(n)
    return {frozenset(g) for g in by.values()}


def helpers(coord, ids):
    return {n: coord.assignment_for(n)["helper"] for n in ids}


def snapshot(coord):
    """Everything observable, to check that a refused input changed nothing."""
    return (
        coord.version,
        coord.metrics(),
        {n: coord.assignment_for(n) for n in range(1, 12) if _known(coord, n)},
        coord.peer_columns(),
    )


def _known(coord, n):
    try:
        coord.status(n)
        return True
    except ValueError:
        return False


# ================================================================ first assignment

TWO_GROUPS = {  # 6 nodes, 2 tasks
    1: (BIG, DIR_A, 100.0),
    2: (WEAK, DIR_A, 100.0),
    3: (WEAK, DIR_A, 100.0),
    4: (BIG, DIR_C, 100.0),
    5: (WEAK, DIR_C, 100.0),
    6: (WHOLE_ONLY, DIR_C, 100.0),
}
THREE_GROUPS = {  # 8 nodes, 3 tasks, one pure helper
    1: (BIG, DIR_A, 100.0),
    2: (WEAK, DIR_A, 100.0),
    3: (WEAK, DIR_A, 100.0),
    4: (BIG, E[1], 100.0),
    5: (WEAK, E[1], 100.0),
    6: (WHOLE_ONLY, DIR_C, 100.0),
    7: (WEAK, DIR_C, 100.0),
    8: (BIG, None, 100.0),
}


@pytest.mark.parametrize(
    "spec, partition, pairs, roles",
    [
        (
            TWO_GROUPS,
            [{1, 2, 3}, {4, 5, 6}],
            {2: 1, 3: 1, 5: 4},
            {1: WHOLE, 2: OWNER, 3: OWNER, 4: WHOLE, 5: OWNER, 6: WHOLE},
        ),
        # 7's cluster has no node that can host it: the pure helper does (task-blind)
        (
            THREE_GROUPS,
            [{1, 2, 3}, {4, 5}, {6, 7}],
            {2: 1, 3: 1, 5: 4, 7: 8},
            {1: WHOLE, 2: OWNER, 4: WHOLE, 6: WHOLE, 7: OWNER, 8: HELPER},
        ),
    ],
    ids=["6 nodes 2 tasks", "8 nodes 3 tasks + pure helper"],
)
def test_first_assignment_finds_planted_groups_and_pairs_weak_nodes(spec, partition, pairs, roles):
    data = [n for n, (_, d, _) in spec.items() if d is not None]

    coord = swarm(spec)

    assert groups(coord, data) == {frozenset(g) for g in partition}
    assert coord.clustering.k == len(partition)
    for owner, helper in pairs.items():
        a = coord.assignment_for(owner)
        assert (a["role"], a["helper"]) == (OWNER, helper)
        assert a["split"] == 2 and a["addresses"][str(helper)] == f"127.0.0.1:{7000 + helper}"
        h = coord.assignment_for(helper)
        assert owner in h["serves"]
        (detail,) = [o for o in h["owners"] if o["owner"] == owner]
        assert detail == {"owner": owner, "cluster": a["cluster"], "anchor": a["anchor"]}
    for n, role in roles.items():
        assert coord.assignment_for(n)["role"] == role
    for n in data:
        a = coord.assignment_for(n)
        assert a["members"] == sorted(next(g for g in partition if n in g))
        assert a["anchor"] == min(a["members"])
        assert a["version"] == coord.version and a["reason"].startswith("initial")


def test_pure_helper_has_no_cluster_and_no_fingerprint():
    coord = swarm(THREE_GROUPS)

    a = coord.assignment_for(8)

    assert (a["cluster"], a["split"], a["anchor"], a["members"]) == (None, None, None, [])
    assert a["serves"] == [7] and a["owners"][0]["cluster"] == coord.cluster_of(7)
    with pytest.raises(ValueError, match="pure helper"):
        coord.on_fingerprint(8, planted(DIR_A, 8), 32, now=1.0)


def test_assignment_dict_is_a_valid_message_through_the_codec():
    coord = swarm(THREE_GROUPS)

    for n in THREE_GROUPS:
        body = Assignment(**coord.assignment_for(n))
        back = decode(encode(Envelope.of(body, id=n, src="bootstrap"))).body
        assert back.to_dict() == body.to_dict()


def test_fixed_k_overrides_silhouette():
    coord = swarm(THREE_GROUPS, clusters=2)

    assert coord.clustering.k == 2
    assert len(groups(coord, [1, 2, 3, 4, 5, 6, 7])) == 2


def test_one_cluster_when_fingerprints_do_not_separate():
    spec = {n: (BIG if n == 1 else WEAK, DIR_A, 100.0) for n in range(1, 6)}

    coord = swarm(spec)

    assert coord.clustering.k == 1 and coord.assignment_for(3)["members"] == [1, 2, 3, 4, 5]


# ================================================================ when to assign


def test_assigns_once_min_nodes_have_fingerprints():
    coord = Coordinator(config(min_nodes=3))
    for n in (1, 2, 3):
        coord.on_join(n, *offer(n, BIG), now=0.0)
    coord.on_fingerprint(1, planted(DIR_A, 1), 32, now=1.0)
    coord.on_fingerprint(2, planted(DIR_C, 2), 32, now=2.0)

    early = coord.maybe_assign(3.0)
    coord.on_fingerprint(3, planted(DIR_C, 3), 32, now=4.0)
    due = coord.maybe_assign(4.0)

    assert (early, due, coord.maybe_assign(5.0)) == (False, True, False)
    assert coord.assigned and coord.version == 1


def test_timer_assigns_with_fewer_than_min_nodes():
    coord = Coordinator(config(min_nodes=5, assign_after_s=30.0))
    for n in (1, 2, 3):
        coord.on_join(n, *offer(n, BIG), now=0.0)
    assert not coord.maybe_assign(100.0)  # no fingerprint yet: the timer has not started
    coord.on_fingerprint(1, planted(DIR_A, 1), 32, now=100.0)
    coord.on_fingerprint(2, planted(DIR_C, 2), 32, now=110.0)

    before = coord.maybe_assign(129.9)
    at = coord.maybe_assign(130.0)

    assert (before, at) == (False, True)
    assert coord.assignment_for(1)["role"] == WHOLE
    assert coord.assignment_for(3)["version"] == 0  # no fingerprint: not planned
    assert "fingerprint" in coord.assignment_for(3)["reason"]


def test_weak_node_gets_a_provisional_helper_for_its_fingerprint():
    coord = Coordinator(config(min_nodes=3))
    coord.on_join(1, *offer(1, BIG, has_data=False), now=0.0)

    got_helper = coord.on_join(2, *offer(2, WEAK), now=1.0)
    a = coord.assignment_for(2)
    dropped = coord.on_fingerprint(2, planted(DIR_A, 2), 32, now=2.0)
    b = coord.assignment_for(2)

    assert got_helper and (a["role"], a["helper"], a["split"], a["cluster"]) == (WAITING, 1, 2, None)
    assert a["addresses"] == {"1": "127.0.0.1:7001"} and a["version"] == 1
    assert a["reason"].startswith("joined: fingerprinting: provisional helper 1")
    assert dropped and (b["helper"], b["split"], b["version"]) == (None, None, 2)
    assert coord.assignment_for(1)["serves"] == []  # the real plan is not touched
    Assignment(**a)


def test_before_assignment_strong_nodes_are_not_versioned():
    coord = Coordinator(config(min_nodes=3))

    changed = [coord.on_join(1, *offer(1, BIG), now=0.0), coord.on_fingerprint(1, planted(DIR_A, 1), 32, now=0.0)]

    assert changed == [False, False] and coord.version == 0
    a = coord.assignment_for(1)
    assert (a["version"], a["role"], a["cluster"]) == (0, WAITING, None)
    Assignment(**a)  # still a valid message


# ================================================================ repair and fallback

REPAIR_INSIDE = {  # 2's helper is 1 (faster link); 3 can take over inside the cluster
    1: (BIG, DIR_A, 200.0),
    2: (WEAK, DIR_A, 100.0),
    3: (BIG, DIR_A, 100.0),
    4: (BIG, DIR_C, 100.0),
    5: (WEAK, DIR_C, 100.0),
    6: (BIG, None, 100.0),
}
FALLBACK_NEAREST = {  # A's only host is 1; B (60 degrees away) is nearer than C (90)
    1: (BIG, DIR_A, 100.0),
    2: (WEAK, DIR_A, 100.0),
    3: (BIG, DIR_B, 100.0),
    4: (WHOLE_ONLY, DIR_B, 100.0),
    5: (BIG, DIR_C, 100.0),
    6: (WHOLE_ONLY, DIR_C, 100.0),
}
PURE_HELPER_STEPS_IN = {  # no other host in 2's cluster, but a pure helper beats other clusters
    1: (BIG, DIR_A, 100.0),
    2: (WEAK, DIR_A, 100.0),
    3: (BIG, DIR_C, 100.0),
    4: (WHOLE_ONLY, DIR_C, 100.0),
    5: (BIG, None, 50.0),
}
NOBODY_LEFT = {  # 1 is the only node able to host anyone
    1: (BIG, DIR_A, 100.0),
    2: (WEAK, DIR_A, 100.0),
    3: (WHOLE_ONLY, DIR_C, 100.0),
    4: (WHOLE_ONLY, DIR_C, 100.0),
}


@pytest.mark.parametrize(
    "spec, kill, owner, new_helper, kind, repairs, fallbacks",
    [
        (REPAIR_INSIDE, 1, 2, 3, REPAIR, 1, 0),
        (FALLBACK_NEAREST, 1, 2, 3, FALLBACK, 1, 1),
        (PURE_HELPER_STEPS_IN, 1, 2, 5, REPAIR, 1, 0),
        (NOBODY_LEFT, 1, 2, None, UNPAIRED, 0, 0),
    ],
    ids=["inside the cluster", "fallback to nearest cluster", "pure helper", "nobody: owner waits"],
)
def test_dead_helper_is_replaced(spec, kill, owner, new_helper, kind, repairs, fallbacks):
    coord = swarm(spec)
    assert coord.assignment_for(owner)["helper"] == kill
    others = {n: coord.assignment_for(n) for n in spec if coord.cluster_of(n) not in (None, coord.cluster_of(owner))}
    version = coord.version

    changed = coord.on_dead(kill, now=50.0)

    assert changed and coord.status(kill) == DEAD
    a = coord.assignment_for(owner)
    assert a["helper"] == new_helper and a["version"] == coord.version == version + 1
    assert a["role"] == (OWNER if new_helper is not None else WAITING)
    assert a["reason"].startswith(kind)
    assert kill not in a["members"] and str(kill) not in a["addresses"]
    (event,) = coord.events
    assert (event.time, event.owner, event.old_helper, event.new_helper, event.kind, event.cause) == (
        50.0,
        owner,
        kill,
        new_helper,
        kind,
        DEAD,
    )
    assert (coord.repairs, coord.fallbacks) == (repairs, fallbacks)
    assert coord.metrics()["events"] == [event.to_dict()]
    if new_helper is not None:
        h = coord.assignment_for(new_helper)
        assert owner in h["serves"] and a["addresses"][str(new_helper)] == f"127.0.0.1:{7000 + new_helper}"
        (detail,) = [o for o in h["owners"] if o["owner"] == owner]
        assert detail["anchor"] == a["anchor"] == owner  # 1 was the anchor; 2 is the lowest left
    for n, before in others.items():  # other clusters keep their plan
        after = coord.assignment_for(n)
        same = ["cluster", "members", "anchor", "role", "split", "ranks", "helper"]
        assert [after[k] for k in same] == [before[k] for k in same]
        if n != new_helper:
            assert after["serves"] == before["serves"]


def test_report_failure_repairs_at_once_and_a_stale_report_changes_nothing():
    coord = swarm(REPAIR_INSIDE)

    changed = coord.report_failure(2, 1, now=20.0, avoid=[1])  # 1 is silent: gone, not slow
    stale = coord.report_failure(2, 1, now=21.0, avoid=[1])

    assert (changed, stale) == (True, False)
    assert coord.status(1) == FAILED and coord.assignment_for(2)["helper"] == 3
    assert [e.cause for e in coord.events] == [FAILED] and coord.repairs == 1
    a1 = coord.assignment_for(1)
    assert a1["role"] == WAITING and "missed a deadline serving node 2" in a1["reason"]
    assert coord.on_join(1, *offer(1, BIG, bandwidth_mbps=200.0), now=30.0)  # a rejoin plans it back in
    assert coord.status(1) == LIVE and coord.assignment_for(1)["role"] == WHOLE


def test_a_report_about_a_helper_that_still_heartbeats_moves_only_that_owner():
    coord = swarm(THREE_GROUPS)
    helper = coord.assignment_for(2)["helper"]
    others = [o for o in coord.assignment_for(helper)["serves"] if o != 2]
    assert others, "the helper must serve another owner for this test to mean anything"

    assert coord.report_failure(2, helper, now=20.0)  # not silent: slow for node 2

    assert coord.status(helper) == LIVE and coord.assignment_for(2)["helper"] not in (helper, None)
    assert all(coord.assignment_for(o)["helper"] == helper for o in others)
    assert 2 not in coord.assignment_for(helper)["serves"]
    (event,) = coord.events
    assert (event.owner, event.old_helper, event.cause) == (2, helper, SLOW)


def test_a_failed_helper_back_from_probation_is_planned_in_again():
    coord = swarm(REPAIR_INSIDE)
    coord.report_failure(2, 1, now=20.0, avoid=[1])
    assert coord.assignment_for(1)["role"] == WAITING

    back = coord.on_alive(1, now=40.0)  # the bootstrap saw it heartbeat through its probation

    assert back and coord.status(1) == LIVE and coord.assignment_for(1)["role"] == WHOLE
    assert coord.on_alive(1, now=41.0) is False  # live already


def test_dead_anchor_is_replaced_by_lowest_live_member():
    coord = swarm(TWO_GROUPS)
    cluster = coord.cluster_of(4)
    assert coord.anchors()[cluster] == 4 and coord.peer_columns()[4]["anchor"]

    coord.on_dead(4, now=60.0)

    assert coord.anchors()[cluster] == 5
    assert coord.assignment_for(6)["anchor"] == 5 and coord.assignment_for(6)["members"] == [5, 6]
    (change,) = coord.anchor_changes
    assert (change.time, change.cluster, change.old_anchor, change.new_anchor) == (60.0, cluster, 4, 5)
    assert coord.peer_columns()[5]["anchor"] and not coord.peer_columns()[4]["anchor"]
    assert coord.assignment_for(5)["helper"] is None or coord.assignment_for(5)["helper"] != 4


def test_left_and_done_nodes_leave_the_members():
    coord = swarm(TWO_GROUPS)

    coord.on_left(3, now=5.0)
    coord.on_done(6, now=6.0)

    assert coord.assignment_for(1)["members"] == [1, 2] and coord.assignment_for(4)["members"] == [4, 5]
    assert (coord.status(3), coord.status(6)) == (LEFT, DONE)
    assert coord.assignment_for(1)["serves"] == [2]
    assert coord.on_left(3, now=7.0) is False  # repeating it changes nothing


def test_done_helper_keeps_serving_until_its_owners_are_done():
    coord = swarm(TWO_GROUPS)

    coord.on_done(1, now=5.0)

    a1, a2 = coord.assignment_for(1), coord.assignment_for(2)
    assert (a1["role"], a1["serves"], a1["members"], a1["cluster"]) == (HELPER, [2, 3], [], coord.cluster_of(1))
    assert a1["owners"][0]["anchor"] == 2 and a1["addresses"]["2"] == "127.0.0.1:7002"
    assert (a2["helper"], a2["members"], a2["anchor"]) == (1, [2, 3], 2)
    assert coord.events == () and coord.repairs == 0

    coord.on_done(2, now=6.0)
    assert coord.assignment_for(1)["serves"] == [3]
    coord.on_done(3, now=7.0)

    a1 = coord.assignment_for(1)
    assert a1["role"] == WAITING and a1["serves"] == [] and str(1) not in coord.plan.nodes
    assert coord.events == ()


def test_dead_node_coming_back_is_planned_again():
    coord = swarm(REPAIR_INSIDE)
    coord.on_dead(3, now=10.0)

    back = coord.on_alive(3, now=20.0)

    assert back and coord.assignment_for(3)["role"] == WHOLE and 3 in coord.assignment_for(1)["members"]
    assert coord.on_alive(3, now=21.0) is False  # alive already


def test_a_node_coming_back_moves_no_running_pair():
    """A return is admitted into the plan: only the cluster's member lists move, no owner
    changes helper, split or ranks (a full re-plan of a large swarm re-paired everyone)."""
    coord = swarm(THREE_GROUPS)
    before = {n: coord.assignment_for(n) for n in coord.summary()}
    victim = 8  # the pure helper
    assert before[victim]["serves"]
    coord.on_dead(victim, now=10.0)
    repaired = {n: coord.assignment_for(n) for n in coord.summary()}
    plans = coord.plans_made

    assert coord.on_alive(victim, now=20.0)

    assert coord.plans_made == plans and coord.status(victim) == LIVE
    for n, a in repaired.items():
        if n == victim:
            continue
        now = coord.assignment_for(n)
        assert (now["helper"], now["split"], now["ranks"], now["role"]) == (
            a["helper"],
            a["split"],
            a["ranks"],
            a["role"],
        )


# ================================================================ late joiners


@pytest.mark.parametrize(
    "direction, mates, anchor",
    [
        (DIR_A, [1, 2, 3], 1),
        (E[1], [4, 5], 4),
        (DIR_C, [6, 7], 6),
    ],
    ids=["to A", "to B", "to C"],
)
def test_late_joiner_goes_to_nearest_cluster_and_ids_stay(direction, mates, anchor):
    coord = swarm(THREE_GROUPS)
    ids_before = coord.clustering.ids.copy()
    centroids_before = coord.clustering.centroids.copy()
    partition_before = groups(coord, range(1, 8))
    target = coord.cluster_of(mates[0])

    version = coord.version
    coord.on_join(9, *offer(9, WEAK), now=100.0)
    joined = coord.assignment_for(9)
    changed = coord.on_fingerprint(9, planted(direction, 9), 32, now=101.0)

    # planned only once its fingerprint arrived; until then a task-blind provisional helper
    assert (joined["role"], joined["cluster"], joined["members"], joined["split"]) == (WAITING, None, [], 2)
    assert joined["helper"] is not None and joined["reason"].startswith("joined: fingerprinting")
    assert joined["version"] == version + 1 and changed
    assert coord.cluster_of(9) == target
    np.testing.assert_array_equal(coord.clustering.ids, ids_before)
    np.testing.assert_array_equal(coord.clustering.centroids, centroids_before)
    assert groups(coord, range(1, 8)) == partition_before
    a = coord.assignment_for(9)
    assert a["members"] == [*mates, 9] and a["anchor"] == anchor and a["role"] == OWNER
    assert a["helper"] is not None and a["version"] == version + 2 and a["reason"].startswith("clustered")
    assert all(9 in coord.assignment_for(m)["members"] for m in mates)


def test_late_pure_helper_takes_a_waiting_owner():
    coord = swarm(NOBODY_LEFT)
    coord.on_dead(1, now=10.0)
    assert coord.assignment_for(2)["role"] == WAITING

    changed = coord.on_join(9, *offer(9, BIG, has_data=False), now=20.0)

    assert changed and coord.assignment_for(2)["helper"] == 9
    assert coord.assignment_for(9)["serves"] == [2]


def test_rejoin_with_same_capabilities_changes_nothing():
    coord = swarm(TWO_GROUPS)
    version = coord.version

    changed = coord.on_join(2, *offer(2, WEAK), now=5.0)

    assert not changed and coord.version == version


def test_cluster_importance_moves_the_rank_pattern_of_every_member():
    coord = swarm(TWO_GROUPS)
    version = coord.version
    mlp_only = {m.name: (1.0 if ".mlp." in m.name else 0.0) for m in M.lora_candidates(SHAPE)}
    before = {n: coord.assignment_for(n)["ranks"] for n in (1, 5, 6)}

    changed = coord.on_fingerprint(6, planted(DIR_C, 6), 32, importance=mlp_only, now=5.0)

    def by_kind(ranks, split):
        own = {m: r for m, r in ranks.items() if M.candidate(SHAPE, m).block < split}
        return (sum(r for m, r in own.items() if ".mlp." in m), sum(r for m, r in own.items() if ".attn." in m))

    assert changed
    for n, split in ((5, 2), (6, 4)):  # 5 owns blocks 0-1, 6 the whole model; same cluster
        mlp_before, attn_before = by_kind(before[n], split)
        mlp_after, attn_after = by_kind(coord.assignment_for(n)["ranks"], split)
        assert mlp_after > mlp_before and attn_after < attn_before
    assert coord.assignment_for(1)["ranks"] == before[1]  # the other cluster is untouched
    assert coord.version_for(1) == version and coord.version_for(2) == version


# ================================================================ peer table columns


def test_peer_columns_fit_the_peer_table():
    coord = swarm(THREE_GROUPS)
    table = MemoryPeerTable()
    for n, (memory, direction, bw) in THREE_GROUPS.items():
        table.put(new_record(n, caps(memory, direction is not None, bw), address=f"127.0.0.1:{7000 + n}", now=0.0))

    table.update_many(coord.peer_columns())

    row = table.get(2)
    assert (row.role, row.split, row.helper, row.anchor) == (OWNER, 2, 1, False)
    assert row.ranks.endswith(tuple("0123456789")) and "mods r" in row.ranks
    assert table.get(1).anchor and table.get(8).cluster is None and table.get(8).role == HELPER
    assert table.get(2).capabilities.memory_bytes == WEAK


# ================================================================ persistence


def test_snapshot_through_json_restores_the_same_coordinator():
    coord = swarm(FALLBACK_NEAREST)
    coord.on_dead(1, now=5.0)  # a fallback and an anchor change on record
    coord.on_join(9, *offer(9, WEAK), now=6.0)  # a provisional helper pending

    back = Coordinator.restore(coord.config, json.loads(json.dumps(coord.snapshot())))
    nodes = [*FALLBACK_NEAREST, 9]

    assert json.loads(json.dumps(back.snapshot())) == json.loads(json.dumps(coord.snapshot()))
    assert back.metrics() == coord.metrics() and back.metrics()["fallbacks"] == 1
    assert {n: back.assignment_for(n) for n in nodes} == {n: coord.assignment_for(n) for n in nodes}
    for c in (coord, back):  # both go on the same way
        assert c.on_fingerprint(9, planted(DIR_A, 9), 32, now=7.0)
        assert c.on_dead(3, now=8.0)
    assert {n: back.assignment_for(n) for n in nodes} == {n: coord.assignment_for(n) for n in nodes}
    assert back.version == coord.version and back.events == coord.events


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda s: {**s, "format": 99}, "format"),
        (lambda s: {k: v for k, v in s.items() if k != "members"}, "malformed"),
        (lambda s: {**s, "members": {**s["members"], "2": {**s["members"]["2"], "vector": [1.0, 2.0]}}}, "shape"),
        (lambda s: {**s, "views": {**s["views"], "77": s["views"]["1"]}}, "malformed"),
        (lambda s: [], "format"),
    ],
    ids=["format", "no members", "short vector", "view of unknown node", "not a map"],
)
def test_restore_refuses_a_bad_state(mutate, match):
    coord = swarm(TWO_GROUPS)

    with pytest.raises(ValueError, match=match):
        Coordinator.restore(coord.config, mutate(json.loads(json.dumps(coord.snapshot()))))


# ================================================================ bad input


def _bad_calls():
    return [
        ("short vector", lambda c: c.on_fingerprint(2, np.ones(63, np.float32), 32, now=1.0), "shape"),
        ("2-d vector", lambda c: c.on_fingerprint(2, np.ones((64, 1)), 32, now=1.0), "shape"),
        ("nan vector", lambda c: c.on_fingerprint(2, np.full(64, np.nan), 32, now=1.0), "NaN"),
        ("zero vector", lambda c: c.on_fingerprint(2, np.zeros(64), 32, now=1.0), "zeros"),
        ("text vector", lambda c: c.on_fingerprint(2, "abc", 32, now=1.0), "numeric|shape"),
        ("unknown node fingerprint", lambda c: c.on_fingerprint(99, planted(DIR_A, 9), 32, now=1.0), "unknown"),
        ("negative samples", lambda c: c.on_fingerprint(2, planted(DIR_A, 2), -1, now=1.0), "n_samples"),
        ("unknown module", lambda c: c.on_fingerprint(2, planted(DIR_A, 2), 32, {"nope": 1.0}, now=1.0), "nope"),
        (
            "negative importance",
            lambda c: c.on_fingerprint(2, planted(DIR_A, 2), 32, {M.lora_candidates(SHAPE)[0].name: -1.0}, now=1.0),
            "importance",
        ),
        ("helper fingerprint", lambda c: c.on_fingerprint(8, planted(DIR_A, 8), 32, now=1.0), "pure helper"),
        ("bool id", lambda c: c.on_dead(True, now=1.0), "node_id"),
        ("negative id", lambda c: c.on_dead(-1, now=1.0), "node_id"),
        ("unknown dead", lambda c: c.on_dead(42, now=1.0), "unknown"),
        ("unknown left", lambda c: c.on_left(42, now=1.0), "unknown"),
        ("unknown done", lambda c: c.on_done(42, now=1.0), "unknown"),
        ("unknown assignment", lambda c: c.assignment_for(42), "unknown"),
        ("bad now", lambda c: c.on_dead(1, now=float("nan")), "now"),
        ("string now", lambda c: c.maybe_assign("later"), "now"),
        ("not capabilities", lambda c: c.on_join(9, {"memory": 1}, "127.0.0.1:7009", now=1.0), "Capabilities"),
        ("wildcard address", lambda c: c.on_join(9, caps(WEAK), "0.0.0.0", now=1.0), "address"),
        ("failure unknown helper", lambda c: c.report_failure(2, 42, now=1.0), "unknown"),
        ("failure self", lambda c: c.report_failure(2, 2, now=1.0), "both"),
        ("dead node fingerprint", lambda c: c.on_fingerprint(3, planted(DIR_A, 3), 32, now=2.0), "3 is dead"),
    ]


@pytest.mark.parametrize("call, match", [(c, m) for _, c, m in _bad_calls()], ids=[n for n, _, _ in _bad_calls()])
def test_bad_input_is_a_clear_error_and_changes_nothing(call, match):
    coord = swarm(THREE_GROUPS)
    coord.on_dead(3, now=1.0)  # so that a fingerprint from a dead node can be tried
    before = snapshot(coord)

    with pytest.raises(ValueError, match=match):
        call(coord)

    assert snapshot(coord) == before


@pytest.mark.parametrize(
    "field, value",
    [
        ("min_nodes", 0),
        ("min_nodes", True),
        ("assign_after_s", -1.0),
        ("assign_after_s", math.inf),
        ("clusters", 0),
        ("clusters", 2.0),
        ("k_max", 1),
        ("silhouette_threshold", 1.5),
        ("seed", "x"),
        ("fingerprint_dim", 0),
        ("plan", {}),
        ("workload", None),
    ],
)
def test_config_rejects_bad_values_naming_field_and_value(field, value):
    with pytest.raises(
        ValueError,
        match=f"{field}.*{value!r}".replace("(", r"\(").replace(")", r"\)").replace("{", r"\{").replace("}", r"\}"),
    ):
        config(**{field: value})


def test_config_rejects_a_privacy_floor_deeper_than_the_model():
    with pytest.raises(ValueError, match="min_split"):
        config(plan=PlanConfig(min_split=4))


# ================================================================ invariants under churn


def _done_serving(coord, n):
    a = coord.assignment_for(n)
    return coord.status(n) == DONE and a["role"] == HELPER and bool(a["serves"]) and not a["members"]


EVENTS = st.lists(
    st.tuples(st.sampled_from(["dead", "left", "done", "alive", "fail", "join", "fingerprint"]), st.integers(1, 8)),
    max_size=12,
)


@pytest.mark.parametrize("spec", [THREE_GROUPS, FALLBACK_NEAREST], ids=["3 groups", "fallback swarm"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=EVENTS)
def test_churn_keeps_plans_consistent_and_versions_monotonic(spec, events):
    coord = swarm(spec)
    seen = {n: coord.version_for(n) for n in spec}
    for t, (kind, n) in enumerate(events, start=1):
        if n not in spec:
            continue
        version, n_events, lost = coord.version, len(coord.events), n
        memory, direction, bw = spec[n]
        if kind == "fail":
            helper = lost = coord.assignment_for(n)["helper"]
            silent = [helper] if t % 2 and helper is not None else []  # gone (failed) or slow (this pair)
            changed = coord.report_failure(n, helper, now=t, avoid=silent) if helper is not None else False
        elif kind == "alive":
            changed = coord.on_alive(n, now=t)
        elif kind == "join":
            changed = coord.on_join(n, *offer(n, memory, direction is not None, bw), now=t)
        elif kind == "fingerprint":
            if direction is None or coord.status(n) != LIVE:
                continue
            changed = coord.on_fingerprint(n, planted(direction, n + 10 * t), 32, now=t)
        else:
            changed = getattr(coord, f"on_{kind}")(n, now=t)
        assert coord.version == version + (1 if changed else 0)
        for e in coord.events[n_events:]:  # repairs only ever replace the node just lost
            assert e.old_helper == lost and e.time == t
            if e.new_helper is not None:
                assert coord.status(e.new_helper) == LIVE or _done_serving(coord, e.new_helper)
                foreign = coord.cluster_of(e.new_helper) not in (None, e.cluster) and spec[e.new_helper][1] is not None
                assert e.kind == (FALLBACK if foreign else REPAIR)
            else:
                assert e.kind == UNPAIRED
        for m in spec:
            v = coord.version_for(m)
            assert v >= seen[m]
            seen[m] = v
            a = coord.assignment_for(m)
            Assignment(**a)
            linked = [x for x in [a["helper"], a["anchor"], *a["members"], *a["serves"]] if x is not None]
            assert all(coord.status(x) == LIVE or _done_serving(coord, x) for x in linked), (m, a)
            if coord.status(m) != LIVE and not _done_serving(coord, m):
                assert a["role"] == WAITING and not a["serves"] and not a["members"]
            if a["role"] == OWNER:
                assert m in coord.assignment_for(a["helper"])["serves"]
            if a["members"]:
                assert a["anchor"] in a["members"] and m in a["members"]


def test_a_finished_helper_whose_last_owner_calls_it_slow_leaves_the_plan():
    """Found by the churn property test: node 1 finished but still served node 2; node 2
    reported it slow (still heartbeating) and moved away, which left node 1 planned as a
    helper serving nobody. A finished node that serves nobody leaves the plan."""
    coord = swarm(FALLBACK_NEAREST)
    for t, (kind, n) in enumerate([("dead", 3), ("done", 1)], start=1):
        getattr(coord, f"on_{kind}")(n, now=t)
    assert coord.assignment_for(2)["helper"] == 1 and coord.assignment_for(1)["serves"] == [2]

    coord.report_failure(2, 1, now=3, avoid=[])

    assert coord.assignment_for(2)["helper"] != 1
    a = coord.assignment_for(1)
    assert (a["role"], a["serves"], a["members"]) == (WAITING, [], [])


def test_node_absent_at_the_first_clustering_is_placed_when_it_comes_back():
    coord = Coordinator(config(min_nodes=3, clusters=2))  # 3 points are too few for the silhouette test
    for n, memory, direction in ((1, BIG, DIR_A), (2, BIG, DIR_C), (3, BIG, DIR_C), (4, WEAK, DIR_A)):
        coord.on_join(n, *offer(n, memory), now=0.0)
        coord.on_fingerprint(n, planted(direction, n), 32, now=0.0)
    coord.on_dead(4, now=1.0)  # fingerprinted, then silent before the clustering
    coord.on_fingerprint(1, planted(DIR_A, 1), 32, now=2.0)
    assert coord.maybe_assign(2.0) and coord.clustering.k == 2
    assert coord.cluster_of(4) == coord.cluster_of(1) and coord.assignment_for(1)["members"] == [1]

    back = coord.on_alive(4, now=3.0)

    a = coord.assignment_for(4)
    assert back and (a["role"], a["helper"], a["members"]) == (OWNER, 1, [1, 4])


def test_a_node_the_operator_does_not_let_host_trains_but_never_helps_and_survives_a_restore():
    coord = Coordinator(config(min_nodes=3))
    coord.on_join(1, *offer(1, BIG), may_host=False, now=0.0)  # strong, but not on --hosts
    coord.on_join(2, *offer(2, WEAK), now=0.0)
    coord.on_join(3, *offer(3, WEAK), now=0.0)
    for n in (1, 2, 3):
        coord.on_fingerprint(n, planted(DIR_A, n), 32, now=0.0)
    coord.maybe_assign(0.0)

    assert coord.assignment_for(1)["role"] == WHOLE and coord.assignment_for(1)["serves"] == []
    assert helpers(coord, [2, 3]) == {2: None, 3: None}  # they wait rather than go to node 1
    coord.on_join(4, *offer(4, BIG, has_data=False), now=1.0)  # a pure helper the operator allows
    assert helpers(coord, [2, 3]) == {2: 4, 3: 4}

    restored = Coordinator.restore(coord.config, json.loads(json.dumps(coord.snapshot())))
    restored.on_dead(4, now=2.0)
    assert helpers(restored, [2, 3]) == {2: None, 3: None}  # the repair does not reach node 1 either


# ================================================================ privacy floor


def _floored(leakage, floor=1.0):
    """Nodes 1 (whole model), 2 and 3 (2 of 4 blocks) of one task; `leakage` per node id."""
    coord = Coordinator(config(min_nodes=3, privacy_floor=floor))
    for n, mem in ((1, BIG), (2, WEAK), (3, WEAK)):
        coord.on_join(n, *offer(n, mem), now=0.0)
    for n in (1, 2, 3):
        coord.on_fingerprint(n, planted(DIR_A, n), 32, now=0.0, leakage=leakage.get(n))
    coord.maybe_assign(0.0)
    return coord


def test_privacy_floor_plans_each_owner_by_the_leakage_it_measured():
    # node 2's psi falls under the floor at split 2 (its budget's split); node 3's only at 3
    coord = _floored({1: [9.0, 8.0, 7.0], 2: [5.0, 0.5, 0.1], 3: [5.0, 4.0, 0.9]})
    cols = coord.peer_columns()
    assert (cols[2]["role"], cols[2]["split"], cols[2]["psi"]) == (OWNER, 2, 0.5)
    assert cols[3]["role"] == WAITING and "privacy floor needs 3" in cols[3]["reason"]
    assert cols[1]["role"] == WHOLE and cols[1]["psi"] is None  # sends nothing
    # a restarted bootstrap plans the same
    again = Coordinator.restore(coord.config, json.loads(json.dumps(coord.snapshot())))
    assert again.peer_columns() == cols


def test_privacy_floor_without_measured_leakage_lets_a_node_train_only_whole():
    coord = _floored({1: None, 2: None, 3: [5.0, 0.5, 0.1]})
    cols = coord.peer_columns()
    assert cols[1]["role"] == WHOLE and cols[2]["role"] == WAITING
    assert cols[3]["role"] == OWNER and cols[3]["psi"] == 0.5


def test_without_a_floor_leakage_is_shown_but_changes_nothing():
    coord = Coordinator(config(min_nodes=2))
    for n, mem in ((1, BIG), (2, WEAK)):
        coord.on_join(n, *offer(n, mem), now=0.0)
        coord.on_fingerprint(n, planted(DIR_A, n), 32, now=0.0, leakage=[5.0, 4.0, 3.0])
    coord.maybe_assign(0.0)
    assert coord.peer_columns()[2]["split"] == 2 and coord.peer_columns()[2]["psi"] == 4.0


@pytest.mark.parametrize(
    "leakage, match",
    [([1.0, 2.0], "3 numbers"), ([1.0, -2.0, 3.0], ">= 0"), ([1.0, math.nan, 3.0], ">= 0"), ("abc", "3 numbers")],
)
def test_bad_leakage_is_refused_and_changes_nothing(leakage, match):
    coord = Coordinator(config(min_nodes=2, privacy_floor=1.0))
    coord.on_join(1, *offer(1, BIG), now=0.0)
    before = snapshot(coord)
    with pytest.raises(ValueError, match=match):
        coord.on_fingerprint(1, planted(DIR_A, 1), 32, now=0.0, leakage=leakage)
    assert snapshot(coord) == before


# ================================================================ DP fingerprints


def test_a_dp_release_s_budget_is_shown_and_kept_across_a_restart():
    coord = Coordinator(config(min_nodes=2))
    for n, dp in ((1, [8.0, 1e-5]), (2, None)):
        coord.on_join(n, *offer(n, BIG), now=0.0)
        coord.on_fingerprint(n, planted(DIR_A, n), 32, now=0.0, dp=dp)
    coord.maybe_assign(0.0)
    cols = coord.peer_columns()
    assert (cols[1]["dp_epsilon"], cols[1]["dp_delta"]) == (8.0, 1e-5)
    assert (cols[2]["dp_epsilon"], cols[2]["dp_delta"]) == (None, None)
    again = Coordinator.restore(coord.config, json.loads(json.dumps(coord.snapshot())))
    assert again.peer_columns() == cols


@pytest.mark.parametrize(
    "dp, match",
    [([8.0], r"\[epsilon, delta\]"), ([0.0, 1e-5], "epsilon"), ([8.0, 1.0], "delta"), ([math.inf, 1e-5], "epsilon")],
)
def test_a_bad_dp_budget_is_refused_and_changes_nothing(dp, match):
    coord = Coordinator(config(min_nodes=2))
    coord.on_join(1, *offer(1, BIG), now=0.0)
    before = snapshot(coord)
    with pytest.raises(ValueError, match=match):
        coord.on_fingerprint(1, planted(DIR_A, 1), 32, now=0.0, dp=dp)
    with pytest.raises(ValueError, match=match):
        coord.precheck(Event.fingerprint(1, planted(DIR_A, 1), 32, dp=dp), coord.summary())
    assert snapshot(coord) == before


# ================================================================ reachability


def test_a_node_nobody_can_dial_never_hosts_and_is_anchor_only_when_no_member_is_dialable():
    """Node 1 (strong, lowest id) cannot be dialled: node 2 anchors the cluster and node 3 (weak)
    is served by node 2 or the pure helper 4, never by node 1; kept across a restart. When node
    2 turns out unreachable too, the pure helper serves node 3, which anchors (the lowest
    dialable id); with no dialable member left nobody is better and node 3 stays."""
    coord = Coordinator(config(min_nodes=3))
    for n, mem, data, dialable in (
        (1, BIG, True, False),
        (2, BIG, True, True),
        (3, WEAK, True, True),
        (4, BIG, False, True),
    ):
        coord.on_join(n, *offer(n, mem, data), reachable=dialable, now=0.0)
    for n in (1, 2, 3):
        coord.on_fingerprint(n, planted(DIR_A, n), 32, now=0.0)
    coord.maybe_assign(0.0)
    cols = coord.peer_columns()
    assert coord.anchors() == {0: 2}
    assert cols[3]["helper"] in (2, 4) and cols[1]["role"] != "helper"
    assert coord.assignment_for(3)["unreachable"] == [1]  # a reduce-tree leaf, no gossip target
    again = Coordinator.restore(coord.config, json.loads(json.dumps(coord.snapshot())))
    assert again.anchors() == {0: 2} and again.peer_columns() == cols

    coord.on_join(2, *offer(2, BIG, True), reachable=False, now=1.0)  # the bootstrap's check came back
    assert coord.anchors() == {0: 3} and coord.peer_columns()[3]["helper"] == 4
    coord.on_join(3, *offer(3, WEAK, True), reachable=False, now=2.0)
    assert coord.anchors() == {0: 3}  # nobody dialable: nobody is better, the anchor stays (a relay's case)


def test_the_anchor_stays_when_a_lower_id_starts_training():
    """A weak node with the lowest id waits for a helper, then gets one: the anchor does not move
    to it (two live anchors could both publish the round the first had already published)."""
    coord = Coordinator(config(min_nodes=2))
    for n, mem in ((1, WEAK), (2, BIG)):
        coord.on_join(n, *offer(n, mem), may_host=False, now=0.0)  # node 2 trains, never helps
        coord.on_fingerprint(n, planted(DIR_A, n), 32, now=0.0)
    coord.maybe_assign(0.0)
    assert coord.peer_columns()[1]["role"] == "waiting" and coord.anchors() == {0: 2}
    coord.on_join(3, *offer(3, BIG, has_data=False), now=1.0)  # a pure helper: node 1 trains now
    assert coord.peer_columns()[1]["role"] == "owner"
    assert coord.anchors() == {0: 2} and coord.anchor_changes == ()


def test_a_relayed_member_anchors_only_when_nobody_is_dialled_directly():
    """Node 1 (lowest id) is reached through a relay (nodes/relay.py): reachable, but every
    member would reach the anchor through the detour, so node 2 anchors; kept across a restart.
    When node 2 goes, the relayed node is the best there is."""
    coord = Coordinator(config(min_nodes=2))
    coord.on_join(1, *offer(1, BIG), may_host=False, relayed=True, now=0.0)
    coord.on_join(2, *offer(2, BIG), now=0.0)
    for n in (1, 2):
        coord.on_fingerprint(n, planted(DIR_A, n), 32, now=0.0)
    coord.maybe_assign(0.0)
    assert coord.anchors() == {0: 2}
    assert coord.assignment_for(2)["unreachable"] == []  # a gossip target and a reduce parent like anyone
    again = Coordinator.restore(coord.config, json.loads(json.dumps(coord.snapshot())))
    assert again.anchors() == {0: 2}

    coord.on_dead(2, now=1.0)
    assert coord.anchors() == {0: 1}
