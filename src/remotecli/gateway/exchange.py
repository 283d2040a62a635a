"""One request on a client connection, and the heads the gateway sends on for it each way.

An :class:`Exchange` holds what the gateway knows about one request from its head to the end
of its response (framing, body bytes held before the upstream was connected, counters for the
log line). :func:`upstream_request_head` turns the client's head into the bytes sent to the next
hop: forwarding headers set, hop-by-hop headers dropped, the Host rewritten when configured,
and a Host added when an HTTP/1.0 client sent none (the upstream hop is HTTP/1.1, where Host is
mandatory). :func:`client_response_head` does the same for the upstream's answer: end-to-end
headers kept, the body re-framed for the client, and whether the connection must close after.
The caller (:class:`~remotecli.gateway.connection.ClientConnection`) owns the Exchange, writes
the heads and decides when it ends.
"""

from __future__ import annotations

import time

from remotecli import http11
from remotecli.forwarding import Forwarding
from remotecli.gateway.upstream import UpstreamConnection
from remotecli.http11 import Framing, RequestHead, ResponseHead
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


def client_response_head(
    exchange: Exchange, response: ResponseHead, *, close: bool
) -> tuple[ResponseHead, bool, bool]:
    """Return the head to send the client for ``response``, and two decisions the caller applies.

    ``close`` says whether the client connection closes after this response anyway. Returns
    ``(head, until_close, close)``: ``until_close`` when the upstream's body ends at its EOF
    (tell the upstream connection so), ``close`` when the client connection must close after
    the body. Sets ``exchange.chunked_out`` when the body is re-chunked for the client. Raises
    UpstreamBadResponse (502) for ambiguous response framing, before anything is decided.
    """
    framing = http11.response_framing(response.status, exchange.head.method, response.headers)
    headers = http11.end_to_end(response.headers)
    until_close = framing.kind is Framing.UNTIL_CLOSE
    if framing.kind is Framing.CHUNKED:
        if exchange.head.version == "1.1":
            headers.append((b"Transfer-Encoding", b"chunked"))
            exchange.chunked_out = True
        else:
            close = True  # an HTTP/1.0 client reads the body until the connection closes
    elif until_close:
        close = True
    if close:
        headers.append((b"Connection", b"close"))
    return ResponseHead(response.status, response.reason, "1.1", headers), until_close, close
