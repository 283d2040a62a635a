"""What one gateway's connections share, and where their HTTP life ends: tunnels and hand-overs.

:class:`GatewayContext` is the state every client connection of one
:class:`~remotecli.gateway.server.Gateway` reads and updates (open connections and tunnels,
metrics, the event shutdown waits on). It knows connections only as :class:`OpenConnection`
(what shutdown needs of them), so nothing here imports the connection's module.

Tunnels begin and end here. A valid WebSocket upgrade ends the HTTP life of a client
connection in one of two ways: :func:`hand_over` gives the transport to an in-process protocol
(a :class:`remotecli.handover.LocalUpgrade`'s, the controller's VNC bridge), which does its own
handshake with the raw request bytes; :func:`start_tunnel` answers the client with the
upstream's 101 and joins both transports with a :class:`~remotecli.gateway.tunnel.Tunnel`.
Either way the connection counts as an open tunnel until it ends
(:meth:`GatewayContext.tunnel_ended`, with its one log line, or
:meth:`GatewayContext.local_ended`). The caller must have given up the transport (no timers, no
parser: ``SWITCHED``) before calling either; nothing here raises once the transports are
handed over.

A handed-over protocol is told nothing about the gateway: :class:`HandedOver` stands between
it and the transport, passes every callback on, and after the protocol's ``connection_lost``
calls the ``on_connection_lost`` it was given (uvicorn passes the same callback into the
protocol it upgrades to; here the gateway's own wrapper takes it, so the protocol's side of the
contract, :mod:`remotecli.handover`, stays a plain asyncio protocol).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from remotecli import http11
from remotecli.config import GatewayConfig
from remotecli.forwarding import IPNetwork
from remotecli.gateway.metrics import GatewayMetrics
from remotecli.gateway.splice import SpliceTunnel, can_splice, take_socket
from remotecli.gateway.tunnel import Tunnel, TunnelAbout
from remotecli.gateway.upstream import UpstreamConnection, UpstreamPool
from remotecli.handover import LocalUpgrade
from remotecli.hosts import HostPolicy
from remotecli.http11 import ResponseHead
from remotecli.logs import get_logger
from remotecli.routing import Router
from remotecli.upgrade import client_switching_headers

log = get_logger("gateway")


class OpenConnection(Protocol):
    """A client connection still speaking HTTP, as shutdown sees it."""

    @property
    def transport(self) -> asyncio.Transport | None:
        """The client's transport (None before it was made)."""

    def begin_shutdown(self) -> None:
        """Close now if idle, else once the exchange in flight has ended."""


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
    connections: set[OpenConnection] = field(default_factory=set)
    tunnels: set[Tunnel | SpliceTunnel] = field(default_factory=set)
    local_transports: set[asyncio.BaseTransport] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def open_count(self) -> int:
        """Client connections, tunnels and handed-over upgrades open now."""
        return len(self.connections) + len(self.tunnels) + len(self.local_transports)

    def tunnel_ended(self, tunnel: Tunnel | SpliceTunnel) -> None:
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


class HandedOver(asyncio.Protocol):
    """The transport's protocol after a hand-over: passes every callback on to ``protocol``.

    After ``protocol.connection_lost`` it calls ``on_connection_lost`` once, even when the
    protocol raised, so the gateway's count of open tunnels never leaks.
    """

    __slots__ = ("_on_connection_lost", "protocol")

    def __init__(self, protocol: asyncio.Protocol, on_connection_lost: Callable[[], None]) -> None:
        self.protocol = protocol
        self._on_connection_lost: Callable[[], None] | None = on_connection_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.protocol.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.protocol.data_received(data)

    def eof_received(self) -> bool | None:
        return self.protocol.eof_received()

    def pause_writing(self) -> None:
        self.protocol.pause_writing()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        on_lost, self._on_connection_lost = self._on_connection_lost, None
        try:
            self.protocol.connection_lost(exc)
        finally:
            if on_lost is not None:
                on_lost()


def hand_over(
    context: GatewayContext,
    transport: asyncio.Transport,
    protocol: asyncio.Protocol,
    first_bytes: bytes,
) -> None:
    """Make ``protocol`` the owner of ``transport`` and feed it the raw request ``first_bytes``.

    A protocol that raises while taking over is a bug of its own: it is logged and the
    connection aborted (its ``connection_lost`` still follows).
    """
    context.local_transports.add(transport)
    context.metrics.tunnels_open.inc()
    wrapper = HandedOver(protocol, lambda: context.local_ended(transport))
    transport.set_protocol(wrapper)
    try:
        wrapper.connection_made(transport)
        wrapper.data_received(first_bytes)
    except Exception:
        log.exception("local upgrade failed", protocol=type(protocol).__name__)
        transport.abort()
        return
    transport.resume_reading()


def start_tunnel(
    context: GatewayContext,
    client: asyncio.Transport,
    upstream: UpstreamConnection,
    response: ResponseHead,
    started: float,
    client_early: bytes,
    about: TunnelAbout,
) -> None:
    """Send the upstream's 101 on to the client and relay raw bytes between both from now on.

    ``started`` is when the request head arrived (for the handshake histogram),
    ``client_early`` what the client sent after its head, ``about`` what the tunnel's log line
    names.
    """
    assert upstream.transport is not None
    head = ResponseHead(101, response.reason, "1.1", client_switching_headers(response))
    client.write(http11.serialize_response(head))
    metrics = context.metrics
    metrics.handshake_seconds.observe(time.monotonic() - started)
    metrics.count_request(101)
    idle, early, rest = context.config.idle_timeout, client_early, upstream.upgrade_rest
    tunnel: Tunnel | SpliceTunnel
    if can_splice(client, upstream.transport):
        tunnel = SpliceTunnel(
            take_socket(client),
            take_socket(upstream.transport),
            on_end=context.tunnel_ended,
            idle_timeout=idle,
            client_early=early,
            upstream_early=rest,
            about=about,
        )
    else:  # TLS: the transports relay
        tunnel = Tunnel(
            client,
            upstream.transport,
            on_end=context.tunnel_ended,
            idle_timeout=idle,
            client_early=early,
            upstream_early=rest,
            about=about,
        )
    context.tunnels.add(tunnel)
    metrics.tunnels_open.inc()
    if isinstance(tunnel, SpliceTunnel):
        tunnel.start()  # registered first: it may end at once
    # Drop what the HTTP phase held (parsers form reference cycles) so that an idle tunnel
    # costs only its two transports and the Tunnel.
    upstream.forget()
