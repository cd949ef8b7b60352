"""The relay (issue 13): control frames without sockets, then a real relay, agent and CURVE
RpcServer on 127.0.0.1: requests reach a node only through its slot, bytes are counted on
both ends, the relay cannot stand in for the node, and bad input closes one connection and
changes nothing else."""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest

from nodes.relay import RelayAgent, RelayRefused, RelayServer, read_frame
from scenarios.waiting import wait_until_async
from tests.aio import run
from transport.messages import Backward, Envelope, Forward, Ok, Ping
from transport.relay_wire import (
    MAX_FRAME_BYTES,
    RelayFrameError,
    decode_frame,
    encode_frame,
    frame_length,
    relay_dial_address,
    slot_ports,
)
from transport.rpc import RpcClient, RpcServer, RpcTimeout
from transport.security import Keypair

# --- frames, pure ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, value",
    [("hello", "node-7"), ("slot", "10.0.0.1:7101"), ("refused", "full"), ("open", 2**62), ("data", 0)]
    + [("ping", 12.5), ("pong", 3)],
)
def test_every_frame_kind_round_trips(kind, value):
    wire = encode_frame(kind, value)

    frame = decode_frame(wire[4:])

    assert frame_length(wire[:4]) == len(wire) - 4
    assert (frame.kind, frame.value) == (kind, value)


@pytest.mark.parametrize(
    "body, match",
    [
        (b"\xc1", "not msgpack"),
        (msgpack.packb([1, 2]), "map"),
        (msgpack.packb({"t": "shout", "x": 1}), "unknown frame kind"),
        (msgpack.packb({"t": "open", "conn": 1, "more": 2}), "exactly the keys"),
        (msgpack.packb({"t": "open"}), "exactly the keys"),
        (msgpack.packb({"t": "open", "conn": True}), "integer"),
        (msgpack.packb({"t": "open", "conn": -1}), "integer"),
        (msgpack.packb({"t": "data", "conn": "1"}), "integer"),
        (msgpack.packb({"t": "ping", "at": float("nan")}), "finite"),
        (msgpack.packb({"t": "hello", "node": "x" * 300}), "at most 256"),
        (msgpack.packb({"t": "slot", "address": 7}), "string"),
        (b"\x00" * (MAX_FRAME_BYTES + 1), "at most"),
    ],
)
def test_bad_frames_are_refused_with_a_reason(body, match):
    with pytest.raises(RelayFrameError, match=match):
        decode_frame(body)


def test_length_prefix_bounds():
    with pytest.raises(RelayFrameError, match="1..1024"):
        frame_length((MAX_FRAME_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(RelayFrameError, match="1..1024"):
        frame_length(b"\x00\x00\x00\x00")
    with pytest.raises(ValueError, match="unknown frame kind"):
        encode_frame("shout", 1)


def test_slot_ports_follow_the_control_port():
    assert slot_ports(7100, 3) == [7101, 7102, 7103]
    assert slot_ports(0, 2) == [0, 0]  # tests: any free port
    with pytest.raises(ValueError, match="runs past 65535"):
        slot_ports(65530, 8)
    with pytest.raises(ValueError, match="slots must be >= 1"):
        slot_ports(7100, 0)


def test_the_bootstraps_own_relay_is_dialled_on_the_bootstraps_host():
    assert relay_dial_address(":7100", "boot.example:5555") == "boot.example:7100"
    assert relay_dial_address(":7100", "tcp://10.0.0.1:5555") == "10.0.0.1:7100"
    assert relay_dial_address("10.0.0.3:7100", "boot.example:5555") == "10.0.0.3:7100"


# --- a real relay -----------------------------------------------------------------------------


async def echo_forward(env: Envelope) -> Backward:
    return Backward(step=env.body.step, grad=env.body.activations, loss=0.5)


async def noop(env: Envelope) -> None:
    return None


def forward(step: int, n: int = 4096) -> Forward:
    acts = np.arange(n, dtype=np.float32).reshape(1, 1, n)
    return Forward(step=step, activations=acts, attention_mask=np.ones((1, 1), dtype=np.int64))


def test_a_relayed_node_is_reached_through_its_slot_with_curve_end_to_end():
    async def main():
        node_keys, client_keys = Keypair.generate(), Keypair.generate()
        relay = await RelayServer.create("127.0.0.1", 0, slots=2)
        async with RpcServer(handlers={"forward": echo_forward, "ping": noop}, keypair=node_keys) as node:
            agent = await RelayAgent.create(relay.address, node.address, label="7")
            try:
                assert agent.address != node.address and agent.address.startswith("127.0.0.1:")
                async with RpcClient("peer", keypair=client_keys) as client:
                    client.set_server_key(agent.address, node_keys.public)

                    reply = await client.call(agent.address, forward(3), timeout=5)

                    np.testing.assert_array_equal(reply.grad, forward(3).activations)
                    payload = forward(3).activations.nbytes
                    # both directions crossed the relay, counted the same on both ends
                    await wait_until_async(lambda: relay.stats.to_node == agent.bytes_in, 5, what="counts agree")
                    assert agent.bytes_in > payload and agent.bytes_out > payload
                    assert relay.stats.from_node == agent.bytes_out
                    assert relay.stats.bytes_by_node["7"] == agent.bytes_in + agent.bytes_out
                    assert relay.stats.connections == 1 and relay.relayed == {"7": agent.address}
                await wait_until_async(lambda: agent.rtt_ms is not None, 5, what="a pong")
                assert agent.rtt_ms >= 0.0
            finally:
                await agent.stop()
                await relay.stop()

    run(main())


def test_the_relay_cannot_stand_in_for_the_node():
    """A client that expects another server key gets nothing through the slot: the handshake is
    the node's, end to end, and the relay holds no key that would complete it."""

    async def main():
        node_keys, impostor = Keypair.generate(), Keypair.generate()
        relay = await RelayServer.create("127.0.0.1", 0)
        async with RpcServer(handlers={"ping": noop}, keypair=node_keys) as node:
            agent = await RelayAgent.create(relay.address, node.address)
            try:
                async with RpcClient("peer", keypair=Keypair.generate()) as client:
                    client.set_server_key(agent.address, impostor.public)
                    with pytest.raises(RpcTimeout):
                        await client.call(agent.address, Ping(), timeout=0.5)
                assert node.stats["requests"] == 0
            finally:
                await agent.stop()
                await relay.stop()

    run(main())


def test_bad_input_closes_one_connection_and_the_relay_keeps_serving():
    async def main():
        relay = await RelayServer.create("127.0.0.1", 0, slots=1)
        async with RpcServer(handlers={"ping": noop}) as node:
            host, port = relay.address.rsplit(":", 1)
            for junk in (b"GET / HTTP/1.1\r\n\r\n", encode_frame("data", 12345), encode_frame("pong", 1.0)):
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(junk)
                assert await reader.read() == b""  # closed by the relay
                writer.close()
            assert relay.stats.bad == 3

            agent = await RelayAgent.create(relay.address, node.address)
            with pytest.raises(RelayRefused, match="slots are taken"):
                await RelayAgent.create(relay.address, node.address)
            async with RpcClient("peer") as client:
                assert isinstance(await client.call(agent.address, Ping(), timeout=5), Ok)
            await agent.stop()

            # the slot is free again once its agent is gone
            await wait_until_async(lambda: not relay.relayed, 5, what="slot freed")
            again = await RelayAgent.create(relay.address, node.address)
            await again.stop()
            await relay.stop()

    run(main())


def test_a_relayed_node_whose_server_is_gone_costs_the_peer_a_timeout_only():
    async def main():
        relay = await RelayServer.create("127.0.0.1", 0)
        agent = await RelayAgent.create(relay.address, "127.0.0.1:1")  # nothing listens there
        try:
            async with RpcClient("peer") as client:
                with pytest.raises(RpcTimeout):
                    await client.call(agent.address, Ping(), timeout=0.5)
            assert not agent.lost.is_set() and relay.relayed  # the slot stays
        finally:
            await agent.stop()
            await relay.stop()

    run(main())


def test_an_agent_learns_when_its_relay_dies():
    async def main():
        relay = await RelayServer.create("127.0.0.1", 0)
        agent = await RelayAgent.create(relay.address, "127.0.0.1:1")
        await relay.stop()
        await asyncio.wait_for(agent.lost.wait(), 5)
        await agent.stop()

    run(main())


def test_an_agent_refuses_a_port_that_is_no_relay():
    async def main():
        async def silent(reader, writer):
            await reader.read()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
        with pytest.raises(TimeoutError):
            await RelayAgent.create(address, "127.0.0.1:1")
        server.close()

    run(main(), timeout=20)


def test_read_frame_gives_up_on_a_silent_peer():
    async def main():
        reader = asyncio.StreamReader()
        with pytest.raises(TimeoutError):
            await read_frame(reader, 0.05)

    run(main())


# --- a node's use of relays -------------------------------------------------------------------


def _verdict(relays=()):
    """A heartbeat reply saying nobody can dial the node (the fields Relaying reads)."""
    from transport.messages import Beat

    return Beat(assignment_version=0, reachable=False, relays=list(relays))


def test_a_node_takes_a_slot_and_leaves_one_the_bootstrap_cannot_dial_either(monkeypatch):
    """The first relay tells slots on a host nobody reaches (127.0.0.2: its slots listen on
    127.0.0.1 only); once the verdict on that slot is in, the node leaves it, advertises its own
    address, and takes the next relay's slot, never the failed relay's again."""
    from nodes import relay as relay_mod
    from nodes.relay import Relaying

    monkeypatch.setattr(relay_mod, "VERDICT_S", 0.0)

    async def main():
        bad = await RelayServer.create("127.0.0.1", 0, advertise_host="127.0.0.2")
        good = await RelayServer.create("127.0.0.1", 0)
        bad_address = f"127.0.0.1:{bad.port}"  # its control port is dialable, its slots are not
        said: list[tuple[str, str]] = []
        use = Relaying("127.0.0.1:1", "10.9.9.9:7000", "127.0.0.1:5555", lambda a, v: said.append((a, v)))
        try:
            use.on_beat(_verdict([bad_address, good.address]))
            await wait_until_async(lambda: said, 5, what="a slot")
            assert said[-1][1] == bad_address and said[-1][0].startswith("127.0.0.2:")

            use.on_beat(_verdict([bad_address, good.address]))  # the verdict on the slot: no
            await wait_until_async(lambda: len(said) == 2, 5, what="the own address again")
            assert said[-1] == ("10.9.9.9:7000", "")
            await wait_until_async(lambda: use.agent is None and use._task is None, 5, what="idle")

            use.on_beat(_verdict([bad_address, good.address]))
            await wait_until_async(lambda: len(said) == 3, 5, what="the next relay's slot")
            assert said[-1] == (use.agent.address, good.address)
            assert use.to_json()["relays_used"] == 2

        finally:
            await use.stop()
            await bad.stop()
            await good.stop()

    run(main())


def test_a_reachable_node_never_looks_for_a_relay():
    from nodes.relay import Relaying
    from transport.messages import Beat

    async def main():
        said = []
        use = Relaying("127.0.0.1:1", "10.9.9.9:7000", "127.0.0.1:5555", lambda a, v: said.append(a))
        for reachable in (True, None):
            use.on_beat(Beat(assignment_version=0, reachable=reachable, relays=[":7100"]))
        assert use._task is None and use.to_json() is None

    run(main())


def test_a_silent_agent_loses_its_slot_and_a_silent_relay_is_left(monkeypatch):
    """A node that vanishes without closing (its NAT mapping gone, its power off) would hold its
    slot for as long as TCP keeps a dead connection; a relay that vanishes so would keep the
    agent waiting. Both sides give up after SILENCE_S without a frame."""
    from nodes import relay as relay_mod

    monkeypatch.setattr(relay_mod, "SILENCE_S", 0.3)

    async def main():
        relay = await RelayServer.create("127.0.0.1", 0, slots=1)
        host, port = relay.address.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(encode_frame("hello", "mute"))  # then nothing: no pings
        assert (await read_frame(reader, 5)).kind == "slot"
        assert relay.relayed
        await wait_until_async(lambda: not relay.relayed, 5, what="the slot freed")
        writer.close()

        async def mute_relay(r, w):  # answers the hello, then never a pong
            await read_frame(r, 5)
            w.write(encode_frame("slot", "127.0.0.1:9"))
            await r.read()

        fake = await asyncio.start_server(mute_relay, "127.0.0.1", 0)
        agent = await RelayAgent.create(f"127.0.0.1:{fake.sockets[0].getsockname()[1]}", "127.0.0.1:1")
        await asyncio.wait_for(agent.lost.wait(), 5)
        await agent.stop()
        fake.close()
        await relay.stop()

    run(main())


@pytest.mark.parametrize("slot", ["0.0.0.0:7101", "*:7101", "nonsense"])
def test_an_agent_refuses_a_slot_nobody_can_dial(slot):
    """Advertising a wildcard slot would get the node's rejoin refused (bad_address): the agent
    refuses it first, and the node tries the next relay."""

    async def main():
        async def bad_relay(r, w):
            await read_frame(r, 5)
            w.write(encode_frame("slot", slot))
            await r.read()

        fake = await asyncio.start_server(bad_relay, "127.0.0.1", 0)
        with pytest.raises(ValueError):  # RelayFrameError for a wildcard, parse_address's for nonsense
            await RelayAgent.create(f"127.0.0.1:{fake.sockets[0].getsockname()[1]}", "127.0.0.1:1")
        fake.close()

    run(main())
