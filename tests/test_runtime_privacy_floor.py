"""--privacy-floor in the runtime: every data node measures psi by split on its own data and
sends it with its fingerprint; the bootstrap plans by it and its peer table shows each owner's
psi at its split; the weak node releases its fingerprint with sample-level DP (computed across
its cut, one example at a time) and the table shows its (epsilon, delta). Bootstrap + 2 nodes in
one event loop, real sockets, the embedded tiny model.
"""

import asyncio

import pytest

from atlas_p2p.planning import privacy_min_split
from atlas_p2p.privacy.budget import SampleDP
from atlas_p2p.synthetic import write_synthetic_jsonl
from nodes.config import SwarmSpec
from scenarios.inprocess import InProcessSwarm

FLOOR = 1e9  # every split is under it: the run must go through; the planner's use is unit-tested


async def _run(tmp_path):
    """The peer table row of each node while it was an owner or whole (rows clear once done)."""
    spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=2, clusters=1, privacy_floor=FLOOR)
    async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=5) as swarm:
        for seed, (name, memory_mb) in enumerate({"strong": 30, "weak": 4}.items()):
            data = write_synthetic_jsonl(tmp_path / f"{name}.jsonl", 0, 32, seed=seed)
            dp = SampleDP(8.0) if name == "weak" else None
            swarm.add(name, memory_mb * 10**6, data=data, rounds=1, local_steps=1, lr=0.01, fingerprint_dp=dp)
        run = asyncio.ensure_future(swarm.run(timeout=240))
        seen = {}
        while not run.done():
            for row in swarm.boot.registry.table.rows():
                if row.role in ("owner", "whole"):
                    seen[row.id] = row
            await asyncio.sleep(0.05)
        summaries = run.result()
        return {n: seen.get(s["node_id"]) for n, s in summaries.items()}, {n: swarm.peers[n].leakage for n in summaries}


@pytest.mark.timeout(300)
def test_nodes_send_psi_and_their_dp_budget_and_the_peer_table_shows_them(tmp_path):
    rows, leakage = asyncio.run(_run(tmp_path))

    blocks = 4  # the embedded tiny model
    for name in ("strong", "weak"):
        assert len(leakage[name]) == blocks - 1 and all(v > 0 for v in leakage[name])
    weak = rows["weak"]
    assert weak.role == "owner" and weak.split >= privacy_min_split([0.0, *leakage["weak"]], FLOOR)
    assert weak.psi == leakage["weak"][weak.split - 1]
    assert rows["strong"].psi is None  # the whole model: it sends nothing
    assert (weak.dp_epsilon, weak.dp_delta) == (8.0, 1e-5)
    assert rows["strong"].dp_epsilon is None and rows["strong"].dp_delta is None
