"""Where a client connection stops speaking HTTP: a local upgrade, or a tunnel after a 101.

A valid WebSocket upgrade ends the HTTP life of a client connection in one of two ways.
:func:`hand_over` gives the transport to an in-process :class:`LocalUpgrade` protocol (the
controller's VNC bridge), which then does its own handshake with the raw request bytes.
:func:`start_tunnel` answers the client with the upstream's 101 and joins both transports with a
:class:`~remotecli.gateway.tunnel.Tunnel`. Either way the gateway keeps counting the connection
as a tunnel in its metrics until it ends. The caller must have detached its own protocol (no
timers, no parser) before calling; nothing here raises once the transports are handed over.
"""

from __future__ import annotations

import asyncio
import time

from remotecli import http11
from remotecli.gateway.context import GatewayContext
from remotecli.gateway.exchange import Exchange
from remotecli.gateway.tunnel import Tunnel
from remotecli.gateway.upstream import UpstreamConnection
from remotecli.http11 import ResponseHead
from remotecli.upgrade import client_switching_headers


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
