"""The (ε, δ) of one differentially private release: torch-free, so node configs and the CLI
check it before any model is loaded (the mechanism is fingerprint_dp.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SampleDP:
    epsilon: float  # ε of one release
    delta: float = 1e-5  # δ of one release

    def __post_init__(self) -> None:
        if not (_real(self.epsilon) and math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"SampleDP.epsilon must be a finite number > 0, got {self.epsilon!r}")
        if not (_real(self.delta) and 0 < self.delta < 1):
            raise ValueError(f"SampleDP.delta must be in (0, 1), got {self.delta!r}")


def _real(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
