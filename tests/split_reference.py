"""The in-process reference for the cross-process split tests (two-part and u-shape).

ROUNDS rounds of STEPS steps with OwnerSession + HelperSession in one process, folding
each round's patch, from the same base, seeds, ranks and batches the runtime uses; the
real-process runs must fold the same patches within 1e-4.
"""

from __future__ import annotations

from atlas_p2p.aggregation import stack_merge
from atlas_p2p.data import load_for_task, round_batches
from atlas_p2p.lora import attach_lora
from atlas_p2p.training import HelperConfig, HelperSession, OwnerConfig, OwnerSession
from nodes.modelname import build_model, build_tokenizer

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
