"""Churn with real processes started through the CLI: SIGKILL a node, SIGKILL and restart
the bootstrap on its state, and watch the peer table through `atlas-node peers --json`."""

from __future__ import annotations

import asyncio
import signal

import pytest

from scenarios.swarm import Swarm
from transport.messages import Ok, Ping
from transport.rpc import RpcClient
from transport.security import Keypair

# short timings so the whole scenario takes well under a minute
TIMING = dict(heartbeat_s=0.5, suspect_after=1.5, dead_after=3.0, grace_s=3.0)


async def _ping_all(rows: list[dict]) -> list:
    """`ping` every node on the address it advertised in the peer table, over CURVE to the key
    its row names (the key it joined with)."""
    async with RpcClient("churn-test", keypair=Keypair.generate()) as client:
        for row in rows:
            client.set_server_key(row["address"], row["public_key"])
        return [await client.call(row["address"], Ping(), timeout=5) for row in rows]


@pytest.fixture
def swarm(tmp_path):
    with Swarm(tmp_path / "swarm", **TIMING) as running:  # children reaped even if the test fails
        yield running


def test_killed_node_is_dead_and_survivors_stay_alive_across_a_bootstrap_crash(swarm):
    swarm.start_bootstrap()
    specs = {"a": ("8GB", "50Mbps"), "b": ("512MB", "10Mbps"), "c": ("2GiB", "1Gbps")}
    for name, (memory, bandwidth) in specs.items():
        swarm.add_node(name, memory=memory, bandwidth=bandwidth)
    ids = {name: swarm.node_id(name) for name in specs}
    assert sorted(ids.values()) == [1, 2, 3]
    swarm.wait_until(lambda: set(swarm.statuses().values()) == {"alive"}, what="three alive nodes")
    rows = {row["id"]: row for row in swarm.peers()}
    assert rows[ids["b"]]["memory_bytes"] == 512_000_000 and rows[ids["c"]]["bandwidth_bps"] == 1_000_000_000
    assert all(row["cluster"] is None and row["helper"] is None for row in rows.values())
    assert all(isinstance(reply, Ok) for reply in asyncio.run(_ping_all(list(rows.values()))))

    swarm.kill("b", signal.SIGKILL)
    swarm.wait_until(lambda: swarm.statuses()[ids["b"]] == "dead", what="node b seen dead")
    swarm.wait_until(lambda: [swarm.statuses()[ids[n]] for n in ("a", "c")] == ["alive", "alive"], what="a and c alive")

    swarm.kill("bootstrap", signal.SIGKILL)
    swarm.wait_until(  # stay away long enough that the survivors notice and start backing off
        lambda: all("did not answer heartbeat" in swarm.nodes[n].log_text() for n in ("a", "c")),
        what="survivors noticing the bootstrap is gone",
    )
    swarm.restart_bootstrap()
    restarted = {row["id"]: row for row in swarm.peers()}
    assert set(restarted) == set(ids.values())  # the same peers, read back from the SQLite state
    assert restarted[ids["b"]]["status"] == "dead"

    def survivors_heartbeating() -> bool:
        now_rows = {row["id"]: row for row in swarm.peers()}
        fresh = [now_rows[ids[n]]["last_seen_ago_s"] < 1.0 for n in ("a", "c")]
        return all(fresh) and all(now_rows[ids[n]]["status"] == "alive" for n in ("a", "c"))

    swarm.wait_until(survivors_heartbeating, what="survivors heartbeating the restarted bootstrap")
    for name in ("a", "c"):  # same processes, same ids: they reconnected, never rejoined
        node = swarm.nodes[name]
        assert node.running and node.history == []
        assert node.log_text().count("joined bootstrap") == 1
    swarm.wait_until(
        lambda: all("reconnected to bootstrap" in swarm.nodes[n].log_text() for n in ("a", "c")),
        what="survivors logging their reconnection",
    )
    swarm.wait_until(lambda: swarm.statuses()[ids["b"]] == "dead", timeout=5, what="b still dead")

    assert swarm.kill("a", signal.SIGTERM) == 0  # a clean exit sends `leave`
    assert swarm.kill("c", signal.SIGINT) == 0  # Ctrl-C does the same
    swarm.wait_until(
        lambda: [swarm.statuses()[ids[n]] for n in ("a", "c")] == ["left", "left"], what="nodes a and c seen left"
    )
