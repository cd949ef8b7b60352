"""Pure pieces of the node runtime: task field isolation, merge bookkeeping, checkpoints, wire forms."""

import numpy as np
import pytest
import torch

from atlas_p2p.aggregation import AdapterFactors, Contribution, stack_merge
from atlas_p2p.data import TaskMismatch, load_for_task, round_batches
from atlas_p2p.records import CheckpointState, bytes_by_kind
from atlas_p2p.synthetic import SyntheticTasks
from atlas_p2p.training import node_fingerprint
from atlas_p2p.versioning import VersionedBase
from nodes.checkpoint import load_checkpoint, save_checkpoint
from nodes.config import SwarmSpec, TrainConfig
from nodes.merge import AnchorLog, GossipStore, merge_contributions, merge_manifest
from nodes.modelname import build_model, build_tokenizer
from nodes.wireconv import (
    contribution_from_msg,
    contribution_to_msg,
    is_bf16,
    records_from_msg,
    records_to_msg,
    tensor_from_wire,
    tensor_to_wire,
)
from transport.codec import encode
from transport.messages import Backward, Envelope, Fingerprint


def _contribution(node, round_=0, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    f = AdapterFactors(torch.randn(2, 8, generator=g), torch.randn(6, 2, generator=g), 0.5)
    return Contribution({"m": f}, n, str(node), round_)


# ---- (d) the task field never reaches training or the bootstrap --------------------------
def test_task_field_changes_neither_batches_nor_fingerprint(tmp_path):
    records = SyntheticTasks().generate(0, 40, seed=3)
    paths = []
    for name, shift in (("a", 0), ("b", 7)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(__import__("json").dumps({**r, "task": r["task"] + shift}) + "\n" for r in records))
        paths.append(path)
    tok, model = build_tokenizer("tiny-gpt2"), build_model("tiny-gpt2", "seq_cls", 4)
    encoded = [load_for_task(p, tok, "seq_cls", 4, 32) for p in paths]
    assert encoded[0] == encoded[1]
    a, b = (node_fingerprint(model, e, seed=9, samples=32, micro_batch=8) for e in encoded)
    assert np.array_equal(a, b)
    for x, y in zip(round_batches(encoded[0], 4, 0, 1, 3), round_batches(encoded[1], 4, 0, 1, 3)):
        assert all(torch.equal(x[k], y[k]) for k in x)
    # what reaches the bootstrap: no task; leakage is measured on the same encoded examples
    assert set(Fingerprint.SCHEMA) == {"node_id", "vector", "n_samples", "importance", "leakage", "dp"}


def test_data_of_the_wrong_kind_is_a_clear_error(tmp_path):
    path = tmp_path / "lm.jsonl"
    path.write_text('{"text": "alpha beta"}\n')
    with pytest.raises(TaskMismatch, match="lm records do not fit the swarm's task seq_cls"):
        load_for_task(path, build_tokenizer("tiny-gpt2"), "seq_cls", 4, 32)


# ---- merge bookkeeping -------------------------------------------------------------------
def test_anchor_publishes_when_all_expected_or_deadline_and_members_rebuild_the_same_patch():
    store, log = GossipStore(), AnchorLog(0, VersionedBase("0"))
    c1, c2 = _contribution(1, seed=1), _contribution(2, n=2, seed=2)
    assert store.add(0, c1, now=10.0) and not store.add(0, c1, now=11.0)
    held = store.of_round(0, 0)
    assert not log.due(held, {"1", "2"}, store.first_seen[(0, 0)], now=12.0, deadline_s=5.0)
    assert log.due(held, {"1", "2"}, store.first_seen[(0, 0)], now=15.0, deadline_s=5.0)  # straggler cut off
    store.add(0, c2, now=12.0)
    assert log.due(store.of_round(0, 0), {"1", "2"}, 10.0, now=12.0, deadline_s=5.0)
    info = log.publish(merge_contributions(list(store.of_round(0, 0).values())))
    assert info.version == 1 and log.next_round == 1
    msg = info.to_msg()
    patch = merge_manifest(msg, [c2, c1])  # any arrival order
    assert patch.digest == msg.patch_digest
    with pytest.raises(ValueError, match="do not match the manifest"):
        merge_manifest(msg, [c1])
    with pytest.raises(ValueError, match="contributions of round 0"):
        log.publish(merge_contributions([_contribution(3, round_=0)]))


# ---- checkpoints -------------------------------------------------------------------------
def test_checkpoint_round_trip_and_damage_is_refused(tmp_path):
    base = VersionedBase("3")
    base.apply(stack_merge([_contribution(1), _contribution(2, seed=5)]))
    pending = _contribution(1, round_=1, seed=9)
    state = CheckpointState(
        node_id=1,
        cluster=0,
        round=1,
        base_version=base.version,
        rounds_done=1,
        steps_total=4,
        contributions=(),
        manifests=(),
        repairs=(),
    )
    save_checkpoint(tmp_path, state, base, pending)
    save_checkpoint(tmp_path, state, base, pending)  # replaces atomically
    back = load_checkpoint(tmp_path)
    assert back.state == state and back.base.chain == base.chain and back.pending.digest == pending.digest
    (tmp_path / "checkpoint" / "base.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unusable"):
        load_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path / "nothing-here") is None


# ---- wire forms ----------------------------------------------------------------------------
def test_contributions_and_patches_survive_the_wire_and_tampering_is_caught():
    from transport.codec import decode, encode
    from transport.messages import Envelope

    c = _contribution(4, seed=3)
    body = decode(encode(Envelope.of(contribution_to_msg(c, cluster=0, sender=4), 1, "x"))).body
    assert contribution_from_msg(body).digest == c.digest
    forged = contribution_to_msg(_contribution(4, seed=8), cluster=0, sender=4)
    with pytest.raises(ValueError, match="does not match digest"):
        contribution_from_msg(type(forged)(**{**forged.to_dict(), "digest": c.digest}))
    missing = {k: v for k, v in body.tensors.items() if not k.startswith("B:")}
    with pytest.raises(ValueError, match="needs both A and B"):
        contribution_from_msg(type(body)(**{**body.to_dict(), "tensors": missing}))
    base = VersionedBase("0")
    base.apply(stack_merge([c]))
    msg = decode(encode(Envelope.of(records_to_msg(0, base.records), 2, "x"))).body
    again = VersionedBase("0")
    again.extend(records_from_msg(msg))
    assert again.chain == base.chain


def test_bytes_by_kind_sorts_the_rpc_counts_of_both_ends_into_kinds():
    client_sent, server_sent = {"fingerprint": 300, "heartbeat": 40, "forward": 1000}, {"backward": 900, "ok": 20}

    kinds = bytes_by_kind(client_sent, server_sent)

    assert kinds == {"activations": 1000, "gradients": 900, "adapters": 0, "fingerprints": 300, "control": 60}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "regression"}, "task"),
        ({"task": "seq_cls"}, "num_labels"),
        ({"min_nodes": 0}, "min_nodes"),
        ({"split_mode": "v"}, "split_mode"),
    ],
)
def test_swarm_spec_names_the_bad_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwarmSpec(**kwargs)


def test_train_config_names_the_bad_field(tmp_path):
    with pytest.raises(ValueError, match="local_steps"):
        TrainConfig(out_dir=tmp_path, local_steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(out_dir=tmp_path, lr=float("nan"))


def test_bfloat16_on_the_wire_halves_the_bytes_and_rounds_to_8_significant_bits():
    g = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(0))
    fp32, bf16 = tensor_to_wire(g), tensor_to_wire(g, bf16=True)
    assert not is_bf16(fp32) and is_bf16(bf16)
    sizes = [
        sum(memoryview(f).nbytes for f in encode(Envelope.of(Backward(step=0, grad=t), 1, "x"))) for t in (fp32, bf16)
    ]
    assert sizes[1] < 0.55 * sizes[0]
    back = torch.as_tensor(tensor_from_wire(bf16))
    assert back.dtype == torch.float32 and torch.all((back - g).abs() <= g.abs() * 2.0**-8)
    assert tensor_from_wire(fp32) is fp32  # float32 passes as it came
