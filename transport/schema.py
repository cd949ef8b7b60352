"""Field schemas derived from message dataclass annotations, and the checks they run.

A message field's annotation is turned once, at class definition, into a small tree of
`Node`s; `Node.check(value, path)` returns the value (ints widened to float where a float
is due, tuples made lists) or raises `SchemaError(code, detail)`. The same checks guard a
message built locally and one decoded off the wire, so a bad field is caught where it is
made and never reaches node logic.

Supported annotations:
  int, float, str, bool, bytes, X | None, list[X], dict[str, X],
  np.ndarray (numpy tensor), RawTensor (any wire dtype as bytes), Tensor (either),
  Any (a small JSON-like value: None, bool, int, float, str, bytes, lists, str-keyed maps),
  and Annotated[X, Range(lo, hi) | OneOf(...) | TensorSpec(...) | Length(lo, hi)] to narrow one
  of those.

Lengths are bounded everywhere, so an oversized field is refused (bad_schema) before any
handler sees it: a str (a field, a map key, or inside an Any value) has at most
STR_MAX_LEN characters unless its field says otherwise with Length; a list or map inside an
Any value has at most ANY_MAX_ITEMS items; a list or map field is bounded by its Length,
else only by the size of the message.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

import numpy as np

from atlas_p2p.validation import is_int, is_number
from transport.tensors import DTYPE_ITEMSIZE, RawTensor, Tensor, TensorError, dtype_name

INT_MIN, INT_MAX = -(1 << 63), (1 << 64) - 1  # what msgpack can carry
ANY_MAX_DEPTH = 16  # nesting allowed inside an Any value
STR_MAX_LEN = 4096  # characters of a str without its own Length (a path fits)
ANY_MAX_ITEMS = 1 << 16  # items of a list or map inside an Any value


class SchemaError(ValueError):
    """A value that does not fit its field; `code` is a stable string (bad_schema, bad_dtype, ...)."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


# --- narrowing metadata, used inside Annotated[...] ---


@dataclass(frozen=True)
class Range:
    """Closed bounds for an int or float field; None leaves that side open."""

    lo: float | None = None
    hi: float | None = None


@dataclass(frozen=True)
class OneOf:
    """The field must equal one of these values (e.g. a node state name)."""

    values: tuple


@dataclass(frozen=True)
class TensorSpec:
    """Allowed dtypes (None: any wire dtype) and shape (None: any; a None dim: any size)."""

    dtypes: tuple[str, ...] | None = None
    shape: tuple[int | None, ...] | None = None

    def __post_init__(self) -> None:
        for name in self.dtypes or ():
            if name not in DTYPE_ITEMSIZE:
                raise ValueError(f"TensorSpec.dtypes: {name!r} is not a wire dtype")


@dataclass(frozen=True)
class Length:
    """len() of a str (characters), bytes (bytes), list (items) or map (keys) in [lo, hi]
    (hi None: no bound of its own); `or_empty` also accepts an empty one (e.g. a public key:
    exactly 40 characters, or "" for none)."""

    lo: int = 0
    hi: int | None = None
    or_empty: bool = False

    def __post_init__(self) -> None:
        if self.lo < 0 or (self.hi is not None and self.hi < self.lo):
            raise ValueError(f"Length needs 0 <= lo <= hi, got lo={self.lo!r}, hi={self.hi!r}")

    def check(self, value: object, path: str, unit: str) -> None:
        n = len(value)
        if (n < self.lo or (self.hi is not None and n > self.hi)) and not (self.or_empty and n == 0):
            want = (
                f"exactly {self.lo}" if self.lo == self.hi else f"{self.lo}..{self.hi if self.hi is not None else ''}"
            )
            also = " (or none)" if self.or_empty else ""
            raise SchemaError("bad_schema", f"{path}: {n} {unit}, allowed {want}{also}")


_DEFAULT_STR = Length(hi=STR_MAX_LEN)
_ANY_ITEMS = Length(hi=ANY_MAX_ITEMS)


# --- schema nodes ---


class Node:
    """One annotation, checked. Subclasses set `kind` (used by tests to build samples)."""

    kind = "node"

    def check(self, value: object, path: str) -> object:
        raise NotImplementedError

    def _fail(self, path: str, value: object, want: str) -> typing.NoReturn:
        raise SchemaError("bad_schema", f"{path}: expected {want}, got {type(value).__name__}")


class IntNode(Node):
    kind = "int"

    def __init__(self, bounds: Range | None = None, choices: OneOf | None = None):
        self.bounds, self.choices = bounds, choices

    def check(self, value, path):
        if not is_int(value):
            self._fail(path, value, "int")
        value = int(value)
        if not INT_MIN <= value <= INT_MAX:
            raise SchemaError("bad_schema", f"{path}: int {value} does not fit in 64 bits")
        _check_bounds(self.bounds, value, path)
        _check_choice(self.choices, value, path)
        return value


class FloatNode(Node):
    kind = "float"

    def __init__(self, bounds: Range | None = None):
        self.bounds = bounds

    def check(self, value, path):
        if not is_number(value, finite=False):
            self._fail(path, value, "float")
        if isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
            raise SchemaError("bad_schema", f"{path}: number {value} does not fit in 64 bits")
        value = float(value)
        if self.bounds is not None and math.isnan(value):
            raise SchemaError("bad_schema", f"{path}: NaN is outside {self.bounds}")
        _check_bounds(self.bounds, value, path)
        return value


class StrNode(Node):
    kind = "str"

    def __init__(self, choices: OneOf | None = None, length: Length | None = None):
        self.choices, self.length = choices, length or _DEFAULT_STR

    def check(self, value, path):
        if not isinstance(value, str):
            self._fail(path, value, "str")
        self.length.check(value, path, "characters")
        _check_choice(self.choices, value, path)
        return value


class BoolNode(Node):
    kind = "bool"

    def check(self, value, path):
        if not isinstance(value, bool):
            self._fail(path, value, "bool")
        return value


class BytesNode(Node):
    kind = "bytes"

    def __init__(self, length: Length | None = None):
        self.length = length

    def check(self, value, path):
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        if not isinstance(value, bytes):
            self._fail(path, value, "bytes")
        if self.length is not None:
            self.length.check(value, path, "bytes")
        return value


class OptionalNode(Node):
    kind = "optional"

    def __init__(self, inner: Node):
        self.inner = inner

    def check(self, value, path):
        return None if value is None else self.inner.check(value, path)


class ListNode(Node):
    kind = "list"

    def __init__(self, inner: Node, length: Length | None = None):
        self.inner, self.length = inner, length

    def check(self, value, path):
        if not isinstance(value, (list, tuple)):
            self._fail(path, value, "list")
        if self.length is not None:
            self.length.check(value, path, "items")
        return [self.inner.check(item, f"{path}[{i}]") for i, item in enumerate(value)]


class DictNode(Node):
    kind = "dict"

    def __init__(self, inner: Node, length: Length | None = None):
        self.inner, self.length = inner, length

    def check(self, value, path):
        if not isinstance(value, dict):
            self._fail(path, value, "dict")
        if self.length is not None:
            self.length.check(value, path, "keys")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise SchemaError("bad_schema", f"{path}: key {key!r} is not a str")
            _DEFAULT_STR.check(key, f"{path} key", "characters")
            out[key] = self.inner.check(item, f"{path}[{key!r}]")
        return out


class TensorNode(Node):
    """A tensor field. `form`: 'ndarray' (numpy only), 'raw' (always RawTensor), 'any'."""

    kind = "tensor"

    def __init__(self, form: str, spec: TensorSpec | None = None):
        self.form, self.spec = form, spec or TensorSpec()

    def check(self, value, path):
        if isinstance(value, np.ndarray):
            try:
                dtype = dtype_name(value)
            except TensorError as exc:
                raise SchemaError("bad_dtype", f"{path}: {exc.detail}") from exc
            if self.form == "raw":
                value = RawTensor.from_numpy(value)
        elif isinstance(value, RawTensor):
            dtype = value.dtype
            if self.form == "ndarray":
                try:
                    value = value.to_numpy()
                except TensorError as exc:
                    raise SchemaError("bad_dtype", f"{path}: {exc.detail}") from exc
        else:
            self._fail(path, value, "np.ndarray or RawTensor")
        spec = self.spec
        if spec.dtypes is not None and dtype not in spec.dtypes:
            raise SchemaError("bad_dtype", f"{path}: dtype {dtype} is not one of {list(spec.dtypes)}")
        if spec.shape is not None:
            shape = tuple(value.shape)
            if len(shape) != len(spec.shape) or any(w is not None and w != d for w, d in zip(spec.shape, shape)):
                raise SchemaError("bad_shape", f"{path}: shape {shape} does not match {spec.shape}")
        return value


class AnyNode(Node):
    """A small JSON-like value (peer rows, metrics): no tensors, bounded nesting."""

    kind = "any"

    def check(self, value, path):
        return _check_plain(value, path, 0)


def _check_plain(value, path, depth):
    if depth > ANY_MAX_DEPTH:
        raise SchemaError("bad_schema", f"{path}: nested deeper than {ANY_MAX_DEPTH}")
    if isinstance(value, str):
        _DEFAULT_STR.check(value, path, "characters")
        return value
    if value is None or isinstance(value, (bool, bytes)):
        return value
    if isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise SchemaError("bad_schema", f"{path}: int {value} does not fit in 64 bits")
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (list, tuple)):
        _ANY_ITEMS.check(value, path, "items")
        return [_check_plain(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if isinstance(value, dict):
        _ANY_ITEMS.check(value, path, "keys")
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise SchemaError("bad_schema", f"{path}: key {key!r} is not a str")
            _DEFAULT_STR.check(key, f"{path} key", "characters")
            out[key] = _check_plain(item, f"{path}[{key!r}]", depth + 1)
        return out
    raise SchemaError("bad_schema", f"{path}: {type(value).__name__} is not a plain value")


def _check_bounds(bounds: Range | None, value, path):
    if bounds is None:
        return
    if (bounds.lo is not None and not value >= bounds.lo) or (bounds.hi is not None and not value <= bounds.hi):
        raise SchemaError("bad_schema", f"{path}: {value} is outside [{bounds.lo}, {bounds.hi}]")


def _check_choice(choices: OneOf | None, value, path):
    if choices is not None and value not in choices.values:
        raise SchemaError("bad_schema", f"{path}: {value!r} is not one of {list(choices.values)}")


# --- annotation -> node ---

_TENSOR_FORMS = {np.ndarray: "ndarray", RawTensor: "raw"}


def node_for(annotation: object, where: str) -> Node:
    """Build the schema node for one resolved annotation; TypeError names the unsupported part."""
    meta: tuple = ()
    if typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        meta = tuple(extra)
    bounds = next((m for m in meta if isinstance(m, Range)), None)
    choices = next((m for m in meta if isinstance(m, OneOf)), None)
    spec = next((m for m in meta if isinstance(m, TensorSpec)), None)
    length = next((m for m in meta if isinstance(m, Length)), None)

    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        if set(args) == {np.ndarray, RawTensor}:
            inner: Node = TensorNode("any", spec)
        elif len(args) == 1:
            inner = node_for(Annotated[(args[0], *meta)] if meta else args[0], where)
        else:
            raise TypeError(f"{where}: unions other than X | None and Tensor are not supported ({annotation})")
        return OptionalNode(inner) if optional else inner
    if origin is list:
        (item,) = typing.get_args(annotation)
        return ListNode(node_for(item, where + "[]"), length)
    if origin is dict:
        key, item = typing.get_args(annotation)
        if key is not str:
            raise TypeError(f"{where}: dict keys must be str")
        return DictNode(node_for(item, where + "{}"), length)
    if annotation is Any:
        return AnyNode()
    if annotation in _TENSOR_FORMS:
        return TensorNode(_TENSOR_FORMS[annotation], spec)
    simple = {
        int: lambda: IntNode(bounds, choices),
        float: lambda: FloatNode(bounds),
        str: lambda: StrNode(choices, length),
        bool: BoolNode,
        bytes: lambda: BytesNode(length),
    }
    if annotation in simple:
        return simple[annotation]()
    raise TypeError(f"{where}: unsupported field type {annotation!r}")


__all__ = [
    "SchemaError",
    "Range",
    "OneOf",
    "TensorSpec",
    "Length",
    "STR_MAX_LEN",
    "Node",
    "node_for",
    "Tensor",
    "IntNode",
    "FloatNode",
    "StrNode",
    "BoolNode",
    "BytesNode",
    "OptionalNode",
    "ListNode",
    "DictNode",
    "TensorNode",
    "AnyNode",
]
