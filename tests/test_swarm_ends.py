"""A swarm always ends (issue #7): a data node SIGKILLed while it computes its fingerprint
delays the end by a bounded time (docs/RUNTIME.md), then the survivors export and exit by
themselves. Real processes through the CLI."""

import json
import subprocess
import sys

from atlas_p2p.synthetic import write_synthetic_jsonl
from tests.runtime_launch import REPO, wait_for

DEAD_AFTER = 3.0


def _state(procs, node_id):
    rows = _peers(procs)
    return next(((r.get("state"), r.get("status")) for r in rows if r["id"] == node_id), None)


def _peers(procs):
    run = subprocess.run([sys.executable, "-m", "tools.cli", "peers", "--bootstrap", procs.address, "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    try:
        return json.loads(run.stdout)
    except ValueError:
        return []


def test_a_node_killed_while_fingerprinting_does_not_keep_the_others_from_ending(procs, tmp_path):
    procs.bootstrap("--heartbeat-s", "0.5", "--dead-after", str(DEAD_AFTER), "--task", "seq_cls",
                    "--num-labels", "4", "--min-nodes", "3", "--assign-after", "4", "--clusters", "1")
    flags = ["--rounds", "2", "--local-steps", "2", "--round-deadline", "5"]
    for name, delay in (("a", "0"), ("b", "0"), ("slow", "2")):
        data = write_synthetic_jsonl(tmp_path / f"{name}.jsonl", 0, 48, seed=len(name))
        procs.join(name, "64MB", "--data", str(data), "--step-delay", delay, *flags)

    slow = wait_for(lambda: procs.node_id("slow"), 60, "the slow node to join")
    wait_for(lambda: _state(procs, slow) == ("fingerprinting", "alive"), 60, "the slow node fingerprinting")
    procs.kill("slow")

    for name in ("a", "b"):
        assert procs.wait_exit(name, 120) == 0, procs.log(name)
        summary = procs.summary(name)
        assert summary["finished"] and summary["adapter_dir"], summary
    assert "the swarm is done" in procs.log("a")
