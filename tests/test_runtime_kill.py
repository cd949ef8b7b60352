"""`Peer.kill`: a node of an in-process swarm dies as a SIGKILLed process does.

Two pure helpers join an in-process bootstrap (keys on). One is killed: it sends no
`leave`, writes no summary, and the bootstrap's sweep finds it silent and marks it dead,
while the other stays alive; when the swarm closes, the survivor leaves as usual.
"""

import asyncio

from nodes.config import SwarmSpec
from scenarios.inprocess import InProcessSwarm
from scenarios.waiting import wait_until_async


async def _kill_one(tmp_path):
    timing = dict(heartbeat_s=0.2, suspect_after_s=0.6, dead_after_s=1.2)
    async with await InProcessSwarm.create(tmp_path, SwarmSpec(task="seq_cls", num_labels=4), **timing) as swarm:
        for name in ("victim", "other"):
            swarm.add(name, 100 * 10**6)
            swarm.start(name)
        ids = {name: await swarm.joined(name) for name in ("victim", "other")}
        table = swarm.boot.registry.table
        await swarm.peers["victim"].kill()
        await wait_until_async(lambda: table.get(ids["victim"]).status == "dead", 30, what="the victim to be dead")
        seen = dict(
            victim=table.get(ids["victim"]).status,
            other=table.get(ids["other"]).status,
            leaves_while_running=swarm.boot.server.bytes_received["leave"],
            summary=await swarm.tasks["victim"],
        )
    seen["leaves_after_close"] = swarm.boot.server.bytes_received["leave"]
    return seen


def test_a_killed_peer_sends_no_leave_and_the_bootstrap_declares_it_dead(tmp_path):
    seen = asyncio.run(_kill_one(tmp_path))
    assert (seen["victim"], seen["other"]) == ("dead", "alive")
    assert seen["leaves_while_running"] == 0
    assert not (tmp_path / "victim" / "summary.json").exists()
    assert seen["summary"]["finished"] is False
    assert (tmp_path / "other" / "summary.json").exists() and seen["leaves_after_close"] > 0
