"""A node id is only a node's within the state incarnation that gave it.

A bootstrap that lost its whole state starts a new incarnation and hands out ids from 1
again; a node that comes back with an id of the old incarnation in its node.json joins as
a new node instead of taking over the row another node now holds under that id. The swarm
runs without keys (insecure): with keys, a bootstrap that lost its whole state also lost
its key, and a node's id is bound to its key besides (tests/test_identity.py).
"""

from __future__ import annotations

import pytest

from nodes.bootstrap import Bootstrap
from nodes.config import BootstrapConfig
from nodes.control import ControlClient, load_identity
from tests.aio import run
from tests.test_control import BOOT, _node_config, restart_on


def test_a_node_back_with_an_id_of_a_lost_state_gets_a_new_id_not_another_nodes_row(tmp_path):
    async def body():
        first = await Bootstrap.create(
            BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path / "boot-a", insecure=True, **BOOT)
        )
        address, old = first.address, first.registry.incarnation
        x = await ControlClient.create(_node_config(first, state_dir=tmp_path / "x"), "127.0.0.1:4101")
        await x.wait_joined(timeout=5)
        await x.stop(leave=False)  # the node goes down; its node.json keeps (1, incarnation a)
        await first.stop()

        second = await restart_on(address, state_dir=tmp_path / "boot-b", insecure=True, **BOOT)  # the whole state lost
        y = await ControlClient.create(_node_config(second), "127.0.0.1:4102")
        x_again = None
        try:
            assert (await y.wait_joined(timeout=5)).node_id == 1  # id 1 again, in the new incarnation
            x_again = await ControlClient.create(_node_config(second, state_dir=tmp_path / "x"), "127.0.0.1:4101")
            welcome = await x_again.wait_joined(timeout=5)

            assert welcome.node_id == 2 and welcome.incarnation == second.registry.incarnation != old
            assert second.registry.table.get(1).address == "127.0.0.1:4102"  # y's row is y's
            assert load_identity(tmp_path / "x", address) == (2, second.registry.incarnation)
        finally:
            if x_again is not None:
                await x_again.stop()
            await y.stop()
            await second.stop()

    run(body())


def test_a_heartbeat_from_another_incarnation_is_refused_and_changes_no_row(tmp_path):
    from transport.messages import Heartbeat, Join
    from transport.rpc import RpcClient, RpcError

    async def body():
        boot = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path, insecure=True, **BOOT))
        try:
            async with RpcClient("node") as client:
                offer = dict(memory_bytes=10**9, bandwidth_bps=10**7, compute_score=1.0, address="127.0.0.1:4103")
                welcome = await client.call(boot.address, Join(**offer), timeout=5)
                before = boot.registry.table.get(welcome.node_id)
                stale = Heartbeat(node_id=welcome.node_id, state="training", incarnation="0" * 16)
                with pytest.raises(RpcError) as refused:
                    await client.call(boot.address, stale, timeout=5)
                assert refused.value.code == "unknown_node"
                assert boot.registry.table.get(welcome.node_id) == before
                ours = Heartbeat(node_id=welcome.node_id, state="training", incarnation=welcome.incarnation)
                await client.call(boot.address, ours, timeout=5)
                assert boot.registry.table.get(welcome.node_id).state == "training"
        finally:
            await boot.stop()

    run(body())
