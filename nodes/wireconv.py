"""Training objects <-> message bodies (no logic, only shapes and checks).

Factors travel in one tensor map: "A:<module>" (r, d_in), "B:<module>" (d_out, r),
"D:<dense name>" (a head's change), with `scalings[<module>] = γ`. Everything coming
off the wire is re-validated by the aggregation dataclasses (shapes, finiteness, digests)
before use; a bad body raises ValueError and changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from atlas_p2p.aggregation import AdapterFactors, Contribution, Partial, patch_from_arrays, patch_to_arrays
from atlas_p2p.versioning import PatchRecord
from transport.tensors import RawTensor, bfloat16_from_float32, bfloat16_to_float32


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def to_torch(a: Any, what: str) -> torch.Tensor:
    """A private torch copy of a wire array (the frame's buffer is read-only)."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{what}: expected an array, got {type(a).__name__}")
    return torch.from_numpy(np.array(a, copy=True))


def tensor_to_wire(t: torch.Tensor, bf16: bool = False) -> np.ndarray | RawTensor:
    """Activations, hidden states or gradients for a message: as they are, or float32 values
    rounded to bfloat16 (nearest even; half the bytes, 8 significant bits)."""
    a = to_numpy(t)
    return bfloat16_from_float32(a) if bf16 and a.dtype == np.float32 else a


def tensor_from_wire(x: Any) -> Any:
    """A bfloat16 tensor off the wire widened to float32 (exact); anything else as it came
    (the session checks it)."""
    return bfloat16_to_float32(x) if is_bf16(x) else x


def is_bf16(x: Any) -> bool:
    return isinstance(x, RawTensor) and x.dtype == "bfloat16"


def factors_to_wire(factors: Mapping[str, Any], dense: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    tensors, scalings = {}, {}
    for name, f in factors.items():
        tensors[f"A:{name}"] = to_numpy(f.A)
        tensors[f"B:{name}"] = to_numpy(f.B)
        scalings[name] = float(f.scaling)
    for name, d in dense.items():
        tensors[f"D:{name}"] = to_numpy(d)
    return tensors, scalings


def factors_from_wire(tensors: Mapping[str, Any], scalings: Mapping[str, float]) -> tuple[dict, dict]:
    """(module -> AdapterFactors, dense name -> tensor); ValueError on any inconsistency."""
    factors, dense, seen = {}, {}, set()
    for key, value in tensors.items():
        kind, _, name = key.partition(":")
        if not name or kind not in ("A", "B", "D"):
            raise ValueError(f"tensors: unexpected key {key!r} (expected A:, B: or D: prefixes)")
        if kind == "D":
            dense[name] = to_torch(value, key)
        else:
            seen.add(name)
    if seen != set(scalings):
        raise ValueError(f"scalings: modules {sorted(set(scalings) ^ seen)} lack factors or a scaling")
    for name in sorted(seen):
        if f"A:{name}" not in tensors or f"B:{name}" not in tensors:
            raise ValueError(f"tensors: module {name!r} needs both A and B")
        factors[name] = AdapterFactors(
            to_torch(tensors[f"A:{name}"], f"A:{name}"), to_torch(tensors[f"B:{name}"], f"B:{name}"), scalings[name]
        )
    return factors, dense


def contribution_to_msg(c: Contribution, cluster: int, sender: int):
    from transport.messages import ContributionMsg

    tensors, scalings = factors_to_wire(c.factors, c.dense)
    return ContributionMsg(
        cluster=cluster,
        round=c.round,
        node_id=int(c.node_id),
        n_samples=c.n_samples,
        digest=c.digest,
        tensors=tensors,
        scalings=scalings,
        sender=sender,
    )


def contribution_from_msg(body) -> Contribution:
    """The contribution a message carries; ValueError unless it hashes to its announced digest."""
    factors, dense = factors_from_wire(body.tensors, body.scalings)
    c = Contribution(factors, body.n_samples, str(body.node_id), body.round, dense)
    if c.digest != body.digest:
        raise ValueError(f"contribution of node {body.node_id}: content does not match digest {body.digest[:12]}")
    return c


def records_to_msg(cluster: int, records) -> Any:
    from transport.messages import Patches

    rows, tensors = [], {}
    for i, r in enumerate(records):
        rows.append({"version": r.version, "digest": r.digest, "chain": r.chain})
        tensors.update({f"p{i}.{k}": v for k, v in patch_to_arrays(r.patch).items()})
    return Patches(cluster=cluster, records=rows, tensors=tensors)


def records_from_msg(body) -> list[PatchRecord]:
    groups: dict[int, dict] = {}
    for key, value in body.tensors.items():
        head, _, rest = key.partition(".")
        if not (head[:1] == "p" and head[1:].isdigit() and rest) or int(head[1:]) >= len(body.records):
            raise ValueError(f"patches: unexpected key {key!r}")
        groups.setdefault(int(head[1:]), {})[rest] = np.array(value, copy=True)
    out = []
    for i, row in enumerate(body.records):
        if i not in groups or not isinstance(row, dict):
            raise ValueError(f"patches: record {i} has no arrays")
        out.append(PatchRecord(row.get("version"), patch_from_arrays(groups[i]), row.get("digest"), row.get("chain")))
    return out


def partial_to_msg(p: Partial, cluster: int, sender: int):
    from transport.messages import PartialMsg

    return PartialMsg(
        cluster=cluster, round=p.round, sender=sender, covers=dict(p.covers), tensors=patch_to_arrays(p.sums)
    )


def partial_from_msg(body) -> Partial:
    """The partial a message carries; ValueError unless its arrays hash to their digest, its
    round is the message's and it covers the nodes it weighs, each a node id."""
    sums = patch_from_arrays({k: np.array(v, copy=True) for k, v in body.tensors.items()})
    if sums.round != body.round:
        raise ValueError(f"partial: sums are of round {sums.round}, the message says round {body.round}")
    bad = sorted(n for n in body.covers if not (n.isdigit() and n == str(int(n))))
    if bad:
        raise ValueError(f"partial covers: {bad} are not node ids")
    return Partial(sums, body.covers)
