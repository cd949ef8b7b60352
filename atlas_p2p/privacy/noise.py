"""Noise on the activations an owner sends: the defence, and what it costs (DESIGN 10).

An owner with ``ActivationNoise(kind, scale)`` sends h + n instead of h, n drawn afresh
for every step from a private generator (noise a helper could regenerate would protect
nothing). Calibration: the noise's standard deviation is ``scale`` times the root mean
square of h over the batch's real tokens, so one scale means the same signal-to-noise ratio
at every split layer (activations grow with depth). Gaussian n ~ N(0, σ²); Laplace with
b = σ/√2 (the same variance, heavier tails). The owner's backward passes the helper's
gradient straight through (∂(h + n)/∂h = I). leakage.py's ψ under this noise is
fisher_leakage(..., noise_scale=scale): ψ at scale 1 over scale².
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where noise is drawn: node configs stay light for the bootstrap
    import torch

NOISE_KINDS = ("gaussian", "laplace")


@dataclass(frozen=True)
class ActivationNoise:
    kind: str  # gaussian | laplace
    scale: float  # noise std as a multiple of the activations' RMS over real tokens

    def __post_init__(self) -> None:
        if self.kind not in NOISE_KINDS:
            raise ValueError(f"activation noise: kind {self.kind!r} is not one of {NOISE_KINDS}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"activation noise: scale must be a finite number > 0, got {self.scale!r}")

    @classmethod
    def parse(cls, text: str) -> ActivationNoise:
        """``KIND:SCALE`` (``gaussian:0.5``, ``laplace:1``) as the `--activation-noise` flag takes it."""
        kind, sep, scale = str(text).partition(":")
        try:
            value = float(scale)
        except ValueError:
            value = None
        if not sep or value is None:
            raise ValueError(f"activation noise: expected KIND:SCALE with KIND in {NOISE_KINDS}, got {text!r}")
        return cls(kind.strip().lower(), value)

    def __str__(self) -> str:
        return f"{self.kind}:{self.scale:g}"


def private_generator() -> torch.Generator:
    """A generator seeded from the operating system, known to this process only."""
    import torch

    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


def noise_std(h: torch.Tensor, attention_mask: torch.Tensor, scale: float) -> float:
    """σ = scale x RMS of h (B, T, H) over the real tokens of ``attention_mask`` (B, T)."""
    real = attention_mask.bool()
    if not bool(real.any()):
        return 0.0
    return float(scale) * float(h[real].double().pow(2).mean().sqrt())


def add_noise(
    h: torch.Tensor, attention_mask: torch.Tensor, noise: ActivationNoise, generator: torch.Generator
) -> torch.Tensor:
    """h + n (a new tensor), n calibrated and drawn as the module doc says."""
    import torch

    sigma = noise_std(h, attention_mask, noise.scale)
    if noise.kind == "gaussian":
        n = torch.randn(h.shape, generator=generator, dtype=torch.float32)
    else:  # Laplace(0, 1/√2) has unit variance: the difference of two exponentials, scaled
        e = torch.empty((2, *h.shape), dtype=torch.float32).exponential_(generator=generator)
        n = (e[0] - e[1]) / math.sqrt(2.0)
    return h + (sigma * n).to(h.dtype).to(h.device)
