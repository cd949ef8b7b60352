"""The activation-noise defence: its calibration, its flag, and that the owner's own step ignores it."""

import pytest
import torch

from atlas_p2p.lora import attach_lora, lora_targets
from atlas_p2p.models import CAUSAL_LM, tiny_model
from atlas_p2p.privacy.noise import ActivationNoise, add_noise, noise_std
from atlas_p2p.training import OwnerConfig, OwnerSession
from tests.tiny_batches import padded_batches

VOCAB = 48


@pytest.mark.parametrize("kind, excess_kurtosis", [("gaussian", 0.0), ("laplace", 3.0)])
def test_noise_has_the_calibrated_std_and_its_kind(kind, excess_kurtosis):
    h = 3.0 * torch.randn(8, 50, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(8, 50, dtype=torch.long)
    mask[:, 40:] = 0  # padding: left out of the RMS
    h[:, 40:] = 1e3
    noise = ActivationNoise(kind, 0.5)
    n = add_noise(h, mask, noise, torch.Generator().manual_seed(1)) - h
    sigma = noise_std(h, mask, 0.5)
    assert sigma == pytest.approx(1.5, rel=0.01)
    assert float(n.std()) == pytest.approx(sigma, rel=0.01)
    z = (n / n.std()).flatten()
    assert float(z.pow(4).mean() - 3) == pytest.approx(excess_kurtosis, abs=0.3)


@pytest.mark.parametrize(
    "text, expected",
    [("gaussian:0.5", ActivationNoise("gaussian", 0.5)), ("Laplace:2", ActivationNoise("laplace", 2.0))],
)
def test_noise_flag_parses(text, expected):
    assert ActivationNoise.parse(text) == expected
    assert ActivationNoise.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["gaussian", "gaussian:", "gaussian:x", "uniform:1", "laplace:0", "gaussian:nan"])
def test_bad_noise_flags_are_refused(text):
    with pytest.raises(ValueError, match="activation noise"):
        ActivationNoise.parse(text)


def _owner(noise):
    model = tiny_model("llama", CAUSAL_LM, VOCAB, num_layers=3, hidden=32, heads=4, seed=0)
    ranks = {n: 4 for n in lora_targets(model)}
    config = OwnerConfig(node_id=3, split=1, lr=1e-2, run_seed=5, activation_noise=noise)
    owner = OwnerSession(attach_lora(model, ranks), config)
    owner.start_round(0)
    return owner


def test_owner_sends_noisy_activations_and_steps_as_if_it_had_sent_clean_ones():
    # Prepare: two owners from the same model and seeds, one adding noise to what it sends
    batch = padded_batches(CAUSAL_LM, 1, rows=2, length=6, vocab=VOCAB, num_labels=3, seed=1)[0]
    clean, noisy = _owner(None), _owner(ActivationNoise("gaussian", 1.0))
    # Execute: the same forward; the same helper gradient back
    f_clean, f_noisy = clean.forward(batch), noisy.forward(batch)
    grad = torch.randn(f_clean.activations.shape, generator=torch.Generator().manual_seed(2))
    clean.backward(grad, 1.0)
    noisy.backward(grad, 1.0)
    # Assert: noise of the calibrated size on the wire, none in the owner's own update
    real = f_clean.attention_mask.bool()
    diff = (f_noisy.activations - f_clean.activations)[real]
    assert float(diff.std()) == pytest.approx(noise_std(f_clean.activations, f_clean.attention_mask, 1.0), rel=0.2)
    for (name, a), (_, b) in zip(clean.model.named_parameters(), noisy.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
