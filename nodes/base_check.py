"""A node's side of "one base per swarm": name the base it loaded, and have the bootstrap accept it.

After the welcome a node builds the swarm's model (the parameters its checkpoint lacks
drawn from the welcome's init seed), then

1. `settle_base` computes its base identity (nodes.modelname.base_identity: sha256 digest
   over every weight, revision, dtype, sums of the freshly drawn tensors), which the node
   keeps, and writes it to `<out>/base.json` when the node has an --out;
2. `BootstrapClient.send_base` (nodes/bootstrap_client.py) sends `base_digest` to the
   bootstrap until it is answered. `ok`: the node is planned
   from now on. `error(base_mismatch)`: the swarm runs another base, and the node stops
   with `JoinRefused` (the CLI prints the bootstrap's one line and exits 7, "rejected").

`send_base` alone is what a node runs again when a heartbeat reply says `need_base`
(the bootstrap lost its row, e.g. its state was wiped).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from nodes.executor import TorchExecutor
from nodes.metrics import write_json_atomic
from nodes.modelname import base_identity

log = logging.getLogger("atlas.node")

BASE_FILE = "base.json"


async def settle_base(
    executor: TorchExecutor, model: nn.Module, name: str, node_id: int | None, out: Path | None, init_seed: int | None
) -> dict[str, Any]:
    """Compute and record this node's base identity (module doc, step 1); returns it."""
    identity = await executor.run(base_identity, model, name)
    fresh = identity["fresh_sums"]
    log.info(
        "node %s base %s (%s, %s)%s",
        node_id,
        identity["digest"][:12],
        identity["revision"],
        identity["dtype"],
        "; drawn from init seed: " + ", ".join(f"{n} sum {v:.6f}" for n, v in fresh.items()) if fresh else "",
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / BASE_FILE, {**identity, "node_id": node_id, "init_seed": init_seed})
    return identity
