"""What a node offers the swarm, in base units, from the command line to the planner.

One record travels the whole way: the node builds it from its flags (`--memory`,
`--bandwidth`) and what it measured, the `join` message carries its fields, the
bootstrap's peer table stores them, the coordinator keeps the record and the planner
reads it (atlas_p2p.planning.NodeInfo). Memory is in bytes and bandwidth in bits per
second everywhere, as ints, so nothing is rounded on the way; only the peer table view
(`atlas-node peers`) shows them as decimal megabytes and Mbit/s.
"""

from __future__ import annotations

from dataclasses import dataclass

from atlas_p2p.validation import require_bool, require_int, require_number

# What a node may claim at most. Both are above any single device a node runs on today; a
# larger claim is a typo or a lie, and a lie makes the planner pick the liar as everyone's
# helper (the helper sees activations, and labels in two-part mode).
MAX_MEMORY_BYTES = 2**46  # 64 TiB
MAX_BANDWIDTH_BPS = 800 * 10**9  # 800 Gbit/s, the fastest single Ethernet port
# The compute score is measured by the node at start (float32 matrix products, GFLOP/s);
# no flag declares it. A device that measures more than this is not an edge device.
MAX_COMPUTE_SCORE = 100_000.0  # 100 TFLOP/s


def require_memory(name: str, value: object) -> int:
    """`value` if it is a memory claim in [1 byte, 64 TiB]; ValueError otherwise."""
    require_int(name, value, 1)
    if value > MAX_MEMORY_BYTES:
        raise ValueError(f"{name}: {value} bytes is above 64 TiB, the most memory a node may claim")
    return value


def require_bandwidth(name: str, value: object) -> float:
    """`value` if it is an uplink claim in [1 bit/s, 800 Gbit/s]; ValueError otherwise."""
    require_number(name, value, 1)
    if value > MAX_BANDWIDTH_BPS:
        raise ValueError(f"{name}: {value:g} bit/s is above 800 Gbit/s, the most bandwidth a node may claim")
    return value


@dataclass(frozen=True)
class Capabilities:
    """A node's offer: memory budget, uplink, relative compute, and whether it trains data."""

    memory_bytes: int  # memory budget, bytes
    bandwidth_bps: int  # uplink, bits per second (a float is rounded to whole bit/s)
    compute_score: float  # relative compute (GFLOP/s measured by the node; higher is faster)
    has_data: bool  # False: a pure helper that lends compute

    def __post_init__(self) -> None:
        require_memory("memory_bytes", self.memory_bytes)
        require_bandwidth("bandwidth_bps", self.bandwidth_bps)
        object.__setattr__(self, "bandwidth_bps", round(self.bandwidth_bps))
        object.__setattr__(self, "compute_score", require_number("compute_score", self.compute_score, 0))
        if self.compute_score > MAX_COMPUTE_SCORE:
            raise ValueError(
                f"compute_score: {self.compute_score:g} GFLOP/s is above {MAX_COMPUTE_SCORE:g}, the most a node may report"
            )
        require_bool("has_data", self.has_data)


__all__ = [
    "MAX_BANDWIDTH_BPS",
    "MAX_COMPUTE_SCORE",
    "MAX_MEMORY_BYTES",
    "Capabilities",
    "require_bandwidth",
    "require_memory",
]
