"""A cluster's versioned base: W_v = W_origin + Σ_{origin < u <= v} patch_u.

Every copy of a cluster's layers (owners and helpers) must run the same weights, or
split training mixes activations from different models. Each copy therefore keeps the
list of exact patches it has folded in, each under a version id (1, 2, 3, ...) and its
content digest, and a chain digest per version,

    chain_0 = sha256("ATLAS-BASE-1" ‖ cluster)        (or a given origin chain)
    chain_v = sha256(chain_{v-1} ‖ digest_v),

so two nodes on the same version with the same chain hold the same history, and a
conflicting or out-of-order patch is caught before it touches a weight. A node that
falls behind asks a peer for ``missing_since(its version)`` (or the single exact
``folded_delta``); a joiner that starts from a folded delta builds its log with
``origin_version``/``origin_chain`` set to where that delta leaves it.

This object is the log; the caller adds each patch to its model (``dense_delta``,
``lora.add_delta_to_base``) when ``apply`` accepts it. ``to_state``/``from_state`` give
a flat dict of numpy arrays for safetensors checkpoints and the wire, re-checked in full
on the way back in.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from atlas_p2p.validation import is_int, require_int

from .aggregation.arrays import decode_meta, encode_meta, patch_from_arrays, patch_to_arrays
from .aggregation.digest import DigestMismatchError
from .aggregation.stacking import Patch, apply_patch, fold_patches

__all__ = [
    "BASE_FORMAT",
    "DigestMismatchError",
    "PatchRecord",
    "VersionGapError",
    "VersionedBase",
    "genesis_chain",
]

log = logging.getLogger(__name__)

BASE_FORMAT = "atlas-base-1"


class VersionGapError(ValueError):
    """A patch or a request does not line up with the versions this log holds."""


def genesis_chain(cluster: str) -> str:
    return hashlib.sha256(b"ATLAS-BASE-1\x00" + cluster.encode("utf-8")).hexdigest()


def _next_chain(chain: str, digest: str) -> str:
    return hashlib.sha256(bytes.fromhex(chain) + bytes.fromhex(digest)).hexdigest()


def _is_hex256(s: Any) -> bool:
    if not isinstance(s, str) or len(s) != 64:
        return False
    try:
        bytes.fromhex(s)
    except ValueError:
        return False
    return True


@dataclass(frozen=True, eq=False)
class PatchRecord:
    """Patch number ``version`` of a cluster, its content digest and the chain after it."""

    version: int
    patch: Patch
    digest: str
    chain: str


class VersionedBase:
    """The patch log of one cluster's base weights (see the module docstring)."""

    def __init__(self, cluster: str, origin_version: int = 0, origin_chain: str | None = None):
        if not isinstance(cluster, str) or not cluster:
            raise ValueError(f"cluster must be a non-empty string, got {cluster!r}")
        self.cluster = cluster
        self.origin_version = int(require_int("origin_version", origin_version, 0, numpy=True))
        if origin_chain is None:
            origin_chain = genesis_chain(cluster)
        if not _is_hex256(origin_chain):
            raise ValueError(f"origin_chain must be 64 hex digits, got {origin_chain!r}")
        self.origin_chain = origin_chain.lower()
        self._records: list[PatchRecord] = []

    # -- state -------------------------------------------------------------------------
    @property
    def version(self) -> int:
        """The version this log brings the base to (origin_version if no patch yet)."""
        return self._records[-1].version if self._records else self.origin_version

    @property
    def chain(self) -> str:
        """The chain digest at ``version``: equal chains mean equal histories."""
        return self._records[-1].chain if self._records else self.origin_chain

    @property
    def records(self) -> tuple[PatchRecord, ...]:
        return tuple(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"VersionedBase(cluster={self.cluster!r}, version={self.version}, chain={self.chain[:12]}…)"

    # -- growing the log -----------------------------------------------------------------
    def _record(self, version: int) -> PatchRecord:
        return self._records[version - self.origin_version - 1]

    def _check(
        self, patch: Patch, version: int | None, digest: str | None, chain: str | None, prev_chain: str, current: int
    ) -> PatchRecord | None:
        """The record ``patch`` would make on top of (current, prev_chain); None if it
        is a duplicate of a record already held. Raises on any mismatch."""
        if not isinstance(patch, Patch):
            raise ValueError(f"expected a Patch, got {type(patch).__name__}")
        actual = patch.digest
        if digest is not None and digest != actual:
            raise DigestMismatchError(
                f"cluster {self.cluster!r}: patch hashes to {actual[:16]}… but was announced as {str(digest)[:16]}…"
            )
        version = current + 1 if version is None else int(require_int("version", version, 1, numpy=True))
        if self.origin_version < version <= current:
            held = self._record(version)
            if held.digest != actual:
                raise DigestMismatchError(
                    f"cluster {self.cluster!r}: a different patch is already version {version} "
                    f"(held {held.digest[:16]}…, offered {actual[:16]}…)"
                )
            return None
        if version != current + 1:
            raise VersionGapError(
                f"cluster {self.cluster!r}: at version {current}, cannot apply version {version} "
                f"(expected {current + 1}; fetch missing_since({current}) first)"
            )
        new_chain = _next_chain(prev_chain, actual)
        if chain is not None and chain != new_chain:
            raise DigestMismatchError(
                f"cluster {self.cluster!r}: chain after version {version} differs from the peer's "
                "(the histories diverged)"
            )
        return PatchRecord(version, patch, actual, new_chain)

    def apply(
        self, patch: Patch, *, version: int | None = None, digest: str | None = None, chain: str | None = None
    ) -> PatchRecord:
        """Append ``patch`` as the next version and return its record.

        ``version``/``digest``/``chain`` are what a peer announced: the patch must be
        exactly the next version (VersionGapError otherwise) and hash to ``digest``
        (DigestMismatchError). Re-offering a held version with the same digest is a
        no-op that returns the held record (gossip duplicates are harmless).
        """
        record = self._check(patch, version, digest, chain, self.chain, self.version)
        if record is None:
            return self._record(version)
        self._records.append(record)
        log.debug("cluster %s: base version %d (%s)", self.cluster, record.version, record.digest[:12])
        return record

    def extend(self, records: Sequence[PatchRecord]) -> list[PatchRecord]:
        """Apply a peer's records in order, all or nothing; returns the new ones."""
        staged: list[PatchRecord] = []
        current, chain = self.version, self.chain
        for r in records:
            if not isinstance(r, PatchRecord):
                raise ValueError(f"expected PatchRecord, got {type(r).__name__}")
            new = self._check(r.patch, r.version, r.digest, r.chain, chain, current)
            if new is None:
                continue
            staged.append(new)
            current, chain = new.version, new.chain
        self._records.extend(staged)
        return staged

    def rebased(self, records: Sequence[PatchRecord]) -> tuple[VersionedBase, int]:
        """This log moved onto a peer's history: (a new log holding the peer's ``records``, the
        last version on which both histories agree).

        ``records`` are the peer's from this log's origin on (its ``missing_since(origin)``);
        their chain is checked from this log's origin, all or nothing. Chains are cumulative,
        so the histories agree up to one version and differ after it. ValueError when the
        peer's history is a prefix of this one (it is behind, not elsewhere: nothing to take).
        """
        new = VersionedBase(self.cluster, self.origin_version, self.origin_chain)
        new.extend(records)
        fork = self.origin_version
        for mine, theirs in zip(self._records, new._records, strict=False):
            if mine.chain != theirs.chain:
                break
            fork = mine.version
        if fork == new.version and new.version <= self.version:
            raise VersionGapError(
                f"cluster {self.cluster!r}: the peer's history (version {new.version}) is a prefix of this one "
                f"(version {self.version}): nothing to take"
            )
        return new, fork

    # -- reading the log -----------------------------------------------------------------
    def chain_at(self, version: int) -> str | None:
        """The chain after ``version`` in this log; None for a version it does not cover."""
        if not is_int(version) or not self.origin_version <= version <= self.version:
            return None
        return self.origin_chain if version == self.origin_version else self._record(version).chain

    def missing_since(self, version: int) -> list[PatchRecord]:
        """The records a node at ``version`` lacks, oldest first."""
        version = int(require_int("version", version, 0, numpy=True))
        if version < self.origin_version:
            raise VersionGapError(
                f"cluster {self.cluster!r}: history starts at version {self.origin_version}, "
                f"cannot serve patches since {version}"
            )
        if version > self.version:
            raise VersionGapError(
                f"cluster {self.cluster!r}: asked for patches since {version} but this log is at {self.version}"
            )
        return self._records[version - self.origin_version :]

    def folded_delta(self, since: int | None = None) -> Patch:
        """One exact patch equal to every patch after ``since`` (default: the origin)."""
        return fold_patches([r.patch for r in self.missing_since(self.origin_version if since is None else since)])

    def materialize(self, origin_weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """W_version = W_origin + the folded delta, as (d_out, d_in) tensors."""
        return apply_patch(origin_weights, self.folded_delta())

    # -- checkpoint / wire -------------------------------------------------------------
    def to_state(self) -> dict[str, np.ndarray]:
        """Flat dict of numpy arrays: ``meta`` plus ``p{i}.<patch key>`` per record."""
        meta = {
            "format": BASE_FORMAT,
            "cluster": self.cluster,
            "origin_version": self.origin_version,
            "origin_chain": self.origin_chain,
            "records": [{"version": r.version, "digest": r.digest, "chain": r.chain} for r in self._records],
        }
        out = {"meta": encode_meta(meta)}
        for i, r in enumerate(self._records):
            out.update({f"p{i}.{k}": v for k, v in patch_to_arrays(r.patch).items()})
        return out

    @classmethod
    def from_state(cls, arrays: Mapping[str, Any]) -> VersionedBase:
        """Inverse of ``to_state``; re-checks every digest and the whole chain."""
        if not isinstance(arrays, Mapping) or "meta" not in arrays:
            raise ValueError("base state: missing 'meta'")
        meta = decode_meta(arrays["meta"], "base meta")
        if meta.get("format") != BASE_FORMAT:
            raise ValueError(f"base meta: format must be {BASE_FORMAT!r}, got {meta.get('format')!r}")
        rows = meta.get("records")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ValueError("base meta 'records': expected a list of objects")
        base = cls(meta.get("cluster"), meta.get("origin_version"), meta.get("origin_chain"))
        groups: dict[int, dict[str, Any]] = {}
        for key, value in arrays.items():
            if key == "meta":
                continue
            head, _, rest = str(key).partition(".")
            if not (head.startswith("p") and head[1:].isdigit() and rest) or int(head[1:]) >= len(rows):
                raise ValueError(f"base state: unexpected key {key!r}")
            groups.setdefault(int(head[1:]), {})[rest] = value
        records = []
        for i, row in enumerate(rows):
            if i not in groups:
                raise ValueError(f"base state: no arrays for record {i}")
            records.append(
                PatchRecord(row.get("version"), patch_from_arrays(groups[i]), row.get("digest"), row.get("chain"))
            )
        for r in records:
            if not (_is_hex256(r.digest) and _is_hex256(r.chain)):
                raise ValueError(f"base meta: record {r.version!r} needs 64-hex digest and chain")
        base.extend(records)
        if len(base) != len(records):
            raise VersionGapError("base state: records repeat a version")
        return base
