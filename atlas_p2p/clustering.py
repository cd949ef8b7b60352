"""Clustering task fingerprints at the bootstrap (DESIGN 6). Numpy in, numpy out.

- k-means on unit fingerprints, so Euclidean distance is a monotone function of cosine
  similarity: ‖a − b‖² = 2 − 2 cos(a, b). Lloyd's algorithm from k-means++ seeds
  (Arthur & Vassilvitskii, 2007), ``n_init`` >= 10 restarts run side by side in numpy,
  lowest inertia kept; the silhouette is computed in numpy too. Both run once per K for
  the data and again for every surrogate of the null test below (about a thousand
  times per clustering), where scikit-learn's per-call overhead (~12 ms a fit) would
  make the test take seconds.
- K fixed, or chosen by the mean silhouette coefficient
  s = mean_i (b_i − a_i) / max(a_i, b_i)   (Rousseeuw, 1987; a_i: mean distance to the
  own cluster, b_i: to the nearest other cluster) over the K in [2, Kmax] whose k-means
  clusters all have at least ``min_cluster_size`` (2) members: a lone fingerprint
  cannot tell a task of its own from an outlier of another task (there is no
  within-cluster scatter to weigh its distance against).
- K = 1 unless the best silhouette s* clears the fixed ``min_silhouette`` and a Monte
  Carlo null test in the spirit of the gap statistic (Tibshirani, Walther & Hastie,
  2001): draw B = ``null_draws`` one-task populations of n points from one Gaussian
  fitted to the fingerprints (then scaled back to the sphere), give each the same
  best-over-K silhouette s_b, and accept K > 1 only when
  p = (1 + #{b: s_b >= s*}) / (1 + B) <= ``null_level`` (Barnard, 1963: the rank of the
  data among exchangeable draws; no normal approximation of the skewed s_b). Draws stop
  early once the answer is clear (``null_test``).
- The one-task Gaussian (``fit_one_blob``). The fingerprints' mean, and a
  covariance Σ₀ fitted under "one task" that keeps the effective dimension of the
  noise. With n << d fingerprints the sample covariance S puts all the noise into n − 1
  directions, so surrogates drawn from S are clumpier than the data: on real text
  (all-MiniLM-L6-v2, m = 256, one task x 12 nodes) the data sat 3 to 4 sd *below* such
  surrogates, and two tasks x 6 nodes only 0.9 to 1.9 sd above them. Σ₀ soft-thresholds
  the eigenvalues λ_j of S (λ_j → (λ_j − τ)_+, the removed variance spread evenly over
  all d dimensions, so tr Σ₀ = tr S) and picks τ so that tr Σ₀² equals the unbiased
  estimate of tr Σ² for Gaussian data, ν²/((ν−1)(ν+2)) · (tr S² − (tr S)²/ν), ν = n − 1
  (Bai & Saranadasa, 1996). tr Σ₀ and tr Σ₀² fix the noise's effective dimension
  (tr Σ)²/tr Σ²; strong directions (a one-task blob elongated along how often each label
  occurs) keep most of their variance, so an elongated blob is not taken for two tasks.
  Measured (benchmarks/fingerprint_sweep.py on real text, benchmarks/clustering.py
  --small-n on tiny models): see the K row of docs/DECISIONS.md.
- Stable ids: a re-clustering matches its centroids to the previous ones with the
  Hungarian algorithm on centroid distances (scipy ``linear_sum_assignment``), so a
  cluster keeps its id (and with it its versioned base) when members come and go. New
  clusters get ids never used before. A first clustering numbers clusters in
  lexicographic order of their centroids, so it does not depend on input order.
- Quality against known task ids: ARI and NMI; centroid distances order fallbacks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

NULL_BATCH = 100  # surrogates drawn between two looks of the sequential null test


@dataclass(frozen=True)
class ClusteringConfig:
    """How the bootstrap clusters fingerprints."""

    k: int | None = None  # fixed number of clusters (--clusters); None: choose by silhouette
    k_max: int = 8  # largest K tried when choosing
    min_silhouette: float = 0.15  # below this for every K >= 2, use K = 1
    min_cluster_size: int = 2  # a chosen K's clusters all have at least this many members
    null_draws: int = 999  # B: at most this many one-task surrogates for the null test (0: no test)
    null_level: float = 0.025  # K > 1 needs the Monte Carlo p-value of s* at most this
    n_init: int = 10  # k-means restarts (best inertia kept)
    seed: int = 0  # k-means random_state
    max_match_distance: float | None = None  # farther than this, a new cluster gets a fresh id
    # K is chosen (silhouettes and the null test) on at most this many fingerprints drawn at
    # random, then the clustering with that K uses them all: the null test's hundreds of
    # k-means runs cost O(n) each, minutes of CPU at n = 750
    choose_on: int = 256

    def __post_init__(self) -> None:
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"ClusteringConfig.k must be None or an int >= 1, got {self.k!r}")
        if not isinstance(self.k_max, int) or self.k_max < 2:
            raise ValueError(f"ClusteringConfig.k_max must be an int >= 2, got {self.k_max!r}")
        if not -1.0 <= self.min_silhouette <= 1.0:
            raise ValueError(f"ClusteringConfig.min_silhouette must be in [-1, 1], got {self.min_silhouette!r}")
        if not isinstance(self.min_cluster_size, int) or self.min_cluster_size < 1:
            raise ValueError(f"ClusteringConfig.min_cluster_size must be an int >= 1, got {self.min_cluster_size!r}")
        if not isinstance(self.null_draws, int) or self.null_draws < 0 or self.null_draws == 1:
            raise ValueError(f"ClusteringConfig.null_draws must be 0 or an int >= 2, got {self.null_draws!r}")
        if not (isinstance(self.null_level, (int, float)) and 0 < self.null_level < 1):
            raise ValueError(f"ClusteringConfig.null_level must be in (0, 1), got {self.null_level!r}")
        if not isinstance(self.n_init, int) or self.n_init < 10:
            raise ValueError(f"ClusteringConfig.n_init must be an int >= 10, got {self.n_init!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"ClusteringConfig.seed must be an int, got {self.seed!r}")
        if self.max_match_distance is not None and not self.max_match_distance > 0:
            raise ValueError(
                f"ClusteringConfig.max_match_distance must be None or > 0, got {self.max_match_distance!r}"
            )
        if not isinstance(self.choose_on, int) or self.choose_on < 8:
            raise ValueError(f"ClusteringConfig.choose_on must be an int >= 8, got {self.choose_on!r}")


@dataclass(frozen=True)
class Clustering:
    """Result of one (re-)clustering. Row i of ``centroids`` belongs to ``ids[i]``."""

    labels: np.ndarray  # (n,) int64 cluster id of each fingerprint
    ids: np.ndarray  # (K,) int64 cluster ids, ascending
    centroids: np.ndarray  # (K, d) float64 k-means centroids
    silhouette: float | None  # mean silhouette of the chosen K (None when K = 1)
    scores: dict[int, float] = field(default_factory=dict)  # silhouette of every K tried
    null_silhouette: tuple[float, float] | None = None  # (mean, std) of the surrogates' best
    null_p: float | None = None  # Monte Carlo p-value of the best silhouette (None: no test ran)
    next_id: int = 0  # first id never used so far (for clusters appearing later)

    @property
    def k(self) -> int:
        return int(len(self.ids))

    def centroid_of(self, cluster_id: int) -> np.ndarray:
        hits = np.flatnonzero(self.ids == cluster_id)
        if not len(hits):
            raise KeyError(f"no cluster with id {cluster_id}")
        return self.centroids[hits[0]]


def normalize_rows(fingerprints: np.ndarray) -> np.ndarray:
    """(n, d) float64 rows scaled to unit L2 norm; rejects bad shapes, NaN/inf and zeros."""
    x = np.asarray(fingerprints, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"fingerprints must be a non-empty (n, d) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("fingerprints contain NaN or inf")
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (n, 1)
    if np.any(norms == 0):
        raise ValueError(f"fingerprint rows {np.flatnonzero(norms[:, 0] == 0).tolist()} are zero")
    return x / norms


def _kmeans(
    x: np.ndarray, k: int, config: ClusteringConfig, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (n,), centroids (k, d)): the lowest-inertia of ``n_init`` k-means runs.

    Every run seeds by greedy k-means++ (a first centre uniformly; each next one the best,
    by the summed squared distance to the nearest centre, of 2 + ⌊ln k⌋ candidates drawn
    with probability proportional to that squared distance), then alternates assignment
    and centre update until the centres stop moving (at most 100 rounds); an empty
    cluster keeps its centre. ``rng`` defaults to one drawn from (config.seed, k), so a
    clustering is reproducible.
    """
    n, d = x.shape
    runs, trials = config.n_init, 2 + int(np.log(k))
    rng = rng if rng is not None else np.random.default_rng([config.seed, 0x4B, k])
    sq = (x * x).sum(axis=1)  # (n,)
    pair = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)  # (n, n) squared distances
    first = rng.integers(n, size=runs)  # (R,)
    chosen = [first]
    near = pair[first]  # (R, n) squared distance to the nearest centre so far
    for _ in range(1, k):
        total = near.sum(axis=1, keepdims=True)  # (R, 1)
        prob = np.where(total > 0, near / np.where(total > 0, total, 1.0), 1.0 / n)  # (R, n)
        cdf = np.cumsum(prob, axis=1)[:, None, :]  # (R, 1, n)
        cand = (cdf < rng.random((runs, trials, 1))).sum(axis=2).clip(max=n - 1)  # (R, L)
        trial_near = np.minimum(near[:, None, :], pair[cand])  # (R, L, n)
        pick = trial_near.sum(axis=2).argmin(axis=1)  # (R,)
        chosen.append(cand[np.arange(runs), pick])
        near = trial_near[np.arange(runs), pick]
    centres = x[np.stack(chosen, axis=1)]  # (R, k, d)
    hot = np.eye(k)
    for _ in range(100):
        dist = sq[None, :, None] - 2.0 * x @ centres.transpose(0, 2, 1) + (centres**2).sum(-1)[:, None, :]  # (R, n, k)
        labels = dist.argmin(axis=2)  # (R, n)
        onehot = hot[labels]  # (R, n, k)
        counts = onehot.sum(axis=1)  # (R, k)
        sums = onehot.transpose(0, 2, 1) @ x  # (R, k, d)
        moved = np.where(counts[..., None] > 0, sums / np.maximum(counts, 1.0)[..., None], centres)
        if np.array_equal(moved, centres):
            break
        centres = moved
    inertia = np.take_along_axis(dist, labels[..., None], axis=2)[..., 0].sum(axis=1)  # (R,)
    best = int(np.argmin(inertia))
    return labels[best].astype(np.int64), centres[best].astype(np.float64)


def silhouette(x: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette s_i = (b_i − a_i) / max(a_i, b_i) with Euclidean distances.

    a_i: mean distance to the other members of i's cluster; b_i: smallest mean distance
    to another cluster's members; s_i = 0 for a member of a one-point cluster
    (Rousseeuw, 1987; scikit-learn's convention). Needs at least two clusters.
    """
    _, idx = np.unique(labels, return_inverse=True)
    k = int(idx.max()) + 1
    if k < 2:
        raise ValueError("the silhouette needs at least two clusters")
    sq = (x * x).sum(axis=1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0))  # (n, n)
    np.fill_diagonal(dist, 0.0)
    onehot = np.eye(k)[idx]  # (n, k)
    counts = onehot.sum(axis=0)  # (k,)
    mean_to = dist @ onehot  # (n, k) summed distances to each cluster
    own = counts[idx]
    a = mean_to[np.arange(len(idx)), idx] / np.maximum(own - 1, 1)
    others = np.where(onehot > 0, np.inf, mean_to / counts[None, :])
    b = others.min(axis=1)
    s = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), 1e-300), 0.0)
    return float(s.mean())


def _best_silhouette(x: np.ndarray, config: ClusteringConfig, rng: np.random.Generator | None = None):
    """(labels, centroids, silhouette) of the best allowed K in [2, Kmax] or None, and scores per K.

    K is allowed when every k-means cluster has at least ``min_cluster_size`` members.
    """
    n = x.shape[0]
    distinct = len(np.unique(np.round(x, 12), axis=0))
    scores: dict[int, float] = {}
    best = None
    for k in range(2, min(config.k_max, n - 1, n // config.min_cluster_size, distinct) + 1):
        labels, centroids = _kmeans(x, k, config, rng)
        if np.bincount(labels, minlength=k).min() < config.min_cluster_size:
            continue
        scores[k] = silhouette(x, labels)
        if best is None or scores[k] > best[2]:
            best = (labels, centroids, scores[k])
    return best, scores


@dataclass(frozen=True)
class OneBlob:
    """One Gaussian fitted to fingerprints under "one task": N(mean, Vᵀ diag(spikes) V + floor·I)."""

    mean: np.ndarray  # (d,)
    spikes: np.ndarray  # (r,) variance above the floor along each row of directions
    directions: np.ndarray  # (r, d) orthonormal rows: the sample covariance's eigenvectors
    floor: float  # isotropic variance in every direction

    @property
    def trace(self) -> float:
        """tr Σ₀."""
        return float(self.spikes.sum() + self.mean.size * self.floor)

    @property
    def trace_of_square(self) -> float:
        """tr Σ₀²."""
        r, d = self.spikes.size, self.mean.size
        return float(((self.spikes + self.floor) ** 2).sum() + (d - r) * self.floor**2)

    def draw(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, d) rows drawn from the Gaussian, then scaled to unit norm (as fingerprints are)."""
        r, d = self.spikes.size, self.mean.size
        points = (
            self.mean
            + rng.standard_normal((n, r)) @ (np.sqrt(self.spikes)[:, None] * self.directions)
            + np.sqrt(self.floor) * rng.standard_normal((n, d))
        )
        norms = np.linalg.norm(points, axis=1, keepdims=True)
        return points / np.where(norms > 0, norms, 1.0)


def fit_one_blob(x: np.ndarray) -> OneBlob:
    """The one-task Gaussian of the null test, fitted to the rows of ``x`` (n >= 3).

    Sample covariance S (ν = n − 1 degrees of freedom) with eigenpairs (λ_j, v_j).
    Σ₀ = Σ_j (λ_j − τ)_+ v_j v_jᵀ + σ² I with σ² = (tr S − Σ_j (λ_j − τ)_+) / d, so
    tr Σ₀ = tr S, and τ solves tr Σ₀² = q̂, the unbiased estimate of tr Σ² for Gaussian
    rows q̂ = ν²/((ν−1)(ν+2)) · (tr S² − (tr S)²/ν) (Bai & Saranadasa, 1996), clipped to
    [(tr S)²/d, tr S²] (the isotropic and the unshrunk ends). tr Σ₀² falls as τ grows,
    so τ is found by bisection.
    """
    n, d = x.shape
    if n < 3:
        raise ValueError(f"a one-task null needs at least 3 fingerprints, got {n}")
    nu = n - 1
    mean = x.mean(axis=0)  # (d,)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    r = min(nu, d)
    lam, vt = sv[:r] ** 2 / nu, vt[:r]  # (r,) eigenvalues of S, descending; (r, d)
    total, square = float(lam.sum()), float((lam**2).sum())
    q_hat = nu**2 / ((nu - 1) * (nu + 2)) * (square - total**2 / nu)
    target = min(max(q_hat, total**2 / d), square)

    def fitted(tau: float) -> OneBlob:
        spikes = np.maximum(lam - tau, 0.0)
        return OneBlob(mean, spikes, vt, (total - float(spikes.sum())) / d)

    lo, hi = 0.0, float(lam[0])
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fitted(mid).trace_of_square > target else (lo, mid)
    return fitted(hi)


def null_test(x: np.ndarray, observed: float, config: ClusteringConfig) -> tuple[float, int, np.ndarray]:
    """(p, draws used, surrogate silhouettes) of the best silhouette ``observed`` of ``x``.

    Surrogates come from :func:`fit_one_blob` in batches of NULL_BATCH, each scored
    by its best allowed silhouette (one where no K is allowed scores -inf: it shows no
    structure). With e of b surrogates at or above ``observed``, p = (1 + e) / (1 + b).
    Sequential stopping (in the spirit of Besag & Clifford, 1991): after each batch, stop
    once the 99% Clopper-Pearson interval of the exceedance probability lies wholly below
    or above ``null_level``; at most ``null_draws`` surrogates. A clear case stops after a
    few hundred draws, a close one runs all of them (p then has Monte Carlo error of
    about sqrt(p / B)).
    """
    from scipy.stats import beta

    blob = fit_one_blob(x)
    rng = np.random.default_rng([config.seed, 0x9A7])
    scores: list[float] = []
    exceed = 0
    while len(scores) < config.null_draws:
        for _ in range(min(NULL_BATCH, config.null_draws - len(scores))):
            best, _ = _best_silhouette(blob.draw(x.shape[0], rng), config, rng)
            scores.append(best[2] if best is not None else -np.inf)
            exceed += scores[-1] >= observed
        b = len(scores)
        low = beta.ppf(0.005, exceed, b - exceed + 1) if exceed else 0.0
        high = beta.ppf(0.995, exceed + 1, b - exceed) if exceed < b else 1.0
        if high < config.null_level or low > config.null_level:
            break
    return (1 + exceed) / (1 + len(scores)), len(scores), np.array(scores)


def _choice_sample(x: np.ndarray, config: ClusteringConfig) -> np.ndarray:
    """`x` itself, or `config.choose_on` of its rows drawn without replacement (seeded)."""
    if x.shape[0] <= config.choose_on:
        return x
    rng = np.random.default_rng([config.seed, 0x5A3])
    return x[np.sort(rng.choice(x.shape[0], config.choose_on, replace=False))]


def _choose(x: np.ndarray, config: ClusteringConfig):
    """(labels, centroids, silhouette, scores, null (mean, std), p) for the fixed or chosen K."""
    n = x.shape[0]
    if config.k is not None:
        distinct = len(np.unique(np.round(x, 12), axis=0))
        if config.k > distinct:
            raise ValueError(f"cannot make k={config.k} clusters from {distinct} distinct fingerprints")
        labels, centroids = _kmeans(x, config.k, config)
        sil = silhouette(x, labels) if 2 <= config.k < n and len(np.unique(labels)) > 1 else None
        return labels, centroids, sil, ({config.k: sil} if sil is not None else {}), None, None
    one = (np.zeros(n, dtype=np.int64), x.mean(axis=0, keepdims=True), None)
    sample = _choice_sample(x, config)
    best, scores = _best_silhouette(sample, config)
    if best is None or best[2] < config.min_silhouette:
        return (*one, scores, None, None)
    if sample is not x:  # K chosen on the sample: cluster every fingerprint with it
        labels, centroids = _kmeans(x, len(best[1]), config)
        best = (labels, centroids, best[2])
    if not config.null_draws:
        return (*best, scores, None, None)
    p, used, draws = null_test(sample, best[2], config)
    finite = draws[np.isfinite(draws)]
    null = (float(finite.mean()), float(finite.std())) if len(finite) else None
    if p > config.null_level:
        logger.info(
            "best silhouette %.3f has p = %.3f against %d one-task surrogates (level %.3f): K = 1",
            best[2],
            p,
            used,
            config.null_level,
        )
        return (*one, scores, null, p)
    logger.info(
        "best silhouette %.3f (K = %d) has p = %.3f against %d one-task surrogates",
        best[2],
        len(np.unique(best[0])),
        p,
        used,
    )
    return (*best, scores, null, p)


def match_ids(
    centroids: np.ndarray,
    previous: Clustering | None,
    max_distance: float | None = None,
) -> tuple[np.ndarray, int]:
    """Ids for new ``centroids`` (K, d): matched to ``previous`` or canonical.

    With a previous clustering, the assignment minimising the summed centroid distance
    (Hungarian) hands old ids to new clusters (pairs farther than ``max_distance`` are
    not matched); unmatched clusters get fresh ids from ``previous.next_id``. Without
    one, ids 0..K-1 follow the lexicographic order of the centroids.
    Returns (ids (K,), next_id).
    """
    from scipy.optimize import linear_sum_assignment

    k = centroids.shape[0]
    if previous is None or previous.k == 0:
        order = np.lexsort(centroids.T[::-1])  # (K,) first coordinate is the primary key
        ids = np.empty(k, dtype=np.int64)
        ids[order] = np.arange(k)
        start = previous.next_id if previous is not None else 0
        return ids + start, int(start + k)
    if previous.centroids.shape[1] != centroids.shape[1]:
        raise ValueError(
            f"previous centroids have dimension {previous.centroids.shape[1]}, new ones {centroids.shape[1]}"
        )
    cost = centroid_distances(centroids, previous.centroids)  # (K_new, K_old)
    rows, cols = linear_sum_assignment(cost)
    ids = np.full(k, -1, dtype=np.int64)
    for r, c in zip(rows, cols):
        if max_distance is None or cost[r, c] <= max_distance:
            ids[r] = previous.ids[c]
    next_id = int(previous.next_id)
    for r in np.flatnonzero(ids < 0):
        ids[r] = next_id
        next_id += 1
    return ids, next_id


def cluster_fingerprints(
    fingerprints: np.ndarray,
    config: ClusteringConfig | None = None,
    previous: Clustering | None = None,
) -> Clustering:
    """Cluster (n, d) fingerprints; ids stay stable against ``previous`` (module doc)."""
    config = config or ClusteringConfig()
    x = normalize_rows(fingerprints)
    labels, centroids, sil, scores, null, p = _choose(x, config)
    ids, next_id = match_ids(centroids, previous, config.max_match_distance)
    order = np.argsort(ids)
    logger.info("clustered %d fingerprints into K=%d (silhouette %s)", x.shape[0], len(ids), sil)
    return Clustering(
        labels=ids[labels],
        ids=ids[order],
        centroids=centroids[order],
        silhouette=sil,
        scores=scores,
        null_silhouette=null,
        null_p=p,
        next_id=next_id,
    )


def assign_nearest(fingerprints: np.ndarray, clustering: Clustering) -> np.ndarray:
    """(n,) id of the nearest centroid for each fingerprint (late joiners)."""
    x = normalize_rows(fingerprints)
    return clustering.ids[np.argmin(centroid_distances(x, clustering.centroids), axis=1)]


def centroid_distances(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """(K_a, K_b) Euclidean distances between the rows of a and b (b defaults to a)."""
    a = np.asarray(a, dtype=np.float64)
    b = a if b is None else np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need (K, d) arrays with one d, got shapes {a.shape} and {b.shape}")
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.maximum(sq, 0.0))


def fallback_order(clustering: Clustering, cluster_id: int) -> list[int]:
    """The other clusters' ids, nearest centroid first (where to look for a helper)."""
    here = clustering.centroid_of(cluster_id)[None, :]
    dist = centroid_distances(here, clustering.centroids)[0]  # (K,)
    order = np.lexsort((clustering.ids, dist))  # by distance, ties by id
    return [int(clustering.ids[i]) for i in order if clustering.ids[i] != cluster_id]


def adjusted_rand(labels_true, labels_pred) -> float:
    """Adjusted Rand index: pair-counting agreement corrected for chance (1 = identical)."""
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(_as_labels(labels_true), _as_labels(labels_pred)))


def normalized_mutual_info(labels_true, labels_pred) -> float:
    """NMI: I(T; P) / mean(H(T), H(P)) (arithmetic mean, scikit-learn's default)."""
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(_as_labels(labels_true), _as_labels(labels_pred)))


def _as_labels(labels) -> np.ndarray:
    arr = np.asarray([str(v) for v in labels])  # task ids may be str or int
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("labels must be a non-empty 1-D sequence")
    return arr
