"""Identity by key: a node id is bound to the key of its first join, and every request is
checked against the key its connection proved (CurveZMQ), at the bootstrap and between peers.

- `JoinToken`: the text form round-trips and bad text is refused without echoing a secret.
- `Registry` (no sockets): the binding rules of a join and `check_sender`.
- A real bootstrap with keys: a join without the token, a join naming another node's id, and
  every request naming another node are refused with an error code and change nothing;
  `peers` needs a node's key or the token; a client without CURVE gets no answer at all.
- A real node: an owner's requests only from that owner's key, and nothing from a key no
  node of the swarm holds.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from atlas_p2p.capabilities import Capabilities
from nodes.bootstrap import Bootstrap
from nodes.config import BootstrapConfig, SwarmSpec
from nodes.peer_table import MemoryPeerTable
from nodes.registry import Registry, RequestError
from scenarios.inprocess import InProcessSwarm
from scenarios.waiting import wait_until_async
from transport.messages import (
    BaseDigest,
    Fingerprint,
    GetAssignment,
    Heartbeat,
    Join,
    Leave,
    PeerList,
    Peers,
    Report,
    ReturnGet,
    Whois,
)
from transport.rpc import RpcClient, RpcError, RpcTimeout
from transport.security import JoinToken, Keypair

CAPS = Capabilities(memory_bytes=10**9, bandwidth_bps=10**7, compute_score=1.0, has_data=True)
K1, K2 = (Keypair.generate().public.decode() for _ in range(2))


# --- the token ------------------------------------------------------------------------------


def test_a_join_token_round_trips_and_hides_its_secret():
    token = JoinToken.new(Keypair.generate().public)
    again = JoinToken.parse(token.text())
    assert again.server_key == token.server_key and again.admits(token.secret)
    assert not again.admits("0" * 32) and not again.admits(None)
    assert token.secret not in repr(token) and token.text().startswith("atlas1-")


@pytest.mark.parametrize("text", ["", "atlas1-", "atlas2-" + "0" * 96, "atlas1-" + "0" * 95, "atlas1-" + "g" * 96])
def test_a_malformed_token_is_refused_with_a_reason(text):
    with pytest.raises(ValueError, match="join token"):
        JoinToken.parse(text)


# --- the registry's rules ----------------------------------------------------------------------


def _registry() -> Registry:
    return Registry(MemoryPeerTable(), BootstrapConfig(bind="127.0.0.1:0"), now=0.0)


def test_an_id_is_bound_to_the_key_of_its_first_join():
    registry = _registry()
    first = registry.join(CAPS, address="127.0.0.1:7001", now=0.0, public_key=K1).node_id

    with pytest.raises(RequestError) as hijack:
        registry.join(CAPS, address="127.0.0.1:7666", now=1.0, public_key=K2, node_id=first)
    assert hijack.value.code == "unauthorized"
    assert registry.table.get(first).address == "127.0.0.1:7001"  # nothing changed

    # the same key is the same node, whatever id it names (a node that lost its node.json)
    assert registry.join(CAPS, address="127.0.0.1:7002", now=2.0, public_key=K1).node_id == first
    assert registry.join(CAPS, address="127.0.0.1:7002", now=2.0, public_key=K1, node_id=99).node_id == first
    assert registry.node_of(K1) == first and registry.node_of(K2) is None
    other = registry.join(CAPS, address="127.0.0.1:7003", now=3.0, public_key=K2).node_id
    assert other != first and registry.node_of(K2) == other


def test_a_request_naming_a_node_must_come_from_its_key():
    registry = _registry()
    node = registry.join(CAPS, address="127.0.0.1:7001", now=0.0, public_key=K1).node_id
    registry.check_sender(node, K1)
    registry.check_sender(node, "")  # a plain socket: the swarm runs without keys
    registry.check_sender(node + 1, K2)  # unknown id: the request itself answers unknown_node
    with pytest.raises(RequestError) as forged:
        registry.check_sender(node, K2)
    assert forged.value.code == "unauthorized"


# --- a real bootstrap --------------------------------------------------------------------------


def _keyed(boot: Bootstrap, name: str) -> RpcClient:
    client = RpcClient(name, keypair=Keypair.generate())
    client.set_server_key(boot.address, boot.keypair.public)
    return client


def _join(boot: Bootstrap, port: int, **fields) -> Join:
    return Join.offer(CAPS, address=f"127.0.0.1:{port}", **{"token": boot.token.secret, **fields})


async def _refused(client: RpcClient, address: str, body, code: str) -> None:
    with pytest.raises(RpcError) as err:
        await client.call(address, body, timeout=5)
    assert err.value.code == code, (type(body).TYPE, err.value)


def test_the_bootstrap_refuses_strangers_and_impersonation_and_changes_nothing(tmp_path):
    async def body():
        swarm = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=5, assign_after_s=600)
        boot = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path), swarm=swarm)
        victim, attacker, plain = _keyed(boot, "victim"), _keyed(boot, "attacker"), RpcClient("plain")
        try:
            assert (tmp_path / "join-token").read_text().strip() == boot.token.text()
            v = (await victim.call(boot.address, _join(boot, 7001), timeout=5)).node_id
            before = boot.registry.table.get(v)

            await _refused(attacker, boot.address, _join(boot, 7666, token="0" * 32), "bad_token")
            await _refused(attacker, boot.address, _join(boot, 7666, node_id=v), "unauthorized")  # hijack
            await _refused(attacker, boot.address, Peers(), "unauthorized")  # not a node, no token
            await _refused(attacker, boot.address, Whois(key=K1), "unauthorized")
            assert [r.id for r in boot.registry.table.rows()] == [v]

            a = (await attacker.call(boot.address, _join(boot, 7002), timeout=5)).node_id  # a node now
            vec = np.ones(64, np.float32) / 8.0
            for forged in (
                Heartbeat(node_id=v, state="waiting"),
                Leave(node_id=v),
                Fingerprint(node_id=v, vector=vec, n_samples=1),
                Report(node_id=v, metrics={"event": "helper_failed", "helper": a}),
                GetAssignment(node_id=v),
                BaseDigest(node_id=v, digest="0" * 64),
            ):
                await _refused(attacker, boot.address, forged, "unauthorized")
            after = boot.registry.table.get(v)
            assert after == before and boot.registry.table.get(v).base_digest is None
            assert not (boot.coordinator.known(v) and boot.coordinator.fingerprinted(v))

            # what a node may do for itself still works, and a node may read the table
            await attacker.call(boot.address, Heartbeat(node_id=a, state="waiting"), timeout=5)
            rows = await attacker.call(boot.address, Peers(), timeout=5)
            assert isinstance(rows, PeerList) and {r["id"] for r in rows.rows} == {v, a}
            assert (await attacker.call(boot.address, Whois(key=K1), timeout=5)).node_id is None

            # a client without CURVE never completes the handshake: no reply, no row
            with pytest.raises(RpcTimeout):
                await plain.call(boot.address, Join.offer(CAPS, address="127.0.0.1:7003"), timeout=0.5)
            assert {r.id for r in boot.registry.table.rows()} == {v, a}
        finally:
            for client in (victim, attacker, plain):
                await client.stop()
            await boot.stop()

    asyncio.run(body())


def test_a_restarted_bootstrap_keeps_its_key_and_token_in_its_state(tmp_path):
    async def body():
        first = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path))
        token, key = first.token.text(), first.keypair.public
        await first.stop()
        second = await Bootstrap.create(BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path))
        try:
            assert second.token.text() == token and second.keypair.public == key
        finally:
            await second.stop()

    asyncio.run(body())


# --- a real node ---------------------------------------------------------------------------------


def test_a_node_serves_an_owner_only_to_that_owners_key_and_nothing_to_strangers(tmp_path):
    async def body():
        swarm = await InProcessSwarm.create(tmp_path, SwarmSpec(task="seq_cls", num_labels=4))
        node = swarm.add("n", 10**8)
        task = swarm.start("n")
        owner, owner_control = await swarm.wire_node("owner", 10**8)
        other, other_control = await swarm.wire_node("other", 10**8)
        stranger = RpcClient("stranger", keypair=Keypair.generate())
        try:
            await wait_until_async(lambda: node.base_model is not None and node.server is not None, 60, what="serve")
            addr, key = node.server.address, node.server.keypair.public
            for client in (owner, other, stranger):
                client.set_server_key(addr, key)
            me = owner_control.node_id
            ask = ReturnGet(owner_id=me, cluster=0, round=0)
            await _refused(owner, addr, ask, "not_serving")  # the owner itself passes the identity check
            await _refused(other, addr, ask, "unauthorized")  # another node of the swarm, in its name
            await _refused(stranger, addr, ask, "unauthorized")  # a key no node holds
            await _refused(stranger, addr, ReturnGet(owner_id=99, cluster=0, round=0), "unauthorized")
            assert not task.done()
        finally:
            swarm.stop.set()
            for control in (owner_control, other_control):
                await control.stop(leave=False)
            for client in (owner, other, stranger):
                await client.stop()
            await asyncio.wait_for(task, 30)
            await swarm.close()

    asyncio.run(body())


def test_with_an_allow_list_only_the_listed_keys_complete_the_handshake(tmp_path):
    from transport.security import create_keypair

    async def body():
        listed = create_keypair(tmp_path / "allowed", "n1")  # n1.key lands in the allow-list dir
        other = Keypair.generate()
        config = BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path / "boot", allow_keys=tmp_path / "allowed")
        boot = await Bootstrap.create(config)
        clients = {}
        try:
            for name, keypair in (("listed", listed), ("other", other)):
                clients[name] = RpcClient(name, keypair=keypair)
                clients[name].set_server_key(boot.address, boot.keypair.public)
            joined = await clients["listed"].call(boot.address, _join(boot, 7001), timeout=5)
            with pytest.raises(RpcTimeout):  # the handshake is refused: not even the token helps
                await clients["other"].call(boot.address, _join(boot, 7002), timeout=0.5)
            assert [r.id for r in boot.registry.table.rows()] == [joined.node_id]
        finally:
            for client in clients.values():
                await client.stop()
            await boot.stop()

    asyncio.run(body())


def test_only_keys_on_the_hosts_list_are_offered_to_the_planner_as_hosts(tmp_path):
    from transport.security import create_keypair

    async def body():
        listed = create_keypair(tmp_path / "hosts", "h1")
        config = BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path / "boot", hosts=tmp_path / "hosts")
        swarm = SwarmSpec(task="seq_cls", num_labels=4, min_nodes=5, assign_after_s=600)
        boot = await Bootstrap.create(config, swarm=swarm)
        clients = [RpcClient("listed", keypair=listed), RpcClient("other", keypair=Keypair.generate())]
        try:
            ids = []
            for port, client in enumerate(clients, 7001):
                client.set_server_key(boot.address, boot.keypair.public)
                ids.append((await client.call(boot.address, _join(boot, port), timeout=5)).node_id)
            assert [boot._offer(n)[2] for n in ids] == [True, False]
        finally:
            for client in clients:
                await client.stop()
            await boot.stop()

    asyncio.run(body())
