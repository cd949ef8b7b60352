"""What a node does with bad input: clear errors, nothing changed, the node keeps serving."""

import asyncio

import numpy as np
import pytest

from nodes.config import SwarmSpec
from nodes.peer import RuntimeFailure
from scenarios.inprocess import InProcessSwarm
from scenarios.waiting import wait_until_async
from tests.process_swarm import OFFLINE_JOIN
from transport.messages import ContributionMsg, Forward, ManifestGet, PatchesGet, Ping, Report, ReturnGet, RoundBegin
from transport.rpc import RpcError

SPEC = SwarmSpec(task="seq_cls", num_labels=4)


def test_a_node_whose_model_disagrees_with_the_swarm_stops_with_a_clear_error(tmp_path):
    async def run():
        async with await InProcessSwarm.create(tmp_path, SPEC) as swarm:
            swarm.add("n", 10**8, model="tiny-llama")
            with pytest.raises(RuntimeFailure, match="disagrees with the swarm's model tiny-gpt2"):
                await swarm.run(timeout=30)

    asyncio.run(run())


def test_bad_peer_requests_get_error_codes_and_the_node_keeps_serving(tmp_path):
    async def run():
        swarm = await InProcessSwarm.create(tmp_path, SPEC)
        node = swarm.add("n", 10**8)
        task = swarm.start("n")
        client, control = await swarm.wire_node("prober", 10**8)  # a node of the swarm, speaking for itself
        me = control.node_id
        try:
            await wait_until_async(
                lambda: node.base_model is not None and node.server is not None, 60, what="the node to serve"
            )
            addr = node.server.address
            client.set_server_key(addr, node.server.keypair.public)
            acts = np.zeros((1, 3, 64), np.float32)
            bad = [
                (
                    Forward(step=0, activations=acts, attention_mask=np.ones((1, 3), np.int64), owner_id=me),
                    "not_serving",
                ),
                (RoundBegin(owner_id=me, cluster=0, round=0, split=1, ranks={}, seed=1, lr=0.01), "not_serving"),
                (ReturnGet(owner_id=me, cluster=0, round=0), "not_serving"),
                (
                    ContributionMsg(
                        cluster=0,
                        round=0,
                        node_id=5,
                        n_samples=1,
                        digest="x",
                        tensors={"Q:x": acts},
                        scalings={},
                        sender=me,
                    ),
                    "wrong_cluster",
                ),
                (ManifestGet(cluster=3, round=0), "not_anchor"),
                (PatchesGet(cluster=3, since=0), "not_found"),
            ]
            for body, code in bad:
                with pytest.raises(RpcError) as err:
                    await client.call(addr, body, timeout=5)
                assert err.value.code == code, (type(body).TYPE, err.value)
            assert await client.call(addr, Ping(), timeout=5) is not None
            with pytest.raises(RpcError) as err:  # a report naming no valid helper is refused by the bootstrap
                await client.call(
                    swarm.address, Report(node_id=me, metrics={"event": "helper_failed", "helper": "x"}), timeout=5
                )
            assert err.value.code == "bad_request"
            assert not task.done()
        finally:
            swarm.stop.set()
            await control.stop(leave=False)
            await client.stop()
            await asyncio.wait_for(task, 30)
            await swarm.close()

    asyncio.run(run())


@pytest.mark.parametrize(
    "args, message",
    [
        ([*OFFLINE_JOIN, "--split-mode", "three-part"], "split_mode must be one of"),
        ([*OFFLINE_JOIN, "--local-steps", "0"], "local_steps must be an int >= 1"),
        (["bootstrap", "--bind", "127.0.0.1:0", "--state", "/tmp/x", "--task", "seq_cls"], "num_labels"),
    ],
)
def test_cli_refuses_bad_runtime_flags_before_starting(args, message, capsys):
    from tools.cli import main
    from tools.exit_codes import ExitCode

    assert main(args) == ExitCode.BAD_VALUE
    assert message in capsys.readouterr().err
