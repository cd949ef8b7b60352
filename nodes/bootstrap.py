"""The bootstrap service: the registry behind a ZeroMQ RpcServer, plus the liveness sweep.

It answers `join` (-> `welcome`), `heartbeat`, `leave` (-> `ok`) and `peers`
(-> `peer_list`). With a `SwarmSpec` (the training runtime) it also runs the
coordinator (nodes/coordinator.py): `fingerprint` and `report` (-> `ok`), `get_assignment`
(-> `assignment`), heartbeats answered by `beat` (assignment version, swarm done), the
plan's columns written into the peer table, and `coordinator.json` in the state dir.
The coordinator's whole state (`Coordinator.snapshot()`: fingerprints, clusters, plan,
assignment versions, repair record) is kept in the peer table's meta, written after every
event that changed it, the way the registry keeps its seeds and the swarm's base digest; a
bootstrap restarted on the same `--state` with the same swarm flags restores it, so nodes
keep their clusters and assignment versions (a snapshot of another swarm, or one that does
not restore, is set aside with a warning and the coordinator starts empty).
The RpcServer decodes and validates every request before a handler runs; a handler refuses nonsense (unknown node, undialable address) with an `error`
reply. Every error code sent is counted in `stats`, and nothing a peer sends can stop
the service. One base per swarm: `base_digest` (-> `ok`, or `error(base_mismatch)`) carries
the digest of the base a node loaded; the first accepted one is the swarm's, a node with
another is refused, and with a coordinator a node is planned only once its base is
accepted (heartbeats answer `need_base` until then). The peer table lives in SQLite under `state_dir` (WAL); the directory is
locked so two bootstraps cannot share it, and `bootstrap.json` there tells tools which
address the running bootstrap bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from atlas_p2p.capabilities import Capabilities
from atlas_p2p.validation import is_int
from nodes.config import BootstrapConfig, parse_address
from nodes.coordination import CoordinatorQueue
from nodes.coordinator import DEAD, FAILED, LIVE, Applied, Coordinator, Event
from nodes.liveness import ALIVE, Probation
from nodes.peer_table import PeerRecord, PeerTable, PeerTableError, open_peer_table
from nodes.reachability import dial_back
from nodes.registry import EXPIRED, Registry, RequestError
from transport.limits import RequestBudget
from transport.security import AllowList, JoinToken, Keypair, load_or_create_keypair, load_public_keys

log = logging.getLogger("atlas.bootstrap")

INFO_FILE = "bootstrap.json"
TOKEN_FILE = "join-token"  # the join token, for `atlas-node join --token @DIR/join-token`
LOCK_FILE = "bootstrap.lock"
MAX_REQUEST_BYTES = 4 << 20  # control messages only: capabilities, fingerprints, reports
JOIN_BUDGET_KEY = "joins"  # the one bucket of `join_rate`
RELAYS_REFRESH_S = 2.0  # how stale the list of volunteering relays handed to unreachable nodes may be
COORDINATOR_KEY = "coordinator"  # peer-table meta key of {"swarm": the SwarmSpec, "state": the snapshot}


def _lock_state_dir(state_dir: Path) -> IO[str]:
    """Hold an exclusive flock on state_dir/bootstrap.lock (released by the kernel on exit)."""
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        handle = open(state_dir / LOCK_FILE, "a+")  # noqa: SIM115 - kept open while running
    except OSError as exc:
        raise PeerTableError(f"cannot use state dir {state_dir}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise PeerTableError(f"state dir {state_dir} is in use by another bootstrap (pid {holder})") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def bootstrap_identity(state_dir: Path | None) -> tuple[Keypair, JoinToken]:
    """The bootstrap's keypair and join token, kept in state_dir (`bootstrap.key_secret`,
    `join-token`, owner-only) so nodes can rejoin after a restart; fresh ones without a state."""
    if state_dir is None:
        keypair = Keypair.generate()
        return keypair, JoinToken.new(keypair.public)
    keypair = load_or_create_keypair(state_dir, "bootstrap")
    path = state_dir / TOKEN_FILE
    try:
        token = JoinToken.parse(path.read_text())
    except (OSError, ValueError):
        token = None
    if token is None or token.server_key != keypair.public:
        token = JoinToken.new(keypair.public)
        tmp = state_dir / (TOKEN_FILE + ".tmp")
        tmp.touch(mode=0o600)
        tmp.write_text(token.text() + "\n")
        tmp.replace(path)
    return keypair, token


@dataclass(frozen=True)
class _Prepared:
    """What the coordinator process computed after a batch for the loop to write."""

    columns: dict[int, dict[str, Any]] | None  # the plan's peer-table columns (None: no assignment changed)
    state: str  # the coordinator's snapshot as kept in the meta


@dataclass(frozen=True)
class _PrepareBatch:
    """Run in the coordinator process after a batch: the plan's columns (and `coordinator.json`
    in the state dir) when an assignment changed, and the coordinator's state to keep."""

    state_dir: Path | None
    swarm: dict[str, Any]  # the SwarmSpec as a dict, kept with the state

    def __call__(self, coordinator: Coordinator, applied: Applied) -> _Prepared:
        columns = None
        if applied.changed:
            columns = coordinator.peer_columns()
            if self.state_dir is not None:
                data = {
                    **coordinator.metrics(),
                    "anchors": coordinator.anchors(),
                    "clusters_of": {str(n): c["cluster"] for n, c in columns.items()},
                }
                tmp = self.state_dir / "coordinator.json.tmp"
                tmp.write_text(json.dumps(data, default=str))
                tmp.replace(self.state_dir / "coordinator.json")
        return _Prepared(columns, json.dumps({"swarm": self.swarm, "state": coordinator.snapshot()}, sort_keys=True))


def read_bootstrap_info(state_dir: Path | str) -> dict[str, Any] | None:
    """{"address", "pid", "started_at"} written by the running bootstrap, or None."""
    try:
        return json.loads((Path(state_dir) / INFO_FILE).read_text())
    except (OSError, ValueError):
        return None


class Bootstrap:
    """The running service. Build with `await Bootstrap.create(config)`; `stop()` is idempotent."""

    def __init__(self, config: BootstrapConfig, clock: Callable[[], float], swarm: Any = None) -> None:
        self.config = config
        self.swarm = swarm  # nodes.config.SwarmSpec, or None: membership only
        self._saved_state: str | None = None  # the coordinator state last written to the meta
        self._events: CoordinatorQueue[_Prepared] | None = None  # the coordinator's batches (`coordination`)
        self._checker: Coordinator | None = None  # an empty coordinator of the swarm's config (`precheck`)
        self._replica: tuple[str | None, Coordinator] | None = None  # `coordinator`, and the state it is of
        self._joins = RequestBudget(config.join_rate, max(1, round(2 * config.join_rate)))  # all clients together
        self.probation = Probation(config.dead_after_s)  # failed helpers that keep heartbeating come back
        self._silent: set[int] = set()  # suspect now: a repair hands them out as helpers last
        self._done: tuple[float, bool] | None = None  # (when, `_swarm_done`): recomputed heartbeat_s later
        self._columns: dict[int, dict[str, Any]] = {}  # the plan's columns last written per row
        self.clock = clock
        self.registry: Registry | None = None
        self.server: Any = None  # transport.rpc.RpcServer
        self.address: str = ""
        self._table: PeerTable | None = None
        self._lock: IO[str] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._adopter: asyncio.Task[None] | None = None  # adopts the known rows after a restart
        self._stopped = False
        self.keypair: Keypair | None = None  # None: an insecure swarm
        self._hosts: set[str] | None = None  # keys that may host other owners' layers (None: any)
        self.token: JoinToken | None = None  # what a node needs to join (printed by the CLI)
        self._dialer: Any = None  # transport.rpc.RpcClient: dials joined nodes back (nodes.reachability)
        self._reach_checks: set[asyncio.Task[None]] = set()
        self.relay: Any = None  # nodes.relay.RelayServer with --relay (carries nodes nobody can dial)
        self._volunteers: tuple[float, list[tuple[int, str]]] | None = None  # (when, [(node, relay)])

    @classmethod
    async def create(
        cls, config: BootstrapConfig, *, clock: Callable[[], float] = time.time, swarm: Any = None
    ) -> Bootstrap:
        """Open (and lock) the state, bind the server, start the liveness sweep (and the coordinator)."""
        self = cls(config, clock, swarm)
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start(self) -> None:
        from transport.rpc import RpcClient, RpcServer, RpcServerConfig

        if self.config.state_dir is not None:
            self._lock = _lock_state_dir(self.config.state_dir)
        self._table = open_peer_table(self.config.state_dir, fresh=self.config.fresh_state)
        self.registry = Registry(self._table, self.config, now=self.clock())
        host, port = parse_address(self.config.bind, allow_port_zero=True, what="bind")
        handlers = {
            "join": self.rpc_join,
            "heartbeat": self.rpc_heartbeat,
            "leave": self.rpc_leave,
            "peers": self.rpc_peers,
            "base_digest": self.rpc_base_digest,
            "whois": self.rpc_whois,
        }
        if self.swarm is not None:
            handlers.update(
                fingerprint=self.rpc_fingerprint, report=self.rpc_report, get_assignment=self.rpc_get_assignment
            )
        allow = None
        if not self.config.insecure:
            self.keypair, self.token = bootstrap_identity(self.config.state_dir)
            if self.config.allow_keys is not None:
                allow = AllowList(load_public_keys(self.config.allow_keys))
            if self.config.hosts is not None:
                self._hosts = {key.decode() for key in load_public_keys(self.config.hosts)}
        else:
            log.warning("INSECURE: no keys, no join token; anyone who reaches %s can join or speak for any node", host)
        self.server = await RpcServer.create(
            host,
            port,
            {name: self._authorized(handler) for name, handler in handlers.items()},
            # a node sends a few requests a second; `peers` pages come one after another
            config=RpcServerConfig(name="bootstrap", max_bytes=MAX_REQUEST_BYTES, client_rate=200.0, client_burst=400),
            keypair=self.keypair,
            allow=allow,
        )
        self.address = self.server.address
        self._dialer = RpcClient("bootstrap-dialback", keypair=self.keypair)
        if self.config.relay_port is not None:
            from nodes.relay import RelayServer

            self.relay = await RelayServer.create(host, self.config.relay_port, slots=self.config.relay_slots)
        if self.config.state_dir is not None:
            info = {"address": self.address, "pid": os.getpid(), "started_at": self.registry.started_at}
            tmp = self.config.state_dir / (INFO_FILE + ".tmp")
            tmp.write_text(json.dumps(info))
            tmp.replace(self.config.state_dir / INFO_FILE)
        if self.swarm is not None:
            # Bound first: nodes reach the socket at once. Their first requests wait in its
            # queue only for the restore (a parse of the kept snapshot, no planning); the known
            # rows the snapshot lacks are adopted in the background while requests are answered.
            self._start_coordinator()
            self._adopter = asyncio.create_task(self._adopt_known_nodes(), name="bootstrap-adopt")
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="bootstrap-sweep")
        known = self._table.rows()
        log.info(
            "bootstrap listening on %s (state %s, %d known peers, heartbeat %g s, suspect %g s, dead %g s)",
            self.address,
            self.config.state_dir or "in memory",
            len(known),
            self.config.heartbeat_s,
            self.config.suspect_after_s,
            self.config.dead_after_s,
        )

    async def stop(self) -> None:
        """Stop sweeping and serving, close the table, release the state lock."""
        if self._stopped:
            return
        self._stopped = True
        if self._adopter is not None:
            self._adopter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._adopter
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for task in list(self._reach_checks):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._dialer is not None:
            await self._dialer.stop()
        if self.relay is not None:
            await self.relay.stop()
        if self.server is not None:
            await self.server.stop()
        if self._events is not None:
            await self._events.stop()  # queued events get a few seconds to settle, then the process ends
        if self._table is not None:
            self._table.close()
        if self._lock is not None:
            self._lock.close()

    @property
    def stats(self) -> Counter[str]:
        """Requests, replies and every error code answered (from the RpcServer)."""
        return self.server.stats if self.server is not None else Counter()

    # --- identity ---------------------------------------------------------------------------

    def _authorized(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """`handler` behind the identity check of `_authorize`."""

        async def run(env: Any) -> Any:
            self._authorize(env)
            return await handler(env)

        return run

    def _authorize(self, env: Any) -> None:
        """Who may send what, from the key the connection proved (`env.peer_key`).

        `join` needs the token's secret; a request naming a node (heartbeat, leave,
        fingerprint, report, get_assignment, base_digest) must come from that node's key;
        `whois` only from a node of the swarm; `peers` from a node or with the secret.
        Without keys (an insecure swarm) everything passes.
        """
        from transport.rpc import RpcError

        if self.token is None:
            return
        body = env.body
        if env.type == "join":
            if not self.token.admits(body.token):
                raise RpcError("bad_token", "this join token is not the swarm's (ask its operator for the current one)")
        elif env.type == "peers":
            if self.registry.node_of(env.peer_key) is None and not self.token.admits(body.token):
                raise RpcError("unauthorized", "reading the peer table needs the join token or a node's key")
        elif env.type == "whois":
            if self.registry.node_of(env.peer_key) is None:
                raise RpcError("unauthorized", "only nodes of the swarm may ask who holds a key")
        else:
            self._call(self.registry.check_sender, body.node_id, env.peer_key)

    async def rpc_whois(self, env: Any) -> Any:
        from transport.messages import WhoisReply

        return WhoisReply(node_id=self.registry.node_of(env.body.key))

    def _keys_for(self, assignment: dict[str, Any]) -> dict[str, str]:
        """Public keys a node needs with its assignment: of every node it may call (its
        `addresses`) and of every node that may call it (also the helpers of its cluster's
        members, which pull patches from the anchor). From memory, no table reads: hundreds
        of ids per assignment."""
        if self.token is None:
            return {}
        ids = {int(n) for n in assignment["addresses"]}
        for member in assignment.get("members", []):
            helper = self._helper_of(int(member))
            if helper is not None:
                ids.add(helper)
        return self.registry.public_keys(ids)

    def _helper_of(self, node_id: int) -> int | None:
        """The helper the plan last wrote for `node_id` (the table's, before this bootstrap wrote any)."""
        columns = self._columns.get(node_id)
        if columns is not None:
            return columns.get("helper")
        record = self.registry.table.get(node_id)
        return None if record is None else record.helper

    # --- handlers (bodies are already schema-checked by the codec) ------------------------

    async def rpc_join(self, env: Any) -> Any:
        from transport.messages import Welcome
        from transport.rpc import RpcError

        if not self._joins.admit(JOIN_BUDGET_KEY, time.monotonic()):
            raise RpcError("busy", f"this bootstrap admits {self.config.join_rate:g} joins a second; retry shortly")
        body = env.body
        result = self._call(
            lambda **fields: self.registry.join(body.capabilities(), **fields),
            address=body.address,
            model=body.model or None,
            node_id=body.node_id,
            incarnation=body.incarnation,
            client=env.src,
            public_key=env.peer_key or None,
            now=self.clock(),
            via=body.via or None,
            relay=body.relay or None,
        )
        self._check_reachable(result.node_id, body.address, env.peer_key or None)
        if self.swarm is not None:
            if self._base_accepted(result.node_id):  # a new node is planned once its base is accepted
                self._submit(Event.join(result.node_id, *self._offer(result.node_id)))
            spec = self.swarm
            return Welcome(
                node_id=result.node_id,
                model=spec.model,
                fingerprint_seed=self.registry.fingerprint_seed,
                heartbeat_s=self.config.heartbeat_s,
                model_task=spec.task,
                num_labels=spec.num_labels,
                split_mode=spec.split_mode,
                merge_rule=spec.merge_rule,
                fingerprint_probe=spec.fingerprint_probe,
                fingerprint_samples=spec.fingerprint_samples,
                privacy_floor=spec.privacy_floor,
                init_seed=self.registry.init_seed,
                incarnation=self.registry.incarnation,
                seen_from=env.peer_host,
            )
        return Welcome(
            node_id=result.node_id,
            model=self.config.model or "",
            fingerprint_seed=self.registry.fingerprint_seed,
            heartbeat_s=self.config.heartbeat_s,
            init_seed=self.registry.init_seed,
            incarnation=self.registry.incarnation,
            seen_from=env.peer_host,
        )

    def _check_reachable(self, node_id: int, address: str, public_key: str | None) -> None:
        """Dial the node's advertised address back in the background (nodes.reachability): the
        join is answered at once, the peer table's `reachable` is written within
        REACH_TIMEOUT_S, and the member is offered again with the verdict (unreachable: no
        longer a host; reachable: now a candidate provisional helper)."""

        async def check() -> None:
            ok = await dial_back(self._dialer, address, public_key)
            record = self.registry.table.get(node_id)
            if record is None or record.address != address:
                return  # gone, or joined again from elsewhere (that join checks its own address)
            self.registry.table.update(node_id, reachable=ok)
            if not ok:
                log.warning("node %d: no answer from its address %s; it will not host other owners", node_id, address)
            if self.swarm is not None and self._is_member(node_id) and self.coordination.states[node_id].status == LIVE:
                self._submit(Event.join(node_id, *self._offer(node_id)))  # the verdict, for planning

        task = asyncio.create_task(check(), name=f"reach-{node_id}")
        self._reach_checks.add(task)
        task.add_done_callback(self._reach_checks.discard)

    async def rpc_base_digest(self, env: Any) -> None:
        """Accept the base a node loaded (the first one is the swarm's) or refuse it (`base_mismatch`)."""
        from transport.rpc import RpcError

        body = env.body
        try:
            self._call(self.registry.accept_base, body.node_id, body.digest, now=self.clock(), model=body.model)
        except RpcError as exc:
            if exc.code == "base_mismatch" and self._is_member(body.node_id):
                self._submit(Event.left(body.node_id))  # never planned again
            raise
        log.info(
            "node %d runs base %s (%s, %s)",
            body.node_id,
            body.digest[:12],
            body.revision or body.model,
            body.dtype or "?",
        )
        if self.swarm is not None and not self._is_member(body.node_id):
            self._submit(Event.join(body.node_id, *self._offer(body.node_id)))

    def _is_member(self, node_id: int) -> bool:
        """Whether the coordinator plans with `node_id` (it has joined and its base was accepted),
        counting the events still queued."""
        return self._events is not None and node_id in self._events.states

    def _base_accepted(self, node_id: int) -> bool:
        record = self.registry.table.get(node_id)
        return record is not None and record.base_digest is not None

    async def rpc_heartbeat(self, env: Any) -> Any:
        """Liveness first, and an answer that never waits for the coordinator: the version,
        `need_fingerprint` and `swarm_done` come from the copies the last batch left
        (`coordination.states`), and what the heartbeat tells the coordinator (a dead node
        is back, a node it never saw) is queued."""
        body = env.body
        self._silent.discard(body.node_id)
        record = self._call(
            self.registry.heartbeat,
            body.node_id,
            now=self.clock(),
            state=body.state,
            round=body.round,
            base_version=body.base_version,
            incarnation=body.incarnation,
        )
        if self.swarm is None:
            return None
        from transport.messages import Beat

        events = self.coordination
        if body.node_id not in events.states:  # a node the coordinator never saw (e.g. joined before a restart)
            if record.base_digest is not None:
                self._submit(Event.join(body.node_id, *self._offer(body.node_id)))
        elif events.states[body.node_id].status == DEAD:  # the coordinator lost it: it is back
            self._submit(Event.alive(body.node_id))
        state = events.states.get(body.node_id)
        if state is not None and self.probation.over(body.node_id, state.status == FAILED, self.clock()):
            log.info("node %d served its probation after a failure report: planned back in", body.node_id)
            self._submit(Event.alive(body.node_id))
        need = bool(record.has_data) and state is not None and state.status == LIVE and not state.fingerprinted
        return Beat(
            assignment_version=events.version_for(body.node_id),
            swarm_done=self._swarm_done(record),
            need_fingerprint=need,
            need_base=record.base_digest is None,
            reachable=record.reachable,
            relays=self._relays_for(record) if record.reachable is False else [],
        )

    def _relays_for(self, record: PeerRecord) -> list[str]:
        """Relays a node nobody can dial may use: this bootstrap's (":port", on the host the node
        dials the bootstrap at), then live nodes that volunteer and were dialled back directly."""
        from transport.messages import RELAYS_MAX

        now = time.monotonic()
        if self._volunteers is None or now - self._volunteers[0] > RELAYS_REFRESH_S:  # not a table scan per beat
            rows = self.registry.table.rows()
            found = [(r.id, r.relay) for r in rows if r.relay and r.reachable and not r.via and r.status == ALIVE]
            self._volunteers = (now, found)
        own = [f":{self.relay.port}"] if self.relay is not None else []
        return (own + [relay for n, relay in self._volunteers[1] if n != record.id])[:RELAYS_MAX]

    async def rpc_leave(self, env: Any) -> None:
        self._call(self.registry.leave, env.body.node_id, now=self.clock())
        if self._is_member(env.body.node_id):  # a node refused or still loading was never planned
            done = env.body.reason == "done"
            self._submit(Event.done(env.body.node_id) if done else Event.left(env.body.node_id))
            if done:
                self.registry.table.update(env.body.node_id, state="done")

    # --- the coordinator ------------------------------------------------------------

    async def rpc_fingerprint(self, env: Any) -> None:
        body = env.body
        self._known(body.node_id)
        self._submit_checked(
            Event.fingerprint(body.node_id, body.vector, body.n_samples, body.importance, body.leakage, body.dp)
        )

    async def rpc_report(self, env: Any) -> None:
        from transport.rpc import RpcError

        body = env.body
        self._known(body.node_id)
        metrics = body.metrics
        if metrics.get("event") == "helper_failed":
            helper = metrics.get("helper")
            if not is_int(helper) or helper < 0:
                raise RpcError("bad_request", f"report helper_failed: helper must be a node id, got {helper!r}")
            log.info("node %d reports helper %d failed: %s", body.node_id, helper, metrics.get("why", ""))
            silent = set(self._silent)
            if not self._heard_lately(helper):
                silent.add(helper)  # gone, not slow: the coordinator fails it for all its owners
            self._submit_checked(Event.failure(body.node_id, helper, avoid=tuple(sorted(silent))))

    def _heard_lately(self, node_id: int) -> bool:
        """Alive, with a heartbeat in the last two periods."""
        record = self.registry.table.get(node_id)
        return (
            record is not None
            and record.status == "alive"
            and self.clock() - record.last_seen <= 2.0 * self.config.heartbeat_s
        )

    async def rpc_get_assignment(self, env: Any) -> Any:
        from transport.messages import Assignment
        from transport.rpc import RpcError

        node_id = env.body.node_id
        self._known(node_id)
        try:
            body = self.coordination.assignments.get(node_id)  # as of the last batch
            if body is None:  # queued, not applied yet: wait for the batch being applied
                body = await self.coordination.call(Coordinator.assignment_for, node_id)
        except ValueError as exc:
            raise RpcError("unknown_node", str(exc)) from None
        return Assignment(**body, keys=self._keys_for(body))

    def _known(self, node_id: int) -> None:
        from transport.rpc import RpcError

        if self.registry.table.get(node_id) is None:
            raise RpcError("unknown_node", f"node {node_id} is not in the peer table; join again")

    def _offer(self, node_id: int) -> tuple[Capabilities, str, bool, bool | None, bool]:
        """What a node offered at its latest join, where it serves peers, whether it may host
        other owners' layers (its key is on `--hosts`, or there is no such list, and it is not
        reached through a relay: Petals keeps relayed servers out of routing, they are slow),
        whether it is dialable (None: the bootstrap's check has not come back), and whether
        only through a relay."""
        record = self.registry.table.get(node_id)
        allowed = (self._hosts is None or record.public_key in self._hosts) and not record.via
        return record.capabilities, record.address, allowed, record.reachable, bool(record.via)

    @property
    def coordination(self) -> CoordinatorQueue[_Prepared]:
        """The coordinator's event queue (exists when a swarm is given)."""
        if self._events is None:
            raise RuntimeError("this bootstrap has no coordinator (no swarm was given)")
        return self._events

    @property
    def coordinator(self) -> Coordinator | None:
        """A copy of the coordinator as of the last batch, restored from the state it kept (for
        inspection and tests: the live one runs in the coordinator process). None without a
        swarm."""
        if self._events is None:
            return None
        raw = self._saved_state
        if self._replica is None or self._replica[0] is not raw:
            kept = self._kept_snapshot()
            config = self._events.config
            self._replica = (raw, Coordinator(config) if kept is None else Coordinator.restore(config, kept))
        return self._replica[1]

    def _start_coordinator(self) -> None:
        """Start the coordinator process on the state kept for this swarm (if any)."""
        from nodes.assign import make_coordinator

        self._checker = make_coordinator(self.swarm)
        raw = self.registry.table.get_meta(COORDINATOR_KEY)
        if raw is not None and self._kept_snapshot(raw, warn=True) is not None:
            self._saved_state = raw
        self._events, started = CoordinatorQueue.start(
            self._checker.config,
            clock=self.clock,
            prepare=_PrepareBatch(self.config.state_dir, dataclasses.asdict(self.swarm)),
            commit=self._commit_batch,
            kept=self._kept_snapshot,
        )
        if started.error is not None:
            log.warning("cannot restore the coordinator kept in the state dir (%s): starting empty", started.error)
        elif started.restored:
            log.info(
                "restored the coordinator: assignment version %d, %s, %d nodes",
                started.version,
                "not clustered yet" if started.clusters is None else f"{started.clusters} clusters",
                started.nodes,
            )

    def _kept_snapshot(self, raw: str | None = None, warn: bool = False) -> dict[str, Any] | None:
        """The coordinator state in `raw` (default: the one last kept) if it is this swarm's."""
        raw = self._saved_state if raw is None else raw
        if raw is None:
            return None
        try:
            kept = json.loads(raw)
            if kept.get("swarm") == json.loads(json.dumps(dataclasses.asdict(self.swarm))):
                return kept["state"]
            if warn:
                log.warning(
                    "the state dir holds a coordinator of another swarm (%s): starting empty", kept.get("swarm")
                )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if warn:
                log.warning("cannot restore the coordinator kept in the state dir (%s): starting empty", exc)
        return None

    def _submit(self, event: Event) -> None:
        """Queue an event for the coordinator (applied in the next batch; never waits)."""
        self.coordination.submit(event)

    def _submit_checked(self, event: Event) -> None:
        """Queue a fingerprint or failure report once `Coordinator.precheck` accepts it against
        the members as of the queue, so bad input is still a `bad_request` reply."""
        from transport.rpc import RpcError

        try:
            self._checker.precheck(event, self.coordination.states)
        except ValueError as exc:
            raise RpcError("bad_request", str(exc)) from None
        self._submit(event)

    def _commit_batch(self, prepared: _Prepared) -> None:
        """On the loop after a batch: write the plan's columns and keep the state (`_persist`)."""
        if prepared.columns is not None:
            self._publish_plan(prepared.columns)
        self._persist(prepared.state)

    def _persist(self, state: str) -> None:
        """Write the coordinator's snapshot into the peer table's meta when it changed (an event
        may change it without changing an assignment, e.g. a fingerprint before the first
        clustering). One SQLite write: a kill -9 leaves the previous state or this one."""
        if state != self._saved_state:
            self.registry.table.set_meta(COORDINATOR_KEY, state)
            self._saved_state = state

    def _publish_plan(self, columns: dict[int, dict[str, Any]]) -> None:
        """Write the plan's columns of the rows whose columns changed since the last write
        (rows expired meanwhile are skipped)."""
        changed = {n: c for n, c in columns.items() if self._columns.get(n) != c}
        table = self.registry.table
        table.update_many({n: c for n, c in changed.items() if table.get(n) is not None})
        self._columns.update(changed)

    def _swarm_done(self, asking: PeerRecord) -> bool:
        """Assigned, and every data node still around says it is done.

        A data node that died recently still counts as around for another 2 x dead_after_s:
        it may be restarted on its --out and resume, and it needs its cluster's anchor then.
        It reads the whole table, so heartbeats share one answer for heartbeat_s: a node
        learns that the swarm is done one heartbeat later at most. A data node that is not
        done is the answer itself (it is around and not done): no read.
        """
        now = self.clock()
        if asking.has_data and asking.state != "done":
            self._done = (now, False)
        elif self._done is None or not 0 <= now - self._done[0] < self.config.heartbeat_s:
            self._done = (now, self._swarm_done_now())
        return self._done[1]

    def _swarm_done_now(self) -> bool:
        if not self.coordination.assigned:
            return False
        now = self.clock()
        rows = [r for r in self.registry.table.rows() if r.has_data]
        recent = 3.0 * self.config.dead_after_s  # dead_after_s of silence, then the grace
        around = [
            r for r in rows if r.status in ("alive", "suspect") or (r.status == "dead" and now - r.last_seen < recent)
        ]
        return bool(rows) and all(r.state == "done" and r.status != "dead" for r in around)

    async def _adopt_known_nodes(self) -> None:
        """After a restart on the same state: every live row the coordinator does not hold (it
        started empty, or the node joined after the state was kept) becomes a member."""
        for record in self.registry.table.rows():
            if record.id in self.coordination.states:
                continue
            if record.status in ("alive", "suspect") and record.base_digest is not None:
                self._submit(Event.join(record.id, *self._offer(record.id)))

    async def rpc_peers(self, env: Any) -> Any:
        from transport.messages import PeerList

        body = env.body
        now = self.clock()
        records = self.registry.table.rows()
        if body.cluster is not None:
            records = [record for record in records if record.cluster == body.cluster]
        rows = [record.to_dict() for record in records[body.offset : body.offset + body.limit]]
        for row in rows:
            row["last_seen_ago_s"] = round(max(0.0, now - row["last_seen"]), 3)
        return PeerList(rows=rows, total=len(records))

    @staticmethod
    def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a registry request; a refusal becomes an `error` reply with its code (and is counted)."""
        from transport.rpc import RpcError

        try:
            return fn(*args, **kwargs)
        except RequestError as exc:
            raise RpcError(exc.code, exc.message) from None
        except ValueError as exc:  # a value the peer table cannot hold (e.g. beyond 64 bits)
            raise RpcError("bad_request", str(exc)) from None

    # --- time --------------------------------------------------------------------------------

    async def _sweep_forever(self) -> None:
        """Liveness on its own schedule: the deaths it finds are queued for the coordinator,
        never awaited (a re-plan must not delay the next sweep). A sweep reads every row; when
        that takes long (a big table) the next one waits twice as long as it took, so sweeping
        holds the event loop a third of the time at most and heartbeats are still answered."""
        took = 0.0
        while True:
            await asyncio.sleep(max(self.config.sweep_s, 2 * took))
            started = time.perf_counter()
            try:
                changes = self.registry.sweep(self.clock())
                if self.swarm is not None:
                    for node_id, _, new in changes:
                        if new == "suspect":
                            self._silent.add(node_id)
                        else:
                            self._silent.discard(node_id)
                    for node_id, _, new in changes:
                        # an expired row is gone for good: a member still serving is repaired
                        if new in ("dead", EXPIRED) and self._is_member(node_id):
                            self._submit(Event.dead(node_id, avoid=tuple(sorted(self._silent))))
                    if not self.coordination.assigned:
                        self._submit(Event.tick())  # the first assignment may be due by the timer
            except Exception:  # a failing disk must not end liveness tracking for good
                log.exception("liveness sweep failed; retrying")
            took = time.perf_counter() - started


async def serve_bootstrap(config: BootstrapConfig, stop: asyncio.Event, swarm: Any = None) -> None:
    """Run a bootstrap until `stop` is set (the CLI sets it on SIGINT/SIGTERM)."""
    service = await Bootstrap.create(config, swarm=swarm)
    if service.token is not None:
        where = f" (kept in {config.state_dir / TOKEN_FILE})" if config.state_dir is not None else ""
        log.info("join token%s: %s", where, service.token.text())
        log.info(
            "nodes join with: atlas-node join --bootstrap %s --token %s ...",
            service.address,
            f"@{config.state_dir / TOKEN_FILE}" if config.state_dir is not None else service.token.text(),
        )
    try:
        await stop.wait()
        log.info("bootstrap shutting down")
    finally:
        await service.stop()
