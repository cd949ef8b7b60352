"""A node SIGKILLed and started again with the same --out resumes (issue #4, repair and checkpoints).

Two strong nodes of one task train 4 rounds through the CLI. After the second one (not the
anchor) has merged a round it is killed with SIGKILL and started again on the same --out:
it rejoins under its id, restores its checkpoint, catches up from the anchor and finishes
on the same base (same chain digest) as the node that never stopped.
"""

import json


from atlas_p2p.synthetic import write_synthetic_jsonl
from nodes.checkpoint import load_checkpoint
from nodes.metrics import lost_updates
from tests.runtime_launch import wait_for

ROUNDS = 4


def test_a_killed_node_resumes_from_its_checkpoint(procs, tmp_path):
    procs.bootstrap("--heartbeat-s", "0.5", "--dead-after", "3", "--task", "seq_cls", "--num-labels", "4",
                    "--min-nodes", "2", "--clusters", "1", "--seed", "11")
    flags = ["--rounds", str(ROUNDS), "--local-steps", "3", "--lr", "0.01", "--step-delay", "0.3",
             "--round-deadline", "3"]
    data = [write_synthetic_jsonl(tmp_path / f"t{i}.jsonl", 0, 48, seed=i) for i in (0, 1)]
    # a is a slow device (1 s a step): a node process takes seconds to start again, and b
    # must come back while a still trains, or it only catches up and trains no round
    procs.join("a", "30MB", "--data", str(data[0]), *flags, "--step-delay", "1.0")
    wait_for(lambda: procs.node_id("a"), 60, "a to join")
    procs.join("b", "30MB", "--data", str(data[1]), *flags)
    b_id = wait_for(lambda: procs.node_id("b"), 60, "b to join")

    wait_for(lambda: (tmp_path / "b" / "checkpoint" / "state.json").exists(), 120, "b's first checkpoint")
    procs.kill("b")
    saved = load_checkpoint(tmp_path / "b")
    assert saved is not None and saved.base.version >= 1
    procs.join("b", "30MB", "--data", str(data[1]), *flags)

    for name in ("a", "b"):
        assert procs.wait_exit(name, 150) == 0, procs.log(name)
    a, b = procs.summary("a"), procs.summary("b")
    assert b["node_id"] == b_id and b["finished"] and a["finished"]
    assert load_checkpoint(tmp_path / "a").base.chain == load_checkpoint(tmp_path / "b").base.chain
    assert load_checkpoint(tmp_path / "b").base.version >= ROUNDS
    assert "resuming from checkpoint" in procs.log("b")
    assert lost_updates([a, b]) == 0
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["round"] == 0 and lines[-1]["base_version"] >= ROUNDS
