"""The store, on a real SQLite file and on a real PostgreSQL database (tests/postgres.py)."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from operator import methodcaller
from pathlib import Path

import pytest

from remotecli.auth import hash_token
from remotecli.controller.store import (
    LIST_OUTPUT_MAX,
    MIGRATIONS,
    SCHEMA_VERSION,
    SignInRecord,
    Store,
    Usage,
)
from remotecli.drivers.base import VncEndpoint
from remotecli.exceptions import ConfigError, Conflict, NotFound, ServiceUnavailable
from remotecli.runs import RunState, RunStep
from remotecli.states import Event, State
from tests.conftest import StoreOpener


@pytest.fixture
def store(open_store: StoreOpener) -> Store:
    opened = open_store()
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


def test_lifecycle_is_persisted_and_logged(store: Store, open_store: StoreOpener) -> None:
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

    reopened = open_store()
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


def test_postgres_newer_schema_refused(postgres_url: str) -> None:
    """A PostgreSQL database from a newer remote-cli is refused with the fix (upgrade)."""
    import psycopg

    Store.connect(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as raw:
        raw.execute("UPDATE remotecli_meta SET schema_version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match="upgrade remote-cli"):
        Store.connect(postgres_url)


def test_postgres_url_checked_and_password_kept_out_of_messages(postgres_url: str) -> None:
    """A URL that is not PostgreSQL's, or a server that is not there, is a ConfigError that
    names the URL without its password."""
    with pytest.raises(ConfigError, match="not a PostgreSQL URL"):
        Store.connect("mysql://root:hunter2@localhost/remotecli")
    with pytest.raises(ConfigError, match="cannot open the store") as caught:
        Store.connect("postgresql://remotecli:hunter2@/nowhere?host=/nonexistent&connect_timeout=2")
    assert "hunter2" not in caught.value.message
    assert "remotecli:***@" in caught.value.message


def test_postgres_controllers_starting_together_migrate_once(postgres_url: str) -> None:
    """Several controllers connecting to a new database at once: each ends at the latest schema,
    and the migrations ran once."""
    barrier = threading.Barrier(4)
    stores: list[Store] = []
    errors: list[BaseException] = []

    def connect() -> None:
        barrier.wait()
        try:
            stores.append(Store.connect(postgres_url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=connect) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [s.schema_version for s in stores] == [SCHEMA_VERSION] * 4
    for store in stores:
        store.close()


def race(stores: list[Store], change: Callable[[Store], object]) -> list[str]:
    """Make ``change`` on every store at the same instant; return the outcomes, sorted."""
    barrier = threading.Barrier(len(stores))
    outcomes: list[str] = []

    def run(store: Store) -> None:
        barrier.wait()
        try:
            outcomes.append("done" if change(store) is not None else "refused")
        except Conflict:
            outcomes.append("conflict")

    threads = [threading.Thread(target=run, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(outcomes)


def test_racing_the_same_transition_one_wins(store: Store, open_store: StoreOpener) -> None:
    """Two controllers' connections applying the same transition at once: exactly one makes
    it, the other is refused by the table, and the log holds it once."""
    stores = [store, open_store()]
    for round_ in range(20):
        session_id = f"s{round_}"
        store.create_session(session_id, "alice", "shell", 1.0)
        outcomes = race(stores, methodcaller("apply", session_id, Event.START, 2.0))
        assert outcomes == ["conflict", "done"]
        log = [t.event for t in stores[1].transitions(session_id)]
        assert log == ["create", "start"]


def test_racing_the_same_signin_version_one_wins(store: Store, open_store: StoreOpener) -> None:
    """Two connections saving a sign-in from the same version at once: exactly one wins."""
    stores = [store, open_store()]
    for round_ in range(20):
        provider = f"p{round_}"
        for base in (None, 1):
            save = methodcaller("save_signin", "alice", provider, base, ("k", b"n", b"c"), 1.0)
            outcomes = race(stores, save)
            assert outcomes == ["done", "refused"]
        record = stores[1].signin("alice", provider)
        assert record is not None
        assert record.version == 2


def test_data_version_moves_on_others_writes_only(store: Store, open_store: StoreOpener) -> None:
    """The data version changes when another connection commits a write, not on our own."""
    other = open_store()
    seen = store.data_version
    store.add_user("bob", 2.0)
    assert store.data_version == seen
    other.remove_user("bob", 3.0)
    assert store.data_version != seen


def test_runs_are_stored_stepped_listed_and_counted(store: Store) -> None:
    """A run is created queued, steps through the run table with what it ended with, is listed
    newest first with its output cut, counts in the usage, and goes once ended long enough."""
    store.create_run("r1", "alice", "shell", "echo hi", 60.0, 10.0)
    store.create_run("r2", "alice", "shell", "echo two", 60.0, 11.0)
    with pytest.raises(Conflict):
        store.create_run("r1", "alice", "shell", "again", 60.0, 12.0)
    with pytest.raises(Conflict):
        store.apply_run("r1", RunStep.FINISH, 12.0)
    with pytest.raises(NotFound):
        store.apply_run("missing", RunStep.START, 12.0)
    assert [r.id for r in store.active_runs()] == ["r1", "r2"]
    store.apply_run("r1", RunStep.START, 13.0)
    output = "x" * (LIST_OUTPUT_MAX + 10)
    ended = store.apply_run(
        "r1", RunStep.FINISH, 14.0, exit_code=0, output=output, events="[]", tokens=(2**40, 3)
    )
    assert (ended.state, ended.started_at, ended.ended_at) == (RunState.DONE, 13.0, 14.0)
    assert (ended.output, ended.events, ended.input_tokens) == (output, "[]", 2**40)
    listed = store.runs("alice")
    assert [r.id for r in listed] == ["r2", "r1"]
    assert len(listed[1].output) == LIST_OUTPUT_MAX
    assert listed[1].events is None
    assert store.run_of("bob", "r1") is None
    assert store.usage("alice", 0.0, 100.0) == Usage(2, 2**40, 3)
    assert store.usage("alice", 10.5, 100.0) == Usage(1, 0, 0)
    assert store.removed_owners_with_runs() == []
    store.remove_user("alice", 15.0)
    assert [r.id for r in store.removed_owners_with_runs()] == ["r2"]
    assert store.delete_ended_runs(14.0) == 0
    assert store.delete_ended_runs(15.0) == 1
    assert [r.id for r in store.active_runs()] == ["r2"]


def test_users_tokens_and_logins(store: Store) -> None:
    """Tokens expire and move between users, logins sign out one by one, and removing a user
    drops its tokens, logins and sign-ins and marks its sessions."""
    store.add_token("bob", hash_token("t1"), 2.0, expires_at=10.0)
    store.add_token("carol", hash_token("t1"), 3.0)  # the same hash, given to another user
    assert store.user_for_token(hash_token("t1"), 20.0) == "carol"
    store.add_token("bob", hash_token("t2"), 4.0, expires_at=10.0)
    assert store.user_for_token(hash_token("t2"), 9.0) == "bob"
    assert store.user_for_token(hash_token("t2"), 10.0) is None
    assert store.token_expiry(hash_token("t2")) == 10.0
    store.add_login("bob", "l1", 5.0, 50.0)
    store.add_login("bob", "l2", 5.0, 50.0)
    assert store.user_for_login("l1", 6.0) == "bob"
    assert store.delete_login("l1")
    assert not store.delete_login("l1")
    store.save_signin("bob", "codex", None, ("k", b"n", b"c"), 6.0)
    store.create_session("b1", "bob", "shell", 7.0)
    records = {r.name: r for r in store.user_records()}
    assert (records["bob"].tokens, records["bob"].token_expires_at) == (1, 10.0)
    assert records["bob"].active_sessions == 1
    assert records["carol"].token_expires_at is None
    assert store.remove_user("bob", 8.0)
    assert not store.remove_user("bob", 8.0)
    assert store.user_for_login("l2", 9.0) is None
    assert store.signins("bob") == []
    assert [r.id for r in store.removed_owners_with_sessions()] == ["b1"]
    assert not store.user_exists("bob")
    store.add_user("bob", 9.0)
    assert store.user_exists("bob")
    assert store.sessions("bob") == []


def test_postgres_lost_connection_fails_one_call_then_reconnects(postgres_url: str) -> None:
    """A connection the server dropped fails one call with 503 (ServiceUnavailable); the next
    call opens a new one and works."""
    import psycopg

    store = Store.connect(postgres_url)
    store.add_user("alice", 1.0)
    pid = store._db.execute("SELECT pg_backend_pid()").one()[0]
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(ServiceUnavailable, match="cannot be reached"):
        store.users()
    assert store.users() == ["alice"]
    store.add_user("bob", 2.0)
    assert store.users() == ["alice", "bob"]
    store.close()


def test_reopen_connects_to_the_same_database(store: Store) -> None:
    """A reopened store (the clean-up's own connection) sees and makes the same changes; only a
    SQLite store has a path, a PostgreSQL one's says to use pg_dump."""
    other = store.reopen()
    other.add_user("bob", 2.0)
    assert store.users() == ["alice", "bob"]
    assert other.location == store.location
    if store.is_shared:
        with pytest.raises(ConfigError, match="pg_dump"):
            _ = store.path
    else:
        assert store.path.name == "remotecli.sqlite3"
    other.close()


def test_host_migration_keeps_sessions_and_ready_records_the_host(
    open_store: StoreOpener, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store from before sessions had a host gains the column on open (its sessions' host
    NULL); entering ready records the host the endpoint names, in the same transition, and a
    session on the controller's own host keeps NULL."""
    import remotecli.controller.store as store_module

    monkeypatch.setattr(store_module, "MIGRATIONS", MIGRATIONS[:-1])
    monkeypatch.setattr(store_module, "SCHEMA_VERSION", SCHEMA_VERSION - 1)
    old = open_store()
    assert old.schema_version == SCHEMA_VERSION - 1
    old.add_user("alice", 1.0)
    old._db.execute(
        "INSERT INTO sessions (id, owner, provider, state, created_at, updated_at)"
        " VALUES ('old', 'alice', 'shell', 'ready', 2.0, 2.0)"
    )
    old.close()
    monkeypatch.undo()

    store = open_store()
    assert store.schema_version == SCHEMA_VERSION
    assert store.session("old").host is None
    store.create_session("placed", "alice", "shell", 3.0)
    store.create_session("here", "alice", "shell", 3.0)
    for session_id, host_name in (("placed", "w1"), ("here", None)):
        store.apply(session_id, Event.START, 4.0)
        endpoint = VncEndpoint(host="10.0.0.2", port=40000, host_name=host_name)
        _, record = store.apply(session_id, Event.READY, 5.0, endpoint=endpoint)
        assert record.host == host_name
        assert record.endpoint == endpoint
    store.apply("placed", Event.FAIL, 6.0, reason="host w1 lost")
    assert open_store().session("placed").host == "w1"
    assert open_store().session("here").host is None
