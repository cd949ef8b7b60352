"""The reduce merge on real sockets: members of one cluster in this process, each a ClusterSync
with its own RpcServer/RpcClient (benchmarks/merge_traffic.MergeCluster).

Tree over 7 members with fan_in 2: 1 (anchor) -> 2, 3; 2 -> 4, 5; 3 -> 6, 7.
"""

import asyncio

import pytest
import torch

from atlas_p2p.aggregation import partial_of, stack_merge
from benchmarks.merge_traffic import MergeCluster, make_contribution
from nodes.cluster_sync import ClusterSync
from nodes.collaborators import Link, LocalNode
from nodes.config import TrainConfig
from nodes.wireconv import partial_to_msg
from scenarios.waiting import wait_until_async
from tests.aio import run
from transport.messages import Assignment, PartialMsg
from transport.rpc import RpcError

MODULES = [("q", 16, 16), ("ffn", 32, 64)]  # full once the stacked rank reaches 8 (q) / 21.3 (ffn)


def _contributions(n: int):
    gen = torch.Generator().manual_seed(n)
    return [make_contribution(i, MODULES, 2, 16, gen) for i in range(1, n + 1)]


def _config(**kw) -> TrainConfig:
    return TrainConfig(None, **{"fan_in": 2, "poll_s": 0.05, "reduce_wait_s": 0.5, "round_deadline_s": 60.0, **kw})


def _assert_exact(patch, contributions):
    want = stack_merge(contributions)
    assert set(patch.weights) == set(want.weights)
    for name in want.modules:
        assert torch.allclose(patch.module_delta(name), want.modules[name].dense(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(patch.dense["classifier"], want.dense["classifier"], rtol=1e-5, atol=1e-7)


def test_every_member_folds_the_exact_patch_from_the_tree():
    async def body():
        cs = _contributions(7)
        cluster = await MergeCluster.create(7, _config())
        try:
            await asyncio.gather(*(s.contribute(c) for s, c in zip(cluster.syncs, cs)))
            chains = {s.session.base.chain for s in cluster.syncs}
            assert len(chains) == 1 and cluster.syncs[0].session.version == 1
            patch = cluster.syncs[6].session.base.records[-1].patch
            assert set(patch.full) == {"q"} and set(patch.modules) == {"ffn"}  # at stacked rank 14
            _assert_exact(patch, cs)
            anchor_in = cluster.bytes(0)[1]
            assert anchor_in.get("contribution", 0) == 0 and anchor_in["partial"] > 0
        finally:
            await cluster.stop()

    run(body(), timeout=60)


def test_a_dead_inner_node_does_not_lose_its_subtree():
    async def body():
        cs = _contributions(7)
        cluster = await MergeCluster.create(7, _config(round_deadline_s=8.0))
        try:
            await cluster.kill(1)  # node 2: parent of 4 and 5
            live = [i for i in range(7) if i != 1]
            await asyncio.gather(*(cluster.syncs[i].contribute(cs[i]) for i in live))
            chains = {cluster.syncs[i].session.base.chain for i in live}
            assert len(chains) == 1
            patch = cluster.syncs[3].session.base.records[-1].patch  # node 4 fetched it past its dead parent
            _assert_exact(patch, [cs[i] for i in live])  # 4 and 5 went straight to the anchor: in the round
        finally:
            await cluster.stop()

    run(body(), timeout=90)


def test_a_contribution_sent_both_ways_counts_once():
    async def body():
        cs = _contributions(7)
        slow = _config(reduce_wait_s=60.0)  # node 2 waits for itself and its children
        cluster = await MergeCluster.create(7, [_config(), slow, *[_config()] * 5])
        anchor = cluster.syncs[0]
        try:
            others = [asyncio.create_task(cluster.syncs[i].contribute(cs[i])) for i in range(7) if i != 1]
            # node 2 is late: its children 4 and 5 find the anchor without their contributions and send
            # them directly; then 2 forwards {2, 4, 5}, the anchor refuses the overlap, 2 sends pieces
            await wait_until_async(lambda: {"4", "5"} <= set(anchor.reduce.covers(0, 0)), 30, what="4, 5 direct")
            await cluster.syncs[1].contribute(cs[1])
            await asyncio.gather(*others)
            assert cluster.servers[0].stats["overlap"] >= 1
            patch = anchor.session.base.records[-1].patch
            _assert_exact(patch, cs)  # every contribution once, none twice
            assert len({s.session.base.chain for s in cluster.syncs}) == 1
        finally:
            await cluster.stop()

    run(body(), timeout=90)


def test_bad_partials_are_refused_with_clear_errors_and_the_round_still_merges():
    async def body():
        cs = _contributions(3)
        cluster = await MergeCluster.create(3, _config())
        anchor = cluster.servers[0].address
        good = partial_to_msg(partial_of(cs[1]), cluster=0, sender=2)
        client = cluster.clients[1]
        try:
            cases = {
                "bad_request": PartialMsg(
                    **{**good.to_dict(), "covers": {"3": "f" * 64}}
                ),  # covers whom it does not weigh
                "wrong_cluster": PartialMsg(**{**good.to_dict(), "cluster": 5}),
            }
            tensors = dict(good.tensors)
            tensors["m0.A"] = tensors["m0.A"][:1]  # a factor cut short: content no longer hashes right
            cases["bad_request "] = PartialMsg(**{**good.to_dict(), "tensors": tensors})
            for code, msg in cases.items():
                with pytest.raises(RpcError) as err:
                    await client.call(anchor, msg, timeout=5)
                assert err.value.code == code.strip()
            assert cluster.syncs[0].reduce.covers(0, 0) == {}  # nothing was kept
            await asyncio.gather(*(s.contribute(c) for s, c in zip(cluster.syncs, cs)))
            _assert_exact(cluster.syncs[2].session.base.records[-1].patch, cs)
        finally:
            await cluster.stop()

    run(body(), timeout=60)


def test_an_assignment_without_an_anchor_leaves_the_member_outside_the_tree():
    sync = ClusterSync(Link(), None, None, LocalNode(node_id=3), _config())
    a = Assignment(
        node_id=3, version=2, cluster=0, members=[3, 5], ranks={}, split=None, helper=None, anchor=None, role="whole"
    )

    assert sync._parent(a) is None  # the anchor it falls back to: none yet
    assert sync._fallback_s(a) == _config().reduce_wait_s  # depth 0, not a crash
