"""The aggregation rules of the baselines we compare against (DESIGN section 9).

- SplitLoRA: factor-wise FedAvg, Ā = Σ p_k A_k and B̄ = Σ p_k B_k. Only defined when
  every client has the same modules, ranks and scalings. It is NOT the mean of the
  updates: B̄ Ā = Σ_k Σ_l p_k p_l B_k A_l carries cross terms (k ≠ l).
- HSplitLoRA: the exact stacked merge over all clients (``stack_merge``), no clusters.
- MIRA: every client keeps a personal update and the coordinator smooths it over a task
  graph, ΔW_k ← ΔW_k − ηλ Σ_l a_kl (ΔW_k − ΔW_l). In matrix form ΔW ← (I − ηλ L) ΔW
  with the graph Laplacian L = D − A, so each new ΔW_k is a combination of the old
  ones with weights m_kl (row k of M = I − ηλ L, which sums to 1). With unequal ranks we
  do this in product space, exactly, by stacking: ΔW'_k = Σ_l m_kl γ_l B_l A_l. The
  diagonal weight is 1 − ηλ deg_k, so we require ηλ · deg_k < 1 for every k: then every
  weight is non-negative and the step is a convex combination (a contraction towards
  the neighbours, never an overshoot past them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from atlas_p2p.validation import require_number

from .factors import AdapterFactors, Contribution, _compute_dtype
from .reduce import Partial, _place, _settle, combine, finalize, partial_of
from .refactor import refactor_lossy
from .stacking import (
    Patch,
    StackedFactors,
    _check_contributions,
    _common_keys,
    _module_holders,
    _stack,
    average_dense,
    fold_patches,
    sample_weights,
)

__all__ = [
    "FactorAverage",
    "common_rank",
    "fedavg_factors",
    "fedavg_partial",
    "cluster_adjacency",
    "cosine_adjacency",
    "MIRA_PULL",
    "mira_mixing_matrix",
    "mira_personal_patch",
    "mira_update",
]

# MIRA in the runtime: a_kl = 1 between members of a cluster of n, ηλ = MIRA_PULL / n, so
# ηλ deg_k = MIRA_PULL (n-1)/n < 1 and each round moves a node's adapter MIRA_PULL of the
# way to its cluster's mean.
MIRA_PULL = 0.5


@dataclass(frozen=True, eq=False)
class FactorAverage:
    """SplitLoRA's aggregate: one adapter every client loads, and the mean dense changes."""

    factors: dict[str, AdapterFactors]
    dense: dict[str, torch.Tensor]
    weights: dict[str, float]


def fedavg_factors(contributions: Sequence[Contribution]) -> FactorAverage:
    """SplitLoRA's rule: Ā = Σ p_k A_k, B̄ = Σ p_k B_k per module, p_k = n_k / Σ n.

    Requires the same module set, the same rank and the same scaling everywhere (the
    homogeneous setting SplitLoRA assumes); anything else is a ValueError naming the
    module and the per-node values. Dense trainables are averaged with p_k.
    """
    _check_contributions(contributions)
    weights = sample_weights(contributions)
    factors = {}
    for module in _common_keys(contributions, "factors", "factor-wise FedAvg needs the same modules on every client"):
        holders = _module_holders(contributions, module)
        ranks = {c.node_id: f.rank for c, f in holders}
        if len(set(ranks.values())) != 1:
            raise ValueError(
                f"factor-wise FedAvg needs equal ranks, module {module!r} has ranks {ranks} "
                "(use stack_merge for heterogeneous ranks)"
            )
        scalings = {c.node_id: f.scaling for c, f in holders}
        if len(set(scalings.values())) != 1:
            raise ValueError(f"factor-wise FedAvg needs equal scalings, module {module!r} has {scalings}")
        dtype = _compute_dtype([f.A for _, f in holders] + [f.B for _, f in holders])
        a = sum(weights[c.node_id] * f.A.to(dtype) for c, f in holders)  # (r, d_in)
        b = sum(weights[c.node_id] * f.B.to(dtype) for c, f in holders)  # (d_out, r)
        factors[module] = AdapterFactors(a, b, holders[0][1].scaling)
    return FactorAverage(factors, average_dense(contributions, weights), weights)


def cluster_adjacency(labels: Sequence[Any]) -> np.ndarray:
    """a_kl = 1 if clients k and l are in the same cluster (k ≠ l), else 0. (K, K)."""
    labels = list(labels)
    a = np.array([[1.0 if x == y else 0.0 for y in labels] for x in labels]).reshape(len(labels), len(labels))
    np.fill_diagonal(a, 0.0)
    return a


def cosine_adjacency(fingerprints: Any, floor: float = 0.0) -> np.ndarray:
    """a_kl = cos(f_k, f_l) clipped to [0, 1], zeroed below ``floor`` and on the diagonal.

    fingerprints: (K, D) array, one row per client (need not be unit norm; zero rows
    are an error since their cosine is undefined).
    """
    f = np.asarray(fingerprints, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] == 0:
        raise ValueError(f"fingerprints must be a (K, D) array with K >= 1, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("fingerprints contain NaN or infinity")
    if not (isinstance(floor, (int, float)) and 0.0 <= floor <= 1.0):
        raise ValueError(f"floor must be in [0, 1], got {floor!r}")
    norms = np.linalg.norm(f, axis=1)
    if (norms == 0).any():
        raise ValueError(f"fingerprint rows {np.flatnonzero(norms == 0).tolist()} are zero")
    unit = f / norms[:, None]
    a = np.clip(unit @ unit.T, 0.0, 1.0)  # (K, K)
    a[a < floor] = 0.0
    np.fill_diagonal(a, 0.0)
    return a


def mira_mixing_matrix(adjacency: Any, eta_lambda: float) -> np.ndarray:
    """M = I − ηλ (D − A), checked: A non-negative and finite, ηλ · deg_k < 1 for all k.

    The diagonal of ``adjacency`` is ignored (a_kk (ΔW_k − ΔW_k) = 0). (K, K) float64.
    """
    a = np.array(adjacency, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"adjacency must be a square (K, K) matrix, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("adjacency contains NaN or infinity")
    if (a < 0).any():
        raise ValueError("adjacency weights a_kl must be >= 0")
    require_number("eta_lambda", eta_lambda, 0)
    np.fill_diagonal(a, 0.0)
    deg = a.sum(axis=1)  # (K,)
    worst = int(np.argmax(deg)) if deg.size else 0
    if deg.size and eta_lambda * deg[worst] >= 1.0:
        raise ValueError(
            f"unstable MIRA step: eta_lambda * deg_k must be < 1, but client {worst} has "
            f"deg {deg[worst]:g} and eta_lambda {eta_lambda:g} (product {eta_lambda * deg[worst]:g})"
        )
    return np.eye(a.shape[0]) - eta_lambda * (np.diag(deg) - a)


def mira_update(contributions: Sequence[Contribution], adjacency: Any, eta_lambda: float) -> dict[str, Patch]:
    """MIRA's task-graph step, exact in product space: node id -> its new update.

    Row k of ``adjacency`` belongs to ``contributions[k]``. The result for client k is a
    ``Patch`` whose modules stack ΔW'_k = Σ_l m_kl γ_l B_l A_l (absent module = 0) and
    whose dense entries are Σ_l m_kl D_l; ``weights`` holds row k of M. Densify with
    ``dense_delta`` or re-factor to client k's rank with ``refactor_lossy``.
    n_samples plays no part: MIRA's graph weights replace data-size weights.
    """
    round_ = _check_contributions(contributions)
    mix = mira_mixing_matrix(adjacency, eta_lambda)
    if mix.shape[0] != len(contributions):
        raise ValueError(f"adjacency is {mix.shape[0]}x{mix.shape[0]} but there are {len(contributions)} contributions")
    ids = [c.node_id for c in contributions]
    modules = sorted({m for c in contributions for m in c.factors})
    holders = {m: _module_holders(contributions, m) for m in modules}
    out = {}
    for k, node in enumerate(ids):
        row = {ids[l]: float(mix[k, l]) for l in range(len(ids))}
        stacked = {m: _stack(h, [row[c.node_id] for c, _ in h]) for m, h in holders.items()}
        out[node] = Patch(stacked, average_dense(contributions, row), row, round_)
    return out


def common_rank(contributions: Sequence[Contribution]) -> list[Contribution]:
    """`contributions` with every module at the rank and scaling most of them have for it.

    A contribution that carries a missed round (training.carry) stacks two rounds' factors,
    so its rank (and scaling) differ; SplitLoRA has no such case. Its factors are re-factored
    to the common rank and scaling by truncated SVD (aggregation.refactor_lossy: the best
    approximation of that rank) so factor-wise averaging stays defined. Contributions already
    in the common form are returned as they are."""
    forms: dict[str, list[tuple[int, float]]] = {}
    for c in contributions:
        for name, f in c.factors.items():
            forms.setdefault(name, []).append((f.rank, f.scaling))
    common = {name: max(set(fs), key=lambda x: (fs.count(x), -x[0])) for name, fs in forms.items()}
    out = []
    for c in contributions:
        odd = {n: f for n, f in c.factors.items() if (f.rank, f.scaling) != common[n]}
        if not odd:
            out.append(c)
            continue
        factors = dict(c.factors)
        for name, f in odd.items():
            rank, scaling = common[name]
            low = refactor_lossy(StackedFactors(f.B, f.scaling * f.A), rank, scaling)
            factors[name] = AdapterFactors(low.A, low.B, scaling)
        out.append(Contribution(factors, c.n_samples, c.node_id, c.round, c.dense))
    return out


def fedavg_partial(contributions: Sequence[Contribution]) -> Partial:
    """SplitLoRA's round as a partial the runtime publishes like an exact one.

    `reduce.finalize` divides a partial's A factors and dense sums by N = Σ n_k, so the
    partial holds, per module, B = Σ p_k B_k and A = Σ n_k γ A_k (rank r): finalize then
    gives the patch B̄ · γĀ, the product of the averaged factors (with its cross terms),
    and the dense mean Σ p_k D_k. Contributions are first brought to a common rank
    (`common_rank`); covers name every contribution's digest as sent, as an exact partial's do.
    """
    covers = {c.node_id: c.digest for c in contributions}  # what members hold, before any re-factoring
    contributions = common_rank(contributions)
    average = fedavg_factors(contributions)
    total = float(sum(c.n_samples for c in contributions))
    modules = {
        name: StackedFactors(f.B.contiguous(), (total * f.scaling) * f.A) for name, f in sorted(average.factors.items())
    }
    dense = {name: total * d for name, d in sorted(average.dense.items())}
    weights = {c.node_id: float(c.n_samples) for c in contributions}
    return Partial(Patch(modules, dense, weights, contributions[0].round), covers)


def _scaled(p: Patch, c: float) -> Patch:
    return Patch(
        {n: StackedFactors(sf.B, c * sf.A) for n, sf in p.modules.items()},
        {n: c * d for n, d in p.dense.items()},
        {},
        p.round,
        {n: c * t for n, t in p.full.items()},
    )


def _compact(p: Patch) -> Patch:
    """`p` with every module in its smaller exact form (stacked, or dense past the bound)."""
    modules, full = {}, dict(p.full)
    for name, sf in p.modules.items():
        _place(modules, full, name, _settle(sf))
    return Patch(modules, p.dense, p.weights, p.round, full)


def _uniform_mean(contributions: Sequence[Contribution]) -> Patch:
    """(1/n) Σ_l γ_l B_l A_l and (1/n) Σ_l D_l: MIRA's graph weights, not data sizes."""
    ones = [Contribution(c.factors, 1, c.node_id, c.round, c.dense) for c in contributions]
    return finalize(combine([partial_of(c) for c in ones]))


def mira_personal_patch(
    contributions: Sequence[Contribution], me: str, own_total: Patch, mean_total: Patch, pull: float = MIRA_PULL
) -> tuple[Patch, Patch]:
    """MIRA's step for node `me` of a cluster, as the patch its own base folds this round.

    Node k's adapter is cumulative, ΔW_k (its folded total, `own_total`). With a complete
    graph on the cluster's n members and ηλ = pull / n, MIRA's update after the round's
    local updates δ_l is ΔW_k' = Σ_l m_kl (ΔW_l + δ_l) = (1 - pull)(ΔW_k + δ_k) + pull · mean_l(ΔW_l + δ_l).
    The mean of the ΔW_l is the sum over past rounds of each round's uniform mean
    (`mean_total`: mixing keeps the mean), so the patch is

        ΔW_k' - ΔW_k = (1 - pull) δ_k + pull · ū - pull · ΔW_k + pull · mean_total,    ū = mean_l δ_l,

    exact in product space (stacked factors, dense once that is smaller; dense trainables
    alike). A node without a contribution this round has δ_k = 0. Returns (the patch, with
    weights = row k of the mixing matrix; the new mean_total = mean_total + ū).
    """
    require_number("pull", pull, 0)
    if not 0 <= pull < 1:
        raise ValueError(f"pull must be in [0, 1), got {pull!r}")
    round_ = _check_contributions(contributions)
    mean = _uniform_mean(contributions)
    parts = [_scaled(mean, pull), _scaled(own_total, -pull), _scaled(mean_total, pull)]
    mine = [c for c in contributions if c.node_id == me]
    weights = {c.node_id: pull / len(contributions) for c in contributions}
    if mine:
        parts.append(_scaled(_uniform_mean(mine), 1.0 - pull))
        weights[me] += 1.0 - pull
    patch = _compact(fold_patches(parts))
    new_mean = _compact(fold_patches([mean_total, mean]))
    return Patch(patch.modules, patch.dense, weights, round_, patch.full), new_mean
