"""Fold an exact merged patch into a node's copy of the cluster's base weights (DESIGN 8).

For every module M of the patch, ``W_M <- W_M + B̃_M Ã_M`` where B̃ Ã = Σ_k p_k γ_k B_k A_k is
the stacked merge (aggregation.stack_merge), or ``W_M <- W_M + ΔW_M`` for a module the patch
holds as a full matrix; for every dense trainable (a classification
head), ``D <- D + Σ_k p_k ΔD_k`` on its frozen base. Owners and helpers call the same function,
so every copy of a layer in the cluster holds the same weights afterwards.

The patch is checked against the model (every module exists and has the patch's shape, every
dense tensor exists with the same shape) and against the node's patch log
(:class:`~atlas_p2p.versioning.VersionedBase`: next version, digest, chain) before any weight
changes; a bad patch raises ``ValueError`` and changes nothing.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from atlas_p2p.aggregation import Patch
from atlas_p2p.lora import add_delta_to_base
from atlas_p2p.models.sharing import own_
from atlas_p2p.versioning import PatchRecord, VersionedBase

from .modules import dense_base_param, weight_shape

__all__ = ["apply_to_model", "check_patch", "fold_into"]

log = logging.getLogger(__name__)


def check_patch(model: nn.Module, patch: Patch) -> None:
    """ValueError unless every module and dense tensor of ``patch`` fits ``model``."""
    if not isinstance(patch, Patch):
        raise ValueError(f"patch: expected an aggregation.Patch, got {type(patch).__name__}")
    for name in patch.module_names():
        shape, update = weight_shape(model, name), patch.module_shape(name)
        if shape != update:
            raise ValueError(f"patch module {name!r}: update is {update} but the weight is {shape}")
    for name, delta in patch.dense.items():
        param = dense_base_param(model, name)
        if tuple(param.shape) != tuple(delta.shape):
            raise ValueError(
                f"patch dense {name!r}: change is {tuple(delta.shape)} but the tensor is {tuple(param.shape)}"
            )


def apply_to_model(model: nn.Module, patch: Patch, sign: float = 1.0) -> None:
    """W <- W + B̃ Ã for every module, base head <- base head + ΔD (checked first); tensors
    that view a shared base are copied before they change (atlas_p2p.models.sharing).
    ``sign`` -1 takes a folded patch back out (to float rounding)."""
    if sign not in (1.0, -1.0):
        raise ValueError(f"sign must be 1 or -1, got {sign!r}")
    check_patch(model, patch)
    for name, sf in patch.modules.items():
        if sf.rank:
            add_delta_to_base(model, name, sign * sf.dense())  # (d_out, d_in)
    for name, delta in patch.full.items():
        add_delta_to_base(model, name, sign * delta)  # (d_out, d_in)
    with torch.no_grad():
        for name, delta in patch.dense.items():
            param = dense_base_param(model, name)
            own_(param)  # a head base that views a shared base gets its own copy first
            param.add_(delta.to(device=param.device, dtype=param.dtype), alpha=sign)


def fold_into(
    model: nn.Module,
    base: VersionedBase,
    patch: Patch,
    *,
    version: int | None = None,
    digest: str | None = None,
    chain: str | None = None,
) -> PatchRecord | None:
    """Log ``patch`` as the next version of ``base`` and add it to ``model``'s weights.

    ``version``/``digest``/``chain`` are what the manifest announced (checked by
    ``VersionedBase.apply``). Returns the new record, or None when the patch is a version the
    log already holds (a duplicate: nothing changes).
    """
    if not isinstance(base, VersionedBase):
        raise ValueError(f"base: expected a VersionedBase, got {type(base).__name__}")
    check_patch(model, patch)
    before = base.version
    record = base.apply(patch, version=version, digest=digest, chain=chain)
    if base.version == before:
        log.debug("cluster %s: version %d already folded", base.cluster, record.version)
        return None
    apply_to_model(model, patch)
    log.info("cluster %s: folded patch of round %d -> base version %d", base.cluster, patch.round, base.version)
    return record
