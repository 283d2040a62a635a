"""One client connection: parse requests with httptools, forward them, relay the answers.

Theory of operation. A :class:`ClientConnection` is the asyncio protocol of one accepted
socket. httptools calls it back as bytes arrive; each complete request head becomes an
:class:`Exchange`, served one at a time by a task (:meth:`ClientConnection._serve`) that picks
the route, opens or reuses an upstream connection, sends the head and streams the body, then
relays the response head and body. Bodies are never gathered: request body bytes go straight
to the upstream transport once it exists (only what one read delivered before that is held),
response bytes go straight to the client; each direction's backpressure pauses reading on the
other side. Reading from the client is on only while a head or a body being forwarded is
expected (:meth:`ClientConnection._update_reading`), so a pipelining client cannot make the
gateway buffer more than one read.

Before routing, the Host the client asked for must be one the gateway answers for
(:class:`remotecli.hosts.HostPolicy`; 421 otherwise, WebSocket upgrades included; only the
gateway's own ``/healthz`` is answered whatever the Host). A valid WebSocket upgrade is either
handed to an in-process :class:`LocalUpgrade` or forwarded; on the upstream's 101 the
connection stops being a ClientConnection and both transports are joined by a
:class:`~remotecli.gateway.tunnel.Tunnel` (both in :mod:`remotecli.gateway.context`; the heads
sent each way are built in :mod:`remotecli.gateway.exchange`). Every failure before
a response has started is answered with the error's status and a body naming the cause (see
:func:`remotecli.http11.response_for_error`); one log line is written per request or tunnel
when it ends.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import time
from collections.abc import Coroutine
from typing import cast

import httptools

from remotecli import http11
from remotecli.exceptions import (
    BadRequest,
    LocalProtocolError,
    NotFound,
    RemoteCliError,
    RequestTimeout,
    ServiceUnavailable,
    UpstreamClosed,
    UpstreamError,
    UpstreamHeadTimeout,
)
from remotecli.forwarding import forward
from remotecli.gateway.context import (
    ClientInfo,
    GatewayContext,
    LocalUpgrade,
    hand_over,
    start_tunnel,
)
from remotecli.gateway.exchange import Exchange, client_response_head, upstream_request_head
from remotecli.gateway.upstream import WRITE_HIGH_WATER, UpstreamConnection
from remotecli.http11 import Framing, RequestHead, ResponseHead
from remotecli.logs import get_logger
from remotecli.routing import UpstreamAddress
from remotecli.upgrade import check_websocket_request, is_switching, wants_websocket

log = get_logger("gateway")

HEALTHZ_BODY = b'{"status":"ok"}'


class ClientConnection(asyncio.Protocol):
    """The protocol of one accepted client connection (see the module's theory of operation)."""

    def __init__(self, context: GatewayContext) -> None:
        self._ctx = context
        self._config = context.config
        self.transport: asyncio.Transport | None = None
        self._peer = "unknown"
        self._parser: httptools.HttpRequestParser | None = None
        self._url = b""
        self._headers: list[http11.Header] = []
        self._head_chunks: list[bytes] = []
        self._head_size = 0
        self._parsing: Exchange | None = None
        self._queue: collections.deque[Exchange] = collections.deque()
        self._active: Exchange | None = None
        self._task: asyncio.Task[None] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._error: RemoteCliError | None = None
        self._reading = True
        self._upstream_paused = False
        self._client_paused = False
        self._close_after = False
        self._body_error: RemoteCliError | None = None  # the body in flight broke (bad chunk)
        self._detached = False

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
        if self._parsing is None or self._parsing.request_done:
            self._head_chunks.append(data)
            self._head_size += len(data)
        error: RemoteCliError | None = None
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._upgrade_received(data, exc.args[0])
            return
        except httptools.HttpParserCallbackError:
            error = self._error or BadRequest("request could not be read; send valid HTTP/1.1")
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
        self._close_after = True
        active = self._active
        if active is not None and active is self._parsing and not active.request_done:
            # The body can never complete: the upstream would wait for it until its timeout.
            self._protocol_failed(
                BadRequest("the client closed its side before the request body was complete")
            )
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._detached:
            return
        self._detach()
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        self._client_paused = True
        upstream = self._active.upstream if self._active is not None else None
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        self._client_paused = False
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
            self._error = exc
            self._parsing = Exchange(head, http11.BodyFraming(Framing.NONE), False)
            raise
        exchange = Exchange(head, framing, websocket)
        exchange.keep_alive = self._parser.should_keep_alive()
        exchange.raw_chunks = self._head_chunks
        self._head_chunks = []
        self._head_size = 0
        self._parsing = exchange
        if not websocket:  # an upgrade starts once its head's end is known (_upgrade_received)
            self._queue.append(exchange)
            self._start_next()
        self._update_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self._parsing
        assert exchange is not None
        exchange.bytes_up += len(body)
        upstream = exchange.upstream
        if upstream is not None and exchange is self._active and not upstream.closed:
            upstream.write(
                http11.encode_chunk(body) if exchange.framing.kind is Framing.CHUNKED else body
            )
        else:
            exchange.pending.append(body)

    def on_message_complete(self) -> None:
        exchange = self._parsing
        assert exchange is not None
        exchange.request_done = True
        upstream = exchange.upstream
        if (
            exchange.framing.kind is Framing.CHUNKED
            and upstream is not None
            and exchange is self._active
            and not upstream.closed
        ):
            upstream.write(http11.LAST_CHUNK)
        self._update_reading()

    # -- the response sink used by UpstreamConnection -----------------------------------------

    def interim(self, head: ResponseHead) -> None:
        """Relay a 1xx interim response (100 Continue) to the client."""
        assert self.transport is not None
        head.headers = http11.end_to_end(head.headers)
        self.transport.write(http11.serialize_response(head))

    def body(self, data: bytes) -> None:
        """Relay response body bytes to the client, chunked again when the response is."""
        exchange = self._active
        assert exchange is not None
        assert self.transport is not None
        exchange.bytes_down += len(data)
        self.transport.write(http11.encode_chunk(data) if exchange.chunked_out else data)

    def upstream_paused(self, paused: bool) -> None:
        """The upstream's write buffer is full (or drained): stop (or resume) reading the body."""
        self._upstream_paused = paused
        self._update_reading()

    # -- serving exchanges --------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Close now if idle, else after the exchange in flight (the gateway is shutting down)."""
        self._close_after = True
        if self._active is None and not self._queue and self.transport is not None:
            self.transport.close()

    def _start_next(self) -> None:
        if self._active is not None or not self._queue:
            return
        exchange = self._queue.popleft()
        self._active = exchange
        self._task = asyncio.get_running_loop().create_task(self._run(exchange))

    async def _run(self, exchange: Exchange) -> None:
        try:
            await self._serve(exchange)
        except RemoteCliError as exc:
            self._answer_error(exchange, exc)
        except asyncio.CancelledError:
            if self._body_error is not None:
                self._answer_error(exchange, self._body_error)
            else:
                exchange.ended = "client_closed"
                if exchange.upstream is not None:
                    exchange.upstream.abort()
        except Exception as exc:  # a bug of ours: answer 500 and log it, never a silent close
            log.exception("request failed", path=exchange.head.path)
            self._answer_error(
                exchange,
                LocalProtocolError(
                    f"the gateway failed on this request ({type(exc).__name__}); "
                    "retry, and report it with the request id if it persists"
                ),
            )
        if not self._detached or exchange.ended == "client_closed":
            self._finish(exchange)

    async def _serve(self, exchange: Exchange) -> None:
        head = exchange.head
        assert self.transport is not None
        if head.path == "/healthz" and head.method in ("GET", "HEAD") and not exchange.websocket:
            exchange.status = 200
            exchange.upstream_label = "gateway"
            # The JSON body of the controller's own /healthz, which this one stands in front of.
            body = b"" if head.method == "HEAD" else HEALTHZ_BODY
            self._close_after = self._closing(exchange)
            health = http11.simple_response(
                200, body, content_type=b"application/json", close=self._close_after
            )
            self.transport.write(health)
            return
        forwarding = forward(
            head.headers,
            peer=self._peer,
            scheme=self._ctx.scheme,
            port=self._ctx.port,
            trusted=self._ctx.trusted,
        )
        exchange.request_id = forwarding.request_id
        if self._ctx.hosts is not None:
            # Before routing, upgrades included: a rebound name (DNS rebinding) gets nothing.
            self._ctx.hosts.check(forwarding.host)
        if exchange.websocket:
            for local in self._ctx.local_upgrades:
                if local.pattern.fullmatch(head.path):
                    client = ClientInfo(
                        forwarding.client_address,
                        forwarding.scheme,
                        forwarding.host,
                        forwarding.request_id,
                    )
                    self._hand_over(exchange, local, client)
                    return
        route = self._ctx.router.match(head.path)
        if route is None:
            prefixes = ", ".join(r.prefix for r in self._ctx.router.routes) or "nothing"
            raise NotFound(
                f"no route for {head.path}; this gateway routes {prefixes}; "
                "check the URL or add --route PREFIX=UPSTREAM"
            )
        address = self._ctx.router.address(route)
        exchange.upstream_label = address.label
        raw_head = upstream_request_head(exchange, forwarding, address, self._config.host_rewrite)
        upstream, response = await self._send_request(exchange, address, raw_head)
        exchange.status = response.status
        if exchange.websocket and is_switching(response):
            assert self.transport is not None
            self._detach()
            start_tunnel(self._ctx, self.transport, upstream, exchange, response, self._peer)
            self._active = None
            self._task = None
            return
        await self._relay_response(exchange, upstream, response)

    async def _send_request(
        self, exchange: Exchange, address: UpstreamAddress, raw_head: bytes
    ) -> tuple[UpstreamConnection, ResponseHead]:
        for attempt in (0, 1):
            upstream = await self._ctx.pool.acquire(address, fresh=attempt > 0)
            exchange.upstream = upstream
            self._upstream_paused = False
            if self._client_paused and upstream.transport is not None:
                upstream.transport.pause_reading()  # the client is still not reading
            upstream.start_response(self)
            upstream.write(raw_head)
            chunked = exchange.framing.kind is Framing.CHUNKED
            for chunk in exchange.pending:
                upstream.write(http11.encode_chunk(chunk) if chunked else chunk)
            if chunked and exchange.request_done:
                upstream.write(http11.LAST_CHUNK)
            retry_safe = not exchange.pending and exchange.framing.kind is Framing.NONE
            exchange.pending = []
            self._update_reading()
            head = upstream.head
            assert head is not None
            # A timer failing the future costs less than asyncio.timeout() on this hot path.
            timer = asyncio.get_running_loop().call_later(
                self._config.response_head_timeout, _time_out, head
            )
            try:
                return upstream, await head
            except UpstreamClosed as exc:
                # A pooled connection the upstream had just closed: try once on a fresh one.
                if attempt == 0 and upstream.reused and retry_safe and not exc.data["got_bytes"]:
                    continue
                raise
            except TimeoutError as exc:
                upstream.abort()
                raise UpstreamHeadTimeout(
                    f"upstream {address.label} did not answer within "
                    f"{self._config.response_head_timeout:g} s; check the upstream's health "
                    "or raise --response-timeout"
                ) from exc
            finally:
                timer.cancel()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _relay_response(
        self, exchange: Exchange, upstream: UpstreamConnection, response: ResponseHead
    ) -> None:
        assert self.transport is not None
        head, until_close, close = client_response_head(
            exchange, response, close=self._closing(exchange) or exchange.websocket
        )
        if until_close:
            upstream.body_until_close()
        if close:
            self._close_after = True
        exchange.responded = True
        self.transport.write(http11.serialize_response(head))
        upstream.head_sent()
        assert upstream.done is not None
        if exchange.head.method != "HEAD":
            await upstream.done
        if exchange.chunked_out:
            self.transport.write(http11.LAST_CHUNK)
        if exchange.request_done and exchange.head.method != "HEAD":
            self._ctx.pool.release(upstream)
        else:
            upstream.abort()  # a HEAD's body framing, or a request cut short: not reusable
            self._close_after = True

    def _closing(self, exchange: Exchange) -> bool:
        return self._close_after or self._ctx.closing or not exchange.keep_alive

    def _answer_error(self, exchange: Exchange, exc: RemoteCliError) -> None:
        exchange.ended = exc.kind
        if isinstance(exc, UpstreamError):
            self._ctx.metrics.upstream_errors.labels(exc.kind).inc()
        if exchange.upstream is not None:
            exchange.upstream.abort()
        self._close_after = True
        if self.transport is None or self.transport.is_closing():
            return
        if exchange.responded:
            self.transport.abort()  # mid-body: the client must see the response did not finish
            return
        exchange.status = exc.status
        self.transport.write(http11.response_for_error(exc))
        self.transport.close()

    def _finish(self, exchange: Exchange) -> None:
        ctx = self._ctx
        ctx.metrics.count_request(exchange.status)
        ctx.metrics.add_bytes(exchange.bytes_up, exchange.bytes_down)
        self._log(exchange)
        self._active = None
        self._task = None
        ctx.changed.set()
        if self._detached or self.transport is None:
            return
        if self._close_after or ctx.closing:
            self.transport.close()
            return
        if self._queue:
            self._start_next()
        else:
            self._arm_head_timer()
        self._update_reading()

    def _log(self, exchange: Exchange, **extra: object) -> None:
        log.info(
            "request",
            client=self._peer,
            method=exchange.head.method,
            path=exchange.head.path,  # never the query: it may carry a ticket
            upstream=exchange.upstream_label,
            status=exchange.status,
            bytes_up=exchange.bytes_up,
            bytes_down=exchange.bytes_down,
            duration_ms=round((time.monotonic() - exchange.started) * 1000, 1),
            ended=exchange.ended,
            request_id=exchange.request_id,
            **extra,
        )

    # -- upgrades -----------------------------------------------------------------------------

    def _upgrade_received(self, data: bytes, offset: int) -> None:
        exchange = self._parsing
        assert exchange is not None
        assert self.transport is not None
        if not exchange.websocket:
            # Another protocol (h2c): ignore the offer and keep reading HTTP/1.1.
            self._parser = httptools.HttpRequestParser(self)
            if data[offset:]:
                self.data_received(data[offset:])
            return
        self._parser = None  # no more HTTP on this connection
        raw = b"".join(exchange.raw_chunks)
        exchange.raw_chunks = [raw[: len(raw) - len(data) + offset]]
        exchange.early = data[offset:]
        self._queue.append(exchange)
        self._start_next()
        self._update_reading()

    def _hand_over(self, exchange: Exchange, local: LocalUpgrade, client: ClientInfo) -> None:
        transport = self.transport
        assert transport is not None
        protocol = local.factory(client)
        exchange.status = 101
        exchange.ended = "local_upgrade"
        exchange.upstream_label = "local"
        self._detach()
        hand_over(self._ctx, transport, protocol, exchange.raw_chunks[0] + exchange.early)
        self._finish(exchange)

    # -- bookkeeping --------------------------------------------------------------------------

    def _detach(self) -> None:
        """Stop being this transport's protocol's owner: no more timers, no more accounting."""
        self._detached = True
        self._cancel_head_timer()
        self._parser = None
        if self in self._ctx.connections:
            self._ctx.connections.discard(self)
            self._ctx.metrics.connections_open.dec()
            self._ctx.changed.set()

    def _update_reading(self) -> None:
        """Read from the client only while a head, or a body being forwarded, is expected."""
        if self.transport is None or self._detached:
            return
        parsing = self._parsing
        if self._parser is None:
            want = False
        elif parsing is None or parsing.request_done:
            want = self._active is None and not self._queue
        else:
            want = (
                parsing is self._active
                and parsing.upstream is not None
                and not self._upstream_paused
            )
        if want != self._reading:
            self._reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _reject(self, exc: RemoteCliError) -> None:
        assert self.transport is not None
        self._ctx.metrics.count_request(exc.status)
        log.info("rejected", client=self._peer, status=exc.status, ended=exc.kind)
        self.transport.write(http11.response_for_error(exc))
        self.transport.close()

    def _protocol_failed(self, exc: RemoteCliError) -> None:
        self._parser = None
        if self._active is not None:
            self._close_after = True  # answer the request in flight, then close
            active = self._active
            if active is self._parsing and not active.request_done and self._task is not None:
                # Its own body broke: the upstream would wait forever for the rest.
                self._body_error = exc
                coro = cast(Coroutine[object, object, None], self._task.get_coro())
                self._task.cancel()
                if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                    # Cancelled before its first step, _run never runs its handler: do it here.
                    self._answer_error(active, exc)
                    self._finish(active)
            return
        exchange = self._parsing or Exchange(
            RequestHead("-", "-"), http11.BodyFraming(Framing.NONE), False
        )
        exchange.status = exc.status
        exchange.ended = exc.kind
        assert self.transport is not None
        self.transport.write(http11.response_for_error(exc))
        self.transport.close()
        self._ctx.metrics.count_request(exc.status)
        self._log(exchange)

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
        if self.transport is None or self._detached:
            return
        if self._head_size == 0:
            self.transport.close()  # an idle keep-alive connection: nothing to answer
            return
        self._protocol_failed(
            RequestTimeout(
                f"request head did not arrive within {self._config.handshake_timeout:g} s; "
                "send the whole head at once, or raise --handshake-timeout"
            )
        )


def _time_out(future: asyncio.Future[ResponseHead]) -> None:
    """Fail ``future`` with TimeoutError unless it is already done (a response head timer)."""
    if not future.done():
        future.set_exception(TimeoutError())
