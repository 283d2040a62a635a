"""The in-process contract between the gateway and what it hands a WebSocket upgrade to.

A :class:`LocalUpgrade` names the paths served in-process (the controller's VNC bridge) instead
of forwarded. For a valid upgrade whose path (query excluded) fullmatches ``pattern``, the
gateway resolves who the client is (:class:`ClientInfo`, after its trusted-proxy and Host
checks), calls ``factory(client)`` for the protocol that takes the connection over, and then:

1. makes that protocol the transport's receiver, behind a thin wrapper of the gateway's own
   (:class:`remotecli.gateway.context.HandedOver`) that passes every callback on unchanged;
2. calls ``connection_made(transport)``, then ``data_received(raw request head + any bytes
   after it)``; the protocol does its own handshake and answers on the transport;
3. counts the connection as an open tunnel until the transport is lost: the wrapper calls the
   protocol's ``connection_lost`` first, then the gateway's ``on_connection_lost`` callback
   (as uvicorn passes ``on_connection_lost`` into the protocol it upgrades to). The protocol
   itself is never patched, and need not know the gateway counts it.

On shutdown the gateway awaits ``shutdown()`` (close with 1001) before closing what is left.
``transport.get_protocol()`` returns the gateway's wrapper, not the protocol.

This module holds only the values both sides share and imports nothing of the gateway, so the
controller depends on this contract, not on the gateway's insides (``remotecli.gateway``
re-exports both names).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["ClientInfo", "LocalUpgrade"]


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
