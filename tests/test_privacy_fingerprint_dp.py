"""Sample-level DP for fingerprints: the accountant, the release's calibration, the class-balanced
mean and its sensitivity (checked by replacing examples every way the bound distinguishes)."""

import math

import numpy as np
import pytest

from atlas_p2p.data import encode, records_from_dicts
from atlas_p2p.fingerprint import FingerprintConfig, dp_epsilon, fingerprint_sample, probe_gradient, project
from atlas_p2p.models import tiny_model
from atlas_p2p.privacy.fingerprint_dp import (
    SampleDP,
    balanced_mean,
    classes_of,
    noise_multiplier,
    private_fingerprint,
    release,
    rows_of,
    sensitivity,
    sketch_mean,
    unit_sketches,
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


def test_release_adds_noise_of_std_z_times_the_sensitivity():
    mean, dp = np.full(64, 0.1), SampleDP(4.0)
    sigma = noise_multiplier(4.0, 1e-5) * 0.04
    expected = mean + np.random.default_rng(9).normal(0.0, sigma, 64)
    got = release(mean, 0.04, dp, np.random.default_rng(9))
    assert np.allclose(got, expected / np.linalg.norm(expected), atol=1e-6)
    assert math.isclose(float(np.linalg.norm(got)), 1.0, rel_tol=1e-6)


def test_the_balanced_mean_weighs_each_class_by_its_count_floored_at_k():
    e = np.eye(3)
    sketches, classes = [e[0], e[0], e[0], e[1], e[2]], [0, 0, 0, 1, 1]
    # class 0: 3 examples >= k = 2 -> mean e0; class 1: 2 examples -> (e1 + e2)/2; class 2: none
    assert np.allclose(balanced_mean(sketches, classes, 3, 2), (e[0] + (e[1] + e[2]) / 2) / 3)
    # a class below the floor counts as if it had k: one example of class 1 weighs 1/k, not 1
    assert np.allclose(balanced_mean([e[0], e[1]], [0, 1], 2, 4), (e[0] / 4 + e[1] / 4) / 2)
    assert sensitivity(4, 100) == pytest.approx(0.01) and sensitivity(1, 50) == pytest.approx(0.04)


@pytest.mark.parametrize("k", [1, 3, 8])
def test_replacing_any_one_example_moves_the_balanced_mean_by_at_most_the_sensitivity(k):
    """Random unit sketches, class counts below, at and above k; every single replacement, to the
    same class and to another (the two cases of the bound)."""
    rng = np.random.default_rng(k)
    C, worst = 3, 0.0
    for counts in ([k - 1 if k > 1 else 1, k, k + 4], [1, 1, 2 * k + 1], [k + 1, 0, k]):
        classes = [c for c, n in enumerate(counts) for _ in range(n)]
        units = rng.normal(size=(len(classes), 5))
        units /= np.linalg.norm(units, axis=1, keepdims=True)
        before = balanced_mean(list(units), classes, C, k)
        for i in range(len(classes)):
            for c in range(C):
                new = -units[i] if c == classes[i] else rng.normal(size=5)  # the farthest same-class swap
                new = new / np.linalg.norm(new)
                swapped = list(units[:i]) + [new] + list(units[i + 1 :])
                moved = np.linalg.norm(balanced_mean(swapped, classes[:i] + [c] + classes[i + 1 :], C, k) - before)
                assert moved <= sensitivity(C, k) + 1e-12
                worst = max(worst, moved)
    assert worst > 0.5 * sensitivity(C, k)  # the bound is not loose by orders of magnitude


def test_the_sketch_mean_does_not_depend_on_how_examples_are_batched():
    model, encoded = _model(), _encoded()
    whole = sketch_mean(model, fingerprint_sample(encoded, CONFIG), hf_loss, CONFIG, 4)
    small = sketch_mean(model, fingerprint_sample(encoded, CONFIG, micro_batch=3), hf_loss, CONFIG, 4)
    assert whole.m == small.m == 12
    assert whole.sensitivity == small.sensitivity == pytest.approx(4 / 12)  # k = m / C = 3
    assert np.allclose(whole.mean, small.mean, atol=1e-5)  # padding differs, the mask makes it irrelevant
    # and it is the balanced mean of the examples' own unit sketches
    batches = fingerprint_sample(encoded, CONFIG)
    direct = [project(probe_gradient(model, [r], hf_loss, CONFIG), 3) for r in rows_of(batches)]
    assert np.allclose(unit_sketches(model, batches, hf_loss, CONFIG), direct, atol=1e-6)
    assert np.allclose(whole.mean, balanced_mean(direct, classes_of(batches, 4), 4, 3), atol=1e-6)


def test_replacing_one_real_example_moves_the_mean_by_at_most_the_sensitivity():
    model = _model()
    base = fingerprint_sample(_encoded(task=0, n=12, seed=1), CONFIG, micro_batch=4)
    a = sketch_mean(model, base, hf_loss, CONFIG, 4, per_class=3)
    rows = rows_of(base)
    for other in rows_of(fingerprint_sample(_encoded(task=2, n=4, seed=7), CONFIG)):
        b = sketch_mean(model, rows[:-1] + [other], hf_loss, CONFIG, 4, per_class=3)
        assert 0 < float(np.linalg.norm(a.mean - b.mean)) <= a.sensitivity + 1e-9


def test_labels_outside_the_swarm_s_classes_are_refused():
    batches = fingerprint_sample(_encoded(), CONFIG)
    with pytest.raises(ValueError, match="outside 0..1"):
        classes_of(batches, 2)
    assert classes_of(batches, 1) == [0] * 12


def test_private_fingerprints_keep_tasks_apart_when_epsilon_is_large():
    """With the LoRA probe (C = 1, the plain mean): the synthetic tasks differ mostly in label mix,
    which the head probe balances away (atlas_p2p.fingerprint)."""
    model, lora = _model(), FingerprintConfig(seed=3, num_samples=12)
    prints = [
        private_fingerprint(model, fingerprint_sample(_encoded(t, 12, s), lora), hf_loss, lora, SampleDP(1e4), 4, rng)
        for t, s, rng in ((0, 1, np.random.default_rng(0)), (0, 2, np.random.default_rng(1)), (3, 3, None))
    ]
    assert all(math.isclose(float(np.linalg.norm(p)), 1.0, rel_tol=1e-5) for p in prints)
    assert float(prints[0] @ prints[1]) > float(prints[0] @ prints[2])


@pytest.mark.parametrize("kwargs", [{"epsilon": 0}, {"epsilon": math.inf}, {"epsilon": 1, "delta": 1.0}])
def test_bad_privacy_budgets_are_refused(kwargs):
    with pytest.raises(ValueError, match="SampleDP"):
        SampleDP(**kwargs)
