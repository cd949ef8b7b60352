"""Clustering of fingerprints (atlas_p2p.clustering): K choice, stable ids, scores."""

from __future__ import annotations

import numpy as np
import pytest

from atlas_p2p.clustering import (
    Clustering,
    ClusteringConfig,
    adjusted_rand,
    assign_nearest,
    centroid_distances,
    cluster_fingerprints,
    fallback_order,
    fit_one_blob,
    match_ids,
    normalize_rows,
    normalized_mutual_info,
    null_test,
    silhouette,
)

FAST = ClusteringConfig(null_draws=0)  # where the K = 1 null test is not the point


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted(k=4, per=6, d=64, spread=0.25, seed=0):
    """(k*per, d) unit vectors around k random unit centres, and their true cluster."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((k, d)))
    truth = np.repeat(np.arange(k), per)
    points = unit(centres[truth] + spread * rng.standard_normal((k * per, d)) / np.sqrt(d) * 4)
    return points, truth


def test_recovers_planted_clusters_with_k_chosen():
    points, truth = planted()

    result = cluster_fingerprints(points)

    assert result.k == 4
    assert adjusted_rand(truth, result.labels) == 1.0
    assert normalized_mutual_info(truth, result.labels) == pytest.approx(1.0)
    assert result.silhouette == max(result.scores.values())
    assert result.null_silhouette is not None and result.silhouette > result.null_silhouette[0]


def test_k_chosen_on_a_sample_clusters_every_fingerprint():
    points, truth = planted(k=4, per=60)  # 240 fingerprints, K chosen on 40 of them

    result = cluster_fingerprints(points, ClusteringConfig(choose_on=40))

    assert result.k == 4 and len(result.labels) == 240
    assert adjusted_rand(truth, result.labels) == 1.0
    one, _ = planted(k=1, per=240)
    assert cluster_fingerprints(one, ClusteringConfig(choose_on=40)).k == 1


def test_one_round_blob_gives_k_1():
    rng = np.random.default_rng(1)
    blob = unit(np.ones(64) + 0.5 * rng.standard_normal((20, 64)))

    result = cluster_fingerprints(blob)

    assert result.k == 1
    assert set(result.labels.tolist()) == {0}
    assert result.centroids.shape == (1, 64)


def test_one_elongated_blob_gives_k_1_only_with_the_null_test():
    # One task's fingerprints spread mostly along one direction: k-means splits such a
    # blob with a high silhouette, which a fixed threshold takes for structure.
    rng = np.random.default_rng(2)
    centre, axis = unit(rng.standard_normal(64)), unit(rng.standard_normal(64))
    blob = unit(centre + np.outer(rng.standard_normal(20), axis) * 0.3 + 0.02 * rng.standard_normal((20, 64)))

    with_null = cluster_fingerprints(blob)
    threshold_only = cluster_fingerprints(blob, FAST)

    assert max(with_null.scores.values()) > 0.35  # as high as real multi-task structure
    assert threshold_only.k > 1
    assert with_null.k == 1


def test_fixed_k_is_used_as_given():
    points, truth = planted(k=3)

    result = cluster_fingerprints(points, ClusteringConfig(k=5))

    assert result.k == 5
    assert len(set(result.labels.tolist())) == 5


def test_tiny_populations_get_one_cluster():
    rng = np.random.default_rng(3)
    for n in (1, 2):
        assert cluster_fingerprints(rng.standard_normal((n, 8)), FAST).k == 1
    with pytest.raises(ValueError, match="distinct"):
        cluster_fingerprints(np.ones((4, 8)), ClusteringConfig(k=2))


def test_ids_are_stable_when_inputs_are_permuted():
    points, truth = planted(seed=4)
    first = cluster_fingerprints(points, FAST)
    order = np.random.default_rng(5).permutation(len(points))

    canonical = cluster_fingerprints(points[order], FAST)
    matched = cluster_fingerprints(points[order], FAST, previous=first)

    assert np.array_equal(canonical.labels, first.labels[order])  # same ids even without history
    assert np.array_equal(matched.labels, first.labels[order])
    assert np.array_equal(matched.ids, first.ids) and matched.next_id == first.next_id


def test_a_new_cluster_gets_a_fresh_id_and_old_ones_keep_theirs():
    points, truth = planted(k=4, seed=6)
    three = truth < 3
    before = cluster_fingerprints(points[three], FAST)

    after = cluster_fingerprints(points, FAST, previous=before)

    assert before.k == 3 and after.k == 4
    assert np.array_equal(after.labels[three], before.labels)
    assert set(after.labels[~three].tolist()) == {3}  # never used before
    assert after.next_id == 4
    gone = cluster_fingerprints(points[truth != 0], FAST, previous=after)
    assert set(gone.ids.tolist()) == {int(i) for i in after.labels[truth != 0]}
    assert gone.next_id == 4


def test_far_matches_are_not_forced():
    points, truth = planted(k=2, seed=7)
    old = Clustering(
        labels=np.zeros(1, dtype=np.int64), ids=np.array([9]), centroids=-points[:1], silhouette=None, next_id=10
    )

    loose, _ = match_ids(points[:2], old)
    strict, next_id = match_ids(points[:2], old, max_distance=0.5)

    assert 9 in loose.tolist()
    assert sorted(strict.tolist()) == [10, 11] and next_id == 12


def test_nearest_assignment_distances_and_fallback_order():
    centroids = np.array([[1.0, 0, 0], [0.8, 0.6, 0], [0, 0, 1.0]])
    result = Clustering(
        labels=np.array([5, 7, 2]), ids=np.array([2, 5, 7]), centroids=centroids, silhouette=0.5, next_id=8
    )

    dist = centroid_distances(centroids)

    assert np.allclose(dist, dist.T) and np.allclose(np.diag(dist), 0)
    assert fallback_order(result, 2) == [5, 7]
    assert fallback_order(result, 7) == [2, 5]  # equal distance: lower id first
    assert assign_nearest(np.array([[0.9, 0.5, 0.0], [0.0, 0.1, 3.0]]), result).tolist() == [5, 7]
    with pytest.raises(KeyError):
        fallback_order(result, 4)


def test_ari_and_nmi_ignore_label_names():
    truth = ["a", "a", "b", "b", "c", "c"]

    assert adjusted_rand(truth, [2, 2, 0, 0, 1, 1]) == 1.0
    assert normalized_mutual_info(truth, [2, 2, 0, 0, 1, 1]) == pytest.approx(1.0)
    assert adjusted_rand(truth, [0, 1, 0, 1, 0, 1]) < 0.1
    assert adjusted_rand([0, 0, 1, 1], [0, 0, 0, 0]) == 0.0


@pytest.mark.parametrize(
    "bad, words",
    [
        (np.zeros((0, 4)), "non-empty"),
        (np.ones(4), "non-empty"),
        (np.array([[1.0, np.nan]]), "NaN"),
        (np.array([[1.0, 0.0], [0.0, 0.0]]), r"rows \[1\] are zero"),
    ],
)
def test_bad_fingerprints_are_refused(bad, words):
    with pytest.raises(ValueError, match=words):
        normalize_rows(bad)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"k": 0}, "k must"),
        ({"k_max": 1}, "k_max"),
        ({"n_init": 5}, "n_init"),
        ({"null_draws": 1}, "null_draws"),
        ({"min_silhouette": 2.0}, "min_silhouette"),
        ({"max_match_distance": 0.0}, "max_match_distance"),
        ({"null_level": 0.0}, "null_level"),
        ({"null_level": 1.5}, "null_level"),
        ({"min_cluster_size": 0}, "min_cluster_size"),
        ({"choose_on": 4}, "choose_on"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ClusteringConfig(**kwargs)


def test_two_tasks_of_three_clients_get_k_2_and_one_task_of_six_gets_k_1():
    # The churn scenario's population: the one-blob surrogate of 6 points carries the
    # between-task scatter, so a 1.5 sd margin missed real splits (silhouette ~0.7).
    for seed in range(3):
        rng = np.random.default_rng(seed)
        centre, shift = unit(rng.standard_normal(64)), unit(rng.standard_normal(64))
        truth = np.repeat([0, 1], 3)
        pairs = unit(centre + 0.5 * shift * (2 * truth[:, None] - 1) + 0.25 * rng.standard_normal((6, 64)) / 8)
        one = unit(centre + 0.25 * rng.standard_normal((6, 64)) / 8)

        split = cluster_fingerprints(pairs, ClusteringConfig(seed=seed))

        assert split.k == 2 and adjusted_rand(truth, split.labels) == 1.0
        assert cluster_fingerprints(one, ClusteringConfig(seed=seed)).k == 1


# -- small clusters and one-task populations, shaped like real-text fingerprints ---------
def noisy_tasks(sizes, within=(0.6,), d=64, seed=0):
    """Unit rows unit(c_t + e): random task centres c_t (nearly orthogonal in 64-d) and
    isotropic noise e sized so two nodes of task t have cosine ≈ within[t] (one value:
    every task). Real text at m = 256 gives 0.5-0.7 within a task, about 0 between."""
    rng = np.random.default_rng(seed)
    within = within * len(sizes) if len(within) == 1 else within
    centres = unit(rng.standard_normal((len(sizes), d)))
    truth = np.repeat(np.arange(len(sizes)), sizes)
    spread = np.sqrt((1 - np.array(within)) / np.array(within))[truth]  # ‖e‖ / ‖c‖
    return unit(centres[truth] + spread[:, None] * rng.standard_normal((len(truth), d)) / np.sqrt(d)), truth


@pytest.mark.parametrize("sizes, within", [((2, 2, 2, 2), 0.6), ((3, 3, 3, 3), 0.6), ((6, 6), 0.6), ((3, 3), 0.8)])
def test_pairs_and_triples_of_noisy_tasks_are_found(sizes, within):
    # The old null (sample covariance of n << d points) drew clumpier surrogates than
    # such data and chose K = 1 for four tasks of two nodes. Six nodes carry less
    # evidence than twelve: two triples need tighter tasks.
    for seed in range(3):
        points, truth = noisy_tasks(sizes, within=(within,), seed=seed)

        result = cluster_fingerprints(points, ClusteringConfig(seed=seed))

        assert result.k == len(sizes), (seed, result.scores, result.null_p)
        assert adjusted_rand(truth, result.labels) == 1.0
        assert result.null_p is not None and result.null_p <= ClusteringConfig().null_level


def test_a_loose_task_and_a_tight_task_are_two_clusters():
    points, truth = noisy_tasks((6, 6), within=(0.3, 0.7), seed=4)

    result = cluster_fingerprints(points)

    assert result.k == 2 and adjusted_rand(truth, result.labels) == 1.0


@pytest.mark.parametrize("n", [8, 12])
def test_one_task_with_noise_stronger_in_a_few_directions_gives_k_1(n):
    # How often each label occurs in a node's sample moves its fingerprint along a few
    # directions more than along the others: one blob, elongated in 3 of 64 dimensions.
    # A null with only isotropic (or within-cluster) noise splits it.
    tested = 0
    for seed in range(4):
        rng = np.random.default_rng(seed)
        centre, axes = unit(rng.standard_normal(64)), np.linalg.qr(rng.standard_normal((64, 3)))[0].T
        shift = rng.standard_normal((n, 3)) * np.array([0.3, 0.2, 0.1])
        points = unit(centre + shift @ axes + 0.05 * rng.standard_normal((n, 64)))

        result = cluster_fingerprints(points, ClusteringConfig(seed=seed))

        assert result.k == 1, (seed, result.scores, result.null_p)
        tested += result.null_p is not None
    assert tested >= 3  # the silhouette mostly clears the fixed floor: the null test decides


def test_one_noisy_task_of_twelve_nodes_gives_k_1():
    for seed in range(3):
        points, _ = noisy_tasks((12,), seed=seed)

        assert cluster_fingerprints(points, ClusteringConfig(seed=seed)).k == 1


def test_a_lone_outlier_is_not_a_cluster_of_its_own():
    points, _ = noisy_tasks((11,), seed=5)
    outlier = unit(np.random.default_rng(6).standard_normal((1, 64)))
    population = np.vstack([points, outlier])

    default = cluster_fingerprints(population)
    singletons = cluster_fingerprints(population, ClusteringConfig(min_cluster_size=1))

    assert default.k == 1
    assert singletons.k == 2 and sorted(np.bincount(singletons.labels).tolist()) == [1, 11]


def test_one_blob_keeps_the_variance_and_the_unbiased_spread_of_high_dimensional_noise():
    rng = np.random.default_rng(7)
    d, n = 64, 12
    iso = rng.standard_normal((n, d))  # Σ = I: effective dimension (tr Σ)² / tr Σ² = 64
    spiked = iso * 0.1 + rng.standard_normal((n, 1)) * unit(rng.standard_normal(d))  # one strong direction

    for x in (iso, spiked):
        blob = fit_one_blob(x)
        sample = np.cov(x.T)
        assert blob.trace == pytest.approx(np.trace(sample), rel=1e-9)
        assert blob.trace_of_square < (sample * sample).sum()  # S's n − 1 directions overstate it
    iso_blob = fit_one_blob(iso)
    assert iso_blob.trace**2 / iso_blob.trace_of_square > 30  # the sample covariance's is at most n − 1 = 11
    assert iso_blob.floor == pytest.approx(1.0, rel=0.3)
    spiked_blob = fit_one_blob(spiked)
    assert spiked_blob.spikes[0] > 0.5 * spiked_blob.trace  # the strong direction keeps its variance
    drawn = spiked_blob.draw(5, np.random.default_rng(0))
    assert drawn.shape == (5, d) and np.allclose(np.linalg.norm(drawn, axis=1), 1.0)


def test_silhouette_matches_scikit_learn():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(8)
    for _ in range(20):
        x = rng.standard_normal((int(rng.integers(4, 20)), 5))
        labels = rng.integers(0, 3, size=len(x))
        labels[:2] = [0, 1]  # at least two clusters; singletons allowed

        assert silhouette(x, labels) == pytest.approx(silhouette_score(x, labels), abs=1e-12)


def test_kmeans_is_as_good_as_scikit_learn_on_clear_clusters():
    from sklearn.cluster import KMeans

    points, truth = noisy_tasks((5, 5, 5, 5), within=(0.8,), seed=9)

    result = cluster_fingerprints(points, ClusteringConfig(k=4))
    ours = sum(((points[result.labels == c] - points[result.labels == c].mean(0)) ** 2).sum() for c in result.ids)
    theirs = KMeans(n_clusters=4, n_init=10, random_state=0).fit(points).inertia_

    assert adjusted_rand(truth, result.labels) == 1.0
    assert ours == pytest.approx(theirs, rel=1e-9)


def test_the_null_test_stops_early_when_the_answer_is_clear():
    config = ClusteringConfig()
    tasks, _ = noisy_tasks((4, 4, 4), within=(0.8,), seed=10)
    one, _ = noisy_tasks((9,), seed=10)
    clear = max(cluster_fingerprints(tasks).scores.values())

    p_tasks, used_tasks, _ = null_test(tasks, clear, config)
    p_one, used_one, _ = null_test(one, 0.0, config)  # every surrogate beats a silhouette of 0

    assert p_tasks <= config.null_level and used_tasks < config.null_draws
    assert p_one > 0.5 and used_one == 100  # one batch settles it
