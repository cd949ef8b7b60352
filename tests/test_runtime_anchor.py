"""A dead anchor is replaced and its cluster keeps merging (issue #4, repair).

Three strong nodes of one task train through the CLI; the anchor (lowest id) is SIGKILLed
after its first merge. The bootstrap declares it dead and names the next member anchor;
the survivors re-send their contributions to it, it publishes the pending manifests from
its own patch log, and both survivors finish on one chain without losing an update.
"""

import json


from atlas_p2p.synthetic import write_synthetic_jsonl
from nodes.checkpoint import load_checkpoint
from nodes.metrics import lost_updates
from tests.runtime_launch import wait_for

ROUNDS = 4


def test_the_cluster_survives_its_anchor(procs, tmp_path):
    procs.bootstrap("--heartbeat-s", "0.5", "--dead-after", "3", "--task", "seq_cls", "--num-labels", "4",
                    "--min-nodes", "3", "--clusters", "1", "--seed", "21")
    flags = ["--rounds", str(ROUNDS), "--local-steps", "3", "--lr", "0.01", "--step-delay", "0.3",
             "--round-deadline", "6"]
    for i, name in enumerate(("a", "b", "c")):
        data = write_synthetic_jsonl(tmp_path / f"{name}.jsonl", 0, 48, seed=i)
        procs.join(name, "30MB", "--data", str(data), *flags)
        wait_for(lambda: procs.node_id(name), 60, f"{name} to join")
    wait_for(lambda: (tmp_path / "a" / "metrics.jsonl").exists(), 120, "the anchor's first merge")
    procs.kill("a")

    for name in ("b", "c"):
        assert procs.wait_exit(name, 150) == 0, procs.log(name)
    b, c = procs.summary("b"), procs.summary("c")
    assert b["finished"] and c["finished"]
    assert load_checkpoint(tmp_path / "b").base.chain == load_checkpoint(tmp_path / "c").base.chain
    assert load_checkpoint(tmp_path / "b").base.version >= ROUNDS
    assert lost_updates([b, c]) == 0
    changes = json.loads((tmp_path / "boot" / "coordinator.json").read_text())["anchor_changes"]
    assert any(ch["old_anchor"] == procs.node_id("a") and ch["new_anchor"] == procs.node_id("b") for ch in changes)
