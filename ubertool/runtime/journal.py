"""The journal: every run and cell, durably, with the outside exchanges each cell caused.

SQLite in `$UBERTOOL_HOME/journal.sqlite` by default (WAL, so a CLI can read while a server
writes; synchronous=NORMAL: each commit is written before the cell is answered, so it survives
the process crashing, but not fsynced, so a power loss may take the last few), or PostgreSQL
when the policy says `[journal] url = "postgresql://..."` (see `stores`: the SQL is shared, the
differences are the store's). It survives restarts; playbooks are dumped from it. Texts are
stored after redaction. Exchange bodies are BLOBs, content-addressed (SHA-256) and kept once
however many cells refer to them; `prune` removes old runs and the bodies nothing refers to any
more. It also keeps named blobs (`put_image`, `get_image`, `delete_image`): saved sessions,
when the database is shared, so that any front end on it can resume a session.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ubertool.runtime.home import state_folder
from ubertool.runtime.stores import PostgresStore, SqliteStore, Store, Transaction
from ubertool.sandbox import CellResult
from ubertool.tools.recorder import Body, Exchange

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, kind TEXT NOT NULL, started TEXT NOT NULL, ended TEXT,
    policy_source TEXT NOT NULL, policy_sha256 TEXT NOT NULL, session TEXT
);
CREATE TABLE IF NOT EXISTS cells (
    run_id TEXT NOT NULL, number INTEGER NOT NULL, code TEXT NOT NULL, status TEXT NOT NULL,
    stdout TEXT NOT NULL, stderr TEXT NOT NULL, value TEXT, error_type TEXT, traceback TEXT,
    duration_s {real} NOT NULL, at TEXT NOT NULL, exchanges TEXT NOT NULL,
    PRIMARY KEY (run_id, number)
);
CREATE TABLE IF NOT EXISTS bodies (sha256 TEXT PRIMARY KEY, data {blob} NOT NULL);
CREATE TABLE IF NOT EXISTS cell_bodies (
    run_id TEXT NOT NULL, number INTEGER NOT NULL, sha256 TEXT NOT NULL,
    PRIMARY KEY (run_id, number, sha256)
);
CREATE INDEX IF NOT EXISTS cell_bodies_sha256 ON cell_bodies (sha256);
CREATE TABLE IF NOT EXISTS images (
    session TEXT PRIMARY KEY, data {blob} NOT NULL, meta TEXT NOT NULL, saved TEXT NOT NULL
);
"""

_UPSERT_CELL = (
    "INSERT INTO cells VALUES (?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT (run_id, number) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in ("code", "status", "stdout", "stderr", "value", "error_type",
                                                 "traceback", "duration_s", "at", "exchanges")))

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


@dataclass(frozen=True)
class StoredImage:
    """A session image as the journal keeps it (see `Journal.put_image`)."""

    session: str
    data: bytes
    meta: dict[str, Any]
    saved: str  # when it was put (UTC, ISO 8601)


class Journal:
    """The journal on one `Store` (a `Path` means the SQLite file there); use as a context
    manager. Thread-safe (one lock). With `keep_days` or `max_bytes`, opening it prunes it (see
    `prune`). Every method raises `JournalError` when the database fails."""

    def __init__(self, store: Store | Path, *, keep_days: float | None = None,
                 max_bytes: int | None = None) -> None:
        self.store: Store = SqliteStore(store) if isinstance(store, Path) else store
        self._lock = threading.Lock()
        self._retention = (None if keep_days is None else keep_days * 86_400, max_bytes)

    @classmethod
    def default(cls, spec: Any = None) -> Journal:
        """The journal a policy's `[journal]` section names: PostgreSQL at its `url`, else the
        SQLite file in the state folder; its `keep_days` and `max_mib` prune it when opened."""
        if spec is None:
            return cls(journal_store(None))
        return cls(journal_store(spec), keep_days=spec.keep_days, max_bytes=spec.max_mib * 2**20)

    def __enter__(self) -> Journal:
        with self._translated():
            self.store.open(_SCHEMA)
        older_than_s, max_bytes = self._retention
        if older_than_s is not None or max_bytes is not None:
            self.prune(older_than_s=older_than_s, max_bytes=max_bytes)
        return self

    def __exit__(self, *exc: object) -> None:
        self.store.close()

    @property
    def db(self) -> Any:
        """The store's driver connection (for maintenance and tests)."""
        return self.store.connection

    @contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            translated = self.store.translate(exc)
            if translated is None or translated is exc:
                raise
            raise translated from None

    @contextmanager
    def _write(self) -> Iterator[Transaction]:
        with self._lock, self._translated(), self.store.transaction() as tx:  # one at a time
            yield tx

    def _read(self, sql: str, args: tuple[Any, ...]) -> list[Any]:
        with self._lock, self._translated(), self.store.transaction() as tx:
            return tx.execute(sql, args).fetchall()

    def start_run(self, run_id: str, kind: str, policy_source: str, policy_sha256: str) -> None:
        with self._write() as db:
            db.execute("INSERT INTO runs (id, kind, started, policy_source, policy_sha256) "
                       "VALUES (?,?,?,?,?)", (run_id, kind, _now(), policy_source, policy_sha256))

    def name_session(self, run_id: str, session: str) -> None:
        with self._write() as db:
            db.execute("UPDATE runs SET session = ? WHERE id = ?", (session, run_id))

    def reopen_run(self, run_id: str) -> None:
        """Mark a saved run going again (a resumed session): no prune removes it meanwhile."""
        with self._write() as db:
            db.execute("UPDATE runs SET ended = NULL WHERE id = ?", (run_id,))

    def end_run(self, run_id: str) -> None:
        with self._write() as db:
            db.execute("UPDATE runs SET ended = ? WHERE id = ?", (_now(), run_id))

    def add_cell(self, run_id: str, cell: JournalCell) -> None:
        """Record a finished cell; when it returns, the cell is committed (the caller may
        acknowledge it to the client)."""
        bodies: dict[str, bytes] = {}
        exchanges = encode_exchanges(cell.exchanges, bodies)
        with self._write() as db:
            db.execute(_UPSERT_CELL,
                       (run_id, cell.number, cell.code, cell.status, cell.stdout, cell.stderr, cell.value,
                        cell.error_type, cell.traceback, cell.duration_s, _now(), exchanges))
            db.executemany("INSERT INTO bodies VALUES (?, ?) ON CONFLICT DO NOTHING", list(bodies.items()))
            db.executemany("INSERT INTO cell_bodies VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
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
        # The run's bodies in one query (one round trip to a database server, not one per body).
        bodies = {digest: bytes(data) for digest, data in self._read(
            "SELECT sha256, data FROM bodies WHERE sha256 IN "
            "(SELECT sha256 FROM cell_bodies WHERE run_id = ?)", (run_id,))}

        def body(digest: str) -> bytes:
            if digest not in bodies:
                raise LookupError(f"the journal has lost body {digest[:12]}")
            return bodies[digest]

        return [JournalCell(*row[:9], decode_exchanges(row[9], body)) for row in rows]

    def put_image(self, session: str, data: bytes, meta: Mapping[str, Any]) -> None:
        """Keep session `session`'s image (`data`, e.g. a sandbox snapshot) with `meta` (JSON
        values: what restoring it needs), replacing any earlier one. Committed on return, so
        another front end's `get_image` sees it. Limits: SQLite and PostgreSQL take up to
        1 GB per image; it is held in memory while written and read."""
        with self._write() as db:
            db.execute("INSERT INTO images VALUES (?, ?, ?, ?) ON CONFLICT (session) DO UPDATE SET "
                       "data = excluded.data, meta = excluded.meta, saved = excluded.saved",
                       (session, bytes(data), json.dumps(dict(meta)), _now()))

    def get_image(self, session: str) -> StoredImage | None:
        """The latest image put for `session`, or None."""
        rows = self._read("SELECT data, meta, saved FROM images WHERE session = ?", (session,))
        if not rows:
            return None
        data, meta, saved = rows[0]
        return StoredImage(session, bytes(data), json.loads(meta), saved)

    def image_names(self) -> list[str]:
        """The names images are kept under, sorted."""
        return [row[0] for row in self._read("SELECT session FROM images ORDER BY session", ())]

    def delete_image(self, session: str) -> bool:
        """Forget `session`'s image; whether there was one."""
        with self._write() as db:
            return db.execute("DELETE FROM images WHERE session = ?", (session,)).rowcount > 0

    def prune(self, *, older_than_s: float | None = None, max_bytes: int | None = None) -> Pruned:
        """Remove ended runs that started more than `older_than_s` ago, then the oldest ended
        runs until what the journal holds is under `max_bytes`; then every body no cell refers
        to. A removed run's session image goes with it. Runs still going are never removed;
        playbooks and their recordings are files of their own and are not touched."""
        removed: list[str] = []
        with self._write() as db:
            if older_than_s is not None:
                cutoff = (dt.datetime.now(dt.UTC) - dt.timedelta(seconds=older_than_s)).isoformat(
                    timespec="seconds")
                removed += [r[0] for r in db.execute(
                    "SELECT id FROM runs WHERE ended IS NOT NULL AND started <= ?", (cutoff,)).fetchall()]
            self._remove_runs(db, removed)
            if max_bytes is not None:
                ended = [r[0] for r in db.execute(
                    "SELECT id FROM runs WHERE ended IS NOT NULL ORDER BY started, id").fetchall()]
                while ended and self._held(db) > max_bytes:
                    oldest = ended.pop(0)
                    self._remove_runs(db, [oldest])
                    removed.append(oldest)
            freed = db.execute("DELETE FROM bodies WHERE sha256 NOT IN "
                               "(SELECT sha256 FROM cell_bodies)").rowcount
            return Pruned(tuple(removed), freed, self._held(db))

    @staticmethod
    def _remove_runs(db: Transaction, run_ids: Sequence[str]) -> None:
        rows = [(r,) for r in run_ids]
        db.executemany("DELETE FROM images WHERE session IN (SELECT session FROM runs WHERE id = ?)", rows)
        for table, column in (("cell_bodies", "run_id"), ("cells", "run_id"), ("runs", "id")):
            db.executemany(f"DELETE FROM {table} WHERE {column} = ?", rows)

    @staticmethod
    def _held(db: Transaction) -> int:
        """Bytes of what the journal holds (texts and bodies; the database's own overhead and
        session images aside)."""
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


def journal_store(spec: Any) -> Store:
    """The store a policy's `[journal]` section names (None: the default SQLite file)."""
    url = getattr(spec, "url", None)
    return PostgresStore(url) if url else SqliteStore(default_journal_path())


def default_journal_path() -> Path:
    return state_folder() / "journal.sqlite"
