"""Message types: one frozen dataclass per type, registered under its wire tag.

Adding a type is a few lines:

    @message("my_type")
    class MyType(Message):
        node_id: int
        values: list[float] = field(default_factory=list)

The decorator makes the class a frozen, keyword-only dataclass, derives its field schema
from the annotations (see transport/schema.py), and registers it in `MESSAGE_TYPES`; a
second class with the same tag is rejected at import. Constructing a message checks every
field, so a bad message fails where it is built, and the codec uses the same schema to
check a body received off the wire. Fields are all sent; a decoded body must carry
exactly the declared fields (defaults only help the local constructor).

Tensors arriving off the wire are read-only views over the received frames: copy before
writing into them.

Node ids are ints handed out by the bootstrap; addresses are "host:port" strings.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, ClassVar

import numpy as np

from atlas_p2p.capabilities import Capabilities
from atlas_p2p.validation import is_int
from atlas_p2p.vocabulary import FINGERPRINT_PROBES, MERGE_RULES, NODE_STATES, ROLES, SPLIT_MODES
from transport.schema import Length, Node, OneOf, Range, SchemaError, TensorSpec, node_for
from transport.tensors import Tensor

MESSAGE_TYPES: dict[str, type[Message]] = {}
ID_LIMIT = 1 << 63  # envelope ids are 0 <= id < 2**63
SRC_MAX_LEN = 256

NodeId = Annotated[int, Range(0, None)]
Count = Annotated[int, Range(0, None)]

# Bounded text (any other str is at most transport.schema.STR_MAX_LEN characters)
ADDRESS_MAX_LEN = 300  # "host:port"; a DNS name has at most 253 characters
REASON_MAX_LEN = 1000
Address = Annotated[str, Length(hi=ADDRESS_MAX_LEN)]
RELAYS_MAX = 8  # relays a beat names
Reason = Annotated[str, Length(hi=REASON_MAX_LEN)]
PublicKey = Annotated[str, Length(40, 40, or_empty=True)]  # Z85 CurveZMQ public key; "" = none
Secret = Annotated[str, Length(32, 32, or_empty=True)]  # a join token's secret (hex); "" = none
Digest = Annotated[str, Length(hi=128)]  # a sha256 hex digest (64); "" = not stated

PEERS_PAGE_MAX = 1000  # rows in one `peer_list`
PEERS_PAGE_DEFAULT = 500


class Message:
    """Base of every message body. Subclasses are made by `@message(tag)`."""

    TYPE: ClassVar[str] = ""
    SCHEMA: ClassVar[dict[str, Node]] = {}

    def __post_init__(self) -> None:
        for name, node in self.SCHEMA.items():
            checked = node.check(getattr(self, name), f"{self.TYPE}.{name}")
            object.__setattr__(self, name, checked)

    def to_dict(self) -> dict[str, object]:
        """Field name -> value, shallow (tensors and lists are not copied)."""
        return {name: getattr(self, name) for name in self.SCHEMA}


def message(tag: str) -> typing.Callable[[type], type]:
    """Class decorator: make a frozen keyword-only dataclass, derive its schema, register `tag`."""
    if not isinstance(tag, str) or not tag:
        raise ValueError(f"message tag must be a non-empty str, got {tag!r}")

    def register(cls: type) -> type:
        if not issubclass(cls, Message):
            raise TypeError(f"@message({tag!r}): {cls.__name__} must subclass transport.messages.Message")
        if tag in MESSAGE_TYPES:
            raise ValueError(f"@message({tag!r}): tag already used by {MESSAGE_TYPES[tag].__qualname__}")
        cls = dataclass(frozen=True, eq=False, kw_only=True)(cls)
        hints = typing.get_type_hints(cls, include_extras=True)
        cls.SCHEMA = {f.name: node_for(hints[f.name], f"{tag}.{f.name}") for f in fields(cls)}
        cls.TYPE = tag
        MESSAGE_TYPES[tag] = cls
        return cls

    return register


@dataclass(frozen=True, eq=False)
class Envelope:
    """One message on the wire: its type tag, request id (replies reuse it), sender name, body."""

    type: str
    id: int
    src: str
    body: Message
    # Z85 public key of the connection it arrived on, set by a CURVE RpcServer ("" on a plain
    # socket); never sent: it is what the transport proved, not what the sender claims
    peer_key: str = ""
    # host the connection came from as the server saw it (libzmq's Peer-Address; "" when the
    # transport does not say), set by RpcServer; never sent
    peer_host: str = ""

    def __post_init__(self) -> None:
        cls = MESSAGE_TYPES.get(self.type)
        if cls is None:
            raise SchemaError("unknown_type", f"Envelope.type {self.type!r} is not a registered message type")
        if not isinstance(self.body, cls):
            raise SchemaError(
                "bad_schema", f"Envelope.body is {type(self.body).__name__}, type {self.type!r} needs {cls.__name__}"
            )
        if not is_int(self.id) or not 0 <= self.id < ID_LIMIT:
            raise SchemaError("bad_header", f"Envelope.id must be an int in [0, 2**63), got {self.id!r}")
        if not isinstance(self.src, str) or len(self.src) > SRC_MAX_LEN:
            raise SchemaError(
                "bad_header", f"Envelope.src must be a str of <= {SRC_MAX_LEN} chars, got {self.src!r:.80}"
            )

    @classmethod
    def of(cls, body: Message, id: int, src: str) -> Envelope:
        """Wrap a body, taking the type tag from its class."""
        return cls(type(body).TYPE, id, src, body)


# ---------------------------------------------------------------- generic replies


@message("ok")
class Ok(Message):
    """Empty acknowledgement."""


@message("error")
class Error(Message):
    """A request failed: `code` is a stable token (bad_schema, handler_error, unknown_node, ...)."""

    code: Annotated[str, Length(hi=64)]
    message: str = ""


# ---------------------------------------------------------------- node <-> bootstrap


@message("join")
class Join(Message):
    """A node announces its capabilities (atlas_p2p.capabilities, base units); answered by
    `welcome`. node_id set = rejoin."""

    memory_bytes: Annotated[int, Range(1, None)]  # memory budget, bytes
    bandwidth_bps: Annotated[int, Range(1, None)]  # uplink, bits per second
    compute_score: Annotated[float, Range(0.0, None)]
    address: Address  # "host:port" of the node's own RpcServer
    has_data: bool = False
    model: str = ""  # model the node runs; "" = whatever the swarm runs
    node_id: NodeId | None = None  # set when rejoining after a restart
    incarnation: str = ""  # the state incarnation that handed out node_id (its welcome's); "" = not known
    token: Secret = ""  # the secret of the swarm's join token ("" in an --insecure swarm)
    relay: Address = ""  # "host:port" of the relay this node volunteers (--relay), "" for none
    via: Address = ""  # the relay `address` goes through (this node cannot be dialled), "" for none

    @classmethod
    def offer(cls, capabilities: Capabilities, **rest: Any) -> Join:
        """A join carrying `capabilities`; `rest` sets the other fields (address, model, ...)."""
        return cls(**dataclasses.asdict(capabilities), **rest)

    def capabilities(self) -> Capabilities:
        """The offer this join carries; ValueError when a value is not a valid offer."""
        return Capabilities(
            memory_bytes=self.memory_bytes,
            bandwidth_bps=self.bandwidth_bps,
            compute_score=self.compute_score,
            has_data=self.has_data,
        )


@message("welcome")
class Welcome(Message):
    """Reply to join: the node's id and what every node must agree on."""

    node_id: NodeId
    model: str
    fingerprint_seed: int
    heartbeat_s: Annotated[float, Range(0.0, None)]
    fingerprint_samples: Annotated[int, Range(1, None)] = 32
    model_task: str = "causal_lm"  # or "classification"
    num_labels: Annotated[int, Range(1, None)] | None = None
    split_mode: Annotated[str, OneOf(SPLIT_MODES)] = "two-part"
    merge_rule: Annotated[str, OneOf(MERGE_RULES)] = "exact"  # fedavg: SplitLoRA's factor average (a baseline)
    fingerprint_probe: Annotated[str, OneOf(FINGERPRINT_PROBES)] = "lora"  # atlas_p2p.fingerprint
    init_seed: Annotated[int, Range(0, (1 << 63) - 1)] = 0  # draws the parameters a checkpoint lacks
    privacy_floor: Annotated[float, Range(0.0, None)] | None = None  # set: send psi by split with the fingerprint
    incarnation: str = ""  # the bootstrap state's incarnation: node_id is only this node's within it
    # the host the bootstrap saw the join come from (what to --advertise when the node's own address
    # cannot be dialled; `beat.reachable` says whether it could); "" when the transport does not say
    seen_from: Annotated[str, Length(hi=256)] = ""


@message("base_digest")
class BaseDigest(Message):
    """Node -> bootstrap once its model is loaded: the digest of the base it runs; -> `ok`, or
    `error(base_mismatch)` when the swarm runs another base (the node must stop)."""

    node_id: NodeId
    digest: Digest  # sha256 hex of the base (atlas_p2p.models.base)
    model: str = ""  # the model name it loaded
    revision: Annotated[str, Length(hi=256)] = ""  # the checkpoint revision the digest covers
    dtype: Annotated[str, Length(hi=32)] = ""


@message("heartbeat")
class Heartbeat(Message):
    """Liveness and progress (kept in the peer table); answered by `ok`, or by `beat` once the
    bootstrap runs a swarm."""

    node_id: NodeId
    state: Annotated[str, OneOf(NODE_STATES)]
    round: Count = 0
    base_version: Count = 0
    incarnation: str = ""  # the state incarnation that gave node_id ("" = not said): another one is refused


@message("leave")
class Leave(Message):
    """A node departs on purpose; answered by `ok`."""

    node_id: NodeId
    reason: Reason = ""


@message("peers")
class Peers(Message):
    """Ask for one page of the peer table (optionally one cluster's rows): the rows from
    `offset` (0-based, in id order), at most `limit`; answered by `peer_list`."""

    cluster: int | None = None
    offset: Count = 0
    limit: Annotated[int, Range(1, PEERS_PAGE_MAX)] = PEERS_PAGE_DEFAULT
    token: Secret = ""  # the join token's secret, for a reader that is not a node of the swarm


@message("peer_list")
class PeerList(Message):
    """One page of the peer table, each row a small map (node_id, address, state, cluster, ...);
    `total`: rows matching the request on all pages (the next page starts at offset + len(rows))."""

    rows: Annotated[list[dict[str, Any]], Length(hi=PEERS_PAGE_MAX)] = field(default_factory=list)
    total: Count = 0


@message("fingerprint")
class Fingerprint(Message):
    """A node's 64-d unit task fingerprint (DESIGN section 6); answered by `ok`."""

    node_id: NodeId
    vector: Annotated[np.ndarray, TensorSpec(("float32",), (64,))]
    n_samples: Count
    importance: dict[str, float] | None = None  # per-weight importance probe (section 7)
    # psi(s) for s = 1..L-1 measured on the node's data (atlas_p2p.privacy.leakage), when asked
    leakage: Annotated[list[Annotated[float, Range(0.0, None)]], Length(hi=1024)] | None = None
    # [epsilon, delta] of the vector's sample-level DP release (atlas_p2p.privacy.fingerprint_dp), None: no DP
    dp: Annotated[list[Annotated[float, Range(0.0, None)]], Length(2, 2)] | None = None


@message("report")
class Report(Message):
    """Metrics from a node (loss, bytes sent by kind, peak memory, ...); answered by `ok`."""

    node_id: NodeId
    metrics: Annotated[dict[str, Any], Length(hi=64)]


@message("get_assignment")
class GetAssignment(Message):
    """Ask for the node's current assignment; answered by `assignment`."""

    node_id: NodeId


@message("assignment")
class Assignment(Message):
    """Where a node stands: cluster, partners, ranks and split point (DESIGN section 2.3).

    Roles (atlas_p2p.planning): whole = trains the whole model alone (and may serve
    owners), owner = runs blocks[:split] with `helper` running the rest, helper = a pure
    helper (no data, no cluster), waiting = cannot train now (`reason` says why).
    """

    node_id: NodeId
    version: Count  # bumps whenever the bootstrap changes this assignment
    cluster: int | None  # None: pure helper, or not clustered yet
    members: list[NodeId]  # live data nodes of the cluster
    ranks: dict[str, Count]  # module name -> LoRA rank (0 = no adapter)
    split: Count | None  # owner runs blocks[:split] (L: whole model); None: pure helper
    helper: NodeId | None  # who runs blocks[split:] for this node (None: itself/waiting)
    anchor: NodeId | None  # member that publishes round manifests (None: no cluster)
    reason: str = ""  # why it changed ("initial", "repair", ...) and the plan's note
    serves: list[NodeId] = field(default_factory=list)  # owners this node helps
    addresses: dict[str, Address] = field(default_factory=dict)  # str(node_id) -> "host:port"
    role: Annotated[str, OneOf(ROLES)] = "waiting"
    # one map per served owner: {"owner", "cluster", "anchor"} (a `round_begin` must name that cluster)
    owners: list[dict[str, Any]] = field(default_factory=list)
    # str(node_id) -> Z85 public key, for every node in `addresses` and every node that may
    # call this one (the helpers of its cluster's members); empty in an --insecure swarm
    keys: dict[str, PublicKey] = field(default_factory=dict)
    # members of its cluster nobody can dial (the bootstrap's check): leaves of the reduce tree, no
    # gossip target; they dial the others
    unreachable: list[NodeId] = field(default_factory=list)


@message("whois")
class Whois(Message):
    """Node -> bootstrap: which node holds this public key (a caller the assignment does not
    name); answered by `whois_reply`."""

    key: PublicKey


@message("whois_reply")
class WhoisReply(Message):
    """The node id bound to the key, or None when no node of the swarm holds it."""

    node_id: NodeId | None = None


# ---------------------------------------------------------------- peer <-> peer


@message("forward")
class Forward(Message):
    """Owner -> helper: activations at the split; answered by `backward` (two-part), or, without
    labels in u-shape mode, by `hidden` (labels never leave the owner)."""

    step: Count
    activations: Tensor  # (B, T, H), float32, or bfloat16 with --wire-bf16
    attention_mask: Tensor  # (B, T)
    labels: Tensor | None = None  # (B, T) or (B,); None in u-shape mode
    base_version: Count = 0  # both sides must run the same base
    owner_id: NodeId = 0
    cluster: int = 0
    round: Count = 0


@message("backward")
class Backward(Message):
    """Helper -> owner: gradient of the loss with respect to the activations it was sent
    (and, answering a two-part `probe` of a sequence classifier, of the head's parameters)."""

    step: Count
    grad: Tensor  # (B, T, H), same dtype as the activations
    loss: float | None = None
    head_grads: dict[str, Tensor] | None = None  # parameter name -> gradient; `probe` replies only


@message("ping")
class Ping(Message):
    """Liveness probe of a node (tests and benchmarks/transport.py); answered by `ok`."""


# ---------------------------------------------------------------- training runtime
# Factor tensors travel in one `tensors` map keyed "A:<module>" (r, d_in), "B:<module>"
# (d_out, r) and "D:<dense name>" (a head's change); `scalings` maps <module> -> gamma.

Seed = Annotated[int, Range(0, (1 << 63) - 1)]


@message("beat")
class Beat(Message):
    """Bootstrap -> node, the answer to a heartbeat once the swarm trains (docs/RUNTIME.md)."""

    assignment_version: Count  # fetch `get_assignment` when it differs from the node's
    swarm_done: bool = False  # every data node finished or left: helpers may stop
    need_fingerprint: bool = False  # the bootstrap holds no fingerprint of this data node
    need_base: bool = False  # the bootstrap holds no base digest of this node: send `base_digest`
    reachable: bool | None = None  # whether the bootstrap could dial this node back (None: not yet known)
    # when it could not: relays that volunteer ("host:port"; ":port" is the bootstrap's own host)
    relays: Annotated[list[Address], Length(hi=RELAYS_MAX)] = field(default_factory=list)


@message("round_begin")
class RoundBegin(Message):
    """Owner -> helper before step 0 of a round: the plan of its server-side adapter; -> `ok`."""

    owner_id: NodeId
    cluster: int
    round: Count
    split: Count
    ranks: dict[str, Count]  # the owner's ranks (entries of blocks[:split] are ignored)
    seed: Seed  # the owner's round seed (training.round_seed)
    lr: Annotated[float, Range(0.0, None)]
    mode: Annotated[str, OneOf(SPLIT_MODES)] = "two-part"
    base_version: Count = 0
    base_digest: Digest = ""  # the owner's base; a helper on another base refuses (`base_mismatch`)
    base_chain: Digest = ""  # the chain of the owner's cluster log at base_version; "" = not stated


@message("hidden")
class Hidden(Message):
    """Helper -> owner in u-shape mode, the answer to a `forward` without labels: the output
    hidden states of blocks[s:L]; the owner runs the final norm, head and loss itself."""

    step: Count
    hidden: Tensor  # (B, T, H), same dtype as the activations


@message("u_backward")
class UBackward(Message):
    """Owner -> helper in u-shape mode: gradient of the owner's loss with respect to the hidden
    states of `hidden`; the helper backpropagates it through blocks[s:L], steps the owner's
    server-side adapter and answers `backward` (gradient of the activations)."""

    step: Count
    grad: Tensor  # (B, T, H), same dtype as the hidden states
    base_version: Count = 0
    owner_id: NodeId = 0
    cluster: int = 0
    round: Count = 0


@message("return_get")
class ReturnGet(Message):
    """Owner -> helper at the end of a round: hand back my server-side adapter; -> `server_adapter`."""

    owner_id: NodeId
    cluster: int
    round: Count


@message("server_adapter")
class ServerAdapterMsg(Message):
    """The factors a helper trained for one owner this round (A:/B:/D: keys, see above)."""

    owner_id: NodeId
    round: Count
    steps: Count
    tensors: dict[str, Tensor]
    scalings: dict[str, float]


@message("contribution")
class ContributionMsg(Message):
    """One owner's round contribution, pushed by gossip inside its cluster; answered by `ok`."""

    cluster: int
    round: Count
    node_id: NodeId  # whose contribution
    n_samples: Count
    digest: Digest  # aggregation.Contribution.digest, checked on arrival
    tensors: dict[str, Tensor]
    scalings: dict[str, float]
    sender: NodeId = 0  # who sent this copy (not forwarded back to it)


@message("partial")
class PartialMsg(Message):
    """Un-normalised sums over some contributions of a round (atlas_p2p.aggregation.reduce), sent
    up the cluster's reduce tree or straight to the anchor; answered by `ok`, or error
    `overlap` (some covered contribution is held already: send the pieces) or `too_old`."""

    cluster: int
    round: Count
    sender: NodeId
    covers: dict[str, Digest]  # str(node id) -> digest of its contribution
    tensors: dict[str, Tensor]  # the sums as patch arrays (aggregation.arrays, weights = sample counts)


@message("held_get")
class HeldGet(Message):
    """Ask the anchor whether it holds a member's contribution to a round; answered by `held`."""

    cluster: int
    round: Count
    node_id: NodeId
    digest: Digest


@message("held")
class Held(Message):
    """The answer to `held_get`."""

    cluster: int
    round: Count
    held: bool


@message("contribution_get")
class ContributionGet(Message):
    """Ask the anchor for a contribution it holds, by digest; answered by `contribution`."""

    cluster: int
    digest: Digest


@message("manifest_get")
class ManifestGet(Message):
    """Ask a cluster's anchor for the manifest of `round`; answered by `manifest`."""

    cluster: int
    round: Count


@message("manifest")
class Manifest(Message):
    """Which contributions a round merges, and the exact patch they make (DESIGN 8)."""

    cluster: int
    round: Count
    ready: bool  # False: not published yet, ask again
    version: Count = 0  # base version the patch brings the cluster to
    digests: list[Digest] = field(default_factory=list)  # contribution digests, sorted
    patch_digest: Digest = ""
    chain: Digest = ""  # versioning chain digest after this patch


@message("patches_get")
class PatchesGet(Message):
    """Catch-up: ask the anchor for every patch after `since`; answered by `patches`."""

    cluster: int
    since: Count


@message("patches")
class Patches(Message):
    """Patch records (version, digest, chain) with their arrays keyed "p<i>.<key>"."""

    cluster: int
    records: list[dict[str, Any]]
    tensors: dict[str, Tensor]


@message("probe")
class Probe(Message):
    """Owner -> provisional helper, one micro-batch of a fingerprint computed across a cut
    (atlas_p2p.training.probe). The helper runs the ORIGINAL base (no adapter, nothing kept):
    with labels (two-part) it answers `backward` (gradient of the activations, loss); without
    labels (u-shape) `hidden`; with `hidden_grad` (u-shape, second leg) `backward`."""

    owner_id: NodeId
    split: Annotated[int, Range(1, None)]
    activations: Tensor  # (B, T, H)
    attention_mask: Tensor  # (B, T)
    labels: Tensor | None = None  # (B, T) or (B,); two-part only
    hidden_grad: Tensor | None = None  # (B, T, H): u-shape second leg
