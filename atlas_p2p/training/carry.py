"""Carry a contribution that missed a round's manifest into the owner's next contribution.

A merge takes the sample-weighted mean of its contributions, Σ_k p_k ΔW_k with p_k ∝ n_k.
If an owner's update U_1 (n_1 samples) missed round r, folding it into round r+1 next to its
new update U_2 (n_2 samples) as ONE contribution of n_1 + n_2 samples must weigh the merge
exactly as two separate contributions would:

    (n_1 + n_2)/N · U  =  n_1/N · U_1 + n_2/N · U_2   ⇔   U = w_1 U_1 + w_2 U_2,  w_j = n_j / (n_1 + n_2).

Per module that is ``aggregation.concat_factors`` of the two adapters with w_j folded into
their scalings (B = [B_1 | B_2], A = [w_1 γ_1 A_1; w_2 γ_2 A_2], γ = 1), still exact and
low-rank; dense changes (a head) mix the same way. So nothing is lost and nothing is counted
twice, however many rounds a contribution waits.
"""

from __future__ import annotations

from atlas_p2p.aggregation import AdapterFactors, Contribution, concat_factors

__all__ = ["carry_over"]


def _weighted(f: AdapterFactors, w: float) -> AdapterFactors:
    return AdapterFactors(f.A, f.B, f.scaling * w)


def carry_over(pending: Contribution | None, current: Contribution) -> Contribution:
    """``current`` with ``pending`` (an earlier, unmerged contribution of the same node) mixed in."""
    if pending is None:
        return current
    if pending.node_id != current.node_id:
        raise ValueError(f"carry_over: pending belongs to node {pending.node_id!r}, not {current.node_id!r}")
    total = pending.n_samples + current.n_samples
    w_p, w_c = (pending.n_samples / total, current.n_samples / total) if total else (1.0, 1.0)
    factors = {}
    for module in sorted(set(pending.factors) | set(current.factors)):
        parts = [_weighted(c.factors[module], w) for c, w in ((pending, w_p), (current, w_c)) if module in c.factors]
        factors[module] = parts[0] if len(parts) == 1 else concat_factors(*parts)
    dense = {}
    for name in sorted(set(pending.dense) | set(current.dense)):
        terms = [w * c.dense[name] for c, w in ((pending, w_p), (current, w_c)) if name in c.dense]
        dense[name] = terms[0] if len(terms) == 1 else terms[0] + terms[1]
    return Contribution(factors, total, current.node_id, current.round, dense)
