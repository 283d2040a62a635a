"""A provider CLI's sign-in files: read out of a session's HOME, and written into the next one's.

Theory of operation. A session's HOME (``<workdir>/home`` on the host, a tmpfs owned by the
session's uid) is written by a hostile user, and the controller that reads it runs as root. So no
path under HOME is ever handed to the kernel whole: :func:`read_kept` opens HOME once, then each
component relative to its parent's descriptor, directories with ``O_DIRECTORY | O_NOFOLLOW`` and
files with ``O_NOFOLLOW | O_NONBLOCK``. A symbolic link anywhere on the way fails the open
(``ELOOP``/``ENOTDIR``) and the path is skipped; a swap made between two steps only ever leads to
another entry of HOME. Every entry is checked on its open descriptor (``fstat``): a regular file
with one name (``st_nlink == 1``: no hard link to a file outside) on HOME's own file system, or a
directory; a fifo, socket, device or link is skipped, and is not even opened when ``lstat``
already shows what it is. Sizes are capped per file and in all, directory walks by depth and
entries. :func:`write_kept` creates entries the same way, before the session starts, with
``O_CREAT | O_EXCL | O_NOFOLLOW`` and a rename into place, and hands them to the session's uid.

Over a cap, a file is skipped and a warning logged (its name and the cap, never its content):
the rest of the sign-in is still kept, and nothing the session does can make the reader raise.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from remotecli.exceptions import ConfigError, DriverError
from remotecli.logs import get_logger

log = get_logger("sandbox.keep")

MAX_FILE_BYTES = 1024**2
"""Largest kept file; a bigger one is skipped."""
MAX_TOTAL_BYTES = 4 * 1024**2
"""Largest sum of kept files per provider; files past it are skipped."""
MAX_FILES = 256
"""Most kept files per provider; files past it are skipped."""
MAX_DEPTH = 8
"""Deepest directory level walked below a kept directory."""
MAX_ENTRIES = 4096
"""Most directory entries looked at per provider (a hostile directory can hold millions)."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def normalize_keep(path: str) -> str:
    """Return a declared kept path relative to HOME: ``~/.codex/auth.json`` → ``.codex/auth.json``.

    Raises :class:`ConfigError` naming the path when it is empty, HOME itself, absolute outside
    ``~``, or has a ``..`` component (or a NUL byte).
    """
    text = path.strip()
    if text == "~" or text.startswith("~/"):
        text = text[1:].lstrip("/")
    elif text.startswith(("/", "~")):
        raise ConfigError(
            f"kept path {path!r} is outside HOME; write it as ~/PATH, e.g. ~/.codex/auth.json",
            path=path,
        )
    parts = [part for part in text.split("/") if part not in ("", ".")]
    if "\0" in text or ".." in parts:
        raise ConfigError(
            f"kept path {path!r} may not contain '..' or a NUL byte; write it as ~/PATH",
            path=path,
        )
    if not parts:
        raise ConfigError(
            f"kept path {path!r} names no file below HOME; name a file or directory in it, "
            "e.g. ~/.codex/auth.json",
            path=path,
        )
    return "/".join(parts)


def _relative_parts(name: str) -> list[str]:
    """Split a relative path that must already be normalized; ConfigError otherwise."""
    if name != normalize_keep(name) or name.startswith("~"):
        raise ConfigError(
            f"kept file name {name!r} is not a plain path below HOME (no '~', '/', '.', '..')",
            path=name,
        )
    return name.split("/")


@dataclass
class _Budget:
    """What one :func:`read_kept` call may still read."""

    device: int
    files: int = MAX_FILES
    total: int = MAX_TOTAL_BYTES
    entries: int = MAX_ENTRIES
    found: dict[str, bytes] = field(default_factory=dict)


def _skip(relative: str, reason: str) -> None:
    log.warning("kept file skipped", path=f"~/{relative}", reason=reason)


@contextlib.contextmanager
def _opened(name: str, flags: int, dir_fd: int) -> Iterator[int | None]:
    """Open ``name`` relative to ``dir_fd``; yield None when it is missing or a link."""
    try:
        fd = os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        yield None  # missing, a link (ELOOP), not a directory (ENOTDIR), not readable
        return
    try:
        yield fd
    finally:
        os.close(fd)


def _read_file(dir_fd: int, name: str, relative: str, budget: _Budget) -> None:
    if relative in budget.found:
        return  # declared twice (a file and a directory holding it)
    if budget.files <= 0:
        _skip(relative, f"more than {MAX_FILES} kept files")
        return
    with _opened(name, _READ_FLAGS, dir_fd) as fd:
        if fd is None:
            return
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_dev != budget.device:
            return  # swapped for a fifo, device or another file system's file since the lstat
        if info.st_nlink != 1:
            _skip(relative, "it has another name (a hard link)")
            return
        limit = min(MAX_FILE_BYTES, budget.total)
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # read one byte past the cap to see a file that grew since fstat
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    if size > limit:
        cap = "1 MiB per file" if limit == MAX_FILE_BYTES else "4 MiB in all"
        _skip(relative, f"larger than {cap}")
        return
    budget.files -= 1
    budget.total -= size
    budget.found[relative] = b"".join(chunks)


def _read_entry(dir_fd: int, name: str, relative: str, budget: _Budget, depth: int) -> None:
    """Keep ``name`` (in the directory ``dir_fd``) if it is a regular file or a directory."""
    try:
        mode = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode):
        _read_file(dir_fd, name, relative, budget)
    elif stat.S_ISDIR(mode):
        _read_directory(dir_fd, name, relative, budget, depth)
    # Anything else (link, fifo, socket, device) is not opened at all.


def _read_directory(dir_fd: int, name: str, relative: str, budget: _Budget, depth: int) -> None:
    if depth > MAX_DEPTH:
        _skip(relative, f"deeper than {MAX_DEPTH} directory levels")
        return
    with _opened(name, _DIR_FLAGS, dir_fd) as fd:
        if fd is None or os.fstat(fd).st_dev != budget.device:
            return
        names: list[str] = []
        with os.scandir(fd) as entries:
            for entry in entries:
                if budget.entries <= 0:
                    _skip(relative, f"more than {MAX_ENTRIES} directory entries")
                    break
                budget.entries -= 1
                names.append(entry.name)
        for child in sorted(names):
            _read_entry(fd, child, f"{relative}/{child}", budget, depth + 1)


def _open_home(home: Path) -> int | None:
    try:
        return os.open(home, _DIR_FLAGS)
    except OSError as exc:
        log.warning("HOME cannot be read for kept files", home=str(home), error=exc.strerror)
        return None


def _descend(root: int, parts: list[str], device: int, stack: contextlib.ExitStack) -> int | None:
    """Open the directories ``parts`` one below the other from ``root``; None if one is not."""
    fd = root
    for part in parts:
        opened = stack.enter_context(_opened(part, _DIR_FLAGS, fd))
        if opened is None or os.fstat(opened).st_dev != device:
            return None
        fd = opened
    return fd


def read_kept(home: Path, paths: Sequence[str]) -> dict[str, bytes]:
    """Return the kept files under ``home``: path relative to HOME → content.

    ``paths`` are the provider's declared kept paths (``~/.codex/auth.json``; a directory is
    walked). Missing paths, links, hard links, fifos, sockets and devices are left out; files
    over a cap are left out with a warning. Raises ConfigError only for a badly declared path.
    """
    declared = sorted({normalize_keep(path) for path in paths})
    root = _open_home(home)
    if root is None:
        return {}
    try:
        budget = _Budget(device=os.fstat(root).st_dev)
        for relative in declared:
            *parents, last = relative.split("/")
            with contextlib.ExitStack() as stack:
                parent = _descend(root, parents, budget.device, stack)
                if parent is not None:
                    _read_entry(parent, last, relative, budget, depth=0)
        return budget.found
    finally:
        os.close(root)


def write_kept(home: Path, files: Mapping[str, bytes], uid: int | None) -> None:
    """Create ``files`` (path relative to HOME → content) under ``home``, before a session starts.

    Missing parent directories are made 0700, files 0600 (an existing file of that name is
    replaced by a rename, never written through), all owned by ``uid`` (and gid ``uid``) when it
    is not None. Links are never followed. Raises ConfigError for a name that is absolute, has
    ``..`` or is not normalized, and DriverError naming the file when HOME refuses it (a link or
    directory in the way, no space).
    """
    planned = sorted((_relative_parts(name), name, data) for name, data in files.items())
    root = os.open(home, _DIR_FLAGS)
    try:
        for parts, name, data in planned:
            try:
                _write_one(root, parts, data, uid)
            except OSError as exc:
                raise DriverError(
                    f"cannot restore the kept file ~/{name} into HOME: {exc.strerror}",
                    path=name,
                ) from exc
    finally:
        os.close(root)


def _write_one(root: int, parts: list[str], data: bytes, uid: int | None) -> None:
    with contextlib.ExitStack() as stack:
        fd = root
        for part in parts[:-1]:
            created = True
            try:
                os.mkdir(part, 0o700, dir_fd=fd)
            except FileExistsError:
                created = False
            fd_next = os.open(part, _DIR_FLAGS, dir_fd=fd)
            stack.callback(os.close, fd_next)
            fd = fd_next
            if created:
                os.fchmod(fd, 0o700)
                if uid is not None:
                    os.fchown(fd, uid, uid)
        name = parts[-1]
        temporary = f".{name[:200]}.remotecli-{secrets.token_hex(4)}"
        file_fd = os.open(temporary, _CREATE_FLAGS, 0o600, dir_fd=fd)
        try:
            try:
                os.fchmod(file_fd, 0o600)
                if uid is not None:
                    os.fchown(file_fd, uid, uid)
                view = memoryview(data)
                while view:
                    view = view[os.write(file_fd, view) :]
            finally:
                os.close(file_fd)
            os.rename(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=fd)
            raise
