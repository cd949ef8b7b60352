"""What a node hands its services instead of itself (nodes/peer.py wires them).

A service (the bootstrap client, the cluster sync, the helper and owner sides of a split
step) gets only the few things it uses:

- `Link`: calls from this node to an address with a deadline (the RPC layer counts the
  bytes of every request and reply the node sends: docs/RUNTIME.md, bytes by kind).
- `LocalNode`: this node's id and base as the lifecycle learns them (None until then: a
  service answers "still starting").
- `AssignmentSource`: the current assignment, the addresses it names, and a way to ask
  the bootstrap again (nodes/bootstrap_client.BootstrapClient).
- `PatchSource`: the patches of a cluster after a version (nodes/cluster_sync.ClusterSync).
- `TaskSet`: the background tasks a service owns; cancelled and awaited when it stops.
- `linear_backoff`: the one retry delay of a node's requests that must get through.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from atlas_p2p.versioning import PatchRecord
from nodes.executor import torch_lock_released
from transport.messages import Assignment, Envelope, Message
from transport.rpc import RpcClient

CONTROL_TIMEOUT_S = 3.0  # deadline of a small request (control, gossip, manifests)
BLOCKING_TIMEOUT_S = 30.0  # deadline of a request made from the executor thread (fingerprint probes)
RETRY_STEP_S = 0.2

# (cluster, since, prefer) -> records after `since`, asked first of node `prefer` when not None
PatchSource = Callable[[int, int, int | None], Awaitable[list[PatchRecord]]]


def linear_backoff(attempt: int, cap_s: float) -> float:
    """Delay before retry number `attempt` (1, 2, ...): 0.2 s per failed attempt, at most `cap_s`."""
    return min(cap_s, RETRY_STEP_S * attempt)


class Link:
    """Calls from this node (module doc); `attach` gives it the node's RpcClient."""

    def __init__(self) -> None:
        self._client: RpcClient | None = None

    def attach(self, client: RpcClient) -> None:
        self._client = client

    def learn_keys(self, addresses: dict[str, str], keys: dict[str, str]) -> None:
        """Talk CURVE to each node in `addresses` ({str(id): HOST:PORT}) under its key in `keys`
        (an insecure swarm sends no keys: nothing to learn)."""
        if self._client is None:
            raise RuntimeError("Link.learn_keys before attach(client)")
        for node, address in addresses.items():
            key = keys.get(node)
            if key:
                self._client.set_server_key(address, key)

    async def call(self, address: str, body: Message, timeout: float = CONTROL_TIMEOUT_S) -> Message:
        """Send `body` to `address`, return the reply (RpcError / RpcTimeout on failure)."""
        if self._client is None:
            raise RuntimeError("Link.call before attach(client)")
        return await self._client.call(address, body, timeout=timeout)

    def blocking(self, address: str, timeout: float = BLOCKING_TIMEOUT_S) -> Callable[[Message], Message]:
        """`call` for code in the executor thread: it waits on the event loop while other
        nodes' torch jobs run (the helper it waits for may share the process)."""
        loop = asyncio.get_running_loop()

        def call(body: Message) -> Message:
            future = asyncio.run_coroutine_threadsafe(self.call(address, body, timeout=timeout), loop)
            with torch_lock_released():
                return future.result()

        return call


@dataclass
class LocalNode:
    """This node as the lifecycle learns it: id (welcome), base model (built), base identity (settled)."""

    node_id: int | None = None
    base_model: nn.Module | None = None
    base_identity: dict[str, Any] | None = None  # nodes.modelname.base_identity

    @property
    def base_digest(self) -> str | None:
        return None if self.base_identity is None else self.base_identity["digest"]


class AssignmentSource(Protocol):
    """The node's current assignment from the bootstrap."""

    @property
    def assignment(self) -> Assignment | None: ...

    def address_of(self, node_id: int | None) -> str | None:
        """HOST:PORT of a node the assignment names, or None."""

    def anchor_of(self, cluster: int) -> int | None:
        """The anchor of `cluster` as the assignment names it (own cluster or a served owner's)."""

    async def fetch_assignment(self) -> None:
        """Ask the bootstrap for the current assignment now (a failure is logged, not raised)."""

    async def require_caller(self, env: Envelope, node_id: int | None = None) -> int | None:
        """The node that sent `env`; RpcError('unauthorized') for a stranger, or for a node
        speaking for `node_id` that is not itself."""


class TaskSet:
    """Background tasks of one service: a reference to each, cancelled then awaited on `cancel_all`."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
