"""A patch as a flat dict of numpy arrays, and back, with every field checked.

The same form serves the wire (tensor frames of a msgpack body) and checkpoints
(safetensors): keys are short ASCII strings, values are C-contiguous arrays, and the
names, round, weights and digest travel as one UTF-8 JSON document stored as a uint8
array under ``meta`` (no pickle anywhere). Layout, for modules M_i and dense D_j in the
order listed in ``meta``:

    meta        uint8 (n,)    {"format", "round", "weights", "modules", "dense", "digest"}
    m{i}.B      float (d_out, R)
    m{i}.A      float (R, d_in)
    d{j}        float (...)
    f{j}        float (d_out, d_in)   a full module (``meta["full"]``, absent when none)

Decoding trusts nothing: unknown or missing keys, bad JSON, wrong dtypes or shapes,
NaNs and a digest that does not match the content are all ``ValueError``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from atlas_p2p.validation import require_int

from .digest import DigestMismatchError
from .stacking import Patch, StackedFactors

__all__ = ["PATCH_FORMAT", "patch_to_arrays", "patch_from_arrays", "encode_meta", "decode_meta"]

PATCH_FORMAT = "atlas-patch-1"
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def encode_meta(meta: Mapping[str, Any]) -> np.ndarray:
    """JSON document as a uint8 array (sorted keys, so equal metas give equal bytes)."""
    raw = json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return np.frombuffer(raw, dtype=np.uint8).copy()


def decode_meta(array: Any, what: str = "meta") -> dict:
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim != 1:
        raise ValueError(f"{what}: expected a 1-D uint8 array")
    try:
        meta = json.loads(array.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{what}: not UTF-8 JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{what}: expected a JSON object")
    return meta


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


def _from_numpy(a: Any, key: str, ndim: int | None = None) -> torch.Tensor:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{key}: expected a numpy array, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise ValueError(f"{key}: dtype must be native float32 or float64, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{key}: expected {ndim} dimensions, got shape {a.shape}")
    return torch.from_numpy(np.array(a, copy=True, order="C"))  # own the bytes


def patch_to_arrays(patch: Patch) -> dict[str, np.ndarray]:
    modules = sorted(patch.modules)
    dense = sorted(patch.dense)
    full = sorted(patch.full)
    meta = {
        "format": PATCH_FORMAT,
        "round": patch.round,
        "weights": patch.weights,
        "modules": modules,
        "dense": dense,
        "digest": patch.digest,
    }
    if full:
        meta["full"] = full
    out = {"meta": encode_meta(meta)}
    for j, name in enumerate(full):
        out[f"f{j}"] = _to_numpy(patch.full[name])
    for i, name in enumerate(modules):
        out[f"m{i}.B"] = _to_numpy(patch.modules[name].B)
        out[f"m{i}.A"] = _to_numpy(patch.modules[name].A)
    for j, name in enumerate(dense):
        out[f"d{j}"] = _to_numpy(patch.dense[name])
    return out


def _str_list(meta: dict, field: str) -> list[str]:
    value = meta.get(field)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"patch meta {field!r}: expected a list of non-empty strings")
    if len(set(value)) != len(value):
        raise ValueError(f"patch meta {field!r}: duplicate names")
    return value


def patch_from_arrays(arrays: Mapping[str, Any]) -> Patch:
    """Inverse of ``patch_to_arrays``; checks the layout, values and digest."""
    if not isinstance(arrays, Mapping) or "meta" not in arrays:
        raise ValueError("patch arrays: missing 'meta'")
    meta = decode_meta(arrays["meta"], "patch meta")
    if meta.get("format") != PATCH_FORMAT:
        raise ValueError(f"patch meta: format must be {PATCH_FORMAT!r}, got {meta.get('format')!r}")
    modules = _str_list(meta, "modules")
    dense = _str_list(meta, "dense")
    full = _str_list(meta, "full") if "full" in meta else []
    round_, weights, digest = meta.get("round"), meta.get("weights"), meta.get("digest")
    require_int("patch meta 'round'", round_, 0)
    if not isinstance(weights, dict):
        raise ValueError("patch meta 'weights': expected an object")
    if not isinstance(digest, str):
        raise ValueError("patch meta 'digest': expected a string")
    expected = {"meta"} | {f"m{i}.{x}" for i in range(len(modules)) for x in "BA"}
    expected |= {f"d{j}" for j in range(len(dense))} | {f"f{j}" for j in range(len(full))}
    if set(arrays) != expected:
        extra, missing = sorted(set(arrays) - expected), sorted(expected - set(arrays))
        raise ValueError(f"patch arrays: unexpected keys {extra}, missing keys {missing}")
    stacked = {
        name: StackedFactors(_from_numpy(arrays[f"m{i}.B"], f"m{i}.B", 2), _from_numpy(arrays[f"m{i}.A"], f"m{i}.A", 2))
        for i, name in enumerate(modules)
    }
    dense_t = {name: _from_numpy(arrays[f"d{j}"], f"d{j}") for j, name in enumerate(dense)}
    full_t = {name: _from_numpy(arrays[f"f{j}"], f"f{j}", 2) for j, name in enumerate(full)}
    patch = Patch(stacked, dense_t, weights, round_, full_t)
    if patch.digest != digest:
        raise DigestMismatchError(f"patch content hashes to {patch.digest[:16]}… but was announced as {digest[:16]}…")
    return patch
