"""Which weights deserve LoRA rank: HSplitLoRA-style importance scores (DESIGN 7).

For each candidate weight W_i (attention q, k, v, o and the MLP projections of every
block), on one probe batch

    s_i = Σ |W_i ⊙ ∂L/∂W_i| / c_i,        c_i = d_in + d_out

the first-order estimate of how much the loss moves if W_i is perturbed, divided by the
parameters a rank-1 adapter on W_i costs (HSplitLoRA's resource-normalised
gradient-weight product, as we specify it). Scores are normalised to sum 1, smoothed
over time with Ī ← β·Ī + (1 - β)·s (β = 0.85) and normalised again; a cluster's
importance is the mean of its members' vectors. The plan is redone only when the
cluster importance moves by more than τ in L1 (τ = 0.1).

Normalising each probe before smoothing is our choice: it keeps the smoothing and the
cluster mean independent of each batch's loss scale, so a member with a large loss
does not outweigh the others.

A node measures its vector once, with its fingerprint (`measure`: the first fingerprint
micro-batch, the weights of the blocks it runs), and sends it in the `fingerprint`
message; the bootstrap's planner water-fills ranks by its cluster's mean. The probe is
one extra forward and backward of one micro-batch, and each weight's gradient is reduced
to its score as soon as backward produces it, so it never holds more than one weight's
gradient at a time (a training step holds none: the base is frozen).

Only `probe_scores` and `measure` touch torch; the rest is plain arithmetic on
{module: score} dicts, which travel as short vectors (`to_vector`, `from_vector`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from atlas_p2p.memory import ModelShape, lora_candidates

log = logging.getLogger(__name__)

BETA = 0.85  # smoothing weight of the past
TAU = 0.1  # L1 change that triggers re-planning

Scores = dict[str, float]


def _find_weight(modules: Mapping[str, Any], name: str):
    """The frozen base weight of the module called `name` (peft prefix and wrapper aware)."""
    module = modules.get(name)
    if module is None:
        for prefix in ("base_model.model.", "base_model."):
            module = modules.get(prefix + name)
            if module is not None:
                break
    if module is None:
        raise ValueError(f"module {name!r}: not found in the model")
    base = getattr(module, "base_layer", module)  # peft LoRA layer wraps the original
    weight = getattr(base, "weight", None)
    if weight is None or weight.dim() != 2:
        raise ValueError(f"module {name!r}: has no 2-D weight to score")
    return weight


def probe_scores(model, batch, loss_fn: Callable[[Any, Any], Any], names: Sequence[str]) -> Scores:
    """Raw scores s_i = Σ|W_i ⊙ ∂L/∂W_i| / (d_in + d_out) on one probe batch.

    `model` is where the named weights live: the HF or peft model (names relative to
    the HF model, as in memory.lora_candidates), or the model a split part was cut from.
    `loss_fn(model, batch)` returns a scalar loss; an owner part, which has no head,
    returns Σ(its activations ⊙ the gradient its helper sent back), whose gradient with
    respect to its weights is the true one.
    The named base weights get requires_grad only for this probe and are restored
    afterwards. Backward runs with only those weights as inputs, and a hook turns each
    weight's gradient into its score the moment it is accumulated and drops it, so no
    other parameter's `.grad` (LoRA ones included) changes, the named weights' `.grad`
    come back as they were, and at most one weight's gradient is alive at a time. A
    weight the loss does not reach scores 0.
    """
    import torch

    if not names:
        raise ValueError("names: need at least one module to score")
    if len(set(names)) != len(names):
        raise ValueError("names: duplicates given")
    modules = dict(model.named_modules())
    weights = [_find_weight(modules, n) for n in names]
    flags = [w.requires_grad for w in weights]
    saved = [w.grad for w in weights]
    scores: Scores = {name: 0.0 for name in names}

    def reduce(name: str) -> Callable[[Any], None]:
        def hook(w) -> None:
            with torch.no_grad():
                cost = w.shape[0] + w.shape[1]  # d_in + d_out, for (out, in) and Conv1D (in, out)
                scores[name] += float((w * w.grad).abs().sum()) / cost
            w.grad = None

        return hook

    handles = []
    try:
        for name, w in zip(names, weights):
            w.requires_grad_(True)
            w.grad = None
            handles.append(w.register_post_accumulate_grad_hook(reduce(name)))
        with torch.enable_grad():
            loss = loss_fn(model, batch)
            if not torch.is_tensor(loss) or loss.dim() != 0:
                raise ValueError("loss_fn: must return a scalar tensor")
            if not torch.isfinite(loss):
                raise ValueError(f"loss_fn: loss is not finite ({loss.item()})")
            if loss.requires_grad:
                loss.backward(inputs=weights)
    finally:
        for handle in handles:
            handle.remove()
        for w, flag, grad in zip(weights, flags, saved):
            w.requires_grad_(flag)
            w.grad = grad
    return scores


def measure(model, batch, loss_fn: Callable[[Any, Any], Any], shape: ModelShape, split: int | None = None) -> Scores:
    """A node's importance vector: `probe_scores` of every LoRA candidate weight of
    blocks[:split] (all blocks when `split` is None), normalised to sum 1.

    `split` is set when the node runs only the first blocks and `loss_fn` reaches the rest
    through a helper (the surrogate of atlas_p2p.training.probe): the weights it does not
    run are left out, not scored 0, so the cluster mean takes them from members that run them.
    """
    names = [m.name for m in lora_candidates(shape) if split is None or m.block < split]
    if not names:
        raise ValueError(f"split={split!r}: no adaptable weight in blocks[:split]")
    return normalise(probe_scores(model, batch, loss_fn, names))


def normalise(scores: Mapping[str, float]) -> Scores:
    """Scale to sum 1 (all-zero scores become uniform)."""
    if not scores:
        return {}
    for name, value in scores.items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"scores[{name!r}]={value!r}: must be finite and >= 0")
    total = sum(scores.values())
    if total == 0:
        return {name: 1.0 / len(scores) for name in scores}
    return {name: value / total for name, value in scores.items()}


def smooth(previous: Mapping[str, float] | None, probe: Mapping[str, float], beta: float = BETA) -> Scores:
    """Ī ← β·Ī + (1 - β)·ŝ with ŝ the normalised probe; result normalised to sum 1.

    With no history the smoothed vector is the probe itself. A module missing on one
    side counts 0 there.
    """
    if not 0 <= beta < 1:
        raise ValueError(f"beta={beta!r}: must be in [0, 1)")
    current = normalise(probe)
    if not previous:
        return current
    past = normalise(previous)
    names = sorted(set(past) | set(current))
    return normalise({n: beta * past.get(n, 0.0) + (1 - beta) * current.get(n, 0.0) for n in names})


def cluster_importance(members: Sequence[Mapping[str, float]]) -> Scores:
    """Mean of the members' normalised vectors, normalised to sum 1.

    A module is averaged over the members that report it (an owner scores only the
    blocks it hosts, so vectors may cover different modules).
    """
    if not members:
        raise ValueError("members: need at least one importance vector")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for vector in members:
        for name, value in normalise(vector).items():
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
    return normalise({name: sums[name] / counts[name] for name in sorted(sums)})


def importance_change(old: Mapping[str, float] | None, new: Mapping[str, float]) -> float:
    """L1 distance Σ|Ī_new - Ī_old| between two normalised vectors (2.0 with no history)."""
    if not old:
        return 2.0
    a, b = normalise(old), normalise(new)
    return float(sum(abs(a.get(n, 0.0) - b.get(n, 0.0)) for n in set(a) | set(b)))


def needs_replan(old: Mapping[str, float] | None, new: Mapping[str, float], tau: float = TAU) -> bool:
    """True when importance moved by more than τ in L1."""
    if tau < 0:
        raise ValueError(f"tau={tau!r}: must be >= 0")
    return importance_change(old, new) > tau


def to_vector(scores: Mapping[str, float], names: Sequence[str]) -> np.ndarray:
    """Scores in the order of `names` (missing = 0), float32 (n,) for the wire."""
    unknown = set(scores) - set(names)
    if unknown:
        raise ValueError(f"scores: modules {sorted(unknown)[:3]} are not in names")
    return np.array([scores.get(n, 0.0) for n in names], dtype=np.float32)


def from_vector(vector, names: Sequence[str]) -> Scores:
    """Inverse of `to_vector`; rejects a wrong length or non-finite/negative entries."""
    array = np.asarray(vector, dtype=np.float64)
    if array.shape != (len(names),):
        raise ValueError(f"vector: shape {array.shape} != ({len(names)},)")
    if not np.all(np.isfinite(array)) or np.any(array < 0):
        raise ValueError("vector: entries must be finite and >= 0")
    return {n: float(v) for n, v in zip(names, array)}
