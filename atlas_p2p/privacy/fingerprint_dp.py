"""Fingerprints with differential privacy at the level of one example (DESIGN 6 and 10).

A node's fingerprint summarises the gradients of its m sampled examples. The mechanism:

1. each example's probe gradient g_i (fingerprint.probe_gradient on that example alone:
   the same probe, loss and cut as the node's ordinary fingerprint) is sketched with the
   swarm's seeded projection P and normalised: s_i = P g_i / ‖P g_i‖ (64 numbers of norm 1;
   a clip below every norm, so no clip constant has to be tuned to the data);
2. the sketches are averaged class by class with a floor k on each class's count,
       s̄ = (1/C) Σ_c (1 / max(n_c, k)) Σ_{i in c} s_i,
   C the swarm's number of labels (public) under the head probe on classification data,
   else C = 1 (every example one class: the plain mean, capped at k);
3. s̄ + N(0, σ² I) is released and normalised (post-processing, free).

Sensitivity. Replacing one of the m examples by any other (the count m, and so the seeded
choice of which rows are fingerprinted, stays the same) moves a class's term by at most
2/k: a swapped sketch in a class of n >= k is ‖s' - s‖/n <= 2/k; removing one from a class
of n > k gives ‖(S - n s)/(n(n - 1))‖ <= 2/n, from n <= k at most 1/k; adding one likewise.
A replacement that changes the class touches two terms, so Δ = 4/(C k) (2/k when C = 1).
With σ = z Δ one release is (ε, δ)-DP for the ε the analytic Gaussian mechanism gives for
z (Balle & Wang 2018, ``fingerprint.dp_epsilon``); ``noise_multiplier`` inverts it. k
defaults to m / C, so a node with balanced classes has Δ = 4/m. Not claimed: the
amplification from sampling m of the node's N examples, and composition over releases
(each release carries its own (ε, δ); a node that fingerprints again adds them up).

Why balance: the runtime's head-probe fingerprint is class-balanced because a node's label
mix otherwise blurs its task (atlas_p2p.fingerprint); the first version of this mechanism
took the plain mean and reached mean ARI 0.80 at ε = 8 against 0.75 with no noise at all on
the real-text population below: the mean, not the noise, was the limit. The floor k keeps
the sensitivity fixed (the balanced mean alone weighs an example by 1/(C n_c), and n_c is
private).

Why sketch before clipping: the noise's norm is σ √dim of what is released, and the
signal's share of each unit s_i does not change under a random projection, so releasing
64 numbers instead of the gradient's dim(g) (1,540 for a 4-way head on a 384-wide model)
cuts the noise-to-signal ratio by √(dim(g)/64): noised before the sketch, all-MiniLM-L6-v2
on the four real-text tasks x 3 nodes of 400 examples gave ARI 0 at every ε <= 16. Noise
calibrated to the node's whole gradient (a node-level guarantee; fingerprint.privatize)
gave ARI 0 at ε up to hundreds. Measured figures: benchmarks/privacy.py, docs/PRIVACY.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from atlas_p2p.fingerprint import FingerprintConfig, LossFn, dp_epsilon, probe_gradient, project
from atlas_p2p.privacy.budget import SampleDP
from atlas_p2p.validation import require_int, require_number
from atlas_p2p.vocabulary import PROBE_HEAD


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


def unit_sketches(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    config: FingerprintConfig,
) -> list[np.ndarray]:
    """Step 1 of the module doc: each example's unit sketch, (dim,) float64 (zeros for an
    example whose gradient is zero: it adds nothing, and project refuses zero)."""
    out = []
    for row in rows_of(batches):
        g = probe_gradient(model, [row], loss_fn, config)
        out.append(project(g, config.seed, config.dim).astype(np.float64) if np.any(g) else np.zeros(config.dim))
    return out


def classes_of(batches: Sequence[Mapping[str, torch.Tensor]], num_classes: int) -> list[int]:
    """The class of each example of ``batches`` (all 0 when ``num_classes`` is 1); ValueError
    for a label outside 0..num_classes-1."""
    rows = rows_of(batches)
    if num_classes == 1:
        return [0] * len(rows)
    out = []
    for row in rows:
        y = row.get("labels")
        if not isinstance(y, torch.Tensor) or y.numel() != 1:
            raise ValueError("a class-balanced DP fingerprint needs one label per example")
        c = int(y.reshape(-1)[0])
        if not 0 <= c < num_classes:
            raise ValueError(f"label {c} is outside 0..{num_classes - 1}")
        out.append(c)
    return out


def balanced_mean(
    sketches: Sequence[np.ndarray], classes: Sequence[int], num_classes: int, per_class: int
) -> np.ndarray:
    """Step 2 of the module doc: (1/C) Σ_c (1/max(n_c, k)) Σ_{i in c} s_i, (dim,) float64."""
    if len(sketches) != len(classes) or not sketches:
        raise ValueError(f"{len(sketches)} sketches and {len(classes)} classes: need as many, at least one")
    total = np.zeros((num_classes, len(sketches[0])))
    counts = np.zeros(num_classes)
    for s, c in zip(sketches, classes):
        total[c] += s
        counts[c] += 1
    return (total / np.maximum(counts, per_class)[:, None]).sum(axis=0) / num_classes


def sensitivity(num_classes: int, per_class: int) -> float:
    """Δ of ``balanced_mean`` when one example is replaced by any other (module doc)."""
    require_int("num_classes", num_classes, 1)
    require_int("per_class", per_class, 1)
    return 2.0 / per_class if num_classes == 1 else 4.0 / (num_classes * per_class)


def release(mean: np.ndarray, delta_s: float, dp: SampleDP, rng: np.random.Generator | None = None) -> np.ndarray:
    """(dim,) float32 unit vector: ``mean`` + N(0, (z·Δ)² I) normalised, z = noise_multiplier(ε, δ),
    Δ = ``delta_s``. ``rng`` must be private to the node (default: fresh OS entropy)."""
    require_number("sensitivity", delta_s, positive=True)
    rng = rng if rng is not None else np.random.default_rng()
    sigma = noise_multiplier(dp.epsilon, dp.delta) * delta_s
    out = np.asarray(mean, dtype=np.float64) + rng.normal(0.0, sigma, size=np.shape(mean))
    return (out / np.linalg.norm(out)).astype(np.float32)


@dataclass(frozen=True)
class SketchMean:
    """What a release needs: the balanced mean, its sensitivity and the examples behind it."""

    mean: np.ndarray  # (dim,) float64
    sensitivity: float
    m: int


def sketch_mean(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    config: FingerprintConfig,
    num_classes: int,
    per_class: int | None = None,
) -> SketchMean:
    """Steps 1 and 2 for the examples of ``batches``; ``per_class`` k defaults to m / C (at least 1)."""
    require_int("num_classes", num_classes, 1)
    classes = classes_of(batches, num_classes)
    if not classes:
        raise ValueError("no examples to fingerprint")
    k = per_class if per_class is not None else max(1, len(classes) // num_classes)
    sketches = unit_sketches(model, batches, loss_fn, config)
    return SketchMean(balanced_mean(sketches, classes, num_classes, k), sensitivity(num_classes, k), len(classes))


def balanced_classes(config: FingerprintConfig, num_labels: int | None) -> int:
    """C of the module doc: the labels under the head probe on classification data, else 1."""
    return num_labels if config.probe == PROBE_HEAD and num_labels is not None else 1


def private_fingerprint(
    model: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    loss_fn: LossFn,
    config: FingerprintConfig,
    dp: SampleDP,
    num_labels: int | None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """(config.dim,) unit fingerprint of ``batches`` released under sample-level (ε, δ)-DP;
    ``num_labels`` None for a causal LM."""
    summary = sketch_mean(model, batches, loss_fn, config, balanced_classes(config, num_labels))
    return release(summary.mean, summary.sensitivity, dp, rng)
