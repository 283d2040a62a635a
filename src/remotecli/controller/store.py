"""The controller's store: users, their token hashes, sessions and every transition.

One SQLite file in the data dir by default (WAL mode, so readers never wait for the writer), or
one PostgreSQL database that several controllers share (:meth:`Store.connect`). The SQL and the
transactions are written once, here; :mod:`remotecli.controller.store_db` holds the few things
the two databases do differently. The schema is versioned and upgraded by the ordered
:data:`MIGRATIONS` on open. Every state change runs :func:`remotecli.states.next_state` inside
one write transaction that also logs the transition (``BEGIN IMMEDIATE`` on SQLite, the same
one-writer lock on PostgreSQL), so a refused or interrupted change leaves nothing half written
and two controllers racing the same change cannot both make it. Calls are synchronous and
short; the controller makes them from its event loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from remotecli.config import STORE_URL_SCHEMES
from remotecli.controller.store_controllers import ControllerTable
from remotecli.controller.store_db import (
    Database,
    PostgresDatabase,
    SqliteDatabase,
    redact_url,
)
from remotecli.controller.store_runs import LIST_OUTPUT_MAX, RunTable
from remotecli.controller.store_schema import (
    MIGRATIONS,
    SCHEMA_VERSION,
    RunRecord,
    SealSignIn,
    SessionRecord,
    SignInRecord,
    TransitionRecord,
    Usage,
    UserRecord,
    endpoint_to_json,
    session_record,
    signin_record,
)
from remotecli.drivers.base import VncEndpoint
from remotecli.exceptions import ConfigError, Conflict, NotFound
from remotecli.states import ACTIVE_STATES, Event, State, next_state

__all__ = [
    "LIST_OUTPUT_MAX",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "RunRecord",
    "SealSignIn",
    "SessionRecord",
    "SignInRecord",
    "Store",
    "TransitionRecord",
    "Usage",
    "UserRecord",
    "is_store_url",
]

_UPSERT_HASH = (  # a token hash: add it, or give it to another user
    'INSERT INTO tokens (hash, "user", created_at, expires_at) VALUES (?, ?, ?, ?)'
    ' ON CONFLICT (hash) DO UPDATE SET "user" = excluded."user",'
    " created_at = excluded.created_at, expires_at = excluded.expires_at"
)


def is_store_url(url: str) -> bool:
    """True for a URL :meth:`Store.connect` takes (``postgresql://`` or ``postgres://``)."""
    return url.partition("://")[0] in STORE_URL_SCHEMES and "://" in url


class Store(ControllerTable, RunTable):
    """The store; open it with :meth:`open` (SQLite) or :meth:`connect` (PostgreSQL), and
    :meth:`close` it on shutdown."""

    def __init__(self, database: Database, path: Path | None = None) -> None:
        self._db = database
        self._path = path

    @classmethod
    def open(cls, path: Path) -> Store:
        """Open (or create) the SQLite file at ``path``, in WAL mode, migrated to the latest schema.

        Raises :class:`ConfigError` when the file cannot be opened or comes from a newer
        remote-cli (its schema version is above :data:`SCHEMA_VERSION`).
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Token hashes and VNC passwords live here: only this user may read the file (SQLite
            # gives its -wal and -shm files the same mode).
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise ConfigError(
                f"cannot open the store {path}: {exc}; check the data dir is writable"
            ) from exc
        store = cls(SqliteDatabase.open(str(path)), path)
        store._migrate()
        return store

    @classmethod
    def connect(cls, url: str) -> Store:
        """Connect to the PostgreSQL database at ``url``, migrated to the latest schema.

        Several controllers may share it. Raises :class:`ConfigError` when ``url`` is not a
        ``postgresql://`` URL, the database cannot be reached, or its schema is newer than this
        remote-cli's.
        """
        if not is_store_url(url):
            raise ConfigError(
                f"the store URL {redact_url(url)!r} is not a PostgreSQL URL; write "
                "postgresql://USER:PASSWORD@HOST:PORT/DATABASE (docs/configuration.md)"
            )
        store = cls(PostgresDatabase(url))
        try:
            store._migrate()
        except BaseException:
            store.close()
            raise
        return store

    def reopen(self) -> Store:
        """Another store on the same database, with a connection of its own (for a thread)."""
        if self._path is not None:
            return Store.open(self._path)
        store = Store(self._db.reopen())
        store._migrate()
        return store

    @property
    def path(self) -> Path:
        """The SQLite file; ConfigError for a PostgreSQL store, which has none."""
        if self._path is None:
            raise ConfigError(
                f"the store {self._db.location} is a PostgreSQL database, not a file in the "
                "data dir; back it up with pg_dump (docs/operations.md)"
            )
        return self._path

    @property
    def location(self) -> str:
        """Where the store is, for messages: the file, or the URL without its password."""
        return self._db.location

    @property
    def is_shared(self) -> bool:
        """True for a PostgreSQL store, which several controllers may share."""
        return self._path is None

    def close(self) -> None:
        """Close the database; the store cannot be used afterwards."""
        self._db.close()

    @property
    def schema_version(self) -> int:
        """The schema version of the open database."""
        return self._db.schema_version()

    def _migrate(self) -> None:
        current = self.schema_version
        if current < 0:
            raise ConfigError(
                f"the store {self.location} has schema version {current}: it is not a "
                "remote-cli store; restore a backup or choose another --data-dir"
            )
        if current > SCHEMA_VERSION:
            raise ConfigError(
                f"the store {self.location} has schema version {current}, newer than this "
                f"remote-cli understands ({SCHEMA_VERSION}); upgrade remote-cli"
            )
        for version in range(current, SCHEMA_VERSION):
            with self._transaction() as db:
                if db.schema_version() != version:
                    continue  # another controller migrated it meanwhile
                for statement in MIGRATIONS[version]:
                    db.execute(db.migration_sql(statement))
                db.set_schema_version(version + 1)

    # --- users, tokens and browser logins ----------------------------------------------------

    def add_user(self, name: str, now: float) -> None:
        """Create user ``name`` if it does not exist yet (a removed one comes back)."""
        with self._transaction() as db:
            self._ensure_user(db, name, now)

    @staticmethod
    def _ensure_user(db: Database, name: str, now: float) -> None:
        db.execute(
            "INSERT INTO users (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (name, now),
        )
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
            ' (SELECT COUNT(*) FROM tokens t WHERE t."user" = u.name) AS tokens,'
            " (SELECT CASE WHEN COUNT(*) = COUNT(t.expires_at) THEN MAX(t.expires_at) END"
            '  FROM tokens t WHERE t."user" = u.name) AS expires'
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
                _UPSERT_HASH,
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
            db.execute('DELETE FROM tokens WHERE "user" = ?', (user,))
            if sign_out:
                db.execute('DELETE FROM logins WHERE "user" = ?', (user,))
            db.execute(
                _UPSERT_HASH,
                (token_hash, user, now, expires_at),
            )

    def user_for_token(self, token_hash: str, now: float) -> str | None:
        """Return the user a token hash belongs to, or None (unknown, expired, user removed)."""
        row = self._db.execute(
            'SELECT t."user", t.expires_at FROM tokens t JOIN users u ON u.name = t."user"'
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
                'INSERT INTO logins (hash, "user", created_at, expires_at) VALUES (?, ?, ?, ?)',
                (login_hash, user, now, expires_at),
            )
            db.execute("DELETE FROM logins WHERE expires_at <= ?", (now,))

    def user_for_login(self, login_hash: str, now: float) -> str | None:
        """Return the user of a browser login, or None (unknown, signed out, expired)."""
        row = self._db.execute(
            'SELECT l."user" FROM logins l JOIN users u ON u.name = l."user"'
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
            db.execute('DELETE FROM tokens WHERE "user" = ?', (name,))
            db.execute('DELETE FROM logins WHERE "user" = ?', (name,))
            db.execute('DELETE FROM signins WHERE "user" = ?', (name,))
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
        return [session_record(r) for r in rows]

    @property
    def data_version(self) -> int:
        """A number that changes when another connection commits a write transaction."""
        return self._db.data_version()

    # --- sessions ------------------------------------------------------------------------------

    def create_session(
        self,
        session_id: str,
        owner: str,
        provider: str,
        now: float,
        label: str | None = None,
        controller: str | None = None,
    ) -> SessionRecord:
        """Insert a new ``pending`` session run by ``controller`` and log its creation; raise
        Conflict on a taken id."""
        try:
            with self._transaction() as db:
                db.execute(
                    "INSERT INTO sessions (id, owner, provider, state, created_at, updated_at,"
                    " label, controller) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (session_id, owner, provider, State.PENDING.value, now, now, label, controller),
                )
                db.execute(
                    "INSERT INTO transitions (session_id, from_state, to_state, event, at)"
                    " VALUES (?, NULL, ?, 'create', ?)",
                    (session_id, State.PENDING.value, now),
                )
        except Conflict as exc:
            raise Conflict(
                f"cannot create session {session_id}: {exc}", session_id=session_id
            ) from exc
        return self.session(session_id)

    def find_session(self, session_id: str) -> SessionRecord | None:
        """Return the session with this id, or None."""
        row = self._db.execute("SELECT * FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return None if row is None else session_record(row)

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
        return [session_record(r) for r in rows]

    def session_of(self, owner: str, session_id: str) -> SessionRecord | None:
        """Return ``owner``'s session ``session_id`` (see :meth:`sessions`), or None."""
        row = self._db.execute(
            "SELECT s.* FROM sessions s JOIN users u ON u.name = s.owner"
            " WHERE s.id = ? AND s.owner = ? AND s.created_at >= u.created_at",
            (session_id, owner),
        ).fetchone()
        return None if row is None else session_record(row)

    def active_sessions(self, controller: str | None = None) -> list[SessionRecord]:
        """Return every session not in a final state, oldest first; with ``controller``, only
        those it runs (and those no controller was recorded for)."""
        marks = ",".join("?" * len(ACTIVE_STATES))
        query = f"SELECT * FROM sessions WHERE state IN ({marks})"  # noqa: S608
        params: list[str] = [s.value for s in ACTIVE_STATES]
        if controller is not None:
            query += " AND (controller IS NULL OR controller = ?)"
            params.append(controller)
        rows = self._db.execute(query + " ORDER BY created_at", params)
        return [session_record(r) for r in rows]

    def count_active(self, owner: str | None = None) -> int:
        """Return how many sessions (of ``owner``, or of everyone) are not final."""
        marks = ",".join("?" * len(ACTIVE_STATES))
        query = f"SELECT COUNT(*) FROM sessions WHERE state IN ({marks})"  # noqa: S608
        params: list[str] = [s.value for s in ACTIVE_STATES]
        if owner is not None:
            query += " AND owner = ?"
            params.append(owner)
        count: int = self._db.execute(query, params).one()[0]
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

        Entering ``ready`` stores ``endpoint`` (a resumed session has a new one) and the host
        it names (:attr:`VncEndpoint.host_name`, None on the controller's own host);
        ``ready_at`` keeps the first time. Returns the previous state and the updated session.
        Raises :class:`Conflict` (and changes nothing) when the transition table refuses the event,
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
                " host = CASE WHEN ? = 'ready' THEN ? ELSE host END,"
                " ready_at = CASE WHEN ? = 'ready' THEN COALESCE(ready_at, ?) ELSE ready_at END"
                " WHERE id = ?",
                (
                    after.value,
                    now,
                    reason,
                    cause,
                    after.value,
                    endpoint_to_json(endpoint),
                    after.value,
                    None if endpoint is None else endpoint.host_name,
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
        return [session_record(r) for r in rows]

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
            'SELECT * FROM signins WHERE "user" = ? AND provider = ?', (user, provider)
        ).fetchone()
        return None if row is None else signin_record(row)

    def signins(self, user: str | None = None) -> list[SignInRecord]:
        """Return the stored sign-ins of ``user`` (everyone's when None), by user and provider."""
        if user is None:
            rows = self._db.execute('SELECT * FROM signins ORDER BY "user", provider')
        else:
            rows = self._db.execute(
                'SELECT * FROM signins WHERE "user" = ? ORDER BY provider', (user,)
            )
        return [signin_record(r) for r in rows]

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
                'SELECT version FROM signins WHERE "user" = ? AND provider = ?', (user, provider)
            ).fetchone()
            if (None if row is None else row["version"]) != expected_version:
                return None
            if row is None:
                db.execute(
                    'INSERT INTO signins ("user", provider, version, key_id, nonce, ciphertext,'
                    " connected_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (user, provider, version, key_id, nonce, ciphertext, now, now),
                )
            else:
                db.execute(
                    "UPDATE signins SET version = ?, key_id = ?, nonce = ?, ciphertext = ?,"
                    ' updated_at = ? WHERE "user" = ? AND provider = ?',
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
        where = " AND ".join(f'"{column}" = ?' for column in given)
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
            for row in db.execute('SELECT * FROM signins ORDER BY "user", provider').fetchall():
                sealed = seal(signin_record(row))
                if sealed is None:
                    continue
                db.execute(
                    "UPDATE signins SET key_id = ?, nonce = ?, ciphertext = ?"
                    ' WHERE "user" = ? AND provider = ?',
                    (*sealed, row["user"], row["provider"]),
                )
                changed += 1
        return changed

    def signin_key_ids(self) -> dict[str, int]:
        """Return how many sign-ins are stored under each key id."""
        rows = self._db.execute("SELECT key_id, COUNT(*) FROM signins GROUP BY key_id")
        return {str(r[0]): int(r[1]) for r in rows}
