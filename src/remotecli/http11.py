"""HTTP/1.1 message heads for a proxy: model, framing rules, hop-by-hop removal, error answers.

Pure: values and bytes in, values and bytes out; the gateway's I/O layer feeds it what its
parser saw. Header names and values stay ``bytes`` as they came off the wire (latin-1), so a
head is forwarded without re-encoding.

Theory of operation. A proxy must never forward a message whose length two parties could read
differently (request smuggling), so :func:`request_framing` refuses any request with both
Content-Length and Transfer-Encoding, repeated or malformed Content-Length, or a
Transfer-Encoding other than ``chunked``; each refusal is a :class:`BadRequest` (400). Headers
meant for one hop only (RFC 9110 7.6.1: Connection, those it names, Keep-Alive,
Proxy-Connection, TE, Transfer-Encoding, Upgrade) are dropped by :func:`end_to_end` before a
head is forwarded. Every error the gateway answers is rendered by :func:`response_for_error`
from :func:`remotecli.exceptions.http_answer`: a JSON body naming the cause and the next step,
the same shape as the controller API's errors.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from http import HTTPStatus

from remotecli.exceptions import (
    BadRequest,
    HeaderTooLarge,
    RemoteCliError,
    UpstreamBadResponse,
    http_answer,
)

Header = tuple[bytes, bytes]

# RFC 9110 7.6.1: meaningful for one connection only; never forwarded.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {b"connection", b"proxy-connection", b"keep-alive", b"te", b"transfer-encoding", b"upgrade"}
)

LAST_CHUNK = b"0\r\n\r\n"


@dataclass
class RequestHead:
    """A request line and its headers, as received (or about to be sent)."""

    method: str
    target: str
    version: str = "1.1"
    headers: list[Header] = field(default_factory=list)

    @property
    def path(self) -> str:
        """The target without its query string: what routes match against."""
        return self.target.partition("?")[0]


@dataclass
class ResponseHead:
    """A status line and its headers, as received (or about to be sent)."""

    status: int
    reason: bytes = b""
    version: str = "1.1"
    headers: list[Header] = field(default_factory=list)


class Framing(enum.Enum):
    """How a message body is delimited on the wire."""

    NONE = "none"  # no body
    LENGTH = "length"  # Content-Length bytes
    CHUNKED = "chunked"  # Transfer-Encoding: chunked
    UNTIL_CLOSE = "until_close"  # responses only: the body ends when the connection does


@dataclass(frozen=True)
class BodyFraming:
    """A body's framing and, for :attr:`Framing.LENGTH`, its length."""

    kind: Framing
    length: int = 0


def get_all(headers: Iterable[Header], name: bytes) -> list[bytes]:
    """Return every value of header ``name`` (lower-case bytes), in order."""
    size = len(name)  # comparing lengths first spares a lower() per header that cannot match
    return [value for key, value in headers if len(key) == size and key.lower() == name]


def get_one(headers: Iterable[Header], name: bytes) -> bytes | None:
    """Return the first value of header ``name`` (lower-case bytes), or None."""
    size = len(name)
    for key, value in headers:
        if len(key) == size and key.lower() == name:
            return value
    return None


def tokens(values: Iterable[bytes]) -> set[bytes]:
    """Split comma-separated header values into lower-case tokens (``Connection``, ``Upgrade``)."""
    found: set[bytes] = set()
    for value in values:
        for item in value.split(b","):
            token = item.strip().lower()
            if token:
                found.add(token)
    return found


def end_to_end(headers: Iterable[Header]) -> list[Header]:
    """Drop hop-by-hop headers and every header the Connection header names (RFC 9110 7.6.1)."""
    headers = list(headers)
    drop = HOP_BY_HOP | tokens(get_all(headers, b"connection"))
    return [(key, value) for key, value in headers if key.lower() not in drop]


def without(headers: Iterable[Header], names: Iterable[bytes]) -> list[Header]:
    """Return ``headers`` minus every header whose lower-case name is in ``names``."""
    drop = frozenset(names)
    return [(key, value) for key, value in headers if key.lower() not in drop]


def check_head_size(received: int, limit: int) -> None:
    """Raise HeaderTooLarge (431) once a request head has grown past ``limit`` bytes."""
    if received > limit:
        raise HeaderTooLarge(
            f"request head is larger than {limit} bytes; send fewer or smaller headers "
            "(large cookies are the usual cause) or raise --max-header-bytes",
            limit=limit,
        )


def check_request_head(head: RequestHead) -> None:
    """Raise BadRequest for a head no proxy should forward: no Host in 1.1, or several Hosts."""
    if head.version not in ("1.0", "1.1"):
        raise BadRequest(f"HTTP/{head.version} is not served here; send HTTP/1.1")
    hosts = get_all(head.headers, b"host")
    if len(hosts) > 1:
        raise BadRequest("request has several Host headers; send exactly one")
    if head.version == "1.1" and not hosts:
        raise BadRequest("HTTP/1.1 request has no Host header; send Host: name[:port]")
    if not head.target.startswith("/"):
        raise BadRequest(
            f"request target {head.target!r} is not a path; send origin-form targets like /api/"
        )


def request_framing(headers: Iterable[Header]) -> BodyFraming:
    """Return how a request body is framed; raise BadRequest for any ambiguous framing."""
    headers = list(headers)
    lengths = get_all(headers, b"content-length")
    codings = get_all(headers, b"transfer-encoding")
    if lengths and codings:
        raise BadRequest(
            "request has both Content-Length and Transfer-Encoding, which proxies may read "
            "differently (request smuggling); send only one of them"
        )
    if codings:
        if [c.strip().lower() for c in b",".join(codings).split(b",")] != [b"chunked"]:
            raise BadRequest(
                "request Transfer-Encoding must be exactly 'chunked'; other codings are refused"
            )
        return BodyFraming(Framing.CHUNKED)
    if len(lengths) > 1 or (lengths and b"," in lengths[0]):
        raise BadRequest("request has more than one Content-Length; send exactly one")
    if lengths:
        return BodyFraming(Framing.LENGTH, _parse_length(lengths[0], BadRequest))
    return BodyFraming(Framing.NONE)


def response_framing(status: int, request_method: str, headers: Iterable[Header]) -> BodyFraming:
    """Return how a response body is framed (RFC 9112 6.3); 502 if ambiguous."""
    headers = list(headers)
    if request_method == "HEAD" or status < 200 or status in (204, 304):
        return BodyFraming(Framing.NONE)
    lengths = get_all(headers, b"content-length")
    codings = get_all(headers, b"transfer-encoding")
    if lengths and codings:
        raise UpstreamBadResponse(
            "upstream response has both Content-Length and Transfer-Encoding; fix the upstream"
        )
    if codings:
        if tokens(codings) != {b"chunked"}:
            raise UpstreamBadResponse(
                "upstream response uses a Transfer-Encoding other than chunked; fix the upstream"
            )
        return BodyFraming(Framing.CHUNKED)
    if len(set(lengths)) > 1:
        raise UpstreamBadResponse(
            "upstream response has conflicting Content-Length headers; fix the upstream"
        )
    if lengths:
        return BodyFraming(Framing.LENGTH, _parse_length(lengths[0], UpstreamBadResponse))
    return BodyFraming(Framing.UNTIL_CLOSE)


def _parse_length(value: bytes, error: type[RemoteCliError]) -> int:
    text = value.strip()
    if not text.isdigit() or len(text) > 18:
        raise error(f"Content-Length {value!r} is not a decimal number of bytes")
    return int(text)


def serialize_request(head: RequestHead) -> bytes:
    """Return the request line and headers, ending with the blank line."""
    lines = [f"{head.method} {head.target} HTTP/{head.version}".encode("latin-1")]
    lines.extend(key + b": " + value for key, value in head.headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def serialize_response(head: ResponseHead) -> bytes:
    """Return the status line and headers, ending with the blank line."""
    reason = head.reason or _reason(head.status).encode("latin-1")
    lines = [f"HTTP/{head.version} {head.status} ".encode("latin-1") + reason]
    lines.extend(key + b": " + value for key, value in head.headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def encode_chunk(data: bytes | bytearray | memoryview) -> bytes:
    """Frame one chunk of a chunked body; an empty ``data`` would end the body, so skip it."""
    return b"%x\r\n" % len(data) + bytes(data) + b"\r\n"


def simple_response(
    status: int,
    body: bytes,
    *,
    content_type: bytes = b"text/plain; charset=utf-8",
    headers: Iterable[Header] = (),
    close: bool = False,
) -> bytes:
    """Return a whole response with a Content-Length body (the gateway's own health check)."""
    all_headers = [
        (b"Content-Type", content_type),
        (b"Content-Length", str(len(body)).encode()),
        *headers,
    ]
    if close:
        all_headers.append((b"Connection", b"close"))
    return serialize_response(ResponseHead(status, headers=all_headers)) + body


def response_for_error(exc: RemoteCliError) -> bytes:
    """Return the closing HTTP answer the client gets for ``exc`` (see ``http_answer``)."""
    answer = http_answer(exc)
    headers = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in answer.headers]
    headers.append((b"Content-Length", str(len(answer.body)).encode()))
    headers.append((b"Connection", b"close"))
    return serialize_response(ResponseHead(answer.status, headers=headers)) + answer.body


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"
