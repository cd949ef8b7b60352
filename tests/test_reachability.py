"""The bootstrap dials every joined node back (issue 13): over real sockets with CURVE keys, a
node whose advertised address answers is marked reachable, one whose address takes no
connection is marked unreachable within one join, is told so on its next heartbeat with what
to do, and is no longer offered to the planner as a host."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from nodes.bootstrap import Bootstrap
from nodes.config import BootstrapConfig, SwarmSpec
from nodes.reachability import REACH_TIMEOUT_S, advice
from scenarios.waiting import wait_until_async
from tests.aio import run
from tools.peers_view import format_peer_table
from transport.messages import BaseDigest, Beat, Fingerprint, Heartbeat, Join
from transport.rpc import RpcClient, RpcServer
from transport.security import Keypair

DIGEST = "ab" * 32


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(service: Bootstrap, address: str, has_data: bool) -> Join:
    memory = 4 * 10**6 if has_data else 100 * 10**6  # a weak owner; a helper with room for it
    return Join(
        memory_bytes=memory,
        bandwidth_bps=50 * 10**6,
        compute_score=1.0,
        address=address,
        has_data=has_data,
        token=service.token.secret,
    )


def test_an_address_that_answers_is_reachable_one_that_does_not_is_not_and_never_hosts():
    async def body():
        spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=1, clusters=1, assign_after_s=600)
        service = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0"), swarm=spec)
        keys = {"open": Keypair.generate(), "closed": Keypair.generate()}
        server = await RpcServer.create("127.0.0.1", 0, {"ping": _pong}, keypair=keys["open"])
        clients = {name: RpcClient(name, keypair=key) for name, key in keys.items()}
        try:
            addresses = {"open": server.address, "closed": f"127.0.0.1:{_closed_port()}"}
            ids, welcomes = {}, {}
            for name, client in clients.items():
                client.set_server_key(service.address, service.keypair.public)
                # the open node is a weak owner; the closed one a pure helper with room for it
                welcome = await client.call(service.address, _join(service, addresses[name], name == "open"), timeout=5)
                ids[name], welcomes[name] = welcome.node_id, welcome
                await client.call(service.address, BaseDigest(node_id=welcome.node_id, digest=DIGEST), timeout=5)
            vector = np.eye(64, dtype=np.float32)[0]
            await clients["open"].call(service.address, Fingerprint(node_id=ids["open"], vector=vector, n_samples=8))
            assert {w.seen_from for w in welcomes.values()} == {"127.0.0.1"}
            table = service.registry.table

            def checked():
                rows = {name: table.get(n) for name, n in ids.items()}
                return rows if all(r.reachable is not None for r in rows.values()) else None

            rows = await wait_until_async(checked, REACH_TIMEOUT_S + 5, what="both dial-backs")
            assert rows["open"].reachable is True and rows["closed"].reachable is False
            assert service._offer(ids["open"])[3] is True and service._offer(ids["closed"])[3] is False

            beats = {
                name: await clients[name].call(service.address, Heartbeat(node_id=ids[name], state="waiting"))
                for name in ids
            }
            assert isinstance(beats["closed"], Beat) and beats["closed"].reachable is False
            assert beats["open"].reachable is True
            rendered = format_peer_table([r.to_dict() for r in rows.values()])
            assert "REACH" in rendered and "NO" in rendered

            # planned with the closed node's offer again, no longer as a host: the weak owner waits
            def planned():
                coord = service.coordinator
                cols = {} if coord is None else coord.peer_columns()
                return cols if ids["open"] in cols and "waiting" in str(cols[ids["open"]]["role"]) else None

            cols = await wait_until_async(planned, 10, what="a plan without the closed node as a host")
            assert cols[ids["open"]]["helper"] is None
            assert "may not host" in cols[ids["closed"]]["reason"]
            assert "needs a helper" in cols[ids["open"]]["reason"]
        finally:
            for client in clients.values():
                await client.stop()
            await server.stop()
            await service.stop()

    run(body(), timeout=60)


async def _pong(env):
    return None


def test_the_advice_names_the_address_and_what_to_advertise():
    text = advice("192.168.1.5:7000", "203.0.113.9")
    assert "192.168.1.5:7000" in text and "--advertise 203.0.113.9:7000" in text
    assert "--advertise" not in advice("127.0.0.1:7000", "127.0.0.1")  # nothing better to suggest


def test_a_node_learns_from_its_heartbeats_that_nobody_can_dial_it(tmp_path, caplog):
    """The real control plane of a node that advertises 127.0.0.1:1 (nothing listens there)."""
    import logging

    from scenarios.inprocess import InProcessSwarm

    async def body():
        spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=1, assign_after_s=600)
        async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=1) as swarm:
            client, control = await swarm.wire_node("closed", 100 * 10**6)
            try:
                assert control.welcome.seen_from == "127.0.0.1"
                await wait_until_async(lambda: control.reachable is False, REACH_TIMEOUT_S + 10, what="the verdict")
            finally:
                await control.stop()
                await client.stop()

    with caplog.at_level(logging.WARNING, logger="atlas.node"):
        run(body(), timeout=60)
    said = [r.getMessage() for r in caplog.records if "could not reach this node at 127.0.0.1:1" in r.getMessage()]
    assert len(said) == 1  # once, not on every heartbeat


@pytest.mark.parametrize("merge", ["reduce", "gossip"])
def test_a_node_nobody_can_dial_trains_to_the_end_and_its_updates_are_merged(tmp_path, merge):
    """Three whole-model nodes of one task; reduce with fan_in 1 (a chain: every node but the
    last is a parent), or gossip. The first to join, the lowest id, advertises 127.0.0.1:1:
    it is not the anchor while the others train, it is the chain's last link, gets no gossip
    pushes, and dials everyone it talks to. Every node finishes and nothing is lost."""
    import asyncio

    from atlas_p2p.synthetic import write_synthetic_jsonl
    from scenarios.inprocess import InProcessSwarm
    from tools import report

    async def body():
        spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=3, clusters=1)
        train = dict(rounds=2, local_steps=1, lr=0.01, merge=merge, fan_in=1, round_deadline_s=30.0)
        async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=3) as swarm:
            for seed, name in enumerate(("closed", "b", "c")):
                data = write_synthetic_jsonl(tmp_path / f"{name}.jsonl", 0, 24, seed=seed)
                advertise = "127.0.0.1:1" if name == "closed" else None
                swarm.add(name, 30 * 10**6, data=data, advertise=advertise, **train)
            swarm.start("closed")
            row = await wait_until_async(lambda: swarm.boot.registry.table.get(1), 60, what="the first join")
            assert row.address == "127.0.0.1:1"
            await wait_until_async(lambda: swarm.boot.registry.table.get(1).reachable is False, 20, what="a verdict")
            for name in ("b", "c"):
                swarm.start(name)
            everyone = asyncio.ensure_future(asyncio.wait_for(asyncio.gather(*swarm.tasks.values()), 240))
            anchors = set()  # the anchor while all three train (alone at the end, node 1 anchors itself)
            while not everyone.done():
                if not any(t.done() for t in swarm.tasks.values()):
                    anchors |= set(swarm.boot.coordinator.anchors().values())
                await asyncio.sleep(0.05)
            await everyone
            rows = {r.id: r for r in swarm.boot.registry.table.rows()}
            return rows, anchors, [report.read_node_dir(tmp_path / n) for n in ("closed", "b", "c")]

    rows, anchors, runs = run(body(), timeout=300)
    assert rows[1].reachable is False and rows[2].reachable is True and rows[3].reachable is True
    assert all(r.finished for r in runs)
    assert report.lost_updates(runs) == []
    assert anchors and 1 not in anchors
    assert {r.summary.base_version for r in runs} == {2}  # both rounds folded on every node
    assert all(len(r.summary.contributions) == 2 for r in runs)


@pytest.mark.parametrize("volunteer", ["bootstrap", "peer"])
def test_a_node_nobody_can_dial_is_carried_by_a_relay_and_its_updates_are_merged(tmp_path, volunteer):
    """As above, with a relay: the bootstrap (`--relay`) or node b volunteers. The closed node
    learns it cannot be dialled, takes a slot on the relay, joins again with the slot's address,
    is dialled back through it, and from then on is an ordinary gossip target reached through
    the relay; it never hosts. Both ends count the bytes; nothing is lost."""
    import asyncio

    from atlas_p2p.synthetic import write_synthetic_jsonl
    from scenarios.inprocess import InProcessSwarm
    from tools import report

    async def body():
        spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=3, clusters=1)
        train = dict(rounds=2, local_steps=1, lr=0.01, merge="gossip", round_deadline_s=30.0)
        boot = {"relay_port": 0} if volunteer == "bootstrap" else {}
        async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=3, **boot) as swarm:
            for seed, name in enumerate(("b", "closed", "c")):
                data = write_synthetic_jsonl(tmp_path / f"{name}.jsonl", 0, 24, seed=seed)
                swarm.add(
                    name,
                    30 * 10**6,
                    data=data,
                    advertise="127.0.0.1:1" if name == "closed" else None,
                    relay_port=0 if (name == "b" and volunteer == "peer") else None,
                    **train,
                )
            swarm.start("b")
            await swarm.joined("b")
            swarm.start("closed")
            closed = await swarm.joined("closed")
            row = await wait_until_async(
                lambda: (r := swarm.boot.registry.table.get(closed)) and r.via and r.reachable and r,
                30,
                what="the closed node dialled back through its relay",
            )
            swarm.start("c")
            summaries = await asyncio.wait_for(asyncio.gather(*swarm.tasks.values()), 240)
            relay = swarm.boot.relay if volunteer == "bootstrap" else swarm.peers["b"].relay_server
            return row, relay.stats.to_json(), dict(zip(swarm.tasks, summaries))

    row, served, summaries = run(body(), timeout=300)
    runs = [report.read_node_dir(tmp_path / n) for n in ("b", "closed", "c")]
    assert row.address != "127.0.0.1:1" and row.via  # the slot, and the relay it is on
    assert all(r.finished for r in runs)
    assert report.lost_updates(runs) == []
    assert {r.summary.base_version for r in runs} == {2}
    used = summaries["closed"]["relay"]["used"]
    assert used["bytes_out"] > 0 and used["rtt_ms"] is not None
    # the dial-back and peers' pushes: a tiny model's patches are hundreds of kB, a ping ~100 B
    assert used["connections"] >= 2 and used["bytes_in"] > 64 << 10
    assert served["bytes"] == used["bytes_in"] + used["bytes_out"]  # one relay, both ends agree
    assert all(s["helper"] != int(row.id) for s in summaries.values())


def test_more_members_nobody_can_dial_than_leaves_still_merge_everything(tmp_path):
    """A chain (fan_in 1) of four whole-model nodes of which two advertise addresses nobody can
    dial and no relay volunteers: a chain has one leaf, so one of them is adopted by a
    dialable member (atlas_p2p.aggregation.reduce.ReduceTree). Every node finishes, nothing is
    lost, every round is folded everywhere."""
    import asyncio

    from atlas_p2p.synthetic import write_synthetic_jsonl
    from scenarios.inprocess import InProcessSwarm
    from tools import report

    names = ("closed1", "closed2", "b", "c")

    async def body():
        spec = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=4, clusters=1)
        train = dict(rounds=2, local_steps=1, lr=0.01, merge="reduce", fan_in=1, round_deadline_s=30.0)
        async with await InProcessSwarm.create(tmp_path, spec, fingerprint_seed=3) as swarm:
            for seed, name in enumerate(names):
                data = write_synthetic_jsonl(tmp_path / f"{name}.jsonl", 0, 24, seed=seed)
                advertise = f"127.0.0.1:{seed + 1}" if name.startswith("closed") else None
                swarm.add(name, 30 * 10**6, data=data, advertise=advertise, **train)
            for name in names[:2]:
                swarm.start(name)
                await swarm.joined(name)
            await wait_until_async(
                lambda: all(r.reachable is False for r in swarm.boot.registry.table.rows()), 20, what="two verdicts"
            )
            for name in names[2:]:
                swarm.start(name)
            await asyncio.wait_for(asyncio.gather(*swarm.tasks.values()), 240)

    run(body(), timeout=300)
    runs = [report.read_node_dir(tmp_path / n) for n in names]
    assert all(r.finished for r in runs)
    assert report.lost_updates(runs) == []
    assert {r.summary.base_version for r in runs} == {2}
