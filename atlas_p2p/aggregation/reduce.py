"""The exact merge as a reduce: partial sums that combine up a tree and normalise at the root.

A partial over a set S of contributions keeps the weighted sums un-normalised, with the
sample counts n_k that weight them:

    U_M = Σ_{k∈S} n_k γ_k B_k A_k      (each adapted module M)
    V_D = Σ_{k∈S} n_k D_k              (each dense trainable D)
    n   = {k: n_k},  N_S = Σ_{k∈S} n_k

Two partials over disjoint sets add term by term, so any tree of `combine` calls gives
the same sums, and the root's `finalize` divides by N = Σ n_k over the round:
U_M / N = Σ_k p_k γ_k B_k A_k with p_k = n_k / N, the weighted mean stack_merge gives
(up to float rounding). A contribution without M adds zero to U_M and keeps its n_k, as
in stack_merge.

Each U_M is held in the smaller of two exact forms: stacked factors [B_k ...][n_k γ_k A_k; ...]
of rank R = Σ r_k, or the (d_out, d_in) matrix once R (d_in + d_out) >= d_in d_out
(`stacked_is_smaller`); a sum with a full part is full. So a partial, and the patch it
ends as, is never larger than the dense update, whatever the number of contributions.

A partial names what it covers: node id -> contribution digest. Combining overlapping
partials is an error (a contribution would count twice); `ReduceTree` lays out the tree
the runtime sends partials up.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from atlas_p2p.validation import require_int

from .factors import Contribution, _compute_dtype
from .stacking import Patch, StackedFactors, stacked_is_smaller

__all__ = ["Partial", "ReduceTree", "combine", "finalize", "partial_of"]


@dataclass(frozen=True, eq=False)
class Partial:
    """Un-normalised sums over some contributions of one round (module doc).

    sums: a Patch whose modules/full hold U_M, dense V_D, weights the sample counts n_k
    (node id -> n_k) and round the round. covers: node id -> digest of its contribution,
    the same node ids as sums.weights.
    """

    sums: Patch
    covers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.sums, Patch):
            raise ValueError(f"partial sums: expected a Patch, got {type(self.sums).__name__}")
        covers = dict(self.covers)
        if not covers:
            raise ValueError("a partial must cover at least one contribution")
        for node, digest in covers.items():
            if not isinstance(node, str) or not node or not isinstance(digest, str) or not digest:
                raise ValueError(f"partial covers: expected node id -> digest strings, got {node!r}: {digest!r}")
        if set(covers) != set(self.sums.weights):
            raise ValueError(
                f"partial covers nodes {sorted(covers)} but weighs nodes {sorted(self.sums.weights)}: they must agree"
            )
        for node, n in self.sums.weights.items():
            if not (math.isfinite(n) and n >= 0):
                raise ValueError(f"partial weight of node {node}: {n!r} must be a sample count >= 0")
        object.__setattr__(self, "covers", covers)

    @property
    def round(self) -> int:
        return self.sums.round

    @property
    def total(self) -> float:
        """N_S = Σ n_k over the covered contributions."""
        return sum(self.sums.weights.values())


def _settle(stacked: StackedFactors) -> StackedFactors | torch.Tensor:
    """The smaller exact form of one sum: the factors, or B̃ Ã once their rank reaches the bound."""
    d_out, d_in = stacked.shape
    if stacked_is_smaller(stacked.rank, d_in, d_out):
        return stacked
    return stacked.dense()  # (d_out, d_in)


def _place(modules: dict, full: dict, name: str, form: StackedFactors | torch.Tensor) -> None:
    (modules if isinstance(form, StackedFactors) else full)[name] = form


def partial_of(c: Contribution) -> Partial:
    """The partial of one contribution: U_M = n γ B A (stacked unless full is smaller), V_D = n D."""
    if not isinstance(c, Contribution):
        raise ValueError(f"expected Contribution, got {type(c).__name__}")
    n = c.n_samples
    modules: dict[str, StackedFactors] = {}
    full: dict[str, torch.Tensor] = {}
    for name in sorted(c.factors):
        f = c.factors[name]
        dtype = _compute_dtype([f.A, f.B])
        keep = f.rank if n and f.scaling else 0  # a zero term adds no columns, as in stack_merge
        b, a = f.B[:, :keep].to(dtype), (n * f.scaling) * f.A[:keep].to(dtype)
        stacked = StackedFactors(b.contiguous(), a.contiguous())  # (d_out, r), (r, d_in)
        _place(modules, full, name, _settle(stacked))
    dense = {name: n * d.to(_compute_dtype([d])) for name, d in sorted(c.dense.items())}
    return Partial(Patch(modules, dense, {c.node_id: float(n)}, c.round, full), {c.node_id: c.digest})


def _first_node(p: Partial) -> str:
    return min(p.covers)


def combine(parts: Sequence[Partial]) -> Partial:
    """The partial over the union of disjoint partials (ValueError if any two overlap).

    Parts are taken in the order of their smallest node id, so the same parts give the
    same bytes whatever order they arrived in.
    """
    if not parts:
        raise ValueError("no partials to combine")
    for p in parts:
        if not isinstance(p, Partial):
            raise ValueError(f"expected Partial, got {type(p).__name__}")
    rounds = sorted({p.round for p in parts})
    if len(rounds) != 1:
        raise ValueError(f"partials of one reduce must share a round, got rounds {rounds}")
    covers: dict[str, str] = {}
    for p in parts:
        twice = sorted(set(covers) & set(p.covers))
        if twice:
            raise ValueError(f"partials overlap on node(s) {twice}: their contributions would count twice")
        covers.update(p.covers)
    if len(parts) == 1:
        return parts[0]
    ordered = sorted(parts, key=_first_node)
    dense_names = {frozenset(p.sums.dense) for p in ordered}
    if len(dense_names) != 1:
        raise ValueError(f"every partial must carry the same dense trainables, got {sorted(map(sorted, dense_names))}")
    modules: dict[str, StackedFactors] = {}
    full: dict[str, torch.Tensor] = {}
    for name in sorted({m for p in ordered for m in p.sums.module_names()}):
        holders = [p.sums for p in ordered if name in p.sums.modules or name in p.sums.full]
        shapes = {h.module_shape(name) for h in holders}
        if len(shapes) != 1:
            raise ValueError(f"module {name!r}: (d_out, d_in) differs across partials: {sorted(shapes)}")
        _place(modules, full, name, _sum_module(holders, name))
    dense = {}
    for name in sorted(ordered[0].sums.dense):
        tensors = [p.sums.dense[name] for p in ordered]
        if len({tuple(t.shape) for t in tensors}) != 1:
            raise ValueError(f"dense {name!r}: shape differs across partials")
        dense[name] = _add([t.to(_compute_dtype(tensors)) for t in tensors])
    weights = {node: n for p in ordered for node, n in p.sums.weights.items()}
    return Partial(Patch(modules, dense, weights, rounds[0], full), covers)


def _add(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    acc = tensors[0].clone()
    for t in tensors[1:]:
        acc += t
    return acc


def _sum_module(holders: Sequence[Patch], name: str) -> StackedFactors | torch.Tensor:
    """Σ of one module over partial sums: stacked while the rank stays under the bound, else full."""
    stacked = [h.modules[name] for h in holders if name in h.modules]
    dtype = _compute_dtype(
        [t for sf in stacked for t in (sf.A, sf.B)] + [h.full[name] for h in holders if name in h.full]
    )
    if len(stacked) == len(holders):
        joined = StackedFactors(
            torch.cat([sf.B.to(dtype) for sf in stacked], dim=1),  # (d_out, Σ R)
            torch.cat([sf.A.to(dtype) for sf in stacked], dim=0),  # (Σ R, d_in)
        )
        return _settle(joined)
    return _add([h.module_delta(name).to(dtype) for h in holders])  # (d_out, d_in)


def finalize(p: Partial) -> Patch:
    """The round's patch from the partial over all its contributions: every sum / N, p_k = n_k / N."""
    if not isinstance(p, Partial):
        raise ValueError(f"expected Partial, got {type(p).__name__}")
    total = p.total
    if total <= 0:
        raise ValueError("the contributions hold no samples (Σ n_k = 0): nothing to weight by")
    s = p.sums
    modules = {name: StackedFactors(sf.B, sf.A / total) for name, sf in s.modules.items()}
    full = {name: t / total for name, t in s.full.items()}
    dense = {name: d / total for name, d in s.dense.items()}
    weights = {node: n / total for node, n in s.weights.items()}
    return Patch(modules, dense, weights, s.round, full)


@dataclass(frozen=True)
class ReduceTree:
    """A k-ary tree over a cluster: the root first, then the other members in id order,
    member i's parent is member (i - 1) // fan_in (heap order), so depth is ~log_k(n).
    Members in `last` (nobody can dial them: children dial their parent) go at the end of
    the order, so they are leaves while they are no more than the leaves; one whose heap
    parent is itself in `last` is adopted by a dialable member instead (`adopted`: (child,
    parent) pairs, round robin over the dialable members from the root), which then has
    more than fan_in children. Nobody ever pushes to an unreachable parent."""

    order: tuple[int, ...]
    fan_in: int
    adopted: tuple[tuple[int, int], ...] = ()

    @classmethod
    def of(cls, members: Sequence[int], root: int, fan_in: int, last: Sequence[int] = ()) -> ReduceTree:
        require_int("fan_in", fan_in, 1)
        rest = sorted({int(m) for m in members} - {int(root)})
        tail = {int(m) for m in last} - {int(root)}  # the root receives whatever it is
        dialable = (int(root), *(m for m in rest if m not in tail))
        order = (*dialable, *(m for m in rest if m in tail))
        adopted: list[tuple[int, int]] = []
        for i in range(len(dialable), len(order)):
            if order[(i - 1) // fan_in] in tail:
                adopted.append((order[i], dialable[len(adopted) % len(dialable)]))
        return cls(order, fan_in, tuple(adopted))

    def _index(self, node: int) -> int:
        try:
            return self.order.index(node)
        except ValueError:
            raise KeyError(f"node {node} is not in the reduce tree") from None

    def parent(self, node: int) -> int | None:
        i = self._index(node)
        for child, parent in self.adopted:
            if child == node:
                return parent
        return None if i == 0 else self.order[(i - 1) // self.fan_in]

    def children(self, node: int) -> list[int]:
        i = self._index(node)
        lo = i * self.fan_in + 1
        moved = {child for child, _ in self.adopted}
        heap = [c for c in self.order[lo : lo + self.fan_in] if c not in moved]
        return heap + [child for child, parent in self.adopted if parent == node]

    def depth(self, node: int) -> int:
        d, up = 0, self.parent(node)
        while up is not None:
            d, up = d + 1, self.parent(up)
        return d
