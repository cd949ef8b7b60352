"""The cluster merge protocol of one node (docs/RUNTIME.md, "Rounds" and "Consistency").

`ClusterSync` is the async shell around nodes/merge.py's bookkeeping. Two ways up to the
anchor (TrainConfig.merge):

- reduce (default): `contribute(c)` turns this node's contribution into a partial
  (aggregation.reduce) and keeps it with the partials its children in the cluster's reduce
  tree sent it (`rpc_partial`); a loop forwards them, combined into one, to its parent once
  every child sent something or `reduce_wait_s` passed (later pieces follow at once). A
  forward the parent refuses or cannot take goes straight to the anchor; and while the
  round is open, each member asks the anchor (`held_get`) every (depth + 1) x
  `reduce_wait_s` whether it holds its contribution, and sends it there itself if not. The
  anchor refuses a partial overlapping what it holds (error `overlap`; the sender then
  sends its pieces one by one), so nothing counts twice;
- gossip: `contribute(c)` pushes the contribution to the anchor and to `fanout` random
  members; a node forwards a contribution it has not seen before (`rpc_contribution`), so
  gossip ends;
- the anchor: while the assignment names this node anchor of its cluster, a loop
  publishes each round's manifest when due (every member contributed, or the round
  deadline after the first contribution passed);
- folding: `contribute` then waits until the session's base version moves, in ONE loop:
  ask for the round's manifest (`_manifest`, the one manifest fetch: from this node's own
  anchor log, or `manifest_get` to the anchor, re-sending the contribution when the anchor
  changes), get the round's patch and fold it: reduce: the patch itself from the tree
  parent (`patches_get`; from the anchor when the parent does not have it in
  `reduce_wait_s`), its digest and chain checked against the manifest; gossip: rebuilt
  from the contributions (pulling missing ones by digest). When the anchor says the round
  is older than its log, or the patch cannot be had, `catch_up` folds the anchor's patches;
- `resync`: a patch that does not fit this node's history (DigestMismatchError: it folded a
  version the anchor's log does not have, e.g. from an anchor that died before the new
  one heard of it) moves the node onto the anchor's history instead of stopping it;
- `follow`: a finished member folds rounds its cluster still publishes (carry rounds);
- `fetch_patches`: the patches of a cluster after a version (catch-up, and the helper's
  lazy fold of a replica).

Handlers: `partial`, `held_get`, `contribution`, `contribution_get`, `manifest_get`, `patches_get`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import replace

from atlas_p2p.aggregation import Contribution, Partial, Patch, ReduceTree, combine, mira_personal_patch, partial_of
from atlas_p2p.records import FoldedRecord
from atlas_p2p.training import OwnerSession
from atlas_p2p.versioning import DigestMismatchError, PatchRecord
from atlas_p2p.vocabulary import EXACT, MIRA
from nodes.collaborators import AssignmentSource, Link, LocalNode, TaskSet
from nodes.config import TrainConfig
from nodes.executor import TorchExecutor
from nodes.merge import AnchorLog, GossipStore, ReduceBuffer, merge_contributions, merge_manifest
from nodes.wireconv import (
    contribution_from_msg,
    contribution_to_msg,
    partial_from_msg,
    partial_to_msg,
    records_from_msg,
    records_to_msg,
)
from transport.messages import (
    Assignment,
    ContributionGet,
    ContributionMsg,
    Envelope,
    Held,
    HeldGet,
    Manifest,
    ManifestGet,
    PartialMsg,
    Patches,
    PatchesGet,
)
from transport.rpc import Handler, RpcError, RpcTimeout

log = logging.getLogger("atlas.peer")

RETRY_POLLS = 10  # a round with nothing folded is asked again after this many polls


def _caught_up(r: PatchRecord) -> FoldedRecord:
    """The record of a patch folded from the anchor's log rather than from a manifest."""
    return FoldedRecord(r.patch.round, r.version, r.digest, tuple(sorted(r.patch.weights)), "catch-up")


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
        self.store = GossipStore()  # merge="gossip"
        self.reduce = ReduceBuffer()  # merge="reduce": partials held to forward (or, at the anchor, to publish)
        self._own: Partial | None = None  # this node's latest contribution as a partial (sent direct if need be)
        self.anchor_logs: dict[int, AnchorLog] = {}
        self.session: OwnerSession | None = None  # the node's training session (set by the lifecycle)
        self.folded: list[FoldedRecord] = []  # one record per patch folded (summary "manifests_folded")
        self.rng = random.Random()
        self.merge_rule = EXACT  # the swarm's (welcome); the baselines' fedavg and mira merge by gossip
        self._mira_mean: dict[int, Patch] = {}  # mira: cluster -> the mean of its members' adapters
        self._tasks = TaskSet()

    def handlers(self) -> dict[str, Handler]:
        return {
            "partial": self.rpc_partial,
            "held_get": self.rpc_held_get,
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

    @property
    def reducing(self) -> bool:
        """Partial sums up a tree; the baselines' rules (fedavg, mira) are not sums: they take the gossip path."""
        return self.config.merge == "reduce" and self.merge_rule == EXACT

    def _tree(self, a: Assignment) -> ReduceTree:
        """The cluster's reduce tree; KeyError while the assignment names no anchor (the
        callers then treat this node as outside the tree)."""
        if a.anchor is None:
            raise KeyError(f"cluster {a.cluster} has no anchor in this assignment")
        return ReduceTree.of(a.members, a.anchor, self.config.fan_in, last=a.unreachable)

    def _parent(self, a: Assignment) -> int | None:
        """This node's parent in the cluster's reduce tree (the anchor if the tree does not name it)."""
        try:
            return self._tree(a).parent(self.local.node_id)
        except KeyError:
            return a.anchor

    def _fallback_s(self, a: Assignment) -> float:
        """How long a member leaves its contribution to the tree before checking the anchor has it."""
        try:
            depth = self._tree(a).depth(self.local.node_id)
        except KeyError:
            depth = 0
        return (depth + 1) * self.config.reduce_wait_s

    # ---- a member's round ------------------------------------------------------------------
    async def contribute(self, c: Contribution) -> None:
        """Send `c` (this node's contribution to round c.round) up, then fold until the base version moves."""
        s = self.session
        if self.reducing:
            self._own = await self.executor.run(partial_of, c)
            self.reduce.offer(self.cluster, self._own, time.time())
        else:
            self.store.add(self.cluster, c, time.time())
            await self._push(c)
        before = s.base.chain  # moves with every fold, and with a re-sync that keeps the version
        while s.base.chain == before:  # a closed round cannot train again: wait until its patch is in
            manifest = await self._wait_manifest(c.round, c)
            if manifest is not None:
                await self._fold(manifest)
            else:
                await self.catch_up()
            if s.base.chain == before:
                log.warning("round %d: nothing folded yet; asking the anchor again", c.round)
                await asyncio.sleep(self.config.poll_s * RETRY_POLLS)

    def forget_before(self, round_: int) -> None:
        """Drop held contributions and partials of rounds before `round_` (they are folded)."""
        self.store.forget_before(self.cluster, round_)
        self.reduce.forget_before(self.cluster, round_)

    async def follow(self) -> bool:
        """A finished member folds rounds its cluster still publishes (others' carry rounds)."""
        s, a = self.session, self.assignments.assignment
        if s is None or a is None or a.cluster is None:
            return False
        before = s.base.chain
        manifest, _ = await self._manifest(a, s.round)
        if manifest is not None:
            await self._fold(manifest)
        return s.base.chain != before

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
        skip = exclude | set(a.unreachable if a else ())  # nobody can push to them; they pull
        members = [m for m in (a.members if a else []) if m not in skip]
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
        """Round r's manifest (re-sending `c` if the anchor changes; reduce: straight to the
        anchor when it does not hold it by the fallback time); None: catch up instead."""
        me = self.local.node_id
        anchor = self.assignments.assignment.anchor
        checked = time.monotonic()
        while True:
            a = self.assignments.assignment
            if a.anchor != anchor:
                anchor = a.anchor
                log.info("cluster %s: anchor is now node %s; re-sending contribution", a.cluster, anchor)
                if anchor is not None and anchor != me:
                    if self.reducing:
                        self._tasks.spawn(self._send_own(a), "repush")
                    else:
                        body = contribution_to_msg(c, a.cluster, me)
                        self._tasks.spawn(self._send_contribution(anchor, body), "repush")
            manifest, behind = await self._manifest(a, r)
            if manifest is not None or behind:
                return manifest
            if self.reducing and a.anchor != me and time.monotonic() - checked >= self._fallback_s(a):
                checked = time.monotonic()
                await self._ensure_held(a)
            await asyncio.sleep(self.config.poll_s)

    # ---- the reduce (merge="reduce") ---------------------------------------------------------
    async def _ensure_held(self, a: Assignment) -> None:
        """Ask the anchor whether it holds this node's contribution; send it there if not."""
        own, address = self._own, self.assignments.address_of(a.anchor)
        if own is None or address is None:
            return
        me = str(self.local.node_id)
        body = HeldGet(cluster=a.cluster, round=own.round, node_id=self.local.node_id, digest=own.covers[me])
        try:
            reply = await self.link.call(address, body)
        except RpcError as exc:
            log.debug("held_get to anchor %s failed (%s)", a.anchor, exc)
            return
        if isinstance(reply, Held) and (reply.cluster, reply.round) == (a.cluster, own.round) and not reply.held:
            log.info("round %d: anchor %s lacks this node's contribution; sending it directly", own.round, a.anchor)
            await self._send_own(a)

    async def _send_own(self, a: Assignment) -> None:
        if self._own is not None:
            await self._send_partial(
                a.anchor, await self.executor.run(partial_to_msg, self._own, a.cluster, self.local.node_id)
            )

    async def _send_partial(self, target: int | None, body: PartialMsg) -> str:
        """Send a partial; "ok", or the error code ("unreachable" for no address)."""
        address = self.assignments.address_of(target)
        if address is None:
            return "unreachable"
        try:
            await self.link.call(address, body, timeout=self.config.round_deadline_s)  # up to a dense patch
        except RpcError as exc:
            log.debug("partial of round %d to node %s refused or lost (%s)", body.round, target, exc)
            return exc.code
        return "ok"

    async def _reduce_step(self) -> None:
        """Forward what this (non-anchor) node holds when due (module doc)."""
        a = self.assignments.assignment
        me = self.local.node_id
        if not self.reducing or a is None or a.cluster is None or a.anchor is None or a.anchor == me:
            return
        try:
            expected = {str(n) for n in [me, *self._tree(a).children(me)]}
        except KeyError:
            expected = {str(me)}
        if self.session is not None:
            self.reduce.forget_before(a.cluster, self.session.round)  # published: folded here
        for r in self.reduce.rounds(a.cluster):
            if self.reduce.due(a.cluster, r, expected, time.time(), self.config.reduce_wait_s):
                pieces = self.reduce.unsent(a.cluster, r)
                self.reduce.mark_sent(a.cluster, r, pieces)
                self._tasks.spawn(self._forward(a, pieces), f"forward-{r}")

    async def _forward(self, a: Assignment, pieces: list[Partial]) -> None:
        """Pieces up to the parent, combined; to the anchor if the parent fails, one by one if it overlaps."""
        me = self.local.node_id
        total = await self.executor.run(combine, pieces)
        body = await self.executor.run(partial_to_msg, total, a.cluster, me)
        parent = self._parent(a)
        if parent != a.anchor and await self._send_partial(parent, body) == "ok":
            return
        if await self._send_partial(a.anchor, body) == "overlap" and len(pieces) > 1:
            for p in pieces:  # the anchor holds part of it: what it lacks goes piece by piece
                await self._send_partial(a.anchor, await self.executor.run(partial_to_msg, p, a.cluster, me))

    async def _fold(self, m: Manifest) -> None:
        s = self.session
        if m.version <= s.version:
            held = s.base.chain_at(m.version)
            if self.merge_rule != MIRA and m.chain and held is not None and held != m.chain:
                await self.resync(f"the anchor's version {m.version} is not the one folded here")
            return
        if m.version != s.version + 1:
            await self.catch_up()
            return
        if self.reducing:
            await self._fold_record(m)
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
        if self.merge_rule == MIRA:
            patch = await self.executor.run(self._mira_patch, m, contributions)
            await self.executor.run(s.fold, patch, version=m.version)  # personal: no shared digest or chain
        else:
            patch = await self.executor.run(merge_manifest, m, contributions, self.merge_rule)
            if not await self._fold_checked(patch, m.version, m.patch_digest, m.chain):
                return
        self.folded.append(
            FoldedRecord(m.round, m.version, patch.digest, tuple(sorted(patch.weights)), "manifest", tuple(m.digests))
        )

    def _mira_patch(self, m: Manifest, contributions: list[Contribution]) -> Patch:
        """This node's MIRA step for the manifest's contributions (aggregation.mira_personal_patch):
        its own base moves toward the cluster's mean; the cluster's mean is kept here."""
        if sorted(c.digest for c in contributions) != sorted(m.digests):
            raise ValueError(f"cluster {m.cluster} round {m.round}: contributions do not match the manifest")
        own = self.session.base.folded_delta()
        mean = self._mira_mean.get(m.cluster, Patch({}))
        patch, self._mira_mean[m.cluster] = mira_personal_patch(contributions, str(self.local.node_id), own, mean)
        return patch

    async def _fold_record(self, m: Manifest) -> None:
        """Fold the round's patch as published: from the anchor log here, the tree parent or the anchor."""
        a = self.assignments.assignment
        record = None
        if a.anchor == self.local.node_id:
            info = self.anchor_logs.get(m.cluster).manifests.get(m.round) if m.cluster in self.anchor_logs else None
            record = None if info is None else info.record
        else:
            parent, give_up = self._parent(a), time.monotonic() + self.config.reduce_wait_s
            while parent is not None and parent != a.anchor and record is None:
                record, dead = await self._record_from(parent, m)
                if record is not None or dead or time.monotonic() > give_up:
                    break
                await asyncio.sleep(self.config.poll_s)
            if record is None:
                record, _ = await self._record_from(a.anchor, m)
        if record is None:
            log.warning("round %d: patch not available from the tree or the anchor; catching up instead", m.round)
            await self.catch_up()
            return
        if not await self._fold_checked(record.patch, m.version, m.patch_digest, m.chain):
            return
        self.folded.append(
            FoldedRecord(
                m.round, m.version, m.patch_digest, tuple(sorted(record.patch.weights)), "manifest", tuple(m.digests)
            )
        )

    async def _record_from(self, node: int | None, m: Manifest) -> tuple[PatchRecord | None, bool]:
        """(the record of the manifest's version from `node`, checked against the manifest, or
        None; whether `node` is unreachable)."""
        address = self.assignments.address_of(node)
        if address is None:
            return None, True
        try:
            body = PatchesGet(cluster=m.cluster, since=m.version - 1)
            reply = await self.link.call(address, body, timeout=self.config.round_deadline_s)  # up to a dense patch
            if not isinstance(reply, Patches) or reply.cluster != m.cluster:
                raise ValueError("patches_get answered with another type or cluster")
            records = await self.executor.run(records_from_msg, reply)
        except RpcTimeout:
            return None, True
        except (RpcError, ValueError) as exc:
            log.debug("patch of version %d not at node %s (%s)", m.version, node, exc)
            return None, False
        for r in records:
            if r.version == m.version:
                if r.digest == m.patch_digest and r.chain == m.chain:
                    return r, False
                log.warning("node %s serves a patch of version %d unlike the manifest's", node, m.version)
        return None, False

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
        # patches run to dense size (MBs on a real model, over an emulated slow link): the round's
        # deadline, as the reduce's transfers get, not the 3 s control deadline
        reply = await self.link.call(
            address, PatchesGet(cluster=cluster, since=since), timeout=self.config.round_deadline_s
        )
        if not isinstance(reply, Patches) or reply.cluster != cluster:
            raise RpcError("bad_reply", f"patches_get for cluster {cluster} answered with another type or cluster")
        return await self.executor.run(records_from_msg, reply)

    async def catch_up(self) -> None:
        """Fold every patch the cluster's anchor has beyond this node's version."""
        s = self.session
        try:
            records = await self.fetch_patches(self.cluster, s.version)
        except (RpcError, ValueError) as exc:
            if isinstance(exc, RpcError) and exc.code == "not_found":  # the anchor has no round of its own yet
                log.info("nothing to catch up from the anchor yet (%s)", exc)
            else:
                log.warning("catch-up from the anchor failed (%s)", exc)
            return
        for r in records:
            if r.version <= s.version:
                continue
            if not await self._fold_checked(r.patch, r.version, r.digest, r.chain, discard_round=True):
                return
            self.folded.append(_caught_up(r))
        if records:
            log.info("caught up to base version %d", s.version)

    async def _fold_checked(
        self, patch: Patch, version: int, digest: str, chain: str, discard_round: bool = False
    ) -> bool:
        """Fold a patch of the anchor's history; False when it did not fit this node's (it was
        re-synced onto the anchor's instead, or could not be yet)."""
        try:
            await self.executor.run(
                self.session.fold, patch, version=version, digest=digest, chain=chain, discard_round=discard_round
            )
        except DigestMismatchError as exc:
            await self.resync(str(exc))
            return False
        return True

    async def resync(self, why: str) -> bool:
        """Take the anchor's history from where this node's left it (module doc); True if moved.

        The versions only this node folded are taken back out (the warning names them): a
        contribution merged only in them is lost to the cluster; this node's own contribution
        still waiting for its manifest stays pending and goes into its next one."""
        a, s = self.assignments.assignment, self.session
        me = self.local.node_id
        if a is None or a.cluster is None or a.anchor in (None, me):
            log.error(
                "cluster %s: a patch does not fit this node's history (%s); no other anchor to follow",
                a and a.cluster,
                why,
            )
            return False
        try:
            records = await self._patches_from(a.anchor, a.cluster, s.base.origin_version)
            base, fork = await self.executor.run(s.base.rebased, records)
        except (RpcError, ValueError) as exc:
            log.warning(
                "cluster %d: history differs from anchor %d's (%s) and cannot be re-synced yet (%s)",
                a.cluster,
                a.anchor,
                why,
                exc,
            )
            return False
        before = s.version
        await self.executor.run(s.rebase, base, fork)
        kept = [f for f in self.folded if f.version <= fork]
        self.folded[:] = kept + [_caught_up(r) for r in base.missing_since(fork)]
        log.warning(
            "cluster %d: this node's history left anchor %d's after version %d (%s): versions %d..%d dropped, "
            "the anchor's %d..%d folded",
            a.cluster,
            a.anchor,
            fork,
            why,
            fork + 1,
            before,
            fork + 1,
            base.version,
        )
        return True

    # ---- the anchor ----------------------------------------------------------------------------
    async def _anchor_loop(self) -> None:
        """While this node anchors its cluster: publish each round's manifest when due."""
        while True:
            await asyncio.sleep(self.config.poll_s)
            try:
                await self._anchor_step()
                await self._reduce_step()
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
            self.anchor_logs[cluster] = alog  # members' partials and held_get are answered during the take-over
            await self._take_over(alog, a)
            log.info("node %d anchors cluster %d from version %d", self.local.node_id, cluster, alog.base.version)
        await self.executor.run(alog.sync_from, s.base)
        r = alog.next_round
        expected = {str(m) for m in a.members}
        if self.reducing:
            held, first = self.reduce.covers(cluster, r), self.reduce.first_seen.get((cluster, r))
        else:
            held, first = self.store.of_round(cluster, r), self.store.first_seen.get((cluster, r))
        if alog.due(held, expected, first, time.time(), self.config.round_deadline_s):
            if self.reducing:
                total = await self.executor.run(combine, self.reduce.pieces(cluster, r))
            else:
                total = await self.executor.run(merge_contributions, list(held.values()), self.merge_rule)
            await self.executor.run(alog.publish, total)
            self.reduce.drop(cluster, r)

    async def _take_over(self, alog: AnchorLog, a: Assignment) -> None:
        """A new anchor first takes what any member holds beyond its own log: the old anchor may
        have published versions this node never folded, and publishing its own patches for
        those rounds would fork the chain of every member that folded the old ones (each would
        then refuse the next version: DigestMismatchError). MIRA's bases are personal: none to take."""
        if self.merge_rule == MIRA:
            return
        others = [m for m in a.members if m != self.local.node_id and m not in a.unreachable]
        since = alog.base.version
        # all at once: a dead member costs one timeout, not one each (before, a dead member held
        # the first publish for a whole round deadline while its subtree's fallbacks were refused)
        answers = await asyncio.gather(
            *(self._patches_from(m, a.cluster, since) for m in others), return_exceptions=True
        )
        for m, records in zip(others, answers, strict=True):
            if isinstance(records, BaseException):
                if not isinstance(records, (RpcError, ValueError)):
                    raise records
                log.debug("take-over of cluster %d: nothing from node %d (%s)", a.cluster, m, records)
                continue
            try:
                taken = await self.executor.run(alog.base.extend, records)
            except ValueError as exc:  # behind this node's log now, or on another chain
                log.debug("take-over of cluster %d: nothing from node %d (%s)", a.cluster, m, exc)
                continue
            if taken:
                log.info(
                    "take-over of cluster %d: versions %d..%d from node %d, published before this node anchored",
                    a.cluster,
                    taken[0].version,
                    taken[-1].version,
                    m,
                )

    # ---- handlers ------------------------------------------------------------------------------
    async def rpc_partial(self, env: Envelope) -> None:
        b = env.body
        await self.assignments.require_caller(env, b.sender)
        if self.cluster is None or b.cluster != self.cluster:
            raise RpcError("wrong_cluster", f"node {self.local.node_id} is not in cluster {b.cluster}")
        alog = self.anchor_logs.get(b.cluster)
        published = alog.next_round if alog is not None else (self.session.round if self.session is not None else 0)
        if b.round < published:
            raise RpcError("too_old", f"round {b.round} is closed here (next round {published})")
        try:
            p = await self.executor.run(partial_from_msg, b)
        except ValueError as exc:
            raise RpcError("bad_request", str(exc)) from None
        verdict = self.reduce.offer(b.cluster, p, time.time())
        if verdict == "overlap":
            raise RpcError("overlap", f"round {b.round}: some of nodes {sorted(p.covers)} are held here already")
        if verdict == "mismatch":
            raise RpcError("bad_request", f"round {b.round}: the partial's modules do not match the round's")

    async def rpc_held_get(self, env: Envelope) -> Held:
        b = env.body
        await self.assignments.require_caller(env)
        me, alog = self.local.node_id, self.anchor_logs.get(b.cluster)
        if alog is not None and b.round in alog.manifests:
            held = b.digest in alog.manifests[b.round].digests
        elif alog is not None and b.round < alog.next_round:
            raise RpcError("too_old", f"round {b.round} was published before node {me} anchored")
        elif alog is not None and self.cluster == b.cluster and self.assignments.assignment.anchor == me:
            held = self.reduce.holds(b.cluster, b.round, str(b.node_id), b.digest)
        else:
            raise RpcError("not_anchor", f"node {me} does not anchor cluster {b.cluster}")
        return Held(cluster=b.cluster, round=b.round, held=held)

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
