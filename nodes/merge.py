"""Merge rounds inside a cluster (DESIGN 8, docs/RUNTIME.md): gossip store, anchor, manifests.

Pure bookkeeping, no sockets: the node's cluster sync (nodes/cluster_sync.py) feeds it
contributions and asks it what to publish or serve.

- `GossipStore` keeps every contribution a node has seen, by (cluster, round) and by
  digest; `add` says whether it is new (only new ones are forwarded: gossip ends).
- `AnchorLog` is the anchor's record of one cluster: its patch log (a
  `versioning.VersionedBase`) and the manifests it published. Round r's manifest is
  version r+1 of the cluster's base: it lists the digests of the round's contributions
  (sorted) and the digest and chain of their exact stacked merge. It is published when
  every expected owner contributed, or once `deadline_s` passed since the first
  contribution of the round (stragglers cannot stall a round); a contribution that arrives
  later is not in it, and its owner carries it into its next contribution.
- `merge_manifest` rebuilds a published patch from the contributions a member holds and
  checks it against the manifest, so every member folds the same bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from atlas_p2p.aggregation import Contribution, Patch, stack_merge
from atlas_p2p.versioning import PatchRecord, VersionedBase
from transport.messages import Manifest

log = logging.getLogger("atlas.merge")


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
        contributions: dict[str, Contribution],
        expected: set[str],
        first_seen: float | None,
        now: float,
        deadline_s: float,
    ) -> bool:
        """Publish now? Every expected owner contributed, or the deadline passed."""
        if not contributions:
            return False
        if expected and expected <= set(contributions):
            return True
        return first_seen is not None and now - first_seen >= deadline_s

    def publish(self, contributions: dict[str, Contribution]) -> ManifestInfo:
        """Merge the round's contributions exactly and log the patch as the next version."""
        round_ = self.next_round
        chosen = [c for _, c in sorted(contributions.items())]
        if any(c.round != round_ for c in chosen):
            raise ValueError(f"cluster {self.cluster}: publishing round {round_} with contributions of other rounds")
        patch = stack_merge(chosen)
        record = self.base.apply(patch)
        info = ManifestInfo(self.cluster, round_, record.version, tuple(sorted(c.digest for c in chosen)), record)
        self.manifests[round_] = info
        log.info(
            "cluster %d: manifest of round %d -> version %d (%d contributions: %s)",
            self.cluster,
            round_,
            record.version,
            len(chosen),
            ", ".join(sorted(contributions)),
        )
        return info

    def patches_since(self, version: int) -> list[PatchRecord]:
        return self.base.missing_since(version)


def merge_manifest(manifest: Manifest, contributions: list[Contribution]) -> Patch:
    """The manifest's patch rebuilt from its contributions; ValueError unless digests agree."""
    have = sorted(c.digest for c in contributions)
    if have != sorted(manifest.digests):
        raise ValueError(f"cluster {manifest.cluster} round {manifest.round}: contributions do not match the manifest")
    patch = stack_merge(contributions)
    if patch.digest != manifest.patch_digest:
        raise ValueError(
            f"cluster {manifest.cluster} round {manifest.round}: merged patch digest "
            f"{patch.digest[:12]} != manifest {manifest.patch_digest[:12]}"
        )
    return patch
