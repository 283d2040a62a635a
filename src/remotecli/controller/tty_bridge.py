"""The text view: a viewer's WebSocket relayed to the session's terminal server.

Theory of operation. The WebSocket side (handshake, frames, pings, closing, backpressure and
accounting) is :class:`remotecli.controller.relay.ViewerSocket`'s, as for the VNC view; the text
view differs in what it connects to and how it translates messages:

1. the :class:`TtyAuthorizer` checks the same credentials as the VNC view (a ticket, or the
   login cookie with an allowed Origin), then asks the driver where the session's terminal
   listens: a Unix stream socket, or a session channel on another host (the cluster driver),
   to which the secret and the verb ``tty`` are written before any record. A refusal is an
   HTTP answer before the upgrade; a driver that cannot name the terminal, or a terminal that
   does not answer, gets the upgrade and a close with 1011 naming the cause;
2. a binary message is input (keystrokes, paste: UTF-8 bytes as the terminal takes them),
   written as type-0 records of at most 64 KiB (:func:`remotecli.tty.input_records`);
3. a text message is a JSON control message; the only one is ``{"type": "resize", "cols": C,
   "rows": R}`` (integers, 1..1000), written as a type-1 record. Anything else closes with 1008
   and the reason (:func:`remotecli.tty.parse_control`); one over 4 KiB with 1009;
4. what the terminal server writes is its raw output, relayed as binary messages.

Subprotocol ``tty`` is accepted when offered.
"""

from __future__ import annotations

import asyncio
import re
from typing import ClassVar

from websockets.frames import Frame
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
from remotecli.controller.viewers import TtyAuthorizer
from remotecli.exceptions import BadRequest, RemoteCliError, SessionError
from remotecli.handover import ClientInfo
from remotecli.logs import get_logger
from remotecli.tty import MAX_CONTROL, input_records, parse_control

log = get_logger("controller.tty_bridge")

TTY_PATH = re.compile(r"/api/sessions/(?P<id>[A-Za-z0-9_-]{1,64})/tty")
TTY = Subprotocol("tty")


class TtyViewer(ViewerSocket):
    """One text viewer: input and resizes to the terminal server, its output back."""

    name: ClassVar[str] = "tty"
    kind: ClassVar[str] = "text terminal"
    subprotocol: ClassVar[Subprotocol] = TTY
    __slots__ = ("_control", "authorizer")

    def __init__(
        self,
        hub: ViewerHub,
        client: ClientInfo,
        authorizer: TtyAuthorizer,
        metrics: ViewerMetrics,
    ) -> None:
        super().__init__(hub, TTY_PATH, client, accounting=authorizer, metrics=metrics, log=log)
        self.authorizer = authorizer
        self._control: bytearray | None = None  # a fragmented control message so far

    def _open(self, request: Request, credentials: Credentials) -> None:
        self._connect_task = asyncio.get_running_loop().create_task(
            self._connect(request, credentials)
        )

    async def _connect(self, request: Request, credentials: Credentials) -> None:
        session_id = self.session_id
        assert session_id is not None
        try:
            target = await self.authorizer.authorize_tty(
                session_id,
                cookie_header=credentials.cookie_header,
                origin=credentials.origin,
                host=credentials.host,
                ticket=credentials.ticket,
                client=credentials.client,
            )
        except SessionError as exc:  # the driver cannot name the terminal: say so after the 101
            self._unavailable(
                request,
                SessionError(f"session {session_id} has no text terminal: {exc.message}"),
            )
            return
        except Exception as exc:  # a refusal, or the authorizer's bug (500)
            self._refuse(exc)
            return
        if not self._admit(target.owner):
            return
        upstream = Upstream(self, "the terminal server")
        endpoint = target.endpoint
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await self._dial(upstream, endpoint, "tty")
        except (OSError, TimeoutError, RemoteCliError) as exc:
            upstream.abort()
            self._unavailable(
                request,
                SessionError(
                    f"terminal {endpoint.describe()} {describe_failure(exc)}; "
                    "the session may have stopped"
                ),
            )
            return
        if self._upgrade(request):
            self._flush_pending()
            self._start_relay()

    def _from_viewer(self, payload: BytesLike) -> None:
        """Input: type-0 records to the terminal server."""
        upstream = self.upstream
        if upstream is None or upstream.transport is None or self.close_code is not None:
            return
        self.bytes_in += len(payload)
        upstream.writelines(input_records(payload))

    def _text_frame(self, frame: Frame) -> None:
        """A control message, maybe fragmented: a resize becomes a type-1 record."""
        if self.close_code is not None:
            return
        if self._control is None and frame.fin:
            message = bytes(frame.data)
        else:
            control = self._control = self._control or bytearray()
            control += frame.data
            if len(control) > MAX_CONTROL:
                self.close(1009, f"control message over {MAX_CONTROL} bytes; send only resizes")
                return
            if not frame.fin:
                return
            message, self._control = bytes(control), None
        if len(message) > MAX_CONTROL:
            self.close(1009, f"control message over {MAX_CONTROL} bytes; send only resizes")
            return
        try:
            resize = parse_control(message.decode())  # the frame reader checked UTF-8
        except BadRequest as exc:
            self.fail(exc)  # 1008 and what was wrong
            return
        if self.upstream is not None:
            self.upstream.write(resize.record())
