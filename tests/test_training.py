"""Split training core: owner and helper sessions, rollback/replay, folding, export.

Every tensor that would cross the network goes through ``_wire``: raw bytes into a read-only
numpy array, as a ZeroMQ frame arrives. The reference for split training is written here
independently: the unsplit model (Hugging Face's own forward) with all LoRA ranks, one AdamW
over every trainable, the same round seed.
"""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel

from atlas_p2p.aggregation import (
    AdapterFactors,
    Contribution,
    Patch,
    StackedFactors,
    stack_merge,
    stacked_singular_values,
)
from atlas_p2p.lora import (
    attach_lora,
    base_weight,
    get_dense_trainables,
    get_factors,
    lora_targets,
    reset_adapters,
)
from atlas_p2p.models import CAUSAL_LM, SEQ_CLS, tiny_model, unsplit_forward
from atlas_p2p.training import (
    HelperConfig,
    HelperPool,
    HelperSession,
    OwnerConfig,
    OwnerSession,
    ReplayNeeded,
    RoundMismatchError,
    SessionStateError,
    StepOrderError,
    UnknownOwnerError,
    VersionMismatchError,
    carry_over,
    export_adapter,
    round_seed,
)
from atlas_p2p.versioning import DigestMismatchError, VersionedBase, VersionGapError
from tests.tiny_batches import padded_batches

VOCAB, LAYERS, HIDDEN, HEADS = 40, 3, 32, 4
LR, RUN_SEED, ALPHA = 1e-2, 5, 8.0
TOL = 1e-5


# ---- builders ------------------------------------------------------------------------------
def _model(family="llama", task=CAUSAL_LM, seed=0):
    return tiny_model(
        family,
        task,
        VOCAB,
        num_labels=3 if task == SEQ_CLS else None,
        num_layers=LAYERS,
        hidden=HIDDEN,
        heads=HEADS,
        seed=seed,
    )


def _ranks(family="llama", task=CAUSAL_LM, pattern=(2, 4, 0)):
    """Heterogeneous ranks over attention and MLP of every block (some modules get none)."""
    names = lora_targets(_model(family, task), kinds=("attn", "mlp"))
    return {n: pattern[i % len(pattern)] for i, n in enumerate(names)}


def _batches(task, n, seed=1):
    """n batches of 2 rows of 6 tokens, one left-padded, 3 classes."""
    return padded_batches(task, n, rows=2, length=6, vocab=VOCAB, num_labels=3, seed=seed)


def _wire(t):
    """A tensor after the network: raw bytes -> read-only numpy array of the same dtype/shape."""
    a = t.detach().cpu().numpy()
    return np.frombuffer(a.tobytes(), dtype=a.dtype).reshape(a.shape)


def _owner(family, task, split, mode="two-part", node_id=7, ranks=None, lr=LR):
    ranks = _ranks(family, task) if ranks is None else ranks
    model = attach_lora(_model(family, task), ranks, alpha=ALPHA)
    return OwnerSession(model, OwnerConfig(node_id=node_id, split=split, lr=lr, run_seed=RUN_SEED, mode=mode))


def _helper(family="llama", task=CAUSAL_LM):
    return HelperSession(_model(family, task), HelperConfig(lr=LR))


def _begun(task=CAUSAL_LM, mode="two-part", round=0):
    """A llama owner at split 1 that has started `round`, and a fresh helper begun on it with `_ranks`."""
    owner, helper = _owner("llama", task, 1, mode), _helper("llama", task)
    owner.start_round(round)
    _begin(helper, owner, _ranks("llama", task))
    return owner, helper


def _begin(helper, owner, ranks, lr=LR):
    helper.begin(
        owner.config.node_id,
        owner.round,
        owner.config.split,
        ranks,
        owner.seed,
        mode=owner.config.mode,
        lr=lr,
        alpha=ALPHA,
    )


def _exchange(owner, helper, batch):
    """One split step, every tensor through the wire."""
    oid = owner.config.node_id
    f = owner.forward(batch)
    if owner.config.mode == "two-part":
        r = helper.step(
            oid,
            f.round,
            f.step,
            _wire(f.activations),
            _wire(f.attention_mask),
            _wire(f.labels),
            base_version=owner.version,
        )
        owner.backward(_wire(r.grad), r.loss)
    else:
        hidden = helper.u_forward(
            oid, f.round, f.step, _wire(f.activations), _wire(f.attention_mask), base_version=owner.version
        )
        _, g = owner.finish(_wire(hidden))
        owner.backward(_wire(helper.u_backward(oid, f.round, f.step, _wire(g), base_version=owner.version)))


def _returned(helper, owner):
    """The helper's adapter_return, through the wire: factors as (A, B, scaling) arrays."""
    back = helper.return_adapter(owner.config.node_id, owner.round)
    factors = {m: (_wire(f.A), _wire(f.B), f.scaling) for m, f in back.factors.items()}
    return factors, {n: _wire(d) for n, d in back.dense.items()}


def _split_round(owner, helper, batches, ranks, n_samples=None):
    if owner.round < 0:
        owner.start_round(0)
    _begin(helper, owner, ranks)
    for b in batches:
        _exchange(owner, helper, b)
    factors, dense = _returned(helper, owner)
    return owner.contribution(n_samples, factors, dense)


def _undisturbed(batches, task=CAUSAL_LM, mode="two-part"):
    """The contribution of a round over `batches` that nothing interrupts: what a disturbed
    round by the owner of `_begun` must equal."""
    return _split_round(_owner("llama", task, 1, mode), _helper("llama", task), batches, _ranks("llama", task))


def _reference(family, task, ranks, batches, node_id=7, round=0):
    """The unsplit model trained N steps: one AdamW over all LoRA factors and the head copy."""
    model = attach_lora(_model(family, task), ranks, alpha=ALPHA)
    reset_adapters(model, round_seed(RUN_SEED, node_id, round))
    head0 = get_dense_trainables(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    for b in batches:
        loss, _ = unsplit_forward(model, b["input_ids"], b["attention_mask"], b["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
    head = {n: t - head0[n] for n, t in get_dense_trainables(model).items()}
    return get_factors(model), head


def _max_diff(contribution, factors, head):
    assert set(contribution.factors) == set(factors)
    assert set(contribution.dense) == set(head)
    diffs = [0.0]
    for m, f in factors.items():
        c = contribution.factors[m]
        assert c.scaling == pytest.approx(f.scaling)
        diffs += [(c.A - f.A).abs().max().item(), (c.B - f.B).abs().max().item()]
    diffs += [(contribution.dense[n] - d).abs().max().item() for n, d in head.items()]
    return max(diffs)


def _assert_trained(contribution, task):
    """Guard against a vacuous comparison: every B left zero, or a head that never moved."""
    assert max(f.B.abs().max().item() for f in contribution.factors.values()) > 1e-3
    if task == SEQ_CLS:
        assert max(d.abs().max().item() for d in contribution.dense.values()) > 1e-3


def _snapshot(helper, owner_id):
    slot_factors = get_factors(helper.model, helper.adapter_name(owner_id))
    heads = get_dense_trainables(helper.model, helper.adapter_name(owner_id))
    return slot_factors, heads, dict(helper.owners)


def _same_snapshot(a, b):
    fa, ha, oa = a
    fb, hb, ob = b
    assert oa == ob
    for m in fa:
        assert torch.equal(fa[m].A, fb[m].A) and torch.equal(fa[m].B, fb[m].B)
    for n in ha:
        assert torch.equal(ha[n], hb[n])


# ---- (a) split == unsplit ---------------------------------------------------------------------
FAMILY_TASKS = [("gpt2", CAUSAL_LM), ("llama", CAUSAL_LM), ("bert", SEQ_CLS), ("llama", SEQ_CLS)]


@pytest.mark.parametrize("mode", ["two-part", "u-shape"])
@pytest.mark.parametrize("split", [1, LAYERS - 1])
@pytest.mark.parametrize("family,task", FAMILY_TASKS)
def test_split_training_equals_unsplit_training(family, task, split, mode):
    ranks = _ranks(family, task)
    batches = _batches(task, 3)
    owner = _owner(family, task, split, mode)
    helper = _helper(family, task)

    contribution = _split_round(owner, helper, batches, ranks)

    factors, head = _reference(family, task, ranks, batches)
    assert _max_diff(contribution, factors, head) <= TOL
    assert contribution.n_samples == 6 and contribution.round == 0 and contribution.node_id == "7"
    _assert_trained(contribution, task)


@pytest.mark.parametrize("family,task", [("gpt2", CAUSAL_LM), ("llama", SEQ_CLS)])
def test_owner_alone_local_steps_equal_unsplit_training(family, task):
    ranks = _ranks(family, task)
    batches = _batches(task, 3)
    owner = _owner(family, task, LAYERS)
    owner.start_round(0)

    losses = [owner.local_step(b) for b in batches]
    contribution = owner.contribution()

    factors, head = _reference(family, task, ranks, batches)
    assert _max_diff(contribution, factors, head) <= TOL
    assert losses == owner.losses and all(np.isfinite(losses))
    _assert_trained(contribution, task)


def test_a_different_round_seed_gives_a_different_adapter():
    """The equality above is discriminating: another seed moves the factors well beyond TOL."""
    ranks = _ranks()
    batches = _batches(CAUSAL_LM, 3)
    owner = _owner("llama", CAUSAL_LM, 1, node_id=8)
    contribution = _split_round(owner, _helper(), batches, ranks)

    factors, head = _reference("llama", CAUSAL_LM, ranks, batches, node_id=7)
    assert set(contribution.factors) == set(factors)
    assert _max_diff(Contribution(contribution.factors, 6, "8", 0), factors, head) > 1e-2


# ---- (b) rollback and replay -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["two-part", "u-shape"])
def test_rollback_and_replay_with_a_new_helper_gives_the_same_adapter(mode):
    ranks = _ranks()
    batches = _batches(CAUSAL_LM, 4)
    clean = _undisturbed(batches, mode=mode)
    owner, lost = _begun(mode=mode)
    for b in batches[:2]:
        _exchange(owner, lost, b)

    owner.rollback()  # the helper is gone: restart the round
    replacement = _helper()
    assert owner.step == 0 and owner.round == 0
    contribution = _split_round(owner, replacement, batches, ranks)

    assert _max_diff(contribution, {m: f for m, f in clean.factors.items()}, dict(clean.dense)) == 0.0


def test_new_helper_answers_replay_errors_until_the_round_restarts_from_step_0():
    ranks = _ranks()
    batches = _batches(CAUSAL_LM, 3)
    owner, old = _begun()
    _exchange(owner, old, batches[0])
    new = _helper()
    f = owner.forward(batches[1])
    args = (_wire(f.activations), _wire(f.attention_mask), _wire(f.labels))

    with pytest.raises(UnknownOwnerError):
        new.step(7, 0, 1, *args)
    _begin(new, owner, ranks)
    with pytest.raises(StepOrderError):
        new.step(7, 0, 1, *args)  # it never saw step 0
    with pytest.raises(RoundMismatchError):
        new.step(7, 1, 0, *args)
    assert issubclass(UnknownOwnerError, ReplayNeeded) and issubclass(StepOrderError, ReplayNeeded)


def test_same_helper_restarts_at_step_0_and_a_retried_step_is_not_trained_twice():
    batches = _batches(CAUSAL_LM, 3)
    clean = _undisturbed(batches)
    owner, helper = _begun()
    _exchange(owner, helper, batches[0])
    _exchange(owner, helper, batches[1])
    owner.rollback()  # e.g. the owner itself restarted; the helper sees step 0 again

    f = owner.forward(batches[0])
    args = (0, 0, _wire(f.activations), _wire(f.attention_mask), _wire(f.labels))
    first = helper.step(7, *args)
    again = helper.step(7, *args)  # a retry of the same request
    owner.backward(_wire(first.grad))
    for b in batches[1:]:
        _exchange(owner, helper, b)
    factors, dense = _returned(helper, owner)
    contribution = owner.contribution(None, factors, dense)

    assert again is first
    assert _max_diff(contribution, dict(clean.factors), dict(clean.dense)) == 0.0


# ---- (c) fold ------------------------------------------------------------------------------------
def _two_contributions(family="llama", task=SEQ_CLS):
    """Owners 1 (split 1, ranks 2/4/0) and 2 (split 2, ranks 8/0/1) train one round with one helper."""
    ranks1, ranks2 = _ranks(family, task), _ranks(family, task, (8, 0, 1))
    helper = _helper(family, task)
    o1 = _owner(family, task, 1, node_id=1, ranks=ranks1)
    o2 = _owner(family, task, 2, node_id=2, ranks=ranks2)
    c1 = _split_round(o1, helper, _batches(task, 2, seed=3), ranks1, n_samples=6)
    c2 = _split_round(o2, helper, _batches(task, 2, seed=4), ranks2, n_samples=2)
    return o1, o2, helper, c1, c2


def _dense_reference(family, task, contributions):
    """A plain model whose weights are W + Σ p_k γ_k B_k A_k and head + Σ p_k ΔD_k, set by hand."""
    model = _model(family, task)
    total = sum(c.n_samples for c in contributions)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for c in contributions:
            p = c.n_samples / total
            for m, f in c.factors.items():
                delta = p * f.scaling * (f.B @ f.A)  # (d_out, d_in)
                w = params[f"{m}.weight"]
                w.add_(delta.T if family == "gpt2" else delta)  # GPT-2 Conv1D stores (d_in, d_out)
            for n, d in c.dense.items():
                params[n].add_(p * d)
    return model


def _logits(model, batch):
    with torch.no_grad():
        return unsplit_forward(model, batch["input_ids"], batch["attention_mask"])[1]


def test_fold_applies_the_exact_merge_and_the_next_round_starts_fresh():
    o1, o2, helper, c1, c2 = _two_contributions()
    before = {m: base_weight(o1.model, m) for m in c1.factors}
    patch = stack_merge([c1, c2])

    record = o1.fold(patch)
    helper.fold(patch)

    reference = _dense_reference("llama", SEQ_CLS, [c1, c2])
    for m in c1.factors:
        expected = before[m] + sum(c.n_samples / 8 * c.factors[m].delta() for c in (c1, c2) if m in c.factors)
        assert torch.allclose(base_weight(o1.model, m), expected, atol=1e-6)
        assert torch.allclose(base_weight(helper.model, m), expected, atol=1e-6)
    batch = _batches(SEQ_CLS, 1, seed=9)[0]
    assert torch.allclose(_logits(o1.model, batch), _logits(reference, batch), atol=TOL)
    assert not torch.allclose(_logits(_model("llama", SEQ_CLS), batch), _logits(reference, batch), atol=1e-3)
    assert record.version == 1 and o1.version == 1 and helper.version == 1
    assert o1.round == 1 and o1.step == 0 and o1.pending is None
    fresh = attach_lora(
        _model("llama", SEQ_CLS), _ranks("llama", SEQ_CLS), alpha=ALPHA, seed=round_seed(RUN_SEED, 1, 1)
    )
    for m, f in get_factors(fresh).items():
        now = get_factors(o1.model)[m]
        assert torch.equal(now.A, f.A) and not now.B.any()
    for n, t in get_dense_trainables(o1.model).items():
        assert torch.allclose(t, dict(reference.named_parameters())[n], atol=1e-6)


def test_fold_of_a_gpt2_conv1d_model_matches_the_dense_formula():
    o1, o2, helper, c1, c2 = _two_contributions("gpt2", CAUSAL_LM)
    patch = stack_merge([c1, c2])

    o2.fold(patch)

    batch = _batches(CAUSAL_LM, 1, seed=9)[0]
    assert torch.allclose(
        _logits(o2.model, batch), _logits(_dense_reference("gpt2", CAUSAL_LM, [c1, c2]), batch), atol=TOL
    )


def test_a_contribution_that_missed_the_manifest_is_carried_into_the_next_one_exactly():
    o1, o2, helper, c1, c2 = _two_contributions()
    o1.fold(stack_merge([c2]))  # the manifest closed without owner 1
    assert o1.pending is c1
    helper.fold(stack_merge([c2]))

    ranks1 = _ranks("llama", SEQ_CLS)
    carried = _split_round(o1, helper, _batches(SEQ_CLS, 2, seed=5), ranks1, n_samples=3)
    back = helper.return_adapter(1, 1)
    own = Contribution({**back.factors, **o1.factors()}, 3, "1", 1, {**back.dense, **o1.head_delta()})

    assert carried.n_samples == 9 and carried.round == 1
    for m in set(c1.factors) | set(own.factors):
        expected = sum(c.n_samples * c.factors[m].delta() for c in (c1, own) if m in c.factors)
        assert torch.allclose(carried.n_samples * carried.delta(m), expected, atol=1e-6)
    for n in c1.dense:
        assert torch.allclose(9 * carried.dense[n], 6 * c1.dense[n] + 3 * own.dense[n], atol=1e-6)
    o1.fold(stack_merge([carried]))
    assert o1.pending is None and o1.round == 2


def test_carry_over_mixes_like_two_separate_contributions_in_a_merge():
    gen = torch.Generator().manual_seed(0)

    def contribution(node, n, rank):
        f = AdapterFactors(torch.randn(rank, 5, generator=gen), torch.randn(4, rank, generator=gen), 0.5)
        return Contribution({"m": f}, n, node, 1, {"h": torch.randn(3, generator=gen)})

    late, new, other = contribution("a", 4, 2), contribution("a", 1, 3), contribution("b", 5, 1)
    twin = Contribution(new.factors, new.n_samples, "a2", 1, new.dense)

    merged = stack_merge([carry_over(late, new), other])
    separate = stack_merge([late, twin, other])

    assert torch.allclose(merged.modules["m"].dense(), separate.modules["m"].dense(), atol=1e-6)
    assert torch.allclose(merged.dense["h"], separate.dense["h"], atol=1e-6)


def test_fold_refuses_an_uncommitted_round_and_ignores_a_duplicate():
    o1, o2, helper, c1, c2 = _two_contributions()
    patch = stack_merge([c1, c2])
    o1.fold(patch)
    helper.fold(patch)
    helper_ranks = _ranks("llama", SEQ_CLS)
    _begin(helper, o1, helper_ranks)
    _exchange(o1, helper, _batches(SEQ_CLS, 1)[0])
    c2_late = stack_merge([c2])
    later = Patch(c2_late.modules, c2_late.dense, c2_late.weights, round=1)  # round 1's manifest, without owner 1

    with pytest.raises(SessionStateError):
        o1.fold(later)
    assert o1.version == 1 and o1.step == 1
    assert o1.fold(patch, version=1, digest=patch.digest) is None  # a gossip duplicate
    assert o1.version == 1 and o1.step == 1
    o1.fold(later, discard_round=True)
    assert o1.version == 2 and o1.round == 2


def test_rebase_takes_a_forked_patch_out_and_the_anchors_history_in():
    o1, o2, helper, c1, c2 = _two_contributions()
    canonical = stack_merge([c1, c2])
    o1.fold(canonical)  # the anchor's version 1
    o2.fold(stack_merge([c2]))  # a version 1 that only owner 2 folded (its anchor died)
    assert o2.base.chain != o1.base.chain

    base, fork = o2.base.rebased(o1.base.missing_since(0))
    o2.rebase(base, fork)

    assert fork == 0 and (o2.version, o2.base.chain, o2.round, o2.step) == (1, o1.base.chain, 1, 0)
    batch = _batches(SEQ_CLS, 1, seed=9)[0]
    assert torch.allclose(
        _logits(o2.model, batch), _logits(_dense_reference("llama", SEQ_CLS, [c1, c2]), batch), atol=TOL
    )
    with pytest.raises(ValueError, match="cluster"):
        o2.rebase(VersionedBase("another"), 0)


@pytest.mark.parametrize("merged", [True, False])
def test_rebase_keeps_a_sent_contribution_pending_unless_the_new_history_merged_it(merged):
    o1, o2, helper, c1, c2 = _two_contributions()  # both rounds are closed, nothing folded yet
    anchor = VersionedBase(o2.base.cluster)
    anchor.apply(stack_merge([c1, c2] if merged else [c1]))
    base, fork = o2.base.rebased(anchor.records)
    o2.rebase(base, fork)
    assert o2.version == 1 and o2.round == 1
    assert o2.pending is (None if merged else c2)


# ---- (d) one helper, several owners ----------------------------------------------------------------
def test_helper_keeps_owners_with_different_splits_ranks_and_modes_apart():
    family, task = "llama", SEQ_CLS
    plans = [(1, "two-part", (2, 4, 0)), (2, "two-part", (8, 0, 1)), (1, "u-shape", (1, 2, 3))]
    owners = [
        _owner(family, task, s, mode, node_id=i, ranks=_ranks(family, task, p)) for i, (s, mode, p) in enumerate(plans)
    ]
    shared = _helper(family, task)
    alone = [_helper(family, task) for _ in owners]
    twins = [
        _owner(family, task, s, mode, node_id=i, ranks=_ranks(family, task, p)) for i, (s, mode, p) in enumerate(plans)
    ]
    batches = [_batches(task, 3, seed=10 + i) for i in range(len(owners))]
    for o, t, h, (_, _, p) in zip(owners, twins, alone, plans):
        o.start_round(0)
        t.start_round(0)
        _begin(shared, o, _ranks(family, task, p))
        _begin(h, t, _ranks(family, task, p))

    for step in range(3):  # interleaved on the shared replica
        for o, b in zip(owners, batches):
            _exchange(o, shared, b[step])
    for t, h, b in zip(twins, alone, batches):
        for batch in b:
            _exchange(t, h, batch)

    for o, t, h in zip(owners, twins, alone):
        got, want = shared.return_adapter(o.config.node_id, 0), h.return_adapter(t.config.node_id, 0)
        assert set(got.factors) == set(want.factors) and got.factors
        assert all(layer >= o.config.split for layer in (int(m.split(".")[2]) for m in got.factors))
        for m in want.factors:
            assert torch.equal(got.factors[m].A, want.factors[m].A)
            assert torch.equal(got.factors[m].B, want.factors[m].B)
        assert set(got.dense) == set(want.dense) == (set() if o.config.mode == "u-shape" else {"score.weight"})
        for n in want.dense:
            assert torch.equal(got.dense[n], want.dense[n])
    assert set(shared.owners) == {"0", "1", "2"}


def test_begin_is_idempotent_for_the_same_round_and_refuses_an_older_round():
    ranks = _ranks()
    owner, helper = _begun(round=3)
    _exchange(owner, helper, _batches(CAUSAL_LM, 1)[0])
    before = _snapshot(helper, 7)

    assert helper.begin(7, 3, 1, ranks, owner.seed, lr=LR, alpha=ALPHA) is False
    _same_snapshot(before, _snapshot(helper, 7))
    with pytest.raises(RoundMismatchError):
        helper.begin(7, 2, 1, ranks, owner.seed, lr=LR, alpha=ALPHA)
    assert helper.owners == {"7": (3, 1)}
    helper.drop(7)
    assert helper.owners == {}


def test_dropped_owners_and_a_changed_plan_get_fresh_adapters_that_train_correctly():
    ranks = _ranks()
    batches = _batches(CAUSAL_LM, 2)
    helper = _helper()
    first = _owner("llama", CAUSAL_LM, 1, node_id=1)
    second = _owner("llama", CAUSAL_LM, 2, node_id=2, mode="u-shape")
    for o in (first, second):
        o.start_round(0)
        _begin(helper, o, ranks)
    helper.drop(1)
    helper.drop(2)  # peft keeps its last adapter; the helper must still work afterwards
    assert helper.owners == {}

    moved = _owner("llama", CAUSAL_LM, 1, node_id=2)  # owner 2 comes back with another split and mode
    contribution = _split_round(moved, helper, batches, ranks)
    replanned = _owner("llama", CAUSAL_LM, 2, node_id=2)
    replanned.start_round(1)
    _begin(helper, replanned, ranks)

    factors, head = _reference("llama", CAUSAL_LM, ranks, batches, node_id=2)
    assert _max_diff(contribution, factors, head) <= TOL
    assert {int(m.split(".")[2]) for m in helper.return_adapter(2, 1).factors} == {2}
    with pytest.raises(UnknownOwnerError):
        helper.adapter_name(1)


def test_helper_pool_routes_owners_to_their_cluster_replica():
    pool = HelperPool()
    a = pool.add(HelperSession(_model(), HelperConfig(cluster="a", lr=LR)))
    b = pool.add(HelperSession(_model(), HelperConfig(cluster="b", lr=LR)))
    owner = _owner("llama", CAUSAL_LM, 1, node_id=4)
    owner.start_round(0)
    _begin(b, owner, _ranks())

    assert pool.for_owner(4) is b and pool.get("a") is a and pool.clusters == ["a", "b"]
    with pytest.raises(UnknownOwnerError):
        pool.for_owner(5)
    with pytest.raises(ValueError, match="already served"):
        pool.add(HelperSession(_model(), HelperConfig(cluster="a")))
    pool.remove("a")
    with pytest.raises(ValueError, match="not served"):
        pool.get("a")


# ---- (e) bad input changes nothing ----------------------------------------------------------------
def _bad_steps(f):
    acts, mask, labels = f.activations, f.attention_mask, f.labels
    nan = acts.clone()
    nan[0, 0, 0] = float("nan")
    inf = acts.clone()
    inf[1, 2, 3] = float("inf")
    bad_mask = mask.clone()
    bad_mask[0, 0] = 2
    return {
        "hidden size": (acts[..., :-1], mask, labels),
        "2-D": (acts[0], mask, labels),
        "float64": (acts.double(), mask, labels),
        "NaN": (nan, mask, labels),
        "inf": (inf, mask, labels),
        "list": (acts.tolist(), mask, labels),
        "mask shape": (acts, mask[:, :-1], labels),
        "mask values": (acts, bad_mask, labels),
        "mask float": (acts, mask.float(), labels),
        "labels range": (acts, mask, labels.clamp(min=0) + VOCAB),
        "labels shape": (acts, mask, labels[:, :-1]),
        "labels float": (acts, mask, labels.float()),
    }


BAD_STEPS = [
    "hidden size",
    "2-D",
    "float64",
    "NaN",
    "inf",
    "list",
    "mask shape",
    "mask values",
    "mask float",
    "labels range",
    "labels shape",
    "labels float",
]


@pytest.mark.parametrize("case", BAD_STEPS)
def test_helper_rejects_bad_tensors_before_any_state_changes(case):
    batches = _batches(CAUSAL_LM, 2)
    clean = _undisturbed(batches)
    owner, helper = _begun()
    _exchange(owner, helper, batches[0])
    f = owner.forward(batches[1])
    before = _snapshot(helper, 7)

    acts, mask, labels = _bad_steps(f)[case]
    with pytest.raises(ValueError):
        helper.step(7, 0, 1, acts, mask, labels)
    with pytest.raises(ValueError):
        helper.step(7, 0, 0, acts, mask, labels)  # not even a restart happens

    _same_snapshot(before, _snapshot(helper, 7))
    r = helper.step(7, 0, 1, _wire(f.activations), _wire(f.attention_mask), _wire(f.labels))
    owner.backward(_wire(r.grad))
    factors, dense = _returned(helper, owner)
    assert _max_diff(owner.contribution(None, factors, dense), dict(clean.factors), dict(clean.dense)) == 0.0


def test_u_shape_rejects_bad_hidden_states_and_gradients_and_answers_a_retry_from_cache():
    batches = _batches(SEQ_CLS, 2)
    clean = _undisturbed(batches, SEQ_CLS, "u-shape")
    owner, helper = _begun(SEQ_CLS, "u-shape")
    _exchange(owner, helper, batches[0])
    f = owner.forward(batches[1])
    hidden = helper.u_forward(7, 0, 1, _wire(f.activations), _wire(f.attention_mask))
    with pytest.raises(ValueError):
        owner.finish(hidden[:, :-1])
    with pytest.raises(ValueError):
        owner.finish(hidden * float("nan"))
    _, g = owner.finish(_wire(hidden))
    before = _snapshot(helper, 7)

    for bad in (g[:, :-1], g.double(), g * float("inf"), "g"):
        with pytest.raises(ValueError):
            helper.u_backward(7, 0, 1, bad)
    _same_snapshot(before, _snapshot(helper, 7))
    with pytest.raises(StepOrderError):
        helper.u_backward(7, 0, 0, _wire(g))
    grad = helper.u_backward(7, 0, 1, _wire(g))
    assert helper.u_backward(7, 0, 1, _wire(g)) is grad  # a retried request
    owner.backward(_wire(grad))
    factors, dense = _returned(helper, owner)

    assert dense == {} and set(owner.head_delta()) == {"score.weight"}
    assert _max_diff(owner.contribution(None, factors, dense), dict(clean.factors), dict(clean.dense)) == 0.0


def test_helper_typed_errors_change_nothing():
    owner, helper = _begun()
    _exchange(owner, helper, _batches(CAUSAL_LM, 1)[0])
    f = owner.forward(_batches(CAUSAL_LM, 2)[1])
    args = (_wire(f.activations), _wire(f.attention_mask), _wire(f.labels))
    before = _snapshot(helper, 7)

    with pytest.raises(UnknownOwnerError):
        helper.step(8, 0, 1, *args)
    with pytest.raises(RoundMismatchError):
        helper.step(7, 1, 1, *args)
    with pytest.raises(StepOrderError):
        helper.step(7, 0, 2, *args)
    with pytest.raises(ValueError, match="two-part"):
        helper.u_forward(7, 0, 1, *args[:2])  # this owner was begun in two-part mode
    with pytest.raises(VersionMismatchError):
        helper.step(7, 0, 1, *args, base_version=3)
    with pytest.raises(ValueError):
        helper.step("bad id!", 0, 1, *args)

    _same_snapshot(before, _snapshot(helper, 7))


def test_helper_rejects_bad_begin_arguments():
    helper = _helper()
    ranks = _ranks()
    for kwargs, match in [
        (dict(split=0), "split"),
        (dict(split=LAYERS), "split"),
        (dict(ranks={"model.layers.0.self_attn.q_proj": 4}), "no positive rank"),
        (dict(ranks={"model.layers.2.nope": 4}), "no such module"),
        (dict(ranks={"lm_head": 4}), "not a module inside"),
        (dict(ranks={"model.layers.2.self_attn.q_proj": -1}), "must be an int"),
        (dict(mode="sideways"), "mode"),
        (dict(lr=0.0), "lr"),
        (dict(alpha={"model.layers.2.self_attn.q_proj": 1.0}), "alpha"),
    ]:
        args = dict(owner_id=7, round=0, split=1, ranks=ranks, seed=1, **{})
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            helper.begin(**args)
    assert helper.owners == {} and not isinstance(helper.model, PeftModel)


def test_owner_rejects_bad_gradients_and_helper_factors_without_changing_anything():
    owner, helper = _begun(SEQ_CLS)
    batch = _batches(SEQ_CLS, 1)[0]
    f = owner.forward(batch)
    r = helper.step(7, 0, 0, _wire(f.activations), _wire(f.attention_mask), _wire(f.labels))
    before = owner.factors()
    nan = r.grad.clone()
    nan[0, 0, 0] = float("nan")

    for bad in (r.grad[:, :-1], r.grad.double(), nan, "grad"):
        with pytest.raises(ValueError):
            owner.backward(bad)
    assert owner.step == 0 and all(torch.equal(before[m].A, f_.A) for m, f_ in owner.factors().items())
    owner.backward(_wire(r.grad))
    assert owner.step == 1

    factors, dense = _returned(helper, owner)
    owner_side = next(iter(owner.factors()))
    helper_side = next(iter(factors))
    a, b, s = factors[helper_side]
    for bad_factors, bad_dense, match in [
        ({}, dense, "required"),
        ({**factors, owner_side: factors[helper_side]}, dense, "not a module of blocks"),
        ({**factors, helper_side: (a[:, :-1], b, s)}, dense, "update"),
        ({**factors, helper_side: (a * np.nan, b, s)}, dense, "NaN"),
        (factors, {}, "helper_dense"),
        (factors, {"score.weight": np.zeros((2, 2), np.float32)}, "shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            owner.contribution(None, bad_factors, bad_dense)
    assert not owner.closed
    assert owner.contribution(None, factors, dense).n_samples == 2 and owner.closed
    with pytest.raises(SessionStateError):
        owner.forward(batch)


def test_fold_rejects_bad_patches_and_changes_nothing():
    o1, o2, helper, c1, c2 = _two_contributions()
    patch = stack_merge([c1, c2])
    name = next(iter(patch.modules))
    sf = patch.modules[name]
    weights = {m: base_weight(o1.model, m) for m in patch.modules}
    head = {n: t.clone() for n, t in get_dense_trainables(o1.model).items()}

    for bad, error in [
        (Patch({**patch.modules, "model.layers.0.nope": sf}, patch.dense), ValueError),
        (Patch({**patch.modules, name: StackedFactors(sf.B[:-1], sf.A)}, patch.dense), ValueError),
        (Patch(patch.modules, {"score.weight": torch.zeros(1, 2)}), ValueError),
        (Patch(patch.modules, {"nope.weight": torch.zeros(1, 2)}), ValueError),
    ]:
        with pytest.raises(error):
            o1.fold(bad)
    with pytest.raises(DigestMismatchError):
        o1.fold(patch, digest="0" * 64)
    with pytest.raises(VersionGapError):
        o1.fold(patch, version=2)
    with pytest.raises(ValueError):
        o1.fold("patch")

    assert o1.version == 0 and o1.round == 0 and o1.closed
    assert all(torch.equal(base_weight(o1.model, m), w) for m, w in weights.items())
    assert all(torch.equal(get_dense_trainables(o1.model)[n], t) for n, t in head.items())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(split=0), "split"),
        (dict(split=True), "split"),
        (dict(lr=-1.0), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(mode="sideways"), "mode"),
        (dict(node_id=""), "node_id"),
        (dict(node_id=-1), "node_id"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(cluster=""), "cluster"),
    ],
)
def test_owner_config_names_the_bad_field(kwargs, match):
    args = dict(node_id=1, split=1)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        OwnerConfig(**args)


def test_owner_session_checks_its_model_and_call_order():
    plain = _model()
    with pytest.raises(ValueError, match="peft"):
        OwnerSession(plain, OwnerConfig(node_id=1, split=1))
    with pytest.raises(ValueError, match="outside"):
        OwnerSession(attach_lora(_model(), _ranks()), OwnerConfig(node_id=1, split=LAYERS + 1))
    late = {n: r for n, r in _ranks().items() if ".layers.2." in n}
    with pytest.raises(ValueError, match="no LoRA adapter"):
        OwnerSession(attach_lora(_model(), late), OwnerConfig(node_id=1, split=1))
    owner = _owner("llama", CAUSAL_LM, 1)
    batch = _batches(CAUSAL_LM, 1)[0]
    with pytest.raises(SessionStateError):
        owner.forward(batch)
    owner.start_round(0)
    with pytest.raises(SessionStateError):
        owner.backward(torch.zeros(2, 6, HIDDEN))
    with pytest.raises(SessionStateError):
        owner.local_step(batch)
    with pytest.raises(ValueError, match="labels"):
        owner.forward({**batch, "labels": batch["labels"][:, :3]})


# ---- seeds -----------------------------------------------------------------------------------------
def test_round_seeds_are_deterministic_and_distinct():
    seeds = {round_seed(r, n, k) for r in (0, 1) for n in (1, 2) for k in (0, 1)}
    assert len(seeds) == 8
    assert round_seed(5, 7, 3) == round_seed(5, "7", 3) == 0 + round_seed(5, 7, 3)
    assert 0 <= round_seed(5, 7, 3) < 2**63
    for bad in [(1.5, 1, 0), (1, -1, 0), (1, 1, -1), (1, "", 0), (1, 1, True)]:
        with pytest.raises(ValueError):
            round_seed(*bad)


# ---- export ------------------------------------------------------------------------------------------
def _folded_owner(family, task, rounds=2):
    """Owners 1 and 2 train `rounds` rounds; every round both contributions merge and fold."""
    ranks1, ranks2 = _ranks(family, task), _ranks(family, task, (8, 0, 1))
    helper = _helper(family, task)
    o1 = _owner(family, task, 1, node_id=1, ranks=ranks1)
    o2 = _owner(family, task, 2, node_id=2, ranks=ranks2)
    for r in range(rounds):
        c1 = _split_round(o1, helper, _batches(task, 2, seed=20 + r), ranks1, n_samples=3)
        c2 = _split_round(o2, helper, _batches(task, 2, seed=30 + r), ranks2, n_samples=1)
        patch = stack_merge([c1, c2])
        for node in (o1, o2, helper):
            node.fold(patch)
    return o1


@pytest.mark.parametrize("family,task", [("llama", SEQ_CLS), ("gpt2", CAUSAL_LM)])
def test_export_loads_on_the_original_base_and_equals_the_folded_model(tmp_path, family, task):
    owner = _folded_owner(family, task)
    update = owner.base.folded_delta()

    report = export_adapter(_model(family, task), owner.base, tmp_path / "adapter")  # exact by default

    loaded = PeftModel.from_pretrained(_model(family, task), str(tmp_path / "adapter"))
    batch = _batches(task, 1, seed=9)[0]
    assert torch.allclose(_logits(loaded, batch), _logits(owner.model, batch), atol=TOL)
    assert not torch.allclose(_logits(_model(family, task), batch), _logits(owner.model, batch), atol=1e-3)
    meta = json.loads((tmp_path / "adapter" / "export.json").read_text())
    assert report.exact and meta["exact"] and meta["base_version"] == 2 and meta["rank_limit"] is None
    assert set(meta["modules"]) == set(update.modules)
    assert all(m["relative_error"] <= 1e-5 for m in meta["modules"].values())
    assert all(m["rank"] <= update.modules[n].rank for n, m in meta["modules"].items())
    assert meta["dense"] == (["score.weight"] if task == SEQ_CLS else [])


def test_lossy_export_reports_the_svd_tail_as_its_error(tmp_path):
    owner = _folded_owner("llama", CAUSAL_LM, rounds=1)
    update = owner.base.folded_delta()

    report = export_adapter(_model(), update, tmp_path / "lossy", rank=1)

    meta = json.loads((tmp_path / "lossy" / "export.json").read_text())
    for name, sf in update.modules.items():
        s = stacked_singular_values(sf)
        tail = float(torch.sqrt((s[1:].double() ** 2).sum()))
        assert meta["modules"][name]["error"] == pytest.approx(tail, rel=1e-4, abs=1e-7)
    assert not report.exact and report.max_error > 0
    assert PeftModel.from_pretrained(_model(), str(tmp_path / "lossy")) is not None


def test_export_rejects_bad_arguments_before_writing(tmp_path):
    owner = _folded_owner("llama", CAUSAL_LM, rounds=1)
    for args, match in [
        ((_model(), owner.base, tmp_path / "a", 0), "rank"),
        ((owner.model, owner.base, tmp_path / "a", 2), "plain"),
        ((_model(), Patch({}), tmp_path / "a", 2), "no adapted module"),
        ((_model(), "patch", tmp_path / "a", 2), "update"),
        ((_model("gpt2"), owner.base, tmp_path / "a", 2), "no such module"),
    ]:
        with pytest.raises(ValueError, match=match):
            export_adapter(*args)
    assert not (tmp_path / "a").exists()
