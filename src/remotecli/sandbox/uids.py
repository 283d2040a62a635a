"""One unprivileged host uid per live session, allocated host-wide.

A session's processes run as a uid of their own, so the kernel's ordinary checks keep sessions
apart even where a namespace would not: another session's files, signals, ``/proc`` entries and
per-uid limits (``RLIMIT_NPROC``). The uid maps to uid 1000 inside the sandbox's user namespace,
and it owns nothing on the host but the session's own directories.

Allocation is host-wide, because several controllers (and test runs) may share a host: a uid is
taken by holding an exclusive ``flock`` on ``LOCK_DIR/<uid>.lock`` for the session's lifetime.
A lock dies with its holder, so a crashed controller frees its uids; a uid that still has a live
process (a sandbox that outlived its controller) is skipped until that process is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from remotecli.exceptions import DriverError, ServiceUnavailable

UID_BASE = 3_000_000
"""First uid of the range; far above the ranges of login users and of ``/etc/subuid``."""
UID_COUNT = 65_536
LOCK_DIR = Path("/run/remotecli/uids")
_TRIES = 64


@dataclass
class Lease:
    """A uid held for one session; :meth:`release` gives it back (idempotent)."""

    uid: int
    _fd: int

    def release(self) -> None:
        """Give the uid back to the pool."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1


def processes_of_uid(uid: int) -> list[int]:
    """Return the pids whose real uid is ``uid``, read from ``/proc/PID/status``.

    The status file, not the owner of ``/proc/PID``: a process that makes itself non-dumpable
    shows its directory as root's, and must not hide from this look-up that way.
    """
    needle = f"\nUid:\t{uid}\t".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as handle:
                status = handle.read(4096)
        except OSError:
            continue
        if needle in status:
            found.append(int(entry))
    return found


class UidPool:
    """Leases uids in ``[first, first + count)`` with locks under ``lock_dir``."""

    def __init__(
        self, first: int = UID_BASE, count: int = UID_COUNT, lock_dir: Path = LOCK_DIR
    ) -> None:
        self.first, self.count, self.lock_dir = first, count, lock_dir

    @property
    def last(self) -> int:
        """The last uid of the range (for firewall rules that match the whole range)."""
        return self.first + self.count - 1

    def lease(self) -> Lease:
        """Take a free uid; ServiceUnavailable (503) when none is free after a few tries."""
        try:
            self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise DriverError(
                f"cannot create the uid lock directory {self.lock_dir}: {exc.strerror}; "
                "the controller must run as root to give each session its own uid"
            ) from exc
        for _ in range(_TRIES):
            uid = self.first + secrets.randbelow(self.count)
            path = self.lock_dir / f"{uid}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if processes_of_uid(uid):
                os.close(fd)
                continue
            return Lease(uid, fd)
        raise ServiceUnavailable(
            f"no free sandbox uid in {self.first}-{self.last} after {_TRIES} tries; "
            "too many sessions on this host, try again when one ends"
        )
