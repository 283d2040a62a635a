"""The data dir's lock: one controller serves a data dir, and nothing touches it before knowing.

Theory of operation. ``DATA_DIR/controller.lock`` is a file whose ``flock`` a serving controller
holds exclusively for its whole life, with its pid written inside. The kernel drops the lock
when the process ends however it ends (even SIGKILL), so a stale file never blocks a start.

- ``remotecli up`` and ``remotecli controller`` take it (:meth:`DataDirLock.serve`) before they
  read or write anything in the data dir: a second instance is refused before it could run
  restart recovery over the first one's live sessions.
- Commands that need the controller stopped (``remotecli secret rotate``) take it the same
  way for as long as they work, so no controller can start half-way through.
- Commands that are safe beside a running controller (``user``, ``secret forget``, ``gc``)
  ask :func:`serving_pid` first, to say what they did to a running instance and to let it
  act (the controller notices store changes within a second; see ``SessionManager``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from remotecli.exceptions import ConfigError

LOCK_FILE = "controller.lock"


def _read_pid(descriptor: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        words = os.pread(descriptor, 64, 0).decode("ascii").split()
        return int(words[0]) if words else None
    return None


class DataDirLock:
    """The exclusive lock of one data dir, held until :meth:`release` or the process ends."""

    def __init__(self, path: Path, descriptor: int) -> None:
        self.path = path
        self._descriptor: int | None = descriptor

    @classmethod
    def serve(cls, data_dir: Path, *, purpose: str = "serving") -> DataDirLock:
        """Take the lock of ``data_dir`` (created if needed) or raise ConfigError naming the pid.

        ``purpose`` says in the lock file's error message what holds it.
        """
        path = data_dir / LOCK_FILE
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise ConfigError(
                f"cannot open the lock {path}: {exc.strerror}; check the data dir is writable"
            ) from exc
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(descriptor)
            os.close(descriptor)
            who = f" (pid {holder})" if holder else ""
            raise ConfigError(
                f"another remote-cli{who} is using the data dir {data_dir}; stop it first, or "
                "give this one its own --data-dir",
                data_dir=str(data_dir),
                pid=holder,
            ) from None
        except OSError as exc:
            os.close(descriptor)
            raise ConfigError(f"cannot lock {path}: {exc.strerror}") from exc
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{os.getpid()} {purpose}\n".encode("ascii"), 0)
        return cls(path, descriptor)

    def release(self) -> None:
        """Let go of the lock (idempotent); the file stays, empty."""
        if self._descriptor is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self._descriptor, 0)
        os.close(self._descriptor)  # closing the last descriptor drops the flock
        self._descriptor = None


def serving_pid(data_dir: Path) -> int | None:
    """Return the pid of the process holding ``data_dir``'s lock, or None when none does."""
    path = data_dir / LOCK_FILE
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the lock {path}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(descriptor) or -1
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None
    finally:
        os.close(descriptor)
