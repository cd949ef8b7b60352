"""A node's offer keeps its units from the command line to the planner.

The path is the real one, without sockets: the `--memory`/`--bandwidth` parse, the node's
config, the `join` it sends (encoded and decoded as on the wire), the bootstrap's
registry and peer table, the coordinator and its plan. Nothing on the way may round:
`--memory 3500KB` is 3_500_000 bytes (kB is 10^3 bytes in transport.units) at the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from atlas_p2p.capabilities import Capabilities
from nodes.config import BootstrapConfig, NodeConfig
from nodes.coordinator import Coordinator, CoordinatorConfig
from nodes.peer_table import MemoryPeerTable
from nodes.registry import Registry
from tests.planner_inputs import SHAPE, WORK
from tools.peers_view import format_peer_table
from transport.codec import decode, encode
from transport.messages import Envelope, Join
from transport.units import parse_rate, parse_size


def _over_the_wire(join: Join) -> Join:
    return decode(encode(Envelope.of(join, 1, "node"))).body


def _joined(registry: Registry, memory: str, bandwidth: str, port: int) -> int:
    config = NodeConfig(
        bootstrap="127.0.0.1:5555",
        memory_bytes=parse_size(memory),
        bandwidth_bps=parse_rate(bandwidth),
        data=Path("train.jsonl"),
        insecure=True,
    )
    join = Join.offer(config.capabilities(compute_score=1.0), address=f"127.0.0.1:{port}")
    body = _over_the_wire(join)
    return registry.join(body.capabilities(), address=body.address, now=0.0).node_id


def test_memory_flag_reaches_the_planner_in_bytes():
    registry = Registry(MemoryPeerTable(), BootstrapConfig(bind="127.0.0.1:0"), now=0.0)
    small = _joined(registry, "3500KB", "50Mbps", 7001)
    big = _joined(registry, "1GB", "1Gbps", 7002)
    coordinator = Coordinator(CoordinatorConfig(shape=SHAPE, workload=WORK, min_nodes=2, clusters=1))
    rng = np.random.default_rng(0)
    for node in (small, big):
        record = registry.table.get(node)
        coordinator.on_join(node, record.capabilities, record.address, now=0.0)
        coordinator.on_fingerprint(node, rng.standard_normal(64).astype(np.float32), 32, now=0.0)

    assert coordinator.maybe_assign(now=0.0)

    planned = coordinator.plan.infos[str(small)].caps
    assert planned.memory_bytes == 3_500_000
    assert planned.bandwidth_bps == 50_000_000
    assert registry.table.get(small).memory_bytes == 3_500_000


def test_only_the_peer_table_view_shows_megabytes():
    registry = Registry(MemoryPeerTable(), BootstrapConfig(bind="127.0.0.1:0"), now=0.0)
    _joined(registry, "3500KB", "50Mbps", 7001)
    _joined(registry, "8GB", "2.5Gbps", 7002)

    text = format_peer_table(registry.rows())

    lines = text.splitlines()
    assert "3 MB" in lines[1] and "50 Mbps" in lines[1]
    assert "8.0 GB" in lines[2] and "2.5 Gbps" in lines[2]


def test_a_fractional_rate_is_whole_bits_per_second():
    assert (
        Capabilities(memory_bytes=1, bandwidth_bps=1.5e6 + 0.4, compute_score=0.0, has_data=False).bandwidth_bps
        == 1_500_000
    )


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(memory_bytes=0), "memory_bytes must be an int >= 1, got 0"),
        (dict(memory_bytes=3.5e6), "memory_bytes must be an int >= 1, got 3500000.0"),
        (dict(bandwidth_bps=0), "bandwidth_bps"),
        (dict(compute_score=float("inf")), "compute_score"),
        (dict(compute_score=1e6), "compute_score: 1e\\+06 GFLOP/s is above 100000"),
        (dict(has_data=1), "has_data must be a bool, got 1"),
    ],
)
def test_a_bad_offer_names_the_field(fields, match):
    good = dict(memory_bytes=3_500_000, bandwidth_bps=50_000_000, compute_score=1.0, has_data=True)
    with pytest.raises(ValueError, match=match):
        Capabilities(**(good | fields))
