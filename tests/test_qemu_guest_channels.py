"""The microVM's channels without a VM: the kept files' archive, and the guest relay.

The relay (``sandbox/guest_relay.py``) is run here as the guest runs it, ``python3 -I -S`` on a
loopback port, with its secret file, links FIFO and HOME in a temporary directory; its ``run``
request is driven by the qemu driver's own :func:`open_run` and :class:`QemuRun`. The archives
fed to :func:`read_collected` are what a hostile guest could send instead of its HOME's files.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from remotecli.drivers.qemu_guest import (
    collect_line,
    follow_links,
    home_line,
    read_collected,
    relay_open,
)
from remotecli.drivers.qemu_run import QemuRun, open_run
from remotecli.exceptions import DriverError, UpstreamRefused
from remotecli.sandbox import guest_relay
from remotecli.sandbox.keep import MAX_FILE_BYTES, MAX_FILES
from tests.conftest import MS

TIMEOUT = 10_000 * MS
SECRET = "ab" * 32


def archive(*members: tuple[tarfile.TarInfo, bytes]) -> str:
    """A ``files TAR`` answer holding ``members``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for info, data in members:
            info.size = len(data) if info.isfile() else 0
            tar.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return "files " + base64.b64encode(buffer.getvalue()).decode()


def regular(name: str) -> tarfile.TarInfo:
    return tarfile.TarInfo(name)


def special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def test_home_line_round_trips_through_the_reader() -> None:
    """What the host sends into HOME is what it reads back: names, contents, mode 0600."""
    files = {".standin/credentials.json": b'{"token": "t"}', ".codex/auth.json": b"{}"}
    line = home_line(files)
    assert line.startswith(b"home ")
    assert line.endswith(b"\n")
    data = base64.b64decode(line.removeprefix(b"home ").strip())
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert {m.name: m.mode for m in tar} == dict.fromkeys(sorted(files), 0o600)
    answer = "files " + line.removeprefix(b"home ").decode().strip()
    assert read_collected(answer, [".standin", ".codex/auth.json"]) == dict(sorted(files.items()))


def test_collect_line_names_the_paths_one_per_line() -> None:
    """The guest gets the declared paths, one per line, base64 on one control line."""
    line = collect_line([".codex/auth.json", ".claude"])
    assert base64.b64decode(line.split()[1]) == b".codex/auth.json\n.claude\n"


def test_a_hostile_archive_yields_only_regular_files_below_kept_paths() -> None:
    """Links, hard links, devices, files outside the kept paths, absolute names, ``..`` and
    files over the size cap are left out; the regular file below the kept path is taken."""
    answer = archive(
        (regular(".standin/credentials.json"), b"ok"),
        (special(".standin/shadow", tarfile.SYMTYPE, "/etc/shadow"), b""),
        (special(".standin/hard", tarfile.LNKTYPE, ".standin/credentials.json"), b""),
        (special(".standin/dev", tarfile.CHRTYPE), b""),
        (regular(".bashrc"), b"not kept"),
        (regular("/root/.standin/abs"), b"absolute"),
        (regular(".standin/../.bashrc"), b"dotdot"),
        (regular(".standin/big"), b"x" * (MAX_FILE_BYTES + 1)),
    )
    assert read_collected(answer, [".standin"]) == {".standin/credentials.json": b"ok"}


def test_an_archive_with_too_many_files_is_cut_at_the_cap() -> None:
    """At most MAX_FILES files are kept from one answer."""
    answer = archive(*((regular(f".many/f{n:04}"), b"1") for n in range(MAX_FILES + 5)))
    assert len(read_collected(answer, [".many"])) == MAX_FILES


@pytest.mark.parametrize(
    "answer", ["files !!!not-base64", "files " + base64.b64encode(b"junk" * 200).decode()]
)
def test_an_answer_that_is_no_archive_keeps_nothing(answer: str) -> None:
    """Garbage from the guest raises DriverError (nothing is kept), never anything else."""
    with pytest.raises(DriverError):
        read_collected(answer, [".standin"])


def test_an_empty_answer_means_no_files() -> None:
    """A guest without any of the files answers an empty ``files`` line."""
    assert read_collected("files ", [".standin"]) == {}


# --- the guest relay, run as the guest runs it -------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """The relay on a loopback port, HOME ``tmp_path/home``; yields (port, links FIFO)."""
    secret = tmp_path / "secret"
    secret.write_text(SECRET)
    fifo = tmp_path / "links"
    os.mkfifo(fifo, 0o600)
    (tmp_path / "home").mkdir()
    port = free_port()
    argv = [sys.executable, "-I", "-S", guest_relay.__file__, "--port", str(port)]
    argv += ["--secret-file", str(secret), "--links", str(fifo), "--home", str(tmp_path / "home")]
    process = subprocess.Popen(argv)
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:  # poll until it listens: it says nothing when it is ready
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the relay did not listen"
                assert process.poll() is None, "the relay exited"
                time.sleep(0.01)
        yield port, fifo
    finally:
        process.kill()
        process.wait()


@pytest_asyncio.fixture
async def echo_server() -> AsyncIterator[int]:
    """A server on 127.0.0.1 that answers each line with the line upper-cased."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            writer.write(line.upper())
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_connect_reaches_a_loopback_listener_through_the_relay(
    relay: tuple[int, Path], echo_server: int
) -> None:
    """With the secret, ``connect 127.0.0.1 PORT`` is answered ok and carries bytes both ways."""
    port, _ = relay
    reader, writer = await relay_open(port, SECRET, f"connect 127.0.0.1 {echo_server}")
    writer.write(b"callback\n")
    assert await asyncio.wait_for(reader.readline(), TIMEOUT) == b"CALLBACK\n"
    writer.close()


async def test_connect_to_a_closed_port_is_refused(relay: tuple[int, Path]) -> None:
    """Nothing listening there is UpstreamRefused, as on the local driver."""
    port, _ = relay
    with pytest.raises(UpstreamRefused):
        await relay_open(port, SECRET, f"connect 127.0.0.1 {free_port()}")


@pytest.mark.parametrize(
    ("secret", "request_line"),
    [
        ("cd" * 32, "connect 127.0.0.1 80"),  # the wrong secret
        (SECRET, "connect 10.0.2.2 80"),  # not the guest's loopback
        (SECRET, "connect 127.0.0.1 0"),
        (SECRET, "shell"),
    ],
)
async def test_the_relay_opens_nothing_without_the_secret_or_for_other_requests(
    relay: tuple[int, Path], secret: str, request_line: str
) -> None:
    """A wrong secret, another address or an unknown request gets no ``ok``."""
    port, _ = relay
    with pytest.raises(DriverError):
        await relay_open(port, secret, request_line)


async def test_links_written_to_the_fifo_reach_the_host_as_links(relay: tuple[int, Path]) -> None:
    """Lines the guest's browser stand-in writes come out of :func:`follow_links`, and only
    the http(s) ones."""
    port, fifo = relay
    links: list[str] = []
    got = asyncio.Event()

    def open_url(url: str) -> None:
        links.append(url)
        got.set()

    first = await relay_open(port, SECRET, "links")
    task = asyncio.create_task(follow_links(port, SECRET, open_url, first=first))
    try:
        descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(descriptor, b"javascript:alert(1)\nhttps://auth.example/authorize?x=1\n")
        os.close(descriptor)
        await asyncio.wait_for(got.wait(), TIMEOUT)
    finally:
        task.cancel()
    assert links == ["https://auth.example/authorize?x=1"]


def raw_header(name: bytes, size_field: bytes, flag: bytes) -> bytes:
    """One ustar header block with a correct checksum, its size field as given."""
    header = bytearray(512)
    header[0 : len(name)] = name
    header[100:108] = b"0000600\0"
    header[124 : 124 + len(size_field)] = size_field
    header[156:157] = flag
    header[257:263] = b"ustar\0"
    header[263:265] = b"00"
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header)


def test_sizes_that_are_not_octal_digits_are_refused() -> None:
    """A base-256 size (negative here: it would move a reader backwards) or junk in the size
    field ends the read with DriverError; nothing of the archive is kept."""
    negative = b"\xff" * 12
    for size in (negative, b"12x4", b""):
        data = raw_header(b".standin/a", size, b"0") + bytes(1024)
        with pytest.raises(DriverError):
            read_collected("files " + base64.b64encode(data).decode(), [".standin"])


def test_sparse_pax_and_truncated_members_are_not_taken() -> None:
    """A GNU sparse member and a pax header are skipped; a member whose content runs past
    the end of the archive is refused."""
    body = b"x" * 10
    pad = bytes(512 - len(body))
    sparse = raw_header(b".standin/sparse", b"00000000012\0", b"S") + body + pad
    pax = raw_header(b"././@PaxHeader", b"00000000012\0", b"x") + body + pad
    good = raw_header(b".standin/ok", b"00000000012\0", b"0") + body + pad
    answer = "files " + base64.b64encode(sparse + pax + good + bytes(1024)).decode()
    assert read_collected(answer, [".standin"]) == {".standin/ok": body}
    truncated = raw_header(b".standin/ok", b"00000001000\0", b"0") + body
    with pytest.raises(DriverError):
        read_collected("files " + base64.b64encode(truncated).decode(), [".standin"])


def test_gnu_long_names_are_read() -> None:
    """A path over 100 bytes (GNU tar writes an ``L`` member first) is read whole."""
    name = ".standin/" + "d" * 120 + "/token"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size = 2
        tar.addfile(info, io.BytesIO(b"ok"))
    answer = "files " + base64.b64encode(buffer.getvalue()).decode()
    assert read_collected(answer, [".standin"]) == {name: b"ok"}


# --- the relay's run request (a headless run) ---------------------------------------------------


async def start(
    port: int, tmp_path: Path, argv: list[str], files: dict[str, bytes] | None = None
) -> QemuRun:
    reader, writer = await open_run(port, SECRET, argv, files or {}, within=TIMEOUT)
    return QemuRun("run", reader, writer, tmp_path / "serial.log")


async def read_all(run: QemuRun) -> bytes:
    out = b""
    async with asyncio.timeout(TIMEOUT):
        while data := await run.read():
            out += data
    return out


async def gone(pid: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        while Path(f"/proc/{pid}").exists() and "Z" not in proc_state(pid):
            await asyncio.sleep(10 * MS)


def proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


async def test_a_run_writes_its_home_files_and_relays_its_output_and_status(
    relay: tuple[int, Path], tmp_path: Path
) -> None:
    """The files are in HOME (0600, new directories 0700) before the command starts in HOME;
    stdout, the stderr tail and the status come back."""
    port, _ = relay
    home = tmp_path / "home"
    script = "pwd; echo $HOME; cat .a/b/cred; echo rotated > .a/b/cred; echo oops >&2; exit 7"
    run = await start(port, tmp_path, ["sh", "-c", script], {".a/b/cred": b"first\n"})
    assert await read_all(run) == f"{home}\n{home}\nfirst\n".encode()
    assert await asyncio.wait_for(run.wait(), TIMEOUT) == 7
    assert run.errors() == "oops\n"
    assert (home / ".a/b/cred").read_bytes() == b"rotated\n"
    assert (home / ".a/b/cred").stat().st_mode & 0o777 == 0o600
    assert (home / ".a").stat().st_mode & 0o777 == 0o700


@pytest.mark.parametrize("path", ["../escaped", "/tmp/escaped", "a/../../escaped", "a//b", "."])
async def test_a_run_with_a_file_outside_home_is_refused_and_runs_nothing(
    relay: tuple[int, Path], tmp_path: Path, path: str
) -> None:
    """An absolute path or one with ``..`` (or an empty or ``.`` name) fails the start with
    the relay's reason; nothing is written and the command never starts."""
    port, _ = relay
    marker = tmp_path / "ran"
    with pytest.raises(DriverError, match="not a plain path below HOME"):
        await start(port, tmp_path, ["touch", str(marker)], {".ok": b"1", path: b"x"})
    assert not marker.exists()
    assert list((tmp_path / "home").iterdir()) == []
    assert not (tmp_path / "escaped").exists()


async def test_a_run_does_not_follow_a_link_in_home(
    relay: tuple[int, Path], tmp_path: Path
) -> None:
    """A file whose place in HOME is a link is refused, not written through it."""
    port, _ = relay
    (tmp_path / "home" / ".link").symlink_to(tmp_path)
    with pytest.raises(DriverError, match="cannot write"):
        await start(port, tmp_path, ["true"], {".link/secret": b"x"})
    assert not (tmp_path / "secret.written").exists()
    assert (tmp_path / "secret").read_text() == SECRET


async def test_a_program_that_is_not_there_fails_the_start(
    relay: tuple[int, Path], tmp_path: Path
) -> None:
    """The relay's reason names the program."""
    port, _ = relay
    with pytest.raises(DriverError, match="cannot start 'no-such-program-here'"):
        await start(port, tmp_path, ["no-such-program-here"])


async def test_one_run_per_relay(relay: tuple[int, Path], tmp_path: Path) -> None:
    """A VM that ran a command is given no second one."""
    port, _ = relay
    run = await start(port, tmp_path, ["true"])
    assert await asyncio.wait_for(run.wait(), TIMEOUT) == 0
    with pytest.raises(DriverError, match="already ran"):
        await start(port, tmp_path, ["true"])


async def test_a_run_without_the_secret_gets_nothing(
    relay: tuple[int, Path], tmp_path: Path
) -> None:
    """The request with another secret is closed unanswered; the command does not run."""
    port, _ = relay
    marker = tmp_path / "ran"
    with pytest.raises(DriverError, match="without an answer"):
        await open_run(port, "cd" * 32, ["touch", str(marker)], {}, within=TIMEOUT)
    assert not marker.exists()


async def test_output_reaches_the_host_while_the_command_runs(
    relay: tuple[int, Path], tmp_path: Path
) -> None:
    """The first line is read while the command still waits for its second."""
    port, _ = relay
    gate = tmp_path / "gate"
    run = await start(
        port,
        tmp_path,
        ["sh", "-c", f"echo one; while [ ! -e {gate} ]; do sleep 0.05; done; echo two"],
    )
    assert await asyncio.wait_for(run.read(), TIMEOUT) == b"one\n"
    waiting = asyncio.ensure_future(run.wait())
    await asyncio.sleep(100 * MS)
    assert not waiting.done()
    gate.touch()
    assert await read_all(run) == b"two\n"
    assert await asyncio.wait_for(waiting, TIMEOUT) == 0


async def test_stopping_a_run_kills_its_process_group(
    relay: tuple[int, Path], tmp_path: Path
) -> None:
    """When the host closes the connection, the command and what it started are killed, and
    ``wait`` says the run was stopped."""
    port, _ = relay
    run = await start(port, tmp_path, ["sh", "-c", "sleep 600 & echo $! $$; wait"])
    pids = [int(word) for word in (await asyncio.wait_for(run.read(), TIMEOUT)).split()]
    run.stop()
    for pid in pids:
        await gone(pid)
    with pytest.raises(DriverError, match="stopped"):
        await run.wait()
    assert await run.read() == b""


async def test_what_an_ended_command_left_running_is_killed(
    relay: tuple[int, Path], tmp_path: Path
) -> None:
    """A background process holding the output pipe does not keep the run open: the status
    comes when the command ends, and the leftover is killed."""
    port, _ = relay
    run = await start(port, tmp_path, ["sh", "-c", "sleep 600 & echo $!"])
    pid = int(await read_all(run))
    assert await asyncio.wait_for(run.wait(), TIMEOUT) == 0
    await gone(pid)


async def test_a_guest_that_closes_without_a_status_fails_the_wait(tmp_path: Path) -> None:
    """A connection that answers ``ok``, sends output and closes without ``x`` makes
    ``wait`` raise DriverError naming the cause and the console's end."""
    (tmp_path / "serial.log").write_text("boot\nKernel panic - not syncing\n")

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"ok\n" + guest_relay.frame(b"o", b"partial"))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(guest, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        run = await start(port, tmp_path, ["true"])
        assert await read_all(run) == b"partial"
        with pytest.raises(DriverError, match=r"before the command's exit status.*Kernel panic"):
            await run.wait()


async def test_a_hostile_frame_ends_the_run_with_an_error(tmp_path: Path) -> None:
    """A frame of an unknown kind from the guest ends the run; ``wait`` names it."""

    async def guest(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"ok\n" + guest_relay.frame(b"o", b"fine") + guest_relay.frame(b"z", b""))
        await writer.drain()
        await reader.read()  # until the host hangs up

    server = await asyncio.start_server(guest, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        run = await start(port, tmp_path, ["true"])
        assert await read_all(run) == b"fine"
        with pytest.raises(DriverError, match="unknown kind"):
            await run.wait()
