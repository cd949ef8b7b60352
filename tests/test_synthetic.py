"""The synthetic conflicting-task generator and its tokenizer (atlas_p2p.synthetic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas_p2p.data import collate, encode, iterate_batches, load_jsonl, records_from_dicts
from atlas_p2p.synthetic import (
    KINDS,
    QUESTION,
    SyntheticConfig,
    SyntheticTasks,
    synthetic_tokenizer,
    write_synthetic_jsonl,
)


def key_of(sentence: str, gen: SyntheticTasks) -> int:
    keys = [w for w in sentence.split() if w in gen.keys]
    assert len(keys) == 1, sentence
    return gen.keys.index(keys[0])


@pytest.mark.parametrize("kind", KINDS)
def test_generation_is_deterministic_for_a_seed(kind):
    gen = SyntheticTasks()

    assert gen.generate(2, 20, kind, seed=5) == gen.generate(2, 20, kind, seed=5)
    assert gen.generate(2, 20, kind, seed=5) != gen.generate(2, 20, kind, seed=6)


def test_records_have_the_kind_shape_and_one_key():
    gen = SyntheticTasks()
    cfg = gen.config

    cls = gen.generate(1, 50, "classification", seed=0)
    ins = gen.generate(1, 50, "instruction", seed=0)
    lm = gen.generate(1, 50, "lm", seed=0)

    for c, i, m in zip(cls, ins, lm):
        assert set(c) == {"text", "label", "task"} and c["task"] == 1
        assert set(i) == {"prompt", "completion", "task"}
        assert set(m) == {"text", "task"}
        assert cfg.min_words <= len(c["text"].split()) <= cfg.max_words
        assert c["label"] == gen.target(1, key_of(c["text"], gen))
        assert i["prompt"] == f"{c['text']} {QUESTION}" and i["completion"] == gen.answers[c["label"]]
        assert m["text"] == f"{i['prompt']} {i['completion']}"


def test_tasks_share_inputs_and_conflict_on_every_key():
    gen = SyntheticTasks(SyntheticConfig(num_tasks=4, num_labels=4))

    per_task = [gen.generate(t, 30, "classification", seed=3) for t in range(4)]

    texts = [[r["text"] for r in recs] for recs in per_task]
    assert all(t == texts[0] for t in texts)  # same inputs for the same seed
    maps = gen.task_maps  # (tasks, keys)
    for a in range(4):
        for b in range(a + 1, 4):
            assert np.all(maps[a] != maps[b])  # any shared adapter is wrong for one of them
    assert all(sorted(m) == list(range(4)) for m in maps)  # each task uses every label


def test_more_tasks_than_labels_still_get_distinct_maps():
    gen = SyntheticTasks(SyntheticConfig(num_tasks=7, num_labels=3, num_keys=6, seed=2))

    maps = {tuple(m) for m in gen.task_maps}

    assert len(maps) == 7
    assert all(np.bincount(m, minlength=3).tolist() == [2, 2, 2] for m in gen.task_maps)


def test_key_prior_is_skewed_and_shared():
    gen = SyntheticTasks(SyntheticConfig(key_skew=1.5))
    uniform = SyntheticTasks(SyntheticConfig(key_skew=0.0))

    counts = np.bincount([key_of(r["text"], gen) for r in gen.generate(0, 2000, seed=1)], minlength=4)

    assert np.all(np.diff(gen.key_probs) < 0)
    assert np.allclose(uniform.key_probs, 0.25)
    assert np.allclose(counts / 2000, gen.key_probs, atol=0.04)


@pytest.mark.parametrize(
    "field, value",
    [("num_tasks", 0), ("num_labels", 1), ("num_keys", 2), ("max_words", 1), ("key_skew", -1.0), ("seed", 1.5)],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticConfig(**{field: value})


def test_bad_generate_arguments():
    gen = SyntheticTasks()
    with pytest.raises(ValueError, match="task"):
        gen.generate(4, 3)
    with pytest.raises(ValueError, match="kind"):
        gen.generate(0, 3, kind="qa")
    with pytest.raises(ValueError, match="n must"):
        gen.generate(0, -1)


def test_tokenizer_is_a_real_fast_tokenizer_over_the_vocabulary():
    from transformers import PreTrainedTokenizerFast

    from atlas_p2p.models.loading import BOS_ID, EOS_ID, PAD_ID

    gen = SyntheticTasks()
    tok = synthetic_tokenizer()
    text = gen.generate(3, 1, "lm", seed=0)[0]["text"]

    ids = tok(text, add_special_tokens=True)["input_ids"]

    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == len(gen.vocabulary) < 512
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok("zzz")["input_ids"] == [tok.unk_token_id]


def test_write_synthetic_jsonl_round_trips(tmp_path):
    path = write_synthetic_jsonl(tmp_path / "sub" / "t2.jsonl", task=2, n=15, kind="instruction", seed=8)

    loaded = load_jsonl(path)

    assert loaded.kind == "instruction"
    assert loaded.tasks == (2,) * 15
    expected = SyntheticTasks().generate(2, 15, "instruction", seed=8)
    assert [e.completion for e in loaded.examples] == [r["completion"] for r in expected]


def test_a_task_is_learnable_by_a_tiny_lora_model_in_100_steps():
    from atlas_p2p.lora import attach_lora, lora_targets
    from atlas_p2p.models import tiny_model

    gen, tok = SyntheticTasks(), synthetic_tokenizer()
    model = tiny_model("gpt2", "seq_cls", vocab_size=len(tok), num_labels=4, num_layers=2, seed=0)
    peft_model = attach_lora(model, {name: 8 for name in lora_targets(model)}, seed=0)
    train = encode(records_from_dicts(gen.generate(1, 3200, seed=1)), tok, max_len=16)
    test = encode(records_from_dicts(gen.generate(1, 256, seed=2)), tok, max_len=16)
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)

    for step, batch in enumerate(iterate_batches(train, 32, seed=0)):
        if step == 100:
            break
        loss = peft_model(**batch).loss
        optim.zero_grad()
        loss.backward()
        optim.step()
    batch = collate(test, range(len(test)))
    with torch.no_grad():
        accuracy = (peft_model(**batch).logits.argmax(-1) == batch["labels"]).float().mean().item()

    majority = float(np.max(SyntheticTasks().key_probs))
    assert accuracy > 0.95 > majority + 0.2
