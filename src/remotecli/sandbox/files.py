"""The session's files as the controller touches them: a size-capped HOME, and reading logs the
session could have tampered with.

Everything under a session's ``run/`` and ``home/`` is written by a hostile user. The controller
(often root) therefore never follows a link there: :func:`read_tail` opens with ``O_NOFOLLOW``,
insists on a regular file and reads a bounded amount; and it never writes there once the session
has started.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import stat
from pathlib import Path

from remotecli.exceptions import DriverError

_MS_NOSUID = 2
_MS_NODEV = 4
_MNT_DETACH = 2
TAIL_BYTES = 2048


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def data_pipe(data: bytes) -> int:
    """Return the read end of a pipe holding ``data``, for bubblewrap's ``--seccomp FD`` and
    ``--ro-bind-data FD``. ``data`` must fit a pipe's buffer (64 KiB) so the write never blocks.
    """
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, data)
    finally:
        os.close(write_end)
    return read_end


def mount_home(path: Path, size: int, uid: int, gid: int) -> None:
    """Mount a tmpfs of ``size`` bytes on ``path`` (mode 0700, owned by ``uid``:``gid``).

    Its pages are charged to the memory cgroup of the session that writes them, so a full HOME
    counts against the session's memory limit too, and nothing of it reaches the disk.
    """
    options = f"size={size},mode=0700,uid={uid},gid={gid}".encode()
    result = _libc().mount(
        b"remotecli-home", os.fsencode(path), b"tmpfs", _MS_NOSUID | _MS_NODEV, options
    )
    if result != 0:
        code = ctypes.get_errno()
        raise DriverError(
            f"cannot mount the session's HOME (tmpfs) on {path}: {os.strerror(code)}",
            path=str(path),
        )


def unmount(path: Path) -> None:
    """Detach whatever is mounted on ``path``; nothing when nothing is."""
    if os.path.ismount(path):
        _libc().umount2(os.fsencode(path), _MNT_DETACH)


def read_tail(path: Path, limit: int = TAIL_BYTES, *, owner: int | None = None) -> str:
    """Return the last ``limit`` bytes of a session-written log as text, or "" if unsafe/absent.

    Never follows a symbolic link and reads only a regular file, so a session that replaced its
    log with a link to a host file learns nothing through an error message. With ``owner``, the
    file must also belong to that uid and have no second name (no hard link to a host file).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""
    with contextlib.closing(os.fdopen(fd, "rb")) as handle:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            return ""
        if owner is not None and (info.st_uid != owner or info.st_nlink != 1):
            return ""
        handle.seek(max(0, info.st_size - limit))
        return handle.read(limit).decode(errors="replace").strip()
