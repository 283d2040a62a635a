"""The VNC bridge: terminates a viewer's WebSocket and relays RFB bytes to the session's VNC.

Theory of operation. The gateway hands each matching upgrade over as an already-connected
transport (:class:`remotecli.gateway.LocalUpgrade`); a :class:`_Viewer` protocol takes it and
feeds the bytes to websockets' sans-I/O ``ServerProtocol``:

1. handshake: the request's session id, cookie, Origin, Host and ``?ticket=`` go to the
   :class:`VncAuthorizer`; a refusal is sent, before any upgrade, as the HTTP answer
   :func:`remotecli.exceptions.http_answer` maps it to (its status, a JSON ``error`` and
   ``message``, ``Retry-After`` past the failed-credential limit);
2. the bridge connects to the session's VNC endpoint (Unix or TCP). When the endpoint carries a
   password, it answers the server's VNC Authentication itself with :class:`remotecli.rfb.RfbClient`
   and later offers the viewer security type None (:class:`remotecli.rfb.NoAuthServerHandshake`);
3. it sends the 101 (subprotocol ``binary`` when offered) and relays: binary payloads to the
   VNC socket, VNC bytes as binary messages. Each side's transport pauses the other side's
   reading when its write buffer is full (backpressure both ways);
4. a text frame closes with 1003, the VNC endpoint going away with 1011 and the reason (an
   error's close code and reason come from :func:`remotecli.exceptions.close_for`), a
   shutdown with 1001; a ping goes out every ``ping_interval`` and an unanswered one closes
   with 1011. One log line and the metrics are written when the connection ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
import secrets
import struct
import time
from collections.abc import Callable, Sequence
from typing import cast
from urllib.parse import parse_qs, urlsplit

import prometheus_client
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.speedups import apply_mask
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
_HEADER_16 = struct.Struct("!BBH")
_LENGTH_16 = struct.Struct("!H")
_LENGTH_64 = struct.Struct("!Q")
_HEADER_64 = struct.Struct("!BBQ")


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
        self.ws = ServerProtocol(
            select_subprotocol=_select_binary,
            max_size=MAX_VIEWER_MESSAGE,
        )
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
        self._fast = False  # parse the viewer's frames here rather than in websockets
        self._inbound = bytearray()
        self.server_rfb: RfbClient | None = None
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
        if self._fast:
            self._relay_frames(data)
        else:
            self.ws.receive_data(data)
            self._handle_events()

    def eof_received(self) -> bool | None:
        self.ws.receive_eof()
        self._handle_events()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.close_code is None and self.status == 101:
            self.close_code = 1006
            self.close_reason = f"viewer connection lost: {exc}" if exc else "viewer went away"
        self._finish()

    def pause_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None and self.upstream.transport is not None:
            self.upstream.transport.resume_reading()

    # --- WebSocket events ---------------------------------------------------------------------

    def _handle_events(self) -> None:
        for event in self.ws.events_received():
            if isinstance(event, Request):
                self._handle_request(event)
            elif isinstance(event, Frame):
                self._handle_frame(event)
        self._flush()

    def _handle_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.BINARY or frame.opcode is Opcode.CONT:
            self._from_viewer(frame.data)
        elif frame.opcode is Opcode.TEXT:
            self.close(1003, "text frames are not accepted; send RFB bytes as binary frames")
        elif frame.opcode is Opcode.PONG:
            if self._ping_payload is not None and frame.data == self._ping_payload:
                self._ping_payload = None
        elif frame.opcode is Opcode.CLOSE and self.close_code is None:
            received = self.ws.close_rcvd
            self.close_code = received.code if received is not None else 1005
            self.close_reason = received.reason if received is not None else ""
            self._close_upstream()

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
                    upstream.authenticated = loop.create_future()
                    upstream.flush_pending()
                    await upstream.authenticated
        except (OSError, TimeoutError, RemoteCliError) as exc:
            if isinstance(exc, TimeoutError):
                what = f"did not answer within {CONNECT_TIMEOUT:.0f} s"
            elif isinstance(exc, RemoteCliError):
                what = exc.message
            else:
                what = f"refused the connection ({exc.strerror or exc})"
            if upstream.transport is not None:
                upstream.transport.abort()
            self._accept(request)
            self.fail(
                VncUnavailable(
                    f"VNC endpoint {endpoint.describe()} {what}; the session may have stopped"
                )
            )
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
            upstream.flush_pending()
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
        self.attached = True
        # Once open, data frames are parsed by _relay_frames; websockets still sees every
        # control frame. Only switch when its parser holds no bytes of a half-received frame.
        self._fast = not self.ws.reader.buffer
        self.bridge.metrics.viewers.inc()
        self.bridge.authorizer.viewer_attached(self.session_id)
        return True

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
        upstream.transport.write(payload)

    def _relay_frames(self, data: bytes) -> None:
        """Relay the viewer's binary frames; hand control frames to websockets; 1003 on text.

        The hot path of viewer-to-VNC traffic: one unmasking copy per frame, no generator.
        """
        buffer = self._inbound + data if self._inbound else data
        end, position = len(buffer), 0
        with memoryview(buffer) as view:
            while end - position >= 2:
                first, second = view[position], view[position + 1]
                length, offset = second & 0x7F, position + 2
                if length == 126:
                    if end - offset < 2:
                        break
                    (length,) = _LENGTH_16.unpack_from(view, offset)
                    offset += 2
                elif length == 127:
                    if end - offset < 8:
                        break
                    (length,) = _LENGTH_64.unpack_from(view, offset)
                    offset += 8
                if length > MAX_VIEWER_MESSAGE:
                    self.close(1009, f"frame over {MAX_VIEWER_MESSAGE} bytes")
                    return
                if end - offset < 4 + length:
                    break
                opcode = first & 0x0F
                if first & 0x70 or not second & 0x80:
                    self.close(1002, "reserved bits set or unmasked frame from the viewer")
                    return
                frame_end = offset + 4 + length
                if opcode in (0x0, 0x2):  # continuation, binary
                    mask = bytes(view[offset : offset + 4])
                    self._from_viewer(apply_mask(view[offset + 4 : frame_end], mask))
                elif opcode == 0x1:
                    self.close(1003, "text frames are not accepted; send RFB bytes as binary")
                    return
                else:  # ping, pong, close and anything unknown: websockets' rules apply
                    self.ws.receive_data(bytes(view[position:frame_end]))
                    self._handle_events()
                position = frame_end
        self._inbound = bytearray(buffer[position:]) if position < end else bytearray()

    def _to_viewer(self, data: bytes, *, count: bool = True) -> None:
        if not data or self.ws.state is not State.OPEN:
            return
        size = len(data)
        if count:
            self.bytes_out += size
        # A server's frames are unmasked: writing the header and the payload as they are saves
        # websockets' serializer two copies of every message (the hot path of the relay).
        if size < 126:
            header = bytes((0x82, size))
        elif size < 65536:
            header = _HEADER_16.pack(0x82, 126, size)
        else:
            header = _HEADER_64.pack(0x82, 127, size)
        assert self.transport is not None
        self.transport.writelines((header, data))

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.ws.data_to_send():
            if data:
                transport.write(data)
            else:
                transport.close()  # SEND_EOF: the closing handshake is over
        if self._abort_timer is None and self.ws.close_expected() and not transport.is_closing():
            loop = asyncio.get_running_loop()
            self._abort_timer = loop.call_later(CLOSE_TIMEOUT, self.abort)

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
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason[:120])
            self._flush()
        self._close_upstream()

    def fail(self, exc: RemoteCliError) -> None:
        """Close with the code and reason ``exc`` maps to (see ``close_for``)."""
        self.close(*close_for(exc))

    def abort(self) -> None:
        """Drop the viewer's connection without a closing handshake."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def upstream_lost(self, reason: str) -> None:
        """The VNC side closed or failed: tell the viewer with 1011."""
        self.close(1011, reason)

    def _close_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()

    # --- keepalive ----------------------------------------------------------------------------

    def _schedule_ping(self) -> None:
        loop = asyncio.get_running_loop()
        self._ping_timer = loop.call_later(self.bridge.ping_interval, self._ping)

    def _ping(self) -> None:
        if self.ws.state is not State.OPEN:
            return
        if self._ping_payload is not None:
            self.close(1011, f"keepalive ping unanswered for {self.bridge.ping_interval:.0f} s")
            return
        self._ping_payload = secrets.token_bytes(4)
        self.ws.send_ping(self._ping_payload)
        self._flush()
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
    """The connection to the session's VNC server, relaying to one :class:`_Viewer`."""

    def __init__(self, viewer: _Viewer) -> None:
        self.viewer = viewer
        self.transport: asyncio.Transport | None = None
        self.authenticated: asyncio.Future[None] | None = None
        self.closed_by_us = False
        self.lost_reason: str | None = None
        self._pending = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        rfb = self.viewer.server_rfb
        if rfb is not None:
            self._authenticate(rfb, data)  # buffered in rfb once authenticated, until ClientInit
        elif self.viewer.status == 101:
            self.viewer._to_viewer(data)
        else:
            self._pending += data  # before the 101 or before the password handshake started

    def flush_pending(self) -> None:
        """Feed bytes that arrived before the password handshake was set up."""
        pending, self._pending = bytes(self._pending), bytearray()
        rfb = self.viewer.server_rfb
        if pending and rfb is not None:
            self._authenticate(rfb, pending)
        elif pending:
            self.viewer._to_viewer(pending)

    def _authenticate(self, rfb: RfbClient, data: bytes) -> None:
        assert self.authenticated is not None
        assert self.transport is not None
        try:
            rfb.receive_data(data)
        except (ProtocolError, VncUnavailable) as exc:
            if not self.authenticated.done():
                self.authenticated.set_exception(exc)
            return
        self.transport.write(rfb.data_to_send())
        if rfb.state is ClientState.AUTHENTICATED and not self.authenticated.done():
            self.authenticated.set_result(None)

    def pause_writing(self) -> None:
        if self.viewer.transport is not None:
            self.viewer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.viewer.transport is not None:
            self.viewer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.authenticated is not None and not self.authenticated.done():
            self.authenticated.set_exception(
                VncUnavailable("closed the connection during the VNC handshake")
            )
        if self.closed_by_us:
            return
        detail = f": {exc}" if exc else ""
        self.lost_reason = f"the VNC server closed the connection{detail}"
        if self.viewer.status == 101:
            self.viewer.upstream_lost(self.lost_reason)

    def close(self) -> None:
        """Close the VNC connection from our side (the viewer left or the bridge closes)."""
        self.closed_by_us = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
