"""Loading, tiny models, family adapters and the shared losses."""

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from atlas_p2p.models import (
    CAUSAL_LM,
    IGNORE_INDEX,
    SEQ_CLS,
    TINY_FAMILIES,
    ModelLoadError,
    causal_lm_labels,
    causal_lm_loss,
    classification_loss,
    family_of,
    load_model,
    load_tokenizer,
    lora_module_names,
    num_layers,
    pool_last_token,
    positions_from_mask,
    save_base,
    task_of,
    tiny_model,
    unsplit_forward,
)

VOCAB = 40


def _tiny(family="llama", task=CAUSAL_LM, seed=0, **kw):
    return tiny_model(
        family,
        task,
        VOCAB,
        num_labels=2 if task == SEQ_CLS else None,
        num_layers=2,
        hidden=16,
        heads=2,
        seed=seed,
        **kw,
    )


def _word_tokenizer():
    words = ["[PAD]", "<s>", "</s>", "[UNK]"] + [f"w{i}" for i in range(VOCAB - 4)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")


# ---- tiny models -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,task", [(f, CAUSAL_LM) for f in TINY_FAMILIES if f != "bert"] + [(f, SEQ_CLS) for f in TINY_FAMILIES]
)
def test_tiny_models_build_for_every_family_and_task(family, task):
    model = _tiny(family, task)
    ids = torch.randint(3, VOCAB, (2, 5))
    _, logits = unsplit_forward(model, ids)
    assert family_of(model).name == {"qwen2": "llama", "mistral": "llama"}.get(family, family)
    assert task_of(model) == task and num_layers(model) == 2
    assert logits.shape == ((2, 5, VOCAB) if task == CAUSAL_LM else (2, 2))


def test_tiny_model_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a, b, c = _tiny(seed=4), _tiny(seed=4), _tiny(seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(family="t5", task=CAUSAL_LM), "family"),
        (dict(family="bert", task=CAUSAL_LM), "seq_cls"),
        (dict(family="gpt2", task="generate"), "task"),
        (dict(family="gpt2", task=SEQ_CLS), "num_labels"),
        (dict(family="gpt2", task=SEQ_CLS, num_labels=0), "num_labels"),
        (dict(family="gpt2", task=CAUSAL_LM, num_labels=3), "num_labels"),
        (dict(family="llama", task=CAUSAL_LM, hidden=30, heads=4), "hidden"),
        (dict(family="llama", task=CAUSAL_LM, num_layers=0), "num_layers"),
    ],
)
def test_tiny_model_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_model(vocab_size=VOCAB, **kwargs)


# ---- family adapters ----------------------------------------------------------------------------


def test_family_adapter_locates_blocks_norm_and_lora_modules():
    model = _tiny("gpt2")
    family = family_of(model)
    modules = dict(model.named_modules())

    assert family.blocks(model) is model.transformer.h
    assert family.final_norm(model) is model.transformer.ln_f
    assert family.conv1d
    names = lora_module_names(model, 1, ("attn", "mlp"))
    assert names == [
        "transformer.h.1.attn.c_attn",
        "transformer.h.1.attn.c_proj",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]
    assert all(n in modules for n in names)


def test_bert_family_has_no_final_norm_and_a_pooled_head():
    model = _tiny("bert", SEQ_CLS)
    family = family_of(model)
    assert family.final_norm(model) is None
    assert set(family.head_modules(model, SEQ_CLS)) == {"bert_pooler", "dropout", "classifier"}


def test_unsupported_models_are_rejected_clearly():
    with pytest.raises(ValueError, match="unsupported model_type"):
        family_of(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="layer"):
        lora_module_names(_tiny(), 2)
    with pytest.raises(ValueError, match="kinds"):
        lora_module_names(_tiny(), 0, ("ffn",))


def test_positions_follow_the_real_tokens():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]


def test_pool_last_token_picks_the_rightmost_real_token_for_both_paddings():
    hidden = torch.arange(10.0).reshape(2, 5, 1)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert pool_last_token(hidden, mask).flatten().tolist() == [4.0, 7.0]


# ---- losses -------------------------------------------------------------------------------------


def test_causal_lm_labels_mask_padding_prompt_and_first_token():
    ids = torch.tensor([[0, 0, 5, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    prompt = torch.tensor([[1, 1, 1, 1, 0, 0]])  # completion = last two tokens
    assert causal_lm_labels(ids, mask).tolist() == [[-100, -100, -100, 6, 7, 8]]
    assert causal_lm_labels(ids, mask, loss_mask=1 - prompt).tolist() == [[-100, -100, -100, -100, 7, 8]]


def test_causal_lm_loss_is_the_mean_shifted_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=gen)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX], [1, 2, 6, 0]])
    kept = [(0, 0, 3), (0, 1, 4), (1, 0, 2), (1, 1, 6), (1, 2, 0)]  # (row, source position, target)
    expected = torch.stack([F.cross_entropy(logits[b, t][None], torch.tensor([y])) for b, t, y in kept]).mean()
    assert torch.allclose(causal_lm_loss(logits, labels), expected, atol=1e-6)


def test_causal_lm_loss_mask_and_attention_mask_drop_targets():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 4, 5, generator=gen)
    labels = torch.tensor([[1, 2, 3, 4]])
    only_last = causal_lm_loss(logits, labels, loss_mask=torch.tensor([[1, 1, 1, 0]]))
    no_pad_source = causal_lm_loss(logits, labels, attention_mask=torch.tensor([[0, 1, 1, 1]]))

    def ref(ts):
        return torch.stack([F.cross_entropy(logits[0, t][None], labels[0, t + 1][None]) for t in ts]).mean()

    assert torch.allclose(only_last, ref([0, 1]), atol=1e-6)
    assert torch.allclose(no_pad_source, ref([1, 2]), atol=1e-6)


def test_causal_lm_loss_without_counted_tokens_is_zero_and_differentiable():
    logits = torch.randn(1, 3, 5, requires_grad=True)
    loss = causal_lm_loss(logits, torch.full((1, 3), IGNORE_INDEX))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(logits.grad) == 0


def test_causal_lm_loss_rejects_bad_labels():
    logits = torch.zeros(1, 3, 5)
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(logits, torch.tensor([[1, 9, 2]]))
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(logits, torch.tensor([[1, 2]]))


def test_classification_loss_cross_entropy_and_regression():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 1])
    assert torch.allclose(classification_loss(logits, labels), F.cross_entropy(logits, labels))
    reg = classification_loss(torch.tensor([[0.5], [1.0]]), torch.tensor([1.0, 1.0]))
    assert torch.allclose(reg, torch.tensor(0.125))
    with pytest.raises(ValueError, match="labels"):
        classification_loss(logits, torch.tensor([0.0, 1.0]))


def test_unsplit_forward_matches_hugging_face_losses():
    lm, cls = _tiny("gpt2"), _tiny("llama", SEQ_CLS)
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    labels = causal_lm_labels(ids, mask)
    classes = torch.tensor([1, 0])

    ours_lm, _ = unsplit_forward(lm, ids, mask, labels)
    ours_cls, _ = unsplit_forward(cls, ids, mask, classes)

    assert abs(ours_lm.item() - lm(input_ids=ids, attention_mask=mask, labels=labels).loss.item()) < 1e-6
    assert abs(ours_cls.item() - cls(input_ids=ids, attention_mask=mask, labels=classes).loss.item()) < 1e-6


# ---- loading from disk ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family,task", [("gpt2", CAUSAL_LM), ("qwen2", CAUSAL_LM), ("bert", SEQ_CLS), ("llama", SEQ_CLS)]
)
def test_saved_base_reloads_with_identical_outputs(tmp_path, family, task):
    model = _tiny(family, task)
    save_base(model, _word_tokenizer(), tmp_path)
    loaded = load_model(tmp_path, task, num_labels=2 if task == SEQ_CLS else None, offline=True)
    ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        assert torch.allclose(unsplit_forward(loaded, ids)[1], unsplit_forward(model, ids)[1], atol=1e-6)
    assert family_of(loaded).name == family_of(model).name


def test_load_model_casts_to_the_requested_dtype(tmp_path):
    save_base(_tiny("llama"), None, tmp_path)
    model = load_model(tmp_path, offline=True, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_decoder_loaded_for_classification_gets_a_pad_id(tmp_path):
    model = _tiny("gpt2")
    model.config.pad_token_id = None
    save_base(model, None, tmp_path)
    cls = load_model(tmp_path, SEQ_CLS, num_labels=4, offline=True)
    assert cls.config.pad_token_id == model.config.eos_token_id and task_of(cls) == SEQ_CLS


def test_missing_model_gives_an_error_naming_it(tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-org/no-such-model"):
        load_model("no-such-org/no-such-model", offline=True)
    with pytest.raises(ModelLoadError, match="no such directory"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="task"):
        load_model(str(tmp_path), task="generate")


def test_bert_checkpoint_cannot_be_loaded_for_causal_lm(tmp_path):
    save_base(_tiny("bert", SEQ_CLS), None, tmp_path)
    with pytest.raises((ValueError, ModelLoadError)):
        load_model(tmp_path, CAUSAL_LM, offline=True)


def test_tokenizer_round_trip_pads_with_eos(tmp_path):
    save_base(_tiny("gpt2"), _word_tokenizer(), tmp_path)
    tok = load_tokenizer(tmp_path, offline=True, padding_side="left")
    batch = tok(["w1 w2 w3", "w4"], padding=True)
    assert tok.pad_token == "</s>"
    assert batch["attention_mask"] == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ModelLoadError, match="no-such-org/tok"):
        load_tokenizer("no-such-org/tok", offline=True)
    with pytest.raises(ValueError, match="padding_side"):
        load_tokenizer(tmp_path, offline=True, padding_side="middle")
