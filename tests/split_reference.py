"""The cross-process split tests (two-part and u-shape): their real-process run and its
in-process reference.

The run: a bootstrap, a pure helper and one owner too small for the whole model train
ROUNDS rounds of STEPS steps as `atlas-node` processes. The reference: the same rounds with
OwnerSession + HelperSession in one process, folding each round's patch, from the same base,
seeds, ranks and batches the runtime uses; the processes must fold the same patches within
1e-4.
"""

from __future__ import annotations

from pathlib import Path

import torch

from atlas_p2p.aggregation import Patch, stack_merge
from atlas_p2p.data import load_for_task, round_batches
from atlas_p2p.lora import attach_lora
from atlas_p2p.synthetic import write_synthetic_jsonl
from atlas_p2p.training import HelperConfig, HelperSession, OwnerConfig, OwnerSession
from atlas_p2p.versioning import PatchRecord
from nodes.checkpoint import load_checkpoint
from nodes.modelname import build_model, build_tokenizer
from scenarios.swarm import Swarm
from scenarios.waiting import wait_until
from tests.process_swarm import bootstrap_flags, flags

SEED, LR, STEPS, ROUNDS, BATCH = 1234, 0.01, 3, 2, 4


def _two_part_step(owner, helper, node_id, f):
    out = helper.step(node_id, f.round, f.step, f.activations, f.attention_mask, f.labels, base_version=owner.version)
    owner.backward(out.grad, out.loss)


def _u_shape_step(owner, helper, node_id, f):
    assert f.labels is None, "u-shape: labels must not leave the owner"
    hidden = helper.u_forward(node_id, f.round, f.step, f.activations, f.attention_mask, base_version=owner.version)
    _, g = owner.finish(hidden)
    owner.backward(helper.u_backward(node_id, f.round, f.step, g, base_version=owner.version))


_EXCHANGE = {"two-part": _two_part_step, "u-shape": _u_shape_step}


def reference_patches(data, node_id, split, ranks, mode="two-part"):
    """The patches of ROUNDS rounds of `mode` split training done in this process."""
    encoded = load_for_task(data, build_tokenizer("tiny-gpt2"), "seq_cls", 4, 32)
    owner = OwnerSession(
        attach_lora(build_model("tiny-gpt2", "seq_cls", 4), ranks),
        OwnerConfig(node_id=node_id, split=split, lr=LR, run_seed=SEED, cluster="0", mode=mode),
    )
    helper = HelperSession(build_model("tiny-gpt2", "seq_cls", 4), HelperConfig(cluster="0"))
    exchange = _EXCHANGE[mode]
    owner.start_round(0)
    patches = []
    for r in range(ROUNDS):
        helper.begin(node_id, r, split, ranks, owner.seed, lr=LR, mode=mode)
        for batch in round_batches(encoded, BATCH, 0, r, STEPS):
            exchange(owner, helper, node_id, owner.forward(batch))
        back = helper.return_adapter(node_id, r)
        patch = stack_merge([owner.contribution(None, back.factors, back.dense)])
        owner.fold(patch)
        helper.fold(patch)
        patches.append(patch)
    return patches


def train_in_processes(swarm: Swarm, mode_flags: list[str]) -> tuple[Path, dict, dict]:
    """Run the split swarm with `mode_flags` added to the bootstrap's and the owner's flags until
    the owner has finished and both nodes have exited 0; (owner's data, owner's summary,
    helper's summary)."""
    data = write_synthetic_jsonl(swarm.workdir / "t0.jsonl", 0, 48, seed=3)
    swarm.start_bootstrap(extra=[*bootstrap_flags(min_nodes=1, clusters=1, seed=SEED), *mode_flags])
    swarm.add_node("helper", memory="100MB", out=True)
    owner_flags = flags(rounds=ROUNDS, local_steps=STEPS, lr=LR, batch_size=BATCH)
    swarm.add_node("owner", memory="4MB", data=data, out=True, extra=[*owner_flags, *mode_flags])

    summary = wait_until(
        lambda: (swarm.summary("owner") or {}).get("finished") and swarm.summary("owner"),
        150,
        what="the owner to finish",
    )
    assert swarm.wait_exit("owner", 60) == 0, swarm.nodes["owner"].log_tail(40)
    assert swarm.wait_exit("helper", 60) == 0, swarm.nodes["helper"].log_tail(40)
    assert summary["role"] == "owner" and summary["helper"] is not None, summary
    return data, summary, swarm.summary("helper")


def assert_folds_match_reference(swarm: Swarm, data: Path, summary: dict, mode: str) -> list[tuple[PatchRecord, Patch]]:
    """The owner folded ROUNDS patches, each equal (within 1e-4) to `reference_patches` from its
    split and ranks, with at least one module on the helper's side; (folded, reference) pairs."""
    split, ranks = summary["split"], summary["ranks"]
    assert 1 <= split < 4
    ckpt = load_checkpoint(swarm.out_dir("owner"))
    assert ckpt.base.version == ROUNDS
    expected = reference_patches(data, summary["node_id"], split, {k: int(v) for k, v in ranks.items()}, mode=mode)
    for record, ref in zip(ckpt.base.records, expected):
        assert set(record.patch.modules) == set(ref.modules)
        assert [m for m in ref.modules if int(m.split(".")[2]) >= split], "the helper trained no module"
        for name, sf in ref.modules.items():
            torch.testing.assert_close(record.patch.modules[name].dense(), sf.dense(), atol=1e-4, rtol=0)
        for name, d in ref.dense.items():
            torch.testing.assert_close(record.patch.dense[name], d, atol=1e-4, rtol=0)
    return list(zip(ckpt.base.records, expected))
