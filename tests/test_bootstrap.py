"""Bootstrap: liveness state machine, membership logic, and the service over real sockets."""

from __future__ import annotations

import asyncio
import dataclasses

import msgpack
import pytest
import zmq
import zmq.asyncio

from atlas_p2p.capabilities import Capabilities
from benchmarks.bootstrap_restart import SPEC, build_state
from nodes.bootstrap import Bootstrap, read_bootstrap_info
from nodes.config import BootstrapConfig
from nodes.liveness import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    Probation,
    silence,
    status_after_heartbeat,
    status_after_silence,
)
from nodes.peer_table import MemoryPeerTable, PeerTableError, open_peer_table
from nodes.registry import EXPIRED, Registry, RequestError
from scenarios.waiting import wait_until_async
from tests.aio import run
from tests.peer_rows import PEER_ROW_KEYS
from transport.codec import decode
from transport.messages import Beat, Envelope, Heartbeat, Join, Leave, Ok, PeerList, Peers, Welcome
from transport.rpc import RpcClient, RpcError

# --- liveness as a pure function --------------------------------------------------------


@pytest.mark.parametrize(
    "status, silent, expected",
    [
        (ALIVE, 0.0, ALIVE),
        (ALIVE, 5.9, ALIVE),
        (ALIVE, 6.0, SUSPECT),
        (ALIVE, 14.9, SUSPECT),
        (ALIVE, 15.0, DEAD),
        (SUSPECT, 1.0, SUSPECT),  # silence never revives (a restart's grace must not)
        (SUSPECT, 7.0, SUSPECT),
        (SUSPECT, 99.0, DEAD),
        (DEAD, 0.0, DEAD),
        (DEAD, 99.0, DEAD),
        (LEFT, 0.0, LEFT),
        (LEFT, 99.0, LEFT),
    ],
)
def test_status_after_silence(status, silent, expected):
    assert status_after_silence(status, silent, suspect_after_s=6.0, dead_after_s=15.0) == expected


@pytest.mark.parametrize("status, expected", [(ALIVE, ALIVE), (SUSPECT, ALIVE), (DEAD, ALIVE), (LEFT, None)])
def test_status_after_heartbeat(status, expected):
    assert status_after_heartbeat(status) == expected


def test_unknown_status_is_rejected():
    with pytest.raises(ValueError, match="zombie"):
        status_after_silence("zombie", 1.0, 6.0, 15.0)
    with pytest.raises(ValueError, match="zombie"):
        status_after_heartbeat("zombie")


def test_silence_counts_from_restart_plus_grace_at_the_earliest():
    assert silence(now=100.0, last_seen=90.0, started_at=0.0, grace_s=10.0) == 10.0
    assert silence(now=100.0, last_seen=10.0, started_at=95.0, grace_s=10.0) == -5.0
    assert silence(now=120.0, last_seen=10.0, started_at=95.0, grace_s=10.0) == 15.0


def test_grace_only_covers_nodes_last_heard_before_the_restart():
    # heard after this run started: no grace, a crash is noticed after dead_after_s
    assert silence(now=100.0, last_seen=97.0, started_at=95.0, grace_s=10.0) == 3.0


# --- registry (membership logic, no sockets) ----------------------------------------------

CONFIG = BootstrapConfig(
    bind="127.0.0.1:0", heartbeat_s=1.0, suspect_after_s=3.0, dead_after_s=6.0, restart_grace_s=5.0
)


def _join(registry: Registry, now: float = 0.0, has_data: bool = False, **fields) -> int:
    offer = Capabilities(memory_bytes=8_000_000_000, bandwidth_bps=50_000_000, compute_score=10.0, has_data=has_data)
    return registry.join(offer, now=now, **{"address": "127.0.0.1:7001", **fields}).node_id


def test_join_assigns_fresh_ids_and_rows_show_them():
    registry = Registry(MemoryPeerTable(), CONFIG, now=0.0)

    ids = [_join(registry), _join(registry, address="127.0.0.1:7002", has_data=True)]

    rows = registry.rows()
    assert ids == [1, 2]
    assert [(r["id"], r["status"], r["role"]) for r in rows] == [(1, ALIVE, "helper"), (2, ALIVE, "owner")]


def test_rejoin_with_known_id_keeps_it_and_assignment():
    registry = Registry(MemoryPeerTable(), CONFIG, now=0.0)
    node = _join(registry)
    registry.table.update(node, cluster=3, split=2, status=DEAD)

    result = registry.join(
        Capabilities(memory_bytes=4_000_000_000, bandwidth_bps=5_000_000, compute_score=1.0, has_data=False),
        now=50.0,
        node_id=node,
        incarnation=registry.incarnation,
        address="127.0.0.1:7009",
    )

    row = registry.table.get(node)
    assert result.node_id == node and result.rejoined
    assert row.status == ALIVE and row.address == "127.0.0.1:7009" and row.memory_bytes == 4_000_000_000
    assert row.cluster == 3 and row.split == 2


def test_a_rejoin_through_a_relay_keeps_the_row_and_names_the_relay():
    registry = Registry(MemoryPeerTable(), CONFIG, now=0.0)
    node = _join(registry, has_data=True)
    relay = _join(registry, address="127.0.0.1:7002", relay="127.0.0.1:7100")
    registry.table.update(node, reachable=False)

    again = _join(
        registry, node_id=node, incarnation=registry.incarnation, address="127.0.0.1:7101", via="127.0.0.1:7100"
    )

    row = registry.table.get(node)
    assert again == node and row.address == "127.0.0.1:7101" and row.via == "127.0.0.1:7100"
    assert row.reachable is None  # the new address gets its own check
    assert registry.table.get(relay).relay == "127.0.0.1:7100"


def test_rejoin_with_unknown_id_gets_a_new_one():
    registry = Registry(MemoryPeerTable(), CONFIG, now=0.0)

    result = registry.join(
        Capabilities(memory_bytes=1, bandwidth_bps=1, compute_score=0.0, has_data=False),
        now=0.0,
        node_id=77,
        address="127.0.0.1:7001",
    )

    assert result.node_id == 1 and not result.rejoined


@pytest.mark.parametrize(
    "overrides, code",
    [
        ({"address": "nonsense"}, "bad_address"),
        ({"address": "0.0.0.0:7001"}, "bad_address"),
        ({"address": "127.0.0.1:0"}, "bad_address"),
        ({"via": "0.0.0.0:7100"}, "bad_address"),
        ({"relay": "nonsense"}, "bad_address"),
        ({"relay": "10.0.0.9:7100"}, "bad_address"),  # a volunteer's relay is on its own host
    ],
)
def test_bad_join_is_refused_and_changes_nothing(overrides, code):
    registry = Registry(MemoryPeerTable(), CONFIG, now=0.0)

    with pytest.raises(RequestError) as caught:
        _join(registry, **overrides)

    assert caught.value.code == code
    assert registry.rows() == []


def test_silence_walks_alive_suspect_dead_and_heartbeat_revives():
    registry = Registry(MemoryPeerTable(), CONFIG, now=-100.0)  # started long ago: no grace left
    node = _join(registry, now=0.0)

    assert registry.sweep(2.0) == []
    assert registry.sweep(3.5) == [(node, ALIVE, SUSPECT)]
    assert registry.sweep(6.5) == [(node, SUSPECT, DEAD)]
    assert registry.sweep(100.0) == []

    registry.heartbeat(node, now=101.0, state="waiting", round=4, base_version=2)

    row = registry.table.get(node)
    assert (row.status, row.state, row.round, row.base_version, row.last_seen) == (ALIVE, "waiting", 4, 2, 101.0)


def test_leave_is_sticky_and_a_later_heartbeat_must_rejoin():
    registry = Registry(MemoryPeerTable(), CONFIG, now=-100.0)
    node = _join(registry, now=0.0)

    registry.leave(node, now=1.0)
    registry.leave(node, now=2.0)

    assert registry.table.get(node).status == LEFT
    assert registry.sweep(1000.0) == []
    with pytest.raises(RequestError) as caught:
        registry.heartbeat(node, now=3.0)
    assert caught.value.code == "unknown_node"


@pytest.mark.parametrize("request_name", ["heartbeat", "leave"])
def test_unknown_node_is_told_to_rejoin(request_name):
    registry = Registry(MemoryPeerTable(), CONFIG, now=0.0)

    with pytest.raises(RequestError) as caught:
        getattr(registry, request_name)(42, now=1.0)

    assert caught.value.code == "unknown_node"


def test_restart_on_same_state_keeps_peers_seed_and_gives_grace(tmp_path):
    first = Registry(open_peer_table(tmp_path), CONFIG, now=-100.0)
    a, b = _join(first, now=0.0), _join(first, now=0.0, address="127.0.0.1:7002")
    first.sweep(10.0)  # both silent for 10 s: dead before the "crash"
    first.heartbeat(a, now=10.0)  # a came back just before the crash
    seed = first.fingerprint_seed

    second = Registry(open_peer_table(tmp_path), CONFIG, now=100.0)  # restarted 90 s later

    assert [r["id"] for r in second.rows()] == [a, b]
    assert second.fingerprint_seed == seed
    assert second.sweep(104.0) == []  # within grace (5 s): nobody is marked
    assert second.sweep(108.5) == [(a, ALIVE, SUSPECT)]  # 3.5 s after the grace ended
    assert second.table.get(b).status == DEAD  # dead stays dead across the restart
    assert _join(second, now=109.0, address="127.0.0.1:7003") == 3  # id counter persisted


def test_explicit_seed_wins_over_stored_one(tmp_path):
    Registry(open_peer_table(tmp_path), BootstrapConfig(bind="127.0.0.1:0", fingerprint_seed=5), now=0.0)

    registry = Registry(open_peer_table(tmp_path), BootstrapConfig(bind="127.0.0.1:0", fingerprint_seed=9), now=0.0)

    assert registry.fingerprint_seed == 9


def test_join_repeated_by_the_same_client_keeps_its_first_id():
    registry = Registry(MemoryPeerTable(), CONFIG, now=0.0)

    first = _join(registry, client="node-abc")
    again = _join(registry, now=1.0, client="node-abc")
    other = _join(registry, now=1.0, client="node-xyz", address="127.0.0.1:7002")

    assert first == again == 1 and other == 2
    assert len(registry.rows()) == 2


def test_an_id_from_another_incarnation_is_unknown_and_never_takes_over_a_row():
    registry = Registry(MemoryPeerTable(), CONFIG, now=0.0)
    holder = _join(registry, address="127.0.0.1:7001")  # id 1 of this incarnation

    returning = _join(registry, now=1.0, address="127.0.0.1:7002", node_id=holder, incarnation="0123abcd")
    legacy = _join(registry, now=2.0, address="127.0.0.1:7003", node_id=holder)  # a node.json from before incarnations

    assert holder == 1 and returning == 2 and legacy == 3
    assert registry.table.get(holder).address == "127.0.0.1:7001" and registry.table.get(holder).joined_at == 0.0
    with pytest.raises(RequestError) as caught:
        registry.heartbeat(holder, now=3.0, incarnation="0123abcd")
    assert caught.value.code == "unknown_node"
    assert registry.table.get(holder).last_seen == 0.0
    assert registry.heartbeat(holder, now=3.0, incarnation=registry.incarnation).last_seen == 3.0


def test_a_full_table_refuses_new_nodes_and_changes_nothing_but_rejoins_pass():
    registry = Registry(MemoryPeerTable(), dataclasses.replace(CONFIG, max_nodes=2), now=0.0)
    first, _ = _join(registry), _join(registry, address="127.0.0.1:7002")
    rows = registry.rows()

    with pytest.raises(RequestError) as caught:
        _join(registry, now=1.0, address="127.0.0.1:7003")

    assert caught.value.code == "full" and registry.rows() == rows
    assert _join(registry, now=1.0, node_id=first, incarnation=registry.incarnation) == first


def test_sweep_deletes_rows_dead_or_left_for_expire_after_and_their_ids_stay_used():
    config = dataclasses.replace(CONFIG, expire_after_s=100.0, restart_grace_s=0.0)
    registry = Registry(MemoryPeerTable(), config, now=0.0)
    dead, gone, alive = (
        _join(registry, address=f"127.0.0.1:{7001 + i}", public_key=f"key-of-{name}")
        for i, name in enumerate(("dead", "gone", "alive"))
    )
    registry.leave(gone, now=50.0)
    assert registry.public_keys([alive, dead]) == {str(dead): "key-of-dead", str(alive): "key-of-alive"}

    def sweep(now: float) -> list[tuple[int, str, str]]:
        registry.heartbeat(alive, now=now)
        return registry.sweep(now)

    sweep(10.0)  # dead is dead from 10 s; its silence counts from its last heartbeat (0 s)

    early = sweep(99.0)
    first = sweep(100.0)
    second = sweep(150.0)

    assert early == [] and first == [(dead, DEAD, EXPIRED)] and second == [(gone, LEFT, EXPIRED)]
    assert [r["id"] for r in registry.rows()] == [alive]
    assert registry.node_of("key-of-dead") is None and set(registry._ids_by_key.values()) == {alive}
    assert registry.public_keys([dead, gone, alive, 99]) == {str(alive): "key-of-alive"}
    assert _join(registry, now=151.0, node_id=dead, incarnation=registry.incarnation) == 4  # joins as new


# --- the service over real sockets on 127.0.0.1 -------------------------------------------

# The service tests speak plain TCP (insecure): what they check is the membership logic;
# keys and who may send what are tests/test_identity.py's.
SERVICE = BootstrapConfig(
    bind="127.0.0.1:0",
    insecure=True,
    heartbeat_s=0.5,
    suspect_after_s=1.5,
    dead_after_s=3.0,
    restart_grace_s=0.0,
    sweep_s=0.05,
)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _join_body(**overrides) -> Join:
    fields = dict(memory_bytes=8_000_000_000, bandwidth_bps=50_000_000, compute_score=3.0, address="127.0.0.1:7001")
    fields.update(overrides)
    return Join(**fields)


async def _raw_request(address: str, frames: list[bytes], timeout: float = 3.0) -> Envelope:
    """Send arbitrary frames from a bare DEALER and decode the reply."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(f"tcp://{address}")
    try:
        await sock.send_multipart(frames)
        reply = await asyncio.wait_for(sock.recv_multipart(), timeout)
    finally:
        sock.close(linger=0)
    return decode(reply)


def _header(msg_type: str, body: dict, msg_id: int = 7) -> bytes:
    return msgpack.packb({"v": 1, "type": msg_type, "id": msg_id, "src": "raw", "body": body})


def test_service_join_heartbeat_peers_leave(tmp_path):
    async def body():
        service = await Bootstrap.create(
            BootstrapConfig(bind="127.0.0.1:0", state_dir=tmp_path, model="tiny", insecure=True)
        )
        client = await RpcClient.create("test-client")
        try:
            welcome = await client.call(service.address, _join_body(has_data=True), timeout=3)
            assert isinstance(welcome, Welcome)
            assert (welcome.node_id, welcome.model, welcome.heartbeat_s) == (1, "tiny", 2.0)
            assert welcome.fingerprint_seed == service.registry.fingerprint_seed

            beat = Heartbeat(node_id=1, state="training", round=2, base_version=1)
            assert isinstance(await client.call(service.address, beat, timeout=3), Ok)

            listing = await client.call(service.address, Peers(), timeout=3)
            assert isinstance(listing, PeerList)
            (row,) = listing.rows
            assert row["id"] == 1 and row["status"] == "alive" and row["state"] == "training"
            assert row["memory_bytes"] == 8_000_000_000 and row["has_data"] is True and row["role"] == "owner"
            assert PEER_ROW_KEYS <= set(row), sorted(PEER_ROW_KEYS - set(row))

            assert isinstance(await client.call(service.address, Leave(node_id=1), timeout=3), Ok)
            assert service.registry.table.get(1).status == "left"
            assert read_bootstrap_info(tmp_path)["address"] == service.address
        finally:
            await client.stop()
            await service.stop()

    run(body())


def test_service_rejoin_keeps_id_and_unknown_ids_are_told_to_rejoin():
    async def body():
        service = await Bootstrap.create(SERVICE)
        client = await RpcClient.create("test-client")
        try:
            first = await client.call(service.address, _join_body(), timeout=3)
            other = await RpcClient.create("another-process")
            again = await other.call(
                service.address, _join_body(node_id=first.node_id, incarnation=first.incarnation), timeout=3
            )
            await other.stop()
            assert again.node_id == first.node_id

            with pytest.raises(RpcError) as caught:
                await client.call(service.address, Heartbeat(node_id=99, state="waiting"), timeout=3)
            assert caught.value.code == "unknown_node"
            with pytest.raises(RpcError) as caught:
                await client.call(service.address, _join_body(address="0.0.0.0:1"), timeout=3)
            assert caught.value.code == "bad_address"
            assert service.stats["unknown_node"] == 1 and service.stats["bad_address"] == 1
        finally:
            await client.stop()
            await service.stop()

    run(body())


@pytest.mark.parametrize(
    "request_body, code",
    [
        (Heartbeat(node_id=2**64 - 1, state="waiting"), "unknown_node"),
        (Heartbeat(node_id=1, state="waiting", round=2**64 - 1), "bad_request"),
        (Join(memory_bytes=2**64 - 1, bandwidth_bps=1, compute_score=1.0, address="127.0.0.1:9"), "bad_request"),
        (Join(memory_bytes=1, bandwidth_bps=1, compute_score=float("inf"), address="127.0.0.1:9"), "bad_request"),
        (Leave(node_id=12345), "unknown_node"),
    ],
    ids=["huge-node-id", "huge-round", "huge-memory", "infinite-compute", "leave-unknown"],
)
def test_well_formed_but_wrong_values_are_refused_without_harm(request_body, code):
    async def body():
        service = await Bootstrap.create(SERVICE)
        client = await RpcClient.create("test-client")
        try:
            node = (await client.call(service.address, _join_body(), timeout=3)).node_id
            before = service.registry.rows()
            with pytest.raises(RpcError) as caught:
                await client.call(service.address, request_body, timeout=3)
            assert caught.value.code == code and service.stats[code] == 1
            assert service.registry.rows() == before
            assert isinstance(
                await client.call(service.address, Heartbeat(node_id=node, state="waiting"), timeout=3), Ok
            )
        finally:
            await client.stop()
            await service.stop()

    run(body())


@pytest.mark.parametrize(
    "frames, code",
    [
        ([b"\xff\x00garbage"], "bad_header"),
        ([_header("join", {"memory_bytes": "lots"})], "bad_schema"),
        (
            [_header("join", {**_join_body().to_dict(), "memory_bytes": "lots"})],
            "bad_schema",
        ),
        ([_header("heartbeat", {"node_id": -3, "state": "waiting", "round": 0, "base_version": 0})], "bad_schema"),
        ([_header("no_such_type", {})], "unknown_type"),
        ([_header("ping", {})], "no_handler"),
        ([_header("peers", {"cluster": None}), b"extra frame"], "bad_frame_index"),
    ],
    ids=["garbage", "missing-fields", "wrong-type", "negative-id", "unknown-type", "not-served", "extra-frame"],
)
def test_bad_messages_get_an_error_reply_and_the_service_keeps_serving(frames, code):
    async def body():
        service = await Bootstrap.create(SERVICE)
        client = await RpcClient.create("test-client")
        try:
            reply = await _raw_request(service.address, frames)
            assert reply.type == "error" and reply.body.code == code
            assert service.stats[code] >= 1
            assert service.registry.rows() == []
            listing = await client.call(service.address, Peers(), timeout=3)
            assert listing.rows == []
        finally:
            await client.stop()
            await service.stop()

    run(body())


def test_sweep_marks_silent_nodes_suspect_then_dead_and_heartbeat_revives():
    async def body():
        clock = FakeClock()
        service = await Bootstrap.create(SERVICE, clock=clock)
        client = await RpcClient.create("test-client")
        try:
            node = (await client.call(service.address, _join_body(), timeout=3)).node_id
            status = lambda: service.registry.table.get(node).status  # noqa: E731

            clock.now += 2.0
            await wait_until_async(lambda: status() == "suspect", 5, what="the node seen suspect")
            clock.now += 2.0
            await wait_until_async(lambda: status() == "dead", 5, what="the node seen dead")
            await client.call(service.address, Heartbeat(node_id=node, state="waiting"), timeout=3)
            assert status() == "alive"
        finally:
            await client.stop()
            await service.stop()

    run(body())


def test_restart_on_same_state_shows_same_peers_and_known_heartbeats_revive(tmp_path):
    async def body():
        config = BootstrapConfig(
            bind="127.0.0.1:0",
            insecure=True,
            state_dir=tmp_path,
            heartbeat_s=0.5,
            suspect_after_s=1.5,
            dead_after_s=3.0,
            restart_grace_s=5.0,
        )
        first = await Bootstrap.create(config)
        client = await RpcClient.create("test-client")
        node = (await client.call(first.address, _join_body(), timeout=3)).node_id
        seed = first.registry.fingerprint_seed
        with pytest.raises(PeerTableError, match="in use"):
            await Bootstrap.create(config)  # the state dir is locked while the first runs
        await first.stop()

        second = await Bootstrap.create(config)
        try:
            assert [r["id"] for r in second.registry.rows()] == [node]
            assert second.registry.fingerprint_seed == seed
            reply = await client.call(second.address, Heartbeat(node_id=node, state="waiting"), timeout=3)
            assert isinstance(reply, Ok)
        finally:
            await client.stop()
            await second.stop()

    run(body())


def test_a_restart_binds_first_and_answers_while_it_adopts_the_rows_its_snapshot_lacks(tmp_path):
    build_state(tmp_path, nodes=12, owners=4)  # a planned swarm kept in the state, 12 rows beyond it

    async def body():
        config = BootstrapConfig(
            bind="127.0.0.1:0",
            insecure=True,
            state_dir=tmp_path,
            suspect_after_s=600.0,
            dead_after_s=900.0,
            restart_grace_s=900.0,
        )
        service = await Bootstrap.create(config, swarm=SPEC)
        client = await RpcClient.create("test-client")
        try:
            rows = [r.id for r in service.registry.table.rows()]
            reply = await client.call(service.address, Heartbeat(node_id=rows[-1], state="waiting"), timeout=30)
            assert isinstance(reply, Beat)
            await wait_until_async(
                lambda: all(service.coordinator.known(n) for n in rows), 300, what="every known row adopted"
            )
            assert service.coordinator.assigned and service.coordinator.version > 0
        finally:
            await client.stop()
            await service.stop()

    run(body())


def test_probation_lets_a_failed_node_back_after_a_wait_that_doubles_with_each_failure():
    p = Probation(10.0)
    assert not p.over(7, failed=False, now=0.0)
    assert not p.over(7, failed=True, now=100.0)  # first failure: out for 10 s from here
    assert not p.over(7, failed=True, now=109.9)
    assert p.over(7, failed=True, now=110.0)
    assert not p.over(7, failed=False, now=111.0)  # live again
    assert not p.over(7, failed=True, now=200.0)  # second failure: 20 s
    assert not p.over(7, failed=True, now=219.0)
    assert p.over(7, failed=True, now=220.0)
    assert p.failures == {7: 2}
    with pytest.raises(ValueError, match="base_s"):
        Probation(0.0)
