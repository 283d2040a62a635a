"""Forwarding headers and trusted proxies, with no server."""

from __future__ import annotations

import pytest

from remotecli.exceptions import ConfigError
from remotecli.forwarding import (
    forward,
    forwarded_node,
    forwarded_value,
    parse_trusted_proxies,
)
from remotecli.http11 import Header, get_all, get_one

TRUSTED = parse_trusted_proxies(["10.0.0.0/8", "::1/128"])


def fixed_id() -> str:
    """A request-id generator that is not random, so assertions are exact."""
    return "generated"


def test_untrusted_peer_forwarding_headers_are_replaced() -> None:
    """From an untrusted peer, forged forwarding headers are dropped and replaced."""
    headers: list[Header] = [
        (b"Host", b"app.example"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"evil"),
        (b"Forwarded", b"for=6.6.6.6"),
        (b"X-Real-IP", b"6.6.6.6"),
    ]
    result = forward(
        headers, peer="192.0.2.7", scheme="http", port=8080, trusted=TRUSTED,
        new_request_id=fixed_id,
    )  # fmt: skip
    assert result.client_address == "192.0.2.7"
    assert result.scheme == "http"
    assert get_all(result.headers, b"x-forwarded-for") == [b"192.0.2.7"]
    assert get_one(result.headers, b"x-forwarded-proto") == b"http"
    assert get_one(result.headers, b"x-forwarded-host") == b"app.example"
    assert get_one(result.headers, b"x-forwarded-port") == b"8080"
    assert get_all(result.headers, b"forwarded") == [b"for=192.0.2.7;proto=http;host=app.example"]
    assert get_one(result.headers, b"x-real-ip") is None
    assert get_one(result.headers, b"x-request-id") == b"generated"


def test_trusted_proxy_headers_are_kept_and_extended() -> None:
    """From a trusted proxy, the chain is extended and the real client resolved from it."""
    headers: list[Header] = [
        (b"Host", b"internal:8080"),
        (b"X-Forwarded-For", b"203.0.113.9, 10.1.1.1"),
        (b"X-Forwarded-Proto", b"https"),
        (b"X-Forwarded-Host", b"app.example"),
        (b"X-Forwarded-Port", b"443"),
        (b"Forwarded", b"for=203.0.113.9;proto=https"),
    ]
    result = forward(
        headers, peer="10.2.2.2", scheme="http", port=8080, trusted=TRUSTED,
        new_request_id=fixed_id,
    )  # fmt: skip
    assert result.client_address == "203.0.113.9"
    assert result.scheme == "https"
    assert result.host == "app.example"
    assert get_one(result.headers, b"x-forwarded-for") == b"203.0.113.9, 10.1.1.1, 10.2.2.2"
    assert get_one(result.headers, b"x-forwarded-proto") == b"https"
    assert get_one(result.headers, b"x-forwarded-port") == b"443"
    assert get_one(result.headers, b"forwarded") == (
        b'for=203.0.113.9;proto=https, for=10.2.2.2;proto=http;host="internal:8080"'
    )


def test_ipv6_peer_is_bracketed_and_quoted_in_forwarded() -> None:
    """RFC 7239: an IPv6 node is bracketed and quoted; a host with a port is quoted."""
    result = forward(
        [(b"Host", b"[::1]:8443")], peer="2001:db8::1", scheme="https", port=8443, trusted=(),
        new_request_id=fixed_id,
    )  # fmt: skip
    assert get_one(result.headers, b"forwarded") == (
        b'for="[2001:db8::1]";proto=https;host="[::1]:8443"'
    )
    assert forwarded_node("192.0.2.1") == "192.0.2.1"
    assert forwarded_node("not-an-ip") == "unknown"
    assert forwarded_value('a"b') == '"a\\"b"'


def test_request_id_kept_when_sane_and_generated_otherwise() -> None:
    """A token-like X-Request-Id is kept; a missing or odd one is replaced by a generated id."""
    kept = forward(
        [(b"X-Request-Id", b"abc-123")], peer="192.0.2.1", scheme="http", port=80, trusted=(),
        new_request_id=fixed_id,
    )  # fmt: skip
    assert kept.request_id == "abc-123"
    odd = forward(
        [(b"X-Request-Id", b"a b\x01")], peer="192.0.2.1", scheme="http", port=80, trusted=(),
        new_request_id=fixed_id,
    )  # fmt: skip
    assert odd.request_id == "generated"
    assert get_all(odd.headers, b"x-request-id") == [b"generated"]


def test_all_trusted_chain_resolves_to_leftmost() -> None:
    """When every hop is a trusted proxy, the leftmost address is taken as the client."""
    result = forward(
        [(b"X-Forwarded-For", b"10.9.9.9")], peer="::1", scheme="http", port=80,
        trusted=TRUSTED, new_request_id=fixed_id,
    )  # fmt: skip
    assert result.client_address == "10.9.9.9"


def test_bad_cidr_is_config_error() -> None:
    """A malformed --trusted-proxy value raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="not a CIDR"):
        parse_trusted_proxies(["10.0.0.0/33"])
