"""Contract tests for the peer table, run against every backend, plus SQLite restarts."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest

from atlas_p2p.capabilities import Capabilities
from nodes.peer_table import (
    COLUMNS,
    DB_FILENAME,
    MemoryPeerTable,
    PeerTable,
    PeerTableError,
    SqlitePeerTable,
    new_record,
    open_peer_table,
)


def _record(node_id: int, now: float = 100.0, has_data: bool = False, **overrides):
    offer = Capabilities(memory_bytes=8_000_000_000, bandwidth_bps=50_000_000, compute_score=12.5, has_data=has_data)
    return new_record(node_id, offer, **{"address": "127.0.0.1:7001", "now": now, "model": None, **overrides})


@pytest.fixture(params=["memory", "sqlite"])
def table(request, tmp_path) -> PeerTable:
    backend = MemoryPeerTable() if request.param == "memory" else open_peer_table(tmp_path / "state")
    yield backend
    backend.close()


def test_allocated_ids_are_fresh_and_ordered(table):
    ids = [table.allocate_id() for _ in range(3)]

    assert ids == [1, 2, 3]


def test_put_then_get_returns_the_same_record(table):
    record = _record(table.allocate_id(), public_key="k" * 40, model="tiny-gpt2")

    table.put(record)

    assert table.get(record.id) == record
    assert table.get(9999) is None
    assert table.get(2**64) is None


def test_new_record_is_alive_with_nothing_assigned(table):
    record = _record(table.allocate_id())

    row = record.to_dict()

    assert row["status"] == "alive"
    assert row["role"] == "helper"
    assert row["cluster"] is None and row["split"] is None and row["helper"] is None
    assert set(row) == set(COLUMNS)


def test_update_changes_only_named_columns(table):
    record = _record(table.allocate_id())
    table.put(record)

    updated = table.update(record.id, status="suspect", last_seen=150.0, cluster=2)

    assert updated.status == "suspect" and updated.last_seen == 150.0 and updated.cluster == 2
    assert updated.address == record.address and updated.memory_bytes == record.memory_bytes


@pytest.mark.parametrize(
    "fields",
    [
        {"status": "sleeping"},
        {"memory_bytes": "lots"},
        {"memory_bytes": True},
        {"bandwidth_bps": None},
        {"no_such_column": 1},
        {"id": 42},
        {"has_data": 1},
        {"round": 2**63},
    ],
)
def test_update_rejects_bad_fields_and_changes_nothing(table, fields):
    record = _record(table.allocate_id())
    table.put(record)

    with pytest.raises(ValueError):
        table.update(record.id, **fields)

    assert table.get(record.id) == record


def test_update_unknown_id_raises_key_error(table):
    with pytest.raises(KeyError):
        table.update(404, status="dead")


def test_update_many_is_all_or_nothing(table):
    a, b = _record(table.allocate_id()), _record(table.allocate_id())
    table.put(a)
    table.put(b)

    with pytest.raises(KeyError):
        table.update_many({a.id: {"status": "dead"}, 404: {"status": "dead"}})

    assert table.get(a.id).status == "alive"

    table.update_many({a.id: {"status": "dead"}, b.id: {"status": "suspect"}})

    assert [r.status for r in table.rows()] == ["dead", "suspect"]


def test_rows_are_in_id_order(table):
    for node_id in [10, 2, 10000, 1]:
        table.put(_record(node_id))

    assert [r.id for r in table.rows()] == [1, 2, 10, 10000]


def test_meta_round_trips(table):
    assert table.get_meta("seed") is None

    table.set_meta("seed", "1234")

    assert table.get_meta("seed") == "1234"


def test_record_rejects_unknown_status():
    with pytest.raises(ValueError, match="status"):
        dataclasses.replace(_record(1), status="zombie")


# --- SQLite specifics -------------------------------------------------------------


def test_sqlite_restart_sees_same_rows_ids_and_meta(tmp_path):
    state = tmp_path / "state"
    first = open_peer_table(state)
    a = _record(first.allocate_id())
    b = _record(first.allocate_id(), has_data=True)
    first.put(a)
    first.put(b)
    first.update(b.id, status="dead", base_version=3)
    first.set_meta("seed", "77")
    # no close(): the process may die without a clean shutdown

    second = open_peer_table(state)

    assert [r.id for r in second.rows()] == [a.id, b.id]
    assert second.get(b.id).status == "dead" and second.get(b.id).base_version == 3
    assert second.get(b.id).has_data is True
    assert second.get_meta("seed") == "77"
    assert second.allocate_id() == 3
    first.close()
    second.close()


def test_sqlite_uses_wal_journal(tmp_path):
    table = open_peer_table(tmp_path)
    table.put(_record(table.allocate_id()))

    mode = sqlite3.connect(tmp_path / DB_FILENAME).execute("PRAGMA journal_mode").fetchone()[0]

    assert mode == "wal"
    table.close()


def test_sqlite_adds_missing_columns_of_an_older_file(tmp_path):
    path = tmp_path / DB_FILENAME
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE peers (id INTEGER PRIMARY KEY, address TEXT, memory_mb INTEGER, bandwidth_mbps REAL,"
        " compute_score REAL, has_data INTEGER, status TEXT, joined_at REAL, last_seen REAL)"
    )
    conn.execute("INSERT INTO peers VALUES (1, '127.0.0.1:9', 100, 1.0, 1.0, 0, 'alive', 1.0, 2.0)")
    conn.commit()
    conn.close()

    table = SqlitePeerTable(path)

    row = table.get(1)
    assert row.cluster is None and row.base_version is None and row.has_data is False
    assert (row.memory_bytes, row.bandwidth_bps) == (100_000_000, 1_000_000)  # MB and Mbit/s carried over
    table.close()


def test_state_dir_that_is_a_file_is_a_clear_error(tmp_path):
    blocker = tmp_path / "state"
    blocker.write_text("not a dir")

    with pytest.raises(PeerTableError, match="not a directory"):
        open_peer_table(blocker)


def test_garbage_database_file_is_a_clear_error(tmp_path):
    (tmp_path / DB_FILENAME).write_bytes(b"this is not an sqlite database" * 100)

    with pytest.raises(PeerTableError, match="damaged: .*not a usable SQLite database"):
        open_peer_table(tmp_path)


def test_close_is_idempotent(tmp_path):
    table = open_peer_table(tmp_path)

    table.close()
    table.close()
