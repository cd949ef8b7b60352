"""A node's task fingerprint on its own data (DESIGN 2.2 and 6): the owner's torch side.

- ``node_fingerprint``: the m fingerprint examples (a seeded choice) go through the model
  in micro-batches of the node's training batch size, so at most one micro-batch's
  activations are alive at a time (atlas_p2p.fingerprint weights each micro-batch by its
  size, so the result equals the one-batch gradient). ``step_delay_s`` slows each
  micro-batch as it slows a training step: an emulated slow device is slow at both.
- ``whole_model_loss``: the loss when the node runs the whole model.
- ``cut_loss``: the loss across a cut at ``split`` when a provisional helper runs the rest
  of the ORIGINAL base (``CutHelper``, reached however the caller likes). The owner runs
  embeddings + blocks[:s] with the probe; the helper answers ∂L/∂h (two-part), or hidden
  states z and then, given ∂L/∂z from the owner's head and loss, ∂L/∂h (u-shape). When
  nothing on the owner takes a gradient (the head probe of a causal LM, which only reads
  the features at the head), the owner runs its own head on z in either mode. The
  surrogate ⟨h, ∂L/∂h⟩ has the probe gradient dL/dθ (atlas_p2p.training.probe), so the
  fingerprint equals the whole-model one.

Nothing here changes the base model: atlas_p2p.fingerprint attaches and removes the probe.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch
from torch import nn

from atlas_p2p.data import Encoded
from atlas_p2p.fingerprint import (
    FingerprintConfig,
    LossFn,
    compute_fingerprint,
    fingerprint_sample,
    head_parameters,
)
from atlas_p2p.models import split_model, unsplit_forward
from atlas_p2p.privacy.budget import SampleDP
from atlas_p2p.privacy.fingerprint_dp import private_fingerprint
from atlas_p2p.vocabulary import PROBE_LORA

from .inputs import check_float
from .probe import surrogate

__all__ = ["CutHelper", "cut_loss", "node_fingerprint", "whole_model_loss"]


class CutHelper(Protocol):
    """The provisional helper's half of a cut (it may block; it raises ValueError on a bad answer)."""

    def grad(
        self, activations: np.ndarray, attention_mask: np.ndarray, labels: np.ndarray
    ) -> tuple[np.ndarray, Mapping[str, np.ndarray]]:
        """Two-part: ∂L/∂h of blocks[s:] + head + loss, and {name: ∂L/∂p} of a classifier's head."""

    def hidden(self, activations: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """u-shape, first leg: z = blocks[s:L](h)."""

    def vjp(self, activations: np.ndarray, attention_mask: np.ndarray, hidden_grad: np.ndarray) -> np.ndarray:
        """u-shape, second leg: (∂z/∂h)ᵀ ∂L/∂z."""


def whole_model_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    loss, _ = unsplit_forward(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return loss


def cut_loss(split: int, mode: str, helper: CutHelper) -> LossFn:
    """loss_fn for atlas_p2p.fingerprint across a cut at ``split`` (module doc)."""

    def checked(x: np.ndarray, field: str, like: torch.Tensor) -> torch.Tensor:
        return check_float(x, f"helper's {field}", like.dtype, shape=tuple(like.shape))

    def loss_fn(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        mask, labels = batch["attention_mask"], batch["labels"]
        h = split_model(model, split, mode)[0](batch["input_ids"], mask)  # (B, T, H), carries a LoRA probe's graph
        acts = h.detach().cpu().numpy()
        if mode == "two-part" and (h.requires_grad or _head_probed(model)):
            answer, head_grads = helper.grad(acts, mask.numpy(), labels.numpy())
            out = _head_surrogate(model, head_grads, checked)
            if h.requires_grad:  # a LoRA probe on the blocks here
                out = out + surrogate(h, checked(answer, "grad", h))
            return out
        # u-shape: labels and head stay here; the helper gives z, we give back ∂L/∂z. Also the
        # way when nothing here takes a gradient: the LM head probe reads the head's input here
        z = checked(helper.hidden(acts, mask.numpy()), "hidden", h).requires_grad_()
        loss, _ = split_model(model, split, "u-shape")[2](z, mask, labels)  # through the head
        if not h.requires_grad:
            return loss
        (dz,) = torch.autograd.grad(loss, [z], retain_graph=True)
        grad = checked(helper.vjp(acts, mask.numpy(), dz.numpy()), "grad", h)
        return surrogate(h, grad) + (loss if _head_probed(model) else 0.0)

    return loss_fn


def _head_probed(model: nn.Module) -> bool:
    """Whether the head probe is on: the classifier's head is what requires grad."""
    try:
        return any(p.requires_grad for p in head_parameters(model).values())
    except (ValueError, AttributeError):
        return False


def _head_surrogate(model: nn.Module, head_grads: Mapping[str, np.ndarray], checked) -> torch.Tensor:
    """Σ ⟨W, g_W⟩ over the probed head's parameters, g_W from the helper: its gradient in W is g_W."""
    out = torch.zeros(())
    if not _head_probed(model):
        return out
    params = head_parameters(model)
    if set(head_grads) != set(params):
        raise ValueError(f"helper's head gradients name {sorted(head_grads)}, the head has {sorted(params)}")
    for name, p in params.items():
        out = out + (p * checked(head_grads[name], f"head gradient {name}", p).to(p.device)).sum()
    return out


def node_fingerprint(
    base_model: nn.Module,
    encoded: Encoded,
    seed: int,
    samples: int,
    micro_batch: int,
    step_delay_s: float = 0.0,
    loss_fn: LossFn | None = None,
    probe: str = PROBE_LORA,
    dp: SampleDP | None = None,
    num_labels: int | None = None,
) -> np.ndarray:
    """(64,) float32 fingerprint of a node's encoded data, in micro-batches of ``micro_batch``;
    with ``dp``, released under sample-level (ε, δ)-DP (atlas_p2p.privacy.fingerprint_dp: one
    example at a time, noise from OS entropy; ``num_labels`` None for a causal LM)."""
    config = FingerprintConfig(seed=seed, num_samples=samples, probe=probe)
    inner = loss_fn or whole_model_loss

    def paced(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if step_delay_s:
            time.sleep(step_delay_s)
        return inner(model, batch)

    batches = fingerprint_sample(encoded, config, micro_batch)
    if dp is not None:
        return private_fingerprint(base_model, batches, paced, config, dp, num_labels)
    return compute_fingerprint(base_model, batches, paced, config)
