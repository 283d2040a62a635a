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
import subprocess
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


def mount_tmpfs(path: Path, size: int, uid: int, gid: int, *, inodes: int) -> None:
    """Mount a tmpfs of ``size`` bytes and ``inodes`` files on ``path`` (0700, ``uid``:``gid``).

    Its pages are charged to the memory cgroup of the session that writes them, so what a
    session stores there counts against its memory limit too, nothing of it reaches the disk,
    and removing it all, however deep, is one unmount.
    """
    options = f"size={size},nr_inodes={inodes},mode=0700,uid={uid},gid={gid}".encode()
    flags = _MS_NOSUID | _MS_NODEV
    result = _libc().mount(b"remotecli", os.fsencode(path), b"tmpfs", flags, options)
    if result != 0:
        code = ctypes.get_errno()
        raise DriverError(
            f"cannot mount a tmpfs for the session on {path}: {os.strerror(code)}",
            path=str(path),
        )


def unmount(path: Path) -> None:
    """Detach whatever is mounted on ``path``; nothing when nothing is."""
    if os.path.ismount(path):
        _libc().umount2(os.fsencode(path), _MNT_DETACH)


def remove_tree(path: Path) -> None:
    """Remove ``path`` and all below it without following links, however deep it goes.

    A session can nest thousands of directories, past Python's recursion limit (3.11's
    ``shutil.rmtree`` recurses), so coreutils' ``rm`` does it, on this file system only.
    """
    if not os.path.lexists(path):
        return
    done = subprocess.run(
        ["rm", "-rf", "--one-file-system", "--", str(path)],
        capture_output=True,
        check=False,
        timeout=120,
    )
    if done.returncode != 0 and os.path.lexists(path):
        raise OSError(f"cannot remove {path}: {done.stderr.decode(errors='replace').strip()}")


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
