"""The byte relay after a 101: two transports joined, with backpressure and half-close.

Theory of operation. After the upstream's 101 the gateway stops parsing and joins the client's
and the upstream's transports: each side's protocol becomes a :class:`TunnelEnd` that writes
what it receives to the other side's transport, untouched (so WebSocket extensions and
subprotocols stay between browser and upstream). Backpressure is asyncio's own: when a
transport's write buffer passes its high-water mark, asyncio calls ``pause_writing`` on that
transport's protocol, which pauses reading on the *other* transport; ``resume_writing``
resumes it. Memory per tunnel is therefore bounded by the two write buffers, whatever a slow
peer does. An EOF from one side is passed on with ``write_eof`` (half-close) where the transport
can (TCP, Unix); TLS cannot half-close, so there an EOF closes both after flushing. The tunnel
ends when both transports are lost; ``close`` flushes what is buffered before closing. TCP
keepalive is switched on for the upstream side here; the client side inherits it from the
gateway's listening socket (see :func:`keepalive`), which saves a system call per tunnel.
Nothing is logged or allocated per chunk: the hot path is one ``write`` and one addition.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from typing import Any

READ_HIGH_WATER = 1024 * 1024  # bytes a tunnel end may buffer towards a slow peer

# (client address, path, upstream, request id): a tuple, as idle tunnels should cost little.
TunnelAbout = tuple[str, str, str, str]


class TunnelEnd(asyncio.Protocol):
    """One side of a tunnel: forwards what its transport reads to the peer's transport."""

    __slots__ = ("bytes", "eof", "lost", "peer", "transport", "tunnel")

    def __init__(self, tunnel: Tunnel, transport: asyncio.Transport) -> None:
        self.tunnel = tunnel
        self.transport = transport
        self.peer: TunnelEnd = self
        self.bytes = 0  # bytes read from this side (and written to the peer)
        self.eof = False
        self.lost = False

    def data_received(self, data: bytes) -> None:
        self.peer.transport.write(data)
        self.bytes += len(data)
        if self.tunnel.idle_timeout is not None:
            self.tunnel.last_activity = time.monotonic()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer.transport
        if self.peer.eof or self.peer.lost or not peer.can_write_eof():
            self.tunnel.close("eof")
            return False
        peer.write_eof()  # half-close: the peer may still answer on the other direction
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.peer.lost:
            if exc is not None:
                self.tunnel.ended = "reset"
            self.peer.transport.close()  # flushes what is buffered, then closes
        self.tunnel.end_lost()

    def pause_writing(self) -> None:
        # Our transport cannot keep up: stop reading what would be written to it.
        if not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.lost and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class TunnelRecord:
    """What every tunnel keeps for its end-of-tunnel log line and its idle timeout.

    :class:`Tunnel` (transports) and :class:`remotecli.gateway.splice.SpliceTunnel` (sockets
    the kernel moves) share it; each implements ``close(reason)``, which an idle tunnel gets.
    """

    __slots__ = (
        "_idle_timer",
        "_on_end",
        "about",
        "ended",
        "idle_timeout",
        "last_activity",
        "started",
    )

    def _start_record(
        self, on_end: Callable[[Any], None], idle_timeout: float | None, about: TunnelAbout
    ) -> None:
        self.idle_timeout = idle_timeout
        self.last_activity = time.monotonic()
        self.started = self.last_activity
        self.ended = ""  # how it ended: "closed", "eof", "reset", "idle", "shutdown"
        self.about = about  # what the end-of-tunnel log line says about it
        self._on_end = on_end
        self._idle_timer: asyncio.TimerHandle | None = None

    def close(self, reason: str) -> None:
        raise NotImplementedError

    def _arm_idle(self) -> None:
        if self.idle_timeout is not None:
            self._idle_timer = asyncio.get_running_loop().call_later(self.idle_timeout, self._idle)

    def _idle(self) -> None:
        assert self.idle_timeout is not None
        remaining = self.last_activity + self.idle_timeout - time.monotonic()
        if remaining > 0:
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(remaining, self._idle)
        else:
            self.close("idle")


class Tunnel(TunnelRecord):
    """A relay between a client transport and an upstream transport until both are gone.

    Create it once both heads are exchanged; pass the bytes already read past each head.
    ``on_end`` is called once with the tunnel when both sides are closed.
    """

    __slots__ = ("_lost", "client", "upstream")

    def __init__(
        self,
        client: asyncio.Transport,
        upstream: asyncio.Transport,
        *,
        on_end: Callable[[Tunnel], None],
        idle_timeout: float | None = None,
        client_early: bytes = b"",
        upstream_early: bytes = b"",
        about: TunnelAbout = ("", "", "", ""),
    ) -> None:
        self.client = TunnelEnd(self, client)
        self.upstream = TunnelEnd(self, upstream)
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        self._start_record(on_end, idle_timeout, about)
        self._lost = 0
        for end in (self.client, self.upstream):
            end.transport.set_write_buffer_limits(high=READ_HIGH_WATER)
            end.transport.set_protocol(end)
        keepalive(upstream.get_extra_info("socket"))
        if upstream_early:
            self.upstream.data_received(upstream_early)
        if client_early:
            self.client.data_received(client_early)
        # A side may have gone while the heads were exchanged; the others read from now on.
        for end in (self.client, self.upstream):
            if end.transport.is_closing():
                end.peer.transport.close()
            else:
                end.transport.resume_reading()
        self._arm_idle()

    @property
    def bytes_up(self) -> int:
        """Bytes relayed from the client to the upstream."""
        return self.client.bytes

    @property
    def bytes_down(self) -> int:
        """Bytes relayed from the upstream to the client."""
        return self.upstream.bytes

    def close(self, reason: str) -> None:
        """End the tunnel: flush what is buffered on both sides, then close them."""
        if not self.ended:
            self.ended = reason
        self.client.transport.close()
        self.upstream.transport.close()

    def abort(self) -> None:
        """Drop both sides now, discarding buffers (after a close that a peer will not drain)."""
        self.client.transport.abort()
        self.upstream.transport.abort()

    def end_lost(self) -> None:
        self._lost += 1
        if self._lost == 2:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
            if not self.ended:
                self.ended = "closed"
            self._on_end(self)


def keepalive(sock: socket.socket | None) -> None:
    """Switch TCP keepalive on for ``sock`` (a listening socket passes it to what it accepts)."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
