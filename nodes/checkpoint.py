"""A node's checkpoint: round state, base patches and the pending contribution, atomically.

Layout of `<out>/checkpoint/`:

    state.json          atlas_p2p.records.CheckpointState (node id, cluster, round, base version,
                        counters, contributions, patches folded, repairs) and the format
    base.safetensors    the cluster's patch log (VersionedBase.to_state: meta + arrays)
    pending.safetensors the contribution that missed a manifest, if any (A:/B:/D: arrays)

A new checkpoint is written to `checkpoint.tmp/` and renamed into place (the old one is
renamed away first and removed after), so a node killed at any instant leaves either the
old or the new checkpoint whole. Loading re-checks every digest and the patch chain.
Adapters are not saved mid-round: a round restarts from its reproducible start (fresh A
from the round seed, B = 0), so base + round number is the whole training state.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from atlas_p2p.aggregation import Contribution
from atlas_p2p.aggregation.arrays import decode_meta, encode_meta
from atlas_p2p.records import CheckpointState
from atlas_p2p.versioning import VersionedBase

CHECKPOINT_DIR = "checkpoint"
FORMAT = "atlas-node-checkpoint-1"


@dataclass
class Checkpoint:
    state: CheckpointState
    base: VersionedBase
    pending: Contribution | None


def _contribution_arrays(c: Contribution) -> dict[str, np.ndarray]:
    from nodes.wireconv import factors_to_wire

    tensors, scalings = factors_to_wire(c.factors, c.dense)
    meta = {"node_id": c.node_id, "round": c.round, "n_samples": c.n_samples, "digest": c.digest, "scalings": scalings}
    return {"meta": encode_meta(meta), **{k: np.ascontiguousarray(v) for k, v in tensors.items()}}


def _contribution_from(arrays: dict[str, np.ndarray]) -> Contribution:
    from nodes.wireconv import factors_from_wire

    meta = decode_meta(arrays.pop("meta"), "pending meta")
    factors, dense = factors_from_wire(arrays, meta["scalings"])
    c = Contribution(factors, int(meta["n_samples"]), str(meta["node_id"]), int(meta["round"]), dense)
    if c.digest != meta["digest"]:
        raise ValueError("checkpoint: the pending contribution does not match its digest")
    return c


def save_checkpoint(out_dir: Path, state: CheckpointState, base: VersionedBase, pending: Contribution | None) -> Path:
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    final, tmp, old = (
        out_dir / CHECKPOINT_DIR,
        out_dir / (CHECKPOINT_DIR + ".tmp"),
        out_dir / (CHECKPOINT_DIR + ".old"),
    )
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v) for k, v in base.to_state().items()}, str(tmp / "base.safetensors"))
    if pending is not None:
        save_file(_contribution_arrays(pending), str(tmp / "pending.safetensors"))
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **state.to_json()}, sort_keys=True))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out_dir: Path) -> Checkpoint | None:
    """The checkpoint under `out_dir`, or None; ValueError if it exists but is damaged."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    out_dir = Path(out_dir)
    path = out_dir / CHECKPOINT_DIR
    if not path.is_dir() and (out_dir / (CHECKPOINT_DIR + ".old")).is_dir():
        path = out_dir / (CHECKPOINT_DIR + ".old")  # killed between the two renames
    if not path.is_dir():
        return None
    try:
        data = json.loads((path / "state.json").read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {FORMAT!r}")
        state = CheckpointState.from_json(data)
        base = VersionedBase.from_state(load_file(str(path / "base.safetensors")))
        pending = None
        if (path / "pending.safetensors").exists():
            pending = _contribution_from(dict(load_file(str(path / "pending.safetensors"))))
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ValueError(f"checkpoint {path} is unusable: {exc}") from None
    return Checkpoint(state, base, pending)
