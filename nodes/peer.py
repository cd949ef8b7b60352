"""The node runtime (issue #4): join -> fingerprint -> assignment -> rounds -> merge -> finish.

One `Peer` per `atlas-node join`. It serves peers on its own RpcServer (split steps as a
helper, gossip, manifests, catch-up), keeps its place with the bootstrap through a
`ControlClient` (heartbeats carry its state, round and base version; the `beat` reply
carries the assignment version, so a stale node fetches its new assignment), and runs
every torch call in one executor thread.

A data node (owner or whole) trains rounds r = its cluster's version .. R-1 (docs/RUNTIME.md):
fresh adapters from the round seed, E steps (alone, or split with its helper), the
helper's factors pulled back, one contribution pushed to the anchor and gossiped to
`fanout` members, then the anchor's manifest is rebuilt from the contributions, checked
against its digest and folded (base version v -> v+1). After each fold the node evaluates,
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
import copy
import functools
import logging
import random
import time
import uuid
from pathlib import Path
from typing import Any

from atlas_p2p.data import Encoded, TaskMismatch, load_for_task, round_batches
from atlas_p2p.training import eval_batches, evaluate, node_fingerprint
from nodes.config import NodeConfig, parse_address
from nodes.control import ControlClient, advertised_address
from nodes.executor import TorchExecutor
from nodes.helper import HelperService
from nodes.merge import AnchorLog, GossipStore, merge_manifest
from nodes.metrics import ByteMeter, MetricsLog, write_json_atomic
from nodes.owner import HelperFailed, OwnerRunner, VersionBehind
from nodes.rss import PeakRss
from nodes.runtime_config import TrainConfig

log = logging.getLogger("atlas.peer")
progress_log = logging.getLogger("atlas.progress")

MAX_MESSAGE_BYTES = 256 << 20
CONTROL_TIMEOUT_S = 3.0


class RuntimeFailure(RuntimeError):
    """The node cannot run as asked (model disagreement, unusable data); one clear line."""


# ---- the node --------------------------------------------------------------------------
class Peer:
    """One node of the swarm. `await Peer(config, train).run(stop)` returns its summary."""

    def __init__(self, config: NodeConfig, train: TrainConfig) -> None:
        self.config = config
        self.train = train
        self.out = None if train.out_dir is None else Path(train.out_dir)
        if self.out is None and config.data is not None:
            raise RuntimeFailure("a node with --data needs --out (or --state) for its adapter and metrics")
        self.executor = TorchExecutor(train.threads)
        self.meter = ByteMeter()
        self.metrics = MetricsLog(self.out / "metrics.jsonl") if self.out is not None else None
        self.store = GossipStore()
        self.anchor_logs: dict[int, AnchorLog] = {}
        self.helper = HelperService(self)
        self.rng = random.Random()
        self.node_id: int | None = None
        self.welcome: Any = None
        self.assignment: Any = None
        self.assignment_version = 0
        self._assigned = asyncio.Event()
        self.swarm_done = False
        self.need_fingerprint = False
        self.state = "joining"
        self.task = "causal_lm"
        self.num_labels: int | None = None
        self.split_mode = "two-part"  # the swarm's (welcome): u-shape keeps head, labels and loss on owners
        self.base_model: Any = None
        self.tokenizer: Any = None
        self.encoded: Any = None
        self.eval_encoded: Any = None
        self.fingerprint: Any = None
        self.session: Any = None
        self.runner: OwnerRunner | None = None
        self._plan_key: tuple | None = None
        self.rounds_done = 0
        self.steps_total = 0
        self.contributions: list[dict[str, Any]] = []
        self.manifests: list[dict[str, Any]] = []
        self.repairs: list[dict[str, Any]] = []
        self.export: dict[str, Any] | None = None
        self.base_identity: dict[str, Any] | None = None  # nodes.base_check.settle_base
        self._rebasing = False
        self.refused: Exception | None = None  # the bootstrap refused this node's base after a restart
        self._main: asyncio.Task | None = None
        self.peaks: dict[str, float | None] = {}  # peak RSS (MB) by phase: fingerprint, train
        self.finished = False
        self._resume = None
        self._tasks: set[asyncio.Task] = set()
        self.server: Any = None
        self.client: Any = None
        self.control: ControlClient | None = None

    # ---- small plumbing ------------------------------------------------------------------
    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def cluster(self) -> int | None:
        return None if self.assignment is None else self.assignment.cluster

    def address_of(self, node_id: int | None) -> str | None:
        if node_id is None or self.assignment is None:
            return None
        return self.assignment.addresses.get(str(node_id))

    async def call(self, address: str, body: Any, timeout: float = CONTROL_TIMEOUT_S) -> Any:
        self.meter.count(body)
        return await self.client.call(address, body, timeout=timeout)

    def progress(self) -> dict[str, Any]:
        from transport.messages import Heartbeat

        s = self.session
        fields = dict(state=self.state, round=max(s.round, 0) if s is not None else 0,
                      base_version=s.version if s is not None else 0)
        self.meter.count(Heartbeat(node_id=self.node_id or 0, **fields))
        return fields

    def link_profile(self) -> Any:
        """With --emulate-link: this node's sends (requests and replies) shaped by its own
        --bandwidth and --latency-ms (transport.link); None otherwise (the real link is the link)."""
        from transport.link import LinkProfile

        if not self.train.emulate_link:
            return None
        return LinkProfile(bandwidth_mbps=self.config.bandwidth_bps / 1e6, latency_ms=self.train.latency_ms)

    # ---- bootstrap side --------------------------------------------------------------------
    async def on_beat(self, reply: Any) -> None:
        from transport.messages import Beat

        if not isinstance(reply, Beat):
            return
        self.swarm_done = reply.swarm_done
        if reply.need_fingerprint and self.fingerprint is not None:
            self._spawn(self.send_fingerprint(), "refingerprint")
        if reply.need_base and self.base_identity is not None and not self._rebasing:
            self._rebasing = True
            self._spawn(self._resend_base(), "rebase")
        if reply.assignment_version != self.assignment_version:
            await self.fetch_assignment()

    async def _resend_base(self) -> None:
        """The bootstrap lost this node's base digest (e.g. its state was wiped): say it again;
        a refusal now (the swarm runs another base) stops the node like one at join."""
        from nodes.base_check import send_base
        from nodes.control import JoinRefused

        try:
            await send_base(self)
        except JoinRefused as exc:
            log.error("%s", exc)
            self.refused = exc
            if self._main is not None:
                self._main.cancel()
        finally:
            self._rebasing = False

    async def fetch_assignment(self) -> None:
        from transport.messages import Assignment, GetAssignment
        from transport.rpc import RpcError

        try:
            a = await self.call(self.config.bootstrap, GetAssignment(node_id=self.node_id))
        except RpcError as exc:
            log.warning("get_assignment failed (%s); will retry", exc)
            return
        if isinstance(a, Assignment):  # the bootstrap is the authority (a restarted one counts from 0 again)
            changed = self.assignment is None or a.version != self.assignment.version
            self.assignment, self.assignment_version = a, a.version
            if changed:
                log.info("assignment v%d: role %s, cluster %s, split %s, helper %s, anchor %s, serves %s (%s)",
                         a.version, a.role, a.cluster, a.split, a.helper, a.anchor, a.serves, a.reason)
            self._assigned.set()

    async def send_fingerprint(self) -> None:
        from transport.messages import Fingerprint
        from transport.rpc import RpcError

        body = Fingerprint(node_id=self.node_id, vector=self.fingerprint, n_samples=len(self.encoded))
        for attempt in range(10):
            try:
                await self.call(self.config.bootstrap, body)
                self.need_fingerprint = False
                return
            except RpcError as exc:
                log.warning("fingerprint not accepted (%s); retrying", exc)
                await asyncio.sleep(min(2.0, 0.2 * (attempt + 1)))

    async def compute_fingerprint(self) -> Any:
        """This node's fingerprint (nodes/fingerprinting.py): across a cut through the provisional
        helper its first assignment names, else on the whole model here. A helper that fails is
        asked again after a fresh assignment; after 3 failures the node computes it alone."""
        from nodes.fingerprinting import split_loss
        from transport.rpc import RpcError

        w, t = self.welcome, self.train
        job = functools.partial(node_fingerprint, self.base_model, self.encoded, w.fingerprint_seed,
                                w.fingerprint_samples, t.batch_size, t.step_delay_s)
        peak = PeakRss()
        for attempt in range(3):
            await self.fetch_assignment()
            a = self.assignment
            address = self.address_of(a.helper) if a is not None and a.cluster is None and a.split else None
            if address is None:
                break
            log.info("fingerprint across a cut: blocks[:%d] here, the rest on provisional helper %d", a.split, a.helper)
            try:
                vector = await self.executor.run(job, loss_fn=split_loss(a.split, self.split_mode,
                                                                         self._blocking_call(address), self.node_id))
                self.peaks["fingerprint"] = peak.read_mb()
                return vector
            except (RpcError, ValueError) as exc:
                log.warning("fingerprint through helper %d failed (%s); asking again", a.helper, exc)
                await asyncio.sleep(1.0 + attempt)
        vector = await self.executor.run(job)
        self.peaks["fingerprint"] = peak.read_mb()
        return vector

    def _blocking_call(self, address: str, timeout: float = 30.0):
        """`call` for code in the executor thread: waits on the event loop, other nodes' torch jobs run meanwhile."""
        from nodes.executor import torch_lock_released

        loop = asyncio.get_running_loop()

        def call(body: Any) -> Any:
            future = asyncio.run_coroutine_threadsafe(self.call(address, body, timeout=timeout), loop)
            with torch_lock_released():
                return future.result()

        return call

    async def report_helper(self, helper: int, why: str) -> None:
        from transport.messages import Report
        from transport.rpc import RpcError

        self.repairs.append({"time": time.time(), "round": self.session.round, "helper": helper, "why": why})
        log.warning("round %d: helper %s failed (%s); reporting it", self.session.round, helper, why)
        try:
            await self.call(self.config.bootstrap, Report(node_id=self.node_id,
                                                          metrics={"event": "helper_failed", "helper": helper,
                                                                   "why": why[:200]}))
        except RpcError as exc:
            log.warning("report not delivered (%s)", exc)

    async def wait_assignment(self, predicate, what: str) -> Any:
        """Wait until the current assignment satisfies `predicate` (refetching now and then)."""
        last_fetch = time.monotonic()
        while True:
            a = self.assignment
            if a is not None and predicate(a):
                return a
            self._assigned.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._assigned.wait(), timeout=1.0)
            if time.monotonic() - last_fetch > 2.0:
                last_fetch = time.monotonic()
                await self.fetch_assignment()
                log.debug("still waiting for %s", what)

    # ---- lifecycle -------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> dict[str, Any]:
        from transport.rpc import RpcClient, RpcServer, RpcServerConfig

        host, port = parse_address(self.config.bind, allow_port_zero=True, what="bind")
        link = self.link_profile()
        handlers = {"ping": self.rpc_ping, **self.helper.handlers(), "contribution": self.rpc_contribution,
                    "contribution_get": self.rpc_contribution_get, "manifest_get": self.rpc_manifest_get,
                    "patches_get": self.rpc_patches_get}
        self.server = await RpcServer.create(host, port, handlers,
                                             config=RpcServerConfig(name="node", max_bytes=MAX_MESSAGE_BYTES),
                                             link=link)
        interrupted = False
        try:
            self.client = await RpcClient.create(f"node-{uuid.uuid4().hex[:12]}", link=link)
            address = advertised_address(f"{host}:{self.server.port}", self.config.bootstrap, self.config.advertise)
            self.control = await ControlClient.create(self.config, address, client=self.client,
                                                      progress=self.progress, on_heartbeat_reply=self.on_beat)
            main = self._main = asyncio.create_task(self._lifecycle(), name="lifecycle")
            stopper = asyncio.create_task(stop.wait())
            watched = asyncio.create_task(self.control.wait_done())
            done, _ = await asyncio.wait({main, stopper, watched}, return_when=asyncio.FIRST_COMPLETED)
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
            await self._shutdown(interrupted)
        return self.summary()

    async def _shutdown(self, interrupted: bool) -> None:
        from transport.messages import Leave
        from transport.rpc import RpcError

        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self.session is not None and self.out is not None:
            with contextlib.suppress(Exception):
                await self.executor.run(self.save_checkpoint)
        if self.out is not None:
            with contextlib.suppress(Exception):
                write_json_atomic(self.out / "summary.json", self.summary())
        if self.control is not None:
            if self.node_id is not None and self.control.welcome is not None:
                reason = "done" if self.finished or (self.encoded is None and self.swarm_done) else "shutdown"
                try:
                    await self.client.call(self.config.bootstrap, Leave(node_id=self.node_id, reason=reason),
                                           timeout=self.config.leave_timeout_s)
                    log.info("left the swarm (%s)", reason)
                except RpcError as exc:
                    log.warning("leave not acknowledged (%s)", exc)
            await self.control.stop(leave=False)
        if self.client is not None:
            await self.client.stop()
        if self.server is not None:
            await self.server.stop()
        self.executor.shutdown()

    async def _lifecycle(self) -> None:
        from nodes.checkpoint import load_checkpoint
        from nodes.base_check import settle_base
        from nodes.modelname import build_model, build_tokenizer

        welcome = await self.control.wait_joined()
        self.node_id, self.welcome = welcome.node_id, welcome
        if self.config.model and welcome.model and self.config.model != welcome.model:
            raise RuntimeFailure(f"--model {self.config.model} disagrees with the swarm's model {welcome.model}")
        name = welcome.model or self.config.model or "tiny-gpt2"
        self.task = "seq_cls" if welcome.model_task in ("seq_cls", "classification") else "causal_lm"
        self.num_labels = welcome.num_labels
        self.split_mode = welcome.split_mode or "two-part"  # the swarm's, set by the bootstrap
        if self.train.split_mode is not None and self.train.split_mode != self.split_mode:
            raise RuntimeFailure(f"--split-mode {self.train.split_mode} disagrees with the swarm's split mode "
                                 f"{self.split_mode}")
        self.tokenizer = await self.executor.run(build_tokenizer, name)
        self.base_model = await self.executor.run(build_model, name, self.task, self.num_labels, self.train.device,
                                                  welcome.init_seed)
        log.info("node %d runs %s (%s%s)", self.node_id, name, self.task,
                 f", {self.num_labels} labels" if self.num_labels else "")
        await settle_base(self, name)  # one base per swarm: refused (JoinRefused) when the swarm runs another
        if self.config.data is None:
            self.state = "waiting"
            self._spawn(self._merge_loop(), "merge-loop")
            peak = PeakRss()
            await self._serve_until_done()
            self.peaks["serve"] = peak.read_mb()
            self.finished = True  # a helper's job ends with the swarm
            return
        self._resume = await self.executor.run(load_checkpoint, self.out)
        if self._resume is not None:
            log.info("resuming from checkpoint (round %s, version %d)", self._resume.state.get("round"),
                     self._resume.base.version)
            for key in ("contributions", "manifests", "repairs"):
                setattr(self, key, list(self._resume.state.get(key, [])))
            self.rounds_done = int(self._resume.state.get("rounds_done", 0))
            self.steps_total = int(self._resume.state.get("steps_total", 0))
        self.state = "fingerprinting"
        self.encoded = await self._load_data(self.config.data)
        if self.train.eval_path is not None:
            self.eval_encoded = await self._load_data(self.train.eval_path)
        self.fingerprint = await self.compute_fingerprint()
        await self.send_fingerprint()
        self.state = "waiting"
        self._spawn(self._merge_loop(), "merge-loop")
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
            return await self.executor.run(load_for_task, path, self.tokenizer, self.task, self.num_labels,
                                           self.train.max_seq_len)
        except TaskMismatch as exc:
            raise RuntimeFailure(f"--data {exc}") from None

    async def _serve_until_done(self, follow: bool = False) -> bool:
        """Serve peers until the bootstrap says the swarm is done; True if more patches were folded."""
        folded = False
        while not self.swarm_done:
            await asyncio.sleep(self.train.poll_s * 5)
            if follow:
                try:
                    folded = await self._follow() or folded
                except Exception:  # a bad manifest must not end serving
                    log.exception("following the cluster failed")
        log.info("the swarm is done")
        return folded

    # ---- sessions --------------------------------------------------------------------------
    def _build_session(self, a: Any):
        """A fresh OwnerSession for assignment `a`, on this node's folded base (runs in the executor)."""
        from atlas_p2p.lora import attach_lora
        from atlas_p2p.training import OwnerConfig, OwnerSession, apply_to_model
        from atlas_p2p.versioning import VersionedBase

        key = str(a.cluster)
        old = self.session
        base, pending = None, None
        if old is not None and old.base.cluster == key:
            base, pending = old.base, old.pending
        elif self._resume is not None and self._resume.base.cluster == key:
            base, pending = self._resume.base, self._resume.pending
        if base is None:
            base = VersionedBase(key)
        model = attach_lora(copy.deepcopy(self.base_model), {n: int(r) for n, r in a.ranks.items()})
        if len(base):
            apply_to_model(model, base.folded_delta())
        config = OwnerConfig(node_id=self.node_id, split=int(a.split), lr=self.train.lr,
                             run_seed=int(self.welcome.fingerprint_seed), mode=self.split_mode, cluster=key)
        session = OwnerSession(model, config, base=base)
        session.pending = pending
        session.start_round(base.version)
        return session

    async def _ensure_session(self, a: Any) -> None:
        key = (a.cluster, a.split, tuple(sorted(a.ranks.items())))
        if self.session is None or key != self._plan_key:
            if self.session is not None:
                log.info("assignment changed the plan (cluster/split/ranks): new adapters")
            self.session = await self.executor.run(self._build_session, a)
            self._plan_key = key
            self._resume = None
            await self.catch_up()
        helper = a.helper if a.role == "owner" else None
        self.runner = OwnerRunner(self, self.session, a.cluster, helper, self.address_of(helper), dict(a.ranks))

    # ---- catch-up ----------------------------------------------------------------------------
    async def fetch_patches(self, cluster: int, since: int) -> list:
        """Patches after `since` from the anchor of `cluster` (or this node's own log)."""
        from nodes.wireconv import records_from_msg
        from transport.messages import Patches, PatchesGet
        from transport.rpc import RpcError

        log_ = self.anchor_logs.get(cluster)
        if log_ is not None and log_.base.version > since:
            return log_.patches_since(since)
        anchor = self._anchor_of(cluster)
        address = self.address_of(anchor)
        if anchor is None or anchor == self.node_id or address is None:
            return []
        reply = await self.call(address, PatchesGet(cluster=cluster, since=since))
        if not isinstance(reply, Patches):
            raise RpcError("bad_reply", "patches_get answered with another type")
        return await self.executor.run(records_from_msg, reply)

    def _anchor_of(self, cluster: int) -> int | None:
        a = self.assignment
        if a is None:
            return None
        if a.cluster == cluster:
            return a.anchor
        for o in a.owners:
            if o.get("cluster") == cluster:
                return o.get("anchor")
        return None

    async def catch_up(self) -> None:
        """Fold every patch the cluster's anchor has beyond this node's version."""
        from transport.rpc import RpcError

        s = self.session
        try:
            records = await self.fetch_patches(self.cluster, s.version)
        except (RpcError, ValueError) as exc:
            log.warning("catch-up from the anchor failed (%s)", exc)
            return
        for r in records:
            if r.version <= s.version:
                continue
            await self.executor.run(s.fold, r.patch, version=r.version, digest=r.digest, chain=r.chain,
                                    discard_round=True)
            self.manifests.append({"round": r.patch.round, "version": r.version, "digest": r.digest,
                                   "nodes": sorted(r.patch.weights), "via": "catch-up"})
        if records:
            log.info("caught up to base version %d", s.version)

    # ---- training rounds -------------------------------------------------------------------
    def _trainable(self, a: Any) -> bool:
        if a.role == "whole":
            return a.cluster is not None and a.split is not None
        return a.role == "owner" and a.helper is not None and self.address_of(a.helper) is not None

    async def _train_rounds(self) -> None:
        R = self.train.rounds
        while True:
            a = await self.wait_assignment(self._trainable, "a trainable assignment")
            await self._ensure_session(a)
            s = self.session
            if s.round >= R:
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
                await self.wait_assignment(lambda x: not (x.role == "owner" and x.helper == old), "a new helper")
                continue
            except VersionBehind as exc:
                log.info("round %d: %s; catching up", r, exc)
                await self.catch_up()
                continue
            await self._merge(result)
        while self.session.pending is not None:
            await self._carry_round()
        log.info("all %d rounds done (base version %d)", R, self.session.version)

    async def _carry_round(self) -> None:
        """After the last round: merge a contribution that missed its manifest on its own.

        It becomes this node's contribution to the next round of the cluster; the anchor
        publishes that round at its deadline, and finished members still fold it (`_follow`).
        """
        from atlas_p2p.aggregation import Contribution

        s = self.session
        p = s.pending
        c = Contribution(p.factors, p.n_samples, p.node_id, s.round, p.dense)
        log.info("round %d: merging the contribution that missed the last manifest", s.round)
        self.state = "merging"
        self.contributions.append({"round": c.round, "digest": c.digest, "n_samples": c.n_samples, "carry": True})
        self.store.add(self.cluster, c, time.time())
        await self._push(c)
        before = s.version
        while s.version == before:
            manifest = await self._wait_manifest(c.round, c)
            if manifest is not None:
                await self._fold(manifest)
            else:
                await self.catch_up()
            if s.version == before:
                await asyncio.sleep(self.train.poll_s * 10)
        if self.manifests and str(self.node_id) in self.manifests[-1].get("nodes", []):
            s.pending = None
        await self.executor.run(self.save_checkpoint)

    async def _follow(self) -> bool:
        """A finished member folds rounds its cluster still publishes (others' carry rounds)."""
        from transport.messages import Manifest, ManifestGet
        from transport.rpc import RpcError

        s, a = self.session, self.assignment
        if s is None or a is None or a.cluster is None:
            return False
        before = s.version
        if a.anchor == self.node_id:
            alog = self.anchor_logs.get(a.cluster)
            if alog is not None and s.round in alog.manifests:
                await self._fold(alog.manifests[s.round].to_msg())
        elif a.anchor is not None and self.address_of(a.anchor) is not None:
            try:
                m = await self.call(self.address_of(a.anchor), ManifestGet(cluster=a.cluster, round=s.round))
                if isinstance(m, Manifest) and m.ready:
                    await self._fold(m)
            except RpcError:
                pass
        return s.version > before

    async def _merge(self, result) -> None:
        s = self.session
        c = result.contribution
        r = c.round
        self.state = "merging"
        self.steps_total += result.steps
        self.contributions.append({"round": r, "digest": c.digest, "n_samples": c.n_samples})
        self.store.add(self.cluster, c, time.time())
        await self._push(c)
        before = s.version
        while s.version == before:  # a closed round cannot train again: wait until its patch is in
            manifest = await self._wait_manifest(r, c)
            if manifest is not None:
                await self._fold(manifest)
            else:
                await self.catch_up()
            if s.version == before:
                log.warning("round %d: nothing folded yet; asking the anchor again", r)
                await asyncio.sleep(self.train.poll_s * 10)
        self.rounds_done += 1
        self.store.forget_before(self.cluster, r)
        evaluation = None
        if self.eval_encoded is not None:
            evaluation = await self.executor.run(evaluate, s.model, self.eval_encoded, self.task,
                                                 self.train.batch_size)
        folded = [m["digest"] for m in self.manifests if m["round"] == r]
        line = {
            "node_id": self.node_id, "cluster": self.cluster, "round": r, "role": self.assignment.role,
            "loss": result.loss, "eval": evaluation, "steps": result.steps,
            "step_rate": result.steps / result.seconds if result.seconds > 0 else None,
            "bytes_by_kind": self.meter.snapshot(), "base_version": s.version,
            "contributions": [c.digest], "manifests_folded": folded,
            "carried_over": s.pending is not None, "repairs_seen": len(self.repairs),
            "helper": self.runner.helper, "time": time.time(),
        }
        self.metrics.write(line)
        await self.executor.run(self.save_checkpoint)
        b = line["bytes_by_kind"]
        ev = "" if evaluation is None else f" {evaluation['metric']} {evaluation['value']:.4f}"
        progress_log.info(
            "node %d round %d/%d cluster %s: loss %s%s, %.2f steps/s, sent act %s grad %s adapters %s fp %s ctl %s",
            self.node_id, r + 1, self.train.rounds, self.cluster,
            "n/a" if result.loss is None else f"{result.loss:.4f}", ev, line["step_rate"] or 0.0,
            b["activations"], b["gradients"], b["adapters"], b["fingerprints"], b["control"])

    async def _push(self, c) -> None:
        """Send our contribution to the anchor and to `fanout` random members (gossip)."""
        from nodes.wireconv import contribution_to_msg

        body = contribution_to_msg(c, self.cluster, self.node_id)
        anchor = self.assignment.anchor
        targets = set(self._gossip_targets(exclude={self.node_id}))
        if anchor is not None and anchor != self.node_id:
            targets.add(anchor)
        for t in targets:
            self._spawn(self._send_contribution(t, body), f"push-{t}")

    def _gossip_targets(self, exclude: set[int]) -> list[int]:
        members = [m for m in (self.assignment.members if self.assignment else []) if m not in exclude]
        return self.rng.sample(members, min(self.train.fanout, len(members)))

    async def _send_contribution(self, target: int, body: Any) -> None:
        from transport.rpc import RpcError

        address = self.address_of(target)
        if address is None:
            return
        try:
            await self.call(address, body, timeout=CONTROL_TIMEOUT_S)
        except RpcError as exc:
            log.debug("contribution to node %d not delivered (%s)", target, exc)

    async def _wait_manifest(self, r: int, c) -> Any:
        """Round r's manifest from the cluster's anchor (re-pushing `c` if the anchor changes)."""
        from nodes.wireconv import contribution_to_msg
        from transport.messages import Manifest, ManifestGet
        from transport.rpc import RpcError

        anchor = self.assignment.anchor
        while True:
            a = self.assignment
            if a.anchor != anchor:
                anchor = a.anchor
                log.info("cluster %s: anchor is now node %s; re-sending contribution", a.cluster, anchor)
                if anchor is not None and anchor != self.node_id:
                    self._spawn(self._send_contribution(anchor, contribution_to_msg(c, a.cluster, self.node_id)),
                                "repush")
            if anchor == self.node_id:
                info = self.anchor_logs.get(a.cluster)
                if info is not None and r in info.manifests:
                    return info.manifests[r].to_msg()
                if info is not None and info.next_round > r:
                    return None  # published before this node became anchor: catch up instead
            elif anchor is not None and self.address_of(anchor) is not None:
                try:
                    m = await self.call(self.address_of(anchor), ManifestGet(cluster=a.cluster, round=r))
                    if isinstance(m, Manifest) and m.ready:
                        return m
                except RpcError as exc:
                    if exc.code == "too_old":
                        return None
                    log.debug("manifest of round %d not available from node %s (%s)", r, anchor, exc)
            await asyncio.sleep(self.train.poll_s)

    async def _fold(self, m) -> None:
        from nodes.wireconv import contribution_from_msg
        from transport.messages import ContributionGet, ContributionMsg
        from transport.rpc import RpcError

        s = self.session
        if m.version <= s.version:
            return
        if m.version != s.version + 1:
            await self.catch_up()
            return
        contributions = []
        for d in m.digests:
            c = self.store.get(d)
            if c is None:
                address = self.address_of(self.assignment.anchor)
                try:
                    reply = await self.call(address, ContributionGet(cluster=m.cluster, digest=d))
                    if not isinstance(reply, ContributionMsg):
                        raise ValueError("contribution_get answered with another type")
                    c = await self.executor.run(contribution_from_msg, reply)
                except (RpcError, ValueError) as exc:
                    log.warning("cannot fetch contribution %s (%s); catching up instead", d[:12], exc)
                    await self.catch_up()
                    return
            contributions.append(c)
        patch = await self.executor.run(merge_manifest, m, contributions)
        await self.executor.run(s.fold, patch, version=m.version, digest=m.patch_digest, chain=m.chain)
        self.manifests.append({"round": m.round, "version": m.version, "digest": m.patch_digest,
                               "nodes": sorted(patch.weights), "contributions": list(m.digests), "via": "manifest"})

    # ---- the anchor ----------------------------------------------------------------------------
    async def _merge_loop(self) -> None:
        """While this node anchors its cluster: publish each round's manifest when due."""
        while True:
            await asyncio.sleep(self.train.poll_s)
            try:
                await self._anchor_step()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the anchor loop die silently
                log.exception("anchor step failed")

    async def _anchor_step(self) -> None:
        a, s = self.assignment, self.session
        if a is None or s is None or a.anchor != self.node_id or a.cluster is None:
            return
        cluster = a.cluster
        alog = self.anchor_logs.get(cluster)
        if alog is None:
            alog = await self.executor.run(AnchorLog.from_base, cluster, s.base)
            self.anchor_logs[cluster] = alog
            log.info("node %d anchors cluster %d from version %d", self.node_id, cluster, alog.base.version)
        await self.executor.run(alog.sync_from, s.base)
        r = alog.next_round
        held = self.store.of_round(cluster, r)
        expected = {str(m) for m in a.members}
        if alog.due(held, expected, self.store.first_seen.get((cluster, r)), time.time(),
                    self.train.round_deadline_s):
            await self.executor.run(alog.publish, held)

    # ---- peer-to-peer handlers ------------------------------------------------------------------
    async def rpc_ping(self, env: Any) -> None:
        return None

    async def rpc_contribution(self, env: Any) -> None:
        from nodes.wireconv import contribution_from_msg
        from transport.rpc import RpcError

        b = env.body
        if self.cluster is None or b.cluster != self.cluster:
            raise RpcError("wrong_cluster", f"node {self.node_id} is not in cluster {b.cluster}")
        try:
            c = await self.executor.run(contribution_from_msg, b)
        except ValueError as exc:
            raise RpcError("bad_request", str(exc)) from None
        if self.store.add(b.cluster, c, time.time()):
            from dataclasses import replace

            fwd = replace(b, sender=self.node_id)
            for t in self._gossip_targets(exclude={self.node_id, b.sender, b.node_id}):
                self._spawn(self._send_contribution(t, fwd), f"gossip-{t}")

    async def rpc_contribution_get(self, env: Any) -> Any:
        from nodes.wireconv import contribution_to_msg
        from transport.rpc import RpcError

        c = self.store.get(env.body.digest)
        if c is None:
            raise RpcError("not_found", f"no contribution {env.body.digest[:12]} here")
        return contribution_to_msg(c, env.body.cluster, self.node_id or 0)

    async def rpc_manifest_get(self, env: Any) -> Any:
        from transport.messages import Manifest
        from transport.rpc import RpcError

        b = env.body
        alog = self.anchor_logs.get(b.cluster)
        if alog is not None and b.round in alog.manifests:
            return alog.manifests[b.round].to_msg()
        if alog is not None and b.round < alog.next_round:
            raise RpcError("too_old", f"round {b.round} was published before node {self.node_id} anchored; catch up")
        if self.assignment is not None and self.assignment.anchor == self.node_id and self.cluster == b.cluster:
            return Manifest(cluster=b.cluster, round=b.round, ready=False)
        raise RpcError("not_anchor", f"node {self.node_id} does not anchor cluster {b.cluster}")

    async def rpc_patches_get(self, env: Any) -> Any:
        from nodes.wireconv import records_to_msg
        from transport.rpc import RpcError

        b = env.body
        alog = self.anchor_logs.get(b.cluster)
        base = alog.base if alog is not None else (
            self.session.base if self.session is not None and self.cluster == b.cluster else None)
        if base is None:
            raise RpcError("not_found", f"node {self.node_id} holds no log of cluster {b.cluster}")
        try:
            records = base.missing_since(b.since)
        except ValueError as exc:
            raise RpcError("bad_request", str(exc)) from None
        reply = records_to_msg(b.cluster, records)
        self.meter.count(reply)
        return reply

    # ---- results -----------------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        from nodes.checkpoint import save_checkpoint

        s = self.session
        state = {"node_id": self.node_id, "cluster": self.cluster, "round": s.round, "base_version": s.version,
                 "rounds_done": self.rounds_done, "steps_total": self.steps_total,
                 "contributions": self.contributions, "manifests": self.manifests, "repairs": self.repairs}
        save_checkpoint(self.out, state, s.base, s.pending)

    def _adapter_card(self) -> Any:
        """The model card of the exported adapter: the swarm's base, this cluster, eval by round."""
        import json

        from atlas_p2p.training import AdapterCard, RoundEval
        from nodes.runtime_config import EMBEDDED_MODELS

        name = self.welcome.model or self.config.model or "tiny-gpt2"
        evals = {}
        if self.metrics is not None and self.metrics.path.is_file():
            for text in self.metrics.path.read_text(encoding="utf-8").splitlines():
                line = json.loads(text)
                if line.get("eval"):  # a resumed node's file may repeat a round: the last line wins
                    evals[line["round"]] = RoundEval(line["round"], line["eval"]["metric"], line["eval"]["value"])
        id2label = dict(getattr(self.base_model.config, "id2label", None) or {})
        names = tuple(str(id2label.get(i, "")) for i in range(self.num_labels or 0))
        if not all(names) or names == tuple(f"LABEL_{i}" for i in range(len(names))):
            names = ()  # transformers' placeholders say nothing
        code = None
        if name in EMBEDDED_MODELS:
            code = (f"from nodes.modelname import build_model  # ATLAS's embedded model\n"
                    f"base = build_model({name!r}, {self.task!r}, {self.num_labels!r})")
        a = self.assignment
        return AdapterCard(base_model=name, task=self.task, num_labels=self.num_labels, label_names=names,
                           cluster=None if a is None else str(a.cluster), members=tuple(a.members) if a else (),
                           rounds=self.rounds_done, node_id=self.node_id, evals=tuple(evals[r] for r in sorted(evals)),
                           base_code=code)

    def _eval_batches(self) -> list:
        return [] if self.eval_encoded is None else eval_batches(self.eval_encoded, self.train.batch_size)

    async def _finish(self) -> None:
        """Export the cluster's adapter (exact unless --export-rank) and, with --eval, check it loads
        with stock peft and predicts as this node's model does (export.json and summary.json)."""
        from atlas_p2p.training import export_adapter

        path = self.out / "adapter"
        try:
            batches = await self.executor.run(self._eval_batches)
            report = await self.executor.run(export_adapter, self.base_model, self.session.base, path,
                                             self.train.export_rank, card=self._adapter_card(),
                                             reference=self.session.model if batches else None, eval_batches=batches)
            self.export = {"path": str(path), **report.summary(), "error": None}
        except (ValueError, OSError, RuntimeError) as exc:  # a failed export or check must not kill the node
            self.export = {"path": None, "error": str(exc)}
            log.warning("adapter not exported: %s", exc)
        self.finished = True
        write_json_atomic(self.out / "summary.json", self.summary())
        log.info("finished: adapter in %s", path if self.export.get("path") else "(none)")

    def summary(self) -> dict[str, Any]:
        a = self.assignment
        return {
            "node_id": self.node_id, "finished": self.finished, "rounds_done": self.rounds_done,
            "rounds": self.train.rounds, "cluster": None if a is None else a.cluster,
            "role": None if a is None else a.role, "has_data": self.config.data is not None,
            "split": None if a is None else a.split, "ranks": {} if a is None else dict(a.ranks),
            "helper": None if a is None else a.helper,
            "adapter_dir": None if self.export is None else self.export.get("path"),
            "export": self.export, "export_error": None if self.export is None else self.export.get("error"),
            "base_version": None if self.session is None else self.session.version,
            "contributions": self.contributions, "manifests_folded": self.manifests, "repairs": self.repairs,
            "split_mode": self.split_mode, "steps_served": self.helper.steps_served,
            "requests_served": dict(self.helper.requests), "labels_received": self.helper.labels_received,
            "bytes_by_kind": self.meter.snapshot(), "peak_rss_mb": dict(self.peaks),
            "base_digest": None if self.base_identity is None else self.base_identity["digest"],
        }


async def run_peer(config: NodeConfig, train: TrainConfig, stop: asyncio.Event) -> dict[str, Any]:
    """The whole life of one node (the CLI's `join`)."""
    return await Peer(config, train).run(stop)
