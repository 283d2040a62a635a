"""Forwarding headers: who the client is, and how to tell the upstream (X-Forwarded-*, RFC 7239).

Pure: the gateway passes the request's headers, the peer's address and the scheme it accepted
on, and gets back the headers to forward plus the resolved client. Incoming forwarding headers
are believed only when the peer is a trusted proxy (``--trusted-proxy CIDR``); from anyone else
they are replaced, so a client cannot forge its address. ``X-Request-Id`` is kept when it is a
short token and generated otherwise, so logs on both sides of the gateway share one id.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from remotecli.exceptions import ConfigError
from remotecli.http11 import Header, get_all, get_one

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

FORWARDING_HEADERS = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-real-ip",
    }
)
_REPLACED = FORWARDING_HEADERS | {b"x-request-id"}  # set again by forward()
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def parse_trusted_proxies(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """Parse ``--trusted-proxy`` CIDRs; raise ConfigError naming the bad one."""
    networks: list[IPNetwork] = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(
                f"trusted proxy {cidr!r} is not a CIDR ({exc}); write e.g. 10.0.0.0/8 or ::1/128"
            ) from exc
    return tuple(networks)


@dataclass(frozen=True)
class Forwarding:
    """The resolved client and the request headers to forward upstream."""

    client_address: str  # the client IP after trusted-proxy resolution
    scheme: str  # "http" or "https"
    host: str | None  # the Host the client asked for
    request_id: str
    headers: list[Header]


@functools.lru_cache(maxsize=4096)  # peers repeat; parsing an address costs more than a lookup
def _ip(text: str) -> IPAddress | None:
    text = text.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _trusted(address: IPAddress | None, trusted: tuple[IPNetwork, ...]) -> bool:
    if not trusted or address is None:
        return False  # the usual case, without building a generator per request
    return any(address in network for network in trusted)


@functools.lru_cache(maxsize=4096)
def _canonical(address: str) -> str | None:
    """Return ``address`` in its canonical text form, or None when it is not an IP address."""
    ip = _ip(address)
    return ip.compressed if ip is not None else None


@functools.lru_cache(maxsize=4096)
def forwarded_node(address: str) -> str:
    """Return ``address`` as an RFC 7239 node: IPv6 bracketed and quoted, IPv4 bare."""
    ip = _ip(address)
    if ip is None:
        return "unknown"
    if ip.version == 6:
        return f'"[{ip.compressed}]"'
    return ip.compressed


def forwarded_value(value: str) -> str:
    """Return ``value`` as an RFC 7239 token, or a quoted-string when it is not a token."""
    if _TOKEN.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def resolve_client(hops: Sequence[str], peer: str, trusted: tuple[IPNetwork, ...]) -> str:
    """Return the client of a request that came from ``peer`` through the proxies ``hops`` name.

    ``hops`` is the ``X-Forwarded-For`` chain (leftmost the first), believed only when ``peer``
    is trusted. The client is the rightmost hop that is not a trusted proxy (an entry that is
    not an IP address counts as untrusted), or the leftmost when every hop is trusted.
    """
    client = peer
    for hop in reversed(hops):
        client = hop
        if not _trusted(_ip(hop), trusted):
            break
    return client


def forwarded_for(value: str | None) -> list[str]:
    """Split an ``X-Forwarded-For`` value into its hops, empty entries dropped."""
    if not value:
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


def forward(
    headers: list[Header],
    *,
    peer: str,
    scheme: str,
    port: int,
    trusted: tuple[IPNetwork, ...],
    new_request_id: Callable[[], str] = lambda: uuid.uuid4().hex,
) -> Forwarding:
    """Resolve the client and return the headers to forward: forwarding ones set, id kept or made.

    ``peer`` is the address of the socket's other end, ``scheme`` and ``port`` how the gateway
    accepted it. The caller forwards :attr:`Forwarding.headers` and logs the request id.
    """
    # One pass: the headers kept, and the two every request needs (Host, X-Request-Id).
    out: list[Header] = []
    host_header: bytes | None = None
    request_id_value: bytes | None = None
    for key, value in headers:
        name = key.lower()
        if name not in _REPLACED:
            out.append((key, value))
            if name == b"host" and host_header is None:
                host_header = value
        elif name == b"x-request-id" and request_id_value is None:
            request_id_value = value
    host = host_header.decode("latin-1") if host_header is not None else None
    peer_ip = _ip(peer)
    from_proxy = _trusted(peer_ip, trusted)

    xff = (
        [
            hop
            for value in get_all(headers, b"x-forwarded-for")
            for hop in forwarded_for(value.decode("latin-1"))
        ]
        if from_proxy
        else []
    )
    peer_canonical = _canonical(peer)
    client = resolve_client(xff, peer_canonical if peer_canonical is not None else peer, trusted)

    proto = scheme
    forwarded_host = host
    forwarded_port = str(port)
    previous_forwarded: list[bytes] = []
    if from_proxy:
        incoming_proto = get_one(headers, b"x-forwarded-proto")
        if incoming_proto is not None and incoming_proto.strip().lower() in (b"http", b"https"):
            proto = incoming_proto.strip().lower().decode()
        incoming_host = get_one(headers, b"x-forwarded-host")
        if incoming_host is not None:
            forwarded_host = incoming_host.decode("latin-1")
        incoming_port = get_one(headers, b"x-forwarded-port")
        if incoming_port is not None and incoming_port.strip().isdigit():
            forwarded_port = incoming_port.strip().decode()
        previous_forwarded = get_all(headers, b"forwarded")

    if request_id_value is not None and _REQUEST_ID.fullmatch(request_id_value):
        request_id = request_id_value.decode()
    else:
        request_id = new_request_id()

    element = f"for={forwarded_node(peer)};proto={scheme}"
    if host is not None:
        element += f";host={forwarded_value(host)}"
    peer_text = peer_canonical if peer_canonical is not None else "unknown"
    out.append((b"X-Forwarded-For", ", ".join([*xff, peer_text]).encode("latin-1")))
    out.append((b"X-Forwarded-Proto", proto.encode()))
    if forwarded_host is not None:
        out.append((b"X-Forwarded-Host", forwarded_host.encode("latin-1")))
    out.append((b"X-Forwarded-Port", forwarded_port.encode()))
    out.append((b"Forwarded", b", ".join([*previous_forwarded, element.encode("latin-1")])))
    out.append((b"X-Request-Id", request_id.encode()))
    return Forwarding(
        client_address=client,
        scheme=proto,
        host=forwarded_host,
        request_id=request_id,
        headers=out,
    )
