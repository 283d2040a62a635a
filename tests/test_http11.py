"""The HTTP/1.1 head rules, fed values and checked on bytes, with no server."""

from __future__ import annotations

import json

import pytest

from remotecli import http11
from remotecli.exceptions import (
    BadRequest,
    HeaderTooLarge,
    UpgradeRequired,
    UpstreamBadResponse,
    UpstreamRefused,
)
from remotecli.http11 import BodyFraming, Framing, RequestHead, ResponseHead


def test_serialize_request_keeps_headers_in_order() -> None:
    """A request head serialises to its request line, headers in order, and a blank line."""
    head = RequestHead("GET", "/a?b=c", "1.1", [(b"Host", b"x"), (b"X-A", b"1")])
    assert http11.serialize_request(head) == b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n"


def test_serialize_response_uses_given_or_standard_reason() -> None:
    """The upstream's reason phrase is kept; without one the standard phrase is used."""
    assert http11.serialize_response(ResponseHead(404, b"Nope")) == b"HTTP/1.1 404 Nope\r\n\r\n"
    assert http11.serialize_response(ResponseHead(502)) == b"HTTP/1.1 502 Bad Gateway\r\n\r\n"


def test_end_to_end_drops_hop_by_hop_and_connection_named() -> None:
    """RFC 9110 7.6.1: hop-by-hop headers and those named in Connection are removed."""
    headers = [
        (b"Connection", b"keep-alive, X-Hop"),
        (b"connection", b"x-other"),
        (b"Keep-Alive", b"timeout=5"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"TE", b"trailers"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"X-Hop", b"1"),
        (b"X-Other", b"2"),
        (b"Cookie", b"a=b"),
    ]
    assert http11.end_to_end(headers) == [(b"Cookie", b"a=b")]


def test_tokens_split_and_lower_case() -> None:
    """Comma-separated tokens are split, trimmed and lower-cased across header lines."""
    assert http11.tokens([b"Keep-Alive, UPGRADE", b" x "]) == {b"keep-alive", b"upgrade", b"x"}


@pytest.mark.parametrize(
    ("headers", "framing"),
    [
        ([], BodyFraming(Framing.NONE)),
        ([(b"Content-Length", b"12")], BodyFraming(Framing.LENGTH, 12)),
        ([(b"Transfer-Encoding", b"Chunked")], BodyFraming(Framing.CHUNKED)),
    ],
)
def test_request_framing_of_valid_requests(
    headers: list[http11.Header], framing: BodyFraming
) -> None:
    """A request without body, with Content-Length, or chunked is framed as such."""
    assert http11.request_framing(headers) == framing


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Content-Length", b"1"), (b"Transfer-Encoding", b"chunked")],
        [(b"Content-Length", b"1"), (b"Content-Length", b"1")],
        [(b"Content-Length", b"1"), (b"Content-Length", b"2")],
        [(b"Content-Length", b"1, 1")],
        [(b"Content-Length", b"-1")],
        [(b"Content-Length", b"0x10")],
        [(b"Transfer-Encoding", b"gzip, chunked")],
        [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
        [(b"Transfer-Encoding", b"identity")],
    ],
)
def test_ambiguous_request_framing_is_400(headers: list[http11.Header]) -> None:
    """Both CL and TE, repeated or malformed CL, or a TE other than chunked is a 400."""
    with pytest.raises(BadRequest) as raised:
        http11.request_framing(headers)
    assert raised.value.status == 400


def test_response_framing_rules() -> None:
    """HEAD, 204 and 304 have no body; no length means until close; CL+TE is a 502."""
    cl = [(b"Content-Length", b"5")]
    assert http11.response_framing(200, "HEAD", cl).kind is Framing.NONE
    assert http11.response_framing(204, "GET", []).kind is Framing.NONE
    assert http11.response_framing(304, "GET", cl).kind is Framing.NONE
    assert http11.response_framing(200, "GET", cl) == BodyFraming(Framing.LENGTH, 5)
    assert http11.response_framing(200, "GET", []).kind is Framing.UNTIL_CLOSE
    with pytest.raises(UpstreamBadResponse) as raised:
        http11.response_framing(200, "GET", [*cl, (b"Transfer-Encoding", b"chunked")])
    assert raised.value.status == 502


def test_head_size_limit_is_431() -> None:
    """A head one byte over the limit raises HeaderTooLarge (431); at the limit it passes."""
    http11.check_head_size(16384, 16384)
    with pytest.raises(HeaderTooLarge) as raised:
        http11.check_head_size(16385, 16384)
    assert raised.value.status == 431
    assert "--max-header-bytes" in raised.value.message


@pytest.mark.parametrize(
    ("head", "cause"),
    [
        (RequestHead("GET", "/", "1.1", []), "no Host header"),
        (RequestHead("GET", "/", "1.1", [(b"Host", b"a"), (b"host", b"b")]), "several Host"),
        (RequestHead("GET", "http://evil/", "1.1", [(b"Host", b"a")]), "not a path"),
    ],
)
def test_bad_request_heads_are_refused(head: RequestHead, cause: str) -> None:
    """Missing or repeated Host, or a non-path target, is a BadRequest naming it."""
    with pytest.raises(BadRequest, match=cause):
        http11.check_request_head(head)


def test_http10_without_host_is_accepted() -> None:
    """HTTP/1.0 did not require Host, so its absence is accepted there."""
    http11.check_request_head(RequestHead("GET", "/", "1.0", []))


def test_response_for_error_carries_extra_headers() -> None:
    """An error carrying headers (426's Sec-WebSocket-Version) has them in its answer."""
    error = UpgradeRequired("speak 13", headers=((b"Sec-WebSocket-Version", b"13"),))
    raw = http11.response_for_error(error)
    assert raw.startswith(b"HTTP/1.1 426 Upgrade Required\r\n")
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in raw


def test_response_for_error_is_json_naming_the_cause_and_closes() -> None:
    """The gateway's own error answer is JSON `error` and `message`, with its length, and closes."""
    raw = http11.response_for_error(
        UpstreamRefused("upstream 127.0.0.1:4000 refused the connection")
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\n")
    assert b"\r\nContent-Type: application/json\r\n" in head
    assert b"\r\nConnection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert json.loads(body) == {
        "error": "refused",
        "message": "upstream 127.0.0.1:4000 refused the connection",
    }


def test_encode_chunk() -> None:
    """A chunk is framed as hex length, CRLF, data, CRLF."""
    assert http11.encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
