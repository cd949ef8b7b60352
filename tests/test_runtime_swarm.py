"""An in-process swarm: bootstrap + 4 nodes in one event loop, real sockets.

Two data nodes of task 0 (one strong, one that needs a helper), one of task 1 and one pure
helper train 2 rounds: the bootstrap clusters them by fingerprint, members of a cluster
fold the same patches (same digests, same version), and every exported adapter loads with
PeftModel.from_pretrained and reproduces the cluster's merged model.
"""

import asyncio
import json

import pytest
import torch
from peft import PeftModel

from atlas_p2p.records import Summary, lost_updates
from atlas_p2p.synthetic import write_synthetic_jsonl
from atlas_p2p.training import apply_to_model
from nodes.checkpoint import load_checkpoint
from nodes.config import SwarmSpec
from nodes.modelname import build_model
from scenarios.inprocess import InProcessSwarm

ROUNDS = 2


async def _swarm(tmp_path):
    spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=3, clusters=2, assign_after_s=60)
    async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=77) as swarm:
        nodes = {"strong0": (30, 0), "weak0": (4, 0), "strong1": (30, 1), "helper": (100, None)}  # MB, task
        for seed, (name, (memory_mb, task)) in enumerate(nodes.items()):
            data = None if task is None else write_synthetic_jsonl(tmp_path / f"{name}.jsonl", task, 48, seed=seed)
            swarm.add(
                name,
                memory_mb * 10**6,
                data=data,
                rounds=ROUNDS,
                local_steps=2,
                lr=0.01,
                export_rank=64,
                round_deadline_s=30.0,
            )
        return await swarm.run(timeout=120)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("swarm")
    return tmp, asyncio.run(_swarm(tmp))


def test_clusters_follow_the_tasks_and_every_node_finishes(swarm):
    _, s = swarm
    assert all(x["finished"] for x in s.values()), s
    assert s["strong0"]["cluster"] == s["weak0"]["cluster"] != s["strong1"]["cluster"]
    assert s["weak0"]["role"] == "owner" and s["weak0"]["helper"] is not None
    assert s["strong0"]["role"] == "whole" and s["helper"]["has_data"] is False
    assert all(x["rounds_done"] == ROUNDS for n, x in s.items() if n != "helper")
    assert s["helper"]["steps_served"] + s["strong0"]["steps_served"] + s["strong1"]["steps_served"] >= 2 * ROUNDS


def test_a_cluster_folds_identical_patches(swarm):
    tmp, s = swarm
    a, b = s["strong0"], s["weak0"]
    assert a["base_version"] == b["base_version"] == ROUNDS
    assert [m["digest"] for m in a["manifests_folded"]] == [m["digest"] for m in b["manifests_folded"]]
    assert all(m["nodes"] == sorted([str(a["node_id"]), str(b["node_id"])]) for m in a["manifests_folded"])
    chains = {load_checkpoint(tmp / n).base.chain for n in ("strong0", "weak0")}
    assert len(chains) == 1
    assert load_checkpoint(tmp / "strong1").base.chain not in chains
    assert lost_updates(Summary.from_json(x) for x in s.values()) == []


def test_exported_adapters_load_with_peft_and_equal_the_merged_model(swarm):
    tmp, s = swarm
    ids = torch.tensor([[5, 9, 12, 7, 30, 2]])
    for name in ("strong0", "weak0", "strong1"):
        assert s[name]["export"]["exact"], s[name]["export"]
        loaded = PeftModel.from_pretrained(build_model("tiny-gpt2", "seq_cls", 4), s[name]["adapter_dir"])
        merged = build_model("tiny-gpt2", "seq_cls", 4)
        apply_to_model(merged, load_checkpoint(tmp / name).base.folded_delta())
        loaded.eval(), merged.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_metrics_lines_carry_what_scenarios_read(swarm):
    tmp, s = swarm
    lines = [json.loads(x) for x in (tmp / "weak0" / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == list(range(ROUNDS))
    for x in lines:
        assert {
            "node_id",
            "cluster",
            "round",
            "loss",
            "eval",
            "steps",
            "step_rate",
            "bytes_by_kind",
            "base_version",
            "contributions",
            "manifests_folded",
            "repairs_seen",
            "role",
        } <= set(x)
        assert set(x["bytes_by_kind"]) == {"activations", "gradients", "adapters", "fingerprints", "control"}
    assert lines[-1]["bytes_by_kind"]["activations"] > 0
