"""Back up and restore what a data dir cannot lose: the store, the sign-in key, the admin token.

Theory of operation. :func:`back_up` copies the SQLite store with SQLite's online backup API,
which gives a consistent snapshot even while a controller writes to it (WAL mode), plus
``secret.key`` (without it the kept sign-ins cannot be read) and ``admin.token``. It writes
into a new directory, mode 0700, each file 0600, and checks the copy opens at its schema
version. Sessions themselves are not backed up: they are processes, and end with the host.

:func:`restore` puts such a directory back, only with no remote-cli serving the data dir (it
holds the lock while it works). The current files are moved aside with a ``.before-restore``
suffix first, so a restore can be undone by hand.

Both know the SQLite store only. A PostgreSQL store (``store_url``, shared by several hosts) is
backed up and restored with PostgreSQL's own ``pg_dump`` and ``pg_restore``
(docs/postgresql.md); both functions refuse it, saying so, rather than copy the key files alone.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from remotecli.controller.datadir import DataDirLock
from remotecli.controller.store import SCHEMA_VERSION
from remotecli.exceptions import ConfigError

STORE_FILE = "remotecli.sqlite3"
KEPT_FILES = ("secret.key", "admin.token")
ASIDE_SUFFIX = ".before-restore"


@dataclass(frozen=True)
class BackupReport:
    """What a backup or restore copied."""

    directory: Path
    files: tuple[str, ...]
    schema_version: int


def _schema_version(path: Path) -> int:
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            version: int = connection.execute("PRAGMA user_version").fetchone()[0]
            connection.execute("SELECT COUNT(*) FROM users").fetchone()
        finally:
            connection.close()
    except sqlite3.Error as exc:
        raise ConfigError(f"{path} is not a remote-cli store: {exc}") from exc
    return version


def _copy_private(source: Path, target: Path) -> None:
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with source.open("rb") as reading, os.fdopen(descriptor, "wb") as writing:
        shutil.copyfileobj(reading, writing)


def _refuse_shared_store(store_url: str | None, verb: str) -> None:
    if store_url:
        raise ConfigError(
            f"the store is a PostgreSQL database (store_url), which `remotecli {verb}` cannot "
            f"{verb}: use pg_dump -Fc (and pg_restore) on that database, and keep secret.key "
            "and admin.token of the data dir beside the dump (docs/postgresql.md#backups)"
        )


def back_up(data_dir: Path, target: Path, *, store_url: str | None = None) -> BackupReport:
    """Copy the store (consistently, even while it is in use) and the key files to ``target``.

    ``target`` must not exist yet. Raises ConfigError naming the problem, and for a PostgreSQL
    store (``store_url``), naming pg_dump.
    """
    _refuse_shared_store(store_url, "backup")
    store = data_dir / STORE_FILE
    if not store.is_file():
        raise ConfigError(f"there is no store in {data_dir}; is it the right --data-dir?")
    try:
        target.mkdir(mode=0o700, parents=False)
    except FileExistsError:
        raise ConfigError(f"{target} exists; back up into a new directory") from None
    except OSError as exc:
        raise ConfigError(f"cannot create {target}: {exc.strerror}") from exc
    copy = target / STORE_FILE
    os.close(os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    source = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    destination = sqlite3.connect(copy)
    try:
        source.backup(destination)
    finally:
        destination.close()
        source.close()
    files = [STORE_FILE]
    for name in KEPT_FILES:
        if (data_dir / name).is_file():
            _copy_private(data_dir / name, target / name)
            files.append(name)
    return BackupReport(target, tuple(files), _schema_version(copy))


def restore(source: Path, data_dir: Path, *, store_url: str | None = None) -> BackupReport:
    """Put the backup in ``source`` into ``data_dir``; refuses while remote-cli serves it, and
    for a PostgreSQL store (``store_url``).

    The files it replaces are kept beside with the suffix ``.before-restore``.
    """
    _refuse_shared_store(store_url, "restore")
    store = source / STORE_FILE
    if not store.is_file():
        raise ConfigError(f"{source} holds no {STORE_FILE}; give a `remotecli backup` directory")
    version = _schema_version(store)
    if version < 0:
        raise ConfigError(f"{store} has schema version {version}: not a remote-cli store")
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"the backup's store has schema version {version}, newer than this remote-cli "
            f"understands ({SCHEMA_VERSION}); restore it with the remote-cli that made it"
        )
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock = DataDirLock.serve(data_dir, purpose="restore")
    try:
        files = [STORE_FILE, *(n for n in KEPT_FILES if (source / n).is_file())]
        for name in (*files, f"{STORE_FILE}-wal", f"{STORE_FILE}-shm"):
            current = data_dir / name
            if current.exists():
                current.replace(data_dir / (name + ASIDE_SUFFIX))
        for name in files:
            _copy_private(source / name, data_dir / name)
    finally:
        lock.release()
    return BackupReport(data_dir, tuple(files), version)
