"""The results a node writes under its `--out`, and the figures read back from them.

One schema for both sides: the node writes through these records (nodes/peer.py,
nodes/metrics.py, nodes/checkpoint.py) and tools/report.py reads through the same
classes, so a key spelled differently on one side fails the round-trip test
(tests/test_records.py). Each record has `to_json()` (a JSON-ready dict, the keys on
disk) and `from_json(data)` (KeyError/TypeError/ValueError on a missing or mistyped key).

- `RoundLine`: one line of `metrics.jsonl` per round the node finished;
- `Summary`: `summary.json`, written when the node ends;
- `CheckpointState`: `checkpoint/state.json`, written after every round;
- inside them, `ContributionRecord` (an update the node made and sent),
  `FoldedRecord` (a patch the node folded into its base), `RepairRecord` (a helper it
  reported) and `Evaluation` (the held-out metric of a round).

Lost updates (DESIGN 8, "nothing is lost"): `lost_updates` is the one definition.

Bytes by kind (DESIGN 5): the RPC layer counts the encoded bytes of every message a
node sends by message type; `bytes_by_kind` folds those counts into the five kinds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

KINDS = ("activations", "gradients", "adapters", "fingerprints", "control")

# message type -> kind of the bytes it carries; every other type is control
KIND_OF = {
    "forward": "activations",
    "backward": "gradients",
    "hidden": "activations",  # u-shape: the helper's output hidden states
    "u_backward": "gradients",  # u-shape: the owner's gradient of those hidden states
    "server_adapter": "adapters",
    "contribution": "adapters",
    "partial": "adapters",
    "patches": "adapters",
    "fingerprint": "fingerprints",
    "probe": "fingerprints",  # owner activations of a fingerprint computed across a cut
}


def bytes_by_kind(*by_type: Mapping[str, int]) -> dict[str, int]:
    """Sum byte counts keyed by message type into the five kinds (all five present)."""
    totals = dict.fromkeys(KINDS, 0)
    for counts in by_type:
        for msg_type, n in counts.items():
            totals[KIND_OF.get(msg_type, "control")] += int(n)
    return totals


JsonObject = dict[str, object]


def _opt(convert, value):
    return None if value is None else convert(value)


@dataclass(frozen=True)
class Evaluation:
    """The held-out metric of a round (atlas_p2p.training.evaluate): accuracy or perplexity."""

    metric: str
    value: float
    loss: float

    def to_json(self) -> JsonObject:
        return {"metric": self.metric, "value": self.value, "loss": self.loss}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Evaluation:
        return cls(str(data["metric"]), float(data["value"]), float(data["loss"]))


@dataclass(frozen=True)
class ContributionRecord:
    """An update the node made and sent; `carry`: the contribution that missed the last manifest."""

    round: int
    digest: str
    n_samples: int
    carry: bool = False

    def to_json(self) -> JsonObject:
        data: JsonObject = {"round": self.round, "digest": self.digest, "n_samples": self.n_samples}
        if self.carry:
            data["carry"] = True
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> ContributionRecord:
        return cls(int(data["round"]), str(data["digest"]), int(data["n_samples"]), bool(data.get("carry", False)))


@dataclass(frozen=True)
class FoldedRecord:
    """A patch the node folded: from a manifest (which lists the contribution digests it
    merges) or by catch-up from the anchor's log (`contributions` None). `nodes` are the
    ids (as str) of the contributors the patch weighs."""

    round: int
    version: int
    digest: str
    nodes: tuple[str, ...]
    via: str  # "manifest" or "catch-up"
    contributions: tuple[str, ...] | None = None

    def to_json(self) -> JsonObject:
        data: JsonObject = {
            "round": self.round,
            "version": self.version,
            "digest": self.digest,
            "nodes": list(self.nodes),
            "via": self.via,
        }
        if self.contributions is not None:
            data["contributions"] = list(self.contributions)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> FoldedRecord:
        return cls(
            int(data["round"]),
            int(data["version"]),
            str(data["digest"]),
            tuple(str(n) for n in data["nodes"]),
            str(data["via"]),
            _opt(lambda ds: tuple(str(d) for d in ds), data.get("contributions")),
        )


@dataclass(frozen=True)
class RepairRecord:
    """A helper this node reported as failed, and why."""

    time: float
    round: int
    helper: int
    why: str

    def to_json(self) -> JsonObject:
        return {"time": self.time, "round": self.round, "helper": self.helper, "why": self.why}

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> RepairRecord:
        return cls(float(data["time"]), int(data["round"]), int(data["helper"]), str(data["why"]))


def _kinds(data: object) -> dict[str, int]:
    return {str(k): int(v) for k, v in dict(data).items()}


@dataclass(frozen=True)
class RoundLine:
    """One line of metrics.jsonl: a round this node finished. `bytes_by_kind` are running
    totals since the process started; `contributions` the digest it made this round,
    `manifests_folded` the digests of the patches of this round it folded."""

    node_id: int
    cluster: int | None
    round: int
    role: str | None
    loss: float | None
    eval: Evaluation | None
    steps: int
    step_rate: float | None
    bytes_by_kind: dict[str, int]
    base_version: int
    contributions: tuple[str, ...]
    manifests_folded: tuple[str, ...]
    carried_over: bool  # this round's contribution missed its manifest and goes into the next one
    repairs_seen: int
    helper: int | None
    time: float

    def to_json(self) -> JsonObject:
        return {
            "node_id": self.node_id,
            "cluster": self.cluster,
            "round": self.round,
            "role": self.role,
            "loss": self.loss,
            "eval": _opt(Evaluation.to_json, self.eval),
            "steps": self.steps,
            "step_rate": self.step_rate,
            "bytes_by_kind": dict(self.bytes_by_kind),
            "base_version": self.base_version,
            "contributions": list(self.contributions),
            "manifests_folded": list(self.manifests_folded),
            "carried_over": self.carried_over,
            "repairs_seen": self.repairs_seen,
            "helper": self.helper,
            "time": self.time,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> RoundLine:
        return cls(
            node_id=int(data["node_id"]),
            cluster=_opt(int, data["cluster"]),
            round=int(data["round"]),
            role=_opt(str, data["role"]),
            loss=_opt(float, data["loss"]),
            eval=_opt(Evaluation.from_json, data["eval"]),
            steps=int(data["steps"]),
            step_rate=_opt(float, data["step_rate"]),
            bytes_by_kind=_kinds(data["bytes_by_kind"]),
            base_version=int(data["base_version"]),
            contributions=tuple(str(d) for d in data["contributions"]),
            manifests_folded=tuple(str(d) for d in data["manifests_folded"]),
            carried_over=bool(data["carried_over"]),
            repairs_seen=int(data["repairs_seen"]),
            helper=_opt(int, data["helper"]),
            time=float(data["time"]),
        )


@dataclass(frozen=True)
class CheckpointState:
    """checkpoint/state.json: what a restarted node resumes from (besides its base and pending
    contribution, kept beside it as safetensors by nodes/checkpoint.py)."""

    node_id: int
    cluster: int | None
    round: int
    base_version: int
    rounds_done: int
    steps_total: int
    contributions: tuple[ContributionRecord, ...]
    manifests: tuple[FoldedRecord, ...]
    repairs: tuple[RepairRecord, ...]

    @property
    def folded(self) -> tuple[FoldedRecord, ...]:
        return self.manifests

    def to_json(self) -> JsonObject:
        return {
            "node_id": self.node_id,
            "cluster": self.cluster,
            "round": self.round,
            "base_version": self.base_version,
            "rounds_done": self.rounds_done,
            "steps_total": self.steps_total,
            "contributions": [c.to_json() for c in self.contributions],
            "manifests": [m.to_json() for m in self.manifests],
            "repairs": [r.to_json() for r in self.repairs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> CheckpointState:
        return cls(
            node_id=int(data["node_id"]),
            cluster=_opt(int, data["cluster"]),
            round=int(data["round"]),
            base_version=int(data["base_version"]),
            rounds_done=int(data["rounds_done"]),
            steps_total=int(data["steps_total"]),
            contributions=tuple(ContributionRecord.from_json(c) for c in data["contributions"]),
            manifests=tuple(FoldedRecord.from_json(m) for m in data["manifests"]),
            repairs=tuple(RepairRecord.from_json(r) for r in data["repairs"]),
        )


@dataclass(frozen=True)
class Summary:
    """summary.json: the node's state when it ended (finished, interrupted or refused)."""

    node_id: int | None
    finished: bool
    rounds_done: int
    rounds: int
    cluster: int | None
    role: str | None
    has_data: bool
    split: int | None
    ranks: dict[str, int]
    helper: int | None
    adapter_dir: str | None
    export: JsonObject | None  # nodes/peer.py _finish: path, the export report, error
    export_error: str | None
    base_version: int | None
    contributions: tuple[ContributionRecord, ...]
    manifests_folded: tuple[FoldedRecord, ...]
    repairs: tuple[RepairRecord, ...]
    split_mode: str | None
    steps_served: int
    requests_served: dict[str, int]
    labels_received: int
    bytes_by_kind: dict[str, int]
    peak_rss_mb: dict[str, float | None] = field(default_factory=dict)
    base_digest: str | None = None
    # nodes/relay.py: {"used": the relay this node was reached through (bytes, round trip), or
    # None; "served": what it relayed for others with --relay, or None}
    relay: JsonObject = field(default_factory=lambda: {"used": None, "served": None})

    @property
    def folded(self) -> tuple[FoldedRecord, ...]:
        return self.manifests_folded

    def to_json(self) -> JsonObject:
        return {
            "node_id": self.node_id,
            "finished": self.finished,
            "rounds_done": self.rounds_done,
            "rounds": self.rounds,
            "cluster": self.cluster,
            "role": self.role,
            "has_data": self.has_data,
            "split": self.split,
            "ranks": dict(self.ranks),
            "helper": self.helper,
            "adapter_dir": self.adapter_dir,
            "export": self.export,
            "export_error": self.export_error,
            "base_version": self.base_version,
            "contributions": [c.to_json() for c in self.contributions],
            "manifests_folded": [m.to_json() for m in self.manifests_folded],
            "repairs": [r.to_json() for r in self.repairs],
            "split_mode": self.split_mode,
            "steps_served": self.steps_served,
            "requests_served": dict(self.requests_served),
            "labels_received": self.labels_received,
            "bytes_by_kind": dict(self.bytes_by_kind),
            "peak_rss_mb": dict(self.peak_rss_mb),
            "base_digest": self.base_digest,
            "relay": dict(self.relay),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Summary:
        return cls(
            node_id=_opt(int, data["node_id"]),
            finished=data["finished"] is True,
            rounds_done=int(data["rounds_done"]),
            rounds=int(data["rounds"]),
            cluster=_opt(int, data["cluster"]),
            role=_opt(str, data["role"]),
            has_data=bool(data["has_data"]),
            split=_opt(int, data["split"]),
            ranks={str(k): int(v) for k, v in dict(data["ranks"]).items()},
            helper=_opt(int, data["helper"]),
            adapter_dir=_opt(str, data["adapter_dir"]),
            export=_opt(dict, data["export"]),
            export_error=_opt(str, data["export_error"]),
            base_version=_opt(int, data["base_version"]),
            contributions=tuple(ContributionRecord.from_json(c) for c in data["contributions"]),
            manifests_folded=tuple(FoldedRecord.from_json(m) for m in data["manifests_folded"]),
            repairs=tuple(RepairRecord.from_json(r) for r in data["repairs"]),
            split_mode=_opt(str, data["split_mode"]),
            steps_served=int(data["steps_served"]),
            requests_served=_kinds(data["requests_served"]),
            labels_received=int(data["labels_received"]),
            bytes_by_kind=_kinds(data["bytes_by_kind"]),
            peak_rss_mb={str(k): _opt(float, v) for k, v in dict(data["peak_rss_mb"]).items()},
            base_digest=_opt(str, data["base_digest"]),
            relay=dict(data.get("relay") or {"used": None, "served": None}),
        )


@dataclass(frozen=True)
class LostUpdate:
    node_id: int
    round: int
    digest: str


def lost_updates(records: Iterable[Summary | CheckpointState]) -> list[LostUpdate]:
    """Contributions no folded patch took in, directly or carried inside a later one.

    `records` are the nodes' summaries (or, for a node killed for good, its last
    checkpoint state). Node n's contribution of round r is merged when some node folded a
    patch of round r that weighs n; an earlier contribution of n that missed its manifest
    rides inside n's next one (training.carry_over), so it is lost only when neither it
    nor any later contribution of n was merged. Sorted by node, then round.
    """
    records = list(records)
    merged = {(node, m.round) for r in records for m in r.folded for node in m.nodes}
    lost = []
    for r in sorted((r for r in records if r.node_id is not None), key=lambda r: r.node_id):
        made = sorted(r.contributions, key=lambda c: c.round)
        for i, c in enumerate(made):
            if not any((str(r.node_id), later.round) in merged for later in made[i:]):
                lost.append(LostUpdate(r.node_id, c.round, c.digest))
    return lost
