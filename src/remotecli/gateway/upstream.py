"""Connections to upstreams: connect with a timeout, parse responses, keep idle ones for reuse.

An :class:`UpstreamConnection` is the asyncio protocol of one connection to an upstream. The
client side drives it: :meth:`UpstreamConnection.start_response` arms it for the next response
and gives it a :class:`ResponseSink` that receives interim heads, body bytes and the end; the
response head arrives on :attr:`UpstreamConnection.head` (a future). :class:`UpstreamPool`
hands out connections, reusing idle keep-alive ones, and translates connect failures into
:mod:`remotecli.exceptions` Upstream* errors at this edge, with messages that name the upstream
and the next step.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable
from typing import Protocol, cast

import httptools

from remotecli.exceptions import (
    UpstreamBadResponse,
    UpstreamClosed,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamRefused,
    UpstreamUnreachable,
)
from remotecli.http11 import Header, ResponseHead
from remotecli.routing import UpstreamAddress

MAX_IDLE_PER_UPSTREAM = 64
WRITE_HIGH_WATER = 512 * 1024


class ResponseSink(Protocol):
    """Where an upstream connection delivers a response after its head (the client side)."""

    def interim(self, head: ResponseHead) -> None: ...
    def body(self, data: bytes) -> None: ...
    def upstream_paused(self, paused: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    """One connection to an upstream, parsing one response at a time with httptools."""

    def __init__(self, address: UpstreamAddress) -> None:
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.head: asyncio.Future[ResponseHead] | None = None
        self.done: asyncio.Future[None] | None = None
        self.upgrade_rest = b""  # bytes after a 101's head: the start of the tunnel
        self.closed = False
        self.reused = False
        self._sink: ResponseSink | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list[Header] = []
        self._reason = b""
        self._got_bytes = False
        self._until_close = False
        self._held: list[bytes] | None = None  # body read before the client side took the head
        self._keep_alive = False

    # -- driven by the client side ------------------------------------------------------------

    def start_response(self, sink: ResponseSink) -> None:
        """Arm for the next response; await :attr:`head`, then :attr:`done` for the body's end."""
        loop = asyncio.get_running_loop()
        self.head = loop.create_future()
        self.done = loop.create_future()
        self._sink = sink
        self._headers = []
        self._reason = b""
        self._got_bytes = False
        self._until_close = False
        self._held = []

    def head_sent(self) -> None:
        """The client side has written the response head: deliver body bytes from now on."""
        held, self._held = self._held, None
        if held and self._sink is not None:
            for chunk in held:
                self._sink.body(chunk)

    def abort(self) -> None:
        """Drop the connection now; nobody will await this response any more."""
        self.closed = True
        for future in (self.head, self.done):
            if future is not None and not future.done():
                future.cancel()
        if self.transport is not None:
            self.transport.abort()

    def make_idle(self) -> None:
        """Forget the last response and read again (a slow client may have paused reading)."""
        self.head = None
        self.done = None
        self._sink = None
        if self.transport is not None:
            self.transport.resume_reading()

    def forget(self) -> None:
        """Drop the parser and the sink once the connection became a tunnel's."""
        self._parser = None  # type: ignore[assignment]
        self._sink = None
        self._held = None
        self.head = None
        self.done = None
        self.upgrade_rest = b""

    def body_until_close(self) -> None:
        """Tell the connection the body ends at EOF (no Content-Length, not chunked)."""
        self._until_close = True

    @property
    def reusable(self) -> bool:
        """True when the last response ended cleanly and the upstream keeps the connection."""
        return (
            not self.closed
            and self.done is not None
            and self.done.done()
            and self.done.exception() is None
            and not self._until_close
            and self._keep_alive
        )

    def write(self, data: bytes) -> None:
        """Send request bytes; flow control comes back through the sink's upstream_paused."""
        assert self.transport is not None
        self.transport.write(data)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # TCP_NODELAY: asyncio sets it

    def data_received(self, data: bytes) -> None:
        if self.head is None:
            # Bytes with no request outstanding: the upstream broke the protocol.
            self.closed = True
            assert self.transport is not None
            self.transport.close()
            return
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgrade_rest = data[exc.args[0] :]
        except httptools.HttpParserError as exc:
            self._fail(
                UpstreamBadResponse(
                    f"upstream {self.address.label} sent a malformed response ({exc}); "
                    "fix the upstream"
                )
            )
            assert self.transport is not None
            self.transport.abort()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.head is not None and not self.head.done():
            self.head.set_exception(
                UpstreamClosed(
                    f"upstream {self.address.label} closed the connection without answering; "
                    "check the upstream's logs for a crash or restart",
                    reused=self.reused,
                    got_bytes=self._got_bytes,
                )
            )
        elif self.done is not None and not self.done.done():
            if self._until_close:
                self.done.set_result(None)
            else:
                self.done.set_exception(
                    UpstreamClosed(
                        f"upstream {self.address.label} closed the connection in the middle "
                        "of its response; check the upstream's logs"
                    )
                )

    def pause_writing(self) -> None:
        if self._sink is not None:
            self._sink.upstream_paused(True)

    def resume_writing(self) -> None:
        if self._sink is not None:
            self._sink.upstream_paused(False)

    # -- httptools callbacks ------------------------------------------------------------------

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        head = ResponseHead(
            status=status,
            reason=self._reason,
            version=self._parser.get_http_version(),
            headers=self._headers,
        )
        self._headers = []
        self._reason = b""
        if 100 <= status < 200 and status != 101:
            if self._sink is not None:
                self._sink.interim(head)
            return
        if self.head is not None and not self.head.done():
            self.head.set_result(head)

    def on_body(self, body: bytes) -> None:
        if self._held is not None:
            self._held.append(body)
        elif self._sink is not None:
            self._sink.body(body)

    def on_message_complete(self) -> None:
        if self.head is not None and not self.head.done():
            return  # an interim 1xx ended; the final response follows
        self._keep_alive = self._parser.should_keep_alive()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _fail(self, exc: UpstreamError) -> None:
        self.closed = True
        for future in (self.head, self.done):
            if future is not None and not future.done():
                future.set_exception(exc)
                return


def _connect_error(address: UpstreamAddress, exc: OSError) -> UpstreamError:
    """Translate an OSError from connect into the Upstream* error the client is told about."""
    label = address.label
    if isinstance(exc, ConnectionRefusedError):
        return UpstreamRefused(
            f"upstream {label} refused the connection; check that it is running and listening there"
        )
    if isinstance(exc, FileNotFoundError):
        return UpstreamUnreachable(
            f"upstream {label} does not exist (no such socket); start the upstream or fix the route"
        )
    if isinstance(exc, socket.gaierror):
        return UpstreamUnreachable(
            f"upstream {label} cannot be resolved ({exc.strerror}); fix the host name in the route"
        )
    if exc.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        return UpstreamUnreachable(
            f"upstream {label} is unreachable ({exc.strerror}); check the network path to it"
        )
    return UpstreamUnreachable(
        f"upstream {label} could not be reached ({exc.strerror or exc}); check that it is running"
    )


class UpstreamPool:
    """Open connections to upstreams and keep idle keep-alive ones for the next request."""

    def __init__(
        self, connect_timeout: float, on_error: Callable[[UpstreamError], None] | None = None
    ) -> None:
        self._connect_timeout = connect_timeout
        self._idle: dict[UpstreamAddress, list[UpstreamConnection]] = {}
        self._on_error = on_error
        self.opened = 0  # connections opened so far: lets tests prove reuse

    async def acquire(self, address: UpstreamAddress, *, fresh: bool = False) -> UpstreamConnection:
        """Return an idle connection to ``address`` or a new one; raise an Upstream* error."""
        idle = self._idle.get(address)
        while idle and not fresh:
            connection = idle.pop()
            if not connection.closed:
                connection.reused = True
                return connection
        return await self._connect(address)

    def release(self, connection: UpstreamConnection) -> None:
        """Keep ``connection`` for reuse if its last response allows it, else close it."""
        idle = self._idle.setdefault(connection.address, [])
        if connection.reusable and len(idle) < MAX_IDLE_PER_UPSTREAM:
            connection.make_idle()
            idle.append(connection)
        elif connection.transport is not None:
            connection.closed = True
            connection.transport.close()

    def close(self) -> None:
        """Close every idle connection (at shutdown)."""
        for idle in self._idle.values():
            for connection in idle:
                if connection.transport is not None:
                    connection.transport.close()
        self._idle.clear()

    async def _connect(self, address: UpstreamAddress) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                if address.path is not None:
                    _, connection = await loop.create_unix_connection(
                        lambda: UpstreamConnection(address), address.path
                    )
                else:
                    assert address.host is not None
                    assert address.port is not None
                    _, connection = await loop.create_connection(
                        lambda: UpstreamConnection(address), address.host, address.port
                    )
        except TimeoutError as exc:
            error: UpstreamError = UpstreamConnectTimeout(
                f"upstream {address.label} did not accept the connection within "
                f"{self._connect_timeout:g} s; check that it is up and not overloaded, "
                "or raise --connect-timeout"
            )
            self._report(error)
            raise error from exc
        except OSError as exc:
            error = _connect_error(address, exc)
            self._report(error)
            raise error from exc
        self.opened += 1
        return connection

    def _report(self, error: UpstreamError) -> None:
        if self._on_error is not None:
            self._on_error(error)
