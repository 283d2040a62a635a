"""The SQLite store, on a real database file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from remotecli.auth import hash_token
from remotecli.controller.store import MIGRATIONS, SCHEMA_VERSION, SignInRecord, Store
from remotecli.drivers.base import VncEndpoint
from remotecli.exceptions import ConfigError, Conflict, NotFound
from remotecli.states import Event, State


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store.open(tmp_path / "store.sqlite3")
    opened.add_user("alice", 1.0)
    return opened


def test_new_file_is_wal_and_migrated(tmp_path: Path) -> None:
    """Opening a new file creates the latest schema in WAL mode, readable by its owner only."""
    store = Store.open(tmp_path / "new.sqlite3")
    assert store.schema_version == SCHEMA_VERSION
    raw = sqlite3.connect(tmp_path / "new.sqlite3")
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert (tmp_path / "new.sqlite3").stat().st_mode & 0o777 == 0o600
    raw.close()
    store.close()


def test_newer_schema_refused(tmp_path: Path) -> None:
    """A database from a newer remote-cli is refused with the fix (upgrade)."""
    raw = sqlite3.connect(tmp_path / "future.sqlite3")
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(ConfigError, match="upgrade remote-cli"):
        Store.open(tmp_path / "future.sqlite3")


def test_tokens_map_to_users(store: Store) -> None:
    """A token hash finds its user; replacing the admin's tokens voids the old one."""
    store.add_token("bob", hash_token("t-bob"), 2.0)
    assert store.user_for_token(hash_token("t-bob"), 5.0) == "bob"
    assert store.user_for_token(hash_token("other"), 5.0) is None
    store.replace_tokens("admin", hash_token("old"), 3.0)
    store.replace_tokens("admin", hash_token("new"), 4.0)
    assert store.user_for_token(hash_token("old"), 5.0) is None
    assert store.user_for_token(hash_token("new"), 5.0) == "admin"
    assert store.users() == ["admin", "alice", "bob"]


def test_lifecycle_is_persisted_and_logged(store: Store, tmp_path: Path) -> None:
    """Each transition updates the row and adds a log line; both survive a reopen."""
    store.create_session("s1", "alice", "shell", 10.0)
    endpoint = VncEndpoint(host="127.0.0.1", port=5901, password="pw")
    store.apply("s1", Event.START, 11.0)
    before, record = store.apply("s1", Event.READY, 12.0, endpoint=endpoint)
    assert before is State.STARTING
    assert record.state is State.READY
    assert record.ready_at == 12.0
    assert record.endpoint == endpoint
    store.apply("s1", Event.STOP, 13.0, reason="deleted")
    store.apply("s1", Event.STOPPED, 14.0)
    store.add_bytes("s1", 5, 7)
    store.close()

    reopened = Store.open(tmp_path / "store.sqlite3")
    record = reopened.session("s1")
    assert (record.state, record.reason, record.bytes_in, record.bytes_out) == (
        State.STOPPED,
        "deleted",
        5,
        7,
    )
    log = [(t.from_state, t.to_state, t.event) for t in reopened.transitions("s1")]
    assert log == [
        (None, State.PENDING, "create"),
        (State.PENDING, State.STARTING, "start"),
        (State.STARTING, State.READY, "ready"),
        (State.READY, State.STOPPING, "stop"),
        (State.STOPPING, State.STOPPED, "stopped"),
    ]


def test_refused_transition_changes_nothing(store: Store) -> None:
    """A transition the table refuses raises Conflict and leaves row and log as they were."""
    store.create_session("s1", "alice", "shell", 10.0)
    with pytest.raises(Conflict):
        store.apply("s1", Event.READY, 11.0)
    assert store.session("s1").state is State.PENDING
    assert len(store.transitions("s1")) == 1


def test_unknown_session_and_duplicate_id(store: Store) -> None:
    """An unknown id is NotFound; reusing an id is a Conflict; an unknown owner is refused."""
    with pytest.raises(NotFound):
        store.apply("missing", Event.START, 1.0)
    store.create_session("s1", "alice", "shell", 1.0)
    with pytest.raises(Conflict):
        store.create_session("s1", "alice", "shell", 2.0)
    with pytest.raises(Conflict):
        store.create_session("s2", "nobody", "shell", 2.0)


def test_counts_and_listing(store: Store) -> None:
    """Active counts ignore final sessions; listings are per owner, newest first."""
    store.add_user("bob", 1.0)
    store.create_session("a1", "alice", "shell", 1.0)
    store.create_session("a2", "alice", "shell", 2.0)
    store.create_session("b1", "bob", "shell", 3.0)
    store.apply("a1", Event.FAIL, 4.0, reason="broken")
    assert store.count_active() == 2
    assert store.count_active("alice") == 1
    assert [r.id for r in store.sessions("alice")] == ["a2", "a1"]
    assert [r.id for r in store.active_sessions()] == ["a2", "b1"]
    assert store.session("a1").reason == "broken"


def test_signins_migration_keeps_older_data(tmp_path: Path) -> None:
    """A store made before the sign-ins table gains it on open and keeps its users and sessions."""
    raw = sqlite3.connect(tmp_path / "old.sqlite3")
    for statement in MIGRATIONS[0]:
        raw.execute(statement)
    raw.execute("INSERT INTO users VALUES ('alice', 1.0)")
    raw.execute("PRAGMA user_version = 1")
    raw.commit()
    raw.close()
    store = Store.open(tmp_path / "old.sqlite3")
    assert store.schema_version == SCHEMA_VERSION
    assert store.users() == ["alice"]
    assert store.signins() == []
    store.close()


def test_save_signin_is_a_compare_and_set(store: Store) -> None:
    """A sign-in is stored only from the version the caller names; connected_at stays the first
    save's time."""
    first = store.save_signin("alice", "codex", None, ("k1", b"n1", b"c1"), 10.0)
    assert first == SignInRecord("alice", "codex", 1, "k1", b"n1", b"c1", 10.0, 10.0)
    assert store.save_signin("alice", "codex", None, ("k1", b"n2", b"c2"), 11.0) is None
    assert store.save_signin("alice", "codex", 2, ("k1", b"n2", b"c2"), 11.0) is None
    second = store.save_signin("alice", "codex", 1, ("k2", b"n2", b"c2"), 12.0)
    assert second == SignInRecord("alice", "codex", 2, "k2", b"n2", b"c2", 10.0, 12.0)
    assert store.signin("alice", "codex") == second
    assert store.signin("alice", "gemini") is None


def test_delete_signins_by_filter(store: Store) -> None:
    """Deleting sign-ins matches every filter given, and with no filter deletes nothing."""
    for user, provider, key_id in [("a", "p", "k1"), ("a", "q", "k2"), ("b", "p", "k1")]:
        store.save_signin(user, provider, None, (key_id, b"n", b"c"), 1.0)
    assert store.signin_key_ids() == {"k1": 2, "k2": 1}
    assert store.delete_signins() == 0
    assert store.delete_signins("a", "p") == 1
    assert store.delete_signins(key_id="k1") == 1
    assert [(r.user, r.provider) for r in store.signins()] == [("a", "q")]
    assert store.delete_signins("a") == 1
    assert store.signins() == []


def test_reseal_signins_is_one_transaction(store: Store) -> None:
    """Resealing replaces key id, nonce and ciphertext of every record, or of none when the
    sealer fails part way."""
    store.save_signin("a", "p", None, ("k1", b"n", b"c"), 1.0)
    store.save_signin("b", "p", None, ("k1", b"n", b"c"), 2.0)

    def failing(record: SignInRecord) -> tuple[str, bytes, bytes]:
        if record.user == "b":
            raise ValueError("cannot read b")
        return "k2", b"n2", b"c2"

    with pytest.raises(ValueError, match="cannot read b"):
        store.reseal_signins(failing)
    assert store.signin_key_ids() == {"k1": 2}
    assert store.reseal_signins(lambda r: None if r.user == "a" else ("k2", b"N", b"C")) == 1
    record = store.signin("b", "p")
    assert record == SignInRecord("b", "p", 1, "k2", b"N", b"C", 2.0, 2.0)
