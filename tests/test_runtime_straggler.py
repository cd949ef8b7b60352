"""A straggler cannot stall a round, and its late updates are not lost (issue #4, merge rounds).

Two strong nodes of one cluster train 2 rounds in one event loop; the second is slow
(--step-delay), so the anchor publishes every round at its deadline without it. Its
contribution is carried into its next one, the last one gets a carry round of its own, the
fast node (already finished) still folds it, and both end on the same base chain.
"""

import asyncio

from atlas_p2p.synthetic import write_synthetic_jsonl
from nodes.bootstrap import Bootstrap
from nodes.checkpoint import load_checkpoint
from nodes.config import BootstrapConfig, NodeConfig
from nodes.metrics import lost_updates
from nodes.peer import Peer
from nodes.runtime_config import SwarmSpec, TrainConfig


async def _run(tmp_path):
    boot = await Bootstrap.create(
        BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path / "boot", heartbeat_s=0.3, suspect_after_s=2.0,
                        dead_after_s=4.0, restart_grace_s=1.0, sweep_s=0.1, fingerprint_seed=5),
        swarm=SwarmSpec(task="seq_cls", num_labels=4, min_nodes=2, clusters=1),
    )
    peers, stop = [], asyncio.Event()
    for i, delay in enumerate((0.0, 0.8)):
        data = write_synthetic_jsonl(tmp_path / f"d{i}.jsonl", 0, 48, seed=i)
        config = NodeConfig(bootstrap=boot.address, memory_bytes=30 * 10**6, bandwidth_bps=5e7, data=data,
                            state_dir=tmp_path / f"n{i}", compute_score=1.0)
        peers.append(Peer(config, TrainConfig(out_dir=tmp_path / f"n{i}", rounds=2, local_steps=3, lr=0.01,
                                              round_deadline_s=1.0, step_delay_s=delay, export_rank=64)))
        if i == 0:  # the fast node joins first: it gets the lower id and anchors the cluster
            first = asyncio.create_task(peers[0].run(stop))
            while peers[0].node_id is None:
                await asyncio.sleep(0.05)
    try:
        return await asyncio.wait_for(asyncio.gather(first, peers[1].run(stop)), timeout=90)
    finally:
        stop.set()
        await boot.stop()


def test_a_straggler_is_cut_off_and_carried_without_losing_updates(tmp_path):
    fast, slow = asyncio.run(_run(tmp_path))
    assert fast["finished"] and slow["finished"]
    assert any(str(slow["node_id"]) not in m["nodes"] for m in fast["manifests_folded"])  # a round went on without it
    assert any(c.get("carry") for c in slow["contributions"])
    assert lost_updates([fast, slow]) == 0
    chains = {load_checkpoint(tmp_path / n).base.chain for n in ("n0", "n1")}
    assert len(chains) == 1
    assert fast["export"]["base_version"] == slow["export"]["base_version"] == fast["base_version"]
