"""The bootstrap's peer table: one row per node ever joined, in memory or in SQLite.

Two backends behind one interface (`PeerTable`), checked by one contract test suite:
`MemoryPeerTable` (tests, throw-away swarms) and `SqlitePeerTable` (the real service:
a file under `--state DIR` in WAL mode, so a bootstrap killed with SIGKILL and started
again on the same directory sees the same peers, ids and settings).

The columns are the fields of `PeerRecord`; the SQL schema is derived from them, and
opening an older file adds any missing column, so a new column is one new field with a
default. Offers are stored in base units (bytes, bit/s); a file from when rows held
decimal MB and Mbit/s (`memory_mb`, `bandwidth_mbps`) is converted once on opening.
Small string settings that must survive a restart (the id counter, the fingerprint
seed, the state's incarnation) live in a key/value `meta` table.

`open_peer_table` checks a state directory before using it (nodes/state_seal.py): a
damaged or partial state is refused with `DamagedStateError` naming the directory and
what is wrong, or, with `fresh=True`, set aside and replaced by a new incarnation.
"""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas_p2p.capabilities import Capabilities
from atlas_p2p.validation import is_int, is_number
from atlas_p2p.vocabulary import HELPER, OWNER
from nodes.liveness import ALIVE, STATUSES
from nodes.state_seal import (
    INCARNATION_KEY,
    NEXT_ID_KEY,
    SEAL_FILENAME,
    Seal,
    StateDamaged,
    diagnose,
    new_incarnation,
    read_db_facts,
    read_seal,
    set_aside,
    write_seal,
)

log = logging.getLogger(__name__)

DB_FILENAME = "peers.sqlite3"
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # what an SQLite INTEGER holds


class PeerTableError(RuntimeError):
    """The state directory or database cannot be used (not a directory, not a database, ...)."""


class DamagedStateError(PeerTableError):
    """The state directory holds a damaged or partial state (refused unless started fresh)."""


@dataclass(frozen=True)
class PeerRecord:
    """One node as the bootstrap sees it; `to_dict()` is the row `peers` returns."""

    id: int  # node id assigned at first join (1, 2, ...), kept across rejoins
    address: str  # HOST:PORT of the node's own RPC server
    memory_bytes: int  # memory budget offered, bytes
    bandwidth_bps: int  # uplink offered, bits per second
    compute_score: float  # relative compute (GFLOP/s measured by the node)
    has_data: bool  # False: a pure helper that lends compute
    status: str  # alive | suspect | dead | left
    joined_at: float  # unix time of the latest join
    last_seen: float  # unix time of the latest join or heartbeat
    model: str | None = None  # model the node said it runs
    public_key: str | None = None  # CurveZMQ public key (z85), if any
    role: str | None = None  # owner | helper before planning; then the plan's whole | owner | helper | waiting
    state: str | None = None  # lifecycle state reported by the node's heartbeat
    round: int | None = None  # merge round the node reports
    base_version: int | None = None  # versioned base the node runs
    cluster: int | None = None  # cluster id, None until assigned
    split: int | None = None  # split layer, None until assigned
    helper: int | None = None  # node id of its helper, None until assigned
    ranks: str | None = None  # short summary of its LoRA ranks ("12 mods r2-16"), None until assigned
    anchor: bool = False  # publishes its cluster's round manifests (lowest live member id)
    reason: str | None = None  # the planner's one-line explanation of the row
    base_digest: str | None = None  # sha256 of the base the node loaded, once the bootstrap accepted it
    psi: float | None = None  # Fisher leakage of what it sends at its split (with --privacy-floor), None: not measured
    dp_epsilon: float | None = None  # epsilon of its fingerprint's sample-level DP release, None: released without DP
    dp_delta: float | None = None  # and its delta
    reachable: bool | None = None  # the bootstrap dialled its address back at its latest join (None: not yet)
    via: str | None = None  # the relay its address goes through (nobody can dial it directly), None: direct
    relay: str | None = None  # the relay it volunteers for nodes nobody can dial (--relay), None: none

    def __post_init__(self) -> None:
        _check_values({name: getattr(self, name) for name in COLUMNS})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready row (plain str/int/float/bool/None values)."""
        return dataclasses.asdict(self)

    @property
    def capabilities(self) -> Capabilities:
        """What the node offered at its latest join."""
        return Capabilities(
            memory_bytes=self.memory_bytes,
            bandwidth_bps=self.bandwidth_bps,
            compute_score=self.compute_score,
            has_data=self.has_data,
        )


_HINTS: dict[str, Any] = typing.get_type_hints(PeerRecord)
COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PeerRecord))


def _base_type(hint: Any) -> tuple[type, bool]:
    """(python type, nullable) of a column annotation such as `int | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


# column -> (python type, nullable), worked out once: a table read builds thousands of records
_KINDS: dict[str, tuple[type, bool]] = {name: _base_type(hint) for name, hint in _HINTS.items()}


def _check_values(values: Mapping[str, Any]) -> None:
    """Raise ValueError unless every (column, value) pair fits the column's type."""
    for name, value in values.items():
        if name not in _KINDS:
            raise ValueError(f"unknown peer table column {name!r}")
        kind, nullable = _KINDS[name]
        if value is None:
            if not nullable:
                raise ValueError(f"column {name!r} cannot be None")
            continue
        if kind is float:
            ok = is_number(value, finite=False)
        elif kind is int:
            ok = is_int(value) and INT64_MIN <= value <= INT64_MAX
        else:
            ok = isinstance(value, kind)
        if not ok:
            raise ValueError(f"column {name!r} expects {kind.__name__} (64-bit for int), got {value!r:.60}")
    if "status" in values and values["status"] not in STATUSES:
        raise ValueError(f"column 'status' must be one of {STATUSES}, got {values['status']!r}")


class PeerTable(ABC):
    """Interface of the peer table. Every write is durable once the call returns."""

    @abstractmethod
    def allocate_id(self) -> int:
        """A fresh node id (1, 2, ...), never handed out before by this table; persisted."""

    @abstractmethod
    def put(self, record: PeerRecord) -> None:
        """Insert the record, or replace the row with the same id."""

    @abstractmethod
    def get(self, node_id: int) -> PeerRecord | None:
        """The row for `node_id`, or None."""

    @abstractmethod
    def rows(self) -> list[PeerRecord]:
        """All rows in id order."""

    @abstractmethod
    def count(self) -> int:
        """How many rows the table holds."""

    @abstractmethod
    def liveness(self) -> list[tuple[int, str, float]]:
        """(id, status, last_seen) of every row in id order: what the liveness sweep reads,
        without building whole records (it runs every fraction of a second)."""

    @abstractmethod
    def delete_many(self, node_ids: list[int]) -> None:
        """Remove these rows in one transaction (unknown ids are ignored); their ids are not reused."""

    @abstractmethod
    def _write_many(self, records: list[PeerRecord]) -> None:
        """Replace these rows in one transaction."""

    @abstractmethod
    def get_meta(self, key: str) -> str | None:
        """A persisted setting, or None."""

    @abstractmethod
    def set_meta(self, key: str, value: str) -> None:
        """Persist a setting."""

    @abstractmethod
    def close(self) -> None:
        """Release the backend; idempotent."""

    @property
    def incarnation(self) -> str | None:
        """The id of this state's incarnation (drawn when the state was created), if it has one."""
        return self.get_meta(INCARNATION_KEY)

    def update(self, node_id: int, **fields: Any) -> PeerRecord:
        """Change some columns of one row; KeyError if unknown id, ValueError if bad field."""
        self.update_many({node_id: fields})
        record = self.get(node_id)
        assert record is not None
        return record

    def update_many(self, changes: Mapping[int, Mapping[str, Any]]) -> None:
        """Apply {node_id: {column: value}} atomically: all rows change or none."""
        updated = []
        for node_id, fields in changes.items():
            if "id" in fields:
                raise ValueError("column 'id' cannot be changed")
            _check_values(fields)
            current = self.get(node_id)
            if current is None:
                raise KeyError(node_id)
            updated.append(dataclasses.replace(current, **fields))
        if updated:
            self._write_many(updated)

    def __enter__(self) -> PeerTable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryPeerTable(PeerTable):
    """Peer table in a dict; gone with the process."""

    def __init__(self) -> None:
        self._rows: dict[int, PeerRecord] = {}
        self._meta: dict[str, str] = {INCARNATION_KEY: new_incarnation()}  # each table is a state of its own
        self._counter = 0

    def allocate_id(self) -> int:
        self._counter += 1
        return self._counter

    def put(self, record: PeerRecord) -> None:
        self._rows[record.id] = record

    def get(self, node_id: int) -> PeerRecord | None:
        return self._rows.get(node_id)

    def rows(self) -> list[PeerRecord]:
        return [self._rows[k] for k in sorted(self._rows)]

    def count(self) -> int:
        return len(self._rows)

    def liveness(self) -> list[tuple[int, str, float]]:
        return [(r.id, r.status, r.last_seen) for r in self.rows()]

    def delete_many(self, node_ids: list[int]) -> None:
        for node_id in node_ids:
            self._rows.pop(node_id, None)

    def _write_many(self, records: list[PeerRecord]) -> None:
        for record in records:
            self._rows[record.id] = record

    def get_meta(self, key: str) -> str | None:
        return self._meta.get(key)

    def set_meta(self, key: str, value: str) -> None:
        self._meta[key] = str(value)

    def close(self) -> None:
        pass


_SQL_TYPES = {str: "TEXT", int: "INTEGER", float: "REAL", bool: "INTEGER"}


_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in dataclasses.fields(PeerRecord) if f.default is not dataclasses.MISSING
}


def _column_sql(name: str) -> str:
    """Column definition; a column with a default gets it, so older files migrate cleanly."""
    kind, _ = _base_type(_HINTS[name])
    sql = f'"{name}" {_SQL_TYPES[kind]}'
    if name == "id":
        return sql + " PRIMARY KEY"
    default = _DEFAULTS.get(name)
    if default is not None:
        sql += f" DEFAULT {int(default) if isinstance(default, bool) else repr(default)}"
    return sql


class SqlitePeerTable(PeerTable):
    """Peer table in an SQLite file (WAL journal, synchronous=NORMAL).

    WAL with synchronous=NORMAL makes every committed write survive the process being
    killed (only a power cut can lose the last transactions), and readers never block
    the writer. With `seal` (its directory's seal, see nodes/state_seal.py) every id
    allocated is recorded in the seal after it is committed.
    """

    def __init__(self, path: Path | str, *, seal: Seal | None = None) -> None:
        self.path = Path(path)
        self.seal = seal
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
        except sqlite3.Error as exc:
            raise PeerTableError(f"cannot open peer table {self.path}: {exc}") from None
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise PeerTableError(f"peer table {self.path}: WAL journal not available (got {mode})")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._create_schema()
        except sqlite3.Error as exc:
            self._conn.close()
            raise PeerTableError(f"peer table {self.path} is not usable: {exc}") from None
        self._closed = False

    def _create_schema(self) -> None:
        columns = ", ".join(_column_sql(name) for name in COLUMNS)
        self._conn.execute(f"CREATE TABLE IF NOT EXISTS peers ({columns})")
        self._conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        present = {row[1] for row in self._conn.execute("PRAGMA table_info(peers)")}
        for name in COLUMNS:
            if name not in present:
                log.info("peer table %s: adding column %s", self.path, name)
                self._conn.execute(f"ALTER TABLE peers ADD COLUMN {_column_sql(name)}")
        if "memory_mb" in present and "memory_bytes" not in present:
            # a file written when rows held decimal MB and Mbit/s: carry the offers over in base units
            self._conn.execute(
                "UPDATE peers SET memory_bytes = memory_mb * 1000000, "
                "bandwidth_bps = CAST(ROUND(bandwidth_mbps * 1000000) AS INTEGER)"
            )

    def allocate_id(self) -> int:
        with self._transaction():
            current = int(self.get_meta(NEXT_ID_KEY) or "1")
            self.set_meta(NEXT_ID_KEY, str(current + 1))
        if self.seal is not None and current > self.seal.max_id:
            self.seal = Seal(self.seal.incarnation, current)
            write_seal(self.path.parent, self.seal)  # after the commit: the database stays ahead of the seal
        return current

    def put(self, record: PeerRecord) -> None:
        self._write_many([record])

    def update_many(self, changes: Mapping[int, Mapping[str, Any]]) -> None:
        """As the base method, but each row gets an UPDATE of just the named columns: no row
        is read or rewritten whole (a heartbeat touches five columns of one row)."""
        for fields in changes.values():
            if "id" in fields:
                raise ValueError("column 'id' cannot be changed")
            _check_values(fields)
        with self._transaction():
            for node_id, fields in changes.items():
                if not INT64_MIN <= node_id <= INT64_MAX:
                    raise KeyError(node_id)
                if fields:
                    sets = ", ".join(f'"{name}" = ?' for name in fields)
                    cursor = self._conn.execute(f"UPDATE peers SET {sets} WHERE id = ?", (*fields.values(), node_id))
                    found = cursor.rowcount > 0
                else:
                    found = self._conn.execute("SELECT 1 FROM peers WHERE id = ?", (node_id,)).fetchone() is not None
                if not found:
                    raise KeyError(node_id)

    def get(self, node_id: int) -> PeerRecord | None:
        if not INT64_MIN <= node_id <= INT64_MAX:
            return None  # cannot be a stored id (and SQLite cannot even bind it)
        cursor = self._conn.execute(f"SELECT {self._select} FROM peers WHERE id = ?", (node_id,))
        row = cursor.fetchone()
        return None if row is None else self._from_row(row)

    def rows(self) -> list[PeerRecord]:
        return [self._from_row(r) for r in self._conn.execute(f"SELECT {self._select} FROM peers ORDER BY id")]

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM peers").fetchone()[0])

    def liveness(self) -> list[tuple[int, str, float]]:
        return [
            (int(i), str(status), float(seen))
            for i, status, seen in self._conn.execute("SELECT id, status, last_seen FROM peers ORDER BY id")
        ]

    def delete_many(self, node_ids: list[int]) -> None:
        with self._transaction():
            self._conn.executemany("DELETE FROM peers WHERE id = ?", [(n,) for n in node_ids])

    def _write_many(self, records: list[PeerRecord]) -> None:
        placeholders = ", ".join("?" for _ in COLUMNS)
        sql = f"INSERT OR REPLACE INTO peers ({self._select}) VALUES ({placeholders})"
        with self._transaction():
            self._conn.executemany(sql, [tuple(getattr(r, c) for c in COLUMNS) for r in records])

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, str(value)))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._conn.close()

    _select = ", ".join(f'"{c}"' for c in COLUMNS)

    @staticmethod
    def _from_row(row: tuple) -> PeerRecord:
        values = dict(zip(COLUMNS, row))
        for name, value in values.items():
            kind, _ = _KINDS[name]
            if value is not None and kind is bool:
                values[name] = bool(value)
            elif value is not None and kind is float:
                values[name] = float(value)
        return PeerRecord(**values)

    def _transaction(self) -> _Transaction:
        return _Transaction(self._conn)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error; nests as a no-op."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._outer = False

    def __enter__(self) -> None:
        if not self._conn.in_transaction:
            self._conn.execute("BEGIN IMMEDIATE")
            self._outer = True

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if not self._outer:
            return
        self._conn.execute("ROLLBACK" if exc_type is not None else "COMMIT")


def open_peer_table(state_dir: Path | str | None, *, fresh: bool = False) -> PeerTable:
    """SQLite table in `state_dir` (created if missing), or an in-memory one for None.

    An existing state is checked first (nodes/state_seal.py). A damaged or partial one
    raises DamagedStateError naming the directory and the damage; with `fresh` its files
    are moved into a `damaged-<time>` folder instead and a new state (a new incarnation,
    ids above the highest the old seal recorded) is started.
    """
    if state_dir is None:
        return MemoryPeerTable()
    directory = Path(state_dir)
    if directory.exists() and not directory.is_dir():
        raise PeerTableError(f"state dir {directory} exists and is not a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PeerTableError(f"cannot create state dir {directory}: {exc.strerror or exc}") from None
    try:
        return _open_sealed(directory)
    except StateDamaged as exc:
        if not fresh:
            raise DamagedStateError(
                f"state dir {directory} is damaged: {exc.problem}; refusing to start with a partial peer table "
                "(bootstrap --fresh-state sets the damaged files aside and starts a new incarnation)"
            ) from None
        return _start_fresh(directory, exc.problem)


_STATE_FILES = [DB_FILENAME, DB_FILENAME + "-wal", DB_FILENAME + "-shm", SEAL_FILENAME]


def _open_sealed(directory: Path) -> SqlitePeerTable:
    """Open the state in `directory` if its database and its seal agree; StateDamaged otherwise."""
    seal = read_seal(directory)
    path = directory / DB_FILENAME
    facts = read_db_facts(path) if path.exists() else None
    problem = diagnose(facts, seal)
    if problem is not None:
        raise StateDamaged(problem)
    table = SqlitePeerTable(path, seal=seal)
    if seal is None:  # a new state, or one from before seals: seal it now
        incarnation = table.incarnation or new_incarnation()
        if table.incarnation is None:
            table.set_meta(INCARNATION_KEY, incarnation)
        table.seal = Seal(incarnation, int(table.get_meta(NEXT_ID_KEY) or "1") - 1)
        write_seal(directory, table.seal)
        if facts is not None and facts.tables:
            log.info("state dir %s: sealed a state from before seals as incarnation %s", directory, incarnation)
        else:
            log.info("state dir %s: a new state, incarnation %s", directory, incarnation)
    return table


def _start_fresh(directory: Path, problem: str) -> SqlitePeerTable:
    """Move the damaged state aside and open a new one whose ids start above the old seal's."""
    try:
        old = read_seal(directory)
    except StateDamaged:
        old = None
    aside = set_aside(directory, _STATE_FILES)
    table = _open_sealed(directory)
    if old is not None and old.max_id > 0:
        table.set_meta(NEXT_ID_KEY, str(old.max_id + 1))
        table.seal = Seal(table.seal.incarnation, old.max_id)
        write_seal(directory, table.seal)
    log.warning(
        "state dir %s was damaged (%s): moved its files to %s and started incarnation %s",
        directory,
        problem,
        aside,
        table.incarnation,
    )
    return table


def new_record(
    node_id: int,
    capabilities: Capabilities,
    *,
    address: str,
    now: float,
    model: str | None = None,
    public_key: str | None = None,
    via: str | None = None,
    relay: str | None = None,
) -> PeerRecord:
    """Row for a node that has just joined: alive, "joining", seen now, nothing assigned yet."""
    return PeerRecord(
        id=node_id,
        address=address,
        **dataclasses.asdict(capabilities),
        status=ALIVE,
        joined_at=now,
        last_seen=now,
        model=model,
        public_key=public_key,
        role=OWNER if capabilities.has_data else HELPER,
        state="joining",
        via=via,
        relay=relay,
    )
