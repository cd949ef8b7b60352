"""One frozen base per process (atlas_p2p.models.sharing, nodes.modelname.shared_model): node
copies view the original's weights, a fold writes into a private copy only, and a node on the
shared base trains, folds and names its base exactly as a node with its own model does."""

import asyncio

import pytest
import torch

from atlas_p2p.aggregation import stack_merge
from atlas_p2p.lora import attach_lora, base_weight, get_factors, lora_targets
from atlas_p2p.models import SEQ_CLS, num_layers, unsplit_forward
from atlas_p2p.models.sharing import copy_model, is_shared, own_, shared_tensors
from atlas_p2p.records import Summary, lost_updates
from atlas_p2p.synthetic import write_synthetic_jsonl
from atlas_p2p.training import OwnerConfig, OwnerSession, apply_to_model
from nodes.config import SwarmSpec
from nodes.modelname import base_identity, build_model, drop_shared_models, shared_model
from scenarios.inprocess import InProcessSwarm
from tests.tiny_batches import padded_batches

MODEL, LABELS = "tiny-gpt2", 4


@pytest.fixture(autouse=True)
def fresh_cache():
    drop_shared_models()
    yield
    drop_shared_models()


def _weights(model):
    return dict(model.named_parameters())


def _session(base, node_id, seed=0):
    """A whole-model owner session on a copy of `base`, as a node builds one (nodes.peer)."""
    ranks = {n: 4 for n in lora_targets(base, kinds=("attn",))}
    model = attach_lora(copy_model(base), ranks)
    session = OwnerSession(model, OwnerConfig(node_id=node_id, split=num_layers(base), lr=1e-2, run_seed=seed))
    session.start_round(0)
    return session


def _batches(n=2, seed=1):
    vocab = build_model(MODEL, SEQ_CLS, LABELS).config.vocab_size
    return padded_batches(SEQ_CLS, n, rows=2, length=6, vocab=vocab, num_labels=LABELS, seed=seed)


def _round(session, batches):
    for batch in batches:
        session.local_step(batch)
    return session.contribution(n_samples=4)


def test_two_nodes_view_the_same_frozen_weights():
    a, b = shared_model(MODEL, SEQ_CLS, LABELS), shared_model(MODEL, SEQ_CLS, LABELS)

    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name] is not wb[name]  # own Parameter objects: own flags and grads
        assert wa[name].data_ptr() == wb[name].data_ptr(), name
        assert is_shared(wa[name])
    assert shared_tensors(a) == len(list(a.parameters())) + len(list(a.buffers()))


def test_a_copy_without_a_shared_base_is_a_deep_copy():
    private = build_model(MODEL, SEQ_CLS, LABELS)

    copied = copy_model(private)

    for name, p in _weights(copied).items():
        assert p.data_ptr() != _weights(private)[name].data_ptr()
        assert torch.equal(p, _weights(private)[name])
    assert shared_tensors(copied) == 0


def test_a_fold_changes_one_node_only_and_leaves_the_untouched_weights_shared():
    a, b = shared_model(MODEL, SEQ_CLS, LABELS), shared_model(MODEL, SEQ_CLS, LABELS)
    original = build_model(MODEL, SEQ_CLS, LABELS)
    session = _session(a, node_id=1)
    patch = stack_merge([_round(session, _batches())])
    module = sorted(patch.modules)[0]
    head = sorted(patch.dense)[0]
    before = base_weight(b, module)

    session.fold(patch)

    assert not torch.allclose(base_weight(session.model, module), before)
    assert torch.equal(base_weight(b, module), before)
    assert torch.equal(base_weight(a, module), before)
    assert torch.equal(base_weight(shared_model(MODEL, SEQ_CLS, LABELS), module), before)  # the original
    assert torch.equal(base_weight(original, module), before)
    assert not is_shared(session.model.get_submodule(f"base_model.model.{module}").base_layer.weight)
    assert torch.equal(_weights(b)[head], _weights(original)[head])  # the head base was copied, then changed
    embedding = "transformer.wte.weight"
    assert dict(session.model.named_parameters())[f"base_model.model.{embedding}"].data_ptr() == (
        _weights(b)[embedding].data_ptr()
    )


def test_a_fold_on_the_shared_base_equals_a_fold_on_a_private_model():
    shared, private = (
        _session(shared_model(MODEL, SEQ_CLS, LABELS), 1),
        _session(build_model(MODEL, SEQ_CLS, LABELS), 1),
    )
    patch = stack_merge([_round(shared, _batches())])
    _round(private, _batches())

    shared.fold(patch)
    private.fold(patch)

    for (name, p), q in zip(shared.model.named_parameters(), private.model.parameters()):
        assert torch.equal(p, q), name


def test_each_node_trains_its_own_adapters():
    base = shared_model(MODEL, SEQ_CLS, LABELS)
    first, second = _session(copy_model(base), 1), _session(shared_model(MODEL, SEQ_CLS, LABELS), 2)
    alone = _session(build_model(MODEL, SEQ_CLS, LABELS), 2)
    start = get_factors(second.model)

    _round(first, _batches(seed=3))

    assert all(torch.equal(f.B, start[m].B) for m, f in get_factors(second.model).items())
    _round(second, _batches(seed=4))
    _round(alone, _batches(seed=4))
    for m, f in get_factors(second.model).items():
        assert torch.equal(f.A, get_factors(alone.model)[m].A) and torch.equal(f.B, get_factors(alone.model)[m].B)
    assert all(torch.equal(p, q) for p, q in zip(base.parameters(), build_model(MODEL, SEQ_CLS, LABELS).parameters()))


def test_a_write_into_a_copy_does_not_void_another_copys_saved_activations():
    a, b = shared_model(MODEL, SEQ_CLS, LABELS), shared_model(MODEL, SEQ_CLS, LABELS)
    weight = a.score.weight
    x = torch.randn(3, weight.shape[1], requires_grad=True)
    out = (x @ weight.t()).sum()  # autograd keeps `weight` for the gradient of x

    own_(b.score.weight)
    with torch.no_grad():
        b.score.weight.add_(1.0)
    out.backward()

    assert torch.equal(x.grad, weight.sum(0).expand_as(x))
    assert torch.equal(b.score.weight, weight + 1.0)


def test_tied_weights_stay_tied_in_a_copy():
    model = shared_model(MODEL, "causal_lm", None)

    assert model.lm_head.weight is model.transformer.wte.weight


def test_the_base_identity_is_the_private_models():
    shared = base_identity(shared_model(MODEL, SEQ_CLS, LABELS), MODEL)

    assert shared == base_identity(build_model(MODEL, SEQ_CLS, LABELS), MODEL)


async def _shared_swarm(tmp_path):
    spec = SwarmSpec(task="seq_cls", num_labels=LABELS, min_nodes=2, clusters=1, assign_after_s=60)
    async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=5) as swarm:
        nodes = {"strong": (30, 0), "weak": (4, 0), "helper": (100, None)}  # MB, task
        for seed, (name, (memory_mb, task)) in enumerate(nodes.items()):
            data = None if task is None else write_synthetic_jsonl(tmp_path / f"{name}.jsonl", task, 32, seed=seed)
            swarm.add(name, memory_mb * 10**6, data=data, rounds=2, local_steps=2, lr=0.01, shared_base=True)
        summaries = await swarm.run(timeout=120)
        return summaries, swarm.peers


def test_an_in_process_swarm_on_the_shared_base_trains_to_the_end(tmp_path):
    summaries, peers = asyncio.run(_shared_swarm(tmp_path))

    assert all(s["finished"] for s in summaries.values()), summaries
    assert summaries["weak"]["role"] == "owner" and summaries["weak"]["rounds_done"] == 2
    assert lost_updates(Summary.from_json(s) for s in summaries.values()) == []
    private = base_identity(build_model(MODEL, SEQ_CLS, LABELS), MODEL)["digest"]
    assert {s["base_digest"] for s in summaries.values()} == {private}
    strong, weak = peers["strong"], peers["weak"]
    embedding = "transformer.wte.weight"
    assert _weights(strong.base_model)[embedding].data_ptr() == _weights(weak.base_model)[embedding].data_ptr()
    assert all(is_shared(p) for p in strong.base_model.parameters())  # folds went into the sessions' copies
    reference = build_model(MODEL, SEQ_CLS, LABELS)  # a private model with every patch folded
    apply_to_model(reference, weak.session.base.folded_delta())
    batch = _batches(1, seed=9)[0]
    weak.session.model.eval(), reference.eval()
    with torch.no_grad():  # the next round's adapters are fresh (B = 0): the model is its base
        folded = unsplit_forward(weak.session.model, batch["input_ids"], batch["attention_mask"])[1]
        expected = unsplit_forward(reference, batch["input_ids"], batch["attention_mask"])[1]
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=0)
