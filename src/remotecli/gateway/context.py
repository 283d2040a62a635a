"""What one gateway's connections share: who the client is, local upgrades, bookkeeping.

:class:`ClientInfo` and :class:`LocalUpgrade` are part of the in-process API (re-exported from
:mod:`remotecli.gateway`); :class:`GatewayContext` is the state every
:class:`~remotecli.gateway.connection.ClientConnection` of one
:class:`~remotecli.gateway.server.Gateway` reads and updates (open connections and tunnels,
metrics, the event shutdown waits on).

Tunnels begin and end here. A valid WebSocket upgrade ends the HTTP life of a client
connection in one of two ways: :func:`hand_over` gives the transport to an in-process
:class:`LocalUpgrade` protocol (the controller's VNC bridge), which does its own handshake with
the raw request bytes; :func:`start_tunnel` answers the client with the upstream's 101 and joins
both transports with a :class:`~remotecli.gateway.tunnel.Tunnel`. Either way the connection
counts as an open tunnel until it ends (:meth:`GatewayContext.tunnel_ended`, with its one log
line, or :meth:`GatewayContext.local_ended`). The caller must have detached its own protocol
(no timers, no parser) before calling either; nothing here raises once the transports are
handed over.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from remotecli import http11
from remotecli.config import GatewayConfig
from remotecli.forwarding import IPNetwork
from remotecli.gateway.exchange import Exchange
from remotecli.gateway.metrics import GatewayMetrics
from remotecli.gateway.tunnel import Tunnel
from remotecli.gateway.upstream import UpstreamConnection, UpstreamPool
from remotecli.hosts import HostPolicy
from remotecli.http11 import ResponseHead
from remotecli.logs import get_logger
from remotecli.routing import Router
from remotecli.upgrade import client_switching_headers

if TYPE_CHECKING:
    from remotecli.gateway.connection import ClientConnection

log = get_logger("gateway")


@dataclass(frozen=True)
class ClientInfo:
    """Who is on the other end of a request, as the gateway resolved it."""

    address: str  # client IP after trusted-proxy resolution
    scheme: str  # "http" or "https" (from TLS, or X-Forwarded-Proto of a trusted proxy)
    host: str | None  # Host the client asked for
    request_id: str  # X-Request-Id kept or generated


@dataclass(frozen=True)
class LocalUpgrade:
    """A WebSocket upgrade served in-process instead of forwarded (the controller's VNC bridge)."""

    pattern: re.Pattern[str]  # fullmatch on the path, query excluded
    factory: Callable[[ClientInfo], asyncio.Protocol]  # makes the protocol that takes over
    shutdown: Callable[[], Awaitable[None]] | None = None  # called on gateway shutdown (1001)


@dataclass
class GatewayContext:
    """What every connection of one gateway shares: configuration, routes, pool, bookkeeping."""

    config: GatewayConfig
    router: Router
    pool: UpstreamPool
    metrics: GatewayMetrics
    trusted: tuple[IPNetwork, ...]
    local_upgrades: Sequence[LocalUpgrade]
    scheme: str
    hosts: HostPolicy | None = None  # None: every Host is served
    port: int = 0
    closing: bool = False
    connections: set[ClientConnection] = field(default_factory=set)
    tunnels: set[Tunnel] = field(default_factory=set)
    local_transports: set[asyncio.BaseTransport] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def open_count(self) -> int:
        """Client connections, tunnels and handed-over upgrades open now."""
        return len(self.connections) + len(self.tunnels) + len(self.local_transports)

    def tunnel_ended(self, tunnel: Tunnel) -> None:
        """Account for a tunnel whose both sides are closed, and write its log line."""
        self.tunnels.discard(tunnel)
        self.metrics.tunnels_open.dec()
        self.metrics.tunnels.labels(tunnel.ended).inc()
        self.metrics.add_bytes(tunnel.bytes_up, tunnel.bytes_down)
        log.info(
            "tunnel",
            client=tunnel.about[0],
            path=tunnel.about[1],
            upstream=tunnel.about[2],
            request_id=tunnel.about[3],
            bytes_up=tunnel.bytes_up,
            bytes_down=tunnel.bytes_down,
            duration_ms=round((time.monotonic() - tunnel.started) * 1000, 1),
            ended=tunnel.ended,
        )
        self.changed.set()

    def local_ended(self, transport: asyncio.BaseTransport) -> None:
        """Account for a handed-over upgrade whose connection is gone."""
        if transport in self.local_transports:
            self.local_transports.discard(transport)
            self.metrics.tunnels_open.dec()
            self.metrics.tunnels.labels("local").inc()
            self.changed.set()


def hand_over(
    context: GatewayContext,
    transport: asyncio.Transport,
    protocol: asyncio.Protocol,
    first_bytes: bytes,
) -> None:
    """Make ``protocol`` the owner of ``transport`` and feed it the raw request ``first_bytes``."""
    context.local_transports.add(transport)
    context.metrics.tunnels_open.inc()
    lost = protocol.connection_lost

    def connection_lost(exc: Exception | None) -> None:
        try:
            lost(exc)
        finally:
            context.local_ended(transport)

    protocol.connection_lost = connection_lost  # type: ignore[method-assign]
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    protocol.data_received(first_bytes)
    transport.resume_reading()


def start_tunnel(
    context: GatewayContext,
    client: asyncio.Transport,
    upstream: UpstreamConnection,
    exchange: Exchange,
    response: ResponseHead,
    peer: str,
) -> None:
    """Send the upstream's 101 on to the client and relay raw bytes between both from now on."""
    assert upstream.transport is not None
    head = ResponseHead(101, response.reason, "1.1", client_switching_headers(response))
    client.write(http11.serialize_response(head))
    metrics = context.metrics
    metrics.handshake_seconds.observe(time.monotonic() - exchange.started)
    metrics.count_request(101)
    tunnel = Tunnel(
        client,
        upstream.transport,
        on_end=context.tunnel_ended,
        idle_timeout=context.config.idle_timeout,
        client_early=exchange.early,
        upstream_early=upstream.upgrade_rest,
        about=(peer, exchange.head.path, exchange.upstream_label, exchange.request_id),
    )
    context.tunnels.add(tunnel)
    metrics.tunnels_open.inc()
    # Drop what the HTTP phase held (parsers form reference cycles) so that an idle tunnel
    # costs only its two transports and the Tunnel.
    upstream.forget()
    exchange.upstream = None
    exchange.raw_chunks = []
