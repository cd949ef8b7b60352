"""A node too weak for the whole model that joins before any peer able to help waits for a
provisional helper and fingerprints across a cut through it, instead of running the whole
model above its budget. Bootstrap + 2 nodes in one event loop, real sockets.

The order is forced: the weak node is started alone and is seen fingerprinting (waiting)
before the strong node starts.
"""

import asyncio

import numpy as np
import pytest

from atlas_p2p.memory import candidate
from atlas_p2p.synthetic import write_synthetic_jsonl
from nodes.config import SwarmSpec
from scenarios.inprocess import InProcessSwarm
from scenarios.waiting import wait_until_async


async def _run(tmp_path, task, probe):
    labels = 4 if task == "seq_cls" else None
    spec = SwarmSpec(task=task, num_labels=labels, min_nodes=2, clusters=1, assign_after_s=60, fingerprint_probe=probe)
    async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=3) as swarm:
        for seed, (name, memory_mb) in enumerate((("weak", 4), ("strong", 30))):
            kind = "classification" if labels else "lm"
            data = write_synthetic_jsonl(tmp_path / f"{name}.jsonl", 0, 32, seed=seed, kind=kind)
            swarm.add(name, memory_mb * 10**6, data=data, rounds=1, local_steps=1, lr=0.01)
        weak, strong = swarm.peers["weak"], swarm.peers["strong"]
        swarm.start("weak")
        await wait_until_async(lambda: weak.state == "fingerprinting", 60, what="the weak node fingerprinting")
        assert weak.fingerprint is None  # no helper yet: it waits rather than run the whole model
        summaries = await swarm.run(timeout=240)
        shape = swarm.boot.coordinator.config.shape
        return summaries, weak.importance, strong.server.bytes_received["probe"], shape, weak.fingerprint


@pytest.mark.parametrize(
    "task, probe",
    [
        ("seq_cls", "lora"),
        ("seq_cls", "head"),  # the helper sends the classifier head's gradient back
        ("causal_lm", "head"),  # the helper sends hidden states; the weak node reads them at its own LM head
    ],
)
def test_a_weak_node_that_joins_first_waits_for_a_provisional_helper(tmp_path, task, probe):
    summaries, importance, probe_bytes, shape, fingerprint = asyncio.run(_run(tmp_path, task, probe))
    assert fingerprint.shape == (64,) and abs(float(np.linalg.norm(fingerprint)) - 1) < 1e-5
    assert all(s["finished"] for s in summaries.values())
    assert probe_bytes > 0  # the strong node served the weak node's fingerprint probes
    blocks = {candidate(shape, m).block for m in importance}
    assert len(blocks) < shape.num_layers  # measured across the cut: only the blocks it runs
