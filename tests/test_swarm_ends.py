"""A swarm always ends: a data node SIGKILLed while it computes its fingerprint
delays the end by a bounded time (docs/RUNTIME.md), then the survivors export and exit by
themselves. Real processes through the CLI."""

from tests.process_swarm import add_data_node, bootstrap_flags, flags

DEAD_AFTER = 3.0


def _state(swarm, node_id):
    """(state, status) of `node_id` in `atlas-node peers --json` (SwarmError while the command fails)."""
    return next(((r.get("state"), r.get("status")) for r in swarm.peers() if r["id"] == node_id), None)


def test_a_node_killed_while_fingerprinting_does_not_keep_the_others_from_ending(swarm):
    swarm.start_bootstrap(extra=bootstrap_flags(dead_after=DEAD_AFTER, min_nodes=3, assign_after=4, clusters=1))
    for name, delay in (("a", "0"), ("b", "0"), ("slow", "2")):
        node_flags = flags(step_delay=delay, rounds=2, local_steps=2, round_deadline=5)
        add_data_node(swarm, name, task=0, seed=len(name), memory="64MB", extra=node_flags)

    slow = swarm.node_id("slow")
    swarm.wait_until(
        lambda: _state(swarm, slow) == ("fingerprinting", "alive"), 60, what="the slow node fingerprinting"
    )
    swarm.kill("slow")

    for name in ("a", "b"):
        assert swarm.wait_exit(name, 120) == 0, swarm.nodes[name].log_tail(40)
        summary = swarm.summary(name)
        assert summary["finished"] and summary["adapter_dir"], summary
    assert "the swarm is done" in swarm.nodes["a"].log_text()
