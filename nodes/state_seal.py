"""Is the bootstrap's state whole? The seal of a state directory and the check on opening it.

A state is the SQLite peer table (`peers.sqlite3` plus its `-wal`/`-shm` journal files) and
a small sidecar, `state.json`, the seal: the state's incarnation (a random id drawn when
the state was created) and the highest node id ever handed out. The incarnation is also
kept in the table's meta, so the two files vouch for each other. The sidecar is replaced
atomically (temporary file, rename) after every id the table allocates, so at any moment
the database's next id is above the seal's highest id.

Opening a state compares what the database holds (`DbFacts`, read without writing) with
the seal (`diagnose`). A database missing, truncated or not SQLite, its schema or meta
gone (a lost `-wal` file takes every row written since the last checkpoint with it), an
incarnation other than the seal's, or an allocator that would hand out an id again: each
is named in one line, and the state is refused rather than opened empty or partial. On
request the damaged files are moved aside (`set_aside`, never deleted) and a new state
starts under a new incarnation, its ids above the highest the old seal recorded.

A database from before seals (tables present, no incarnation in the meta, no sidecar) is
adopted: it gets an incarnation and a seal on opening.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SEAL_FILENAME = "state.json"
INCARNATION_KEY = "incarnation"  # peer-table meta key
NEXT_ID_KEY = "next_id"  # peer-table meta key of the id allocator
TABLES = frozenset({"peers", "meta"})
_FORMAT = 1


class StateDamaged(Exception):
    """The state directory is damaged or partial; `problem` says what, in a few words."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


def new_incarnation() -> str:
    """A fresh incarnation id: 16 hex digits from the system's secure random source."""
    return secrets.token_hex(8)


def is_incarnation(value: object) -> bool:
    """Whether `value` looks like an incarnation id (1-64 lowercase hex digits)."""
    return isinstance(value, str) and 0 < len(value) <= 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class Seal:
    """What `state.json` holds: the state's incarnation and the highest node id handed out (0: none)."""

    incarnation: str
    max_id: int

    def __post_init__(self) -> None:
        if not is_incarnation(self.incarnation):
            raise ValueError(f"incarnation must be 1-64 lowercase hex digits, got {self.incarnation!r:.80}")
        if not isinstance(self.max_id, int) or isinstance(self.max_id, bool) or self.max_id < 0:
            raise ValueError(f"max_id must be an int >= 0, got {self.max_id!r:.80}")


def read_seal(directory: Path) -> Seal | None:
    """The seal of `directory`, None if it has none; StateDamaged if the file is unreadable."""
    path = directory / SEAL_FILENAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateDamaged(f"{SEAL_FILENAME} cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
        return Seal(incarnation=data["incarnation"], max_id=data["max_id"])
    except (ValueError, KeyError, TypeError) as exc:
        raise StateDamaged(f"{SEAL_FILENAME} is not a valid seal ({exc})") from None


def write_seal(directory: Path, seal: Seal) -> None:
    """Replace `directory/state.json` atomically: a reader sees the old seal or the new one."""
    tmp = directory / (SEAL_FILENAME + ".tmp")
    tmp.write_text(json.dumps({"format": _FORMAT, "incarnation": seal.incarnation, "max_id": seal.max_id}))
    tmp.replace(directory / SEAL_FILENAME)


@dataclass(frozen=True)
class DbFacts:
    """What an existing database file holds, as far as the seal check needs it."""

    tables: frozenset[str]  # names of the tables present
    incarnation: str | None  # the meta's incarnation
    next_id: int | None  # the meta's next id to allocate (None: nothing allocated yet)
    max_row_id: int | None  # highest id in the peers table (None: no rows)


def read_db_facts(path: Path) -> DbFacts:
    """Open the database read-only, run `PRAGMA quick_check` and read its tables and meta.

    Read-only so that nothing is written into a file that may be damaged (not even a
    checkpoint of its journal). StateDamaged when SQLite cannot read it or finds it corrupt.
    """
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        raise StateDamaged(f"{path.name} cannot be opened ({exc})") from None
    try:
        verdict = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
        if verdict != ["ok"]:
            raise StateDamaged(f"{path.name} fails SQLite's integrity check ({'; '.join(map(str, verdict))})")
        tables = frozenset(row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        incarnation = next_id = max_row_id = None
        if "meta" in tables:
            meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN (?, ?)", (INCARNATION_KEY, NEXT_ID_KEY)))
            incarnation = meta.get(INCARNATION_KEY)
            next_id = int(meta[NEXT_ID_KEY]) if NEXT_ID_KEY in meta else None
        if "peers" in tables:
            max_row_id = conn.execute("SELECT MAX(id) FROM peers").fetchone()[0]
    except sqlite3.Error as exc:
        raise StateDamaged(f"{path.name} is not a usable SQLite database ({exc})") from None
    except ValueError as exc:
        raise StateDamaged(f"{path.name} holds a bad id counter ({exc})") from None
    finally:
        conn.close()
    return DbFacts(tables=tables, incarnation=incarnation, next_id=next_id, max_row_id=max_row_id)


def diagnose(facts: DbFacts | None, seal: Seal | None) -> str | None:
    """What is wrong with a state whose database holds `facts` (None: no database file) and whose
    seal is `seal` (None: no sidecar); None when it may be opened (new, whole, or from before seals)."""
    if facts is None or not facts.tables:
        if seal is None:
            return None  # a new state
        what = "is missing" if facts is None else "holds no tables (truncated, or its -wal file was lost)"
        return f"the database {what}, but {SEAL_FILENAME} records incarnation {seal.incarnation} with ids up to {seal.max_id}"
    if facts.tables != TABLES:
        found = ", ".join(sorted(facts.tables))
        return f"the database holds tables {found}, expected meta and peers (not a peer table, or partly lost)"
    if seal is None:
        if facts.incarnation is None:
            return None  # a state from before seals: adopted on opening
        return f"{SEAL_FILENAME} is missing, but the database belongs to incarnation {facts.incarnation}"
    if facts.incarnation is None:
        return (
            f"the database has no incarnation but {SEAL_FILENAME} records {seal.incarnation} (its -wal file was lost?)"
        )
    if facts.incarnation != seal.incarnation:
        return f"the database is incarnation {facts.incarnation} but {SEAL_FILENAME} records {seal.incarnation}"
    next_id = facts.next_id or 1
    if next_id <= seal.max_id:
        return (
            f"the database would hand out node id {next_id} again, but ids up to {seal.max_id} were already "
            "handed out (rows lost: was its -wal file deleted?)"
        )
    if facts.max_row_id is not None and facts.max_row_id >= next_id:
        return f"the database holds node id {facts.max_row_id} but would hand it out again (next id {next_id})"
    return None


def set_aside(directory: Path, names: list[str], now: float | None = None) -> Path | None:
    """Move the files `names` of `directory` that exist into a new `damaged-<time>` folder there;
    returns that folder (None if none of them existed). Nothing is deleted."""
    present = [name for name in names if (directory / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    target = directory / f"damaged-{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = directory / f"damaged-{stamp}-{suffix}"
    target.mkdir()
    for name in present:
        (directory / name).replace(target / name)
    return target
