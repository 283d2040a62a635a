"""The host's channels to a running guest: its control agent, its VNC banner, its terminal.

:func:`control_exchange` sends the control agent one line on the second serial port and reads
its answer; :func:`read_banner` reads the RFB banner through the VM's loopback forward.

The text terminal, on a host Unix socket as the local driver's (the tty protocol). Inside the
guest the tty server (:mod:`remotecli.sandbox.tty_server`, TCP form) listens behind QEMU's
loopback-only port forward, and opens to a connection that starts with the VM's secret. Any
local process may connect to that forward, so the secret is what keeps them out; the
controller, which holds it, reaches the terminal through :class:`TtyProxy`: a Unix socket (mode
0600, in the VM's private socket directory) whose every connection is joined to a new
connection to the forward, the secret sent first. From there on the bytes are the tty protocol
both ways, unchanged, with backpressure (each side is read only as fast as the other takes it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from remotecli.drivers.banner import await_rfb_banner
from remotecli.exceptions import (
    DriverError,
    RemoteProtocolError,
    UpstreamRefused,
    UpstreamUnreachable,
)
from remotecli.links import LinkReader
from remotecli.logs import get_logger
from remotecli.sandbox.keep import (
    MAX_DEPTH,
    MAX_ENTRIES,
    MAX_FILE_BYTES,
    MAX_FILES,
    MAX_TOTAL_BYTES,
)

log = get_logger("driver.qemu")

CONNECT_SECONDS = 5.0
_CHUNK = 65536
CONTROL_LINE_MAX = 8 * 1024 * 1024
"""The longest answer read from the control agent: a kept sign-in's files, base64 (4 MiB
at most are kept, so a longer answer is not one)."""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy ``reader`` to ``writer`` until EOF or an error, then half-close ``writer``."""
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


class TtyProxy:
    """The Unix socket the bridge opens for one VM's text terminal; :meth:`close` ends it."""

    def __init__(self, server: asyncio.Server, path: Path) -> None:
        self._server = server
        self.path = path

    @classmethod
    async def start(cls, path: Path, port: int, secret: str) -> TtyProxy:
        """Listen on ``path``; join each connection to ``127.0.0.1:port`` after ``secret``."""

        async def join(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                async with asyncio.timeout(CONNECT_SECONDS):
                    guest_reader, guest_writer = await asyncio.open_connection("127.0.0.1", port)
            except (OSError, TimeoutError):
                writer.close()  # the bridge reads EOF before any byte: no terminal
                return
            guest_writer.write(secret.encode("ascii") + b"\n")
            try:
                await asyncio.gather(_pipe(reader, guest_writer), _pipe(guest_reader, writer))
            finally:
                guest_writer.close()
                writer.close()

        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(join, path=str(path))
        finally:
            os.umask(old)
        return cls(server, path)

    def close(self) -> None:
        """Stop accepting and remove the socket (open connections end with the VM)."""
        self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


async def control_exchange(path: Path, line: bytes, expect: str, *, within: float) -> str:
    """Send ``line`` to the guest's control agent and return its answer starting ``expect``.

    The agent is the guest's, so its answers are hostile input: a line longer than
    :data:`CONTROL_LINE_MAX` is refused.
    """
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=CONTROL_LINE_MAX)
            try:
                if line:
                    writer.write(line)
                    await writer.drain()
                while True:
                    try:
                        raw = await reader.readline()
                    except ValueError as exc:  # asyncio's "separator not found, limit exceeded"
                        raise DriverError(
                            "the guest's control agent sent a line longer than "
                            f"{CONTROL_LINE_MAX} bytes; it was not read"
                        ) from exc
                    if not raw:
                        raise DriverError("the VM closed its control channel (did QEMU exit?)")
                    answer = raw.decode(errors="replace").strip()
                    if answer.startswith(expect):
                        return answer
            finally:
                writer.close()
    except TimeoutError as exc:
        raise DriverError(
            f"the guest did not answer {expect.strip()!r} on its control channel within "
            f"{within:.0f} s; see the session's serial.log"
        ) from exc


async def read_banner(port: int, *, within: float) -> tuple[int, int]:
    """Read the RFB banner through the forward, retrying while the guest is not listening yet.

    QEMU's forward accepts at once and closes when nothing listens in the guest yet, so a short
    read or an odd greeting means "not yet" here, not a failure.
    """
    last_error = ["no answer"]

    def remember(exc: BaseException) -> None:
        last_error[0] = getattr(exc, "message", None) or str(exc) or type(exc).__name__

    try:
        async with asyncio.timeout(within):
            return await await_rfb_banner(
                lambda: asyncio.open_connection("127.0.0.1", port),
                not_yet=(OSError, asyncio.IncompleteReadError, RemoteProtocolError),
                retried=remember,
            )
    except TimeoutError as exc:
        raise DriverError(
            f"no RFB banner from the guest's VNC server on 127.0.0.1:{port} within "
            f"{within:.0f} s ({last_error[0]}); see the session's serial.log"
        ) from exc


def is_our_qemu(pid: int, qmp_path: str) -> bool:
    """Whether ``pid`` is still the QEMU with this monitor socket (a pid may be reused)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return qmp_path.encode() in cmdline


def console_tail(path: Path, lines: int = 3) -> str:
    """The last ``lines`` of a VM's console log, on one line (for error messages)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


# --- kept sign-ins over the control channel ----------------------------------------------------


def home_line(files: Mapping[str, bytes]) -> bytes:
    """The control line that puts a kept sign-in's files into the guest's HOME (``home TAR``).

    ``files`` maps normalized paths relative to HOME to their contents; each is written mode
    0600. The guest unpacks them and starts its CLI again, so that the CLI reads them.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(files[name]), 0o600
            archive.addfile(info, io.BytesIO(files[name]))
    return b"home " + base64.b64encode(buffer.getvalue()) + b"\n"


def collect_line(paths: Sequence[str]) -> bytes:
    """The control line that asks the guest for the files at ``paths`` (``collect LIST``)."""
    return b"collect " + base64.b64encode("\n".join(paths).encode() + b"\n") + b"\n"


def read_collected(answer: str, paths: Sequence[str]) -> dict[str, bytes]:
    """Return the kept files in the guest's ``files TAR`` answer, as :func:`read_kept` would.

    The archive is the guest's, so hostile, and it is read by :func:`_tar_members`, not by
    :mod:`tarfile` (whose sparse maps, pax headers and base-256 sizes let a crafted archive
    read backwards, stall or balloon). Only regular files are taken, each at or below one of
    ``paths``, at most :data:`MAX_DEPTH` levels below it, within the same caps per file, in all
    and in number as a local session's HOME (``sandbox/keep.py``); anything else is skipped
    with a warning, never unpacked onto a disk. An answer that is not such an archive raises
    :class:`DriverError`, and nothing is kept from it.
    """
    try:
        data = base64.b64decode(answer.removeprefix("files").strip(), validate=True)
    except ValueError as exc:
        raise DriverError("the guest's kept files were not base64; nothing was kept") from exc
    found: dict[str, bytes] = {}
    total = 0
    for count, (raw_name, kind, content) in enumerate(_tar_members(data)):
        if count >= MAX_ENTRIES:
            _skipped(raw_name, f"more than {MAX_ENTRIES} entries")
            break
        name = _kept_name(raw_name, paths)
        if kind == "directory":
            continue
        if name is None or kind != "file":
            _skipped(raw_name, "not a regular file below a kept path")
            continue
        if len(content) > MAX_FILE_BYTES:
            _skipped(name, f"larger than {MAX_FILE_BYTES} bytes")
            continue
        if len(found) >= MAX_FILES or total + len(content) > MAX_TOTAL_BYTES:
            _skipped(name, f"past {MAX_FILES} files or {MAX_TOTAL_BYTES} bytes in all")
            continue
        found[name] = content
        total += len(content)
    return dict(sorted(found.items()))


_BLOCK = 512
_REGULAR = (b"0", b"\0", b"7")  # regular file (old and new flags), contiguous file
_DIRECTORY = b"5"
_GNU_LONG_NAME = b"L"
_LONG_NAME_MAX = 4096


def _tar_members(data: bytes) -> Iterator[tuple[str, str, bytes]]:
    """Yield (name, kind, content) of each member of the ustar/GNU archive ``data``.

    ``kind`` is ``file``, ``directory`` or ``other``; only files carry content. Sizes must be
    octal digits (no base-256), so every step moves forward and the work is bounded by the
    input. A GNU long name (``L``, as GNU tar writes names over 100 bytes) is understood; pax
    headers, sparse files and anything else are members of kind ``other``, skipped over.
    Raises DriverError for a truncated or malformed archive.
    """
    offset, long_name = 0, None
    while offset + _BLOCK <= len(data):
        header = data[offset : offset + _BLOCK]
        if header == bytes(_BLOCK):
            return  # the end-of-archive marker
        if header[257:262] != b"ustar":
            raise DriverError("the guest's kept files were not a tar archive; nothing was kept")
        size_field = header[124:136].rstrip(b"\0 ").lstrip(b" ")
        if not size_field or any(digit not in b"01234567" for digit in size_field):
            raise DriverError("the guest's archive has a member of no readable size")
        size = int(size_field, 8)
        start = offset + _BLOCK
        end = start + size
        if end > len(data):
            raise DriverError("the guest's archive ends inside a member; nothing was kept")
        offset = start + -(-size // _BLOCK) * _BLOCK
        flag = header[156:157]
        if flag == _GNU_LONG_NAME:
            if size > _LONG_NAME_MAX:
                raise DriverError("the guest's archive has a name too long to be a kept path")
            long_name = data[start:end].split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        name = long_name
        long_name = None
        if name is None:
            prefix = header[345:500].split(b"\0", 1)[0]
            base = header[0:100].split(b"\0", 1)[0]
            joined = prefix + b"/" + base if prefix and header[257:263] == b"ustar\0" else base
            name = joined.decode("utf-8", "replace")
        if flag in _REGULAR:
            yield name, "file", data[start:end]
        else:
            yield name, "directory" if flag == _DIRECTORY else "other", b""
    if offset < len(data):
        raise DriverError("the guest's archive ends inside a header; nothing was kept")


def _kept_name(raw: str, paths: Sequence[str]) -> str | None:
    """``raw`` normalized, if it names a file at or below one of ``paths``; else None."""
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if not parts or ".." in parts or raw.startswith("/") or "\0" in raw:
        return None
    name = "/".join(parts)
    for kept in paths:
        if name == kept:
            return name
        if name.startswith(kept + "/") and name.count("/") - kept.count("/") <= MAX_DEPTH:
            return name
    return None


def _skipped(name: str, reason: str) -> None:
    log.warning("kept file skipped", path=f"~/{name}"[:300], reason=reason)


# --- the guest relay: the guest's loopback and its links ----------------------------------------

RELAY_ANSWER_MAX = 32


async def relay_open(
    port: int, secret: str, request: str, *, within: float = CONNECT_SECONDS
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a relay connection through the VM's forward for ``request`` (``connect A P`` or
    ``links``); return it once the relay answered ``ok``.

    Raises :class:`UpstreamRefused` when nothing listens at the guest address asked for,
    :class:`UpstreamUnreachable` when the guest cannot reach it, and :class:`DriverError`
    when the relay does not answer (a VM from before the relay, or one that broke it).
    """
    try:
        async with asyncio.timeout(within):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"{secret} {request}\n".encode("ascii"))
            answer = await reader.readline()
    except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a line past the limit
        raise DriverError(
            "the microVM's relay did not answer; the session's guest may be too old for "
            "sign-in callbacks (start a new session)"
        ) from exc
    word = answer[:RELAY_ANSWER_MAX].strip()
    if word == b"ok":
        return reader, writer
    writer.close()
    if word == b"refused":
        raise UpstreamRefused("nothing listens on that port in the session")
    if word == b"unreachable":
        raise UpstreamUnreachable("the session cannot reach that address on its own loopback")
    raise DriverError("the microVM's relay refused the request; start a new session")


async def follow_links(
    port: int,
    secret: str,
    open_url: Callable[[str], None],
    *,
    first: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None,
    retry: float = 1.0,
) -> None:
    """Pass every link the guest's CLI asks a browser to open to ``open_url``; run until
    cancelled. The lines are hostile: :class:`LinkReader` keeps only http(s) links, within
    its rate. ``first`` is a ``links`` connection already open. A broken connection is opened
    again after ``retry`` seconds, and one that cannot be opened after twice as long each time,
    up to 30 s.
    """
    links = LinkReader()
    pause = retry
    while True:
        try:
            reader, writer = first or await relay_open(port, secret, "links")
            first = None
        except DriverError as exc:
            log.info("links relay not open", error=exc.message, retry_s=pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 30.0)  # a guest without the relay is not asked every second
            continue
        pause = retry
        try:
            while data := await reader.read(_CHUNK):
                for link in links.receive_data(data):
                    open_url(link)
        except OSError:
            pass
        finally:
            writer.close()
        await asyncio.sleep(pause)
