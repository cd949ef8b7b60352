"""RPC server fairness over real sockets: a client that never reads, rate and concurrency
limits per client, and rate-limited logs of refused messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
import pytest
import zmq
import zmq.asyncio

from scenarios.waiting import wait_until_async
from tests.aio import run
from transport.codec import decode, encode
from transport.messages import Backward, Envelope, Leave, Ping
from transport.rpc import RpcClient, RpcError, RpcServer, RpcServerConfig, tcp_endpoint

pytestmark = pytest.mark.serial  # deadlines under load: run alone (Makefile), not beside other tests

BIG_REPLY = Backward(step=0, grad=np.zeros((1, 64, 1024), np.float32))  # 256 KiB


async def big(env: Envelope) -> Backward:
    return BIG_REPLY


async def noop(env: Envelope) -> None:
    return None


@contextlib.asynccontextmanager
async def dealer(address: str, deaf: bool = False):
    """A bare DEALER; `deaf`: one that will never read a reply, with small receive buffers so
    the server's pipe to it fills quickly."""
    sock = zmq.asyncio.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if deaf:
        sock.setsockopt(zmq.RCVHWM, 1)
        sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(tcp_endpoint(address))
    try:
        yield sock
    finally:
        sock.close(linger=0)


async def flood(sock, n: int, body=None) -> None:
    for i in range(n):
        await sock.send_multipart(encode(Envelope.of(body or Ping(), i + 1, "deaf")))


def test_a_client_that_never_reads_delays_no_other_client():
    async def main():
        config = RpcServerConfig(hwm=8, client_queue_bytes=4 << 20, send_timeout_s=30.0)
        handlers = {"ping": big, "leave": noop}
        async with RpcServer(handlers=handlers, config=config) as server, RpcClient("honest") as client:
            async with dealer(server.address, deaf=True) as deaf:
                await flood(deaf, 1200)
                await wait_until_async(lambda: server.stats["requests"] >= 1200, 20)
                await wait_until_async(lambda: server.stats["reply_dropped"] > 0, 20)

                replies = [await client.call(server.address, Leave(node_id=1), timeout=5.0) for _ in range(50)]

                assert all(type(r).TYPE == "ok" for r in replies)
                assert server.stats["replies"] >= 50

    run(main())


def test_a_client_whose_replies_do_not_move_for_send_timeout_loses_them_all():
    async def main():
        config = RpcServerConfig(hwm=8, client_queue_bytes=4 << 20, send_timeout_s=0.3)
        async with RpcServer(handlers={"ping": big}, config=config) as server:
            async with dealer(server.address, deaf=True) as deaf:
                await flood(deaf, 300)
                await wait_until_async(lambda: server.stats["clients_dropped"] >= 1, 20)

                assert server.stats["send_timeout"] >= 1

    run(main())


def test_a_client_over_its_rate_is_answered_rate_limited_and_no_handler_runs():
    calls = []

    async def counted(env):
        calls.append(env.src)

    async def main():
        config = RpcServerConfig(client_rate=0.01, client_burst=3)
        async with (
            RpcServer(handlers={"ping": counted}, config=config) as server,
            RpcClient("eager") as eager,
            RpcClient("calm") as calm,
        ):
            for _ in range(3):
                await eager.call(server.address, Ping(), timeout=5.0)
            try:
                await eager.call(server.address, Ping(), timeout=5.0)
                code = None
            except RpcError as exc:
                code = exc.code
            await calm.call(server.address, Ping(), timeout=5.0)  # its own budget

            assert code == "rate_limited"
            assert calls == ["eager"] * 3 + ["calm"]
            assert server.stats["rate_limited"] == 1

    run(main())


def test_one_client_runs_at_most_client_concurrency_handlers_and_leaves_slots_to_others():
    gate = asyncio.Event()
    running: dict[str, int] = {}
    peak: dict[str, int] = {}

    async def held(env):
        running[env.src] = running.get(env.src, 0) + 1
        peak[env.src] = max(peak.get(env.src, 0), running[env.src])
        await gate.wait()
        running[env.src] -= 1

    async def main():
        config = RpcServerConfig(max_concurrency=8, client_concurrency=2, client_queue=3)
        async with (
            RpcServer(handlers={"ping": held}, config=config) as server,
            RpcClient("greedy") as greedy,
            RpcClient("other") as other,
        ):
            calls = [asyncio.ensure_future(greedy.call(server.address, Ping(), timeout=10.0)) for _ in range(6)]
            await wait_until_async(lambda: server.stats["rate_limited"] == 1, 5)  # 2 run, 3 wait, 1 refused
            late = asyncio.ensure_future(other.call(server.address, Ping(), timeout=10.0))
            await wait_until_async(lambda: running.get("other") == 1, 5)  # a free slot, not behind greedy
            gate.set()
            results = await asyncio.gather(*calls, late, return_exceptions=True)

            refused = [r for r in results if isinstance(r, RpcError)]
            assert [r.code for r in refused] == ["rate_limited"]
            assert peak == {"greedy": 2, "other": 1}

    run(main())


def test_refused_messages_are_logged_a_few_lines_per_code_then_summed(caplog):
    async def main():
        config = RpcServerConfig(log_lines=2, log_interval_s=60.0)
        async with RpcServer(handlers={}, config=config) as server:
            async with dealer(server.address, deaf=True) as sock:
                for _ in range(20):
                    await sock.send_multipart([b"\xc1garbage"])
                await wait_until_async(lambda: server.stats["bad_header"] == 20, 5)

    with caplog.at_level(logging.INFO, logger="transport.rpc"):
        run(main())

    lines = [r.getMessage() for r in caplog.records]
    assert sum("answering error bad_header" in line for line in lines) == 2
    assert any("18 more 'bad_header' lines not logged" in line for line in lines)


def test_a_rate_limited_reply_carries_the_request_id():
    async def main():
        config = RpcServerConfig(client_rate=0.01, client_burst=1)
        async with RpcServer(handlers={"ping": noop}, config=config) as server, dealer(server.address) as sock:
            await sock.send_multipart(encode(Envelope.of(Ping(), 7, "x")))
            await sock.send_multipart(encode(Envelope.of(Ping(), 8, "x")))
            replies = [decode(await asyncio.wait_for(sock.recv_multipart(), 5)) for _ in range(2)]

            by_id = {reply.id: reply.body for reply in replies}
            assert type(by_id[7]).TYPE == "ok"
            assert by_id[8].code == "rate_limited"

    run(main())
