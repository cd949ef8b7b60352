"""The bootstrap's assignment brain: membership events in, assignments out.

`Coordinator` is a pure synchronous object. The bootstrap service feeds it what it learns
(a join, a fingerprint, a death, a departure, a finished node, an owner's report that its
helper missed a deadline) with an explicit clock value, and asks it for each node's
`assignment` (a plain dict matching transport.messages.Assignment) and for the peer table
columns it should write. No sockets, no time.time, no randomness beyond the seeded k-means.

What it decides (DESIGN 6 and 7, docs/RUNTIME.md):
1. First clustering. Once `min_nodes` live data nodes have sent fingerprints, or
   `assign_after_s` seconds after the first fingerprint, k-means on the unit
   fingerprints (atlas_p2p.clustering) with K fixed (`clusters`) or chosen by the
   silhouette score; then a full plan (atlas_p2p.planning.make_plan) of every live data
   node with a fingerprint and every live pure helper. Pure helpers send no fingerprint;
   they are planned task-blind (cluster None).
2. Growth. A data node whose fingerprint arrives later is put in the cluster of the
   nearest centroid (no re-clustering, ids stay), and the swarm is re-planned when
   `planning.replan_reason` finds a reason (membership, budgets, or cluster importance
   moved by more than τ). A pure helper joining later, or a node coming back, is the
   same membership change.
3. Loss. A node that is dead, left, done, or reported failed is taken out with
   `planning.repair`, which changes as little as possible: only owners whose helper went
   get a new one (same cluster or a pure helper: a *repair*; another cluster, nearest
   centroid first: a *fallback*; none at all: the owner waits, *unpaired*). Each such
   event is recorded (time, owner, old helper, new helper, kind) for the metrics;
   `repairs` counts every helper replacement, `fallbacks` the cross-cluster ones.
4. Anchors. The anchor of a cluster is chosen among its live members: members that can
   train over waiting ones, and of those, members the bootstrap could dial back over ones
   nobody can reach (members dial their anchor). It stays while it is among the best so
   chosen (no hand-over between two live members because a lower id arrived); otherwise
   the lowest id of the best takes over: a dead anchor is replaced at once, and the
   change is recorded.
5. Provisional helpers. A data node too weak for the whole model cannot compute its
   fingerprint alone (DESIGN 2.2); until its fingerprint arrives its assignment (role
   waiting, no cluster) names a helper and split from a hypothetical task-blind plan.
   The real plan does not change and the helper's own assignment does not list the
   node (how a helper answers a fingerprint forward from a node it does not serve is
   the runtime's decision).

Versions. Every node has an assignment version: the value of a global counter at the last
change of that node's assignment. The counter increases by one for every event that
changes at least one assignment, so each node's version only grows, and a heartbeat
carrying an older version means the node must fetch its assignment again. A node that
was never planned nor given a provisional helper keeps version 0 (nothing to fetch yet).

A done node that still serves owners of a cluster still training keeps serving them
(its assignment becomes a helper's) until it leaves or dies; then they are repaired.

Ids are ints here and on the wire; atlas_p2p.planning names nodes by str, converted at
this boundary. Every method either fully applies an event or raises ValueError and
leaves the coordinator exactly as it was.

Use from the bootstrap: `on_join(id, row.capabilities, row.address)` after a join,
`on_alive` when a heartbeat revives a dead row, `on_dead` / `on_left` from the sweep and
`leave`, `on_fingerprint` per `fingerprint` message, `report_failure` per owner report,
`maybe_assign(now)` on every sweep tick. When a call returns True, write `peer_columns()`
into the peer table (and `snapshot()` where the state lives); a heartbeat whose
`assignment_version` differs from `version_for(id)` is answered with
`Assignment(**assignment_for(id))`. Not thread-safe; `maybe_assign` and `recluster` run
k-means with its null reference and a full plan (about a second for tens of nodes), so
call it from one executor thread if the event loop must keep answering meanwhile.

Batches. The bootstrap queues the same events as `Event` values and feeds everything that
queued up to `apply(events, now=...)`: each event changes membership (and repairs a lost
helper's owners) as its method does, then one re-plan check, one `maybe_assign` and one
publish close the batch, so a burst of N deaths or joins costs one planning pass instead
of N. `summary()` gives each member's status, data flag, fingerprint flag and version, the
loop-side copy a heartbeat is answered from; `expected_state` advances it over events still
queued and `precheck` refuses a bad fingerprint or failure report before it is queued.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from atlas_p2p.capabilities import Capabilities
from atlas_p2p.clustering import (
    Clustering,
    ClusteringConfig,
    assign_nearest,
    cluster_fingerprints,
)
from atlas_p2p.importance import TAU, cluster_importance, importance_change
from atlas_p2p.memory import ModelShape, Workload, lora_candidates
from atlas_p2p.planning import (
    HELPER,
    OWNER,
    WAITING,
    NodeInfo,
    NodePlan,
    Plan,
    PlanConfig,
    PlanContext,
    admit,
    fits_whole_model,
    make_plan,
    privacy_min_split,
    repair,
    replan_reason,
)
from atlas_p2p.validation import is_number, require_int, require_number
from nodes.config import parse_address

log = logging.getLogger("atlas.coordinator")

# Where a node stands in the coordinator (not the liveness status of the registry).
LIVE = "live"
DEAD = "dead"
LEFT = "left"
DONE = "done"
FAILED = "failed"  # an owner reported it missed a deadline; out until it joins again or serves its probation
SLOW = "slow"  # a repair cause: the owner reported a helper that still heartbeats; only that pair is undone

# Kinds of repair events.
REPAIR = "repair"  # new helper from the owner's cluster, or a pure helper
FALLBACK = "fallback"  # new helper from another cluster (nearest centroid first)
UNPAIRED = "unpaired"  # no feasible helper anywhere: the owner waits

STATE_FORMAT = 1  # version of the `snapshot()` layout


# ------------------------------------------------------------------ configuration and records


@dataclass(frozen=True)
class CoordinatorConfig:
    """How the bootstrap clusters and plans (flags of `atlas-node bootstrap`)."""

    shape: ModelShape  # the model the swarm trains (atlas_p2p.memory.shape_from_config)
    workload: Workload  # batch and sequence length of one training step
    plan: PlanConfig = PlanConfig()  # planner knobs (headroom, ranks, privacy floor, split mode)
    min_nodes: int = 2  # data nodes with fingerprints that trigger the first clustering
    assign_after_s: float = 30.0  # ... or seconds after the first fingerprint, whichever is first
    clusters: int | None = None  # fixed K (--clusters); None: chosen by silhouette
    k_max: int = ClusteringConfig.k_max  # largest K tried when choosing by silhouette
    silhouette_threshold: float = ClusteringConfig.min_silhouette  # no K >= 2 reaching this: one cluster
    seed: int = 0  # k-means random state
    fingerprint_dim: int = 64  # length of a fingerprint vector
    # --privacy-floor: an owner sends only after the first block where the psi it measured on its
    # data (atlas_p2p.privacy.leakage) is at most this; None: no floor, nodes measure nothing
    privacy_floor: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.shape, ModelShape):
            raise ValueError(f"CoordinatorConfig.shape must be a ModelShape, got {self.shape!r:.80}")
        if not isinstance(self.workload, Workload):
            raise ValueError(f"CoordinatorConfig.workload must be a Workload, got {self.workload!r:.80}")
        if not isinstance(self.plan, PlanConfig):
            raise ValueError(f"CoordinatorConfig.plan must be a PlanConfig, got {self.plan!r:.80}")
        require_int("CoordinatorConfig.min_nodes", self.min_nodes, 1)
        require_number("CoordinatorConfig.assign_after_s", self.assign_after_s, 0)
        if self.clusters is not None:
            require_int("CoordinatorConfig.clusters", self.clusters, 1)
        require_int("CoordinatorConfig.k_max", self.k_max, 2)
        require_number("CoordinatorConfig.silhouette_threshold", self.silhouette_threshold, -1, 1)
        require_int("CoordinatorConfig.seed", self.seed)
        require_int("CoordinatorConfig.fingerprint_dim", self.fingerprint_dim, 1)
        if self.privacy_floor is not None:
            require_number("CoordinatorConfig.privacy_floor", self.privacy_floor, 0)
        _ = self.context  # PlanContext checks the privacy floor against the model depth

    @property
    def context(self) -> PlanContext:
        return PlanContext(self.shape, self.workload, self.plan)

    def clustering(self, k: int | None) -> ClusteringConfig:
        return ClusteringConfig(k=k, k_max=self.k_max, min_silhouette=float(self.silhouette_threshold), seed=self.seed)


@dataclass(frozen=True)
class RepairEvent:
    """An owner lost its helper and what the coordinator did about it."""

    time: float  # clock value of the event that caused it
    owner: int
    old_helper: int
    new_helper: int | None  # None: nobody can help; the owner waits
    kind: str  # REPAIR | FALLBACK | UNPAIRED
    cause: str  # what happened to the old helper: dead | left | done | failed | slow (only this pair undone)
    cluster: int | None  # the owner's cluster

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AnchorChange:
    """A cluster's anchor moved to another member (its anchor went, waits, or cannot be dialled)."""

    time: float
    cluster: int
    old_anchor: int
    new_anchor: int | None  # None: no live member left

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Kinds of events for `Coordinator.apply` (each maps onto one event method).
JOIN = "join"  # on_join
ALIVE = "alive"  # on_alive
DEAD_EVENT = "dead"  # on_dead
LEFT_EVENT = "left"  # on_left
DONE_EVENT = "done"  # on_done
FINGERPRINT = "fingerprint"  # on_fingerprint
FAILURE = "failure"  # report_failure (node_id is the owner)
TICK = "tick"  # nothing but the maybe_assign every batch ends with
EVENT_KINDS = frozenset({JOIN, ALIVE, DEAD_EVENT, LEFT_EVENT, DONE_EVENT, FINGERPRINT, FAILURE, TICK})


@dataclass(frozen=True)
class Event:
    """One membership event, queued by the bootstrap and applied by `Coordinator.apply`.

    Build with the class methods; the fields a kind does not use keep their defaults.
    Values are checked when the event is applied (or by `Coordinator.precheck`).
    """

    kind: str  # one of EVENT_KINDS
    node_id: int = 0  # the node the event is about (the reporting owner for a failure)
    caps: Capabilities | None = None  # join: what the node offers
    address: str = ""  # join: where it serves peers
    vector: np.ndarray | None = None  # fingerprint: (d,) raw vector
    n_samples: int = 0  # fingerprint: examples it averages over
    importance: Mapping[str, float] | None = None  # fingerprint: optional importance probe
    leakage: tuple[float, ...] | None = None  # fingerprint: psi(s) for s = 1..L-1, when the floor asks
    dp: tuple[float, float] | None = None  # fingerprint: (epsilon, delta) of its DP release, None: no DP
    helper: int = 0  # failure: the helper the owner saw miss a deadline
    may_host: bool = True  # join: whether the operator lets the node run other owners' layers
    # join: whether the bootstrap could dial its address back (None: its check has not come back)
    reachable: bool | None = True
    relayed: bool = False  # join: reached only through a relay (slow: never a helper, anchor last)
    avoid: tuple[int, ...] = ()  # failure, dead: nodes silent right now, handed out as helpers last

    def __post_init__(self) -> None:
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"Event.kind must be one of {sorted(EVENT_KINDS)}, got {self.kind!r}")

    @classmethod
    def join(
        cls,
        node_id: int,
        caps: Capabilities,
        address: str,
        may_host: bool = True,
        reachable: bool | None = True,
        relayed: bool = False,
    ) -> Event:
        return cls(JOIN, node_id, caps=caps, address=address, may_host=may_host, reachable=reachable, relayed=relayed)

    @classmethod
    def alive(cls, node_id: int) -> Event:
        return cls(ALIVE, node_id)

    @classmethod
    def dead(cls, node_id: int, avoid: tuple[int, ...] = ()) -> Event:
        return cls(DEAD_EVENT, node_id, avoid=tuple(avoid))

    @classmethod
    def left(cls, node_id: int) -> Event:
        return cls(LEFT_EVENT, node_id)

    @classmethod
    def done(cls, node_id: int) -> Event:
        return cls(DONE_EVENT, node_id)

    @classmethod
    def fingerprint(
        cls,
        node_id: int,
        vector: np.ndarray,
        n_samples: int,
        importance: Mapping[str, float] | None = None,
        leakage: Sequence[float] | None = None,
        dp: Sequence[float] | None = None,
    ) -> Event:
        leakage = None if leakage is None else tuple(leakage)
        dp = None if dp is None else tuple(dp)
        return cls(
            FINGERPRINT, node_id, vector=vector, n_samples=n_samples, importance=importance, leakage=leakage, dp=dp
        )

    @classmethod
    def failure(cls, owner: int, helper: int, avoid: tuple[int, ...] = ()) -> Event:
        return cls(FAILURE, owner, helper=helper, avoid=tuple(avoid))

    @classmethod
    def tick(cls) -> Event:
        return cls(TICK)


@dataclass(frozen=True)
class MemberState:
    """What the bootstrap needs of one member to answer a heartbeat or check a request
    without waiting for the coordinator (`Coordinator.summary`, `expected_state`)."""

    status: str  # live | dead | left | done | failed
    has_data: bool  # a data node (False: a pure helper)
    fingerprinted: bool  # the coordinator holds its fingerprint
    version: int  # its assignment version (0: never planned)


def expected_state(state: MemberState | None, event: Event) -> MemberState | None:
    """The member's state once `event` is applied, as far as the event alone tells (a
    failure report depends on the plan and changes nothing here; the version only moves
    when the coordinator publishes). None: not a member."""
    if event.kind == JOIN and event.caps is not None:
        same_kind = state is not None and state.has_data == event.caps.has_data
        return MemberState(
            LIVE, event.caps.has_data, same_kind and state.fingerprinted, 0 if state is None else state.version
        )
    if state is None:
        return None
    if event.kind == ALIVE and state.status in (DEAD, FAILED):
        return dataclasses.replace(state, status=LIVE)
    lost = {DEAD_EVENT: DEAD, LEFT_EVENT: LEFT, DONE_EVENT: DONE}.get(event.kind)
    if lost is not None:
        return dataclasses.replace(state, status=lost)
    if event.kind == FINGERPRINT and state.has_data and state.status == LIVE:
        return dataclasses.replace(state, fingerprinted=True)
    return state


@dataclass(frozen=True)
class Applied:
    """What `Coordinator.apply` did with a batch."""

    changed: bool  # some assignment changed (write `peer_columns()`)
    errors: tuple[ValueError | None, ...]  # per event: why it was refused, or None
    plans: int  # full planning passes it ran (make_plan), at most one besides the first assignment


@dataclass
class _Batch:
    """Deferred work while `Coordinator.apply` runs (see there)."""

    grow: bool = False  # some event asked `_grow` for a re-plan check
    causes: list[str] = dataclasses.field(default_factory=list)  # publish causes, in order
    node_causes: dict[int, str] = dataclasses.field(default_factory=dict)  # per-node cause overrides
    subject: int | None = None  # the node of the event being applied
    broken: bool = False  # an event failed half-way: the batch must be undone


@dataclass(frozen=True)
class _Board:
    """Per-publish summary shared by every view."""

    members: dict[int, list[int]]  # cluster -> its live data nodes in the plan, ascending
    anchors: dict[int, int | None]  # cluster -> anchor (None: nobody left)
    provisional: dict[int, tuple[int, int]]  # node -> (provisional helper, split)


@dataclass
class _Member:
    """The coordinator's record of one node (mutable; copied whole by `_atomic`)."""

    caps: Capabilities
    address: str  # HOST:PORT of the node's RPC server (handed to its partners)
    status: str = LIVE
    vector: np.ndarray | None = None  # (d,) unit fingerprint
    n_samples: int = 0
    importance: dict[str, float] | None = None  # per-weight importance probe
    cluster: int | None = None
    note: str = ""  # why it is out of the plan (status other than live)
    may_host: bool = True  # the operator lets it run other owners' layers (planning.NodeInfo)
    leakage: list[float] | None = None  # psi(s) for s = 1..L-1 on its data (privacy floor)
    dp: list[float] | None = None  # [epsilon, delta] of its fingerprint's DP release, None: no DP
    reachable: bool | None = True  # the bootstrap could dial it back (None: not known yet)
    relayed: bool = False  # its address is a relay's (nodes/relay.py): reachable, slowly

    @property
    def hosts(self) -> bool:
        """Whether the planner may give it other owners' layers: allowed, and dialled back by
        the bootstrap (until its check comes back it is no helper: owners would dial it)."""
        return self.may_host and self.reachable is True


def _tristate(value: object) -> bool | None:
    return None if value is None else bool(value)


def _check_dp(dp: Sequence[float] | None) -> list[float] | None:
    """[epsilon, delta] of a DP fingerprint release, checked (epsilon finite > 0, delta in (0, 1)); None stays None."""
    if dp is None:
        return None
    from atlas_p2p.privacy.budget import SampleDP

    values = list(dp) if isinstance(dp, Sequence) and not isinstance(dp, str) else None
    if values is None or len(values) != 2:
        raise ValueError(f"dp must be [epsilon, delta], got {dp!r:.80}")
    budget = SampleDP(*values)  # ValueError names the bad one
    return [float(budget.epsilon), float(budget.delta)]


# ------------------------------------------------------------------ the coordinator


class Coordinator:
    """Clusters, plans, repairs; hands out versioned assignments (see the module doc)."""

    def __init__(self, config: CoordinatorConfig) -> None:
        if not isinstance(config, CoordinatorConfig):
            raise ValueError(f"config must be a CoordinatorConfig, got {type(config).__name__}")
        self.config = config
        self._modules = frozenset(m.name for m in lora_candidates(config.shape))
        self._members: dict[int, _Member] = {}
        self._clustering: Clustering | None = None
        self._plan: Plan | None = None
        self._plan_importance: dict[int, dict[str, float]] = {}
        self._first_fingerprint_at: float | None = None
        self._version = 0
        self._views: dict[int, dict[str, Any]] = {}  # last published assignment of each node, no version
        self._versions: dict[int, int] = {}
        self._causes: dict[int, str] = {}  # what last changed each node's assignment
        self._anchors: dict[int, int | None] = {}
        self._events: list[RepairEvent] = []
        self._anchor_changes: list[AnchorChange] = []
        self._provisional_cache: tuple[tuple[NodeInfo, ...], dict[int, tuple[int, int]]] | None = None
        self._batch: _Batch | None = None  # set while `apply` runs
        self.plans_made = 0  # full planning passes (make_plan of the real plan) so far

    # --- read-only views -----------------------------------------------------------------

    @property
    def version(self) -> int:
        """The global assignment counter (the newest version any node holds)."""
        return self._version

    @property
    def assigned(self) -> bool:
        """True once the first clustering and plan are made."""
        return self._plan is not None

    @property
    def plan(self) -> Plan | None:
        return self._plan

    @property
    def clustering(self) -> Clustering | None:
        return self._clustering

    @property
    def events(self) -> tuple[RepairEvent, ...]:
        return tuple(self._events)

    @property
    def anchor_changes(self) -> tuple[AnchorChange, ...]:
        return tuple(self._anchor_changes)

    @property
    def repairs(self) -> int:
        """Helper replacements of any kind (inside the cluster or from another one)."""
        return sum(e.kind in (REPAIR, FALLBACK) for e in self._events)

    @property
    def fallbacks(self) -> int:
        """Helper replacements that came from another cluster."""
        return sum(e.kind == FALLBACK for e in self._events)

    def status(self, node_id: int) -> str:
        """live | dead | left | done | failed."""
        return self._member(node_id).status

    def cluster_of(self, node_id: int) -> int | None:
        return self._member(node_id).cluster

    def anchors(self) -> dict[int, int]:
        """Cluster id -> anchor node id, for clusters with live members."""
        return {c: a for c, a in self._board().anchors.items() if a is not None}

    def version_for(self, node_id: int) -> int:
        """Version of `node_id`'s current assignment (0: never planned)."""
        self._member(node_id)
        return self._versions.get(node_id, 0)

    def known(self, node_id: int) -> bool:
        """Whether `node_id` ever joined this coordinator (whatever its status now)."""
        return node_id in self._members

    def fingerprinted(self, node_id: int) -> bool:
        """Whether the coordinator holds a fingerprint of `node_id` (False for an unknown node)."""
        member = self._members.get(node_id)
        return member is not None and member.vector is not None

    @property
    def planned_importance(self) -> dict[int, dict[str, float]]:
        """Cluster -> the importance vector the current plan water-filled its ranks by (the
        mean of its members' probes); a cluster without probes is absent (uniform)."""
        return copy.deepcopy(self._plan_importance)

    def metrics(self) -> dict[str, Any]:
        """Counts and records for the scenario's JSON (no task labels here: see scenarios)."""
        c = self._clustering
        return dict(
            version=self._version,
            clusters=0 if c is None else c.k,
            silhouette=None if c is None else c.silhouette,
            repairs=self.repairs,
            fallbacks=self.fallbacks,
            unpaired=sum(e.kind == UNPAIRED for e in self._events),
            events=[e.to_dict() for e in self._events],
            anchor_changes=[a.to_dict() for a in self._anchor_changes],
        )

    # --- events --------------------------------------------------------------------------

    def on_join(
        self,
        node_id: int,
        capabilities: Capabilities,
        address: str,
        *,
        may_host: bool = True,
        reachable: bool | None = True,
        relayed: bool = False,
        now: float,
    ) -> bool:
        """A node offering `capabilities` joined from `address`, or joined again (a rejoin
        brings back a dead, left or failed node). `may_host` False: the operator does not let
        it run other owners' layers (it trains its own data, never helps). `reachable` False:
        nobody can dial it (the bootstrap's check): it never hosts, and is anchor only of a
        cluster with no dialable member; None: the check has not come back (no helper yet;
        it may anchor). `relayed`: its address is a relay's: peers reach it, but through a
        detour, so it is an anchor only when no member is dialled directly (the bootstrap also
        keeps it from hosting).

        A rejoin that changes `has_data` forgets the node's fingerprint and cluster.
        Returns whether any assignment changed.
        """
        _check_id(node_id)
        _check_now(now)
        if not isinstance(capabilities, Capabilities):
            raise ValueError(f"capabilities must be a Capabilities, got {type(capabilities).__name__}")
        parse_address(address, what="address")
        with self._atomic():
            member = self._members.get(node_id)
            if member is None:
                self._members[node_id] = _Member(
                    capabilities,
                    address,
                    may_host=bool(may_host),
                    reachable=_tristate(reachable),
                    relayed=bool(relayed),
                )
                log.info("node %d joined (%s)", node_id, "data" if capabilities.has_data else "pure helper")
            else:
                if member.caps.has_data != capabilities.has_data:
                    member.vector, member.importance, member.cluster = None, None, None
                member.caps, member.address, member.may_host = capabilities, address, bool(may_host)
                member.reachable, member.relayed = _tristate(reachable), bool(relayed)
                if member.status != LIVE:
                    log.info("node %d is back (was %s)", node_id, member.status)
                member.status, member.note = LIVE, ""
            return self._grow(now, "joined")

    def on_alive(self, node_id: int, *, now: float) -> bool:
        """A node declared dead answered again (a heartbeat), or a failed helper kept
        answering heartbeats through its probation (the bootstrap decides when): plan it back in.

        A left or done node must join again.
        """
        member = self._member(node_id)
        _check_now(now)
        if member.status not in (DEAD, FAILED):
            return False
        with self._atomic():
            member.status, member.note = LIVE, ""
            log.info("node %d is alive again", node_id)
            return self._grow(now, "back")

    def on_fingerprint(
        self,
        node_id: int,
        vector: Any,
        n_samples: int,
        importance: Mapping[str, float] | None = None,
        *,
        now: float,
        leakage: Sequence[float] | None = None,
        dp: Sequence[float] | None = None,
    ) -> bool:
        """A data node's task fingerprint (and optional importance probe, leakage by split and the
        (epsilon, delta) of a DP release) arrived.

        Before the first clustering it is only stored (see `maybe_assign`); after it, the
        node joins the cluster of the nearest centroid and the swarm is re-planned.
        """
        member = self._member(node_id)
        _check_now(now)
        unit, scores = self._check_fingerprint(node_id, self._state(node_id), vector, n_samples, importance)
        psi, budget = self._check_leakage(leakage), _check_dp(dp)
        with self._atomic():
            member.vector, member.n_samples, member.importance = unit, int(n_samples), scores
            member.leakage, member.dp = psi, budget
            if self._first_fingerprint_at is None:
                self._first_fingerprint_at = float(now)
            if self._clustering is None:
                return self._publish(now, "fingerprinted")  # a provisional helper is no longer needed
            member.cluster = int(assign_nearest(unit[None, :], self._clustering)[0])
            log.info("node %d fingerprint: nearest cluster %d", node_id, member.cluster)
            return self._grow(now, "clustered")

    def maybe_assign(self, now: float) -> bool:
        """Make the first clustering and plan when it is due; True if it was made now.

        Due once `min_nodes` live data nodes have fingerprints, or `assign_after_s`
        seconds after the first fingerprint arrived (with at least one fingerprint).
        """
        _check_now(now)
        if self._clustering is not None:
            return False
        ready = self._fingerprinted()
        if not ready:
            return False
        waited = now - (self._first_fingerprint_at if self._first_fingerprint_at is not None else now)
        if len(ready) < self.config.min_nodes and waited < self.config.assign_after_s:
            return False
        with self._atomic():
            why = (
                f"{len(ready)} fingerprints"
                if len(ready) >= self.config.min_nodes
                else f"timer ({waited:.1f} s, {len(ready)}/{self.config.min_nodes} fingerprints)"
            )
            self._cluster(ready, previous=None)
            log.info("first assignment after %s: K=%d", why, self._clustering.k)
            self._plan = None
            self._replan()
            return self._publish(now, "initial")

    def recluster(self, now: float) -> bool:
        """Cluster every live fingerprint again (on demand), keeping ids by centroid matching."""
        _check_now(now)
        if self._clustering is None:
            return self.maybe_assign(now)
        ready = self._fingerprinted()
        if not ready:
            return False
        with self._atomic():
            self._cluster(ready, previous=self._clustering)
            self._replan()
            return self._publish(now, "reclustered")

    def on_dead(self, node_id: int, *, now: float, avoid: Iterable[int] = ()) -> bool:
        """The bootstrap stopped hearing from the node; a helper's owners are repaired (the
        nodes in `avoid`, silent too, are their new helpers only when no other fits)."""
        return self._lose(node_id, DEAD, now, "no heartbeat", avoid)

    def on_left(self, node_id: int, *, now: float) -> bool:
        """The node said `leave`."""
        return self._lose(node_id, LEFT, now, "left the swarm")

    def on_done(self, node_id: int, *, now: float) -> bool:
        """The node finished every round: it is no longer a member of its cluster.

        A done node that still serves owners keeps serving them (its assignment turns
        into a helper's) until it leaves or dies, so they need no repair; one serving
        nobody leaves the plan.
        """
        return self._lose(node_id, DONE, now, "finished every round")

    def report_failure(self, owner: int, helper: int, *, now: float, avoid: Iterable[int] = ()) -> bool:
        """`owner` saw `helper` miss a deadline.

        A helper the bootstrap has stopped hearing from (in `avoid`: silent now) is failed
        for planning at once: it leaves the plan (as if dead) and all its owners get another
        helper, until it comes back. A helper that still heartbeats is slow for this owner,
        not gone: only this owner gets another helper (`planning.repair(unpair=...)`, cause
        "slow") and the helper keeps its other owners; blaming it for everyone made one late
        reply in an overloaded swarm re-pair all its owners onto helpers that were just as busy.
        A report about a node that is not (any more) the owner's helper is stale and changes nothing.
        """
        self._member(owner)
        self._member(helper)
        _check_now(now)
        if owner == helper:
            raise ValueError(f"report_failure: owner and helper are both node {owner}")
        plan = self._plan
        row = plan.nodes.get(str(owner)) if plan is not None else None
        if row is None or row.helper != str(helper):
            current = None if row is None or row.helper is None else int(row.helper)
            log.info("stale failure report: node %d's helper is %s, not %d", owner, current, helper)
            return False
        avoid = set(avoid)
        if helper in avoid:
            return self._lose(helper, FAILED, now, f"missed a deadline serving node {owner}", avoid)
        with self._atomic():
            old = self._plan
            infos = list(old.infos.values())
            self._plan = repair(
                old, [], infos, self._centroids(), avoid=[str(n) for n in avoid], unpair={str(owner): str(helper)}
            )
            events = self._record_repairs(old, self._plan, helper, SLOW, now)
            self._prune_done(now)  # a finished helper this owner was the last of leaves the plan
            return self._publish(now, SLOW, {e.owner: e.kind for e in events})

    # --- batches of events ------------------------------------------------------------------

    def apply(self, events: Sequence[Event], *, now: float) -> Applied:
        """Apply `events` in order, then at most one planning pass and one publish.

        Each event changes membership as its method does (a lost helper's owners are
        repaired at once: `planning.repair` touches only them), but the re-plan check that
        joins, returns and late fingerprints ask for (`_grow`), `maybe_assign` and the
        recomputation of every assignment (`_publish`) run once for the whole batch. A burst
        of N events thus costs one full plan and one version bump instead of up to N.
        Within a batch an assignment that changed twice is published once, and so is an
        anchor that moved twice; the cause of a changed assignment is its node's own event
        (or its repair's kind), else the batch's causes joined by "+".

        An event the coordinator refuses (ValueError) gets its error in `Applied.errors` and
        changes nothing; the others still apply. If anything fails half-way, the batch is
        undone and the events are applied one by one with their own methods.
        """
        _check_now(now)
        plans_before, was_assigned = self.plans_made, self._plan is not None
        saved = self._state_copy()
        batch = self._batch = _Batch()
        errors: list[ValueError | None] = []
        try:
            for event in events:
                batch.subject = event.node_id if event.kind != TICK else None
                try:
                    self._dispatch(event, now)
                    errors.append(None)
                except ValueError as exc:
                    if batch.broken:
                        raise
                    errors.append(exc)
            batch.subject = None
            self.maybe_assign(now)
            if self._plan is not None and not was_assigned:
                batch.causes, batch.node_causes = ["initial"], {}  # every assignment is new: that is why
            if batch.grow and self._plan is not None:
                self._regrow()
            self._batch = None
            changed = False
            if batch.causes:
                cause = "+".join(dict.fromkeys(batch.causes))
                changed = self._publish(now, cause, batch.node_causes)
        except Exception:
            log.exception("a batch of %d events failed half-way: applying them one by one", len(events))
            self._batch = None
            vars(self).update(saved)
            return self._apply_one_by_one(events, now, plans_before)
        return Applied(changed, tuple(errors), self.plans_made - plans_before)

    def _apply_one_by_one(self, events: Sequence[Event], now: float, plans_before: int) -> Applied:
        changed, errors = False, []
        for event in events:
            try:
                changed |= self._dispatch(event, now)
                errors.append(None)
            except ValueError as exc:
                errors.append(exc)
        changed |= self.maybe_assign(now)
        return Applied(changed, tuple(errors), self.plans_made - plans_before)

    def _dispatch(self, event: Event, now: float) -> bool:
        n = event.node_id
        if event.kind == JOIN:
            return self.on_join(
                n,
                event.caps,
                event.address,
                may_host=event.may_host,
                reachable=event.reachable,
                relayed=event.relayed,
                now=now,
            )
        if event.kind == ALIVE:
            return self.on_alive(n, now=now)
        if event.kind == DEAD_EVENT:
            return self.on_dead(n, now=now, avoid=event.avoid)
        if event.kind == LEFT_EVENT:
            return self.on_left(n, now=now)
        if event.kind == DONE_EVENT:
            return self.on_done(n, now=now)
        if event.kind == FINGERPRINT:
            return self.on_fingerprint(
                n, event.vector, event.n_samples, event.importance, now=now, leakage=event.leakage, dp=event.dp
            )
        if event.kind == FAILURE:
            return self.report_failure(n, event.helper, now=now, avoid=event.avoid)
        return False  # TICK: the batch's maybe_assign

    def summary(self) -> dict[int, MemberState]:
        """Every member's `MemberState` (what a heartbeat answer needs), in id order."""
        return {n: self._state(n) for n in sorted(self._members)}

    def precheck(self, event: Event, states: Mapping[int, MemberState]) -> None:
        """Raise the ValueError `apply` would refuse a fingerprint or failure report with,
        judging membership by `states` (e.g. `summary()` advanced by `expected_state` over
        the events still queued). Reads only the immutable config, so it may run while
        another thread applies a batch. Other kinds are not checked here."""
        if event.kind == FINGERPRINT:
            self._check_fingerprint(
                event.node_id, states.get(event.node_id), event.vector, event.n_samples, event.importance
            )
            self._check_leakage(event.leakage)
            _check_dp(event.dp)
        elif event.kind == FAILURE:
            for n in (event.node_id, event.helper):
                _check_id(n)
                if n not in states:
                    raise _unknown(n)
            if event.node_id == event.helper:
                raise ValueError(f"report_failure: owner and helper are both node {event.node_id}")

    def _state(self, node_id: int) -> MemberState:
        m = self._members[node_id]
        return MemberState(m.status, m.caps.has_data, m.vector is not None, self._versions.get(node_id, 0))

    def _check_fingerprint(
        self,
        node_id: int,
        state: MemberState | None,
        vector: Any,
        n_samples: Any,
        importance: Mapping[str, float] | None,
    ) -> tuple[np.ndarray, dict[str, float] | None]:
        """The unit vector and importance scores of a fingerprint from a member in `state`."""
        _check_id(node_id)
        if state is None:
            raise _unknown(node_id)
        if not state.has_data:
            raise ValueError(f"node {node_id} is a pure helper (no data): helpers send no fingerprint")
        if state.status != LIVE:
            raise ValueError(f"node {node_id} is {state.status}: join again before sending a fingerprint")
        unit = self._check_vector(vector)
        require_int("n_samples", n_samples, 0)
        return unit, self._check_importance(importance)

    # --- answers -------------------------------------------------------------------------

    def assignment_for(self, node_id: int) -> dict[str, Any]:
        """The node's assignment as a plain dict; `Assignment(**d)` builds the message."""
        self._member(node_id)
        return self._assignment(node_id, None)

    def assignments(self, node_ids: Iterable[int]) -> dict[int, dict[str, Any]]:
        """`assignment_for` of each node, the board the never-planned ones need computed once."""
        out, board = {}, None
        for node_id in node_ids:
            self._member(node_id)
            if node_id not in self._views and board is None:
                board = self._board()
            out[node_id] = self._assignment(node_id, board)
        return out

    def _assignment(self, node_id: int, board: _Board | None) -> dict[str, Any]:
        view = self._views.get(node_id) or self._view(node_id, board or self._board())
        cause = self._causes.get(node_id)
        body = {k: v for k, v in view.items() if k != "note"}
        body["reason"] = f"{cause}: {view['note']}" if cause else view["note"]
        return dict(node_id=node_id, version=self._versions.get(node_id, 0), **copy.deepcopy(body))

    def peer_columns(self) -> dict[int, dict[str, Any]]:
        """{node_id: peer table columns} for every node planned at least once.

        Feed it to `PeerTable.update_many` after an event returned True. Columns: cluster,
        split, helper, role, ranks (summary), anchor, reason, psi, dp_epsilon, dp_delta.
        """
        out = {}
        for node_id in sorted(self._views):
            view = self.assignment_for(node_id)
            dp = self._members[node_id].dp or [None, None]
            out[node_id] = dict(
                cluster=view["cluster"],
                split=view["split"],
                helper=view["helper"],
                role=view["role"],
                ranks=_ranks_summary(view["ranks"]),
                anchor=view["anchor"] == node_id,
                reason=view["reason"],
                psi=self._psi_at(node_id, view["split"]),
                dp_epsilon=dp[0],
                dp_delta=dp[1],
            )
        return out

    def _psi_at(self, node_id: int, split: int | None) -> float | None:
        """psi of what the node sends at `split` (None: no split, or not measured)."""
        leakage = self._members[node_id].leakage
        if leakage is None or split is None or not 1 <= split <= len(leakage):
            return None
        return leakage[split - 1]

    # --- persistence ---------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The whole state as a JSON-ready dict (for the bootstrap's `--state`, so a
        restarted bootstrap keeps clusters, plan, versions and the repair record)."""
        c, plan = self._clustering, self._plan
        return dict(
            format=STATE_FORMAT,
            members={
                str(n): dict(
                    caps=dataclasses.asdict(m.caps),
                    address=m.address,
                    status=m.status,
                    vector=None if m.vector is None else m.vector.tolist(),
                    n_samples=m.n_samples,
                    importance=m.importance,
                    cluster=m.cluster,
                    note=m.note,
                    may_host=m.may_host,
                    leakage=m.leakage,
                    dp=m.dp,
                    reachable=m.reachable,
                    relayed=m.relayed,
                )
                for n, m in sorted(self._members.items())
            },
            clustering=None
            if c is None
            else dict(
                labels=c.labels.tolist(),
                ids=c.ids.tolist(),
                centroids=c.centroids.tolist(),
                silhouette=c.silhouette,
                scores={str(k): v for k, v in c.scores.items()},
                next_id=c.next_id,
            ),
            plan=None
            if plan is None
            else dict(
                nodes={n: dict(dataclasses.asdict(r), ranks=dict(r.ranks)) for n, r in plan.nodes.items()},
                infos={
                    n: dict(
                        node_id=i.node_id,
                        caps=dataclasses.asdict(i.caps),
                        cluster=i.cluster,
                        may_host=i.may_host,
                        min_split=i.min_split,
                    )
                    for n, i in plan.infos.items()
                },
            ),
            plan_importance={str(k): v for k, v in self._plan_importance.items()},
            first_fingerprint_at=self._first_fingerprint_at,
            version=self._version,
            views={str(n): v for n, v in self._views.items()},
            versions={str(n): v for n, v in self._versions.items()},
            causes={str(n): v for n, v in self._causes.items()},
            anchors={str(k): v for k, v in self._anchors.items()},
            events=[e.to_dict() for e in self._events],
            anchor_changes=[a.to_dict() for a in self._anchor_changes],
        )

    @classmethod
    def restore(cls, config: CoordinatorConfig, state: Mapping[str, Any]) -> Coordinator:
        """A coordinator from `snapshot()` output; ValueError if the state is not usable."""
        coord = cls(config)
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"coordinator state: expected a map with format {STATE_FORMAT}")
        try:
            for n, m in state["members"].items():
                vector = None if m["vector"] is None else np.asarray(m["vector"], dtype=np.float64)
                if vector is not None and vector.shape != (config.fingerprint_dim,):
                    raise ValueError(f"node {n} fingerprint has shape {vector.shape}")
                coord._members[int(n)] = _Member(
                    Capabilities(**m["caps"]),
                    m["address"],
                    m["status"],
                    vector,
                    int(m["n_samples"]),
                    m["importance"],
                    m["cluster"],
                    m["note"],
                    bool(m.get("may_host", True)),
                    coord._check_leakage(m.get("leakage")),
                    _check_dp(m.get("dp")),
                    _tristate(m.get("reachable", True)),
                    bool(m.get("relayed", False)),
                )
            c = state["clustering"]
            if c is not None:
                coord._clustering = Clustering(
                    labels=np.asarray(c["labels"], dtype=np.int64),
                    ids=np.asarray(c["ids"], dtype=np.int64),
                    centroids=np.asarray(c["centroids"], dtype=np.float64),
                    silhouette=c["silhouette"],
                    scores={int(k): v for k, v in c["scores"].items()},
                    next_id=int(c["next_id"]),
                )
            p = state["plan"]
            if p is not None:
                nodes = {
                    n: NodePlan(**{**r, "fallbacks": tuple(r["fallbacks"]), "serves": tuple(r["serves"])})
                    for n, r in p["nodes"].items()
                }
                infos = {
                    n: NodeInfo(
                        i["node_id"],
                        Capabilities(**i["caps"]),
                        i["cluster"],
                        bool(i.get("may_host", True)),
                        int(i.get("min_split", 1)),
                    )
                    for n, i in p["infos"].items()
                }
                coord._plan = Plan(nodes, config.context, infos)
            coord._plan_importance = {int(k): v for k, v in state["plan_importance"].items()}
            coord._first_fingerprint_at = state["first_fingerprint_at"]
            coord._version = int(state["version"])
            coord._views = {int(n): v for n, v in state["views"].items()}
            coord._versions = {int(n): int(v) for n, v in state["versions"].items()}
            coord._causes = {int(n): v for n, v in state["causes"].items()}
            coord._anchors = {int(k): v for k, v in state["anchors"].items()}
            coord._events = [RepairEvent(**e) for e in state["events"]]
            coord._anchor_changes = [AnchorChange(**a) for a in state["anchor_changes"]]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"coordinator state is malformed: {exc!r}") from None
        unknown = {n for n in coord._views if n not in coord._members}
        if unknown or (coord._plan is not None and {int(n) for n in coord._plan.nodes} - set(coord._members)):
            raise ValueError("coordinator state is malformed: views or plan name nodes it does not hold")
        return coord

    # --- internals: validation -----------------------------------------------------------

    def _member(self, node_id: int) -> _Member:
        _check_id(node_id)
        member = self._members.get(node_id)
        if member is None:
            raise _unknown(node_id)
        return member

    def _check_vector(self, vector: Any) -> np.ndarray:
        try:
            x = np.asarray(vector, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"fingerprint vector must be numeric, got {type(vector).__name__}") from None
        dim = self.config.fingerprint_dim
        if x.shape != (dim,):
            raise ValueError(f"fingerprint vector must have shape ({dim},), got {x.shape}")
        if not np.all(np.isfinite(x)):
            raise ValueError("fingerprint vector contains NaN or inf")
        norm = float(np.linalg.norm(x))
        if norm == 0:
            raise ValueError("fingerprint vector is all zeros")
        return x / norm  # (d,)

    def _check_leakage(self, leakage: Sequence[float] | None) -> list[float] | None:
        """psi(s) for s = 1..L-1 as a list, checked; None stays None."""
        if leakage is None:
            return None
        want = self.config.shape.num_layers - 1
        values = list(leakage) if isinstance(leakage, Sequence) and not isinstance(leakage, str) else None
        if values is None or len(values) != want:
            raise ValueError(f"leakage must list psi for the splits 1..{want} ({want} numbers), got {leakage!r:.80}")
        if not all(is_number(v) and v >= 0 for v in values):
            raise ValueError(f"leakage values must be finite and >= 0, got {values!r:.80}")
        return [float(v) for v in values]

    def _min_split(self, member: _Member) -> int:
        """The node's own privacy floor (planning.NodeInfo.min_split): the first split whose
        psi is at most --privacy-floor; L when none is, or when it measured nothing (it may
        then train only on the whole model, which sends nothing)."""
        floor, L = self.config.privacy_floor, self.config.shape.num_layers
        if floor is None or not member.caps.has_data:
            return 1
        if member.leakage is None:
            return L
        try:
            return privacy_min_split([math.inf, *member.leakage], floor)
        except ValueError:
            return L

    def _check_importance(self, importance: Mapping[str, float] | None) -> dict[str, float] | None:
        if importance is None:
            return None
        if not isinstance(importance, Mapping):
            raise ValueError(f"importance must be a mapping module -> score, got {type(importance).__name__}")
        scores = {}
        for name, value in importance.items():
            if name not in self._modules:
                raise ValueError(
                    f"importance: {name!r} is not an adaptable weight of this {self.config.shape.family} model"
                )
            if not is_number(value) or value < 0:
                raise ValueError(f"importance[{name!r}] must be finite and >= 0, got {value!r}")
            scores[name] = float(value)
        return scores or None

    @contextmanager
    def _atomic(self) -> Iterator[None]:
        """Apply an event fully or not at all: any error restores the state before it.

        Inside `apply` nothing is copied: an error marks the batch broken and `apply`
        restores the state it saved before the batch."""
        if self._batch is not None:
            try:
                yield
            except BaseException:
                self._batch.broken = True
                raise
            return
        saved = self._state_copy()
        try:
            yield
        except BaseException:
            vars(self).update(saved)
            raise

    def _state_copy(self) -> dict[str, Any]:
        """A deep copy of everything an event may change."""
        kept = ("config", "_modules", "_batch", "plans_made")
        return {k: copy.deepcopy(v) for k, v in vars(self).items() if k not in kept}

    # --- internals: clustering and planning ----------------------------------------------

    def _fingerprinted(self) -> list[int]:
        """Live data nodes with a fingerprint, in id order."""
        return [
            n for n, m in sorted(self._members.items()) if m.status == LIVE and m.caps.has_data and m.vector is not None
        ]

    def _cluster(self, ready: list[int], previous: Clustering | None) -> None:
        x = np.stack([self._members[n].vector for n in ready])  # (n, d)
        k = self.config.clusters
        if k is not None:
            distinct = len(np.unique(np.round(x, 12), axis=0))
            if k > distinct:
                log.warning("asked for %d clusters but only %d distinct fingerprints: using %d", k, distinct, distinct)
                k = distinct
        clustering = cluster_fingerprints(x, self.config.clustering(k), previous)
        for n, label in zip(ready, clustering.labels):
            self._members[n].cluster = int(label)
        self._clustering = clustering
        for n, m in self._members.items():  # absent nodes: nearest centroid, should they come back
            if n not in ready and m.vector is not None:
                m.cluster = None
        self._place_unclustered()

    def _place_unclustered(self) -> None:
        """Fingerprinted data nodes without a cluster go to the nearest centroid."""
        for m in self._members.values():
            if m.caps.has_data and m.vector is not None and m.cluster is None:
                m.cluster = int(assign_nearest(m.vector[None, :], self._clustering)[0])

    def _infos(self) -> list[NodeInfo]:
        """Planner records of every node that can be planned now."""
        infos = []
        for n, m in sorted(self._members.items()):
            if m.status != LIVE:
                continue
            if m.caps.has_data and (m.vector is None or m.cluster is None):
                continue  # not fingerprinted or not clustered yet
            cluster = m.cluster if m.caps.has_data else None
            infos.append(NodeInfo(str(n), m.caps, cluster, m.hosts, self._min_split(m)))
        return infos

    def _importance(self) -> dict[int, dict[str, float]]:
        """Cluster -> mean of its planned members' importance vectors (clusters that have any)."""
        by_cluster: dict[int, list[dict[str, float]]] = {}
        for m in self._members.values():
            if m.status == LIVE and m.cluster is not None and m.importance:
                by_cluster.setdefault(m.cluster, []).append(m.importance)
        return {c: cluster_importance(vs) for c, vs in sorted(by_cluster.items())}

    def _centroids(self) -> dict[int, list[float]] | None:
        c = self._clustering
        if c is None:
            return None
        return {int(i): c.centroids[j].tolist() for j, i in enumerate(c.ids)}

    def _replan(self) -> None:
        """A full plan of everyone plannable."""
        importance = self._importance()
        self._plan = make_plan(self._infos(), self.config.context, importance or None, self._centroids())
        self._plan_importance = importance
        self.plans_made += 1

    def _grow(self, now: float, cause: str) -> bool:
        """After a join, a return or a late fingerprint: re-plan if the planner sees a reason
        (inside `apply`, once at the end of the batch)."""
        if self._plan is None:
            return self._publish(now, cause)
        if self._batch is not None:
            self._batch.grow = True
            return self._publish(now, cause)
        self._regrow()
        return self._publish(now, cause)

    def _regrow(self) -> None:
        """Place late fingerprints and re-plan if `planning.replan_reason` finds a reason."""
        self._place_unclustered()  # e.g. fingerprinted before the first clustering, absent at it
        infos = self._infos()
        importance = self._importance()
        moved = max((importance_change(self._plan_importance.get(c), v) for c, v in importance.items()), default=0.0)
        planned = self._plan.infos
        why = replan_reason(list(planned.values()), infos, moved, tau=TAU)
        if why is None:
            return
        kept = [i for i in infos if i.node_id in planned]
        if len(kept) == len(planned) and replan_reason(list(planned.values()), kept, moved, tau=TAU) is None:
            # only newcomers (joined, back, just clustered): add them, keep every running pair
            self._plan = admit(self._plan, infos, importance or None, self._centroids())
            log.info("admitted %d node(s) into the plan", len(infos) - len(kept))
            return
        log.info("re-planning: %s", why)
        self._replan()

    def _lose(self, node_id: int, status: str, now: float, note: str, avoid: Iterable[int] = ()) -> bool:
        member = self._member(node_id)
        _check_now(now)
        if member.status == status:
            return False
        with self._atomic():
            member.status, member.note = status, note
            log.info("node %d: %s", node_id, note)
            plan = self._plan
            if plan is None or str(node_id) not in plan.nodes:
                return self._publish(now, status)
            events = []
            if status != DONE or not plan.nodes[str(node_id)].serves:
                events = self._repair_out(node_id, status, now, avoid)
            self._prune_done(now)
            return self._publish(now, status, {e.owner: e.kind for e in events})

    def _repair_out(self, node_id: int, cause: str, now: float, avoid: Iterable[int] = ()) -> list[RepairEvent]:
        """Take `node_id` out of the plan with planning.repair (helpers in `avoid` last);
        returns the repair events."""
        plan = self._plan
        infos = [i for i in plan.infos.values() if i.node_id != str(node_id)]
        repaired = repair(plan, [str(node_id)], infos, self._centroids(), avoid=[str(n) for n in avoid])
        events = self._record_repairs(plan, repaired, node_id, cause, now)
        self._plan = repaired
        return events

    def _prune_done(self, now: float) -> None:
        """Done nodes left serving nobody leave the plan (no owner is affected)."""
        while True:
            idle = [n for n, row in self._plan.nodes.items() if self._members[int(n)].status == DONE and not row.serves]
            if not idle:
                return
            self._repair_out(int(min(idle, key=int)), DONE, now)

    def _record_repairs(self, old: Plan, new: Plan, lost: int, cause: str, now: float) -> list[RepairEvent]:
        """Record what happened to every owner `lost` was helping; returns the new events."""
        events = []
        for n, row in sorted(old.nodes.items(), key=lambda kv: int(kv[0])):
            if row.helper != str(lost) or n not in new.nodes or new.nodes[n].helper == row.helper:
                continue
            after = new.nodes[n]
            if after.helper is None:
                kind, helper = UNPAIRED, None
            else:
                helper = int(after.helper)
                helper_cluster = new.infos[after.helper].cluster
                kind = REPAIR if helper_cluster in (None, row.cluster) else FALLBACK
            events.append(RepairEvent(float(now), int(n), lost, helper, kind, cause, row.cluster))
            log.info(
                "%s: owner %s lost helper %d (%s) -> %s",
                kind,
                n,
                lost,
                cause,
                "waits" if helper is None else f"helper {helper}",
            )
        self._events.extend(events)
        return events

    # --- internals: assignments and versions ---------------------------------------------

    def _board(self) -> _Board:
        """What every view needs, computed once: members by cluster, anchors, provisional helpers."""
        plan = self._plan
        members: dict[int, list[int]] = {}
        if plan is not None:
            for n, row in plan.nodes.items():
                if row.cluster is not None and plan.infos[n].caps.has_data and self._members[int(n)].status == LIVE:
                    members.setdefault(row.cluster, []).append(int(n))
        anchors: dict[int, int | None] = {}
        for c in sorted(set(members) | set(self._anchors)):
            ids = sorted(members.get(c, []))
            members[c] = ids
            active = [n for n in ids if plan.nodes[str(n)].role != WAITING]
            dialable = [n for n in active if self._members[n].reachable is not False]  # members dial their anchor
            direct = [n for n in dialable if not self._members[n].relayed]  # a relay is a detour for every member
            best = direct or dialable or active or ids or [None]
            # an anchor that is still among the best stays: handing a live anchor's log to another
            # member mid-round let two anchors publish the same round (a lower id that stopped
            # waiting took over while the old anchor had already published round 0)
            anchors[c] = self._anchors.get(c) if self._anchors.get(c) in best else best[0]
        return _Board(members, anchors, self._provisional())

    def _provisional(self) -> dict[int, tuple[int, int]]:
        """Data node without a fingerprint -> (provisional helper, split) for fingerprinting.

        A node too weak for the whole model needs a helper for the one forward/backward
        of its fingerprint (DESIGN 2.2). It comes from a hypothetical task-blind plan of
        the waiting nodes (in a cluster of their own) and every live node able to host
        later layers (pure helpers, data nodes that fit the whole model; `_Member.hosts`: the
        bootstrap has dialled them back); the real plan is not changed. Nodes that can run
        the whole model, or whom nobody can help, get none. The hypothetical plan is cached on its inputs.
        """
        pending = [n for n, m in self._members.items() if m.status == LIVE and m.caps.has_data and m.vector is None]
        if not pending:
            return {}
        blind = 0 if self._clustering is None else self._clustering.next_id  # a cluster id nobody has
        infos = []
        for n, m in sorted(self._members.items()):
            if m.status != LIVE or not (n in pending or (m.hosts and (not m.caps.has_data or self._can_host(m.caps)))):
                continue
            cluster = None
            if m.caps.has_data:
                cluster = blind if n in pending or m.cluster is None else m.cluster
            infos.append(NodeInfo(str(n), m.caps, cluster, m.hosts))
        key = tuple(infos)
        if self._provisional_cache is None or self._provisional_cache[0] != key:
            hypothetical = make_plan(infos, self.config.context, None, self._centroids())
            out = {}
            for n in pending:
                row = hypothetical.nodes[str(n)]
                if row.role == OWNER and row.helper is not None:
                    out[n] = (int(row.helper), int(row.split))
            self._provisional_cache = (key, out)
        return dict(self._provisional_cache[1])

    def _can_host(self, caps: Capabilities) -> bool:
        """Whether a data node fits the whole model with minimum adapters (so it can host others)."""
        cfg = self.config
        return not cfg.plan.split_all and fits_whole_model(cfg.shape, caps.memory_bytes, cfg.workload, cfg.plan)

    def _view(self, node_id: int, board: _Board) -> dict[str, Any]:
        """The node's assignment without version (reason in `note`, the cause added later)."""
        member = self._members[node_id]
        provisional, anchors = board.provisional, board.anchors
        plan = self._plan
        row = plan.nodes.get(str(node_id)) if plan is not None else None
        empty = dict(
            cluster=member.cluster,
            members=[],
            ranks={},
            split=None,
            helper=None,
            anchor=None,
            serves=[],
            addresses={},
            role=WAITING,
            owners=[],
        )
        if row is None:
            if member.status != LIVE:
                note = member.note
            elif node_id in provisional:
                helper, split = provisional[node_id]
                return {
                    **empty,
                    "helper": helper,
                    "split": split,
                    "addresses": {str(helper): self._members[helper].address},
                    "note": f"fingerprinting: provisional helper {helper} runs blocks[{split}:] "
                    f"(task-blind, for the fingerprint only)",
                }
            elif plan is None:
                note = (
                    f"waiting for the first assignment ({self.config.min_nodes} fingerprints "
                    f"or {self.config.assign_after_s:g} s after the first)"
                )
            elif member.caps.has_data and member.vector is None:
                note = "waiting for this node's fingerprint"
            else:
                note = "waiting to be planned"
            return {**empty, "note": note}
        owners = self._owner_details(row, anchors)
        if member.status != LIVE:  # done, still serving: a helper now
            linked = {o["owner"] for o in owners} | {o["anchor"] for o in owners if o["anchor"] is not None}
            return {
                **empty,
                "role": HELPER,
                "serves": [o["owner"] for o in owners],
                "owners": owners,
                "addresses": {str(n): self._members[n].address for n in sorted(linked)},
                "note": f"{member.note}; still serves {', '.join(str(o['owner']) for o in owners)}",
            }
        cluster = row.cluster
        members = list(board.members.get(cluster, [])) if cluster is not None else []
        anchor = anchors.get(cluster) if cluster is not None else None
        linked = {int(x) for x in members} | {int(o) for o in row.serves}
        linked |= {o["anchor"] for o in owners if o["anchor"] is not None}
        if row.helper is not None:
            linked.add(int(row.helper))
        if anchor is not None:
            linked.add(anchor)
        addresses = {str(n): self._members[n].address for n in sorted(linked)}
        return dict(
            cluster=cluster,
            members=members,
            unreachable=[int(n) for n in members if self._members[int(n)].reachable is False],
            ranks=dict(row.ranks),
            split=row.split,
            helper=None if row.helper is None else int(row.helper),
            anchor=anchor,
            serves=sorted(int(o) for o in row.serves),
            addresses=addresses,
            role=row.role,
            owners=owners,
            note=row.reason,
        )

    def _owner_details(self, row: Any, anchors: Mapping[int, int | None]) -> list[dict[str, Any]]:
        """What a helper needs per served owner: its cluster (a `round_begin` must name it) and the
        cluster's anchor (where the helper's replica pulls patches)."""
        plan = self._plan
        owners = []
        for o in row.serves:
            orow = plan.nodes[o]
            owners.append(dict(owner=int(o), cluster=orow.cluster, anchor=anchors.get(orow.cluster)))
        return sorted(owners, key=lambda o: o["owner"])

    def _publish(self, now: float, cause: str, causes: Mapping[int, str] | None = None) -> bool:
        """Recompute every view; bump the version once if any changed. True if so.

        `cause` is recorded as why a changed view changed; `causes` overrides it per node
        (a repaired owner's cause is the repair's kind). Inside `apply` it only notes the
        causes; the batch publishes once at its end."""
        batch = self._batch
        if batch is not None:
            batch.causes.append(cause)
            if batch.subject is not None:
                batch.node_causes[batch.subject] = cause
            batch.node_causes.update(causes or {})
            return False
        plan = self._plan
        board = self._board()
        changed = []
        views = {}
        for node_id in sorted(self._members):
            view = self._view(node_id, board)
            planned = plan is not None and str(node_id) in plan.nodes
            if node_id not in self._views and not planned and node_id not in board.provisional:
                continue  # never planned nor given a provisional helper: stays at version 0
            views[node_id] = view
            if view != self._views.get(node_id):
                changed.append(node_id)
        anchors = board.anchors
        for c, new in anchors.items():
            old = self._anchors.get(c)
            if old is not None and old != new:
                self._anchor_changes.append(AnchorChange(float(now), c, old, new))
                log.info("cluster %d: anchor %d -> %s", c, old, new)
        self._anchors = {c: a for c, a in anchors.items() if a is not None}
        if not changed:
            return False
        self._version += 1
        for node_id in changed:
            self._views[node_id] = views[node_id]
            self._versions[node_id] = self._version
            self._causes[node_id] = (causes or {}).get(node_id, cause)
        log.info("assignment version %d (%s): %d nodes changed", self._version, cause, len(changed))
        return True


# ------------------------------------------------------------------ small helpers


def _check_id(node_id: Any) -> None:
    require_int("node_id", node_id, 0)


def _check_now(now: Any) -> None:
    require_number("now (seconds)", now)


def _unknown(node_id: int) -> ValueError:
    return ValueError(f"node {node_id} is unknown to the coordinator (it never joined)")


def _ranks_summary(ranks: Mapping[str, int]) -> str | None:
    """ "12 mods r2-16" (or "4 mods r8" when all equal); None without adapters."""
    positive = [r for r in ranks.values() if r > 0]
    if not positive:
        return None
    lo, hi = min(positive), max(positive)
    return f"{len(positive)} mods r{lo}" + ("" if lo == hi else f"-{hi}")


__all__ = [
    "DEAD",
    "DONE",
    "FAILED",
    "FALLBACK",
    "LEFT",
    "LIVE",
    "REPAIR",
    "UNPAIRED",
    "AnchorChange",
    "Applied",
    "Coordinator",
    "CoordinatorConfig",
    "Event",
    "MemberState",
    "RepairEvent",
    "expected_state",
]
