"""JSONL records, tokenisation and batching (atlas_p2p.data)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from atlas_p2p.data import (
    BATCH_KEYS,
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    encode,
    iterate_batches,
    load_jsonl,
    records_from_dicts,
)
from atlas_p2p.synthetic import SyntheticTasks, synthetic_tokenizer


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_records(path, records):
    return write_lines(path, [json.dumps(r) for r in records])


@pytest.fixture(scope="module")
def tok():
    return synthetic_tokenizer()


# -- loading -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "records, kind",
    [
        ([{"text": "w01 k1", "label": 2, "task": "a"}, {"text": "k0", "label": 0}], "classification"),
        ([{"text": "w01 k1 ? a2"}, {"text": "k0 ? a1", "task": 3}], "lm"),
        (
            [{"prompt": "w01 k1 ?", "completion": "a2", "task": 0}, {"prompt": "k0 ?", "completion": "a1"}],
            "instruction",
        ),
    ],
)
def test_load_each_kind_keeps_task_apart(tmp_path, records, kind):
    loaded = load_jsonl(write_records(tmp_path / "d.jsonl", records))

    assert loaded.kind == kind
    assert len(loaded) == 2
    assert loaded.tasks == tuple(r.get("task") for r in records)
    assert "task" not in {f.name for f in dataclasses.fields(Example)}


def test_extra_fields_and_blank_lines_are_ignored(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ['{"text": "k1", "label": 1, "id": "x", "label_name": "adv"}', "", "  "])

    loaded = load_jsonl(path)

    assert loaded.examples == (Example(text="k1", label=1),)


@pytest.mark.parametrize(
    "lines, line, words",
    [
        (['{"text": "a", "label": 1}', '{"text": "b", "label": '], 2, "bad JSON"),
        (["[1, 2]"], 1, "JSON object"),
        (['{"label": 1}'], 1, "missing field 'text'"),
        (['{"prompt": "p"}'], 1, "missing field 'completion'"),
        (['{"prompt": "p", "completion": "c", "text": "t"}'], 1, "mixes"),
        (['{"text": "a", "label": 1}', '{"text": "b"}'], 2, "mixed kinds"),
        (['{"text": "a", "label": 1.0}'], 1, "must be an int"),
        (['{"text": "a", "label": true}'], 1, "must be an int"),
        (['{"text": "a", "label": "1"}'], 1, "must be an int"),
        (['{"text": "a", "label": -1}'], 1, ">= 0"),
        (['{"text": 5}'], 1, "must be a string"),
        (['{"text": "   "}'], 1, "is empty"),
        (['{"text": "a", "task": [1]}'], 1, "'task'"),
        (['{"text": "a", "task": 1.5}'], 1, "'task'"),
    ],
)
def test_bad_lines_name_file_line_and_problem(tmp_path, lines, line, words):
    path = write_lines(tmp_path / "bad.jsonl", lines)

    with pytest.raises(DataError) as err:
        load_jsonl(path)

    assert err.value.line == line
    assert str(err.value).startswith(f"{path}:{line}: ")
    assert words in str(err.value)


def test_bad_utf8_is_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')

    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid UTF-8"):
        load_jsonl(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)

    with pytest.raises(DataError, match="empty file"):
        load_jsonl(path)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="cannot read file"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_label_out_of_range_when_num_labels_given(tmp_path):
    path = write_records(tmp_path / "d.jsonl", [{"text": "a", "label": 1}, {"text": "b", "label": 4}])

    assert len(load_jsonl(path)) == 2
    with pytest.raises(DataError, match=r":2: label 4 out of range \[0, 4\)"):
        load_jsonl(path, num_labels=4)


# -- tokenisation --------------------------------------------------------------------
def test_classification_truncates_to_max_len(tok):
    records = records_from_dicts([{"text": "w01 w02 w03 w04 k1 w05", "label": 3}])

    enc = encode(records, tok, max_len=4)

    assert enc.input_ids == (tuple(tok.convert_tokens_to_ids(["w01", "w02", "w03", "w04"])),)
    assert enc.targets == (3,)


def test_lm_appends_eos_and_labels_every_real_token(tok):
    records = records_from_dicts([{"text": "k1 ? a2"}, {"text": "w01 k0 ? a1"}])

    batch = collate(encode(records, tok, max_len=16), [0, 1])

    first = tok.convert_tokens_to_ids(["k1", "?", "a2"]) + [tok.eos_token_id]
    assert batch["input_ids"][0, :4].tolist() == first
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] + first[1:] + [IGNORE_INDEX]  # first token, padding
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 1, 0]


def test_instruction_masks_the_prompt(tok):
    records = records_from_dicts([{"prompt": "w01 k1 ?", "completion": "a2"}])

    enc = encode(records, tok, max_len=16)

    prompt = tok.convert_tokens_to_ids(["w01", "k1", "?"])
    completion = tok.convert_tokens_to_ids(["a2"]) + [tok.eos_token_id]
    assert enc.input_ids[0] == tuple(prompt + completion)
    assert enc.targets[0] == tuple([IGNORE_INDEX] * 3 + completion)


def test_instruction_truncation_keeps_the_completion(tok):
    records = records_from_dicts([{"prompt": "w01 w02 w03 w04 k1 ?", "completion": "a2"}])

    enc = encode(records, tok, max_len=4)

    assert enc.input_ids[0] == tuple(tok.convert_tokens_to_ids(["k1", "?", "a2"]) + [tok.eos_token_id])
    assert enc.targets[0][:2] == (IGNORE_INDEX, IGNORE_INDEX)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_is_honoured(side):
    tok = synthetic_tokenizer()
    tok.padding_side = side
    records = records_from_dicts([{"text": "k1", "label": 1}, {"text": "w01 w02 k2", "label": 2}])

    batch = collate(encode(records, tok, max_len=8), [0, 1])

    mask = batch["attention_mask"][0].tolist()
    assert mask == ([1, 0, 0] if side == "right" else [0, 0, 1])
    assert batch["input_ids"][0, mask.index(1)].item() == tok.convert_tokens_to_ids("k1")
    assert batch["labels"].tolist() == [1, 2]


def test_tokenizer_special_tokens_are_used_for_classification():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "k1": 4, "w01": 5}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    bert_like = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")

    enc = encode(records_from_dicts([{"text": "w01 k1", "label": 0}]), bert_like, max_len=8)

    assert enc.input_ids[0] == (2, 5, 4, 3)


def test_tokenizer_without_pad_token_is_refused():
    tok = synthetic_tokenizer()
    tok.pad_token = None

    with pytest.raises(ValueError, match="no pad token"):
        encode(records_from_dicts([{"text": "k1"}]), tok, max_len=8)


# -- batching ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def encoded(tok):
    return encode(records_from_dicts(SyntheticTasks().generate(1, 23, "classification", seed=4)), tok, max_len=16)


def test_batches_are_seeded_and_cover_each_epoch_once(encoded):
    def order(seed):
        seen = []
        for batch in iterate_batches(encoded, 5, seed=seed):
            for row in batch["input_ids"]:
                seen.append(tuple(t for t in row.tolist() if t != encoded.pad_token_id))
        return seen

    first, again, other = order(3), order(3), order(4)

    assert first == again
    assert first != other
    assert sorted(first) == sorted(encoded.input_ids)


def test_batch_shapes_drop_last_and_epochs(encoded):
    sizes = [b["input_ids"].shape[0] for b in iterate_batches(encoded, 5, seed=0, drop_last=True, epochs=2)]
    assert sizes == [5] * 8

    stream = iterate_batches(encoded, 5, seed=0, epochs=None)
    batches = [next(stream) for _ in range(12)]  # more than one epoch
    assert all(set(b) == set(BATCH_KEYS) for b in batches)
    assert batches[0]["labels"].shape == (5,)


def test_bad_batching_arguments(encoded):
    with pytest.raises(ValueError, match="batch_size"):
        next(iterate_batches(encoded, 0, seed=0))
    with pytest.raises(ValueError, match="drop_last"):
        next(iterate_batches(encoded, 100, seed=0, drop_last=True))


def test_task_field_never_reaches_batches(tmp_path, tok):
    base = SyntheticTasks().generate(0, 12, "instruction", seed=9)
    relabelled = [dict(r, task=f"other-{i}") for i, r in enumerate(base)]
    stripped = [{k: v for k, v in r.items() if k != "task"} for r in base]
    files = [write_records(tmp_path / f"{i}.jsonl", recs) for i, recs in enumerate((base, relabelled, stripped))]

    runs = [list(iterate_batches(encode(load_jsonl(f), tok, 16), 4, seed=1)) for f in files]

    assert load_jsonl(files[0]).tasks != load_jsonl(files[1]).tasks
    for batches in runs[1:]:
        for a, b in zip(runs[0], batches):
            assert set(a) == set(b) == set(BATCH_KEYS)
            assert all(torch.equal(a[k], b[k]) for k in BATCH_KEYS)


@pytest.mark.parametrize("side", ["left", "right"])
def test_causal_batches_give_the_same_loss_to_hf_and_to_models_losses(side):
    from atlas_p2p.models import causal_lm_loss, tiny_model

    tok = synthetic_tokenizer()
    tok.padding_side = side
    model = tiny_model("llama", "causal_lm", vocab_size=len(tok), num_layers=1, seed=0)
    for kind in ("lm", "instruction"):
        records = records_from_dicts(SyntheticTasks().generate(0, 6, kind, seed=2))
        batch = collate(encode(records, tok, max_len=16), range(6))

        with torch.no_grad():
            out = model(**batch)
            ours = causal_lm_loss(out.logits, batch["labels"], attention_mask=batch["attention_mask"])

        assert torch.allclose(out.loss, ours, atol=1e-6)
