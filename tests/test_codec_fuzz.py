"""Fuzzing the decoder: whatever arrives, decode returns a valid Envelope or raises DecodeError."""

from __future__ import annotations

import collections
import random

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from transport.codec import DECODE_CODES, TENSOR_EXT, DecodeError, decode, encode
from transport.messages import MESSAGE_TYPES, Envelope, Forward
from transport.samples import same_value, sample_body

N_MUTATIONS = 3600


def decode_or_decode_error(frames, raise_code: bool = False) -> Envelope | None:
    """The property: decode either yields an Envelope that re-encodes, or raises DecodeError."""
    try:
        env = decode(frames, max_bytes=1 << 20)
    except DecodeError as exc:
        assert exc.code in DECODE_CODES and isinstance(exc.detail, str)
        if raise_code:
            raise
        return None
    again = decode([bytes(f) for f in encode(env)])  # a decoded message is always a valid message
    assert same_value(again.body, env.body)
    return env


def seed_frame_sets(rng: random.Random) -> list[list[bytes]]:
    seeds = []
    for msg_type in sorted(MESSAGE_TYPES):
        body = sample_body(MESSAGE_TYPES[msg_type], rng, fill_optional=rng.random() < 0.7)
        seeds.append([bytes(f) for f in encode(Envelope.of(body, rng.getrandbits(40), "fuzz"))])
    return seeds


def random_plain(rng: random.Random, depth: int = 0) -> object:
    choices = [
        None,
        True,
        0,
        -1,
        2**63,
        2**64 - 1,
        -(2**63),
        1.5,
        float("nan"),
        "",
        "x" * 40,
        b"\x00",
        msgpack.ExtType(TENSOR_EXT, msgpack.packb(["float32", [2], 1])),
        msgpack.ExtType(3, b""),
    ]
    if depth < 3:
        choices += [[random_plain(rng, depth + 1)], {"k": random_plain(rng, depth + 1)}]
    return rng.choice(choices)


def mutate_structure(header: bytes, rng: random.Random) -> bytes:
    """Decode the header loosely, replace one value somewhere, re-encode: type confusion."""
    try:
        tree = msgpack.unpackb(header, raw=False, strict_map_key=False)
    except (ValueError, TypeError):  # an earlier mutation already broke it: break it further
        return header[::-1]
    node = tree
    for _ in range(rng.randint(0, 3)):
        if isinstance(node, dict) and node:
            key = rng.choice(list(node))
            if isinstance(node[key], (dict, list)) and node[key]:
                node = node[key]
                continue
        break
    if isinstance(node, dict) and node:
        op = rng.random()
        key = rng.choice(list(node))
        if op < 0.7:
            node[key] = random_plain(rng)
        elif op < 0.85:
            del node[key]
        else:
            node[f"extra{rng.randint(0, 9)}"] = random_plain(rng)
    elif isinstance(node, list) and node:
        node[rng.randrange(len(node))] = random_plain(rng)
    return msgpack.packb(tree, use_bin_type=True)


def mutate(frames: list[bytes], rng: random.Random) -> list:
    frames = list(frames)
    op = rng.randrange(16)  # ops 10..15: structural, so schema checks get exercised too
    if op == 0 and frames[0]:  # flip a few header bytes
        header = bytearray(frames[0])
        for _ in range(rng.randint(1, 4)):
            header[rng.randrange(len(header))] ^= 1 << rng.randrange(8)
        frames[0] = bytes(header)
    elif op == 1:  # truncate the header
        frames[0] = frames[0][: rng.randrange(len(frames[0]) + 1)]
    elif op == 2:  # append junk to the header
        frames[0] += rng.randbytes(rng.randint(1, 8))
    elif op == 3 and len(frames) > 1:  # drop a tensor frame
        del frames[rng.randrange(1, len(frames))]
    elif op == 4:  # an extra frame
        frames.insert(rng.randrange(1, len(frames) + 1), rng.randbytes(rng.randint(0, 16)))
    elif op == 5 and len(frames) > 2:  # swap two tensor frames
        i, j = rng.sample(range(1, len(frames)), 2)
        frames[i], frames[j] = frames[j], frames[i]
    elif op == 6 and len(frames) > 1:  # resize a tensor frame
        i = rng.randrange(1, len(frames))
        frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)] if rng.random() < 0.5 else frames[i] + b"\x01"
    elif op == 7 and len(frames) > 1:  # flip bytes in a tensor frame (usually still valid)
        data = bytearray(frames[rng.randrange(1, len(frames))])
        if data:
            data[rng.randrange(len(data))] ^= 0xFF
    elif op == 8:  # replace the header with noise
        frames[0] = rng.randbytes(rng.randint(0, 64))
    elif op == 9:  # splice two headers
        cut = rng.randrange(len(frames[0]) + 1)
        frames[0] = frames[0][:cut] + frames[0][rng.randrange(len(frames[0]) + 1) :]
    else:  # change a value inside the header
        frames[0] = mutate_structure(frames[0], rng)
    return frames


def test_seeded_random_mutations_only_ever_raise_decode_error():
    rng = random.Random(20240531)
    seeds = seed_frame_sets(rng)
    outcomes: collections.Counter[str] = collections.Counter()

    for _ in range(N_MUTATIONS):
        frames = rng.choice(seeds)
        for _ in range(rng.choice((1, 1, 2, 3))):
            frames = mutate(frames, rng)
        try:
            decode_or_decode_error(frames, raise_code=True)
            outcomes["decoded"] += 1
        except DecodeError as exc:
            outcomes[exc.code] += 1

    assert sum(outcomes.values()) == N_MUTATIONS >= 3000
    assert N_MUTATIONS - outcomes["decoded"] > N_MUTATIONS // 2  # most mutations are caught
    assert len(set(outcomes) - {"decoded"}) >= 7, outcomes  # ... by many different checks


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=4))
def test_arbitrary_bytes_never_crash_the_decoder(frames):
    decode_or_decode_error(frames)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(
    msg_type=st.sampled_from(sorted(MESSAGE_TYPES)),
    body=st.dictionaries(st.text(max_size=12), msgpack_values, max_size=6),
    msg_id=st.integers(-5, 2**64 - 1),
    frames=st.lists(st.binary(max_size=16), max_size=2),
)
def test_arbitrary_well_formed_headers_never_crash_the_decoder(msg_type, body, msg_id, frames):
    header = msgpack.packb({"v": 1, "type": msg_type, "id": msg_id, "src": "h", "body": body})
    decode_or_decode_error([header, *frames])


tensors = hnp.arrays(
    dtype=st.sampled_from(
        [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8, np.bool_]
    ),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5),
)


@settings(max_examples=200, deadline=None)
@given(activations=tensors, mask=tensors, step=st.integers(0, 2**63 - 1), loss=st.none() | st.floats())
def test_any_tensor_round_trips(activations, mask, step, loss):
    body = Forward(step=step, activations=activations, attention_mask=mask)

    out = decode([bytes(f) for f in encode(Envelope.of(body, step, "h"))]).body

    assert same_value(out, body)
