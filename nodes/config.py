"""Frozen configuration for the bootstrap service and for a node's control plane.

One dataclass per component; every field says what it means and `__post_init__`
rejects a bad value with a message that names the field and the value. The CLI maps
its flags 1:1 onto these fields, so a bad flag fails here, before anything starts.

Units: memory is carried in bytes here and shown as decimal megabytes (10^6 bytes) in
the peer table, so `--memory 8GB` reads as 8000 MB; bandwidth is carried in bits per
second and shown in Mbit/s.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path

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
        raw = raw[len("tcp://"):]
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


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


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
    # Model name handed to nodes in `welcome` (None: the nodes choose).
    model: str | None = None
    # Seed for the fingerprint projection (None: drawn once and kept in the state).
    fingerprint_seed: int | None = None
    # Seed of the parameters a checkpoint lacks, e.g. a new head (None: drawn once and kept in the state).
    init_seed: int | None = None

    def __post_init__(self) -> None:
        parse_address(self.bind, allow_port_zero=True, what="bind")
        if self.state_dir is not None and not isinstance(self.state_dir, Path):
            object.__setattr__(self, "state_dir", Path(self.state_dir))
        _positive("heartbeat_s", self.heartbeat_s)
        _positive("suspect_after_s", self.suspect_after_s)
        _positive("dead_after_s", self.dead_after_s)
        _non_negative("restart_grace_s", self.restart_grace_s)
        _positive("sweep_s", self.sweep_s)
        if self.suspect_after_s <= self.heartbeat_s:
            raise ValueError(
                f"suspect_after_s must exceed heartbeat_s ({self.heartbeat_s}), got {self.suspect_after_s}"
            )
        if self.dead_after_s <= self.suspect_after_s:
            raise ValueError(
                f"dead_after_s must exceed suspect_after_s ({self.suspect_after_s}), got {self.dead_after_s}"
            )
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ValueError(f"model must be a non-empty name, got {self.model!r}")
        if self.fingerprint_seed is not None and (
            isinstance(self.fingerprint_seed, bool)
            or not isinstance(self.fingerprint_seed, int)
            or not 0 <= self.fingerprint_seed < 2**63
        ):
            raise ValueError(f"fingerprint_seed must be an int in [0, 2**63), got {self.fingerprint_seed!r}")
        if self.init_seed is not None and (
            isinstance(self.init_seed, bool) or not isinstance(self.init_seed, int) or not 0 <= self.init_seed < 2**63
        ):
            raise ValueError(f"init_seed must be an int in [0, 2**63), got {self.init_seed!r}")


@dataclass(frozen=True)
class NodeConfig:
    """Settings of a node's control plane (`atlas-node join`)."""

    # HOST:PORT of the bootstrap.
    bootstrap: str
    # Memory budget the node offers, bytes.
    memory_bytes: int
    # Uplink bandwidth the node offers, bits per second.
    bandwidth_bps: float
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

    def __post_init__(self) -> None:
        parse_address(self.bootstrap, what="bootstrap")
        parse_address(self.bind, allow_port_zero=True, what="bind")
        if self.advertise is not None:
            parse_address(self.advertise, what="advertise")
        if isinstance(self.memory_bytes, bool) or not isinstance(self.memory_bytes, int) or self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be a positive int, got {self.memory_bytes!r}")
        _positive("bandwidth_bps", self.bandwidth_bps)
        for name in ("data", "state_dir"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        if self.model is not None and (not isinstance(self.model, str) or not self.model.strip()):
            raise ValueError(f"model must be a non-empty name, got {self.model!r}")
        if self.compute_score is not None:
            _positive("compute_score", self.compute_score)
        _positive("request_timeout_s", self.request_timeout_s)
        _positive("backoff_base_s", self.backoff_base_s)
        _positive("backoff_cap_s", self.backoff_cap_s)
        _positive("leave_timeout_s", self.leave_timeout_s)
        if self.backoff_cap_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_cap_s must be >= backoff_base_s ({self.backoff_base_s}), got {self.backoff_cap_s}"
            )

    @property
    def memory_mb(self) -> int:
        """Memory budget in decimal megabytes (10^6 bytes), as the peer table shows it."""
        return self.memory_bytes // 1_000_000

    @property
    def bandwidth_mbps(self) -> float:
        """Bandwidth in Mbit/s, as the peer table shows it."""
        return self.bandwidth_bps / 1e6

    @property
    def has_data(self) -> bool:
        """A node without data joins as a helper that lends compute."""
        return self.data is not None
