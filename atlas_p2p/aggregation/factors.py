"""One node's round contribution: its LoRA factors, their scalings and its sample count.

A LoRA adapter on a weight W (d_out x d_in) adds ΔW = γ · B A with B (d_out x r),
A (r x d_in) and scaling γ (α/r for classic LoRA, α/√r for rsLoRA; we take whatever
the adapter used). A contribution is the set of those factors for every adapted module
of a node's whole logical adapter (owner side plus the server side its helper returned),
plus the change of any dense trainable (a classification head), plus n_k, the number of
samples it trained on. Everything is validated on construction, so a malformed
contribution from a peer is a clear ``ValueError`` and never reaches the merge.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from atlas_p2p.validation import is_int, is_number

from .digest import digest_entries

__all__ = ["AdapterFactors", "Contribution", "as_factors", "concat_factors"]


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    """A detached floating tensor from a torch tensor or a numpy array."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what}: expected a tensor or array, got {type(value).__name__}")
    if not value.is_floating_point():
        raise ValueError(f"{what}: expected a floating dtype, got {value.dtype}")
    value = value.detach()
    if value.numel() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what}: contains NaN or infinity")
    return value


def _as_scaling(value: Any, what: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if not is_number(value, numpy=True, finite=False):
        raise ValueError(f"{what}: scaling must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{what}: scaling must be finite, got {value!r}")
    return value


class LowRankPair:
    """What a pair of factors B (d_out, r) and A (r, d_in) of one weight's change tells by its
    shapes; AdapterFactors and stacking.StackedFactors hold the tensors as fields `A` and `B`."""

    A: torch.Tensor
    B: torch.Tensor

    @property
    def rank(self) -> int:
        """r, the rows of A (an upper bound on the rank of B @ A)."""
        return int(self.A.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(d_out, d_in) of the weight this pair changes."""
        return int(self.B.shape[0]), int(self.A.shape[1])


@dataclass(frozen=True, eq=False)
class AdapterFactors(LowRankPair):
    """ΔW = scaling · B @ A for one adapted module.

    A: (r, d_in), B: (d_out, r), r >= 0 (r = 0 means "no adapter here": ΔW = 0).
    """

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scaling: float  # γ, e.g. α / r

    def __post_init__(self) -> None:
        a = _as_tensor(self.A, "A")
        b = _as_tensor(self.B, "B")
        if a.dim() != 2 or b.dim() != 2:
            raise ValueError(f"A and B must be 2-D, got A{tuple(a.shape)} and B{tuple(b.shape)}")
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"rank mismatch: B{tuple(b.shape)} has {b.shape[1]} columns but A{tuple(a.shape)} has {a.shape[0]} rows"
            )
        if a.device != b.device:
            raise ValueError(f"A is on {a.device} but B is on {b.device}")
        object.__setattr__(self, "A", a)
        object.__setattr__(self, "B", b)
        object.__setattr__(self, "scaling", _as_scaling(self.scaling, "scaling"))

    def delta(self) -> torch.Tensor:
        """γ · B A, dense (d_out, d_in)."""
        return self.scaling * (self.B @ self.A)


def as_factors(value: Any, module: str = "?") -> AdapterFactors:
    """Accept an ``AdapterFactors``, anything with ``.A``, ``.B``, ``.scaling`` or a
    sequence ``(A, B, scaling)``."""
    if isinstance(value, AdapterFactors):
        return value
    try:
        if all(hasattr(value, name) for name in ("A", "B", "scaling")):
            return AdapterFactors(value.A, value.B, value.scaling)
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) and len(value) == 3:
            return AdapterFactors(value[0], value[1], value[2])
    except ValueError as exc:
        raise ValueError(f"module {module!r}: {exc}") from None
    raise ValueError(f"module {module!r}: expected factors with A, B and scaling, got {type(value).__name__}")


def concat_factors(*parts: AdapterFactors) -> AdapterFactors:
    """One adapter equal to the sum of several on the same weight (scaling folded into A).

    Σ_j γ_j B_j A_j = [B_1 | ... | B_J] · [γ_1 A_1; ...; γ_J A_J] with scaling 1: how an
    owner carries a contribution that missed a round's manifest into its next one.
    """
    if not parts:
        raise ValueError("concat_factors needs at least one adapter")
    parts = tuple(as_factors(p) for p in parts)
    shapes = {p.shape for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"concat_factors: adapters change different shapes {sorted(shapes)}")
    dtype = _compute_dtype([p.A for p in parts] + [p.B for p in parts])
    b = torch.cat([p.B.to(dtype) for p in parts], dim=1)  # (d_out, Σr)
    a = torch.cat([p.scaling * p.A.to(dtype) for p in parts], dim=0)  # (Σr, d_in)
    return AdapterFactors(a, b, 1.0)


def _compute_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32: half-precision factors are widened
    so that the weights p_k γ_k are not rounded to a few bits."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} names must be non-empty strings, got {name!r}")
    return name


@dataclass(frozen=True, eq=False)
class Contribution:
    """What node ``node_id`` brings to the merge of round ``round``.

    factors: module name -> factors (A (r, d_in), B (d_out, r), scaling); a module may be
        missing or have rank 0, both meaning "this node did not change that weight".
    n_samples: n_k >= 0, the number of training samples behind this update (its weight).
    dense: name -> change (new - base) of a dense trainable over the round, e.g. a
        classification head; every contribution of a merge must carry the same names.
    """

    factors: Mapping[str, Any]
    n_samples: int
    node_id: str
    round: int
    dense: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id:
            raise ValueError(f"node_id must be a non-empty string, got {self.node_id!r}")
        for name, value in (("n_samples", self.n_samples), ("round", self.round)):
            if not is_int(value, numpy=True):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        object.__setattr__(self, "n_samples", int(self.n_samples))
        object.__setattr__(self, "round", int(self.round))
        if not isinstance(self.factors, Mapping):
            raise ValueError(f"factors must be a mapping, got {type(self.factors).__name__}")
        if not isinstance(self.dense, Mapping):
            raise ValueError(f"dense must be a mapping, got {type(self.dense).__name__}")
        factors = {}
        for module, value in self.factors.items():
            try:
                factors[_check_name(module, "module")] = as_factors(value, module)
            except ValueError as exc:
                raise ValueError(f"node {self.node_id!r}: {exc}") from None
        dense = {}
        for name, value in self.dense.items():
            try:
                dense[_check_name(name, "dense")] = _as_tensor(value, f"dense {name!r}")
            except ValueError as exc:
                raise ValueError(f"node {self.node_id!r}: {exc}") from None
        object.__setattr__(self, "factors", factors)
        object.__setattr__(self, "dense", dense)

    def delta(self, module: str) -> torch.Tensor:
        """γ_k B_k A_k for one module of this contribution, dense (d_out, d_in)."""
        return self.factors[module].delta()

    @cached_property
    def digest(self) -> str:
        """sha256 of everything the merge uses: node id, round, n_k, factors, scalings,
        dense changes (what a round manifest lists to name this contribution)."""
        entries = [
            (("node_id",), torch.tensor(list(self.node_id.encode("utf-8")), dtype=torch.uint8)),
            (("round",), torch.tensor(self.round, dtype=torch.int64)),
            (("n_samples",), torch.tensor(self.n_samples, dtype=torch.int64)),
        ]
        for module, f in self.factors.items():
            entries.append((("factor", module, "A"), f.A))
            entries.append((("factor", module, "B"), f.B))
            entries.append((("factor", module, "scaling"), torch.tensor(f.scaling, dtype=torch.float64)))
        entries.extend((("dense", name), t) for name, t in self.dense.items())
        return digest_entries(entries)
