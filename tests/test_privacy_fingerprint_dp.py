"""Sample-level DP for fingerprints: the accountant, the release's calibration, the sensitivity."""

import math

import numpy as np
import pytest

from atlas_p2p.data import encode, records_from_dicts
from atlas_p2p.fingerprint import FingerprintConfig, dp_epsilon, fingerprint_sample, probe_gradient, project
from atlas_p2p.models import tiny_model
from atlas_p2p.privacy.fingerprint_dp import (
    SampleDP,
    noise_multiplier,
    private_fingerprint,
    release,
    rows_of,
    unit_sketch_mean,
)
from atlas_p2p.synthetic import SyntheticTasks, synthetic_tokenizer

TOK = synthetic_tokenizer()
CONFIG = FingerprintConfig(seed=3, num_samples=12, probe="head")


def hf_loss(model, batch):
    return model(**batch).loss


def _model():
    return tiny_model("bert", "seq_cls", vocab_size=len(TOK), num_labels=4, num_layers=2, seed=0)


def _encoded(task=0, n=12, seed=1):
    return encode(records_from_dicts(SyntheticTasks().generate(task, n, seed=seed)), TOK, max_len=16)


@pytest.mark.parametrize("epsilon", [0.5, 1.0, 4.0, 8.0])
def test_noise_multiplier_inverts_the_analytic_gaussian_accountant(epsilon):
    z = noise_multiplier(epsilon, 1e-5)
    assert dp_epsilon(z, 1e-5, sensitivity=1.0) == pytest.approx(epsilon, rel=1e-6)
    assert dp_epsilon(z * 0.99, 1e-5, sensitivity=1.0) > epsilon  # the smallest such z


def test_release_adds_noise_of_std_z_times_two_over_m():
    mean, m, dp = np.full(64, 0.1), 50, SampleDP(4.0)
    sigma = noise_multiplier(4.0, 1e-5) * 2 / m
    expected = mean + np.random.default_rng(9).normal(0.0, sigma, 64)
    got = release(mean, m, dp, np.random.default_rng(9))
    assert np.allclose(got, expected / np.linalg.norm(expected), atol=1e-6)
    assert math.isclose(float(np.linalg.norm(got)), 1.0, rel_tol=1e-6)


def test_the_sketch_mean_does_not_depend_on_how_examples_are_batched():
    model, encoded = _model(), _encoded()
    whole, m = unit_sketch_mean(model, fingerprint_sample(encoded, CONFIG), hf_loss, CONFIG)
    small, m2 = unit_sketch_mean(model, fingerprint_sample(encoded, CONFIG, micro_batch=3), hf_loss, CONFIG)
    assert m == m2 == 12
    assert np.allclose(whole, small, atol=1e-5)  # padding differs, the mask makes it irrelevant
    # and it is the mean of the examples' own unit sketches
    rows = rows_of(fingerprint_sample(encoded, CONFIG))
    direct = np.mean([project(probe_gradient(model, [r], hf_loss, CONFIG), 3) for r in rows], axis=0)
    assert np.allclose(whole, direct, atol=1e-6)


def test_replacing_one_example_moves_the_mean_by_at_most_two_over_m():
    model = _model()
    base = _encoded(task=0, n=12, seed=1)
    other = _encoded(task=2, n=1, seed=7)
    a, m = unit_sketch_mean(model, fingerprint_sample(base, CONFIG, micro_batch=4), hf_loss, CONFIG)
    rows = rows_of(fingerprint_sample(base, CONFIG, micro_batch=4))
    swapped = rows[:-1] + rows_of(fingerprint_sample(other, CONFIG))
    b, _ = unit_sketch_mean(model, swapped, hf_loss, CONFIG)
    moved = float(np.linalg.norm(a - b))
    assert 0 < moved <= 2 / m + 1e-9


def test_private_fingerprints_keep_tasks_apart_when_epsilon_is_large():
    model = _model()
    prints = [
        private_fingerprint(model, fingerprint_sample(_encoded(t, 12, s), CONFIG), hf_loss, CONFIG, SampleDP(1e4), rng)
        for t, s, rng in ((0, 1, np.random.default_rng(0)), (0, 2, np.random.default_rng(1)), (3, 3, None))
    ]
    assert all(math.isclose(float(np.linalg.norm(p)), 1.0, rel_tol=1e-5) for p in prints)
    assert float(prints[0] @ prints[1]) > float(prints[0] @ prints[2])


@pytest.mark.parametrize("kwargs", [{"epsilon": 0}, {"epsilon": math.inf}, {"epsilon": 1, "delta": 1.0}])
def test_bad_privacy_budgets_are_refused(kwargs):
    with pytest.raises(ValueError, match="SampleDP"):
        SampleDP(**kwargs)
