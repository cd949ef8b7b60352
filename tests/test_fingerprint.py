"""Task fingerprints from real gradients of tiny models (atlas_p2p.fingerprint)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from atlas_p2p.data import encode, records_from_dicts
from atlas_p2p.fingerprint import (
    LM_SKETCH,
    PROBE_ADAPTER,
    PROJECTION_CHUNK,
    FingerprintConfig,
    compute_fingerprint,
    dp_epsilon,
    fingerprint_sample,
    privatize,
    probe_gradient,
    probe_targets,
    project,
)
from atlas_p2p.models import split_model, tiny_model
from atlas_p2p.synthetic import SyntheticTasks, synthetic_tokenizer
from atlas_p2p.training.fingerprinting import whole_model_loss

TOK = synthetic_tokenizer()
GEN = SyntheticTasks()
CONFIG = FingerprintConfig(seed=11, num_samples=64)  # synthetic tasks separate at m = 64; keeps the tests fast
LORA = FingerprintConfig(seed=11, num_samples=64, probe="lora")  # the default, spelled out
HEAD = FingerprintConfig(seed=11, num_samples=64, probe="head")  # the classifier's head, class-balanced


def hf_loss(model, batch):
    return model(**batch).loss


def make_model(family="gpt2", seed=0):
    return tiny_model(family, "seq_cls", vocab_size=len(TOK), num_labels=4, num_layers=2, seed=seed)


def client_batches(task, seed, config=CONFIG, records=None, micro_batch=None):
    records = records if records is not None else GEN.generate(task, config.num_samples, seed=seed)
    encoded = encode(records_from_dicts(records), TOK, max_len=16)
    return fingerprint_sample(encoded, config, micro_batch)


def snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "peft_config": hasattr(model, "peft_config"),
    }


def assert_same(before, after):
    assert before["types"] == after["types"]
    assert before["flags"] == after["flags"]
    assert before["modes"] == after["modes"]
    assert before["peft_config"] == after["peft_config"]
    assert before["state"].keys() == after["state"].keys()
    assert all(torch.equal(before["state"][k], after["state"][k]) for k in before["state"])
    for name, grad in before["grads"].items():
        assert (grad is None and after["grads"][name] is None) or torch.equal(grad, after["grads"][name])


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_fingerprint_is_deterministic_unit_and_leaves_the_model_unchanged(family):
    model = make_model(family)
    model.train()
    head = [p for n, p in model.named_parameters() if "score" in n or "classifier" in n][0]
    head.requires_grad_(False)  # an unusual flag the probe must put back
    batches = client_batches(0, seed=1)
    before = snapshot(model)

    first = compute_fingerprint(model, batches, hf_loss, CONFIG)
    again = compute_fingerprint(make_model(family), batches, hf_loss, CONFIG)  # another node, same seed

    assert first.shape == (64,) and first.dtype == np.float32
    assert math.isclose(float(np.linalg.norm(first)), 1.0, rel_tol=1e-5)
    assert np.array_equal(first, again)
    assert not any(PROBE_ADAPTER in n for n, _ in model.named_parameters())
    assert_same(before, snapshot(model))


def test_another_seed_gives_another_fingerprint():
    model, batches = make_model(), client_batches(0, seed=1)

    a = compute_fingerprint(model, batches, hf_loss, CONFIG)
    b = compute_fingerprint(model, batches, hf_loss, FingerprintConfig(seed=12))

    assert float(a @ b) < 0.9


def test_probe_targets_are_block_zero_attention():
    assert probe_targets(make_model("gpt2")) == ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj"]
    llama = probe_targets(make_model("llama"))
    assert llama == [f"model.layers.0.self_attn.{p}_proj" for p in "koqv"]
    owner, _ = split_model(make_model("llama"), 1)
    assert probe_targets(owner) == [f"blocks.0.self_attn.{p}_proj" for p in "koqv"]


def test_probe_is_seeded_and_gradients_reach_both_factors():
    g = probe_gradient(make_model(), client_batches(0, seed=1, config=LORA), hf_loss, LORA)

    # gpt2 hidden 64, rank 4: c_attn A (4, 64), B (192, 4); c_proj A (4, 64), B (64, 4)
    sizes = [4 * 64, 192 * 4, 4 * 64, 64 * 4]
    parts = np.split(g, np.cumsum(sizes)[:-1])
    assert g.shape == (sum(sizes),)
    assert all(np.linalg.norm(p) > 0 for p in parts)  # B != 0, so A gets a gradient too


@pytest.mark.parametrize("config", [HEAD, LORA], ids=["head", "lora"])
@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_micro_batches_give_the_one_batch_gradient(family, config):
    model = make_model(family)

    whole = probe_gradient(model, client_batches(2, seed=3, config=config), hf_loss, config)
    pieces = probe_gradient(model, client_batches(2, seed=3, config=config, micro_batch=5), hf_loss, config)

    assert np.max(np.abs(pieces - whole)) <= 1e-5 * np.max(np.abs(whole))


def test_micro_batches_hold_the_chosen_examples_shortest_first():
    records = GEN.generate(1, 80, seed=8)
    config = FingerprintConfig(seed=11, num_samples=50, probe="lora")

    whole = client_batches(1, 0, config=config, records=records)
    pieces = client_batches(1, 0, config=config, records=records, micro_batch=8)

    def rows(batches):
        return sorted(
            (tuple(ids[mask.bool()].tolist()), int(label))
            for b in batches
            for ids, mask, label in zip(b["input_ids"], b["attention_mask"], b["labels"])
        )

    assert len(whole) == 1 and [len(b["labels"]) for b in pieces] == [8] * 6 + [2]
    assert rows(pieces) == rows(whole)  # the same 50 examples, only grouped differently
    widths = [b["input_ids"].shape[1] for b in pieces]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    assert sum(b["input_ids"].numel() for b in pieces) < whole[0]["input_ids"].numel()


def test_head_probe_batches_hold_one_class_each_and_every_chosen_example():
    records = GEN.generate(1, 80, seed=8)
    config = FingerprintConfig(seed=11, num_samples=50, probe="head")
    lora = client_batches(1, 0, config=dataclasses.replace(config, probe="lora"), records=records)
    head = client_batches(1, 0, config=config, records=records, micro_batch=8)

    def rows(batches):
        return sorted((tuple(i[m.bool()].tolist()), int(y)) for b in batches for i, m, y in zip(*b.values()))

    assert all(len(set(b["labels"].tolist())) == 1 for b in head)
    assert rows(head) == rows(lora) and len({int(b["labels"][0]) for b in head}) > 1


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_head_probe_is_the_gradient_of_the_class_balanced_loss_in_the_head(family):
    model = make_model(family)
    batches = client_batches(3, seed=6, config=HEAD, micro_batch=7)

    g = probe_gradient(model, batches, hf_loss, HEAD)

    # reference: one batch, per-example losses, (1/C) sum_c mean_{i in c} L_i, differentiated in the head
    ref = make_model(family)
    head = {n: p for n, p in ref.named_parameters() if n.startswith(("score", "classifier"))}
    ids = [b["input_ids"] for b in batches]
    width = max(x.shape[1] for x in ids)
    pad = ref.config.pad_token_id if ref.config.pad_token_id is not None else 0
    input_ids = torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1]), value=pad) for x in ids])
    mask = torch.cat(
        [torch.nn.functional.pad(b["attention_mask"], (0, width - b["attention_mask"].shape[1])) for b in batches]
    )
    y = torch.cat([b["labels"] for b in batches])
    ref.eval()
    losses = torch.nn.functional.cross_entropy(
        ref(input_ids=input_ids, attention_mask=mask).logits, y, reduction="none"
    )
    classes = torch.unique(y)
    loss = sum(losses[y == c].mean() for c in classes) / len(classes)
    want = torch.autograd.grad(loss, [head[n] for n in sorted(head)])
    want = torch.cat([w.reshape(-1) for w in want]).double().numpy()

    assert g.shape == want.shape and np.allclose(g, want, rtol=1e-4, atol=1e-7)


def test_head_probe_refuses_a_micro_batch_of_several_classes():
    model = make_model()
    mixed = client_batches(0, seed=1, config=LORA)  # one batch, every class
    before = snapshot(model)

    with pytest.raises(ValueError, match="one class each"):
        probe_gradient(model, mixed, hf_loss, HEAD)
    assert_same(before, snapshot(model))


def test_each_micro_batch_frees_its_graph_before_the_next_one_runs():
    import weakref

    class Saved:  # what autograd keeps for the backward pass, one object per saved tensor
        def __init__(self, tensor):
            self.tensor = tensor

    saved: list[weakref.ref] = []
    alive_at_start: list[int] = []

    def tracked_loss(model, batch):
        alive_at_start.append(sum(ref() is not None for ref in saved))

        def pack(tensor):
            box = Saved(tensor)
            saved.append(weakref.ref(box))
            return box

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
            return model(**batch).loss

    batches = client_batches(0, seed=2, config=HEAD, micro_batch=16)  # one class a micro-batch: more of them
    probe_gradient(make_model("bert"), batches, tracked_loss, HEAD)

    assert len(alive_at_start) == len(batches) > 1 and len(saved) > 0
    assert alive_at_start == [0] * len(batches)  # micro-batch b's activations are gone when b + 1 starts
    assert all(ref() is None for ref in saved)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_computed_across_a_split_gives_the_same_fingerprint(family):
    model = make_model(family)
    owner, helper = split_model(model, 1)

    def split_loss(_, batch):
        hidden = owner(batch["input_ids"], batch["attention_mask"])  # (B, T, H) on the "owner"
        loss, _ = helper(hidden, batch["attention_mask"], batch["labels"])  # on the "helper"
        return loss

    for config in (HEAD, LORA):
        batches = client_batches(1, seed=4, config=config)
        unsplit = probe_gradient(model, batches, hf_loss, config)
        probe_on_model = probe_gradient(model, batches, split_loss, config)
        assert np.allclose(probe_on_model, unsplit, rtol=1e-4, atol=1e-6)
    probe_on_owner = probe_gradient(owner, batches, split_loss, LORA)  # the owner's part: block 0's LoRA probe
    assert np.allclose(probe_on_owner, unsplit, rtol=1e-4, atol=1e-6)


def test_task_field_never_influences_the_fingerprint():
    model = make_model()
    records = GEN.generate(3, 32, seed=5)
    renamed = [dict(r, task="something else") for r in records]
    removed = [{k: v for k, v in r.items() if k != "task"} for r in records]

    prints = [
        compute_fingerprint(model, client_batches(0, 0, records=r), hf_loss, CONFIG)
        for r in (records, renamed, removed)
    ]

    assert np.array_equal(prints[0], prints[1]) and np.array_equal(prints[0], prints[2])


def test_same_task_clients_are_closer_than_other_task_clients():
    model = make_model("llama", seed=3)

    prints = {
        (t, c): compute_fingerprint(model, client_batches(t, seed=100 * t + c), hf_loss, CONFIG)
        for t in (0, 1)
        for c in range(3)
    }

    same = [float(prints[(t, a)] @ prints[(t, b)]) for t in (0, 1) for a in range(3) for b in range(a + 1, 3)]
    cross = [float(prints[(0, a)] @ prints[(1, b)]) for a in range(3) for b in range(3)]
    assert min(same) > max(cross)


# -- privacy and sketch --------------------------------------------------------------
def test_clipping_bounds_the_norm_and_noise_changes_the_vector():
    g = np.random.default_rng(0).standard_normal(500) * 3.0

    clipped = privatize(g, clip=1.0, sigma=0.0)
    noisy = privatize(g, clip=1.0, sigma=0.5, rng=np.random.default_rng(1))
    again = privatize(g, clip=1.0, sigma=0.5, rng=np.random.default_rng(1))
    small = privatize(g / 1000, clip=1.0, sigma=0.0)

    assert math.isclose(np.linalg.norm(clipped), 1.0, rel_tol=1e-12)
    assert np.allclose(clipped, g / np.linalg.norm(g))  # direction kept
    assert np.allclose(small, g / 1000)  # under the bound: untouched
    assert np.array_equal(noisy, again) and not np.allclose(noisy, clipped)
    assert math.isclose(np.std(noisy - clipped), 0.5, rel_tol=0.15)  # noise std sigma * C
    assert np.array_equal(privatize(g, None, 0.0), g)


def test_dp_noise_changes_the_fingerprint_and_is_not_the_public_seed():
    model, batches = make_model(), client_batches(0, seed=1)
    noisy_config = FingerprintConfig(seed=11, clip=1.0, sigma=0.5)

    clean = compute_fingerprint(model, batches, hf_loss, CONFIG)
    a = compute_fingerprint(model, batches, hf_loss, noisy_config)
    b = compute_fingerprint(model, batches, hf_loss, noisy_config)

    assert math.isclose(float(np.linalg.norm(a)), 1.0, rel_tol=1e-5)
    assert not np.allclose(a, clean) and not np.allclose(a, b)  # fresh private noise each release


def test_projection_preserves_cosines_and_ignores_scale():
    rng = np.random.default_rng(2)
    dim = 3 * PROJECTION_CHUNK + 17  # several chunks of P
    a = rng.standard_normal(dim)
    b = 0.6 * a + 0.8 * rng.standard_normal(dim)

    fa, fb = project(a, seed=5), project(b, seed=5)

    true_cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert abs(float(fa @ fb) - true_cos) < 0.2
    assert np.allclose(project(7.0 * a, seed=5), fa, atol=1e-6)
    assert not np.allclose(project(a, seed=6), fa)


def test_dp_epsilon_solves_the_analytic_gaussian_condition():
    from scipy.stats import norm

    eps = dp_epsilon(1.0, 1e-5)
    u = 2.0 / 1.0  # sensitivity 2C over noise std C
    delta_at = norm.cdf(u / 2 - eps / u) - math.exp(eps) * norm.cdf(-u / 2 - eps / u)

    assert math.isclose(delta_at, 1e-5, rel_tol=1e-3)
    assert dp_epsilon(0.5, 1e-5) > eps > dp_epsilon(2.0, 1e-5) > dp_epsilon(2.0, 1e-5, sensitivity=1.0)
    assert dp_epsilon(0.0, 1e-5) == math.inf
    classic = math.sqrt(2 * math.log(1.25 / 1e-5)) * 2.0 / 10.0  # Dwork & Roth, valid below 1
    assert classic < 1 and dp_epsilon(10.0, 1e-5) <= classic


# -- errors --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sigma": 0.5}, "needs clip"),
        ({"clip": -1.0}, "clip"),
        ({"dim": 0}, "dim"),
        ({"seed": -1}, "seed"),
        ({"b_std": 0.0}, "b_std"),
        ({"probe": "block0"}, "probe"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FingerprintConfig(**{"seed": 1, **kwargs})


def test_bad_loss_or_model_is_refused_and_the_model_left_alone():
    from atlas_p2p.lora import attach_lora, lora_targets

    model = make_model()
    batches = client_batches(0, seed=1)
    before = snapshot(model)

    with pytest.raises(ValueError, match="scalar"):
        probe_gradient(model, batches, lambda m, b: m(**b).logits, CONFIG)
    with pytest.raises(ValueError, match="non-finite"):
        probe_gradient(model, batches, lambda m, b: m(**b).loss * float("nan"), CONFIG)
    assert_same(before, snapshot(model))
    with pytest.raises(ValueError, match="peft-wrapped"):
        probe_gradient(attach_lora(make_model(), {lora_targets(model)[0]: 2}), batches, hf_loss, CONFIG)


def test_bad_probe_targets_are_refused_before_anything_changes():
    model = make_model()
    batches = client_batches(0, seed=1)
    before = snapshot(model)

    with pytest.raises(ValueError, match="not a module"):
        probe_gradient(model, batches, hf_loss, dataclasses.replace(LORA, target_modules=("transformer.h.9.attn",)))
    with pytest.raises(ValueError, match="not a Linear/Conv1D"):
        probe_gradient(model, batches, hf_loss, dataclasses.replace(LORA, target_modules=("transformer.h.0.ln_1",)))
    assert_same(before, snapshot(model))


# -- the head probe on a causal LM ----------------------------------------------------
LM_HEAD = FingerprintConfig(seed=11, num_samples=40, probe="head")


def lm_model(family="gpt2", seed=0):
    return tiny_model(family, "causal_lm", vocab_size=len(TOK), num_layers=2, seed=seed)


def lm_batches(task, seed, micro_batch=None):
    texts = [{"text": r["text"]} for r in GEN.generate(task, 40, seed=seed)]  # labels dropped: language modelling
    return fingerprint_sample(encode(records_from_dicts(texts), TOK, max_len=16), LM_HEAD, micro_batch)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lm_head_probe_is_the_sketched_gradient_at_a_zero_head(family):
    model = lm_model(family)
    batches = lm_batches(1, seed=4, micro_batch=6)
    before = snapshot(model)

    g = probe_gradient(model, batches, whole_model_loss, LM_HEAD)

    # reference: the final features from Hugging Face's own forward, a zero head W0 (V, d) on
    # them, the shifted mean next-token loss over every counted token, differentiated in W0
    feats, labels = [], []
    model.eval()
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
        feats.append(out.hidden_states[-1][:, :-1].reshape(-1, model.config.hidden_size))
        labels.append(b["labels"][:, 1:].reshape(-1))
    h, y = torch.cat(feats).double(), torch.cat(labels)
    w0 = torch.zeros(model.config.vocab_size, model.config.hidden_size, dtype=torch.float64, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(h @ w0.T, y, ignore_index=-100)
    (grad,) = torch.autograd.grad(loss, [w0])  # G (V, d)
    r1 = np.random.default_rng([LM_HEAD.seed, 0x1A]).standard_normal((model.config.vocab_size, LM_SKETCH))
    r2 = np.random.default_rng([LM_HEAD.seed, 0x2A]).standard_normal((model.config.hidden_size, LM_SKETCH))
    want = (r1.T @ grad.numpy() @ r2).reshape(-1)  # vec(R1 G R2ᵀ)

    assert g.shape == (LM_SKETCH * LM_SKETCH,)
    assert np.allclose(g, want, rtol=1e-6, atol=1e-9 * np.abs(want).max())
    model.train()  # snapshot was taken in train mode; the probe restores it
    assert_same(before, snapshot(model))


def test_lm_head_probe_does_not_depend_on_micro_batches_and_sees_the_data():
    model = lm_model()
    one = compute_fingerprint(model, lm_batches(2, seed=5), whole_model_loss, LM_HEAD)
    pieces = compute_fingerprint(model, lm_batches(2, seed=5, micro_batch=7), whole_model_loss, LM_HEAD)
    other = compute_fingerprint(model, lm_batches(2, seed=6), whole_model_loss, LM_HEAD)  # other texts

    assert np.allclose(one, pieces, atol=1e-6)
    assert not np.allclose(one, other, atol=1e-3)
    assert one.shape == (LM_HEAD.dim,) and math.isclose(float(np.linalg.norm(one)), 1.0, rel_tol=1e-5)


def test_lm_head_probe_refuses_a_loss_that_skips_the_head_and_changes_nothing():
    model = lm_model()
    before = snapshot(model)

    with pytest.raises(ValueError, match="LM head ran 0 times"):
        probe_gradient(model, lm_batches(1, seed=2), lambda m, b: torch.zeros(()), LM_HEAD)
    assert_same(before, snapshot(model))
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is gone
