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
from nodes.config import SwarmSpec
from scenarios.inprocess import InProcessSwarm


async def _swarm(tmp_path):
    spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=3, clusters=2, assign_after_s=60)
    async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=5) as swarm:
        nodes = {"strong0": (30, 0), "weak0": (4, 0), "strong1": (30, 1)}  # MB, task
        for seed, (name, (memory_mb, task)) in enumerate(nodes.items()):
            data = write_synthetic_jsonl(tmp_path / f"{name}.jsonl", task, 32, seed=seed)
            swarm.add(name, memory_mb * 10**6, data=data, rounds=1, local_steps=1, lr=0.01)
        summaries = await swarm.run(timeout=240)
        return {name: (s["node_id"], swarm.peers[name]) for name, s in summaries.items()}, swarm.boot.coordinator


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
