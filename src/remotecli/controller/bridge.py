"""The VNC bridge: terminates a viewer's WebSocket and relays RFB bytes to the session's VNC.

Theory of operation. The gateway hands each matching upgrade over as an already-connected
transport (:class:`remotecli.gateway.LocalUpgrade`); a :class:`_Viewer` protocol takes it, gives
the request head to websockets' sans-I/O ``ServerProtocol`` for the opening handshake and, once
the 101 is out, the viewer's frames to a :class:`remotecli.frames.FrameReader`:

1. handshake: the request's session id, cookie, Origin, Host and ``?ticket=`` go to the
   :class:`VncAuthorizer`; a refusal is sent, before any upgrade, as the HTTP answer
   :func:`remotecli.exceptions.http_answer` maps it to (its status, a JSON ``error`` and
   ``message``, ``Retry-After`` past the failed-credential limit);
2. the bridge connects to the session's VNC endpoint (Unix or TCP). When the endpoint carries a
   password, it answers the server's VNC Authentication itself with :class:`remotecli.rfb.RfbClient`
   and later offers the viewer security type None (:class:`remotecli.rfb.NoAuthServerHandshake`);
3. it sends the 101 (subprotocol ``binary`` when offered) and relays: binary payloads to the
   VNC socket, VNC bytes as binary messages (an unmasked header written before the bytes as
   they are). Each side's transport pauses the other side's reading when its write buffer is
   full (backpressure both ways). Bytes a viewer sends after its request head but before the
   101 are kept, with reading paused, and relayed first;
4. a text frame closes with 1003, the VNC endpoint going away with 1011 and the reason (an
   error's close code and reason come from :func:`remotecli.exceptions.close_for`), a
   shutdown with 1001; a ping goes out every ``ping_interval`` and an unanswered one closes
   with 1011. A frame breaking the WebSocket rules is answered as websockets answers it: the
   reader's close (1002, 1007 or 1009), then the connection is closed. A viewer's close frame
   is echoed, then the connection is closed. One log line and the metrics are written when
   the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import cast
from urllib.parse import parse_qs, urlsplit

import prometheus_client
from websockets.datastructures import Headers
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import BytesLike, Subprotocol

from remotecli.controller.viewers import VncAuthorizer
from remotecli.drivers.base import VncEndpoint
from remotecli.exceptions import (
    NotFound,
    ProtocolError,
    RemoteCliError,
    ServiceUnavailable,
    VncUnavailable,
    close_for,
    http_answer,
)
from remotecli.frames import FrameReader, close_frame, frame_header
from remotecli.gateway import ClientInfo, LocalUpgrade
from remotecli.logs import get_logger
from remotecli.rfb import ClientState, NoAuthServerHandshake, RfbClient

log = get_logger("controller.bridge")

VNC_PATHS = (
    re.compile(r"/api/sessions/(?P<id>[A-Za-z0-9_-]{1,64})/vnc"),
    re.compile(r"/api/auth/session/(?P<id>[A-Za-z0-9_-]{1,64})/novnc/websock"),
)
CONNECT_TIMEOUT = 5.0
CLOSE_TIMEOUT = 5.0
MAX_VIEWER_MESSAGE = 4 * 1024 * 1024
WRITE_BUFFER_HIGH = 1024 * 1024
BINARY = Subprotocol("binary")


class _Metrics:
    def __init__(self, registry: prometheus_client.CollectorRegistry) -> None:
        self.viewers = prometheus_client.Gauge(
            "remotecli_bridge_viewers", "Open VNC WebSocket viewers", registry=registry
        )
        self.connections = prometheus_client.Counter(
            "remotecli_bridge_connections",
            "VNC WebSocket connections by outcome (HTTP status or close code)",
            ["outcome"],
            registry=registry,
        )
        self.bytes = prometheus_client.Counter(
            "remotecli_bridge_bytes",
            "RFB payload bytes relayed (in = viewer to VNC, out = VNC to viewer)",
            ["direction"],
            registry=registry,
        )
        self.seconds = prometheus_client.Histogram(
            "remotecli_bridge_connection_seconds",
            "How long VNC WebSocket connections stayed open",
            buckets=(1, 10, 60, 300, 1800, 3600, 4 * 3600),
            registry=registry,
        )


class VncBridge:
    """Serves the VNC WebSocket paths in-process for the gateway."""

    def __init__(
        self,
        authorizer: VncAuthorizer,
        *,
        ping_interval: float = 20.0,
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        """Pass the result of :meth:`local_upgrades` to the gateway; call :meth:`shutdown` last."""
        self.authorizer = authorizer
        self.ping_interval = ping_interval
        self.metrics = _Metrics(registry or prometheus_client.CollectorRegistry())
        self.viewers: set[_Viewer] = set()
        self.closing = False

    def local_upgrades(self) -> list[LocalUpgrade]:
        """Return the gateway hand-overs for both VNC WebSocket paths."""
        return [
            LocalUpgrade(pattern, self._factory(pattern), self.shutdown) for pattern in VNC_PATHS
        ]

    def _factory(self, pattern: re.Pattern[str]) -> Callable[[ClientInfo], asyncio.Protocol]:
        def factory(client: ClientInfo) -> asyncio.Protocol:
            return _Viewer(self, pattern, client)

        return factory

    async def close_viewers(self, session_id: str, code: int, reason: str) -> None:
        """Close every viewer of ``session_id`` with ``code`` and ``reason``; wait until closed."""
        await self._close([v for v in self.viewers if v.session_id == session_id], code, reason)

    async def shutdown(self) -> None:
        """Close every viewer with 1001 "server shutting down"; idempotent."""
        self.closing = True
        await self._close(list(self.viewers), 1001, "server shutting down")

    async def _close(self, viewers: list[_Viewer], code: int, reason: str) -> None:
        for viewer in viewers:
            viewer.close(code, reason)
        waits = [viewer.ended.wait() for viewer in viewers]
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await asyncio.gather(*waits)
        for viewer in viewers:
            viewer.abort()


def _select_binary(protocol: ServerProtocol, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Accept ``binary`` when the viewer offers it (noVNC does), and no subprotocol otherwise."""
    return BINARY if BINARY in offered else None


class _Viewer(asyncio.Protocol):
    """One viewer's WebSocket, from the handed-over request head to the end of the relay."""

    def __init__(self, bridge: VncBridge, pattern: re.Pattern[str], client: ClientInfo) -> None:
        self.bridge = bridge
        self.pattern = pattern
        self.client = client
        self.ws = ServerProtocol(select_subprotocol=_select_binary)  # the handshake only
        self.reader = FrameReader(MAX_VIEWER_MESSAGE)  # the viewer's frames after the 101
        self.state = State.CONNECTING  # OPEN at the 101, CLOSING once our close frame is out
        self.transport: asyncio.Transport | None = None
        self.upstream: _Upstream | None = None
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
        self.viewer_rfb: NoAuthServerHandshake | None = None
        self.server_rfb: RfbClient | None = None
        self._early: bytearray | None = None  # bytes after the request head, until the relay
        self._vnc_pending = bytearray()  # VNC bytes before the 101 or the password handshake
        self._vnc_auth: asyncio.Future[None] | None = None
        self._ping_payload: bytes | None = None
        self._ping_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        self._connect_task: asyncio.Task[None] | None = None
        bridge.viewers.add(self)

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
            self._reject(NotFound(f"no VNC WebSocket at {path.path}"))
            return
        self.session_id = match.group("id")
        tickets = parse_qs(path.query).get("ticket")
        headers: Headers = request.headers
        try:
            target = self.bridge.authorizer.authorize_vnc(
                self.session_id,
                cookie_header=headers.get("Cookie"),
                origin=headers.get("Origin"),
                host=self.client.host,
                ticket=tickets[0] if tickets else None,
                client=self.client.address,
            )
        except RemoteCliError as exc:
            self._reject(exc)
            return
        except Exception:  # the authorizer's bug: answer 500 rather than drop the viewer
            log.exception("vnc_authorizer_failed", session_id=self.session_id)
            self._reject(
                RemoteCliError("internal error while checking credentials; see the server log")
            )
            return
        if self.bridge.closing:
            self._reject(ServiceUnavailable("the server is shutting down; reconnect in a moment"))
            return
        self.owner = target.owner
        self._connect_task = asyncio.get_running_loop().create_task(
            self._connect(request, target.endpoint)
        )

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

    async def _connect(self, request: Request, endpoint: VncEndpoint) -> None:
        loop = asyncio.get_running_loop()
        upstream = _Upstream(self)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                if endpoint.unix_path is not None:
                    await loop.create_unix_connection(lambda: upstream, endpoint.unix_path)
                else:
                    assert endpoint.host is not None
                    assert endpoint.port is not None
                    await loop.create_connection(lambda: upstream, endpoint.host, endpoint.port)
                self.upstream = upstream
                if upstream.lost_reason is not None:
                    raise VncUnavailable(upstream.lost_reason)
                if endpoint.password is not None:
                    self.server_rfb = RfbClient(password=endpoint.password, client_init=False)
                    self._vnc_auth = loop.create_future()
                    self._flush_vnc_pending()
                    await self._vnc_auth
        except (OSError, TimeoutError, RemoteCliError) as exc:
            if isinstance(exc, TimeoutError):
                what = f"did not answer within {CONNECT_TIMEOUT:.0f} s"
            elif isinstance(exc, RemoteCliError):
                what = exc.message
            else:
                what = f"refused the connection ({exc.strerror or exc})"
            upstream.abort()
            accepted = self._accept(request)
            self.fail(
                VncUnavailable(
                    f"VNC endpoint {endpoint.describe()} {what}; the session may have stopped"
                )
            )
            if accepted:
                self._start_relay()  # to read the viewer's answer to our close
            return
        if self.transport is None or self.transport.is_closing():
            upstream.close()
            return
        if not self._accept(request):
            upstream.close()
            return
        if self.server_rfb is not None:
            self.viewer_rfb = NoAuthServerHandshake()
            self._to_viewer(self.viewer_rfb.data_to_send(), count=False)
        else:
            self._flush_vnc_pending()
        self._start_relay()
        self._schedule_ping()

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
        self.bridge.metrics.viewers.inc()
        self.bridge.authorizer.viewer_attached(self.session_id)
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

    def _start_relay(self) -> None:
        """Read the viewer's frames: first those that came before the 101, then the rest."""
        early, self._early = self._early, None
        self._resume_reading()
        if early:
            self._receive_frames(bytes(early))

    def _receive_frames(self, data: bytes) -> None:
        reader = self.reader
        reader.receive_data(data)
        for frame in reader.events_received():
            opcode = frame.opcode
            if opcode is Opcode.BINARY or opcode is Opcode.CONT:  # the hot path
                self._from_viewer(frame.data)
            else:
                self._handle_frame(frame)
        if reader.failure is not None:
            self._broken_rule(reader.failure)

    def _handle_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.TEXT:
            self.close(1003, "text frames are not accepted; send RFB bytes as binary frames")
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

    # --- relay --------------------------------------------------------------------------------

    def _from_viewer(self, payload: BytesLike) -> None:
        upstream = self.upstream
        if upstream is None or upstream.transport is None or self.close_code is not None:
            return
        self.bytes_in += len(payload)
        if self.viewer_rfb is not None:
            try:
                self.viewer_rfb.receive_data(bytes(payload))
            except ProtocolError as exc:
                self.fail(exc)
                return
            self._to_viewer(self.viewer_rfb.data_to_send(), count=False)
            if not self.viewer_rfb.done:
                return
            payload = self.viewer_rfb.take_unparsed()
            self.viewer_rfb = None
            assert self.server_rfb is not None
            leftover = self.server_rfb.take_unparsed()
            self.server_rfb = None
            if leftover:
                self._to_viewer(leftover)
        upstream.write(payload)

    def _to_viewer(self, data: bytes, *, count: bool = True) -> None:
        if not data or self.state is not State.OPEN:
            return
        if count:
            self.bytes_out += len(data)
        assert self.transport is not None
        self.transport.writelines((frame_header(Opcode.BINARY, len(data)), data))

    # --- what the VNC connection reports (called by _Upstream) --------------------------------

    def vnc_received(self, data: bytes) -> None:
        """Bytes from the VNC server: answered while authenticating, relayed once open, or kept."""
        if self.server_rfb is not None and self._vnc_auth is not None:
            self._authenticate(data)  # buffered in server_rfb once authenticated, until ClientInit
        elif self.status == 101:
            self._to_viewer(data)
        else:
            self._vnc_pending += data  # before the 101 or before the password handshake started

    def vnc_backlog(self, full: bool) -> None:
        """The VNC side's write buffer filled (or drained): stop (or resume) reading the viewer."""
        if full:
            self._pause_reading()
        elif self._early is None:  # bytes before the relay stay paused until it starts
            self._resume_reading()

    def vnc_lost(self, reason: str | None) -> None:
        """The VNC connection ended; ``reason`` says why, or is None when the bridge closed it."""
        if self._vnc_auth is not None and not self._vnc_auth.done():
            self._vnc_auth.set_exception(
                VncUnavailable("closed the connection during the VNC handshake")
            )
        if reason is not None and self.status == 101:
            self.close(1011, reason)

    def _flush_vnc_pending(self) -> None:
        """Feed VNC bytes that arrived before the 101 or the password handshake was set up."""
        pending, self._vnc_pending = bytes(self._vnc_pending), bytearray()
        if pending:
            self.vnc_received(pending)

    def _authenticate(self, data: bytes) -> None:
        assert self.server_rfb is not None
        assert self._vnc_auth is not None
        assert self.upstream is not None
        rfb = self.server_rfb
        try:
            rfb.receive_data(data)
        except (ProtocolError, VncUnavailable) as exc:
            if not self._vnc_auth.done():
                self._vnc_auth.set_exception(exc)
            return
        self.upstream.write(rfb.data_to_send())
        if rfb.state is ClientState.AUTHENTICATED and not self._vnc_auth.done():
            self._vnc_auth.set_result(None)

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
        self._ping_timer = loop.call_later(self.bridge.ping_interval, self._ping)

    def _ping(self) -> None:
        if self.state is not State.OPEN:
            return
        if self._ping_payload is not None:
            self.close(1011, f"keepalive ping unanswered for {self.bridge.ping_interval:.0f} s")
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
        self.bridge.viewers.discard(self)
        metrics = self.bridge.metrics
        duration = time.monotonic() - self.started
        if self.attached:
            metrics.viewers.dec()
            metrics.seconds.observe(duration)
            metrics.bytes.labels("in").inc(self.bytes_in)
            metrics.bytes.labels("out").inc(self.bytes_out)
            assert self.session_id is not None
            self.bridge.authorizer.viewer_detached(self.session_id, self.bytes_in, self.bytes_out)
        outcome = str(self.close_code if self.status == 101 else self.status or "aborted")
        metrics.connections.labels(outcome).inc()
        log.info(
            "vnc_viewer",
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


class _Upstream(asyncio.Protocol):
    """The connection to the session's VNC server: moves bytes, reports to its viewer."""

    def __init__(self, viewer: _Viewer) -> None:
        self.viewer = viewer
        self.transport: asyncio.Transport | None = None
        self.closed_by_us = False
        self.lost_reason: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        self.viewer.vnc_received(data)

    def pause_writing(self) -> None:
        self.viewer.vnc_backlog(True)

    def resume_writing(self) -> None:
        self.viewer.vnc_backlog(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed_by_us:
            detail = f": {exc}" if exc else ""
            self.lost_reason = f"the VNC server closed the connection{detail}"
        self.viewer.vnc_lost(self.lost_reason)

    def write(self, data: BytesLike) -> None:
        """Send bytes to the VNC server."""
        if self.transport is not None:
            self.transport.write(data)

    def pause_reading(self) -> None:
        """Stop reading the VNC server (the viewer's write buffer is full)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the VNC server again."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        """Close the VNC connection from our side (the viewer left or the bridge closes)."""
        self.closed_by_us = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Drop the VNC connection (it failed during connect or authentication)."""
        self.closed_by_us = True
        if self.transport is not None:
            self.transport.abort()
