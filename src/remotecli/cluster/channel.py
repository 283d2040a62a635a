"""The session channel: a session's VNC socket exposed on its host's address, behind a secret.

Theory of operation. The session actor runs the host's local driver, whose VNC server listens
on a Unix socket only the host's root reaches. :class:`SessionChannel` listens on the node's
IP (a port the kernel picks) for the controller's bridge. Each connection must first send the
session's channel secret (64 hex characters, :func:`new_secret`) and a newline within
:data:`PREAMBLE_TIMEOUT`; it is compared in constant time (:func:`preamble_ok`). A wrong,
short, long or late preamble closes the connection before any byte is written; a right one
connects it to the VNC socket and relays bytes both ways as they are (RFB starts then, and
the VNC server's banner is the first byte the caller receives). What this leaves out: the
bytes are not encrypted (the hosts' network must be private, as for Ray's own traffic).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets

SECRET_BYTES = 32
PREAMBLE_MAX = 2 * SECRET_BYTES + 1
"""The hex secret and its newline: a connection that sends more before one is refused."""
PREAMBLE_TIMEOUT = 5.0


def new_secret() -> str:
    """Return a fresh channel secret: 32 random bytes, hex."""
    return secrets.token_hex(SECRET_BYTES)


def preamble(secret: str) -> bytes:
    """Return what a client sends before RFB: the secret and a newline."""
    return secret.encode("ascii") + b"\n"


def preamble_ok(line: bytes, secret: str) -> bool:
    """Whether ``line`` (what came before the first newline, newline included) is the secret."""
    return hmac.compare_digest(line, preamble(secret))


class SessionChannel:
    """Listens on ``host`` and relays each authenticated connection to the Unix ``vnc_path``."""

    def __init__(self, secret: str, vnc_path: str) -> None:
        self.secret = secret
        self.vnc_path = vnc_path
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self, host: str) -> int:
        """Start listening on ``host``; return the port."""
        self._server = await asyncio.start_server(self._serve, host, 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop listening and cut every relayed connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                async with asyncio.timeout(PREAMBLE_TIMEOUT):
                    line = await reader.readuntil(b"\n")
            except (asyncio.LimitOverrunError, asyncio.IncompleteReadError, TimeoutError):
                line = b""
            if len(line) > PREAMBLE_MAX or not preamble_ok(line, self.secret):
                self.refused += 1
                return
            vnc_reader, vnc_writer = await asyncio.open_unix_connection(self.vnc_path)
            try:
                await asyncio.gather(_pipe(reader, vnc_writer), _pipe(vnc_reader, writer))
            finally:
                vnc_writer.close()
        except (ConnectionError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()
