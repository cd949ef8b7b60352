"""RPC over real ZeroMQ sockets on 127.0.0.1: calls, deadlines, duplicates, bad input, bounds."""

from __future__ import annotations

import asyncio
import contextlib

import msgpack
import numpy as np
import pytest
import zmq
import zmq.asyncio

from scenarios.waiting import wait_until_async
from tests.aio import run
from transport.codec import decode, encode
from transport.messages import Assignment, Backward, Envelope, Error, Forward, Leave, Ok, Ping
from transport.rpc import (
    RpcClient,
    RpcClientConfig,
    RpcError,
    RpcServer,
    RpcServerConfig,
    RpcTimeout,
    install_uvloop,
    tcp_endpoint,
)


async def echo_forward(env: Envelope) -> Backward:
    return Backward(step=env.body.step, grad=env.body.activations, loss=0.25)


async def noop(env: Envelope) -> None:
    return None


@contextlib.asynccontextmanager
async def raw_dealer(address: str):
    """A bare DEALER that plays a misbehaving peer."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(tcp_endpoint(address))
    try:
        yield sock
    finally:
        sock.close(linger=0)


async def recv_reply(sock) -> Envelope:
    return decode(await asyncio.wait_for(sock.recv_multipart(copy=False), 5.0))


def forward_request(step: int = 1, nbytes: int = 4096) -> Forward:
    activations = np.arange(nbytes // 4, dtype=np.float32).reshape(1, -1, 4)
    return Forward(step=step, activations=activations, attention_mask=np.ones((1, activations.shape[1]), np.int64))


# ---------------------------------------------------------------- happy paths


def test_call_round_trips_tensors_and_ids():
    async def main():
        async with RpcServer(handlers={"forward": echo_forward}) as server, RpcClient("owner-1") as client:
            request = forward_request(step=9)

            reply = await client.call(server.address, request, timeout=5.0, expect=Backward)

            assert reply.step == 9 and reply.loss == 0.25
            assert np.array_equal(reply.grad, request.activations)
            assert server.stats["requests"] == server.stats["replies"] == 1

    run(main())


def test_both_ends_count_the_encoded_bytes_of_each_message_type_they_send_and_receive():
    async def main():
        async with RpcServer(handlers={"forward": echo_forward}) as server, RpcClient("owner-1") as client:
            request = forward_request(step=3)

            await client.call(server.address, request, timeout=5.0, expect=Backward)
            await wait_until_async(lambda: server.stats["replies"] == 1, timeout=5.0)

            request_bytes = sum(memoryview(f).nbytes for f in encode(Envelope.of(request, 1, "owner-1")))
            assert client.bytes_sent["forward"] == server.bytes_received["forward"] >= 4096
            assert abs(client.bytes_sent["forward"] - request_bytes) <= 16  # the id's width may differ
            assert client.bytes_received["backward"] == server.bytes_sent["backward"] >= 4096
            assert set(client.bytes_sent) == {"forward"} and set(server.bytes_sent) == {"backward"}

    run(main())


def test_handler_returning_none_answers_ok_and_server_reports_its_address():
    async def main():
        async with RpcServer(port="random", handlers={"ping": noop}) as server, RpcClient("a") as client:
            assert server.address == f"127.0.0.1:{server.port}" and server.port > 0

            assert isinstance(await client.call(server.address, Ping()), Ok)

    run(main())


def test_many_concurrent_calls_each_get_their_own_reply():
    async def main():
        async with RpcServer(handlers={"forward": echo_forward}) as server, RpcClient("a") as client:
            replies = await asyncio.gather(*(client.call(server.address, forward_request(step=i)) for i in range(50)))

            assert [r.step for r in replies] == list(range(50))

    run(main())


# ---------------------------------------------------------------- deadlines and duplicates


def test_deadline_expiry_raises_rpc_timeout_and_the_late_reply_is_dropped_and_counted():
    async def slow(env):
        await asyncio.sleep(0.5)

    async def main():
        async with RpcServer(handlers={"ping": slow}) as server, RpcClient("a") as client:
            with pytest.raises(RpcTimeout):
                await client.call(server.address, Ping(), timeout=0.1)

            await wait_until_async(lambda: client.stats["late_replies"] == 1, 5)

    run(main())


def test_call_to_an_address_nobody_listens_on_times_out():
    async def main():
        probe = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        port = probe.bind_to_random_port("tcp://127.0.0.1")
        probe.close(linger=0)  # the port is now free and nobody answers there
        async with RpcClient("a") as client:
            with pytest.raises(RpcTimeout):
                await client.call(f"127.0.0.1:{port}", Ping(), timeout=0.2, retries=1)
            assert client.stats["retries"] == 1

    run(main())


def test_a_socket_that_cannot_be_opened_is_an_rpc_error_not_a_zmq_one():
    """Out of sockets (the context's limit; b2's 32 gossiping nodes in one process hit 1,023),
    a call fails like any other, so the callers' RpcError handling covers it."""

    async def main():
        context = zmq.Context()
        context.set(zmq.MAX_SOCKETS, 1)  # before its first socket, so it holds
        try:
            async with RpcClient("a", context=context) as client:
                with pytest.raises(RpcTimeout):  # the one socket it may open: nobody listens there
                    await client.call("127.0.0.1:9", Ping(), timeout=0.1)
                with pytest.raises(RpcError) as exc:
                    await client.call("127.0.0.1:10", Ping(), timeout=0.1)
                assert exc.value.code == "no_socket" and client.stats["no_socket"] == 1
        finally:
            context.term()

    run(main())


def test_retries_reuse_the_id_so_a_slow_request_is_served_once():
    calls = []

    async def slow(env):
        calls.append(env.id)
        await asyncio.sleep(0.4)
        return Backward(step=env.body.step, grad=env.body.activations)

    async def main():
        async with RpcServer(handlers={"forward": slow}) as server, RpcClient("a") as client:
            reply = await client.call(server.address, forward_request(step=3), timeout=0.15, retries=5)

            assert reply.step == 3
            assert len(calls) == 1
            assert server.stats["duplicates"] >= 1 and client.stats["retries"] >= 1

    run(main())


def test_duplicate_after_completion_replays_the_remembered_reply():
    calls = []

    async def count(env):
        calls.append(env.id)
        return Error(code="custom", message=str(len(calls)))

    async def main():
        async with RpcServer(handlers={"leave": count}) as server, raw_dealer(server.address) as sock:
            frames = encode(Envelope.of(Leave(node_id=4), 77, "dup"))

            await sock.send_multipart(frames)
            first = await recv_reply(sock)
            await sock.send_multipart(frames)
            second = await recv_reply(sock)

            assert calls == [77]
            assert first.id == second.id == 77 and first.body.message == second.body.message == "1"
            assert server.stats["duplicates"] == 1

    run(main())


def test_duplicate_of_a_request_whose_reply_was_too_big_to_keep_is_refused_not_rerun():
    calls = []

    async def big(env):
        calls.append(env.id)
        return Backward(step=env.body.step, grad=env.body.activations)

    async def main():
        config = RpcServerConfig(dedup_replay_max=1000)
        async with RpcServer(handlers={"forward": big}, config=config) as server, raw_dealer(server.address) as sock:
            frames = encode(Envelope.of(forward_request(step=2, nbytes=4096), 78, "dup"))

            await sock.send_multipart(frames)
            first = await recv_reply(sock)
            await sock.send_multipart(frames)
            second = await recv_reply(sock)

            assert calls == [78]
            assert isinstance(first.body, Backward) and first.id == 78
            assert (second.id, second.body.code) == (78, "duplicate")

    run(main())


def test_same_id_from_another_sender_is_not_a_duplicate():
    calls = []

    async def count(env):
        calls.append(env.src)

    async def main():
        async with RpcServer(handlers={"leave": count}) as server, raw_dealer(server.address) as sock:
            for src in ("x", "y"):
                await sock.send_multipart(encode(Envelope.of(Leave(node_id=1), 5, src)))
                assert isinstance((await recv_reply(sock)).body, Ok)
            assert calls == ["x", "y"]

    run(main())


# ---------------------------------------------------------------- bad input never stops the server


def test_malformed_frames_get_error_replies_and_the_server_keeps_serving():
    async def main():
        async with RpcServer(handlers={"forward": echo_forward}) as server, RpcClient("good") as client:
            async with raw_dealer(server.address) as sock:
                await sock.send_multipart([b"\xc1garbage"])
                assert (await recv_reply(sock)).body.code == "bad_header"

                good = encode(Envelope.of(forward_request(), 12, "evil"))
                await sock.send_multipart([good[0], bytes(good[1])[:-1], good[2]])  # lying size
                reply = await recv_reply(sock)
                assert (reply.id, reply.body.code) == (12, "size_mismatch")

                await sock.send_multipart([*good, b"extra"])  # extra frame
                assert (await recv_reply(sock)).body.code == "bad_frame_index"

                header = msgpack.unpackb(good[0], raw=False)
                header["body"]["step"] = "one"
                await sock.send_multipart([msgpack.packb(header, use_bin_type=True), *good[1:]])
                assert (await recv_reply(sock)).body.code == "bad_schema"

            reply = await client.call(server.address, forward_request(step=5))
            assert reply.step == 5
            assert server.stats["bad_header"] == server.stats["size_mismatch"] == server.stats["bad_schema"] == 1

    run(main())


def test_unknown_type_and_missing_handler_are_answered_with_errors():
    async def main():
        async with RpcServer(handlers={}) as server, raw_dealer(server.address) as sock:
            header = {"v": 1, "type": "teleport", "id": 31, "src": "x", "body": {}}
            await sock.send_multipart([msgpack.packb(header)])
            reply = await recv_reply(sock)
            assert (reply.id, reply.body.code) == (31, "unknown_type")

            async with RpcClient("a") as client:
                with pytest.raises(RpcError) as info:
                    await client.call(server.address, Ping())
            assert info.value.code == "no_handler"
            assert server.stats["unknown_type"] == server.stats["no_handler"] == 1

    run(main())


def test_handler_exception_becomes_an_error_reply_and_the_server_keeps_serving():
    async def broken(env):
        raise ZeroDivisionError("boom")

    async def main():
        async with RpcServer(handlers={"leave": broken, "ping": noop}) as server, RpcClient("a") as client:
            with pytest.raises(RpcError) as info:
                await client.call(server.address, Leave(node_id=1))
            assert info.value.code == "handler_error" and "boom" in info.value.message

            assert isinstance(await client.call(server.address, Ping()), Ok)
            assert server.stats["handler_error"] == 1

    run(main())


def test_handler_can_answer_a_typed_error_code():
    async def refuse(env):
        raise RpcError("unknown_node", f"node {env.body.node_id} is not registered")

    async def main():
        async with RpcServer(handlers={"leave": refuse}) as server, RpcClient("a") as client:
            with pytest.raises(RpcError) as info:
                await client.call(server.address, Leave(node_id=8))
            assert (info.value.code, info.value.message) == ("unknown_node", "node 8 is not registered")

    run(main())


def test_handler_returning_a_non_message_is_a_handler_error():
    async def wrong(env):
        return {"not": "a message"}

    async def main():
        async with RpcServer(handlers={"ping": wrong}) as server, RpcClient("a") as client:
            with pytest.raises(RpcError, match="handler_error"):
                await client.call(server.address, Ping())

    run(main())


def test_oversized_total_is_rejected_with_too_large_and_the_server_keeps_serving():
    async def main():
        config = RpcServerConfig(max_bytes=64 * 1024)
        async with RpcServer(handlers={"forward": echo_forward}, config=config) as server, RpcClient("a") as client:
            big = Forward(
                step=1,
                activations=np.zeros((1, 10_000), np.float32),  # 40 kB
                attention_mask=np.zeros((1, 10_000), np.float32),  # + 40 kB
                labels=None,
            )
            with pytest.raises(RpcError) as info:
                await client.call(server.address, big)
            assert info.value.code == "too_large"

            assert (await client.call(server.address, forward_request(step=2))).step == 2

    run(main())


def test_oversized_frame_is_cut_off_by_the_socket_and_the_server_keeps_serving():
    async def main():
        config = RpcServerConfig(max_bytes=64 * 1024)
        async with RpcServer(handlers={"forward": echo_forward}, config=config) as server:
            async with RpcClient("big") as client:
                with pytest.raises(RpcTimeout):  # ZeroMQ drops the connection (MAXMSGSIZE)
                    await client.call(server.address, forward_request(nbytes=1 << 20), timeout=0.5)
            assert server.stats["requests"] == 0  # it never reached the decoder
            async with RpcClient("small") as client:
                assert (await client.call(server.address, forward_request(step=4))).step == 4

    run(main())


def test_expect_rejects_an_unexpected_reply_type():
    async def main():
        async with RpcServer(handlers={"ping": noop}) as server, RpcClient("a") as client:
            with pytest.raises(RpcError) as info:
                await client.call(server.address, Ping(), expect=Assignment)
            assert info.value.code == "bad_reply"

    run(main())


# ---------------------------------------------------------------- a misbehaving server


def test_client_survives_garbage_replies_and_fails_the_call_when_it_can_tell_which():
    async def main():
        router = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        port = router.bind_to_random_port("tcp://127.0.0.1")
        address = f"127.0.0.1:{port}"

        async def answer_badly():
            identity, header = await router.recv_multipart()
            await router.send_multipart([identity, b"\xc1junk"])  # unattributable
            identity, header = await router.recv_multipart()
            msg_id = msgpack.unpackb(header)["id"]
            bad = {"v": 1, "type": "backward", "id": msg_id, "src": "s", "body": {"step": "x"}}
            await router.send_multipart([identity, msgpack.packb(bad)])  # attributable

        try:
            async with RpcClient("a") as client:
                server = asyncio.create_task(answer_badly())
                with pytest.raises(RpcTimeout):
                    await client.call(address, Ping(), timeout=0.3)
                with pytest.raises(RpcError) as info:
                    await client.call(address, Ping(), timeout=5.0)
                assert info.value.code == "bad_reply"
                assert client.stats["bad_reply"] == 2
                await server
        finally:
            router.close(linger=0)

    run(main())


# ---------------------------------------------------------------- bounds


class OverlapMeter:
    """A handler that holds each request 50 ms and records the most handled at once (`peak`)."""

    def __init__(self) -> None:
        self.active = self.peak = 0

    async def __call__(self, env) -> None:
        self.active += 1
        self.peak = max(self.peak, self.active)
        await asyncio.sleep(0.05)
        self.active -= 1


def test_inflight_bytes_per_peer_are_bounded():
    track = OverlapMeter()

    async def main():
        limit = RpcClientConfig(inflight_bytes=int(1.5 * (1 << 20)))
        async with RpcServer(handlers={"forward": track}) as server, RpcClient("a", config=limit) as client:
            await asyncio.gather(*(client.call(server.address, forward_request(i, nbytes=1 << 20)) for i in range(4)))
        assert track.peak == 1

        async with RpcServer(handlers={"forward": track}) as server, RpcClient("b") as client:
            await asyncio.gather(*(client.call(server.address, forward_request(i, nbytes=1 << 20)) for i in range(4)))
        assert track.peak > 1  # without the bound the same calls overlap

    run(main())


def test_a_call_that_times_out_waiting_for_inflight_budget_leaks_none_of_it():
    release = asyncio.Event()

    async def hold(env):
        if env.body.step == 0:
            await release.wait()
        return Backward(step=env.body.step, grad=env.body.activations)

    async def main():
        limit = RpcClientConfig(inflight_bytes=1 << 20)
        async with RpcServer(handlers={"forward": hold}) as server, RpcClient("a", config=limit) as client:
            first = asyncio.create_task(client.call(server.address, forward_request(0, nbytes=900_000), timeout=10))
            await wait_until_async(lambda: server.stats["requests"] == 1, 5)
            with pytest.raises(RpcTimeout):  # waits for budget behind `first`, gives up
                await client.call(server.address, forward_request(1, nbytes=900_000), timeout=0.1)

            release.set()
            assert (await first).step == 0
            assert (await client.call(server.address, forward_request(2, nbytes=900_000), timeout=2)).step == 2
            assert server.stats["requests"] == 2  # the timed-out call never went out

    run(main())


def test_calls_queue_behind_full_zeromq_queues_and_all_complete_once_the_server_drains():
    gate = asyncio.Event()

    async def blocked(env):
        await gate.wait()
        return Backward(step=env.body.step, grad=env.body.activations[:, :1])

    async def main():
        tight_server = RpcServerConfig(hwm=1, max_concurrency=1)  # stops reading after one request
        async with (
            RpcServer(handlers={"forward": blocked}, config=tight_server) as server,
            RpcClient("a", config=RpcClientConfig(hwm=1)) as client,
        ):
            activations = np.zeros((1, 1 << 20), np.float32)  # 4 MiB each: ZeroMQ and TCP fill up
            calls = [
                asyncio.create_task(
                    client.call(
                        server.address,
                        Forward(step=i, activations=activations, attention_mask=np.ones((1, 1), np.int8)),
                        timeout=20,
                    )
                )
                for i in range(16)
            ]
            await wait_until_async(lambda: server.stats["requests"] == 1, 5)

            gate.set()
            replies = await asyncio.gather(*calls)

            assert sorted(r.step for r in replies) == list(range(16))
            assert server.stats["requests"] == 16

    run(main())


def test_server_runs_at_most_max_concurrency_handlers():
    track = OverlapMeter()

    async def main():
        config = RpcServerConfig(max_concurrency=2)
        async with RpcServer(handlers={"ping": track}, config=config) as server, RpcClient("a") as client:
            await asyncio.gather(*(client.call(server.address, Ping()) for _ in range(8)))
        assert track.peak == 2

    run(main())


# ---------------------------------------------------------------- lifecycle


def test_stop_is_idempotent_and_fails_waiting_calls():
    async def never(env):
        await asyncio.sleep(30)

    async def main():
        server = await RpcServer.create(handlers={"ping": never})
        client = await RpcClient.create("a")
        waiting = asyncio.create_task(client.call(server.address, Ping(), timeout=10))
        await wait_until_async(lambda: server.stats["requests"] == 1, 5)

        await client.stop()
        await client.stop()
        await server.stop()
        await server.stop()

        with pytest.raises(RpcError) as info:
            await waiting
        assert info.value.code == "stopped"
        with pytest.raises(RpcError, match="stopped"):
            await client.call(server.address, Ping())

    run(main())


def test_forget_closes_one_peer_and_fails_its_waiting_calls():
    async def never(env):
        await asyncio.sleep(30)

    async def main():
        async with RpcServer(handlers={"ping": never, "leave": noop}) as server, RpcClient("a") as client:
            waiting = asyncio.create_task(client.call(server.address, Ping(), timeout=10))
            await wait_until_async(lambda: server.stats["requests"] == 1, 5)

            await client.forget(server.address)

            with pytest.raises(RpcError, match="disconnected"):
                await waiting
            assert isinstance(await client.call(server.address, Leave(node_id=1)), Ok)  # reconnects lazily

    run(main())


def test_bad_addresses_and_configs_are_refused_with_the_field_named():
    for bad in ("localhost", "host:0", "host:70000", ":5555", "tcp://h:x", 5555):
        with pytest.raises(ValueError, match="address"):
            tcp_endpoint(bad)
    with pytest.raises(ValueError, match="max_concurrency"):
        RpcServerConfig(max_concurrency=0)
    with pytest.raises(ValueError, match="inflight_bytes"):
        RpcClientConfig(inflight_bytes=0)


def test_install_uvloop_runs_the_rpc_on_uvloop():
    async def main():
        loop_type = type(asyncio.get_running_loop()).__module__
        async with RpcServer(handlers={"ping": noop}) as server, RpcClient("a") as client:
            assert isinstance(await client.call(server.address, Ping()), Ok)
        return loop_type

    try:
        assert install_uvloop() is True
        assert run(main()).startswith("uvloop")
    finally:
        asyncio.set_event_loop_policy(None)


# ---------------------------------------------------------------- CurveZMQ (optional security)

from transport.security import (  # noqa: E402
    AllowList,
    Keypair,
    create_keypair,
    load_keypair,
    load_or_create_keypair,
    load_public_keys,
)


def test_keypair_files_round_trip_and_the_secret_file_is_private(tmp_path):
    made = create_keypair(tmp_path / "keys", "node-1")

    loaded = load_keypair(tmp_path / "keys", "node-1")

    assert (loaded.public, loaded.secret) == (made.public, made.secret)
    assert load_or_create_keypair(tmp_path / "keys", "node-1").public == made.public
    assert (tmp_path / "keys" / "node-1.key_secret").stat().st_mode & 0o077 == 0
    assert load_public_keys(tmp_path / "keys") == {made.public}
    assert made.secret.decode() not in repr(made)


def test_missing_or_bad_key_material_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no secret key file"):
        load_keypair(tmp_path, "ghost")
    with pytest.raises(ValueError, match="Z85"):
        Keypair(b"x" * 40, b"y" * 39)
    with pytest.raises(ValueError, match="allow-list directory"):
        load_public_keys(tmp_path / "absent")


def test_curve_server_admits_only_allowed_keys():
    async def main():
        server_keys, good, bad = Keypair.generate(), Keypair.generate(), Keypair.generate()
        allow = AllowList({good.public})
        async with RpcServer(handlers={"ping": noop}, keypair=server_keys, allow=allow) as server:
            async with RpcClient("good", keypair=good) as client:
                client.set_server_key(server.address, server_keys.public)
                assert isinstance(await client.call(server.address, Ping()), Ok)

            async with RpcClient("bad", keypair=bad) as client:
                client.set_server_key(server.address, server_keys.public)
                with pytest.raises(RpcTimeout):
                    await client.call(server.address, Ping(), timeout=0.3)

            async with RpcClient("plain") as client:  # no CURVE at all
                with pytest.raises(RpcTimeout):
                    await client.call(server.address, Ping(), timeout=0.3)

            assert server.stats["requests"] == 1  # only the allowed client got through

            allow.add(bad.public)  # e.g. the bootstrap admitted a new node
            async with RpcClient("bad-now-allowed", keypair=bad) as client:
                client.set_server_key(server.address, server_keys.public)
                assert isinstance(await client.call(server.address, Ping()), Ok)

    run(main())


def test_two_secured_servers_in_one_process_keep_their_own_allow_lists():
    async def main():
        a_keys, b_keys, client_keys = Keypair.generate(), Keypair.generate(), Keypair.generate()
        async with (
            RpcServer(handlers={"ping": noop}, keypair=a_keys, allow=AllowList({client_keys.public})) as a,
            RpcServer(handlers={"ping": noop}, keypair=b_keys, allow=AllowList()) as b,
            RpcClient("c", keypair=client_keys) as client,
        ):
            client.set_server_key(a.address, a_keys.public)
            client.set_server_key(b.address, b_keys.public)

            assert isinstance(await client.call(a.address, Ping()), Ok)
            with pytest.raises(RpcTimeout):
                await client.call(b.address, Ping(), timeout=0.3)

    run(main())


def test_curve_client_needs_the_server_key_first():
    async def main():
        async with RpcClient("c", keypair=Keypair.generate()) as client:
            with pytest.raises(RpcError) as info:
                await client.call("127.0.0.1:5999", Ping(), timeout=0.2)
            assert info.value.code == "no_server_key"

    run(main())
