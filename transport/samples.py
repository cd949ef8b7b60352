"""Sample messages built from the schemas, for tests and benchmarks.

`sample_body(cls, rng)` fills every field of a message type with a random value its
schema accepts, so a test can cover every registered type, including ones added later,
without knowing their fields. `same_value(a, b)` compares bodies that hold tensors.
"""

from __future__ import annotations

import random

import numpy as np

from transport.messages import Message
from transport.schema import Node
from transport.tensors import NUMPY_DTYPES, RawTensor, bfloat16_from_float32


def sample_array(dtype: str, shape: tuple[int, ...], rng: random.Random) -> np.ndarray | RawTensor:
    """A random tensor of a wire dtype (bfloat16 comes back as a RawTensor)."""
    gen = np.random.default_rng(rng.getrandbits(32))
    if dtype == "bfloat16":
        return bfloat16_from_float32(gen.standard_normal(shape).astype(np.float32))
    if dtype == "bool":
        return gen.integers(0, 2, size=shape).astype(bool)
    np_dtype = NUMPY_DTYPES[dtype]
    if np_dtype.kind == "f":
        return gen.standard_normal(shape).astype(np_dtype)
    info = np.iinfo(np_dtype)
    return gen.integers(info.min, info.max, size=shape, dtype=np_dtype, endpoint=True)


def sample_value(node: Node, rng: random.Random, fill_optional: bool = True) -> object:
    """A random value accepted by `node`; optional fields are None unless `fill_optional`."""
    kind = node.kind
    if kind == "int":
        if node.choices is not None:
            return rng.choice(node.choices.values)
        lo = int(node.bounds.lo) if node.bounds and node.bounds.lo is not None else -1000
        hi = int(node.bounds.hi) if node.bounds and node.bounds.hi is not None else lo + 2000
        return rng.randint(lo, hi)
    if kind == "float":
        lo = node.bounds.lo if node.bounds and node.bounds.lo is not None else -1e3
        hi = node.bounds.hi if node.bounds and node.bounds.hi is not None else lo + 2e3
        return rng.uniform(lo, hi)
    if kind == "str":
        if node.choices:
            return rng.choice(node.choices.values)
        text, length = f"s{rng.getrandbits(20)}-é", node.length
        if length.lo > 0:  # e.g. a public key: exactly 40 characters
            size = length.lo if length.hi is None else rng.randint(length.lo, length.hi)
            text = (text * size)[:size]
        return text if length.hi is None else text[: length.hi]
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "bytes":
        return rng.randbytes(rng.randint(0, 8))
    if kind == "optional":
        return sample_value(node.inner, rng, fill_optional) if fill_optional else None
    if kind == "list":  # 0..3 items within the field's Length (e.g. [epsilon, delta]: exactly 2)
        lo = node.length.lo if node.length else 0
        hi = max(lo, min(3, node.length.hi)) if node.length and node.length.hi is not None else max(lo, 3)
        return [sample_value(node.inner, rng, fill_optional) for _ in range(rng.randint(lo, hi))]
    if kind == "dict":
        return {f"k{i}": sample_value(node.inner, rng, fill_optional) for i in range(rng.randint(0, 3))}
    if kind == "tensor":
        return _sample_tensor(node, rng)
    if kind == "any":
        return {
            "id": rng.randint(0, 99),
            "address": "127.0.0.1:5555",
            "score": rng.random(),
            "tags": ["a", None, True, b"\x00"],
            "nested": {"x": [1, 2.5]},
        }
    raise TypeError(f"no sampler for schema node kind {kind!r}")


def _sample_tensor(node: Node, rng: random.Random) -> np.ndarray | RawTensor:
    dtypes = node.spec.dtypes or tuple(NUMPY_DTYPES) + ("bfloat16",)
    if node.form == "ndarray":
        dtypes = tuple(d for d in dtypes if d in NUMPY_DTYPES)
    dtype = rng.choice(dtypes)
    if node.spec.shape is not None:
        shape = tuple(d if d is not None else rng.randint(0, 4) for d in node.spec.shape)
    else:
        shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))
    tensor = sample_array(dtype, shape, rng)
    if node.form == "raw" and isinstance(tensor, np.ndarray):
        tensor = RawTensor.from_numpy(tensor)
    return tensor


def sample_body(cls: type[Message], rng: random.Random, fill_optional: bool = True) -> Message:
    """A valid random instance of message type `cls`."""
    return cls(**{name: sample_value(node, rng, fill_optional) for name, node in cls.SCHEMA.items()})


def same_value(a: object, b: object) -> bool:
    """Deep equality that understands ndarray (dtype, shape, bytes), RawTensor, and NaN."""
    if isinstance(a, Message) or isinstance(b, Message):
        return type(a) is type(b) and same_value(a.to_dict(), b.to_dict())
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == b.tobytes()
        )
    if isinstance(a, RawTensor) or isinstance(b, RawTensor):
        return (
            isinstance(a, RawTensor)
            and isinstance(b, RawTensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.data.tobytes() == b.data.tobytes()
        )
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_value(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return True
    return type(a) is type(b) and a == b
