"""Clustering task fingerprints at the bootstrap (DESIGN 6). Numpy in, numpy out.

- k-means (scikit-learn, ``n_init`` >= 10 restarts) on unit fingerprints, so Euclidean
  distance is a monotone function of cosine similarity: ‖a − b‖² = 2 − 2 cos(a, b).
- K fixed, or chosen in [2, Kmax] by the mean silhouette coefficient
  s = mean_i (b_i − a_i) / max(a_i, b_i)   (Rousseeuw, 1987; a_i: mean distance to the
  own cluster, b_i: to the nearest other cluster). K = 1 unless the best silhouette s*
  clears two thresholds: the fixed ``min_silhouette``, and a null reference in the
  spirit of the gap statistic (Tibshirani, Walther & Hastie, 2001): draw ``null_draws``
  surrogate populations of n points from one Gaussian with the fingerprints' own mean
  and covariance (projected back to the sphere), give each the same best-over-K
  silhouette s_b, and require s* >= mean(s_b) + ``null_z`` · std(s_b) (z = 1). A fixed
  threshold alone is fooled by one elongated blob: fingerprints of a single task spread
  mostly along a few directions (e.g. how often each label occurs in a node's sample),
  and k-means splits such a blob with silhouettes up to ~0.4, as high as real
  multi-task structure gets on tiny models (see benchmarks/clustering.py).
  At small n the surrogate is conservative: its covariance holds any between-task
  scatter, and a sample covariance of n << d points is more elongated than the truth.
  With 2 tasks x 3 clients (m = 64) real splits sit 1.2–2.3 sd above the surrogates
  and one-task splits 0.6–2.4 sd below them, so z = 1 (not 1.5) separates both
  (benchmarks/clustering.py --small-n, 8 seeds).
- Stable ids: a re-clustering matches its centroids to the previous ones with the
  Hungarian algorithm on centroid distances (scipy ``linear_sum_assignment``), so a
  cluster keeps its id (and with it its versioned base) when members come and go. New
  clusters get ids never used before. A first clustering numbers clusters in
  lexicographic order of their centroids, so it does not depend on input order.
- Quality against known task ids: ARI and NMI; centroid distances order fallbacks.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClusteringConfig:
    """How the bootstrap clusters fingerprints."""

    k: int | None = None  # fixed number of clusters (--clusters); None: choose by silhouette
    k_max: int = 8  # largest K tried when choosing
    min_silhouette: float = 0.15  # below this for every K >= 2, use K = 1
    null_draws: int = 20  # surrogate one-blob populations for the null test (0: no test)
    null_z: float = 1.0  # s* must beat the surrogates' mean silhouette by this many stds
    n_init: int = 10  # k-means restarts (best inertia kept)
    seed: int = 0  # k-means random_state
    max_match_distance: float | None = None  # farther than this, a new cluster gets a fresh id

    def __post_init__(self) -> None:
        if self.k is not None and (not isinstance(self.k, int) or self.k < 1):
            raise ValueError(f"ClusteringConfig.k must be None or an int >= 1, got {self.k!r}")
        if not isinstance(self.k_max, int) or self.k_max < 2:
            raise ValueError(f"ClusteringConfig.k_max must be an int >= 2, got {self.k_max!r}")
        if not -1.0 <= self.min_silhouette <= 1.0:
            raise ValueError(f"ClusteringConfig.min_silhouette must be in [-1, 1], got {self.min_silhouette!r}")
        if not isinstance(self.null_draws, int) or self.null_draws < 0 or self.null_draws == 1:
            raise ValueError(f"ClusteringConfig.null_draws must be 0 or an int >= 2, got {self.null_draws!r}")
        if not (isinstance(self.null_z, (int, float)) and np.isfinite(self.null_z)):
            raise ValueError(f"ClusteringConfig.null_z must be a finite number, got {self.null_z!r}")
        if not isinstance(self.n_init, int) or self.n_init < 10:
            raise ValueError(f"ClusteringConfig.n_init must be an int >= 10, got {self.n_init!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"ClusteringConfig.seed must be an int, got {self.seed!r}")
        if self.max_match_distance is not None and not self.max_match_distance > 0:
            raise ValueError(
                f"ClusteringConfig.max_match_distance must be None or > 0, got {self.max_match_distance!r}"
            )


@dataclass(frozen=True)
class Clustering:
    """Result of one (re-)clustering. Row i of ``centroids`` belongs to ``ids[i]``."""

    labels: np.ndarray  # (n,) int64 cluster id of each fingerprint
    ids: np.ndarray  # (K,) int64 cluster ids, ascending
    centroids: np.ndarray  # (K, d) float64 k-means centroids
    silhouette: float | None  # mean silhouette of the chosen K (None when K = 1)
    scores: dict[int, float] = field(default_factory=dict)  # silhouette of every K tried
    null_silhouette: tuple[float, float] | None = None  # (mean, std) of the surrogates' best
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


def _kmeans(x: np.ndarray, k: int, config: ClusteringConfig) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.cluster import KMeans

    km = KMeans(n_clusters=k, n_init=config.n_init, random_state=config.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        labels = km.fit_predict(x)
    return labels.astype(np.int64), km.cluster_centers_.astype(np.float64)


def _best_silhouette(x: np.ndarray, config: ClusteringConfig):
    """(labels, centroids, silhouette, scores per K) of the best K in [2, Kmax], or None."""
    from sklearn.metrics import silhouette_score

    n = x.shape[0]
    distinct = len(np.unique(np.round(x, 12), axis=0))
    scores: dict[int, float] = {}
    best = None
    for k in range(2, min(config.k_max, n - 1, distinct) + 1):
        labels, centroids = _kmeans(x, k, config)
        scores[k] = float(silhouette_score(x, labels))
        if best is None or scores[k] > best[2]:
            best = (labels, centroids, scores[k])
    return (None if best is None else best), scores


def _null_silhouettes(x: np.ndarray, config: ClusteringConfig) -> np.ndarray:
    """(null_draws,) best silhouettes of one-Gaussian surrogates shaped like ``x``.

    Surrogate rows are mu + Σ_i z_i (x_i − mu) / sqrt(n − 1) with z ~ N(0, I_n): a
    Gaussian with the sample mean and covariance of x, then scaled to unit norm.
    """
    n = x.shape[0]
    mu = x.mean(axis=0)  # (d,)
    centred = (x - mu) / np.sqrt(n - 1)  # (n, d)
    rng = np.random.default_rng([config.seed, 0x9A7])
    out = []
    for _ in range(config.null_draws):
        surrogate = mu + rng.standard_normal((n, n)) @ centred  # (n, d)
        norms = np.linalg.norm(surrogate, axis=1, keepdims=True)
        surrogate = surrogate / np.where(norms > 0, norms, 1.0)
        best, _ = _best_silhouette(surrogate, config)
        out.append(best[2] if best is not None else 0.0)
    return np.array(out)


def _choose(x: np.ndarray, config: ClusteringConfig):
    """(labels, centroids, silhouette, scores, null) for the fixed or chosen K."""
    from sklearn.metrics import silhouette_score

    n = x.shape[0]
    if config.k is not None:
        distinct = len(np.unique(np.round(x, 12), axis=0))
        if config.k > distinct:
            raise ValueError(f"cannot make k={config.k} clusters from {distinct} distinct fingerprints")
        labels, centroids = _kmeans(x, config.k, config)
        sil = float(silhouette_score(x, labels)) if 2 <= config.k < n else None
        return labels, centroids, sil, ({config.k: sil} if sil is not None else {}), None
    one = (np.zeros(n, dtype=np.int64), x.mean(axis=0, keepdims=True), None)
    best, scores = _best_silhouette(x, config)
    if best is None or best[2] < config.min_silhouette:
        return (*one, scores, None)
    null = None
    if config.null_draws:
        draws = _null_silhouettes(x, config)
        null = (float(draws.mean()), float(draws.std()))
        if best[2] < null[0] + config.null_z * null[1]:
            logger.info("best silhouette %.3f does not beat one-blob surrogates %.3f ± %.3f: K = 1", best[2], *null)
            return (*one, scores, null)
    return (*best, scores, null)


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
    labels, centroids, sil, scores, null = _choose(x, config)
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
