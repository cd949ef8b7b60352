"""Content digests: sha256 over a canonical byte encoding of named tensors.

Two nodes that hold the same patch (or contribution) compute the same digest whatever
order they built their dicts in and whatever machine they run on. Encoding, entry by
entry in sorted key order, every integer little-endian:

    key    : u32 number of parts, then per part u32 length + UTF-8 bytes
    dtype  : u32 length + torch dtype name ("float32", "bfloat16", ...)
    shape  : u32 ndim, then one u64 per dimension
    bytes  : u64 length + the tensor's raw bytes in C order (little-endian)

Keys are tuples of strings, each part length-prefixed, so no module name can be
confused with another however it is spelled.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from collections.abc import Iterable

import torch

__all__ = ["DigestMismatchError", "digest_entries", "tensor_bytes"]

_MAGIC = b"ATLAS-DIGEST-1\x00"


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of ``t`` in C order, for any dtype (bfloat16 too)."""
    if sys.byteorder != "little":
        raise RuntimeError("content digests assume a little-endian host")
    flat = t.detach().reshape(-1).contiguous().cpu()
    return flat.view(torch.uint8).numpy().tobytes()


def _u32(n: int) -> bytes:
    return struct.pack("<I", n)


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _text(s: str) -> bytes:
    raw = s.encode("utf-8")
    return _u32(len(raw)) + raw


def digest_entries(entries: Iterable[tuple[tuple[str, ...], torch.Tensor]]) -> str:
    """sha256 hex digest of named tensors, independent of the order they come in."""
    items = sorted(entries, key=lambda kv: kv[0])
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError("digest_entries: duplicate keys")
    h = hashlib.sha256(_MAGIC)
    for key, t in items:
        h.update(_u32(len(key)) + b"".join(_text(part) for part in key))
        h.update(_text(str(t.dtype).removeprefix("torch.")))
        h.update(_u32(t.dim()) + b"".join(_u64(int(d)) for d in t.shape))
        raw = tensor_bytes(t)
        h.update(_u64(len(raw)))
        h.update(raw)
    return h.hexdigest()


class DigestMismatchError(ValueError):
    """Content does not hash to the digest it was announced with."""
