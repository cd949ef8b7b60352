"""Checks on tensors that arrive from a peer (activations, masks, labels, gradients).

Everything a peer sends is checked here before a session uses it: type (torch tensor or
numpy array, as the codec delivers it), shape, dtype, finiteness and value ranges. A failed
check is a ``ValueError`` naming the field; the caller has changed nothing yet. Accepted
tensors are copied, so a later change of the sender's buffer cannot reach the model.
"""

from __future__ import annotations

import numpy as np
import torch

from atlas_p2p.models import CAUSAL_LM, IGNORE_INDEX

__all__ = ["as_tensor", "check_float", "check_labels", "check_mask"]

_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _describe(x) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{type(x).__name__} of shape {tuple(x.shape)} and dtype {x.dtype}"
    return type(x).__name__


def as_tensor(x, name: str) -> torch.Tensor:
    """A private CPU copy of a torch tensor or numpy array."""
    if isinstance(x, np.ndarray):
        if x.dtype == object or x.dtype.kind not in "biuf":
            raise ValueError(f"{name}: unsupported array dtype {x.dtype}")
        return torch.from_numpy(np.array(x, copy=True))
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    raise ValueError(f"{name}: expected a tensor or array, got {_describe(x)}")


def check_float(x, name: str, dtype: torch.dtype, shape: tuple[int, ...] | None = None, hidden: int | None = None):
    """A finite floating tensor of ``dtype``: exactly ``shape``, or (B, T, hidden) with B, T > 0."""
    t = as_tensor(x, name)
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {_describe(x)}")
    if shape is None and (t.dim() != 3 or 0 in t.shape or t.shape[-1] != hidden):
        raise ValueError(f"{name}: expected a non-empty (B, T, {hidden}) tensor, got {_describe(x)}")
    if t.dtype != dtype:
        raise ValueError(f"{name}: dtype {t.dtype} != {dtype}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return t


def check_mask(mask, batch: int, length: int) -> torch.Tensor:
    """A (B, T) integer or bool 0/1 mask with at least one real token per row, as int64."""
    t = as_tensor(mask, "attention_mask")
    if tuple(t.shape) != (batch, length):
        raise ValueError(f"attention_mask: expected shape ({batch}, {length}), got {_describe(mask)}")
    if t.dtype not in _INT_DTYPES and t.dtype != torch.bool:
        raise ValueError(f"attention_mask: dtype {t.dtype} must be integer or bool")
    t = t.long()
    if bool(((t != 0) & (t != 1)).any()):
        raise ValueError("attention_mask: values must be 0 or 1")
    if bool((t.sum(-1) == 0).any()):
        raise ValueError("attention_mask: every row needs at least one real token")
    return t


def check_labels(task: str, labels, batch: int, length: int, classes: int) -> torch.Tensor:
    """Labels of ``task``: causal LM (B, T) token ids in 0..V-1 or IGNORE_INDEX; classification
    (B,) class ids in 0..C-1 (or (B,) floats when C == 1, regression)."""
    t = as_tensor(labels, "labels")
    if task == CAUSAL_LM:
        if tuple(t.shape) != (batch, length) or t.dtype not in _INT_DTYPES:
            raise ValueError(f"labels: expected integer ({batch}, {length}) token ids, got {_describe(labels)}")
        t = t.long()
        bad = (t != IGNORE_INDEX) & ((t < 0) | (t >= classes))
        if bool(bad.any()):
            raise ValueError(f"labels: token ids must lie in 0..{classes - 1} or be {IGNORE_INDEX}")
        return t
    if tuple(t.shape) != (batch,):
        raise ValueError(f"labels: expected shape ({batch},), got {_describe(labels)}")
    if classes == 1:
        if not t.dtype.is_floating_point or not bool(torch.isfinite(t).all()):
            raise ValueError(f"labels: regression targets must be finite floats, got {_describe(labels)}")
        return t.float()
    if t.dtype not in _INT_DTYPES:
        raise ValueError(f"labels: dtype {t.dtype} must be an integer class index")
    t = t.long()
    if bool(((t < 0) | (t >= classes)).any()):
        raise ValueError(f"labels: class ids must lie in 0..{classes - 1}")
    return t
