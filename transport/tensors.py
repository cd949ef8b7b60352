"""Tensors on the wire: the dtype allow-list, limits, and `RawTensor`.

A tensor crosses the wire as (dtype name, shape, one raw little-endian byte frame).
numpy arrays carry themselves; `RawTensor` carries a dtype numpy lacks (bfloat16) by
name, as plain bytes, so the transport never needs torch. The receiving side turns a
RawTensor into its framework's tensor (torch: `torch.frombuffer(..., dtype=torch.bfloat16)`).

Nothing here copies unless it must: `as_frame` hands out a byte view of the array's own
memory (a non-contiguous or big-endian array is made contiguous little-endian once) and
`tensor_from_frame` builds a numpy view over the received buffer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# Name on the wire -> bytes per element. The names are numpy's, plus bfloat16.
DTYPE_ITEMSIZE: dict[str, int] = {
    "float16": 2,
    "float32": 4,
    "float64": 8,
    "bfloat16": 2,
    "int8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "uint8": 1,
    "bool": 1,
}
# Wire dtypes numpy can hold directly, always little-endian on the wire.
NUMPY_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<") for name in DTYPE_ITEMSIZE if name != "bfloat16"
}
_NAME_OF: dict[np.dtype, str] = {}
for _name, _dtype in NUMPY_DTYPES.items():
    _NAME_OF[_dtype] = _NAME_OF[_dtype.newbyteorder("=")] = _NAME_OF[_dtype.newbyteorder(">")] = _name
MAX_NDIM = 8  # more dimensions than any model tensor needs
MAX_ELEMENTS = 1 << 34  # 16 Gi elements: far above one message, below int64 overflow


class TensorError(ValueError):
    """A dtype, shape or buffer that cannot be a wire tensor; `code` says which."""

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def check_dtype(dtype: object) -> str:
    """Return `dtype` if it is an allowed wire dtype name, else raise TensorError('bad_dtype')."""
    if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
        raise TensorError("bad_dtype", f"dtype {dtype!r} is not one of {sorted(DTYPE_ITEMSIZE)}")
    return dtype


def check_shape(shape: object) -> tuple[int, ...]:
    """Return `shape` as a tuple if it is <= MAX_NDIM non-negative ints with <= MAX_ELEMENTS elements."""
    if not isinstance(shape, (list, tuple)):
        raise TensorError("bad_shape", f"shape must be a list of ints, got {type(shape).__name__}")
    if len(shape) > MAX_NDIM:
        raise TensorError("bad_shape", f"shape has {len(shape)} dims, limit is {MAX_NDIM}")
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise TensorError("bad_shape", f"shape {list(shape)!r} must hold non-negative ints")
        if dim > MAX_ELEMENTS:
            raise TensorError("bad_shape", f"dimension {dim} exceeds {MAX_ELEMENTS} elements")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise TensorError("bad_shape", f"shape {list(shape)} has {count} elements, limit is {MAX_ELEMENTS}")
    return tuple(shape)


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of this (already checked) dtype and shape occupies: prod(shape) * itemsize."""
    return math.prod(shape) * DTYPE_ITEMSIZE[dtype]


def _byte_view(buffer: object) -> memoryview:
    """A flat unsigned-byte memoryview over any buffer-protocol object, without copying."""
    view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
    if view.ndim == 1 and view.format == "B":
        return view
    if not view.c_contiguous:
        raise TensorError("bad_buffer", "buffer must be C-contiguous")
    return view.cast("B") if view.ndim <= 1 else view.cast("B", (view.nbytes,))


@dataclass(frozen=True, eq=False)
class RawTensor:
    """A tensor whose dtype numpy may lack, carried as bytes plus a dtype name.

    dtype: a name from DTYPE_ITEMSIZE (e.g. "bfloat16"); shape: non-negative ints;
    data: any C-contiguous buffer of exactly prod(shape) * itemsize little-endian bytes,
    kept as a flat byte memoryview (no copy).
    """

    dtype: str
    shape: tuple[int, ...]
    data: memoryview

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "data", _byte_view(self.data))
        except TypeError as exc:
            raise TensorError("bad_buffer", f"RawTensor.data must be a buffer, got {type(self.data).__name__}") from exc
        check_dtype(self.dtype)
        object.__setattr__(self, "shape", check_shape(self.shape))
        expected = nbytes(self.dtype, self.shape)
        if self.data.nbytes != expected:
            raise TensorError(
                "size_mismatch",
                f"RawTensor.data has {self.data.nbytes} bytes, dtype {self.dtype} shape {self.shape} needs {expected}",
            )

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def to_numpy(self) -> np.ndarray:
        """A numpy view of the data (bfloat16 has no numpy dtype: raises TensorError('bad_dtype'))."""
        if self.dtype not in NUMPY_DTYPES:
            raise TensorError("bad_dtype", f"numpy has no dtype {self.dtype}; use bfloat16_to_float32")
        return np.frombuffer(self.data, dtype=NUMPY_DTYPES[self.dtype]).reshape(self.shape)

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> RawTensor:
        """Wrap a numpy array (no copy when it is already contiguous little-endian)."""
        dtype, frame = as_frame(array)
        return cls(dtype, tuple(array.shape), frame)


Tensor = np.ndarray | RawTensor
"""Annotation for a field that takes either: numpy when numpy has the dtype, else RawTensor."""


def dtype_name(array: np.ndarray) -> str:
    """The wire name of a numpy array's dtype, or TensorError('bad_dtype')."""
    name = _NAME_OF.get(array.dtype)
    if name is None:
        raise TensorError("bad_dtype", f"numpy dtype {array.dtype} is not one of {sorted(NUMPY_DTYPES)}")
    return name


def as_frame(tensor: Tensor) -> tuple[str, memoryview]:
    """(dtype name, flat byte view) for sending; copies only a non-contiguous or big-endian array."""
    if isinstance(tensor, RawTensor):
        return tensor.dtype, tensor.data
    if not isinstance(tensor, np.ndarray):
        raise TensorError("bad_dtype", f"expected np.ndarray or RawTensor, got {type(tensor).__name__}")
    name = dtype_name(tensor)
    check_shape(tensor.shape)
    if tensor.dtype.byteorder == ">":
        tensor = tensor.astype(NUMPY_DTYPES[name])
    tensor = np.ascontiguousarray(tensor)
    return name, memoryview(tensor.reshape(-1).view(np.uint8))


def tensor_from_frame(dtype: str, shape: tuple[int, ...], frame: memoryview) -> Tensor:
    """A zero-copy tensor over a received byte frame whose size was already checked.

    numpy dtypes become a (read-only when the frame is) ndarray view; bfloat16 a RawTensor.
    A bool frame must hold only 0 and 1 (other bytes are not valid numpy bools).
    """
    if dtype not in NUMPY_DTYPES:
        return RawTensor(dtype, shape, frame)
    if dtype == "bool" and len(frame) and np.frombuffer(frame, dtype=np.uint8).max() > 1:
        raise TensorError("bad_tensor", "bool tensor holds bytes other than 0 and 1")
    return np.frombuffer(frame, dtype=NUMPY_DTYPES[dtype]).reshape(shape)


def bfloat16_from_float32(array: np.ndarray) -> RawTensor:
    """Round float32 values to bfloat16 (nearest, ties to even) and carry them as a RawTensor.

    bfloat16 is the top 16 bits of an IEEE float32; rounding adds 0x7FFF plus the lowest
    kept bit before truncating. NaN stays NaN (quiet bit forced so truncation cannot make inf).
    """
    bits = np.ascontiguousarray(array, dtype="<f4").view("<u4")
    rounded = ((bits.astype(np.uint64) + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    rounded = np.where(np.isnan(array), ((bits >> 16) | 0x40).astype("<u2"), rounded)
    return RawTensor(
        "bfloat16", tuple(np.shape(array)), memoryview(np.ascontiguousarray(rounded).reshape(-1).view(np.uint8))
    )


def bfloat16_to_float32(tensor: RawTensor) -> np.ndarray:
    """Widen a bfloat16 RawTensor to a new float32 array (exact: bfloat16 is a truncated float32)."""
    if tensor.dtype != "bfloat16":
        raise TensorError("bad_dtype", f"expected a bfloat16 RawTensor, got {tensor.dtype}")
    halves = np.frombuffer(tensor.data, dtype="<u2").astype("<u4")
    return (halves << 16).view("<f4").reshape(tensor.shape)
