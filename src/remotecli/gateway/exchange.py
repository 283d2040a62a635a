"""One request on a client connection, and the request head the gateway sends upstream for it.

An :class:`Exchange` holds what the gateway knows about one request from its head to the end
of its response (framing, body bytes held before the upstream was connected, counters for the
log line). :func:`upstream_request_head` turns the client's head into the bytes sent to the next
hop: forwarding headers set, hop-by-hop headers dropped, the Host rewritten when configured,
and a Host added when an HTTP/1.0 client sent none (the upstream hop is HTTP/1.1, where Host is
mandatory). The caller (:class:`~remotecli.gateway.connection.ClientConnection`) owns the
Exchange and decides when it ends.
"""

from __future__ import annotations

import time

from remotecli import http11
from remotecli.forwarding import Forwarding
from remotecli.gateway.upstream import UpstreamConnection
from remotecli.http11 import Framing, RequestHead
from remotecli.routing import UpstreamAddress
from remotecli.upgrade import upstream_upgrade_headers


class Exchange:
    """One request on a client connection, from its head to the end of its response."""

    __slots__ = (
        "bytes_down",
        "bytes_up",
        "chunked_out",
        "early",
        "ended",
        "framing",
        "head",
        "keep_alive",
        "pending",
        "raw_chunks",
        "request_done",
        "request_id",
        "responded",
        "started",
        "status",
        "upstream",
        "upstream_label",
        "websocket",
    )

    def __init__(self, head: RequestHead, framing: http11.BodyFraming, websocket: bool) -> None:
        self.head = head
        self.framing = framing
        self.websocket = websocket
        self.keep_alive = True
        self.pending: list[bytes] = []  # body bytes read before the upstream was connected
        self.request_done = False
        self.raw_chunks: list[bytes] = []
        self.early = b""  # bytes after an upgrade request's head
        self.upstream: UpstreamConnection | None = None
        self.upstream_label = ""
        self.request_id = ""
        self.responded = False
        self.chunked_out = False
        self.status = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.ended = "done"
        self.started = time.monotonic()


def upstream_request_head(
    exchange: Exchange,
    forwarding: Forwarding,
    address: UpstreamAddress,
    host_rewrite: str | None,
) -> bytes:
    """Return the serialized HTTP/1.1 head to send upstream for ``exchange``.

    ``forwarding`` is what :func:`remotecli.forwarding.forward` resolved for this request and
    ``address`` the upstream chosen by the route; ``host_rewrite`` replaces the client's Host.
    """
    head = exchange.head
    if exchange.websocket:
        headers = upstream_upgrade_headers(forwarding.headers)
    else:
        headers = http11.end_to_end(forwarding.headers)
        if exchange.framing.kind is Framing.CHUNKED:
            headers.append((b"Transfer-Encoding", b"chunked"))
    if host_rewrite is not None:
        headers = http11.without(headers, [b"host"])
        headers.insert(0, (b"Host", host_rewrite.encode("latin-1")))
    elif http11.get_one(headers, b"host") is None:
        # Only HTTP/1.0 may come without Host; the next hop speaks 1.1, which requires it.
        headers.insert(0, (b"Host", address.authority.encode("latin-1")))
    return http11.serialize_request(RequestHead(head.method, head.target, "1.1", headers))
