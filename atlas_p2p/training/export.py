"""Export a cluster's total update as a standard PEFT LoRA adapter directory.

The cluster's base after v merges is W_v = W_0 + Σ_u B̃_u Ã_u per module (DESIGN 8), one
exact low-rank sum (``VersionedBase.folded_delta``). A standard adapter needs one rank r and
one scaling γ = α/r per module, so each module's update is re-factored to rank r by truncated
SVD (``aggregation.refactor_lossy``, computed from QRs of the stacked factors, never the dense
matrix): γ B A is the best rank-r approximation, with Frobenius error sqrt(Σ_{i>r} σ_i²) —
zero when r is at least the update's true rank. The head change (seq_cls) is exact: the saved
head is W_head,0 + Σ_u ΔD_u.

The result (``adapter_config.json`` + ``adapter_model.safetensors``) loads with
``PeftModel.from_pretrained(original_base, path)``; ``export.json`` beside it lists, per module,
the stacked rank, the update's norm and the truncation error.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from torch import nn

from atlas_p2p.aggregation import Patch, StackedFactors, fold_patches, refactor_lossy
from atlas_p2p.lora import Factors, attach_lora, get_dense_trainables, save_peft_dir, set_dense_trainables, set_factors
from atlas_p2p.versioning import VersionedBase

from .fold import check_patch
from .modules import dense_base_param

__all__ = ["EXPORT_FORMAT", "ExportReport", "ModuleExport", "export_adapter", "total_update"]

log = logging.getLogger(__name__)

EXPORT_FORMAT = "atlas-export-1"


@dataclasses.dataclass(frozen=True)
class ModuleExport:
    """How well one module's update survived the re-factoring."""

    stacked_rank: int  # Σ of the stacked ranks folded into this module (an upper bound on its rank)
    norm: float  # ||ΔW||_F of the exact update
    error: float  # ||ΔW - γ B A||_F after truncation to the export rank

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What ``export_adapter`` wrote (also saved as export.json)."""

    path: Path
    rank: int
    alpha: float
    base_version: int | None  # version of the log exported, when a VersionedBase was given
    modules: dict[str, ModuleExport]
    dense: tuple[str, ...]  # head tensors saved with their merged values
    exact_tol: float

    @property
    def max_error(self) -> float:
        return max((m.error for m in self.modules.values()), default=0.0)

    @property
    def exact(self) -> bool:
        """True when every module's relative truncation error is within ``exact_tol``."""
        return all(m.relative_error <= self.exact_tol for m in self.modules.values())

    def to_json(self) -> dict:
        return {
            "format": EXPORT_FORMAT,
            "rank": self.rank,
            "alpha": self.alpha,
            "scaling": self.alpha / self.rank,
            "base_version": self.base_version,
            "exact": self.exact,
            "exact_tol": self.exact_tol,
            "max_error": self.max_error,
            "dense": list(self.dense),
            "modules": {
                name: {**dataclasses.asdict(m), "relative_error": m.relative_error}
                for name, m in sorted(self.modules.items())
            },
        }


def total_update(update: Patch | VersionedBase | Sequence[Patch]) -> Patch:
    """One exact patch for the whole update: a patch, a log's folded delta, or a list folded in order."""
    if isinstance(update, Patch):
        return update
    if isinstance(update, VersionedBase):
        return update.folded_delta()
    if isinstance(update, Sequence) and not isinstance(update, (str, bytes)):
        if not all(isinstance(p, Patch) for p in update):
            raise ValueError("update: a sequence must hold aggregation.Patch objects only")
        return fold_patches(list(update))
    raise ValueError(f"update: expected a Patch, a VersionedBase or a list of patches, got {type(update).__name__}")


def _frobenius(sf: StackedFactors) -> float:
    """||B̃ Ã||_F from the small Gram matrices: ||BA||² = Σ (BᵀB) ⊙ (AAᵀ)."""
    if sf.rank == 0:
        return 0.0
    b, a = sf.B.double(), sf.A.double()
    return math.sqrt(max(float(((b.T @ b) * (a @ a.T)).sum()), 0.0))


def export_adapter(
    original: nn.Module,
    update: Patch | VersionedBase | Sequence[Patch],
    path: str | os.PathLike,
    rank: int,
    alpha: float | None = None,
    exact_tol: float = 1e-5,
) -> ExportReport:
    """Write ``update`` (relative to ``original``) as a PEFT adapter of rank ``rank`` under ``path``.

    ``original`` is the plain original base model (not modified: a copy carries the adapter).
    ``alpha`` defaults to ``rank`` (γ = 1). Everything is checked before anything is written.
    """
    if isinstance(original, PeftModel):
        raise ValueError("original: pass the plain original base model, not a peft model")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: {rank!r} must be an int >= 1")
    alpha = float(rank) if alpha is None else alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha: {alpha!r} must be a finite number > 0")
    if isinstance(exact_tol, bool) or not isinstance(exact_tol, (int, float)) or not exact_tol >= 0:
        raise ValueError(f"exact_tol: {exact_tol!r} must be a number >= 0")
    patch = total_update(update)
    check_patch(original, patch)
    if not patch.modules:
        raise ValueError("update: no adapted module to export")
    scaling = float(alpha) / rank
    model = copy.deepcopy(original)
    peft_model = attach_lora(model, {name: rank for name in patch.modules}, alpha=float(alpha))
    dtype = next(model.parameters()).dtype
    factors, report = {}, {}
    for name, sf in sorted(patch.modules.items()):
        low = refactor_lossy(sf, rank, scaling)
        factors[name] = Factors(low.A.to(dtype), low.B.to(dtype), scaling)  # A (r, d_in), B (d_out, r)
        report[name] = ModuleExport(sf.rank, _frobenius(sf), low.error)
    set_factors(peft_model, factors)
    heads = get_dense_trainables(peft_model)
    missing = sorted(set(patch.dense) - set(heads))
    if missing:
        raise ValueError(f"update: head changes {missing} have no trainable head to carry them (have {sorted(heads)})")
    with torch.no_grad():
        merged = {n: dense_base_param(peft_model, n).detach() + d.to(heads[n].dtype) for n, d in patch.dense.items()}
    set_dense_trainables(peft_model, merged)
    out = save_peft_dir(peft_model, path)
    result = ExportReport(
        out, rank, float(alpha), update.version if isinstance(update, VersionedBase) else None,
        report, tuple(sorted(patch.dense)), float(exact_tol),
    )
    tmp = out / "export.json.tmp"
    tmp.write_text(json.dumps(result.to_json(), indent=2, sort_keys=True))
    os.replace(tmp, out / "export.json")
    log.info("exported rank-%d adapter of %d modules to %s (max error %.3g)", rank, len(report), out, result.max_error)
    return result
