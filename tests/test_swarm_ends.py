"""A swarm always ends: a data node SIGKILLed while it computes its fingerprint
delays the end by a bounded time (docs/RUNTIME.md), then the survivors export and exit by
themselves. Real processes through the CLI."""

from atlas_p2p.synthetic import write_synthetic_jsonl

DEAD_AFTER = 3.0


def _state(swarm, node_id):
    """(state, status) of `node_id` in `atlas-node peers --json` (SwarmError while the command fails)."""
    return next(((r.get("state"), r.get("status")) for r in swarm.peers() if r["id"] == node_id), None)


def test_a_node_killed_while_fingerprinting_does_not_keep_the_others_from_ending(swarm, tmp_path):
    swarm.start_bootstrap(
        extra=[
            "--dead-after",
            str(DEAD_AFTER),
            "--task",
            "seq_cls",
            "--num-labels",
            "4",
            "--min-nodes",
            "3",
            "--assign-after",
            "4",
            "--clusters",
            "1",
        ]
    )
    flags = ["--rounds", "2", "--local-steps", "2", "--round-deadline", "5"]
    for name, delay in (("a", "0"), ("b", "0"), ("slow", "2")):
        data = write_synthetic_jsonl(tmp_path / f"{name}.jsonl", 0, 48, seed=len(name))
        swarm.add_node(name, memory="64MB", data=data, extra=["--step-delay", delay, *flags], out=True)

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
