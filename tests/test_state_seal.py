"""A damaged or partial bootstrap state is refused with one line naming it, never opened empty.

Each damage is made on real files the way it happens: a bootstrap killed (its files copied
while the table is open), then its `-wal` deleted, its database truncated or overwritten,
its seal (`state.json`) deleted or replaced. `fresh=True` (`bootstrap --fresh-state`)
moves the damaged files aside and starts a new incarnation whose ids stay above the old ones.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from atlas_p2p.capabilities import Capabilities
from nodes.peer_table import DB_FILENAME, DamagedStateError, PeerTable, SqlitePeerTable, new_record, open_peer_table
from nodes.state_seal import SEAL_FILENAME, DbFacts, Seal, diagnose, read_seal
from tools.cli import main
from tools.exit_codes import ExitCode

OFFER = Capabilities(memory_bytes=8_000_000_000, bandwidth_bps=50_000_000, compute_score=1.0, has_data=False)


def _add_rows(table: PeerTable, n: int) -> list[int]:
    ids = [table.allocate_id() for _ in range(n)]
    for node_id in ids:
        table.put(new_record(node_id, OFFER, address=f"127.0.0.1:{7000 + node_id}", now=1.0))
    return ids


def _checkpoint(state: Path) -> None:
    """Copy the WAL's pages into the database file (what SQLite does now and then by itself)."""
    conn = sqlite3.connect(state / DB_FILENAME)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _killed_copy(state: Path, into: Path) -> Path:
    """The state dir as a SIGKILL would leave it: the files of a table that is still open."""
    shutil.copytree(state, into)
    return into


@pytest.fixture
def running(tmp_path):
    """A state with 3 rows checkpointed into the database and 2 more only in its -wal, still open."""
    state = tmp_path / "state"
    table = open_peer_table(state)
    _add_rows(table, 3)
    _checkpoint(state)
    _add_rows(table, 2)
    yield state
    table.close()


# --- what opens --------------------------------------------------------------------------


def test_a_new_state_gets_an_incarnation_and_a_seal(tmp_path):
    table = open_peer_table(tmp_path / "state")

    seal = read_seal(tmp_path / "state")
    assert seal == Seal(table.incarnation, 0) and len(table.incarnation) == 16
    table.close()


def test_the_seal_follows_every_allocated_id_and_a_reopen_continues(tmp_path):
    state = tmp_path / "state"
    first = open_peer_table(state)
    _add_rows(first, 4)
    assert read_seal(state) == Seal(first.incarnation, 4)

    second = open_peer_table(state)  # the first one never closed: a kill -9

    assert second.incarnation == first.incarnation and second.count() == 4
    assert second.allocate_id() == 5
    first.close()
    second.close()


def test_a_killed_bootstrap_with_its_wal_intact_reopens_whole(running, tmp_path):
    copy = _killed_copy(running, tmp_path / "copy")

    table = open_peer_table(copy)

    assert [r.id for r in table.rows()] == [1, 2, 3, 4, 5]
    table.close()


def test_a_state_from_before_seals_is_adopted(tmp_path):
    legacy = SqlitePeerTable(tmp_path / DB_FILENAME)  # no incarnation, no state.json
    _add_rows(legacy, 2)
    legacy.close()

    table = open_peer_table(tmp_path)

    assert table.count() == 2 and table.incarnation is not None
    assert read_seal(tmp_path) == Seal(table.incarnation, 2)
    table.close()


# --- what is refused ------------------------------------------------------------------------


def _lose_wal(copy: Path) -> None:
    (copy / (DB_FILENAME + "-wal")).unlink()


def _truncate_db(copy: Path) -> None:
    _checkpoint(copy)
    path = copy / DB_FILENAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _empty_db(copy: Path) -> None:
    _checkpoint(copy)
    (copy / DB_FILENAME).write_bytes(b"")


def _garbage_db(copy: Path) -> None:
    _checkpoint(copy)
    (copy / DB_FILENAME).write_bytes(b"not an sqlite database at all " * 200)


def _delete_db(copy: Path) -> None:
    _checkpoint(copy)
    (copy / DB_FILENAME).unlink()


def _delete_seal(copy: Path) -> None:
    (copy / SEAL_FILENAME).unlink()


def _garbage_seal(copy: Path) -> None:
    (copy / SEAL_FILENAME).write_text("{not json")


def _other_seal(copy: Path) -> None:
    (copy / SEAL_FILENAME).write_text(json.dumps({"incarnation": "00ff00ff00ff00ff", "max_id": 5}))


def _seal_ahead(copy: Path) -> None:
    seal = read_seal(copy)
    (copy / SEAL_FILENAME).write_text(json.dumps({"incarnation": seal.incarnation, "max_id": 9}))


def _contents(state: Path) -> dict[str, bytes]:
    """The bytes of the database, its -wal (if not empty) and the seal (the -shm is an index SQLite
    rebuilds, so even a read-only open may write it)."""
    files = (DB_FILENAME, DB_FILENAME + "-wal", SEAL_FILENAME)
    return {n: (state / n).read_bytes() for n in files if (state / n).exists() and (state / n).stat().st_size}


@pytest.mark.parametrize(
    "damage, needle",
    [
        (_lose_wal, "would hand out node id 4 again, but ids up to 5"),
        (_truncate_db, "disk image is malformed"),
        (_empty_db, "holds no tables"),
        (_garbage_db, "not a usable SQLite database"),
        (_delete_db, "database is missing"),
        (_delete_seal, "state.json is missing"),
        (_garbage_seal, "state.json is not a valid seal"),
        (_other_seal, "but state.json records 00ff00ff00ff00ff"),
        (_seal_ahead, "ids up to 9 were already handed out"),
    ],
)
def test_a_damaged_state_is_refused_in_one_line_and_left_as_it_was(running, tmp_path, damage, needle):
    copy = _killed_copy(running, tmp_path / "copy")
    damage(copy)
    before = _contents(copy)

    with pytest.raises(DamagedStateError) as caught:
        open_peer_table(copy)

    message = str(caught.value)
    assert needle in message and str(copy) in message and "\n" not in message
    assert _contents(copy) == before  # nothing written into it


def test_a_wal_lost_before_any_checkpoint_leaves_no_tables_and_is_refused(tmp_path):
    state = tmp_path / "state"
    table = open_peer_table(state)
    _add_rows(table, 3)
    copy = _killed_copy(state, tmp_path / "copy")
    _lose_wal(copy)

    with pytest.raises(DamagedStateError, match="no tables|no incarnation|would hand out"):
        open_peer_table(copy)
    table.close()


def test_fresh_sets_the_damaged_files_aside_and_starts_a_new_incarnation(running, tmp_path):
    copy = _killed_copy(running, tmp_path / "copy")
    _lose_wal(copy)
    old = read_seal(copy)

    table = open_peer_table(copy, fresh=True)

    (aside,) = [p for p in copy.iterdir() if p.name.startswith("damaged-")]
    assert {DB_FILENAME, SEAL_FILENAME} <= {p.name for p in aside.iterdir()}
    assert read_seal(aside) == old  # kept, not deleted
    assert table.incarnation != old.incarnation and table.count() == 0
    assert table.allocate_id() == old.max_id + 1  # never an id the old incarnation handed out
    assert read_seal(copy) == Seal(table.incarnation, old.max_id + 1)
    table.close()


def test_fresh_keeps_a_healthy_state(running, tmp_path):
    copy = _killed_copy(running, tmp_path / "copy")
    incarnation = read_seal(copy).incarnation

    table = open_peer_table(copy, fresh=True)

    assert table.incarnation == incarnation and table.count() == 5
    assert not [p for p in copy.iterdir() if p.name.startswith("damaged-")]
    table.close()


# --- the check as a pure function ------------------------------------------------------------


@pytest.mark.parametrize(
    "facts, seal, verdict",
    [
        (None, None, None),  # a new state dir
        (DbFacts(frozenset(), None, None, None), None, None),  # an empty database file, no seal
        (DbFacts(frozenset({"meta", "peers"}), None, 3, 2), None, None),  # from before seals
        (DbFacts(frozenset({"meta", "peers"}), "ab", 3, 2), Seal("ab", 2), None),  # whole
        (DbFacts(frozenset({"meta", "peers"}), "ab", None, None), Seal("ab", 0), None),  # sealed, no id yet
        (DbFacts(frozenset({"peers"}), "ab", 3, 2), Seal("ab", 2), "expected meta and peers"),
        (DbFacts(frozenset({"meta", "peers"}), "ab", 3, 7), Seal("ab", 2), "holds node id 7"),
    ],
)
def test_diagnose(facts, seal, verdict):
    problem = diagnose(facts, seal)

    assert problem is None if verdict is None else verdict in problem


# --- through the CLI -------------------------------------------------------------------------


def test_the_cli_refuses_a_damaged_state_in_one_line_with_the_state_error_code(running, tmp_path, capsys):
    copy = _killed_copy(running, tmp_path / "copy")
    _lose_wal(copy)

    code = main(["bootstrap", "--bind", "127.0.0.1:0", "--state", str(copy)])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.STATE_ERROR
    assert len(err) == 1 and str(copy) in err[0] and "--fresh-state" in err[0], err


@pytest.mark.parametrize(
    "extra, needle", [(["--expire-after", "10"], "expire_after_s"), (["--max-nodes", "0"], "max_nodes")]
)
def test_bad_expiry_and_table_bound_flags_are_one_line_and_start_nothing(tmp_path, capsys, extra, needle):
    state = tmp_path / "state"

    code = main(["bootstrap", "--bind", "127.0.0.1:0", "--state", str(state), *extra])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == ExitCode.BAD_VALUE and len(err) == 1 and needle in err[0], err
    assert not state.exists()
