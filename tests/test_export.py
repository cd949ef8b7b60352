"""Exact export: a cluster's folded update as a PEFT adapter that IS the trained model.

The update is built the way a cluster builds it: each round, members with heterogeneous
ranks contribute, ``stack_merge`` merges them exactly and ``fold_into`` folds the patch into
the node's model and its patch log. The adapter written from that log is then loaded by
stock ``PeftModel.from_pretrained`` and compared, weight by weight and logit by logit,
with the folded model. No network, tiny models only.
"""

import json

import pytest
import torch
from peft import PeftModel

from atlas_p2p.aggregation import Contribution, rank_within, stack_merge, stacked_singular_values
from atlas_p2p.lora import attach_lora, get_dense_trainables, get_factors, lora_targets
from atlas_p2p.models import CAUSAL_LM, SEQ_CLS, tiny_model
from atlas_p2p.training import (
    AdapterCard,
    FactorMemo,
    OwnerConfig,
    OwnerSession,
    RoundEval,
    export_adapter,
    render_card,
)
from atlas_p2p.training.export import total_update, update_digest
from atlas_p2p.training.modules import weight_shape
from atlas_p2p.versioning import VersionedBase
from tests.tiny_batches import padded_batches

VOCAB, LAYERS, HIDDEN, HEADS, LABELS = 40, 2, 32, 4, 3
ROUNDS = 3
MEMBER_RANKS = {1: (2, 1), 2: (4, 1), 3: (1, 2)}  # node -> rank pattern over the target modules


def _model(family, task):
    return tiny_model(
        family,
        task,
        VOCAB,
        num_labels=LABELS if task == SEQ_CLS else None,
        num_layers=LAYERS,
        hidden=HIDDEN,
        heads=HEADS,
        seed=0,
    )


def _targets(family, task):
    return lora_targets(_model(family, task), kinds=("attn", "mlp"))


def _contribution(model, node, round_, targets, heads):
    """Random factors of the node's ranks (scaling α/r with α = 8) and a head change."""
    gen = torch.Generator().manual_seed(1000 * round_ + node)
    pattern = MEMBER_RANKS[node]
    factors = {}
    for i, name in enumerate(targets):
        r = pattern[i % len(pattern)]
        d_out, d_in = weight_shape(model, name)
        factors[name] = (0.3 * torch.randn(r, d_in, generator=gen), 0.3 * torch.randn(d_out, r, generator=gen), 8.0 / r)
    dense = {n: 0.1 * torch.randn(t.shape, generator=gen) for n, t in heads.items()}
    return Contribution(factors, n_samples=10 * node, node_id=str(node), round=round_, dense=dense)


def _folded(family, task, rounds=ROUNDS):
    """(node 2's model, its patch log) after `rounds` merged rounds of every member, folded by its session."""
    targets = _targets(family, task)
    model = attach_lora(_model(family, task), {n: 2 for n in targets})  # the node's own adapters (B = 0)
    heads = get_dense_trainables(model)
    session = OwnerSession(model, OwnerConfig(node_id=2, split=1), base=VersionedBase("0"))
    session.start_round(0)
    for r in range(rounds):
        session.fold(stack_merge([_contribution(model, node, r, targets, heads) for node in MEMBER_RANKS]))
    return session.model, session.base


def _batches(task, n=3, seed=1):
    """n batches of 3 rows of 7 tokens, one left-padded."""
    return padded_batches(task, n, rows=3, length=7, vocab=VOCAB, num_labels=LABELS, seed=seed)


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _relative_errors(loaded, log):
    """||ΔW - γ B A||_F / ||ΔW||_F per module, from the loaded adapter's own tensors (float64)."""
    update = log.folded_delta()
    out = {}
    for name, f in get_factors(loaded).items():
        sf = update.modules[name]
        exact = sf.B.double() @ sf.A.double()  # (d_out, d_in), not rounded to float32
        stored = f.scaling * (f.B.double() @ f.A.double())
        out[name] = float(torch.linalg.norm(exact - stored) / torch.linalg.norm(exact))
    return out


def _card(**overrides):
    fields = dict(
        base_model="org/tiny-base",
        task=SEQ_CLS,
        num_labels=LABELS,
        label_names=("neg", "neu", "pos"),
        cluster="0",
        members=(1, 2, 3),
        rounds=ROUNDS,
        node_id=2,
        evals=(RoundEval(0, "accuracy", 0.5), RoundEval(1, "accuracy", 0.625), RoundEval(2, "accuracy", 0.75)),
    )
    return AdapterCard(**{**fields, **overrides})


# ---- numerical rank ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "values,tol,rank",
    [
        ([3.0, 2.0, 1e-9, 0.0], 1e-6, 2),  # the 1e-9 tail is within 1e-6 of ||·|| = sqrt(13)
        ([3.0, 2.0, 1e-5, 0.0], 1e-6, 3),
        ([3.0, 2.0, 1.0], 0.0, 3),
        ([1.0, 1.0, 1.0, 1.0], 0.5, 3),  # tails sqrt(3), sqrt(2), 1 of ||·|| = 2: only one value may go
        ([0.0, 0.0], 1e-6, 0),
        ([], 1e-6, 0),
    ],
)
def test_rank_within_is_the_smallest_rank_whose_dropped_tail_is_within_tolerance(values, tol, rank):
    assert rank_within(torch.tensor(values, dtype=torch.float64), tol) == rank


def test_repeated_factors_export_at_their_true_rank_not_the_stacked_one(tmp_path):
    model, log = _folded("llama", CAUSAL_LM, rounds=1)
    patch = log.folded_delta()
    twice = [patch, patch]  # the same update folded twice: stacked rank doubles, rank does not

    report = export_adapter(_model("llama", CAUSAL_LM), twice, tmp_path / "a")

    for name, m in report.modules.items():
        assert m.stacked_rank == 2 * patch.modules[name].rank
        assert m.rank == m.numerical_rank == min(patch.modules[name].rank, *patch.modules[name].shape)
    assert report.exact


# ---- exact export ------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,task", [("llama", SEQ_CLS), ("gpt2", CAUSAL_LM), ("bert", SEQ_CLS)])
def test_exact_export_keeps_every_module_within_1e5_with_ranks_per_module(tmp_path, family, task):
    _, log = _folded(family, task)

    report = export_adapter(_model(family, task), log, tmp_path / "adapter")

    loaded = PeftModel.from_pretrained(_model(family, task), str(tmp_path / "adapter"))
    measured = _relative_errors(loaded, log)
    assert set(measured) == set(log.folded_delta().modules)
    assert max(measured.values()) <= 1e-5
    for name, rel in measured.items():  # what export.json says is what the files hold
        assert report.modules[name].relative_error == pytest.approx(rel, abs=1e-8)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert len(set(config["rank_pattern"].values())) > 1  # heterogeneous ranks survive as rank_pattern
    for name, m in report.modules.items():
        d_out, d_in = log.folded_delta().modules[name].shape
        assert m.rank == min(m.stacked_rank, d_out, d_in)  # random factors: full numerical rank
        assert get_factors(loaded)[name].rank == m.rank
    meta = json.loads((tmp_path / "adapter" / "export.json").read_text())
    assert meta["exact"] and meta["rank_limit"] is None and meta["base_version"] == ROUNDS
    assert meta["max_relative_error"] == pytest.approx(max(measured.values()), abs=1e-8)


@pytest.mark.parametrize("family,task", [("llama", SEQ_CLS), ("gpt2", CAUSAL_LM)])
def test_stock_peft_load_predicts_as_the_folded_model(tmp_path, family, task):
    folded, log = _folded(family, task)
    batches = _batches(task)

    report = export_adapter(_model(family, task), log, tmp_path / "adapter", reference=folded, eval_batches=batches)

    loaded = PeftModel.from_pretrained(_model(family, task), str(tmp_path / "adapter"))
    for batch in batches:
        got, want = _logits(loaded, batch), _logits(folded, batch)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    base = _logits(_model(family, task), batches[0])
    assert not torch.allclose(base, _logits(folded, batches[0]), atol=1e-2)  # the update matters
    check = json.loads((tmp_path / "adapter" / "export.json").read_text())["check"]
    assert check == report.check.to_json()
    assert check["same_predictions"] == 1.0 and check["max_abs_logit_diff"] <= 1e-4
    assert check["examples"] == 9 and check["predictions"] == (9 if task == SEQ_CLS else 3 * (3 * 7 - 2))


def test_a_memo_factors_an_update_once_and_every_export_still_writes_and_checks_its_own(tmp_path):
    folded, log = _folded("llama", SEQ_CLS)
    _, other = _folded("llama", SEQ_CLS, rounds=ROUNDS - 1)
    original, batches, memo = _model("llama", SEQ_CLS), _batches(SEQ_CLS), FactorMemo(size=1)

    plain = export_adapter(original, log, tmp_path / "plain")
    first = export_adapter(original, log, tmp_path / "a", memo=memo)
    second = export_adapter(original, log, tmp_path / "b", memo=memo, reference=folded, eval_batches=batches)
    assert memo.hits == 1 and second.check.same_predictions == 1.0  # the hit is loaded back and checked
    export_adapter(original, other, tmp_path / "c", memo=memo)  # another update: factored
    export_adapter(original, log, tmp_path / "d", memo=memo)  # evicted by it (size 1): factored again
    export_adapter(_model("llama", SEQ_CLS), log, tmp_path / "e", memo=memo)  # another base object: factored

    assert memo.hits == 1
    weights = {d: (tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("plain", "a", "b", "d", "e")}
    assert len(set(weights.values())) == 1
    assert first.modules == second.modules == plain.modules
    assert update_digest(total_update(log)) != update_digest(total_update(other))


def test_lossy_export_rank_2_caps_every_module_and_reports_its_error(tmp_path):
    folded, log = _folded("llama", SEQ_CLS)
    batches = _batches(SEQ_CLS)

    report = export_adapter(
        _model("llama", SEQ_CLS), log, tmp_path / "lossy", 2, reference=folded, eval_batches=batches
    )

    loaded = PeftModel.from_pretrained(_model("llama", SEQ_CLS), str(tmp_path / "lossy"))
    measured = _relative_errors(loaded, log)
    meta = json.loads((tmp_path / "lossy" / "export.json").read_text())
    assert meta["rank_limit"] == 2 and not meta["exact"] and not report.exact
    assert all(m["rank"] == 2 for m in meta["modules"].values())
    for name, rel in measured.items():
        s = stacked_singular_values(log.folded_delta().modules[name]).double()
        tail = float(torch.sqrt((s[2:] ** 2).sum() / (s**2).sum()))  # Eckart-Young: the best rank-2 error
        assert rel == pytest.approx(tail, rel=1e-4)
        assert meta["modules"][name]["relative_error"] == pytest.approx(rel, rel=1e-4)
    assert meta["max_relative_error"] > 0.1
    assert meta["check"]["max_abs_logit_diff"] > 1e-3  # the check sees the loss too


# ---- the directory names its base and carries a card ----------------------------------------------
def test_adapter_dir_names_its_base_and_has_a_model_card(tmp_path):
    folded, log = _folded("llama", SEQ_CLS)
    card = _card()

    report = export_adapter(
        _model("llama", SEQ_CLS), log, tmp_path / "adapter", card=card, reference=folded, eval_batches=_batches(SEQ_CLS)
    )

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-base" == report.base_model
    text = (tmp_path / "adapter" / "README.md").read_text()
    assert text == render_card(card, report)
    assert "More Information Needed" not in text  # not peft's template
    for needle in [
        'base_model: "org/tiny-base"',
        "`org/tiny-base`",
        "sequence classification, 3 labels",
        "0: neg, 1: neu, 2: pos",
        "| Cluster | 0 |",
        "node 1, node 2, node 3",
        "3 merge rounds",
        "base version 3",
        "| 2 | 0.7500 |",
        "exact",
        "PeftModel.from_pretrained",
        "AutoModelForSequenceClassification.from_pretrained('org/tiny-base', num_labels=3)",
        "1.0000 of 9 predictions",
    ]:
        assert needle in text, needle
    ranks = report.ranks.values()
    assert f"ranks {min(ranks)}..{max(ranks)}" in text


def test_without_a_card_the_base_is_the_models_name_or_path(tmp_path):
    _, log = _folded("gpt2", CAUSAL_LM, rounds=1)
    base = _model("gpt2", CAUSAL_LM)
    base.name_or_path = "local/gpt2-dir"

    report = export_adapter(base, log, tmp_path / "adapter")

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "local/gpt2-dir" == report.base_model


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"base_model": ""}, "base_model"),
        ({"task": "tagging"}, "task"),
        ({"label_names": ("a", "b")}, "label_names"),
        ({"num_labels": 0}, "num_labels"),
        ({"rounds": -1}, "rounds"),
    ],
)
def test_card_fields_are_checked(overrides, match):
    with pytest.raises(ValueError, match=match):
        _card(**overrides)


def test_bad_arguments_are_refused_before_anything_is_written(tmp_path):
    folded, log = _folded("llama", CAUSAL_LM, rounds=1)
    for args, kwargs, match in [
        ((_model("llama", CAUSAL_LM), log, tmp_path / "a", 0), {}, "rank"),
        ((_model("llama", CAUSAL_LM), log, tmp_path / "a"), {"exact_tol": 1.5}, "exact_tol"),
        ((_model("llama", CAUSAL_LM), log, tmp_path / "a"), {"card": {"base_model": "x"}}, "card"),
        ((folded, log, tmp_path / "a"), {}, "plain"),
        ((_model("gpt2", CAUSAL_LM), log, tmp_path / "a"), {}, "no such module"),
    ]:
        with pytest.raises(ValueError, match=match):
            export_adapter(*args, **kwargs)
    assert not (tmp_path / "a").exists()
