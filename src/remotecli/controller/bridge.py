"""The viewer bridge: serves a session's WebSocket views in-process; here, the VNC view.

Theory of operation. :class:`VncBridge` is what the controller hands the gateway: one
:class:`remotecli.gateway.LocalUpgrade` per WebSocket path (the two VNC paths, and the text
view's ``/api/sessions/{id}/tty`` when it has a :class:`TtyAuthorizer`), the set of open
viewers of both views, and the two ways to close them (:meth:`~ViewerHub.close_viewers` for a
session that ends, :meth:`~ViewerHub.shutdown`). What a viewer's WebSocket does, from the
request head to the last close frame, is shared by both views (:mod:`remotecli.controller.relay`);
the text view is :mod:`remotecli.controller.tty_bridge`. The VNC view adds:

1. the :class:`VncAuthorizer` decides, from the request alone, who may watch which session and
   where its VNC server listens (a Unix socket, loopback TCP with a password, or a cluster
   host's session channel, to which the bridge first writes the channel secret and a newline,
   inside TLS that pins the session's certificate when the endpoint has one:
   :mod:`remotecli.cluster.channel`);
2. when the endpoint carries a password, the bridge answers the server's VNC Authentication
   itself with :class:`remotecli.rfb.RfbClient` and later offers the viewer security type None
   (:class:`remotecli.rfb.NoAuthServerHandshake`), so the browser never sees the password;
3. binary payloads go to the VNC socket as they are, VNC bytes come back as binary messages
   (subprotocol ``binary`` when offered, as noVNC does); a text frame closes with 1003.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import ClassVar

import prometheus_client
from websockets.http11 import Request
from websockets.typing import BytesLike, Subprotocol

from remotecli.controller.relay import (
    CONNECT_TIMEOUT,
    Credentials,
    ViewerHub,
    ViewerMetrics,
    ViewerSocket,
    describe_failure,
)
from remotecli.controller.session_stream import Upstream
from remotecli.controller.tty_bridge import TTY_PATH, TtyViewer
from remotecli.controller.viewers import TtyAuthorizer, VncAuthorizer
from remotecli.drivers.base import VncEndpoint
from remotecli.exceptions import ProtocolError, RemoteCliError, VncUnavailable
from remotecli.handover import ClientInfo, LocalUpgrade
from remotecli.logs import get_logger
from remotecli.rfb import ClientState, NoAuthServerHandshake, RfbClient

log = get_logger("controller.bridge")

VNC_PATHS = (
    re.compile(r"/api/sessions/(?P<id>[A-Za-z0-9_-]{1,64})/vnc"),
    re.compile(r"/api/auth/session/(?P<id>[A-Za-z0-9_-]{1,64})/novnc/websock"),
)
BINARY = Subprotocol("binary")


class VncBridge(ViewerHub):
    """Serves the viewer WebSocket paths in-process for the gateway: VNC, and text if asked."""

    def __init__(
        self,
        authorizer: VncAuthorizer,
        *,
        tty_authorizer: TtyAuthorizer | None = None,
        ping_interval: float = 20.0,
        registry: prometheus_client.CollectorRegistry | None = None,
    ) -> None:
        """Pass the result of :meth:`local_upgrades` to the gateway; call :meth:`shutdown` last.

        ``tty_authorizer`` (the controller passes the same :class:`ViewerAccess`) adds the text
        view's path.
        """
        super().__init__(ping_interval=ping_interval)
        self.authorizer = authorizer
        self.tty_authorizer = tty_authorizer
        registry = registry or prometheus_client.CollectorRegistry()
        self.metrics = ViewerMetrics("remotecli_bridge", "VNC", registry)
        self.tty_metrics = ViewerMetrics("remotecli_tty", "text terminal", registry)

    def local_upgrades(self) -> list[LocalUpgrade]:
        """Return the gateway hand-overs: both VNC paths, and the text view's if it has one."""
        upgrades = [
            LocalUpgrade(pattern, self._factory(pattern), self.shutdown) for pattern in VNC_PATHS
        ]
        if self.tty_authorizer is not None:
            upgrades.append(LocalUpgrade(TTY_PATH, self._tty_viewer, self.shutdown))
        return upgrades

    def _factory(self, pattern: re.Pattern[str]) -> Callable[[ClientInfo], asyncio.Protocol]:
        def factory(client: ClientInfo) -> asyncio.Protocol:
            return _VncViewer(self, pattern, client)

        return factory

    def _tty_viewer(self, client: ClientInfo) -> asyncio.Protocol:
        assert self.tty_authorizer is not None
        return TtyViewer(self, client, self.tty_authorizer, self.tty_metrics)


class _VncViewer(ViewerSocket):
    """One VNC viewer: RFB bytes both ways, the VNC password answered on its behalf."""

    name: ClassVar[str] = "vnc"
    kind: ClassVar[str] = "VNC"
    subprotocol: ClassVar[Subprotocol] = BINARY
    text_refusal: ClassVar[str] = "text frames are not accepted; send RFB bytes as binary frames"
    __slots__ = ("_vnc_auth", "authorizer", "server_rfb", "viewer_rfb")

    def __init__(self, bridge: VncBridge, pattern: re.Pattern[str], client: ClientInfo) -> None:
        super().__init__(
            bridge,
            pattern,
            client,
            accounting=bridge.authorizer,
            metrics=bridge.metrics,
            log=log,
        )
        self.authorizer = bridge.authorizer
        self.viewer_rfb: NoAuthServerHandshake | None = None
        self.server_rfb: RfbClient | None = None
        self._vnc_auth: asyncio.Future[None] | None = None

    def _open(self, request: Request, credentials: Credentials) -> None:
        # Authorizing may resume a hibernated session (about a second): not on this callback.
        self._connect_task = asyncio.get_running_loop().create_task(
            self._authorize(request, credentials)
        )

    async def _authorize(self, request: Request, credentials: Credentials) -> None:
        assert self.session_id is not None
        try:
            target = await self.authorizer.authorize_vnc(
                self.session_id,
                cookie_header=credentials.cookie_header,
                origin=credentials.origin,
                host=credentials.host,
                ticket=credentials.ticket,
                client=credentials.client,
            )
        except Exception as exc:  # a refusal, or the authorizer's bug (500)
            self._refuse(exc)
            return
        if self._admit(target.owner):
            await self._connect(request, target.endpoint)

    async def _connect(self, request: Request, endpoint: VncEndpoint) -> None:
        upstream = Upstream(self, "the VNC server")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._dial(upstream, endpoint, "vnc")  # the secret before any RFB byte
                if endpoint.password is not None:
                    self.server_rfb = RfbClient(password=endpoint.password, client_init=False)
                    self._vnc_auth = asyncio.get_running_loop().create_future()
                    self._flush_pending()
                    await self._vnc_auth
        except (OSError, TimeoutError, RemoteCliError) as exc:
            upstream.abort()
            self._unavailable(
                request,
                VncUnavailable(
                    f"VNC endpoint {endpoint.describe()} {describe_failure(exc)}; "
                    "the session may have stopped"
                ),
            )
            return
        if not self._upgrade(request):
            return
        if self.server_rfb is not None:
            self.viewer_rfb = NoAuthServerHandshake()
            self._to_viewer(self.viewer_rfb.data_to_send(), count=False)
        else:
            self._flush_pending()
        self._start_relay()

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

    def upstream_received(self, data: bytes) -> None:
        """Bytes from the VNC server: answered while authenticating, relayed once open, or kept."""
        if self.server_rfb is not None and self._vnc_auth is not None:
            self._authenticate(data)  # buffered in server_rfb once authenticated, until ClientInit
        elif self.status == 101:
            self._to_viewer(data)
        else:
            self._pending += data  # before the 101 or before the password handshake started

    def upstream_lost(self, reason: str | None) -> None:
        """The VNC connection ended: fail a password handshake under way, then close."""
        if self._vnc_auth is not None and not self._vnc_auth.done():
            self._vnc_auth.set_exception(
                VncUnavailable("closed the connection during the VNC handshake")
            )
        super().upstream_lost(reason)

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
