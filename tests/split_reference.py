"""The cross-process split tests (two-part and u-shape): their real-process run and its
in-process reference.

The run: a bootstrap, a pure helper and one owner too small for the whole model train
ROUNDS rounds of STEPS steps as `atlas-node` processes. The reference: the same rounds with
OwnerSession + HelperSession in one process, folding each round's patch, from the same base,
seeds, ranks and batches the runtime uses; the processes must fold the same patches within
1e-4. With bfloat16 on the wire the reference rounds what crosses the cut the same way
(nodes.wireconv), so it still must agree.
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
from nodes.wireconv import tensor_from_wire, tensor_to_wire
from scenarios.swarm import Swarm
from scenarios.waiting import wait_until
from tests.process_swarm import bootstrap_flags, flags

SEED, LR, STEPS, ROUNDS, BATCH = 1234, 0.01, 3, 2, 4


def _wire(bf16: bool):
    """What a tensor becomes crossing the cut: itself, or rounded to bfloat16 and widened back."""
    return lambda t: torch.as_tensor(tensor_from_wire(tensor_to_wire(t, bf16)))


def _two_part_step(owner, helper, node_id, f, wire):
    x = wire(f.activations)
    out = helper.step(node_id, f.round, f.step, x, f.attention_mask, f.labels, base_version=owner.version)
    owner.backward(wire(out.grad), out.loss)


def _u_shape_step(owner, helper, node_id, f, wire):
    assert f.labels is None, "u-shape: labels must not leave the owner"
    x = wire(f.activations)
    hidden = helper.u_forward(node_id, f.round, f.step, x, f.attention_mask, base_version=owner.version)
    _, g = owner.finish(wire(hidden))
    owner.backward(wire(helper.u_backward(node_id, f.round, f.step, wire(g), base_version=owner.version)))


_EXCHANGE = {"two-part": _two_part_step, "u-shape": _u_shape_step}


def reference_patches(data, node_id, split, ranks, mode="two-part", bf16=False, sizes=None):
    """The patches of ROUNDS rounds of `mode` split training done in this process (`sizes`, a
    list: gets the element count of each step's activations)."""
    encoded = load_for_task(data, build_tokenizer("tiny-gpt2"), "seq_cls", 4, 32)
    owner = OwnerSession(
        attach_lora(build_model("tiny-gpt2", "seq_cls", 4), ranks),
        OwnerConfig(node_id=node_id, split=split, lr=LR, run_seed=SEED, cluster="0", mode=mode),
    )
    helper = HelperSession(build_model("tiny-gpt2", "seq_cls", 4), HelperConfig(cluster="0"))
    exchange, wire = _EXCHANGE[mode], _wire(bf16)
    owner.start_round(0)
    patches = []
    for r in range(ROUNDS):
        helper.begin(node_id, r, split, ranks, owner.seed, lr=LR, mode=mode)
        for batch in round_batches(encoded, BATCH, 0, r, STEPS):
            f = owner.forward(batch)
            if sizes is not None:
                sizes.append(f.activations.numel())
            exchange(owner, helper, node_id, f, wire)
        back = helper.return_adapter(node_id, r)
        patch = stack_merge([owner.contribution(None, back.factors, back.dense)])
        owner.fold(patch)
        helper.fold(patch)
        patches.append(patch)
    return patches


def train_in_processes(
    swarm: Swarm, mode_flags: list[str], owner_only: tuple[str, ...] = ()
) -> tuple[Path, dict, dict]:
    """Run the split swarm with `mode_flags` added to the bootstrap's and the owner's flags
    (`owner_only` to the owner's) until
    the owner has finished and both nodes have exited 0; (owner's data, owner's summary,
    helper's summary)."""
    data = write_synthetic_jsonl(swarm.workdir / "t0.jsonl", 0, 48, seed=3)
    swarm.start_bootstrap(extra=[*bootstrap_flags(min_nodes=1, clusters=1, seed=SEED), *mode_flags])
    swarm.add_node("helper", memory="100MB", out=True)
    owner_flags = flags(rounds=ROUNDS, local_steps=STEPS, lr=LR, batch_size=BATCH)
    swarm.add_node("owner", memory="4MB", data=data, out=True, extra=[*owner_flags, *mode_flags, *owner_only])

    summary = wait_until(
        lambda: (swarm.summary("owner") or {}).get("finished") and swarm.summary("owner"),
        150,
        what="the owner to finish",
    )
    assert swarm.wait_exit("owner", 60) == 0, swarm.nodes["owner"].log_tail(40)
    assert swarm.wait_exit("helper", 60) == 0, swarm.nodes["helper"].log_tail(40)
    assert summary["role"] == "owner" and summary["helper"] is not None, summary
    return data, summary, swarm.summary("helper")


def assert_folds_match_reference(
    swarm: Swarm, data: Path, summary: dict, mode: str, bf16: bool = False, sizes: list | None = None
) -> list[tuple[PatchRecord, Patch]]:
    """The owner folded ROUNDS patches, each equal (within 1e-4) to `reference_patches` from its
    split and ranks, with at least one module on the helper's side; (folded, reference) pairs."""
    split, ranks = summary["split"], summary["ranks"]
    assert 1 <= split < 4
    ckpt = load_checkpoint(swarm.out_dir("owner"))
    assert ckpt.base.version == ROUNDS
    ranks = {k: int(v) for k, v in ranks.items()}
    expected = reference_patches(data, summary["node_id"], split, ranks, mode=mode, bf16=bf16, sizes=sizes)
    for record, ref in zip(ckpt.base.records, expected):
        assert set(record.patch.modules) == set(ref.modules)
        assert [m for m in ref.modules if int(m.split(".")[2]) >= split], "the helper trained no module"
        for name, sf in ref.modules.items():
            torch.testing.assert_close(record.patch.modules[name].dense(), sf.dense(), atol=1e-4, rtol=0)
        for name, d in ref.dense.items():
            torch.testing.assert_close(record.patch.dense[name], d, atol=1e-4, rtol=0)
    return list(zip(ckpt.base.records, expected))
