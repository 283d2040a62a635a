"""WebSocket upgrade validation and hop headers (RFC 6455 4.2.1), with no server."""

from __future__ import annotations

import pytest

from remotecli.exceptions import BadRequest, UpgradeRequired
from remotecli.http11 import Header, RequestHead, ResponseHead
from remotecli.upgrade import (
    check_websocket_request,
    client_switching_headers,
    is_switching,
    upstream_upgrade_headers,
    wants_websocket,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455's sample: 16 bytes


def request(method: str = "GET", version: str = "1.1", **headers: bytes) -> RequestHead:
    """An upgrade request with standard headers, each replaceable (or dropped with b"")."""
    values = {
        b"Host": b"h",
        b"Upgrade": b"websocket",
        b"Connection": b"Upgrade",
        b"Sec-WebSocket-Key": KEY,
        b"Sec-WebSocket-Version": b"13",
    }
    values.update({k.replace("_", "-").encode(): v for k, v in headers.items()})
    return RequestHead(method, "/ws", version, [(k, v) for k, v in values.items() if v])


def test_valid_upgrade_in_any_case_passes() -> None:
    """Upgrade and Connection tokens are matched in any letter case, among other tokens."""
    head = request(Upgrade=b"WebSocket", Connection=b"keep-alive, UPGRADE")
    assert wants_websocket(head)
    check_websocket_request(head)


def test_plain_request_does_not_want_websocket() -> None:
    """A request without Upgrade (or with another protocol) is not a WebSocket upgrade."""
    assert not wants_websocket(RequestHead("GET", "/", "1.1", [(b"Host", b"h")]))
    assert not wants_websocket(request(Upgrade=b"h2c"))


@pytest.mark.parametrize(
    ("head", "cause"),
    [
        (request("POST"), "must use GET"),
        (request(version="1.0"), "needs HTTP/1.1"),
        (request(Connection=b"keep-alive"), "'upgrade' token"),
        (request(Sec_WebSocket_Key=b""), "exactly one Sec-WebSocket-Key"),
        (request(Sec_WebSocket_Key=b"c2hvcnQ="), "16 bytes"),
        (request(Sec_WebSocket_Key=b"not base64!"), "16 bytes"),
    ],
)
def test_invalid_upgrade_is_400(head: RequestHead, cause: str) -> None:
    """Wrong method, version, Connection or key is a 400 naming the problem."""
    with pytest.raises(BadRequest, match=cause):
        check_websocket_request(head)


@pytest.mark.parametrize("version", [b"8", b"", b"13, 8"])
def test_wrong_version_is_426_with_supported_version(version: bytes) -> None:
    """A missing or unsupported Sec-WebSocket-Version is a 426 carrying version 13."""
    with pytest.raises(UpgradeRequired) as raised:
        check_websocket_request(request(Sec_WebSocket_Version=version))
    assert raised.value.status == 426
    assert raised.value.data["headers"] == ((b"Sec-WebSocket-Version", b"13"),)


def test_upstream_headers_keep_end_to_end_and_set_hop_upgrade() -> None:
    """Forwarded: every end-to-end header as is, named ones dropped, Upgrade/Connection set."""
    headers: list[Header] = [
        (b"Connection", b"Upgrade, X-Hop"),
        (b"Upgrade", b"WebSocket"),
        (b"X-Hop", b"1"),
        (b"Sec-WebSocket-Key", KEY),
        (b"Sec-WebSocket-Protocol", b"rfb"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
        (b"Origin", b"https://o"),
        (b"Cookie", b"c=1"),
        (b"Authorization", b"Bearer x"),
    ]
    assert upstream_upgrade_headers(headers) == [
        (b"Sec-WebSocket-Key", KEY),
        (b"Sec-WebSocket-Protocol", b"rfb"),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
        (b"Origin", b"https://o"),
        (b"Cookie", b"c=1"),
        (b"Authorization", b"Bearer x"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
    ]


def test_switching_response_detection_and_client_headers() -> None:
    """Only a 101 with Upgrade: websocket switches; its end-to-end headers go to the client."""
    response = ResponseHead(
        101,
        headers=[
            (b"Upgrade", b"websocket"),
            (b"Connection", b"upgrade"),
            (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
        ],
    )
    assert is_switching(response)
    assert not is_switching(ResponseHead(200, headers=response.headers))
    assert client_switching_headers(response) == [
        (b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        (b"Sec-WebSocket-Extensions", b"permessage-deflate"),
        (b"Upgrade", b"websocket"),
        (b"Connection", b"Upgrade"),
    ]
