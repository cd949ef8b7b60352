"""In-process churn: N virtual nodes as `Peer`s, many per process, some killed mid-training.

    python scenarios/simulate.py --nodes 50 --tasks 4 --kill 0.3 --json out.json
        [--rounds R] [--local-steps E] [--model tiny-gpt2] [--workdir DIR] [--seed S] [--timeout S]
        [--no-shared-base] [--data DIR] [--no-emulate-link] [--step-timeout S] [--dead-after S] [--export-rank R]
        [--workers W] [--ray ADDRESS] [--fingerprint-samples M]

The churn scenario (scenarios/churn.py) without one OS process per node: the same node
mix and data (`plan_nodes`, `write_data`: per task one strong node, weak owners that need
a helper, N // 4 pure helpers), the real bootstrap (`nodes.bootstrap.Bootstrap`, keys on,
its coordinator in a process of its own) in this process, and N `nodes.peer.Peer`s dealt
to --workers hosts (scenarios/hosts.py: worker processes by default, one per core; 0: this
process; --ray: Ray actors), each host running its share in one event loop over real
loopback sockets. Each node views its process's one frozen base (TrainConfig.shared_base, copy-on-write: docs/RUNTIME.md;
--no-shared-base gives each its own model) and keeps its own adapters, head, optimizer,
data and executor thread; the torch jobs of a host's nodes take turns
(nodes.executor.TORCH_LOCK), so each host trains on one core. A model other than the embedded one gets budgets fitted to its
footprint (scenarios/budgets.py); --data DIR takes real-text tasks from DIR
(scenarios/textdata.py) instead of synthetic data.

1. Writes the data, starts the bootstrap and the N peers, waits for every node to join.
2. Once the plan is in the peer table, kills the --kill fraction of the N nodes in the
   middle of their training with `Peer.kill()` (sockets closed, no `leave`, nothing
   written: what SIGKILL does to a process), the victims chosen from the table read at
   kill time exactly as churn chooses them (`churn.midway_victims`).
3. Waits (global --timeout, a progress line every few seconds) for every surviving data
   node to finish and return, lets the helpers go, then counts with churn's own
   accounting (`churn.churn_figures`, `churn.acceptance_failures`).

Timings scale with N (`scaled_timing`): the bootstrap's heartbeat period grows with N so
that the bootstrap sees about 200 heartbeats a second whatever N is (0.3 s, the in-process
tests' period, would be 3,300 a second from 1,000 nodes, all encrypted and decrypted on
the one core that also trains); suspect after 5 periods, dead after 10 (at least 15 s: a
loaded loop stalls for seconds). An owner reports a silent helper after max(5, N / 20)
seconds (a helper's step waits behind the other nodes' torch jobs). An anchor publishes
dead_after + 4 step timeouts after a round's first contribution: killing 30% at once
kills helpers the bootstrap then hands out as replacements until it declares them dead,
so an owner may need several repairs in one round, and it must still make that round.

Figures (JSON, with churn's keys): nodes, killed, finished, survivors, lost_updates, ari,
repairs, fallbacks, kills, clusters, losses, wall_s, and for the engine:
- peak_rss_mb: this process (the highest VmRSS/VmHWM sampled every 0.2 s, since each
  node's phase meter resets the kernel's peak) plus its child processes' peaks (the
  coordinator and its forkserver);
- rss_per_node_mb: (this process's sampled peak - its RSS before the nodes started) / N;
- plan_s: the bootstrap's time to cluster and plan: from the fingerprint that made the
  first clustering due (min_nodes = every data node) to the first assignment; with
  fingerprints_s (first to last fingerprint) beside it;
- heartbeats_per_s: heartbeat requests the bootstrap's RpcServer decoded over the run,
  per second; bootstrap_requests_per_s for all requests; bootstrap_requests (by type) and
  bootstrap_answers (replies sent, and each error code answered) over the whole run.
Exit code 0 only when every acceptance check passes; the failing ones are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python scenarios/simulate.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from atlas_p2p.synthetic import SyntheticConfig  # noqa: E402
from nodes.config import SwarmSpec, TrainConfig  # noqa: E402
from scenarios.budgets import fit_budgets  # noqa: E402
from scenarios.churn import (  # noqa: E402
    MAX_SEQ_LEN,
    ChurnConfig,
    NodeSpec,
    RunProgress,
    acceptance_failures,
    churn_figures,
    kill_count,
    midway_victims,
    plan_nodes,
    print_result,
    repair_visible,
    training_done,
    write_data,
    write_truth,
)
from scenarios.hosts import (  # noqa: E402
    HostedNode,
    HostStatus,
    NodeHost,
    NodeStatus,
    Outcome,
    ProcessHost,
    split_round_robin,
)
from scenarios.inprocess import InProcessSwarm  # noqa: E402
from scenarios.swarm import descendants, status_mb  # noqa: E402
from scenarios.textdata import write_text_data  # noqa: E402
from transport.rpc import install_uvloop  # noqa: E402
from transport.units import parse_rate, parse_size  # noqa: E402

log = logging.getLogger("atlas.simulate")

HEARTBEATS_PER_S = 200.0  # what the bootstrap is asked to take, whatever N is
SAMPLE_S = 0.2  # RSS and coordinator sampling period
FINGERPRINT_SAMPLES = 64  # m: the synthetic tasks cluster at ARI 1.0 with it; real text needs 256
STATUS_S = 0.5  # how often the hosts are asked for their nodes' status


@dataclass(frozen=True)
class Timing:
    """The swarm's timings for N virtual nodes sharing one process (see the module doc)."""

    heartbeat_s: float
    suspect_after: float
    dead_after: float
    step_timeout: float
    round_deadline: float
    poll_s: float


def scaled_timing(nodes: int) -> Timing:
    """heartbeat = max(1, N / 200) s (about 200 heartbeats/s at the bootstrap), suspect after
    5 heartbeats, dead after max(15 s, 10 heartbeats); step timeout max(5, N / 20) s; round
    deadline = dead + 4 step timeouts: by `dead` every victim is declared dead and no longer
    handed out as a helper, then an owner whose helper died gets a repair and a replayed round.
    A node re-checks what it waits for (a manifest from its anchor, an assignment) every
    max(0.1, N / 500) s: 1,000 members asking their anchors 10 times a second would be
    10,000 requests a second on two cores."""
    heartbeat = max(1.0, nodes / HEARTBEATS_PER_S)
    dead = max(15.0, 10.0 * heartbeat)
    step = max(5.0, nodes / 20.0)
    return Timing(
        heartbeat_s=heartbeat,
        suspect_after=5.0 * heartbeat,
        dead_after=dead,
        step_timeout=step,
        round_deadline=dead + 4.0 * step,
        poll_s=max(0.1, nodes / 500.0),
    )


def simulate_config(nodes: int, tasks: int, kill: float, **fields: Any) -> ChurnConfig:
    """Churn's config for N in-process nodes, with the timings of `scaled_timing(N)`."""
    t = scaled_timing(nodes)
    timing = dict(
        heartbeat_s=t.heartbeat_s, suspect_after=t.suspect_after, dead_after=t.dead_after, step_timeout=t.step_timeout
    )
    return ChurnConfig(nodes=nodes, tasks=tasks, kill=kill, **{**timing, **fields})


def children_peak_rss_mb(skip: set[int]) -> float:
    """The peak RSS (VmHWM) of this process's live descendants but `skip` (the coordinator
    process and its forkserver; worker processes report their own sampled peaks), MB."""
    return sum(status_mb(p, "VmHWM") or 0.0 for p in descendants(os.getpid()) if p not in skip)


class Watch:
    """Samples this process's RSS and the coordinator's progress every SAMPLE_S seconds:
    the highest RSS seen, and when the bootstrap held its first fingerprint, the one that
    made the first clustering due, and its first assignment."""

    def __init__(self, swarm: InProcessSwarm, min_nodes: int, clock: Callable[[], float]) -> None:
        self.swarm = swarm
        self.min_nodes = min_nodes
        self.clock = clock
        self.peak_mb = 0.0
        self.first_fingerprint_s: float | None = None
        self.due_s: float | None = None  # min_nodes fingerprints held
        self.assigned_s: float | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample_forever(), name="simulate-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()

    def sample(self) -> None:
        rss = max(status_mb("self", "VmRSS") or 0.0, status_mb("self", "VmHWM") or 0.0)
        self.peak_mb = max(self.peak_mb, rss)
        queue = self.swarm.boot.coordination
        now = self.clock()
        if self.assigned_s is None:
            held = sum(1 for s in queue.states.values() if s.has_data and s.fingerprinted)
            if held and self.first_fingerprint_s is None:
                self.first_fingerprint_s = now
            if held >= self.min_nodes and self.due_s is None:
                self.due_s = now
            if queue.assigned:
                self.assigned_s = now

    async def _sample_forever(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_S)


class SimulateRun:
    """One in-process churn run in `workdir` (see the module doc); `await run()` gives the figures.

    The peers live on hosts (scenarios/hosts.py): `workers` 0 runs them in this process,
    W >= 1 in W worker processes (`ProcessHost`), and `make_hosts` may build any other kind
    (Ray actors). The run sees them only through `status`, `kill` and `stop`."""

    def __init__(
        self,
        config: ChurnConfig,
        workdir: Path,
        say: Callable[[str], None] = print,
        workers: int = 0,
        make_hosts: Callable[[list[list[HostedNode]]], list[Any]] | None = None,
        fingerprint_samples: int = FINGERPRINT_SAMPLES,
        shared_base: bool = True,
        text_data: Path | None = None,
        emulate_link: bool = True,
        export_rank: int | None = None,
    ) -> None:
        self.config = config
        self.fingerprint_samples = fingerprint_samples
        self.export_rank = export_rank  # TrainConfig.export_rank: None exact, R lossy (faster for a large model)
        self.emulate_link = emulate_link  # each node's sends shaped by its bandwidth (TrainConfig.emulate_link)
        self.shared_base = shared_base  # the nodes view one frozen base per host process (TrainConfig.shared_base)
        self.text_data = text_data  # a folder of real-text tasks (scenarios/textdata.py); None: synthetic
        self.workdir = Path(workdir)
        self.say = say
        self.workers = workers
        self.make_hosts = make_hosts
        self.timing = scaled_timing(config.nodes)
        self.specs = fit_budgets(
            plan_nodes(config, self.workdir / "data"),
            config.model,
            config.model_task,
            SyntheticConfig().num_labels if config.model_task == "seq_cls" else None,
            config.batch_size,
            MAX_SEQ_LEN,
        )
        self.pure = {s.name for s in self.specs if not s.has_data}
        self.progress = RunProgress()
        self.started = time.monotonic()
        self.deadline = self.started + config.timeout_s
        self.timed_out: str | None = None  # what the run was waiting for when the timeout came
        self.hosts: list[Any] = []
        self.host_of: dict[str, Any] = {}
        self.statuses: dict[str, NodeStatus] = {}  # refreshed every STATUS_S
        self.host_status: dict[int, HostStatus] = {}  # by host index
        self.refresher: asyncio.Task[None] | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def data_names(self) -> list[str]:
        return [s.name for s in self.specs if s.has_data]

    def running(self, name: str) -> bool:
        st = self.statuses.get(name)
        return st is None or st.running

    # -- the swarm ----------------------------------------------------------------------

    def swarm_spec(self) -> SwarmSpec:
        c = self.config
        return SwarmSpec(
            model=c.model,
            task=c.model_task,
            num_labels=SyntheticConfig().num_labels if c.model_task == "seq_cls" else None,
            min_nodes=len(self.data_names()),
            assign_after_s=max(120.0, float(c.nodes)),  # a timer for stragglers, not the trigger
            clusters=c.bootstrap_clusters or None,
            batch_size=c.batch_size,
            max_seq_len=MAX_SEQ_LEN,
            fingerprint_samples=self.fingerprint_samples,
        )

    def bootstrap_timing(self) -> dict[str, float]:
        """As `atlas-node bootstrap` derives them from the heartbeat (tools/cli.py)."""
        c = self.config
        return dict(
            heartbeat_s=c.heartbeat_s,
            suspect_after_s=c.suspect_after,
            dead_after_s=c.dead_after,
            restart_grace_s=max(10.0, 2.0 * c.heartbeat_s),
            sweep_s=min(0.5, c.heartbeat_s / 2),
        )

    def hosted(self, swarm: InProcessSwarm, spec: NodeSpec) -> HostedNode:
        c = self.config
        config = swarm.node_config(
            spec.name, parse_size(spec.memory), data=spec.data, model=c.model, bandwidth_bps=parse_rate(spec.bandwidth)
        )
        train = TrainConfig(
            out_dir=self.workdir / spec.name,
            rounds=c.rounds,
            local_steps=c.local_steps,
            batch_size=c.batch_size,
            max_seq_len=MAX_SEQ_LEN,
            seed=c.seed,
            step_timeout_s=c.step_timeout,
            round_deadline_s=c.dead_after + 4.0 * c.step_timeout,  # scaled_timing's rule, with any override
            poll_s=self.timing.poll_s,
            emulate_link=self.emulate_link,
            shared_base=self.shared_base,
            export_rank=self.export_rank,
            eval_path=spec.eval,
        )
        return HostedNode(spec.name, config, train)

    def build_hosts(self, nodes: list[HostedNode]) -> list[Any]:
        if self.make_hosts is not None:
            return self.make_hosts(split_round_robin(nodes, max(1, self.workers)))
        if self.workers == 0:
            return [NodeHost(nodes)]
        return [ProcessHost(share, logging.getLogger().level) for share in split_round_robin(nodes, self.workers)]

    async def refresh(self) -> None:
        """Every host's status, merged into `statuses`."""
        replies = await asyncio.gather(*(asyncio.to_thread(h.status) for h in self.hosts))
        for i, reply in enumerate(replies):
            self.host_status[i] = reply
            self.statuses.update(reply.nodes)

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # a host that cannot answer now: the next round may
                log.warning("host status failed: %s", exc)
            await asyncio.sleep(STATUS_S)

    async def stop_refresher(self) -> None:
        if self.refresher is not None:
            self.refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.refresher

    def rows(self, swarm: InProcessSwarm) -> list[dict[str, Any]]:
        """The bootstrap's peer table, rows as `atlas-node peers --json` gives them."""
        now = swarm.boot.clock()
        rows = [record.to_dict() for record in swarm.boot.registry.table.rows()]
        for row in rows:
            row["last_seen_ago_s"] = round(max(0.0, now - row["last_seen"]), 3)
        return rows

    # -- waiting ------------------------------------------------------------------------

    async def wait(self, swarm: InProcessSwarm, done: Callable[[], bool], what: str) -> bool:
        """Poll `done()` every max(0.2, N / 500) s until true (True) or the global timeout
        (False), with a progress line every progress_s seconds. (A check that reads the peer
        table costs the bootstrap's loop about 1 ms per 50 rows.)"""
        next_line = time.monotonic() + self.config.progress_s
        while not done():
            if time.monotonic() >= self.deadline:
                self.timed_out = what
                self.say(f"[{self.elapsed():7.1f} s] global timeout of {self.config.timeout_s:g} s waiting for {what}")
                for line in self.running_lines():
                    self.say(f"  {line}")
                return False
            if time.monotonic() >= next_line:
                self.say(self.progress_line(swarm))
                next_line = time.monotonic() + self.config.progress_s
            await asyncio.sleep(max(0.2, self.config.nodes / 500.0))
        return True

    def running_lines(self, most: int = 20) -> list[str]:
        """What the data nodes still running are doing (state, round, version, role, helper)."""
        lines = []
        for name in self.data_names():
            st = self.statuses.get(name)
            if st is None or name in self.progress.killed or not st.running:
                continue
            where = "no assignment" if st.role is None else f"cluster {st.cluster}, {st.role}, helper {st.helper}"
            lines.append(
                f"{name} (id {st.node_id}): {st.state}, round {st.round}, base version {st.base_version}, "
                f"rounds done {st.rounds_done}; {where}"
            )
        return lines[:most]

    def progress_line(self, swarm: InProcessSwarm) -> str:
        alive = [n for n in self.data_names() if n not in self.progress.killed and n in self.statuses]
        training = [self.statuses[n].rounds_done for n in alive if self.statuses[n].running]
        returned = sum(1 for n in alive if not self.statuses[n].running)
        joined = sum(1 for st in self.statuses.values() if st.node_id is not None)
        statuses: dict[str, int] = {}
        for record in swarm.boot.registry.table.rows():
            statuses[record.status] = statuses.get(record.status, 0) + 1
        rounds = (
            f"rounds done min {min(training)} median {statistics.median(training):g} max {max(training)} "
            f"of {self.config.rounds}"
            if training
            else "no data node running"
        )
        table = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items()))
        queue = swarm.boot.coordination
        held = sum(1 for s in queue.states.values() if s.has_data and s.fingerprinted)
        plan = "planned" if queue.assigned else f"fingerprints {held}/{len(self.data_names())}"
        return (
            f"[{self.elapsed():7.1f} s] joined {joined}/{len(self.specs)}; {plan}; {rounds}; "
            f"data nodes returned {returned}; table: {table}"
        )

    # -- phases -------------------------------------------------------------------------

    async def start(self, swarm: InProcessSwarm) -> dict[str, int]:
        c = self.config
        data = self.data_names()
        k_note = f"K = {c.bootstrap_clusters} given" if c.bootstrap_clusters else "K by silhouette"
        where = "this process" if self.workers == 0 and self.make_hosts is None else f"{self.workers} worker(s)"
        self.say(
            f"bootstrap on {swarm.address} ({k_note}; heartbeat {c.heartbeat_s:g} s, dead after {c.dead_after:g} s); "
            f"{len(self.specs)} in-process nodes ({len(data)} with data over {c.tasks} tasks, "
            f"{len(self.specs) - len(data)} pure helpers) in {where}"
        )
        nodes = [self.hosted(swarm, spec) for spec in self.specs]
        self.hosts = await asyncio.to_thread(self.build_hosts, nodes)
        await self.refresh()
        for i, host in enumerate(self.hosts):
            for name in self.host_status[i].nodes:
                self.host_of[name] = host
        self.refresher = asyncio.create_task(self._refresh_forever(), name="simulate-status")
        joined = await self.wait(
            swarm,
            lambda: (
                len(self.statuses) == len(self.specs) and all(st.node_id is not None for st in self.statuses.values())
            ),
            "every node to join",
        )
        ids = {name: st.node_id for name, st in self.statuses.items() if st.node_id is not None}
        if joined:
            write_truth(self.workdir, self.specs, ids)
            self.say(f"[{self.elapsed():7.1f} s] {len(ids)} nodes joined")
        return ids

    async def kill_midway(self, swarm: InProcessSwarm, ids: dict[str, int]) -> None:
        c = self.config
        count = kill_count(c.nodes, c.kill)
        if count == 0 or self.timed_out:
            return
        self.say(
            f"training; kill {count} node(s) in the middle of their training, chosen from the peer table "
            f"read at kill time once the plan is in it (a helper serving owners first)"
        )
        names_by_id = {i: n for n, i in ids.items()}
        picked: dict[str, Any] = {}

        def rounds(node_id: int) -> int:
            name = names_by_id.get(node_id)
            return 0 if name is None or name in self.pure else self.statuses[name].rounds_done

        def ready() -> bool:
            if all(self.statuses[n].rounds_done >= c.rounds for n in self.data_names()):
                picked["late"] = True
                return True
            if not any(self.statuses[n].rounds_done for n in self.data_names()):
                return False  # no victim before a round is done (midway_victims): spare the table read
            running = {ids[n] for n in ids if self.running(n)}
            read_at = time.monotonic()
            rows = [r for r in self.rows(swarm) if int(r["id"]) in running]
            victims = midway_victims(rows, names_by_id, self.pure, count, rounds, c.rounds)
            if victims is None:
                return False
            picked.update(rows=rows, victims=victims, read_at=read_at)
            return True

        if not await self.wait(swarm, ready, "training to reach the middle"):
            return
        if picked.get("late"):
            self.say(f"[{self.elapsed():7.1f} s] no kill: every data node finished before a kill could happen")
            return
        victims = picked["victims"]
        by_host: dict[int, list[str]] = {}
        for v in victims:
            by_host.setdefault(self.hosts.index(self.host_of[v.name]), []).append(v.name)
        await asyncio.gather(*(asyncio.to_thread(self.hosts[i].kill, names) for i, names in by_host.items()))
        self.progress.kill_at_s = self.elapsed()
        self.progress.table_read_before_kill_s = round(time.monotonic() - picked["read_at"], 2)
        self.progress.table_before_kill = picked["rows"]
        self.progress.victims = victims
        self.progress.killed = [v.name for v in victims]
        for victim in victims:
            self.say(
                f"[{self.progress.kill_at_s:7.1f} s] kill {victim.name} (id {victim.node_id}): {victim.why}; "
                f"{training_done(victim, rounds, c.rounds)}"
            )
        await self.wait_for_repair(swarm, [v.node_id for v in victims])

    async def wait_for_repair(self, swarm: InProcessSwarm, victim_ids: list[int]) -> None:
        """Wait (at most dead_after + 60 s) until the table shows the victims gone and no live
        owner paired with one of them."""
        seen: dict[str, list[dict[str, Any]]] = {}

        def repaired() -> bool:
            rows = self.rows(swarm)
            if repair_visible(rows, victim_ids):
                seen["rows"] = rows
                return True
            return time.monotonic() >= until

        until = time.monotonic() + self.config.dead_after + 60.0
        if not await self.wait(swarm, repaired, "the repair to show in the peer table") or "rows" not in seen:
            self.say(f"[{self.elapsed():7.1f} s] no repair visible in the peer table")
            return
        self.progress.repaired_at_s = self.elapsed()
        self.progress.table_last = seen["rows"]
        latency = self.progress.repaired_at_s - (self.progress.kill_at_s or 0.0)
        self.say(f"[{self.elapsed():7.1f} s] peer table repaired {latency:.1f} s after the kill")

    async def finish(self, swarm: InProcessSwarm) -> None:
        """Wait for the surviving data nodes to return (they do once the swarm is done), then
        up to 20 s for the helpers to leave."""
        alive = [n for n in self.data_names() if n not in self.progress.killed]
        if await self.wait(swarm, lambda: not any(self.running(n) for n in alive), "the surviving data nodes"):
            self.say(self.progress_line(swarm))
        helpers = [n for n in self.pure if n not in self.progress.killed]
        until = time.monotonic() + 20.0
        await self.wait(
            swarm,
            lambda: not any(self.running(n) for n in helpers) or time.monotonic() >= until,
            "the helpers to leave",
        )
        self.progress.table_last = self.rows(swarm) or self.progress.table_last

    async def stop_hosts(self, grace_s: float) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        for reply in await asyncio.gather(*(asyncio.to_thread(h.stop, grace_s) for h in self.hosts)):
            outcomes.update(reply)
        return outcomes

    def exit_codes(self, outcomes: Mapping[str, Outcome]) -> dict[str, int | None]:
        """What a process would have exited with (scenarios.hosts.Outcome); failures are printed."""
        for name, outcome in outcomes.items():
            if outcome.error is not None:
                self.say(f"{name} failed: {outcome.error}")
        return {name: (None if name in self.progress.killed else o.code) for name, o in outcomes.items()}

    def memory(self, watch: Watch) -> dict[str, float]:
        """Peak RSS of the run: this process, the worker processes (their sampled peaks) and the
        coordinator's processes; per node: what the hosts grew by while their nodes ran."""
        workers = [h for h in self.host_status.values() if h.pid != os.getpid()]
        own = [h for h in self.host_status.values() if h.pid == os.getpid()]
        children = children_peak_rss_mb(skip={h.pid for h in workers})
        workers_mb = sum(h.peak_rss_mb for h in workers)
        grown = sum(h.peak_rss_mb - h.rss_before_mb for h in workers)
        grown += sum(max(watch.peak_mb, h.peak_rss_mb) - h.rss_before_mb for h in own)
        return dict(
            peak_rss_mb=round(watch.peak_mb + workers_mb + children, 1),
            process_peak_rss_mb=round(watch.peak_mb, 1),
            workers_peak_rss_mb=round(workers_mb, 1),
            children_peak_rss_mb=round(children, 1),
            rss_per_node_mb=round(grown / self.config.nodes, 2),
        )

    async def run(self) -> dict[str, Any]:
        c = self.config
        if self.text_data is None:
            write_data(self.specs, c)
        else:
            write_text_data(self.specs, c, self.text_data)
        swarm = await InProcessSwarm.create(self.workdir, self.swarm_spec(), **self.bootstrap_timing())
        watch = Watch(swarm, len(self.data_names()), time.monotonic)
        watch.start()
        requests_at_start = swarm.boot.server.stats["requests"]
        beats_at_start = swarm.boot.server.requests_by_type["heartbeat"]
        served_from = time.monotonic()
        outcomes: dict[str, Outcome] = {}
        try:
            ids = await self.start(swarm)
            await self.kill_midway(swarm, ids)
            await self.finish(swarm)
            served_s = time.monotonic() - served_from
            heartbeats = swarm.boot.server.requests_by_type["heartbeat"] - beats_at_start
            requests = swarm.boot.server.stats["requests"] - requests_at_start
            coordinator = dict(swarm.boot.coordination.counts)
            server = swarm.boot.server
            by_type = dict(sorted(server.requests_by_type.items()))
            answers = {k: v for k, v in sorted(server.stats.items()) if k != "requests"}  # replies and error codes
            watch.sample()
            await self.stop_refresher()
            await self.refresh()
            memory = self.memory(watch)  # while the coordinator and worker processes are alive
        finally:
            await self.stop_refresher()
            if self.hosts:
                outcomes = await self.stop_hosts(grace_s=swarm.grace_s)
            await watch.stop()
            await swarm.close()
        codes = self.exit_codes(outcomes)
        out_dirs = {s.name: self.workdir / s.name for s in self.specs}
        result = churn_figures(
            c, self.specs, out_dirs, ids, self.progress, self.workdir / "boot", codes, self.workdir, self.elapsed()
        )
        plan_s = None
        if watch.due_s is not None and watch.assigned_s is not None:
            plan_s = round(watch.assigned_s - watch.due_s, 2)
        fingerprints_s = None
        if watch.first_fingerprint_s is not None and watch.due_s is not None:
            fingerprints_s = round(watch.due_s - watch.first_fingerprint_s, 2)
        result.update(
            engine="in-process",
            workers=self.workers,
            shared_base=self.shared_base,
            emulate_link=self.emulate_link,
            data=str(self.text_data) if self.text_data else "synthetic",
            **memory,
            plan_s=plan_s,
            fingerprints_s=fingerprints_s,
            first_assignment_at_s=None if watch.assigned_s is None else round(watch.assigned_s - self.started, 2),
            heartbeats=heartbeats,
            heartbeats_per_s=round(heartbeats / served_s, 1) if served_s > 0 else None,
            bootstrap_requests_per_s=round(requests / served_s, 1) if served_s > 0 else None,
            coordinator=coordinator,
            bootstrap_requests=by_type,
            bootstrap_answers=answers,
            timing=vars(self.timing),
            timed_out=self.timed_out,
        )
        return result


def simulate_failures(result: Mapping[str, Any]) -> list[str]:
    """churn's acceptance checks, plus the global timeout when it was reached."""
    failures = acceptance_failures(result)
    if result.get("timed_out"):
        failures.append(f"global timeout reached while waiting for {result['timed_out']}")
    return failures


def print_engine(result: Mapping[str, Any], say: Callable[[str], None] = print) -> None:
    say(
        f"engine: {result['nodes']} in-process nodes on {result['workers'] or 'no'} worker process(es); "
        f"peak RSS {result['peak_rss_mb']:,} MB (this process {result['process_peak_rss_mb']:,}, "
        f"workers {result['workers_peak_rss_mb']:,}, coordinator {result['children_peak_rss_mb']:,}), "
        f"{result['rss_per_node_mb']} MB per node; bootstrap: plan {result['plan_s']} s after the last "
        f"fingerprint (fingerprints over {result['fingerprints_s']} s), {result['heartbeats_per_s']} heartbeats/s, "
        f"{result['bootstrap_requests_per_s']} requests/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=50, help="N virtual nodes (data nodes + pure helpers)")
    parser.add_argument("--tasks", type=int, default=4, help="T synthetic tasks, one per data node")
    parser.add_argument("--kill", type=float, default=0.3, help="fraction of the N nodes killed mid-training")
    parser.add_argument("--rounds", type=int, default=3, help="merge rounds (at least 3: kills come mid-training)")
    parser.add_argument("--local-steps", type=int, default=4, help="E: local steps per round")
    parser.add_argument("--model", default=ChurnConfig.model, help="the embedded tiny-gpt2 (default) or an HF model")
    parser.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="worker processes the nodes are dealt to (default: one per core); 0 runs them in this process",
    )
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the worker hosts as Ray actors on the cluster at ADDRESS ('auto': the one `ray start` made here, "
        "'local': a new one in this process); needs pip install 'atlas-p2p[ray]'",
    )
    parser.add_argument(
        "--fingerprint-samples",
        type=int,
        default=FINGERPRINT_SAMPLES,
        help="m: examples each fingerprint averages over (the swarm default, 256, is for real text)",
    )
    parser.add_argument("--seed", type=int, default=ChurnConfig.seed)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for the whole run")
    parser.add_argument(
        "--step-timeout",
        type=float,
        help="seconds an owner waits for its helper's step (default: scaled_timing's, for the tiny model)",
    )
    parser.add_argument(
        "--dead-after", type=float, help="silence before the bootstrap declares a node dead (default: scaled)"
    )
    parser.add_argument("--json", type=Path, dest="json_path", help="write the figures here")
    parser.add_argument("--workdir", type=Path, help="keep data and outputs here (default: a temporary dir)")
    parser.add_argument(
        "--shared-base",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the nodes view one frozen base per process, copy-on-write (default); --no-shared-base: a model each",
    )
    parser.add_argument(
        "--emulate-link",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="shape each node's sends by its bandwidth (default); --no-emulate-link: loopback speed",
    )
    parser.add_argument("--export-rank", type=int, help="cap the exported adapters' ranks (default: exact export)")
    parser.add_argument(
        "--data",
        type=Path,
        dest="text_data",
        help="a folder of real-text tasks (NAME.train.jsonl + NAME.test.jsonl) instead of synthetic data",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(name)s: %(message)s")
    try:
        config = simulate_config(
            args.nodes,
            args.tasks,
            args.kill,
            rounds=args.rounds,
            local_steps=args.local_steps,
            model=args.model,
            seed=args.seed,
            timeout_s=args.timeout,
            **{
                k: v for k, v in (("step_timeout", args.step_timeout), ("dead_after", args.dead_after)) if v is not None
            },
        )
    except ValueError as exc:
        parser.error(str(exc))
    if args.fingerprint_samples < 1:
        parser.error(f"--fingerprint-samples must be >= 1, got {args.fingerprint_samples}")
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    if config.kill > 0 and config.rounds < 3:
        parser.error(
            f"--rounds must be >= 3 to kill mid-training (a victim is between its first and last round), got {config.rounds}"
        )
    install_uvloop()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="atlas-simulate-")))
        print(f"in-process churn in {workdir}")
        make_hosts = None
        if args.ray:
            from scenarios.ray_hosts import ray_hosts

            make_hosts = ray_hosts(args.ray)
        run = SimulateRun(
            config,
            workdir,
            workers=args.workers,
            make_hosts=make_hosts,
            fingerprint_samples=args.fingerprint_samples,
            shared_base=args.shared_base,
            text_data=args.text_data,
            emulate_link=args.emulate_link,
            export_rank=args.export_rank,
        )
        result = asyncio.run(run.run())
        failures = simulate_failures(result)
        result["acceptance_failures"] = failures
        print_result(result, failures)
        print_engine(result)
        if args.json_path:
            args.json_path.write_text(json.dumps(result, indent=2, default=str))
            print(f"figures written to {args.json_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
