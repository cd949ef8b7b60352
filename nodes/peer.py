"""The node runtime: join -> fingerprint -> assignment -> rounds -> merge -> finish.

One `Peer` per `atlas-node join`. It holds the node's lifecycle and wires its services,
each split off by protocol role and given narrow collaborators (nodes/collaborators.py: a
`Link`, the `TorchExecutor`, the `LocalNode`, an assignment source), never the
node itself:

- `ControlClient` (nodes/control.py): join, heartbeats (carrying state, round and base
  version), reconnect;
- `BootstrapClient` (nodes/bootstrap_client.py): the assignment (the `beat` reply carries
  its version, so a stale node fetches its new one), fingerprint, base digest, reports;
  it is the assignment source of the others;
- `ClusterSync` (nodes/cluster_sync.py): the reduce (or gossip), anchor, manifests, catch-up;
- `HelperService` (nodes/helper.py): the helper side of split steps and fingerprint probes;
- `OwnerRunner` (nodes/owner.py): one round of the owner side against its helper.
All of them are served on the node's own RpcServer; every torch call runs in one executor thread.

A data node (owner or whole) trains rounds r = its cluster's version .. R-1 (docs/RUNTIME.md):
fresh adapters from the round seed, E steps (alone, or split with its helper), the
helper's factors pulled back, one contribution sent up the cluster's reduce tree to the
anchor, then the round's patch fetched down the tree, checked against the anchor's
manifest and folded (base version v -> v+1). After each fold the node evaluates,
writes one metrics line and an atomic checkpoint. When its rounds are done it exports the
cluster adapter, and keeps serving (it may be an anchor or a helper) until the bootstrap
says the swarm is done; then it leaves with reason "done". A node without data only serves.

Failures are values: a helper that misses a step deadline is reported (`report`), the
owner waits for its repaired assignment, rolls back to the round start and replays; a
helper ahead of the owner makes it catch up from the anchor; a dead anchor is replaced by
the bootstrap and contributions are pushed to the new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from atlas_p2p.aggregation import Contribution
from atlas_p2p.data import Encoded, TaskMismatch, load_for_task, round_batches
from atlas_p2p.fingerprint import FingerprintConfig, LossFn, fingerprint_sample
from atlas_p2p.importance import measure
from atlas_p2p.lora import attach_lora
from atlas_p2p.memory import Workload, shape_from_config
from atlas_p2p.models import num_layers
from atlas_p2p.models.sharing import copy_model
from atlas_p2p.planning import fits_whole_model
from atlas_p2p.privacy.leakage import fisher_leakage
from atlas_p2p.records import (
    CheckpointState,
    ContributionRecord,
    Evaluation,
    FoldedRecord,
    RepairRecord,
    RoundLine,
    Summary,
    bytes_by_kind,
)
from atlas_p2p.training import (
    EXPORT_CHECK_ROWS,
    AdapterCard,
    FactorMemo,
    OwnerConfig,
    OwnerSession,
    RoundEval,
    apply_to_model,
    eval_batches,
    evaluate,
    export_adapter,
    node_fingerprint,
    whole_model_loss,
)
from atlas_p2p.versioning import VersionedBase
from nodes.base_check import settle_base
from nodes.bootstrap_client import BootstrapClient
from nodes.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from nodes.cluster_sync import RETRY_POLLS, ClusterSync
from nodes.collaborators import Link, LocalNode
from nodes.config import EMBEDDED_MODELS, NodeConfig, TrainConfig, parse_address
from nodes.control import ControlClient, JoinRefused, advertised_address, keyed_client, node_keys
from nodes.executor import TorchExecutor
from nodes.fingerprinting import split_loss
from nodes.helper import HelperService
from nodes.metrics import MetricsLog, write_summary
from nodes.modelname import build_model, build_tokenizer, shared_model, shared_tokenizer
from nodes.owner import HelperFailed, HistoryDiffers, OwnerRunner, RoundResult, VersionBehind
from nodes.relay import Relaying, RelayServer, loopback_if_wildcard
from nodes.rss import PeakRss
from transport.link import LinkProfile
from transport.messages import Assignment, Envelope, Fingerprint, Leave, Welcome
from transport.rpc import RpcClient, RpcError, RpcServer, RpcServerConfig

log = logging.getLogger("atlas.peer")
# in-process swarms on one shared base: members of a cluster export the same update, factored once
_SHARED_EXPORTS = FactorMemo()
progress_log = logging.getLogger("atlas.progress")

LEAKAGE_ROWS = 8  # examples psi is measured on (a cheap, local estimate: forward and backward passes)
LEAKAGE_PROBES = 2  # random vector-Jacobian products per split
MAX_MESSAGE_BYTES = 256 << 20


class RuntimeFailure(RuntimeError):
    """The node cannot run as asked (model disagreement, unusable data); one clear line."""


class Peer:
    """One node of the swarm. `await Peer(config, train).run(stop)` returns its summary."""

    def __init__(self, config: NodeConfig, train: TrainConfig) -> None:
        self.config = config
        self.train = train
        self.out = None if train.out_dir is None else Path(train.out_dir)
        if self.out is None and config.data is not None:
            raise RuntimeFailure("a node with --data needs --out (or --state) for its adapter and metrics")
        self.executor = TorchExecutor(train.threads)
        self.metrics = MetricsLog(self.out / "metrics.jsonl") if self.out is not None else None
        self.link = Link()
        self.local = LocalNode()
        self.boot = BootstrapClient(self.link, config.bootstrap, self.local, on_refused=self._refused)
        self.sync = ClusterSync(self.link, self.executor, self.boot, self.local, train)
        self.helper = HelperService(self.executor, self.boot, self.local, self.sync.fetch_patches)
        self.welcome: Welcome | None = None
        self.state = "joining"
        self.task = "causal_lm"
        self.num_labels: int | None = None
        self.split_mode = "two-part"  # the swarm's (welcome): u-shape keeps head, labels and loss on owners
        self.tokenizer: Any = None  # a transformers tokenizer, or atlas_p2p.synthetic's for the embedded models
        self.encoded: Encoded | None = None
        self.eval_encoded: Encoded | None = None
        self.fingerprint: np.ndarray | None = None
        self.importance: dict[str, float] | None = None  # importance probe sent with the fingerprint
        self.leakage: list[float] | None = None  # psi by split sent with the fingerprint (--privacy-floor)
        self.session: OwnerSession | None = None
        self.runner: OwnerRunner | None = None
        self._plan_key: tuple | None = None
        self.rounds_done = 0
        self.steps_total = 0
        self.contributions: list[ContributionRecord] = []
        self.repairs: list[RepairRecord] = []
        self.export: dict[str, Any] | None = None
        self.refused: JoinRefused | None = None  # the bootstrap refused this node's base after a restart
        self._main: asyncio.Task | None = None
        self._running: asyncio.Task | None = None  # the task inside `run` (what `kill` cancels)
        self.killed = False  # `kill` ended this node as SIGKILL would
        self.peaks: dict[str, float | None] = {}  # peak RSS (MB) by phase: fingerprint, train
        self.finished = False
        self._resume: Checkpoint | None = None
        self.server: RpcServer | None = None
        self.client: RpcClient | None = None
        self.control: ControlClient | None = None
        self.relay_server: RelayServer | None = None  # --relay: carries nodes nobody can dial
        self.relaying: Relaying | None = None  # uses a relay when nobody can dial this node

    # ---- what the services learnt ----------------------------------------------------------
    @property
    def node_id(self) -> int | None:
        return self.local.node_id

    @property
    def base_model(self) -> nn.Module | None:
        return self.local.base_model

    @property
    def base_identity(self) -> dict[str, Any] | None:
        return self.local.base_identity

    @property
    def assignment(self) -> Assignment | None:
        return self.boot.assignment

    @property
    def cluster(self) -> int | None:
        return None if self.assignment is None else self.assignment.cluster

    @property
    def manifests(self) -> list[FoldedRecord]:
        """One record per patch folded (ClusterSync)."""
        return self.sync.folded

    def progress(self) -> dict[str, Any]:
        s = self.session
        fields = dict(
            state=self.state,
            round=max(s.round, 0) if s is not None else 0,
            base_version=s.version if s is not None else 0,
        )
        return fields

    def bytes_sent(self) -> dict[str, int]:
        """Bytes this node has sent by kind: its requests and its replies, as the RPC layer encoded them."""
        return bytes_by_kind(*(rpc.bytes_sent for rpc in (self.client, self.server) if rpc is not None))

    def link_profile(self) -> LinkProfile | None:
        """With --emulate-link: this node's sends (requests and replies) shaped by its own
        --bandwidth and --latency-ms (transport.link); None otherwise (the real link is the link)."""
        if not self.train.emulate_link:
            return None
        return LinkProfile(bandwidth_mbps=self.config.bandwidth_bps / 1e6, latency_ms=self.train.latency_ms)

    def _refused(self, exc: JoinRefused) -> None:
        """The bootstrap refused this node's base after a restart: stop like a refusal at join."""
        self.refused = exc
        if self._main is not None:
            self._main.cancel()

    # ---- fingerprint -----------------------------------------------------------------------
    async def compute_fingerprint(self) -> np.ndarray:
        """This node's fingerprint (atlas_p2p.training.fingerprinting): across a cut through the
        provisional helper its assignment names (a node below the whole model waits for one),
        else on the whole model here. A helper that fails is asked again after a fresh
        assignment; after 3 failures the node computes it alone."""
        w, t = self.welcome, self.train
        job = functools.partial(
            node_fingerprint,
            self.base_model,
            self.encoded,
            w.fingerprint_seed,
            w.fingerprint_samples,
            t.batch_size,
            t.step_delay_s,
            probe=w.fingerprint_probe,
            dp=t.fingerprint_dp,
            num_labels=self.num_labels,
        )
        peak = PeakRss()
        shape = shape_from_config(self.base_model.config, self.task, self.num_labels)
        alone = fits_whole_model(shape, self.config.memory_bytes, Workload(batch=t.batch_size, seq_len=t.max_seq_len))
        for attempt in range(3):
            await self.boot.fetch_assignment()
            if not alone:
                await self.wait_provisional_helper()
            a = self.assignment
            address = self.boot.address_of(a.helper) if a is not None and a.cluster is None and a.split else None
            if address is None:
                break
            log.info("fingerprint across a cut: blocks[:%d] here, the rest on provisional helper %d", a.split, a.helper)
            try:
                loss_fn = split_loss(a.split, self.split_mode, self.link.blocking(address), self.node_id)
                vector = await self.executor.run(job, loss_fn=loss_fn)
                self.importance = await self.measure_importance(loss_fn, a.split)
                self.peaks["fingerprint"] = peak.read_mb()
                return vector
            except (RpcError, ValueError) as exc:
                log.warning("fingerprint through helper %d failed (%s); asking again", a.helper, exc)
                await asyncio.sleep(1.0 + attempt)
        vector = await self.executor.run(job)
        self.importance = await self.measure_importance(whole_model_loss, None)
        self.peaks["fingerprint"] = peak.read_mb()
        return vector

    async def wait_provisional_helper(self) -> None:
        """A node whose budget is below the whole model waits (`helper_wait_s` at most) for the
        bootstrap to name a provisional helper, which it does once a peer that can run the
        later blocks is in; a node that joins first must not fingerprint above its budget."""
        t = self.train

        def named(a: Assignment) -> bool:
            return a.helper is not None or a.cluster is not None

        if self.assignment is not None and named(self.assignment):
            return
        log.info("budget below the whole model: waiting up to %g s for a provisional helper", t.helper_wait_s)
        try:
            await asyncio.wait_for(self.boot.wait_assignment(named, "a provisional helper"), t.helper_wait_s)
        except TimeoutError:
            log.warning(
                "no provisional helper after %g s: computing the fingerprint on the whole model here, "
                "above this node's budget",
                t.helper_wait_s,
            )

    async def measure_importance(self, loss_fn: LossFn, split: int | None) -> dict[str, float] | None:
        """This node's importance vector (atlas_p2p.importance.measure) on the first micro-batch of
        its fingerprint sample, with the fingerprint's loss: the weights of blocks[:split] across
        a cut, every weight otherwise. None when the probe fails: the fingerprint goes without
        it and the planner counts this node's weights as equally important."""
        w = self.welcome
        config = FingerprintConfig(seed=w.fingerprint_seed, num_samples=w.fingerprint_samples)
        batch = fingerprint_sample(self.encoded, config, self.train.batch_size)[0]
        shape = shape_from_config(self.base_model.config, self.task, self.num_labels)
        try:
            return await self.executor.run(measure, self.base_model, batch, loss_fn, shape, split)
        except (RpcError, ValueError) as exc:
            log.warning("importance probe failed (%s); the fingerprint goes without it", exc)
            return None

    async def measure_leakage(self) -> list[float] | None:
        """psi(s) for s = 1..L-1 (atlas_p2p.privacy.leakage) on up to LEAKAGE_ROWS of this node's
        fingerprint sample, when the swarm has a privacy floor; None otherwise or when it fails
        (the planner then lets this node train only on the whole model, which sends nothing)."""
        if self.welcome.privacy_floor is None:
            return None
        w = self.welcome
        config = FingerprintConfig(seed=w.fingerprint_seed, num_samples=w.fingerprint_samples)
        batch = fingerprint_sample(self.encoded, config, LEAKAGE_ROWS)[0]
        splits = list(range(1, num_layers(self.base_model)))
        try:
            psi = await self.executor.run(
                fisher_leakage, self.base_model, batch["input_ids"], batch["attention_mask"], splits, LEAKAGE_PROBES
            )
        except ValueError as exc:
            log.warning("leakage probe failed (%s); the fingerprint goes without it", exc)
            return None
        log.info("leakage psi by split: %s", ", ".join(f"{s}: {psi[s]:.3g}" for s in splits))
        return [psi[s] for s in splits]

    def _fingerprint_message(self) -> Fingerprint:
        t = self.train
        return Fingerprint(
            node_id=self.node_id,
            vector=self.fingerprint,
            n_samples=len(self.encoded),
            importance=self.importance,
            leakage=self.leakage,
            dp=None if t.fingerprint_dp is None else [t.fingerprint_dp.epsilon, t.fingerprint_dp.delta],
        )

    async def report_helper(self, helper: int, why: str) -> None:
        self.repairs.append(RepairRecord(time.time(), self.session.round, helper, why))
        log.warning("round %d: helper %s failed (%s); reporting it", self.session.round, helper, why)
        await self.boot.report_helper(helper, why)

    # ---- lifecycle -------------------------------------------------------------------------
    async def rpc_ping(self, env: Envelope) -> None:
        return None

    async def run(self, stop: asyncio.Event) -> dict[str, Any]:
        """The node's whole life until `stop` is set (checkpoint, summary, `leave`) or the
        swarm is done; its summary. After `kill` it returns the summary it holds in memory,
        having written and sent nothing."""
        self._running = asyncio.current_task()
        if not self.killed:
            try:
                await self._run(stop)
            except asyncio.CancelledError:
                if not self.killed:
                    raise
                self._running.uncancel()  # the cancel was `kill`'s: closing the sockets may await
        if self.killed:
            await self._drop()
        return self.summary().to_json()

    async def kill(self) -> None:
        """End this node as SIGKILL ends its process, for a swarm of nodes in one process: the
        running `run` is cancelled and every socket closed, with no `leave`, no checkpoint and
        no summary written. Heartbeats stop; the bootstrap finds the node silent and declares it
        dead. A torch job already running in the executor thread ends on its own, unseen.
        Returns once the sockets are closed."""
        self.killed = True
        task = self._running
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait({task})

    async def _drop(self) -> None:
        """What is left of a killed node: its tasks cancelled and sockets closed, nothing sent."""
        if self._main is not None and not self._main.done():
            self._main.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        await self.boot.stop()
        await self.sync.stop()
        if self.control is not None:
            await self.control.stop(leave=False)
        await self._stop_relays()
        for rpc in (self.client, self.server):
            if rpc is not None:
                await rpc.stop()
        self.executor.shutdown(wait=False)

    async def _run(self, stop: asyncio.Event) -> None:
        host, port = parse_address(self.config.bind, allow_port_zero=True, what="bind")
        link = self.link_profile()
        handlers = {"ping": self.rpc_ping, **self.helper.handlers(), **self.sync.handlers()}
        keypair, _ = node_keys(self.config)
        self.server = await RpcServer.create(
            host,
            port,
            handlers,
            config=RpcServerConfig(name="node", max_bytes=MAX_MESSAGE_BYTES),
            link=link,
            keypair=keypair,
        )
        interrupted = False
        try:
            self.client = keyed_client(self.config, keypair, link=link)
            self.link.attach(self.client)
            address = advertised_address(f"{host}:{self.server.port}", self.config.bootstrap, self.config.advertise)
            if self.config.relay_port is not None:
                self.relay_server = await RelayServer.create(
                    host,
                    self.config.relay_port,
                    advertise_host=parse_address(address, what="address")[0],
                    slots=self.config.relay_slots,
                )
            self.relaying = Relaying(
                local=f"{loopback_if_wildcard(host)}:{self.server.port}",
                own=address,
                bootstrap=self.config.bootstrap,
                readvertise=lambda slot, via: self.control.readvertise(slot, via),
                label=lambda: str(self.node_id or ""),
            )
            self.control = await ControlClient.create(
                self.config,
                address,
                client=self.client,
                progress=self.progress,
                on_heartbeat_reply=self._on_beat,
                relay="" if self.relay_server is None else self.relay_server.address,
            )
            main = self._main = asyncio.create_task(self._lifecycle(), name="lifecycle")
            stopper = asyncio.create_task(stop.wait())
            watched = asyncio.create_task(self.control.wait_done())
            try:
                done, _ = await asyncio.wait({main, stopper, watched}, return_when=asyncio.FIRST_COMPLETED)
            finally:  # also when `kill` cancels this wait
                for task in (stopper, watched):
                    task.cancel()
            if main not in done:
                interrupted = True
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await main
                if self.control.failure is not None:
                    raise self.control.failure
                log.info("interrupted: writing a checkpoint and leaving")
            elif self.refused is not None:
                raise self.refused
            else:
                main.result()
        finally:
            if not self.killed:
                await self._shutdown(interrupted)

    def _on_beat(self, reply: Any) -> Any:
        self.relaying.on_beat(reply)
        return self.boot.on_beat(reply)

    async def _stop_relays(self) -> None:
        for relay in (self.relaying, self.relay_server):
            if relay is not None:
                await relay.stop()

    async def _shutdown(self, interrupted: bool) -> None:
        await self.boot.stop()
        await self.sync.stop()
        if self.session is not None and self.out is not None:
            with contextlib.suppress(Exception):
                await self.executor.run(self.save_checkpoint)
        if self.out is not None:
            with contextlib.suppress(Exception):
                write_summary(self.out, self.summary())
        if self.relaying is not None:
            await self.relaying.stop()  # its relay leaving now must not start a rejoin that skips the leave
        if self.control is not None:
            if self.node_id is not None and self.welcome is not None:
                reason = "done" if self.finished or (self.encoded is None and self.boot.swarm_done) else "shutdown"
                try:
                    await self.client.call(
                        self.config.bootstrap,
                        Leave(node_id=self.node_id, reason=reason),
                        timeout=self.config.leave_timeout_s,
                    )
                    log.info("left the swarm (%s)", reason)
                except RpcError as exc:
                    log.warning("leave not acknowledged (%s)", exc)
            await self.control.stop(leave=False)
        await self._stop_relays()
        if self.client is not None:
            await self.client.stop()
        if self.server is not None:
            await self.server.stop()
        self.executor.shutdown()

    async def _lifecycle(self) -> None:
        welcome = await self.control.wait_joined()
        self.local.node_id, self.welcome = welcome.node_id, welcome
        self.boot.heard_heartbeat(welcome.heartbeat_s)
        if self.config.model and welcome.model and self.config.model != welcome.model:
            raise RuntimeFailure(f"--model {self.config.model} disagrees with the swarm's model {welcome.model}")
        name = welcome.model or self.config.model or "tiny-gpt2"
        self.task = "seq_cls" if welcome.model_task in ("seq_cls", "classification") else "causal_lm"
        self.num_labels = welcome.num_labels
        self.split_mode = welcome.split_mode or "two-part"  # the swarm's, set by the bootstrap
        self.sync.merge_rule = welcome.merge_rule  # exact, or a baseline's rule (fedavg, mira)
        if self.train.split_mode is not None and self.train.split_mode != self.split_mode:
            raise RuntimeFailure(
                f"--split-mode {self.train.split_mode} disagrees with the swarm's split mode {self.split_mode}"
            )
        shared = self.train.shared_base  # one base (and tokenizer) per process, or our own
        self.tokenizer = await self.executor.run(shared_tokenizer if shared else build_tokenizer, name)
        build = shared_model if shared else build_model
        self.local.base_model = await self.executor.run(
            build, name, self.task, self.num_labels, self.train.device, welcome.init_seed
        )
        log.info(
            "node %d runs %s (%s%s)",
            self.node_id,
            name,
            self.task,
            f", {self.num_labels} labels" if self.num_labels else "",
        )
        # one base per swarm (nodes/base_check.py): refused (JoinRefused) when the swarm runs another
        self.local.base_identity = await settle_base(
            self.executor, self.base_model, name, self.node_id, self.out, welcome.init_seed
        )
        await self.boot.send_base()
        if self.config.data is None:
            self.state = "waiting"
            self.sync.start()
            peak = PeakRss()
            await self._serve_until_done()
            self.peaks["serve"] = peak.read_mb()
            self.finished = True  # a helper's job ends with the swarm
            return
        self._resume = await self.executor.run(load_checkpoint, self.out)
        if self._resume is not None:
            state = self._resume.state
            log.info("resuming from checkpoint (round %s, version %d)", state.round, self._resume.base.version)
            self.contributions = list(state.contributions)
            self.sync.folded = list(state.manifests)
            self.repairs = list(state.repairs)
            self.rounds_done = state.rounds_done
            self.steps_total = state.steps_total
        self.state = "fingerprinting"
        self.encoded = await self._load_data(self.config.data)
        if self.train.eval_path is not None:
            self.eval_encoded = await self._load_data(self.train.eval_path)
        self.fingerprint = await self.compute_fingerprint()
        if self.train.fingerprint_dp is not None:
            dp = self.train.fingerprint_dp
            log.info("fingerprint released under sample-level DP: epsilon %g, delta %g", dp.epsilon, dp.delta)
        self.leakage = await self.measure_leakage()
        await self.boot.send_fingerprint(self._fingerprint_message())
        self.state = "waiting"
        self.sync.start()
        peak = PeakRss()
        await self._train_rounds()
        self.peaks["train"] = peak.read_mb()
        self.state = "done"
        await self._finish()
        if await self._serve_until_done(follow=True):
            await self._finish()  # later patches were folded: export the cluster's final adapter

    async def _load_data(self, path: Path) -> Encoded:
        """`path` encoded for the swarm's task; records of a kind the task cannot train on stop the node."""
        try:
            return await self.executor.run(
                load_for_task, path, self.tokenizer, self.task, self.num_labels, self.train.max_seq_len
            )
        except TaskMismatch as exc:
            raise RuntimeFailure(f"--data {exc}") from None

    async def _serve_until_done(self, follow: bool = False) -> bool:
        """Serve peers until the bootstrap says the swarm is done; True if more patches were folded."""
        folded = False
        while not self.boot.swarm_done:
            await asyncio.sleep(self.train.poll_s * 5)
            if follow:
                try:
                    folded = await self.sync.follow() or folded
                except Exception:  # a bad manifest must not end serving
                    log.exception("following the cluster failed")
        log.info("the swarm is done")
        return folded

    # ---- sessions --------------------------------------------------------------------------
    def _build_session(self, a: Assignment) -> OwnerSession:
        """A fresh OwnerSession for assignment `a`, on this node's folded base (runs in the executor)."""
        key = str(a.cluster)
        old = self.session
        base, pending = None, None
        if old is not None and old.base.cluster == key:
            base, pending = old.base, old.pending
        elif self._resume is not None and self._resume.base.cluster == key:
            base, pending = self._resume.base, self._resume.pending
        if base is None:
            base = VersionedBase(key)
        model = attach_lora(copy_model(self.base_model), {n: int(r) for n, r in a.ranks.items()})
        if len(base):
            apply_to_model(model, base.folded_delta())
        config = OwnerConfig(
            node_id=self.node_id,
            split=int(a.split),
            lr=self.train.lr,
            run_seed=int(self.welcome.fingerprint_seed),
            mode=self.split_mode,
            cluster=key,
            activation_noise=self.train.activation_noise,
        )
        session = OwnerSession(model, config, base=base)
        session.pending = pending
        session.start_round(base.version)
        return session

    async def _ensure_session(self, a: Assignment) -> None:
        key = (a.cluster, a.split, tuple(sorted(a.ranks.items())))
        if self.session is None or key != self._plan_key:
            if self.session is not None:
                log.info("assignment changed the plan (cluster/split/ranks): new adapters")
            self.session = self.sync.session = await self.executor.run(self._build_session, a)
            self._plan_key = key
            self._resume = None
            await self.sync.catch_up()
        helper = a.helper if a.role == "owner" else None
        self.runner = OwnerRunner(
            self.link,
            self.executor,
            self.session,
            self.train,
            owner_id=self.node_id,
            cluster=a.cluster,
            helper=helper,
            helper_address=None if helper is None else a.addresses.get(str(helper)),  # of `a`, not of a newer one
            ranks=dict(a.ranks),
            base_digest=self.local.base_digest or "",
        )

    # ---- training rounds -------------------------------------------------------------------
    def _trainable(self, a: Assignment) -> bool:
        if a.role == "whole":
            return a.cluster is not None and a.split is not None
        return a.role == "owner" and a.helper is not None and self.boot.address_of(a.helper) is not None

    async def _train_rounds(self) -> None:
        R = self.train.rounds
        while True:
            a = await self.boot.wait_assignment(self._trainable, "a trainable assignment")
            await self._ensure_session(a)
            s = self.session
            if self.rounds_done >= R:  # rounds of its own: one the cluster published while it caught up does not count
                break
            self.state = "training"
            r = s.round
            batches = round_batches(self.encoded, self.train.batch_size, self.train.seed, r, self.train.local_steps)
            try:
                result = await self.runner.train_round(batches)
            except HelperFailed as exc:
                self.state = "repairing"
                await self.report_helper(exc.helper, exc.why)
                if not s.closed:
                    await self.executor.run(s.rollback)
                old = exc.helper
                await self.boot.wait_assignment(
                    lambda x, old=old: not (x.role == "owner" and x.helper == old), "a new helper"
                )
                continue
            except VersionBehind as exc:
                log.info("round %d: %s; catching up", r, exc)
                await self.sync.catch_up()
                continue
            except HistoryDiffers as exc:
                if not await self.sync.resync(str(exc)):
                    await asyncio.sleep(self.train.poll_s * RETRY_POLLS)  # the anchor cannot be asked yet
                continue
            await self._merge(result)
        while self.session.pending is not None:
            await self._carry_round()
        log.info("all %d rounds done (base version %d)", R, self.session.version)

    async def _carry_round(self) -> None:
        """After the last round: merge a contribution that missed its manifest on its own.

        It becomes this node's contribution to the next round of the cluster; the anchor
        publishes that round at its deadline, and finished members still fold it (`ClusterSync.follow`).
        """
        s = self.session
        p = s.pending
        c = Contribution(p.factors, p.n_samples, p.node_id, s.round, p.dense)
        log.info("round %d: merging the contribution that missed the last manifest", s.round)
        self.state = "merging"
        self.contributions.append(ContributionRecord(c.round, c.digest, c.n_samples, carry=True))
        await self.sync.contribute(c)
        if self.manifests and str(self.node_id) in self.manifests[-1].nodes:
            s.pending = None
        await self.executor.run(self.save_checkpoint)

    async def _merge(self, result: RoundResult) -> None:
        s = self.session
        c = result.contribution
        r = c.round
        self.state = "merging"
        self.steps_total += result.steps
        self.contributions.append(ContributionRecord(r, c.digest, c.n_samples))
        await self.sync.contribute(c)
        self.rounds_done += 1
        self.sync.forget_before(r)
        evaluation = None
        if self.eval_encoded is not None:
            evaluation = await self.executor.run(evaluate, s.model, self.eval_encoded, self.task, self.train.batch_size)
        line = RoundLine(
            node_id=self.node_id,
            cluster=self.cluster,
            round=r,
            role=self.assignment.role,
            loss=result.loss,
            eval=None if evaluation is None else Evaluation(**evaluation),
            steps=result.steps,
            step_rate=result.steps / result.seconds if result.seconds > 0 else None,
            bytes_by_kind=self.bytes_sent(),
            base_version=s.version,
            contributions=(c.digest,),
            manifests_folded=tuple(m.digest for m in self.manifests if m.round == r),
            carried_over=s.pending is not None,
            repairs_seen=len(self.repairs),
            helper=self.runner.helper,
            time=time.time(),
        )
        self.metrics.write(line)
        await self.executor.run(self.save_checkpoint)
        b = line.bytes_by_kind
        ev = "" if evaluation is None else f" {evaluation['metric']} {evaluation['value']:.4f}"
        progress_log.info(
            "node %d round %d/%d (cluster %s round %d): loss %s%s, %.2f steps/s, sent act %s grad %s adapters %s fp %s ctl %s",
            self.node_id,
            self.rounds_done,
            self.train.rounds,
            self.cluster,
            r + 1,
            "n/a" if result.loss is None else f"{result.loss:.4f}",
            ev,
            line.step_rate or 0.0,
            b["activations"],
            b["gradients"],
            b["adapters"],
            b["fingerprints"],
            b["control"],
        )

    # ---- results -----------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        s = self.session
        state = CheckpointState(
            node_id=self.node_id,
            cluster=self.cluster,
            round=s.round,
            base_version=s.version,
            rounds_done=self.rounds_done,
            steps_total=self.steps_total,
            contributions=tuple(self.contributions),
            manifests=tuple(self.manifests),
            repairs=tuple(self.repairs),
        )
        save_checkpoint(self.out, state, s.base, s.pending)

    def _adapter_card(self) -> AdapterCard:
        """The model card of the exported adapter: the swarm's base, this cluster, eval by round."""
        name = self.welcome.model or self.config.model or "tiny-gpt2"
        evals = {}
        if self.metrics is not None:
            for line in self.metrics.lines():
                if line.eval is not None:  # a resumed node's file may repeat a round: the last line wins
                    evals[line.round] = RoundEval(line.round, line.eval.metric, line.eval.value)
        id2label = dict(getattr(self.base_model.config, "id2label", None) or {})
        names = tuple(str(id2label.get(i, "")) for i in range(self.num_labels or 0))
        if not all(names) or names == tuple(f"LABEL_{i}" for i in range(len(names))):
            names = ()  # transformers' placeholders say nothing
        code = None
        if name in EMBEDDED_MODELS:
            code = (
                f"from nodes.modelname import build_model  # ATLAS's embedded model\n"
                f"base = build_model({name!r}, {self.task!r}, {self.num_labels!r})"
            )
        a = self.assignment
        return AdapterCard(
            base_model=name,
            task=self.task,
            num_labels=self.num_labels,
            label_names=names,
            cluster=None if a is None else str(a.cluster),
            members=tuple(a.members) if a else (),
            rounds=self.rounds_done,
            node_id=self.node_id,
            evals=tuple(evals[r] for r in sorted(evals)),
            base_code=code,
        )

    def _check_batches(self) -> list[dict[str, Any]]:
        """The export's prediction check: the first EXPORT_CHECK_ROWS evaluation rows."""
        if self.eval_encoded is None:
            return []
        rows = self.eval_encoded.subset(range(min(EXPORT_CHECK_ROWS, len(self.eval_encoded))))
        return eval_batches(rows, self.train.batch_size)

    async def _finish(self) -> None:
        """Export the cluster's adapter (exact unless --export-rank) and, with --eval, check it loads
        with stock peft and predicts as this node's model does (export.json and summary.json)."""
        path = self.out / "adapter"
        try:
            batches = await self.executor.run(self._check_batches)
            report = await self.executor.run(
                export_adapter,
                self.base_model,
                self.session.base,
                path,
                self.train.export_rank,
                card=self._adapter_card(),
                reference=self.session.model if batches else None,
                eval_batches=batches,
                memo=_SHARED_EXPORTS if self.train.shared_base else None,
            )
            self.export = {"path": str(path), **report.summary(), "error": None}
        except (ValueError, OSError, RuntimeError) as exc:  # a failed export or check must not kill the node
            self.export = {"path": None, "error": str(exc)}
            log.warning("adapter not exported: %s", exc)
        self.finished = True
        write_summary(self.out, self.summary())
        log.info("finished: adapter in %s", path if self.export.get("path") else "(none)")

    def summary(self) -> Summary:
        a = self.assignment
        return Summary(
            node_id=self.node_id,
            finished=self.finished,
            rounds_done=self.rounds_done,
            rounds=self.train.rounds,
            cluster=None if a is None else a.cluster,
            role=None if a is None else a.role,
            has_data=self.config.data is not None,
            split=None if a is None else a.split,
            ranks={} if a is None else dict(a.ranks),
            helper=None if a is None else a.helper,
            adapter_dir=None if self.export is None else self.export.get("path"),
            export=self.export,
            export_error=None if self.export is None else self.export.get("error"),
            base_version=None if self.session is None else self.session.version,
            contributions=tuple(self.contributions),
            manifests_folded=tuple(self.manifests),
            repairs=tuple(self.repairs),
            split_mode=self.split_mode,
            steps_served=self.helper.steps_served,
            requests_served=dict(self.helper.requests),
            labels_received=self.helper.labels_received,
            bytes_by_kind=self.bytes_sent(),
            peak_rss_mb=dict(self.peaks),
            base_digest=None if self.base_identity is None else self.base_identity["digest"],
            relay={
                "used": None if self.relaying is None else self.relaying.to_json(),
                "served": None if self.relay_server is None else self.relay_server.stats.to_json(),
            },
        )


async def run_peer(config: NodeConfig, train: TrainConfig, stop: asyncio.Event) -> dict[str, Any]:
    """The whole life of one node (the CLI's `join`)."""
    return await Peer(config, train).run(stop)
