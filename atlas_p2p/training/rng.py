"""Run a piece of a step under its own seed, leaving the global torch RNG as it was."""

from __future__ import annotations

import contextlib

import torch

__all__ = ["seeded"]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device):
    """Fork the CPU (and the model's CUDA device) RNG and seed it: dropout replays exactly."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
