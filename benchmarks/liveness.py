"""Liveness under a burst of membership events: how fast a bootstrap with a trained plan
answers its honest nodes' heartbeats while a flood of joins and deaths hits it.

The swarm is synthetic (no model is loaded): `--members` nodes of the embedded tiny-gpt2
swarm, three in five weak data nodes that need a helper, one in five strong data nodes,
one in five pure helpers, fingerprints drawn around four task directions. Their first
assignment is made here (`trained_state`) and written, with their peer-table rows and the
swarm's base, into a fresh `--state` the bootstrap restores from, so it starts with a
trained plan of every member.

The bootstrap runs in a child process; this one drives it over real sockets:
1. calm: every member heartbeats every `heartbeat_s` (staggered) for `--calm` seconds;
2. flood: `--flood` strangers join and send a base digest (so the coordinator plans with
   them), then fall silent and die `dead_after_s` later; `--kill` honest members stop
   heartbeating at the same moment (their owners need repairs). Measured for `--window`
   seconds from the flood's start.
Reported per phase: honest heartbeat latency p50/p99/max and replies later than the
heartbeat deadline (a node waits `heartbeat_s` for its answer); then the honest members
the bootstrap ever saw as suspect or dead, full plans made (make_plan calls, counted in
the child; not where a coordinator process plans) and their seconds, assignment versions
published, the child's peak RSS, and that of the child with its descendants (its
coordinator process).

`--tree DIR` runs the bootstrap from another checkout (e.g. a git worktree of an older
commit) with the same driver and the same prepared state, for before/after figures. So
that one file can serve both, the child imports the project lazily, from `--tree`.

    python benchmarks/liveness.py [--members 1300] [--flood 2000] [--kill 13]
        [--calm 20] [--window 120] [--tree DIR] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent  # this checkout
# Run as a script, this folder would shadow the `transport` package with benchmarks/transport.py.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE / "benchmarks"]
DIGEST = "ab" * 32  # the swarm's base digest (any 64 hex digits)
TASKS = 4
HEARTBEAT_S, SUSPECT_S, DEAD_S = 2.0, 6.0, 15.0  # the bootstrap's defaults


@dataclasses.dataclass(frozen=True)
class Member:
    """One synthetic node: id (1, 2, ... in join order), offer, and task (None: pure helper)."""

    node_id: int
    memory_bytes: int
    bandwidth_bps: int
    task: int | None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{20000 + self.node_id}"


def synthetic_members(n: int) -> list[Member]:
    """One in ten a weak data node (4 MB: splits, needs a helper), seven in ten strong data
    nodes (100 MB: train whole, may host), two in ten pure helpers (100 MB). (The planner
    ranks every host for every owner, so more weak nodes make each plan much slower.)"""
    out = []
    for i in range(1, n + 1):
        kind = i % 10
        memory = 4 * 10**6 if kind == 1 else 100 * 10**6
        out.append(Member(i, memory, (50 + 10 * (i % 7)) * 10**6, None if kind in (0, 5) else i % TASKS))
    return out


def trained_state(members: list[Member], seed: int = 0) -> dict[str, Any]:
    """The coordinator state (`Coordinator.snapshot()`) of `members` after their first
    assignment: all joined, fingerprinted and planned in one batch."""
    import numpy as np

    from atlas_p2p.capabilities import Capabilities
    from nodes.assign import make_coordinator
    from nodes.coordinator import Event

    data = [m for m in members if m.task is not None]
    coordinator = make_coordinator(_swarm(len(data)))
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((TASKS, 64))
    events = [Event.join(m.node_id, _caps(Capabilities, m), m.address) for m in members]
    events += [Event.fingerprint(m.node_id, directions[m.task] + 0.2 * rng.standard_normal(64), 64) for m in data]
    applied = coordinator.apply(events, now=time.time())
    if not coordinator.assigned or any(applied.errors):
        raise RuntimeError(f"the synthetic swarm was not assigned: {[e for e in applied.errors if e][:3]}")
    return coordinator.snapshot()


def _swarm(data_nodes: int) -> Any:
    from nodes.config import SwarmSpec

    return SwarmSpec(model="tiny-gpt2", min_nodes=max(1, data_nodes), clusters=TASKS)


def _caps(capabilities: type, m: Member) -> Any:
    return capabilities(
        memory_bytes=m.memory_bytes, bandwidth_bps=m.bandwidth_bps, compute_score=1.0, has_data=m.task is not None
    )


def write_state(state_dir: Path, members: list[Member], snapshot: dict[str, Any], config: Any) -> None:
    """A bootstrap `--state` holding every member's row (base accepted) and `snapshot` as the
    coordinator to restore (the peer table's meta, as the bootstrap keeps it)."""
    from atlas_p2p.capabilities import Capabilities
    from nodes.peer_table import open_peer_table
    from nodes.registry import Registry

    table = open_peer_table(state_dir)
    try:
        registry = Registry(table, config, now=time.time())
        for m in members:
            now = time.time()
            got = registry.join(_caps(Capabilities, m), address=m.address, now=now).node_id
            if got != m.node_id:
                raise RuntimeError(f"member {m.node_id} got id {got}: the state dir was not empty")
            registry.accept_base(m.node_id, DIGEST, now=now)
        swarm = dataclasses.asdict(_swarm(sum(m.task is not None for m in members)))
        table.set_meta("coordinator", json.dumps({"swarm": swarm, "state": snapshot}, sort_keys=True))
    finally:
        table.close()


# ------------------------------------------------------------------ the bootstrap (child)


async def _serve(args: argparse.Namespace) -> None:
    """Build the state, run a bootstrap on it, count plans, watch honest rows; on SIGTERM
    write the figures to `--out`."""
    import nodes.coordinator as coordinator_module
    from nodes.bootstrap import Bootstrap
    from nodes.config import BootstrapConfig

    prepared = json.loads(Path(args.prepared).read_text())
    members = [Member(**m) for m in prepared["members"]]
    # Keys off where the checkout has them (`insecure`), so both sides of a comparison differ
    # only in how the coordinator is fed; benchmarks/transport.py measures what keys cost.
    plain = {"insecure": True} if "insecure" in {f.name for f in dataclasses.fields(BootstrapConfig)} else {}
    config = BootstrapConfig(bind="127.0.0.1:0", state_dir=Path(args.state), **plain)
    write_state(Path(args.state), members, prepared["snapshot"], config)

    counts: Counter[str] = Counter()
    timing: Counter[str] = Counter()
    make_plan = coordinator_module.make_plan

    def counted_make_plan(*a: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return make_plan(*a, **kw)
        finally:
            counts["make_plan"] += 1
            timing["make_plan_s"] += time.perf_counter() - start

    coordinator_module.make_plan = counted_make_plan
    honest = {m.node_id for m in members} - set(prepared["killed"])
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    service = await Bootstrap.create(config, swarm=_swarm(sum(m.task is not None for m in members)))
    version0 = service.coordinator.version
    Path(args.info).write_text(json.dumps({"address": service.address}))
    suspects: set[int] = set()
    sweep = service.registry.sweep

    def watched_sweep(now: float) -> list[tuple[int, str, str]]:
        """The registry's sweep, noting honest members it declares suspect or dead (cheaper
        than reading the table: the bootstrap must not be slowed by its own measurement)."""
        changes = sweep(now)
        suspects.update(n for n, _, new in changes if n in honest and new in ("suspect", "dead"))
        return changes

    service.registry.sweep = watched_sweep
    try:
        await stop.wait()
        queue = getattr(service, "_events", None)  # the batching queue (absent before it existed)
        worker = queue.pid() if hasattr(queue, "pid") else None  # the coordinator's own process, if any
        out = {
            # counted where make_plan runs in this process (a coordinator thread); a coordinator
            # process plans out of reach: see coordinator_batches.plans for full plans there
            "make_plan_calls": counts["make_plan"] if worker is None else None,
            "make_plan_s": round(timing["make_plan_s"], 1) if worker is None else None,
            "versions_published": service.coordinator.version - version0,
            "honest_suspects": len(suspects),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "coordinator_batches": dict(queue.counts) if queue is not None else None,
            "events_still_queued": len(queue._queue) if queue is not None else None,
        }
        Path(args.out).write_text(json.dumps(out))
    finally:
        await service.stop()


# ------------------------------------------------------------------ the driver


@dataclasses.dataclass
class _Latencies:
    values: list[float] = dataclasses.field(default_factory=list)
    late: int = 0  # no reply within the deadline
    errors: int = 0

    def summary(self) -> dict[str, Any]:
        v = sorted(self.values)
        q = statistics.quantiles(v, n=100) if len(v) >= 2 else v * 99
        return {
            "heartbeats": len(v) + self.late + self.errors,
            "p50_s": round(q[49], 4) if v else None,
            "p99_s": round(q[98], 4) if v else None,
            "max_s": round(v[-1], 4) if v else None,
            "late": self.late,
            "errors": self.errors,
        }


async def _heartbeats(address: str, ids: list[int], silenced: set[int], phases: list[_Latencies]) -> None:
    """Every id heartbeats every HEARTBEAT_S, staggered evenly; latencies go to phases[-1]."""
    from transport.messages import Heartbeat
    from transport.rpc import RpcClient, RpcError

    clients = [await RpcClient.create(f"honest-{i}") for i in range(8)]
    inflight: set[asyncio.Task[None]] = set()

    async def beat(node_id: int, client: Any) -> None:
        phase = phases[-1]
        start = time.perf_counter()
        try:
            await client.call(address, Heartbeat(node_id=node_id, state="training"), timeout=HEARTBEAT_S)
            phase.values.append(time.perf_counter() - start)
        except TimeoutError:
            phase.late += 1
        except RpcError as exc:
            if exc.code == "timeout":
                phase.late += 1
            else:
                phase.errors += 1

    try:
        gap = HEARTBEAT_S / len(ids)
        start = time.perf_counter()
        k = 0
        while True:
            node_id = ids[k % len(ids)]
            if node_id not in silenced:
                task = asyncio.create_task(beat(node_id, clients[k % len(clients)]))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            k += 1
            delay = start + k * gap - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
    finally:
        for task in list(inflight):
            task.cancel()
        await asyncio.gather(*inflight, return_exceptions=True)
        for client in clients:
            await client.stop()


def _flood_process(address: str, count: int, joined: Any) -> None:
    """The flood in a process of its own, so that its 2,000 clients do not slow the loop that
    sends and times the honest heartbeats; `joined` (a shared int) counts the joins done."""
    _uvloop()
    asyncio.run(_flood(address, count, joined))


async def _flood(address: str, count: int, joined: Any) -> None:
    """`count` strangers join (as strong data nodes, each from a client of its own: the
    bootstrap gives a client that joins again its first id) and send the swarm's base
    digest, then go silent; 64 at a time. A join told `busy` (the bootstrap's join rate)
    is sent again 50 ms later, as long as it takes."""
    from transport.messages import BaseDigest, Join
    from transport.rpc import RpcClient, RpcError

    gate = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with gate:
            client = await RpcClient.create(f"stranger-{i}")
            try:
                join = Join(
                    memory_bytes=100 * 10**6,
                    bandwidth_bps=50 * 10**6,
                    compute_score=1.0,
                    address=f"127.0.0.1:{40000 + i}",
                    has_data=True,
                )
                while True:
                    try:
                        welcome = await client.call(address, join, timeout=30)
                        break
                    except RpcError as exc:
                        if exc.code != "busy":
                            raise
                        await asyncio.sleep(0.05)
                await client.call(address, BaseDigest(node_id=welcome.node_id, digest=DIGEST), timeout=30)
                with joined.get_lock():
                    joined.value += 1
            except (TimeoutError, RpcError):
                pass
            finally:
                await client.stop()

    await asyncio.gather(*(one(i) for i in range(count)))


async def _drive(address: str, members: list[Member], killed: list[int], args: argparse.Namespace) -> dict[str, Any]:
    calm, flood = _Latencies(), _Latencies()
    phases = [calm]
    silenced: set[int] = set()
    beats = asyncio.create_task(_heartbeats(address, [m.node_id for m in members], silenced, phases))
    try:
        await asyncio.sleep(args.calm)
        phases.append(flood)
        silenced.update(killed)
        started = time.perf_counter()
        spawn = multiprocessing.get_context("spawn")
        joined = spawn.Value("i", 0)
        flooding = spawn.Process(target=_flood_process, args=(address, args.flood, joined), daemon=True)
        flooding.start()
        await asyncio.sleep(args.window)
        flood_done = not flooding.is_alive()  # False: still joining when the window ended
        flooding.terminate()
        flooding.join(10)
        return {
            "calm": calm.summary(),
            "flood": flood.summary(),
            "flood_joined": joined.value,
            "flood_done_in_window": flood_done,
            "window_s": round(time.perf_counter() - started, 1),
        }
    finally:
        beats.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=1300)
    parser.add_argument("--flood", type=int, default=2000)
    parser.add_argument("--kill", type=int, default=13, help="honest members that stop heartbeating at the flood")
    parser.add_argument("--calm", type=float, default=20.0, help="seconds of honest heartbeats before the flood")
    parser.add_argument("--window", type=float, default=120.0, help="seconds measured from the flood's start")
    parser.add_argument("--tree", type=Path, default=HERE, help="checkout the bootstrap runs from")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    members = synthetic_members(args.members)
    killed = [m.node_id for m in members[:: max(1, args.members // max(1, args.kill))]][: args.kill]
    t0 = time.perf_counter()
    snapshot = trained_state(members)
    prepare_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="atlas-liveness-") as tmp:
        work = Path(tmp)
        prepared = {"members": [dataclasses.asdict(m) for m in members], "snapshot": snapshot, "killed": killed}
        (work / "prepared.json").write_text(json.dumps(prepared))
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "serve",
                "--prepared",
                str(work / "prepared.json"),
                "--state",
                str(work / "state"),
            ]
            + ["--info", str(work / "info.json"), "--out", str(work / "out.json")],
            cwd=args.tree,
            env={**os.environ, "PYTHONPATH": str(args.tree.resolve())},
        )
        try:
            deadline = time.time() + 600
            while not (work / "info.json").exists():
                if child.poll() is not None or time.time() > deadline:
                    raise SystemExit(f"the bootstrap did not start (rc {child.poll()})")
                time.sleep(0.2)
            address = json.loads((work / "info.json").read_text())["address"]
            _uvloop()
            driven = asyncio.run(_drive(address, members, killed, args))
            driven["bootstrap_tree_peak_rss_mb"] = _tree_rss(child.pid)  # with its coordinator process
        finally:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(120)
            except subprocess.TimeoutExpired:
                child.kill()
        served = json.loads((work / "out.json").read_text()) if (work / "out.json").exists() else {}
    result = {
        "tree": str(args.tree),
        "members": args.members,
        "flood_joins": args.flood,
        "killed": len(killed),
        "prepare_s": round(prepare_s, 1),
        **driven,
        **served,
    }
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


def _uvloop() -> None:
    """uvloop's event loop, as the CLI uses, where the checkout has the switch."""
    import transport.rpc

    if hasattr(transport.rpc, "install_uvloop"):
        transport.rpc.install_uvloop()


def _tree_rss(pid: int) -> float | None:
    from scenarios.swarm import tree_peak_rss_mb

    return tree_peak_rss_mb(pid)


def _serve_main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--prepared", "--state", "--info", "--out"):
        parser.add_argument(name, required=True)
    _uvloop()  # as `atlas-node bootstrap` runs
    asyncio.run(_serve(parser.parse_args(sys.argv[2:])))


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        _serve_main()  # the project comes from PYTHONPATH (--tree)
    else:
        sys.path.insert(0, str(HERE))
        main()
