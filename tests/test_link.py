"""Link emulation (token bucket, latency, loss) and the size/rate parsers the CLI uses."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.aio import run
from transport.link import LinkProfile, LinkShaper, TokenBucket
from transport.messages import Backward, Forward, Ok, Ping
from transport.rpc import RpcClient, RpcServer, RpcTimeout
from transport.units import parse_rate, parse_size

# ---------------------------------------------------------------- token bucket (virtual clock)


def test_token_bucket_spaces_messages_by_their_transmission_time():
    bucket = TokenBucket(rate_bytes_per_s=1000.0, burst_bytes=0)

    waits = [bucket.reserve(500, now=0.0) for _ in range(3)]

    assert waits == pytest.approx([0.5, 1.0, 1.5])


def test_token_bucket_lets_an_idle_link_send_its_burst_at_once():
    bucket = TokenBucket(rate_bytes_per_s=1000.0, burst_bytes=2000)

    assert bucket.reserve(1500, now=10.0) == 0.0  # within the burst allowance
    assert bucket.reserve(1000, now=10.0) == pytest.approx(0.5)  # 2.5 kB sent by t=10.5
    assert bucket.reserve(100, now=100.0) == 0.0  # idle again: no wait


def test_token_bucket_long_run_rate_matches_the_bandwidth():
    bucket = TokenBucket(rate_bytes_per_s=125_000.0, burst_bytes=65_536)  # 1 Mbps
    now, sent = 0.0, 0
    for _ in range(1000):
        now += bucket.reserve(10_000, now)
        sent += 10_000

    assert sent / now == pytest.approx(125_000.0, rel=0.01)


def test_shaper_adds_latency_and_drops_with_the_seeded_loss_rate():
    shaper = LinkShaper(LinkProfile(bandwidth_mbps=8.0, latency_ms=20.0, loss=0.25, seed=3))  # 1 MB/s

    plans = [shaper.plan(1000, now=0.0) for _ in range(2000)]

    dropped = sum(p is None for p in plans)
    assert 0.2 < dropped / len(plans) < 0.3
    first_kept = next(p for p in plans if p is not None)
    assert first_kept >= 0.020  # latency is always added on top of the queueing


def test_shaper_with_the_same_seed_drops_the_same_messages():
    a = LinkShaper(LinkProfile(loss=0.5, seed=11))
    b = LinkShaper(LinkProfile(loss=0.5, seed=11))

    assert [a.plan(10, 0.0) is None for _ in range(50)] == [b.plan(10, 0.0) is None for _ in range(50)]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"bandwidth_mbps": 0}, "bandwidth_mbps"),
        ({"bandwidth_mbps": float("inf")}, "bandwidth_mbps"),
        ({"latency_ms": -1}, "latency_ms"),
        ({"loss": 1.0}, "loss"),
        ({"loss": -0.1}, "loss"),
        ({"burst_bytes": -1}, "burst_bytes"),
    ],
)
def test_link_profile_names_the_bad_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LinkProfile(**kwargs)


# ---------------------------------------------------------------- applied by the RPC client
# These check that the emulated delay is applied at all (a lower bound, never a speed target).
# The event loop may wake a sleeper a hair early, so the bounds allow one clock tick of slack.
CLOCK_SLACK_S = 0.005


def test_client_link_latency_delays_each_call_by_at_least_the_latency():
    async def main():
        async with RpcServer(handlers={"ping": lambda env: asyncio.sleep(0)}) as server:
            async with RpcClient("slow", link=LinkProfile(latency_ms=80.0)) as client:
                loop = asyncio.get_running_loop()
                start = loop.time()
                assert isinstance(await client.call(server.address, Ping()), Ok)
                return loop.time() - start

    assert run(main()) >= 0.08 - CLOCK_SLACK_S


def test_client_link_bandwidth_delays_a_large_message_by_its_transmission_time():
    async def echo(env):
        return Backward(step=env.body.step, grad=env.body.activations)

    async def main():
        request = Forward(step=1, activations=np.zeros(50_000, np.float32), attention_mask=np.zeros(1, np.int8))
        async with RpcServer(handlers={"forward": echo}) as server:
            async with RpcClient("narrow", link=LinkProfile(bandwidth_mbps=8.0, burst_bytes=0)) as client:  # 1 MB/s
                loop = asyncio.get_running_loop()
                start = loop.time()
                await client.call(server.address, request)
                return loop.time() - start

    assert run(main()) >= 0.2 - CLOCK_SLACK_S  # 200 kB at 1 MB/s


def test_lost_request_is_never_sent_and_the_caller_times_out():
    async def main():
        async with RpcServer(handlers={"ping": lambda env: asyncio.sleep(0)}) as server:
            async with RpcClient("lossy", link=LinkProfile(loss=0.999, seed=0)) as client:
                with pytest.raises(RpcTimeout):
                    await client.call(server.address, Ping(), timeout=0.2)
                assert client.stats["link_dropped"] == 1
            assert server.stats["requests"] == 0

    run(main())


def test_per_address_link_overrides_the_default_and_can_be_cleared():
    async def main():
        async with RpcServer(handlers={"ping": lambda env: asyncio.sleep(0)}) as server:
            async with RpcClient("c", link=LinkProfile(loss=0.999, seed=0)) as client:
                client.set_link(server.address, LinkProfile(latency_ms=1.0))
                assert isinstance(await client.call(server.address, Ping()), Ok)

                client.set_link(server.address, None)  # back to the lossy default
                with pytest.raises(RpcTimeout):
                    await client.call(server.address, Ping(), timeout=0.2)

    run(main())


def test_server_link_applies_to_replies():
    async def main():
        lossy = LinkProfile(loss=0.999, seed=0)
        async with RpcServer(handlers={"ping": lambda env: asyncio.sleep(0)}, link=lossy) as server:
            async with RpcClient("c") as client:
                with pytest.raises(RpcTimeout):
                    await client.call(server.address, Ping(), timeout=0.2)
            assert server.stats["requests"] == 1 and server.stats["link_dropped"] == 1

    run(main())


# ---------------------------------------------------------------- units


@pytest.mark.parametrize(
    "text, expected",
    [
        ("8GB", 8 * 10**9),
        ("512MB", 512 * 10**6),
        ("2GiB", 2 * 2**30),
        ("1.5KiB", 1536),
        ("4096", 4096),
        ("64 kB", 64_000),
        ("3tb", 3 * 10**12),
        ("100B", 100),
        ("0.5GiB", 2**29),
        ("1e3MB", 10**9),
        (1024, 1024),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text", ["", "GB", "8 XB", "-1GB", "0MB", "nanGB", "1..5GB", "8 GB extra", "0.1B", "1e300TB", None, 1.5, True]
)
def test_parse_size_refuses_with_a_clear_message(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("50Mbps", 50e6),
        ("1Gbps", 1e9),
        ("100kbps", 100e3),
        ("750bps", 750.0),
        ("10MB/s", 80e6),
        ("2.5 Gbps", 2.5e9),
        ("1MBps", 8e6),
        ("20Mbit/s", 20e6),
    ],
)
def test_parse_rate(text, expected):
    assert parse_rate(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["", "50", "50M", "fast", "0Mbps", "-5Mbps", "50Xbps", "50 Mbps/s", "1e300Tbps", None])
def test_parse_rate_refuses_with_a_clear_message(text):
    with pytest.raises(ValueError, match="rate"):
        parse_rate(text)
