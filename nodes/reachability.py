"""Can the swarm dial a node back? The bootstrap's check at join (issue 13).

A node advertises the address its peers should dial (its bound address, or `--advertise`).
Behind a home router, a campus NAT or a firewall that address may take no inbound
connection, and until now nothing noticed before a helper or a gossip target failed at run
time. At every join the bootstrap dials the advertised address with a `ping` (CURVE with the
key the node joined with, as any peer would) and waits at most REACH_TIMEOUT_S, beside the
join (answered at once). The answer goes into the peer table (`reachable`) and the node's
heartbeat replies (`beat.reachable`); the `welcome` carries the host the join came from as the
bootstrap saw it (`seen_from`), so a node nobody can dial can say what to pass as `--advertise`.
"""

from __future__ import annotations

import logging
from typing import Any

from nodes.config import parse_address

log = logging.getLogger("atlas.reachability")

REACH_TIMEOUT_S = 3.0  # a peer on the same continent answers a ping in well under a second


async def dial_back(client: Any, address: str, public_key: str | None, timeout_s: float = REACH_TIMEOUT_S) -> bool:
    """Whether a `ping` to `address` (the node's server, CURVE key `public_key` or plain) is
    answered within `timeout_s`; the connection is closed either way."""
    from transport.messages import Ping
    from transport.rpc import RpcError

    try:
        if public_key:
            client.set_server_key(address, public_key)
        await client.call(address, Ping(), timeout=timeout_s)
        return True
    except (RpcError, OSError, ValueError) as exc:
        log.info("dial back to %s failed: %s", address, exc)
        return False
    finally:
        await client.forget(address)


def advice(address: str, seen_from: str) -> str:
    """What a node the bootstrap could not reach should read."""
    host, port = parse_address(address, what="address")
    hint = (
        f"the bootstrap sees this node as {seen_from}: if that host is yours and reachable, "
        f"--advertise {seen_from}:{port}; "
        if seen_from and seen_from != host
        else ""
    )
    return (
        f"the bootstrap could not reach this node at {address}: peers cannot dial it, so it is "
        f"not chosen as a helper; {hint}open the port in the firewall, or forward it on the router"
    )
