"""What one gateway's connections share: who the client is, local upgrades, bookkeeping.

:class:`ClientInfo` and :class:`LocalUpgrade` are part of the in-process API (re-exported from
:mod:`remotecli.gateway`); :class:`GatewayContext` is the state every
:class:`~remotecli.gateway.connection.ClientConnection` of one
:class:`~remotecli.gateway.server.Gateway` reads and updates (open connections and tunnels,
metrics, the event shutdown waits on). Tunnels end here too, with their one log line.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from remotecli.config import GatewayConfig
from remotecli.forwarding import IPNetwork
from remotecli.gateway.metrics import GatewayMetrics
from remotecli.gateway.tunnel import Tunnel
from remotecli.gateway.upstream import UpstreamPool
from remotecli.logs import get_logger
from remotecli.routing import Router

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
