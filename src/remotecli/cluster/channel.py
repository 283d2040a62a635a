"""The session channel: a session's VNC socket and kept files on its host's address, by secret.

Theory of operation. The session actor runs the host's local driver, whose VNC server listens
on a Unix socket only the host's root reaches. :class:`SessionChannel` listens on the node's
IP (a port the kernel picks) for the controller. Each connection must first send one line,
within :data:`PREAMBLE_TIMEOUT`: the session's channel secret (64 hex characters,
:func:`new_secret`), a space, a verb, a newline. The secret is compared in constant time
(:func:`preamble_ok`); a wrong, short, long or late line, or an unknown verb, closes the
connection before any byte is written. The verbs:

- ``vnc``: the connection is joined to the VNC socket and bytes relayed both ways as they are
  (RFB starts then; the VNC server's banner is the first byte the caller receives);
- ``put``: one frame (:func:`frame`: 4-byte big-endian length, JSON) of kept files, ``{"files":
  {path relative to HOME: base64}}``, taken before the session starts, once; the answer is a
  frame ``{"ok": true}`` or ``{"error": "..."}``. This is how a kept sign-in reaches the host:
  over the channel, never as a Ray argument (Ray keeps actor specs to restart them);
- ``get``: one frame ``{"paths": [...]}`` (the provider's kept paths), answered by a frame of the
  files found in the session's HOME, ``{"files": {...}}``: the sign-in made in the session,
  read back when it ends.

With TLS (:mod:`remotecli.cluster.channel_tls`, on by default: ``cluster_channel_tls``) the
channel listens with the session's own certificate and every client pins it: the TLS handshake
comes first, and the secret line is the first byte inside it. A client that does not speak TLS,
or pins another certificate, gets no byte. Without TLS the bytes are not encrypted (the hosts'
network must then be private, as for Ray's own traffic).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import secrets
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from remotecli.cluster.channel_tls import client_context

SECRET_BYTES = 32
VERBS = ("vnc", "put", "get")
PREAMBLE_MAX = 2 * SECRET_BYTES + 1 + max(len(verb) for verb in VERBS) + 1
"""The hex secret, a space, the longest verb and the newline: a longer line is refused."""
PREAMBLE_TIMEOUT = 5.0
FRAME_MAX = 8 * 1024**2
"""A frame's most bytes: the kept files' cap (4 MiB, sandbox/keep.py) in base64, and JSON."""
FRAME_TIMEOUT = 30.0

Collect = Callable[[Sequence[str]], Awaitable[Mapping[str, bytes]]]


def new_secret() -> str:
    """Return a fresh channel secret: 32 random bytes, hex."""
    return secrets.token_hex(SECRET_BYTES)


def preamble(secret: str, verb: str = "vnc") -> bytes:
    """Return the line a client sends first: the secret, a space, the verb, a newline."""
    return f"{secret} {verb}\n".encode("ascii")


def preamble_ok(line: bytes, secret: str) -> str | None:
    """Return the verb of ``line`` (newline included) when its secret is right, else None."""
    head, _, verb = line.rstrip(b"\n").partition(b" ")
    right = hmac.compare_digest(head, secret.encode("ascii"))
    name = verb.decode("ascii", "replace")
    return name if right and line.endswith(b"\n") and name in VERBS else None


def frame(message: Mapping[str, Any]) -> bytes:
    """Encode one frame: 4-byte big-endian length, then ``message`` as JSON."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > FRAME_MAX:
        raise ValueError(f"a channel frame of {len(body)} bytes is over {FRAME_MAX}")
    return struct.pack(">I", len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    """Read one frame; raise ValueError for an oversized or malformed one."""
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    if length > FRAME_MAX:
        raise ValueError(f"a channel frame of {length} bytes is over {FRAME_MAX}")
    message = json.loads(await reader.readexactly(length))
    if not isinstance(message, dict):
        raise ValueError("a channel frame must be a JSON object")
    return message


def encode_files(files: Mapping[str, bytes]) -> dict[str, str]:
    """Files (path → bytes) as JSON: path → base64."""
    return {path: base64.b64encode(data).decode("ascii") for path, data in files.items()}


def decode_files(value: object) -> dict[str, bytes]:
    """The inverse of :func:`encode_files`; ValueError for anything else."""
    if not isinstance(value, dict) or not all(
        isinstance(path, str) and isinstance(data, str) for path, data in value.items()
    ):
        raise ValueError("files must map paths to base64 strings")
    return {path: base64.b64decode(data, validate=True) for path, data in value.items()}


class SessionChannel:
    """Listens on a host address; relays ``vnc`` to the Unix ``vnc_path``, serves ``put``/``get``.

    ``vnc_path`` is None until the session runs (a ``vnc`` before that is closed); ``collect``
    reads kept files from the session's HOME for ``get``. Files a ``put`` brought wait in
    :meth:`take_files` for the session's start.
    """

    def __init__(self, secret: str, vnc_path: str | None, collect: Collect | None = None) -> None:
        self.secret = secret
        self.vnc_path = vnc_path
        self.collect = collect
        self.refused = 0
        self._files: dict[str, bytes] | None = None
        self._started = vnc_path is not None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self, host: str, *, tls: ssl.SSLContext | None = None) -> int:
        """Start listening on ``host`` (with TLS when ``tls`` is given); return the port."""
        self._server = await asyncio.start_server(
            self._serve,
            host,
            0,
            ssl=tls,
            ssl_handshake_timeout=PREAMBLE_TIMEOUT if tls is not None else None,
        )
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def take_files(self) -> dict[str, bytes]:
        """Return the files a ``put`` brought (none: empty) and refuse any later ``put``."""
        self._started = True
        files, self._files = self._files or {}, None
        return files

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
            verb = preamble_ok(line, self.secret) if len(line) <= PREAMBLE_MAX else None
            if verb is None:
                self.refused += 1
                return
            if verb == "vnc":
                await self._relay(reader, writer)
            else:
                async with asyncio.timeout(FRAME_TIMEOUT):
                    writer.write(frame(await self._answer(verb, reader)))
                    await writer.drain()
        except (ConnectionError, OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.vnc_path is None:
            return
        vnc_reader, vnc_writer = await asyncio.open_unix_connection(self.vnc_path)
        try:
            await asyncio.gather(_pipe(reader, vnc_writer), _pipe(vnc_reader, writer))
        finally:
            vnc_writer.close()

    async def _answer(self, verb: str, reader: asyncio.StreamReader) -> dict[str, Any]:
        try:
            request = await read_frame(reader)
            if verb == "put":
                if self._started or self._files is not None:
                    return {"error": "kept files are taken once, before the session starts"}
                self._files = decode_files(request.get("files"))
                return {"ok": True}
            paths = request.get("paths")
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                return {"error": "paths must be a list of strings"}
            if self.collect is None or self.vnc_path is None:
                return {"error": "the session has not started"}
            return {"files": encode_files(await self.collect(paths))}
        except ValueError as exc:  # json.JSONDecodeError and binascii.Error are ValueErrors
            return {"error": f"bad request: {exc}"}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
            else:  # TLS has no half-close: the peer learns of the end by the close
                writer.close()


def request(
    host: str,
    port: int,
    secret: str,
    verb: str,
    message: Mapping[str, Any],
    *,
    timeout: float,
    cert: str | None = None,
) -> dict[str, Any]:
    """Send one ``put`` or ``get`` to a channel and return its answer (blocking, for a thread).

    ``cert``: the channel's certificate (PEM), pinned; None for a plain TCP channel. Raises
    OSError when the channel cannot be reached, its certificate is not ``cert``
    (:class:`ssl.SSLCertVerificationError`, before the secret is sent) or it closes without an
    answer (a wrong secret looks like that: the channel writes nothing), ValueError for a
    malformed answer.
    """
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
        if cert is not None:
            sock = stack.enter_context(client_context(cert).wrap_socket(sock))
        sock.sendall(preamble(secret, verb) + frame(message))
        if cert is None:  # TLS has no half-close; the channel reads one frame, then answers
            sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := sock.recv(65536):
            received += chunk
            if len(received) > FRAME_MAX + 4:
                raise ValueError("the channel's answer is over the frame limit")
    if len(received) < 4:
        raise OSError(f"the channel at {host}:{port} closed without an answer")
    (length,) = struct.unpack(">I", received[:4])
    if length != len(received) - 4:
        raise ValueError("the channel's answer is cut short")
    answer = json.loads(received[4:])
    if not isinstance(answer, dict):
        raise ValueError("the channel's answer is not a JSON object")
    return answer
