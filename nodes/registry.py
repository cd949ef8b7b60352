"""Membership logic of the bootstrap, synchronous and transport-free.

`Registry` turns join / heartbeat / leave / peers requests and the passage of time into
changes of the peer table. It takes plain values and an explicit `now`, so it is tested
without sockets or clocks; nodes/bootstrap.py is the thin async shell that feeds it
messages. A request that does not make sense (unknown node, bad address) raises
`RequestError(code, message)`, which the shell answers as an `error` reply; the table is
left untouched in that case.

Every state has an incarnation (nodes/state_seal.py), handed to nodes in `welcome`: a
node's id is only its own in the incarnation that gave it, so a join or heartbeat naming an
id of another incarnation is treated as unknown (a new id; the row holding that id here is
another node's). Rows dead or left for `expire_after_s` are deleted by the sweep (their ids
are never handed out again), and the table holds at most `max_nodes` rows (`full`).

One base per swarm: the registry hands out an init seed (the parameters a checkpoint
lacks are drawn from it) and keeps the swarm's base digest, the first one a node
reports for the swarm's model (both persisted in the table's meta). A node reporting
another digest is refused with `base_mismatch` and marked left.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from atlas_p2p.capabilities import Capabilities
from nodes.config import BootstrapConfig, parse_address
from nodes.liveness import ALIVE, DEAD, LEFT, silence, status_after_heartbeat, status_after_silence
from nodes.peer_table import PeerRecord, PeerTable, new_record
from nodes.state_seal import INCARNATION_KEY, new_incarnation

log = logging.getLogger("atlas.bootstrap")

_SEED_KEY = "fingerprint_seed"
_INIT_SEED_KEY = "init_seed"
_BASE_KEY = "base_digest"
_UNROUTABLE_HOSTS = {"*", "0.0.0.0", "[::]"}
EXPIRED = "expired"  # what `sweep` reports for a row it deleted


class RequestError(Exception):
    """A request the registry refuses; `code` is a stable token sent back to the caller."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class JoinResult:
    """Outcome of a join: the node's id, and whether it kept an id it already had."""

    node_id: int
    rejoined: bool


class Registry:
    """Who is in the swarm and whether they are alive, backed by a `PeerTable`."""

    def __init__(self, table: PeerTable, config: BootstrapConfig, *, now: float) -> None:
        self.table = table
        self.config = config
        self.started_at = now
        if table.incarnation is None:  # a table opened without its seal (tests): give it one
            table.set_meta(INCARNATION_KEY, new_incarnation())
        self.incarnation: str = table.incarnation
        self.fingerprint_seed = self._settle_seed(config.fingerprint_seed)
        self.init_seed = self._settle_seed(config.init_seed, _INIT_SEED_KEY, "init seed")
        # client name -> node id it was given: a join retried by the same process (its
        # earlier attempt was queued, not lost) gets the same id instead of a second row
        self._ids_by_client: dict[str, int] = {}
        # public key -> the node id bound to it at its first join (identity by key)
        self._ids_by_key: dict[str, int] = {r.public_key: r.id for r in table.rows() if r.public_key}
        # and back: node id -> its key, so an assignment's keys cost no table reads
        self._keys_by_id: dict[int, str] = {n: k for k, n in self._ids_by_key.items()}

    def _settle_seed(self, wanted: int | None, key: str = _SEED_KEY, what: str = "fingerprint seed") -> int:
        """A seed every node uses (fingerprint projection, init of missing parameters); kept in the
        table across restarts."""
        stored = self.table.get_meta(key)
        if wanted is None:
            if stored is not None:
                return int(stored)
            wanted = secrets.randbits(63)
        elif stored is not None and int(stored) != wanted:
            log.warning("%s changed from %s to %s: what nodes computed with the old one is stale", what, stored, wanted)
        self.table.set_meta(key, str(wanted))
        return wanted

    # --- one base per swarm --------------------------------------------------------------

    @property
    def swarm_base(self) -> str | None:
        """The swarm's base digest (first accepted for this model and init seed), or None yet."""
        raw = self.table.get_meta(_BASE_KEY)
        if raw is None:
            return None
        try:
            stored = json.loads(raw)
        except ValueError:
            return None
        if stored.get("model") != (self.config.model or "") or stored.get("init_seed") != self.init_seed:
            return None  # another model or seed than the one this bootstrap runs: start over
        return stored.get("digest")

    def accept_base(self, node_id: int, digest: str, *, now: float, model: str = "") -> bool:
        """Record the base a node loaded; the first one accepted becomes the swarm's.

        Returns True when the node's row changed (a first acceptance). A digest other than
        the swarm's raises RequestError("base_mismatch") naming both digests and the usual
        causes; the node's row is marked left so nothing plans with it.
        """
        from atlas_p2p.models.base import mismatch_message

        record = self._known(node_id)
        if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise RequestError("bad_request", f"base digest must be 64 lowercase hex digits, got {digest!r:.80}")
        swarm = self.swarm_base
        if swarm is None:
            self.table.set_meta(
                _BASE_KEY,
                json.dumps(
                    {
                        "model": self.config.model or "",
                        "init_seed": self.init_seed,
                        "digest": digest,
                        "first_node": node_id,
                        "at": now,
                    }
                ),
            )
            log.info(
                "swarm base is %s (model %s, first reported by node %d)",
                digest[:12],
                self.config.model or model or "?",
                node_id,
            )
            swarm = digest
        if digest != swarm:
            message = mismatch_message(self.config.model or model, swarm, digest)
            self.table.update(
                node_id,
                status=LEFT,
                state="left",
                last_seen=now,
                base_digest=None,
                reason=f"refused: base {digest[:12]} != swarm {swarm[:12]}",
            )
            log.warning("node %d refused: %s", node_id, message)
            raise RequestError("base_mismatch", message)
        if record.base_digest == digest:
            return False
        self.table.update(node_id, base_digest=digest)
        return True

    # --- requests ----------------------------------------------------------------------

    def join(
        self,
        capabilities: Capabilities,
        *,
        address: str,
        now: float,
        model: str | None = None,
        public_key: str | None = None,
        node_id: int | None = None,
        client: str | None = None,
        incarnation: str = "",
        via: str | None = None,
        relay: str | None = None,
    ) -> JoinResult:
        """Admit a node offering `capabilities`; one that names an id the table knows keeps it
        (a rejoin).

        `public_key` is the key the connection authenticated (None in an insecure swarm). A
        node id is bound to the key of its first join: a join naming an id bound to another
        key is refused (`unauthorized`, nothing changes), and a join from a key that already
        has a row is that node coming back, whatever id it names.
        Without keys, `client` is the sender's name on the wire (unique per process): a
        repeated join from the same client without an id is the same node, so it keeps its
        first id. `via`: the relay its address goes through; `relay`: the relay it volunteers.
        """
        _check_peer_address(address)
        for name, value in (("via", via), ("relay", relay)):
            if value is not None:
                _check_peer_address(value, what=name)
        if relay is not None and parse_address(relay, what="relay")[0] != parse_address(address, what="address")[0]:
            # a volunteer names its own host: nobody steers relayed nodes to a third machine
            raise RequestError("bad_address", f"relay {relay!r} is not on the node's own host ({address!r})")
        if not isinstance(capabilities, Capabilities):
            raise RequestError("bad_request", f"capabilities must be a Capabilities, got {capabilities!r:.80}")
        bound = self.node_of(public_key) if public_key is not None else None
        if bound is not None:
            node_id = bound  # this key's node coming back, whatever id it names
        else:
            claimed = self.table.get(node_id) if node_id is not None else None
            if public_key is not None and claimed is not None and claimed.public_key != public_key:
                raise RequestError("unauthorized", f"node {node_id} belongs to another key; join without an id")
            if node_id is not None and incarnation != self.incarnation:
                # an id from another incarnation of the state (or from before incarnations): here it
                # is unknown, or another node's
                log.info(
                    "join names node id %s of incarnation %r, this state is %s: handing out a new id",
                    node_id,
                    incarnation[:64],
                    self.incarnation,
                )
                node_id = None
            if public_key is None and node_id is None and client is not None:
                node_id = self._ids_by_client.get(client)
        known = self.table.get(node_id) if node_id is not None else None
        if node_id is not None and known is None:
            log.info("join names unknown node id %s: handing out a new one", node_id)
        fields = dict(address=address, model=model or None, public_key=public_key, now=now, via=via, relay=relay)
        if known is not None:
            record = new_record(known.id, capabilities, **fields)
            # keep what planning assigned; the node reports its progress again by heartbeat
            keep = {
                k: getattr(known, k) for k in ("cluster", "split", "helper", "round", "base_version", "base_digest")
            }
            self.table.put(PeerRecord(**{**record.to_dict(), **keep}))
            log.info("node %d rejoined from %s (was %s)", known.id, address, known.status)
            self._remember(client, known.id, public_key)
            return JoinResult(known.id, rejoined=True)
        if self.table.count() >= self.config.max_nodes:
            raise RequestError(
                "full", f"the peer table holds {self.config.max_nodes} nodes, the most it keeps; try again later"
            )
        new_id = self.table.allocate_id()
        self.table.put(new_record(new_id, capabilities, **fields))
        self._remember(client, new_id, public_key)
        log.info(
            "node %d joined from %s: %s, %d bytes, %d bit/s",
            new_id,
            address,
            "trainer" if capabilities.has_data else "helper",
            capabilities.memory_bytes,
            capabilities.bandwidth_bps,
        )
        return JoinResult(new_id, rejoined=False)

    def _remember(self, client: str | None, node_id: int, public_key: str | None) -> None:
        if public_key is not None:
            self._ids_by_key[public_key] = node_id
            self._keys_by_id[node_id] = public_key
            return
        if client is not None:
            self._ids_by_client[client] = node_id
            if len(self._ids_by_client) > 100_000:  # bound memory: forget the oldest clients
                for stale in list(self._ids_by_client)[:10_000]:
                    del self._ids_by_client[stale]

    def node_of(self, public_key: str) -> int | None:
        """The node bound to `public_key`, or None (no node of this swarm holds it)."""
        node_id = self._ids_by_key.get(public_key)
        return node_id if node_id is not None and self.table.get(node_id) is not None else None

    def public_keys(self, node_ids: Iterable[int]) -> dict[str, str]:
        """{str(id): public key} of those of `node_ids` that joined with a key (from memory: an
        assignment names hundreds of nodes, and a table read each cost most of a large swarm's
        bootstrap CPU)."""
        keys = self._keys_by_id
        return {str(n): keys[n] for n in sorted(node_ids) if n in keys}

    def check_sender(self, node_id: int, public_key: str) -> None:
        """Refuse (`unauthorized`) a request naming `node_id` from a connection with another key.

        `public_key` "" means the swarm runs without keys: nothing to check. An unknown id
        is left to the request itself (it answers `unknown_node`).
        """
        if not public_key:
            return
        record = self.table.get(node_id)
        if record is not None and record.public_key != public_key:
            raise RequestError(
                "unauthorized", f"this connection's key is not node {node_id}'s; a node speaks for itself"
            )

    def heartbeat(
        self,
        node_id: int,
        *,
        now: float,
        state: str | None = None,
        round: int | None = None,
        base_version: int | None = None,
        incarnation: str = "",
    ) -> PeerRecord:
        """Record a sign of life; a suspect or dead node is alive again, a left one must rejoin.

        A heartbeat naming the incarnation its id came from ("" = not said) is refused as
        `unknown_node` when that is not this state's: the row is another node's, not its.
        """
        if incarnation and incarnation != self.incarnation:
            raise RequestError(
                "unknown_node", f"node id {node_id} is from another incarnation of the state; join again"
            )
        record = self._known(node_id)
        status = status_after_heartbeat(record.status)
        if status is None:
            raise RequestError("unknown_node", f"node {node_id} has left; join again")
        changes: dict[str, Any] = {"status": status, "last_seen": now}
        if state is not None:
            changes["state"] = state
        if round is not None:
            changes["round"] = round
        if base_version is not None:
            changes["base_version"] = base_version
        if record.status != ALIVE:
            log.info("node %d is back: %s -> alive", node_id, record.status)
        self.table.update_many({node_id: changes})
        return dataclasses.replace(record, **changes)  # the row as now written, without reading it again

    def leave(self, node_id: int, *, now: float) -> None:
        """Mark a node as gone on purpose; repeating it is harmless."""
        record = self._known(node_id)
        if record.status != LEFT:
            self.table.update(node_id, status=LEFT, state="left", last_seen=now)
            log.info("node %d left", node_id)

    def rows(self) -> list[dict[str, Any]]:
        """The peer table as JSON-ready dicts, in id order."""
        return [record.to_dict() for record in self.table.rows()]

    # --- time ----------------------------------------------------------------------------

    def sweep(self, now: float) -> list[tuple[int, str, str]]:
        """Apply silence-based liveness to every row and delete the rows dead or left for
        `expire_after_s`; returns the (node_id, old, new) changes, new = EXPIRED for a deleted row."""
        changes: list[tuple[int, str, str]] = []
        expired: list[tuple[int, str, str]] = []
        for node_id, old, last_seen in self.table.liveness():
            if old in (DEAD, LEFT):
                if now - last_seen >= self.config.expire_after_s:
                    expired.append((node_id, old, EXPIRED))
                continue
            silent = silence(now, last_seen, self.started_at, self.config.restart_grace_s)
            status = status_after_silence(old, silent, self.config.suspect_after_s, self.config.dead_after_s)
            if status != old:
                changes.append((node_id, old, status))
        if changes:
            self.table.update_many({node_id: {"status": new} for node_id, _, new in changes})
            for node_id, old, new in changes:
                log.info("node %d: %s -> %s (no heartbeat)", node_id, old, new)
        if expired:
            ids = [node_id for node_id, _, _ in expired]
            self.table.delete_many(ids)
            gone = set(ids)  # their keys and client names name no row any more
            self._ids_by_key = {k: n for k, n in self._ids_by_key.items() if n not in gone}
            self._keys_by_id = {n: k for n, k in self._keys_by_id.items() if n not in gone}
            self._ids_by_client = {c: n for c, n in self._ids_by_client.items() if n not in gone}
            shown = ", ".join(map(str, ids[:10])) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
            log.info("deleted %d rows dead or left for %g s: %s", len(ids), self.config.expire_after_s, shown)
        return changes + expired

    def _known(self, node_id: int) -> PeerRecord:
        record = self.table.get(node_id)
        if record is None:
            raise RequestError("unknown_node", f"node {node_id} is not in the peer table; join again")
        return record


def _check_peer_address(address: str, what: str = "address") -> None:
    """A node's advertised address (or relay) must be dialable: HOST:PORT, a real host, port > 0."""
    try:
        host, _ = parse_address(address, what=what)
    except ValueError as exc:
        raise RequestError("bad_address", str(exc)) from None
    if host in _UNROUTABLE_HOSTS:
        raise RequestError("bad_address", f"{what} {address!r} is not dialable by peers (wildcard host)")
