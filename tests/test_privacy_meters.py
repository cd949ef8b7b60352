"""The two leakage meters: Fisher leakage by split layer and the white-box inversion attack."""

import pytest
import torch

from atlas_p2p.models import OwnerPart, tiny_model
from atlas_p2p.privacy.embeddings import embeddings_as
from atlas_p2p.privacy.inversion import InversionConfig, invert, nearest_tokens, token_recall
from atlas_p2p.privacy.leakage import fisher_leakage

VOCAB, LAYERS, HIDDEN = 40, 3, 16


def _model(family):
    return tiny_model(family, "seq_cls", VOCAB, num_labels=3, num_layers=LAYERS, hidden=HIDDEN, heads=2, seed=0)


def _batch(b=2, t=5, pad=1):
    ids = torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t - pad :] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_fisher_leakage_matches_the_exact_jacobian(family):
    # Prepare: ||J||_F^2 / (d RMS(h)^2) from the full Jacobian of the owner part at split 2 (real positions only)
    model = _model(family)
    ids, mask = _batch()
    model.eval()
    e0 = model.get_input_embeddings()(ids).detach()
    real = mask.bool()

    def owner(e):
        with embeddings_as(model, e):
            return OwnerPart(model, 2)(ids, mask)[real]  # (n_real, H)

    jac = torch.autograd.functional.jacobian(owner, e0)  # (n_real, H, B, T, H)
    mean_square = float(owner(e0).double().pow(2).mean())  # noise calibrated to RMS(h)
    exact = float(jac[..., real, :].pow(2).sum()) / (int(real.sum()) * HIDDEN) / mean_square
    # Execute
    psi = fisher_leakage(model, ids, mask, [2], probes=600)[2]
    # Assert: Hutchinson's estimate within 5% of the exact trace
    assert psi == pytest.approx(exact, rel=0.05)


def test_noise_divides_leakage_by_its_variance_and_the_model_comes_back_as_it_was():
    model = _model("bert")
    model.train()
    model.classifier.weight.requires_grad_(False)
    ids, mask = _batch()
    plain = fisher_leakage(model, ids, mask, [0, 1, LAYERS], probes=4, seed=3)
    noisy = fisher_leakage(model, ids, mask, [0, 1, LAYERS], probes=4, seed=3, noise_scale=2.0)
    assert set(plain) == {0, 1, LAYERS}
    for s in plain:
        assert noisy[s] == pytest.approx(plain[s] / 4, rel=1e-6)
    assert model.training and not model.classifier.weight.requires_grad
    assert model.bert.embeddings.word_embeddings.weight.requires_grad
    assert torch.equal(model.get_input_embeddings()(ids), model.get_input_embeddings().weight[ids])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"splits": [LAYERS + 1]}, "splits"),
        ({"splits": []}, "splits"),
        ({"probes": 0}, "probes"),
        ({"noise_scale": 0.0}, "noise_scale"),
    ],
)
def test_fisher_leakage_refuses_bad_arguments(kwargs, message):
    ids, mask = _batch()
    args = {"splits": [1], **kwargs}
    with pytest.raises(ValueError, match=message):
        fisher_leakage(_model("bert"), ids, mask, **args)


def test_inversion_recovers_every_token_at_split_zero_and_few_under_heavy_noise():
    # gpt2 at split 0 sends e + position embeddings: an invertible map, so the attack must win
    model = tiny_model("gpt2", "causal_lm", VOCAB, num_layers=LAYERS, hidden=HIDDEN, heads=2, seed=0)
    ids, mask = _batch(b=2, t=6, pad=2)
    with torch.no_grad():
        h = OwnerPart(model, 0)(ids, mask)
    config = InversionConfig(steps=300, lrs=(0.1, 10.0))  # 10: diverges, must not be kept
    clean = token_recall(invert(model, h, mask, 0, config), ids, mask)
    noise = 20.0 * float(h.std()) * torch.randn(h.shape, generator=torch.Generator().manual_seed(5))
    noisy = token_recall(invert(model, h + noise, mask, 0, config), ids, mask)
    assert clean == 1.0
    assert noisy < 0.5


def test_token_recall_counts_real_non_special_positions():
    truth = torch.tensor([[1, 5, 6, 2, 0], [1, 7, 8, 9, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    got = torch.tensor([[1, 5, 0, 2, 0], [9, 7, 8, 0, 0]])
    # counted: 5, 6 | 7, 8, 9 (ids 1 and 2 are special, the pad is not real): 5, 7, 8 right
    assert token_recall(got, truth, mask, ignore_ids=[1, 2]) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="no position"):
        token_recall(got, truth, torch.zeros_like(mask))


def test_nearest_tokens_reads_the_table_by_cosine():
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    e = torch.tensor([[[3.0, 0.1], [0.1, 0.9], [-0.5, 0.4]]])
    assert nearest_tokens(e, table).tolist() == [[0, 1, 2]]
