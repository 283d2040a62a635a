"""Inside a microVM: the host's way to the guest's own loopback and to the links its CLI opens.

This file is installed into the guest image and runs there (``python3 -I -S``, standard library
only); it imports nothing of remote-cli. It listens on TCP ``--port`` (5903), which QEMU forwards
from the host's 127.0.0.1 only, and opens to a connection whose first line, within
:data:`REQUEST_SECONDS`, is the VM's secret (64 hex digits, read from ``--secret-file`` on each
request, as the tty server does) followed by one request:

``SECRET connect ADDRESS PORT``
    ADDRESS is ``127.0.0.1`` or ``::1``. The relay connects there, inside the guest, and answers
    ``ok`` and then carries bytes both ways until either side closes; or it answers ``refused``
    (nothing listens), ``unreachable`` or ``error``, and closes. This is how a provider's
    sign-in callback (``http://localhost:PORT/...``, pasted by the user into the dashboard)
    reaches the CLI waiting in the guest.

``SECRET links``
    Answers ``ok``, then passes on every line written to the FIFO ``--links`` (where the guest's
    ``$BROWSER`` and ``xdg-open`` stand-ins write the links a CLI asks to open). One reader at a
    time: a newer ``links`` connection replaces the older one.

``SECRET run LENGTH``
    A headless run. LENGTH (decimal, at most :data:`RUN_REQUEST_MAX`) bytes of JSON follow the
    line: ``{"argv": [PROGRAM, ARG, ...], "files": {"PATH": "BASE64", ...}}``. Each PATH is
    relative to HOME (``--home``, ``/root`` in the guest): no absolute path, no ``..``, no
    empty name. The relay checks the whole request first, then writes each file mode 0600
    (directories 0700, no link followed) and starts ARGV in a new session, cwd HOME,
    ``HOME`` set, standard input ``/dev/null``. It answers ``ok`` once the command started, or
    ``error REASON`` (a refused request, a program that could not start) and closes. After
    ``ok`` it sends frames, ``KIND (1 byte) | LENGTH (4 bytes, big-endian) | PAYLOAD``, until
    the command ended: ``o`` standard output, ``e`` standard error (each at most
    :data:`CHUNK` bytes, as the command wrote them), then one ``x`` whose payload is the exit
    status in decimal ASCII (128 + N for signal N), and closes. When the command ended, what
    is left of its process group is killed. When the host closes the connection first (a
    cancelled run) the command's process group is killed at once. One run per relay: a VM
    that ran a command is never given a second one.

Any other first line, a wrong secret, or no line in time closes the connection unanswered. The
guest is the user's: the host treats every byte from here as hostile input.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from typing import IO

REQUEST_SECONDS = 5.0
REQUEST_MAX = 160
CONNECT_SECONDS = 5.0
CHUNK = 65536
ADDRESSES = ("127.0.0.1", "::1")
RUN_REQUEST_MAX = 8 * 1024 * 1024
"""The longest run request: a kept sign-in (4 MiB at most), base64 in JSON, and the argv."""
RUN_READ_SECONDS = 30.0
RUN_DRAIN_SECONDS = 2.0
"""How long the output of an ended command is still read (a process that left the command's
process group may hold its pipes open for ever)."""
ERROR_MAX = 200
HOME = "/root"


class Refused(Exception):
    """A run request the relay does not carry out; the message is the reason, for the host."""


def parse_run_request(data: bytes) -> tuple[list[str], dict[str, bytes]]:
    """Return the argv and the files (HOME-relative path -> content) of a run request.

    Raises :class:`Refused` for anything but ``{"argv": [...], "files": {...}}`` with a
    non-empty argv of strings and only relative paths without ``..`` or empty names.
    """
    try:
        request = json.loads(data)
    except ValueError:
        raise Refused("the request is not JSON") from None
    if not isinstance(request, dict) or set(request) != {"argv", "files"}:
        raise Refused("the request must hold argv and files, nothing else")
    argv, files = request["argv"], request["files"]
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(word, str) and "\0" not in word for word in argv)
        or not argv[0]
    ):
        raise Refused("argv must be a non-empty list of strings")
    if not isinstance(files, dict):
        raise Refused("files must map paths to base64")
    decoded: dict[str, bytes] = {}
    for path, content in files.items():
        home_parts(path)
        if not isinstance(content, str):
            raise Refused(f"the content of {path[:ERROR_MAX]!r} is not base64")
        try:
            decoded[path] = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise Refused(f"the content of {path[:ERROR_MAX]!r} is not base64") from None
    return argv, decoded


def home_parts(path: str) -> list[str]:
    """The names along ``path`` below HOME; :class:`Refused` for an absolute path, ``..``,
    ``.``, an empty name (``a//b``, a trailing ``/``) or a NUL."""
    parts = path.split("/")
    if not path or "\0" in path or any(part in ("", ".", "..") for part in parts):
        raise Refused(f"{path[:ERROR_MAX]!r} is not a plain path below HOME")
    return parts


def write_home_file(home: str, path: str, content: bytes) -> None:
    """Write ``content`` to ``home``/``path``, mode 0600, its directories 0700, no link followed.

    Raises :class:`Refused` naming the path when it cannot be written.
    """
    parts = home_parts(path)
    try:
        directory = os.open(home, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise Refused(f"cannot open HOME: {exc.strerror}") from None
    try:
        for name in parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=directory)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=directory)
            os.close(directory)
            directory = inner
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        descriptor = os.open(parts[-1], flags, 0o600, dir_fd=directory)
        try:
            os.fchmod(descriptor, 0o600)
            view = memoryview(content)
            while view:
                view = view[os.write(descriptor, view) :]
        finally:
            os.close(descriptor)
    except OSError as exc:
        raise Refused(f"cannot write {path[:ERROR_MAX]!r}: {exc.strerror}") from None
    finally:
        os.close(directory)


def start_command(argv: list[str], home: str) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session of its own, in ``home``, reading nothing, its output piped.

    Raises :class:`Refused` when it cannot start (no such program, not executable).
    """
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=home,
            env={**os.environ, "HOME": home},
            start_new_session=True,
        )
    except OSError as exc:
        raise Refused(f"cannot start {argv[0][:ERROR_MAX]!r}: {exc.strerror}") from None


def frame(kind: bytes, payload: bytes) -> bytes:
    """One frame of a run's answer: kind, big-endian length, payload."""
    return kind + struct.pack("!I", len(payload)) + payload


class Relay:
    """The relay's state: the secret file, the links FIFO and its current reader."""

    def __init__(self, secret_file: str, links_fifo: str, home: str = HOME) -> None:
        self.secret_file = secret_file
        self.links_fifo = links_fifo
        self.home = home
        self.link_reader: asyncio.StreamWriter | None = None
        self.ran = False

    def secret_matches(self, given: bytes) -> bool:
        try:
            with open(self.secret_file, "rb") as handle:
                expected = handle.read().strip()
        except OSError:
            return False
        return len(expected) == 64 and hmac.compare_digest(given, expected)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_SECONDS):
                line = await reader.readuntil(b"\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        words = line.split()
        if len(words) < 2 or not self.secret_matches(words[0]):
            writer.close()
            return
        if words[1:] == [b"links"]:
            await self.hand_links(writer)
        elif len(words) == 4 and words[1] == b"connect":
            await self.connect(reader, writer, words[2].decode("ascii", "replace"), words[3])
        elif len(words) == 3 and words[1] == b"run":
            await self.run(reader, writer, words[2])
        else:
            writer.close()

    async def run(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length_text: bytes
    ) -> None:
        """Read a run request, write its files, start its command and relay it (see above)."""
        length = int(length_text) if length_text.isdigit() and len(length_text) < 10 else 0
        try:
            if self.ran:
                raise Refused("this VM already ran a command")
            if not 0 < length <= RUN_REQUEST_MAX:
                raise Refused(f"the request's length must be 1..{RUN_REQUEST_MAX}")
            self.ran = True
            try:
                async with asyncio.timeout(RUN_READ_SECONDS):
                    data = await reader.readexactly(length)
            except (asyncio.IncompleteReadError, TimeoutError, OSError):
                writer.close()
                return
            argv, files = parse_run_request(data)
            for path, content in files.items():
                write_home_file(self.home, path, content)
            process = start_command(argv, self.home)
        except Refused as exc:
            writer.write(b"error " + str(exc).encode("ascii", "replace") + b"\n")
            writer.close()
            return
        writer.write(b"ok\n")
        await carry(process, reader, writer)

    async def hand_links(self, writer: asyncio.StreamWriter) -> None:
        if self.link_reader is not None:
            self.link_reader.close()
        self.link_reader = writer
        writer.write(b"ok\n")
        with contextlib.suppress(OSError):
            await writer.drain()

    async def pump_links(self) -> None:
        """Read the FIFO for ever (held open for writing too, so it never ends); pass lines on."""
        descriptor = os.open(self.links_fifo, os.O_RDWR | os.O_NONBLOCK)
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        loop.add_reader(descriptor, ready.set)
        while True:
            await ready.wait()
            ready.clear()
            try:
                data = os.read(descriptor, CHUNK)
            except BlockingIOError:
                continue
            target = self.link_reader
            if target is not None and not target.is_closing():
                target.write(data)

    async def connect(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: str,
        port_text: bytes,
    ) -> None:
        port = int(port_text) if port_text.isdigit() else 0
        if address not in ADDRESSES or not 0 < port < 65536:
            writer.write(b"error\n")
            writer.close()
            return
        try:
            async with asyncio.timeout(CONNECT_SECONDS):
                inner_reader, inner_writer = await asyncio.open_connection(address, port)
        except ConnectionRefusedError:
            answer = b"refused\n"
        except (OSError, TimeoutError):
            answer = b"unreachable\n"
        else:
            answer = b""
        if answer:
            writer.write(answer)
            writer.close()
            return
        writer.write(b"ok\n")
        await asyncio.gather(pipe(reader, inner_writer), pipe(inner_reader, writer))


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF, then half-close; close on an error."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.close()


async def carry(
    process: subprocess.Popen[bytes], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """Send the command's output as frames until it ends, then its status; kill its process
    group when it ends or when the host hangs up, whichever comes first."""
    loop = asyncio.get_running_loop()
    assert process.stdout is not None
    assert process.stderr is not None

    async def pump(pipe: IO[bytes], kind: bytes) -> None:
        stream = asyncio.StreamReader(limit=CHUNK, loop=loop)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(stream), pipe
        )
        try:
            while data := await stream.read(CHUNK):
                writer.write(frame(kind, data))
                await writer.drain()  # a host that stops reading stops the command's output
        except OSError:
            pass  # the host is gone: the hang-up ends the command
        finally:
            transport.close()

    pumps = asyncio.gather(pump(process.stdout, b"o"), pump(process.stderr, b"e"))
    exited = asyncio.Event()
    pidfd = os.pidfd_open(process.pid)  # readable once the command's process has exited
    loop.add_reader(pidfd, exited.set)
    ended = asyncio.ensure_future(exited.wait())
    hangup = asyncio.ensure_future(reader.read(1))  # the host sends nothing more: EOF or junk
    try:
        await asyncio.wait({ended, hangup}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)
    ended.cancel()
    status = process.wait()  # at once: it has exited, or was just killed
    if hangup.done():
        pumps.cancel()
        writer.close()
        return
    hangup.cancel()
    with contextlib.suppress(TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(pumps, RUN_DRAIN_SECONDS)
    writer.write(frame(b"x", str(status if status >= 0 else 128 - status).encode()))
    with contextlib.suppress(OSError):
        await writer.drain()
    writer.close()


async def main_async(port: int, secret_file: str, links_fifo: str, home: str = HOME) -> None:
    relay = Relay(secret_file, links_fifo, home)
    listener = socket.create_server(("0.0.0.0", port), reuse_port=False)
    server = await asyncio.start_server(relay.serve, sock=listener, limit=REQUEST_MAX)
    async with server:
        await asyncio.gather(server.serve_forever(), relay.pump_links())


USAGE = "usage: guest_relay.py --port PORT --secret-file FILE --links FIFO [--home DIR]\n"


def main(argv: Sequence[str]) -> int:
    """Parse the fixed arguments and serve until killed."""
    flags = list(argv[1::2])
    if len(argv) not in (7, 9) or flags[:3] != ["--port", "--secret-file", "--links"]:
        sys.stderr.write(USAGE)
        return 2
    if len(argv) == 9 and flags[3] != "--home":
        sys.stderr.write(USAGE)
        return 2
    home = argv[8] if len(argv) == 9 else HOME
    asyncio.run(main_async(int(argv[2]), argv[4], argv[6], home))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
