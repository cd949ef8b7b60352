"""A node's requests to the bootstrap beyond join and heartbeats (those are nodes/control.py's).

`BootstrapClient` holds what the bootstrap told this node and says what the node has to
tell it (docs/RUNTIME.md, "Messages"):

- the assignment: `fetch_assignment` (`get_assignment` -> `assignment`; the bootstrap is the
  authority, so a restarted one counting versions from 0 again is followed), and
  `wait_assignment` until one satisfies a predicate (refetched every 2 s meanwhile);
- `on_beat`, the heartbeat reply hook: `swarm_done`; `need_fingerprint` re-sends the last
  fingerprint; `need_base` re-sends the base digest; another assignment version fetches
  the assignment;
- `send_fingerprint` (10 attempts) and `send_base` (until answered; `JoinRefused` when the
  swarm runs another base), both retried with `linear_backoff`;
- `report_helper`: `report{event: helper_failed}` makes the coordinator re-pair the owner.

It is also the `AssignmentSource` the node's services read the assignment from, and it
says who is calling (`require_caller`): the node bound to the public key a request arrived
with, from the assignment's `keys` or else asked of the bootstrap (`whois`, cached).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nodes.collaborators import Link, LocalNode, TaskSet, linear_backoff
from nodes.control import JoinRefused
from transport.messages import (
    Assignment,
    BaseDigest,
    Beat,
    Envelope,
    Fingerprint,
    GetAssignment,
    Message,
    Report,
    Whois,
    WhoisReply,
)
from transport.rpc import RpcError

log = logging.getLogger("atlas.peer")
base_log = logging.getLogger("atlas.node")  # the base check's lines, as nodes/base_check.py logs them

FINGERPRINT_ATTEMPTS = 10
FINGERPRINT_RETRY_CAP_S = 2.0
BASE_RETRY_CAP_S = 5.0
REFETCH_S = 2.0  # wait_assignment asks the bootstrap again after this long without a new assignment...
_BASE_FATAL = ("base_mismatch", "bad_request", "bad_schema")
STRANGER_CACHE_S = 5.0  # a key the bootstrap does not know is asked about again after this long
MAX_CACHED_KEYS = 10_000


class BootstrapClient:
    """The node's side of the bootstrap protocol after the welcome (module doc)."""

    def __init__(self, link: Link, bootstrap: str, local: LocalNode, on_refused: Callable[[JoinRefused], None]) -> None:
        self.link = link
        self.bootstrap = bootstrap  # HOST:PORT
        self.local = local
        self.assignment: Assignment | None = None
        self.version = 0  # version of `assignment` (what heartbeats compare with the bootstrap's)
        self.swarm_done = False
        # ... or two heartbeats, whichever is longer (`heard_heartbeat`): every beat says whether the
        # assignment moved, so the refetch is only a safety net, and at one a second per waiting
        # node it would be most of a large swarm's requests
        self.refetch_s = REFETCH_S
        self._on_refused = on_refused  # a base refused after a restart stops the node like one at join
        self._assigned = asyncio.Event()
        self._fingerprint: Fingerprint | None = None  # the last one sent, for `need_fingerprint`
        self._rebasing = False
        self._tasks = TaskSet()
        self._known_keys: dict[str, int] = {}  # public key -> node id (assignments, whois answers)
        self._strangers: dict[str, float] = {}  # keys the bootstrap did not know -> when asked

    def heard_heartbeat(self, heartbeat_s: float) -> None:
        """The swarm's heartbeat period (from the welcome): refetch at most every two beats."""
        self.refetch_s = max(REFETCH_S, 2.0 * heartbeat_s)

    async def stop(self) -> None:
        await self._tasks.cancel_all()

    # ---- the assignment (AssignmentSource) -----------------------------------------------
    def address_of(self, node_id: int | None) -> str | None:
        if node_id is None or self.assignment is None:
            return None
        return self.assignment.addresses.get(str(node_id))

    def anchor_of(self, cluster: int) -> int | None:
        a = self.assignment
        if a is None:
            return None
        if a.cluster == cluster:
            return a.anchor
        for o in a.owners:
            if o.get("cluster") == cluster:
                return o.get("anchor")
        return None

    async def fetch_assignment(self) -> None:
        try:
            a = await self.link.call(self.bootstrap, GetAssignment(node_id=self.local.node_id))
        except RpcError as exc:
            log.warning("get_assignment failed (%s); will retry", exc)
            return
        if isinstance(a, Assignment):  # the bootstrap is the authority (a restarted one counts from 0 again)
            changed = self.assignment is None or a.version != self.assignment.version
            self.assignment, self.version = a, a.version
            self.link.learn_keys(a.addresses, a.keys)
            self._remember_keys({key: int(n) for n, key in a.keys.items()})
            if changed:
                log.info(
                    "assignment v%d: role %s, cluster %s, split %s, helper %s, anchor %s, serves %s (%s)",
                    a.version,
                    a.role,
                    a.cluster,
                    a.split,
                    a.helper,
                    a.anchor,
                    a.serves,
                    a.reason,
                )
            self._assigned.set()

    # ---- who is calling ------------------------------------------------------------------
    async def require_caller(self, env: Envelope, node_id: int | None = None) -> int | None:
        """The node that sent `env` (by the key its connection proved); RpcError('unauthorized')
        when no node of the swarm holds that key, or when it is not `node_id` (a node speaks
        only for itself). A plain connection (an insecure swarm) passes as None."""
        if not env.peer_key:
            return None
        caller = self._known_keys.get(env.peer_key)
        if caller is None:
            caller = await self._whois(env.peer_key)
        if caller is None:
            raise RpcError("unauthorized", "the key of this connection is not a node of the swarm")
        if node_id is not None and caller != node_id:
            raise RpcError("unauthorized", f"node {caller} may not speak for node {node_id}")
        return caller

    async def _whois(self, key: str) -> int | None:
        asked = self._strangers.get(key)
        if asked is not None and time.monotonic() - asked < STRANGER_CACHE_S:
            return None
        try:
            reply = await self.link.call(self.bootstrap, Whois(key=key))
        except RpcError as exc:
            raise RpcError("unauthorized", f"cannot check the caller's key with the bootstrap ({exc.code})") from None
        node_id = reply.node_id if isinstance(reply, WhoisReply) else None
        if node_id is None:
            if len(self._strangers) >= MAX_CACHED_KEYS:
                self._strangers.clear()
            self._strangers[key] = time.monotonic()
        else:
            self._remember_keys({key: node_id})
        return node_id

    def _remember_keys(self, keys: dict[str, int]) -> None:
        if len(self._known_keys) + len(keys) > MAX_CACHED_KEYS:
            self._known_keys.clear()
        self._known_keys.update(keys)

    async def wait_assignment(self, predicate: Callable[[Assignment], bool], what: str) -> Assignment:
        """Wait until the current assignment satisfies `predicate` (refetching now and then)."""
        last_fetch = time.monotonic()
        while True:
            a = self.assignment
            if a is not None and predicate(a):
                return a
            self._assigned.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._assigned.wait(), timeout=1.0)
            if time.monotonic() - last_fetch > self.refetch_s:
                last_fetch = time.monotonic()
                await self.fetch_assignment()
                log.debug("still waiting for %s", what)

    # ---- the heartbeat reply -------------------------------------------------------------
    async def on_beat(self, reply: Message) -> None:
        if not isinstance(reply, Beat):
            return
        self.swarm_done = reply.swarm_done
        if reply.need_fingerprint and self._fingerprint is not None:
            self._tasks.spawn(self.send_fingerprint(self._fingerprint), "refingerprint")
        if reply.need_base and self.local.base_identity is not None and not self._rebasing:
            self._rebasing = True
            self._tasks.spawn(self._resend_base(), "rebase")
        if reply.assignment_version != self.version:
            await self.fetch_assignment()

    async def _resend_base(self) -> None:
        """The bootstrap lost this node's base digest (e.g. its state was wiped): say it again;
        a refusal now (the swarm runs another base) stops the node like one at join."""
        try:
            await self.send_base()
        except JoinRefused as exc:
            log.error("%s", exc)
            self._on_refused(exc)
        finally:
            self._rebasing = False

    # ---- what the node tells the bootstrap -----------------------------------------------
    async def send_fingerprint(self, body: Fingerprint) -> None:
        """Send `body` until the bootstrap accepts it (at most FINGERPRINT_ATTEMPTS tries)."""
        self._fingerprint = body
        for attempt in range(1, FINGERPRINT_ATTEMPTS + 1):
            try:
                await self.link.call(self.bootstrap, body)
                return
            except RpcError as exc:
                log.warning("fingerprint not accepted (%s); retrying", exc)
                await asyncio.sleep(linear_backoff(attempt, FINGERPRINT_RETRY_CAP_S))

    async def send_base(self) -> None:
        """Send `base_digest` until the bootstrap answers; JoinRefused when it refuses the base."""
        identity = self.local.base_identity
        if identity is None:
            raise RuntimeError("send_base before the base identity is known")
        body = BaseDigest(
            node_id=self.local.node_id,
            digest=identity["digest"],
            model=identity["model"],
            revision=identity["revision"],
            dtype=identity["dtype"],
        )
        attempt = 0
        while True:
            try:
                await self.link.call(self.bootstrap, body)
                base_log.info("bootstrap accepted base %s", identity["digest"][:12])
                return
            except RpcError as exc:
                if exc.code in _BASE_FATAL:
                    raise JoinRefused(exc.code, getattr(exc, "message", str(exc))) from None
                attempt += 1
                base_log.warning("base digest not acknowledged (%s); retrying", exc)
                await asyncio.sleep(linear_backoff(attempt, BASE_RETRY_CAP_S))

    async def report_helper(self, helper: int, why: str) -> None:
        """`report{event: helper_failed}`; best effort (a lost report is logged)."""
        body = Report(
            node_id=self.local.node_id, metrics={"event": "helper_failed", "helper": helper, "why": why[:200]}
        )
        try:
            await self.link.call(self.bootstrap, body)
        except RpcError as exc:
            log.warning("report not delivered (%s)", exc)
