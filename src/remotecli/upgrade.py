"""WebSocket upgrade rules for a proxy (RFC 6455 4.2.1): check the request, rebuild hop headers.

Pure: heads in, heads out. The gateway asks :func:`wants_websocket` whether a request tries to
upgrade, :func:`check_websocket_request` whether the attempt is valid (raising BadRequest, 400,
or UpgradeRequired, 426 with ``Sec-WebSocket-Version: 13``), then forwards
:func:`upstream_upgrade_headers` and relays the upstream's answer; on a 101 it sends the client
:func:`client_switching_headers` and from then on relays raw bytes, so extensions and
subprotocols are negotiated end to end between browser and upstream.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable

from remotecli.exceptions import BadRequest, UpgradeRequired
from remotecli.http11 import Header, RequestHead, ResponseHead, end_to_end, get_all, tokens

WEBSOCKET_VERSION = b"13"
_HOP_UPGRADE: list[Header] = [(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade")]


def wants_websocket(head: RequestHead) -> bool:
    """Return True when the request asks to upgrade to WebSocket (any letter case)."""
    return b"websocket" in tokens(get_all(head.headers, b"upgrade"))


def check_websocket_request(head: RequestHead) -> None:
    """Raise BadRequest (400) or UpgradeRequired (426) unless ``head`` is a valid WS upgrade."""
    if head.method != "GET":
        raise BadRequest(f"a WebSocket upgrade must use GET, not {head.method}; resend it as GET")
    if head.version != "1.1":
        raise BadRequest(f"a WebSocket upgrade needs HTTP/1.1, not HTTP/{head.version}")
    if b"upgrade" not in tokens(get_all(head.headers, b"connection")):
        raise BadRequest(
            "WebSocket upgrade without the 'upgrade' token in Connection; "
            "send Connection: Upgrade with Upgrade: websocket"
        )
    keys = get_all(head.headers, b"sec-websocket-key")
    if len(keys) != 1:
        raise BadRequest(
            "WebSocket upgrade needs exactly one Sec-WebSocket-Key; "
            "send 16 random bytes in base64 (RFC 6455 4.1)"
        )
    try:
        raw_key = binascii.a2b_base64(keys[0].strip())
    except binascii.Error:
        raw_key = b""
    if len(raw_key) != 16:
        raise BadRequest(
            f"Sec-WebSocket-Key {keys[0]!r} does not decode to 16 bytes; "
            "send 16 random bytes in base64 (RFC 6455 4.1)"
        )
    versions = get_all(head.headers, b"sec-websocket-version")
    if [version.strip() for version in versions] != [WEBSOCKET_VERSION]:
        raise UpgradeRequired(
            "WebSocket version not supported; this gateway speaks Sec-WebSocket-Version: 13",
            headers=((b"Sec-WebSocket-Version", WEBSOCKET_VERSION),),
        )


def upstream_upgrade_headers(headers: Iterable[Header]) -> list[Header]:
    """Return the end-to-end headers plus the hop's own ``Upgrade``/``Connection`` to forward."""
    return [*end_to_end(headers), *_HOP_UPGRADE]


def is_switching(response: ResponseHead) -> bool:
    """Return True when the upstream accepted the upgrade: 101 with ``Upgrade: websocket``."""
    return response.status == 101 and b"websocket" in tokens(get_all(response.headers, b"upgrade"))


def client_switching_headers(response: ResponseHead) -> list[Header]:
    """Return the 101's headers for the client: end-to-end ones plus ``Upgrade``/``Connection``.

    Sec-WebSocket-Accept, -Protocol and -Extensions are end to end and pass unchanged.
    """
    return [*end_to_end(response.headers), *_HOP_UPGRADE]
