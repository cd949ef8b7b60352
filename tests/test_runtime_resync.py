"""A member whose history left its anchor's is moved back onto it, and keeps training.

How it happens: an anchor publishes a version, one member folds it, the anchor dies before
anyone else hears of it, and the new anchor publishes its own patch under that version
number (its take-over asks the members for newer versions first, but a member it cannot
reach then still holds one). Here the member's extra version is put in its log directly,
with the same fold a manifest would make; everything else is the real runtime: the
anchor's next patch does not fit the member's history (DigestMismatchError), and the
member must re-sync onto the anchor's history instead of stopping.

A helper's replica can hold such a version too (it syncs from its owners): the owner's
`round_begin` states its chain, and a replica on another history is rebuilt when the
owner's is the anchor's, or tells the owner to re-sync (`history`) when it is not.
"""

import asyncio

import pytest

from atlas_p2p.aggregation import Patch, fold_patches
from atlas_p2p.synthetic import write_synthetic_jsonl
from benchmarks.resync import fork_member
from nodes.checkpoint import load_checkpoint
from nodes.config import SwarmSpec
from scenarios.inprocess import InProcessSwarm
from scenarios.waiting import wait_until_async
from tests.test_versioning import filled, make_patch
from transport.rpc import RpcError

ROUNDS = 3


async def _run(tmp_path):
    spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=2, clusters=1)
    async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=5) as swarm:
        for i in range(2):
            data = write_synthetic_jsonl(tmp_path / f"d{i}.jsonl", 0, 48, seed=i)
            swarm.add(f"n{i}", 30 * 10**6, data=data, rounds=ROUNDS, local_steps=3, lr=0.01, step_delay_s=0.3)
            swarm.start(f"n{i}")
            await swarm.joined(f"n{i}")  # n0 joins first: it anchors
        member = swarm.peers["n1"]
        await wait_until_async(
            lambda: member.session is not None and member.session.version == 1, 90, what="the member's first fold"
        )
        forged = await fork_member(member)
        summaries = await swarm.run(timeout=120)
    return summaries["n0"], summaries["n1"], forged


def test_a_member_on_a_forked_history_re_syncs_onto_its_anchors_and_finishes(tmp_path):
    anchor, member, forged = asyncio.run(_run(tmp_path))
    assert anchor["finished"] and member["finished"]
    assert member["rounds_done"] == anchor["rounds_done"] == ROUNDS
    assert forged not in {f["digest"] for f in member["manifests_folded"]}  # the forked version was taken out
    logs = {n: load_checkpoint(tmp_path / n).base for n in ("n0", "n1")}
    assert logs["n0"].chain == logs["n1"].chain and logs["n0"].version == logs["n1"].version >= ROUNDS
    assert forged not in {r.digest for r in logs["n1"].records}


async def _run_helper_fork(tmp_path):
    spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=2, clusters=1)
    async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=5) as swarm:
        swarm.add("h", 10**8, keep_results=False)
        for i, (name, memory, delay) in enumerate((("n0", 30 * 10**6, 0.6), ("w", 4 * 10**6, 0.2))):
            data = write_synthetic_jsonl(tmp_path / f"d{i}.jsonl", 0, 48, seed=i)
            swarm.add(name, memory, data=data, rounds=ROUNDS, local_steps=3, lr=0.01, step_delay_s=delay)
        for name in ("h", "n0", "w"):  # n0 before w: it anchors
            swarm.start(name)
            await swarm.joined(name)
        owner = swarm.peers["w"]
        # the owner sent round 1 and waits for its manifest (the slower anchor has not sent its own)
        await wait_until_async(
            lambda: owner.session is not None and owner.session.round == 1 and owner.session.closed,
            90,
            what="the owner's round-1 contribution",
        )
        helper = next(p for p in swarm.peers.values() if p.node_id == owner.assignment.helper)
        replica = helper.helper.pool.get(str(owner.assignment.cluster))
        assert replica.version == 1
        first = replica.base.records[0].patch
        twice = fold_patches([first, first])
        forged = Patch(twice.modules, twice.dense, first.weights, round=1, full=twice.full)
        await helper.executor.run(replica.fold, forged, version=2)  # a version 2 the anchor never published
        summaries = await swarm.run(timeout=120)
        served = helper.helper.pool.get(str(owner.assignment.cluster))
    return summaries, served, forged.digest


def test_a_helper_replica_on_a_forked_history_is_rebuilt_from_the_anchors(tmp_path):
    """The owner's `round_begin` states its chain; a replica at the same version on another
    history asks the anchor whose is right and, being the odd one out, is built again."""
    summaries, served, forged = asyncio.run(_run_helper_fork(tmp_path))
    anchor, owner = summaries["n0"], summaries["w"]
    assert owner["role"] == "owner" and anchor["finished"] and owner["finished"]
    assert owner["rounds_done"] == ROUNDS
    logs = {n: load_checkpoint(tmp_path / n).base for n in ("n0", "w")}
    assert logs["n0"].chain == logs["w"].chain
    assert forged not in {r.digest for r in served.base.records}
    assert served.base.chain == logs["w"].chain_at(served.version)  # the replica the owner trained with


def test_an_owner_whose_history_is_not_the_anchors_is_told_to_re_sync():
    """The other way round, without sockets: the replica is on the anchor's history and the
    owner is not, so the helper answers `history` (the owner re-syncs), and the same answer
    when the anchor cannot be asked; the replica is left as it is."""
    from nodes.collaborators import LocalNode
    from nodes.helper import HelperService

    patches = [make_patch(seed, round_=seed) for seed in range(3)]
    anchor, owner = filled(patches[:2], cluster="0"), filled([patches[0], patches[2]], cluster="0")

    async def from_anchor(cluster, since, prefer):
        assert (cluster, prefer) == (0, None)  # the anchor's word, not the owner's
        return anchor.missing_since(since)

    async def unreachable(cluster, since, prefer):
        raise RpcError("timeout", "no answer")

    for source, said in ((from_anchor, "not its cluster anchor's"), (unreachable, "cannot be asked")):
        service = HelperService(executor=None, assignments=None, local=LocalNode(node_id=9), patches=source)
        with pytest.raises(RpcError) as err:
            asyncio.run(service._settle_fork(0, 2, 5, owner.chain))
        assert err.value.code == "history" and said in err.value.message
        assert service.pool.clusters == []
