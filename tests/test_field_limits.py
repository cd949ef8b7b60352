"""Field lengths on the wire are bounded: an oversized field is refused (bad_schema) where the
message is built, and off the wire before any handler runs."""

from __future__ import annotations

from typing import Annotated, Any

import msgpack
import pytest
import zmq
import zmq.asyncio

from tests.aio import run
from transport.codec import DecodeError, decode, encode
from transport.messages import (
    ADDRESS_MAX_LEN,
    REASON_MAX_LEN,
    Envelope,
    Join,
    Leave,
    PeerList,
    PublicKey,
    Report,
)
from transport.rpc import RpcServer, tcp_endpoint
from transport.schema import ANY_MAX_ITEMS, STR_MAX_LEN, Length, SchemaError, node_for

JOIN = dict(memory_bytes=1 << 30, bandwidth_bps=10**8, compute_score=1.0, address="127.0.0.1:7001")


def check(annotation: object, value: object) -> object:
    return node_for(annotation, "f").check(value, "f")


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (str, "x" * (STR_MAX_LEN + 1)),
        (Annotated[str, Length(hi=3)], "abcd"),
        (Annotated[str, Length(2, 3)], "a"),
        (PublicKey, "k" * 39),
        (PublicKey, "k" * 41),
        (Annotated[bytes, Length(hi=2)], b"abc"),
        (Annotated[list[int], Length(hi=2)], [1, 2, 3]),
        (Annotated[dict[str, int], Length(hi=1)], {"a": 1, "b": 2}),
        (dict[str, int], {"k" * (STR_MAX_LEN + 1): 1}),
        (Any, {"row": "x" * (STR_MAX_LEN + 1)}),
        (Any, {"k" * (STR_MAX_LEN + 1): 1}),
        (Any, list(range(ANY_MAX_ITEMS + 1))),
        (str | None, "x" * (STR_MAX_LEN + 1)),
    ],
    ids=[
        "str-default",
        "str-max",
        "str-min",
        "key-short",
        "key-long",
        "bytes",
        "list",
        "dict",
        "dict-key",
        "any-str",
        "any-key",
        "any-list",
        "optional",
    ],
)
def test_an_oversized_value_is_refused_with_the_field_named(annotation, value):
    with pytest.raises(SchemaError, match="^bad_schema: f") as caught:
        check(annotation, value)
    assert caught.value.code == "bad_schema"


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (str, "x" * STR_MAX_LEN),
        (PublicKey, "k" * 40),
        (PublicKey, ""),
        (Annotated[list[int], Length(hi=2)], [1, 2]),
        (Any, {"row": "x" * STR_MAX_LEN}),
    ],
)
def test_a_value_within_its_length_passes(annotation, value):
    assert check(annotation, value) == value


def test_length_bounds_must_be_ordered():
    with pytest.raises(ValueError, match="Length"):
        Length(3, 2)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: Join(**{**JOIN, "address": "h" * ADDRESS_MAX_LEN + ":1"}), "join.address"),
        (lambda: Join(**{**JOIN, "model": "m" * (STR_MAX_LEN + 1)}), "join.model"),
        (lambda: Leave(node_id=1, reason="r" * (REASON_MAX_LEN + 1)), "leave.reason"),
        (lambda: Report(node_id=1, metrics={f"k{i}": i for i in range(65)}), "report.metrics"),
    ],
)
def test_control_messages_bound_their_text_and_maps(make, field):
    with pytest.raises(SchemaError, match=field):
        make()


def oversized_join_header(msg_id: int) -> bytes:
    """A join whose model name is a megabyte (built by hand: the class refuses it)."""
    body = {**Join(**JOIN).to_dict(), "model": "k" * (1 << 20)}
    return msgpack.packb({"v": 1, "type": "join", "id": msg_id, "src": "big", "body": body}, use_bin_type=True)


def test_decode_refuses_an_oversized_field():
    with pytest.raises(DecodeError) as caught:
        decode([oversized_join_header(5)])
    assert (caught.value.code, caught.value.msg_id) == ("bad_schema", 5)


def test_an_oversized_field_never_reaches_the_handler():
    joined = []

    async def join(env):
        joined.append(env)

    async def main():
        async with RpcServer(handlers={"join": join}) as server:
            sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(tcp_endpoint(server.address))
            try:
                await sock.send_multipart([oversized_join_header(9)])
                reply = decode(await sock.recv_multipart())
                await sock.send_multipart(encode(Envelope.of(Join(**JOIN), 10, "small")))
                fine = decode(await sock.recv_multipart())
            finally:
                sock.close(linger=0)
        return reply, fine

    reply, fine = run(main())

    assert (reply.id, reply.body.code) == (9, "bad_schema")
    assert "join.model" in reply.body.message
    assert fine.id == 10 and fine.type == "ok"
    assert [env.id for env in joined] == [10]


def test_a_full_page_of_peer_rows_fits_a_peer_list():
    row = {"id": 1, "address": "h" * 253 + ":65535", "reason": "r" * 1000, "ranks": {f"m{i}": 8 for i in range(200)}}
    page = PeerList(rows=[dict(row, id=i) for i in range(1000)], total=1000)

    assert len(decode(encode(Envelope.of(page, 1, "b"))).body.rows) == 1000
