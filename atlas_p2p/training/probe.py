"""A fingerprint computed across a cut: the provisional helper's half (DESIGN 2.2 and 6).

A node too weak to run the whole model still fingerprints the whole model. Block 0 is
always on the node (the owner), so only the rest of the network has to run elsewhere.
For one micro-batch with owner activations h = f_θ(x) (θ: a LoRA probe on block 0):

    dL/dθ = (∂L/∂h)ᵀ · ∂h/∂θ

The helper runs blocks[s:] + final norm + head + loss of the ORIGINAL base (no adapter,
no optimiser, nothing kept) on h and returns g = ∂L/∂h. The owner then back-propagates
the surrogate ⟨h, g⟩ with g held fixed, whose gradient in θ is exactly dL/dθ: the
fingerprint equals the whole-model one up to float rounding. For a sequence classifier
the helper also returns the gradient of the head, where the head probe's parameters
are (atlas_p2p.fingerprint); the owner adds ⟨W, ∂L/∂W⟩ to the surrogate.

In a u-shape swarm labels and head stay on the owner: the helper runs blocks[s:L] and
returns the hidden states z; the owner applies its head and loss and sends back ∂L/∂z;
the helper recomputes blocks[s:L] (it keeps no state between requests) and returns the
vector-Jacobian product (∂z/∂h)ᵀ ∂L/∂z = ∂L/∂h.

These functions run on the helper, on tensors a peer sent: everything is checked first
(``ValueError`` names the field) and the model is never changed.
"""

from __future__ import annotations

import torch
from torch import nn

from atlas_p2p.fingerprint import head_parameters
from atlas_p2p.models import split_model, task_of, unwrap
from atlas_p2p.models.families import SEQ_CLS
from atlas_p2p.validation import is_int

from .inputs import check_float, check_labels, check_mask

__all__ = ["probe_grad", "probe_hidden", "probe_vjp", "surrogate"]


def _blocks(model: nn.Module) -> int:
    from atlas_p2p.models.families import family_of

    return len(family_of(model).blocks(model))


def _inputs(model: nn.Module, split: int, activations, attention_mask):
    hf = unwrap(model)
    if not is_int(split) or not 1 <= split < _blocks(hf):
        raise ValueError(f"split: {split!r} must lie in 1..{_blocks(hf) - 1} for a probe across a cut")
    dtype = next(hf.parameters()).dtype
    h = check_float(activations, "activations", dtype, hidden=int(hf.config.hidden_size))  # (B, T, H)
    mask = check_mask(attention_mask, h.shape[0], h.shape[1])  # (B, T)
    device = next(hf.parameters()).device
    return hf, h.to(device).requires_grad_(), mask.to(device)


def _classes(hf: nn.Module) -> int:
    return int(hf.config.vocab_size) if task_of(hf) == "causal_lm" else int(hf.config.num_labels)


def probe_grad(
    model: nn.Module, split: int, activations, attention_mask, labels
) -> tuple[torch.Tensor, float, dict[str, torch.Tensor]]:
    """Two-part: blocks[split:] + head + loss on the owner's activations.

    Returns (∂L/∂h (B, T, H), loss, {name: ∂L/∂p} of a sequence classifier's head, empty
    for a causal LM): the owner's head probe needs the head's gradient, and the head is here.
    """
    hf, h, mask = _inputs(model, split, activations, attention_mask)
    y = check_labels(task_of(hf), labels, h.shape[0], h.shape[1], _classes(hf)).to(h.device)
    head = head_parameters(hf) if task_of(hf) == SEQ_CLS else {}
    flags = {n: p.requires_grad for n, p in head.items()}
    was_training = hf.training
    hf.eval()  # as the owner's probe: no dropout, the same data gives the same fingerprint
    try:
        for p in head.values():
            p.requires_grad_(True)
        with torch.enable_grad():
            loss, _ = split_model(hf, split)[1](h, mask, y)
            if not bool(torch.isfinite(loss)):
                raise ValueError(f"activations: give a non-finite loss ({float(loss.detach())})")
            grads = torch.autograd.grad(loss, [h, *head.values()])  # touches no parameter's .grad
    finally:
        for n, p in head.items():
            p.requires_grad_(flags[n])
        hf.train(was_training)
    return grads[0].detach(), float(loss.detach()), {n: g.detach() for n, g in zip(head, grads[1:])}


def probe_hidden(model: nn.Module, split: int, activations, attention_mask) -> torch.Tensor:
    """u-shape, first leg: blocks[split:L] on the owner's activations -> hidden states (B, T, H)."""
    hf, h, mask = _inputs(model, split, activations, attention_mask)
    was_training = hf.training
    hf.eval()
    try:
        with torch.no_grad():
            z = split_model(hf, split, "u-shape")[1](h, mask)
    finally:
        hf.train(was_training)
    return z.detach()


def probe_vjp(model: nn.Module, split: int, activations, attention_mask, hidden_grad) -> torch.Tensor:
    """u-shape, second leg: (∂z/∂h)ᵀ · ∂L/∂z with z = blocks[split:L](h), recomputed here."""
    hf, h, mask = _inputs(model, split, activations, attention_mask)
    g = check_float(hidden_grad, "hidden_grad", h.dtype, shape=tuple(h.shape)).to(h.device)
    was_training = hf.training
    hf.eval()
    try:
        with torch.enable_grad():
            z = split_model(hf, split, "u-shape")[1](h, mask)
            (grad,) = torch.autograd.grad(z, [h], grad_outputs=g)
    finally:
        hf.train(was_training)
    return grad.detach()


def surrogate(activations: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """⟨h, g⟩ with g fixed: its gradient through the owner's part is the probe's dL/dθ."""
    return (activations * grad.to(activations.dtype).detach()).sum()
