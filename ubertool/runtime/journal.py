"""The journal: every run and cell, durably, with the outside exchanges each cell caused.

SQLite in `$UBERTOOL_HOME/journal.sqlite` (WAL, so a CLI can read while a server writes;
synchronous=NORMAL: each commit is written before the cell is answered, so it survives the
process crashing, but not fsynced, so a power loss may take the last few). It survives
restarts; playbooks are dumped from it. Texts are stored after redaction. Exchange bodies are
BLOBs, content-addressed (SHA-256) and kept once however many cells refer to them; `prune`
removes old runs and the bodies nothing refers to any more.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ubertool.runtime.home import state_folder
from ubertool.sandbox import CellResult
from ubertool.tools.files import open_private
from ubertool.tools.recorder import Body, Exchange

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, started TEXT NOT NULL, ended TEXT,
    policy_source TEXT NOT NULL, policy_sha256 TEXT NOT NULL, session TEXT
);
CREATE TABLE IF NOT EXISTS cells (
    run_id TEXT NOT NULL, number INTEGER NOT NULL, code TEXT NOT NULL, status TEXT NOT NULL,
    stdout TEXT NOT NULL, stderr TEXT NOT NULL, value TEXT, error_type TEXT, traceback TEXT,
    duration_s REAL NOT NULL, at TEXT NOT NULL, exchanges TEXT NOT NULL,
    PRIMARY KEY (run_id, number)
);
CREATE TABLE IF NOT EXISTS bodies (sha256 TEXT PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS cell_bodies (
    run_id TEXT NOT NULL, number INTEGER NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (run_id, number, sha256)
);
CREATE INDEX IF NOT EXISTS cell_bodies_sha256 ON cell_bodies (sha256);
"""

# A run's row as `JournalRun` takes it, with its number of cells.
_SELECT_RUNS = ("SELECT r.id, r.kind, r.started, r.ended, r.policy_source, r.policy_sha256, r.session, "
                "(SELECT COUNT(*) FROM cells c WHERE c.run_id = r.id) FROM runs r")


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def encode_exchanges(exchanges: Sequence[Exchange], bodies: dict[str, bytes] | None = None) -> str:
    """Exchanges as JSON. Bodies go into `bodies` (by SHA-256, the JSON naming them) when it is
    given, else inline as base64 (a recording that stands alone)."""
    def plain(value: Any) -> Any:
        if isinstance(value, Body | bytes | bytearray):
            data = value.read() if isinstance(value, Body) else bytes(value)
            if bodies is None:
                return {"$b64": base64.b64encode(data).decode()}
            digest = value.sha256 if isinstance(value, Body) else hashlib.sha256(data).hexdigest()
            bodies[digest] = data
            return {"$sha256": digest}
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value
    return json.dumps([{"kind": e.kind, "request": e.request, "response": plain(e.response),
                        **({"reusable": True} if e.reusable else {})} for e in exchanges])


def decode_exchanges(text: str, load: Callable[[str], bytes] | None = None) -> tuple[Exchange, ...]:
    """The exchanges `encode_exchanges` wrote; `load` gives a body by its SHA-256."""
    def rich(value: Any) -> Any:
        if isinstance(value, dict):
            if set(value) == {"$b64"}:
                return base64.b64decode(value["$b64"])
            if set(value) == {"$sha256"} and load is not None:
                return load(value["$sha256"])
            return {k: rich(v) for k, v in value.items()}
        return value
    return tuple(Exchange(e["kind"], e["request"], rich(e["response"]), bool(e.get("reusable")))
                 for e in json.loads(text))


@dataclass(frozen=True)
class JournalCell:
    """One cell as the journal keeps it."""

    number: int
    code: str
    status: str
    stdout: str
    stderr: str
    value: str | None
    error_type: str | None
    traceback: str | None
    duration_s: float
    exchanges: tuple[Exchange, ...] = ()

    @classmethod
    def of(cls, code: str, result: CellResult, exchanges: Sequence[Exchange]) -> JournalCell:
        error = result.error
        return cls(result.cell, code, str(result.status), str(result.stdout), str(result.stderr),
                   None if result.value is None else str(result.value), error.type if error else None,
                   error.traceback if error else None, result.duration_s, tuple(exchanges))


@dataclass(frozen=True)
class JournalRun:
    id: str
    kind: str
    started: str
    ended: str | None
    policy_source: str
    policy_sha256: str
    session: str | None
    cells: int


class Journal:
    """One connection to the journal; use as a context manager. Thread-safe (one lock).
    With `keep_days` or `max_bytes`, opening it prunes it (see `prune`)."""

    def __init__(self, path: Path, *, keep_days: float | None = None, max_bytes: int | None = None) -> None:
        self.path = path
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._retention = (None if keep_days is None else keep_days * 86_400, max_bytes)

    @classmethod
    def default(cls, retention: Any = None) -> Journal:
        """The journal in the state folder; `retention` (the policy's `[journal]`: `keep_days`,
        `max_mib`) prunes it when opened."""
        if retention is None:
            return cls(default_journal_path())
        return cls(default_journal_path(), keep_days=retention.keep_days, max_bytes=retention.max_mib * 2**20)

    def __enter__(self) -> Journal:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only before SQLite opens it: its -wal and -shm files take the same mode.
        os.close(open_private(self.path, os.O_RDWR))
        self._db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A commit is in the WAL file (written, not fsynced) before it returns: a process crash
        # loses no acknowledged cell; a power loss or kernel crash may lose the last commits
        # (the database stays consistent). FULL would fsync every cell: ~0.35 ms each here.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        older_than_s, max_bytes = self._retention
        if older_than_s is not None or max_bytes is not None:
            self.prune(older_than_s=older_than_s, max_bytes=max_bytes)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the journal is closed")
        return self._db

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self.db:  # one transaction at a time
            yield self.db

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        with self._lock:
            return self.db.execute(sql, args).fetchall()

    def start_run(self, run_id: str, kind: str, policy_source: str, policy_sha256: str) -> None:
        with self._write() as db:
            db.execute("INSERT INTO runs (id, kind, started, policy_source, policy_sha256) "
                       "VALUES (?,?,?,?,?)", (run_id, kind, _now(), policy_source, policy_sha256))

    def name_session(self, run_id: str, session: str) -> None:
        with self._write() as db:
            db.execute("UPDATE runs SET session = ? WHERE id = ?", (session, run_id))

    def end_run(self, run_id: str) -> None:
        with self._write() as db:
            db.execute("UPDATE runs SET ended = ? WHERE id = ?", (_now(), run_id))

    def add_cell(self, run_id: str, cell: JournalCell) -> None:
        bodies: dict[str, bytes] = {}
        exchanges = encode_exchanges(cell.exchanges, bodies)
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO cells VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                       (run_id, cell.number, cell.code, cell.status, cell.stdout, cell.stderr, cell.value,
                        cell.error_type, cell.traceback, cell.duration_s, _now(), exchanges))
            db.executemany("INSERT OR IGNORE INTO bodies VALUES (?, ?)", bodies.items())
            db.executemany("INSERT OR IGNORE INTO cell_bodies VALUES (?, ?, ?)",
                           [(run_id, cell.number, digest) for digest in bodies])

    def runs(self, limit: int = 50) -> list[JournalRun]:
        rows = self._read(f"{_SELECT_RUNS} ORDER BY r.started DESC, r.id DESC LIMIT ?", (limit,))
        return [JournalRun(*row) for row in rows]

    def find_run(self, ref: str) -> JournalRun | None:
        """A run by its id, a unique prefix of it, or its session handle."""
        row = self._read(f"{_SELECT_RUNS} WHERE r.id = ? OR r.session = ? OR r.id LIKE ? "
                         "ORDER BY r.started DESC LIMIT 2", (ref, ref, ref + "%"))
        return JournalRun(*row[0]) if len(row) == 1 or (row and ref in (row[0][0], row[0][6])) else None

    def cells(self, run_id: str) -> list[JournalCell]:
        rows = self._read(
            "SELECT number, code, status, stdout, stderr, value, error_type, traceback, duration_s, "
            "exchanges FROM cells WHERE run_id = ? ORDER BY number", (run_id,))
        return [JournalCell(*row[:9], decode_exchanges(row[9], self._body)) for row in rows]

    def _body(self, digest: str) -> bytes:
        rows = self._read("SELECT data FROM bodies WHERE sha256 = ?", (digest,))
        if not rows:
            raise LookupError(f"the journal has lost body {digest[:12]}")
        return bytes(rows[0][0])

    def prune(self, *, older_than_s: float | None = None, max_bytes: int | None = None) -> Pruned:
        """Remove ended runs that started more than `older_than_s` ago, then the oldest ended
        runs until what the journal holds is under `max_bytes`; then every body no cell refers
        to. Runs still going are never removed; playbooks and their recordings are files of
        their own and are not touched."""
        removed: list[str] = []
        with self._write() as db:
            if older_than_s is not None:
                cutoff = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than_s)).isoformat(
                    timespec="seconds")
                removed += [r[0] for r in db.execute(
                    "SELECT id FROM runs WHERE ended IS NOT NULL AND started <= ?", (cutoff,))]
            self._remove_runs(db, removed)
            if max_bytes is not None:
                ended = [r[0] for r in db.execute(
                    "SELECT id FROM runs WHERE ended IS NOT NULL ORDER BY started, id")]
                while ended and self._held(db) > max_bytes:
                    oldest = ended.pop(0)
                    self._remove_runs(db, [oldest])
                    removed.append(oldest)
            freed = db.execute("DELETE FROM bodies WHERE sha256 NOT IN "
                               "(SELECT sha256 FROM cell_bodies)").rowcount
            return Pruned(tuple(removed), freed, self._held(db))

    @staticmethod
    def _remove_runs(db: sqlite3.Connection, run_ids: Sequence[str]) -> None:
        for table, column in (("cell_bodies", "run_id"), ("cells", "run_id"), ("runs", "id")):
            db.executemany(f"DELETE FROM {table} WHERE {column} = ?", [(r,) for r in run_ids])

    @staticmethod
    def _held(db: sqlite3.Connection) -> int:
        """Bytes of what the journal holds (texts and bodies; SQLite's own overhead aside)."""
        cells = db.execute("SELECT COALESCE(SUM(LENGTH(code) + LENGTH(stdout) + LENGTH(stderr) + "
                           "LENGTH(exchanges)), 0) FROM cells").fetchone()[0]
        bodies = db.execute("SELECT COALESCE(SUM(LENGTH(data)), 0) FROM bodies").fetchone()[0]
        return int(cells) + int(bodies)


@dataclass(frozen=True)
class Pruned:
    """What `Journal.prune` removed, and what the journal holds afterwards (bytes)."""

    runs: tuple[str, ...]
    bodies: int
    held_bytes: int


def default_journal_path() -> Path:
    return state_folder() / "journal.sqlite"
