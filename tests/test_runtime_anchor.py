"""A dead anchor is replaced and its cluster keeps merging (repair).

Three strong nodes of one task train through the CLI; the anchor (lowest id) is SIGKILLed
after its first merge. The bootstrap declares it dead and names the next member anchor;
the survivors re-send their contributions to it, it publishes the pending manifests from
its own patch log, and both survivors finish on one chain without losing an update.
"""

import json

from atlas_p2p.records import Summary, lost_updates
from nodes.checkpoint import load_checkpoint
from scenarios.waiting import wait_until
from tests.process_swarm import add_data_node, bootstrap_flags, training_flags

ROUNDS = 4


def test_the_cluster_survives_its_anchor(swarm):
    swarm.start_bootstrap(extra=bootstrap_flags(dead_after=3, min_nodes=3, clusters=1, seed=21))
    node_flags = training_flags(ROUNDS, step_delay=0.3, round_deadline=6)
    for i, name in enumerate(("a", "b", "c")):
        add_data_node(swarm, name, task=0, seed=i, memory="30MB", extra=node_flags)
        swarm.node_id(name)
    wait_until(lambda: (swarm.out_dir("a") / "metrics.jsonl").exists(), 120, what="the anchor's first merge")
    swarm.kill("a")

    for name in ("b", "c"):
        assert swarm.wait_exit(name, 150) == 0, swarm.nodes[name].log_tail(40)
    b, c = swarm.summary("b"), swarm.summary("c")
    assert b["finished"] and c["finished"]
    assert load_checkpoint(swarm.out_dir("b")).base.chain == load_checkpoint(swarm.out_dir("c")).base.chain
    assert load_checkpoint(swarm.out_dir("b")).base.version >= ROUNDS
    assert lost_updates(Summary.from_json(x) for x in (b, c)) == []
    changes = json.loads((swarm.bootstrap.state_dir / "coordinator.json").read_text())["anchor_changes"]
    assert any(ch["old_anchor"] == swarm.node_id("a") and ch["new_anchor"] == swarm.node_id("b") for ch in changes)
