"""What `atlas-node join` runs: the training runtime of nodes/peer.py.

Kept as the CLI's seam: `run_node(config, stop, train)` runs one node until it is done
or `stop` is set (SIGINT/SIGTERM): then it writes its checkpoint, sends `leave` and
returns. Without --data the node is a helper that serves owners until the swarm is done.
"""

from __future__ import annotations

import asyncio
from typing import Any

from nodes.config import NodeConfig


async def run_node(config: NodeConfig, stop: asyncio.Event, train: Any = None) -> dict[str, Any]:
    """Serve, train and heartbeat until done or `stop`; raises the control loop's failure (JoinRefused)."""
    from nodes.config import TrainConfig
    from nodes.peer import run_peer

    if train is None:
        train = TrainConfig(out_dir=config.state_dir)
    return await run_peer(config, train, stop)
