"""Fisher information leakage of the owner part, by split layer (DESIGN 10, meter a).

The owner sends h = f_s(e) to its helper: the activations after its ``s`` blocks, a function
of the input embeddings e (B, T, H) of its tokens. How much h says about e, locally, is the
Fisher information of e in an observation of h. With Gaussian noise on h
(h + N(0, σ² I), the defence of noise.py) it is I(e) = JᵀJ / σ², J = ∂h/∂e; the
privacy-aware split federated learning paper (after Hannun et al.'s dFIL) summarises it by
its trace per input dimension,

    ψ(s) = Tr(JᵀJ) / (d σ²),     d = real tokens x H,     σ = c · RMS(h),

with the noise calibrated to the activations as noise.py calibrates it: c = ``noise_scale``
(1.0: noise as strong as the signal, the reference ψ is quoted at). Without that
calibration ψ would grow with the activations' scale, which in pre-norm decoders (Llama,
SmolLM2) rises tenfold and more with depth while the attack's recall falls: the raw trace
said deeper splits leak more where they leak less. Lower is more private: an unbiased
estimator of e built from h has mean squared error per dimension at least 1/ψ
(Cramér-Rao). Tr(JᵀJ) = E_u ‖Jᵀu‖² for u ~ N(0, I) in the space of h (Hutchinson), and Jᵀu
is one vector-Jacobian product, so ``probes`` backward passes per split estimate it without
forming J. Padding is left out on both sides: u is zero at padded positions, and d and
RMS(h) count real tokens only. Parameters are not differentiated.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from atlas_p2p.models.families import family_of, unwrap
from atlas_p2p.models.split import OwnerPart
from atlas_p2p.privacy.embeddings import embeddings_as, frozen_eval, lookup


def fisher_leakage(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    splits: Sequence[int],
    probes: int = 8,
    noise_scale: float = 1.0,
    seed: int = 0,
) -> dict[int, float]:
    """ψ(s) for each split s in ``splits`` (0 <= s <= L) on one batch (module doc).

    ``input_ids``, ``attention_mask``: (B, T). ``noise_scale``: c, the noise's std as a
    multiple of the activations' RMS (noise.ActivationNoise.scale). The estimate's relative
    error falls as 1/sqrt(probes x B x T x H); the probes u come from ``seed``.
    """
    depth = len(family_of(model).blocks(model))
    bad = [s for s in splits if not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= depth]
    if bad or not splits:
        raise ValueError(f"splits: need split points in 0..{depth}, got {list(splits)!r}")
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes: need an int >= 1, got {probes!r}")
    if not (isinstance(noise_scale, (int, float)) and math.isfinite(noise_scale) and noise_scale > 0):
        raise ValueError(f"noise_scale: need a finite number > 0, got {noise_scale!r}")
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids, attention_mask: need two (B, T) tensors, got {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}"
        )
    real = attention_mask.bool()  # (B, T)
    if not bool(real.any()):
        raise ValueError("attention_mask: the batch has no real token")
    hidden = int(unwrap(model).config.hidden_size)
    d = int(real.sum()) * hidden
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[int, float] = {}
    with frozen_eval(model):
        with torch.no_grad():
            e0 = lookup(model)(input_ids)  # (B, T, H)
        e = e0.detach().clone().requires_grad_(True)
        for s in sorted(set(splits)):
            part = OwnerPart(model, s)
            with embeddings_as(model, e):
                h = part(input_ids, attention_mask)  # (B, T, H)
            keep = real[..., None].to(h.dtype)  # (B, T, 1)
            total = 0.0
            for k in range(probes):
                u = torch.randn(h.shape, generator=gen, dtype=h.dtype) * keep
                (g,) = torch.autograd.grad(h, e, u, retain_graph=k < probes - 1)  # Jᵀu: (B, T, H)
                total += float((g * keep).pow(2).sum())
            mean_square = float(h.detach()[real].double().pow(2).mean())  # RMS(h)² over real tokens
            out[s] = total / probes / d / (noise_scale**2 * mean_square)
    return out
