"""Hosts of virtual nodes: where the in-process engine (scenarios/simulate.py) runs its peers.

A `NodeHost` runs a set of `nodes.peer.Peer`s in one asyncio loop on a thread of its own
and answers plain, picklable calls: `status()`, `kill(names)` and `stop(grace_s)`. The run
that drives a swarm sees its hosts only through these three calls, wherever they live:

- `NodeHost` itself: the peers in the caller's process (tests, `simulate.py --workers 0`);
- `ProcessHost`: a NodeHost in a spawned child process (nothing of the caller's event loop
  or sockets is inherited), called over a pipe. It ends when the pipe closes, so a driver
  that dies takes its workers with it;
- `RayHost` (scenarios/ray_hosts.py): a NodeHost as a Ray actor, on any machine of a Ray
  cluster that reaches the bootstrap.

The calls block until the host's loop has answered; a driver with an event loop of its own
makes them with `asyncio.to_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import threading
import traceback
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from nodes.config import NodeConfig, TrainConfig
from nodes.peer import Peer
from scenarios.swarm import status_mb
from transport.rpc import allow_many_sockets, install_uvloop

log = logging.getLogger("atlas.hosts")

WORKER_NICENESS = 5  # worker processes yield the CPU to the bootstrap they share the machine with
SAMPLE_S = 0.2  # RSS sampling period: each node's phase meter resets the kernel's peak


@dataclass(frozen=True)
class HostedNode:
    """What a host needs to build one peer."""

    name: str
    config: NodeConfig
    train: TrainConfig


@dataclass(frozen=True)
class NodeStatus:
    """One peer as its host sees it."""

    name: str
    node_id: int | None
    rounds_done: int
    running: bool  # its `run` has not returned
    killed: bool
    state: str
    round: int
    base_version: int
    cluster: int | None
    role: str | None
    helper: int | None


@dataclass(frozen=True)
class HostStatus:
    pid: int
    nodes: dict[str, NodeStatus]
    rss_before_mb: float  # before the peers were built
    peak_rss_mb: float  # the highest RSS sampled so far


@dataclass(frozen=True)
class Outcome:
    """How a peer ended: code None killed, 0 returned, 1 raised (`error` says where), -15
    still running when the host stopped (cancelled after the grace)."""

    code: int | None
    error: str | None = None


def _rss_mb() -> float:
    return max(status_mb("self", "VmRSS") or 0.0, status_mb("self", "VmHWM") or 0.0)


class NodeHost:
    """Runs `nodes` (HostedNode) as Peers in a loop on a thread of this process (module doc)."""

    def __init__(self, nodes: Sequence[HostedNode]) -> None:
        self.rss_before_mb = status_mb("self", "VmRSS") or 0.0
        self.peak_mb = self.rss_before_mb
        allow_many_sockets()  # takes effect if no socket exists yet
        install_uvloop()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="node-host", daemon=True)
        self._thread.start()
        self.peers: dict[str, Peer] = {}
        self.tasks: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._stop: asyncio.Event | None = None
        self._sampler: asyncio.Task[None] | None = None
        self._call(self._start(list(nodes)))

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _start(self, nodes: list[HostedNode]) -> None:
        self._stop = asyncio.Event()
        self._sampler = asyncio.create_task(self._sample_forever(), name="host-rss")
        for node in nodes:
            if node.name in self.peers:
                raise ValueError(f"node name {node.name!r} given twice")
            self.peers[node.name] = Peer(node.config, node.train)
            self.tasks[node.name] = asyncio.create_task(self.peers[node.name].run(self._stop), name=f"peer-{node.name}")

    async def _sample_forever(self) -> None:
        while True:
            self.peak_mb = max(self.peak_mb, _rss_mb())
            await asyncio.sleep(SAMPLE_S)

    # -- the calls --------------------------------------------------------------------

    def status(self) -> HostStatus:
        return self._call(self._status())

    async def _status(self) -> HostStatus:
        nodes = {}
        for name, peer in self.peers.items():
            a, progress = peer.assignment, peer.progress()
            nodes[name] = NodeStatus(
                name=name,
                node_id=peer.node_id,
                rounds_done=peer.rounds_done,
                running=not self.tasks[name].done(),
                killed=peer.killed,
                state=str(progress["state"]),
                round=int(progress["round"]),
                base_version=int(progress["base_version"]),
                cluster=None if a is None else a.cluster,
                role=None if a is None else a.role,
                helper=None if a is None else a.helper,
            )
        self.peak_mb = max(self.peak_mb, _rss_mb())
        return HostStatus(os.getpid(), nodes, round(self.rss_before_mb, 1), round(self.peak_mb, 1))

    def kill(self, names: Sequence[str]) -> list[str]:
        """End these peers as SIGKILL would (`Peer.kill`); the names killed."""
        return self._call(self._kill(list(names)))

    async def _kill(self, names: list[str]) -> list[str]:
        unknown = [n for n in names if n not in self.peers]
        if unknown:
            raise ValueError(f"no such node on this host: {', '.join(unknown)}")
        await asyncio.gather(*(self.peers[n].kill() for n in names))
        return names

    def stop(self, grace_s: float) -> dict[str, Outcome]:
        """Tell every peer to leave, cancel those still running after `grace_s`, stop the loop;
        how each peer ended. The host is unusable afterwards."""
        try:
            return self._call(self._close(grace_s))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)

    async def _close(self, grace_s: float) -> dict[str, Outcome]:
        self._stop.set()
        running = [t for t in self.tasks.values() if not t.done()]
        if running:
            _, late = await asyncio.wait(running, timeout=grace_s)
            for task in late:
                task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        if self._sampler is not None:
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler
        return {name: self._outcome(name, task) for name, task in self.tasks.items()}

    def _outcome(self, name: str, task: asyncio.Task[dict[str, Any]]) -> Outcome:
        if self.peers[name].killed:
            return Outcome(None)
        if task.cancelled():
            return Outcome(-15)
        error = task.exception()
        if error is not None:
            where = traceback.extract_tb(error.__traceback__)[-3:]
            return Outcome(1, f"{error!r} at " + " <- ".join(f"{f.name}:{f.lineno}" for f in reversed(where)))
        return Outcome(0)


@dataclass(frozen=True)
class _Failed:
    """A call that raised in the worker: its traceback, re-raised by the caller."""

    text: str


def _serve(conn: multiprocessing.connection.Connection, nodes: Sequence[HostedNode], log_level: int) -> None:
    """A worker process: a NodeHost answering calls from `conn` until `stop`, or until the
    pipe closes (the driver is gone: its peers are stopped at once). It runs niced: on one
    machine the bootstrap must answer heartbeats before the nodes train, as it would on its own
    machine."""
    os.nice(WORKER_NICENESS)
    logging.basicConfig(level=log_level, format="%(levelname).1s %(name)s: %(message)s")
    host = NodeHost(nodes)
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            host.stop(0.0)
            return
        try:
            reply: Any = getattr(host, method)(*args)
        except Exception:  # the driver gets the traceback; the worker keeps serving
            reply = _Failed(traceback.format_exc())
        conn.send(reply)
        if method == "stop":
            conn.close()
            return


class ProcessHost:
    """A NodeHost in a spawned child process, with the same calls (module doc)."""

    def __init__(self, nodes: Sequence[HostedNode], log_level: int = logging.WARNING) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, list(nodes), log_level), name="node-host")
        self.process.start()
        child.close()
        self._lock = threading.Lock()

    def _call(self, method: str, *args: Any) -> Any:
        with self._lock:
            self._conn.send((method, args))
            try:
                reply = self._conn.recv()
            except EOFError:
                raise RuntimeError(
                    f"worker process {self.process.pid} ended (exit code {self.process.exitcode}) during {method}"
                ) from None
        if isinstance(reply, _Failed):
            raise RuntimeError(f"{method} failed in worker process {self.process.pid}:\n{reply.text}")
        return reply

    def status(self) -> HostStatus:
        return self._call("status")

    def kill(self, names: Sequence[str]) -> list[str]:
        return self._call("kill", list(names))

    def stop(self, grace_s: float) -> dict[str, Outcome]:
        try:
            return self._call("stop", grace_s)
        finally:
            self._conn.close()
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()


def split_round_robin(nodes: Sequence[HostedNode], hosts: int) -> list[list[HostedNode]]:
    """`nodes` dealt to `hosts` hosts in turn, so each gets a share of every kind of node."""
    if hosts < 1:
        raise ValueError(f"hosts must be >= 1, got {hosts}")
    return [list(nodes[i::hosts]) for i in range(hosts) if nodes[i::hosts]]
