"""The node `atlas-node join` runs until the training runtime exists (issue #4).

It serves `ping` on its own RpcServer (the address it advertises), keeps its place in
the swarm with a `ControlClient` (join, heartbeat, reconnect), and on SIGINT/SIGTERM
sends `leave` and returns. Without --data it is a helper that lends compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from nodes.config import NodeConfig, parse_address
from nodes.control import ControlClient, advertised_address

log = logging.getLogger("atlas.node")


async def _ping(env: Any) -> None:
    """`ping` -> `ok`: proof that this node is up and reachable."""
    return None


async def run_node(config: NodeConfig, stop: asyncio.Event) -> None:
    """Serve and heartbeat until `stop` is set; raises the control loop's failure (JoinRefused)."""
    from transport.rpc import RpcServer, RpcServerConfig

    host, port = parse_address(config.bind, allow_port_zero=True, what="bind")
    server = await RpcServer.create(host, port, {"ping": _ping}, config=RpcServerConfig(name="node"))
    control: ControlClient | None = None
    try:
        address = advertised_address(f"{host}:{server.port}", config.bootstrap, config.advertise)
        control = await ControlClient.create(config, address)
        log.info("node serving on %s, joining %s", address, config.bootstrap)
        stopped = asyncio.create_task(stop.wait())
        watched = asyncio.create_task(control.wait_done())
        try:
            await asyncio.wait({stopped, watched}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (stopped, watched):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if control.failure is not None:
            raise control.failure
        log.info("node shutting down")
    finally:
        if control is not None:
            await control.stop(leave=True)
        await server.stop()
