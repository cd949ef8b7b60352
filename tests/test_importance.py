"""A node's importance vector (atlas_p2p.importance.measure): which weights it scores, and how."""

import pytest
import torch

from atlas_p2p import importance as I
from atlas_p2p.memory import lora_candidates, shape_from_config
from atlas_p2p.models import causal_lm_labels, split_model, tiny_model, unsplit_forward


def _model_and_batch():
    model = tiny_model("gpt2", "causal_lm", vocab_size=50, num_layers=3)
    ids = torch.randint(3, 50, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    return model, {"input_ids": ids, "attention_mask": mask, "labels": causal_lm_labels(ids, mask)}


def _loss(model, batch):
    return unsplit_forward(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0]


def test_measure_is_the_normalised_probe_of_every_candidate_weight():
    model, batch = _model_and_batch()
    shape = shape_from_config(model.config)
    names = [m.name for m in lora_candidates(shape)]

    scores = I.measure(model, batch, _loss, shape)

    assert list(scores) == names and sum(scores.values()) == pytest.approx(1.0)
    assert scores == pytest.approx(I.normalise(I.probe_scores(model, batch, _loss, names)))
    assert all(p.grad is None for p in model.parameters())


def test_measure_across_a_cut_scores_only_the_blocks_the_node_runs():
    model, batch = _model_and_batch()
    shape = shape_from_config(model.config)
    owner, helper = split_model(model, 1)
    hidden = owner(batch["input_ids"], batch["attention_mask"]).detach().requires_grad_(True)
    loss, _ = helper(hidden, batch["attention_mask"], batch["labels"])
    (grad,) = torch.autograd.grad(loss, hidden)  # what a provisional helper sends back

    scores = I.measure(
        model, batch, lambda _, b: (owner(b["input_ids"], b["attention_mask"]) * grad).sum(), shape, split=1
    )

    front = [m.name for m in lora_candidates(shape) if m.block == 0]
    assert list(scores) == front
    assert scores == pytest.approx(I.normalise(I.probe_scores(model, batch, _loss, front)), rel=1e-4)


def test_measure_needs_a_weight_to_score():
    model, batch = _model_and_batch()
    with pytest.raises(ValueError, match="split=0"):
        I.measure(model, batch, _loss, shape_from_config(model.config), split=0)
