"""One request on a client connection: its cycle from head to response, and the heads sent on.

Theory of operation. The connection (:class:`~remotecli.gateway.connection.ClientConnection`)
parses heads and makes one :class:`Exchange` per request; the exchanges run one at a time, each
in its own task (:meth:`Exchange.run`, created by :meth:`Exchange.start`). An exchange answers
``/healthz`` itself, checks the Host, hands a matching WebSocket upgrade to an in-process
protocol, or picks the route, takes an upstream connection from the pool (retrying once on a
fresh one when a reused connection turns out closed and the request is safe to resend), sends
the head and what it holds of the body, waits for the response head (with a timer), and relays
head and body to the client. The upstream connection delivers the response to the exchange
(:class:`~remotecli.gateway.upstream.ResponseSink`); request body bytes the connection reads go
through :meth:`Exchange.body_received` straight to the upstream once there is one.

Where the exchange is lives in two lifecycles from :mod:`remotecli.gateway.lifecycle`: the
request (what the client sent: ``BODY``, ``COMPLETE``, ``BROKEN``) and the exchange (what the
gateway did: ``QUEUED`` … ``RESPONDING`` … ``DONE``, ``FAILED``, ``CANCELLED``, ``TUNNELLED``,
``HANDED_OVER``). Every ending goes through :meth:`Exchange.run`'s handlers, which answer an
error before a response started, abort the client connection after, and write the one log
line; the connection is told through :class:`ClientSide`, which it implements. An exchange
knows nothing of the parser, the pipeline queue or the timers.

:func:`upstream_request_head` turns the client's head into the bytes sent to the next hop:
forwarding headers set, hop-by-hop headers dropped, the Host rewritten when configured, and a
Host added when an HTTP/1.0 client sent none (the upstream hop is HTTP/1.1, where Host is
mandatory). :func:`client_response_head` does the same for the upstream's answer: end-to-end
headers kept, the body re-framed for the client, and whether the connection must close after.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from remotecli import http11
from remotecli.exceptions import (
    LocalProtocolError,
    NotFound,
    RemoteCliError,
    UpstreamClosed,
    UpstreamError,
    UpstreamHeadTimeout,
)
from remotecli.forwarding import Forwarding, forward
from remotecli.gateway.context import GatewayContext, hand_over, start_tunnel
from remotecli.gateway.lifecycle import (
    ExchangeEvent,
    ExchangeState,
    RequestEvent,
    RequestState,
    exchange_lifecycle,
    request_lifecycle,
)
from remotecli.gateway.upstream import UpstreamConnection
from remotecli.handover import ClientInfo, LocalUpgrade
from remotecli.http11 import Framing, RequestHead, ResponseHead
from remotecli.logs import get_logger
from remotecli.routing import UpstreamAddress
from remotecli.upgrade import is_switching, upstream_upgrade_headers

log = get_logger("gateway")

HEALTHZ_BODY = b'{"status":"ok"}'

_SERVING = ExchangeState.SERVING
_RESPONDING = ExchangeState.RESPONDING


class ClientSide(Protocol):
    """What an exchange needs of its client connection (ClientConnection implements it)."""

    client_paused: bool  # the client's write buffer is full: upstreams must not read

    def closing(self) -> bool:
        """True when the connection closes after the exchange in flight (CLOSING, shutdown)."""

    def must_close(self) -> None:
        """Close the connection once the exchange in flight has ended."""

    def close(self, *, abort: bool = False) -> None:
        """Close (or abort) the client transport now."""

    def switch(self) -> None:
        """Give up the transport: a tunnel or an in-process protocol owns it from now on."""

    def update_reading(self) -> None:
        """Read from the client again, or stop, as the exchange in flight now needs."""

    def exchange_ended(self, exchange: Exchange) -> None:
        """The exchange in flight has ended and been accounted for: serve the next one."""


class Exchange:
    """One request on a client connection, from its head to the end of its response.

    Create it when the head has been parsed; :meth:`start` it when it is its turn. The
    connection feeds the body (:meth:`body_received`, :meth:`request_ended`) and reports a
    broken one (:meth:`break_request`).
    """

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "chunked_out",
        "client",
        "ctx",
        "early",
        "ended",
        "error",
        "framing",
        "head",
        "keep_alive",
        "lifecycle",
        "owner",
        "peer",
        "pending",
        "raw_chunks",
        "request",
        "request_id",
        "started",
        "status",
        "task",
        "upstream",
        "upstream_full",
        "upstream_label",
        "websocket",
    )

    def __init__(
        self,
        owner: ClientSide,
        context: GatewayContext,
        client: asyncio.Transport,
        peer: str,
        head: RequestHead,
        framing: http11.BodyFraming,
        websocket: bool,
    ) -> None:
        self.owner = owner
        self.ctx = context
        self.client = client
        self.peer = peer
        self.head = head
        self.framing = framing
        self.websocket = websocket
        self.keep_alive = True
        self.request = request_lifecycle()
        self.lifecycle = exchange_lifecycle()
        self.error: RemoteCliError | None = None  # why the request broke (RequestState.BROKEN)
        self.task: asyncio.Task[None] | None = None
        self.pending: list[bytes] = []  # body bytes read before the upstream was connected
        self.raw_chunks: list[bytes] = []
        self.early = b""  # bytes after an upgrade request's head
        self.upstream: UpstreamConnection | None = None
        self.upstream_full = False  # flow control: the upstream's write buffer is past its mark
        self.upstream_label = ""
        self.request_id = ""
        self.chunked_out = False  # the response body is re-chunked for the client
        self.status = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.ended = "done"  # the log line's ``ended``
        self.started = time.monotonic()

    # -- fed by the connection ----------------------------------------------------------------

    def body_received(self, body: bytes) -> None:
        """Forward request body bytes, or hold them until the upstream is connected."""
        self.bytes_up += len(body)
        upstream = self.upstream
        if (
            upstream is not None
            and self.lifecycle.state in (_SERVING, _RESPONDING)
            and not upstream.closed
        ):
            chunked = self.framing.kind is Framing.CHUNKED
            upstream.write(http11.encode_chunk(body) if chunked else body)
        else:
            self.pending.append(body)

    def request_ended(self) -> None:
        """The whole request has been read: end a chunked body upstream."""
        self.request.handle(RequestEvent.END)
        upstream = self.upstream
        if (
            self.framing.kind is Framing.CHUNKED
            and upstream is not None
            and self.lifecycle.state in (_SERVING, _RESPONDING)
            and not upstream.closed
        ):
            upstream.write(http11.LAST_CHUNK)

    def break_request(self, error: RemoteCliError) -> None:
        """The request body can never complete: end the exchange with ``error``.

        A running task is cancelled and answers from its handler; a task that has not run
        its first step would never reach that handler, so the answer is given here.
        """
        self.request.handle(RequestEvent.BREAK)
        self.error = error
        task = self.task
        assert task is not None
        task.cancel()
        if self.lifecycle.state is ExchangeState.STARTING:
            self._fail(error)
            self.end()

    def cancel(self) -> None:
        """The client connection was lost: stop serving (see :meth:`break_request`)."""
        task = self.task
        assert task is not None
        task.cancel()
        if self.lifecycle.state is ExchangeState.STARTING:
            self._cancelled()
            self.end()

    # -- the cycle ----------------------------------------------------------------------------

    def start(self) -> None:
        """Create the task that serves this exchange (its turn has come)."""
        self.lifecycle.handle(ExchangeEvent.START)
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        """Serve the request; every ending is answered, accounted for and logged here."""
        try:
            self.lifecycle.handle(ExchangeEvent.RUN)  # from here a cancel reaches the handlers
            await self._serve()
        except RemoteCliError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            if self.request.state is RequestState.BROKEN and self.error is not None:
                self._fail(self.error)
            else:
                self._cancelled()
        except Exception as exc:  # a bug of ours: answer 500 and log it, never a silent close
            log.exception("request failed", path=self.head.path)
            self._fail(
                LocalProtocolError(
                    f"the gateway failed on this request ({type(exc).__name__}); "
                    "retry, and report it with the request id if it persists"
                ),
            )
        if self.lifecycle.state is not ExchangeState.TUNNELLED:  # a tunnel logs when it ends
            self.end()

    def end(self) -> None:
        """Count and log the ended exchange, then let the connection serve the next one."""
        metrics = self.ctx.metrics
        metrics.count_request(self.status)
        metrics.add_bytes(self.bytes_up, self.bytes_down)
        self.log()
        self.owner.exchange_ended(self)

    async def _serve(self) -> None:
        head = self.head
        ctx = self.ctx
        if head.path == "/healthz" and head.method in ("GET", "HEAD") and not self.websocket:
            self.status = 200
            self.upstream_label = "gateway"
            # The JSON body of the controller's own /healthz, which this one stands in front of.
            body = b"" if head.method == "HEAD" else HEALTHZ_BODY
            close = self._closing()
            if close:
                self.owner.must_close()
            health = http11.simple_response(
                200, body, content_type=b"application/json", close=close
            )
            self.lifecycle.handle(ExchangeEvent.RESPOND)
            self.client.write(health)
            self.lifecycle.handle(ExchangeEvent.COMPLETE)
            return
        forwarding = forward(
            head.headers, peer=self.peer, scheme=ctx.scheme, port=ctx.port, trusted=ctx.trusted
        )
        self.request_id = forwarding.request_id
        if ctx.hosts is not None:
            # Before routing, upgrades included: a rebound name (DNS rebinding) gets nothing.
            ctx.hosts.check(forwarding.host)
        if self.websocket:
            for local in ctx.local_upgrades:
                if local.pattern.fullmatch(head.path):
                    client = ClientInfo(
                        forwarding.client_address,
                        forwarding.scheme,
                        forwarding.host,
                        forwarding.request_id,
                    )
                    self._hand_over(local, client)
                    return
        route = ctx.router.match(head.path)
        if route is None:
            prefixes = ", ".join(r.prefix for r in ctx.router.routes) or "nothing"
            raise NotFound(
                f"no route for {head.path}; this gateway routes {prefixes}; "
                "check the URL or add --route PREFIX=UPSTREAM"
            )
        address = ctx.router.address(route)
        self.upstream_label = address.label
        raw_head = upstream_request_head(self, forwarding, address, ctx.config.host_rewrite)
        upstream, response = await self._send_request(address, raw_head)
        self.status = response.status
        if self.websocket and is_switching(response):
            self._switch(upstream, response)
            return
        await self._relay_response(upstream, response)

    async def _send_request(
        self, address: UpstreamAddress, raw_head: bytes
    ) -> tuple[UpstreamConnection, ResponseHead]:
        config = self.ctx.config
        for attempt in (0, 1):
            upstream = await self.ctx.pool.acquire(address, fresh=attempt > 0)
            self.upstream = upstream
            self.upstream_full = False
            if self.owner.client_paused and upstream.transport is not None:
                upstream.transport.pause_reading()  # the client is still not reading
            upstream.start_response(self)
            upstream.write(raw_head)
            chunked = self.framing.kind is Framing.CHUNKED
            for chunk in self.pending:
                upstream.write(http11.encode_chunk(chunk) if chunked else chunk)
            complete = self.request.state is RequestState.COMPLETE
            if chunked and complete:
                upstream.write(http11.LAST_CHUNK)
            retry_safe = not self.pending and self.framing.kind is Framing.NONE
            self.pending = []
            self.owner.update_reading()
            head = upstream.head
            assert head is not None
            # A timer failing the future costs less than asyncio.timeout() on this hot path.
            timer = asyncio.get_running_loop().call_later(
                config.response_head_timeout, _time_out, head
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
                    f"{config.response_head_timeout:g} s; check the upstream's health "
                    "or raise --response-timeout"
                ) from exc
            finally:
                timer.cancel()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _relay_response(self, upstream: UpstreamConnection, response: ResponseHead) -> None:
        head, until_close, close = client_response_head(
            self, response, close=self._closing() or self.websocket
        )
        if until_close:
            upstream.body_until_close()
        if close:
            self.owner.must_close()
        self.lifecycle.handle(ExchangeEvent.RESPOND)
        self.client.write(http11.serialize_response(head))
        upstream.head_sent()
        assert upstream.done is not None
        if self.head.method != "HEAD":
            await upstream.done
        if self.chunked_out:
            self.client.write(http11.LAST_CHUNK)
        self.lifecycle.handle(ExchangeEvent.COMPLETE)
        if self.request.state is RequestState.COMPLETE and self.head.method != "HEAD":
            self.ctx.pool.release(upstream)
        else:
            upstream.abort()  # a HEAD's body framing, or a request cut short: not reusable
            self.owner.must_close()

    def _closing(self) -> bool:
        return self.owner.closing() or not self.keep_alive

    def _fail(self, exc: RemoteCliError) -> None:
        """End with ``exc``: an error answer before the response head, an abort after it."""
        responded = self.lifecycle.state is _RESPONDING
        self.lifecycle.handle(ExchangeEvent.FAIL)
        self.ended = exc.kind
        if isinstance(exc, UpstreamError):
            self.ctx.metrics.upstream_errors.labels(exc.kind).inc()
        if self.upstream is not None:
            self.upstream.abort()
        if self.client.is_closing():
            self.owner.must_close()
            return
        if responded:
            self.owner.close(abort=True)  # mid-body: the client must see it did not finish
            return
        self.status = exc.status
        self.client.write(http11.response_for_error(exc))
        self.owner.close()

    def _cancelled(self) -> None:
        self.lifecycle.handle(ExchangeEvent.CANCEL)
        self.ended = "client_closed"
        if self.upstream is not None:
            self.upstream.abort()

    # -- the end of HTTP: a tunnel or a hand-over ---------------------------------------------

    def _switch(self, upstream: UpstreamConnection, response: ResponseHead) -> None:
        """Send the upstream's 101 on and join both transports in a tunnel."""
        self.lifecycle.handle(ExchangeEvent.SWITCH)
        self.owner.switch()
        about = (self.peer, self.head.path, self.upstream_label, self.request_id)
        start_tunnel(self.ctx, self.client, upstream, response, self.started, self.early, about)
        # Drop what the HTTP phase held (parsers form reference cycles) so that an idle tunnel
        # costs only its two transports and the Tunnel.
        self.upstream = None
        self.raw_chunks = []

    def _hand_over(self, local: LocalUpgrade, client: ClientInfo) -> None:
        protocol = local.factory(client)
        self.lifecycle.handle(ExchangeEvent.HAND_OVER)
        self.status = 101
        self.ended = "local_upgrade"
        self.upstream_label = "local"
        self.owner.switch()
        hand_over(self.ctx, self.client, protocol, self.raw_chunks[0] + self.early)

    # -- the response sink used by UpstreamConnection -----------------------------------------

    def interim(self, head: ResponseHead) -> None:
        """Relay a 1xx interim response (100 Continue) to the client."""
        head.headers = http11.end_to_end(head.headers)
        self.client.write(http11.serialize_response(head))

    def body(self, data: bytes) -> None:
        """Relay response body bytes to the client, chunked again when the response is."""
        self.bytes_down += len(data)
        self.client.write(http11.encode_chunk(data) if self.chunked_out else data)

    def upstream_paused(self, paused: bool) -> None:
        """The upstream's write buffer is full (or drained): stop (or resume) reading the body."""
        self.upstream_full = paused
        self.owner.update_reading()

    def log(self) -> None:
        """Write the request's one log line."""
        log.info(
            "request",
            client=self.peer,
            method=self.head.method,
            path=self.head.path,  # never the query: it may carry a ticket
            upstream=self.upstream_label,
            status=self.status,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
            duration_ms=round((time.monotonic() - self.started) * 1000, 1),
            ended=self.ended,
            request_id=self.request_id,
        )


def _time_out(future: asyncio.Future[ResponseHead]) -> None:
    """Fail ``future`` with TimeoutError unless it is already done (a response head timer)."""
    if not future.done():
        future.set_exception(TimeoutError())


def upstream_request_head(
    exchange: Exchange,
    forwarding: Forwarding,
    address: UpstreamAddress,
    host_rewrite: str | None,
) -> bytes:
    """Return the serialized HTTP/1.1 head to send upstream for ``exchange``.

    ``forwarding`` is what :func:`remotecli.forwarding.forward` resolved for this request and
    ``address`` the upstream chosen by the route; ``host_rewrite`` replaces the client's Host.
    """
    head = exchange.head
    if exchange.websocket:
        headers = upstream_upgrade_headers(forwarding.headers)
    else:
        headers = http11.end_to_end(forwarding.headers)
        if exchange.framing.kind is Framing.CHUNKED:
            headers.append((b"Transfer-Encoding", b"chunked"))
    if host_rewrite is not None:
        headers = http11.without(headers, [b"host"])
        headers.insert(0, (b"Host", host_rewrite.encode("latin-1")))
    elif http11.get_one(headers, b"host") is None:
        # Only HTTP/1.0 may come without Host; the next hop speaks 1.1, which requires it.
        headers.insert(0, (b"Host", address.authority.encode("latin-1")))
    return http11.serialize_request(RequestHead(head.method, head.target, "1.1", headers))


def client_response_head(
    exchange: Exchange, response: ResponseHead, *, close: bool
) -> tuple[ResponseHead, bool, bool]:
    """Return the head to send the client for ``response``, and two decisions the caller applies.

    ``close`` says whether the client connection closes after this response anyway. Returns
    ``(head, until_close, close)``: ``until_close`` when the upstream's body ends at its EOF
    (tell the upstream connection so), ``close`` when the client connection must close after
    the body. Sets ``exchange.chunked_out`` when the body is re-chunked for the client. Raises
    UpstreamBadResponse (502) for ambiguous response framing, before anything is decided.
    """
    framing = http11.response_framing(response.status, exchange.head.method, response.headers)
    headers = http11.end_to_end(response.headers)
    until_close = framing.kind is Framing.UNTIL_CLOSE
    if framing.kind is Framing.CHUNKED:
        if exchange.head.version == "1.1":
            headers.append((b"Transfer-Encoding", b"chunked"))
            exchange.chunked_out = True
        else:
            close = True  # an HTTP/1.0 client reads the body until the connection closes
    elif until_close:
        close = True
    if close:
        headers.append((b"Connection", b"close"))
    return ResponseHead(response.status, response.reason, "1.1", headers), until_close, close
