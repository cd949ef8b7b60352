"""Exact ("noise-free") aggregation of heterogeneous-rank LoRA adapters by stacking.

After HSplitLoRA's noise-free aggregation, in our own words: for one adapted weight,
contribution k brings B_k (d_out x r_k), A_k (r_k x d_in), scaling γ_k and weight p_k.
Concatenating the factors

    B̃ = [B_1 | B_2 | ... | B_K]                 (d_out, Σ r_k)
    Ã = [p_1 γ_1 A_1; p_2 γ_2 A_2; ...; p_K γ_K A_K]   (Σ r_k, d_in)

gives B̃ Ã = Σ_k p_k γ_k B_k A_k exactly: block k of B̃ only meets block k of Ã, so
there are no cross terms, whatever the ranks. This is the weighted mean of the updates
ΔW_k = γ_k B_k A_k. (Averaging A's and B's separately, as FedAvg of factors does, gives
mean(B)·mean(A), which has cross terms B_k A_l and is not the mean of the updates.)
Leaving out γ_k is the classic bug: ranks differ, so α/r_k differs across clients.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from atlas_p2p.validation import is_number, require_int

from .digest import digest_entries
from .factors import Contribution, LowRankPair, _as_tensor, _compute_dtype

__all__ = [
    "StackedFactors",
    "Patch",
    "sample_weights",
    "stack_merge",
    "average_dense",
    "dense_delta",
    "apply_patch",
    "fold_patches",
    "patch_nbytes",
    "dense_nbytes",
    "stacked_is_smaller",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class StackedFactors(LowRankPair):
    """ΔW = B @ A with the weights and scalings already folded into A."""

    B: torch.Tensor  # (d_out, R), R = Σ r_k over the stacked contributions
    A: torch.Tensor  # (R, d_in)

    def __post_init__(self) -> None:
        b = _as_tensor(self.B, "stacked B")
        a = _as_tensor(self.A, "stacked A")
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(
                f"stacked factors need B (d_out, R) and A (R, d_in), got B{tuple(b.shape)} and A{tuple(a.shape)}"
            )
        if a.dtype != b.dtype:
            raise ValueError(f"stacked factors: B is {b.dtype} but A is {a.dtype}")
        object.__setattr__(self, "B", b)
        object.__setattr__(self, "A", a)

    def dense(self) -> torch.Tensor:
        return self.B @ self.A  # (d_out, d_in)


@dataclass(frozen=True, eq=False)
class Patch:
    """One exact merge: the update every copy of the cluster's layers adds to its base.

    modules: module name -> stacked factors of Σ_k p_k γ_k B_k A_k.
    dense: name -> Σ_k p_k D_k, the weighted mean change of each dense trainable.
    weights: node id -> p_k, the weights used (empty for a fold of several patches).
    round: the round the patch closes (the last one for a fold).
    full: module name -> the same update as one (d_out, d_in) matrix, for modules whose
    stacked rank reached d_in d_out / (d_in + d_out), where the matrix is the smaller form
    (aggregation.reduce); a module is in `modules` or in `full`, never both.
    The digest covers the content (modules, full and dense tensors), not the provenance.
    """

    modules: Mapping[str, StackedFactors]
    dense: Mapping[str, torch.Tensor] = field(default_factory=dict)
    weights: Mapping[str, float] = field(default_factory=dict)
    round: int = 0
    full: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, sf in self.modules.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"patch module names must be non-empty strings, got {name!r}")
            if not isinstance(sf, StackedFactors):
                raise ValueError(f"patch module {name!r}: expected StackedFactors, got {type(sf).__name__}")
        dense = {}
        for name, t in self.dense.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"patch dense names must be non-empty strings, got {name!r}")
            dense[name] = _as_tensor(t, f"patch dense {name!r}")
        weights = {}
        for node, p in self.weights.items():
            if not isinstance(node, str) or not is_number(p, finite=False):
                raise ValueError(f"patch weights must map node ids to numbers, got {node!r}: {p!r}")
            weights[node] = float(p)
        require_int("patch round", self.round, 0)
        full = {}
        for name, t in self.full.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"patch full-module names must be non-empty strings, got {name!r}")
            full[name] = _as_tensor(t, f"patch full module {name!r}")
            if full[name].dim() != 2:
                raise ValueError(f"patch full module {name!r}: expected (d_out, d_in), got {tuple(full[name].shape)}")
        both = sorted(set(full) & set(self.modules))
        if both:
            raise ValueError(f"patch modules {both} are both stacked and full")
        object.__setattr__(self, "modules", dict(self.modules))
        object.__setattr__(self, "full", full)
        object.__setattr__(self, "dense", dense)
        object.__setattr__(self, "weights", weights)

    @cached_property
    def digest(self) -> str:
        """sha256 of the content: every module's B and A and every dense tensor."""
        entries = []
        for name, sf in self.modules.items():
            entries.append((("module", name, "B"), sf.B))
            entries.append((("module", name, "A"), sf.A))
        entries.extend((("dense", name), t) for name, t in self.dense.items())
        entries.extend((("full", name), t) for name, t in self.full.items())  # none: the digest of a stacked patch
        return digest_entries(entries)

    def module_names(self) -> list[str]:
        """Every module the patch updates, stacked or full, sorted."""
        return sorted(set(self.modules) | set(self.full))

    def module_shape(self, module: str) -> tuple[int, int]:
        """(d_out, d_in) of one module's update."""
        if module in self.full:
            return tuple(self.full[module].shape)
        return self.modules[module].shape

    def module_delta(self, module: str) -> torch.Tensor:
        """The (d_out, d_in) update of one module: B̃ Ã, or the full matrix."""
        if module in self.full:
            return self.full[module]
        return self.modules[module].dense()


def sample_weights(contributions: Sequence[Contribution]) -> dict[str, float]:
    """p_k = n_k / Σ_j n_j over all contributions of the merge."""
    total = sum(c.n_samples for c in contributions)
    if total <= 0:
        raise ValueError("the contributions hold no samples (Σ n_k = 0): nothing to weight by")
    return {c.node_id: c.n_samples / total for c in contributions}


def _check_contributions(contributions: Sequence[Contribution]) -> int:
    """Common checks of a merge's inputs; returns their round."""
    if not contributions:
        raise ValueError("no contributions to merge")
    for c in contributions:
        if not isinstance(c, Contribution):
            raise ValueError(f"expected Contribution, got {type(c).__name__}")
    ids = [c.node_id for c in contributions]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"duplicate contributions from node(s) {dupes}")
    rounds = sorted({c.round for c in contributions})
    if len(rounds) != 1:
        raise ValueError(f"contributions of one merge must share a round, got rounds {rounds}")
    return rounds[0]


def _common_keys(contributions: Sequence[Contribution], field: str, what: str) -> list[str]:
    """The names every contribution carries in `field` ("factors" or "dense"), sorted; they must agree."""
    key_sets = {frozenset(getattr(c, field)) for c in contributions}
    if len(key_sets) != 1:
        by_node = {c.node_id: sorted(getattr(c, field)) for c in contributions}
        raise ValueError(f"{what}, got {by_node}")
    return sorted(next(iter(key_sets)))


def _module_holders(contributions: Sequence[Contribution], module: str):
    """(contribution, factors) for every contribution carrying ``module``; checks shapes."""
    ordered = sorted(contributions, key=lambda c: c.node_id)  # same bytes in any arrival order
    holders = [(c, c.factors[module]) for c in ordered if module in c.factors]
    shapes = {f.shape for _, f in holders}
    if len(shapes) != 1:
        by_node = {c.node_id: f.shape for c, f in holders}
        raise ValueError(f"module {module!r}: (d_out, d_in) differs across nodes: {by_node}")
    devices = {f.A.device for _, f in holders}
    if len(devices) != 1:
        raise ValueError(f"module {module!r}: factors live on several devices {sorted(map(str, devices))}")
    return holders


def _stack(holders, coeffs: Sequence[float]) -> StackedFactors:
    """B̃ = [B_k ...], Ã = [c_k γ_k A_k; ...] over holders with r_k > 0 and c_k ≠ 0."""
    dtype = _compute_dtype([f.A for _, f in holders] + [f.B for _, f in holders])
    d_out, d_in = holders[0][1].shape
    device = holders[0][1].A.device
    bs, as_ = [], []
    for (_, f), coeff in zip(holders, coeffs):
        if f.rank == 0 or coeff == 0.0 or f.scaling == 0.0:
            continue  # contributes exactly zero
        bs.append(f.B.to(dtype))  # (d_out, r_k)
        as_.append((coeff * f.scaling) * f.A.to(dtype))  # (r_k, d_in)
    if not bs:
        return StackedFactors(
            torch.zeros(d_out, 0, dtype=dtype, device=device),
            torch.zeros(0, d_in, dtype=dtype, device=device),
        )
    return StackedFactors(torch.cat(bs, dim=1), torch.cat(as_, dim=0))


def average_dense(contributions: Sequence[Contribution], weights: Mapping[str, float]) -> dict[str, torch.Tensor]:
    """Σ_k p_k D_k for every dense trainable (exact: a dense mean is linear).

    Every contribution must carry the same dense names with the same shapes: a dense
    module (a classification head) is trained by every node, and with Σ p_k = 1 the
    mean is then the same whether D_k are new values or changes since the base.
    """
    out = {}
    for name in _common_keys(contributions, "dense", "every contribution must carry the same dense trainables"):
        ordered = sorted(contributions, key=lambda c: c.node_id)
        tensors = [c.dense[name] for c in ordered]
        shapes = {tuple(t.shape) for t in tensors}
        if len(shapes) != 1:
            by_node = {c.node_id: tuple(c.dense[name].shape) for c in contributions}
            raise ValueError(f"dense {name!r}: shape differs across nodes: {by_node}")
        dtype = _compute_dtype(tensors)
        acc = torch.zeros_like(tensors[0], dtype=dtype)
        for c, t in zip(ordered, tensors):
            acc += weights[c.node_id] * t.to(dtype)
        out[name] = acc
    return out


def stack_merge(contributions: Sequence[Contribution]) -> Patch:
    """The exact sample-weighted mean of the contributions' updates, as stacked factors.

    For every module M: ΔW_M = Σ_k p_k γ_k B_k A_k with p_k = n_k / Σ_j n_j taken over
    ALL contributions of the merge. A contribution without M (or with rank 0 there)
    counts as ΔW_k = 0 and keeps its weight, so it dilutes the others. Why: that node's
    model did not move on M, and the merged model should be the sample-weighted mean of
    the models the nodes actually hold; renormalising over the holders instead would
    over-weight whoever the planner gave a rank, so the result would depend on the
    budgets rather than on the data. It also keeps one weight vector p for the patch.
    Dense trainables are averaged with the same p (see ``average_dense``).

    Contributions with p_k = 0 or rank 0 add no columns. Blocks are stacked in node-id
    order, so every node merging the same set gets the same bytes (and digest) whatever
    order the contributions arrived in. The patch is float64 if any input is, else
    float32. HSplitLoRA's global aggregation is this over all clients.
    """
    round_ = _check_contributions(contributions)
    weights = sample_weights(contributions)
    modules = {}
    for module in sorted({m for c in contributions for m in c.factors}):
        holders = _module_holders(contributions, module)
        modules[module] = _stack(holders, [weights[c.node_id] for c, _ in holders])
    patch = Patch(modules, average_dense(contributions, weights), weights, round_)
    log.debug(
        "stack_merge: %d contributions, %d modules, stacked ranks %s",
        len(contributions),
        len(modules),
        {m: sf.rank for m, sf in modules.items()},
    )
    return patch


def dense_delta(patch: Patch, module: str) -> torch.Tensor:
    """B̃ Ã of one module: the dense (d_out, d_in) update the patch adds."""
    if module not in patch.modules and module not in patch.full:
        raise KeyError(f"patch has no module {module!r} (it has {patch.module_names()})")
    return patch.module_delta(module)


def apply_patch(weights: Mapping[str, torch.Tensor], patch: Patch) -> dict[str, torch.Tensor]:
    """New tensors W + ΔW for every module and dense name of the patch (W as (d_out, d_in)).

    Names absent from ``weights`` are an error; names the patch does not touch are
    passed through unchanged. The inputs are not modified.
    """
    missing = sorted((set(patch.module_names()) | set(patch.dense)) - set(weights))
    if missing:
        raise ValueError(f"apply_patch: no base tensor for {missing}")
    out = dict(weights)
    for name in patch.module_names():
        w, shape = weights[name], patch.module_shape(name)
        if tuple(w.shape) != shape:
            raise ValueError(f"apply_patch: {name!r} is {tuple(w.shape)} but the patch is {shape}")
        out[name] = w + patch.module_delta(name).to(w.dtype)
    for name, d in patch.dense.items():
        w = weights[name]
        if w.shape != d.shape:
            raise ValueError(f"apply_patch: dense {name!r} is {tuple(w.shape)} but the patch is {tuple(d.shape)}")
        out[name] = w + d.to(w.dtype)
    return out


def fold_patches(patches: Sequence[Patch]) -> Patch:
    """One patch equal to applying ``patches`` in order, still exact and low-rank.

    Σ_u B̃_u Ã_u = [B̃_1 | ... | B̃_U] [Ã_1; ...; Ã_U]; dense changes add up. A module
    that is full in any of the patches is full in the fold (the sum of the matrices). The
    fold has no weights (it is not one round's merge) and carries the last patch's round.
    """
    if not patches:
        return Patch({})
    modules: dict[str, list[StackedFactors]] = {}
    dense: dict[str, torch.Tensor] = {}
    full_names = {name for patch in patches for name in patch.full}
    for patch in patches:
        for name, sf in patch.modules.items():
            if name not in full_names:
                modules.setdefault(name, []).append(sf)
        for name, d in patch.dense.items():
            if name in dense and dense[name].shape != d.shape:
                raise ValueError(f"fold_patches: dense {name!r} changes shape across patches")
            dense[name] = dense[name] + d if name in dense else d.clone()
    folded = {}
    for name, parts in modules.items():
        if len({p.shape for p in parts}) != 1:
            raise ValueError(f"fold_patches: module {name!r} changes shape across patches")
        dtype = _compute_dtype([p.A for p in parts])
        folded[name] = StackedFactors(
            torch.cat([p.B.to(dtype) for p in parts], dim=1),  # (d_out, Σ R_u)
            torch.cat([p.A.to(dtype) for p in parts], dim=0),  # (Σ R_u, d_in)
        )
    full = {}
    for name in sorted(full_names):
        parts = [p.module_delta(name) for p in patches if name in p.modules or name in p.full]
        if len({tuple(t.shape) for t in parts}) != 1:
            raise ValueError(f"fold_patches: module {name!r} changes shape across patches")
        dtype = _compute_dtype(parts)
        acc = parts[0].to(dtype).clone()  # (d_out, d_in)
        for t in parts[1:]:
            acc += t.to(dtype)
        full[name] = acc
    return Patch(folded, dense, {}, patches[-1].round, full)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def patch_nbytes(patch: Patch) -> int:
    """Bytes of the patch as it travels: stacked factors, full modules and dense tensors."""
    n = sum(_nbytes(sf.A) + _nbytes(sf.B) for sf in patch.modules.values())
    return n + sum(_nbytes(t) for t in patch.full.values()) + sum(_nbytes(d) for d in patch.dense.values())


def dense_nbytes(patch: Patch) -> int:
    """Bytes of the same update sent as dense matrices (d_out x d_in per module)."""
    n = sum(sf.shape[0] * sf.shape[1] * sf.A.element_size() for sf in patch.modules.values())
    return n + sum(_nbytes(t) for t in patch.full.values()) + sum(_nbytes(d) for d in patch.dense.values())


def stacked_is_smaller(total_rank: int, d_in: int, d_out: int) -> bool:
    """True iff stacked factors of rank R are fewer numbers than the dense update:
    R (d_in + d_out) < d_in d_out, i.e. R < d_in d_out / (d_in + d_out)
    (384 for a 768 x 768 layer). Exact integer arithmetic."""
    for name, v in (("total_rank", total_rank), ("d_in", d_in), ("d_out", d_out)):
        require_int(name, v, 0)
    return total_rank * (d_in + d_out) < d_in * d_out
