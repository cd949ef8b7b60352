"""The cluster merge protocol of one node (docs/RUNTIME.md, "Rounds" and "Consistency").

`ClusterSync` is the async shell around nodes/merge.py's bookkeeping:

- gossip: `contribute(c)` keeps this node's contribution, pushes it to the anchor and to
  `fanout` random members; a node forwards a contribution it has not seen before
  (`rpc_contribution`), so gossip ends;
- the anchor: while the assignment names this node anchor of its cluster, a loop
  publishes each round's manifest when due (every member contributed, or the round
  deadline after the first contribution passed);
- folding: `contribute` then waits until the session's base version moves, in ONE loop:
  ask for the round's manifest (`_manifest`, the one manifest fetch: from this node's own
  anchor log, or `manifest_get` to the anchor, re-pushing the contribution when the anchor
  changes), rebuild its patch from the contributions (pulling missing ones by digest) and
  fold it; when the anchor says the round is older than its log, or a contribution cannot
  be had, `catch_up` folds the anchor's patches instead;
- `follow`: a finished member folds rounds its cluster still publishes (carry rounds);
- `fetch_patches`: the patches of a cluster after a version (catch-up, and the helper's
  lazy fold of a replica).

Handlers: `contribution`, `contribution_get`, `manifest_get`, `patches_get`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import replace

from atlas_p2p.aggregation import Contribution
from atlas_p2p.records import FoldedRecord
from atlas_p2p.training import OwnerSession
from atlas_p2p.versioning import PatchRecord
from nodes.collaborators import AssignmentSource, Link, LocalNode, TaskSet
from nodes.config import TrainConfig
from nodes.executor import TorchExecutor
from nodes.merge import AnchorLog, GossipStore, merge_manifest
from nodes.wireconv import contribution_from_msg, contribution_to_msg, records_from_msg, records_to_msg
from transport.messages import (
    Assignment,
    ContributionGet,
    ContributionMsg,
    Envelope,
    Manifest,
    ManifestGet,
    Patches,
    PatchesGet,
)
from transport.rpc import Handler, RpcError

log = logging.getLogger("atlas.peer")

RETRY_POLLS = 10  # a round with nothing folded is asked again after this many polls


class ClusterSync:
    """Gossip, anchor, manifests and catch-up of this node's cluster (module doc)."""

    def __init__(
        self, link: Link, executor: TorchExecutor, assignments: AssignmentSource, local: LocalNode, config: TrainConfig
    ) -> None:
        self.link = link
        self.executor = executor
        self.assignments = assignments
        self.local = local
        self.config = config  # poll_s, fanout, round_deadline_s
        self.store = GossipStore()
        self.anchor_logs: dict[int, AnchorLog] = {}
        self.session: OwnerSession | None = None  # the node's training session (set by the lifecycle)
        self.folded: list[FoldedRecord] = []  # one record per patch folded (summary "manifests_folded")
        self.rng = random.Random()
        self._tasks = TaskSet()

    def handlers(self) -> dict[str, Handler]:
        return {
            "contribution": self.rpc_contribution,
            "contribution_get": self.rpc_contribution_get,
            "manifest_get": self.rpc_manifest_get,
            "patches_get": self.rpc_patches_get,
        }

    def start(self) -> None:
        """Run the anchor loop (it acts only while the assignment names this node anchor)."""
        self._tasks.spawn(self._anchor_loop(), "merge-loop")

    async def stop(self) -> None:
        await self._tasks.cancel_all()

    @property
    def cluster(self) -> int | None:
        a = self.assignments.assignment
        return None if a is None else a.cluster

    # ---- a member's round ------------------------------------------------------------------
    async def contribute(self, c: Contribution) -> None:
        """Gossip `c` (this node's contribution to round c.round), then fold until the base version moves."""
        s = self.session
        self.store.add(self.cluster, c, time.time())
        await self._push(c)
        before = s.version
        while s.version == before:  # a closed round cannot train again: wait until its patch is in
            manifest = await self._wait_manifest(c.round, c)
            if manifest is not None:
                await self._fold(manifest)
            else:
                await self.catch_up()
            if s.version == before:
                log.warning("round %d: nothing folded yet; asking the anchor again", c.round)
                await asyncio.sleep(self.config.poll_s * RETRY_POLLS)

    def forget_before(self, round_: int) -> None:
        """Drop held contributions of rounds before `round_` (they are folded)."""
        self.store.forget_before(self.cluster, round_)

    async def follow(self) -> bool:
        """A finished member folds rounds its cluster still publishes (others' carry rounds)."""
        s, a = self.session, self.assignments.assignment
        if s is None or a is None or a.cluster is None:
            return False
        before = s.version
        manifest, _ = await self._manifest(a, s.round)
        if manifest is not None:
            await self._fold(manifest)
        return s.version > before

    async def _push(self, c: Contribution) -> None:
        """Send our contribution to the anchor and to `fanout` random members (gossip)."""
        body = contribution_to_msg(c, self.cluster, self.local.node_id)
        anchor = self.assignments.assignment.anchor
        targets = set(self._gossip_targets(exclude={self.local.node_id}))
        if anchor is not None and anchor != self.local.node_id:
            targets.add(anchor)
        for t in targets:
            self._tasks.spawn(self._send_contribution(t, body), f"push-{t}")

    def _gossip_targets(self, exclude: set[int | None]) -> list[int]:
        a = self.assignments.assignment
        members = [m for m in (a.members if a else []) if m not in exclude]
        return self.rng.sample(members, min(self.config.fanout, len(members)))

    async def _send_contribution(self, target: int, body: ContributionMsg) -> None:
        address = self.assignments.address_of(target)
        if address is None:
            return
        try:
            await self.link.call(address, body)
        except RpcError as exc:
            log.debug("contribution to node %d not delivered (%s)", target, exc)

    async def _manifest(self, a: Assignment, r: int) -> tuple[Manifest | None, bool]:
        """One ask for round r's manifest from the cluster's anchor: (the ready manifest or None,
        whether the anchor published r before it anchored, so only catching up can help)."""
        me = self.local.node_id
        if a.anchor == me:
            alog = self.anchor_logs.get(a.cluster)
            if alog is not None and r in alog.manifests:
                return alog.manifests[r].to_msg(), False
            return None, alog is not None and alog.next_round > r
        address = self.assignments.address_of(a.anchor)
        if address is None:
            return None, False
        try:
            m = await self.link.call(address, ManifestGet(cluster=a.cluster, round=r))
        except RpcError as exc:
            if exc.code == "too_old":
                return None, True
            log.debug("manifest of round %d not available from node %s (%s)", r, a.anchor, exc)
            return None, False
        return (m if isinstance(m, Manifest) and m.ready else None), False

    async def _wait_manifest(self, r: int, c: Contribution) -> Manifest | None:
        """Round r's manifest (re-pushing `c` if the anchor changes); None: catch up instead."""
        anchor = self.assignments.assignment.anchor
        while True:
            a = self.assignments.assignment
            if a.anchor != anchor:
                anchor = a.anchor
                log.info("cluster %s: anchor is now node %s; re-sending contribution", a.cluster, anchor)
                if anchor is not None and anchor != self.local.node_id:
                    body = contribution_to_msg(c, a.cluster, self.local.node_id)
                    self._tasks.spawn(self._send_contribution(anchor, body), "repush")
            manifest, behind = await self._manifest(a, r)
            if manifest is not None or behind:
                return manifest
            await asyncio.sleep(self.config.poll_s)

    async def _fold(self, m: Manifest) -> None:
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
                address = self.assignments.address_of(self.assignments.assignment.anchor)
                try:
                    reply = await self.link.call(address, ContributionGet(cluster=m.cluster, digest=d))
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
        self.folded.append(
            FoldedRecord(m.round, m.version, m.patch_digest, tuple(sorted(patch.weights)), "manifest", tuple(m.digests))
        )

    # ---- catch-up ----------------------------------------------------------------------------
    async def fetch_patches(self, cluster: int, since: int, prefer: int | None = None) -> list[PatchRecord]:
        """Patches after `since` from this node's own log, else from `prefer` (a member known to
        hold them: the owner a helper serves, alive since it is asking), else from the anchor of
        `cluster` (which may have died with the patches still on every member)."""
        alog = self.anchor_logs.get(cluster)
        if alog is not None and alog.base.version > since:
            return alog.patches_since(since)
        if prefer is not None and prefer != self.local.node_id:
            try:
                records = await self._patches_from(prefer, cluster, since)
            except (RpcError, ValueError) as exc:
                log.info("patches of cluster %d from node %d failed (%s); asking the anchor", cluster, prefer, exc)
            else:
                if records:
                    return records
        anchor = self.assignments.anchor_of(cluster)
        if anchor is None or anchor == self.local.node_id:
            return []
        return await self._patches_from(anchor, cluster, since)

    async def _patches_from(self, node: int, cluster: int, since: int) -> list[PatchRecord]:
        address = self.assignments.address_of(node)
        if address is None:
            return []
        reply = await self.link.call(address, PatchesGet(cluster=cluster, since=since))
        if not isinstance(reply, Patches) or reply.cluster != cluster:
            raise RpcError("bad_reply", f"patches_get for cluster {cluster} answered with another type or cluster")
        return await self.executor.run(records_from_msg, reply)

    async def catch_up(self) -> None:
        """Fold every patch the cluster's anchor has beyond this node's version."""
        s = self.session
        try:
            records = await self.fetch_patches(self.cluster, s.version)
        except (RpcError, ValueError) as exc:
            log.warning("catch-up from the anchor failed (%s)", exc)
            return
        for r in records:
            if r.version <= s.version:
                continue
            await self.executor.run(
                s.fold, r.patch, version=r.version, digest=r.digest, chain=r.chain, discard_round=True
            )
            self.folded.append(
                FoldedRecord(r.patch.round, r.version, r.digest, tuple(sorted(r.patch.weights)), "catch-up")
            )
        if records:
            log.info("caught up to base version %d", s.version)

    # ---- the anchor ----------------------------------------------------------------------------
    async def _anchor_loop(self) -> None:
        """While this node anchors its cluster: publish each round's manifest when due."""
        while True:
            await asyncio.sleep(self.config.poll_s)
            try:
                await self._anchor_step()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let the anchor loop die silently
                log.exception("anchor step failed")

    async def _anchor_step(self) -> None:
        a, s = self.assignments.assignment, self.session
        if a is None or s is None or a.anchor != self.local.node_id or a.cluster is None:
            return
        cluster = a.cluster
        alog = self.anchor_logs.get(cluster)
        if alog is None:
            alog = await self.executor.run(AnchorLog.from_base, cluster, s.base)
            self.anchor_logs[cluster] = alog
            log.info("node %d anchors cluster %d from version %d", self.local.node_id, cluster, alog.base.version)
        await self.executor.run(alog.sync_from, s.base)
        r = alog.next_round
        held = self.store.of_round(cluster, r)
        expected = {str(m) for m in a.members}
        if alog.due(held, expected, self.store.first_seen.get((cluster, r)), time.time(), self.config.round_deadline_s):
            await self.executor.run(alog.publish, held)

    # ---- handlers ------------------------------------------------------------------------------
    async def rpc_contribution(self, env: Envelope) -> None:
        b = env.body
        await self.assignments.require_caller(env, b.sender)  # the copy's sender, as it states
        if self.cluster is None or b.cluster != self.cluster:
            raise RpcError("wrong_cluster", f"node {self.local.node_id} is not in cluster {b.cluster}")
        try:
            c = await self.executor.run(contribution_from_msg, b)
        except ValueError as exc:
            raise RpcError("bad_request", str(exc)) from None
        if self.store.add(b.cluster, c, time.time()):
            fwd = replace(b, sender=self.local.node_id)
            for t in self._gossip_targets(exclude={self.local.node_id, b.sender, b.node_id}):
                self._tasks.spawn(self._send_contribution(t, fwd), f"gossip-{t}")

    async def rpc_contribution_get(self, env: Envelope) -> ContributionMsg:
        await self.assignments.require_caller(env)
        c = self.store.get(env.body.digest)
        if c is None:
            raise RpcError("not_found", f"no contribution {env.body.digest[:12]} here")
        return contribution_to_msg(c, env.body.cluster, self.local.node_id or 0)

    async def rpc_manifest_get(self, env: Envelope) -> Manifest:
        b = env.body
        await self.assignments.require_caller(env)
        me = self.local.node_id
        alog = self.anchor_logs.get(b.cluster)
        if alog is not None and b.round in alog.manifests:
            return alog.manifests[b.round].to_msg()
        if alog is not None and b.round < alog.next_round:
            raise RpcError("too_old", f"round {b.round} was published before node {me} anchored; catch up")
        a = self.assignments.assignment
        if a is not None and a.anchor == me and self.cluster == b.cluster:
            return Manifest(cluster=b.cluster, round=b.round, ready=False)
        raise RpcError("not_anchor", f"node {me} does not anchor cluster {b.cluster}")

    async def rpc_patches_get(self, env: Envelope) -> Patches:
        b = env.body
        await self.assignments.require_caller(env)
        alog = self.anchor_logs.get(b.cluster)
        base = (
            alog.base
            if alog is not None
            else (self.session.base if self.session is not None and self.cluster == b.cluster else None)
        )
        if base is None:
            raise RpcError("not_found", f"node {self.local.node_id} holds no log of cluster {b.cluster}")
        try:
            records = base.missing_since(b.since)
        except ValueError as exc:
            raise RpcError("bad_request", str(exc)) from None
        return records_to_msg(b.cluster, records)
