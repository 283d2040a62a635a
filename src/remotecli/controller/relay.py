"""A viewer's WebSocket, terminated in-process and relayed to a stream of its session.

Theory of operation. Both views of a session, the VNC view (:mod:`remotecli.controller.bridge`)
and the text view (:mod:`remotecli.controller.tty_bridge`), are a WebSocket the gateway hands
over as an already-connected transport (:class:`remotecli.gateway.LocalUpgrade`) and a stream
socket to the session. Everything but what they connect to and how they translate messages is
here, in :class:`ViewerSocket`:

1. handshake: websockets' sans-I/O ``ServerProtocol`` reads the request head; the path's session
   id and the cookie, Origin, Host and ``?ticket=`` (:class:`Credentials`) go to the view's
   :meth:`~ViewerSocket._open`, which asks its authorizer. A refusal is sent, before any
   upgrade, as the HTTP answer :func:`remotecli.exceptions.http_answer` maps it to (its status,
   a JSON ``error`` and ``message``, ``Retry-After`` past the failed-credential limit);
2. the view dials its session (:meth:`~ViewerSocket._dial`, Unix or TCP, through a
   :class:`~remotecli.controller.session_stream.Upstream`), then sends the 101
   (:meth:`~ViewerSocket._upgrade`) with its subprotocol when offered. When the session cannot
   be reached it still upgrades and closes 1011 naming the endpoint, so a browser, which never
   sees a refused upgrade's body, gets the reason;
3. relay: the viewer's frames go to a :class:`remotecli.frames.FrameReader`; binary payloads to
   the view's ``_from_viewer``, text messages to its ``_text_frame``; the session's bytes go out
   as binary messages (an unmasked header written before the bytes as they are). Each side's
   transport pauses the other side's reading when its write buffer is over
   :data:`WRITE_BUFFER_HIGH` (backpressure both ways). Bytes a viewer sends after its request
   head but before the 101 are kept, with reading paused, and relayed first;
4. close: the session's stream going away closes 1011 with the reason (an error's close code
   and reason come from :func:`remotecli.exceptions.close_for`), :class:`ViewerHub` closes with
   1001 on shutdown and with the manager's code for a session's viewers; a ping goes out every
   ``ping_interval`` and an unanswered one closes with 1011. A frame breaking the WebSocket
   rules is answered as websockets answers it: the reader's close (1002, 1007 or 1009), then
   the connection is closed. A viewer's close frame is echoed, then the connection is closed.
   One log line and the view's metrics are written when the connection ends, and the
   authorizer hears of the viewer coming and going (a session with a viewer is never idle).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import ClassVar, cast
from urllib.parse import parse_qs, urlsplit

import prometheus_client
from structlog.stdlib import BoundLogger
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import BytesLike, Subprotocol

from remotecli.cluster.channel import preamble
from remotecli.cluster.channel_tls import client_context
from remotecli.controller.session_stream import WRITE_BUFFER_HIGH, Upstream
from remotecli.controller.viewers import ViewerAccounting
from remotecli.drivers.base import TtyEndpoint, VncEndpoint
from remotecli.exceptions import (
    NotFound,
    RemoteCliError,
    ServiceUnavailable,
    SessionError,
    close_for,
    http_answer,
)
from remotecli.frames import FrameReader, close_frame, frame_header
from remotecli.handover import ClientInfo

CONNECT_TIMEOUT = 10.0
"""Seconds to reach a session's server and, for a VNC password, finish its authentication:
a microVM under emulation (TCG) can be slow to answer the first viewer after a restore."""
CLOSE_TIMEOUT = 5.0
MAX_VIEWER_MESSAGE = 4 * 1024 * 1024


class ViewerMetrics:
    """One view's series: open viewers, connections by outcome, bytes, durations."""

    def __init__(self, prefix: str, what: str, registry: prometheus_client.CollectorRegistry):
        """Name the series ``{prefix}_viewers`` and so on; ``what`` says which stream."""
        self.viewers = prometheus_client.Gauge(
            f"{prefix}_viewers", f"Open {what} WebSocket viewers", registry=registry
        )
        self.connections = prometheus_client.Counter(
            f"{prefix}_connections",
            f"{what} WebSocket connections by outcome (HTTP status or close code)",
            ["outcome"],
            registry=registry,
        )
        self.bytes = prometheus_client.Counter(
            f"{prefix}_bytes",
            f"{what} payload bytes relayed (in = viewer to session, out = session to viewer)",
            ["direction"],
            registry=registry,
        )
        self.seconds = prometheus_client.Histogram(
            f"{prefix}_connection_seconds",
            f"How long {what} WebSocket connections stayed open",
            buckets=(1, 10, 60, 300, 1800, 3600, 4 * 3600),
            registry=registry,
        )


class ViewerHub:
    """The open viewers of every view, and the two ways to close them."""

    def __init__(self, *, ping_interval: float) -> None:
        """Ping each viewer every ``ping_interval`` seconds."""
        self.ping_interval = ping_interval
        self.viewers: set[ViewerSocket] = set()
        self.closing = False

    async def close_viewers(self, session_id: str, code: int, reason: str) -> None:
        """Close every viewer of ``session_id`` with ``code`` and ``reason``; wait until closed."""
        await self._close([v for v in self.viewers if v.session_id == session_id], code, reason)

    async def shutdown(self) -> None:
        """Close every viewer with 1001 "server shutting down"; idempotent."""
        self.closing = True
        await self._close(list(self.viewers), 1001, "server shutting down")

    async def _close(self, viewers: list[ViewerSocket], code: int, reason: str) -> None:
        for viewer in viewers:
            viewer.close(code, reason)
        waits = [viewer.ended.wait() for viewer in viewers]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await asyncio.gather(*waits)
        for viewer in viewers:
            viewer.abort()


@dataclasses.dataclass(frozen=True)
class Credentials:
    """What a viewer's upgrade request brings to prove who it is."""

    cookie_header: str | None
    origin: str | None
    host: str | None
    ticket: str | None
    client: str


def describe_failure(exc: OSError | TimeoutError | RemoteCliError) -> str:
    """Say in words why connecting to a session's stream failed (after its endpoint's name)."""
    if isinstance(exc, TimeoutError):
        return f"did not answer within {CONNECT_TIMEOUT:.0f} s"
    if isinstance(exc, RemoteCliError):
        return exc.message
    return f"refused the connection ({exc.strerror or exc})"


@functools.cache  # one selector per view, not one per viewer
def _accepting(
    subprotocol: Subprotocol,
) -> Callable[[ServerProtocol, Sequence[Subprotocol]], Subprotocol | None]:
    """Return websockets' selector that accepts ``subprotocol`` when offered, else none."""

    def select(protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
        return subprotocol if subprotocol in offered else None

    return select


class ViewerSocket(asyncio.Protocol):
    """One viewer's WebSocket, from the handed-over request head to the end of the relay.

    A view subclasses it and fills in the class attributes, :meth:`_open` (authorize, then
    dial and upgrade) and :meth:`_from_viewer` (a binary payload); it may override
    :meth:`_text_frame` (text frames close 1003 by default) and :meth:`upstream_received`.
    """

    name: ClassVar[str]  # the view in log events: "vnc" logs "vnc_viewer"
    kind: ClassVar[str]  # the view in messages: "VNC", "text terminal"
    subprotocol: ClassVar[Subprotocol]  # accepted when the viewer offers it
    text_refusal: ClassVar[str] = "text frames are not accepted; send binary frames"

    # Thousands of viewers stay open at once: slots keep each one small (no instance dict).
    __slots__ = (
        "_abort_timer",
        "_connect_task",
        "_early",
        "_in_text",
        "_pending",
        "_ping_payload",
        "_ping_timer",
        "accounting",
        "attached",
        "bytes_in",
        "bytes_out",
        "client",
        "close_code",
        "close_reason",
        "ended",
        "hub",
        "log",
        "metrics",
        "owner",
        "pattern",
        "reader",
        "session_id",
        "started",
        "state",
        "status",
        "transport",
        "upstream",
        "ws",
    )

    def __init__(
        self,
        hub: ViewerHub,
        pattern: re.Pattern[str],
        client: ClientInfo,
        *,
        accounting: ViewerAccounting,
        metrics: ViewerMetrics,
        log: BoundLogger,
    ) -> None:
        self.hub = hub
        self.pattern = pattern
        self.client = client
        self.accounting = accounting
        self.metrics = metrics
        self.log = log
        self.ws = ServerProtocol(select_subprotocol=_accepting(self.subprotocol))  # handshake
        self.reader = FrameReader(MAX_VIEWER_MESSAGE)  # the viewer's frames after the 101
        self.state = State.CONNECTING  # OPEN at the 101, CLOSING once our close frame is out
        self.transport: asyncio.Transport | None = None
        self.upstream: Upstream | None = None
        self.session_id: str | None = None
        self.owner: str | None = None
        self.attached = False
        self.status: int | None = None
        self.close_code: int | None = None
        self.close_reason = ""
        self.started = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.ended = asyncio.Event()
        self._in_text = False  # a fragmented text message is open
        self._early: bytearray | None = None  # bytes after the request head, until the relay
        self._pending = bytearray()  # the session's bytes before the 101
        self._ping_payload: bytes | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._connect_task: asyncio.Task[None] | None = None
        hub.viewers.add(self)

    # --- what a view fills in ------------------------------------------------------------------

    def _open(self, request: Request, credentials: Credentials) -> None:
        """Authorize ``credentials`` for :attr:`session_id`, then dial and :meth:`_upgrade`."""
        raise NotImplementedError

    def _from_viewer(self, payload: BytesLike) -> None:
        """Take one binary frame's payload (the hot path)."""
        raise NotImplementedError

    def _text_frame(self, frame: Frame) -> None:
        """Take a frame of a text message (already checked to be UTF-8): 1003 by default."""
        self.close(1003, self.text_refusal)

    # --- the viewer's transport ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        if self.state is not State.CONNECTING:
            self._receive_frames(data)
        elif self._early is not None:
            self._early += data
            self._pause_reading()
        else:
            self._receive_head(data)

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost says 1006 unless a close came first

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None and self.status == 101:
            self.close_code = 1006
            self.close_reason = f"viewer connection lost: {exc}" if exc else "viewer went away"
        self._finish()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # --- handshake ----------------------------------------------------------------------------

    def _receive_head(self, data: bytes) -> None:
        """Give websockets the request head, and keep what follows it for the frame reader.

        The gateway hands the whole head over at once, so it ends at the first blank line; a
        head without one goes to websockets as it is, which refuses it or waits for the rest.
        """
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            self._early = bytearray(data[end + 4 :])
            if self._early:
                self._pause_reading()
            data = data[: end + 4]
        self.ws.receive_data(data)
        for event in self.ws.events_received():
            if isinstance(event, Request):
                if self._early is None:
                    self._early = bytearray()
                self._handle_request(event)
        self._flush()

    def _handle_request(self, request: Request) -> None:
        path = urlsplit(request.path)
        match = self.pattern.fullmatch(path.path)
        if match is None:
            self._reject(NotFound(f"no {self.kind} WebSocket at {path.path}"))
            return
        self.session_id = match.group("id")
        tickets = parse_qs(path.query).get("ticket")
        credentials = Credentials(
            cookie_header=request.headers.get("Cookie"),
            origin=request.headers.get("Origin"),
            host=self.client.host,
            ticket=tickets[0] if tickets else None,
            client=self.client.address,
        )
        self._open(request, credentials)

    def _refuse(self, exc: Exception) -> None:
        """Refuse the upgrade for an authorizer's error; an unexpected one is its bug: 500."""
        if isinstance(exc, RemoteCliError):
            self._reject(exc)
            return
        self.log.error(f"{self.name}_authorizer_failed", session_id=self.session_id, exc_info=exc)
        self._reject(
            RemoteCliError("internal error while checking credentials; see the server log")
        )

    def _admit(self, owner: str) -> bool:
        """Take the authorized viewer in, unless the server is shutting down (then 503)."""
        if self.hub.closing:
            self._reject(ServiceUnavailable("the server is shutting down; reconnect in a moment"))
            return False
        self.owner = owner
        return True

    def _reject(self, exc: RemoteCliError) -> None:
        """Refuse the upgrade with the HTTP answer ``exc`` maps to, and close."""
        answer = http_answer(exc)
        self.status = answer.status
        self.close_reason = exc.message
        response = self.ws.reject(answer.status, "")  # websockets' Date and Connection: close
        del response.headers["Content-Type"]
        del response.headers["Content-Length"]
        response.headers.update(answer.headers)
        response.headers["Content-Length"] = str(len(answer.body))
        self.ws.send_response(dataclasses.replace(response, body=answer.body))
        self._flush()
        if self.transport is not None:
            self.transport.close()

    async def _dial(
        self, upstream: Upstream, endpoint: VncEndpoint | TtyEndpoint, verb: str
    ) -> None:
        """Connect ``upstream`` to the session at ``endpoint``: its Unix socket, else TCP, with
        TLS pinning the endpoint's ``channel_cert`` when it has one (the handshake, and its
        certificate check, come first); on a session channel the secret and ``verb`` are the
        first bytes written (:func:`~remotecli.cluster.channel.preamble`).

        Raises OSError, or SessionError when the session closed it at once. The caller bounds
        the time and, on failure, aborts ``upstream`` and calls :meth:`_unavailable`.
        """
        loop = asyncio.get_running_loop()
        if endpoint.unix_path is not None:
            await loop.create_unix_connection(lambda: upstream, endpoint.unix_path)
        else:
            assert endpoint.host is not None
            assert endpoint.port is not None
            cert = endpoint.channel_cert
            tls = client_context(cert) if cert is not None else None
            await loop.create_connection(lambda: upstream, endpoint.host, endpoint.port, ssl=tls)
        self.upstream = upstream
        if upstream.lost_reason is not None:
            raise SessionError(upstream.lost_reason)
        if endpoint.channel_secret is not None:
            upstream.write(preamble(endpoint.channel_secret, verb))  # before any other byte

    def _unavailable(self, request: Request, exc: RemoteCliError) -> None:
        """Upgrade anyway and close with ``exc``'s code and reason (a browser can read those)."""
        accepted = self._accept(request)
        self.fail(exc)
        if accepted:
            self._start_relay(ping=False)  # to read the viewer's answer to our close

    def _upgrade(self, request: Request) -> bool:
        """Send the 101 once the session's stream is open; False (stream closed) if it cannot.

        The caller sends what the viewer must see first, then calls :meth:`_start_relay`.
        """
        if self.transport is None or self.transport.is_closing() or not self._accept(request):
            self._close_upstream()
            return False
        return True

    def _accept(self, request: Request) -> bool:
        """Send the 101 (or websockets' 4xx for an invalid handshake); True once upgraded."""
        response = self.ws.accept(request)
        self.ws.send_response(response)
        self.status = response.status_code
        self._flush()
        if self.status != 101 or self.session_id is None:
            self.close_reason = response.body.decode(errors="replace").strip()
            return False
        self.state = State.OPEN
        self.attached = True
        self.metrics.viewers.inc()
        self.accounting.viewer_attached(self.session_id)
        return True

    def _flush(self) -> None:
        """Write what websockets has to send for the handshake; its end of stream closes."""
        transport = self.transport
        if transport is None:
            return
        for data in self.ws.data_to_send():
            if data:
                transport.write(data)
            else:
                transport.close()

    # --- the viewer's frames ------------------------------------------------------------------

    def _start_relay(self, *, ping: bool = True) -> None:
        """Read the viewer's frames: first those that came before the 101, then the rest."""
        early, self._early = self._early, None
        self._resume_reading()
        if early:
            self._receive_frames(bytes(early))
        if ping:
            self._schedule_ping()

    def _receive_frames(self, data: bytes) -> None:
        reader = self.reader
        reader.receive_data(data)
        for frame in reader.events_received():
            opcode = frame.opcode
            if opcode is Opcode.BINARY or (opcode is Opcode.CONT and not self._in_text):
                self._from_viewer(frame.data)  # the hot path
            else:
                self._handle_frame(frame)
        if reader.failure is not None:
            self._broken_rule(reader.failure)

    def _handle_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.TEXT or frame.opcode is Opcode.CONT:
            self._in_text = not frame.fin
            self._text_frame(frame)
        elif frame.opcode is Opcode.PING:
            self._send_control(frame_header(Opcode.PONG, len(frame.data)) + frame.data)
        elif frame.opcode is Opcode.PONG:
            if self._ping_payload is not None and frame.data == self._ping_payload:
                self._ping_payload = None
        elif frame.opcode is Opcode.CLOSE:
            received = self.reader.close_rcvd
            assert received is not None
            if self.close_code is None:
                self.close_code = received.code
                self.close_reason = received.reason
            # Echo the viewer's close frame as it came (websockets' rule), then close: a server
            # closes the TCP connection once both close frames are out.
            self._send_control(frame_header(Opcode.CLOSE, len(frame.data)) + frame.data)
            self._end_connection()

    def _broken_rule(self, failure: Close) -> None:
        """Answer a frame that breaks the rules as websockets does: its close, then close."""
        if self.close_code is None:
            self.close_code = failure.code
            self.close_reason = failure.reason
        self._send_control(close_frame(failure.code, failure.reason))
        self._end_connection()

    def _send_control(self, frame: bytes) -> None:
        if self.state is State.OPEN and self.transport is not None:
            self.transport.write(frame)

    def _end_connection(self) -> None:
        self.state = State.CLOSED
        self._close_upstream()
        if self.transport is not None:
            self.transport.close()
            self._arm_abort()

    def _to_viewer(self, data: bytes, *, count: bool = True) -> None:
        """Send ``data`` as one binary message (nothing once closing)."""
        if not data or self.state is not State.OPEN:
            return
        if count:
            self.bytes_out += len(data)
        assert self.transport is not None
        self.transport.writelines((frame_header(Opcode.BINARY, len(data)), data))

    # --- what the session's stream reports (called by Upstream) --------------------------------

    def upstream_received(self, data: bytes) -> None:
        """Bytes from the session: relayed once upgraded, kept until then."""
        if self.status == 101:
            self._to_viewer(data)
        else:
            self._pending += data

    def upstream_backlog(self, full: bool) -> None:
        """The session side's write buffer is full (or drained): pause (or resume) the viewer."""
        if full:
            self._pause_reading()
        elif self._early is None:  # bytes before the relay stay paused until it starts
            self._resume_reading()

    def upstream_lost(self, reason: str | None) -> None:
        """The session's stream ended; ``reason`` says why, or is None when we closed it."""
        if reason is not None and self.status == 101:
            self.close(1011, reason)

    def _flush_pending(self) -> None:
        """Feed the session's bytes that arrived before they could be relayed."""
        pending, self._pending = bytes(self._pending), bytearray()
        if pending:
            self.upstream_received(pending)

    # --- closing ------------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Start the closing handshake with ``code``; a no-op once closing."""
        if self.status != 101:
            if self._connect_task is not None and not self._connect_task.done():
                self._connect_task.cancel()
            self.close_code = code
            self.close_reason = reason
            if self.transport is not None and self.status is None:
                self.transport.abort()
            return
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
        if self.state is State.OPEN:
            self._send_control(close_frame(code, reason[:120]))
            self.state = State.CLOSING  # the viewer's close frame ends it, or the abort timer
            self._arm_abort()
        self._close_upstream()
        if self._early is None:  # a backlog to the session no longer matters: read the close
            self._resume_reading()

    def fail(self, exc: RemoteCliError) -> None:
        """Close with the code and reason ``exc`` maps to (see ``close_for``)."""
        self.close(*close_for(exc))

    def abort(self) -> None:
        """Drop the viewer's connection without a closing handshake (or the rest of one)."""
        if self.transport is not None and not self.ended.is_set():
            self.transport.abort()

    def _arm_abort(self) -> None:
        if self._abort_timer is None:
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(CLOSE_TIMEOUT, self.abort)

    def _close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()

    # --- keepalive ----------------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        loop = asyncio.get_running_loop()
        self._ping_timer = loop.call_later(self.hub.ping_interval, self._ping)

    def _ping(self) -> None:
        if self.state is not State.OPEN:
            return
        if self._ping_payload is not None:
            self.close(1011, f"keepalive ping unanswered for {self.hub.ping_interval:.0f} s")
            return
        self._ping_payload = secrets.token_bytes(4)
        self._send_control(frame_header(Opcode.PING, 4) + self._ping_payload)
        self._schedule_ping()

    # --- end ----------------------------------------------------------------------------------

    def _finish(self) -> None:
        if self.ended.is_set():
            return
        self.ended.set()
        for timer in (self._ping_timer, self._abort_timer):
            if timer is not None:
                timer.cancel()
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        self._close_upstream()
        self.hub.viewers.discard(self)
        metrics = self.metrics
        duration = time.monotonic() - self.started
        if self.attached:
            metrics.viewers.dec()
            metrics.seconds.observe(duration)
            metrics.bytes.labels("in").inc(self.bytes_in)
            metrics.bytes.labels("out").inc(self.bytes_out)
            assert self.session_id is not None
            self.accounting.viewer_detached(self.session_id, self.bytes_in, self.bytes_out)
        outcome = str(self.close_code if self.status == 101 else self.status or "aborted")
        metrics.connections.labels(outcome).inc()
        self.log.info(
            f"{self.name}_viewer",
            session_id=self.session_id,
            owner=self.owner,
            client=self.client.address,
            request_id=self.client.request_id,
            status=self.status,
            close_code=self.close_code,
            reason=self.close_reason,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            seconds=round(duration, 3),
        )
