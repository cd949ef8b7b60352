"""One frozen base in memory for many models of one process, with copy-on-write.

Many virtual nodes in one process (scenarios/simulate.py) run the same frozen base. A model
given to ``share_frozen`` becomes the process's read-only original: ``copy_model`` of it (or of
any copy of it) is a structural copy, its own modules and its own ``Parameter`` objects, whose
tensors view the original's storage instead of cloning it. So a copy keeps the Hugging Face
module types (peft injects LoRA into it, the split code cuts it) and its own ``requires_grad``
flags, ``.grad`` and autograd version counter, while its weights cost no memory.

Writing into a shared weight would change every copy, so every in-place write into a base
tensor calls ``own_`` first: a tensor that views shared storage is given a private clone
(``t.data = clone``, same object, so ties and references hold); ``W <- W + ΔW`` then lands in
that clone only. The tensors a fold never touches stay shared.

Nothing here changes a process that never calls ``share_frozen``: ``copy_model`` is then
``copy.deepcopy`` and ``own_`` does nothing.
"""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

__all__ = ["copy_model", "is_shared", "own_", "share_frozen", "shared_tensors", "unshare"]

# data_ptr of every storage a shared original holds; its model must stay alive while registered
_SHARED: set[int] = set()
_LOCK = threading.Lock()


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every parameter and buffer of ``model`` (tied ones once)."""
    seen: dict[int, torch.Tensor] = {}
    for t in (*model.parameters(), *model.buffers()):
        seen.setdefault(id(t), t)
    return list(seen.values())


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def share_frozen(model: nn.Module) -> nn.Module:
    """Register ``model``'s parameters and buffers as the shared read-only original; returns it.

    The caller keeps ``model`` alive (and never writes into it) until ``unshare(model)``."""
    with _LOCK:
        _SHARED.update(_key(t) for t in _tensors(model) if t.numel())
    return model


def unshare(model: nn.Module) -> None:
    """Forget ``model``'s storages: copies made before keep viewing them, new copies clone."""
    with _LOCK:
        _SHARED.difference_update(_key(t) for t in _tensors(model) if t.numel())


def is_shared(t: torch.Tensor) -> bool:
    """True when ``t`` views the storage of a shared original."""
    return t.numel() > 0 and _key(t) in _SHARED


def shared_tensors(model: nn.Module) -> int:
    """How many of ``model``'s parameters and buffers view shared storage."""
    return sum(1 for t in _tensors(model) if is_shared(t))


def own_(t: torch.Tensor) -> bool:
    """Copy-on-write: give ``t`` a private clone of its values if it views shared storage
    (before an in-place write into it). True when it cloned."""
    if not is_shared(t):
        return False
    with torch.no_grad():
        t.data = t.detach().clone()
    return True


def _view(t: torch.Tensor) -> torch.Tensor:
    """A new tensor over ``t``'s storage with its own version counter (``detach`` would share
    the counter, and one copy's write would then void another copy's saved activations)."""
    view = torch.empty(0, dtype=t.dtype, device=t.device)
    view.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    if isinstance(t, nn.Parameter):
        return nn.Parameter(view, requires_grad=t.requires_grad)
    return view


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` in which every tensor on shared storage is a view of it, not a
    clone (module doc); tied tensors stay tied. With nothing shared, exactly ``copy.deepcopy``."""
    memo = {id(t): _view(t) for t in _tensors(model) if is_shared(t)}
    return copy.deepcopy(model, memo)
