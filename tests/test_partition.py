"""Client partitions (atlas_p2p.partition): coverage, sizes, skew, seeds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from atlas_p2p.partition import (
    _split_counts,
    by_task,
    dirichlet_label_skew,
    length_bins,
    length_dirichlet,
)


def assert_exact_cover(parts, n):
    joined = np.concatenate(parts) if parts else np.empty(0, np.int64)
    assert joined.dtype == np.int64
    assert sorted(joined.tolist()) == list(range(n))  # every position once, none twice
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted, no duplicates


def label_entropy(parts, labels):
    ent = []
    for p in parts:
        q = np.bincount(labels[p], minlength=labels.max() + 1) / max(len(p), 1)
        q = q[q > 0]
        ent.append(-(q * np.log(q)).sum())
    return float(np.mean(ent))


def test_by_task_gives_each_client_one_task_in_near_equal_parts():
    tasks = ["b"] * 31 + ["a"] * 20 + ["c"] * 9

    parts, owners = by_task(tasks, {"a": 2, "b": 3, "c": 1}, seed=0)

    assert owners == ["a", "a", "b", "b", "b", "c"]
    assert_exact_cover(parts, len(tasks))
    for p, owner in zip(parts, owners):
        assert {tasks[i] for i in p} == {owner}
    assert [len(p) for p in parts] == [10, 10, 11, 10, 10, 9]


def test_by_task_is_seeded_and_checks_its_input():
    tasks = [0, 1] * 20

    assert all(np.array_equal(a, b) for a, b in zip(by_task(tasks, 2, 1)[0], by_task(tasks, 2, 1)[0]))
    assert any(not np.array_equal(a, b) for a, b in zip(by_task(tasks, 2, 1)[0], by_task(tasks, 2, 2)[0]))
    with pytest.raises(ValueError, match="None"):
        by_task([0, None], 1, 0)
    with pytest.raises(ValueError, match="no entry"):
        by_task([0, 1], {0: 1}, 0)
    with pytest.raises(ValueError, match="examples for 5 clients"):
        by_task([0, 0, 1], 5, 0)


def test_dirichlet_label_skew_covers_everything_and_skews_with_small_alpha():
    labels = np.random.default_rng(0).integers(0, 4, size=2000)

    skewed = dirichlet_label_skew(labels, 8, alpha=0.1, seed=3)
    mixed = dirichlet_label_skew(labels, 8, alpha=100.0, seed=3)

    assert_exact_cover(skewed, len(labels))
    assert_exact_cover(mixed, len(labels))
    assert min(len(p) for p in skewed) >= 1
    assert label_entropy(skewed, labels) < 0.8 < label_entropy(mixed, labels)  # ln 4 = 1.39
    again = dirichlet_label_skew(labels, 8, alpha=0.1, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(skewed, again))


def test_dirichlet_label_skew_errors():
    labels = np.zeros(10, dtype=int)
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_label_skew(labels, 2, alpha=0.0, seed=0)
    with pytest.raises(ValueError, match="num_clients"):
        dirichlet_label_skew(labels, 0, alpha=1.0, seed=0)
    with pytest.raises(ValueError, match="cannot give 4 clients 3"):
        dirichlet_label_skew(labels, 4, alpha=1.0, seed=0, min_size=3)
    with pytest.raises(ValueError, match="no Dirichlet"):
        dirichlet_label_skew(np.arange(10) % 2, 5, alpha=0.01, seed=0, min_size=2, max_tries=3)


def test_length_bins_are_quantiles():
    lengths = np.arange(100)

    bins = length_bins(lengths, 4)

    assert np.bincount(bins).tolist() == [25, 25, 25, 25]
    assert np.all(np.diff(bins) >= 0)  # longer never lands in a lower bin
    assert length_bins([5] * 10, 4).tolist() == [0] * 10  # coinciding edges merge


def test_length_dirichlet_covers_everything_and_skews_lengths():
    lengths = np.random.default_rng(1).integers(2, 40, size=3000)

    def spread(alpha):
        parts = length_dirichlet(lengths, 6, alpha=alpha, seed=2, num_bins=4)
        assert_exact_cover(parts, len(lengths))
        return np.std([lengths[p].mean() for p in parts if len(p)])

    assert spread(0.1) > 3 * spread(100.0)


def test_length_dirichlet_errors():
    with pytest.raises(ValueError, match="lengths"):
        length_dirichlet([], 2, 1.0, 0)
    with pytest.raises(ValueError, match="num_bins"):
        length_dirichlet([1, 2, 3], 2, 1.0, 0, num_bins=0)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 200),
    weights=st.lists(st.floats(0.0, 1.0), min_size=1, max_size=9).filter(lambda w: sum(w) > 0),
)
def test_split_counts_sum_to_n_and_stay_within_one(n, weights):
    p = np.array(weights) / sum(weights)

    counts = _split_counts(n, p)

    assert counts.sum() == n
    assert np.all(np.abs(counts - n * p) < 1.0 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=120),
    clients=st.integers(1, 7),
    alpha=st.floats(0.05, 50.0),
    seed=st.integers(0, 2**31),
)
def test_partitions_always_cover_exactly(labels, clients, alpha, seed):
    labels = np.array(labels)

    assert_exact_cover(dirichlet_label_skew(labels, clients, alpha, seed, min_size=0), len(labels))
    assert_exact_cover(length_dirichlet(labels + 1, clients, alpha, seed, num_bins=3), len(labels))
