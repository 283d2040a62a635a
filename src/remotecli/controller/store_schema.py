"""The store's schema and records: the migrations both databases apply, and what rows become.

:data:`MIGRATIONS` are written once, in the SQL SQLite and PostgreSQL share; the only
difference, column type names, is translated by :mod:`remotecli.controller.store_db`
(:data:`~remotecli.controller.store_db.POSTGRES_TYPES`). ``"user"`` is quoted: PostgreSQL
reserves the word, and SQLite reads the quoted name as the same column.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from remotecli.controller.store_db import Row
from remotecli.drivers.base import VncEndpoint
from remotecli.runs import RunState
from remotecli.states import State

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE TABLE users (name TEXT PRIMARY KEY, created_at REAL NOT NULL)",
        "CREATE TABLE tokens (hash TEXT PRIMARY KEY,"
        ' "user" TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,'
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
        'CREATE TABLE signins ("user" TEXT NOT NULL, provider TEXT NOT NULL,'
        " version INTEGER NOT NULL, key_id TEXT NOT NULL, nonce BLOB NOT NULL,"
        " ciphertext BLOB NOT NULL, connected_at REAL NOT NULL, updated_at REAL NOT NULL,"
        ' PRIMARY KEY ("user", provider))',
    ),
    (
        # Everyday operation: users seen and removed, tokens that expire, browser logins that
        # can be signed out one by one, session labels, and why a session ended.
        "ALTER TABLE users ADD COLUMN last_seen REAL",
        "ALTER TABLE users ADD COLUMN removed_at REAL",
        "ALTER TABLE tokens ADD COLUMN expires_at REAL",
        "CREATE TABLE logins (hash TEXT PRIMARY KEY,"
        ' "user" TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,'
        " created_at REAL NOT NULL, expires_at REAL NOT NULL)",
        'CREATE INDEX logins_by_user ON logins("user")',
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
    (
        # Several controllers on one database (docs/cluster.md): the one that created a
        # session runs it; NULL for sessions from before, which every controller takes as its own.
        "ALTER TABLE sessions ADD COLUMN controller TEXT",
        "ALTER TABLE runs ADD COLUMN controller TEXT",
        # Many hosts: the host a driver placed the session on (docs/cluster.md); NULL for a
        # session on the controller's own host, and for every session stored before.
        "ALTER TABLE sessions ADD COLUMN host TEXT",
    ),
    (
        # Several controllers, continued (docs/cluster.md): when a viewer attached through a
        # controller that does not run the session was last seen (its owner's reaper counts
        # it), and each controller's heartbeat (survivors take over one silent too long).
        "ALTER TABLE sessions ADD COLUMN viewed_at REAL",
        "CREATE TABLE controllers (id TEXT PRIMARY KEY, seen_at REAL NOT NULL)",
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
    controller: str | None = None
    """The controller that runs it (None: any; a database one controller had alone)."""
    host: str | None = None
    """The host it was placed on (a cluster's); None on the controller's own host."""
    viewed_at: float | None = None
    """When a viewer attached through another controller than its own was last seen (None:
    never); its controller's reaper counts it (:mod:`remotecli.controller.peers`)."""


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
    controller: str | None = None
    """The controller that runs it (None: any)."""


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


def endpoint_to_json(endpoint: VncEndpoint | None) -> str | None:
    if endpoint is None:
        return None
    return json.dumps(
        {
            "unix_path": endpoint.unix_path,
            "host": endpoint.host,
            "port": endpoint.port,
            "password": endpoint.password,
            "channel_secret": endpoint.channel_secret,
            "channel_cert": endpoint.channel_cert,
            "host_name": endpoint.host_name,
        }
    )


def endpoint_from_json(text: str | None) -> VncEndpoint | None:
    if text is None:
        return None
    data = json.loads(text)
    return VncEndpoint(
        unix_path=data.get("unix_path"),
        host=data.get("host"),
        port=data.get("port"),
        password=data.get("password"),
        channel_secret=data.get("channel_secret"),
        channel_cert=data.get("channel_cert"),
        host_name=data.get("host_name"),
    )


def signin_record(row: Row) -> SignInRecord:
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


def run_record(row: Row) -> RunRecord:
    return RunRecord(**{**dict(row), "state": RunState(row["state"])})


def session_record(row: Row) -> SessionRecord:
    return SessionRecord(
        id=row["id"],
        owner=row["owner"],
        provider=row["provider"],
        state=State(row["state"]),
        reason=row["reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        ready_at=row["ready_at"],
        endpoint=endpoint_from_json(row["endpoint"]),
        bytes_in=row["bytes_in"],
        bytes_out=row["bytes_out"],
        label=row["label"],
        end_cause=row["end_cause"],
        controller=row["controller"],
        host=row["host"],
        viewed_at=row["viewed_at"],
    )
