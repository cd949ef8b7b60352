"""A straggler cannot stall a round, and its late updates are not lost (merge rounds).

Two strong nodes of one cluster train 2 rounds in one event loop; the second is slow
(--step-delay), so the anchor publishes every round at its deadline without it. Its
contribution is carried into its next one, the last one gets a carry round of its own, the
fast node (already finished) still folds it, and both end on the same base chain.

The same pair as weak owners of one pure helper: the helper follows the fast owner to each
new version, so the slow one is refused mid-round and catches up; it still trains both of
its rounds (the anchor publishes the one past the cluster's last).
"""

import asyncio

from atlas_p2p.records import Summary, lost_updates
from atlas_p2p.synthetic import write_synthetic_jsonl
from nodes.checkpoint import load_checkpoint
from nodes.config import SwarmSpec
from scenarios.inprocess import InProcessSwarm


async def _run(tmp_path, memory=30 * 10**6, helper=False, **train):
    """A fast and a slow (0.8 s a step) data node of one cluster, 2 rounds with a 1 s round
    deadline; `helper`: a pure helper joins first (weak `memory`: both are its owners)."""
    spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=2, clusters=1)
    async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=5) as swarm:
        if helper:
            swarm.add("h", 10**8, keep_results=False)
            swarm.start("h")
            await swarm.joined("h")
        for i, delay in enumerate((0.0, 0.8)):
            data = write_synthetic_jsonl(tmp_path / f"d{i}.jsonl", 0, 48, seed=i)
            swarm.add(
                f"n{i}",
                memory,
                data=data,
                rounds=2,
                local_steps=3,
                lr=0.01,
                round_deadline_s=1.0,
                step_delay_s=delay,
                **train,
            )
            if i == 0:  # the fast node joins first: the lower data-node id anchors the cluster
                swarm.start("n0")
                await swarm.joined("n0")
        summaries = await swarm.run(timeout=120)
    return summaries["n0"], summaries["n1"]


def test_a_straggler_is_cut_off_and_carried_without_losing_updates(tmp_path):
    fast, slow = asyncio.run(_run(tmp_path, export_rank=64))
    assert fast["finished"] and slow["finished"]
    assert any(str(slow["node_id"]) not in m["nodes"] for m in fast["manifests_folded"])  # a round went on without it
    assert any(c.get("carry") for c in slow["contributions"])
    assert lost_updates(Summary.from_json(x) for x in (fast, slow)) == []
    chains = {load_checkpoint(tmp_path / n).base.chain for n in ("n0", "n1")}
    assert len(chains) == 1
    assert fast["export"]["base_version"] == slow["export"]["base_version"] == fast["base_version"]


def test_an_owner_whose_helper_moved_on_catches_up_and_still_trains_every_round(tmp_path):
    """The helper's replica follows the fast owner to the next version while the slow owner is
    mid-round: the slow owner's next step is refused (`version`), it folds the cluster's patch
    and drops its partial round. It must still contribute as many rounds as it was asked to,
    even when the cluster's own rounds are over by then (the anchor publishes the extra ones)."""
    fast, slow = asyncio.run(_run(tmp_path, memory=4 * 10**6, helper=True))
    assert fast["role"] == slow["role"] == "owner" and fast["helper"] == slow["helper"]
    assert any(f["via"] == "catch-up" for f in slow["manifests_folded"])  # it fell behind its helper
    assert fast["finished"] and slow["finished"]
    assert slow["rounds_done"] == fast["rounds_done"] == 2
    assert len({c["round"] for c in slow["contributions"] if not c.get("carry")}) == 2
    assert lost_updates(Summary.from_json(x) for x in (fast, slow)) == []
    chains = {load_checkpoint(tmp_path / n).base.chain for n in ("n0", "n1")}
    assert len(chains) == 1 and fast["base_version"] == slow["base_version"]
