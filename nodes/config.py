"""Frozen configuration of the node side: the bootstrap, a node's control plane, the swarm
and one node's training.

One dataclass per component: `BootstrapConfig` (the bootstrap service), `NodeConfig` (a
node's control plane), `SwarmSpec` (what the bootstrap decides for everyone: model, task,
when to cluster) and `TrainConfig` (how one node trains). Every field says what it means
and `__post_init__` rejects a bad value with a message that names the field and the
value (atlas_p2p.validation). The CLI maps its flags 1:1 onto these fields, so a bad flag
fails here, before anything starts.

Units: memory is carried in bytes and bandwidth in bits per second, from the CLI parse
to the planner (atlas_p2p.capabilities.Capabilities); only the peer table view shows
them as decimal megabytes and Mbit/s.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

from atlas_p2p.capabilities import Capabilities, require_bandwidth, require_memory
from atlas_p2p.privacy.budget import SampleDP
from atlas_p2p.privacy.noise import ActivationNoise
from atlas_p2p.validation import require_bool, require_choice, require_int, require_name, require_number
from atlas_p2p.vocabulary import FINGERPRINT_PROBES, MERGE_RULES, PROBE_LORA, SEQ_CLS, SPLIT_MODES, TASKS
from transport.relay_wire import slot_ports
from transport.security import JoinToken

EMBEDDED_MODELS = {"tiny-gpt2": "gpt2", "tiny-llama": "llama", "tiny-bert": "bert"}
FINGERPRINT_SAMPLES = 256  # default m; real text needs it (docs/DECISIONS.md, benchmarks/fingerprint_sweep.py)
SEED_MAX = (1 << 63) - 1  # seeds travel as non-negative 64-bit ints

# A DNS name or an IPv4 literal; `*` means every interface (bind only).
_HOST_RE = re.compile(r"^(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?)$")


def parse_address(text: str, *, allow_port_zero: bool = False, what: str = "address") -> tuple[str, int]:
    """Split "HOST:PORT" into (host, port) or raise ValueError naming `what` and the text.

    HOST is a DNS name, an IPv4 literal, `*` or a bracketed IPv6 literal ("[::1]:5555").
    PORT is 1..65535; 0 ("pick a free port") only where `allow_port_zero` (binding).
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what}: expected HOST:PORT, got {text!r}")
    raw = text.strip()
    if raw.startswith("tcp://"):
        raw = raw[len("tcp://") :]
    host, sep, port_text = raw.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{what}: expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{what}: bad IPv6 host in {text!r}") from None
    elif not _HOST_RE.match(host):
        raise ValueError(f"{what}: bad host {host!r} in {text!r}")
    if not port_text.isdigit():
        raise ValueError(f"{what}: port must be a number, got {port_text!r} in {text!r}")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{what}: port must be in {low}..65535, got {port} in {text!r}")
    return host, port


def format_address(host: str, port: int) -> str:
    """Inverse of `parse_address`: ("127.0.0.1", 5555) -> "127.0.0.1:5555"."""
    return f"{host}:{port}"


@dataclass(frozen=True)
class BootstrapConfig:
    """Settings of the bootstrap service (`atlas-node bootstrap`)."""

    # HOST:PORT the bootstrap's ROUTER socket binds; port 0 picks a free port.
    bind: str = "0.0.0.0:5555"
    # Directory holding the SQLite peer table (WAL); None keeps the table in memory only.
    state_dir: Path | None = None
    # Heartbeat period told to every node in `welcome`, seconds.
    heartbeat_s: float = 2.0
    # A node silent this long (seconds since its last heartbeat) is marked `suspect`.
    suspect_after_s: float = 6.0
    # A node silent this long is marked `dead` (so a crash is noticed in ~15-17 s).
    dead_after_s: float = 15.0
    # After a (re)start, silence is counted from start + grace at the earliest, so live
    # nodes that were backing off while the bootstrap was away are not declared dead.
    restart_grace_s: float = 10.0
    # How often the liveness sweep runs, seconds.
    sweep_s: float = 0.5
    # A row dead or left for this long (seconds since its last sign of life) is deleted; the
    # node, if it ever comes back, joins as a new node. An hour: far beyond any restart or
    # network outage a node rides out with its id, short enough that a join flood's rows go.
    expire_after_s: float = 3600.0
    # At most this many rows (live, dead and left); a join that needs one more is refused (`full`).
    max_nodes: int = 10_000
    # Joins admitted per second from all clients together (bursts of twice as many); beyond,
    # `busy` and the node retries its join with backoff. A flood of joins then cannot take
    # the CPU that answering members' heartbeats needs; 10,000 nodes rejoin in 100 s.
    join_rate: float = 100.0
    # A damaged or partial state is moved aside (never deleted) and a new incarnation started,
    # instead of being refused.
    fresh_state: bool = False
    # Model name handed to nodes in `welcome` (None: the nodes choose).
    model: str | None = None
    # Seed for the fingerprint projection (None: drawn once and kept in the state).
    fingerprint_seed: int | None = None
    # Seed of the parameters a checkpoint lacks, e.g. a new head (None: drawn once and kept in the state).
    init_seed: int | None = None
    # True: plain TCP, no keys, no join token, no identity checks (debugging only).
    insecure: bool = False
    # Directory of node public keys (`*.key`): only these may connect (None: any node with the token).
    allow_keys: Path | None = None
    # Directory of node public keys that may run other owners' layers (None: any node).
    hosts: Path | None = None
    # Relay for nodes nobody can dial (nodes/relay.py): its control port on the bind host (the
    # relayed nodes get the `relay_slots` ports after it); None: this bootstrap relays nobody.
    relay_port: int | None = None
    relay_slots: int = 4

    def __post_init__(self) -> None:
        parse_address(self.bind, allow_port_zero=True, what="bind")
        check_relay(self.relay_port, self.relay_slots)
        for name in ("state_dir", "allow_keys", "hosts"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        for name in ("allow_keys", "hosts"):
            if self.insecure and getattr(self, name) is not None:
                raise ValueError(f"{name} needs keys: it cannot be used with insecure=True")
        for name in ("heartbeat_s", "suspect_after_s", "dead_after_s", "sweep_s"):
            require_number(name, getattr(self, name), positive=True)
        require_number("restart_grace_s", self.restart_grace_s, 0)
        require_number("expire_after_s", self.expire_after_s, positive=True)
        require_int("max_nodes", self.max_nodes, 1)
        require_number("join_rate", self.join_rate, positive=True)
        require_bool("fresh_state", self.fresh_state)
        if self.suspect_after_s <= self.heartbeat_s:
            raise ValueError(
                f"suspect_after_s must exceed heartbeat_s ({self.heartbeat_s}), got {self.suspect_after_s}"
            )
        if self.dead_after_s <= self.suspect_after_s:
            raise ValueError(
                f"dead_after_s must exceed suspect_after_s ({self.suspect_after_s}), got {self.dead_after_s}"
            )
        if self.expire_after_s <= self.dead_after_s:
            raise ValueError(
                f"expire_after_s must exceed dead_after_s ({self.dead_after_s}), got {self.expire_after_s}"
            )
        if self.model is not None:
            require_name("model", self.model)
        for name in ("fingerprint_seed", "init_seed"):
            if getattr(self, name) is not None:
                require_int(name, getattr(self, name), 0, SEED_MAX)


def check_relay(port: int | None, slots: int) -> None:
    """A relay's control port (None: no relay) and slot count, as transport.relay_wire takes them."""
    require_int("relay_slots", slots, 1, 1024)
    if port is not None:
        require_int("relay_port", port, 0, 65535)
        try:
            slot_ports(port, slots)
        except ValueError as exc:
            raise ValueError(f"relay_port: {exc}") from None


@dataclass(frozen=True)
class NodeConfig:
    """Settings of a node's control plane (`atlas-node join`)."""

    # HOST:PORT of the bootstrap.
    bootstrap: str
    # Memory budget the node offers, bytes.
    memory_bytes: int
    # Uplink bandwidth the node offers, bits per second (a float is rounded to whole bit/s).
    bandwidth_bps: int
    # HOST:PORT this node's RPC server binds; port 0 picks a free port.
    bind: str = "127.0.0.1:0"
    # HOST:PORT peers should use to reach this node (None: derived from `bind`).
    advertise: str | None = None
    # JSONL file of local training data; None joins as a helper that lends compute.
    data: Path | None = None
    # Model name or local path this node runs (None: take the bootstrap's).
    model: str | None = None
    # Directory for node state (its node id, so a restart rejoins under the same id).
    state_dir: Path | None = None
    # Relative compute score (GFLOP/s); None: measured at start.
    compute_score: float | None = None
    # Deadline of each join/heartbeat request, seconds.
    request_timeout_s: float = 3.0
    # Reconnect backoff: first delay and cap, seconds (jittered, doubling per failure).
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 8.0
    # Deadline of the `leave` sent on shutdown, seconds.
    leave_timeout_s: float = 2.0
    # The join token printed by the bootstrap (its public key and the swarm's secret).
    token: str | None = None
    # True: plain TCP without keys, for a bootstrap started with --insecure (debugging only).
    insecure: bool = False
    # Volunteer as a relay for nodes nobody can dial (nodes/relay.py): control port on the bind
    # host, the `relay_slots` ports after it for the relayed nodes; None: relay nobody.
    relay_port: int | None = None
    relay_slots: int = 4

    def __post_init__(self) -> None:
        parse_address(self.bootstrap, what="bootstrap")
        parse_address(self.bind, allow_port_zero=True, what="bind")
        check_relay(self.relay_port, self.relay_slots)
        if self.advertise is not None:
            parse_address(self.advertise, what="advertise")
        require_memory("memory_bytes", self.memory_bytes)
        require_bandwidth("bandwidth_bps", self.bandwidth_bps)
        object.__setattr__(self, "bandwidth_bps", round(self.bandwidth_bps))
        for name in ("data", "state_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.model is not None:
            require_name("model", self.model)
        if self.compute_score is not None:
            require_number("compute_score", self.compute_score, positive=True)
        if self.insecure and self.token is not None:
            raise ValueError("token: an insecure node joins without a token; give one or the other")
        if not self.insecure:
            if self.token is None:
                raise ValueError("token: a join token is required (the bootstrap prints it), or insecure=True")
            try:
                JoinToken.parse(self.token)
            except ValueError as exc:
                raise ValueError(f"token: {exc}") from None
        for name in ("request_timeout_s", "backoff_base_s", "backoff_cap_s", "leave_timeout_s"):
            require_number(name, getattr(self, name), positive=True)
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_cap_s must be >= backoff_base_s ({self.backoff_base_s}), got {self.backoff_cap_s}"
            )

    @property
    def has_data(self) -> bool:
        """A node without data joins as a helper that lends compute."""
        return self.data is not None

    def capabilities(self, compute_score: float) -> Capabilities:
        """The offer this node joins with: its flags (bytes, bit/s, data or not) and what it measured."""
        return Capabilities(
            memory_bytes=self.memory_bytes,
            bandwidth_bps=self.bandwidth_bps,
            compute_score=compute_score,
            has_data=self.has_data,
        )


@dataclass(frozen=True)
class SwarmSpec:
    """What the bootstrap decides for the whole swarm (`atlas-node bootstrap` flags)."""

    model: str = "tiny-gpt2"  # embedded tiny-* name, or an HF id / local path
    task: str = "causal_lm"  # causal_lm | seq_cls
    num_labels: int | None = None  # classes (seq_cls only)
    min_nodes: int = 2  # fingerprints that trigger the first clustering
    assign_after_s: float = 30.0  # ... or seconds after the first fingerprint
    clusters: int | None = None  # fixed K; None: chosen by silhouette
    batch_size: int = 4  # planning workload: sequences per step
    max_seq_len: int = 32  # planning workload: tokens per sequence
    split_mode: str = "two-part"  # two-part | u-shape
    fingerprint_samples: int = FINGERPRINT_SAMPLES  # m: examples each node's fingerprint averages over
    fingerprint_probe: str = PROBE_LORA  # lora | head: what the fingerprint is a gradient in
    # the baselines of scenarios/evaluate.py (docs/RUNTIME.md, "Merge rules of the baselines")
    merge_rule: str = "exact"  # exact | fedavg (SplitLoRA) | mira (MIRA)
    fixed_split: int | None = None  # every data node runs exactly this many blocks (clipped to L-1)
    uniform_rank: int | None = None  # every adapted weight gets this rank, whatever the budget
    # an owner sends only after the first block where the Fisher leakage psi its data has there
    # (atlas_p2p.privacy.leakage) is at most this; None: no floor
    privacy_floor: float | None = None

    def __post_init__(self) -> None:
        require_name("model", self.model)
        require_choice("task", self.task, TASKS)
        if self.task == SEQ_CLS:
            require_int("num_labels", self.num_labels, 1)
        elif self.num_labels is not None:
            raise ValueError(f"num_labels is for task seq_cls only, got {self.num_labels!r} with {self.task}")
        require_int("min_nodes", self.min_nodes, 1)
        require_number("assign_after_s", self.assign_after_s, 0)
        if self.clusters is not None:
            require_int("clusters", self.clusters, 1)
        require_int("batch_size", self.batch_size, 1)
        require_int("max_seq_len", self.max_seq_len, 2)
        require_int("fingerprint_samples", self.fingerprint_samples, 1)
        require_choice("fingerprint_probe", self.fingerprint_probe, FINGERPRINT_PROBES)
        require_choice("split_mode", self.split_mode, SPLIT_MODES)
        require_choice("merge_rule", self.merge_rule, MERGE_RULES)
        if self.fixed_split is not None:
            require_int("fixed_split", self.fixed_split, 1)
        if self.uniform_rank is not None:
            require_int("uniform_rank", self.uniform_rank, 1)
        if self.privacy_floor is not None:
            require_number("privacy_floor", self.privacy_floor, 0)


MERGE_MODES = ("reduce", "gossip")  # how a cluster's contributions reach its anchor (nodes/cluster_sync.py)


@dataclass(frozen=True)
class TrainConfig:
    """How one node trains (`atlas-node join` flags)."""

    out_dir: Path | None  # adapter, metrics.jsonl, summary.json, checkpoint/ (None: a helper writes nothing)
    rounds: int = 3  # merge rounds to train
    local_steps: int = 5  # E: steps per round
    batch_size: int = 4  # sequences per step
    lr: float = 1e-3  # AdamW learning rate (owner and its helper)
    max_seq_len: int = 32  # tokens per sequence (longer ones are cut)
    device: str = "cpu"  # torch device
    seed: int = 0  # batch order seed (the round seeds come from the swarm's seed)
    eval_path: Path | None = None  # held-out JSONL: accuracy (seq_cls) or perplexity (causal_lm) per round
    split_mode: str | None = None  # two-part | u-shape; None: the swarm's (the bootstrap decides)
    export_rank: int | None = None  # None: exact export (numerical rank per module); R: lossy, ranks capped at R
    threads: int = 1  # torch threads of the node's single executor thread
    step_timeout_s: float = 10.0  # deadline of one forward/backward exchange before the helper is reported
    round_deadline_s: float = 20.0  # anchor publishes this long after a round's first contribution
    fanout: int = 2  # gossip: members each contribution is pushed to (merge="gossip" only)
    merge: str = "reduce"  # reduce: partial sums up a tree to the anchor; gossip: every contribution to every member
    fan_in: int = 2  # reduce: children per node of the cluster's reduce tree (an inner node serves each the patch)
    reduce_wait_s: float = 2.0  # reduce: a node waits this long for its children before forwarding what it has
    wire_bf16: bool = False  # an owner sends activations (and u-shape gradients) as bfloat16; its helper answers alike
    activation_noise: ActivationNoise | None = None  # an owner adds this noise to the activations it sends
    fingerprint_dp: SampleDP | None = None  # the fingerprint is released with sample-level (ε, δ)-DP
    poll_s: float = 0.1  # how often waits re-check (manifest, assignment)
    helper_wait_s: float = 60.0  # a node below the whole model waits this long for a provisional helper
    step_delay_s: float = 0.0  # extra seconds per step: emulates a slow device (stragglers in scenarios)
    emulate_link: bool = False  # shape this node's sends by its own --bandwidth (scenarios on one machine)
    latency_ms: float = 0.0  # with emulate_link: one-way delay added to every message this node sends
    shared_base: bool = False  # in-process swarms: view the process's one frozen base (copy-on-write), not a copy

    def __post_init__(self) -> None:
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.eval_path is not None:
            object.__setattr__(self, "eval_path", Path(self.eval_path))
        for name in ("rounds", "local_steps", "batch_size", "threads"):
            require_int(name, getattr(self, name), 1)
        if self.export_rank is not None:
            require_int("export_rank", self.export_rank, 1)
        require_int("max_seq_len", self.max_seq_len, 2)
        require_int("fanout", self.fanout, 0)
        require_choice("merge", self.merge, MERGE_MODES)
        require_int("fan_in", self.fan_in, 1)
        require_number("reduce_wait_s", self.reduce_wait_s, positive=True)
        require_bool("wire_bf16", self.wire_bf16)
        if self.activation_noise is not None and not isinstance(self.activation_noise, ActivationNoise):
            raise ValueError(f"activation_noise: {self.activation_noise!r} must be None or an ActivationNoise")
        if self.fingerprint_dp is not None and not isinstance(self.fingerprint_dp, SampleDP):
            raise ValueError(f"fingerprint_dp: {self.fingerprint_dp!r} must be None or a SampleDP")
        require_int("seed", self.seed, 0)
        for name in ("lr", "step_timeout_s", "round_deadline_s", "poll_s"):
            require_number(name, getattr(self, name), positive=True)
        require_number("helper_wait_s", self.helper_wait_s, 0)
        require_number("step_delay_s", self.step_delay_s, 0)
        require_bool("emulate_link", self.emulate_link)
        require_bool("shared_base", self.shared_base)
        require_number("latency_ms", self.latency_ms, 0)
        if self.latency_ms and not self.emulate_link:
            raise ValueError(f"latency_ms ({self.latency_ms!r}) is emulated only with emulate_link")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a torch device name, got {self.device!r}")
        if self.split_mode is not None:
            require_choice("split_mode", self.split_mode, SPLIT_MODES)
