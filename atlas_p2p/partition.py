"""Splitting a dataset across clients (DESIGN 5, 11). Seeded, numpy in and out.

Every function returns one sorted int64 index array per client; together they cover
each input position exactly once (no duplicates, nothing dropped). Compose them by
indexing: e.g. split by task first, then skew lengths inside one task's clients with
``length_dirichlet(lengths[idx], ...)`` and map back through ``idx``.

- :func:`by_task`: one task per client, each task's examples shared evenly among the
  clients given to it.
- :func:`dirichlet_label_skew`: for every class c draw q_c ~ Dir(α·1_K) over the K
  clients and give client k a share q_c[k] of class c (Hsu, Qi & Brown, 2019). Small α
  means each client sees few classes.
- :func:`length_dirichlet`: SplitFT's length-based Dirichlet: cut the examples into
  ``num_bins`` length-quantile bins, then split each bin across clients with its own
  q_b ~ Dir(α·1_K), so clients differ in their mix of short and long sequences.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check_clients(num_clients: int) -> None:
    if not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1, got {num_clients!r}")


def _check_alpha(alpha: float) -> None:
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")


def _split_counts(n: int, proportions: np.ndarray) -> np.ndarray:
    """Integer counts summing to n, as close to n * proportions as rounding allows.

    Largest-remainder rounding: floor every share, then hand the leftover items to the
    largest fractional parts (ties to the lower index).
    """
    raw = n * proportions  # (K,)
    counts = np.floor(raw).astype(np.int64)
    leftover = n - int(counts.sum())
    if leftover:
        order = np.argsort(-(raw - counts), kind="stable")
        counts[order[:leftover]] += 1
    return counts


def _deal(groups: list[np.ndarray], proportions: np.ndarray, num_clients: int, rng) -> list[np.ndarray]:
    """Shuffle each group and cut it across clients by that group's proportion row."""
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for members, share in zip(groups, proportions):
        members = rng.permutation(members)
        bounds = np.concatenate([[0], np.cumsum(_split_counts(len(members), share))])
        for k in range(num_clients):
            parts[k].append(members[bounds[k] : bounds[k + 1]])
    return [np.sort(np.concatenate(p)).astype(np.int64) if p else np.empty(0, np.int64) for p in parts]


def by_task(tasks: Sequence, clients_per_task: int | dict, seed: int) -> tuple[list[np.ndarray], list]:
    """One task per client. Returns (client index arrays, the task of each client).

    ``clients_per_task`` is one int for every task or a dict task -> int. Tasks are
    visited in sorted order (by ``str``) so client numbering is deterministic; each
    task's examples are shuffled with the seed and dealt out in near-equal parts.
    """
    tasks = list(tasks)
    if any(t is None for t in tasks):
        raise ValueError("by_task needs a task for every example; some are None")
    distinct = sorted(set(tasks), key=str)
    if isinstance(clients_per_task, dict):
        missing = [t for t in distinct if t not in clients_per_task]
        if missing:
            raise ValueError(f"clients_per_task has no entry for tasks {missing}")
        counts = {t: clients_per_task[t] for t in distinct}
    else:
        counts = {t: clients_per_task for t in distinct}
    rng = np.random.default_rng([seed, 0xB7])
    positions = np.arange(len(tasks))
    labels = np.array([distinct.index(t) for t in tasks], dtype=np.int64) if tasks else np.empty(0, np.int64)
    clients: list[np.ndarray] = []
    owners: list = []
    for t_index, task in enumerate(distinct):
        k = counts[task]
        _check_clients(k)
        members = positions[labels == t_index]
        if len(members) < k:
            raise ValueError(f"task {task!r} has {len(members)} examples for {k} clients")
        clients.extend(_deal([members], np.full((1, k), 1.0 / k), k, rng))
        owners.extend([task] * k)
    return clients, owners


def dirichlet_label_skew(
    labels: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    min_size: int = 1,
    max_tries: int = 100,
) -> list[np.ndarray]:
    """Label-skewed split: class c goes to the clients in proportions q_c ~ Dir(α·1_K).

    Draws are repeated (up to ``max_tries``) until every client holds at least
    ``min_size`` examples, as is usual for this partition; a ValueError says so if it
    never happens (lower ``min_size`` or raise ``alpha``).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    _check_clients(num_clients)
    _check_alpha(alpha)
    if min_size * num_clients > len(labels):
        raise ValueError(f"cannot give {num_clients} clients {min_size} examples each from {len(labels)}")
    classes = np.unique(labels)
    groups = [np.flatnonzero(labels == c) for c in classes]
    rng = np.random.default_rng([seed, 0xD1])
    for _ in range(max_tries):
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(classes))  # (C, K)
        parts = _deal(groups, proportions, num_clients, rng)
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise ValueError(f"no Dirichlet(alpha={alpha}) draw in {max_tries} tries gave every client >= {min_size} examples")


def length_bins(lengths: Sequence[int] | np.ndarray, num_bins: int) -> np.ndarray:
    """(N,) bin id of each example: quantile bins of its length (ties stay together).

    Ids are 0..B-1 in order of length; B < num_bins when quantile edges coincide.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    if lengths.ndim != 1 or len(lengths) == 0:
        raise ValueError(f"lengths must be a non-empty 1-D array, got shape {lengths.shape}")
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    edges = np.unique(np.quantile(lengths, np.linspace(0, 1, num_bins + 1)[1:-1]))
    raw = np.searchsorted(edges, lengths, side="right")
    return np.unique(raw, return_inverse=True)[1].reshape(-1).astype(np.int64)


def length_dirichlet(
    lengths: Sequence[int] | np.ndarray,
    num_clients: int,
    alpha: float,
    seed: int,
    num_bins: int = 4,
) -> list[np.ndarray]:
    """SplitFT's length-based Dirichlet partition (see module doc).

    Quantile edges can coincide when many examples share a length; such bins merge, so
    there may be fewer than ``num_bins`` bins.
    """
    _check_clients(num_clients)
    _check_alpha(alpha)
    bins = length_bins(lengths, num_bins)
    groups = [np.flatnonzero(bins == b) for b in np.unique(bins)]
    rng = np.random.default_rng([seed, 0x1E])
    proportions = rng.dirichlet(np.full(num_clients, float(alpha)), size=len(groups))  # (bins, K)
    return _deal(groups, proportions, num_clients, rng)
