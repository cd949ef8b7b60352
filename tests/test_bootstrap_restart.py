"""A bootstrap SIGKILLed mid-training and started again on the same --state keeps its coordinator.

A bootstrap and two nodes of different tasks (two clusters) train through the CLI. Once a
node has merged its first round the bootstrap is killed with SIGKILL and started again on
the same port and --state: it restores the coordinator it kept there (clusters, plan and
assignment versions), so the nodes, which train on meanwhile, keep their cluster ids in
every round and both finish.
"""

import json
import re
from pathlib import Path

import pytest

from scenarios.swarm import descendants
from tests.process_swarm import add_data_node, bootstrap_flags, metrics_lines, training_flags

ROUNDS = 8  # long enough that the nodes still train when the bootstrap is back (~35 s of rounds left)


@pytest.mark.timeout(1800)  # process starts and CPU training: minutes on a loaded 2-core machine
def test_a_restarted_bootstrap_keeps_clusters_and_versions(swarm):
    swarm.start_bootstrap(extra=bootstrap_flags(dead_after=8, min_nodes=2, clusters=2, seed=11))
    node_flags = training_flags(ROUNDS, step_delay=1.5, round_deadline=5)
    for name, task in (("a", 0), ("b", 1)):
        add_data_node(swarm, name, task=task, seed=task, memory="30MB", extra=node_flags)
    ids = {name: swarm.node_id(name, timeout=300) for name in ("a", "b")}
    swarm.wait_until(lambda: metrics_lines(swarm, "a"), 600, what="a's first round")

    before = json.loads((swarm.bootstrap.state_dir / "coordinator.json").read_text())
    swarm.kill("bootstrap")
    swarm.restart_bootstrap()

    # it binds first and restores the coordinator right after: the line follows the bind
    restored = swarm.wait_until(
        lambda: re.search(
            r"restored the coordinator: assignment version (\d+), 2 clusters", swarm.bootstrap.log_text()
        ),
        120,
        what="the restarted bootstrap to restore its coordinator",
    )
    assert int(restored.group(1)) == before["version"]
    statuses = swarm.wait_until(
        lambda: swarm.statuses() == {ids["a"]: "alive", ids["b"]: "alive"},
        120,
        what="both nodes alive at the restarted bootstrap",
    )
    assert statuses
    for name in ("a", "b"):
        assert swarm.wait_exit(name, 900) == 0, swarm.nodes[name].log_tail(40)

    clusters = {name: before["clusters_of"][str(ids[name])] for name in ("a", "b")}
    assert clusters["a"] != clusters["b"]
    for name in ("a", "b"):
        summary = swarm.summary(name)
        assert summary["finished"] and summary["rounds_done"] == ROUNDS
        assert summary["cluster"] == clusters[name]
        assert {line["cluster"] for line in metrics_lines(swarm, name)} == {clusters[name]}


@pytest.mark.timeout(300)
def test_a_sigkilled_bootstrap_leaves_no_coordinator_process_behind(swarm):
    swarm.start_bootstrap(extra=bootstrap_flags(dead_after=8, min_nodes=2, clusters=2, seed=11))
    pid = swarm.bootstrap.proc.pid
    helpers = swarm.wait_until(lambda: descendants(pid), 60, what="the coordinator process")
    swarm.kill("bootstrap")
    swarm.wait_until(lambda: not any(map(_running, helpers)), 30, what="the coordinator process to end")


def _running(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie has ended: only its exit status is left)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
