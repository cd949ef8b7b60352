"""Lossy re-factoring of a stacked update to a fixed rank by truncated SVD.

The stacked merge B̃ Ã has rank up to R = Σ r_k. To hand it back as an ordinary
rank-r adapter (the optional lossy merge, or exporting a cluster's total update as a
standard PEFT adapter) we want the best rank-r approximation in Frobenius norm
(Eckart-Young). It is computed without forming the dense d_out x d_in matrix:

    B̃ = Q_b R_b,  Ãᵀ = Q_a R_a            (thin QR)
    B̃ Ã = Q_b (R_b R_aᵀ) Q_aᵀ               the core C = R_b R_aᵀ is only R x R
    C = U Σ Vᵀ  ⇒  B̃ Ã = (Q_b U) Σ (Q_a V)ᵀ

Keeping the r largest singular values leaves an error ||B̃ Ã − B A||_F =
sqrt(Σ_{i>r} σ_i²), zero when r is at least the true rank. Cost O((d_out + d_in) R²).

The numerical rank for a relative tolerance τ is the smallest r whose dropped tail is
within τ of the whole: sqrt(Σ_{i>r} σ_i²) <= τ sqrt(Σ_i σ_i²) = τ ||B̃ Ã||_F. Re-factoring
to that rank keeps the update to relative Frobenius error τ (exact export).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from atlas_p2p.validation import require_int, require_number

from .stacking import StackedFactors

__all__ = [
    "LowRank",
    "numerical_rank",
    "rank_within",
    "refactor_lossy",
    "refactor_within",
    "stacked_singular_values",
]


class LowRank(NamedTuple):
    """scaling · B A is the best rank-r approximation; error is its Frobenius error."""

    B: torch.Tensor  # (d_out, r)
    A: torch.Tensor  # (r, d_in)
    error: float


def _svd_of_stack(stacked: StackedFactors):
    """Q_b U, σ (descending), (Q_a V)ᵀ of B̃ Ã, from two thin QRs and a small SVD."""
    q_b, r_b = torch.linalg.qr(stacked.B, mode="reduced")  # (d_out, k_b), (k_b, R)
    q_a, r_a = torch.linalg.qr(stacked.A.T, mode="reduced")  # (d_in, k_a), (k_a, R)
    core = r_b @ r_a.T  # (k_b, k_a)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)  # (k_b, k), (k,), (k, k_a)
    return q_b @ u, s, vh @ q_a.T  # (d_out, k), (k,), (k, d_in)


def stacked_singular_values(stacked: StackedFactors) -> torch.Tensor:
    """The singular values of B̃ Ã, descending, without forming it."""
    if not isinstance(stacked, StackedFactors):
        raise ValueError(f"expected StackedFactors, got {type(stacked).__name__}")
    if stacked.rank == 0:
        return stacked.A.new_zeros(0)
    return _svd_of_stack(stacked)[1]


def rank_within(singular_values: torch.Tensor, rel_tol: float) -> int:
    """Smallest r with sqrt(Σ_{i>=r} σ_i²) <= rel_tol · sqrt(Σ_i σ_i²), σ descending (0-based i).

    The tails are summed from the smallest value up, in float64, so tiny tails are not lost.
    All zeros (or no values) give 0.
    """
    require_number("rel_tol", rel_tol, 0)
    s2 = singular_values.detach().double().flatten() ** 2  # (k,)
    tails = torch.cat([torch.flip(torch.cumsum(torch.flip(s2, [0]), 0), [0]), s2.new_zeros(1)])  # (k+1,)
    within = torch.nonzero(tails <= (rel_tol**2) * tails[0]).flatten()  # tails[k] = 0 always qualifies
    return int(within[0])


def numerical_rank(stacked: StackedFactors, rel_tol: float) -> int:
    """Rank of B̃ Ã to relative Frobenius tolerance ``rel_tol`` (see ``rank_within``), in float64."""
    if not isinstance(stacked, StackedFactors):
        raise ValueError(f"expected StackedFactors, got {type(stacked).__name__}")
    wide = StackedFactors(stacked.B.double(), stacked.A.double())
    return rank_within(stacked_singular_values(wide), rel_tol)


def refactor_lossy(stacked: StackedFactors, rank: int, scaling: float = 1.0) -> LowRank:
    """Rank-``rank`` factors (B, A) with scaling · B A ≈ B̃ Ã, and the error.

    The singular values are split evenly between the factors, B = Q_b U_r √(Σ_r/γ) and
    A = √(Σ_r/γ) V_rᵀ Q_aᵀ, so neither factor dwarfs the other; pass the target
    adapter's scaling γ = α/r to export a standard LoRA adapter. If the update has fewer
    than ``rank`` singular values the extra columns/rows are zero (shapes are always
    (d_out, rank) and (rank, d_in)). error = sqrt(Σ_{i>rank} σ_i²).
    """
    if not isinstance(stacked, StackedFactors):
        raise ValueError(f"expected StackedFactors, got {type(stacked).__name__}")
    require_int("rank", rank, 0)
    require_number("scaling", scaling, positive=True)
    if stacked.rank == 0:
        return _truncate(stacked, None, rank, scaling)
    return _truncate(stacked, _svd_of_stack(stacked), rank, scaling)


def refactor_within(
    stacked: StackedFactors, rel_tol: float, cap: int | None = None, scaling: float = 1.0
) -> tuple[LowRank, torch.Tensor, int]:
    """(factors, σ, numerical rank): ``refactor_lossy`` at rank min(cap, numerical rank), at least 1.

    One SVD of the stack gives both the numerical rank for ``rel_tol`` (``rank_within``)
    and the factors; σ is every singular value, descending.
    """
    if not isinstance(stacked, StackedFactors):
        raise ValueError(f"expected StackedFactors, got {type(stacked).__name__}")
    require_number("scaling", scaling, positive=True)
    if cap is not None:
        require_int("cap", cap, 1)
    svd = _svd_of_stack(stacked) if stacked.rank else None
    s = stacked.A.new_zeros(0) if svd is None else svd[1]
    exact = rank_within(s, rel_tol)
    rank = max(1, exact if cap is None else min(cap, exact))
    return _truncate(stacked, svd, rank, scaling), s, exact


def _truncate(stacked: StackedFactors, svd, rank: int, scaling: float) -> LowRank:
    d_out, d_in = stacked.shape
    b = stacked.B.new_zeros(d_out, rank)
    a = stacked.A.new_zeros(rank, d_in)
    if svd is None:
        return LowRank(b, a, 0.0)
    left, s, right = svd
    keep = min(rank, s.numel())
    root = torch.sqrt(s[:keep] / scaling)  # (keep,)
    b[:, :keep] = left[:, :keep] * root  # (d_out, keep)
    a[:keep, :] = root[:, None] * right[:keep, :]  # (keep, d_in)
    error = float(torch.sqrt(torch.sum(s[keep:].double() ** 2)))
    return LowRank(b, a, error)
