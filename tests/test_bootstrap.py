"""Bootstrap: liveness state machine, membership logic, and the service over real sockets."""

from __future__ import annotations

import pytest

from nodes.config import BootstrapConfig
from nodes.liveness import (
    ALIVE,
    DEAD,
    LEFT,
    SUSPECT,
    silence,
    status_after_heartbeat,
    status_after_silence,
)
from nodes.peer_table import MemoryPeerTable, open_peer_table
from nodes.registry import Registry, RequestError

# --- liveness as a pure function --------------------------------------------------------


@pytest.mark.parametrize(
    "status, silent, expected",
    [
        (ALIVE, 0.0, ALIVE),
        (ALIVE, 5.9, ALIVE),
        (ALIVE, 6.0, SUSPECT),
        (ALIVE, 14.9, SUSPECT),
        (ALIVE, 15.0, DEAD),
        (SUSPECT, 1.0, ALIVE),
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


@pytest.mark.parametrize(
    "status, expected", [(ALIVE, ALIVE), (SUSPECT, ALIVE), (DEAD, ALIVE), (LEFT, None)]
)
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


# --- registry (membership logic, no sockets) ----------------------------------------------

CONFIG = BootstrapConfig(
    bind="127.0.0.1:0", heartbeat_s=1.0, suspect_after_s=3.0, dead_after_s=6.0, restart_grace_s=5.0
)


def _join(registry: Registry, now: float = 0.0, **overrides) -> int:
    fields = dict(
        address="127.0.0.1:7001", memory_mb=8000, bandwidth_mbps=50.0, compute_score=10.0, has_data=False
    )
    fields.update(overrides)
    return registry.join(now=now, **fields).node_id


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
        now=50.0, node_id=node, address="127.0.0.1:7009", memory_mb=4000, bandwidth_mbps=5.0,
        compute_score=1.0, has_data=False,
    )

    row = registry.table.get(node)
    assert result.node_id == node and result.rejoined
    assert row.status == ALIVE and row.address == "127.0.0.1:7009" and row.memory_mb == 4000
    assert row.cluster == 3 and row.split == 2


def test_rejoin_with_unknown_id_gets_a_new_one():
    registry = Registry(MemoryPeerTable(), CONFIG, now=0.0)

    result = registry.join(
        now=0.0, node_id=77, address="127.0.0.1:7001", memory_mb=1, bandwidth_mbps=1.0,
        compute_score=0.0, has_data=False,
    )

    assert result.node_id == 1 and not result.rejoined


@pytest.mark.parametrize(
    "overrides, code",
    [
        ({"address": "nonsense"}, "bad_address"),
        ({"address": "0.0.0.0:7001"}, "bad_address"),
        ({"address": "127.0.0.1:0"}, "bad_address"),
        ({"memory_mb": 0}, "bad_request"),
        ({"bandwidth_mbps": 0.0}, "bad_request"),
        ({"compute_score": -1.0}, "bad_request"),
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
