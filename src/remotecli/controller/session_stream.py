"""The bridge's connection to a session's stream: its VNC server, or its terminal server.

An :class:`Upstream` moves bytes and tells the viewer it serves (a :class:`StreamReceiver`:
:class:`remotecli.controller.relay.ViewerSocket`) what happens: bytes received, its write
buffer going over :data:`WRITE_BUFFER_HIGH` or draining again (the viewer then pauses or
resumes reading its WebSocket: backpressure), and the connection's end, with the reason when
the session ended it.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from websockets.typing import BytesLike

WRITE_BUFFER_HIGH = 1024 * 1024


class StreamReceiver(Protocol):
    """What an :class:`Upstream` reports to (the viewer's side of the relay)."""

    def upstream_received(self, data: bytes) -> None:
        """Bytes came from the session."""
        ...

    def upstream_backlog(self, full: bool) -> None:
        """The write buffer to the session is full (True) or drained again (False)."""
        ...

    def upstream_lost(self, reason: str | None) -> None:
        """The connection ended: ``reason`` says why, or is None when we closed it."""
        ...


class Upstream(asyncio.Protocol):
    """The connection to the session's stream: moves bytes, reports to its viewer."""

    __slots__ = ("closed_by_us", "lost_reason", "peer", "transport", "viewer")

    def __init__(self, viewer: StreamReceiver, peer: str) -> None:
        """``peer`` names the other end in the reason its loss gives ("the VNC server")."""
        self.viewer = viewer
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.closed_by_us = False
        self.lost_reason: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)

    def data_received(self, data: bytes) -> None:
        self.viewer.upstream_received(data)

    def pause_writing(self) -> None:
        self.viewer.upstream_backlog(True)

    def resume_writing(self) -> None:
        self.viewer.upstream_backlog(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed_by_us:
            detail = f": {exc}" if exc else ""
            self.lost_reason = f"{self.peer} closed the connection{detail}"
        self.viewer.upstream_lost(self.lost_reason)

    def write(self, data: BytesLike) -> None:
        """Send bytes to the session."""
        if self.transport is not None:
            self.transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        """Send several pieces of bytes to the session, in order."""
        if self.transport is not None:
            self.transport.writelines(data)

    def pause_reading(self) -> None:
        """Stop reading the session (the viewer's write buffer is full)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read the session again."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def close(self) -> None:
        """Close the connection from our side (the viewer left or the bridge closes)."""
        self.closed_by_us = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Drop the connection (it failed during connect or authentication)."""
        self.closed_by_us = True
        if self.transport is not None:
            self.transport.abort()
