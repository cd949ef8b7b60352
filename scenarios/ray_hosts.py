"""Hosts of virtual nodes as Ray actors: the in-process engine beyond one machine.

`pip install 'atlas-p2p[ray]'`. Each share of the nodes becomes one actor running a
`scenarios.hosts.NodeHost` (its peers in an event loop of the actor's process), placed by
Ray on any machine of the cluster; the driver (scenarios/simulate.py with `--ray`) keeps the
bootstrap and calls the actors exactly as it calls local worker processes: `status`,
`kill`, `stop`. The bootstrap must be reachable from every Ray node: bind it on an address
they can dial (`--advertise`), and give the nodes' data paths as the machines see them
(a shared file system, or the same layout everywhere).

    ray start --head                      # or an existing cluster: RAY_ADDRESS=host:6379
    python scenarios/simulate.py --nodes 200 --workers 4 --ray auto
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from scenarios.hosts import HostedNode, HostStatus, NodeHost, Outcome


def require_ray() -> Any:
    """The `ray` module, or a one-line error saying how to get it."""
    try:
        import ray
    except ImportError:
        raise SystemExit("--ray needs Ray: pip install 'atlas-p2p[ray]'") from None
    return ray


class RayHost:
    """A NodeHost in a Ray actor, with NodeHost's calls (they block until the actor answers)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor

    def status(self) -> HostStatus:
        return require_ray().get(self.actor.status.remote())

    def kill(self, names: Sequence[str]) -> list[str]:
        return require_ray().get(self.actor.kill.remote(list(names)))

    def stop(self, grace_s: float) -> dict[str, Outcome]:
        ray = require_ray()
        try:
            return ray.get(self.actor.stop.remote(grace_s))
        finally:
            ray.kill(self.actor)


def ray_hosts(address: str, cpus_per_host: float = 1.0) -> Any:
    """A `make_hosts` for SimulateRun: connects to the Ray cluster at `address` ("auto": the
    one `ray start` made on this machine, "local": a fresh one in this process) and starts one
    actor per share of nodes, with this project's code on the actors' path."""
    ray = require_ray()

    def make(shares: list[list[HostedNode]]) -> list[RayHost]:
        if not ray.is_initialized():
            import atlas_p2p
            import nodes
            import scenarios
            import transport

            ray.init(
                address=None if address == "local" else address,
                include_dashboard=False,
                runtime_env={"py_modules": [atlas_p2p, nodes, scenarios, transport]},  # the code goes to every machine
            )
        actor_class = ray.remote(num_cpus=cpus_per_host, max_concurrency=4)(NodeHost)
        return [RayHost(actor_class.remote(share)) for share in shares]

    return make
