"""The store's one seam to a database: SQLite or PostgreSQL behind the same few calls.

Theory of operation. :class:`~remotecli.controller.store.Store` writes its SQL and its
transactions once, in the subset both databases speak (``?`` placeholders, ``ON CONFLICT``,
``"user"`` quoted), and runs them through a :class:`Database`. What differs lives here, and
only here:

==================  ======================================  ========================================
                    SQLite (:class:`SqliteDatabase`)        PostgreSQL (:class:`PostgresDatabase`)
==================  ======================================  ========================================
placeholders        ``?``                                   ``?`` rewritten to ``%s``
write transaction   ``BEGIN IMMEDIATE``: the database's     ``BEGIN``, then an update of the one
                    one write lock, taken first             ``remotecli_meta`` row: the same lock
schema version      ``PRAGMA user_version``                 ``remotecli_meta.schema_version``
others' commits     ``PRAGMA data_version``                 ``remotecli_meta.data_version``, bumped
                                                            by every write transaction
column types        as the migrations write them            :data:`POSTGRES_TYPES` (REAL → DOUBLE
                                                            PRECISION, INTEGER → BIGINT, BLOB →
                                                            BYTEA, INTEGER PRIMARY KEY → identity)
errors              IntegrityError → Conflict, a failed     the same, and a lost connection →
                    write transaction → ServiceUnavailable  ServiceUnavailable (reconnected after)
==================  ======================================  ========================================

Why one lock row on PostgreSQL: every write transaction updates that row first, so write
transactions run one at a time across every controller sharing the database, as SQLite's
``BEGIN IMMEDIATE`` makes them on one host. Under READ COMMITTED each later statement of the
transaction sees what the previous writer committed, so a transition's read, check and write
(and a sign-in's compare-and-set) can never interleave with another's. Reads outside a
transaction take no lock, as SQLite's WAL readers do not.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from remotecli.exceptions import ConfigError, Conflict, ServiceUnavailable

if TYPE_CHECKING:
    import psycopg

Params = Sequence[object]


class Row(Protocol):
    """One result row: by column name or position, and ``dict(row)``."""

    def __getitem__(self, key: int | str, /) -> Any: ...

    def keys(self) -> list[str]: ...


class Result:
    """The rows of one statement, fetched whole (the store's statements return few)."""

    def __init__(self, rows: list[Row], rowcount: int) -> None:
        self.rows = rows
        self.rowcount = rowcount

    def fetchone(self) -> Row | None:
        return self.rows[0] if self.rows else None

    def one(self) -> Row:
        """The first row of a statement that always returns one (``COUNT(*)``)."""
        return self.rows[0]

    def fetchall(self) -> list[Row]:
        return self.rows

    def __iter__(self) -> Iterator[Row]:
        return iter(self.rows)


class Database(Protocol):
    """A connection to the store's database; the dialect differences stay behind it."""

    location: str  # the file, or the URL without its password: for messages

    def execute(self, sql: str, params: Params = ()) -> Result:
        """Run one statement (written with ``?``); IntegrityError → :class:`Conflict`."""
        ...

    def transaction(self) -> AbstractContextManager[None]:
        """A write transaction: serialised with every other writer, all or nothing."""
        ...

    def migration_sql(self, statement: str) -> str:
        """A migration statement as this database writes it."""
        ...

    def schema_version(self) -> int: ...

    def set_schema_version(self, version: int) -> None:
        """Record ``version``; call it inside the migration's transaction."""
        ...

    def data_version(self) -> int:
        """A number that changes when another connection commits a write."""
        ...

    def reopen(self) -> Database:
        """Another connection to the same database (for a worker thread)."""
        ...

    def close(self) -> None: ...


class SqliteDatabase:
    """One SQLite file in WAL mode (the embedded default: no server, nothing to install)."""

    def __init__(self, connection: sqlite3.Connection, path: str) -> None:
        self.connection = connection
        self.location = path

    @classmethod
    def open(cls, path: str) -> SqliteDatabase:
        """Open (or create) the file; raise ConfigError when it cannot be."""
        try:
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise ConfigError(
                f"cannot open the store {path}: {exc}; check the data dir is writable"
            ) from exc
        return cls(connection, path)

    def execute(self, sql: str, params: Params = ()) -> Result:
        try:
            cursor = self.connection.execute(sql, params)
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"the store refused the change: {exc}") from exc
        return Result(cursor.fetchall(), cursor.rowcount)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        db = self.connection
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:  # SQLite may have rolled back already (disk full)
                    db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            # Disk full, read-only or locked: nothing was written; say so instead of a bare 500.
            raise ServiceUnavailable(
                f"the store {self.location} cannot be written ({exc}); free space in the data "
                "dir or check its permissions, then retry",
                path=self.location,
            ) from exc

    def migration_sql(self, statement: str) -> str:
        return statement

    def schema_version(self) -> int:
        version: int = self.connection.execute("PRAGMA user_version").fetchone()[0]
        return version

    def set_schema_version(self, version: int) -> None:
        self.connection.execute(f"PRAGMA user_version = {int(version)}")

    def data_version(self) -> int:
        version: int = self.connection.execute("PRAGMA data_version").fetchone()[0]
        return version

    def reopen(self) -> SqliteDatabase:
        return SqliteDatabase.open(self.location)

    def close(self) -> None:
        self.connection.close()


POSTGRES_TYPES: tuple[tuple[re.Pattern[str], str], ...] = (
    # the only statement-level difference of the migrations: column types, word for word
    (re.compile(r"\bINTEGER PRIMARY KEY\b"), "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),  # SQLite's INTEGER holds 64 bits
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),  # PostgreSQL's REAL has 32
    (re.compile(r"\bBLOB\b"), "BYTEA"),
)
"""How a migration's SQLite column types read on PostgreSQL."""

_META = (
    "CREATE TABLE IF NOT EXISTS remotecli_meta (id INTEGER PRIMARY KEY CHECK (id = 1),"
    " schema_version INTEGER NOT NULL, data_version BIGINT NOT NULL)"
)
_META_LOCK = 0x72636C69  # pg_advisory_xact_lock key ("rcli") while remotecli_meta is created


def redact_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


class _PgRow:
    """A psycopg row that reads like :class:`sqlite3.Row`."""

    __slots__ = ("_index", "_values")

    def __init__(self, values: Sequence[Any], index: dict[str, int]) -> None:
        self._values = values
        self._index = index

    def __getitem__(self, key: int | str, /) -> Any:
        return self._values[self._index[key] if isinstance(key, str) else key]

    def keys(self) -> list[str]:
        return list(self._index)


def _rows(cursor: psycopg.Cursor[Any]) -> Callable[[Sequence[Any]], _PgRow]:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return lambda values: _PgRow(values, index)


class PostgresDatabase:
    """A PostgreSQL database shared by several controllers (``psycopg``, synchronous)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.location = redact_url(url)
        self._own_commits = 0  # data_version leaves out this connection's own writes
        self._conn = self._connect()

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            import psycopg
        except ImportError as exc:
            raise ConfigError(
                "a PostgreSQL store needs psycopg: pip install 'remotecli[cluster]'"
            ) from exc
        try:
            conn: psycopg.Connection[Any] = psycopg.connect(
                self.url, autocommit=True, row_factory=_rows, connect_timeout=10
            )
            # The writer lock below relies on READ COMMITTED (each statement sees the last
            # writer's commit), whatever default_transaction_isolation the server has.
            conn.isolation_level = psycopg.IsolationLevel.READ_COMMITTED
            with conn.transaction():
                # Two controllers starting at once: one creates the table, the other waits.
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_META_LOCK,))
                conn.execute(_META)
                conn.execute(
                    "INSERT INTO remotecli_meta VALUES (1, 0, 0) ON CONFLICT (id) DO NOTHING"
                )
        except psycopg.Error as exc:
            raise ConfigError(
                f"cannot open the store {self.location}: {exc}; check the URL, that PostgreSQL "
                "runs and that the user may create tables in the database"
            ) from exc
        return conn

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn.closed or self._conn.broken:  # the server restarted: try once more
            self._conn = self._connect()
        return self._conn

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        import psycopg

        try:
            yield
        except psycopg.IntegrityError as exc:
            raise Conflict(f"the store refused the change: {exc}") from exc
        except psycopg.OperationalError as exc:
            raise ServiceUnavailable(
                f"the store {self.location} cannot be reached ({exc}); check PostgreSQL runs, "
                "then retry",
                url=self.location,
            ) from exc

    def execute(self, sql: str, params: Params = ()) -> Result:
        with self._mapped():
            cursor = self._connection().execute(
                sql.replace("%", "%%").replace("?", "%s"),
                params,
            )
            rows: list[Row] = cursor.fetchall() if cursor.description else []
            return Result(rows, cursor.rowcount)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self._mapped():
            conn = self._connection()
            with conn.transaction():
                conn.execute("UPDATE remotecli_meta SET data_version = data_version + 1")
                yield
            self._own_commits += 1

    def migration_sql(self, statement: str) -> str:
        for pattern, replacement in POSTGRES_TYPES:
            statement = pattern.sub(replacement, statement)
        return statement

    def schema_version(self) -> int:
        return int(self.execute("SELECT schema_version FROM remotecli_meta").one()[0])

    def set_schema_version(self, version: int) -> None:
        self.execute("UPDATE remotecli_meta SET schema_version = ?", (version,))

    def data_version(self) -> int:
        counter = int(self.execute("SELECT data_version FROM remotecli_meta").one()[0])
        return counter - self._own_commits

    def reopen(self) -> PostgresDatabase:
        return PostgresDatabase(self.url)

    def close(self) -> None:
        self._conn.close()
