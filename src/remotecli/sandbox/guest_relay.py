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

Any other first line, a wrong secret, or no line in time closes the connection unanswered. The
guest is the user's: the host treats every byte from here as hostile input.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import socket
import sys
from collections.abc import Sequence

REQUEST_SECONDS = 5.0
REQUEST_MAX = 160
CONNECT_SECONDS = 5.0
CHUNK = 65536
ADDRESSES = ("127.0.0.1", "::1")


class Relay:
    """The relay's state: the secret file, the links FIFO and its current reader."""

    def __init__(self, secret_file: str, links_fifo: str) -> None:
        self.secret_file = secret_file
        self.links_fifo = links_fifo
        self.link_reader: asyncio.StreamWriter | None = None

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
        else:
            writer.close()

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


async def main_async(port: int, secret_file: str, links_fifo: str) -> None:
    relay = Relay(secret_file, links_fifo)
    listener = socket.create_server(("0.0.0.0", port), reuse_port=False)
    server = await asyncio.start_server(relay.serve, sock=listener, limit=REQUEST_MAX)
    async with server:
        await asyncio.gather(server.serve_forever(), relay.pump_links())


USAGE = "usage: guest_relay.py --port PORT --secret-file FILE --links FIFO\n"


def main(argv: Sequence[str]) -> int:
    """Parse the fixed arguments and serve until killed."""
    if len(argv) != 7 or argv[1::2] != ["--port", "--secret-file", "--links"]:
        sys.stderr.write(USAGE)
        return 2
    asyncio.run(main_async(int(argv[2]), argv[4], argv[6]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
