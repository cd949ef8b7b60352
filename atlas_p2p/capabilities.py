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


@dataclass(frozen=True)
class Capabilities:
    """A node's offer: memory budget, uplink, relative compute, and whether it trains data."""

    memory_bytes: int  # memory budget, bytes
    bandwidth_bps: int  # uplink, bits per second (a float is rounded to whole bit/s)
    compute_score: float  # relative compute (GFLOP/s measured by the node; higher is faster)
    has_data: bool  # False: a pure helper that lends compute

    def __post_init__(self) -> None:
        require_int("memory_bytes", self.memory_bytes, 1)
        require_number("bandwidth_bps", self.bandwidth_bps, 1)
        object.__setattr__(self, "bandwidth_bps", round(self.bandwidth_bps))
        object.__setattr__(self, "compute_score", require_number("compute_score", self.compute_score, 0))
        require_bool("has_data", self.has_data)


__all__ = ["Capabilities"]
