"""Merge rounds inside a cluster (DESIGN 8, docs/RUNTIME.md): reduce buffer, anchor, manifests.

Pure bookkeeping, no sockets: the node's cluster sync (nodes/cluster_sync.py) feeds it
partials (or contributions) and asks it what to forward, publish or serve.

- `ReduceBuffer` keeps the partials (aggregation.reduce) a node holds per (cluster, round)
  with pairwise disjoint covers: a partial that covers a contribution already held is
  refused unless it brings nothing new, so a contribution that arrives up the tree and
  directly counts once. It also says which pieces a node still has to forward up.
- `GossipStore` keeps every contribution a node has seen, by (cluster, round) and by
  digest; `add` says whether it is new (only new ones are forwarded: gossip ends). It
  serves the all-to-all gossip path (`merge="gossip"`), kept for comparison.
- `AnchorLog` is the anchor's record of one cluster: its patch log (a
  `versioning.VersionedBase`) and the manifests it published. Round r's manifest is
  version r+1 of the cluster's base: it lists the digests of the round's contributions
  (sorted) and the digest and chain of their exact stacked merge. It is published when
  every expected owner contributed, or once `deadline_s` passed since the first
  contribution of the round (stragglers cannot stall a round); a contribution that arrives
  later is not in it, and its owner carries it into its next contribution.
- `merge_manifest` rebuilds a published patch from the contributions a member holds and
  checks it against the manifest (gossip path); on the reduce path members fetch the
  patch itself and check its digest and chain against the manifest instead.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from atlas_p2p.aggregation import Contribution, Partial, Patch, combine, fedavg_partial, finalize, partial_of
from atlas_p2p.versioning import PatchRecord, VersionedBase
from atlas_p2p.vocabulary import EXACT, FEDAVG
from transport.messages import Manifest

log = logging.getLogger("atlas.merge")


def merge_contributions(contributions: list[Contribution], rule: str = EXACT) -> Partial:
    """The partial over whole contributions (in node-id order: the same set gives the same bytes);
    rule "fedavg" makes SplitLoRA's factor average instead of the exact mean (a baseline)."""
    if not contributions:
        raise ValueError("no contributions to merge")
    if rule == FEDAVG:
        return fedavg_partial(sorted(contributions, key=lambda c: c.node_id))
    return combine([partial_of(c) for c in contributions])


def _fits(a: Partial, b: Partial) -> bool:
    """Whether two partials can be summed: shared modules agree in shape, dense trainables in names and shapes."""
    x, y = a.sums, b.sums
    if any(x.module_shape(m) != y.module_shape(m) for m in set(x.module_names()) & set(y.module_names())):
        return False
    return {n: tuple(t.shape) for n, t in x.dense.items()} == {n: tuple(t.shape) for n, t in y.dense.items()}


class ReduceBuffer:
    """Partials held per (cluster, round), pairwise disjoint (module doc)."""

    def __init__(self) -> None:
        self._pieces: dict[tuple[int, int], list[Partial]] = {}
        self._sent: dict[tuple[int, int], int] = {}  # pieces [0, n) were forwarded up
        self.first_seen: dict[tuple[int, int], float] = {}

    def offer(self, cluster: int, p: Partial, now: float) -> str:
        """Keep `p` if it covers only contributions new here: "new"; "held" if every one it
        covers is held already (same digests: nothing to add); "overlap" if it covers some
        (refused: adding it would count them twice); "mismatch" if its module shapes or dense
        trainables differ from the round's other pieces (refused: they could not be summed)."""
        key = (cluster, p.round)
        held = self.covers(cluster, p.round)
        if all(held.get(node) == d for node, d in p.covers.items()):
            return "held"
        if set(p.covers) & set(held):
            return "overlap"
        pieces = self._pieces.get(key)
        if pieces and not _fits(pieces[0], p):
            return "mismatch"
        self._pieces.setdefault(key, []).append(p)
        self.first_seen.setdefault(key, now)
        return "new"

    def covers(self, cluster: int, round: int) -> dict[str, str]:
        """Node id -> contribution digest over every piece held for the round."""
        return {n: d for p in self._pieces.get((cluster, round), []) for n, d in p.covers.items()}

    def holds(self, cluster: int, round: int, node: str, digest: str) -> bool:
        return self.covers(cluster, round).get(node) == digest

    def pieces(self, cluster: int, round: int) -> list[Partial]:
        return list(self._pieces.get((cluster, round), []))

    def rounds(self, cluster: int) -> list[int]:
        return sorted(r for c, r in self._pieces if c == cluster)

    def total(self, cluster: int, round: int) -> Partial:
        """One partial over everything held for the round (ValueError if nothing is)."""
        pieces = self._pieces.get((cluster, round))
        if not pieces:
            raise ValueError(f"cluster {cluster}: nothing held for round {round}")
        return combine(pieces)

    def unsent(self, cluster: int, round: int) -> list[Partial]:
        key = (cluster, round)
        return self._pieces.get(key, [])[self._sent.get(key, 0) :]

    def forwarded(self, cluster: int, round: int) -> bool:
        """Whether any piece of the round was forwarded up already."""
        return self._sent.get((cluster, round), 0) > 0

    def mark_sent(self, cluster: int, round: int, pieces: list[Partial]) -> None:
        key = (cluster, round)
        self._sent[key] = self._sent.get(key, 0) + len(pieces)

    def due(self, cluster: int, round: int, expected: set[str], now: float, wait_s: float) -> bool:
        """Forward the unsent pieces now? Some are unsent, and: a piece went up already (late
        ones follow at once), every expected node is covered, or `wait_s` passed since the first."""
        if not self.unsent(cluster, round):
            return False
        if self.forwarded(cluster, round) or expected <= set(self.covers(cluster, round)):
            return True
        return now - self.first_seen[(cluster, round)] >= wait_s

    def drop(self, cluster: int, round: int) -> None:
        key = (cluster, round)
        self._pieces.pop(key, None)
        self._sent.pop(key, None)
        self.first_seen.pop(key, None)

    def forget_before(self, cluster: int, round: int) -> None:
        """Drop what rounds before `round` of `cluster` held (they are published)."""
        for c, r in [k for k in self._pieces if k[0] == cluster and k[1] < round]:
            self.drop(c, r)


class GossipStore:
    """Contributions seen by this node: (cluster, round) -> node id -> contribution."""

    def __init__(self) -> None:
        self._by_round: dict[tuple[int, int], dict[str, Contribution]] = {}
        self._by_digest: dict[str, tuple[int, Contribution]] = {}
        self.first_seen: dict[tuple[int, int], float] = {}

    def add(self, cluster: int, c: Contribution, now: float) -> bool:
        """Keep `c`; True if it is new to this node (then it is worth forwarding)."""
        if c.digest in self._by_digest:
            return False
        key = (cluster, c.round)
        held = self._by_round.setdefault(key, {})
        old = held.get(c.node_id)
        if old is not None and old.digest != c.digest:
            # a node re-made its contribution (e.g. after a replay): the newest one counts
            self._by_digest.pop(old.digest, None)
        held[c.node_id] = c
        self._by_digest[c.digest] = (cluster, c)
        self.first_seen.setdefault(key, now)
        return True

    def get(self, digest: str) -> Contribution | None:
        hit = self._by_digest.get(digest)
        return None if hit is None else hit[1]

    def of_round(self, cluster: int, round: int) -> dict[str, Contribution]:
        return dict(self._by_round.get((cluster, round), {}))

    def forget_before(self, cluster: int, round: int) -> None:
        """Drop what rounds before `round` of `cluster` held (they are folded)."""
        for key in [k for k in self._by_round if k[0] == cluster and k[1] < round]:
            for c in self._by_round.pop(key).values():
                self._by_digest.pop(c.digest, None)
            self.first_seen.pop(key, None)


@dataclass(frozen=True)
class ManifestInfo:
    """A published round: what the `manifest` message carries, plus the patch itself."""

    cluster: int
    round: int
    version: int
    digests: tuple[str, ...]
    record: PatchRecord

    def to_msg(self) -> Manifest:
        return Manifest(
            cluster=self.cluster,
            round=self.round,
            ready=True,
            version=self.version,
            digests=list(self.digests),
            patch_digest=self.record.digest,
            chain=self.record.chain,
        )


@dataclass
class AnchorLog:
    """The anchor's view of one cluster: patch log and published manifests."""

    cluster: int
    base: VersionedBase
    manifests: dict[int, ManifestInfo] = field(default_factory=dict)

    @classmethod
    def from_base(cls, cluster: int, base: VersionedBase) -> AnchorLog:
        """Start from a copy of this node's own log of the cluster (checked in full)."""
        return cls(cluster, VersionedBase.from_state(base.to_state()))

    def sync_from(self, base: VersionedBase) -> None:
        """Take any patch this node folded that the log lacks (it was anchored elsewhere)."""
        if base.version > self.base.version >= base.origin_version:
            self.base.extend(base.missing_since(self.base.version))

    @property
    def next_round(self) -> int:
        """Round whose manifest comes next: round r is version r+1."""
        return self.base.version

    def due(
        self,
        held: Mapping[str, object],
        expected: set[str],
        first_seen: float | None,
        now: float,
        deadline_s: float,
    ) -> bool:
        """Publish now? `held` (node id -> its contribution, or its digest) covers every
        expected owner, or the deadline passed."""
        if not held:
            return False
        if expected and expected <= set(held):
            return True
        return first_seen is not None and now - first_seen >= deadline_s

    def publish(self, total: Partial) -> ManifestInfo:
        """Normalise the partial over the round's contributions (aggregation.reduce.finalize)
        and log the patch as the next version."""
        round_ = self.next_round
        if total.round != round_:
            raise ValueError(
                f"cluster {self.cluster}: publishing round {round_} with contributions of round {total.round}"
            )
        record = self.base.apply(finalize(total))
        info = ManifestInfo(self.cluster, round_, record.version, tuple(sorted(total.covers.values())), record)
        self.manifests[round_] = info
        log.info(
            "cluster %d: manifest of round %d -> version %d (%d contributions: %s)",
            self.cluster,
            round_,
            record.version,
            len(total.covers),
            ", ".join(sorted(total.covers)),
        )
        return info

    def patches_since(self, version: int) -> list[PatchRecord]:
        return self.base.missing_since(version)


def merge_manifest(manifest: Manifest, contributions: list[Contribution], rule: str = EXACT) -> Patch:
    """The manifest's patch rebuilt from its contributions by the swarm's merge rule; ValueError
    unless digests agree."""
    have = sorted(c.digest for c in contributions)
    if have != sorted(manifest.digests):
        raise ValueError(f"cluster {manifest.cluster} round {manifest.round}: contributions do not match the manifest")
    patch = finalize(merge_contributions(contributions, rule))
    if patch.digest != manifest.patch_digest:
        raise ValueError(
            f"cluster {manifest.cluster} round {manifest.round}: merged patch digest "
            f"{patch.digest[:12]} != manifest {manifest.patch_digest[:12]}"
        )
    return patch
