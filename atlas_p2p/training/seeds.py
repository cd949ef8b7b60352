"""Deterministic seeds, so both sides of a split and any replay draw the same numbers.

A round starts from ``round_seed(run_seed, node_id, round)``: the owner draws its LoRA A
matrices from it (``lora.reset_adapters`` mixes in each module's name), and its helper draws
the server-side A matrices from the same seed, so the start of a round is reproducible by
anyone who knows the three numbers. ``step_seed`` seeds any randomness inside one step
(dropout), so replaying a round's batches repeats it exactly.

Both are the first 63 bits of sha256 over a tagged text, independent of Python's hash
randomisation and of the machine. Node ids are taken as their decimal text, so the int 7 and
the string "7" name the same node (``Contribution.node_id`` is the string).
"""

from __future__ import annotations

import hashlib

from atlas_p2p.validation import is_int

__all__ = ["round_seed", "step_seed"]

_MASK = (1 << 63) - 1


def _int(value, name: str, minimum: int | None = 0) -> int:
    if not is_int(value, numpy=True):
        raise ValueError(f"{name}: {value!r} must be an int")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: {value!r} must be >= {minimum}")
    return int(value)


def _node(node_id) -> str:
    if isinstance(node_id, str):
        if not node_id:
            raise ValueError("node_id: must be a non-empty string or an int")
        return node_id
    return str(_int(node_id, "node_id"))


def _hash(*parts: str) -> int:
    digest = hashlib.sha256("\x00".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & _MASK


def round_seed(run_seed: int, node_id: int | str, round: int) -> int:
    """Seed of ``node_id``'s adapters at the start of ``round`` of a run seeded ``run_seed``."""
    return _hash("atlas-round", str(_int(run_seed, "run_seed", None)), _node(node_id), str(_int(round, "round")))


def step_seed(seed: int, step: int, side: str) -> int:
    """Seed of the randomness inside one step; ``side`` is "owner", "helper" or "tail" (u-shape head)."""
    if side not in ("owner", "helper", "tail"):
        raise ValueError(f"side: {side!r} must be 'owner', 'helper' or 'tail'")
    return _hash("atlas-step", str(_int(seed, "seed", None)), str(_int(step, "step")), side)
