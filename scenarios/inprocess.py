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
from nodes.peer import Peer
from scenarios.waiting import wait_until_async

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
        **train: float | str | Path | None,
    ) -> Peer:
        """A peer (not started) with state in WORKDIR/NAME, also its out_dir unless keep_results is
        False; `train` sets TrainConfig fields (rounds, local_steps, lr, ...)."""
        config = NodeConfig(
            bootstrap=self.address,
            memory_bytes=memory_bytes,
            bandwidth_bps=BANDWIDTH_BPS,
            data=data,
            model=model,
            state_dir=self.workdir / name,
            compute_score=1.0,
        )
        out_dir = self.workdir / name if keep_results else None
        self.peers[name] = Peer(config, TrainConfig(out_dir=out_dir, **train))
        return self.peers[name]

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
