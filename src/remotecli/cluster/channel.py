"""The session channel: a session's VNC socket, terminal, loopback and kept files, by secret.

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
  read back when it ends;
- ``run`` (a headless run): nothing more is read; the channel writes the run's command's
  output as it comes, in the run frames of :mod:`remotecli.drivers.qemu_runframes` (``o``
  standard output, then one ``e`` with the end of standard error, then ``x`` and the exit
  status), and closes. One ``run`` connection per run: the output is read once, so a second
  one (or one before the run started) is closed with no byte written. A slow reader slows the
  command (the socket's buffers fill, then its pipe), as on one host;
- ``tty``: the connection is joined to the session's text terminal (the host's local driver
  names its Unix socket) and bytes relayed both ways as they are (tty records in, the
  terminal's output out); a session with no terminal closes the connection, no byte written;
- ``loopback``: one frame ``{"address": "127.0.0.1" or "::1", "port": N}`` (at most
  :data:`REQUEST_MAX` bytes); the host's local driver connects to that port on the session's
  own loopback. The answer is a frame ``{"ok": true}``, then bytes relayed both ways as they
  are, or ``{"error": "...", "kind": K}`` and the connection closed (``K`` the
  :class:`~remotecli.exceptions.UpstreamError` kind, e.g. ``refused`` when nothing listens,
  else ``driver``): how the controller relays a sign-in callback to a CLI on another host.

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
from remotecli.drivers.base import RUN_ERRORS_MAX, RunOutput
from remotecli.drivers.qemu_runframes import EXIT, STDERR, STDOUT
from remotecli.drivers.qemu_runframes import FRAME_MAX as RUN_FRAME_MAX
from remotecli.exceptions import (
    DriverError,
    RemoteCliError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamRefused,
    UpstreamUnreachable,
)

SECRET_BYTES = 32
VERBS = ("vnc", "put", "get", "run", "tty", "loopback")
PREAMBLE_MAX = 2 * SECRET_BYTES + 1 + max(len(verb) for verb in VERBS) + 1
"""The hex secret, a space, the longest verb and the newline: a longer line is refused."""
PREAMBLE_TIMEOUT = 5.0
FRAME_MAX = 8 * 1024**2
"""A frame's most bytes: the kept files' cap (4 MiB, sandbox/keep.py) in base64, and JSON."""
FRAME_TIMEOUT = 30.0
REQUEST_MAX = 4096
"""A ``loopback`` request's and answer's most bytes (a frame of an address, a port, a reason)."""
LOOPBACK_ADDRESSES = ("127.0.0.1", "::1")
"""The addresses a ``loopback`` may name: the session's own loopback, as the local driver's."""

Collect = Callable[[Sequence[str]], Awaitable[Mapping[str, bytes]]]
TtyPath = Callable[[], Awaitable[str]]
"""Returns the Unix socket of the session's text terminal; raises DriverError when it has none."""
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Loopback = Callable[[int, str], Awaitable[Streams]]
"""Connects to (port, address) on the session's own loopback; raises UpstreamError or
DriverError as :meth:`remotecli.drivers.local.LocalDriver.connect_loopback` does."""
_UPSTREAM_KINDS: dict[str, type[UpstreamError]] = {
    error.kind: error for error in (UpstreamRefused, UpstreamUnreachable, UpstreamConnectTimeout)
}


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


async def read_frame(reader: asyncio.StreamReader, *, limit: int = FRAME_MAX) -> dict[str, Any]:
    """Read one frame of at most ``limit`` bytes; raise ValueError for an oversized or
    malformed one."""
    (length,) = struct.unpack(">I", await reader.readexactly(4))
    if length > limit:
        raise ValueError(f"a channel frame of {length} bytes is over {limit}")
    message = json.loads(await reader.readexactly(length))
    if not isinstance(message, dict):
        raise ValueError("a channel frame must be a JSON object")
    return message


def run_frame(kind: bytes, payload: bytes) -> bytes:
    """Encode one run frame (kind, 4-byte big-endian length, payload), as the guest relay does."""
    if len(payload) > RUN_FRAME_MAX:
        raise ValueError(f"a run frame of {len(payload)} bytes is over {RUN_FRAME_MAX}")
    return kind + struct.pack(">I", len(payload)) + payload


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


def loopback_target(request: Mapping[str, Any]) -> tuple[str, int]:
    """Return the (address, port) a ``loopback`` request names; ValueError unless it is a port
    on the session's own loopback (:data:`LOOPBACK_ADDRESSES`, 1..65535)."""
    address, port = request.get("address"), request.get("port")
    if address not in LOOPBACK_ADDRESSES:
        raise ValueError(f"{address!r} is not a session's loopback address (127.0.0.1 or ::1)")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ValueError(f"{port!r} is not a TCP port (1..65535)")
    return str(address), port


class SessionChannel:
    """Listens on a host address; relays ``vnc`` to the session's VNC server, serves the verbs.

    ``vnc_path`` is the VNC server's address: a Unix socket's path (the host's local driver) or
    ``(host, port)`` on the host's loopback (a microVM's VNC, which then asks for the session's
    VNC password: the controller's bridge answers it). It is None until the session runs (a
    ``vnc``, ``tty``, ``loopback`` or ``get``
    before that is refused); ``collect`` reads kept files from the session's HOME for ``get``,
    ``tty`` names its text terminal's socket, ``loopback`` connects to its loopback (None: the
    verb is refused). Files a ``put`` brought wait in :meth:`take_files` for the session's start.
    For a headless run, ``run`` is its output once it started (set by the actor); a ``run``
    connection streams it.
    """

    def __init__(
        self,
        secret: str,
        vnc_path: str | tuple[str, int] | None,
        collect: Collect | None = None,
        *,
        tty: TtyPath | None = None,
        loopback: Loopback | None = None,
    ) -> None:
        self.secret = secret
        self.vnc_path = vnc_path
        self.collect = collect
        self.tty = tty
        self.loopback = loopback
        self.refused = 0
        self._files: dict[str, bytes] | None = None
        self._started = vnc_path is not None
        self.run: RunOutput | None = None
        self._run_taken = False
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
            elif verb == "run":
                await self._stream_run(writer)
            elif verb == "tty":
                await self._serve_tty(reader, writer)
            elif verb == "loopback":
                await self._serve_loopback(reader, writer)
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
        if isinstance(self.vnc_path, str):
            vnc_reader, vnc_writer = await asyncio.open_unix_connection(self.vnc_path)
        else:
            vnc_reader, vnc_writer = await asyncio.open_connection(*self.vnc_path)
        try:
            await asyncio.gather(_pipe(reader, vnc_writer), _pipe(vnc_reader, writer))
        finally:
            vnc_writer.close()

    async def _stream_run(self, writer: asyncio.StreamWriter) -> None:
        """Write the run's output as run frames, then its errors and exit status (see above)."""
        run = self.run
        if run is None or self._run_taken:
            self.refused += 1
            return
        self._run_taken = True
        while data := await run.read():
            for start in range(0, len(data), RUN_FRAME_MAX):
                writer.write(run_frame(STDOUT, data[start : start + RUN_FRAME_MAX]))
            await writer.drain()
        status = await run.wait()
        errors = run.errors().encode("utf-8", "replace")[-RUN_ERRORS_MAX:]
        if errors:
            writer.write(run_frame(STDERR, errors))
        writer.write(run_frame(EXIT, str(status).encode("ascii")))

    async def _serve_tty(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Join the connection to the session's terminal; close unwritten when it has none."""
        if self.tty is None or self.vnc_path is None:
            return
        try:
            async with asyncio.timeout(FRAME_TIMEOUT):
                terminal = await asyncio.open_unix_connection(await self.tty())
        except RemoteCliError:  # the session has no terminal (ended, or never had one)
            return
        await _join((reader, writer), terminal)

    async def _serve_loopback(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Connect to the port a frame names on the session's loopback; answer, then relay."""
        try:
            async with asyncio.timeout(FRAME_TIMEOUT):
                address, port = loopback_target(await read_frame(reader, limit=REQUEST_MAX))
                if self.loopback is None or self.vnc_path is None:
                    raise DriverError("the session has not started")
                upstream = await self.loopback(port, address)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            answer: dict[str, Any] = {"error": f"bad request: {exc}", "kind": "driver"}
        except RemoteCliError as exc:
            kind = exc.kind if isinstance(exc, UpstreamError) else "driver"
            answer = {"error": exc.message[:500], "kind": kind}  # fits REQUEST_MAX escaped
        else:
            try:
                writer.write(frame({"ok": True}))
                await writer.drain()
                await _join((reader, writer), upstream)
            finally:
                upstream[1].close()
            return
        writer.write(frame(answer))
        await writer.drain()

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
            if self.collect is None or (self.vnc_path is None and self.run is None):
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


async def _join(one: Streams, other: Streams) -> None:
    """Relay bytes both ways between two connections until both ends closed; close ``other``."""
    try:
        await asyncio.gather(_pipe(one[0], other[1]), _pipe(other[0], one[1]))
    finally:
        other[1].close()


async def open_loopback(
    host: str,
    port: int,
    secret: str,
    address: str,
    target: int,
    *,
    timeout: float,  # noqa: ASYNC109 -- bounds the connect and the host's answer together
    cert: str | None = None,
) -> Streams:
    """Ask the channel at ``host``:``port`` for a connection to ``address``:``target`` on the
    session's loopback; return it once the host said it is open (bytes then flow as they are).

    Raises what the host's driver raised, by kind: :class:`UpstreamRefused` (nothing listens),
    :class:`UpstreamUnreachable`, :class:`UpstreamConnectTimeout`, else :class:`DriverError`
    with its reason; OSError or TimeoutError when the channel cannot be reached or says
    nothing (a wrong secret looks like that: the channel writes nothing). With ``cert`` the
    connection is TLS pinning that certificate (an ``ssl.SSLError``, an OSError, when the peer
    does not hold its key).
    """
    tls = client_context(cert) if cert is not None else None
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port, ssl=tls)
        try:
            writer.write(preamble(secret, "loopback") + frame({"address": address, "port": target}))
            answer = await read_frame(reader, limit=REQUEST_MAX)
        except asyncio.IncompleteReadError as exc:
            writer.close()
            raise OSError(f"the channel at {host}:{port} closed without an answer") from exc
        except BaseException:
            writer.close()
            raise
    if answer.get("ok") is True:
        return reader, writer
    writer.close()
    reason = str(answer.get("error") or "the host gave no reason")
    raise _UPSTREAM_KINDS.get(str(answer.get("kind")), DriverError)(
        reason, address=address, port=target
    )


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
