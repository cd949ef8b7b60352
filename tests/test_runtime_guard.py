"""What a node does with bad input: clear errors, nothing changed, the node keeps serving."""

import asyncio

import numpy as np
import pytest

from nodes.bootstrap import Bootstrap
from nodes.config import BootstrapConfig, NodeConfig
from nodes.peer import Peer, RuntimeFailure
from nodes.runtime_config import SwarmSpec, TrainConfig
from transport.messages import (ContributionMsg, Forward, ManifestGet, PatchesGet, Ping, Report, ReturnGet,
                                RoundBegin)
from transport.rpc import RpcClient, RpcError


async def _bootstrap(tmp_path):
    return await Bootstrap.create(
        BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path / "boot", heartbeat_s=0.3, suspect_after_s=2.0,
                        dead_after_s=4.0, restart_grace_s=1.0, sweep_s=0.1),
        swarm=SwarmSpec(task="seq_cls", num_labels=4),
    )


def _node(boot, tmp_path, **kw):
    config = NodeConfig(bootstrap=boot.address, memory_bytes=10**8, bandwidth_bps=5e7, state_dir=tmp_path / "n",
                        compute_score=1.0, **kw)
    return Peer(config, TrainConfig(out_dir=tmp_path / "n"))


def test_a_node_whose_model_disagrees_with_the_swarm_stops_with_a_clear_error(tmp_path):
    async def run():
        boot = await _bootstrap(tmp_path)
        try:
            with pytest.raises(RuntimeFailure, match="disagrees with the swarm's model tiny-gpt2"):
                await asyncio.wait_for(_node(boot, tmp_path, model="tiny-llama").run(asyncio.Event()), 30)
        finally:
            await boot.stop()

    asyncio.run(run())


def test_bad_peer_requests_get_error_codes_and_the_node_keeps_serving(tmp_path):
    async def run():
        boot = await _bootstrap(tmp_path)
        stop = asyncio.Event()
        node = _node(boot, tmp_path)
        task = asyncio.create_task(node.run(stop))
        client = await RpcClient.create("prober")
        try:
            while node.base_model is None or node.server is None:
                await asyncio.sleep(0.05)
            addr = node.server.address
            acts = np.zeros((1, 3, 64), np.float32)
            bad = [
                (Forward(step=0, activations=acts, attention_mask=np.ones((1, 3), np.int64), owner_id=99), "not_serving"),
                (RoundBegin(owner_id=99, cluster=0, round=0, split=1, ranks={}, seed=1, lr=0.01), "not_serving"),
                (ReturnGet(owner_id=99, cluster=0, round=0), "not_serving"),
                (ContributionMsg(cluster=0, round=0, node_id=5, n_samples=1, digest="x", tensors={"Q:x": acts},
                                 scalings={}), "wrong_cluster"),
                (ManifestGet(cluster=3, round=0), "not_anchor"),
                (PatchesGet(cluster=3, since=0), "not_found"),
            ]
            for body, code in bad:
                with pytest.raises(RpcError) as err:
                    await client.call(addr, body, timeout=5)
                assert err.value.code == code, (type(body).TYPE, err.value)
            assert await client.call(addr, Ping(), timeout=5) is not None
            with pytest.raises(RpcError) as err:  # a report naming no valid helper is refused by the bootstrap
                await client.call(boot.address, Report(node_id=node.node_id,
                                                       metrics={"event": "helper_failed", "helper": "x"}), timeout=5)
            assert err.value.code == "bad_request"
            assert not task.done()
        finally:
            stop.set()
            await client.stop()
            await asyncio.wait_for(task, 30)
            await boot.stop()

    asyncio.run(run())


@pytest.mark.parametrize("args, message", [
    (["join", "--bootstrap", "127.0.0.1:5555", "--memory", "1GB", "--bandwidth", "1Mbps", "--split-mode", "three-part"],
     "split_mode must be one of"),
    (["join", "--bootstrap", "127.0.0.1:5555", "--memory", "1GB", "--bandwidth", "1Mbps", "--local-steps", "0"],
     "local_steps must be an int >= 1"),
    (["bootstrap", "--bind", "127.0.0.1:0", "--state", "/tmp/x", "--task", "seq_cls"], "num_labels"),
])
def test_cli_refuses_bad_runtime_flags_before_starting(args, message, capsys):
    from tools.cli import main
    from tools.exit_codes import ExitCode

    assert main(args) == ExitCode.BAD_VALUE
    assert message in capsys.readouterr().err
