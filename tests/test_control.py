"""A node's control plane: backoff, identity file, and the loop against a real bootstrap."""

from __future__ import annotations

import asyncio
import json
import random
import time

import pytest
import zmq

from nodes.bootstrap import Bootstrap
from nodes.config import BootstrapConfig, NodeConfig
from nodes.control import (
    ControlClient,
    JoinRefused,
    NodeIdentityError,
    advertised_address,
    backoff_delay,
    load_identity,
    save_identity,
)
from scenarios.waiting import wait_until_async
from tests.aio import run
from transport.messages import Ok

# --- pure pieces ---------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_cap_with_jitter_in_the_upper_half():
    rng = random.Random(0)

    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 8.0), (60, 8.0), (500, 8.0)]:
        draws = [backoff_delay(attempt, 0.5, 8.0, rng) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws)
        assert max(draws) - min(draws) > ceiling / 10  # jittered, not constant


def test_backoff_rejects_attempt_zero():
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(0, 0.5, 8.0, random.Random(0))


def test_identity_round_trip_and_bootstrap_mismatch(tmp_path):
    assert load_identity(tmp_path, "127.0.0.1:5555") is None

    save_identity(tmp_path, "127.0.0.1:5555", 7, "ab12")

    assert load_identity(tmp_path, "127.0.0.1:5555") == (7, "ab12")
    assert load_identity(tmp_path, "10.0.0.1:5555") is None
    assert json.loads((tmp_path / "node.json").read_text()) == {
        "node_id": 7,
        "bootstrap": "127.0.0.1:5555",
        "incarnation": "ab12",
    }


def test_an_identity_from_before_incarnations_is_read_with_none(tmp_path):
    (tmp_path / "node.json").write_text(json.dumps({"node_id": 7, "bootstrap": "127.0.0.1:5555"}))

    assert load_identity(tmp_path, "127.0.0.1:5555") == (7, "")


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"node_id": "seven", "bootstrap": "x:1"}',
        "[]",
        '{"node_id": 7, "bootstrap": "x:1", "incarnation": 5}',
    ],
)
def test_corrupt_identity_file_is_a_clear_error(tmp_path, content):
    (tmp_path / "node.json").write_text(content)

    with pytest.raises(NodeIdentityError, match="node.json"):
        load_identity(tmp_path, "x:1")


def test_advertised_address_replaces_a_wildcard_host():
    assert advertised_address("127.0.0.1:4000", "127.0.0.1:5555") == "127.0.0.1:4000"
    assert advertised_address("0.0.0.0:4000", "127.0.0.1:5555") == "127.0.0.1:4000"
    assert advertised_address("0.0.0.0:4000", "127.0.0.1:5555", advertise="10.1.2.3:9") == "10.1.2.3:9"


# --- the loop against a real bootstrap -------------------------------------------------------

BOOT = dict(heartbeat_s=0.2, suspect_after_s=1.0, dead_after_s=2.0, restart_grace_s=0.0, sweep_s=0.05)


def _node_config(boot: Bootstrap, **overrides) -> NodeConfig:
    """A node of `boot`'s swarm, with its join token (insecure when `boot` runs without keys)."""
    fields = dict(
        bootstrap=boot.address,
        token=None if boot.token is None else boot.token.text(),
        insecure=boot.token is None,
        memory_bytes=2_000_000_000,
        bandwidth_bps=20e6,
        compute_score=1.0,
        request_timeout_s=0.5,
        backoff_base_s=0.05,
        backoff_cap_s=0.2,
        leave_timeout_s=1.0,
    )
    fields.update(overrides)
    return NodeConfig(**fields)


async def restart_on(address: str, **config) -> Bootstrap:
    """Bind a bootstrap to the port a stopped one used; ZeroMQ frees it asynchronously."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return await Bootstrap.create(BootstrapConfig(bind=address, **config))
        except (OSError, zmq.ZMQError):  # ZMQError (EADDRINUSE) is not an OSError
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


WAIT_S = 10.0  # deadline of each wait here (nodes back off between tries)


def test_joins_heartbeats_with_progress_and_leaves_on_stop(tmp_path):
    async def body():
        boot = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", **BOOT))
        replies, welcomes = [], []
        node = await ControlClient.create(
            _node_config(boot, state_dir=tmp_path / "node", data=tmp_path / "data.jsonl"),
            "127.0.0.1:4001",
            progress=lambda: {"state": "training", "round": 3, "base_version": 2},
            on_welcome=welcomes.append,
            on_heartbeat_reply=replies.append,
        )
        try:
            welcome = await node.wait_joined(timeout=5)
            assert welcome.node_id == node.node_id == 1 and welcomes == [welcome]
            await wait_until_async(lambda: len(replies) >= 2, WAIT_S)
            assert all(isinstance(r, Ok) for r in replies)
            row = boot.registry.table.get(1)
            assert (row.state, row.round, row.base_version, row.role) == ("training", 3, 2, "owner")
            assert load_identity(tmp_path / "node", boot.address) == (1, boot.registry.incarnation)
        finally:
            await node.stop()
            await node.stop()  # idempotent
        assert boot.registry.table.get(1).status == "left"
        await boot.stop()

    run(body())


def test_reconnects_after_bootstrap_restart_on_same_state_without_rejoining(tmp_path):
    async def body():
        first = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path, **BOOT))
        address = first.address
        welcomes = []
        node = await ControlClient.create(_node_config(first), "127.0.0.1:4002", on_welcome=welcomes.append)
        await node.wait_joined(timeout=5)
        await first.stop()
        await wait_until_async(lambda: not node.connected, WAIT_S)

        second = await restart_on(address, state_dir=tmp_path, **BOOT)
        try:
            await wait_until_async(lambda: node.connected, WAIT_S)
            assert len(welcomes) == 1  # kept heartbeating under its id: no second join
            assert [r["id"] for r in second.registry.rows()] == [node.node_id]
            await wait_until_async(
                lambda: second.registry.table.get(node.node_id).last_seen > second.registry.started_at, WAIT_S
            )
        finally:
            await node.stop()
            await second.stop()

    run(body())


def test_bootstrap_that_lost_its_state_makes_the_node_rejoin():
    async def body():
        # in-memory table; without keys (a bootstrap that lost its state also lost its key, and
        # its nodes need the new token: that case is the identity tests')
        first = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", insecure=True, **BOOT))
        address = first.address
        welcomes = []
        node = await ControlClient.create(_node_config(first), "127.0.0.1:4003", on_welcome=welcomes.append)
        await node.wait_joined(timeout=5)
        await first.stop()

        second = await restart_on(address, insecure=True, **BOOT)
        try:
            await wait_until_async(lambda: len(welcomes) == 2, WAIT_S)
            assert [r["status"] for r in second.registry.rows()] == ["alive"]
        finally:
            await node.stop()
            await second.stop()

    run(body())


def test_node_started_before_the_bootstrap_joins_once_it_appears(tmp_path):
    async def body():
        probe = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path, **BOOT))
        address = probe.address  # a port known to be ours; the bootstrap is then away
        await probe.stop()
        node = await ControlClient.create(_node_config(probe), "127.0.0.1:4004")  # the token kept in tmp_path
        await asyncio.sleep(0.8)  # let a few join attempts time out and queue
        assert node.node_id is None

        boot = await restart_on(address, state_dir=tmp_path, **BOOT)
        try:
            await node.wait_joined(timeout=10)
            await asyncio.sleep(0.5)  # queued duplicate joins, if any, have arrived by now
            assert [r["id"] for r in boot.registry.rows()] == [node.node_id]
        finally:
            await node.stop()
            await boot.stop()

    run(body())


def test_refused_join_ends_the_loop_with_a_clear_failure():
    async def body():
        boot = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", **BOOT))
        node = await ControlClient.create(_node_config(boot), "0.0.0.0:4005")
        try:
            with pytest.raises(JoinRefused) as caught:
                await node.wait_joined(timeout=5)
            assert caught.value.code == "bad_address" and node.done
        finally:
            await node.stop()
            await boot.stop()

    run(body())


def test_a_failing_hook_does_not_stop_heartbeats():
    async def body():
        boot = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", **BOOT))
        calls = []

        def broken(reply):
            calls.append(reply)
            raise RuntimeError("bug in the embedding runtime")

        node = await ControlClient.create(_node_config(boot), "127.0.0.1:4006", on_heartbeat_reply=broken)
        try:
            await node.wait_joined(timeout=5)
            await wait_until_async(lambda: len(calls) >= 3, WAIT_S)
            assert node.connected and not node.done
        finally:
            await node.stop()
            await boot.stop()

    run(body())
