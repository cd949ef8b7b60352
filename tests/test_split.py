"""Split forward/backward equals the unsplit model, for every family and several split points.

The backward runs exactly as the network exchange does: the receiving side marks the incoming
activations ``requires_grad_()``, computes its loss and backward; the sending side then calls
``backward(grad)`` on what it sent.
"""

import pytest
import torch

from atlas_p2p.aggregation import AdapterFactors
from atlas_p2p.lora import attach_lora, get_factors, lora_targets, set_factors
from atlas_p2p.models import (
    CAUSAL_LM,
    SEQ_CLS,
    HelperPart,
    MiddlePart,
    OwnerPart,
    UShapeHead,
    causal_lm_labels,
    num_layers,
    split_model,
    tiny_model,
    unsplit_forward,
)

VOCAB, LAYERS, HIDDEN, HEADS = 64, 4, 32, 4
CASES = [
    ("gpt2", CAUSAL_LM),
    ("llama", CAUSAL_LM),
    ("qwen2", CAUSAL_LM),
    ("mistral", CAUSAL_LM),
    ("gpt2", SEQ_CLS),
    ("llama", SEQ_CLS),
    ("bert", SEQ_CLS),
]
SPLITS = [0, 1, 3, LAYERS]
TOL = 1e-5


def _peft_model(family, task, seed=0):
    """A tiny model with heterogeneous LoRA ranks (some 0) and non-zero B, so every LoRA grad is alive."""
    model = tiny_model(
        family,
        task,
        VOCAB,
        num_labels=3 if task == SEQ_CLS else None,
        num_layers=LAYERS,
        hidden=HIDDEN,
        heads=HEADS,
        seed=seed,
    )
    names = lora_targets(model, kinds=("attn", "mlp"))
    ranks = {n: (0, 2, 4, 8)[i % 4] for i, n in enumerate(names)}
    peft_model = attach_lora(model, ranks, alpha=16.0, seed=seed + 1)
    gen = torch.Generator().manual_seed(seed + 2)
    set_factors(
        peft_model,
        {
            n: AdapterFactors(f.A, 0.1 * torch.randn(f.B.shape, generator=gen), f.scaling)
            for n, f in get_factors(peft_model).items()
        },
    )
    return peft_model


def _batch(task, padding_side="mixed"):
    """3 rows: left-padded, right-padded, full; row 2 has a 3-token prompt masked out of the loss."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(3, VOCAB, (3, 8), generator=gen)
    mask = torch.ones(3, 8, dtype=torch.long)
    if padding_side in ("mixed", "left"):
        mask[0, :3] = 0
    if padding_side in ("mixed", "right"):
        mask[1, 5:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    if task == SEQ_CLS:
        return ids, mask, torch.tensor([0, 2, 1]), None
    loss_mask = torch.ones_like(mask)
    loss_mask[2, :3] = 0
    return ids, mask, causal_lm_labels(ids, mask), loss_mask


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _unsplit(model, ids, mask, labels, loss_mask):
    model.zero_grad(set_to_none=True)
    loss, logits = unsplit_forward(model, ids, mask, labels, loss_mask)
    loss.backward()
    return loss.detach(), logits.detach(), _grads(model)


def _assert_same_grads(ref, got):
    assert ref.keys() == got.keys()
    for name in ref:
        assert torch.allclose(ref[name], got[name], atol=TOL, rtol=1e-4), name


@pytest.mark.parametrize("family,task", CASES)
@pytest.mark.parametrize("s", SPLITS)
def test_two_part_split_equals_unsplit_forward_and_backward(family, task, s):
    model = _peft_model(family, task)
    ids, mask, labels, loss_mask = _batch(task)
    ref_loss, ref_logits, ref_grads = _unsplit(model, ids, mask, labels, loss_mask)

    owner, helper = split_model(model, s)
    model.zero_grad(set_to_none=True)
    sent = owner(ids, mask)  # (B, T, H): what goes on the wire
    received = sent.detach().requires_grad_()
    loss, logits = helper(received, mask, labels, loss_mask)
    loss.backward()
    if s > 0:
        sent.backward(received.grad)  # the gradient the helper sends back

    assert abs(loss.item() - ref_loss.item()) <= TOL
    assert torch.allclose(logits, ref_logits, atol=TOL)
    grads = _grads(model)
    _assert_same_grads(ref_grads, grads)
    owner_lora = [n for n in grads if "lora_A" in n and any(f".{i}." in n for i in range(s))]
    assert (s == 0) == (not owner_lora)
    assert all(grads[n].abs().sum() > 0 for n in owner_lora)


@pytest.mark.parametrize("family,task", [("llama", CAUSAL_LM), ("gpt2", SEQ_CLS), ("bert", SEQ_CLS)])
@pytest.mark.parametrize("s,tail", [(0, 4), (1, 3), (2, 2), (1, 4)])
def test_u_shape_split_equals_unsplit(family, task, s, tail):
    model = _peft_model(family, task)
    ids, mask, labels, loss_mask = _batch(task)
    ref_loss, ref_logits, ref_grads = _unsplit(model, ids, mask, labels, loss_mask)

    front, middle, head = split_model(model, s, mode="u-shape", tail=tail)
    model.zero_grad(set_to_none=True)
    h1 = front(ids, mask)
    h1_in = h1.detach().requires_grad_()  # helper receives activations, never labels
    h2 = middle(h1_in, mask)
    h2_in = h2.detach().requires_grad_()  # owner tail receives the helper's output
    loss, logits = head(h2_in, mask, labels, loss_mask)
    loss.backward()
    h2.backward(h2_in.grad)
    if s > 0:
        h1.backward(h1_in.grad)

    assert isinstance(head, UShapeHead) and isinstance(middle, MiddlePart)
    assert abs(loss.item() - ref_loss.item()) <= TOL
    assert torch.allclose(logits, ref_logits, atol=TOL)
    _assert_same_grads(ref_grads, _grads(model))


@pytest.mark.parametrize("family,task", [("gpt2", CAUSAL_LM), ("llama", SEQ_CLS), ("bert", SEQ_CLS)])
def test_split_of_plain_model_equals_hf_forward(family, task):
    model = tiny_model(
        family, task, VOCAB, num_labels=3 if task == SEQ_CLS else None, num_layers=LAYERS, hidden=HIDDEN, heads=HEADS
    )
    ids, mask, labels, loss_mask = _batch(task)
    hf_kwargs = {} if family == "bert" else {"position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    hf_labels = labels if task == SEQ_CLS else labels.masked_fill(loss_mask == 0, -100)
    hf = model(input_ids=ids, attention_mask=mask, labels=hf_labels, **hf_kwargs)

    owner, helper = split_model(model, 2)
    loss, logits = helper(owner(ids, mask), mask, labels, loss_mask)

    assert abs(loss.item() - hf.loss.item()) <= TOL
    assert torch.allclose(logits, hf.logits, atol=TOL)


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_left_and_right_padding_give_the_same_loss(family):
    model = _peft_model(family, CAUSAL_LM)
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    lmask, rmask = (left != 0).long(), (right != 0).long()
    owner, helper = split_model(model, 2)

    l_loss, _ = helper(owner(left, lmask), lmask, causal_lm_labels(left, lmask))
    r_loss, _ = helper(owner(right, rmask), rmask, causal_lm_labels(right, rmask))

    assert abs(l_loss.item() - r_loss.item()) <= TOL


def test_one_sgd_step_through_the_split_equals_an_unsplit_step():
    split_model_, whole = _peft_model("llama", CAUSAL_LM), _peft_model("llama", CAUSAL_LM)
    ids, mask, labels, loss_mask = _batch(CAUSAL_LM)
    owner, helper = split_model(split_model_, 2)
    opt_o = torch.optim.SGD([p for p in owner.parameters() if p.requires_grad], lr=0.5)
    opt_h = torch.optim.SGD([p for p in helper.parameters() if p.requires_grad], lr=0.5)
    opt_w = torch.optim.SGD([p for p in whole.parameters() if p.requires_grad], lr=0.5)

    sent = owner(ids, mask)
    received = sent.detach().requires_grad_()
    helper(received, mask, labels, loss_mask)[0].backward()
    sent.backward(received.grad)
    opt_h.step()
    opt_o.step()
    unsplit_forward(whole, ids, mask, labels, loss_mask)[0].backward()
    opt_w.step()

    after_split, after_whole = get_factors(split_model_), get_factors(whole)
    for name in after_whole:
        assert torch.allclose(after_split[name].A, after_whole[name].A, atol=TOL)
        assert torch.allclose(after_split[name].B, after_whole[name].B, atol=TOL)
    fresh = get_factors(_peft_model("llama", CAUSAL_LM))
    assert any(not torch.equal(after_whole[n].A, fresh[n].A) for n in after_whole)  # the step did move A


def test_parts_share_the_models_modules_and_cover_its_trainables():
    model = _peft_model("gpt2", SEQ_CLS)
    owner, helper = split_model(model, 2)
    ids = {id(p) for p in model.parameters()}
    owner_ps, helper_ps = list(owner.parameters()), list(helper.parameters())

    assert all(id(p) in ids for p in owner_ps + helper_ps)  # no copies
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    covered = {id(p) for p in owner_ps + helper_ps if p.requires_grad}
    assert covered == trainable
    assert not ({id(p) for p in owner_ps if p.requires_grad} & {id(p) for p in helper_ps if p.requires_grad})
    assert owner.blocks[0] is model.base_model.model.transformer.h[0]
    assert isinstance(owner, OwnerPart) and isinstance(helper, HelperPart)


def test_helper_without_labels_returns_logits_only():
    model = _peft_model("llama", CAUSAL_LM)
    ids, mask, _, _ = _batch(CAUSAL_LM)
    owner, helper = split_model(model, 1)

    loss, logits = helper(owner(ids, mask), mask)

    assert loss is None and logits.shape == (3, 8, VOCAB)


@pytest.mark.parametrize("s", [-1, LAYERS + 1, 1.5, True])
def test_split_point_outside_range_is_rejected(s):
    model = tiny_model("gpt2", CAUSAL_LM, VOCAB, num_layers=LAYERS, hidden=HIDDEN, heads=HEADS)
    with pytest.raises(ValueError, match="split point"):
        split_model(model, s)


def test_bad_mode_and_tail_are_rejected():
    model = tiny_model("gpt2", CAUSAL_LM, VOCAB, num_layers=LAYERS, hidden=HIDDEN, heads=HEADS)
    with pytest.raises(ValueError, match="mode"):
        split_model(model, 1, mode="three-part")
    with pytest.raises(ValueError, match="tail"):
        split_model(model, 3, mode="u-shape", tail=2)
    with pytest.raises(ValueError, match="tail"):
        split_model(model, 1, tail=3)


def _bad_helper_inputs():
    good_h, good_m = torch.zeros(2, 5, HIDDEN), torch.ones(2, 5, dtype=torch.long)
    return [
        ("hidden", torch.zeros(2, 5, HIDDEN + 1), good_m, None),
        ("hidden", torch.zeros(2, 5), good_m, None),
        ("hidden", torch.zeros(2, 5, HIDDEN, dtype=torch.float64), good_m, None),
        ("hidden", torch.full((2, 5, HIDDEN), float("nan")), good_m, None),
        ("hidden", [[0.0]], good_m, None),
        ("attention_mask", good_h, torch.ones(2, 6, dtype=torch.long), None),
        ("attention_mask", good_h, torch.full((2, 5), 2), None),
        ("attention_mask", good_h, torch.ones(2, 5), None),
        ("labels", good_h, good_m, torch.full((2, 5), VOCAB)),
        ("labels", good_h, good_m, torch.zeros(2, 4, dtype=torch.long)),
        ("labels", good_h, good_m, "tokens"),
        ("labels", good_h, good_m, torch.zeros(2, 5)),
        ("hidden", torch.zeros(2, 0, HIDDEN), torch.ones(2, 0, dtype=torch.long), None),
    ]


@pytest.mark.parametrize("field,hidden,mask,labels", _bad_helper_inputs())
def test_helper_rejects_bad_peer_input_with_a_clear_error(field, hidden, mask, labels):
    model = _peft_model("llama", CAUSAL_LM)
    _, helper = split_model(model, 2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    with pytest.raises(ValueError, match=field):
        helper(hidden, mask, labels)

    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize(
    "ids,mask,field",
    [
        (torch.zeros(2, 5), None, "input_ids"),
        (torch.full((2, 5), VOCAB), None, "input_ids"),
        (torch.zeros(5, dtype=torch.long), None, "input_ids"),
        (torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long), "attention_mask"),
        (torch.zeros(2, 0, dtype=torch.long), None, "input_ids"),
        (torch.zeros(2, 65, dtype=torch.long), None, "exceeds"),
    ],
)
def test_owner_rejects_bad_input(ids, mask, field):
    model = tiny_model("gpt2", CAUSAL_LM, VOCAB, num_layers=2, hidden=HIDDEN, heads=HEADS, max_positions=64)
    owner, _ = split_model(model, 1)
    with pytest.raises(ValueError, match=field):
        owner(ids, mask)


def test_seq_cls_helper_rejects_out_of_range_class():
    model = _peft_model("bert", SEQ_CLS)
    owner, helper = split_model(model, 1)
    ids, mask, _, _ = _batch(SEQ_CLS)
    with pytest.raises(ValueError, match="labels"):
        helper(owner(ids, mask), mask, torch.tensor([0, 1, 3]))


def test_num_layers_matches_the_block_list():
    assert num_layers(_peft_model("qwen2", CAUSAL_LM)) == LAYERS
