"""A swarm in one event loop: a bootstrap and `Peer`s on real sockets of 127.0.0.1.

Shared by the in-process tests and `benchmarks/runtime.py`. Each peer keeps its state
(and, by default, its results) in WORKDIR/NAME; the bootstrap keeps its in WORKDIR/boot.
Timings default to fast ones (heartbeat 0.3 s, dead after 4 s) so repairs show within a
test. Leaving the `async with` block sets the shared stop event, gives running peers
`grace_s` to leave, cancels the rest and stops the bootstrap, pass or fail.

    async with await InProcessSwarm.create(workdir, SwarmSpec(task="seq_cls", num_labels=4)) as swarm:
        swarm.add("a", 30 * 10**6, data=path, rounds=2)
        swarm.add("h", 100 * 10**6)
        summaries = await swarm.run(timeout=120)  # {name: the summary its run returned}
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from nodes.bootstrap import Bootstrap
from nodes.config import BootstrapConfig, NodeConfig, SwarmSpec, TrainConfig
from nodes.control import ControlClient, keyed_client, node_keys
from nodes.peer import Peer
from scenarios.waiting import wait_until_async
from transport.rpc import RpcClient, allow_many_sockets

# bootstrap timings of the in-process tests: a dead peer is declared within seconds
FAST_TIMING: dict[str, float] = dict(
    heartbeat_s=0.3, suspect_after_s=2.0, dead_after_s=4.0, restart_grace_s=1.0, sweep_s=0.1
)
BANDWIDTH_BPS = 50_000_000  # every peer offers 50 Mbit/s


class InProcessSwarm:
    """A bootstrap plus peers sharing this event loop (see module doc)."""

    def __init__(self, workdir: Path, boot: Bootstrap, grace_s: float = 30.0) -> None:
        self.workdir = Path(workdir)
        self.boot = boot
        self.grace_s = grace_s  # how long a stopped peer may take to leave before it is cancelled
        self.stop = asyncio.Event()  # set: every peer leaves the swarm and returns its summary
        self.peers: dict[str, Peer] = {}
        self.tasks: dict[str, asyncio.Task[dict[str, Any]]] = {}

    @classmethod
    async def create(cls, workdir: Path, swarm: SwarmSpec, **bootstrap: float) -> InProcessSwarm:
        """Start the bootstrap on a free port; `bootstrap` overrides FAST_TIMING or sets other
        BootstrapConfig fields (e.g. fingerprint_seed)."""
        allow_many_sockets()  # every node of the swarm opens its sockets in this process's context
        config = BootstrapConfig(bind="127.0.0.1:0", state_dir=Path(workdir) / "boot", **{**FAST_TIMING, **bootstrap})
        return cls(workdir, await Bootstrap.create(config, swarm=swarm))

    @property
    def address(self) -> str:
        return self.boot.address

    def add(
        self,
        name: str,
        memory_bytes: int,
        *,
        data: Path | None = None,
        model: str | None = None,
        keep_results: bool = True,
        bandwidth_bps: float = BANDWIDTH_BPS,
        advertise: str | None = None,
        relay_port: int | None = None,
        **train: float | str | Path | None,
    ) -> Peer:
        """A peer (not started) with state in WORKDIR/NAME, also its out_dir unless keep_results is
        False; `train` sets TrainConfig fields (rounds, local_steps, lr, ...); `advertise`: the
        address it tells the swarm instead of the one it binds (e.g. one nobody can dial);
        `relay_port`: it volunteers as a relay there (0: any free port)."""
        config = self.node_config(
            name,
            memory_bytes,
            data=data,
            model=model,
            bandwidth_bps=bandwidth_bps,
            advertise=advertise,
            relay_port=relay_port,
        )
        out_dir = self.workdir / name if keep_results else None
        self.peers[name] = Peer(config, TrainConfig(out_dir=out_dir, **train))
        return self.peers[name]

    def node_config(
        self,
        name: str,
        memory_bytes: int,
        *,
        data: Path | None = None,
        model: str | None = None,
        bandwidth_bps: float = BANDWIDTH_BPS,
        advertise: str | None = None,
        relay_port: int | None = None,
    ) -> NodeConfig:
        """A node of this swarm with state in WORKDIR/NAME (its key lives there) and the join token."""
        return NodeConfig(
            bootstrap=self.address,
            memory_bytes=memory_bytes,
            bandwidth_bps=bandwidth_bps,
            data=data,
            model=model,
            state_dir=self.workdir / name,
            compute_score=1.0,
            token=None if self.boot.token is None else self.boot.token.text(),
            insecure=self.boot.token is None,
            advertise=advertise,
            relay_port=relay_port,
        )

    async def wire_node(
        self, name: str, memory_bytes: int, *, data: Path | None = None
    ) -> tuple[RpcClient, ControlClient]:
        """A node that is only its control plane: joined (heartbeating) under its own key; the
        caller speaks the rest of the protocol itself on `client`. Stop both when done."""
        config = self.node_config(name, memory_bytes, data=data)
        client = keyed_client(config, node_keys(config)[0])
        control = await ControlClient.create(config, "127.0.0.1:1", client=client)
        await control.wait_joined(timeout=30)
        return client, control

    def start(self, name: str) -> asyncio.Task[dict[str, Any]]:
        """Run peer `name` in a task of this loop (its summary is the task's result)."""
        self.tasks[name] = asyncio.create_task(self.peers[name].run(self.stop), name=f"peer-{name}")
        return self.tasks[name]

    async def joined(self, name: str, timeout: float = 30.0) -> int:
        """Wait until peer `name` has its id from the bootstrap; that id."""
        peer = self.peers[name]
        return await wait_until_async(lambda: peer.node_id, timeout, what=f"peer {name} to join")

    async def run(self, timeout: float | None = None) -> dict[str, dict[str, Any]]:
        """Start the peers not yet started; wait (at most `timeout` s) until every peer has
        returned; {name: summary}. A peer's failure is raised."""
        for name in self.peers:
            if name not in self.tasks:
                self.start(name)
        summaries = await asyncio.wait_for(asyncio.gather(*self.tasks.values()), timeout)
        return dict(zip(self.tasks, summaries))

    async def close(self) -> None:
        """Stop every peer (cancelled after grace_s), then the bootstrap. Idempotent."""
        self.stop.set()
        running = [task for task in self.tasks.values() if not task.done()]
        if running:
            _, late = await asyncio.wait(running, timeout=self.grace_s)
            for task in late:
                task.cancel()
        # collect every outcome here (a failure was raised by run() or the test already)
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        await self.boot.stop()

    async def __aenter__(self) -> InProcessSwarm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
