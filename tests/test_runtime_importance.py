"""A node's importance probe reaches the planner: bootstrap + 3 nodes in one event loop, real sockets.

Two data nodes of task 0 (one strong, one too weak for the whole model, which fingerprints
across a cut through a provisional helper) and one of task 1 train one round. Each sends the
importance vector it measured with its fingerprint; the coordinator plans every cluster by
the mean of its members' vectors (atlas_p2p.importance.cluster_importance).
"""

import asyncio

import pytest

from atlas_p2p.importance import cluster_importance
from atlas_p2p.memory import candidate, lora_candidates
from atlas_p2p.synthetic import write_synthetic_jsonl
from nodes.bootstrap import Bootstrap
from nodes.config import BootstrapConfig, NodeConfig, SwarmSpec, TrainConfig
from nodes.peer import Peer


async def _swarm(tmp_path):
    boot = await Bootstrap.create(
        BootstrapConfig(bind="127.0.0.1:0", state_dir=None, heartbeat_s=0.3, suspect_after_s=2.0,
                        dead_after_s=4.0, sweep_s=0.1, fingerprint_seed=5),
        swarm=SwarmSpec(task="seq_cls", num_labels=4, min_nodes=3, clusters=2, assign_after_s=60),
    )
    nodes = {"strong0": ("30MB", 0), "weak0": ("4MB", 0), "strong1": ("30MB", 1)}
    peers, stop = {}, asyncio.Event()
    for i, (name, (memory, task)) in enumerate(nodes.items()):
        data = write_synthetic_jsonl(tmp_path / f"{name}.jsonl", task, 32, seed=i)
        config = NodeConfig(bootstrap=boot.address, memory_bytes=int(memory[:-2]) * 10**6, bandwidth_bps=5e7,
                            data=data, state_dir=tmp_path / name, compute_score=1.0)
        peers[name] = Peer(config, TrainConfig(out_dir=tmp_path / name, rounds=1, local_steps=1, lr=0.01))
    try:
        runs = [asyncio.create_task(p.run(stop)) for p in peers.values()]
        summaries = await asyncio.wait_for(asyncio.gather(*runs), timeout=240)
        coordinator = boot.coordinator
    finally:
        stop.set()
        await boot.stop()
    return {name: (s["node_id"], peers[name]) for name, s in zip(peers, summaries)}, coordinator


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    return asyncio.run(_swarm(tmp_path_factory.mktemp("importance")))


def test_every_data_node_sends_the_importance_of_the_weights_it_runs(swarm):
    nodes, coordinator = swarm
    members = coordinator.snapshot()["members"]
    shape = coordinator.config.shape
    for name, (node_id, peer) in nodes.items():
        sent = members[str(node_id)]["importance"]
        assert sent == pytest.approx(peer.importance) and sum(sent.values()) == pytest.approx(1.0)
        blocks = {candidate(shape, m).block for m in sent}
        if name == "weak0":  # across a cut: only the first blocks, the ones it runs itself
            assert blocks == set(range(len(blocks))) and len(blocks) < shape.num_layers
        else:
            assert set(sent) == {m.name for m in lora_candidates(shape)}


def test_the_plan_uses_each_clusters_mean_importance(swarm):
    nodes, coordinator = swarm
    members = coordinator.snapshot()["members"]
    by_cluster = {}
    for node_id, _ in nodes.values():
        by_cluster.setdefault(coordinator.cluster_of(node_id), []).append(members[str(node_id)]["importance"])
    planned = coordinator.planned_importance
    assert set(planned) == set(by_cluster) and len(planned) == 2
    for cluster, vectors in by_cluster.items():
        assert planned[cluster] == pytest.approx(cluster_importance(vectors))
