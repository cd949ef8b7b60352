"""A member whose history left its anchor's is moved back onto it, and keeps training.

How it happens: an anchor publishes a version, one member folds it, the anchor dies before
anyone else hears of it, and the new anchor publishes its own patch under that version
number (its take-over asks the members for newer versions first, but a member it cannot
reach then still holds one). Here the member's extra version is put in its log directly,
with the same fold a manifest would make; everything else is the real runtime: the
anchor's next patch does not fit the member's history (DigestMismatchError), and the
member must re-sync onto the anchor's history instead of stopping.
"""

import asyncio

from atlas_p2p.aggregation import Patch, fold_patches
from atlas_p2p.records import FoldedRecord
from atlas_p2p.synthetic import write_synthetic_jsonl
from nodes.checkpoint import load_checkpoint
from nodes.config import SwarmSpec
from scenarios.inprocess import InProcessSwarm
from scenarios.waiting import wait_until_async

ROUNDS = 3


async def _fork_member(peer) -> str:
    """Fold a version 2 into `peer`'s log that its anchor never published; its digest."""
    s = peer.session
    first = s.base.records[0].patch
    twice = fold_patches([first, first])  # round 0's update once more: content of its own
    forged = Patch(twice.modules, twice.dense, first.weights, round=0, full=twice.full)
    record = await peer.executor.run(s.fold, forged, version=2, discard_round=True)
    peer.sync.folded.append(FoldedRecord(0, 2, record.digest, tuple(sorted(forged.weights)), "manifest"))
    return record.digest


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
        forged = await _fork_member(member)
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
