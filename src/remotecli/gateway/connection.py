"""One client connection: parse request heads with httptools, queue them, serve them in order.

Theory of operation. A :class:`ClientConnection` is the asyncio protocol of one accepted
socket. httptools calls it back as bytes arrive; each complete request head becomes an
:class:`~remotecli.gateway.exchange.Exchange` (one request's cycle: routing, upstream, relay,
errors, its log line), appended to the pipeline queue and started when the one before it has
ended. The connection owns what outlives one request: the parser, the queue, the head timer
(slowloris guard and keep-alive idle time), reading from the client, and its lifecycle
(:mod:`remotecli.gateway.lifecycle`: ``OPEN``, ``UPGRADING``, ``CLOSING``, ``SWITCHED``,
``CLOSED``). Request body bytes are passed to the exchange being parsed, which forwards them
once its upstream is connected (only what one read delivered before that is held). Reading
from the client is on only while a head, or a body being forwarded, is expected
(:meth:`ClientConnection.update_reading`), so a pipelining client cannot make the gateway
buffer more than one read; each direction's backpressure pauses reading on the other side.

Before routing, the Host the client asked for must be one the gateway answers for (421
otherwise; see the exchange). A valid WebSocket upgrade ends HTTP on the connection
(``UPGRADING``): its exchange either hands the transport to an in-process protocol or starts a
tunnel on the upstream's 101 (``SWITCHED``: the connection lets go of the transport and stops
counting it), or it is answered and the connection closes. A request this side cannot read
(malformed, too large, too slow) is answered here with the error's status and a body naming the
cause (:func:`remotecli.http11.response_for_error`), or, when an exchange is in flight, ends
that exchange (its body broke) and the connection closes after it.
"""

from __future__ import annotations

import asyncio
import collections
from typing import cast

import httptools

from remotecli import http11
from remotecli.exceptions import BadRequest, RemoteCliError, RequestTimeout, ServiceUnavailable
from remotecli.gateway.context import GatewayContext
from remotecli.gateway.exchange import Exchange
from remotecli.gateway.lifecycle import (
    ConnectionEvent,
    ConnectionState,
    RequestState,
    connection_lifecycle,
)
from remotecli.gateway.upstream import WRITE_HIGH_WATER
from remotecli.http11 import Framing, RequestHead
from remotecli.logs import get_logger
from remotecli.upgrade import check_websocket_request, wants_websocket

log = get_logger("gateway")

_DONE_WITH_TRANSPORT = (ConnectionState.SWITCHED, ConnectionState.CLOSED)


class ClientConnection(asyncio.Protocol):
    """The protocol of one accepted client connection (see the module's theory of operation)."""

    def __init__(self, context: GatewayContext) -> None:
        self._ctx = context
        self._config = context.config
        self.transport: asyncio.Transport | None = None
        self.lifecycle = connection_lifecycle()
        self.client_paused = False  # flow control: the client's write buffer is past its mark
        self._peer = "unknown"
        self._parser: httptools.HttpRequestParser | None = None
        self._url = b""
        self._headers: list[http11.Header] = []
        self._head_chunks: list[bytes] = []
        self._head_size = 0
        self._head_error: RemoteCliError | None = None  # carried out of a parser callback
        self._parsing: Exchange | None = None
        self._queue: collections.deque[Exchange] = collections.deque()
        self._active: Exchange | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        ctx = self._ctx
        ctx.connections.add(self)
        ctx.metrics.connections_open.inc()
        if ctx.closing or ctx.open_count > self._config.max_connections:
            reason = (
                "the gateway is shutting down; retry on another instance or in a moment"
                if ctx.closing
                else f"the gateway is at its limit of {self._config.max_connections} "
                "connections; retry in a moment or raise --max-connections"
            )
            self._reject(ServiceUnavailable(reason))
            return
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)  # TCP_NODELAY: asyncio sets it
        self._parser = httptools.HttpRequestParser(self)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._parser is None:
            return
        parsing = self._parsing
        if parsing is None or parsing.request.state is not RequestState.BODY:
            self._head_chunks.append(data)
            self._head_size += len(data)
        error: RemoteCliError | None = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_received(data, exc.args[0])
            return
        except httptools.HttpParserCallbackError:
            error = self._head_error or BadRequest("request could not be read; send valid HTTP/1.1")
        except httptools.HttpParserError as exc:
            error = BadRequest(f"malformed request ({exc}); send valid HTTP/1.1")
        if error is None and self._head_chunks and self._head_size > 0:
            try:
                http11.check_head_size(self._head_size, self._config.max_header_bytes)
            except RemoteCliError as exc:
                error = exc
        if error is not None:
            self._protocol_failed(error)

    def eof_received(self) -> bool:
        # The client finished sending; finish what is in flight, then close.
        if self._active is None and not self._queue:
            return False
        self.must_close()
        active = self._active
        if (
            active is not None
            and active is self._parsing
            and active.request.state is RequestState.BODY
        ):
            # The body can never complete: the upstream would wait for it until its timeout.
            self._protocol_failed(
                BadRequest("the client closed its side before the request body was complete")
            )
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lifecycle.state is ConnectionState.SWITCHED:
            return
        self.lifecycle.handle(ConnectionEvent.CLOSE)
        self._release()
        if self._active is not None:
            self._active.cancel()
        self._forget()

    def pause_writing(self) -> None:
        self.client_paused = True
        upstream = self._active.upstream if self._active is not None else None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client_paused = False
        upstream = self._active.upstream if self._active is not None else None
        if upstream is not None and upstream.transport is not None and not upstream.closed:
            upstream.transport.resume_reading()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._parsing = None
        self._url = b""
        self._headers = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self._parser is not None
        self._cancel_head_timer()
        head = RequestHead(
            method=self._parser.get_method().decode("ascii"),
            target=self._url.decode("latin-1"),
            version=self._parser.get_http_version(),
            headers=self._headers,
        )
        size = len(self._url) + len(head.method) + 12
        size += sum(len(name) + len(value) + 4 for name, value in head.headers)
        try:
            http11.check_head_size(size, self._config.max_header_bytes)
            http11.check_request_head(head)
            websocket = wants_websocket(head)
            if websocket:
                check_websocket_request(head)
            framing = http11.request_framing(head.headers)
        except RemoteCliError as exc:
            self._head_error = exc
            self._parsing = self._exchange(head, http11.BodyFraming(Framing.NONE), False)
            raise
        exchange = self._exchange(head, framing, websocket)
        exchange.keep_alive = self._parser.should_keep_alive()
        exchange.raw_chunks = self._head_chunks
        self._head_chunks = []
        self._head_size = 0
        self._parsing = exchange
        if not websocket:  # an upgrade starts once its head's end is known (_upgrade_received)
            self._queue.append(exchange)
            self._start_next()
        self.update_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        assert exchange is not None
        exchange.body_received(body)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        assert exchange is not None
        exchange.request_ended()
        self.update_reading()

    # -- what an exchange needs of its connection (exchange.ClientSide) -----------------------

    def closing(self) -> bool:
        """True when the connection closes after the exchange in flight."""
        return self.lifecycle.state is ConnectionState.CLOSING or self._ctx.closing

    def must_close(self) -> None:
        """Close once the exchange in flight has ended; serve nothing queued."""
        self.lifecycle.handle(ConnectionEvent.MUST_CLOSE)

    def close(self, *, abort: bool = False) -> None:
        """Close the client transport now (flushing what is buffered, unless ``abort``)."""
        if self.lifecycle.state is not ConnectionState.CLOSED:
            self.lifecycle.handle(ConnectionEvent.CLOSE)
        assert self.transport is not None
        if abort:
            self.transport.abort()
        else:
            self.transport.close()

    def switch(self) -> None:
        """Let go of the transport: a tunnel or an in-process protocol owns it from now on."""
        self.lifecycle.handle(ConnectionEvent.SWITCH)
        self._release()
        self._active = None
        self._forget()

    def exchange_ended(self, exchange: Exchange) -> None:
        """The exchange in flight has ended: close, or serve the next one, or wait for one."""
        if exchange is self._active:
            self._active = None
        self._ctx.changed.set()
        if self.lifecycle.state in _DONE_WITH_TRANSPORT:
            return
        if self.closing():
            self.close()
            return
        if self._queue:
            self._start_next()
        else:
            self._arm_head_timer()
        self.update_reading()

    def update_reading(self) -> None:
        """Read from the client only while a head, or a body being forwarded, is expected."""
        transport = self.transport
        if transport is None or self.lifecycle.state in _DONE_WITH_TRANSPORT:
            return
        parsing = self._parsing
        if self._parser is None:
            want = False
        elif parsing is None or parsing.request.state is not RequestState.BODY:
            want = self._active is None and not self._queue
        else:
            want = (
                parsing is self._active
                and parsing.upstream is not None
                and not parsing.upstream_full
            )
        if want != transport.is_reading():
            if want:
                transport.resume_reading()
            else:
                transport.pause_reading()

    # -- serving exchanges --------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Close now if idle, else after the exchange in flight (the gateway is shutting down)."""
        if self.lifecycle.state in _DONE_WITH_TRANSPORT:
            return
        if self._active is None and not self._queue and self.transport is not None:
            self.close()
        else:
            self.must_close()

    def _exchange(
        self, head: RequestHead, framing: http11.BodyFraming, websocket: bool
    ) -> Exchange:
        assert self.transport is not None
        return Exchange(self, self._ctx, self.transport, self._peer, head, framing, websocket)

    def _start_next(self) -> None:
        if self._active is not None or not self._queue:
            return
        exchange = self._queue.popleft()
        self._active = exchange
        exchange.start()

    def _upgrade_received(self, data: bytes, offset: int) -> None:
        exchange = self._parsing
        assert exchange is not None
        if not exchange.websocket:
            # Another protocol (h2c): ignore the offer and keep reading HTTP/1.1.
            self._parser = httptools.HttpRequestParser(self)
            if data[offset:]:
                self.data_received(data[offset:])
            return
        self.lifecycle.handle(ConnectionEvent.UPGRADE_HEAD)
        self._parser = None  # no more HTTP on this connection
        raw = b"".join(exchange.raw_chunks)
        exchange.raw_chunks = [raw[: len(raw) - len(data) + offset]]
        exchange.early = data[offset:]
        self._queue.append(exchange)
        self._start_next()
        self.update_reading()

    # -- bookkeeping --------------------------------------------------------------------------

    def _release(self) -> None:
        """Stop owning the transport: no more timers, no parser, no longer counted as open."""
        self._cancel_head_timer()
        self._parser = None
        ctx = self._ctx
        if self in ctx.connections:
            ctx.connections.discard(self)
            ctx.metrics.connections_open.dec()
            ctx.changed.set()

    def _forget(self) -> None:
        """Drop the exchanges parsed or queued: each refers back to this connection, and a
        cycle would keep an idle tunnel's connection alive until the garbage collector runs."""
        self._parsing = None
        self._queue.clear()

    def _reject(self, exc: RemoteCliError) -> None:
        assert self.transport is not None
        self._ctx.metrics.count_request(exc.status)
        log.info("rejected", client=self._peer, status=exc.status, ended=exc.kind)
        self.transport.write(http11.response_for_error(exc))
        self.close()

    def _protocol_failed(self, exc: RemoteCliError) -> None:
        """The client sent what cannot be read: end the exchange it breaks, or answer here."""
        self._parser = None
        active = self._active
        if active is not None:
            self.must_close()  # answer the request in flight, then close
            if active is self._parsing and active.request.state is RequestState.BODY:
                # Its own body broke: the upstream would wait forever for the rest.
                active.break_request(exc)
            return
        exchange = self._parsing or self._exchange(
            RequestHead("-", "-"), http11.BodyFraming(Framing.NONE), False
        )
        exchange.status = exc.status
        exchange.ended = exc.kind
        assert self.transport is not None
        self.transport.write(http11.response_for_error(exc))
        self.close()
        self._ctx.metrics.count_request(exc.status)
        exchange.log()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        loop = asyncio.get_running_loop()
        self._head_timer = loop.call_later(self._config.handshake_timeout, self._head_timeout)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport is None or self.lifecycle.state in _DONE_WITH_TRANSPORT:
            return
        if self._head_size == 0:
            self.close()  # an idle keep-alive connection: nothing to answer
            return
        self._protocol_failed(
            RequestTimeout(
                f"request head did not arrive within {self._config.handshake_timeout:g} s; "
                "send the whole head at once, or raise --handshake-timeout"
            )
        )
