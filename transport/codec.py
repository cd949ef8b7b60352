"""The codec: Envelope <-> ZeroMQ multipart frames, two pure functions.

Frame 0 is a msgpack map {"v": 1, "type", "id", "src", "body"}. Each tensor in the body is
a msgpack ExtType(TENSOR_EXT) whose data is msgpack [dtype, shape, frame_index]; its bytes
are frame `frame_index` (>= 1) of the same multipart message, sent and received without
copies: `encode` hands out byte views of the arrays' own memory, `decode` builds numpy
views over the received frames (bytes, bytearray, memoryview or zmq.Frame).

`decode` trusts nothing. Before a body reaches anyone it checks, in order: frame count and
total size (too_large), the header's msgpack under tight limits (bad_header), every tensor
reference (bad_dtype, bad_shape, bad_frame_index, size_mismatch, bad_tensor), the
protocol version (bad_version), the type tag (unknown_type), that every frame is used
exactly once (bad_frame_index), and the body's fields against the type's schema
(bad_schema, bad_dtype, bad_shape). Whatever goes wrong, it raises `DecodeError` and
nothing else. No pickle anywhere.
"""

from __future__ import annotations

import msgpack
import numpy as np

from atlas_p2p.validation import is_int
from transport.messages import ID_LIMIT, MESSAGE_TYPES, SRC_MAX_LEN, Envelope
from transport.schema import SchemaError
from transport.tensors import RawTensor, TensorError, as_frame, check_dtype, check_shape, nbytes, tensor_from_frame

PROTOCOL_VERSION = 1
TENSOR_EXT = 1  # msgpack ExtType code of a tensor reference
DEFAULT_MAX_BYTES = 512 << 20  # whole message, header plus tensor frames
MAX_FRAMES = 16384  # tensor frames per message
MAX_HEADER_BYTES = 16 << 20  # the msgpack header frame alone
MAX_CONTAINER_LEN = 1 << 20  # items in one msgpack array or map
_REF_MAX_BYTES = 256  # a [dtype, shape, index] reference is tiny
_HEADER_KEYS = frozenset(("v", "type", "id", "src", "body"))
# What msgpack raises on bad input: its own errors (ValueError subclasses, incl. limits,
# ExtraData, FormatError, StackError), unicode errors (ValueError), and overflow/recursion.
_UNPACK_ERRORS = (ValueError, OverflowError, RecursionError, msgpack.UnpackException)

# Stable error codes (also used by rpc for `error` replies).
DECODE_CODES = (
    "bad_header",
    "bad_version",
    "unknown_type",
    "bad_schema",
    "bad_dtype",
    "bad_shape",
    "size_mismatch",
    "bad_frame_index",
    "bad_tensor",
    "too_large",
)


class DecodeError(ValueError):
    """The only exception `decode` raises. `code` is one of DECODE_CODES.

    `msg_id` and `src` are filled when the header was readable enough to know them, so
    a server can answer the sender's request with an `error` reply instead of silence.
    """

    def __init__(self, code: str, detail: str, msg_id: int | None = None, src: str | None = None):
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
        self.msg_id = msg_id
        self.src = src


class EncodeError(ValueError):
    """An Envelope that cannot be put on the wire (e.g. a value msgpack cannot carry)."""


# ------------------------------------------------------------------ encode


def encode(env: Envelope) -> list[bytes | memoryview]:
    """Envelope -> [header, tensor frames...]; tensor frames are views of the arrays' memory.

    The caller must not mutate those arrays until ZeroMQ has sent the frames.
    """
    if not isinstance(env, Envelope):
        raise EncodeError(f"encode expects an Envelope, got {type(env).__name__}")
    frames: list[bytes | memoryview] = [b""]

    def tensor_ref(obj: object) -> msgpack.ExtType:
        if not isinstance(obj, (np.ndarray, RawTensor)):
            raise EncodeError(f"cannot encode a {type(obj).__name__} (not a schema type)")
        dtype, frame = as_frame(obj)
        frames.append(frame)
        ref = msgpack.packb([dtype, list(obj.shape), len(frames) - 1])
        return msgpack.ExtType(TENSOR_EXT, ref)

    header = {"v": PROTOCOL_VERSION, "type": env.type, "id": env.id, "src": env.src, "body": env.body.to_dict()}
    try:
        frames[0] = msgpack.packb(header, default=tensor_ref, use_bin_type=True, datetime=False)
    except EncodeError:
        raise
    except (TypeError, ValueError, OverflowError, TensorError) as exc:
        raise EncodeError(f"cannot encode {env.type!r}: {exc}") from exc
    return frames


# ------------------------------------------------------------------ decode


def _frame_view(frame: object) -> memoryview:
    """A flat byte view of one received frame (zmq.Frame exposes its memory as .buffer)."""
    buffer = getattr(frame, "buffer", frame)
    try:
        view = buffer if isinstance(buffer, memoryview) else memoryview(buffer)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B", (view.nbytes,)) if view.ndim > 1 else view.cast("B")
    except (TypeError, ValueError) as exc:
        raise DecodeError("bad_header", f"frame of type {type(frame).__name__} is not a byte buffer") from exc
    return view


def decode(frames: list, max_bytes: int = DEFAULT_MAX_BYTES, max_frames: int = MAX_FRAMES) -> Envelope:
    """[header, tensor frames...] -> Envelope, validating everything first (see module doc)."""
    if not isinstance(frames, (list, tuple)) or not frames:
        raise DecodeError("bad_header", "a message needs at least a header frame")
    if len(frames) - 1 > max_frames:
        raise DecodeError("too_large", f"{len(frames) - 1} tensor frames, limit is {max_frames}")
    views = [_frame_view(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if views[0].nbytes > min(MAX_HEADER_BYTES, max_bytes):
        raise DecodeError(
            "too_large", f"header is {views[0].nbytes} bytes, limit is {min(MAX_HEADER_BYTES, max_bytes)}"
        )
    if total > max_bytes:  # the header alone is small enough to read who should hear about it
        raise DecodeError("too_large", f"message is {total} bytes, limit is {max_bytes}", *_sender_of(views[0]))

    used: set[int] = set()

    def resolve(code: int, data: bytes) -> object:
        if code != TENSOR_EXT:
            raise DecodeError("bad_header", f"unknown msgpack ext type {code}")
        return _tensor_from_ref(data, views, used)

    try:
        header = _unpack_header(views[0], resolve)
    except DecodeError as exc:
        exc.msg_id, exc.src = _sender_of(views[0])
        raise
    return _envelope_from_header(header, views, used)


def peek_id(frames: list) -> int | None:
    """The request id in a message's header, read without checking anything else (None: unreadable).

    For answering a message that is refused before it is decoded (e.g. over a rate limit).
    """
    if not isinstance(frames, (list, tuple)) or not frames:
        return None
    try:
        return _sender_of(_frame_view(frames[0]))[0]
    except DecodeError:
        return None


def _sender_of(view: memoryview) -> tuple[int | None, str | None]:
    """Best effort (id, src) of a header that failed to decode, so the error can be answered."""
    try:
        header = _unpack_header(view, lambda code, data: None)
    except DecodeError:
        return None, None
    msg_id, src = header.get("id"), header.get("src")
    if not is_int(msg_id) or not 0 <= msg_id < ID_LIMIT:
        return None, None
    return msg_id, src if isinstance(src, str) and len(src) <= SRC_MAX_LEN else None


def _unpack_header(view: memoryview, ext_hook) -> dict:
    size = view.nbytes
    try:
        header = msgpack.unpackb(
            view,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=ext_hook,
            timestamp=0,
            max_str_len=size,
            max_bin_len=size,
            max_array_len=min(size, MAX_CONTAINER_LEN),
            max_map_len=min(size, MAX_CONTAINER_LEN),
            max_ext_len=size,
        )
    except DecodeError:
        raise
    except _UNPACK_ERRORS as exc:
        raise DecodeError("bad_header", f"header is not valid msgpack: {type(exc).__name__}: {exc}") from exc
    if not isinstance(header, dict):
        raise DecodeError("bad_header", f"header must be a map, got {type(header).__name__}")
    return header


def _tensor_from_ref(data: bytes, views: list[memoryview], used: set[int]) -> object:
    if len(data) > _REF_MAX_BYTES:
        raise DecodeError("bad_header", f"tensor reference is {len(data)} bytes")
    try:
        ref = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=32,
            max_bin_len=0,
            max_array_len=16,
            max_map_len=0,
            max_ext_len=0,
        )
    except _UNPACK_ERRORS as exc:
        raise DecodeError("bad_header", f"tensor reference is not valid msgpack: {exc}") from exc
    if not isinstance(ref, list) or len(ref) != 3:
        raise DecodeError("bad_header", "tensor reference must be [dtype, shape, frame_index]")
    dtype, shape, index = ref
    try:
        dtype = check_dtype(dtype)
        shape = check_shape(shape)
    except TensorError as exc:
        raise DecodeError(exc.code, exc.detail) from exc
    if not is_int(index) or not 1 <= index < len(views):
        raise DecodeError("bad_frame_index", f"frame index {index!r} not in [1, {len(views) - 1}]")
    if index in used:
        raise DecodeError("bad_frame_index", f"frame {index} referenced twice")
    used.add(index)
    frame = views[index]
    expected = nbytes(dtype, shape)
    if frame.nbytes != expected:
        raise DecodeError(
            "size_mismatch", f"frame {index} has {frame.nbytes} bytes, {dtype}{list(shape)} needs {expected}"
        )
    try:
        return tensor_from_frame(dtype, shape, frame)
    except TensorError as exc:
        raise DecodeError(exc.code, exc.detail) from exc


def _envelope_from_header(header: dict, views: list[memoryview], used: set[int]) -> Envelope:
    if set(header) != _HEADER_KEYS:
        raise DecodeError("bad_header", f"header keys {sorted(map(str, header))} != {sorted(_HEADER_KEYS)}")
    msg_id, src = header["id"], header["src"]
    if not is_int(msg_id) or not 0 <= msg_id < ID_LIMIT:
        raise DecodeError("bad_header", f"id must be an int in [0, 2**63), got {msg_id!r:.40}")
    if not isinstance(src, str) or len(src) > SRC_MAX_LEN:
        raise DecodeError("bad_header", f"src must be a str of <= {SRC_MAX_LEN} chars", msg_id)

    def fail(code: str, detail: str) -> DecodeError:
        return DecodeError(code, detail, msg_id, src)

    version = header["v"]
    if isinstance(version, bool) or version != PROTOCOL_VERSION:
        raise fail("bad_version", f"protocol version {version!r:.40}, this node speaks {PROTOCOL_VERSION}")
    msg_type = header["type"]
    cls = MESSAGE_TYPES.get(msg_type) if isinstance(msg_type, str) else None
    if cls is None:
        raise fail("unknown_type", f"message type {msg_type!r:.60} is not known")
    unused = set(range(1, len(views))) - used
    if unused:
        raise fail("bad_frame_index", f"frames {sorted(unused)[:8]} are not referenced by the header")
    body = header["body"]
    if not isinstance(body, dict):
        raise fail("bad_schema", f"{msg_type}: body must be a map, got {type(body).__name__}")
    names = cls.SCHEMA.keys()
    if body.keys() != names:
        unknown = sorted(map(repr, body.keys() - names))
        missing = sorted(names - body.keys())
        raise fail("bad_schema", f"{msg_type}: unknown fields {unknown}, missing fields {missing}")
    try:
        message = cls(**body)
    except (SchemaError, TensorError) as exc:
        raise fail(exc.code, exc.detail) from exc
    except (TypeError, ValueError) as exc:
        raise fail("bad_schema", f"{msg_type}: {exc}") from exc
    return Envelope(msg_type, msg_id, src, message)
