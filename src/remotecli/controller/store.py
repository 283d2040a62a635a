"""The controller's store: users, their token hashes, sessions and every transition, in SQLite.

One SQLite file in the data dir, in WAL mode so readers never wait for the writer. The schema is
versioned with ``PRAGMA user_version`` and upgraded by the ordered :data:`MIGRATIONS` on open.
Every state change runs :func:`remotecli.states.next_state` inside one ``BEGIN IMMEDIATE``
transaction that also logs the transition, so a refused or interrupted change leaves nothing
half written. Calls are synchronous and short; the controller makes them from its event loop.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from remotecli.drivers.base import VncEndpoint
from remotecli.exceptions import ConfigError, Conflict, NotFound, ServiceUnavailable
from remotecli.runs import ACTIVE_RUN_STATES, RunState, RunStep, next_run_state
from remotecli.states import ACTIVE_STATES, Event, State, next_state

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE users (name TEXT PRIMARY KEY, created_at REAL NOT NULL)",
        "CREATE TABLE tokens (hash TEXT PRIMARY KEY,"
        " user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,"
        " created_at REAL NOT NULL)",
        "CREATE TABLE sessions (id TEXT PRIMARY KEY,"
        " owner TEXT NOT NULL REFERENCES users(name),"
        " provider TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,"
        " created_at REAL NOT NULL, updated_at REAL NOT NULL, ready_at REAL,"
        " endpoint TEXT, bytes_in INTEGER NOT NULL DEFAULT 0,"
        " bytes_out INTEGER NOT NULL DEFAULT 0)",
        "CREATE INDEX sessions_by_owner ON sessions(owner, created_at)",
        "CREATE INDEX sessions_by_state ON sessions(state)",
        "CREATE TABLE transitions (id INTEGER PRIMARY KEY,"
        " session_id TEXT NOT NULL REFERENCES sessions(id),"
        " from_state TEXT, to_state TEXT NOT NULL, event TEXT NOT NULL, reason TEXT,"
        " at REAL NOT NULL)",
        "CREATE INDEX transitions_by_session ON transitions(session_id, id)",
    ),
    (
        # One provider sign-in per user, AES-GCM encrypted by controller/signins.py; the store
        # sees only ciphertext. ``version`` is the compare-and-set counter of save_signin().
        "CREATE TABLE signins (user TEXT NOT NULL, provider TEXT NOT NULL,"
        " version INTEGER NOT NULL, key_id TEXT NOT NULL, nonce BLOB NOT NULL,"
        " ciphertext BLOB NOT NULL, connected_at REAL NOT NULL, updated_at REAL NOT NULL,"
        " PRIMARY KEY (user, provider))",
    ),
    (
        # Everyday operation: users seen and removed, tokens that expire, browser logins that
        # can be signed out one by one, session labels, and why a session ended.
        "ALTER TABLE users ADD COLUMN last_seen REAL",
        "ALTER TABLE users ADD COLUMN removed_at REAL",
        "ALTER TABLE tokens ADD COLUMN expires_at REAL",
        "CREATE TABLE logins (hash TEXT PRIMARY KEY,"
        " user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,"
        " created_at REAL NOT NULL, expires_at REAL NOT NULL)",
        "CREATE INDEX logins_by_user ON logins(user)",
        "ALTER TABLE sessions ADD COLUMN label TEXT",
        "ALTER TABLE sessions ADD COLUMN end_cause TEXT",
    ),
    (
        # Headless runs (remotecli/runs.py): the prompt, the state, the whole output and its
        # events once ended (JSON), the tokens the CLI reported; usage is counted from here.
        "CREATE TABLE runs (id TEXT PRIMARY KEY,"
        " owner TEXT NOT NULL REFERENCES users(name),"
        " provider TEXT NOT NULL, prompt TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,"
        " exit_code INTEGER, timeout_s REAL NOT NULL, created_at REAL NOT NULL,"
        " started_at REAL, ended_at REAL, output TEXT NOT NULL DEFAULT '', events TEXT,"
        " input_tokens INTEGER, output_tokens INTEGER)",
        "CREATE INDEX runs_by_owner ON runs(owner, created_at)",
        "CREATE INDEX runs_by_state ON runs(state)",
    ),
)
"""Schema migrations in order; migration ``n`` brings ``user_version`` from ``n`` to ``n + 1``."""

SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class SessionRecord:
    """One session as stored."""

    id: str
    owner: str
    provider: str
    state: State
    reason: str | None
    created_at: float
    updated_at: float
    ready_at: float | None
    endpoint: VncEndpoint | None
    bytes_in: int
    bytes_out: int
    label: str | None = None
    end_cause: str | None = None


@dataclass(frozen=True)
class UserRecord:
    """One user as ``remotecli user list`` shows it."""

    name: str
    created_at: float
    last_seen: float | None
    active_sessions: int
    tokens: int
    token_expires_at: float | None  # the latest expiry among its tokens; None = one never does


@dataclass(frozen=True)
class SignInRecord:
    """One user's stored sign-in to one provider, still encrypted."""

    user: str
    provider: str
    version: int
    key_id: str
    nonce: bytes
    ciphertext: bytes = field(repr=False)
    connected_at: float
    updated_at: float


@dataclass(frozen=True)
class RunRecord:
    """One headless run as stored; ``events`` (JSON) is there once it ended."""

    id: str
    owner: str
    provider: str
    prompt: str
    state: RunState
    reason: str | None
    exit_code: int | None
    timeout_s: float
    created_at: float
    started_at: float | None
    ended_at: float | None
    output: str = field(repr=False)
    events: str | None = field(repr=False)
    input_tokens: int | None
    output_tokens: int | None


@dataclass(frozen=True)
class Usage:
    """What one user's runs used in one period."""

    runs: int
    input_tokens: int
    output_tokens: int

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


SealSignIn = Callable[[SignInRecord], tuple[str, bytes, bytes] | None]
"""Re-encrypts a record for :meth:`Store.reseal_signins`: (key id, nonce, ciphertext) or None."""


@dataclass(frozen=True)
class TransitionRecord:
    """One logged state change."""

    session_id: str
    from_state: State | None
    to_state: State
    event: str
    reason: str | None
    at: float


def _endpoint_to_json(endpoint: VncEndpoint | None) -> str | None:
    if endpoint is None:
        return None
    return json.dumps(
        {
            "unix_path": endpoint.unix_path,
            "host": endpoint.host,
            "port": endpoint.port,
            "password": endpoint.password,
        }
    )


def _endpoint_from_json(text: str | None) -> VncEndpoint | None:
    if text is None:
        return None
    data = json.loads(text)
    return VncEndpoint(
        unix_path=data.get("unix_path"),
        host=data.get("host"),
        port=data.get("port"),
        password=data.get("password"),
    )


def _signin(row: sqlite3.Row) -> SignInRecord:
    return SignInRecord(
        user=row["user"],
        provider=row["provider"],
        version=row["version"],
        key_id=row["key_id"],
        nonce=bytes(row["nonce"]),
        ciphertext=bytes(row["ciphertext"]),
        connected_at=row["connected_at"],
        updated_at=row["updated_at"],
    )


LIST_OUTPUT_MAX = 4096
"""Characters of each run's output in a list of runs (one run has it whole)."""
_RUN_LISTED = (
    "id, owner, provider, prompt, state, reason, exit_code, timeout_s, created_at, started_at,"
    " ended_at, substr(output, 1, ?) AS output, NULL AS events, input_tokens, output_tokens"
)


def _run(row: sqlite3.Row) -> RunRecord:
    return RunRecord(**{**dict(row), "state": RunState(row["state"])})


def _session(row: sqlite3.Row) -> SessionRecord:
    return SessionRecord(
        id=row["id"],
        owner=row["owner"],
        provider=row["provider"],
        state=State(row["state"]),
        reason=row["reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        ready_at=row["ready_at"],
        endpoint=_endpoint_from_json(row["endpoint"]),
        bytes_in=row["bytes_in"],
        bytes_out=row["bytes_out"],
        label=row["label"],
        end_cause=row["end_cause"],
    )


class Store:
    """The SQLite store; open it with :meth:`open` and :meth:`close` it on shutdown."""

    def __init__(self, connection: sqlite3.Connection, path: Path) -> None:
        self._db = connection
        self.path = path

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open (or create) the database at ``path``, in WAL mode, migrated to the latest schema.

        Raises :class:`ConfigError` when the file cannot be opened or comes from a newer
        remote-cli (its schema version is above :data:`SCHEMA_VERSION`).
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Token hashes and VNC passwords live here: only this user may read the file (SQLite
            # gives its -wal and -shm files the same mode).
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            connection.row_factory = sqlite3.Row
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("PRAGMA foreign_keys=ON")
            connection.execute("PRAGMA busy_timeout=5000")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(
                f"cannot open the store {path}: {exc}; check the data dir is writable"
            ) from exc
        store = cls(connection, path)
        store._migrate()
        return store

    def close(self) -> None:
        """Close the database; the store cannot be used afterwards."""
        self._db.close()

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        version: int = self._db.execute("PRAGMA user_version").fetchone()[0]
        return version

    def _migrate(self) -> None:
        current = self.schema_version
        if current < 0:
            raise ConfigError(
                f"the store {self.path} has schema version {current}: it is not a remote-cli "
                "store; restore a backup or choose another --data-dir"
            )
        if current > SCHEMA_VERSION:
            raise ConfigError(
                f"the store {self.path} has schema version {current}, newer than this "
                f"remote-cli understands ({SCHEMA_VERSION}); upgrade remote-cli"
            )
        for version in range(current, SCHEMA_VERSION):
            with self._transaction():
                for statement in MIGRATIONS[version]:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {version + 1}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:  # SQLite may have rolled back already (disk full)
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            # Disk full, read-only or locked: nothing was written; say so instead of a bare 500.
            raise ServiceUnavailable(
                f"the store {self.path} cannot be written ({exc}); free space in the data dir "
                "or check its permissions, then retry",
                path=str(self.path),
            ) from exc

    # --- users, tokens and browser logins ----------------------------------------------------

    def add_user(self, name: str, now: float) -> None:
        """Create user ``name`` if it does not exist yet (a removed one comes back)."""
        with self._transaction() as db:
            self._ensure_user(db, name, now)

    @staticmethod
    def _ensure_user(db: sqlite3.Connection, name: str, now: float) -> None:
        db.execute("INSERT OR IGNORE INTO users (name, created_at) VALUES (?, ?)", (name, now))
        db.execute(
            "UPDATE users SET removed_at = NULL, created_at = ?, last_seen = NULL"
            " WHERE name = ? AND removed_at IS NOT NULL",
            (now, name),
        )

    def users(self) -> list[str]:
        """Return every user name (removed ones left out)."""
        return [
            r["name"]
            for r in self._db.execute(
                "SELECT name FROM users WHERE removed_at IS NULL ORDER BY name"
            )
        ]

    def user_records(self) -> list[UserRecord]:
        """Return every user with its last use, active sessions and tokens, by name."""
        rows = self._db.execute(
            "SELECT u.name, u.created_at, u.last_seen,"
            " (SELECT COUNT(*) FROM sessions s WHERE s.owner = u.name"
            "  AND s.state NOT IN ('stopped', 'failed')) AS active,"
            " (SELECT COUNT(*) FROM tokens t WHERE t.user = u.name) AS tokens,"
            " (SELECT CASE WHEN COUNT(*) = COUNT(t.expires_at) THEN MAX(t.expires_at) END"
            "  FROM tokens t WHERE t.user = u.name) AS expires"
            " FROM users u WHERE u.removed_at IS NULL ORDER BY u.name"
        )
        return [
            UserRecord(
                name=r["name"],
                created_at=r["created_at"],
                last_seen=r["last_seen"],
                active_sessions=r["active"],
                tokens=r["tokens"],
                token_expires_at=r["expires"] if r["tokens"] else None,
            )
            for r in rows
        ]

    def user_exists(self, name: str) -> bool:
        """Return True when ``name`` is a user (not removed)."""
        row = self._db.execute(
            "SELECT 1 FROM users WHERE name = ? AND removed_at IS NULL", (name,)
        ).fetchone()
        return row is not None

    def add_token(
        self, user: str, token_hash: str, now: float, *, expires_at: float | None = None
    ) -> None:
        """Let the token with hash ``token_hash`` authenticate ``user`` (created if missing)."""
        with self._transaction() as db:
            self._ensure_user(db, user, now)
            db.execute(
                "INSERT OR REPLACE INTO tokens (hash, user, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (token_hash, user, now, expires_at),
            )

    def replace_tokens(
        self,
        user: str,
        token_hash: str,
        now: float,
        *,
        expires_at: float | None = None,
        sign_out: bool = False,
    ) -> None:
        """Make ``token_hash`` the only token of ``user``; ``sign_out`` also ends its logins."""
        with self._transaction() as db:
            self._ensure_user(db, user, now)
            db.execute("DELETE FROM tokens WHERE user = ?", (user,))
            if sign_out:
                db.execute("DELETE FROM logins WHERE user = ?", (user,))
            db.execute(
                "INSERT OR REPLACE INTO tokens (hash, user, created_at, expires_at)"
                " VALUES (?, ?, ?, ?)",
                (token_hash, user, now, expires_at),
            )

    def user_for_token(self, token_hash: str, now: float) -> str | None:
        """Return the user a token hash belongs to, or None (unknown, expired, user removed)."""
        row = self._db.execute(
            "SELECT t.user, t.expires_at FROM tokens t JOIN users u ON u.name = t.user"
            " WHERE t.hash = ? AND u.removed_at IS NULL",
            (token_hash,),
        ).fetchone()
        if row is None:
            return None
        if row["expires_at"] is not None and now >= row["expires_at"]:
            return None
        return str(row["user"])

    def token_expiry(self, token_hash: str) -> float | None:
        """Return when a token expires; None when it never does (or is unknown)."""
        row = self._db.execute(
            "SELECT expires_at FROM tokens WHERE hash = ?", (token_hash,)
        ).fetchone()
        return None if row is None else row["expires_at"]

    def add_login(self, user: str, login_hash: str, now: float, expires_at: float) -> None:
        """Record a browser login (the cookie's hash) of ``user`` until ``expires_at``."""
        with self._transaction() as db:
            db.execute(
                "INSERT INTO logins (hash, user, created_at, expires_at) VALUES (?, ?, ?, ?)",
                (login_hash, user, now, expires_at),
            )
            db.execute("DELETE FROM logins WHERE expires_at <= ?", (now,))

    def user_for_login(self, login_hash: str, now: float) -> str | None:
        """Return the user of a browser login, or None (unknown, signed out, expired)."""
        row = self._db.execute(
            "SELECT l.user FROM logins l JOIN users u ON u.name = l.user"
            " WHERE l.hash = ? AND l.expires_at > ? AND u.removed_at IS NULL",
            (login_hash, now),
        ).fetchone()
        return None if row is None else str(row["user"])

    def delete_login(self, login_hash: str) -> bool:
        """Forget one browser login (sign out); True when there was one."""
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM logins WHERE hash = ?", (login_hash,))
        return cursor.rowcount > 0

    def touch_user(self, name: str, now: float) -> None:
        """Record that ``name`` used remote-cli at ``now`` (its last seen)."""
        self._db.execute("UPDATE users SET last_seen = ? WHERE name = ?", (now, name))

    def remove_user(self, name: str, now: float) -> bool:
        """Remove ``name``: its tokens, logins and kept sign-ins go now, in one transaction.

        The user's row stays, marked removed, because its sessions refer to it; the controller
        ends those sessions (:meth:`removed_owners_with_sessions`). Returns False when there
        was no such user.
        """
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE users SET removed_at = ? WHERE name = ? AND removed_at IS NULL",
                (now, name),
            )
            if cursor.rowcount == 0:
                return False
            # Marked in the same transaction: they end even if the name is added back at once.
            db.execute(
                "UPDATE sessions SET end_cause = 'user-removed'"
                " WHERE owner = ? AND state NOT IN ('stopped', 'failed')",
                (name,),
            )
            db.execute("DELETE FROM tokens WHERE user = ?", (name,))
            db.execute("DELETE FROM logins WHERE user = ?", (name,))
            db.execute("DELETE FROM signins WHERE user = ?", (name,))
        return True

    def removed_owners_with_sessions(self) -> list[SessionRecord]:
        """Return the active sessions whose owner was removed, oldest first.

        Those :meth:`remove_user` marked count even when the name was added back since.
        """
        rows = self._db.execute(
            "SELECT s.* FROM sessions s JOIN users u ON u.name = s.owner"
            " WHERE (u.removed_at IS NOT NULL OR s.end_cause = 'user-removed')"
            " AND s.state NOT IN ('stopped', 'failed')"
            " ORDER BY s.created_at"
        )
        return [_session(r) for r in rows]

    @property
    def data_version(self) -> int:
        """A number that changes when another connection commits (SQLite's data_version)."""
        version: int = self._db.execute("PRAGMA data_version").fetchone()[0]
        return version

    # --- sessions ------------------------------------------------------------------------------

    def create_session(
        self, session_id: str, owner: str, provider: str, now: float, label: str | None = None
    ) -> SessionRecord:
        """Insert a new ``pending`` session and log its creation; raise Conflict on a taken id."""
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO sessions (id, owner, provider, state, created_at, updated_at,"
                    " label) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (session_id, owner, provider, State.PENDING.value, now, now, label),
                )
                db.execute(
                    "INSERT INTO transitions (session_id, from_state, to_state, event, at)"
                    " VALUES (?, NULL, ?, 'create', ?)",
                    (session_id, State.PENDING.value, now),
                )
        except sqlite3.IntegrityError as exc:
            raise Conflict(
                f"cannot create session {session_id}: {exc}", session_id=session_id
            ) from exc
        return self.session(session_id)

    def find_session(self, session_id: str) -> SessionRecord | None:
        """Return the session with this id, or None."""
        row = self._db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return None if row is None else _session(row)

    def session(self, session_id: str) -> SessionRecord:
        """Return the session with this id; raise NotFound (404) if there is none."""
        record = self.find_session(session_id)
        if record is None:
            raise NotFound(f"no session {session_id}", session_id=session_id)
        return record

    def sessions(self, owner: str | None = None) -> list[SessionRecord]:
        """Return the sessions of ``owner`` (all when None), newest first.

        A user's sessions are those created since the user was (last) created: a name removed
        and added again does not inherit the sessions of whoever had it before.
        """
        if owner is None:
            rows = self._db.execute("SELECT * FROM sessions ORDER BY created_at DESC, id")
        else:
            rows = self._db.execute(
                "SELECT s.* FROM sessions s JOIN users u ON u.name = s.owner"
                " WHERE s.owner = ? AND s.created_at >= u.created_at"
                " ORDER BY s.created_at DESC, s.id",
                (owner,),
            )
        return [_session(r) for r in rows]

    def session_of(self, owner: str, session_id: str) -> SessionRecord | None:
        """Return ``owner``'s session ``session_id`` (see :meth:`sessions`), or None."""
        row = self._db.execute(
            "SELECT s.* FROM sessions s JOIN users u ON u.name = s.owner"
            " WHERE s.id = ? AND s.owner = ? AND s.created_at >= u.created_at",
            (session_id, owner),
        ).fetchone()
        return None if row is None else _session(row)

    def active_sessions(self) -> list[SessionRecord]:
        """Return every session not in a final state, oldest first."""
        marks = ",".join("?" * len(ACTIVE_STATES))
        rows = self._db.execute(
            f"SELECT * FROM sessions WHERE state IN ({marks}) ORDER BY created_at",  # noqa: S608
            [s.value for s in ACTIVE_STATES],
        )
        return [_session(r) for r in rows]

    def count_active(self, owner: str | None = None) -> int:
        """Return how many sessions (of ``owner``, or of everyone) are not final."""
        marks = ",".join("?" * len(ACTIVE_STATES))
        query = f"SELECT COUNT(*) FROM sessions WHERE state IN ({marks})"  # noqa: S608
        params: list[str] = [s.value for s in ACTIVE_STATES]
        if owner is not None:
            query += " AND owner = ?"
            params.append(owner)
        count: int = self._db.execute(query, params).fetchone()[0]
        return count

    def apply(
        self,
        session_id: str,
        event: Event,
        now: float,
        *,
        reason: str | None = None,
        endpoint: VncEndpoint | None = None,
        cause: str | None = None,
    ) -> tuple[State, SessionRecord]:
        """Apply ``event`` to a session and log it, in one transaction.

        Entering ``ready`` stores ``endpoint`` (a resumed session has a new one); ``ready_at``
        keeps the first time. Returns the previous state and the updated session. Raises
        :class:`Conflict` (and changes nothing) when the transition table refuses the event,
        :class:`NotFound` when there is no such session.
        """
        with self._transaction() as db:
            row = db.execute("SELECT state FROM sessions WHERE id = ?", (session_id,)).fetchone()
            if row is None:
                raise NotFound(f"no session {session_id}", session_id=session_id)
            before = State(row["state"])
            after = next_state(before, event)
            db.execute(
                "UPDATE sessions SET state = ?, updated_at = ?,"
                " reason = COALESCE(?, reason), end_cause = COALESCE(?, end_cause),"
                " endpoint = CASE WHEN ? = 'ready' THEN ? ELSE endpoint END,"
                " ready_at = CASE WHEN ? = 'ready' THEN COALESCE(ready_at, ?) ELSE ready_at END"
                " WHERE id = ?",
                (
                    after.value,
                    now,
                    reason,
                    cause,
                    after.value,
                    _endpoint_to_json(endpoint),
                    after.value,
                    now,
                    session_id,
                ),
            )
            db.execute(
                "INSERT INTO transitions (session_id, from_state, to_state, event, reason, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (session_id, before.value, after.value, event.value, reason, now),
            )
        return before, self.session(session_id)

    def set_label(self, session_id: str, label: str | None) -> SessionRecord:
        """Give a session a new label (None removes it) and return it."""
        with self._transaction() as db:
            db.execute("UPDATE sessions SET label = ? WHERE id = ?", (label, session_id))
        return self.session(session_id)

    def ended_sessions(self, before: float) -> list[SessionRecord]:
        """Return the sessions that ended (stopped or failed) before ``before``, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM sessions WHERE state IN (?, ?) AND updated_at < ? ORDER BY updated_at",
            (State.STOPPED.value, State.FAILED.value, before),
        )
        return [_session(r) for r in rows]

    def delete_sessions(self, session_ids: list[str]) -> int:
        """Delete ended sessions and their transitions; active ones are left. Returns how many."""
        if not session_ids:
            return 0
        deleted = 0
        with self._transaction() as db:
            for session_id in session_ids:
                row = db.execute(
                    "SELECT state FROM sessions WHERE id = ?", (session_id,)
                ).fetchone()
                if row is None or State(row["state"]) in ACTIVE_STATES:
                    continue
                db.execute("DELETE FROM transitions WHERE session_id = ?", (session_id,))
                db.execute("DELETE FROM sessions WHERE id = ?", (session_id,))
                deleted += 1
        return deleted

    def add_bytes(self, session_id: str, bytes_in: int, bytes_out: int) -> None:
        """Add a viewer's relayed byte counts to the session's totals."""
        self._db.execute(
            "UPDATE sessions SET bytes_in = bytes_in + ?, bytes_out = bytes_out + ? WHERE id = ?",
            (bytes_in, bytes_out, session_id),
        )

    def transitions(self, session_id: str) -> list[TransitionRecord]:
        """Return the logged transitions of a session, oldest first."""
        rows = self._db.execute(
            "SELECT * FROM transitions WHERE session_id = ? ORDER BY id", (session_id,)
        )
        return [
            TransitionRecord(
                session_id=r["session_id"],
                from_state=None if r["from_state"] is None else State(r["from_state"]),
                to_state=State(r["to_state"]),
                event=r["event"],
                reason=r["reason"],
                at=r["at"],
            )
            for r in rows
        ]

    # --- provider sign-ins ---------------------------------------------------------------------

    def signin(self, user: str, provider: str) -> SignInRecord | None:
        """Return the stored (encrypted) sign-in of ``user`` to ``provider``, or None."""
        row = self._db.execute(
            "SELECT * FROM signins WHERE user = ? AND provider = ?", (user, provider)
        ).fetchone()
        return None if row is None else _signin(row)

    def signins(self, user: str | None = None) -> list[SignInRecord]:
        """Return the stored sign-ins of ``user`` (everyone's when None), by user and provider."""
        if user is None:
            rows = self._db.execute("SELECT * FROM signins ORDER BY user, provider")
        else:
            rows = self._db.execute(
                "SELECT * FROM signins WHERE user = ? ORDER BY provider", (user,)
            )
        return [_signin(r) for r in rows]

    def save_signin(
        self,
        user: str,
        provider: str,
        expected_version: int | None,
        sealed: tuple[str, bytes, bytes],
        now: float,
    ) -> SignInRecord | None:
        """Store ``sealed`` (key id, nonce, ciphertext) as version ``expected_version + 1``.

        A compare-and-set: inside one transaction, only when the stored version is
        ``expected_version`` (None: nothing stored). Returns the new record, or None (and writes
        nothing) when another save got there first; re-read with :meth:`signin` then.
        """
        key_id, nonce, ciphertext = sealed
        version = (expected_version or 0) + 1
        with self._transaction() as db:
            row = db.execute(
                "SELECT version FROM signins WHERE user = ? AND provider = ?", (user, provider)
            ).fetchone()
            if (None if row is None else row["version"]) != expected_version:
                return None
            if row is None:
                db.execute(
                    "INSERT INTO signins (user, provider, version, key_id, nonce, ciphertext,"
                    " connected_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (user, provider, version, key_id, nonce, ciphertext, now, now),
                )
            else:
                db.execute(
                    "UPDATE signins SET version = ?, key_id = ?, nonce = ?, ciphertext = ?,"
                    " updated_at = ? WHERE user = ? AND provider = ?",
                    (version, key_id, nonce, ciphertext, now, user, provider),
                )
        return self.signin(user, provider)

    def delete_signins(
        self, user: str | None = None, provider: str | None = None, *, key_id: str | None = None
    ) -> int:
        """Delete the sign-ins matching every filter given (``user``, ``provider``, ``key_id``).

        Returns how many were deleted. Called with no filter at all, it deletes nothing.
        """
        filters = {"user": user, "provider": provider, "key_id": key_id}
        given = {column: value for column, value in filters.items() if value is not None}
        if not given:
            return 0
        where = " AND ".join(f"{column} = ?" for column in given)
        with self._transaction() as db:
            cursor = db.execute(
                f"DELETE FROM signins WHERE {where}",  # noqa: S608 (fixed column names)
                list(given.values()),
            )
        return cursor.rowcount

    def reseal_signins(self, seal: SealSignIn) -> int:
        """Replace every sign-in's key id, nonce and ciphertext by ``seal``'s, in one transaction.

        ``seal`` returns None to leave a record as it is; an exception from it rolls every
        record back. Versions and times are kept. Returns how many records were replaced.
        """
        changed = 0
        with self._transaction() as db:
            for row in db.execute("SELECT * FROM signins ORDER BY user, provider").fetchall():
                sealed = seal(_signin(row))
                if sealed is None:
                    continue
                db.execute(
                    "UPDATE signins SET key_id = ?, nonce = ?, ciphertext = ?"
                    " WHERE user = ? AND provider = ?",
                    (*sealed, row["user"], row["provider"]),
                )
                changed += 1
        return changed

    def signin_key_ids(self) -> dict[str, int]:
        """Return how many sign-ins are stored under each key id."""
        rows = self._db.execute("SELECT key_id, COUNT(*) FROM signins GROUP BY key_id")
        return {str(r[0]): int(r[1]) for r in rows}

    # --- headless runs -------------------------------------------------------------------------

    def create_run(
        self, run_id: str, owner: str, provider: str, prompt: str, timeout_s: float, now: float
    ) -> RunRecord:
        """Insert a new ``queued`` run; raise Conflict on a taken id."""
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO runs (id, owner, provider, prompt, state, timeout_s, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (run_id, owner, provider, prompt, RunState.QUEUED.value, timeout_s, now),
                )
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"cannot create run {run_id}: {exc}", run_id=run_id) from exc
        return self.run(run_id)

    def run(self, run_id: str) -> RunRecord:
        """Return the run ``run_id``; raise NotFound (404) when there is none."""
        row = self._db.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise NotFound(f"no run {run_id}", run_id=run_id)
        return _run(row)

    def run_of(self, owner: str, run_id: str) -> RunRecord | None:
        """Return ``owner``'s run ``run_id``, or None (someone else's is None too)."""
        row = self._db.execute(
            "SELECT * FROM runs WHERE id = ? AND owner = ?", (run_id, owner)
        ).fetchone()
        return None if row is None else _run(row)

    def runs(self, owner: str, limit: int = 100) -> list[RunRecord]:
        """Return ``owner``'s latest ``limit`` runs, newest first: without their events, and
        only the first :data:`LIST_OUTPUT_MAX` characters of each output."""
        rows = self._db.execute(
            f"SELECT {_RUN_LISTED} FROM runs WHERE owner = ?"  # noqa: S608 -- our column names
            " ORDER BY created_at DESC, id LIMIT ?",
            (LIST_OUTPUT_MAX, owner, limit),
        )
        return [_run(r) for r in rows]

    def active_runs(self) -> list[RunRecord]:
        """Return every run still ``queued`` or ``running``, oldest first."""
        states = tuple(s.value for s in ACTIVE_RUN_STATES)
        rows = self._db.execute(
            f"SELECT * FROM runs WHERE state IN ({', '.join('?' * len(states))})"  # noqa: S608
            " ORDER BY created_at",
            states,
        )
        return [_run(r) for r in rows]

    def apply_run(
        self,
        run_id: str,
        step: RunStep,
        now: float,
        *,
        reason: str | None = None,
        exit_code: int | None = None,
        output: str | None = None,
        events: str | None = None,
        tokens: tuple[int, int] | None = None,
    ) -> RunRecord:
        """Apply ``step`` through :func:`~remotecli.runs.next_run_state`, with what it ended with.

        Raises Conflict (409) when the run's state does not take the step: nothing changes.
        """
        with self._transaction() as db:
            row = db.execute("SELECT state FROM runs WHERE id = ?", (run_id,)).fetchone()
            if row is None:
                raise NotFound(f"no run {run_id}", run_id=run_id)
            state = next_run_state(RunState(row["state"]), step)
            fields: dict[str, object] = {"state": state.value}
            if step is RunStep.START:
                fields["started_at"] = now
            else:
                fields.update(ended_at=now, reason=reason, exit_code=exit_code)
                if output is not None:
                    fields.update(output=output, events=events)
                if tokens is not None:
                    fields.update(input_tokens=tokens[0], output_tokens=tokens[1])
            assignments = ", ".join(f"{name} = ?" for name in fields)
            db.execute(
                f"UPDATE runs SET {assignments} WHERE id = ?",  # noqa: S608 -- our column names
                (*fields.values(), run_id),
            )
        return self.run(run_id)

    def removed_owners_with_runs(self) -> list[RunRecord]:
        """Return the runs still going whose owner was removed, oldest first."""
        states = tuple(s.value for s in ACTIVE_RUN_STATES)
        marks = ", ".join("?" * len(states))
        rows = self._db.execute(
            "SELECT r.* FROM runs r JOIN users u ON u.name = r.owner"  # noqa: S608 -- marks only
            f" WHERE u.removed_at IS NOT NULL AND r.state IN ({marks}) ORDER BY r.created_at",
            states,
        )
        return [_run(r) for r in rows]

    def usage(self, owner: str, start: float, end: float) -> Usage:
        """Return what ``owner``'s runs created in [``start``, ``end``) used."""
        row = self._db.execute(
            # TOTAL, not SUM: a float that never overflows, however many tokens were reported
            "SELECT COUNT(*), TOTAL(input_tokens), TOTAL(output_tokens)"
            " FROM runs WHERE owner = ? AND created_at >= ? AND created_at < ?",
            (owner, start, end),
        ).fetchone()
        return Usage(int(row[0]), int(row[1]), int(row[2]))

    def delete_ended_runs(self, before: float) -> int:
        """Delete the runs that ended before ``before``; returns how many."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM runs WHERE ended_at IS NOT NULL AND ended_at < ?", (before,)
            )
        return cursor.rowcount
