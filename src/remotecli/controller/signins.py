"""Provider sign-ins kept between sessions, per user and provider, AES-256-GCM encrypted.

Theory of operation. When a session ends, the controller reads the provider CLI's sign-in files
out of its HOME (``remotecli.sandbox.keep``) and :meth:`SignIns.save` seals them into one record
per (user, provider); before the next session of that user and provider starts, :meth:`SignIns.load`
opens the record and the files are written into the new HOME.

- The key is 32 bytes: ``REMOTECLI_SECRET_KEY`` (base64 or hex), else ``DATA_DIR/secret.key``,
  made 0600 on the first start. Each record carries the key's id (8 hex digits of a SHA-256 of
  the key, which reveals nothing of it) so a wrong key is reported as such.
- The plaintext is a deterministic serialization of the files (JSON, sorted keys, base64
  contents); each encryption takes 12 fresh random nonce bytes; the associated data binds the
  format tag, the user, the provider and the record's version, so a record copied to another
  user, provider or version fails to decrypt.
- Versions are a compare-and-set: a save names the version its session started from, and
  succeeds only while that is still the stored one (the store checks it inside its
  transaction). An older session therefore never overwrites what a newer one refreshed.
- Rotation re-encrypts every record in one transaction. The controller holds a shared lock on
  ``DATA_DIR/secret.lock`` while it runs (:meth:`SignIns.open`); rotation takes it exclusively,
  so the two never overlap.

docs/signins.md says the same for operators.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import fcntl
import hashlib
import json
import os
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from remotecli.config import CONTROLLER_SECRET_KEY_ENV, SECRET_KEY_BYTES, parse_secret_key
from remotecli.controller.store import SignInRecord, Store
from remotecli.exceptions import ConfigError, UnreadableSignIn
from remotecli.logs import get_logger

log = get_logger("controller.signins")

FORMAT = "remotecli-signin/1"
"""The format tag, bound into every record's associated data."""
KEY_FILE = "secret.key"
NEW_KEY_FILE = "secret.key.new"
LOCK_FILE = "secret.lock"
NONCE_BYTES = 12

_FORGET_HINT = (
    "run `remotecli secret forget --unreadable` to drop the sign-ins this key cannot read "
    "(their users sign in again)"
)


@dataclass(frozen=True)
class SecretKey:
    """A 32-byte sign-in key and where it came from (a variable name or a file)."""

    material: bytes = field(repr=False)
    source: str

    @property
    def key_id(self) -> str:
        """8 hex digits naming the key in records and messages; says nothing of the key."""
        return hashlib.sha256(b"remotecli key id\0" + self.material).hexdigest()[:8]


@dataclass(frozen=True)
class KeptSignIn:
    """One user's decrypted sign-in to one provider."""

    files: dict[str, bytes] = field(repr=False)  # path relative to HOME → content
    version: int
    connected_at: float
    updated_at: float


class SaveOutcome(enum.Enum):
    """What :meth:`SignIns.save` did."""

    SAVED = "saved"  # stored as a new version
    UNCHANGED = "unchanged"  # the stored version holds the same files already
    STALE = "stale"  # refused: the stored version is not the one the session started from
    EMPTY = "empty"  # no files: nothing kept, nothing stored record touched


@dataclass(frozen=True)
class SaveResult:
    """The outcome of a save and the version stored afterwards (None: nothing stored)."""

    outcome: SaveOutcome
    version: int | None

    @property
    def saved(self) -> bool:
        """Whether this save stored a new version."""
        return self.outcome is SaveOutcome.SAVED


# --- keys --------------------------------------------------------------------------------------


def new_key_material() -> bytes:
    """Return 32 fresh random bytes for a sign-in key."""
    return os.urandom(SECRET_KEY_BYTES)


def encode_key(material: bytes) -> str:
    """Return a key as the base64 text ``REMOTECLI_SECRET_KEY`` and the key file hold."""
    return base64.b64encode(material).decode("ascii")


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_key_file(path: Path, material: bytes) -> None:
    """Create the key file ``path`` (0600) holding ``material``, whole or not at all.

    The key is written and fsynced under a temporary name, then linked to ``path``, which fails
    with FileExistsError when ``path`` exists: a crash never leaves a partial key file, and two
    controllers starting at once cannot both make one.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}")
    fd = os.open(
        temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (encode_key(material) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(temporary, path, follow_symlinks=False)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def read_key_file(path: Path) -> SecretKey:
    """Read the key file ``path``; ConfigError naming the fix when it is unsafe or not a key.

    Raises FileNotFoundError when there is none. The file must be a regular file of this user,
    not readable by group or others, holding base64 or hex of 32 bytes.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError(
            f"cannot read the sign-in key {path}: {exc.strerror}; it must be a regular file "
            "of the controller's user, mode 0600",
            path=str(path),
        ) from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(
                f"the sign-in key {path} is not a regular file; restore the key file there",
                path=str(path),
            )
        if info.st_uid != os.geteuid():
            raise ConfigError(
                f"the sign-in key {path} belongs to uid {info.st_uid}, not to the controller's "
                f"uid {os.geteuid()}; run `chown {os.geteuid()} {path}`",
                path=str(path),
            )
        if info.st_mode & 0o077:
            raise ConfigError(
                f"the sign-in key {path} has mode {stat.S_IMODE(info.st_mode):04o}: others may "
                f"have read it; run `chmod 600 {path}`, then `remotecli secret rotate` (whoever "
                "read it can decrypt the kept sign-ins)",
                path=str(path),
            )
        content = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        material = parse_secret_key(content.decode("ascii"), str(path))
    except (ConfigError, UnicodeDecodeError):
        raise ConfigError(
            f"the sign-in key {path} does not hold a {SECRET_KEY_BYTES}-byte key (base64); "
            "restore it from a backup, or move it away to start with a new key and then "
            + _FORGET_HINT,
            path=str(path),
        ) from None
    return SecretKey(material, str(path))


def load_secret_key(data_dir: Path, env_value: str | None) -> SecretKey:
    """Return the sign-in key: ``env_value`` (REMOTECLI_SECRET_KEY) or ``DATA_DIR/secret.key``.

    Without the variable, the key file is created (0600) on the first call. Raises ConfigError
    naming the fix for an unsafe or broken key file, and when an interrupted rotation left
    ``secret.key.new`` behind.
    """
    if env_value:
        return SecretKey(parse_secret_key(env_value, CONTROLLER_SECRET_KEY_ENV), "environment")
    path = data_dir / KEY_FILE
    if os.path.lexists(data_dir / NEW_KEY_FILE):
        raise ConfigError(
            f"{data_dir / NEW_KEY_FILE} is left from an interrupted `remotecli secret rotate`; "
            f"run `remotecli secret rotate --data-dir {data_dir}` again to finish it",
            path=str(data_dir / NEW_KEY_FILE),
        )
    try:
        return read_key_file(path)
    except FileNotFoundError:
        pass
    with contextlib.suppress(FileExistsError):  # another process made it meanwhile: read that
        write_key_file(path, new_key_material())
    return read_key_file(path)


@contextlib.contextmanager
def _key_lock(data_dir: Path, operation: int) -> Iterator[int]:
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
        except BlockingIOError:
            if operation == fcntl.LOCK_EX:
                raise ConfigError(
                    f"a controller is running on {data_dir} (it holds {LOCK_FILE}); stop it, "
                    "rotate the key, then start it again",
                    path=str(data_dir),
                ) from None
            raise ConfigError(
                f"`remotecli secret rotate` is re-encrypting the sign-ins in {data_dir}; "
                "start the controller when it has finished",
                path=str(data_dir),
            ) from None
        yield fd
    finally:
        os.close(fd)


# --- records -----------------------------------------------------------------------------------


def _associated_data(user: str, provider: str, version: int) -> bytes:
    return json.dumps([FORMAT, user, provider, version], separators=(",", ":")).encode()


def _serialize(files: Mapping[str, bytes]) -> bytes:
    encoded = {name: base64.b64encode(data).decode("ascii") for name, data in files.items()}
    return json.dumps(encoded, sort_keys=True, separators=(",", ":")).encode()


def _deserialize(plaintext: bytes) -> dict[str, bytes]:
    encoded = json.loads(plaintext)
    if not isinstance(encoded, dict):
        raise ValueError("not a JSON object")
    return {str(name): base64.b64decode(text, validate=True) for name, text in encoded.items()}


def seal(
    key: SecretKey, user: str, provider: str, version: int, files: Mapping[str, bytes]
) -> tuple[str, bytes, bytes]:
    """Encrypt ``files`` as version ``version`` of (user, provider): key id, nonce, ciphertext."""
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = AESGCM(key.material).encrypt(
        nonce, _serialize(files), _associated_data(user, provider, version)
    )
    return key.key_id, nonce, ciphertext


def unseal(key: SecretKey, record: SignInRecord) -> dict[str, bytes]:
    """Decrypt a stored record's files; UnreadableSignIn naming why when that is impossible."""
    data = {
        "user": record.user,
        "provider": record.provider,
        "stored_key_id": record.key_id,
        "key_id": key.key_id,
    }
    if record.key_id != key.key_id:
        raise UnreadableSignIn(
            f"the sign-in of {record.user} to {record.provider} was encrypted with key "
            f"{record.key_id}; this controller has key {key.key_id} (from {key.source}); give "
            f"it the key {record.key_id} (REMOTECLI_SECRET_KEY or the data dir's {KEY_FILE}), "
            "or " + _FORGET_HINT,
            **data,
        )
    try:
        plaintext = AESGCM(key.material).decrypt(
            record.nonce,
            record.ciphertext,
            _associated_data(record.user, record.provider, record.version),
        )
        return _deserialize(plaintext)
    except (InvalidTag, ValueError, binascii.Error) as exc:
        raise UnreadableSignIn(
            f"the sign-in of {record.user} to {record.provider} (version {record.version}) "
            "does not decrypt with its key: it was altered, or copied from another user, "
            "provider or version; `remotecli secret forget` it (the user signs in again)",
            **data,
        ) from exc


class SignIns:
    """Every user's kept provider sign-ins, encrypted in the store with one key.

    Build it with :meth:`open` in the controller (it holds the data dir's key lock until
    :meth:`close`), or directly over a store and a key.
    """

    def __init__(
        self, store: Store, key: SecretKey, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._key = key
        self._clock = clock
        self._lock: contextlib.ExitStack | None = None

    @classmethod
    def open(cls, store: Store, data_dir: Path, env_value: str | None) -> SignIns:
        """Take the data dir's key lock (shared) and load the key, made on the first start.

        ``env_value`` is ``ControllerConfig.secret_key``. Raises ConfigError while a rotation
        runs, and for a key file that is unsafe or broken.
        """
        stack = contextlib.ExitStack()
        with stack:
            stack.enter_context(_key_lock(data_dir, fcntl.LOCK_SH))
            signins = cls(store, load_secret_key(data_dir, env_value))
            signins._lock = stack.pop_all()
        return signins

    def close(self) -> None:
        """Release the key lock taken by :meth:`open`; the store stays open."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    @property
    def key_id(self) -> str:
        """The id of the key this object encrypts with."""
        return self._key.key_id

    def load(self, user: str, provider: str) -> KeptSignIn | None:
        """Return the kept sign-in of ``user`` to ``provider``, or None when none is kept.

        Raises :class:`UnreadableSignIn` when the record was sealed with another key, or was
        altered or moved; the message names the key ids and the fix.
        """
        record = self._store.signin(user, provider)
        if record is None:
            return None
        return KeptSignIn(
            files=unseal(self._key, record),
            version=record.version,
            connected_at=record.connected_at,
            updated_at=record.updated_at,
        )

    def save(
        self, user: str, provider: str, files: Mapping[str, bytes], base_version: int | None
    ) -> SaveResult:
        """Keep ``files`` as the sign-in of ``user`` to ``provider``, if still the newest.

        ``base_version`` is the version the session was given (:meth:`load`), None when it got
        none. The save succeeds only when that is still the stored version (compared inside the
        store's transaction): otherwise the result is STALE and the newer record stays. One
        exception: a save from None replaces a record sealed with another key (which no session
        could have started from). Files equal to the stored ones are UNCHANGED (no new
        version); no files at all is EMPTY (nothing stored, nothing deleted).
        """
        current = self._store.signin(user, provider)
        current_version = None if current is None else current.version
        if not files:
            return SaveResult(SaveOutcome.EMPTY, current_version)
        if current_version != base_version:
            if base_version is not None or current is None or current.key_id == self.key_id:
                return SaveResult(SaveOutcome.STALE, current_version)
            # Sealed with a key this controller does not have: the session could not start from
            # it, and what the user signed in to since is newer than anything it held.
            log.warning(
                "replacing a sign-in sealed with another key",
                user=user,
                provider=provider,
                stored_key_id=current.key_id,
                key_id=self.key_id,
            )
        elif current is not None:
            with contextlib.suppress(UnreadableSignIn):  # unreadable: replace it
                if unseal(self._key, current) == dict(files):
                    return SaveResult(SaveOutcome.UNCHANGED, current_version)
        version = (current_version or 0) + 1
        sealed = seal(self._key, user, provider, version, files)
        stored = self._store.save_signin(user, provider, current_version, sealed, self._clock())
        if stored is None:  # another save won the compare-and-set meanwhile
            latest = self._store.signin(user, provider)
            return SaveResult(SaveOutcome.STALE, None if latest is None else latest.version)
        return SaveResult(SaveOutcome.SAVED, stored.version)

    def forget(self, user: str, provider: str) -> bool:
        """Delete the sign-in of ``user`` to ``provider``; return whether there was one."""
        return self._store.delete_signins(user, provider) > 0

    def forget_user(self, user: str) -> int:
        """Delete every sign-in of ``user``; return how many there were."""
        return self._store.delete_signins(user)

    def forget_unreadable(self) -> int:
        """Delete every sign-in sealed with another key than this one; return how many."""
        stale = [key_id for key_id in self._store.signin_key_ids() if key_id != self.key_id]
        return sum(self._store.delete_signins(key_id=key_id) for key_id in stale)

    def status(self, user: str) -> dict[str, tuple[float, float]]:
        """Return the providers ``user`` has a kept sign-in to: (connected_at, updated_at)."""
        return {r.provider: (r.connected_at, r.updated_at) for r in self._store.signins(user)}

    def rotate(self, new_key: SecretKey) -> int:
        """Re-encrypt every record with ``new_key`` in one transaction; return how many.

        Records already sealed with ``new_key`` (an interrupted rotation) are left as they are;
        one that this key cannot read raises :class:`UnreadableSignIn` and changes nothing.
        Versions and times are kept. Afterwards this object encrypts with ``new_key``.
        """

        def reseal(record: SignInRecord) -> tuple[str, bytes, bytes] | None:
            if record.key_id == new_key.key_id:
                return None
            files = unseal(self._key, record)
            return seal(new_key, record.user, record.provider, record.version, files)

        count = self._store.reseal_signins(reseal)
        self._key = new_key
        return count


def rotate_secret(
    store: Store, data_dir: Path, env_value: str | None, new_material: bytes | None = None
) -> tuple[int, SecretKey]:
    """Re-encrypt every kept sign-in with a new key; return how many and the new key.

    Refuses (ConfigError) while a controller holds the data dir's key lock. With the key in
    ``env_value`` (REMOTECLI_SECRET_KEY), ``new_material`` must be given (the operator then puts
    it in the variable); else the new key (``new_material`` or a fresh one) is first written to
    ``secret.key.new``, the records re-encrypted, and that file renamed over ``secret.key``: an
    interrupted rotation is finished by running it again, and the controller refuses to start
    until then.
    """
    with _key_lock(data_dir, fcntl.LOCK_EX):
        if env_value:
            if new_material is None:
                raise ConfigError(
                    f"{CONTROLLER_SECRET_KEY_ENV} holds the key, which this command cannot "
                    "change: write a new key to a file (`remotecli secret new-key > new.key`), "
                    "run `remotecli secret rotate --new-key-file new.key` with the old key "
                    f"still in {CONTROLLER_SECRET_KEY_ENV}, then restart the controller with "
                    f"{CONTROLLER_SECRET_KEY_ENV} set to the new file's content"
                )
            old = SecretKey(parse_secret_key(env_value, CONTROLLER_SECRET_KEY_ENV), "environment")
            new = SecretKey(new_material, "--new-key-file")
            return SignIns(store, old).rotate(new), new
        key_path, pending_path = data_dir / KEY_FILE, data_dir / NEW_KEY_FILE
        try:
            old = read_key_file(key_path)
        except FileNotFoundError:
            raise ConfigError(
                f"there is no sign-in key {key_path} to rotate yet; the controller makes it on "
                "its first start",
                path=str(key_path),
            ) from None
        try:
            new = read_key_file(pending_path)  # left by an interrupted rotation: finish it
        except FileNotFoundError:
            new = SecretKey(new_material or new_key_material(), str(key_path))
            write_key_file(pending_path, new.material)
        else:
            if new_material is not None and new_material != new.material:
                raise ConfigError(
                    f"{pending_path} is left from an interrupted rotation to another key; run "
                    "`remotecli secret rotate` without --new-key-file to finish that one first",
                    path=str(pending_path),
                )
        count = SignIns(store, old).rotate(new)
        os.rename(pending_path, key_path)
        _fsync_directory(data_dir)
        return count, SecretKey(new.material, str(key_path))
