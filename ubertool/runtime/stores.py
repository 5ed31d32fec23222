"""Where the journal keeps its tables: the seam between the journal's logic and a database.

`SqliteStore` (the embedded default, one file) and `PostgresStore` (policy `[journal] url =
"postgresql://..."`, psycopg 3) share one SQL dialect: the journal writes `?` placeholders,
`ON CONFLICT` upserts and the column types `{blob}` and `{real}`; a store fills those in and
translates its driver's errors into `JournalError`. Nothing else about the database leaks out.

A PostgreSQL URL may carry a password: it is never shown. `masked_url` is what messages,
`policy show` and logs print; a driver's message has the password taken out before it is
raised (libpq's `PGPASSWORD` or `~/.pgpass` keep it out of the policy altogether).
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ubertool.tools.files import open_private

POSTGRES_SCHEMES = ("postgresql", "postgres")
# Serializes schema creation between front ends starting at once (CREATE ... IF NOT EXISTS
# races in PostgreSQL); any constant unique to ubertool.
_SCHEMA_LOCK = 0x75627274


class JournalError(Exception):
    """The journal's database failed or cannot be reached; the message says where (a masked
    URL or a path) and what to do, and never holds a password."""


class Cursor(Protocol):
    rowcount: int

    def fetchall(self) -> list[Any]: ...

    def fetchone(self) -> Any: ...


class Transaction(Protocol):
    """What the journal's SQL runs on inside `Store.transaction()`."""

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class Store(Protocol):
    """A database for the journal. `where` names it for people (a path, or a masked URL)."""

    kind: str
    where: str

    def open(self, schema: str) -> None:
        """Connect and create the tables of `schema` (its `{blob}`/`{real}` filled in) if missing.

        Raises:
            JournalError: it cannot be opened; the message says what to check.
        """

    def close(self) -> None: ...

    def transaction(self) -> AbstractContextManager[Transaction]:
        """One transaction, committed when the block ends (durably: a committed cell survives
        a crash of this process and of the database's host), rolled back if it raises."""

    def translate(self, exc: BaseException) -> JournalError | None:
        """`exc` as a `JournalError` if it is this store's database failing, else None."""

    @property
    def connection(self) -> Any:
        """The driver's connection (for maintenance and tests)."""


class SqliteStore:
    """One SQLite file (WAL, so a CLI can read while a server writes), owner-only."""

    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.where = str(path)
        self._db: sqlite3.Connection | None = None

    def open(self, schema: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Owner-only before SQLite opens it: its -wal and -shm files take the same mode.
        os.close(open_private(self.path, os.O_RDWR))
        self._db = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        # A commit is in the WAL file (written, not fsynced) before it returns: a process crash
        # loses no acknowledged cell; a power loss or kernel crash may lose the last commits
        # (the database stays consistent). FULL would fsync every cell: ~0.35 ms each here.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(schema.format(blob="BLOB", real="REAL"))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("the journal is closed")
        return self._db

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self.connection as db:  # commits at the end, rolls back on an error
            yield db  # type: ignore[misc]  # sqlite3's execute/executemany fit `Transaction`

    def translate(self, exc: BaseException) -> JournalError | None:
        if isinstance(exc, sqlite3.Error):
            return JournalError(f"the journal {self.where}: {exc}")
        return None


class PostgresStore:
    """A PostgreSQL database reached by a libpq URL, through one psycopg 3 connection in
    autocommit mode (a `transaction()` is explicit). A connection the server dropped is made
    again at the next use; the operation that found it dropped fails with `JournalError`."""

    kind = "postgresql"

    def __init__(self, url: str, *, connect_timeout_s: int = 10) -> None:
        self._url = url
        self.where = masked_url(url)
        self._secrets = url_secrets(url)
        self._timeout = connect_timeout_s
        self._db: Any = None

    def open(self, schema: str) -> None:
        self._db = self._connect()
        try:
            with self.transaction() as tx:
                tx.execute("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK,))
                for statement in filter(str.strip, schema.format(blob="BYTEA", real="DOUBLE PRECISION")
                                        .split(";")):
                    tx.execute(statement)
        except Exception as exc:
            self.close()
            raise self.translate(exc) or exc from None

    def _connect(self) -> Any:
        import psycopg  # here, not at import: only a configured URL pays for it

        try:
            db = psycopg.connect(self._url, autocommit=True, connect_timeout=self._timeout)
        except (psycopg.Error, ValueError) as exc:
            raise JournalError(
                f"journal.url: cannot open the PostgreSQL journal at {self.where}: "
                f"{self._scrub(str(exc).strip())}. Check the policy's [journal] url (host, port, "
                "database, user; a password from the URL, PGPASSWORD or ~/.pgpass) and that the "
                "server is running and reachable, or remove journal.url to use the local SQLite "
                "journal.") from None
        # The journal's promise: a cell acknowledged to the client is committed. A database
        # whose default is `synchronous_commit = off` would acknowledge before its WAL is on disk.
        if db.execute("SHOW synchronous_commit").fetchone()[0] == "off":
            db.execute("SET synchronous_commit TO on")
        return db

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def connection(self) -> Any:
        if self._db is None:
            raise RuntimeError("the journal is closed")
        if self._db.closed or self._db.broken:  # the server restarted, the network dropped
            self._db = self._connect()
        return self._db

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        db = self.connection
        with db.transaction():
            yield _PostgresTransaction(db)

    def translate(self, exc: BaseException) -> JournalError | None:
        import psycopg

        if isinstance(exc, JournalError):
            return exc
        if isinstance(exc, psycopg.Error):
            return JournalError(f"the journal at {self.where}: {self._scrub(str(exc).strip())}")
        return None

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text


class _PostgresTransaction:
    """The journal's `?` placeholders as psycopg's `%s` (the journal's SQL has no `%`)."""

    def __init__(self, db: Any) -> None:
        self._db = db

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        return self._db.execute(sql.replace("?", "%s"), tuple(args))  # type: ignore[no-any-return]

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self._db.cursor() as cursor:
                cursor.executemany(sql.replace("?", "%s"), list(rows))


def is_postgres_url(url: str) -> bool:
    return urlsplit(url).scheme in POSTGRES_SCHEMES


def url_secrets(url: str) -> list[str]:
    """The passwords a libpq URL carries (in its user part or a `password=` parameter)."""
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [value for key, value in parse_qsl(parts.query) if key == "password" and value]
    # A percent-encoded password appears decoded in a driver's message and encoded in the URL.
    raw = re.match(r"[^:@]*:([^@]*)@", parts.netloc)
    return sorted({*found, *([raw.group(1)] if raw and raw.group(1) else [])}, key=len, reverse=True)


def masked_url(url: str) -> str:
    """`url` with any password replaced by `***`: what may be shown or logged."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None or ":" in netloc.rpartition("@")[0]:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
