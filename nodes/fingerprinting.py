"""How a node computes its task fingerprint (DESIGN 2.2 and 6): the torch side, run in the
node's executor thread.

- The m examples (the bootstrap's `fingerprint_samples`, a seeded choice) go through the
  model in micro-batches of the node's training batch size, so at most one micro-batch's
  activations are alive at a time: fingerprinting never needs more memory than a training
  step (the probe's gradient accumulates; atlas_p2p.fingerprint weights each micro-batch by
  its size, so the result equals the one-batch gradient).
- A node whose first assignment names a provisional helper (it is too weak for the whole
  model) runs embeddings + blocks[:s] with the probe and sends the activations of each
  micro-batch; the helper runs the rest of the ORIGINAL base and returns ∂L/∂h
  (atlas_p2p.training.probe). The fingerprint equals the whole-model one (a test checks it).
- `step_delay_s` (`--step-delay`) slows every micro-batch as it slows every training step:
  an emulated slow device is slow at both.

Nothing here changes the base model: the probe is attached and removed by
atlas_p2p.fingerprint, which restores modules, flags and modes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

ProbeCall = Callable[[Any], Any]  # Probe body -> reply body (blocks; raises on failure)


def whole_model_loss(model, batch) -> torch.Tensor:
    from atlas_p2p.models import unsplit_forward

    loss, _ = unsplit_forward(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return loss


def split_loss(split: int, mode: str, call: ProbeCall, owner_id: int) -> Callable:
    """loss_fn for atlas_p2p.fingerprint across a cut at ``split``: a surrogate whose gradient
    in the probe is dL/dθ (atlas_p2p.training.probe explains why)."""
    from atlas_p2p.models import split_model
    from atlas_p2p.training.inputs import check_float
    from atlas_p2p.training.probe import surrogate
    from transport.messages import Backward, Hidden, Probe

    def answer(reply: Any, kind: type, field: str, like: torch.Tensor) -> torch.Tensor:
        if not isinstance(reply, kind):
            raise ValueError(f"provisional helper answered {type(reply).__name__}, expected {kind.__name__}")
        return check_float(getattr(reply, field), f"helper's {field}", like.dtype, shape=tuple(like.shape))

    def loss_fn(model, batch) -> torch.Tensor:
        mask, labels = batch["attention_mask"], batch["labels"]
        parts = split_model(model, split, mode)
        h = parts[0](batch["input_ids"], mask)  # (B, T, H), carries the probe's graph
        acts = h.detach().cpu().numpy()
        common = dict(owner_id=owner_id, split=split, activations=acts, attention_mask=mask.numpy())
        if mode == "two-part":
            grad = answer(call(Probe(labels=labels.numpy(), **common)), Backward, "grad", h)
        else:  # u-shape: labels stay here; the helper gives z, we give back ∂L/∂z
            z = answer(call(Probe(**common)), Hidden, "hidden", h).requires_grad_()
            loss, _ = parts[2](z, mask, labels)
            (dz,) = torch.autograd.grad(loss, [z])
            grad = answer(call(Probe(hidden_grad=dz.numpy(), **common)), Backward, "grad", h)
        return surrogate(h, grad)

    return loss_fn


def node_fingerprint(
    base_model,
    encoded,
    seed: int,
    samples: int,
    micro_batch: int,
    step_delay_s: float = 0.0,
    loss_fn: Callable | None = None,
) -> np.ndarray:
    """(64,) float32 fingerprint of a node's encoded data, in micro-batches of ``micro_batch``."""
    from atlas_p2p.fingerprint import FingerprintConfig, compute_fingerprint, fingerprint_sample

    config = FingerprintConfig(seed=seed, num_samples=samples)
    inner = loss_fn or whole_model_loss

    def paced(model, batch):
        if step_delay_s:
            time.sleep(step_delay_s)
        return inner(model, batch)

    return compute_fingerprint(base_model, fingerprint_sample(encoded, config, micro_batch), paced, config)
