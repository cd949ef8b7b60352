"""A fingerprint computed across a cut (owner blocks[:s] + probe, helper the rest of the
original base) equals the whole-model fingerprint, in both split modes, and leaves both
models as they were."""

import copy

import numpy as np
import pytest
import torch

from atlas_p2p.data import load_for_task
from atlas_p2p.synthetic import write_synthetic_jsonl
from atlas_p2p.training import node_fingerprint, probe
from nodes.fingerprinting import split_loss
from nodes.modelname import build_model, build_tokenizer
from transport.codec import decode, encode
from transport.messages import Backward, Envelope, Hidden


def _helper(base):
    """What a provisional helper does with a `probe` (the same functions nodes/helper.py calls),
    each body sent through the real codec both ways."""

    def wire(body):
        return decode(encode(Envelope(type=type(body).TYPE, id=1, src="t", body=body))).body

    def call(body):
        b = wire(body)
        if b.labels is not None:
            grad, loss, head = probe.probe_grad(base, b.split, b.activations, b.attention_mask, b.labels)
            heads = {n: g.numpy() for n, g in head.items()}
            return wire(Backward(step=0, grad=grad.numpy(), loss=loss, head_grads=heads))
        if b.hidden_grad is None:
            return wire(
                Hidden(step=0, hidden=probe.probe_hidden(base, b.split, b.activations, b.attention_mask).numpy())
            )
        return wire(
            Backward(
                step=0, grad=probe.probe_vjp(base, b.split, b.activations, b.attention_mask, b.hidden_grad).numpy()
            )
        )

    return call


@pytest.mark.parametrize(
    "model_name, task, labels, probe",
    [
        ("tiny-gpt2", "seq_cls", 4, "lora"),
        ("tiny-gpt2", "seq_cls", 4, "head"),
        ("tiny-bert", "seq_cls", 4, "lora"),
        ("tiny-bert", "seq_cls", 4, "head"),
        ("tiny-gpt2", "causal_lm", None, "lora"),
        ("tiny-gpt2", "causal_lm", None, "head"),  # the owner runs its own head on the helper's z
    ],
)
@pytest.mark.parametrize("mode", ["two-part", "u-shape"])
def test_fingerprint_across_a_cut_equals_the_whole_model(tmp_path, model_name, task, labels, probe, mode):
    tok = build_tokenizer(model_name)
    data = write_synthetic_jsonl(tmp_path / "d.jsonl", 1, 40, seed=3, kind="classification" if labels else "lm")
    encoded = load_for_task(data, tok, task, labels, 24)
    owner_base, helper_base = build_model(model_name, task, labels), build_model(model_name, task, labels)
    before = copy.deepcopy(helper_base.state_dict())
    flags = [p.requires_grad for p in helper_base.parameters()]

    whole = node_fingerprint(
        build_model(model_name, task, labels), encoded, seed=4, samples=24, micro_batch=8, probe=probe
    )
    for split in (1, 3):
        across = node_fingerprint(
            owner_base,
            encoded,
            seed=4,
            samples=24,
            micro_batch=8,
            loss_fn=split_loss(split, mode, _helper(helper_base), owner_id=7),
            probe=probe,
        )
        assert np.allclose(across, whole, atol=1e-5), (split, np.abs(across - whole).max())
    after = helper_base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in helper_base.parameters())
    assert [p.requires_grad for p in helper_base.parameters()] == flags


def test_a_helper_s_head_gradients_are_checked_against_the_owner_s_head(tmp_path):
    tok = build_tokenizer("tiny-gpt2")
    data = write_synthetic_jsonl(tmp_path / "d.jsonl", 1, 40, seed=3, kind="classification")
    encoded = load_for_task(data, tok, "seq_cls", 4, 24)
    owner_base, helper_base = build_model("tiny-gpt2", "seq_cls", 4), build_model("tiny-gpt2", "seq_cls", 4)
    honest = _helper(helper_base)

    def renamed(body):
        reply = honest(body)
        return Backward(
            step=0, grad=reply.grad, loss=reply.loss, head_grads={"other.weight": reply.head_grads["score.weight"]}
        )

    def reshaped(body):
        reply = honest(body)
        return Backward(
            step=0,
            grad=reply.grad,
            loss=reply.loss,
            head_grads={"score.weight": reply.head_grads["score.weight"][:, :3]},
        )

    for call, match in ((renamed, "head gradients name"), (reshaped, "head gradient score.weight")):
        with pytest.raises(ValueError, match=match):
            loss_fn = split_loss(2, "two-part", call, owner_id=7)
            node_fingerprint(owner_base, encoded, 4, 24, 8, loss_fn=loss_fn, probe="head")
    assert all(p.grad is None for p in owner_base.parameters())


def test_a_probe_with_a_bad_split_or_shape_is_refused_and_changes_nothing():
    base = build_model("tiny-gpt2", "seq_cls", 4)
    acts, mask, y = np.zeros((2, 5, 64), np.float32), np.ones((2, 5), np.int64), np.zeros(2, np.int64)
    for split in (0, 4, True):
        with pytest.raises(ValueError, match="split"):
            probe.probe_grad(base, split, acts, mask, y)
    with pytest.raises(ValueError, match="activations"):
        probe.probe_grad(base, 2, np.zeros((2, 5, 63), np.float32), mask, y)
    with pytest.raises(ValueError, match="hidden_grad"):
        probe.probe_vjp(base, 2, acts, mask, np.zeros((2, 4, 64), np.float32))
    assert all(p.grad is None for p in base.parameters())
