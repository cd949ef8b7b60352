"""A node's side of "one base per swarm": name the base it loaded, and have the bootstrap accept it.

After the welcome a node builds the swarm's model (the parameters its checkpoint lacks
drawn from the welcome's init seed), then `settle_base`:

1. computes its base identity (nodes.modelname.base_identity: sha256 digest over every
   weight, revision, dtype, sums of the freshly drawn tensors), keeps it as
   `node.base_identity` and writes it to `<out>/base.json` when the node has an --out;
2. sends `base_digest` to the bootstrap until it is answered. `ok`: the node is planned
   from now on. `error(base_mismatch)`: the swarm runs another base, and the node stops
   with `JoinRefused` (the CLI prints the bootstrap's one line and exits 7, "rejected").

`send_base` alone is what a node runs again when a heartbeat reply says `need_base`
(the bootstrap lost its row, e.g. its state was wiped).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nodes.control import JoinRefused
from nodes.metrics import write_json_atomic

log = logging.getLogger("atlas.node")

BASE_FILE = "base.json"
_RETRY_CAP_S = 5.0
_FATAL = ("base_mismatch", "bad_request", "bad_schema")


async def settle_base(node: Any, name: str) -> dict[str, Any]:
    """Compute, record and announce `node`'s base (module doc); returns the identity."""
    from nodes.modelname import base_identity

    identity = await node.executor.run(base_identity, node.base_model, name)
    node.base_identity = identity
    fresh = identity["fresh_sums"]
    log.info("node %s base %s (%s, %s)%s", node.node_id, identity["digest"][:12], identity["revision"],
             identity["dtype"],
             "; drawn from init seed: " + ", ".join(f"{n} sum {v:.6f}" for n, v in fresh.items()) if fresh else "")
    if node.out is not None:
        node.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(node.out / BASE_FILE, {**identity, "node_id": node.node_id,
                                                 "init_seed": getattr(node.welcome, "init_seed", None)})
    await send_base(node)
    return identity


async def send_base(node: Any) -> None:
    """Send `base_digest` until the bootstrap answers; JoinRefused when it refuses the base."""
    from transport.messages import BaseDigest
    from transport.rpc import RpcError

    identity = node.base_identity
    body = BaseDigest(node_id=node.node_id, digest=identity["digest"], model=identity["model"],
                      revision=identity["revision"], dtype=identity["dtype"])
    attempt = 0
    while True:
        try:
            await node.call(node.config.bootstrap, body)
            log.info("bootstrap accepted base %s", identity["digest"][:12])
            return
        except RpcError as exc:
            if exc.code in _FATAL:
                raise JoinRefused(exc.code, getattr(exc, "message", str(exc))) from None
            attempt += 1
            log.warning("base digest not acknowledged (%s); retrying", exc)
            await asyncio.sleep(min(_RETRY_CAP_S, 0.2 * attempt))
