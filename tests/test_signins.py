"""Kept provider sign-ins: encryption, versions, keys and rotation, on a real store (SQLite and
PostgreSQL)."""

from __future__ import annotations

import base64
import itertools
import stat
import threading
from pathlib import Path

import pytest

from remotecli.config import load_controller_config, parse_secret_key
from remotecli.controller.signins import (
    KEY_FILE,
    NEW_KEY_FILE,
    SaveOutcome,
    SecretKey,
    SignIns,
    encode_key,
    load_secret_key,
    new_key_material,
    read_key_file,
    rotate_secret,
    write_key_file,
)
from remotecli.controller.store import Store
from remotecli.exceptions import ConfigError, UnreadableSignIn
from tests.conftest import StoreOpener

TOKEN = b"sk-planted-refresh-token-0123456789"
FILES = {".codex/auth.json": b'{"refresh_token": "' + TOKEN + b'"}', ".codex/config": b"x=1"}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir(mode=0o700)
    return directory


@pytest.fixture
def store(data_dir: Path, open_store: StoreOpener) -> Store:
    return open_store()


@pytest.fixture
def key() -> SecretKey:
    return SecretKey(new_key_material(), "test")


@pytest.fixture
def signins(store: Store, key: SecretKey) -> SignIns:
    ticks = itertools.count(100)
    return SignIns(store, key, clock=lambda: float(next(ticks)))


def test_round_trip(signins: SignIns) -> None:
    """Saved files load back identically as version 1 with their times."""
    assert signins.load("alice", "codex") is None
    result = signins.save("alice", "codex", FILES, None)
    assert (result.outcome, result.version, result.saved) == (SaveOutcome.SAVED, 1, True)
    kept = signins.load("alice", "codex")
    assert kept is not None
    assert (kept.files, kept.version, kept.connected_at, kept.updated_at) == (FILES, 1, 100, 100)
    assert signins.load("alice", "gemini") is None
    assert signins.load("bob", "codex") is None


@pytest.mark.parametrize("move", ["user", "provider", "version", "ciphertext"])
def test_moved_or_altered_record_fails(signins: SignIns, store: Store, move: str) -> None:
    """A record moved to another user, provider or version, or altered, does not decrypt."""
    signins.save("alice", "codex", FILES, None)
    stored = store.signin("alice", "codex")
    assert stored is not None
    value = {
        "user": "mallory",
        "provider": "gemini",
        "version": 7,
        "ciphertext": stored.ciphertext + b"\0",
    }[move]
    # an attacker with write access to the database
    store._db.execute(f'UPDATE signins SET "{move}" = ?', (value,))  # noqa: S608
    (record,) = store.signins()
    with pytest.raises(UnreadableSignIn, match="altered, or copied"):
        signins.load(record.user, record.provider)


def test_stale_base_version_refused(signins: SignIns) -> None:
    """A save from an older version, from nothing when a record exists, or after a forget is
    refused, and the newer record stays."""
    signins.save("alice", "codex", FILES, None)
    newer = {".codex/auth.json": b"refreshed"}
    assert signins.save("alice", "codex", newer, 1).version == 2
    for base in (1, None, 3):
        result = signins.save("alice", "codex", {".codex/auth.json": b"old"}, base)
        assert (result.outcome, result.version) == (SaveOutcome.STALE, 2)
    kept = signins.load("alice", "codex")
    assert kept is not None
    assert (kept.files, kept.version) == (newer, 2)
    assert signins.forget("alice", "codex")
    result = signins.save("alice", "codex", newer, 2)  # a session still running at the forget
    assert (result.outcome, result.version) == (SaveOutcome.STALE, None)
    assert signins.load("alice", "codex") is None


def race(sides: list[SignIns], provider: str, base: int | None) -> list[str]:
    """Save from ``base`` on every side at the same instant; return the outcomes, sorted."""
    barrier = threading.Barrier(len(sides))
    outcomes: list[str] = []

    def save(side: int) -> None:
        files = {"f": f"side {side} from {base}".encode()}
        barrier.wait()
        outcomes.append(sides[side].save("alice", provider, files, base).outcome.value)

    threads = [threading.Thread(target=save, args=(side,)) for side in range(len(sides))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted(outcomes)


def test_concurrent_saves_one_wins(store: Store, open_store: StoreOpener, key: SecretKey) -> None:
    """Two controllers' connections saving from the same version at once: exactly one wins."""
    sides = [SignIns(store, key), SignIns(open_store(), key)]
    for round_ in range(20):
        provider = f"p{round_}"
        assert race(sides, provider, None) == ["saved", "stale"]
        assert race(sides, provider, 1) == ["saved", "stale"]
        kept = sides[1].load("alice", provider)
        assert kept is not None
        assert kept.version == 2


def test_identical_content_keeps_the_version(signins: SignIns) -> None:
    """Saving the files already stored creates no new version and keeps updated_at."""
    signins.save("alice", "codex", FILES, None)
    result = signins.save("alice", "codex", dict(FILES), 1)
    assert (result.outcome, result.version) == (SaveOutcome.UNCHANGED, 1)
    kept = signins.load("alice", "codex")
    assert kept is not None
    assert (kept.version, kept.updated_at) == (1, 100)


def test_empty_files_store_and_delete_nothing(signins: SignIns) -> None:
    """No files to keep stores no record, and leaves an existing one as it is."""
    assert signins.save("alice", "codex", {}, None).outcome is SaveOutcome.EMPTY
    assert signins.load("alice", "codex") is None
    signins.save("alice", "codex", FILES, None)
    result = signins.save("alice", "codex", {}, 1)
    assert (result.outcome, result.version) == (SaveOutcome.EMPTY, 1)
    kept = signins.load("alice", "codex")
    assert kept is not None
    assert kept.files == FILES


def test_wrong_key_reported_by_key_id(store: Store, key: SecretKey) -> None:
    """A record sealed with another key is reported with both key ids and the fix."""
    SignIns(store, key).save("alice", "codex", FILES, None)
    other = SecretKey(new_key_material(), "environment")
    with pytest.raises(UnreadableSignIn) as caught:
        SignIns(store, other).load("alice", "codex")
    message = caught.value.message
    assert f"encrypted with key {key.key_id}" in message
    assert f"this controller has key {other.key_id}" in message
    assert "remotecli secret forget --unreadable" in message
    assert caught.value.data["stored_key_id"] == key.key_id


def test_save_from_nothing_replaces_a_record_of_another_key(store: Store, key: SecretKey) -> None:
    """A record sealed with a lost key is replaced by a save from nothing (the user signed in
    again), as the next version; a save from a stale version still is not."""
    SignIns(store, SecretKey(new_key_material(), "lost")).save("alice", "codex", FILES, None)
    signins = SignIns(store, key)
    assert signins.save("alice", "codex", {"f": b"new"}, 3).outcome is SaveOutcome.STALE
    result = signins.save("alice", "codex", {"f": b"new"}, None)
    assert (result.outcome, result.version) == (SaveOutcome.SAVED, 2)
    kept = signins.load("alice", "codex")
    assert kept is not None
    assert kept.files == {"f": b"new"}


def test_forget_status_and_forget_unreadable(signins: SignIns, store: Store) -> None:
    """status lists a user's providers with times; forget, forget_user and forget_unreadable
    delete what they name and say how many."""
    signins.save("alice", "codex", FILES, None)
    signins.save("alice", "gemini", FILES, None)
    signins.save("alice", "codex", {"f": b"2"}, 1)
    signins.save("bob", "codex", FILES, None)
    assert signins.status("alice") == {"codex": (100.0, 102.0), "gemini": (101.0, 101.0)}
    assert signins.forget("alice", "gemini") is True
    assert signins.forget("alice", "gemini") is False
    assert signins.forget_user("alice") == 1
    assert signins.status("alice") == {}
    SignIns(store, SecretKey(new_key_material(), "old")).save("carol", "codex", FILES, None)
    assert signins.forget_unreadable() == 1
    assert [r.user for r in store.signins()] == ["bob"]


def test_key_file_created_0600_and_reused(data_dir: Path) -> None:
    """Without REMOTECLI_SECRET_KEY, a 0600 key file is made on the first start and reused."""
    first = load_secret_key(data_dir, None)
    path = data_dir / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text())) == 32
    assert load_secret_key(data_dir, None) == first
    assert sorted(p.name for p in data_dir.iterdir()) == [KEY_FILE]  # no temporary left


@pytest.mark.parametrize(
    ("mode", "content", "fix"),
    [
        (0o644, None, "chmod 600"),
        (0o640, None, "chmod 600"),
        (0o600, b"c2hvcnQ=\n", "restore it from a backup"),
        (0o600, b"", "restore it from a backup"),
    ],
)
def test_unsafe_or_broken_key_file_refused(
    data_dir: Path, mode: int, content: bytes | None, fix: str
) -> None:
    """A key file readable by others, or not holding 32 bytes, is refused naming the fix."""
    path = data_dir / KEY_FILE
    write_key_file(path, new_key_material())
    if content is not None:
        path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(ConfigError, match=fix):
        load_secret_key(data_dir, None)


def test_symlinked_key_file_refused(data_dir: Path, tmp_path: Path) -> None:
    """A key file that is a symbolic link is not followed."""
    write_key_file(tmp_path / "elsewhere", new_key_material())
    (data_dir / KEY_FILE).symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="cannot read the sign-in key"):
        load_secret_key(data_dir, None)


def test_environment_key_wins_in_base64_or_hex(data_dir: Path) -> None:
    """REMOTECLI_SECRET_KEY as base64 or hex gives the same key, and no key file is made."""
    material = new_key_material()
    by_base64 = load_secret_key(data_dir, encode_key(material))
    by_hex = load_secret_key(data_dir, material.hex())
    assert by_base64.material == by_hex.material == material
    assert by_base64.key_id == by_hex.key_id
    assert list(data_dir.iterdir()) == []
    with pytest.raises(ConfigError, match="REMOTECLI_SECRET_KEY is not a key"):
        parse_secret_key("too-short", "REMOTECLI_SECRET_KEY")


def test_secret_key_read_from_the_environment_only() -> None:
    """load_controller_config takes REMOTECLI_SECRET_KEY (hidden from repr), refuses a malformed
    one, and does not accept the key from the TOML file's settings."""
    material = new_key_material()
    config = load_controller_config({}, environ={"REMOTECLI_SECRET_KEY": material.hex()})
    assert config.secret_key == material.hex()
    assert material.hex() not in repr(config)
    assert load_controller_config({}, environ={}).secret_key is None
    with pytest.raises(ConfigError, match="REMOTECLI_SECRET_KEY is not a key"):
        load_controller_config({}, environ={"REMOTECLI_SECRET_KEY": "0" * 63})
    with pytest.raises(ConfigError, match="unknown controller setting 'secret_key'"):
        load_controller_config({"secret_key": encode_key(material)}, environ={})


def test_rotate_reencrypts_with_a_new_key_file(data_dir: Path, store: Store) -> None:
    """Rotation re-encrypts every record under a new key file: the old key no longer decrypts,
    the new one does, versions and times are kept."""
    signins = SignIns.open(store, data_dir, None)
    old = load_secret_key(data_dir, None)
    signins.save("alice", "codex", FILES, None)
    signins.save("alice", "codex", {"f": b"2"}, 1)
    signins.save("bob", "gemini", FILES, None)
    before = {(r.user, r.provider): r for r in store.signins()}
    signins.close()

    count, new = rotate_secret(store, data_dir, None)
    assert count == 2
    assert new.key_id != old.key_id
    assert read_key_file(data_dir / KEY_FILE).material == new.material
    assert not (data_dir / NEW_KEY_FILE).exists()
    with pytest.raises(UnreadableSignIn):
        SignIns(store, old).load("alice", "codex")
    reopened = SignIns.open(store, data_dir, None)
    kept = reopened.load("alice", "codex")
    assert kept is not None
    assert (kept.files, kept.version) == ({"f": b"2"}, 2)
    for record in store.signins():
        earlier = before[(record.user, record.provider)]
        assert (record.version, record.connected_at, record.updated_at) == (
            earlier.version,
            earlier.connected_at,
            earlier.updated_at,
        )
        assert (record.key_id, record.nonce) != (earlier.key_id, earlier.nonce)
    reopened.close()


def test_interrupted_rotation_is_finished_by_running_it_again(data_dir: Path, store: Store) -> None:
    """A rotation that stopped after re-encrypting but before replacing the key file stops the
    controller from starting, and running it again finishes it."""
    old = load_secret_key(data_dir, None)
    SignIns(store, old).save("alice", "codex", FILES, None)
    pending = SecretKey(new_key_material(), "pending")
    write_key_file(data_dir / NEW_KEY_FILE, pending.material)
    assert SignIns(store, old).rotate(pending) == 1  # ...and then the process died
    with pytest.raises(ConfigError, match="interrupted `remotecli secret rotate`"):
        SignIns.open(store, data_dir, None)
    count, new = rotate_secret(store, data_dir, None)
    assert (count, new.key_id) == (0, pending.key_id)
    assert read_key_file(data_dir / KEY_FILE).key_id == pending.key_id
    kept = SignIns.open(store, data_dir, None).load("alice", "codex")
    assert kept is not None
    assert kept.files == FILES


def test_rotate_with_environment_key_needs_the_new_key(data_dir: Path, store: Store) -> None:
    """With REMOTECLI_SECRET_KEY, rotation refuses without a new key, and with one re-encrypts
    without touching any key file."""
    old = encode_key(new_key_material())
    SignIns.open(store, data_dir, old).save("alice", "codex", FILES, None)
    with pytest.raises(ConfigError, match="--new-key-file"):
        rotate_secret(store, data_dir, old)
    material = new_key_material()
    count, new = rotate_secret(store, data_dir, old, material)
    assert count == 1
    assert not (data_dir / KEY_FILE).exists()
    kept = SignIns(store, new).load("alice", "codex")
    assert kept is not None
    assert kept.files == FILES


def test_rotate_refused_while_a_controller_holds_the_key(data_dir: Path, store: Store) -> None:
    """Rotation refuses while a controller holds the key lock, and a controller refuses to start
    while a rotation holds it."""
    running = SignIns.open(store, data_dir, None)
    with pytest.raises(ConfigError, match="a controller is running"):
        rotate_secret(store, data_dir, None)
    running.close()
    rotate_secret(store, data_dir, None)


def test_no_plaintext_token_in_any_data_dir_file(data_dir: Path) -> None:
    """After saves, rotation and a close, no file in the data dir (the SQLite file, its -wal and
    -shm) holds the planted token, raw or base64-encoded."""
    store = Store.open(data_dir / "remotecli.sqlite3")
    signins = SignIns.open(store, data_dir, None)
    for version in range(5):
        files = {**FILES, "n": str(version).encode()}
        signins.save("alice", "codex", files, version or None)
    signins.save("bob", "codex", FILES, None)
    signins.close()
    needles = [TOKEN, base64.b64encode(FILES[".codex/auth.json"]), base64.b64encode(TOKEN)]

    def grep() -> list[str]:
        found = []
        for path in data_dir.rglob("*"):
            if path.is_file():
                content = path.read_bytes()
                found += [path.name for needle in needles if needle in content]
        return found

    assert any(p.name.endswith("-wal") for p in data_dir.iterdir())
    assert grep() == []
    rotate_secret(store, data_dir, None)
    assert grep() == []
    store.close()
    assert grep() == []
