"""u-shape split training in the runtime: labels never leave the owner (u-shape).

Per step the owner sends `forward` without labels, the helper answers `hidden` (the output
of blocks[s:L]), the owner runs final norm + head + loss and sends `u_backward` (the
gradient of those hidden states), the helper answers `backward` (the gradient of the
activations). Three checks:

- two real processes (bootstrap, owner, pure helper via `atlas-node`) fold the same
  patches as OwnerSession(mode="u-shape") + HelperSession.u_forward/u_backward in this
  process, within 1e-4 (mirrors tests/test_runtime_split.py);
- what arrived at the helper's RPC handlers carried no labels (the helper counts forwards
  that carried labels; the in-process test shows that counter does count them);
- a bad u-shape request (wrong shape or dtype of the gradient, labels in a u-shape round)
  gets an error reply, and the helper keeps serving the owner's round.
"""

import asyncio

import numpy as np
import pytest

from nodes.config import SwarmSpec
from scenarios.inprocess import InProcessSwarm
from scenarios.waiting import wait_until_async
from tests.process_swarm import flags
from tests.split_reference import ROUNDS, STEPS, assert_folds_match_reference, train_in_processes
from transport.messages import (
    Assignment,
    Backward,
    BaseDigest,
    Fingerprint,
    Forward,
    GetAssignment,
    Hidden,
    Ping,
    RoundBegin,
    UBackward,
)
from transport.rpc import RpcError


def test_u_shape_rounds_across_two_processes_match_one_process_and_labels_stay_home(swarm):
    data, summary, helper_summary = train_in_processes(swarm, flags(split_mode="u-shape"))
    assert summary["split_mode"] == "u-shape"
    for record, ref in assert_folds_match_reference(swarm, data, summary, "u-shape"):
        assert set(record.patch.dense) == set(ref.dense) and ref.dense, "u-shape: the owner trains the head"

    assert helper_summary["steps_served"] == ROUNDS * STEPS
    assert helper_summary["requests_served"]["forward"] >= ROUNDS * STEPS
    assert helper_summary["requests_served"]["u_backward"] >= ROUNDS * STEPS
    assert helper_summary["labels_received"] == 0  # no forward that reached the helper carried labels
    owner_bytes, helper_bytes = summary["bytes_by_kind"], helper_summary["bytes_by_kind"]
    # both legs: the owner sends activations (forward) and gradients (u_backward), the helper
    # hidden states (hidden) and gradients (backward)
    assert owner_bytes["activations"] > 0 and owner_bytes["gradients"] > 0
    assert helper_bytes["activations"] > 0 and helper_bytes["gradients"] > 0


def test_bad_u_shape_requests_get_errors_and_the_helper_keeps_serving(tmp_path):
    """A real helper node; the test is its owner on the wire (join, fingerprint, u-shape steps)."""

    async def run():
        spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=1, clusters=1, split_mode="u-shape")
        swarm = await InProcessSwarm.create(tmp_path, spec, suspect_after_s=3.0, dead_after_s=6.0)
        helper = swarm.add("h", 10**8, keep_results=False)
        task = swarm.start("h")
        boot = swarm.boot
        client = control = None
        try:
            await wait_until_async(
                lambda: getattr(helper, "base_identity", None) is not None and helper.server is not None,
                60,
                what="the helper to serve",
            )
            client, control = await swarm.wire_node("o", 4 * 10**6, data=tmp_path / "o.jsonl")
            me = control.node_id
            digest = helper.base_identity["digest"]  # the owner on the wire runs the helper's base
            await client.call(boot.address, BaseDigest(node_id=me, digest=digest), timeout=5)
            vec = np.random.default_rng(0).standard_normal(64).astype(np.float32)
            await client.call(boot.address, Fingerprint(node_id=me, vector=vec, n_samples=16), timeout=5)
            for _ in range(200):
                a = await client.call(boot.address, GetAssignment(node_id=me), timeout=5)
                if isinstance(a, Assignment) and a.role == "owner" and a.helper == helper.node_id:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"no u-shape owner assignment with the helper: {a}")
            addr = helper.server.address
            client.set_server_key(addr, a.keys[str(helper.node_id)])  # the helper's key, from the assignment
            await client.call(
                addr,
                RoundBegin(
                    owner_id=me,
                    cluster=a.cluster,
                    round=0,
                    split=a.split,
                    ranks=dict(a.ranks),
                    seed=7,
                    lr=0.01,
                    mode="u-shape",
                    base_digest=digest,
                ),
                timeout=10,
            )
            rng = np.random.default_rng(1)
            acts = rng.standard_normal((2, 5, 64)).astype(np.float32)
            mask = np.ones((2, 5), np.int64)
            fwd = dict(activations=acts, attention_mask=mask, owner_id=me, cluster=a.cluster, round=0)

            async def refused(body, code):
                with pytest.raises(RpcError) as err:
                    await client.call(addr, body, timeout=10)
                assert err.value.code == code, (type(body).TYPE, err.value)
                return err.value

            # labels in a u-shape round: refused (and counted: the counter the process test reads works)
            e = await refused(Forward(step=0, labels=np.zeros(2, np.int64), **fwd), "bad_request")
            assert "u-shape" in str(e)
            assert helper.helper.labels_received == 1
            hidden = await client.call(addr, Forward(step=0, **fwd), timeout=10)
            assert isinstance(hidden, Hidden) and hidden.step == 0 and hidden.hidden.shape == acts.shape
            ub = dict(owner_id=me, cluster=a.cluster, round=0, step=0)
            await refused(UBackward(grad=np.ones((2, 4, 64), np.float32), **ub), "bad_request")  # wrong shape
            await refused(UBackward(grad=np.ones((2, 5, 64), np.float64), **ub), "bad_request")  # wrong dtype
            await refused(UBackward(grad=np.full((2, 5, 64), np.nan, np.float32), **ub), "bad_request")
            await refused(UBackward(grad=np.ones((2, 5, 64), np.float32), **{**ub, "step": 3}), "replay")
            assert helper.helper.steps_served == 0  # nothing above trained anything
            # the helper still serves: the pending forward needs recomputing after the NaN backward spent
            # its graph, then a good u_backward completes the step
            hidden = await client.call(addr, Forward(step=0, **fwd), timeout=10)
            grad = rng.standard_normal(hidden.hidden.shape).astype(np.float32)
            back = await client.call(addr, UBackward(grad=grad, **ub), timeout=10)
            assert isinstance(back, Backward) and back.step == 0 and back.grad.shape == acts.shape
            assert np.isfinite(back.grad).all() and np.abs(back.grad).sum() > 0
            assert helper.helper.steps_served == 1 and helper.helper.labels_received == 1
            assert await client.call(addr, Ping(), timeout=5) is not None
            assert not task.done()
        finally:
            swarm.stop.set()
            if control is not None:
                await control.stop(leave=False)
                await client.stop()
            await asyncio.wait_for(task, 30)
            await swarm.close()

    asyncio.run(run())
