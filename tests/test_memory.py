"""Memory model: parameter counts against real models, the footprint formulas, a real
measured training step, and the least-squares calibration."""

import dataclasses

import pytest
import torch

from atlas_p2p import memory as M
from atlas_p2p.lora import attach_lora, lora_targets
from atlas_p2p.models import split_model, tiny_model, unsplit_forward
from tests.planner_inputs import SHAPE as GPT2
from tests.planner_inputs import WORK

VOCAB = 60


def _tiny(family, task="causal_lm", layers=3):
    labels = 3 if task == "seq_cls" else None
    model = tiny_model(family, task, vocab_size=VOCAB, num_labels=labels, num_layers=layers)
    return model, M.shape_from_config(model.config, task)


def _qwen3(layers=2):
    import transformers as T

    config = T.Qwen3Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=VOCAB,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = T.Qwen3ForCausalLM(config)
    return model, M.shape_from_config(model.config, "causal_lm")


def _count(module):
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- counts vs real models


@pytest.mark.parametrize(
    "family,task",
    [
        ("gpt2", "causal_lm"),
        ("gpt2", "seq_cls"),
        ("llama", "causal_lm"),
        ("llama", "seq_cls"),
        ("qwen2", "causal_lm"),
        ("mistral", "causal_lm"),
        ("bert", "seq_cls"),
        ("qwen3", "causal_lm"),
    ],
)
def test_parameter_counts_match_the_real_model(family, task):
    model, shape = _qwen3() if family == "qwen3" else _tiny(family, task)

    owner, helper = split_model(model, 1)

    assert M.total_params(shape) == _count(model)
    assert M.embedding_params(shape) + M.block_params(shape) == _count(owner)
    expected_helper = (shape.num_layers - 1) * M.block_params(shape) + M.head_params(shape, with_embedding_copy=True)
    assert expected_helper == _count(helper)


@pytest.mark.parametrize("family,task", [("gpt2", "causal_lm"), ("llama", "causal_lm"), ("bert", "seq_cls")])
def test_lora_candidates_name_the_real_modules_with_their_sizes(family, task):
    model, shape = _tiny(family, task)
    modules = dict(model.named_modules())

    candidates = M.lora_candidates(shape)

    assert [c.name for c in candidates] == lora_targets(model, kinds=("attn", "mlp"))
    for c in candidates:
        w = modules[c.name].weight
        assert sorted(w.shape) == sorted((c.d_in, c.d_out))
        assert c.rank1_cost == w.shape[0] + w.shape[1]


def test_shape_from_config_reads_dropout_and_rejects_unknown_models():
    import transformers as T

    assert M.shape_from_config(T.GPT2Config(n_layer=2, n_embd=32, n_head=2)).dropout is True
    assert (
        M.shape_from_config(
            T.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
        ).dropout
        is False
    )
    with pytest.raises(ValueError, match="model_type='t5'"):
        M.shape_from_config(T.T5Config())


# ---------------------------------------------------------------- the formulas


def test_paper_constants_give_68_BSH_plus_10_BNS2_bytes_per_fp32_layer():
    B, S, H, N = WORK.batch, WORK.seq_len, GPT2.hidden, GPT2.heads
    per_layer = [
        M.owner_footprint(GPT2, l + 1, {}, WORK, M.PAPER_CONSTANTS).activations
        - M.owner_footprint(GPT2, l, {}, WORK, M.PAPER_CONSTANTS).activations
        for l in range(1, 4)
    ]

    assert per_layer == [68 * B * S * H + 10 * B * N * S * S] * 3


def test_adapter_bytes_are_four_copies_of_r_times_din_plus_dout():
    q = M.lora_candidates(GPT2)[0]  # block 0 c_attn, 64 -> 192
    late = M.lora_candidates(GPT2)[-1]  # block 3 mlp c_proj

    owner = M.owner_footprint(GPT2, 2, {q.name: 8, late.name: 16}, WORK)

    assert owner.adapter == 4 * 4 * 8 * (64 + 192)  # the block-3 adapter is not the owner's


@pytest.mark.parametrize(
    "field,value,part", [("act_bytes", 2, "activations"), ("weight_bytes", 2, "frozen"), ("lora_bytes", 2, "adapter")]
)
def test_element_width_scales_its_own_part_only(field, value, part):
    ranks = {M.lora_candidates(GPT2)[0].name: 4}
    full = M.owner_footprint(GPT2, 2, ranks, WORK)
    half = M.owner_footprint(GPT2, 2, ranks, dataclasses.replace(WORK, **{field: value}))

    for name in ("frozen", "adapter", "activations"):
        expected = getattr(full, name) / 2 if name == part else getattr(full, name)
        assert getattr(half, name) == pytest.approx(expected, abs=1)


def test_owner_footprint_grows_with_split_and_batch():
    totals = [M.owner_footprint(GPT2, l, {}, WORK).total for l in range(0, 5)]
    bigger = M.owner_footprint(GPT2, 2, {}, M.Workload(batch=8, seq_len=32)).total

    assert totals == sorted(totals) and len(set(totals)) == 5
    assert bigger > totals[2]


def test_whole_model_equals_owner_at_L_plus_head():
    whole = M.whole_model_footprint(GPT2, {}, WORK)
    owner = M.owner_footprint(GPT2, 4, {}, WORK)
    c = M.constants_for(GPT2)

    assert whole.frozen == owner.frozen + M.head_params(GPT2, with_embedding_copy=False) * 4
    assert whole.activations == pytest.approx(owner.activations + c.head * 4 * 32 * 1000 * 4, abs=2)


def test_helper_holds_the_deepest_owners_layers_once_and_each_owners_batch():
    tail = M.lora_candidates(GPT2)[-1].name
    a = M.ServedOwner(split=1, workload=WORK, ranks={tail: 4})
    b = M.ServedOwner(split=3, workload=M.Workload(batch=2, seq_len=32))

    both = M.helper_footprint(GPT2, [a, b])
    held = M.helper_footprint(GPT2, [a, b], holds_weights=True)

    assert both.frozen == M.helper_weights_bytes(GPT2, 1, 4) == (3 * M.block_params(GPT2) + 128 + 64000) * 4
    assert both.adapter == 4 * 4 * 4 * (256 + 64)
    assert both.activations == (
        M.served_owner_footprint(GPT2, a).activations + M.served_owner_footprint(GPT2, b).activations
    )
    assert held == dataclasses.replace(both, frozen=0)
    assert M.helper_footprint(GPT2, []).total == 0


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: dataclasses.replace(GPT2, family="opt"), "family='opt'"),
        (lambda: dataclasses.replace(GPT2, kv_heads=3), "kv_heads=3"),
        (lambda: dataclasses.replace(GPT2, task="seq_cls"), "num_labels=0"),
        (lambda: M.Workload(batch=0, seq_len=8), "batch=0"),
        (lambda: M.Workload(batch=1, seq_len=8, act_bytes=2.5), "act_bytes=2.5"),
        (lambda: M.ActivationConstants(-1.0, 0.0, 0.0), "per_hidden=-1.0"),
        (lambda: M.owner_footprint(GPT2, 5, {}, WORK), "split=5"),
        (lambda: M.owner_footprint(GPT2, 1, {"transformer.h.0.attn.q_proj": 2}, WORK), "q_proj"),
        (lambda: M.owner_footprint(GPT2, 1, {M.lora_candidates(GPT2)[0].name: -2}, WORK), "-2"),
        (lambda: M.dtype_bytes("float8"), "float8"),
        (lambda: M.MemorySample(GPT2, 2, {}, WORK, peak=10, head=True), "split=2"),
    ],
)
def test_bad_input_is_rejected_with_the_field_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_dtype_bytes_accepts_names_and_torch_dtypes():
    assert [M.dtype_bytes(d) for d in ("float32", torch.bfloat16, "torch.float16")] == [4, 2, 2]


# ---------------------------------------------------------------- measurement


def _owner_sample(model, shape, ranks, split, B, S):
    part, _ = split_model(model, split)
    ids = torch.randint(3, VOCAB, (B, S), generator=torch.Generator().manual_seed(B + S))
    mask = torch.ones(B, S, dtype=torch.long)
    m = M.measure_step(part, lambda: part(ids, mask))
    return m, M.MemorySample(shape, split, ranks, M.Workload(B, S), m.peak)


@pytest.fixture(scope="module")
def gpt2_lora():
    model, shape = _tiny("gpt2", layers=4)
    ranks = {n: 4 for n in lora_targets(model, kinds=("attn", "mlp"))}
    return attach_lora(model, ranks), shape, ranks


def test_measured_static_bytes_are_the_counted_weights_and_adamw_state(gpt2_lora):
    model, shape, ranks = gpt2_lora

    m, _ = _owner_sample(model, shape, ranks, 2, 2, 16)

    predicted = M.owner_footprint(shape, 2, ranks, M.Workload(2, 16))
    adapters_tensors = 2 * 2 * 4  # lora_A and lora_B per module, 4 modules per block, 2 blocks
    # parameters + two AdamW moments (3 of the 4 copies: gradients live only during the step)
    # + AdamW's scalar step counter per tensor
    assert m.static == predicted.frozen + predicted.adapter * 3 // 4 + 4 * adapters_tensors
    assert 0 < m.saved and m.static + m.saved <= m.peak


def test_measuring_leaves_the_model_as_it_was(gpt2_lora):
    model, shape, ranks = gpt2_lora
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    _owner_sample(model, shape, ranks, 3, 2, 16)

    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


def test_measured_peak_grows_with_split_and_batch(gpt2_lora):
    model, shape, ranks = gpt2_lora

    peaks = [_owner_sample(model, shape, ranks, l, 2, 16)[0].peak for l in (1, 2, 3)]
    wider = _owner_sample(model, shape, ranks, 2, 4, 16)[0]

    assert peaks == sorted(peaks) and len(set(peaks)) == 3
    assert wider.saved > _owner_sample(model, shape, ranks, 2, 2, 16)[0].saved


def test_measuring_a_frozen_module_is_refused():
    model, _ = _tiny("gpt2", layers=1)
    model.requires_grad_(False)

    with pytest.raises(ValueError, match="no trainable parameters"):
        M.measure_step(model, lambda: model(torch.ones(1, 4, dtype=torch.long)).logits)


# ---------------------------------------------------------------- calibration


def test_calibrate_recovers_the_constants_that_made_the_peaks():
    truth = M.ActivationConstants(per_hidden=6.0, per_mlp=3.5, per_score=1.25, fixed=7.0, head=2.5)
    narrow = dataclasses.replace(GPT2, intermediate=128)
    samples = []
    for shape in (GPT2, narrow):
        for split in (1, 2, 3):
            for B, S in ((2, 16), (4, 64)):
                s = M.MemorySample(shape, split, {}, M.Workload(B, S), peak=1)
                samples.append(dataclasses.replace(s, peak=M.predict(s, truth)))
        whole = M.MemorySample(shape, 4, {}, WORK, peak=1, head=True)
        samples.append(dataclasses.replace(whole, peak=M.predict(whole, truth)))

    fitted = M.calibrate("gpt2", samples)

    assert fitted.as_array() == pytest.approx(truth.as_array(), rel=1e-3)


def test_calibrate_on_real_measurements_predicts_a_held_out_step(gpt2_lora):
    model, shape, ranks = gpt2_lora
    grid = [(l, B, S) for l in (1, 3) for B, S in ((2, 16), (4, 32), (2, 64))]
    train = [_owner_sample(model, shape, ranks, *g)[1] for g in grid]
    held_out = _owner_sample(model, shape, ranks, 2, 3, 48)[1]

    fitted = M.calibrate("gpt2", train)

    assert M.relative_errors([held_out], fitted)[0] < 0.1


@pytest.mark.parametrize("family,task", [("gpt2", "causal_lm"), ("llama", "causal_lm"), ("bert", "seq_cls")])
def test_the_calibrated_table_predicts_measured_owner_peaks_within_a_quarter(family, task):
    model, shape = _tiny(family, task, layers=3)
    ranks = {n: 8 for n in lora_targets(model, kinds=("attn", "mlp"))}
    model = attach_lora(model, ranks)
    model.train()
    samples = [_owner_sample(model, shape, ranks, l, B, S)[1] for l in (1, 2) for B, S in ((2, 24), (3, 40))]

    errors = M.relative_errors(samples)  # FAMILY_CONSTANTS

    assert max(errors) <= 0.25


def test_calibrated_whole_model_prediction_includes_the_head():
    model, shape = _tiny("llama", layers=2)
    ranks = {n: 4 for n in lora_targets(model, kinds=("attn",))}
    model = attach_lora(model, ranks)
    ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    m = M.measure_step(model, lambda: unsplit_forward(model, ids, mask, ids)[0])
    sample = M.MemorySample(shape, 2, ranks, M.Workload(2, 24), m.peak, head=True)

    assert M.relative_errors([sample])[0] <= 0.25


@pytest.mark.parametrize(
    "samples,match",
    [
        ([], "at least one"),
        ([M.MemorySample(GPT2, 1, {}, WORK, peak=10)], "family 'gpt2'"),
    ],
)
def test_calibrate_rejects_bad_samples(samples, match):
    with pytest.raises(ValueError, match=match):
        M.calibrate("llama", samples)


def test_calibrate_refuses_to_mix_dropout_settings():
    on = dataclasses.replace(GPT2, dropout=True)
    samples = [M.MemorySample(GPT2, 1, {}, WORK, peak=10**6), M.MemorySample(on, 1, {}, WORK, peak=10**6)]

    with pytest.raises(ValueError, match="dropout"):
        M.calibrate("gpt2", samples)


def test_u_shape_moves_the_head_and_its_activations_from_helper_to_owner():
    c = M.constants_for(GPT2)
    head_acts = c.head * WORK.batch * WORK.seq_len * GPT2.vocab_size * 4
    two = M.owner_footprint(GPT2, 2, {}, WORK)
    u = M.owner_footprint(GPT2, 2, {}, WORK, with_head=True)
    with_head = M.helper_footprint(GPT2, [M.ServedOwner(2, WORK)])
    without = M.helper_footprint(GPT2, [M.ServedOwner(2, WORK, head=False)])

    assert u.frozen - two.frozen == 2 * GPT2.hidden * 4  # final norm; the tied head is the owner's wte
    assert u.activations - two.activations == pytest.approx(head_acts, abs=2)
    assert without.frozen == 2 * M.block_params(GPT2) * 4
    assert with_head.activations - without.activations == pytest.approx(head_acts, abs=2)
