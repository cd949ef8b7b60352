"""Codec and message schemas: round trips, zero copy, and every way a frame set can be wrong."""

from __future__ import annotations

import random
from typing import Annotated

import msgpack
import numpy as np
import pytest
import zmq

from transport.codec import TENSOR_EXT, DecodeError, EncodeError, decode, encode
from transport.messages import (
    MESSAGE_TYPES,
    Envelope,
    Fingerprint,
    Forward,
    Heartbeat,
    Message,
    Ok,
    PeerList,
    Report,
    message,
)
from transport.samples import same_value, sample_array, sample_body
from transport.schema import Range, SchemaError, TensorSpec
from transport.tensors import (
    DTYPE_ITEMSIZE,
    MAX_NDIM,
    RawTensor,
    Tensor,
    TensorError,
    bfloat16_from_float32,
    bfloat16_to_float32,
)

ALL_DTYPES = sorted(DTYPE_ITEMSIZE)
SHAPES = [(), (0,), (5,), (2, 3), (3, 0, 2), (1, 2, 1, 2)]


def wire(frames):
    """What a socket delivers: independent bytes objects."""
    return [bytes(f) for f in frames]


def craft(header: dict, tensors: list[bytes] = ()) -> list[bytes]:
    """Hand-build a frame set (bypassing encode's checks) to play a misbehaving peer."""
    return [msgpack.packb(header, use_bin_type=True), *tensors]


def ref(dtype, shape, index) -> msgpack.ExtType:
    return msgpack.ExtType(TENSOR_EXT, msgpack.packb([dtype, shape, index]))


def fingerprint_header(vector=None, **overrides) -> dict:
    body = {
        "node_id": 1,
        "vector": ref("float32", [64], 1) if vector is None else vector,
        "n_samples": 8,
        "importance": None,
        "leakage": None,
        "dp": None,
    }
    header = {"v": 1, "type": "fingerprint", "id": 7, "src": "n1", "body": body}
    header.update(overrides)
    return header


def forward_header(activations, attention_mask) -> dict:
    """A `forward` request whose two tensors are the frame refs given."""
    body = {
        "step": 0,
        "activations": activations,
        "attention_mask": attention_mask,
        "labels": None,
        "base_version": 0,
        "owner_id": 0,
        "cluster": 0,
        "round": 0,
    }
    return {"v": 1, "type": "forward", "id": 1, "src": "a", "body": body}


VECTOR = np.arange(64, dtype=np.float32).tobytes()


def code_of(frames, **kwargs) -> str:
    with pytest.raises(DecodeError) as info:
        decode(frames, **kwargs)
    return info.value.code


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("fill_optional", [True, False])
@pytest.mark.parametrize("msg_type", sorted(MESSAGE_TYPES))
def test_every_message_type_round_trips(msg_type, fill_optional):
    rng = random.Random(hash((msg_type, fill_optional)) & 0xFFFF)
    for _ in range(3):
        body = sample_body(MESSAGE_TYPES[msg_type], rng, fill_optional)
        env = Envelope.of(body, rng.getrandbits(62), "node-7")

        out = decode(wire(encode(env)))

        assert (out.type, out.id, out.src) == (msg_type, env.id, "node-7")
        assert same_value(out.body, body)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_every_dtype_and_shape_round_trips(dtype, shape):
    tensor = sample_array(dtype, shape, random.Random(0))
    body = Forward(step=1, activations=tensor, attention_mask=np.ones((1, 1), np.int64), labels=tensor)

    out = decode(wire(encode(Envelope.of(body, 1, "a")))).body

    assert same_value(out.activations, tensor) and same_value(out.labels, tensor)
    assert isinstance(out.activations, RawTensor if dtype == "bfloat16" else np.ndarray)


def test_bfloat16_conversion_is_exact_for_representable_values_and_rounds_to_nearest_even():
    values = np.array([0.0, -0.0, 1.0, -2.5, 3.140625, np.inf, -np.inf, 1.00390625, 1.01171875], np.float32)

    back = bfloat16_to_float32(bfloat16_from_float32(values))

    # 1 + 2**-8 is half-way between 1 and 1 + 2**-7: ties go to the even mantissa (1.0);
    # 1 + 3*2**-8 ties between 1+2**-7 and 1+2**-6: even is 1 + 2**-6.
    expected = np.array([0.0, -0.0, 1.0, -2.5, 3.140625, np.inf, -np.inf, 1.0, 1.015625], np.float32)
    assert back.tobytes() == expected.tobytes()
    assert np.isnan(bfloat16_to_float32(bfloat16_from_float32(np.array([np.nan], np.float32))))[0]


def test_raw_tensor_rejects_wrong_byte_count_and_unknown_dtype():
    with pytest.raises(TensorError, match="size_mismatch"):
        RawTensor("bfloat16", (3,), b"\x00" * 5)
    with pytest.raises(TensorError, match="bad_dtype"):
        RawTensor("complex64", (1,), b"\x00" * 8)


def test_non_contiguous_and_big_endian_arrays_are_sent_as_their_values():
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    strided = base[::2, 1::2]
    big_endian = np.arange(5, dtype=">i4")
    body = Forward(step=0, activations=strided, attention_mask=big_endian)

    out = decode(wire(encode(Envelope.of(body, 1, "a")))).body

    assert np.array_equal(out.activations, strided) and out.activations.dtype == np.float64
    assert np.array_equal(out.attention_mask, big_endian) and out.attention_mask.dtype == np.dtype("<i4")


def test_encode_shares_memory_with_contiguous_arrays():
    activations = np.zeros((2, 3, 4), np.float32)
    frames = encode(Envelope.of(Forward(step=0, activations=activations, attention_mask=np.ones(2, bool)), 1, "a"))

    assert np.shares_memory(np.frombuffer(frames[1], np.float32), activations)


def test_decode_builds_views_over_the_received_frames():
    frames = [
        bytearray(f)
        for f in encode(Envelope.of(Fingerprint(node_id=1, vector=np.zeros(64, np.float32), n_samples=1), 3, "a"))
    ]
    vector = decode(frames).body.vector

    frames[1][:4] = np.float32(9.5).tobytes()

    assert vector[0] == 9.5


def test_decode_accepts_zmq_frames_and_memoryviews():
    env = Envelope.of(Fingerprint(node_id=2, vector=np.ones(64, np.float32), n_samples=4), 11, "b")
    frames = wire(encode(env))

    from_zmq = decode([zmq.Frame(f) for f in frames])
    from_views = decode([memoryview(f) for f in frames])

    assert same_value(from_zmq.body, env.body) and same_value(from_views.body, env.body)


def test_int_fields_widen_to_float_fields_but_bool_never_counts_as_int():
    assert Report(node_id=1, metrics={}).node_id == 1
    assert Fingerprint(node_id=1, vector=np.zeros(64, np.float32), n_samples=1, importance={"q": 2}).importance == {
        "q": 2.0
    }
    with pytest.raises(SchemaError, match="bad_schema"):
        Report(node_id=True, metrics={})


# ---------------------------------------------------------------- building bad messages locally


def test_constructing_a_message_with_a_wrong_field_fails_with_the_field_named():
    with pytest.raises(SchemaError, match="heartbeat.state"):
        Heartbeat(node_id=1, state="dancing")
    with pytest.raises(SchemaError, match="fingerprint.vector"):
        Fingerprint(node_id=1, vector=np.zeros(64, np.float64), n_samples=1)
    with pytest.raises(SchemaError, match="peer_list.rows"):
        PeerList(rows=[{"tensor": np.zeros(2)}])
    with pytest.raises(SchemaError, match="nested deeper"):
        deep: object = 1
        for _ in range(20):
            deep = [deep]
        Report(node_id=1, metrics={"x": deep})


def test_duplicate_message_tag_is_rejected_at_definition():
    with pytest.raises(ValueError, match="already used"):

        @message("ping")
        class AnotherPing(Message):
            x: int


def test_unsupported_field_annotation_is_rejected_and_not_registered():
    with pytest.raises(TypeError, match="unsupported field type"):

        @message("test_set_field")
        class WithSet(Message):
            items: set[int]

    assert "test_set_field" not in MESSAGE_TYPES


def test_adding_a_message_type_takes_a_few_lines_and_round_trips():
    try:

        @message("test_new_type")
        class NewType(Message):
            node_id: int
            weights: dict[str, float] | None = None

        env = Envelope.of(NewType(node_id=3, weights={"q": 0.5}), 1, "a")
        assert same_value(decode(wire(encode(env))).body, env.body)
    finally:
        MESSAGE_TYPES.pop("test_new_type", None)


def test_envelope_rejects_mismatched_type_and_bad_id():
    with pytest.raises(SchemaError, match="bad_schema"):
        Envelope("ping", 1, "a", Ok())
    with pytest.raises(SchemaError, match="bad_header"):
        Envelope.of(Ok(), -1, "a")
    with pytest.raises(SchemaError, match="unknown_type"):
        Envelope("nope", 1, "a", Ok())


def test_encode_rejects_what_is_not_an_envelope():
    with pytest.raises(EncodeError):
        encode({"type": "ok"})


# ---------------------------------------------------------------- corrupted frame sets


def test_well_formed_crafted_fingerprint_decodes():
    env = decode(craft(fingerprint_header(), [VECTOR]))

    assert env.body.vector[5] == 5.0 and env.id == 7


@pytest.mark.parametrize(
    "frames, code",
    [
        ([], "bad_header"),
        ([b""], "bad_header"),
        ([b"\xc1"], "bad_header"),  # reserved msgpack byte
        ([msgpack.packb([1, 2, 3])], "bad_header"),  # not a map
        ([msgpack.packb({"v": 1})], "bad_header"),  # missing keys
        ([42], "bad_header"),  # not a buffer
        ([None], "bad_header"),
    ],
)
def test_unreadable_headers(frames, code):
    assert code_of(frames) == code


def test_truncated_header():
    frames = craft(fingerprint_header(), [VECTOR])
    assert code_of([frames[0][:-3], frames[1]]) == "bad_header"


def test_header_with_trailing_garbage():
    frames = craft(fingerprint_header(), [VECTOR])
    assert code_of([frames[0] + b"\x00", frames[1]]) == "bad_header"


def test_header_with_an_extra_key():
    assert code_of(craft(fingerprint_header(extra=1), [VECTOR])) == "bad_header"


def test_invalid_utf8_string():
    raw = msgpack.packb(fingerprint_header(), use_bin_type=True).replace(b"\xa2n1", b"\xa2\xff\xfe")
    assert code_of([raw, VECTOR]) == "bad_header"


@pytest.mark.parametrize("version", [2, 0, "1", None, True])
def test_wrong_protocol_version(version):
    assert code_of(craft(fingerprint_header(v=version), [VECTOR])) == "bad_version"


@pytest.mark.parametrize("msg_type", ["nope", "", 5, None, ["fingerprint"]])
def test_unknown_message_type(msg_type):
    assert code_of(craft(fingerprint_header(type=msg_type), [VECTOR])) == "unknown_type"


@pytest.mark.parametrize("msg_id, src", [(-1, "a"), (2**63, "a"), ("7", "a"), (True, "a"), (1, 5), (1, "x" * 300)])
def test_bad_id_or_src(msg_id, src):
    assert code_of(craft(fingerprint_header(id=msg_id, src=src), [VECTOR])) == "bad_header"


def test_extra_frame_not_referenced():
    assert code_of(craft(fingerprint_header(), [VECTOR, b"junk"])) == "bad_frame_index"


def test_missing_frame():
    assert code_of(craft(fingerprint_header())) == "bad_frame_index"


@pytest.mark.parametrize("index", [0, 2, 99, -1, "1", None, True, 1.0])
def test_bad_frame_index(index):
    assert code_of(craft(fingerprint_header(vector=ref("float32", [64], index)), [VECTOR])) == "bad_frame_index"


def test_frame_referenced_twice():
    forward = forward_header(ref("float32", [64], 1), ref("float32", [64], 1))
    assert code_of(craft(forward, [VECTOR])) == "bad_frame_index"


@pytest.mark.parametrize("frame", [VECTOR[:-1], VECTOR + b"\x00", b"", VECTOR * 2])
def test_lying_sizes(frame):
    assert code_of(craft(fingerprint_header(), [frame])) == "size_mismatch"


@pytest.mark.parametrize("shape", [[2**40, 2**40], [-1], [64.0], "64", [1] * (MAX_NDIM + 1), [2**62], None])
def test_bad_or_huge_shapes(shape):
    assert code_of(craft(fingerprint_header(vector=ref("float32", shape, 1)), [VECTOR])) == "bad_shape"


@pytest.mark.parametrize("dtype", ["object", "float128", "complex64", "<f4", 5, None, "F" * 40])
def test_dtypes_outside_the_allow_list(dtype):
    code = code_of(craft(fingerprint_header(vector=ref(dtype, [64], 1)), [VECTOR]))
    assert code in ("bad_dtype", "bad_header")  # a 40-char name already breaks the ref's own limits


def test_field_spec_violations():
    assert code_of(craft(fingerprint_header(vector=ref("float32", [63], 1)), [VECTOR[:-4]])) == "bad_shape"
    assert code_of(craft(fingerprint_header(vector=ref("float64", [32], 1)), [VECTOR])) == "bad_dtype"
    assert code_of(craft(fingerprint_header(vector=ref("bfloat16", [128], 1)), [VECTOR])) == "bad_dtype"


def test_bool_tensor_with_invalid_bytes():
    header = forward_header(ref("bool", [3], 1), ref("bool", [3], 2))
    assert code_of(craft(header, [b"\x00\x01\x02", b"\x00\x01\x01"])) == "bad_tensor"


@pytest.mark.parametrize(
    "field, value",
    [
        ("node_id", "1"),
        ("node_id", 1.5),
        ("node_id", True),
        ("node_id", -1),
        ("n_samples", None),
        ("importance", {"q": "high"}),
        ("importance", [1.0]),
        ("vector", [0.0] * 64),
        ("dp", [8.0]),
        ("dp", [8.0, 1e-5, 1.0]),
        ("dp", [-1.0, 1e-5]),
    ],
)
def test_wrong_field_types(field, value):
    header = fingerprint_header()
    header["body"][field] = value
    frames = craft(header, [VECTOR]) if field != "vector" else craft(header)
    assert code_of(frames) == "bad_schema"


def test_unknown_field():
    header = fingerprint_header()
    header["body"]["surprise"] = 1
    assert code_of(craft(header, [VECTOR])) == "bad_schema"


def test_missing_field():
    header = fingerprint_header()
    del header["body"]["importance"]  # even a field with a default must be sent
    assert code_of(craft(header, [VECTOR])) == "bad_schema"


def test_body_not_a_map():
    assert code_of(craft(fingerprint_header(body=[1, 2]))) == "bad_schema"


def test_tensor_inside_a_generic_value_is_refused():
    header = {
        "v": 1,
        "type": "report",
        "id": 1,
        "src": "a",
        "body": {"node_id": 1, "metrics": {"t": ref("uint8", [1], 1)}},
    }
    assert code_of(craft(header, [b"\x01"])) == "bad_schema"


def test_unknown_ext_type_and_timestamps_are_refused():
    header = {
        "v": 1,
        "type": "report",
        "id": 1,
        "src": "a",
        "body": {"node_id": 1, "metrics": {"t": msgpack.ExtType(9, b"x")}},
    }
    assert code_of(craft(header)) == "bad_header"
    header["body"]["metrics"]["t"] = msgpack.Timestamp(1, 0)
    assert code_of(craft(header)) == "bad_schema"


def test_deep_nesting_is_refused():
    header = {"v": 1, "type": "report", "id": 1, "src": "a", "body": {"node_id": 1, "metrics": {"d": 0}}}
    packed = msgpack.packb(header)
    deep = b"\x91" * 5000 + b"\x01"  # 5000 nested one-element arrays, built by hand
    assert packed.endswith(b"\xa1d\x00")

    assert code_of([packed[:-1] + deep]) in ("bad_header", "bad_schema")
    assert code_of([packed[:-1] + b"\x91" * 20 + b"\x01"]) == "bad_schema"


def test_non_string_map_keys_are_refused():
    header = {"v": 1, "type": "report", "id": 1, "src": "a", "body": {"node_id": 1, "metrics": {b"k": 1}}}
    assert code_of(craft(header)) == "bad_schema"
    raw = msgpack.packb({1: 2})
    assert code_of([raw]) == "bad_header"


def test_too_large_by_total_bytes_and_by_frame_count():
    frames = craft(fingerprint_header(), [VECTOR])
    assert code_of(frames, max_bytes=100) == "too_large"
    assert code_of([frames[0]] + [b""] * 10, max_frames=5) == "too_large"


def test_schema_errors_carry_the_request_id_so_they_can_be_answered():
    header = fingerprint_header()
    header["body"]["node_id"] = "x"
    with pytest.raises(DecodeError) as info:
        decode(craft(header, [VECTOR]))
    assert (info.value.msg_id, info.value.src) == (7, "n1")


def test_tensor_errors_carry_the_request_id_too():
    with pytest.raises(DecodeError) as info:
        decode(craft(fingerprint_header(), [VECTOR[:-1]]))
    assert (info.value.code, info.value.msg_id) == ("size_mismatch", 7)


def test_too_large_errors_carry_the_request_id_when_the_header_is_readable():
    with pytest.raises(DecodeError) as info:
        decode(craft(fingerprint_header(), [VECTOR]), max_bytes=200)
    assert (info.value.code, info.value.msg_id, info.value.src) == ("too_large", 7, "n1")


def test_narrowing_applies_inside_optional_annotations():
    try:

        @message("test_narrowed")
        class Narrowed(Message):
            level: Annotated[int | None, Range(0, 5)] = None
            probe: Annotated[Tensor | None, TensorSpec(("float32",), (None, 2))] = None

        assert Narrowed(level=None).level is None and Narrowed(level=5).level == 5
        with pytest.raises(SchemaError, match="outside"):
            Narrowed(level=6)
        assert Narrowed(probe=np.zeros((3, 2), np.float32)).probe.shape == (3, 2)
        with pytest.raises(SchemaError, match="bad_shape"):
            Narrowed(probe=np.zeros((3, 3), np.float32))
    finally:
        MESSAGE_TYPES.pop("test_narrowed", None)
