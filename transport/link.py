"""Link emulation: bandwidth, latency and loss applied to what a node sends.

Lets a scenario run a 4G/5G/WiFi mix on one machine. A `LinkProfile` describes a link;
a `LinkShaper` applies it to each outgoing message, just before it is handed to ZeroMQ:

  delay = queueing + transmission (token bucket at `bandwidth_mbps`) + `latency_ms`,
  and with probability `loss` the message is dropped (the caller sees a timeout).

The token bucket is a virtual clock (pure, testable without sleeping): a message of n
bytes occupies the link for n / rate seconds after the link is next free; up to `burst`
bytes may go at once after an idle spell. Messages are not reordered by size: each one
waits for those before it, as on a real uplink.
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkProfile:
    """An emulated link. Bandwidth None = unlimited."""

    bandwidth_mbps: float | None = None  # megabits per second on this link's send side
    latency_ms: float = 0.0  # one-way delay added to every message
    loss: float = 0.0  # probability a message is dropped, in [0, 1)
    burst_bytes: int = 64 * 1024  # bytes that may leave at once after an idle spell
    seed: int | None = None  # seed of the loss draws (None: nondeterministic)

    def __post_init__(self) -> None:
        if self.bandwidth_mbps is not None and not (math.isfinite(self.bandwidth_mbps) and self.bandwidth_mbps > 0):
            raise ValueError(f"LinkProfile.bandwidth_mbps must be > 0 or None, got {self.bandwidth_mbps!r}")
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"LinkProfile.latency_ms must be >= 0, got {self.latency_ms!r}")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"LinkProfile.loss must be in [0, 1), got {self.loss!r}")
        if self.burst_bytes < 0:
            raise ValueError(f"LinkProfile.burst_bytes must be >= 0, got {self.burst_bytes!r}")

    @property
    def bytes_per_second(self) -> float | None:
        return None if self.bandwidth_mbps is None else self.bandwidth_mbps * 1e6 / 8


class TokenBucket:
    """Bytes-per-second shaping as a virtual clock: `reserve(n, now)` -> seconds to wait.

    The link is busy until `free_at`. A message starts at max(now - burst/rate, free_at)
    (the burst allowance lets an idle link send `burst` bytes at once) and is delivered
    when its last byte has left: start + n / rate.
    """

    def __init__(self, rate_bytes_per_s: float, burst_bytes: int = 0):
        if not rate_bytes_per_s > 0:
            raise ValueError(f"TokenBucket rate must be > 0, got {rate_bytes_per_s!r}")
        self.rate = float(rate_bytes_per_s)
        self.burst_s = burst_bytes / self.rate
        self.free_at = -math.inf

    def reserve(self, nbytes: int, now: float) -> float:
        start = max(now - self.burst_s, self.free_at)
        self.free_at = start + nbytes / self.rate
        return max(0.0, self.free_at - now)


class LinkShaper:
    """Applies one LinkProfile to a stream of outgoing messages (one per sending link)."""

    def __init__(self, profile: LinkProfile):
        self.profile = profile
        rate = profile.bytes_per_second
        self.bucket = None if rate is None else TokenBucket(rate, profile.burst_bytes)
        self.rng = random.Random(profile.seed)

    def plan(self, nbytes: int, now: float) -> float | None:
        """Seconds to hold a message of `nbytes` before sending it, or None to drop it."""
        wait = self.bucket.reserve(nbytes, now) if self.bucket is not None else 0.0
        if self.profile.loss and self.rng.random() < self.profile.loss:
            return None  # a lost message still used the link
        return wait + self.profile.latency_ms / 1000.0

    async def admit(self, nbytes: int) -> bool:
        """Wait as the link would; False means the message is lost and must not be sent."""
        delay = self.plan(nbytes, asyncio.get_running_loop().time())
        if delay is None:
            return False
        if delay > 0:
            await asyncio.sleep(delay)
        return True
