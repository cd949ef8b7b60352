"""A node SIGKILLed and started again with the same --out resumes (checkpoints).

Two strong nodes of one task train 4 rounds through the CLI. After the second one (not the
anchor) has merged a round it is killed with SIGKILL and started again on the same --out:
it rejoins under its id, restores its checkpoint, catches up from the anchor, trains the
rounds left and finishes on the same base (same chain digest) as the node that never
stopped.

The order is held by the protocol, not by timing: the bootstrap does not declare b dead
within the test (--dead-after 300), so b stays a member and the anchor a publishes no
round without b's contribution until the long round deadline; a cannot finish while b is
away, and the restarted b must train at least one round. (Declaring dead and repairing
are tested in test_runtime_churn.py.)
"""

import json

from atlas_p2p.records import Summary, lost_updates
from nodes.checkpoint import load_checkpoint
from scenarios.waiting import wait_until
from tests.process_swarm import bootstrap_flags, data_file, training_flags

ROUNDS = 4


def test_a_killed_node_resumes_from_its_checkpoint(swarm):
    swarm.start_bootstrap(extra=bootstrap_flags(dead_after=300, min_nodes=2, clusters=1, seed=11))
    node_flags = training_flags(ROUNDS, step_delay=0.3, round_deadline=300)
    data = {name: data_file(swarm, name, task=0, seed=i) for i, name in enumerate(("a", "b"))}
    swarm.add_node("a", memory="30MB", data=data["a"], extra=node_flags, out=True)
    swarm.node_id("a")
    swarm.add_node("b", memory="30MB", data=data["b"], extra=node_flags, out=True)
    b_id = swarm.node_id("b")

    wait_until(lambda: (swarm.out_dir("b") / "checkpoint" / "state.json").exists(), 120, what="b's first checkpoint")
    swarm.kill("b")
    first_life = (swarm.out_dir("b") / "metrics.jsonl").read_text().splitlines()
    saved = load_checkpoint(swarm.out_dir("b"))
    assert saved is not None and saved.base.version >= 1
    swarm.add_node("b", memory="30MB", data=data["b"], extra=node_flags, out=True)

    for name in ("a", "b"):
        assert swarm.wait_exit(name, 150) == 0, swarm.nodes[name].log_tail(40)
    a, b = swarm.summary("a"), swarm.summary("b")
    assert b["node_id"] == b_id and b["finished"] and a["finished"]
    assert load_checkpoint(swarm.out_dir("a")).base.chain == load_checkpoint(swarm.out_dir("b")).base.chain
    assert load_checkpoint(swarm.out_dir("b")).base.version >= ROUNDS
    assert "resuming from checkpoint" in swarm.nodes["b"].log_text()  # the restarted process's log
    assert lost_updates(Summary.from_json(x) for x in (a, b)) == []
    lines = [json.loads(x) for x in (swarm.out_dir("b") / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["round"] == 0 and lines[-1]["base_version"] >= ROUNDS
    assert len(lines) > len(first_life), "the restarted b trained no round"
