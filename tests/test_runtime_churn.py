"""Churn with real processes: a helper SIGKILLed mid-training.

Bootstrap + two owners (tasks 0 and 1, each too small for the whole model) + two pure
helpers, all through the CLI. Once an owner has merged its first round, its helper is
killed with SIGKILL. The owner's next step misses its deadline, it reports the helper, the
bootstrap re-pairs it with the other helper, and it rolls back and replays the round. Every
survivor finishes, the repair is recorded, and no contribution is lost.
"""

import json

from atlas_p2p.records import Summary, lost_updates
from scenarios.waiting import wait_until
from tests.process_swarm import add_data_node, bootstrap_flags, metrics_lines, training_flags

ROUNDS = 3


def test_a_killed_helper_is_replaced_and_no_update_is_lost(swarm):
    swarm.start_bootstrap(extra=bootstrap_flags(dead_after=4, min_nodes=2, clusters=2, seed=5))
    for name in ("h1", "h2"):
        swarm.add_node(name, memory="100MB", out=True)
    for name in ("h1", "h2"):
        swarm.node_id(name)
    node_flags = training_flags(ROUNDS, step_delay=0.25, step_timeout=2, round_deadline=8)
    for i in (0, 1):
        add_data_node(swarm, f"o{i}", task=i, seed=i, memory="4MB", extra=node_flags)

    first = wait_until(lambda: metrics_lines(swarm, "o0"), 120, what="o0's first round")[0]
    victim = {swarm.node_id("h1"): "h1", swarm.node_id("h2"): "h2"}[first["helper"]]
    swarm.kill(victim)

    for name in ("o0", "o1"):
        assert swarm.wait_exit(name, 150) == 0, swarm.nodes[name].log_tail(40)
    survivor = "h2" if victim == "h1" else "h1"
    assert swarm.wait_exit(survivor, 60) == 0, swarm.nodes[survivor].log_tail(40)

    summaries = [swarm.summary(n) for n in ("o0", "o1")]
    assert all(s["finished"] and s["rounds_done"] == ROUNDS for s in summaries), summaries
    o0 = summaries[0]
    assert o0["repairs"] and o0["repairs"][0]["helper"] == first["helper"]
    assert o0["helper"] == swarm.node_id(survivor)
    coordinator = json.loads((swarm.bootstrap.state_dir / "coordinator.json").read_text())
    assert coordinator["repairs"] >= 1
    assert lost_updates(Summary.from_json(x) for x in summaries) == []
    assert all(s["adapter_dir"] for s in summaries)
