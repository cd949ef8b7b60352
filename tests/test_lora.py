"""peft LoRA plumbing: per-module ranks, factors in/out, base folding, PEFT directory export."""

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from atlas_p2p.aggregation import AdapterFactors
from atlas_p2p.lora import (
    add_delta_to_base,
    attach_lora,
    base_weight,
    get_dense_trainables,
    get_factors,
    load_peft_dir,
    lora_targets,
    reset_adapters,
    save_peft_dir,
    set_dense_trainables,
    set_factors,
)
from atlas_p2p.models import CAUSAL_LM, SEQ_CLS, load_model, save_base, tiny_model, unsplit_forward

VOCAB = 64


def _model(family="llama", task=CAUSAL_LM, layers=3, seed=0):
    return tiny_model(
        family, task, VOCAB, num_labels=3 if task == SEQ_CLS else None, num_layers=layers, hidden=32, heads=4, seed=seed
    )


def _ids():
    return torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))


def _perturb(peft_model, seed=1):
    """Give every trainable tensor (LoRA A and B, head copy) random values so outputs depend on them."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=gen))


def _logits(model, ids=None):
    with torch.no_grad():
        return unsplit_forward(model, _ids() if ids is None else ids)[1]


# ---- targets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,task,per_attn,per_mlp",
    [
        ("gpt2", CAUSAL_LM, 2, 2),
        ("llama", CAUSAL_LM, 4, 3),
        ("qwen2", CAUSAL_LM, 4, 3),
        ("bert", SEQ_CLS, 4, 2),
    ],
)
def test_lora_targets_name_existing_linears_per_kind(family, task, per_attn, per_mlp):
    model = _model(family, task)
    attn = lora_targets(model)
    both = lora_targets(model, layers=[1], kinds=("attn", "mlp"))
    modules = dict(model.named_modules())

    assert len(attn) == 3 * per_attn and len(both) == per_attn + per_mlp
    assert all(n in modules for n in attn + both)
    assert all(".1." in n for n in both)


def test_lora_targets_reject_bad_kinds_and_layers():
    model = _model()
    with pytest.raises(ValueError, match="kinds"):
        lora_targets(model, kinds=("ffn",))
    with pytest.raises(ValueError, match="layers"):
        lora_targets(model, layers=[3])


# ---- attaching with per-module ranks --------------------------------------------------------


def test_rank_pattern_gives_each_module_its_rank_and_rank_zero_no_adapter():
    model = _model("llama", CAUSAL_LM, layers=12)
    q1, q11 = "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj"
    k1 = "model.layers.1.self_attn.k_proj"
    peft_model = attach_lora(model, {q1: 2, q11: 8, k1: 0}, alpha={q1: 4.0, q11: 4.0})
    modules = dict(peft_model.base_model.model.named_modules())
    factors = get_factors(peft_model)

    assert sorted(factors) == sorted([q1, q11])
    assert factors[q1].rank == 2 and factors[q11].rank == 8  # "layers.1" must not catch "layers.11"
    assert factors[q1].scaling == pytest.approx(2.0) and factors[q11].scaling == pytest.approx(0.5)
    assert not isinstance(modules[k1], LoraLayer)
    assert sum(isinstance(m, LoraLayer) for m in modules.values()) == 2


def test_default_alpha_is_rank_so_scaling_is_one():
    model = _model()
    peft_model = attach_lora(model, {n: 4 for n in lora_targets(model, layers=[0])})
    assert all(f.scaling == 1.0 for f in get_factors(peft_model).values())


def test_fresh_adapters_do_not_change_the_model():
    model = _model("gpt2")
    before = _logits(model)
    peft_model = attach_lora(model, {n: 4 for n in lora_targets(model, kinds=("attn", "mlp"))})
    assert torch.allclose(_logits(peft_model), before, atol=1e-6)


def test_gpt2_conv1d_factors_are_oriented_out_by_in():
    model = _model("gpt2")
    name = "transformer.h.0.attn.c_attn"  # Conv1D, weight stored (32, 96)
    peft_model = attach_lora(model, {name: 4})
    f = get_factors(peft_model)[name]
    assert f.A.shape == (4, 32) and f.B.shape == (96, 4)
    assert base_weight(peft_model, name).shape == (96, 32)


def test_seq_cls_head_is_trainable_and_only_adapters_otherwise():
    model = _model("llama", SEQ_CLS)
    peft_model = attach_lora(model, {n: 2 for n in lora_targets(model, layers=[0])})
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]

    assert sorted(get_dense_trainables(peft_model)) == ["score.weight"]
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert any("modules_to_save" in n for n in trainable)


def test_bert_head_defaults_to_classifier_and_can_be_frozen():
    model = _model("bert", SEQ_CLS)
    trained = attach_lora(model, {n: 2 for n in lora_targets(model, layers=[0])})
    assert sorted(get_dense_trainables(trained)) == ["classifier.bias", "classifier.weight"]
    frozen = attach_lora(_model("bert", SEQ_CLS), {n: 2 for n in lora_targets(model, layers=[0])}, modules_to_save=[])
    assert get_dense_trainables(frozen) == {}


@pytest.mark.parametrize(
    "ranks,kwargs,match",
    [
        ({}, {}, "ranks"),
        ({"model.layers.0.self_attn.q_proj": 0}, {}, "every rank is 0"),
        ({"model.layers.0.self_attn.q_proj": -1}, {}, "ranks"),
        ({"model.layers.0.self_attn.q_proj": 2.0}, {}, "ranks"),
        ({"model.layers.9.self_attn.q_proj": 2}, {}, "no module"),
        ({"model.layers.0.input_layernorm": 2}, {}, "not a Linear"),
        ({"model.layers.0.self_attn.q_proj": 2}, {"alpha": {"x": 1.0}}, "alpha"),
        ({"model.layers.0.self_attn.q_proj": 2}, {"alpha": -1.0}, "alpha"),
        ({"model.layers.0.self_attn.q_proj": 2}, {"dropout": 1.5}, "dropout"),
        ({"model.layers.0.self_attn.q_proj": 2}, {"modules_to_save": ["nope"]}, "modules_to_save"),
    ],
)
def test_attach_lora_rejects_bad_arguments_before_changing_the_model(ranks, kwargs, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        attach_lora(model, ranks, **kwargs)
    assert not any(isinstance(m, LoraLayer) for m in model.modules())


def test_attach_lora_twice_is_rejected():
    model = _model()
    peft_model = attach_lora(model, {"model.layers.0.self_attn.q_proj": 2})
    with pytest.raises(ValueError, match="already"):
        attach_lora(peft_model, {"model.layers.0.self_attn.q_proj": 2})


# ---- initialisation -------------------------------------------------------------------------


def test_adapter_init_depends_only_on_seed_and_module_name():
    q0 = "model.layers.0.self_attn.q_proj"
    small = get_factors(attach_lora(_model(), {q0: 4}, seed=11))
    large = get_factors(attach_lora(_model(), {n: 4 for n in lora_targets(_model(), kinds=("attn", "mlp"))}, seed=11))
    other = get_factors(attach_lora(_model(), {q0: 4}, seed=12))

    assert torch.equal(small[q0].A, large[q0].A)
    assert not torch.equal(small[q0].A, other[q0].A)
    assert torch.count_nonzero(small[q0].B) == 0


def test_reset_adapters_restores_the_fresh_state_for_a_seed():
    model = _model()
    peft_model = attach_lora(model, {n: 2 for n in lora_targets(model)}, seed=3)
    fresh = get_factors(peft_model)
    _perturb(peft_model)

    reset_adapters(peft_model, seed=3)

    again = get_factors(peft_model)
    assert all(torch.equal(fresh[n].A, again[n].A) and torch.count_nonzero(again[n].B) == 0 for n in fresh)


# ---- factors and dense trainables in/out -----------------------------------------------------


def test_get_set_factors_round_trip_between_models_gives_identical_outputs():
    names = lora_targets(_model("gpt2"), kinds=("attn", "mlp"))
    ranks = {n: (0, 2, 8)[i % 3] for i, n in enumerate(names)}
    src = attach_lora(_model("gpt2"), ranks, alpha=8.0, seed=1)
    dst = attach_lora(_model("gpt2"), ranks, alpha=8.0, seed=2)
    _perturb(src)

    set_factors(dst, get_factors(src))

    assert torch.allclose(_logits(dst), _logits(src), atol=1e-6)
    assert not torch.allclose(_logits(src), _logits(_model("gpt2")), atol=1e-3)


def test_get_factors_returns_copies():
    peft_model = attach_lora(_model(), {"model.layers.0.self_attn.q_proj": 2})
    f = get_factors(peft_model)["model.layers.0.self_attn.q_proj"]
    f.A.add_(1.0)
    assert not torch.equal(f.A, get_factors(peft_model)["model.layers.0.self_attn.q_proj"].A)


def _bad_factor_sets(f, name):
    return [
        ({name: AdapterFactors(torch.zeros(3, f.A.shape[1]), torch.zeros(f.B.shape[0], 3), f.scaling)}, "shape"),
        ({name: AdapterFactors(f.A.double(), f.B.double(), f.scaling)}, "dtype"),
        ({name: AdapterFactors(f.A, f.B, f.scaling * 2)}, "scaling"),
        ({"model.layers.2.mlp.up_proj": f}, "no LoRA adapter"),
        ({name: (f.A, f.B)}, "expected AdapterFactors"),
    ]


def test_set_factors_rejects_mismatches_and_changes_nothing():
    q0, k0 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    peft_model = attach_lora(_model(), {q0: 2, k0: 2})
    before = get_factors(peft_model)
    good_k = AdapterFactors(torch.ones_like(before[k0].A), torch.ones_like(before[k0].B), before[k0].scaling)
    for bad, match in _bad_factor_sets(before[q0], q0):
        with pytest.raises(ValueError, match=match):
            set_factors(peft_model, {k0: good_k, **bad})  # the valid entry must not be applied either
    after = get_factors(peft_model)
    assert all(torch.equal(before[n].A, after[n].A) and torch.equal(before[n].B, after[n].B) for n in before)


def test_factors_validate_their_own_shapes():
    with pytest.raises(ValueError, match="rank mismatch"):
        AdapterFactors(torch.zeros(2, 4), torch.zeros(4, 3), 1.0)
    with pytest.raises(ValueError, match="scaling"):
        AdapterFactors(torch.zeros(2, 4), torch.zeros(4, 2), float("inf"))
    with pytest.raises(ValueError, match="NaN"):
        AdapterFactors(torch.full((2, 4), float("nan")), torch.zeros(4, 2), 1.0)


def test_dense_trainables_round_trip_and_validation():
    ranks = {"model.layers.0.self_attn.q_proj": 2}
    src, dst = attach_lora(_model("llama", SEQ_CLS), ranks), attach_lora(_model("llama", SEQ_CLS), ranks, seed=5)
    _perturb(src)
    assert not torch.allclose(_logits(dst), _logits(src), atol=1e-3)
    set_factors(dst, get_factors(src))
    set_dense_trainables(dst, get_dense_trainables(src))
    assert torch.allclose(_logits(dst), _logits(src), atol=1e-6)

    with pytest.raises(ValueError, match="score.weight"):
        set_dense_trainables(dst, {"score.weight": torch.zeros(2, 32)})
    with pytest.raises(ValueError, match="not a dense trainable"):
        set_dense_trainables(dst, {"lm_head.weight": torch.zeros(3, 32)})


# ---- folding into the base --------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_add_delta_to_base_equals_peft_merge(family):
    names = lora_targets(_model(family), kinds=("attn", "mlp"))
    ranks = {n: (2, 4, 0)[i % 3] for i, n in enumerate(names)}
    merged, folded = attach_lora(_model(family), ranks, alpha=6.0), attach_lora(_model(family), ranks, alpha=6.0)
    _perturb(merged)
    set_factors(folded, get_factors(merged))
    expected = _logits(merged)

    for name, f in get_factors(folded).items():
        before = base_weight(folded, name)
        add_delta_to_base(folded, name, f.delta())
        assert torch.allclose(base_weight(folded, name), before + f.delta(), atol=1e-6)
    reset_adapters(folded, seed=0)  # B = 0: the adapters now add nothing
    merged_model = merged.merge_and_unload()

    assert torch.allclose(_logits(folded), expected, atol=1e-5)
    assert torch.allclose(_logits(merged_model), expected, atol=1e-5)


def test_add_delta_to_base_accepts_numpy_and_plain_models():
    model = _model("gpt2")
    name = "transformer.h.1.mlp.c_fc"  # Conv1D (32 -> 128)
    before = base_weight(model, name)
    delta = np.full((128, 32), 0.25, dtype=np.float64)

    add_delta_to_base(model, name, delta)

    assert torch.allclose(base_weight(model, name), before + 0.25)


@pytest.mark.parametrize(
    "delta,match",
    [
        (torch.zeros(32, 32), "shape"),
        (torch.zeros(96, 32, dtype=torch.long), "floating"),
        (torch.full((96, 32), float("inf")), "NaN or infinite"),
        ("delta", "floating"),
    ],
)
def test_add_delta_to_base_rejects_bad_deltas(delta, match):
    model = _model("gpt2")
    before = base_weight(model, "transformer.h.0.attn.c_attn")
    with pytest.raises(ValueError, match=match):
        add_delta_to_base(model, "transformer.h.0.attn.c_attn", delta)
    assert torch.equal(base_weight(model, "transformer.h.0.attn.c_attn"), before)


def test_base_weight_rejects_unknown_and_non_linear_modules():
    model = _model("gpt2")
    with pytest.raises(ValueError, match="no module"):
        base_weight(model, "transformer.h.7.attn.c_attn")
    with pytest.raises(ValueError, match="not a Linear"):
        base_weight(model, "transformer.ln_f")


# ---- export ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family,task", [("gpt2", CAUSAL_LM), ("llama", SEQ_CLS), ("bert", SEQ_CLS)])
def test_peft_dir_loads_with_from_pretrained_and_gives_identical_logits(tmp_path, family, task):
    names = lora_targets(_model(family, task), kinds=("attn", "mlp"))
    ranks = {n: (0, 2, 4, 8)[i % 4] for i, n in enumerate(names)}
    peft_model = attach_lora(_model(family, task), ranks, alpha=8.0)
    _perturb(peft_model)

    out = save_peft_dir(peft_model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(_model(family, task), str(out))

    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["rank_pattern"]
    assert torch.allclose(_logits(reloaded), _logits(peft_model), atol=1e-6)


def test_modified_base_and_adapter_reload_from_disk(tmp_path):
    ranks = {"model.layers.0.self_attn.q_proj": 4, "model.layers.2.mlp.down_proj": 2}
    peft_model = attach_lora(_model("llama", SEQ_CLS), ranks)
    _perturb(peft_model)
    add_delta_to_base(peft_model, "model.layers.1.self_attn.v_proj", torch.full((16, 32), 0.1))

    save_base(peft_model, None, tmp_path / "base")
    save_peft_dir(peft_model, tmp_path / "adapter")
    base = load_model(tmp_path / "base", SEQ_CLS, num_labels=3, offline=True)
    v1 = "model.layers.1.self_attn.v_proj"
    assert torch.equal(base_weight(base, v1), base_weight(peft_model, v1))  # the folded delta survived
    reloaded = load_peft_dir(base, tmp_path / "adapter")

    assert torch.allclose(_logits(reloaded), _logits(peft_model), atol=1e-6)


def test_save_peft_dir_needs_a_peft_model(tmp_path):
    with pytest.raises(ValueError, match="PeftModel"):
        save_peft_dir(_model(), tmp_path)
