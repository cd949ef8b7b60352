"""Fingerprints with differential privacy at the level of one example (DESIGN 6 and 10).

A node's fingerprint summarises the gradients of its m sampled examples. The mechanism:

1. each example's probe gradient g_i (fingerprint.probe_gradient on that example alone:
   the same probe, loss and cut as the node's ordinary fingerprint) is sketched with the
   swarm's seeded projection P and normalised: s_i = P g_i / ‖P g_i‖ (64 numbers of norm 1;
   a clip below every norm, so no clip constant has to be tuned to the data);
2. their mean s̄ = (1/m) Σ_i s_i is released with Gaussian noise, s̄ + N(0, σ² I), and
   normalised (post-processing, free).

Replacing one of the m examples moves s̄ by at most Δ = 2/m, so with σ = z Δ one release
is (ε, δ)-DP for the ε that the analytic Gaussian mechanism gives for z (Balle & Wang
2018, ``fingerprint.dp_epsilon`` with sensitivity 1 in units of σ/z); ``noise_multiplier``
inverts it. Not claimed: the amplification from sampling m of the node's N examples, and
composition over several releases (each release's (ε, δ) is reported; a node that
fingerprints again adds them up).

Why sketch before clipping: the noise's norm is σ √dim of what is released, and the
signal's share of each unit s_i does not change under a random projection, so releasing
64 numbers instead of the gradient's dim(g) (1,540 for a 4-way head on a 384-wide model)
cuts the noise-to-signal ratio by √(dim(g)/64). Measured on all-MiniLM-L6-v2, the four
real-text tasks x 3 nodes of 400 examples, m = 400: noised before the sketch, ARI 0 at
every ε <= 16 and in 4 of 5 draws at 32 (seed 0, offline); sketched first (benchmarks/privacy.py, seed 7, 10 noise
draws), mean ARI 0.80 at ε = 8 and 0.72 at ε = 4, against 0.75 for the same mean without
noise: the plain mean, which lets each node's label mix blur its task, is now the limit
(the runtime's fingerprint balances the classes; docs/PRIVACY.md). Noise calibrated to
the node's whole gradient (a node-level guarantee; fingerprint.privatize) gave ARI 0 at ε
up to hundreds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from atlas_p2p.fingerprint import FingerprintConfig, LossFn, dp_epsilon, probe_gradient, project


@dataclass(frozen=True)
class SampleDP:
    epsilon: float  # ε of one release
    delta: float = 1e-5  # δ of one release

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"SampleDP.epsilon must be a finite number > 0, got {self.epsilon!r}")
        if not (isinstance(self.delta, (int, float)) and 0 < self.delta < 1):
            raise ValueError(f"SampleDP.delta must be in (0, 1), got {self.delta!r}")


def noise_multiplier(epsilon: float, delta: float) -> float:
    """The smallest z (to 1e-9 relative) whose release with noise std z·Δ is (ε, δ)-DP."""
    SampleDP(epsilon, delta)  # validates
    lo, hi = 1e-3, 1.0
    while dp_epsilon(hi, delta, sensitivity=1.0) > epsilon:
        lo, hi = hi, hi * 2
    while dp_epsilon(lo, delta, sensitivity=1.0) <= epsilon:
        lo /= 2
    for _ in range(200):  # dp_epsilon falls as z grows
        mid = math.sqrt(lo * hi)
        if dp_epsilon(mid, delta, sensitivity=1.0) > epsilon:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    return hi


def rows_of(batches: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Every example of ``batches`` as a batch of one (padding kept: the mask says what is real)."""
    out = []
    for batch in batches:
        n = int(batch["input_ids"].shape[0])
        out += [{k: v[i : i + 1] for k, v in batch.items()} for i in range(n)]
    return out


def unit_sketch_mean(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    config: FingerprintConfig,
) -> tuple[np.ndarray, int]:
    """(s̄, m): the mean of the m examples' unit sketches (step 1 of the module doc), (dim,) float64."""
    rows = rows_of(batches)
    if not rows:
        raise ValueError("no examples to fingerprint")
    total = np.zeros(config.dim)
    for row in rows:
        g = probe_gradient(model, [row], loss_fn, config)
        if np.any(g):  # an example with a zero gradient adds nothing (project refuses zero)
            total += project(g, config.seed, config.dim)
    return total / len(rows), len(rows)


def release(mean: np.ndarray, m: int, dp: SampleDP, rng: np.random.Generator | None = None) -> np.ndarray:
    """(dim,) float32 unit vector: s̄ + N(0, (z·2/m)² I) normalised, z = noise_multiplier(ε, δ).

    ``rng`` must be private to the node (default: fresh OS entropy).
    """
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise ValueError(f"m must be an int >= 1, got {m!r}")
    rng = rng if rng is not None else np.random.default_rng()
    sigma = noise_multiplier(dp.epsilon, dp.delta) * 2.0 / m
    out = np.asarray(mean, dtype=np.float64) + rng.normal(0.0, sigma, size=np.shape(mean))
    return (out / np.linalg.norm(out)).astype(np.float32)


def private_fingerprint(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    config: FingerprintConfig,
    dp: SampleDP,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(config.dim,) unit fingerprint of ``batches`` released under sample-level (ε, δ)-DP."""
    mean, m = unit_sketch_mean(model, batches, loss_fn, config)
    return release(mean, m, dp, rng)
