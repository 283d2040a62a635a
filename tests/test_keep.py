"""Reading and writing kept sign-in files in a hostile HOME, on real files, links and fifos."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from remotecli.exceptions import ConfigError, DriverError
from remotecli.sandbox.keep import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    MAX_FILES,
    normalize_keep,
    read_kept,
    write_kept,
)
from tests.conftest import MS

SECRET = b"host-secret-never-to-be-read"
KEPT = ("~/.tool/auth.json", "~/.cfg")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside HOME holding host files a session must not reach."""
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "auth.json").write_bytes(SECRET)
    (directory / "sub").mkdir()
    (directory / "sub" / "x").write_bytes(SECRET)
    return directory


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A HOME with a kept file and a kept directory, both honest."""
    directory = tmp_path / "home"
    (directory / ".tool").mkdir(parents=True)
    (directory / ".tool" / "auth.json").write_bytes(b"token-1")
    (directory / ".cfg" / "sub").mkdir(parents=True)
    (directory / ".cfg" / "hosts.yml").write_bytes(b"host: a")
    (directory / ".cfg" / "sub" / "x").write_bytes(b"x")
    return directory


def read_within(home: Path, paths: tuple[str, ...] = KEPT) -> dict[str, bytes]:
    """Run read_kept in a thread and fail if it has not returned within 5 s (it blocked)."""
    result: list[dict[str, bytes]] = []
    worker = threading.Thread(target=lambda: result.append(read_kept(home, paths)), daemon=True)
    worker.start()
    worker.join(5000 * MS)
    assert not worker.is_alive(), "read_kept blocked"
    return result[0]


def assert_nothing_outside(found: dict[str, bytes]) -> None:
    assert not any(SECRET in content for content in found.values())


def replace_with(path: Path, plant: Callable[[Path], object]) -> None:
    """Remove ``path`` (file or directory tree) and plant something else under its name."""
    if path.is_dir() and not path.is_symlink():
        for child in sorted(path.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() and not child.is_symlink() else child.unlink()
        path.rmdir()
    else:
        path.unlink()
    plant(path)


def test_honest_home_is_read_whole(home: Path) -> None:
    """A kept file and every file under a kept directory are read, keyed relative to HOME."""
    assert read_within(home) == {
        ".tool/auth.json": b"token-1",
        ".cfg/hosts.yml": b"host: a",
        ".cfg/sub/x": b"x",
    }


@pytest.mark.parametrize(
    ("target", "gone"),
    [
        (".tool/auth.json", ".tool/auth.json"),  # the kept file
        (".cfg/hosts.yml", ".cfg/hosts.yml"),  # a file under a kept directory
        (".cfg/sub/x", ".cfg/sub/x"),  # a file deeper under a kept directory
    ],
)
@pytest.mark.parametrize("hazard", ["symlink", "hardlink", "fifo", "oversized"])
def test_hostile_file_is_skipped(
    home: Path, outside: Path, target: str, gone: str, hazard: str
) -> None:
    """A symlink, hard link, fifo or oversized file at any kept file is skipped without blocking,
    and the other kept files are still read."""
    path = home / target
    plants: dict[str, Callable[[Path], object]] = {
        "symlink": lambda p: p.symlink_to(outside / "auth.json"),
        "hardlink": lambda p: os.link(outside / "auth.json", p),
        "fifo": lambda p: os.mkfifo(p),
        "oversized": lambda p: p.write_bytes(SECRET + b"." * MAX_FILE_BYTES),
    }
    replace_with(path, plants[hazard])
    with capture_logs() as logs:
        found = read_within(home)
    assert_nothing_outside(found)
    assert gone not in found
    assert len(found) == 2
    if hazard in ("hardlink", "oversized"):
        assert [entry["path"] for entry in logs] == [f"~/{gone}"]


@pytest.mark.parametrize("directory", [".tool", ".cfg", ".cfg/sub"])
def test_symlinked_directory_is_not_followed(home: Path, outside: Path, directory: str) -> None:
    """A kept file's parent, a kept directory or a directory under it replaced by a symlink to a
    host directory is not walked into."""
    replace_with(home / directory, lambda p: p.symlink_to(outside))
    found = read_within(home)
    assert_nothing_outside(found)
    assert not any(name.startswith(directory + "/") for name in found)


def test_fifo_and_device_as_kept_directory_do_not_block(home: Path) -> None:
    """A fifo where a kept directory should be, and a device under it, are never read."""
    replace_with(home / ".tool", lambda p: os.mkfifo(p))
    if os.geteuid() == 0:
        os.mknod(home / ".cfg" / "zero", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero
    else:
        print("not root: no device planted")
    found = read_within(home)
    assert found == {".cfg/hosts.yml": b"host: a", ".cfg/sub/x": b"x"}


def test_home_itself_a_symlink_reads_nothing(tmp_path: Path, outside: Path) -> None:
    """When the HOME path is a symlink to a host directory, nothing is read."""
    (tmp_path / "home").symlink_to(outside)
    assert read_within(tmp_path / "home", ("~/auth.json", "~/sub")) == {}


def test_overlapping_kept_paths_read_once(home: Path) -> None:
    """A file declared both by itself and inside a declared directory is read once."""
    found = read_within(home, ("~/.cfg", "~/.cfg/hosts.yml", "~/.cfg/"))
    assert found == {".cfg/hosts.yml": b"host: a", ".cfg/sub/x": b"x"}


def test_missing_paths_and_missing_home_are_skipped(tmp_path: Path) -> None:
    """Kept paths that do not exist, and a HOME that does not, give an empty result."""
    (tmp_path / "home").mkdir()
    assert read_within(tmp_path / "home", ("~/.nothing/auth.json", "~/.none")) == {}
    assert read_within(tmp_path / "gone") == {}


def test_swaps_racing_the_reader_never_leak(home: Path, outside: Path) -> None:
    """A session swapping a kept file, a kept file's parent and a kept directory with symlinks to
    host files while the reader runs never gets a host file read."""
    (home / ".file").write_bytes(b"token-2")
    (home / "file-link").symlink_to(outside / "auth.json")
    (home / "file-real").write_bytes(b"token-2")
    stop = threading.Event()
    errors: list[BaseException] = []
    rounds = [0]

    def toggle_directory(name: str) -> None:
        os.rename(home / name, home / f"{name}-real")
        os.symlink(outside, home / name)
        os.unlink(home / name)
        os.rename(home / f"{name}-real", home / name)

    def toggle_file() -> None:
        for source in ("file-link", "file-real"):
            os.link(home / source, home / "tmp", follow_symlinks=False)
            os.replace(home / "tmp", home / ".file")  # atomic: always one or the other

    def swap() -> None:
        try:
            while not stop.is_set():
                toggle_directory(".tool")
                toggle_directory(".cfg")
                toggle_file()
                rounds[0] += 1
        except BaseException as exc:
            errors.append(exc)

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    deadline = time.monotonic() + 10_000 * MS
    reads = 0
    try:
        while (rounds[0] < 300 or reads < 300) and time.monotonic() < deadline:
            assert_nothing_outside(read_kept(home, (*KEPT, "~/.file")))
            reads += 1
    finally:
        stop.set()
        swapper.join()
    assert errors == []
    assert rounds[0] >= 300


def test_caps_on_count_depth_and_total(tmp_path: Path) -> None:
    """Files past the count cap, directories past the depth cap and bytes past the total cap are
    left out; what fits is kept."""
    home = tmp_path / "home"
    many = home / ".many"
    many.mkdir(parents=True)
    for index in range(MAX_FILES + 10):
        (many / f"f{index:04d}").write_bytes(b"1")
    assert len(read_within(home, ("~/.many",))) == MAX_FILES

    deep = home / ".deep"
    level = deep
    for depth in range(MAX_DEPTH + 3):
        level = level / f"d{depth}"
    level.mkdir(parents=True)
    (level / "bottom").write_bytes(b"deep")
    (deep / "top").write_bytes(b"top")
    assert read_within(home, ("~/.deep",)) == {".deep/top": b"top"}

    big = home / ".big"
    big.mkdir()
    for index in range(5):
        (big / f"b{index}").write_bytes(b"b" * MAX_FILE_BYTES)
    assert sorted(read_within(home, ("~/.big",))) == [f".big/b{i}" for i in range(4)]


@pytest.mark.parametrize(
    ("declared", "relative"),
    [
        ("~/.codex/auth.json", ".codex/auth.json"),
        ("~/.config/gh/", ".config/gh"),
        (".netrc", ".netrc"),
        ("~//a/./b", "a/b"),
    ],
)
def test_normalize_keep(declared: str, relative: str) -> None:
    """Declared kept paths become plain paths relative to HOME."""
    assert normalize_keep(declared) == relative


@pytest.mark.parametrize("declared", ["", "~", "~/", "/etc/passwd", "~/../etc", "a/../../b", "~x"])
def test_normalize_keep_refuses_paths_outside_home(declared: str) -> None:
    """HOME itself, absolute paths, ``..`` and other users' homes are refused, naming the path."""
    with pytest.raises(ConfigError) as caught:
        normalize_keep(declared)
    assert repr(declared) in caught.value.message


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    """Files written into a fresh HOME are read back identically, directories 0700, files 0600."""
    home = tmp_path / "home"
    home.mkdir()
    files = {".codex/auth.json": b'{"token": 1}', ".cfg/a/b/c": b"\x00\xff", ".netrc": b""}
    write_kept(home, files, None)
    assert read_within(home, ("~/.codex/auth.json", "~/.cfg", "~/.netrc")) == files
    assert stat.S_IMODE((home / ".cfg" / "a").stat().st_mode) == 0o700
    assert stat.S_IMODE((home / ".cfg" / "a" / "b" / "c").stat().st_mode) == 0o600
    assert sorted(p.name for p in (home / ".codex").iterdir()) == ["auth.json"]  # no temporaries


def test_written_files_belong_to_the_session_uid(tmp_path: Path) -> None:
    """As root, created directories and files are owned by the session's uid and gid."""
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    home = tmp_path / "home"
    home.mkdir()
    write_kept(home, {".codex/auth.json": b"t"}, 54321)
    for path in (home / ".codex", home / ".codex" / "auth.json"):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (54321, 54321)
    assert home.stat().st_uid == 0  # HOME itself is left as it was


def test_write_never_follows_links(tmp_path: Path, outside: Path) -> None:
    """A symlinked parent is refused with DriverError and a symlinked file is replaced, never
    written through: host files stay untouched."""
    home = tmp_path / "home"
    home.mkdir()
    (home / ".tool").symlink_to(outside)
    with pytest.raises(DriverError, match=r"~/\.tool/auth\.json"):
        write_kept(home, {".tool/auth.json": b"planted"}, None)
    (home / ".cfg").mkdir()
    (home / ".cfg" / "x").symlink_to(outside / "auth.json")
    write_kept(home, {".cfg/x": b"restored"}, None)
    assert (outside / "auth.json").read_bytes() == SECRET
    assert not (home / ".cfg" / "x").is_symlink()
    assert (home / ".cfg" / "x").read_bytes() == b"restored"


@pytest.mark.parametrize("name", ["../x", "/etc/x", "~/x", "a/../b", "", "a//b", "./a"])
def test_write_refuses_names_outside_home(tmp_path: Path, name: str) -> None:
    """A name that is absolute, has ``..`` or is not normalized is refused before anything is
    written."""
    home = tmp_path / "home"
    home.mkdir()
    with pytest.raises(ConfigError):
        write_kept(home, {"ok": b"1", name: b"2"}, None)
    assert list(home.iterdir()) == []
